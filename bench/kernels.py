"""Microbenchmark of the Triton paged-attention kernels against the device's peak.

    python -m bench.kernels [--batch 1 8 64 256] [--context 512 4096 32768] [--json]
    TRITON_INTERPRET=1 python -m bench.kernels --device cpu --dtype fp16 --batch 1 \
        --context 32   # a smoke run of this script on the CPU (the interpreter: no figures)

On Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128), block size 16,
bf16, shuffled block tables:

- decode: one query token per sequence over ``context`` cached tokens. Bandwidth = bytes of
  K, V and queries read / time, as a fraction of the HBM peak.
- prefill: ``batch`` causal prompts of ``context`` tokens, no prefix. TFLOP/s counts the
  causal half only (4 * head_dim * heads * context * (context + 1) / 2 per sequence), as a
  fraction of the dense bf16 tensor-core peak. With ``--prefix-len P`` it is an extend: the
  last ``context - P`` tokens of each sequence attend to ``P`` cached ones (a prefix-cache
  hit or an earlier chunk), and the FLOPs count the keys each new token sees.

Beside each, torch's ``scaled_dot_product_attention`` on contiguous K/V of the same size
(``enable_gqa``) is the reference point. Times are medians of
``triton.testing.do_bench``, which writes a 256 MiB buffer before every run (a cold L2, so
that decode reads its KV from HBM). Peaks are looked up from the device name
(``--peak-tbps`` / ``--peak-tflops`` override). Combinations whose tensors do not fit in
free memory, or prefills above ``--max-prefill-tokens``, are skipped. ``--sweep`` also
times a grid of tile/launch parameters on the issue's headline shapes (decode 64 x 4096,
prefill 8 x 4096) to guide the defaults. ``--partial PATH`` rewrites the JSON document there
after every row, so a run stopped by a time limit keeps what it measured.

``--device cpu`` (with ``TRITON_INTERPRET=1``, float32 or float16: the interpreter
mishandles bf16) runs every code path of this script on tiny shapes, timed by the host
clock without an L2 flush: it proves the script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
# The headline shapes: decode batch x context, prefill batch x context (also --sweep's).
HEADLINE_DECODE, HEADLINE_PREFILL = (64, 4096), (8, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (substring of torch.cuda.get_device_name(), HBM TB/s, dense bf16 tensor TFLOP/s), first
# match wins: specific names before their prefixes. Vendor datasheet figures.
PEAKS: list[tuple[str, float, float]] = [
    ("H100 NVL", 3.9, 835.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 4.0, 989.0),
    ("H200", 4.8, 989.0),
    ("H20", 4.0, 148.0),
    ("B200", 8.0, 2250.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),  # 40 GB parts
    ("L40S", 0.864, 362.0),
    ("L4", 0.3, 121.0),
    ("A10G", 0.6, 70.0),
    ("RTX 4090", 1.008, 165.0),
]


def device_peaks(name: str) -> tuple[float, float] | None:
    """(TB/s, TFLOP/s) of a device by name, or None when unknown."""
    for key, tbps, tflops in PEAKS:
        if key in name:
            return tbps, tflops
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[512, 4096, 32768])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--only", choices=["decode", "prefill"], help="run one kind only")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="prefill as an extend: this many cached tokens before the new ones")
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu (a smoke run under TRITON_INTERPRET=1)")
    p.add_argument("--partial", metavar="PATH",
                   help="rewrite the JSON document at PATH after every row")
    p.add_argument("--max-prefill-tokens", type=int, default=262144,
                   help="skip prefills with more tokens (batch x context) than this")
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA reference")
    p.add_argument("--peak-tbps", type=float, help="HBM peak in TB/s (default: by device name)")
    p.add_argument("--peak-tflops", type=float,
                   help="dense bf16/fp16 peak in TFLOP/s (default: by device name)")
    p.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per measurement")
    p.add_argument("--sweep", action="store_true",
                   help="also time a grid of kernel tile/launch parameters (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = p.parse_args(argv)
    if args.prefix_len < 0 or any(args.prefix_len >= c for c in args.context):
        p.error("--prefix-len: must be >= 0 and below every --context")
    return args


# --------------------------------------------------------------------------- inputs


def paged_inputs(batch: int, context: int, q_len: int, block_size: int, dtype: torch.dtype,
                 gen: torch.Generator, dev: torch.device) -> dict[str, Any]:
    """A batch of ``batch`` sequences of ``context`` tokens, the last ``q_len`` new, with their
    KV in randomly permuted blocks."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=dtype, device=dev)
    v_cache = torch.randn(shape, dtype=dtype, device=dev)
    perm = torch.randperm(num_blocks, generator=gen).to(dev, torch.int32)
    return {
        "query": torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, dtype=dtype, device=dev),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "query_start_loc": torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32,
                                        device=dev),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=dev),
        "block_tables": perm.view(batch, blocks_per_seq),
    }


def fits(nbytes: int, device: torch.device, headroom: float = 0.85) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < headroom * free


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_bytes(batch: int, context: int, itemsize: int) -> int:
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * itemsize


# --------------------------------------------------------------------------- timing


ATTN_KEYS = ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables")


def time_ms(fn: Callable[[], object], rep_ms: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``: on CUDA ``do_bench`` (events, a cold L2 before every
    run); elsewhere the host clock over a few runs after one warm-up (a smoke run only)."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                         return_mode="median"))


def time_kernel(kernel: Callable[..., object], x: dict[str, Any], rep_ms: int,
                **meta: int) -> float:
    call = [x[k] for k in ATTN_KEYS]
    return time_ms(lambda: kernel(*call, HEAD_DIM**-0.5, **meta), rep_ms, x["query"].device)


def time_sdpa(batch: int, q_len: int, context: int, dtype: torch.dtype, rep_ms: int,
              device: torch.device) -> float:
    """torch SDPA on contiguous [batch, heads, len, dim] tensors; causal for a prefill, the
    new tokens at the end of the context (SDPA's bottom-right alignment is spelled out as a
    mask for an extend, since ``is_causal`` aligns top-left)."""
    q = torch.randn(batch, NUM_HEADS, q_len, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = None
    causal = 1 < q_len == context
    if 1 < q_len < context:
        pos = torch.arange(context, device=device)
        mask = pos[None, :] <= pos[context - q_len:, None]
    return time_ms(lambda: sdpa(q, k, v, attn_mask=mask, is_causal=causal,
                                scale=HEAD_DIM**-0.5, enable_gqa=True), rep_ms, device)


def bench_decode(batch: int, context: int, args: argparse.Namespace,
                 gen: torch.Generator) -> dict[str, Any] | None:
    from kernels.triton_decode import num_kv_splits, num_sms, paged_decode

    dtype, dev = DTYPES[args.dtype], torch.device(args.device)
    item = dtype.itemsize
    if not fits(kv_bytes(batch, context, item) + (64 << 20), dev):
        return None
    x = paged_inputs(batch, context, 1, args.block_size, dtype, gen, dev)
    splits = num_kv_splits(batch, NUM_KV_HEADS, x["block_tables"].shape[1] * args.block_size,
                           num_sms(x["query"].device))
    ms = time_kernel(paged_decode, x, args.rep_ms)
    del x
    empty_cache(dev)
    nbytes = kv_bytes(batch, context, item) + batch * NUM_HEADS * HEAD_DIM * item
    row: dict[str, Any] = {"kind": "decode", "batch": batch, "context": context,
                           "num_splits": splits, "triton_us": ms * 1e3,
                           "triton_tbps": nbytes / ms / 1e9}
    if not args.no_sdpa and fits(kv_bytes(batch, context, item) + (64 << 20), dev):
        ms = time_sdpa(batch, 1, context, dtype, args.rep_ms, dev)
        row |= {"sdpa_us": ms * 1e3, "sdpa_tbps": nbytes / ms / 1e9}
    return row


def prefill_flops(batch: int, context: int, prefix: int = 0) -> float:
    """QK^T and PV: 2 multiply-adds per visible (query, key) pair per head dim. New token
    ``p`` (0-based, ``prefix <= p < context``) sees ``p + 1`` keys: the causal half of a
    prefill, the prefix's full rectangle plus a triangle for an extend."""
    visible = (context * (context + 1) - prefix * (prefix + 1)) / 2
    return 4.0 * batch * NUM_HEADS * HEAD_DIM * visible


def bench_prefill(batch: int, context: int, args: argparse.Namespace,
                  gen: torch.Generator) -> dict[str, Any] | None:
    from kernels.triton_prefill import paged_prefill

    dtype, dev = DTYPES[args.dtype], torch.device(args.device)
    item = dtype.itemsize
    q_len = context - args.prefix_len
    qo_bytes = 2 * batch * q_len * NUM_HEADS * HEAD_DIM * item
    if batch * q_len > args.max_prefill_tokens or not fits(kv_bytes(batch, context, item)
                                                           + qo_bytes + (64 << 20), dev):
        return None
    x = paged_inputs(batch, context, q_len, args.block_size, dtype, gen, dev)
    ms = time_kernel(paged_prefill, x, args.rep_ms)
    del x
    empty_cache(dev)
    flops = prefill_flops(batch, context, args.prefix_len)
    row: dict[str, Any] = {"kind": "prefill", "batch": batch, "context": context,
                           "prefix_len": args.prefix_len,
                           "triton_us": ms * 1e3, "triton_tflops": flops / ms / 1e9}
    if not args.no_sdpa:
        ms = time_sdpa(batch, q_len, context, dtype, args.rep_ms, dev)
        row |= {"sdpa_us": ms * 1e3, "sdpa_tflops": flops / ms / 1e9}
    return row


def sweep(args: argparse.Namespace, gen: torch.Generator) -> list[dict[str, Any]]:
    """Time the kernels over a grid of launch parameters on the headline shapes."""
    from kernels.triton_decode import paged_decode
    from kernels.triton_prefill import paged_prefill

    dtype, dev = DTYPES[args.dtype], torch.device(args.device)
    rows: list[dict[str, Any]] = []
    x = paged_inputs(*HEADLINE_DECODE, 1, args.block_size, dtype, gen, dev)
    nbytes = kv_bytes(*HEADLINE_DECODE, dtype.itemsize)
    for splits, block_n, warps, stages in itertools.product(
            (1, 2, 4), (32, 64, 128), (4, 8), (2, 3, 4)):
        meta = {"num_splits": splits, "block_n": block_n, "num_warps": warps,
                "num_stages": stages}
        try:
            ms = time_kernel(paged_decode, x, args.rep_ms, **meta)
        except Exception as exc:  # e.g. out of shared memory
            rows.append({"kind": "decode", **meta, "error": type(exc).__name__})
            continue
        rows.append({"kind": "decode", **meta, "us": ms * 1e3, "tbps": nbytes / ms / 1e9})
    del x
    empty_cache(dev)
    x = paged_inputs(*HEADLINE_PREFILL, HEADLINE_PREFILL[1], args.block_size, dtype, gen, dev)
    flops = prefill_flops(*HEADLINE_PREFILL)
    for block_m, block_n, warps, stages in itertools.product(
            (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        meta = {"block_m": block_m, "block_n": block_n, "num_warps": warps,
                "num_stages": stages}
        try:
            ms = time_kernel(paged_prefill, x, args.rep_ms, **meta)
        except Exception as exc:
            rows.append({"kind": "prefill", **meta, "error": type(exc).__name__})
            continue
        rows.append({"kind": "prefill", **meta, "us": ms * 1e3, "tflops": flops / ms / 1e9})
    return rows


# --------------------------------------------------------------------------- report


def _fraction(value: float | None, peak: float | None) -> str:
    return "" if value is None or not peak else f"{value / peak:.1%}"


def _rate(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:.2f} {unit}"


def print_table(result: dict[str, Any]) -> None:
    tbps, tflops = result["peak_tbps"], result["peak_tflops"]
    print(f"# {result['device']} | peak {tbps or '?'} TB/s, {tflops or '?'} TFLOP/s | "
          f"{result['dtype']}, block {result['block_size']}, Llama-3-8B attention "
          f"({NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, dim {HEAD_DIM}) | "
          f"torch {result['torch']}, triton {result['triton']}")
    print(f"{'kind':8} {'batch':>5} {'context':>7} {'splits':>6} | {'triton us':>10} "
          f"{'rate':>15} {'of peak':>7} | {'sdpa us':>10} {'rate':>15} {'of peak':>7}")
    for r in result["rows"]:
        unit, key, peak = ("TB/s", "tbps", tbps) if r["kind"] == "decode" else (
            "TFLOP/s", "tflops", tflops)
        ours, ref = r[f"triton_{key}"], r.get(f"sdpa_{key}")
        sdpa_us = f"{r['sdpa_us']:.1f}" if "sdpa_us" in r else "-"
        print(f"{r['kind']:8} {r['batch']:>5} {r['context']:>7} {r.get('num_splits', ''):>6} | "
              f"{r['triton_us']:>10.1f} {_rate(ours, unit):>15} {_fraction(ours, peak):>7} | "
              f"{sdpa_us:>10} {_rate(ref, unit):>15} {_fraction(ref, peak):>7}")
    for s in result["skipped"]:
        print(f"skipped: {s}")
    best = sorted((r for r in result.get("sweep", []) if "error" not in r),
                  key=lambda r: -r.get("tbps", r.get("tflops", 0)))
    for kind in ("decode", "prefill"):
        for r in [r for r in best if r["kind"] == kind][:5]:
            print("sweep best:", r)
    print(result["summary"])


def summary_line(result: dict[str, Any]) -> str:
    parts = []
    for r in result["rows"]:
        if (r["kind"], r["batch"], r["context"]) == ("decode", *HEADLINE_DECODE):
            parts.append(f"decode {r['batch']}x{r['context']} {r['triton_tbps']:.2f} TB/s "
                         f"({_fraction(r['triton_tbps'], result['peak_tbps']) or '?'} of peak)")
        if (r["kind"], r["batch"], r["context"]) == ("prefill", *HEADLINE_PREFILL):
            what = f"extend (prefix {r['prefix_len']})" if r["prefix_len"] else "prefill"
            parts.append(f"{what} {r['batch']}x{r['context']} {r['triton_tflops']:.0f} TFLOP/s "
                         f"({_fraction(r['triton_tflops'], result['peak_tflops']) or '?'} of peak)")
    return f"summary: {result['device']}: " + ("; ".join(parts) or "headline shapes not run")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the kernels' correctness is tested on CPU "
              "by tests/kernels/test_triton_kernels.py under TRITON_INTERPRET=1; "
              "--device cpu smoke-runs this script)")
        return 0
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = device_peaks(name)
    result: dict[str, Any] = {
        "device": name,
        "peak_tbps": args.peak_tbps or (peaks[0] if peaks else None),
        "peak_tflops": args.peak_tflops or (peaks[1] if peaks else None),
        "peak_source": {"tbps": "--peak-tbps" if args.peak_tbps else "datasheet",
                        "tflops": "--peak-tflops" if args.peak_tflops else "datasheet"},
        "dtype": args.dtype, "block_size": args.block_size, "prefix_len": args.prefix_len,
        "torch": torch.__version__, "triton": triton.__version__,
        "rows": [], "skipped": [],
    }
    gen = torch.Generator().manual_seed(args.seed)
    kinds = [args.only] if args.only else ["decode", "prefill"]
    for kind, batch, context in itertools.product(kinds, args.batch, args.context):
        run = bench_decode if kind == "decode" else bench_prefill
        row = run(batch, context, args, gen)
        empty_cache(device)  # whatever the run left cached, before the next fits() check
        if row is None:
            result["skipped"].append(f"{kind} {batch}x{context} (memory or token limit)")
        else:
            result["rows"].append(row)
        if args.partial:
            write_json(result, args.partial)
        if not args.json:
            print(f"done: {kind} {batch}x{context}", file=sys.stderr)
    if args.sweep:
        result["sweep"] = sweep(args, gen)
    result["summary"] = summary_line(result)
    if args.partial:
        write_json(result, args.partial)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def write_json(doc: dict[str, Any], path: str) -> None:
    """Replace ``path`` atomically: a reader (or a kill) never sees half a document."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
