"""The first requests after an engine starts, and after idle gaps: what a cold worker costs
(docs/kernels.md, "The warm-up step of a CPU worker").

    python -m bench.first_request [--gaps 0.3,0.3,0.3,1,0.3,3,0.3,5,0.3,10] [-- ENGINE_FLAGS]

Launches the engine (one worker, ``--num-threads 1``, ``--profile-steps`` into a temporary
file, plus any flags after ``--``), then sends one request (~60 prompt tokens, 4 output
tokens, greedy) after each gap in turn, one at a time, and prints each one's end-to-end time
and its prefill step's ``execute_s`` from the recording.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.engine_server import launched_engine

GAPS = "0.3,0.3,0.3,1,0.3,3,0.3,5,0.3,10"


def send(port: int, i: int) -> float:
    """One request, distinct from the others (no prefix-cache hit); seconds end to end."""
    body = json.dumps({"prompt": f"w{i} " + "hello there " * 30, "max_tokens": 4,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gaps", default=GAPS, help="seconds of idle before each request")
    p.add_argument("engine_args", nargs="*", help="extra flags for engine.launch (after --)")
    args = p.parse_args()
    gaps = [float(g) for g in args.gaps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        steps_file = Path(tmp) / "steps.jsonl"
        flags = ["--workers", "1", "--num-threads", "1", "--profile-steps", str(steps_file),
                 *args.engine_args]
        with launched_engine(flags) as (port, _grpc):
            e2e = []
            for i, gap in enumerate(gaps):
                time.sleep(gap)
                e2e.append(send(port, i))
        rows = [json.loads(line) for line in steps_file.read_text().splitlines()]
    prefill = [r["execute_s"] for r in rows
               if r.get("kind") == "step" and r.get("prefill_tokens", 0) > 0]
    print(f"{'request':>7}{'gap s':>8}{'e2e ms':>9}{'prefill step ms':>17}")
    for i, (gap, t) in enumerate(zip(gaps, e2e, strict=True)):
        step = f"{1e3 * prefill[i]:.1f}" if i < len(prefill) else "-"
        print(f"{i:>7}{gap:>8}{1e3 * t:>9.1f}{step:>17}")


if __name__ == "__main__":
    main()
