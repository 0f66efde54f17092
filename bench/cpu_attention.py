"""The C CPU attention kernel against the torch reference on the saturation shapes, alone.

    python -m bench.cpu_attention [--repeat 30] [--num-threads 1] [--json]

gqa-small's attention (8 query / 2 KV heads of 32, float32, block 16) on three steps of the
saturation scenario (docs/benchmarks.md, "Saturation"):

- ``prompt``: one whole 256-token prompt;
- ``mixed``: a 256-token prompt, a 196-token chunk extending a 60-token prefix, and 60
  decodes of 256-320 context (512 new tokens, the step budget);
- ``decode``: 64 decodes of 256-320 context.

Four layers' caches (as many blocks as 128 requests of 320 tokens, block tables shuffled),
attended in turn as a forward pass does, so the K/V reads come from memory, not a warm L2.
Each repetition times one call per layer per implementation, the two taking turns (order
reversed every other repetition), by the thread's CPU clock (other jobs on a shared machine
stretch wall time); with ``--num-threads`` above 1 by the wall clock (the reference's torch
threads then work outside the calling thread; the kernel runs on the calling thread alone). The reference keeps its per-step plan across the 4 layers of a step, as
in the engine; its first call of a step (the plan made) is included. Reports the median per
layer call in ms and the ratio kernel / reference; checks the outputs agree first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from kernels.cpu import paged_attention_cpu
from kernels.reference import paged_attention_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 8, 2, 32, 16, 4
CACHE_BLOCKS = 128 * 320 // BLOCK_SIZE


def steps(seed: int) -> dict[str, list[tuple[int, int]]]:
    """(seq_len, q_len) of each sequence of each step."""
    g = torch.Generator().manual_seed(seed)

    def decodes(n: int) -> list[tuple[int, int]]:
        return [(int(s), 1) for s in torch.randint(256, 321, (n,), generator=g)]

    return {"prompt": [(256, 256)], "mixed": [(256, 256), (256, 196), *decodes(60)],
            "decode": decodes(64)}


def make_step(seqs: list[tuple[int, int]], g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """query, query_start_loc, seq_lens, block_tables for ``seqs`` over shuffled blocks."""
    need = [-(-s // BLOCK_SIZE) for s, _ in seqs]
    perm = torch.randperm(CACHE_BLOCKS, generator=g)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    q_lens = torch.tensor([q for _, q in seqs])
    starts = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    starts[1:] = q_lens.cumsum(0)
    query = torch.randn(int(q_lens.sum()), NUM_HEADS, HEAD_DIM, generator=g)
    lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return query, starts, lens, tables


def measure(name: str, seqs: list[tuple[int, int]], caches: list[tuple[torch.Tensor, torch.Tensor]],
            repeat: int, g: torch.Generator) -> dict[str, Any]:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    query, starts, lens, tables = make_step(seqs, g)
    scale = HEAD_DIM ** -0.5
    impls = {"reference": paged_attention_ref, "kernel": paged_attention_cpu}
    for k, v in caches[:1]:
        want = paged_attention_ref(query, k, v, starts, lens, tables, scale)
        got = paged_attention_cpu(query, k, v, starts, lens, tables, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    times: dict[str, list[float]] = {n: [] for n in impls}
    for rep in range(repeat + 2):  # 2 warm-up repetitions
        order = list(impls) if rep % 2 else list(reversed(impls))
        for impl in order:
            for k, v in caches:
                t0 = clock()
                impls[impl](query, k, v, starts, lens, tables, scale)
                if rep >= 2:
                    times[impl].append(clock() - t0)
    ref = statistics.median(times["reference"]) * 1e3
    ker = statistics.median(times["kernel"]) * 1e3
    return {"step": name, "new_tokens": int(starts[-1]), "sequences": len(seqs),
            "reference_ms": round(ref, 4), "kernel_ms": round(ker, 4),
            "ratio": round(ker / ref, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    g = torch.Generator().manual_seed(args.seed)
    shape = (CACHE_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
              for _ in range(LAYERS)]
    rows = [measure(name, seqs, caches, args.repeat, g)
            for name, seqs in steps(args.seed).items()]
    if args.json:
        print(json.dumps({"num_threads": args.num_threads, "repeat": args.repeat,
                          "rows": rows}, indent=2))
        return
    print(f"{'step':8} {'tokens':>6} {'seqs':>4} {'reference ms':>12} {'kernel ms':>10} "
          f"{'ratio':>6}   (median {'CPU' if args.num_threads == 1 else 'wall'} ms per layer call, "
          f"{args.num_threads} torch thread(s))")
    for r in rows:
        print(f"{r['step']:8} {r['new_tokens']:6} {r['sequences']:4} {r['reference_ms']:12.3f} "
              f"{r['kernel_ms']:10.3f} {r['ratio']:6.3f}")


if __name__ == "__main__":
    main()
