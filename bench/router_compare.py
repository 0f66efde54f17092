"""Cache-aware routing across replicas against this engine's own placement, on one workload.

Two ways to serve a shared-prefix workload with two workers:

- ``router``: two engine replicas (``python -m engine.launch --workers 1`` twice) behind
  SGLang's router, ``python -m sglang_router.launch_router --policy cache_aware``, which
  keeps an approximate radix tree of the text it sent to each replica;
- ``engine``: one engine with ``--workers 2``, whose scheduler places each request on a
  worker from the blocks it knows each worker holds (``--placement cache-aware``, exact).

Both get the same requests from one workload file (``python -m bench.loadgen write``), the
same model, KV budget and torch threads per worker, and the same warm-up. sglang-router 0.3
refuses token-id prompts, so every prompt is sent as text (its token ids decoded with the
model's tokenizer) to both setups: the engine tokenizes it again, and the shared prefixes
stay shared.

    python -m bench.loadgen write --workload shared-prefix --groups 8 --per-group 8 \\
        --system-len 512 --question-len 32 --output-len 16 --rate 4 -o w.jsonl
    python -m bench.router_compare --workload-file w.jsonl -o out/router

Reported per setup: TTFT p50/p99, output throughput, the prefix hit rate the responses report
(``usage.prompt_tokens_details.cached_tokens``) and the one the engines' ``/metrics`` count
(``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``, summed over replicas), and how
the requests split between replicas / workers. Output: ``results.json`` and ``compare.md``
in ``-o DIR`` (also printed), each server's log under ``logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.compare_workload import prefix_hit_ceiling, warmup_requests
from bench.loadgen.client import ClientConfig
from bench.loadgen.metrics import summarize
from bench.loadgen.replay import replay
from bench.servers import DEFAULT_MODEL, Server, ServerSpec
from engine.sim.workloads import SimRequest, read_jsonl


@dataclass(frozen=True)
class RouterSpec:
    """sglang-router over ``worker_urls``, startable by ``bench.servers.Server`` (which gives
    it a free port and waits for ``/health`` and ``/v1/models``)."""

    label: str
    served_model_name: str
    worker_urls: tuple[str, ...]
    policy: str = "cache_aware"
    kind: str = "router"

    def command(self, port: int | None) -> list[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(port or 0), "--worker-urls", *self.worker_urls,
                "--policy", self.policy, "--log-level", "warn"]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def description(self) -> dict[str, object]:
        return {"kind": self.kind, "label": self.label, "policy": self.policy,
                "command": shlex.join(self.command(None))}


@contextlib.contextmanager
def started(spec: Any, log: Path, ready_timeout_s: float = 300.0) -> Iterator[Server]:
    with Server(spec, log, ready_timeout_s=ready_timeout_s) as server:
        yield server


def engine_spec(label: str, args: argparse.Namespace, workers: int) -> ServerSpec:
    return ServerSpec(kind="engine", label=label, model=args.model,
                      served_model_name=args.served_model_name, workers=workers,
                      kv_cache_gib=args.kv_cache_gib, threads_per_worker=args.threads_per_worker,
                      extra_args=tuple(args.engine_args))


def counters(url: str) -> dict[str, float]:
    """The engine's cumulative prefix-cache and finished-request counters (summed over its
    models and finish reasons)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "vllm:request_success_total"):
        out[name] = sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$",
                                                     text, re.M))
    return out


def prompt_texts(requests: Sequence[SimRequest], model: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return {r.request_id: tok.decode(list(r.prompt_token_ids)) for r in requests}


def run_setup(label: str, url: str, engines: Sequence[str], requests: Sequence[SimRequest],
              texts: Mapping[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then replay ``requests`` at ``url``; the engines' counters are read around
    the measured run."""
    warm = warmup_requests(requests, args.warmup)
    warm_texts = prompt_texts(warm, args.model)
    cfg = ClientConfig(url, args.served_model_name, None, args.timeout, "omit", warm_texts)
    asyncio.run(replay(warm, cfg))
    before = [counters(e) for e in engines]
    cfg = ClientConfig(url, args.served_model_name, None, args.timeout, "omit", texts)
    run = asyncio.run(replay(requests, cfg))
    after = [counters(e) for e in engines]

    def delta(name: str) -> list[float]:
        return [a[name] - b[name] for a, b in zip(after, before, strict=True)]

    hits, queries = sum(delta("vllm:prefix_cache_hits_total")), \
        sum(delta("vllm:prefix_cache_queries_total"))
    result = summarize(run.records, run.duration_s, {})
    result.update(label=label, url=url, engines=list(engines),
                  requests_per_engine=delta("vllm:request_success_total"),
                  metrics_prefix_hit_rate=hits / queries if queries else None,
                  prefix_hit_ceiling=prefix_hit_ceiling(requests))
    return result


def run_all(args: argparse.Namespace, outdir: Path) -> list[dict[str, Any]]:
    requests = list(read_jsonl(args.workload_file).requests())
    texts = prompt_texts(requests, args.model)
    logs = outdir / "logs"
    results = []
    if "router" in args.setups:
        with started(engine_spec("replica-0", args, 1), logs / "replica-0.log") as r0, \
                started(engine_spec("replica-1", args, 1), logs / "replica-1.log") as r1:
            router = RouterSpec("sglang-router", args.served_model_name, (r0.url, r1.url),
                                args.policy)
            with started(router, logs / "router.log") as rt:
                print(f"router: {rt.url} over {r0.url} {r1.url}", file=sys.stderr)
                res = run_setup(f"2 replicas x 1 worker, sglang-router {args.policy}",
                                rt.url, [r0.url, r1.url], requests, texts, args)
                res["commands"] = [engine_spec("", args, 1).description()["command"],
                                   router.description()["command"]]
                results.append(res)
    if "engine" in args.setups:
        spec = engine_spec("engine", args, 2)
        with started(spec, logs / "engine.log") as e:
            print(f"engine: {e.url}", file=sys.stderr)
            res = run_setup("1 engine x 2 workers, cache-aware placement", e.url, [e.url],
                            requests, texts, args)
            res["commands"] = [spec.description()["command"]]
            results.append(res)
    return results


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = ["| setup | completed | TTFT p50 ms | TTFT p99 ms | out tok/s | req/s "
            "| prefix hit (usage) | prefix hit (/metrics) | requests per engine |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['label']} | {r['num_completed']}/{r['num_requests']} "
                    f"| {ms(r.get('ttft_p50'))} | {ms(r.get('ttft_p99'))} "
                    f"| {r['throughput_tok_s']:.1f} | {r['request_throughput']:.2f} "
                    f"| {pct(r['prefix_hit_rate'])} | {pct(r['metrics_prefix_hit_rate'])} "
                    f"| {' / '.join(f'{n:.0f}' for n in r['requests_per_engine'])} |")
    if results:
        rows.append(f"\nprefix-hit ceiling of the workload (every shared prefix hit once "
                    f"cached): {pct(results[0]['prefix_hit_ceiling'])}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.router_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--workload-file", required=True, metavar="JSONL", help="from python -m bench.loadgen write")
    a("-o", "--outdir", required=True)
    a("--model", default=str(DEFAULT_MODEL), help="model directory (default: the tiny one)")
    a("--served-model-name", default="default")
    a("--setups", nargs="+", choices=("router", "engine"), default=["router", "engine"])
    a("--policy", default="cache_aware", help="sglang-router --policy (default cache_aware)")
    a("--kv-cache-gib", type=float, default=0.25, help="KV cache per worker (GiB)")
    a("--threads-per-worker", type=int, default=1)
    a("--warmup", type=int, default=4, help="warm-up requests per setup (not measured)")
    a("--timeout", type=float, default=300.0)
    a("--engine-args", nargs=argparse.REMAINDER, default=[],
      help="more engine.launch flags for every engine (last)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    results = run_all(args, outdir)
    table = format_table(results)
    (outdir / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "requests"} for r in results], indent=1) + "\n")
    (outdir / "compare.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["num_completed"] == r["num_requests"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
