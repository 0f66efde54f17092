"""Per request, a kept live run against its simulated twin: ``python -m bench.fidelity_requests``.

    python -m bench.fidelity_requests --from DIR [--duration 40] [--workers 1,2] [--top 8]
        [--terms ...] [--in-sample]

``bench.fidelity`` compares percentiles; this says which requests make them. For each judged
run kept by ``bench.fidelity --keep DIR`` (the same workload flags as that run), it pairs
every completed request of the client's results with

- **its pool-side cycle**, from the step recording: the client's requests in send order
  against the recording's ``add`` rows in frontend-stamp order (``calibrate.paired_requests``);
  its first token came from the step whose result the pool took last before its ``first``
  row, and each later token from the next step of that worker (a decoding request is in
  every step of its worker until it finishes: no preemption at these loads). Its cycle TPOT
  is (result of its last step - result of its first) / (tokens - 1), split into the mean
  forward pass of those steps (``execute_s``), what the fitted cost model gives them, and the
  rest (host: the round trip and the pool's turn);
- **its simulated twin**: the same request (by id) in the simulation of the same file with
  the cost model fitted on the calibration runs (noise seed 0).

It prints, per run, the TPOT percentiles of the three (client, pool cycle, simulated), their
correlations across requests, and the mean of each part for the slowest 5% of requests
(by client TPOT) against the middle fifth, then the ``--top`` slowest requests. On the kept
runs of 2026-12-07 (docs/simulator.md, "Per request") the client's TPOT is the pool's cycle
to within 1-2% (correlation 0.94-1.00 with one worker): the frontend's last write adds
nothing; the slowest requests are those whose steps ran 1.4-1.7x the model, in spells.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.fidelity import calibrate, load_runs, workload
from engine.config import SchedulerConfig
from engine.sim.calibrate import (
    TERMS,
    paired_requests,
    shape_of,
    step_rows,
    terms_error,
    window,
)
from engine.sim.cost_model import CostModel
from engine.sim.simulator import SimConfig, Simulator


class Cycle(NamedTuple):
    """A request's decode on the pool, from the recording (seconds, per token)."""

    tpot_s: float  # its steps' results, first to last, over tokens - 1
    execute_s: float  # their forward passes' mean
    model_s: float  # the cost model's mean for them
    host_s: float  # tpot_s - execute_s


class Paired(NamedTuple):
    request_id: str
    num_output_tokens: int
    client_tpot_s: float
    cycle: Cycle | None
    sim_tpot_s: float | None


def pool_cycles(rows: list[dict[str, Any]], client_requests: list[dict[str, Any]],
                cost: CostModel) -> dict[str, Cycle]:
    """Client request id -> its ``Cycle`` (see the module doc); {} unless the client's
    completed requests pair up with the recording's one to one."""
    first, pairs = paired_requests(rows, client_requests)
    if not pairs:
        return {}
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for s in step_rows(rows):
        if "t_result" in s:
            by_worker.setdefault(s["worker"], []).append(s)
    results = {}
    for w, steps in by_worker.items():
        steps.sort(key=lambda s: s["t_result"])
        results[w] = [s["t_result"] for s in steps]
    out = {}
    for a, q in pairs:
        n = q["num_output_tokens"]
        if n < 2:
            continue
        found = _first_step(results, first[a["request"]])
        if found is None:
            continue
        w, k = found
        steps = by_worker[w]
        later = steps[k + 1:k + n]
        if len(later) < n - 1:
            continue
        tpot = (later[-1]["t_result"] - steps[k]["t_result"]) / (n - 1)
        execute = float(np.mean([s["execute_s"] for s in later]))
        model = float(np.mean([cost.step_time(*shape_of(s))
                               + cost.extra_time(shape_of(s), not s.get("busy", True))
                               for s in later]))
        out[q["request_id"]] = Cycle(tpot, execute, model, tpot - execute)
    return out


def _first_step(results: dict[int, list[float]], t: float) -> tuple[int, int] | None:
    """(worker, index) of the step whose result came last at or before ``t``."""
    best: tuple[float, int, int] | None = None
    for w, times in results.items():
        k = bisect.bisect_right(times, t) - 1
        if k >= 0 and (best is None or times[k] > best[0]):
            best = (times[k], w, k)
    return None if best is None else (best[1], best[2])


def sim_tpots(requests: list[Any], cost: CostModel, workers: int) -> dict[str, float]:
    """Request id -> simulated TPOT (requests with at least two tokens)."""
    e = cost.engine
    config = SimConfig(num_workers=workers, block_size=e.block_size, num_blocks=e.num_blocks,
                       max_model_len=e.max_model_len, scheduler=SchedulerConfig(
                           max_num_batched_tokens=e.max_num_batched_tokens,
                           max_num_seqs=e.max_num_seqs))
    out = {}
    for r in Simulator(iter(requests), cost, config).run().records:
        if r.finish is not None and r.first_token is not None and r.num_output_tokens > 1:
            out[r.request_id] = (r.finish - r.first_token) / (r.num_output_tokens - 1)
    return out


def pair(client_requests: list[dict[str, Any]], cycles: dict[str, Cycle],
         sim: dict[str, float]) -> list[Paired]:
    return [Paired(q["request_id"], q["num_output_tokens"], q["tpot_s"],
                   cycles.get(q["request_id"]), sim.get(q["request_id"]))
            for q in client_requests
            if q.get("outcome") == "completed" and q.get("tpot_s") is not None]


def report(name: str, paired: list[Paired], top: int) -> str:
    """Percentiles, correlations, the slowest 5% against the middle fifth, the slowest."""
    ms = 1e3
    client = np.array([p.client_tpot_s for p in paired])
    lines = [f"## {name}: {len(paired)} requests, {sum(p.cycle is not None for p in paired)} "
             "with their pool cycle"]
    cols = {"client": client,
            "pool cycle": np.array([p.cycle.tpot_s if p.cycle else np.nan for p in paired]),
            "simulated": np.array([np.nan if p.sim_tpot_s is None else p.sim_tpot_s
                                   for p in paired])}
    lines.append("| TPOT (ms) | p50 | p90 | p99 | correlation with client |")
    lines.append("|---|---|---|---|---|")
    for label, v in cols.items():
        ok = ~np.isnan(v)
        if ok.sum() < 2:
            continue
        pct = np.percentile(v[ok], [50, 90, 99]) * ms
        corr = float(np.corrcoef(client[ok], v[ok])[0, 1])
        lines.append(f"| {label} | {pct[0]:.2f} | {pct[1]:.2f} | {pct[2]:.2f} | {corr:.2f} |")
    lo, mid_hi, hi = np.percentile(client, [40, 60, 95])
    groups = {"slowest 5%": [p for p in paired if p.client_tpot_s >= hi],
              "middle fifth": [p for p in paired if lo <= p.client_tpot_s <= mid_hi]}
    lines += ["", "| requests (mean, ms) | client | pool cycle | execute | model | host | "
              "simulated | tokens |", "|---|---|---|---|---|---|---|---|"]
    for label, g in groups.items():
        lines.append(f"| {label} | " + " | ".join(_mean(g, f) for f in _FIELDS) + " |")
    lines += ["", "| id | tokens | client | pool cycle | execute | model | host | simulated |",
              "|---|---|---|---|---|---|---|---|"]
    for p in sorted(paired, key=lambda p: -p.client_tpot_s)[:top]:
        c = p.cycle
        cells = [p.client_tpot_s, *(c if c else (None,) * 4), p.sim_tpot_s]
        lines.append(f"| {p.request_id} | {p.num_output_tokens} | "
                     + " | ".join("-" if x is None else f"{x * ms:.2f}" for x in cells) + " |")
    return "\n".join(lines)


_FIELDS = ("client", "tpot", "execute", "model", "host", "sim", "tokens")


def _mean(group: list[Paired], field: str) -> str:
    values: list[float] = []
    for p in group:
        if field == "client":
            values.append(p.client_tpot_s)
        elif field == "sim":
            if p.sim_tpot_s is not None:
                values.append(p.sim_tpot_s)
        elif field == "tokens":
            values.append(p.num_output_tokens)
        elif p.cycle is not None:
            values.append(getattr(p.cycle, f"{field}_s"))
    scale = 1.0 if field == "tokens" else 1e3
    return f"{np.mean(values) * scale:.2f}" if values else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity_requests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="from_dir", required=True, metavar="DIR",
                   help="a run kept by bench.fidelity --keep")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--scale", type=float, default=8.0)
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--calibrate-seed", type=int, default=1)
    p.add_argument("--judge-seed", type=int, default=2)
    p.add_argument("--base")
    p.add_argument("--terms", default="", help=f"as bench.fidelity: {', '.join(TERMS)}")
    p.add_argument("--no-step-extra", action="store_true")
    p.add_argument("--in-sample", action="store_true", help="the calibration runs instead")
    p.add_argument("--top", type=int, default=8, help="list this many slowest requests (8)")
    args = p.parse_args(argv)
    args.terms = [t for t in args.terms.split(",") if t]
    if terms_error(args.terms):
        p.error(str(terms_error(args.terms)))
    try:
        for w in (int(x) for x in args.workers.split(",")):
            rows, runs = load_runs(w, Path(args.from_dir))
            cost = calibrate(w, args, rows, runs).cost
            kind, seed = (("calib", args.calibrate_seed) if args.in_sample
                          else ("judged", args.judge_seed))
            for name, (live, t0, t1) in runs[kind].items():
                reqs = workload(name, seed, w, args.duration, args.scale, args.rate)
                cycles = pool_cycles(window(rows, t0, t1), live["requests"], cost)
                paired = pair(live["requests"], cycles, sim_tpots(reqs, cost, w))
                print(report(f"{w} worker(s), {name} ({kind})", paired, args.top) + "\n")
    except (OSError, ValueError, KeyError) as e:
        print(f"bench.fidelity_requests: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
