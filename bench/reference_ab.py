"""Side-by-side CPU cost of two versions of the torch attention reference, in one process.

    python -m bench.reference_ab --model DIR --base-rev REV [--num-requests 64]
        [--repeat 6] [--num-threads 1]

Loads ``kernels/reference.py`` as it was at git revision ``--base-rev`` next to this tree's,
and runs the saturation scenario of ``bench.prefill_profile`` (random 256-token prompts, 64
greedy output tokens, all at once through ``engine.LLM``) with ``kernels.paged_attention_ref``
bound to one or the other, taking turns run by run (order reversed every other round; fresh
prompts every run, so no prefix hits). Reports per version the median process CPU seconds of
a run and of a decode step with at least half of ``--num-requests`` rows (CPU time, not wall:
other jobs on the shared machine stretch wall time unevenly), and the ratios to ``base``.
Greedy outputs are checked by the tests (tests/kernels, tests/models), not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kernels
from bench.prefill_profile import prompts
from engine import LLM, SamplingParams


def load_reference(rev: str) -> Any:
    """``kernels/reference.py`` at ``rev`` as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:kernels/reference.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "reference_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference_base"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> dict[str, Any]:
    versions = {"base": load_reference(args.base_rev).paged_attention_ref,
                "this": kernels.paged_attention_ref}
    llm = LLM(args.model, max_num_seqs=64, dtype="float32", max_num_batched_tokens=512,
              num_threads=args.num_threads)
    vocab = llm.info.vocab_size
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    handle = llm.core.handles[0]  # the core holds the runner's bound step here
    step = handle.step
    decode: dict[str, list[float]] = {name: [] for name in versions}
    current = ["base"]

    def timed(plan: Any) -> Any:
        t0 = time.process_time()
        out = step(plan)
        dt = time.process_time() - t0
        rows = len(plan.new_requests) + len(plan.cached_requests)
        tokens = sum(r.num_scheduled_tokens for r in (*plan.new_requests, *plan.cached_requests))
        if tokens == rows and 2 * rows >= args.num_requests:
            decode[current[0]].append(dt)
        return out

    for i, fn in enumerate(versions.values()):  # warm-up
        kernels.paged_attention_ref = fn
        llm.generate(prompts(8, 256, vocab, 99 + i), [params] * 8)
    handle.step = timed
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    for r in range(args.repeat):
        order = list(versions) if r % 2 == 0 else list(versions)[::-1]
        for i, name in enumerate(order):
            kernels.paged_attention_ref = versions[name]
            current[0] = name
            batch = prompts(args.num_requests, 256, vocab, 1000 * r + i)
            t0 = time.process_time()
            llm.generate(batch, [params] * len(batch))
            cpu[name].append(time.process_time() - t0)
    handle.step = step
    kernels.paged_attention_ref = versions["this"]
    run_s = {n: statistics.median(v) for n, v in cpu.items()}
    step_ms = {n: 1e3 * statistics.median(v) for n, v in decode.items()}
    return {
        "base_rev": args.base_rev,
        "run_cpu_s": {n: [round(t, 3) for t in v] for n, v in cpu.items()},
        "run_cpu_s_median": {n: round(t, 3) for n, t in run_s.items()},
        "decode_step_cpu_ms_median": {n: round(t, 3) for n, t in step_ms.items()},
        "decode_steps": {n: len(v) for n, v in decode.items()},
        "run_ratio_to_base": round(run_s["this"] / run_s["base"], 3),
        "decode_step_ratio_to_base": round(step_ms["this"] / step_ms["base"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.reference_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--base-rev", required=True, help="git revision of the base reference")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--num-threads", type=int, default=1)
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
