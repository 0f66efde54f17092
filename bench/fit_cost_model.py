"""Fit the simulator's step-time cost model to the real native runner.

    python -m bench.fit_cost_model [--out engine/sim/default_cost.toml] [--repeat 5]

Builds the engine's native runner in-process on the default model (the worker's own
``make_runner``), runs hand-built StepPlans of varied shapes (prefill chunks after cached
contexts, decode batches over short and long contexts, and mixes of both), and times each
with the runner's ``StepResult.execute_time_s``: ``--passes`` interleaved passes over all
shapes, ``--repeat`` steps per shape and pass after a warm-up step, and the fastest sample
of each shape kept (shared machines are noisy; the minimum is the uncontended cost).
Each plan's features (prefill tokens, decode sequences, context tokens, prefill pairs) come
from the simulator's own ``FakeWorker`` so the fit and the simulator count alike. The
coefficients are fitted by least squares on relative error, constrained to be >= 0 (a
coefficient that comes out negative is dropped and the rest refitted), printed, and written
as a cost file with the machine and settings it was measured on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.config import CacheConfig, ModelConfig, WorkerConfig
from engine.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from engine.sim.cost_model import DEFAULT_COST_FILE, BatchShape, CostModel, EngineShape, fit
from engine.sim.simulator import FakeWorker
from engine.worker.factory import make_runner
from engine.worker.runner import ModelRunner

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


@dataclass
class Bench:
    """Drives one runner and a FakeWorker twin with the same plans."""

    runner: ModelRunner
    vocab_size: int
    twin: FakeWorker = field(init=False)
    step_id: int = 0
    next_block: int = 0
    next_rid: int = 0

    def __post_init__(self) -> None:
        self.twin = FakeWorker(0, self.vocab_size)

    def blocks(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.runner.block_size)
        ids = [(self.next_block + i) % self.runner.num_blocks for i in range(n)]
        self.next_block = (self.next_block + n) % self.runner.num_blocks
        return ids

    def new(self, context: int, scheduled: int, num_output: int = 0) -> NewRequestData:
        """A request whose first ``context`` tokens are cached, running ``scheduled`` more."""
        self.next_rid += 1
        total = context + scheduled
        tokens = [(self.next_rid * 31 + i) % self.vocab_size for i in range(total)]
        return NewRequestData(request_id=f"r{self.next_rid}", token_ids=tokens, sampling=GREEDY,
                              block_ids=self.blocks(total + 64), num_computed_tokens=context,
                              num_scheduled_tokens=scheduled, num_output_tokens=num_output)

    def step(self, new: list[NewRequestData], cached: list[CachedRequestData],
             finished: list[str]) -> tuple[float, BatchShape]:
        plan = StepPlan(step_id=self.step_id, worker_id=0, new_requests=new,
                        cached_requests=cached, finished_request_ids=finished)
        self.step_id += 1
        result = self.runner.step(plan)
        _, shape = self.twin.step(plan)
        return result.execute_time_s, shape


def measure(bench: Bench, decodes: int, context: int, prefill: int, prefill_context: int,
            repeat: int) -> Iterator[tuple[float, BatchShape]]:
    """``repeat`` timed steps of ``decodes`` decode sequences at ``context`` tokens plus one
    prefill chunk of ``prefill`` tokens after ``prefill_context`` cached ones."""
    running = [bench.new(context - 1, 1, num_output=1) for _ in range(decodes)]
    ids = [r.request_id for r in running]
    bench.step(running, [], [])  # register the decodes (untimed)
    previous: list[str] = []
    for i in range(repeat + 1):
        chunk = [bench.new(prefill_context, prefill)] if prefill else []
        cached = [CachedRequestData(request_id=rid, num_scheduled_tokens=1) for rid in ids]
        seconds, shape = bench.step(chunk, cached, previous)
        previous = [c.request_id for c in chunk]
        if i:  # the first is a warm-up
            yield seconds, shape
    if ids or previous:
        bench.step([], [], ids + previous)  # drop them


def shapes(max_len: int, max_tokens: int, max_seqs: int) -> Iterator[tuple[int, int, int, int]]:
    """(decodes, decode context, prefill tokens, prefill context) over the space the
    scheduler produces: up to ``max_tokens`` per step and ``max_seqs`` sequences."""
    for n in (16, 64, 128, 256, max_tokens):
        for c in (0, 256, 1024, max_len - n - 1):
            if c + n < max_len:
                yield 0, 0, n, c
    for b in (1, 4, 16, 32, max_seqs):
        for ctx in (16, 128, 512, 1024, max_len - 16):
            yield b, ctx, 0, 0
    for b in (8, 32, max_seqs - 1):
        for ctx in (128, 1024):
            for n in (64, max_tokens - b):
                yield b, ctx, n, 256


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fit_cost_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_COST_FILE), help="cost file to write")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per shape and pass")
    p.add_argument("--passes", type=int, default=3, help="interleaved passes over the shapes")
    p.add_argument("--num-threads", type=int, default=1,
                   help="torch threads (default 1: a worker's share of 2 cores with 2 workers; "
                   "more threads suffer badly from other load on a shared machine)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    args = p.parse_args(argv)

    cache = CacheConfig()
    worker = WorkerConfig(num_workers=1, num_threads=args.num_threads)
    runner = make_runner(ModelConfig(), cache, worker)
    max_len = runner.max_model_len  # type: ignore[attr-defined]
    bench = Bench(runner, runner.info.vocab_size)  # type: ignore[attr-defined]
    grid = list(shapes(max_len, args.max_num_batched_tokens, args.max_num_seqs))
    list(measure(bench, 8, 128, 128, 0, 2))  # warm-up
    best: dict[tuple[int, int, int, int], tuple[float, BatchShape]] = {}
    for i in range(args.passes):
        for key in grid:
            for seconds, shape in measure(bench, *key, args.repeat):
                if key not in best or seconds < best[key][0]:
                    best[key] = (seconds, shape)
        print(f"pass {i + 1}/{args.passes} done", file=sys.stderr)
    rows = [best[key] for key in grid]
    for (b, ctx, n, c), (seconds, _) in zip(grid, rows, strict=True):
        print(f"decodes {b:3d} x ctx {ctx:5d} + prefill {n:4d} after {c:5d}: "
              f"{seconds * 1e3:8.2f} ms", file=sys.stderr)
    coef, pred = fit(rows)
    y = np.array([s for s, _ in rows])
    rel = np.abs(pred - y) / y
    threads = args.num_threads
    source = (f"bench/fit_cost_model.py on {datetime.date.today().isoformat()}: native runner, "
              f"embedded default model, float32 CPU, {threads} torch thread(s); {machine()}")
    engine = EngineShape(num_blocks=runner.num_blocks, block_size=runner.block_size,
                         max_model_len=max_len, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=args.max_num_seqs)
    model = CostModel(**dict(zip(CostModel.COEFFICIENTS, coef, strict=True)), engine=engine,
                      source=source)
    comment = (f"Fitted from {len(rows)} batch shapes (fastest of {args.passes} x "
               f"{args.repeat} steps each): "
               f"median relative error {np.median(rel):.1%}, max {rel.max():.1%}.\n"
               "Regenerate: python -m bench.fit_cost_model")
    Path(args.out).write_text(model.to_toml(comment), encoding="utf-8")
    for name, value in zip(CostModel.COEFFICIENTS, coef, strict=True):
        print(f"{name:16s} {value:.4g}")
    print(f"shapes {len(rows)}, median relative error {np.median(rel):.1%}, "
          f"max {rel.max():.1%}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
