"""Where a native-runner step's time goes at saturation, in process (no HTTP, no pool).

    python -m bench.prefill_profile --model DIR [--num-requests 64] [--prompt-len 256]
        [--output-len 64] [--num-threads 1] [--max-num-seqs 64]
        [--max-num-batched-tokens 512] [--repeat 3] [--profile] [--top 25]

Sends ``--num-requests`` random prompts of ``--prompt-len`` tokens, each generating exactly
``--output-len`` tokens, all at once through ``engine.LLM`` (the scheduler and the native
runner of the serving path, without the processes around them) and reports the median wall
time and output tokens/s over ``--repeat`` runs after a warm-up, and the time of steps with a
prefill chunk against pure decode steps. ``--profile`` adds one torch.profiler run and prints
its ``--top`` operators by self CPU time: attention (SDPA, or ``kernels::paged_attention_cpu``
for the C kernel), the KV gather, matmuls, the elementwise ops; the rest of the wall time is
the host's (scheduler, batch building, sampling). Which attention runs follows
``ENGINE_CPU_ATTENTION`` (docs/kernels.md); ``--ab-cpu-attention`` instead alternates runs
between the torch reference and the C kernel in this process (the variable is read per
call) and reports both side by side, with the ratios.

    python -m bench.prefill_profile --write-workload random256x64.jsonl

writes the served scenario of issue 15 for ``bench.compare --workload-file`` instead: 300
requests of 256 random prompt ids (1..4095, numpy ``default_rng(0)``) and 64 output tokens,
all arriving at 0 (see docs/benchmarks.md, "Saturation").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from engine import LLM, SamplingParams


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, length)] for _ in range(n)]


def write_workload(path: str, n: int = 300, prompt_len: int = 256, output_len: int = 64,
                   vocab: int = 4096, seed: int = 0) -> int:
    """The saturation scenario as a ``bench.loadgen`` workload file; returns its size."""
    from engine.sim.workloads import SimRequest, write_jsonl

    rng = np.random.default_rng(seed)
    return write_jsonl((SimRequest(request_id=f"r{i}", arrival_time=0.0,
                                   prompt_token_ids=tuple(int(t) for t in
                                                          rng.integers(1, vocab, prompt_len)),
                                   max_tokens=output_len, seed=i) for i in range(n)), path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, dtype="float32",
              max_num_batched_tokens=args.max_num_batched_tokens,
              num_threads=args.num_threads)
    vocab = llm.info.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    runner = llm.runners[0]
    llm.generate(prompts(4, args.prompt_len, vocab, 99), [params] * 4)  # warm-up
    step = runner.step
    prefill_steps: list[float] = []
    decode_steps: list[float] = []

    def timed(plan: Any) -> Any:
        t0 = time.perf_counter()
        out = step(plan)
        dt = time.perf_counter() - t0
        n = sum(r.num_scheduled_tokens for r in plan.new_requests) + sum(
            r.num_scheduled_tokens for r in plan.cached_requests)
        running = len(plan.new_requests) + len(plan.cached_requests)
        (decode_steps if n == running else prefill_steps).append(dt)
        return out

    # The core holds the runner's bound step in its worker handle (engine.core.InProcess).
    handle = llm.core.handles[0]
    handle.step = timed  # type: ignore[attr-defined]
    if args.ab_cpu_attention:
        ab = _ab_cpu_attention(args, llm, params, vocab, prefill_steps, decode_steps)
        handle.step = step  # type: ignore[attr-defined]
        return ab
    times = []
    for i in range(args.repeat):
        batch = prompts(args.num_requests, args.prompt_len, vocab, i)
        t0 = time.perf_counter()
        outs = llm.generate(batch, [params] * len(batch))
        times.append(time.perf_counter() - t0)
        assert sum(len(o.token_ids) for o in outs) == args.num_requests * args.output_len
    wall = statistics.median(times)
    result: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "output_tok_s": round(args.num_requests * args.output_len / wall, 1),
        "prefill_steps": len(prefill_steps) // args.repeat,
        "prefill_step_ms": round(1e3 * statistics.median(prefill_steps), 3),
        "prefill_share": round(sum(prefill_steps) / (sum(prefill_steps) + sum(decode_steps)), 3),
        "decode_steps": len(decode_steps) // args.repeat,
        "decode_step_ms": round(1e3 * statistics.median(decode_steps), 3)
        if decode_steps else None,
        "runs_s": [round(t, 3) for t in times],
    }
    if args.profile:
        batch = prompts(args.num_requests, args.prompt_len, vocab, 1234)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate(batch, [params] * len(batch))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    handle.step = step  # type: ignore[attr-defined]
    return result


def _ab_cpu_attention(args: argparse.Namespace, llm: LLM, params: SamplingParams, vocab: int,
                      prefill_steps: list[float], decode_steps: list[float]) -> dict[str, Any]:
    """``--ab-cpu-attention``: runs alternating between the torch reference and the C
    kernel (``ENGINE_CPU_ATTENTION``, read per call), order reversed every other round, fresh
    prompts every run (the same ones twice would hit the prefix cache); medians per mode and
    the kernel/torch ratios. Greedy agreement is the tests' job (tests/kernels)."""
    import os

    stats: dict[str, dict[str, list[float]]] = {
        m: {"wall": [], "prefill": [], "decode": []} for m in ("torch", "cpu")}
    saved = os.environ.get("ENGINE_CPU_ATTENTION")
    try:
        for i in range(args.repeat):
            for j, mode in enumerate(("torch", "cpu") if i % 2 == 0 else ("cpu", "torch")):
                batch = prompts(args.num_requests, args.prompt_len, vocab, 2 * i + j)
                os.environ["ENGINE_CPU_ATTENTION"] = mode
                prefill_steps.clear()
                decode_steps.clear()
                t0 = time.perf_counter()
                outs = llm.generate(batch, [params] * len(batch))
                stats[mode]["wall"].append(time.perf_counter() - t0)
                stats[mode]["prefill"].extend(prefill_steps)
                stats[mode]["decode"].extend(decode_steps)
                assert sum(len(o.token_ids) for o in outs) == len(batch) * args.output_len
    finally:
        if saved is None:
            os.environ.pop("ENGINE_CPU_ATTENTION", None)
        else:
            os.environ["ENGINE_CPU_ATTENTION"] = saved
    result: dict[str, Any] = {}
    for mode, st in stats.items():
        wall = statistics.median(st["wall"])
        result[mode] = {
            "wall_s": round(wall, 3),
            "output_tok_s": round(args.num_requests * args.output_len / wall, 1),
            "prefill_step_ms": round(1e3 * statistics.median(st["prefill"]), 3),
            "decode_step_ms": round(1e3 * statistics.median(st["decode"]), 3),
            "runs_s": [round(t, 3) for t in st["wall"]],
        }
    result["ratio_cpu_over_torch"] = {
        k: round(result["cpu"][k] / result["torch"][k], 3)
        for k in ("wall_s", "prefill_step_ms", "decode_step_ms")}
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--write-workload", metavar="JSONL", help="write the served scenario and exit")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--ab-cpu-attention", action="store_true",
                   help="alternate runs between ENGINE_CPU_ATTENTION=torch and =cpu in this "
                        "process; report both and the ratios")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if args.write_workload:
        print(write_workload(args.write_workload))
        return
    if not args.model:
        p.error("--model is required")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
