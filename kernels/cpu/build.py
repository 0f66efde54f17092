"""Build the CPU kernels' C sources with the system compiler, once per machine, and load them.

The sources are plain C (no PyTorch headers: compiling against them takes a minute; these
take a fraction of a second) called through ``ctypes`` with tensors' ``data_ptr()``s, which
also releases the GIL for the call. ``-march=native`` tunes them to the CPU they run on, so a
built library is cached under a key of the source, the compiler, its flags and the CPU's
feature flags: a cache directory shared between machines (an NFS home) never hands a library
built for another CPU. Two processes building at once (the workers of one engine start
together) each write a private temporary file and ``os.replace`` it into place: the last
rename wins, and both are the same library.

Without a working compiler ``load`` returns None (with one warning naming the reason) and
callers fall back to their torch path: a machine with no C toolchain still runs, slower.

Environment: ``ENGINE_CC`` (else ``CC``, else ``cc``) names the compiler; ``ENGINE_KERNEL_CACHE``
the cache directory (else ``$XDG_CACHE_HOME/engine-kernels``, else ``~/.cache/engine-kernels``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: -fno-math-errno / -fno-trapping-math let the loops vectorise without changing any float
#: result (no -ffast-math: it would reassociate sums and flush denormals).
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
          "-shared", "-fPIC", "-std=c11")

SOURCE_DIR = Path(__file__).resolve().parent


def compiler() -> list[str]:
    return shlex.split(os.environ.get("ENGINE_CC") or os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    explicit = os.environ.get("ENGINE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "engine-kernels"


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` selects from), '' if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler_version(cc: list[str]) -> str:
    out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout


class BuildError(RuntimeError):
    pass


def build(name: str) -> Path:
    """The shared library of ``kernels/cpu/<name>.c``, compiled now or found in the cache.
    Raises ``BuildError`` (with the compiler's message) when it cannot be built."""
    source = SOURCE_DIR / f"{name}.c"
    cc = compiler()
    try:
        version = _compiler_version(cc)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"no working C compiler {shlex.join(cc)!r}: {exc}") from exc
    key = hashlib.sha256()
    for part in (source.read_bytes(), shlex.join(cc).encode(), version.encode(),
                 " ".join(CFLAGS).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *CFLAGS, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BuildError(f"{shlex.join(cc)} failed on {source.name}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"building {source.name} with {shlex.join(cc)!r}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built %s -> %s", source.name, target)
    return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """``kernels/cpu/<name>.c`` built and loaded; None, after one warning, when it cannot be
    (the callers' torch paths then serve)."""
    try:
        return ctypes.CDLL(str(build(name)))
    except (BuildError, OSError) as exc:
        logger.warning("CPU kernels %r unavailable, using the torch ops instead: %s", name, exc)
        return None
