"""Serving benchmarks side by side: this engine against ``vllm serve``, or this engine's own
configurations against each other, driven by exactly the same requests.

    # this engine against vLLM, 1 worker each, chat-short (lengths / 8) at three rates
    python -m bench.compare --workload chat-short --duration 30 --scale 8 --rates 2 4 8 -o out/

    # shared-prefix on 2 workers: cache-aware and round-robin placement, and vLLM's DP
    python -m bench.compare --workload shared-prefix --groups 16 --scale 8 --rates 8 \\
        --workers 2 --engine-configs placement=cache-aware placement=round-robin -o out/

    # a saved workload file, this engine only, two scheduling policies
    python -m bench.compare --workload-file w.jsonl --servers engine \\
        --engine-configs policy=fcfs policy=priority -o out/

For each server (each ``--engine-configs`` entry is one server of kind ``engine``) it starts
the server (``bench.servers``: same model, ``--workers`` workers, ``--kv-cache-gib`` GiB of KV
per worker; vLLM with ``--data-parallel-size`` and ``VLLM_CPU_KVCACHE_SPACE``), waits until it
is ready, sends a few warm-up requests (not measured; random prompts that share no prefix
with the workload), replays the workload once per ``--rates`` entry with ``bench.loadgen``
(arrival times rescaled; without ``--rates``: the file's own), stops the server (SIGINT to
its process group; no process may be left) and goes to the next server. A server's prefix
cache outlives one rate's replay, so at the k-th rate every prompt token id is shifted by
k x 7919 (modulo the workload's vocabulary): the same lengths, arrivals and prefix structure,
no prompt that an earlier rate already cached, and every server gets the same shifted
requests. ``--restart-per-rate`` starts a fresh server for each rate instead. Rescaling keeps
the number of requests, so a file written for a high rate lasts long at a low one:
``--max-duration S`` replays, at each rate, only the requests that arrive in its first S
seconds.

Both servers get the same scheduler limits (``--max-num-seqs``, ``--max-num-batched-tokens``:
by default this engine's own defaults, 64 and 512; vLLM's CPU defaults would be 128 and 2048)
and the same compute threads: ``--threads-per-worker`` (default 1) torch threads per engine
worker (``--num-threads``) and as many CPUs bound to each vLLM engine core
(``VLLM_CPU_OMP_THREADS_BIND``, ``--vllm-omp-bind matched``). Each keeps
its own default KV block size (this engine 16, vLLM CPU 128) unless passed through
``--engine-args`` / ``--vllm-args``, which come last and win.

Priorities: this engine serves higher values first and gets the workload's as they are; vLLM
serves lower values first, so with ``--scheduling-policy priority`` in ``--vllm-args`` it gets
them negated, and without it none (``--vllm-send-priority`` overrides).

Output in ``-o DIR``: ``workload.jsonl`` (when generated), ``results/LABEL@RATE.json`` (one
``bench.loadgen`` result each, plus the server's command and environment), ``logs/LABEL.log``
(each server's output), ``compare.md`` (the side-by-side tables, also printed) and ``plots/``
(``bench.loadgen.plots``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.compare_report import describe, format_tables, rate_text
from bench.compare_workload import (
    load_workload,
    prefix_hit_ceiling,
    shift_prompts,
    truncate,
    vocab_bound,
    warmup_requests,
)
from bench.loadgen.cli import slo_arg
from bench.loadgen.client import PRIORITY_MODES, ClientConfig
from bench.loadgen.metrics import summarize
from bench.loadgen.plots import plot_all
from bench.loadgen.replay import offered_rate, replay, rescale
from bench.servers import (
    DEFAULT_MODEL,
    KINDS,
    Server,
    ServerError,
    ServerSpec,
    session_cpu_seconds,
    vllm_kv_space,
)
from engine.sim.workloads import (
    BASE_WORKLOADS,
    WORKLOADS,
    SimRequest,
    WorkloadConfig,
)

PROG = "python -m bench.compare"
# What bench.compare's generated workloads default to (WorkloadConfig's are for hour-long runs).
WORKLOAD_DEFAULTS = {"duration": 30.0, "scale": 8.0}


# --------------------------------------------------------------------------- configurations


def parse_engine_config(text: str) -> tuple[str, list[str]]:
    """``"placement=round-robin,policy=priority"`` -> (its label, the engine flags
    ``["--placement", "round-robin", "--policy", "priority"]``); ``""`` or ``"default"``:
    the engine's defaults. Keys are ``python -m engine.launch`` flags without ``--``
    (``_`` or ``-``); ValueError for anything else."""
    text = text.strip()
    if text in ("", "default"):
        return "engine", []
    known = _engine_flags()
    args: list[str] = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().replace("_", "-"), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--engine-configs: expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if known and f"--{key}" not in known:
            raise ValueError(f"--engine-configs: {key!r} is not a flag of python -m "
                             f"engine.launch (see its --help)")
        args += [f"--{key}", value]
    return f"engine[{','.join(item.strip() for item in text.split(','))}]", args


def _engine_flags() -> set[str]:
    try:
        from engine.cli import build_parser
    except ImportError:  # pragma: no cover - the engine is part of this repository
        return set()
    return {s for action in build_parser()._actions for s in action.option_strings}


def vllm_priority_mode(vllm_args: Sequence[str], requested: str = "auto") -> str:
    """How priorities are sent to vLLM: ``negate`` when it schedules by priority (lower
    first), else ``omit``; an explicit mode wins."""
    if requested != "auto":
        return requested
    args = list(vllm_args)
    policy = "fcfs"
    for i, a in enumerate(args):  # the last one wins, as in argparse
        if a.startswith("--scheduling-policy="):
            policy = a.split("=", 1)[1]
        elif a == "--scheduling-policy" and i + 1 < len(args):
            policy = args[i + 1]
    return "negate" if policy == "priority" else "omit"


def build_specs(args: argparse.Namespace) -> list[tuple[ServerSpec, str]]:
    """(server spec, the priority mode its requests are sent with), in run order."""
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--servers: unknown {kind!r}; known: {','.join(KINDS)}")
    if not kinds:
        raise ValueError("--servers: name at least one of " + ",".join(KINDS))
    if "vllm" in kinds:
        vllm_kv_space(args.kv_cache_gib)
    engine_args = shlex.split(args.engine_args)
    vllm_args = shlex.split(args.vllm_args)
    common = dict(model=args.model, served_model_name=args.served_model_name,
                  workers=args.workers, kv_cache_gib=args.kv_cache_gib,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  threads_per_worker=args.threads_per_worker or None, nice=args.server_nice)
    specs: list[tuple[ServerSpec, str]] = []
    for kind in kinds:
        if kind == "engine":
            configs = [parse_engine_config(c) for c in (args.engine_configs or [""])]
            labels = [label for label, _ in configs]
            if len(set(labels)) != len(labels):
                raise ValueError(f"--engine-configs: the same configuration twice: {labels}")
            specs += [(ServerSpec("engine", label, extra_args=(*flags, *engine_args),
                                  **common), "as-is")  # type: ignore[arg-type]
                      for label, flags in configs]
        else:
            specs.append((ServerSpec("vllm", "vllm", extra_args=tuple(vllm_args),
                                     vllm_omp_bind=args.vllm_omp_bind,
                                     **common),  # type: ignore[arg-type]
                          vllm_priority_mode(vllm_args, args.vllm_send_priority)))
    return specs


# --------------------------------------------------------------------------- running


def run_workload(server_url: str, model: str, requests: Sequence[SimRequest], *,
                 label: str, workload_file: str, priority_mode: str,
                 slo: Mapping[str, float], timeout_s: float,
                 max_concurrency: int | None, progress: bool,
                 server_sid: int | None = None) -> dict[str, Any]:
    """Replay ``requests`` (already at their rate) and return the result object that
    ``python -m bench.loadgen run --json`` writes, plus the CPU time the server's processes
    (session ``server_sid``) and this client used during the run."""
    cfg = ClientConfig(server_url, model, None, timeout_s, priority_mode)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    server_cpu = session_cpu_seconds(server_sid) if server_sid else None
    client_cpu = sum(os.times()[:2])
    run = asyncio.run(replay(requests, cfg, max_concurrency=max_concurrency, progress=progress))
    client_cpu = sum(os.times()[:2]) - client_cpu
    if server_sid:
        server_cpu = session_cpu_seconds(server_sid) - (server_cpu or 0.0)
    rate = offered_rate(requests)
    return {
        "label": label, "url": server_url, "model": model, "workload_file": workload_file,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": max_concurrency, "timeout_s": timeout_s,
        "send_priority": priority_mode, "slo": dict(slo), "started": started,
        "client_host": platform.node(), "client_python": sys.version.split()[0],
        "loadavg_1min_before": load, "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
        **summarize(run.records, run.duration_s, dict(slo)),
        "requests": [r.to_json() for r in run.records],
    }


def run_all(args: argparse.Namespace, outdir: Path) -> list[dict[str, Any]]:
    path, requests, description = load_workload(args, outdir)
    rates: list[float | None] = list(args.rates) if args.rates else [None]
    specs = build_specs(args)
    source = source_state()
    progress = not args.no_progress and sys.stderr.isatty()
    results: list[dict[str, Any]] = []
    names: set[str] = set()
    for spec, mode in specs:
        indexed = list(enumerate(rates))
        groups = [indexed] if not args.restart_per_rate else [[ir] for ir in indexed]
        for group in groups:
            log_name = _file_name(spec.label) + (f"@{group[0][0]}" if args.restart_per_rate
                                                 else "")
            log = outdir / "logs" / f"{log_name}.log"
            _say(f"{spec.label}: starting ({shlex.join(spec.command(0))})")
            with Server(spec, log, ready_timeout_s=args.ready_timeout) as server:
                _say(f"{spec.label}: ready at {server.url} after {server.startup_s:.1f} s")
                if args.warmup:
                    warm = run_workload(server.url, spec.served_model_name,
                                        warmup_requests(requests, args.warmup),
                                        label="warmup", workload_file="", priority_mode="omit",
                                        slo={}, timeout_s=args.timeout, max_concurrency=None,
                                        progress=False)
                    if warm["num_completed"] != warm["num_requests"]:
                        raise ServerError(f"{spec.label}: warm-up failed: {warm['errors']}")
                for epoch, rate in group:  # the same shift for every server
                    reqs = shift_prompts(requests, epoch, vocab_bound(requests))
                    reqs = truncate(reqs if rate is None else rescale(reqs, rate),
                                    args.max_duration)
                    if not reqs:
                        raise ValueError(f"--max-duration {args.max_duration:g}: no request "
                                         f"arrives that early at rate {rate}")
                    result = run_workload(
                        server.url, spec.served_model_name, reqs, label=spec.label,
                        workload_file=str(path), priority_mode=mode, slo=dict(args.slo),
                        timeout_s=args.timeout, max_concurrency=args.max_concurrency,
                        progress=progress, server_sid=server.sid)
                    result.update(server=spec.description(), startup_s=server.startup_s,
                                  workload=description,
                                  prefix_hit_ceiling=prefix_hit_ceiling(reqs),
                                  prompt_shift_epoch=epoch, engine_source=source,
                                  scale=_scale(args, description))
                    results.append(result)
                    name = f"{_file_name(spec.label)}@{_rate_name(result['request_rate'])}"
                    name = name if name not in names else f"{name}-{epoch}"
                    names.add(name)
                    (outdir / "results").mkdir(parents=True, exist_ok=True)
                    (outdir / "results" / f"{name}.json").write_text(
                        json.dumps(result, indent=1) + "\n", encoding="utf-8")
                    _say(f"{spec.label} @ {rate_text(result['request_rate'])}: "
                         f"{result['num_completed']}/{result['num_requests']} completed, "
                         f"{result['num_429']} 429, {result['num_errors']} errors, "
                         f"{result['num_timeouts']} timeouts in {result['duration_s']:.1f} s")
            _say(f"{spec.label}: stopped, no process left")
    return results


def source_state() -> str:
    """The commit of this checkout, and how many files under engine/ differ from it: the
    engine a run measures is the working tree's."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine"], cwd=root,
                               text=True, capture_output=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (f" + uncommitted changes in {len(dirty)} files under engine/"
                        if dirty else "")


def _scale(args: argparse.Namespace, description: Mapping[str, Any]) -> float | None:
    if args.workload_file:
        return args.scale_note
    return float(description.get("scale", args.scale))


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label).strip("_")


def _rate_name(rate: Any) -> str:
    return "inf" if rate == "inf" else f"{float(rate):g}"


def _say(message: str) -> None:
    print(f"[bench.compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-o", "--outdir", required=True, help="directory for the results, logs, tables, plots")
    a("--servers", default="engine,vllm", help="comma-separated, in run order: engine, vllm "
      "(default engine,vllm)")
    a("--engine-configs", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", help="one engine server "
      "per entry, KEY an engine.launch flag without --, e.g. placement=round-robin "
      "policy=priority; 'default' for none (default: one engine with its defaults)")
    a("--workers", type=int, default=1, help="workers per server (vLLM: --data-parallel-size)")
    a("--kv-cache-gib", type=float, default=1.0, help="KV cache per worker in GiB: the engine's "
      "--kv-cache-memory, vLLM's VLLM_CPU_KVCACHE_SPACE (whole GiB) (default 1)")
    a("--max-num-seqs", type=int, default=64, help="for both servers (default 64, the engine's)")
    a("--max-num-batched-tokens", type=int, default=512,
      help="for both servers (default 512, the engine's)")
    a("--model", default=str(DEFAULT_MODEL), help="HF model directory (default: the embedded "
      "tiny_stdlib_llama)")
    a("--served-model-name", default="default", help="the name both servers serve it as")
    a("--engine-args", default="", help="more python -m engine.launch flags, one string")
    a("--vllm-args", default="", help="more vLLM server flags, one string, e.g. "
      "'--scheduling-policy priority'")
    a("--vllm-send-priority", choices=("auto", *PRIORITY_MODES), default="auto",
      help="auto: negate with --scheduling-policy priority in --vllm-args, else omit")
    a("--threads-per-worker", type=int, default=1, help="compute threads per worker: the "
      "engine's --num-threads, and as many CPUs bound to each vLLM engine core; 0: the "
      "engine's default, cores / workers (default 1: on a shared 2-core machine two torch "
      "threads per worker collapse when other processes want the CPU)")
    a("--server-nice", type=int, default=0, metavar="N", help="start the servers at niceness N "
      "(e.g. 5), so that the load generator, which shares the CPUs, is not starved by them")
    a("--vllm-omp-bind", default="matched", help="VLLM_CPU_OMP_THREADS_BIND: matched (engine "
      "core i gets CPUs i*T..i*T+T-1, T = --threads-per-worker), auto (vLLM's default: one "
      "core per engine core, one reserved; with --data-parallel-size 2 on 2 CPUs it binds "
      "both engine cores to CPU 0), or a value of its own (default matched)")
    a("--rates", type=_rate, nargs="+", metavar="REQ_PER_S", help="replay the workload at each "
      "rate (arrival times rescaled); inf: all at once (default: the file's own rate)")
    a("--max-duration", type=float, metavar="SECONDS", help="at each rate, replay only the "
      "requests that arrive in the first SECONDS (the same leading part of the file for every "
      "server), so that a low rate does not take forever on a file written for a high one")
    a("--restart-per-rate", action="store_true", help="a fresh server for every rate (cold "
      "prefix cache each time)")
    a("--warmup", type=int, default=4, help="warm-up requests before measuring (default 4)")
    a("--slo", type=slo_arg, action="append", default=[], metavar="METRIC=SECONDS",
      help="for goodput, as bench.loadgen run --slo")
    a("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    a("--max-concurrency", type=int, help="at most this many requests in flight")
    a("--ready-timeout", type=float, default=300.0, help="seconds for a server to get ready")
    a("--title", default="", help="heading of compare.md (default: from the workload)")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true")
    a("--scale-note", type=float, help="with --workload-file: the scale its lengths were "
      "divided by, for the table's note")
    g = p.add_argument_group("workload generation (without --workload-file; the fields of "
                             "engine.sim.workloads.WorkloadConfig, as bench.loadgen write)")
    g.add_argument("--workload-file", metavar="JSONL", help="replay this file instead")
    hints = typing.get_type_hints(WorkloadConfig)
    choices = {"name": WORKLOADS, "base": BASE_WORKLOADS}
    for f in dataclasses.fields(WorkloadConfig):
        flag = "--workload" if f.name == "name" else "--" + f.name.replace("_", "-")
        default = WORKLOAD_DEFAULTS.get(f.name, f.default)
        g.add_argument(flag, dest=f.name, type=_scalar_type(hints[f.name]), default=default,
                       choices=choices.get(f.name), help=f"(default {default})")
    return p


def _scalar_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 or inf, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join([*PROG.split(), *argv])
    if args.workers < 1:
        return _error("--workers: must be >= 1")
    outdir = Path(args.outdir)
    try:
        build_specs(args)  # fail on a bad flag before anything is written or started
        outdir.mkdir(parents=True, exist_ok=True)
        results = run_all(args, outdir)
    except (ValueError, ServerError) as e:
        return _error(str(e))
    title = args.title or _default_title(results, args)
    text = format_tables(results, title=title, notes=describe(results, args))
    (outdir / "compare.md").write_text(text, encoding="utf-8")
    print(text)
    if not args.no_plots:
        for path in plot_all(results, outdir / "plots"):
            _say(f"wrote {path}")
    _say(f"wrote {outdir / 'compare.md'}")
    return 0


def _default_title(results: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> str:
    name = (results[0].get("workload", {}).get("name") if results else None) or "workload"
    labels = " vs ".join(dict.fromkeys(str(r["label"]) for r in results))
    return f"{name}, {args.workers} worker{'s' if args.workers > 1 else ''}: {labels}"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
