"""Offline throughput of the in-process API, and the same requests through gRPC.

    python -m bench.offline_throughput [--num-requests 64] [--seed 0] [--grpc] [--json]
                                       [--runner native|vllm|both] [--block-size N]
                                       [--num-threads N]

Every request ignores EOS so each produces exactly its ``max_tokens``; all requests are sent
at once (rate "inf"). With ``--grpc`` it also launches the engine (one worker, same
settings), replays the same requests over gRPC concurrently, and reports the ratio of the two
wall times: the cost of the process boundary, tokenization and streaming. Times are the
median of ``--repeat`` runs after a warm-up.

``--runner`` picks the model runner (``both``: native then vllm, same requests, side by
side); the vllm runner on CPU needs ``--block-size`` 32 (the default for it). For the vllm
runner it also reports the adapter's own cost per step: StepPlan -> SchedulerOutput
translation and the StepResult built from vLLM's output, against the whole step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

from bench.engine_server import launched_engine
from bench.workload import chat_short
from engine import LLM, SamplingParams


def run_inprocess(requests, repeat: int, stats: dict | None = None, **options) -> list[float]:
    llm = LLM(**options)
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
              for r in requests]
    llm.generate([requests[0].prompt_token_ids], params[:1])  # warm-up
    runner = llm.runners[0]
    step, steps = _time_steps(runner)
    adapter0 = getattr(runner, "adapter_time_s", None)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in requests], params)
        times.append(time.perf_counter() - start)
        assert sum(len(o.token_ids) for o in outs) == sum(r.max_tokens for r in requests)
    if stats is not None and steps:
        stats["steps_per_run"] = len(steps) // repeat
        stats["step_ms"] = round(1e3 * statistics.mean(steps), 3)
        if adapter0 is not None:  # the vllm runner's own bookkeeping (VllmRunner.step)
            adapter = runner.adapter_time_s - adapter0
            stats["adapter_ms_per_step"] = round(1e3 * adapter / len(steps), 4)
            stats["adapter_share_of_step"] = round(adapter / sum(steps), 4)
    runner.step = step
    return times


def _time_steps(runner):
    """Wrap ``runner.step`` to record each step's wall time; returns the original and the
    list it fills."""
    step, steps = runner.step, []

    def timed(plan):
        t0 = time.perf_counter()
        out = step(plan)
        steps.append(time.perf_counter() - t0)
        return out

    runner.step = timed
    return step, steps


def run_grpc(requests, repeat: int, launch_args: list[str]) -> list[float]:
    import grpc

    from engine.frontend.proto import pb2, pb2_grpc

    with launched_engine(launch_args) as (_http_port, port):
        async def one(stub, r):
            n = 0
            req = pb2.GenerateRequest(prompt_token_ids=r.prompt_token_ids, max_tokens=r.max_tokens,
                                      temperature=0.0, ignore_eos=True)
            async for resp in stub.Generate(req):
                n += len(resp.token_ids)
            return n

        async def all_requests():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb2_grpc.EngineStub(ch)
                await one(stub, requests[0])  # warm-up
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    counts = await asyncio.gather(*(one(stub, r) for r in requests))
                    times.append(time.perf_counter() - start)
                    assert sum(counts) == sum(r.max_tokens for r in requests)
            return times

        return asyncio.run(all_requests())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each; medians reported")
    p.add_argument("--grpc", action="store_true", help="also run the same requests over gRPC")
    p.add_argument("--json", action="store_true")
    p.add_argument("--runner", choices=("native", "vllm", "both"), default="native",
                   help="model runner (both: native and vllm side by side)")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (default 16; 32 when the vllm runner is involved, "
                   "which vLLM's CPU attention needs, and then for both runners)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch threads of the in-process runner (default: all cores); 1 keeps "
                   "figures stable on a machine other jobs share")
    args = p.parse_args()
    runners = ["native", "vllm"] if args.runner == "both" else [args.runner]
    block_size = args.block_size or (32 if "vllm" in runners else 16)

    from transformers import AutoTokenizer

    from engine.models.default import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    requests = chat_short(tokenizer, args.num_requests, args.seed)
    out_tokens = sum(r.max_tokens for r in requests)
    result = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "model": "default (tiny_stdlib_llama)",
        "workload": f"chat-short /8, {len(requests)} requests, seed {args.seed}",
        "output_tokens": out_tokens,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
    }
    result["block_size"] = block_size
    result["num_threads"] = args.num_threads or "all cores"
    for runner in runners:
        key = "" if args.runner == "native" else f"{runner}_"
        stats: dict = {}
        options = {"runner": runner, "block_size": block_size}
        if args.num_threads:
            options["num_threads"] = args.num_threads
        t_in = statistics.median(run_inprocess(requests, args.repeat, stats, **options))
        result[f"{key}inprocess_s"] = round(t_in, 3)
        result[f"{key}inprocess_output_tok_s"] = round(out_tokens / t_in, 1)
        result.update({f"{key}{k}": v for k, v in stats.items()})
        if args.grpc:
            launch = ["--runner", runner, "--block-size", str(block_size)]
            t_grpc = statistics.median(run_grpc(requests, args.repeat, launch))
            result[f"{key}grpc_s"] = round(t_grpc, 3)
            result[f"{key}grpc_output_tok_s"] = round(out_tokens / t_grpc, 1)
            result[f"{key}grpc_over_inprocess"] = round(t_grpc / t_in, 3)
    if len(runners) == 2:
        result["vllm_over_native_time"] = round(
            result["vllm_inprocess_s"] / result["native_inprocess_s"], 3)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
