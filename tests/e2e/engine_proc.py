"""Shared helpers of the end-to-end tests: launch the engine as users do, read its pool's KV
state over gRPC, find its processes, and check that Ctrl-C leaves none behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc
import httpx

from engine.frontend.proto import pb2, pb2_grpc


@contextmanager
def launched(*args: str, timeout: float = 180.0, command: Sequence[str] | None = None,
             env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """``python -m engine.launch --grpc-port 0 --http-port 0 ARGS`` in its own session; yields
    (process, bound gRPC port), with the bound HTTP port as ``process.http_port``, and kills
    whatever is left afterwards. ``command`` replaces ``python -m engine.launch`` (torchrun);
    ``env`` is added to the environment."""
    cmd = [*(command or (sys.executable, "-m", "engine.launch")), "--grpc-port", "0",
           "--http-port", "0", "--log-level", "WARNING", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("engine ready:") or proc.poll() is not None:
                break
        assert line.startswith("engine ready: http://"), f"no ready line (got {line!r})"
        http, grpc_url = line.split()[2:4]
        proc.http_port = int(http.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        yield proc, int(grpc_url.rsplit(":", 1)[1])
    finally:  # whatever failed, leave no engine behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of a process's children."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    rows = []
    for line in out.strip().splitlines():
        p, _, args = line.strip().partition(" ")
        rows.append((int(p), args.strip()))
    return rows


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def worker_pids(launcher_pid: int) -> dict[str, int]:
    return {args: pid for pid, args in children(launcher_pid) if args.startswith("engine-worker")}


def nice_of(pid: int) -> int:
    """A process's nice value (field 19 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(") ", 1)[1].split()[16])


#: Sixteen short prompts of the default model's domain, for tests that run many greedy streams.
GREEDY_PROMPTS = (
    "Return a list of", "The default value is", "Raise ValueError if", "This module provides",
    "Create a new", "If the file", "Return True if the", "The result is a",
    "Convert the string", "Open the socket and", "Return the number of", "Set the current",
    "This class implements", "Read the data from", "Return a new dictionary", "When the timeout",
)


def free_blocks(port: int) -> list[int]:
    """Free KV blocks of every live worker of every pool, from Health."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = pb2_grpc.EngineStub(ch).Health(pb2.HealthRequest(), timeout=5)
    return [b for pool in health.pools for b in pool.num_free_blocks]


def wait_idle(port: int, expected: list[int], timeout: float = 20.0) -> list[int]:
    """Poll until the free-block counts equal ``expected`` (or time runs out); return them."""
    deadline = time.time() + timeout
    free = free_blocks(port)
    while time.time() < deadline and free != expected:
        time.sleep(0.2)
        free = free_blocks(port)
    return free


def assert_ctrl_c_leaves_nothing(proc: subprocess.Popen, num_workers: int = 2,
                                 timeout: float = 30.0,
                                 worker_names: list[str] | None = None) -> None:
    """SIGINT to the process group (what Ctrl-C does): the launcher exits 0, no child lives.
    ``worker_names``: the worker processes expected (default ``num_workers`` of pool 0)."""
    rows = children(proc.pid)
    names = sorted(args for _, args in rows if args.startswith("engine-"))
    workers = worker_names or [f"engine-worker-0-{w}" for w in range(num_workers)]
    assert names == ["engine-frontend", "engine-pool-0", *workers]
    pids = [pid for pid, _ in rows]  # with multiprocessing's resource tracker
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=timeout) == 0
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def metric(engine: str, name: str, model: str) -> float:
    """The value of a Prometheus sample ``name{model_name="model"}`` at ``engine``/metrics
    (0 when absent)."""
    text = httpx.get(f"{engine}/metrics").text
    match = re.search(rf'^{re.escape(name)}{{model_name="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def stream_greedy(base: str, prompt: str, max_tokens: int,
                  started: threading.Semaphore | None = None,
                  go: threading.Barrier | None = None) -> str:
    """A greedy completion (EOS ignored) streamed from the engine at ``base``; ``started``
    is released at its first token; with ``go``, the request is sent once every party of
    the barrier has its client ready (streams started together overlap even on a loaded
    machine, where importing and building a client can take a second)."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
    if go is not None:
        go.wait(timeout=60)
    text: list[str] = []
    for chunk in client.completions.create(model="default", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0.0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            if not text and started is not None:
                started.release()
            text.append(chunk.choices[0].text)
    return "".join(text)


class Streams:
    """Greedy streams of ``prompts``, one thread each, started at once; a stream that fails
    leaves its exception in ``errors``."""

    def __init__(self, base: str, prompts: Sequence[str], max_tokens: int) -> None:
        self.out: dict[str, str] = {}
        self.errors: dict[str, BaseException] = {}
        self._started = threading.Semaphore(0)
        go = threading.Barrier(len(prompts))

        def run(prompt: str) -> None:
            try:
                self.out[prompt] = stream_greedy(base, prompt, max_tokens, self._started, go)
            except Exception as e:
                self.errors[prompt] = e

        self.threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in self.threads:
            t.start()

    def wait_under_way(self, timeout: float = 60.0) -> None:
        """Until every stream has its first token; all must still be running."""
        for _ in self.threads:
            assert self._started.acquire(timeout=timeout), "a stream never started"
        assert all(t.is_alive() for t in self.threads), "a stream ended already"

    def join(self, timeout: float = 180.0) -> dict[str, str]:
        for t in self.threads:
            t.join(timeout=timeout)
        return self.out

