"""Decode steps replayed from CUDA graphs, at padded batch sizes.

A decode step of a small model is bound by the host: each layer launches a dozen kernels,
and launching takes longer than running them. A CUDA graph records every launch of one
forward pass once and replays them all with one call. The native runner captures one graph
per batch size in ``capture_sizes`` (1, 2, 4, then multiples of 8) and runs a decode batch
of ``n`` requests as the graph of the smallest captured size ``>= n``.

Graphs bake in the addresses of every tensor they touch, so the inputs live in static
buffers allocated once at the largest size, and a step copies its inputs into their first
``n`` rows. Rows ``n..size-1`` are padding, in the kernels' conventions (kernels/reference.py
follows them too): token 0 at position 0, slot -1 (``write_kv`` skips it) and ``seq_len``
0 (attention outputs zeros and reads no block). ``query_start_loc`` is always ``arange``:
every row, padding included, has one new token, which is what sends the batch to the decode
kernel. The block-table buffer is as wide as the longest context the model allows, so any
request fits; the decode kernel's split-KV count, chosen from that width, is fixed at
capture. Stale entries beyond a row's context are never read.

The graphs compute the logits of every row (``[size, vocab]``, float32); the runner samples
from the rows it needs, outside the graph. One memory pool serves all graphs (captured
largest first, so the smaller ones reuse its blocks).

``capture=False`` runs the same padded static-buffer path eagerly, without graphs: what
the CPU tests use to check the padding and the buffer bookkeeping without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.models.layers import AttentionMetadata

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to ``max_batch``
    (itself included), so a batch pads by fewer than 8 rows."""
    sizes = {s for s in (1, 2, 4) if s <= max_batch} | set(range(8, max_batch + 1, 8))
    return sorted(sizes | {max_batch})


class DecodeGraphs:
    """One-token-per-request forward passes at padded batch sizes, captured or eager.

    ``sizes`` overrides ``capture_sizes(max_batch)`` (a benchmark captures one size).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        capture: bool = True,
        sizes: Sequence[int] | None = None,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.captured = capture
        n = self.max_batch
        kw: dict[str, Any] = {"device": device}
        # Token ids, positions, slots and context lengths share one int64 buffer, so a step
        # moves them with one host-to-device copy from one pinned staging buffer (reused
        # every step: the sampler's read of the logits has synchronised with the last copy
        # by the time the next step writes it).
        self._host = torch.zeros(4, n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._inputs = torch.zeros(4, n, dtype=torch.int64, **kw)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self._inputs
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, **kw)
        self._host_tables = torch.zeros_like(self.block_tables, device="cpu",
                                             pin_memory=device.type == "cuda")
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, **kw)
        self.logits_indices = torch.arange(n, dtype=torch.int64, **kw)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_time_s = 0.0

    def padded_size(self, batch: int) -> int | None:
        """The captured size a batch of ``batch`` rows runs at, or None if it is too big."""
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    # ------------------------------------------------------------------ capture

    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool. Each size runs
        eagerly once before its capture (Triton compiles and autotunes outside the graph)."""
        if not self.captured:
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._host[:] = torch.tensor([[0], [0], [-1], [0]])  # every row padding
        self._inputs.copy_(self._host)
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for size in reversed(self.sizes):
                    self._forward(size)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.current_stream().wait_stream(stream)
            for size in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_time_s = time.perf_counter() - start
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.graphs),
                 self.sizes[0], self.sizes[-1], self.capture_time_s)

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size].to(torch.int32),  # a kernel inside the graph
            block_tables=self.block_tables[:size],
        )
        logits: torch.Tensor = self.model(
            self.input_ids[:size], self.positions[:size], meta, self.kv_caches,
            self.logits_indices[:size],
        )
        return logits

    # ------------------------------------------------------------------ replay

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
    ) -> torch.Tensor:
        """Logits ``[n, vocab]`` (float32) of a batch of ``n`` one-token rows; the arrays
        are per row (``block_tables`` ``[n, width]``). The returned tensor is a view of the
        graph's output buffer: read it before the next ``run``."""
        n = len(input_ids)
        size = self.padded_size(n)
        if size is None:
            raise ValueError(f"decode batch of {n} is above the largest graph ({self.max_batch})")
        width = block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block table of {width} blocks is wider than the graphs' "
                             f"{self.block_tables.shape[1]}")
        host = self._host.numpy()
        host[0, :n] = input_ids
        host[1, :n] = positions
        host[2, :n] = slot_mapping
        host[3, :n] = seq_lens
        host[:, n:size] = ((0,), (0,), (-1,), (0,))  # padding rows
        self._inputs.copy_(self._host, non_blocking=True)
        # Whole rows (one contiguous copy); columns past ``width`` hold stale ids that no
        # row's context reaches.
        self._host_tables.numpy()[:n, :width] = block_tables
        self.block_tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        if self.captured:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        with torch.inference_mode():
            return self._forward(size)[:n]
