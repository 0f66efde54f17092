"""``python -m engine.sim``: compare scheduling policies on a simulated cluster.

    python -m engine.sim --workload shared-prefix --workers 8 --rate 20 \\
        --policy fcfs,priority --placement round-robin,least-loaded,cache-aware [--json]

Every (policy, placement) pair runs the same requests through the real scheduler with a
step-time cost model (``--cost``, default ``engine/sim/default_cost.toml``). Prints a table,
or with ``--json`` one JSON object: ``workload``, ``config``, ``cost_model`` and ``runs`` (one
object of metrics per pair, with ``policy`` and ``placement``); with a single pair its metrics
are also at the top level. See docs/simulator.md.
``python -m engine.sim fit RECORDING --out FILE`` fits a cost file from the engine's
``--profile-steps`` recording (engine/sim/calibrate.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from typing import Any

from engine.config import SchedulerConfig
from engine.resolve import resolve_reserved_workers
from engine.scheduler.scheduler import Scheduler
from engine.sim.cost_model import CostModel
from engine.sim.metrics import SLO, summarize
from engine.sim.simulator import SimConfig, Simulator, instrument
from engine.sim.workloads import (
    BASE_WORKLOADS,
    WORKLOADS,
    Workload,
    WorkloadConfig,
    make_workload,
    prefix_hit_ceiling,
    read_jsonl,
    write_jsonl,
)


def _rate(text: str) -> float:
    return math.inf if text.strip().lower() == "inf" else float(text)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--workload", default="chat-short", choices=WORKLOADS, help="generated workload")
    a("--workload-file", metavar="JSONL", help="replay this JSON lines file instead")
    a("--save-workload", metavar="JSONL", help="also write the requests to this file")
    a("--rate", type=_rate, default=10.0, help="requests/s, or inf (default 10)")
    a("--burstiness", type=float, help="Gamma shape b of arrivals, CV 1/sqrt(b) (default 1; "
      "code: 1/64)")
    a("--duration", type=float, default=600.0, help="seconds of arrivals (default 600)")
    a("--num-requests", type=int, help="at most this many requests (default 1000 at rate inf)")
    a("--seed", type=int, default=0, help="workload seed (0)")
    a("--scale", type=float, default=1.0, help="divide every length by this (2-core machines: 8)")
    a("--vocab-size", type=int, default=4096, help="token ids are drawn below this (4096)")
    a("--tenants", type=int, default=1, help="spread requests over this many tenants")
    g = p.add_argument_group("shared-prefix / priority-mix / multi-turn")
    g.add_argument("--groups", type=int, default=64, metavar="G", help="prefix groups (64)")
    g.add_argument("--per-group", type=int, default=16, metavar="R", help="requests per group (16)")
    g.add_argument("--system-len", type=int, default=2048, metavar="S",
                   help="shared system prompt tokens (2048)")
    g.add_argument("--question-len", type=int, default=128, metavar="Q",
                   help="question tokens (128)")
    g.add_argument("--output-len", type=int, default=256, metavar="O", help="output tokens (256)")
    g.add_argument("--base", default="chat-short", choices=BASE_WORKLOADS,
                   help="priority-mix: the workload it mixes (chat-short)")
    g.add_argument("--critical-fraction", type=float, default=0.2, metavar="P",
                   help="priority-mix: fraction of critical requests (0.2)")
    g.add_argument("--turns", type=int, default=4, metavar="T",
                   help="multi-turn: turns per conversation (4)")
    g.add_argument("--think-time", type=float, default=5.0, metavar="SECONDS",
                   help="multi-turn: mean pause after a response before the next turn (5)")
    g = p.add_argument_group("engine (defaults: the cost file's [engine] table)")
    g.add_argument("--workers", type=int, default=8, help="simulated workers (8)")
    g.add_argument("--policy", type=_names,
                   help="comma-separated policies (default: the engine's; --replay: one, "
                   "default the recording's)")
    g.add_argument("--placement", type=_names,
                   help="comma-separated placements (default: the engine's; --replay: one, "
                   "default the recording's)")
    g.add_argument("--cost", metavar="FILE", help="cost model file (TOML or JSON)")
    g.add_argument("--block-size", type=int)
    g.add_argument("--num-blocks", type=int, help="KV blocks per worker")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--reserved-workers", type=int, default=0, metavar="N",
                   help="workers kept free of sheddable requests while critical ones arrive "
                   "(0; the engine's --reserved-workers)")
    g = p.add_argument_group("report")
    g.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds (goodput)")
    g.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds (goodput)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--check", action="store_true", help="check scheduler invariants (slow)")
    g.add_argument("--profile", action="store_true",
                   help="time the scheduler's calls; report scheduler vs simulator time")
    g.add_argument("--replay", metavar="PATH", help="replay a --record-decisions file "
                   "through a fresh scheduler and check every plan is the recorded one "
                   "(engine/sim/replay.py)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fit"]:  # python -m engine.sim fit RECORDING: engine/sim/calibrate.py
        from engine.sim.calibrate import main as fit_main

        return fit_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.replay:
        return _replay(args)
    args.policy = args.policy or [SchedulerConfig().policy]
    args.placement = args.placement or [SchedulerConfig().placement]
    try:
        cost = CostModel.load(args.cost)
        config = _sim_config(args, cost)
        workload = _workload(args, config)
        pairs = [(p, pl) for p in args.policy for pl in args.placement]
        for policy, placement in pairs:  # fail on a bad name before running anything
            Scheduler(SchedulerConfig(policy=policy, placement=placement),
                      block_size=config.block_size, max_model_len=config.max_model_len)
    except ValueError as e:
        print(f"python -m engine.sim: error: {e}", file=sys.stderr)
        return 2
    if args.save_workload:
        write_jsonl(workload.requests(), args.save_workload)
    ceiling = (prefix_hit_ceiling(workload.requests(), config.block_size, config.vocab_size)
               if workload.reuses_prefixes else 0.0)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    try:
        runs = [_run(workload, cost, config, policy, placement, slo, ceiling, args.profile)
                for policy, placement in pairs]
    except ValueError as e:  # a workload file whose requests do not hold together
        print(f"python -m engine.sim: error: {e}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "workload": {**workload.description, "num_requests": runs[0]["num_requests"],
                     "prefix_hit_ceiling": ceiling},
        "config": {"workers": config.num_workers, "block_size": config.block_size,
                   "num_blocks": config.num_blocks, "max_model_len": config.max_model_len,
                   "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                   "max_num_seqs": config.scheduler.max_num_seqs,
                   "slo_ttft": args.slo_ttft, "slo_tpot": args.slo_tpot},
        "cost_model": cost.describe(),
        **(runs[0] if len(runs) == 1 else {}),
        "runs": runs,
    }
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from engine.sim import replay

    policy, placement = args.policy or [None], args.placement or [None]
    if len(policy) > 1 or len(placement) > 1:
        print("python -m engine.sim: error: --replay takes one --policy and one --placement",
              file=sys.stderr)
        return 2
    return replay.main(args.replay, policy[0], placement[0], args.check)


def _sim_config(args: argparse.Namespace, cost: CostModel) -> SimConfig:
    e = cost.engine
    config = SimConfig(
        num_workers=args.workers,
        scheduler=SchedulerConfig(
            max_num_batched_tokens=pick(args.max_num_batched_tokens, e.max_num_batched_tokens),
            max_num_seqs=pick(args.max_num_seqs, e.max_num_seqs),
            reserved_workers=args.reserved_workers),
        block_size=pick(args.block_size, e.block_size),
        num_blocks=pick(args.num_blocks, e.num_blocks),
        max_model_len=pick(args.max_model_len, e.max_model_len),
        vocab_size=args.vocab_size,
        check=args.check,
    )
    for flag, value, low in (("--workers", config.num_workers, 1),
                             ("--block-size", config.block_size, 1),
                             ("--num-blocks", config.num_blocks, 2),
                             ("--max-num-batched-tokens", config.scheduler.max_num_batched_tokens, 1),
                             ("--max-num-seqs", config.scheduler.max_num_seqs, 1),
                             ("--reserved-workers", args.reserved_workers, 0)):
        if value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    resolve_reserved_workers(args.reserved_workers, "no", config.num_workers)  # leaves one?
    return config


def pick(given: int | None, default: int) -> int:
    return default if given is None else given


def _workload(args: argparse.Namespace, config: SimConfig) -> Workload:
    if args.workload_file:
        return read_jsonl(args.workload_file)
    return make_workload(WorkloadConfig(
        name=args.workload, rate=args.rate, burstiness=args.burstiness, duration=args.duration,
        num_requests=args.num_requests, seed=args.seed, scale=args.scale,
        vocab_size=args.vocab_size, max_model_len=config.max_model_len, tenants=args.tenants,
        groups=args.groups, per_group=args.per_group, system_len=args.system_len,
        question_len=args.question_len, output_len=args.output_len, base=args.base,
        critical_fraction=args.critical_fraction, turns=args.turns, think_time=args.think_time))


def _run(workload: Workload, cost: CostModel, config: SimConfig, policy: str, placement: str,
         slo: SLO, ceiling: float, profile: bool) -> dict[str, Any]:
    cfg = replace(config, scheduler=replace(config.scheduler, policy=policy, placement=placement))
    sim = Simulator(workload.requests(), cost, cfg)
    timings = instrument(sim.sched) if profile else None
    result = sim.run()
    run = {"policy": policy, "placement": placement, **summarize(result, slo),
           "prefix_hit_ceiling": ceiling}
    if timings is not None:
        run["profile"] = profile_report(timings, result.wall_s, result.num_scheduled)
        print(f"profile of {policy} / {placement}: {json.dumps(run['profile'])}",
              file=sys.stderr)
    return run


def profile_report(timings: dict[str, list[float]], wall_s: float,
                   num_scheduled: int) -> dict[str, float]:
    """Where a run's time went: the scheduler's entry points (calls, microseconds per call),
    the scheduler per request-step, and the rest (simulator, workload, event loop)."""
    sched_s = sum(seconds for _, seconds in timings.values())
    out = {"wall_s": wall_s, "scheduler_s": sched_s, "simulator_s": wall_s - sched_s,
           "scheduler_us_per_request_step": (timings["schedule"][1] + timings["update"][1])
           / max(1, num_scheduled) * 1e6}
    for name, (calls, seconds) in timings.items():
        out[f"{name}_calls"] = calls
        out[f"{name}_us_per_call"] = seconds / max(1, calls) * 1e6
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def format_report(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [f"workload {w['name']}: {w['num_requests']} requests, rate {w.get('rate', '-')}/s, "
             f"prefix-hit ceiling {w['prefix_hit_ceiling']:.1%}; "
             f"{report['config']['workers']} workers; latencies in ms"]
    head = ("policy", "placement", "TTFT p50", "p90", "p99", "TPOT p50", "E2E p50", "out tok/s",
            "goodput/s", "hit rate", "preempt", "wall s")
    rows = [head]
    for r in report["runs"]:
        rows.append((r["policy"], r["placement"], _ms(r["ttft_p50"]), _ms(r["ttft_p90"]),
                     _ms(r["ttft_p99"]), _ms(r["tpot_p50"]), _ms(r["e2e_p50"]),
                     f"{r['throughput_tok_s']:.0f}", f"{r['goodput_req_s']:.2f}",
                     f"{r['prefix_hit_rate']:.1%}", str(r["num_preemptions"]),
                     f"{r['wall_s']:.1f}"))
        for name, c in r["classes"].items():
            if len(r["classes"]) > 1:
                rows.append(("", f"  {name}", _ms(c["ttft_p50"]), _ms(c["ttft_p90"]),
                             _ms(c["ttft_p99"]), _ms(c["tpot_p50"]), _ms(c["e2e_p50"]),
                             f"{c['throughput_tok_s']:.0f}", f"{c['goodput_req_s']:.2f}",
                             f"{c['prefix_hit_rate']:.1%}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(cell.ljust(wd) if i < 2 else cell.rjust(wd)
                        for i, (cell, wd) in enumerate(zip(row, widths, strict=True)))
              for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
