"""Linear layers whose CPU GEMMs go through oneDNN instead of MKL.

``F.linear`` on CPU calls MKL's sgemm, which on the 2-core AMD EPYC (AVX-512) of the
saturation benchmark runs the model's shapes at 80-106 GFLOP/s on one core (likely MKL's
generic, non-AVX-512 path on a non-Intel CPU), where oneDNN's AVX-512 kernels
(``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU freezing emits and vLLM-CPU's
GEMM dispatch uses) run the same shapes at 1.7-2x that (``python -m bench.cpu_gemm``;
docs/benchmarks.md, "Saturation"). The results differ from MKL's only in summation order
(max |diff| ~1e-4 on random unit-variance inputs).

``linear`` picks oneDNN for float32 2-D inputs on CPU when no gradient is wanted (the op has
no backward) and PyTorch was built with it; everything else, CUDA included, stays
``F.linear``. ``Linear`` is ``nn.Linear`` with that ``forward``: the same parameters, names
and loading. The weights are used as they are (no prepacked copy: a second copy of every
weight for a gain we could not measure; oneDNN caches its packed form per shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Whether CPU linears may use oneDNN (off: always ``F.linear``; for A/B measurements).
ONEDNN_ENABLED = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where it applies (see module doc)."""
    if (ONEDNN_ENABLED and x.device.type == "cpu" and x.dim() == 2
            and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and weight.requires_grad)):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` (oneDNN on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
