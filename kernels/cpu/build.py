"""Build the CPU kernels' C sources with the system compiler, once per machine, and load them.

The sources (``kernels/cpu/<name>.c``) are plain C, no PyTorch headers (compiling against
them takes a minute; these build in under a second), called through ``ctypes`` with tensors'
``data_ptr()``s; ctypes releases the GIL for the call. ``-march=native`` tunes them to the CPU
they run on, so a built library is cached under a key of the source, the flags, the
compiler's path and version, and the CPU (machine, processor, feature flags): an edit or
another compiler builds afresh, and a cache shared between hosts (an NFS home) never hands
one CPU a library built for another's instructions. Two processes building at once (an
engine's workers start together) each compile into a private temporary file and
``os.replace`` it onto the final name: the rename is atomic, so a reader sees a whole
library or none.

``load`` raises ``BuildError`` with the reason (no compiler, a failed build, an unwritable
cache, a library that does not load); each caller decides what that means (the attention
kernel's dispatch and the elementwise ops fall back to their torch paths with one warning).

Flags: ``-O3 -march=native``; ``-fno-math-errno -fno-trapping-math`` let loops with ``sqrtf``
and comparisons vectorise without changing any result (no ``-ffast-math``: it would
reassociate sums and flush denormals); ``-fopenmp-simd`` honours ``#pragma omp simd`` with
no OpenMP runtime (a second runtime beside torch's libgomp is asking for trouble); GNU C11
for the vector extensions.

Environment: ``ENGINE_CC`` (else ``CC``, else ``cc``) names the compiler;
``ENGINE_KERNEL_CACHE`` the cache directory (else ``$XDG_CACHE_HOME/engine/kernels``, else
``~/.cache/engine/kernels``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
         "-shared", "-fPIC", "-std=gnu11")

SOURCE_DIR = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """A CPU kernel library cannot be built or loaded here; the message says why."""


def compiler() -> list[str]:
    """The C compiler command: ``ENGINE_CC``, else ``CC``, else ``cc``."""
    return shlex.split(os.environ.get("ENGINE_CC") or os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    explicit = os.environ.get("ENGINE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "engine" / "kernels"


def _compiler_identity(cc: list[str]) -> str:
    exe = shutil.which(cc[0])
    if exe is None:
        raise BuildError(f"no C compiler: {cc[0]!r} not found (set ENGINE_CC or CC)")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C compiler {cc[0]!r} does not run: {e}") from e
    return f"{exe}\n{version}"


@functools.cache
def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the machine and, on Linux, the CPU's feature
    flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}\n{platform.processor()}\n{flags}"


def library_path(name: str) -> Path:
    """Where the library of ``<name>.c`` for these flags, this compiler and this CPU lives
    (built or not)."""
    cc = compiler()
    h = hashlib.sha256()
    for part in ((SOURCE_DIR / f"{name}.c").read_bytes(), " ".join(FLAGS).encode(),
                 " ".join(cc).encode(), _compiler_identity(cc).encode(),
                 _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"{name}-{h.hexdigest()[:16]}.so"


def build(name: str) -> Path:
    """The library of ``kernels/cpu/<name>.c``, compiled now unless the cache has it."""
    target = library_path(name)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so.tmp",
                                   dir=target.parent)
    except OSError as e:
        raise BuildError(f"cannot write the CPU kernels to {target.parent} ({e}); set "
                         "ENGINE_KERNEL_CACHE to a writable directory") from e
    os.close(fd)
    try:
        cmd = [*compiler(), *FLAGS, "-o", tmp, str(SOURCE_DIR / f"{name}.c"), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BuildError(f"building {name}.c failed ({shlex.join(cmd)}):\n"
                             f"{result.stderr.strip()}")
        os.replace(tmp, target)  # atomic: concurrent builders each rename a whole file
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"building {name}.c failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


#: What ``load`` got for each name this process: a library, or why not (a failure is
#: remembered too: a caller on its fallback path must not re-run the compiler every call).
_loaded: dict[str, ctypes.CDLL | str] = {}


def load(name: str) -> ctypes.CDLL:
    """``kernels/cpu/<name>.c`` built (once per machine) and loaded (once per process)."""
    got = _loaded.get(name)
    if got is None:
        try:
            target = build(name)
            try:
                got = ctypes.CDLL(str(target))
            except OSError as e:
                raise BuildError(f"cannot load {target}: {e}") from e
        except BuildError as e:
            got = str(e)
        _loaded[name] = got
    if isinstance(got, str):
        raise BuildError(got)
    return got


def forget() -> None:
    """Drop what ``load`` remembered (tests that change the compiler or the cache)."""
    _loaded.clear()
