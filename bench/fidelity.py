"""How well the simulator predicts the live engine: ``python -m bench.fidelity``.

    flock /work/bench.lock python -m bench.fidelity [--workers 1,2] [--duration 20] \\
        [--calibrate-seed 1] [--judge-seed 2] [--json docs/fidelity.json]

Per worker count, it launches the engine (default model, ``--profile-steps``), warms it up,
then:

Calibration and judged runs are interleaved per workload, so drifts in the machine's other
load fall on both alike.

1. **calibrates**: serves each workload (``chat-short``, ``shared-prefix``, ``priority-mix``,
   scaled 8x) generated with ``--calibrate-seed`` through ``bench.loadgen``'s client, and fits
   a cost file from the recording of those runs and their client TTFTs
   (``engine.sim.calibrate``, the same as ``python -m engine.sim fit``);
2. **judges**: serves the same workloads generated with ``--judge-seed`` (other prompts,
   lengths and arrivals), twice (``--repeat-live``: the second run against the first is the
   machine's own run-to-run spread), and simulates each file with the calibrated cost file and, for
   reference, without the fitted step-time noise and with the committed default cost file
   (no host terms, no noise), on the same engine settings (blocks, budget, sequences,
   placement). The requests the live frontend refused with 429 (priority-mix's sheddable
   ones, shed by the latency guard) are left out of the simulation: the simulator runs the
   pool and its workers, not the frontend's admission, and those requests never reached
   the pool.

It prints, per workload and worker count, each metric (TTFT p50/p99, TPOT p50/p99, mean
step time, output throughput) live / simulated / error; ``--json`` writes every figure.
Live mean step time is the mean ``execute_s`` of the recording's steps in that run's window;
the simulated one is the cost model's mean over the simulated steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine_server import launched_engine
from bench.loadgen.client import RATE_LIMITED, ClientConfig
from bench.loadgen.metrics import summarize as live_summary
from bench.loadgen.replay import replay
from engine.config import SchedulerConfig
from engine.profiling import read_recording
from engine.sim.calibrate import (
    TERMS,
    Calibration,
    fit_recording,
    matched_ttfts,
    step_rows,
    terms_error,
    window,
)
from engine.sim.cost_model import CostModel
from engine.sim.metrics import SLO
from engine.sim.metrics import summarize as sim_summary
from engine.sim.noise_fit import sampled_mean
from engine.sim.simulator import RequestRecord, SimConfig, Simulator
from engine.sim.workloads import SimRequest, WorkloadConfig, make_workload

METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "mean_step_s", "throughput_tok_s")
WORKLOADS = ("chat-short", "shared-prefix", "priority-mix")


def workload(name: str, seed: int, workers: int, duration: float, scale: float,
             rate_per_worker: float = 10.0) -> list[SimRequest]:
    """The requests of one run: about ``duration`` seconds at ``rate_per_worker`` x
    ``workers`` requests/s (shared-prefix: groups of 8 requests)."""
    rate = rate_per_worker * workers
    if name == "shared-prefix":
        per_group = 8
        groups = max(1, round(rate * duration / per_group))
        cfg = WorkloadConfig(name=name, rate=rate, seed=seed, scale=scale, groups=groups,
                             per_group=per_group, max_model_len=2048)
    else:
        cfg = WorkloadConfig(name=name, rate=rate, duration=duration, seed=seed, scale=scale,
                             max_model_len=2048)
    return list(make_workload(cfg).requests())


def serve(requests: list[SimRequest], port: int) -> tuple[dict[str, Any], float, float]:
    """Replay ``requests`` on the engine; (client summary with per-request rows, start,
    end) in unix seconds."""
    cfg = ClientConfig(f"http://127.0.0.1:{port}", "default", None, 120.0, "as-is")
    t0 = time.time()
    run = asyncio.run(replay(requests, cfg))
    t1 = time.time()
    summary = live_summary(run.records, run.duration_s, {})
    summary["requests"] = [r.to_json() for r in run.records]
    return summary, t0, t1


def simulate(requests: list[SimRequest], cost: CostModel, workers: int,
             seeds: int = 1) -> dict[str, Any]:
    """The simulated metrics; with ``seeds`` > 1 and a ``[noise]`` table, each metric's
    median over that many noise seeds (a tail of one run is one draw of the noise; the
    median is the model's prediction of it)."""
    e = cost.engine
    runs = []
    drawn = (cost.noise_quantiles or cost.admit_quantiles or cost.host_quantiles
             or cost.noise_trace is not None)
    for seed in range(seeds if drawn else 1):
        config = SimConfig(num_workers=workers, block_size=e.block_size,
                           num_blocks=e.num_blocks, max_model_len=e.max_model_len,
                           noise_seed=seed,
                           scheduler=SchedulerConfig(
                               max_num_batched_tokens=e.max_num_batched_tokens,
                               max_num_seqs=e.max_num_seqs))
        result = Simulator(iter(requests), cost, config).run()
        out = sim_summary(result, SLO())
        out["mean_step_s"] = sum(result.busy_s) / max(1, result.num_steps)
        out["requests"] = [sim_request(r) for r in result.records if r.finish is not None]
        runs.append(out)
    summary: dict[str, Any] = {k: float(np.median([r[k] for r in runs])) for k in METRICS}
    summary["requests"] = [q for r in runs for q in r["requests"]]  # every seed's, pooled
    return summary


def sim_request(rec: RequestRecord) -> dict[str, Any]:
    """A simulated request as the client's rows have it (for the pooled metrics)."""
    assert rec.first_token is not None and rec.finish is not None
    n = rec.num_output_tokens
    return {"outcome": "completed", "ttft_s": rec.first_token - rec.arrival,
            "tpot_s": (rec.finish - rec.first_token) / (n - 1) if n > 1 else None}


POOLED = ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99")


def pooled(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """TTFT and TPOT percentiles over requests pooled from several runs."""
    out: dict[str, Any] = {}
    for metric in ("ttft", "tpot"):
        values = [q[f"{metric}_s"] for q in requests
                  if q.get("outcome") == "completed" and q.get(f"{metric}_s") is not None]
        for p in (50, 90, 99):
            out[f"{metric}_p{p}"] = float(np.percentile(values, p)) if values else None
    return out


def without_noise(cost: CostModel) -> CostModel:
    """The cost model without its drawn terms (step-time noise, admission delays: their
    mean beyond ``admit_s`` goes into the constant ``stream_s``, so mean TTFTs are kept)."""
    stream = cost.stream_s
    if cost.admit_quantiles:
        stream += max(0.0, sampled_mean(cost.admit_quantiles) - cost.admit_s)
    return replace(cost, stream_s=stream, noise_quantiles=(), noise_rho=0.0,
                   noise_prefill_quantiles=(), noise_slow_rho=0.0, noise_slow_share=0.0,
                   noise_regime_switch=(), noise_regime_quantiles=(), noise_regime_rho=(),
                   noise_regime_host=(), noise_trace=None, admit_spell=None,
                   admit_quantiles=(), host_quantiles=())


def compare(live: dict[str, Any], sim: dict[str, Any],
            metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Per metric: live, simulated, relative error."""
    out = {}
    for k in metrics:
        a, b = live.get(k), sim.get(k)
        err = (b - a) / a if a and b is not None else None
        out[k] = {"live": a, "sim": b, "error": err}
    return out


def run_workers(workers: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Serve the runs live (recording in ``tmp``), keep them, then judge them."""
    base = CostModel.load(args.base)
    rec = tmp / f"steps-{workers}.jsonl"
    engine_args = ["--workers", str(workers), "--profile-steps", str(rec),
                   "--num-threads", str(args.num_threads),
                   "--num-kv-blocks", str(base.engine.num_blocks),
                   "--max-num-batched-tokens", str(base.engine.max_num_batched_tokens),
                   "--max-num-seqs", str(base.engine.max_num_seqs)]
    names = args.workloads
    with launched_engine(engine_args) as (http, _grpc):
        serve(workload("chat-short", 99, workers, 3.0, args.scale), http)  # warm-up
        judge_reqs = {n: workload(n, args.judge_seed, workers, args.duration, args.scale,
                                  args.rate) for n in names}
        runs: dict[str, dict[str, Any]] = {"calib": {}, "judged": {}, "again": {}}
        for n in names:  # interleaved, so that the machine's load drifts into all alike
            runs["calib"][n] = serve(workload(n, args.calibrate_seed, workers, args.duration,
                                              args.scale, args.rate), http)
            runs["judged"][n] = serve(judge_reqs[n], http)
            if args.repeat_live:
                runs["again"][n] = serve(judge_reqs[n], http)
    (tmp / f"runs-{workers}.json").write_text(json.dumps(runs), encoding="utf-8")
    return judge(workers, args, read_recording(rec), runs, tmp)


def load_runs(workers: int, directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A kept run (``--keep DIR``): the recording and the client's results, to judge again
    offline (``--from DIR``) without the engine."""
    rows = read_recording(directory / f"steps-{workers}.jsonl")
    runs = json.loads((directory / f"runs-{workers}.json").read_text(encoding="utf-8"))
    return rows, runs


def live_mean_step(rows: list[dict[str, Any]], t0: float, t1: float) -> float | None:
    steps = step_rows(window(rows, t0, t1))
    return float(np.mean([r["execute_s"] for r in steps])) if steps else None


def calibrate(workers: int, args: argparse.Namespace, rows: list[dict[str, Any]],
              runs: dict[str, Any]) -> Calibration:
    """The cost model fitted on the calibration runs (their recording and client TTFTs)."""
    calib = runs["calib"]
    calib_rows = [r for _, t0, t1 in calib.values() for r in window(rows, t0, t1)]
    ttfts = [q["ttft_s"] for s, _, _ in calib.values() for q in s["requests"]
             if q["outcome"] == "completed" and q["ttft_s"] is not None]
    matched = [m for s, t0, t1 in calib.values()
               for m in matched_ttfts(window(rows, t0, t1), s["requests"])]
    return fit_recording(calib_rows, CostModel.load(args.base), ttfts,
                         source=f"bench.fidelity, {workers} worker(s), seed "
                         f"{args.calibrate_seed}", terms=args.terms, matched=matched,
                         extras=not args.no_step_extra,
                         trace_block=getattr(args, "trace_block", None))


def judge(workers: int, args: argparse.Namespace, rows: list[dict[str, Any]],
          runs: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Fit a cost file on the calibration runs, simulate the judged files with it."""
    base = CostModel.load(args.base)
    calib, judged, again = runs["calib"], runs["judged"], runs["again"]
    cal = calibrate(workers, args, rows, runs)
    cost_path = tmp / f"cost-{workers}.toml"
    cost_path.write_text(cal.cost.to_toml(json.dumps(cal.report)), encoding="utf-8")
    out: dict[str, Any] = {"cost": cal.cost.describe(), "fit": cal.report, "workloads": {}}
    seed = args.judge_seed
    if args.in_sample:  # judge the calibration runs themselves: no drift between fit and run
        judged, again, seed = calib, {}, args.calibrate_seed
    columns = ("calibrated", "no_noise", "default_cost", "live_again")
    pool: dict[str, list[dict[str, Any]]] = {"live": [], **{c: [] for c in columns}}
    for n in judged:
        live, t0, t1 = judged[n]
        pool["live"] += live["requests"]
        live = {k: v for k, v in live.items() if k != "requests"}
        live["mean_step_s"] = live_mean_step(rows, t0, t1)
        # The simulator runs the pool and its workers, not the frontend's admission: the
        # requests the live frontend refused (429: shed, priority-mix) never reached the
        # pool, and are not simulated either.
        refused = {q["request_id"] for q in judged[n][0]["requests"]
                   if q["outcome"] == RATE_LIMITED}
        reqs = [r for r in workload(n, seed, workers, args.duration, args.scale, args.rate)
                if r.request_id not in refused]
        repeat: dict[str, Any] = {}
        if n in again:  # the same file served again: the machine's own run-to-run spread
            live2, t0, t1 = again[n]
            pool["live_again"] += live2["requests"]
            live2 = {k: v for k, v in live2.items() if k != "requests"}
            live2["mean_step_s"] = live_mean_step(rows, t0, t1)
            repeat = compare(live, live2)
        sims = {"calibrated": simulate(reqs, cal.cost, workers, args.sim_seeds),
                "no_noise": simulate(reqs, without_noise(cal.cost), workers),
                "default_cost": simulate(reqs, replace(base), workers)}
        out["workloads"][n] = {
            "num_requests": len(reqs), "num_refused_live": len(refused),
            "live_steps": len(step_rows(window(rows, *judged[n][1:]))),
            "live_again": repeat, **{c: compare(live, sim) for c, sim in sims.items()},
        }
        for c, sim in sims.items():
            pool[c] += sim["requests"]
    # every judged request of this worker count pooled: a p99 over ~300-600 requests rather
    # than one run's ~100 (where it is about the largest value, and the same file served
    # twice differs by 10-30%)
    live_pooled = pooled(pool["live"])
    out["pooled"] = {c: compare(live_pooled, pooled(pool[c]), POOLED) for c in columns
                     if pool[c]}
    return out


def format_table(results: dict[str, Any]) -> str:
    lines = ["| workers | workload | metric | live | simulated | error | error without noise "
             "| error, default cost file | live again |", "|---|---|---|---|---|---|---|---|---|"]
    for w, res in results.items():
        for n, wl in res["workloads"].items():
            for k in METRICS:
                c, d = wl["calibrated"][k], wl["default_cost"][k]
                e = wl["no_noise"][k]
                again = wl["live_again"].get(k, {}).get("error")
                scale = 1.0 if k == "throughput_tok_s" else 1e3
                unit = "tok/s" if k == "throughput_tok_s" else "ms"
                lines.append(f"| {w} | {n} | {k} ({unit}) | {_num(c['live'], scale)} | "
                             f"{_num(c['sim'], scale)} | {_pct(c['error'])} | "
                             f"{_pct(e['error'])} | {_pct(d['error'])} | {_pct(again)} |")
    return "\n".join(lines)


def pooled_table(results: dict[str, Any]) -> str:
    """Per worker count, the pooled percentiles: live, and each column's error."""
    cols = ("calibrated", "no_noise", "default_cost", "live_again")
    lines = ["| workers | metric | live (ms) | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for w, res in results.items():
        for k in POOLED:
            live = res["pooled"]["calibrated"][k]["live"]
            cells = [_pct(res["pooled"].get(c, {}).get(k, {}).get("error")) for c in cols]
            lines.append(f"| {w} | {k} | {_num(live, 1e3)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """Median (max) absolute error over the runs, per metric and column."""
    cols = ("calibrated", "no_noise", "default_cost", "live_again")
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in METRICS:
        cells = []
        for col in cols:
            errs = [abs(e) for res in results.values() for wl in res["workloads"].values()
                    if (e := wl[col].get(k, {}).get("error")) is not None]
            cells.append(f"{np.median(errs):.1%} ({max(errs):.1%})" if errs else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v: float | None, scale: float) -> str:
    return "-" if v is None else f"{v * scale:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1%}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated (1,2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run")
    p.add_argument("--scale", type=float, default=8.0, help="workload length divisor (8)")
    p.add_argument("--rate", type=float, default=5.0, help="requests/s per worker (5)")
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch threads per worker (1: the default cost file's setting)")
    p.add_argument("--calibrate-seed", type=int, default=1)
    p.add_argument("--judge-seed", type=int, default=2)
    p.add_argument("--base", help="cost file for the engine shape and the reference column "
                   "(default: the committed default cost file)")
    p.add_argument("--repeat-live", action=argparse.BooleanOptionalAction, default=True,
                   help="serve each judged file twice: the second run's error against the first "
                   "is the machine's own spread, the floor of any prediction (on)")
    p.add_argument("--in-sample", action="store_true", help="with --from: simulate the "
                   "calibration files instead of the judged ones (the model's own error, without "
                   "the machine's drift between the runs)")
    p.add_argument("--sim-seeds", type=int, default=1, help="simulate each file with this "
                   "many noise seeds; each metric is their median (1)")
    p.add_argument("--terms", default="", help="optional model terms to fit (engine.sim fit "
                   f"--terms), comma-separated: {', '.join(TERMS)}; none by default")
    p.add_argument("--trace-block", type=float, help="with --terms trace: the bootstrap's "
                   "mean block length in steps (default: chosen from the recording)")
    p.add_argument("--no-step-extra", action="store_true", help="fit no [step_extra] (a "
                   "prefill step's and a worker's first step's fixed extra; fitted by default)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--keep", help="keep the recordings, the client's results and the cost "
                   "files in this directory")
    p.add_argument("--from", dest="from_dir", metavar="DIR", help="no engine: judge the runs "
                   "kept in DIR by --keep again (same workload flags), e.g. after changing the "
                   "fit or the simulator")
    args = p.parse_args(argv)
    args.workloads = [n for n in args.workloads.split(",") if n]
    args.terms = [t for t in args.terms.split(",") if t]
    if terms_error(args.terms):
        p.error(str(terms_error(args.terms)))
    if args.trace_block is not None and ("trace" not in args.terms or args.trace_block < 1):
        p.error("--trace-block: a number of steps >= 1, with --terms trace")
    bad = set(args.workloads) - set(WORKLOADS)
    if bad:
        p.error(f"--workloads: unknown {sorted(bad)}; choose from {WORKLOADS}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)
        for w in (int(x) for x in args.workers.split(",")):
            if args.from_dir:
                rows, runs = load_runs(w, Path(args.from_dir))
                results[str(w)] = judge(w, args, rows, runs, tmp)
            else:
                results[str(w)] = run_workers(w, args, tmp)
            print(f"{w} worker(s) done: fit {json.dumps(results[str(w)]['fit'])}",
                  file=sys.stderr)
    print(format_table(results))
    print()
    print(summary_table(results))
    print()
    print(pooled_table(results))
    if args.json:
        meta = {"command": "python -m bench.fidelity " + " ".join(argv or sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=1) + "\n",
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
