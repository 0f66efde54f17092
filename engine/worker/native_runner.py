"""The native model runner: our Llama-family model, paged KV caches, batched sampling.

State per request (``_Request``): every known token, the block table, how many tokens have
KV (``num_computed_tokens``), how many were output (``num_output_tokens``, the sampler's
seed index) and the sampling parameters. A step applies the plan's deltas, packs the
scheduled tokens of all requests into one flat ragged batch, runs one forward pass, samples
for the requests whose known tokens are now all computed and appends those tokens.

On CUDA, batches of one new token per request (decode steps) replay CUDA graphs captured at
padded batch sizes (``engine/worker/cuda_graphs.py``) unless ``--enforce-eager``; every other
batch, and decode batches above ``--cuda-graph-max-batch``, run eagerly.

Batch preparation is vectorised with numpy over the flat batch (a ragged ``arange`` for the
positions, one fancy-index for the slots) so its Python-level work is per request, not per
token: a 4k-token prefill chunk costs little more bookkeeping than one decode.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from engine.config import CacheConfig, ModelConfig, WorkerConfig, default_num_threads
from engine.messages import (
    CachedRequestData,
    NewRequestData,
    PromptLogprobs,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.models.info import load_model_info
from engine.models.layers import AttentionMetadata, SampledRows
from engine.models.loader import load_model, resolve_dtype
from engine.models.parallel import TensorParallel
from engine.resolve import kv_cache_blocks, torch_device
from engine.worker import cpu_malloc
from engine.worker.cuda_graphs import DecodeGraphs
from engine.worker.host_batch import HostBatch, tp_recv, tp_send
from engine.worker.plan_check import HeldState, PlanLimits, check_plan
from engine.worker.runner import GroupError, ModelRunner
from engine.worker.sampler import PromptRows, Sampler, prompt_logprobs
from engine.worker.structured import GrammarTable

log = logging.getLogger(__name__)

#: Prompt tokens of the warm-up step (``NativeRunner._warm_up``): a typical chat prompt.
WARM_UP_TOKENS = 64


@dataclass
class _Request:
    sampling: SamplingParams
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_output_tokens: int


class NativeRunner(ModelRunner):
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        worker_config: WorkerConfig,
        *,
        device: str | torch.device | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        # The worker's resolved device (its slot's GPU, else ``--device``).
        self.device = torch_device(device if device is not None else worker_config.device)
        #: Tensor parallelism: rank 0 of the group (the leader) is the worker the pool sees;
        #: it sends each step's batch to the other ranks (``follow``), which run the same
        #: forward pass on their shards.
        self.tp = tp if tp is not None and tp.size > 1 else None
        if self.device.type == "cpu":  # activations reuse freed memory (no page faults)
            cpu_malloc.tune_malloc()
        # Intra-op threads of this process (CPU matmuls/attention): the worker's share of cores.
        torch.set_num_threads(
            worker_config.num_threads or default_num_threads(worker_config.num_workers)
        )
        self.info = load_model_info(model_config)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.model = load_model(
            self.info.path, dtype=self.dtype, device=self.device,
            max_positions=self.info.max_model_len, **({"tp": self.tp} if self.tp else {}),
        )
        cfg = self.model.cfg
        # The context, sliding window included, is decided once (engine.models.info
        # context_length): the pool and the frontend see the same number.
        self.max_model_len = self.info.max_model_len
        self.block_size = cache_config.block_size
        self.num_blocks = kv_cache_blocks(cache_config, self.info, self.dtype.itemsize,
                                          tp_size=self.tp.size if self.tp else 1)
        shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not empty: no kernel needs it (the Triton kernels never load an unused
        # slot; the CPU reference zeroes what it gathers past a context), but a cache that
        # starts finite costs nothing and keeps a future kernel's masked reads harmless.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(self.info.eos_token_ids, seed=model_config.seed)
        self.requests: dict[str, _Request] = {}
        #: Grammar matchers of constrained requests (structured outputs), leader only.
        self.grammars = GrammarTable(self.info.path, self.info.vocab_size,
                                     self.info.eos_token_ids)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and self.tp is not None:
            log.info("tensor parallel: decode steps run eagerly (no CUDA graphs yet)")
        elif self.device.type == "cuda" and not worker_config.enforce_eager:
            if kernels.graph_safe(self.device, cfg.head_dim):
                try:
                    self.enable_decode_graphs(max_batch=worker_config.cuda_graph_max_batch)
                except RuntimeError:  # a capture that fails is a bug; serve, but say so
                    log.exception("CUDA graph capture failed; decode steps run eagerly "
                                  "(--enforce-eager hides this message)")
                    torch.cuda.synchronize(self.device)
            else:
                log.warning("no CUDA graphs: the attention of head_dim %d runs the torch "
                            "reference, which syncs with the host", cfg.head_dim)

        if self.device.type == "cpu" and self.tp is None:
            self._warm_up()

    def _warm_up(self, prompt_tokens: int = WARM_UP_TOKENS) -> None:
        """Run one prompt and one decode through ``step`` before serving, then forget them:
        on CPU a process's first forward pass creates its oneDNN primitives and loads the C
        kernels (a 73-token prefill took 26 ms first, 5 ms after; docs/kernels.md), which
        the first request after a start would otherwise pay. The blocks used are zeroed
        again; nothing the scheduler sees changes (it has planned nothing yet). Not with
        tensor parallelism, whose ranks would have to follow a step the pool never sent."""
        n = max(1, min(prompt_tokens, self.max_model_len - 1,
                       self.num_blocks * self.block_size - 1))
        blocks = list(range(-(-(n + 1) // self.block_size)))
        greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        rid = "engine-warm-up"
        self.step(StepPlan(step_id=-1, worker_id=-1, new_requests=[NewRequestData(
            request_id=rid, token_ids=[0] * n, sampling=greedy, block_ids=blocks,
            num_computed_tokens=0, num_scheduled_tokens=n)]))
        self.step(StepPlan(step_id=-1, worker_id=-1, cached_requests=[
            CachedRequestData(request_id=rid, num_scheduled_tokens=1)]))
        self.drop([rid])
        for k, v in self.kv_caches:  # blocks 0..n-1: a slice, zeroed in place
            k[: len(blocks)].zero_()
            v[: len(blocks)].zero_()

    def enable_decode_graphs(self, *, max_batch: int, capture: bool = True) -> None:
        """Run decode batches of up to ``max_batch`` requests through static padded buffers,
        replayed from CUDA graphs (``capture=False``: the same padded path run eagerly, for
        testing it without a GPU)."""
        graphs = DecodeGraphs(
            self.model, self.kv_caches, max_batch=max_batch,
            max_blocks_per_seq=-(-self.max_model_len // self.block_size), device=self.device,
            capture=capture,
        )
        graphs.capture()
        self.graphs = graphs

    # ------------------------------------------------------------------ step

    def step(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        self._validate(plan)
        for rid in plan.finished_request_ids:
            self.requests.pop(rid, None)
            self.grammars.drop(rid)
        scheduled: list[tuple[str, _Request, int]] = []
        for new in plan.new_requests:
            req = _Request(
                sampling=new.sampling, token_ids=list(new.token_ids), block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                num_output_tokens=new.num_output_tokens,
            )
            self.requests[new.request_id] = req
            if new.sampling.structured is not None:  # compiles while the prefill runs
                n_out = new.num_output_tokens
                self.grammars.add(new.request_id, new.sampling.structured,
                                  new.token_ids[len(new.token_ids) - n_out:])
            scheduled.append((new.request_id, req, new.num_scheduled_tokens))
        for cached in plan.cached_requests:
            req = self.requests[cached.request_id]
            req.block_ids.extend(cached.new_block_ids)
            scheduled.append((cached.request_id, req, cached.num_scheduled_tokens))
        scheduled = [s for s in scheduled if s[2] > 0]

        token_ids: list[int] = []
        sampling_ids: list[str] = []
        ended: list[str] = []
        out = None
        prompt_lps: list[PromptLogprobs] | None = None
        if scheduled:
            batch = self._prepare(scheduled)
            with torch.inference_mode():
                logits = self._forward(batch)
                rows = [self.requests[rid] for rid in batch.sampling_ids]
                if batch.prompt_rows:
                    prompt_lps = prompt_logprobs(logits[len(rows):], batch.prompt_rows)
                    logits = logits[: len(rows)]
                mask = self.grammars.bitmask(batch.sampling_ids)
                out = self.sampler(logits, rows, mask) if rows else None
            for _, req, n in scheduled:
                req.num_computed_tokens += n
            if out is not None:
                for req, tok in zip(rows, out.token_ids, strict=True):
                    req.token_ids.append(tok)
                    req.num_output_tokens += 1
                token_ids = out.token_ids
                ended = self.grammars.accept(batch.sampling_ids, token_ids)
            sampling_ids = batch.sampling_ids
        return StepResult(
            step_id=plan.step_id, worker_id=plan.worker_id, request_ids=sampling_ids,
            token_ids=token_ids, logprobs=out.logprobs if out else None,
            execute_time_s=time.perf_counter() - start,
            top_token_ids=out.top_token_ids if out else None,
            top_logprobs=out.top_logprobs if out else None, prompt_logprobs=prompt_lps,
            grammar_ended_ids=ended,
        )

    def _prepare(self, scheduled: list[tuple[str, _Request, int]]) -> HostBatch:
        bs = self.block_size
        q_lens = np.fromiter((n for _, _, n in scheduled), dtype=np.int64, count=len(scheduled))
        starts = np.fromiter((r.num_computed_tokens for _, r, _ in scheduled), dtype=np.int64,
                             count=len(scheduled))
        seq_lens = starts + q_lens
        cu = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        # Ragged arange: token t of request i sits at position starts[i] + (t - cu[i]).
        req_of_token = np.repeat(np.arange(len(scheduled)), q_lens)
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - cu[:-1], q_lens)
        blocks_needed = -(-seq_lens // bs)
        # Every block table row in one assignment: the rows' block ids end to end fill the
        # row-major cells of the mask (no per-row numpy call).
        width = int(blocks_needed.max())
        tables = np.zeros((len(scheduled), width), dtype=np.int64)
        tables[np.arange(width)[None, :] < blocks_needed[:, None]] = np.fromiter(
            itertools.chain.from_iterable(
                r.block_ids[:k] for (_, r, _), k in zip(scheduled, blocks_needed.tolist(),
                                                        strict=True)),
            dtype=np.int64, count=int(blocks_needed.sum()))
        input_ids: list[int] = []
        logits_indices: list[int] = []
        sampling_ids: list[str] = []
        prompt_rows: list[PromptRows] = []
        prompt_indices: list[np.ndarray] = []
        for i, (rid, req, n) in enumerate(scheduled):
            c = req.num_computed_tokens
            input_ids.extend(req.token_ids[c : c + n])
            if c + n == len(req.token_ids):
                logits_indices.append(int(cu[i + 1]) - 1)
                sampling_ids.append(rid)
            k = req.sampling.prompt_logprobs
            if k is not None:
                # Positions c .. end-1 of the chunk score prompt tokens c+1 .. end; the
                # prompt's last position is the sampling row above, not a prompt row.
                end = min(c + n, len(req.token_ids) - req.num_output_tokens - 1)
                if end > c:
                    prompt_rows.append(PromptRows(rid, c + 1, req.token_ids[c + 1 : end + 1], k))
                    prompt_indices.append(np.arange(cu[i], cu[i] + end - c))
        slots = tables[req_of_token, positions // bs] * bs + positions % bs
        indices = np.asarray(logits_indices, dtype=np.int64)
        if prompt_indices:
            indices = np.concatenate([indices, *prompt_indices])
        return HostBatch(
            input_ids=np.asarray(input_ids, dtype=np.int64), positions=positions,
            slot_mapping=slots, query_start_loc=cu, seq_lens=seq_lens, block_tables=tables,
            logits_indices=indices, sampling_ids=sampling_ids, prompt_rows=prompt_rows,
        )

    def _forward(self, b: HostBatch) -> torch.Tensor:
        """Float32 logits of the batch's sampling rows."""
        if self.tp is None:
            return self._forward_local(b)
        try:
            tp_send(self.tp, b)
            return self._forward_local(b)
        except Exception as e:
            raise GroupError(f"tensor-parallel step failed: {e}") from e

    def _forward_local(self, b: HostBatch) -> torch.Tensor:
        graphs = self.graphs
        # Prompt-logprob rows are never decodes (a one-token chunk that scores a prompt
        # token is a prefill): such batches run eagerly.
        if (graphs is not None and b.is_decode and not b.prompt_rows
                and graphs.padded_size(len(b.seq_lens))):
            logits = graphs.run(b.input_ids, b.positions, b.slot_mapping, b.seq_lens,
                                b.block_tables)
            if len(b.logits_indices) == len(b.seq_lens):
                return logits
            return logits[torch.from_numpy(b.logits_indices).to(self.device)]

        def to_dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(a).to(self.device, dtype, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=to_dev(b.slot_mapping, torch.int64),
            query_start_loc=to_dev(b.query_start_loc, torch.int32),
            seq_lens=to_dev(b.seq_lens, torch.int32),
            block_tables=to_dev(b.block_tables, torch.int32),
        )
        sampled = None
        if (qsl := self._sampled_query_start_loc(b)) is not None:
            sampled = SampledRows(rows=to_dev(b.logits_indices, torch.int64),
                                  query_start_loc=to_dev(qsl, torch.int32))
        logits: torch.Tensor = self.model(
            to_dev(b.input_ids, torch.int64), to_dev(b.positions, torch.int64), meta,
            self.kv_caches, to_dev(b.logits_indices, torch.int64), sampled,
        )
        return logits

    def _sampled_query_start_loc(self, b: HostBatch) -> np.ndarray | None:
        """Per-sequence starts of the rows that sample (``SampledRows``), when the last
        layer can run only them: every logits row is a sequence's last new token (no
        prompt-logprob rows), some rows would be saved, and no tensor-parallel rank runs
        the same layers without knowing which rows sample (their all-reduces must match)."""
        if self.tp is not None or b.prompt_rows or len(b.logits_indices) == len(b.input_ids):
            return None
        # Both the sequences' last rows and the logits rows ascend: one binary search
        # places every logits row (np.isin would sort both again every step).
        ends = b.query_start_loc[1:] - 1
        at = np.searchsorted(ends, b.logits_indices)
        if (at >= len(ends)).any() or not np.array_equal(ends[at], b.logits_indices):
            return None
        samples = np.zeros(len(ends), dtype=bool)
        samples[at] = True
        if int(samples.sum()) != len(b.logits_indices):  # a row listed twice
            return None
        qsl = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(samples, out=qsl[1:])
        return qsl

    # ------------------------------------------------------------------ checks

    def _validate(self, plan: StepPlan) -> None:
        """Reject an inconsistent plan before any state changes (ValueError)."""
        check_plan(plan, self._held, PlanLimits(self.num_blocks, self.block_size,
                                                self.max_model_len, self.info.vocab_size))

    def _held(self, request_id: str) -> HeldState | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        return req.num_computed_tokens, len(req.token_ids), len(req.block_ids)

    def follow(self) -> None:
        """A tensor-parallel rank other than the leader: run every batch the leader sends
        (the same forward pass, on this rank's shards; the logits are the leader's to
        sample) until it says stop."""
        assert self.tp is not None and self.tp.rank != 0, "follow() is for ranks 1.. of a group"
        with torch.inference_mode():
            while (b := tp_recv(self.tp)) is not None:
                self._forward_local(b)

    def close(self) -> None:
        if self.tp is not None and self.tp.rank == 0:
            with contextlib.suppress(Exception):  # followers already gone: nothing to stop
                tp_send(self.tp, None)
        self.requests.clear()
        self.grammars.close()
        self.graphs = None
        self.kv_caches = []
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

