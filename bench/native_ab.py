"""Side-by-side CPU cost of the native runner's saturation speed-ups, in one process.

    python -m bench.native_ab --model DIR [--num-requests 64] [--repeat 3] [--num-threads 1]
        [--untuned-malloc]

Runs the saturation scenario of ``bench.prefill_profile`` (random 256-token prompts, 64
greedy output tokens, all at once through ``engine.LLM``) under four variants, taking turns
run by run (order reversed every other round) so that the shared machine's load falls on all
alike: ``base`` (every layer computes every row, GEMMs through ``F.linear``/MKL), ``prune``
(the last layer runs only the sampled rows, ``SampledRows``), ``prune+onednn`` (and the
GEMMs through oneDNN, ``engine.models.cpu_linear``) and ``prune+onednn+fused`` (and the
elementwise ops as fused C loops, ``kernels.cpu_elementwise``). Every run uses fresh prompts (no prefix
hits). Reports the median process CPU seconds per variant (CPU time, not wall: other jobs on
the machine stretch wall time unevenly), output tokens per CPU second, and the ratio to
``base``. ``--untuned-malloc`` keeps glibc's malloc defaults in this process
(``engine.worker.cpu_malloc`` not applied): that setting is process-wide and cannot be undone,
so it is compared across processes, run alternately. (Greedy outputs are checked by the tests: tests/models/test_sampled_rows.py and
the comparisons with transformers, which run with oneDNN on.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.prefill_profile import prompts
from engine import LLM, SamplingParams
from engine.models import cpu_linear
from engine.worker import cpu_malloc
from engine.worker.native_runner import NativeRunner
from kernels import cpu_elementwise

_SAMPLED = NativeRunner._sampled_query_start_loc


def _set(prune: bool, onednn: bool, fused: bool = False) -> Callable[[], None]:
    def apply() -> None:
        NativeRunner._sampled_query_start_loc = (  # type: ignore[method-assign]
            _SAMPLED if prune else (lambda self, b: None))
        cpu_linear.ONEDNN_ENABLED = onednn
        cpu_elementwise.ENABLED = fused
    return apply


VARIANTS = {"base": _set(False, False), "prune": _set(True, False),
            "prune+onednn": _set(True, True), "prune+onednn+fused": _set(True, True, True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    onednn_default, fused_default = cpu_linear.ONEDNN_ENABLED, cpu_elementwise.ENABLED
    if args.untuned_malloc:
        cpu_malloc.tune_malloc = lambda: False
    llm = LLM(args.model, max_num_seqs=64, dtype="float32", max_num_batched_tokens=512,
              num_threads=args.num_threads)
    vocab = llm.info.vocab_size
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, apply in enumerate(VARIANTS.values()):  # warm-up
        apply()
        llm.generate(prompts(8, 256, vocab, 99 + i), [params] * 8)
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeat):
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for i, name in enumerate(order):
            VARIANTS[name]()
            batch = prompts(args.num_requests, 256, vocab, 1000 * r + i)
            t0 = time.process_time()
            llm.generate(batch, [params] * len(batch))
            cpu[name].append(time.process_time() - t0)
    _set(True, onednn_default, fused_default)()
    med = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "malloc": "glibc defaults" if args.untuned_malloc else "tuned",
        "cpu_s": {name: [round(t, 3) for t in v] for name, v in cpu.items()},
        "out_tok_per_cpu_s": {n: round(args.num_requests * 64 / m, 1) for n, m in med.items()},
        "cpu_ratio_to_base": {n: round(m / med["base"], 3) for n, m in med.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.native_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--untuned-malloc", action="store_true")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
