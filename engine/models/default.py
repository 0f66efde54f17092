"""Where the embedded default model lives.

The model directory ``engine/models/tiny_stdlib_llama/`` is committed with the code, so the
engine starts without a download or a build. If its files are missing (a packaging that
dropped them, a checkout that deleted them), ``default_model_dir()`` trains a replacement
with ``engine.models.train_default`` (the short default budget, about two minutes on two
cores) into the cache directory, ``$ENGINE_CACHE_DIR/default-model`` or, without that
variable, ``~/.cache/engine/default-model``, and returns that. Later calls find it there.

This module does not import torch unless it has to build.

``python -m engine.models.default`` prints the directory (one line on stdout; progress of a
build goes to stderr).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)

COMMITTED_DIR = Path(__file__).resolve().parent / "tiny_stdlib_llama"


def cache_dir() -> Path:
    """Where a rebuilt default model goes."""
    from engine.env import cache_dir as env_cache_dir

    root = env_cache_dir()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "engine"
    return base / "default-model"


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def default_model_dir() -> Path:
    """The embedded default model's directory, building it into the cache if it is missing."""
    if is_complete(COMMITTED_DIR):
        return COMMITTED_DIR
    target = cache_dir()
    if is_complete(target):
        return target
    return _build_into(target)


def _build_into(target: Path) -> Path:
    """Train into a temporary sibling of ``target`` and move it into place, under a lock so
    that several processes asking at once build once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / (target.name + ".lock")
    with open(lock_path, "w") as lock:
        _lock(lock)
        try:
            if is_complete(target):  # another process built it while we waited
                return target
            print(f"engine: the committed default model is missing ({COMMITTED_DIR}); "
                  f"building one into {target} (about two minutes)", file=sys.stderr, flush=True)
            from engine.models.train_default import build

            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout may be a protocol
                    build(tmp, command="python -m engine.models.train_default "
                                       f"--out {shlex.quote(str(target))}")
                tmp.chmod(0o755)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return target
        finally:
            _unlock(lock)


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def _unlock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def main() -> int:
    print(default_model_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
