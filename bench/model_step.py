"""One decode step of the native model against the memory roofline.

    python -m bench.model_step                      # Llama-3-8B shapes, batch 64 x context 2048
    python -m bench.model_step --batch 1 8 64 --context 2048 --json
    python -m bench.model_step --model tiny --batch 4 --context 64   # a smoke run, CPU too

A decode step reads every weight once and every sequence's whole KV cache once, and does
little arithmetic per byte, so its floor is ``(weight bytes + KV bytes) / HBM bandwidth``:
the memory roofline. This builds the native Llama model with random weights (no download;
``--model llama3-8b`` is Llama-3-8B's shapes: 32 layers, hidden 4096, 32 query heads, 8 KV
heads, head dim 128, MLP 14336, vocabulary 128256), fills a paged KV cache of ``batch``
sequences of ``context`` tokens in shuffled blocks, and times one decode step (forward pass
plus greedy argmax over the vocabulary) two ways, as the runner does it:

- ``eager``: the forward pass launched op by op (``--enforce-eager``);
- ``graph``: the same step replayed from a CUDA graph (the runner's default on CUDA).

Bytes counted: every parameter the step reads (all of them but the input embedding table,
of which only ``batch`` rows are read; a tied table is read whole as the LM head), the K and
V of ``context + 1`` positions per sequence and layer. Times are medians over ``--iters``
steps (CUDA events); the KV cache and weights are far larger than the L2 cache, so every
step reads them from HBM. The peak is looked up by device name (bench.kernels' table) or
given with ``--peak-tbps``; the target of issue 4 is a step within 1.5x of the roofline at
batch 64 x context 2048 on an H100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.kernels import device_peaks, write_json
from engine.models.llama import LlamaConfig, LlamaForCausalLM
from engine.worker.cuda_graphs import DecodeGraphs

MODELS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
    ),
    "tiny": LlamaConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=128,
        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=4096,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model_step",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    p.add_argument("--batch", type=int, nargs="+", default=[64])
    p.add_argument("--context", type=int, nargs="+", default=[2048])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu (a smoke run: use --model tiny)")
    p.add_argument("--iters", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--peak-tbps", type=float, help="memory peak in TB/s (default: by name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("--partial", metavar="PATH",
                   help="rewrite the JSON document at PATH after every row (a run stopped "
                   "by a time limit keeps what it measured)")
    args = p.parse_args(argv)
    for flag in ("batch", "context"):
        if min(getattr(args, flag)) < 1:
            p.error(f"--{flag}: values must be >= 1")
    if args.block_size < 1:
        p.error("--block-size: must be >= 1")
    if args.iters < 1:
        p.error("--iters: must be >= 1")
    return args


def build_model(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int) -> LlamaForCausalLM:
    """The native model with random weights: normal(0, 0.02) matrices, unit norms."""
    model = LlamaForCausalLM(cfg, max_positions=max_positions, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.init_rotary(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def weight_bytes_read(model: LlamaForCausalLM, batch: int) -> int:
    """Bytes of parameters one decode step reads."""
    embed = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:  # untied: the input table is only gathered, batch rows
        total -= embed.numel() * embed.element_size()
        total += batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes_read(cfg: LlamaConfig, batch: int, context: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * batch * (context + 1) * cfg.num_kv_heads * cfg.head_dim * itemsize


def median_ms(step: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median milliseconds of ``step`` over ``iters`` runs, after 3 warm-up runs."""
    for _ in range(3):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_step(model: LlamaForCausalLM, batch: int, context: int, args: argparse.Namespace,
               dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    cfg = model.cfg
    bs = args.block_size
    blocks_per_seq = -(-(context + 1) // bs)
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator().manual_seed(args.seed)
    shape = (num_blocks, bs, cfg.num_kv_heads, cfg.head_dim)
    caches = []
    for _ in range(cfg.num_layers):
        k = torch.empty(shape, dtype=dtype, device=device).normal_()
        caches.append((k, torch.empty_like(k).normal_()))
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq)
    positions = torch.full((batch,), context, dtype=torch.int64)
    slots = tables[:, context // bs] * bs + context % bs
    inputs = dict(
        input_ids=torch.randint(cfg.vocab_size, (batch,), generator=gen).numpy(),
        positions=positions.numpy(), slot_mapping=slots.numpy(),
        seq_lens=(positions + 1).numpy(), block_tables=tables.numpy(),
    )
    row: dict[str, Any] = {"batch": batch, "context": context}
    modes = [("eager", False)] + ([("graph", True)] if device.type == "cuda" else [])
    with torch.inference_mode():
        for mode, capture in modes:
            graphs = DecodeGraphs(model, caches, max_batch=batch, sizes=[batch],
                                  max_blocks_per_seq=blocks_per_seq, device=device,
                                  capture=capture)
            graphs.capture()

            def step(graphs: DecodeGraphs = graphs) -> object:
                return graphs.run(**inputs).argmax(-1)

            row[f"{mode}_ms"] = median_ms(step, args.iters, device)
            del graphs
    row["weight_bytes"] = weight_bytes_read(model, batch)
    row["kv_bytes"] = kv_bytes_read(cfg, batch, context, dtype.itemsize)
    del caches
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = MODELS[args.model]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tbps or (device_peaks(name) or (None,))[0]
    max_positions = max(args.context) + 1
    model = build_model(cfg, dtype, device, max_positions, args.seed)
    rows: list[dict[str, Any]] = []
    result = {"device": name, "model": args.model, "dtype": str(dtype).removeprefix("torch."),
              "block_size": args.block_size, "peak_tbps": peak,
              "peak_source": "--peak-tbps" if args.peak_tbps else "datasheet", "results": rows}
    for batch in args.batch:
        for context in args.context:
            row = bench_step(model, batch, context, args, dtype, device)
            total = row["weight_bytes"] + row["kv_bytes"]
            row["roofline_ms"] = total / (peak * 1e12) * 1e3 if peak else None
            for mode in ("eager", "graph"):
                ms = row.get(f"{mode}_ms")
                row[f"{mode}_x_roofline"] = ms / row["roofline_ms"] if ms and peak else None
            rows.append(row)
            if args.partial:
                write_json(result, args.partial)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def _fmt(v: float | None, width: int, prec: int = 2) -> str:
    return f"{'-' if v is None else f'{v:.{prec}f}':>{width}}"


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['model']} decode step, {result['dtype']}, block {result['block_size']}, "
          f"{result['device']} (peak {_fmt(result['peak_tbps'], 0)} TB/s)")
    print(f"{'batch':>6} {'context':>8} {'MB read':>9} {'roof ms':>8} {'eager ms':>9} "
          f"{'x roof':>7} {'graph ms':>9} {'x roof':>7}")
    for r in result["results"]:
        mb = (r["weight_bytes"] + r["kv_bytes"]) / 1e6
        print(f"{r['batch']:>6} {r['context']:>8} {mb:>9.1f} {_fmt(r['roofline_ms'], 8)} "
              f"{_fmt(r['eager_ms'], 9)} {_fmt(r['eager_x_roofline'], 7)} "
              f"{_fmt(r.get('graph_ms'), 9)} {_fmt(r['graph_x_roofline'], 7)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu (and --model tiny) for a smoke run")
        return 0
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
