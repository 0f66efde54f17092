"""``python -m bench.loadgen write | run | plot``: see the package docstring."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import sys
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench.loadgen
from bench.loadgen.client import PRIORITY_MODES, ClientConfig
from bench.loadgen.metrics import parse_slo, summarize
from bench.loadgen.plots import plot_all
from bench.loadgen.replay import check_dependencies, offered_rate, replay, rescale
from bench.loadgen.report import format_summary
from engine.sim import workloads
from engine.sim.workloads import (
    BASE_WORKLOADS,
    WORKLOADS,
    SimRequest,
    WorkloadConfig,
    make_workload,
    read_jsonl,
    write_jsonl,
)

PROG = "python -m bench.loadgen"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=bench.loadgen.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_workload_flags(sub.add_parser(
        "write", help="generate a seeded workload and write it as JSON lines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Flags are the fields of engine.sim.workloads.WorkloadConfig:\n\n"
        + (workloads.__doc__ or "")))
    _add_run_flags(sub.add_parser(
        "run", help="replay a workload file against an OpenAI-compatible server"))
    plot = sub.add_parser("plot", help="draw PNG figures from result JSONs")
    plot.add_argument("results", nargs="+", metavar="RESULT_JSON")
    plot.add_argument("-o", "--outdir", required=True, help="directory for the PNG files")
    return p


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``WorkloadConfig`` field (``name`` is ``--workload``), so the generator's
    options reach the command line without a second list to keep in step."""
    p.add_argument("-o", "--output", required=True, help="the JSON lines file to write")
    hints = typing.get_type_hints(WorkloadConfig)
    choices = {"name": WORKLOADS, "base": BASE_WORKLOADS}
    for f in dataclasses.fields(WorkloadConfig):
        flag = "--workload" if f.name == "name" else "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, type=_scalar_type(hints[f.name]), default=f.default,
                       choices=choices.get(f.name), help=f"(default {f.default})")


def _scalar_type(hint: Any) -> Any:
    """``float | None`` -> float: the type that parses the flag's value."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--url", default="http://127.0.0.1:8000", help="server base URL (/v1/completions is added)")
    a("--workload-file", required=True, metavar="JSONL", help="written by `write`")
    a("--model", required=True, help="the model name the server serves")
    a("--api-key", help="sent as Authorization: Bearer KEY")
    a("--rate", type=float, help="offer this many requests/s (conversations/s for multi-turn) by "
      "rescaling the file's arrival times; inf: everything at once (default: the file's)")
    a("--max-concurrency", type=int, help="at most this many requests in flight")
    a("--timeout", type=float, default=600.0, help="seconds per request before it counts as a "
      "timeout (600)")
    a("--slo", type=slo_arg, action="append", default=[], metavar="METRIC=SECONDS",
      help="for goodput: ttft, tpot or e2e bound, e.g. --slo ttft=0.5 --slo tpot=0.05")
    a("--send-priority", choices=PRIORITY_MODES, default="as-is", help="as-is (this engine: "
      "higher is more urgent), negate (vllm serve: lower is served first), omit (a server "
      "without priority scheduling)")
    a("--label", help="names this run in plots (e.g. the server or the placement policy)")
    a("--json", metavar="PATH", help="write the result object here")
    a("--no-progress", action="store_true", help="no progress bar (off anyway without a tty)")


def slo_arg(text: str) -> tuple[str, float]:
    """``--slo METRIC=SECONDS`` for argparse (shared with bench.compare)."""
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"write": write_command, "run": run_command, "plot": plot_command}
    return commands[args.command](args)


def _error(args: argparse.Namespace, error: Exception | str) -> int:
    """A one-line message for a bad input (a traceback stays for everything else)."""
    print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
    return 2


def write_command(args: argparse.Namespace) -> int:
    cfg = WorkloadConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(WorkloadConfig)})
    try:
        workload = make_workload(cfg)
    except ValueError as e:
        return _error(args, e)
    n = write_jsonl(workload.requests(), args.output)
    print(f"wrote {n} requests to {args.output}: {json.dumps(workload.description)}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    try:
        requests = _load_requests(args)
    except ValueError as e:
        return _error(args, e)
    cfg = ClientConfig(args.url, args.model, args.api_key, args.timeout, args.send_priority)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    run = asyncio.run(replay(requests, cfg, max_concurrency=args.max_concurrency,
                             progress=not args.no_progress and sys.stderr.isatty()))
    rate = offered_rate(requests)
    result: dict[str, Any] = {
        "label": args.label or Path(args.workload_file).stem,
        "url": args.url, "model": args.model, "workload_file": args.workload_file,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": args.max_concurrency, "timeout_s": args.timeout,
        "send_priority": args.send_priority, "slo": dict(args.slo),
        "started": started, "client_host": platform.node(), "client_python": sys.version.split()[0],
        **summarize(run.records, run.duration_s, dict(args.slo)),
        "requests": [r.to_json() for r in run.records],
    }
    print(format_summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def _load_requests(args: argparse.Namespace) -> list[SimRequest]:
    """The file's requests, rescaled to ``--rate``; ValueError naming the flag at fault."""
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1, got {args.max_concurrency}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout: must be > 0, got {args.timeout}")
    requests = list(read_jsonl(args.workload_file).requests())
    if not requests:
        raise ValueError(f"--workload-file: {args.workload_file} holds no request")
    check_dependencies(requests)
    return requests if args.rate is None else rescale(requests, args.rate)


def plot_command(args: argparse.Namespace) -> int:
    results = []
    for path in args.results:
        try:
            results.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            return _error(args, f"cannot read result {path}: {e}")
    for path in plot_all(results, args.outdir):
        print(path)
    return 0
