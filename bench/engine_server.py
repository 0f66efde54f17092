"""Launch this engine for a benchmark: ``with launched_engine(args) as (http, grpc): ...``.

Both ports are picked by the OS (``--http-port 0 --grpc-port 0``) and read from the ready
line; the engine runs in its own session and gets SIGINT (a clean shutdown) afterwards, then
SIGKILL if it has not exited within ``stop_timeout_s``: nothing is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


@contextmanager
def launched_engine(args: Sequence[str] = (),
                    stop_timeout_s: float = 30.0) -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.launch", "--http-port", "0",
                             "--grpc-port", "0", "--log-level", "WARNING", *args],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("engine ready:"):
            raise RuntimeError(f"the engine did not start: {line!r}")
        http_url, grpc_url = line.split()[2:4]
        yield int(http_url.rsplit(":", 1)[1]), int(grpc_url.rsplit(":", 1)[1])
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
