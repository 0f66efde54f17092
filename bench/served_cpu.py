"""Where the served engine's CPU goes at saturation, process by process: the frontend, the
pool and the worker, over one run of a workload file sent all at once.

    python -m bench.served_cpu --model /tmp/sat/model --workload-file /tmp/sat/random256x64.jsonl \\
        [--repeat 2] [-- ENGINE_FLAGS]

The engine runs as ``bench.compare`` runs it (1 worker, 1 GiB KV, ``--max-num-seqs 64
--max-num-batched-tokens 512 --num-threads 1``, then ENGINE_FLAGS); the client is
``bench.loadgen run --rate inf`` in its own process. Run ``i`` sends the workload's prompts
shifted as ``bench.compare`` shifts them for its ``i``-th rate (no prefix cache hits across
runs). Each process's CPU seconds (``/proc``
utime + stime) over each run, its share of the run's wall time, and the frontend's CPU per
output token, are printed as JSON. Issue 15: is the served path's own work (frontend, pool)
what keeps the served engine below its in-process rate?
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.compare_workload import shift_prompts, vocab_bound
from bench.engine_server import running_engine
from bench.frontend_cpu import cpu_s
from bench.soak_procs import read_processes
from engine.sim.workloads import read_jsonl, write_jsonl

ENGINE_ARGS = ["--workers", "1", "--kv-cache-memory", "1", "--max-num-seqs", "64",
               "--max-num-batched-tokens", "512", "--num-threads", "1",
               "--served-model-name", "default"]


def one_run(port: int, pids: dict[str, int], workload: str, out: str) -> dict[str, Any]:
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.loadgen", "run", "--url",
                    f"http://127.0.0.1:{port}", "--workload-file", workload, "--model",
                    "default", "--rate", "inf", "--json", out], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    cpu = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    with open(out) as f:
        result = json.load(f)
    tokens = result["output_tokens"]
    return {"wall_s": wall, "out_tok_s": result["throughput_tok_s"],
            "tpot_p50_ms": 1e3 * result["tpot_p50"], "cpu_s": cpu,
            "cores": {n: c / wall for n, c in cpu.items()},
            "frontend_ms_per_token": 1e3 * cpu.get("frontend", 0.0) / max(tokens, 1),
            "loadavg_before": result.get("loadavg_1min_before")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--workload-file", required=True)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("engine_args", nargs="*", help="flags after --, for engine.launch")
    args = p.parse_args()
    runs = []
    with running_engine(["--model", args.model, *ENGINE_ARGS, *args.engine_args]) as engine, \
            tempfile.TemporaryDirectory() as tmp:
        pids = {p.name: p.pid for p in read_processes(engine.proc.pid)}
        requests = list(read_jsonl(args.workload_file).requests())
        for i in range(args.repeat):
            shifted = os.path.join(tmp, f"workload{i}.jsonl")
            write_jsonl(shift_prompts(requests, i, vocab_bound(requests)), shifted)
            runs.append(one_run(engine.http_port, pids, shifted,
                                os.path.join(tmp, f"run{i}.json")))
    print(json.dumps({"engine_args": args.engine_args, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
