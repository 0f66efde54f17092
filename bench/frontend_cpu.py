"""The frontend's CPU cost per request and per streamed token, by kind of request, measured
on the frontend process itself (its ``/proc`` CPU time), so the client's speed does not enter:

    python -m bench.frontend_overhead --cpu [-- ENGINE_FLAGS]

Each case sends requests at a fixed rate from its own process (``bench.flood_client``, bare
asyncio) and divides the frontend's CPU time over the case, less its idle rate (heartbeats,
measured first), by the requests answered:

- ``400 invalid``: a body FastAPI refuses (``temperature: "hot"``): the HTTP server, the
  JSON parse and validation, the error response;
- ``429 early``: sheddable requests to a saturated pool, refused before validation and
  tokenization (``engine.frontend.early_shed``); the pool is saturated by long critical
  requests, one in the only slot and more queued (``--max-num-seqs 1``,
  ``--shed-queue-time 0``), whose own streaming cost (measured just before) is subtracted;
- ``1 token``: a whole request: parse, validate, tokenize, admit, the pool round trip,
  detokenize, the JSON response;
- ``per streamed token``: streamed ``--max-tokens`` requests against streamed 1-token ones
  at the same rate, the difference over the extra tokens.

The engine runs ``--workers 1 --max-num-seqs 1 --shed-queue-time 0`` (and flags after
``--``). CPU time is counted in clock ticks (10 ms): the cases are sized for hundreds of
ticks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine_server import running_engine
from bench.flood import PROMPT, counts
from bench.soak_procs import read_processes

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime + stime


def stream(port: int, out: Path, **flags: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.flood_client", "--port", str(port), "-o", str(out),
           "--prompt", PROMPT]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return subprocess.Popen(cmd, text=True)


def case(port: int, pid: int, out: Path, idle_per_s: float, **flags: Any
         ) -> tuple[float, list[dict[str, Any]]]:
    """(frontend CPU seconds less idle, records) of one fixed-rate stream."""
    t0, c0 = time.perf_counter(), cpu_s(pid)
    proc = stream(port, out, **flags)
    if proc.wait() != 0:
        raise RuntimeError(f"client failed: {flags}")
    used = cpu_s(pid) - c0 - idle_per_s * (time.perf_counter() - t0)
    return used, json.loads(out.read_text())


def run(launch_args: list[str], rate: float = 100.0, duration: float = 4.0,
        max_tokens: int = 64) -> dict[str, Any]:
    args = ["--workers", "1", "--max-num-seqs", "1", "--shed-queue-time", "0", *launch_args]
    results: dict[str, Any] = {"engine_args": args}
    with running_engine(args) as engine, tempfile.TemporaryDirectory() as tmp:
        pid = next(p.pid for p in read_processes(engine.proc.pid) if p.name == "frontend")
        port, d = engine.http_port, Path(tmp)
        c0 = cpu_s(pid)
        time.sleep(3.0)
        idle = (cpu_s(pid) - c0) / 3.0
        results["idle_cpu_per_s"] = idle

        def per(name: str, used: float, n: int, recs: list[dict[str, Any]]) -> None:
            results[name] = {"cpu_ms": 1e3 * used / max(n, 1), "n": n, "counts": counts(recs)}

        used, recs = case(port, pid, d / "bad.json", idle, rate=rate, duration=duration,
                          extra='{"temperature": "hot"}')
        per("400 invalid", used, sum(r.get("status") == 400 for r in recs), recs)
        used, recs = case(port, pid, d / "one.json", idle, rate=rate, duration=duration,
                          max_tokens=1)
        per("1 token", used, sum(r.get("status") == 200 for r in recs), recs)
        # Saturate: long critical requests hold the only slot; then shed a flood. Their
        # streaming costs the frontend CPU too: measured alone first, then subtracted.
        holder = stream(port, d / "hold.json", burst=4, priority=1, max_tokens=1900,
                        stream=True)  # ~4 x 5 s of work, one at a time
        time.sleep(1.0)
        c0 = cpu_s(pid)
        time.sleep(1.5)
        streaming = (cpu_s(pid) - c0) / 1.5
        results["holder_cpu_per_s"] = streaming
        used, recs = case(port, pid, d / "shed.json", streaming, rate=2 * rate,
                          duration=duration / 2, priority=-1, max_tokens=1)
        per("429 early", used, sum(r.get("status") == 429 for r in recs), recs)
        if holder.poll() is not None:
            raise RuntimeError("the long requests ended before the shed case")
        holder.terminate()  # its connections close: the frontend aborts them
        holder.wait()
        slow = max(1.0, rate / 20)
        used1, recs1 = case(port, pid, d / "s1.json", idle, rate=slow, duration=2 * duration,
                            max_tokens=1, stream=True)
        usedn, recsn = case(port, pid, d / "sn.json", idle, rate=slow, duration=2 * duration,
                            max_tokens=max_tokens, stream=True)
        n1 = sum(r.get("status") == 200 for r in recs1)
        nn = sum(r.get("status") == 200 for r in recsn)
        per("1 token streamed", used1, n1, recs1)
        per(f"{max_tokens} tokens streamed", usedn, nn, recsn)
        per_req1 = used1 / max(n1, 1)
        results["per streamed token"] = {
            "cpu_ms": 1e3 * (usedn / max(nn, 1) - per_req1) / (max_tokens - 1)}
    return results


def report(r: dict[str, Any]) -> None:
    print(f"engine: {' '.join(r['engine_args'])}; frontend idle "
          f"{1e3 * r['idle_cpu_per_s']:.1f} ms CPU per s")
    print(f"{'case':<22}{'frontend CPU ms':>16}{'n':>6}  statuses")
    for name, v in r.items():
        if isinstance(v, dict) and "cpu_ms" in v:
            print(f"{name:<22}{v['cpu_ms']:>16.3f}{v.get('n', ''):>6}  {v.get('counts', '')}")
