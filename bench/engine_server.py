"""Launch this engine for a benchmark: ``with launched_engine(args) as (http, grpc): ...``.

Both ports are picked by the OS (``--http-port 0 --grpc-port 0``) and read from the ready
line; the engine runs in its own session and gets SIGINT (a clean shutdown) afterwards, then
SIGKILL if it has not exited within ``stop_timeout_s`` (and whatever of its process group
outlived it, e.g. a child of a killed launcher): nothing is left running.
``running_engine`` is the same with the launcher's ``Popen`` too (the soak benchmark watches
its process tree and whether it is still alive).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass


@dataclass(frozen=True)
class RunningEngine:
    proc: subprocess.Popen[str]  # the launcher (``python -m engine.launch``)
    http_port: int
    grpc_port: int


@contextmanager
def running_engine(args: Sequence[str] = (),
                   stop_timeout_s: float = 30.0) -> Iterator[RunningEngine]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.launch", "--http-port", "0",
                             "--grpc-port", "0", "--log-level", "WARNING", *args],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("engine ready:"):
            raise RuntimeError(f"the engine did not start: {line!r}")
        http_url, grpc_url = line.split()[2:4]
        yield RunningEngine(proc, int(http_url.rsplit(":", 1)[1]),
                            int(grpc_url.rsplit(":", 1)[1]))
    finally:
        with suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(proc.pid, signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(stop_timeout_s)
        with suppress(ProcessLookupError):  # what is left of the group (e.g. a child of a
            os.killpg(proc.pid, signal.SIGKILL)  # killed launcher)
        proc.wait()


@contextmanager
def launched_engine(args: Sequence[str] = (),
                    stop_timeout_s: float = 30.0) -> Iterator[tuple[int, int]]:
    with running_engine(args, stop_timeout_s) as engine:
        yield engine.http_port, engine.grpc_port
