"""Critical latency under a flood of sheddable requests, and shedding from the first second
(issue 15, targets 2 and 3), in one invocation on one engine:

    python -m bench.flood [--duration 20] [--critical-rate 3] [--flood-rate 150] \\
        [--burst 400] [-o DIR] [-- ENGINE_FLAGS]

1. **burst**: on the fresh engine (no completion history), ``--burst`` sheddable requests
   sent at once; each 429 is retried once after its ``Retry-After``. Reports how many were
   admitted (not all: admission sheds by the engine's real state) and how many retries were.
2. **alone**: the critical stream (priority 1, streamed, ``--critical-rate`` req/s at fixed
   intervals) for ``--duration`` seconds.
3. **flood**: the same critical stream, and a sheddable flood (priority -1, not streamed,
   ``--flood-rate`` req/s) from another process, for ``--duration`` seconds.

With ``--rounds K`` phases 2 and 3 take turns K times and each phase's records are judged
together (its p99 is then over K times as many requests): this machine's speed drifts over
tens of seconds (docs/simulator.md, "Drift"), and one alone phase followed by one flooded
phase lets a drift decide their ratio (the alone p99 of one engine swung from 11.8 to 23.3 ms
between runs: docs/benchmarks.md, "Flood").

Each stream is its own process (``bench.flood_client``: bare asyncio, open loop, one
connection per request), so the flood's client never delays the critical one. Every prompt
starts with a distinct word (no prefix-cache hits between requests). The engine runs with
``--workers 2 --policy priority`` and any flags after ``--``.

Reported: critical TTFT p50/p99 alone and under the flood and their ratios (goal: p99 at most
1.5x, every critical request served), the status counts of each stream (every sheddable one
200 or 429 with ``Retry-After``), the critical requests' frontend stages from
``Server-Timing`` (parse, tokenize, admit, pool to first token), each critical TTFT split
into ``PARTS`` by the pool's stamps (p50/p99 per part, and the three worst requests part by
part with the step each waited for), and the ``Retry-After``
error: for each shed request, its predicted wait against the realized one, the time until
the flood's next request was admitted (the queue had drained below ``--shed-queue-time``);
and for admitted requests, the predicted wait against the realized wait to the first token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any

from bench.engine_server import launched_engine

PROMPT = ("Summarize the following notes for the weekly report, keeping every number and "
          "name exact and the order of the items unchanged: the build passed on all three "
          "platforms, the cache hit rate rose, two regressions remain open, and the release "
          "is planned for Thursday after the final review.")
STAGES = ("parse", "tokenize", "admit", "pool")
#: ``pool`` split by the pool's stamps (engine/frontend/timing.py), in order.
POOL_PARTS = ("to_pool", "queue", "chunks", "step", "out", "back", "wake")
#: Everything a critical request's TTFT is made of, in order: ``accept`` (the client sent
#: it until the app was called: TCP accept, the HTTP server), the frontend's stages, the
#: pool's parts, ``stream`` (the first token's handler until the client read it).
PARTS = ("accept", "parse", "tokenize", "admit", *POOL_PARTS, "stream")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def client(port: int, out: Path, *, start_at: float, **flags: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.flood_client", "--port", str(port), "-o", str(out),
           "--start-at", str(start_at), "--prompt", PROMPT]
    for k, v in flags.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(cmd, text=True)


def run_clients(port: int, out_dir: Path, streams: dict[str, dict[str, Any]]
                ) -> dict[str, list[dict[str, Any]]]:
    """Start each stream's process, all at the same moment; their records."""
    start_at = time.time() + 2.0  # the processes import and connect first
    procs = {name: client(port, out_dir / f"{name}.json", start_at=start_at, **flags)
             for name, flags in streams.items()}
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"client {name} failed ({proc.returncode})")
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name in streams}


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    c = {"200": 0, "429": 0, "429 without Retry-After": 0, "other": 0}
    for r in records:
        status = r.get("status")
        if status == 200 and "error" not in r:
            c["200"] += 1
        elif status == 429:
            c["429" if "retry_after" in r else "429 without Retry-After"] += 1
        else:
            c["other"] += 1
    return c


def critical_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_ms"] for r in records if r.get("status") == 200 and "ttft_ms" in r]
    out: dict[str, Any] = {"n": len(records), "served": len(ttft),
                           "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
                           "ttft_max_ms": max(ttft, default=float("nan"))}
    for stage in STAGES:
        xs = [r["timing"][stage] for r in records if stage in r.get("timing", {})]
        out[f"{stage}_p50_ms"], out[f"{stage}_p99_ms"] = pct(xs, 50), pct(xs, 99)
    rest = [r["ttft_ms"] - sum(r["timing"].get(s, 0.0) for s in STAGES)
            for r in records if "ttft_ms" in r and "timing" in r]
    out["outside_p50_ms"], out["outside_p99_ms"] = pct(rest, 50), pct(rest, 99)
    parts = [p for p in map(ttft_parts, records) if p is not None]
    for name in PARTS:
        xs = [p[name] for p in parts]
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = pct(xs, 50), pct(xs, 99)
    worst = sorted(parts, key=lambda p: -p["ttft"])[:3]
    out["worst"] = worst  # the outliers that set p99, part by part
    return out


def ttft_parts(r: dict[str, Any]) -> dict[str, float] | None:
    """A served critical request's TTFT split into ``PARTS`` (ms), with its step's size;
    None without the pool's stamps."""
    t = r.get("timing", {})
    if r.get("status") != 200 or "ttft_ms" not in r or "received" not in t or "to_pool" not in t:
        return None
    accept = 1e3 * (t["received"] - r["sent"])
    known = accept + sum(t.get(s, 0.0) for s in PARTS if s not in ("accept", "stream"))
    return {"ttft": r["ttft_ms"], "accept": accept,
            **{s: t.get(s, 0.0) for s in PARTS if s not in ("accept", "stream")},
            "stream": r["ttft_ms"] - known, "execute": t.get("execute", 0.0),
            "step_tokens": t.get("step_tokens", 0.0), "step_requests": t.get("step_requests", 0.0),
            "step_wait": t.get("step_wait", 0.0), "prev_step": t.get("prev_step", 0.0),
            "prev_step_tokens": t.get("prev_step_tokens", 0.0),
            "queue_steps": t.get("queue_steps", 0.0),
            "sent_s": r["sent"]}


def retry_after_error(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted against realized waits (seconds; positive: predicted too long)."""
    admitted = sorted(r["sent"] for r in records if r.get("status") == 200)
    shed_err = []
    for r in records:
        if r.get("status") == 429 and "predicted_s" in r:
            i = bisect_right(admitted, r["sent"])
            if i < len(admitted):
                shed_err.append(r["predicted_s"] - (admitted[i] - r["sent"]))
    admit_err = [(r["timing"]["predicted"] - r["timing"]["pool"]) / 1e3 for r in records
                 if "predicted" in r.get("timing", {}) and "pool" in r.get("timing", {})]
    retries = [r["retry"] for r in records if "retry" in r]
    return {
        "shed_n": len(shed_err), "shed_err_p50_s": pct(shed_err, 50),
        "shed_abs_err_p50_s": pct([abs(e) for e in shed_err], 50),
        "shed_abs_err_p90_s": pct([abs(e) for e in shed_err], 90),
        "admitted_n": len(admit_err), "admitted_err_p50_s": pct(admit_err, 50),
        "admitted_abs_err_p90_s": pct([abs(e) for e in admit_err], 90),
        "retries": len(retries),
        "retries_admitted": sum(1 for r in retries if r.get("status") == 200),
    }


def run(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    engine_args = ["--workers", "2", "--policy", "priority", *args.engine_args]
    sheddable = {"priority": -1, "max_tokens": args.max_tokens, "tag": "s"}
    critical = {"priority": 1, "stream": True, "max_tokens": args.max_tokens, "tag": "c",
                "rate": args.critical_rate, "duration": args.duration}
    result: dict[str, Any] = {"engine_args": engine_args}
    with launched_engine(engine_args) as (port, _grpc):
        if args.burst:
            burst = run_clients(port, out_dir, {"burst": {**sheddable, "burst": args.burst,
                                                          "retry": True}})["burst"]
            result["burst"] = {"counts": counts(burst), "error": retry_after_error(burst)}
            time.sleep(2.0)  # let it drain
        alone: list[dict[str, Any]] = []
        both: dict[str, list[dict[str, Any]]] = {"critical": [], "flood": []}
        for k in range(args.rounds):  # alone, then flooded, in turn
            tag = f"-{k + 1}" if args.rounds > 1 else ""
            if k:
                time.sleep(1.0)
            alone += run_clients(port, out_dir, {f"alone{tag}": critical})[f"alone{tag}"]
            time.sleep(1.0)
            got = run_clients(port, out_dir, {
                f"critical{tag}": critical,
                f"flood{tag}": {**sheddable, "rate": args.flood_rate, "duration": args.duration}})
            for name in both:
                both[name] += got[f"{name}{tag}"]
    if args.rounds > 1:  # every round's records together, as one phase's
        for name, records in (("alone", alone), *both.items()):
            (out_dir / f"{name}.json").write_text(json.dumps(records))
    a, f = critical_summary(alone), critical_summary(both["critical"])
    result.update({
        "rounds": args.rounds,
        "alone": {**a, "counts": counts(alone)},
        "flooded": {**f, "counts": counts(both["critical"])},
        "flood": {"counts": counts(both["flood"]), "error": retry_after_error(both["flood"])},
        "ratio_p50": f["ttft_p50_ms"] / a["ttft_p50_ms"],
        "ratio_p99": f["ttft_p99_ms"] / a["ttft_p99_ms"],
    })
    return result


def report(r: dict[str, Any]) -> None:
    print(f"engine: {' '.join(r['engine_args'])}")
    if "burst" in r:
        b = r["burst"]
        print(f"burst (fresh engine): {b['counts']}; retries after Retry-After admitted "
              f"{b['error']['retries_admitted']}/{b['error']['retries']}; predicted - realized "
              f"wait of admitted ones p50 {b['error']['admitted_err_p50_s']:.2f} s")
    print(f"{'critical':<10}{'n':>5}{'served':>8}{'TTFT p50':>10}{'p99':>9}{'max':>9}"
          + "".join(f"{s + ' p50/p99':>20}" for s in (*STAGES, "outside")))
    for name in ("alone", "flooded"):
        c = r[name]
        print(f"{name:<10}{c['n']:>5}{c['served']:>8}{c['ttft_p50_ms']:>10.1f}"
              f"{c['ttft_p99_ms']:>9.1f}{c['ttft_max_ms']:>9.1f}"
              + "".join(f"{c[f'{s}_p50_ms']:>11.2f} /{c[f'{s}_p99_ms']:>7.1f}"
                        for s in (*STAGES, "outside")))
    print(f"{'TTFT parts':<10}" + "".join(f"{s:>10}" for s in PARTS) + "  (p50 / p99 ms)")
    for name in ("alone", "flooded"):
        c = r[name]
        print(f"{name:<10}" + "".join(f"{c[f'{s}_p50_ms']:>10.1f}" for s in PARTS))
        print(f"{'':<10}" + "".join(f"{c[f'{s}_p99_ms']:>10.1f}" for s in PARTS))
    print("worst critical under the flood (ms; step size tokens/requests, worker's execute):")
    for w in r["flooded"]["worst"]:
        print(f"  TTFT {w['ttft']:.1f}: " + ", ".join(f"{s} {w[s]:.1f}" for s in PARTS)
              + f"; step {w['step_tokens']:.0f} tok / {w['step_requests']:.0f} req, "
              f"execute {w['execute']:.1f}; queue: step_wait {w['step_wait']:.1f} for a "
              f"{w['prev_step']:.1f} ms step of {w['prev_step_tokens']:.0f} tok, "
              f"{w['queue_steps']:.0f} steps passed")
    print(f"ratio flooded / alone: p50 {r['ratio_p50']:.2f}x, p99 {r['ratio_p99']:.2f}x "
          "(goal p99 <= 1.5x)")
    fl = r["flood"]
    print(f"flood: {fl['counts']}")
    e = fl["error"]
    print(f"Retry-After error (predicted - realized, s): shed {e['shed_n']}: p50 "
          f"{e['shed_err_p50_s']:.2f}, |p50| {e['shed_abs_err_p50_s']:.2f}, |p90| "
          f"{e['shed_abs_err_p90_s']:.2f}; admitted {e['admitted_n']}: p50 "
          f"{e['admitted_err_p50_s']:.3f}, |p90| {e['admitted_abs_err_p90_s']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of each phase")
    p.add_argument("--critical-rate", type=float, default=3.0)
    p.add_argument("--flood-rate", type=float, default=150.0)
    p.add_argument("--burst", type=int, default=400, help="0: skip the first-burst phase")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the alone and the flooded phase this many times each, in turn "
                   "(--duration each), and judge their records together: the machine's "
                   "drifts then fall on both phases alike")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("-o", "--output-dir", help="keep the raw records and result.json here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("engine_args", nargs="*", help="extra flags for engine.launch (after --)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds: must be at least 1, got {args.rounds}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.output_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = run(args, out_dir)
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
