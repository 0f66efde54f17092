"""What shedding refuses at a moderate load (issue 15: the latency guard must not shed when
nothing is overloaded):

    python -m bench.shed_moderate [--factors 1.5,0] [--rounds 1] [--duration 40] \\
        [-- ENGINE_FLAGS]

Per round, per ``--shed-latency-factor`` in ``--factors`` (in turn, so the machine's drift
falls on all alike), it launches the engine (``--workers 2 --num-threads 1 --policy
priority``), warms it up, and serves ``bench.fidelity``'s priority-mix file (20% critical,
the rest sheddable, chat-short lengths scaled 8x, ``--rate`` requests/s per worker: far
below this machine's capacity at the default 5) through ``bench.loadgen``'s client. It prints
one JSON line per run: per class the requests, those refused (429), and the TTFT p50 / p99
in ms of the served ones.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.engine_server import launched_engine
from bench.fidelity import serve, workload
from bench.flood import pct
from bench.loadgen.client import COMPLETED, RATE_LIMITED

WORKERS = 2


def one_run(factor: str, args: argparse.Namespace) -> dict[str, Any]:
    engine = ["--workers", str(WORKERS), "--num-threads", "1", "--policy", "priority",
              "--shed-latency-factor", factor, *args.engine_args]
    with launched_engine(engine) as (http, _grpc):
        serve(workload("chat-short", 99, WORKERS, 3.0, 8.0), http)  # warm-up
        summary, _, _ = serve(workload("priority-mix", args.seed, WORKERS, args.duration, 8.0,
                                       args.rate), http)
    out: dict[str, Any] = {"factor": float(factor)}
    requests = summary["requests"]
    for name, rows in (("critical", [r for r in requests if r["priority"] > 0]),
                       ("sheddable", [r for r in requests if r["priority"] < 0])):
        ttfts = [1e3 * r["ttft_s"] for r in rows
                 if r["outcome"] == COMPLETED and r["ttft_s"] is not None]
        out[name] = {"requests": len(rows),
                     "refused": sum(r["outcome"] == RATE_LIMITED for r in rows),
                     "ttft_p50_ms": round(pct(ttfts, 50), 1),
                     "ttft_p99_ms": round(pct(ttfts, 99), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shed_moderate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", default="1.5,0", help="--shed-latency-factor values")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=5.0, help="requests/s per worker")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("engine_args", nargs="*", help="extra flags for engine.launch (after --)")
    args = p.parse_args(argv)
    for r in range(args.rounds):
        for factor in args.factors.split(","):
            print(json.dumps({"round": r + 1, **one_run(factor.strip(), args)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
