"""Compile every Triton kernel for a CUDA target without a GPU, through the real wrappers.

    python -m kernels.compile_check [--arch 90] [--dtype bf16]

The interpreter checks what the kernels compute, not whether they compile: a kernel can
pass every interpreted test and still be rejected by the compiler (a loop-carried value
changing type, a dot too small for the target, shared memory overflowing). This tool runs
each public wrapper on small CPU tensors with the GPU launch defaults, with a stand-in
driver that reports the requested target and with launches replaced by compile-only
warm-ups, so Triton specialises and compiles exactly what a launch on that GPU would (the
same arguments, alignments and constexprs), down to a cubin with the ptxas shipped in the
triton wheel. It prints one line per kernel: warps, stages, shared memory, and the
registers and spill stack from ``cuobjdump`` when available.

A standalone tool: it patches Triton process-wide, so nothing else should import it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _OfflineDriver:
    """Just enough of a Triton driver to compile for ``target`` with no device present."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _compile_only(compiled: list[tuple[str, Any]]) -> None:
    """Make ``kernel[grid](...)`` compile (``warmup=True``) and record, never launch."""
    from triton.runtime.jit import JITFunction

    def getitem(self: Any, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            compiled.append((self.fn.__name__, self.run(*args, grid=grid, warmup=True, **kwargs)))

        return launch

    JITFunction.__getitem__ = getitem  # type: ignore[method-assign]


def _resources(kernel: Any) -> str:
    """Registers and spill stack of a compiled kernel, from cuobjdump (when shipped)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line
                  for part in line.split() if ":" in part and part.split(":")[1].isdigit())
    return f"registers {fields.get('REG', '?')}, spill stack {fields.get('STACK', '?')} B"


def compile_all(arch: int, dtype: torch.dtype) -> list[tuple[str, Any]]:
    """Compile decode (with and without split-KV), its reduction, prefill and the KV write on
    Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128), block size 16."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernels.compile_check: unset TRITON_INTERPRET (it compiles for a GPU)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    compiled: list[tuple[str, Any]] = []
    _compile_only(compiled)
    from kernels import triton_decode, triton_kv_write, triton_prefill

    heads, kv_heads, head_dim, block_size, batch = 32, 8, 128, 16, 2
    q = torch.zeros(batch, heads, head_dim, dtype=dtype)
    k_cache = torch.zeros(8, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seq_lens = torch.full((batch,), 40, dtype=torch.int32)
    tables = torch.zeros(batch, 4, dtype=torch.int32)
    decode_meta = triton_decode._default_meta(head_dim, on_gpu=True)
    for splits in (1, 2):
        triton_decode.paged_decode(q, k_cache, v_cache, torch.arange(batch + 1, dtype=torch.int32),
                                   seq_lens, tables, 0.1, num_splits=splits, **decode_meta)
    prefill_meta = triton_prefill._default_meta(head_dim, dtype, on_gpu=True)
    triton_prefill.paged_prefill(torch.zeros(40, heads, head_dim, dtype=dtype), k_cache, v_cache,
                                 torch.tensor([0, 20, 40], dtype=torch.int32), seq_lens, tables,
                                 0.1, **prefill_meta)
    qkv = torch.zeros(batch, heads + 2 * kv_heads, head_dim, dtype=dtype)
    triton_kv_write.write_kv(qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:], k_cache,
                             v_cache, torch.arange(batch))
    return compiled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    compiled = compile_all(args.arch, DTYPES[args.dtype])
    for name, kernel in compiled:
        assert "cubin" in kernel.asm, name
        md = kernel.metadata
        print(f"sm_{args.arch} {args.dtype} {name}: {md.num_warps} warps, {md.num_stages} stages, "
              f"{md.shared} B shared, {_resources(kernel)}")
    print(f"compiled {len(compiled)} kernels for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
