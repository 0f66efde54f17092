"""GFLOP/s of the saturation model's GEMM shapes on CPU: ``F.linear`` (MKL) against oneDNN.

    python -m bench.cpu_gemm [--threads 1] [--iters 40]

For each ``[M, K] x [K, N]`` shape, ``F.linear``, ``torch.ops.mkldnn._linear_pointwise`` and
the same with a bias take turns call by call (so the machine's load falls on all alike);
prints the median GFLOP/s of each and the largest difference from ``F.linear``. This is the
measurement behind ``engine.models.cpu_linear`` (docs/benchmarks.md, "Saturation").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: (M, K, N): prefill chunks of 512 tokens and decode batches of 64 through the model's
#: qkv (256 -> 384), gate/up (256 -> 1536) and down (768 -> 256) projections, a small batch,
#: and a 300-row LM head (256 -> 4096).
SHAPES = [(512, 256, 1536), (512, 768, 256), (64, 256, 1536), (64, 768, 256), (512, 256, 384),
          (7, 256, 384), (300, 256, 4096)]


def _fns(x: torch.Tensor, w: torch.Tensor,
         bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    onednn = torch.ops.mkldnn._linear_pointwise
    return {
        "F.linear": lambda: F.linear(x, w),
        "onednn": lambda: onednn(x, w, None, "none", [], ""),
        "onednn+bias": lambda: onednn(x, w, bias, "none", [], ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for m, k, n in SHAPES:
        x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        fns = _fns(x, w, bias)
        diff = (fns["onednn"]() - F.linear(x, w)).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rates = {name: round(2 * m * k * n / statistics.median(t) / 1e9, 1)
                 for name, t in times.items()}
        print(f"[{m}, {k}] x [{k}, {n}]: {rates} GFLOP/s, max |onednn - F.linear| {diff:.1e}")


if __name__ == "__main__":
    main()
