"""StepPlan -> vLLM ``SchedulerOutput``: the translation half of the vllm runner.

vLLM's worker is stateful in the same way ours is (see ``engine/worker/runner.py``), so a plan
maps onto a ``SchedulerOutput`` nearly field by field:

=============================================  ================================================
our StepPlan                                   vLLM 0.32 SchedulerOutput
=============================================  ================================================
``finished_request_ids`` (finished, aborted,   ``finished_req_ids``: the worker frees their state
preempted)
``new_requests[i]``                            ``scheduled_new_reqs``: ``NewRequestData`` with
                                               ``prompt_token_ids`` = every known token (prompt
                                               plus tokens produced before a preemption), the
                                               same list as ``prefill_token_ids`` (model runner
                                               V2), block ids shifted by one, computed count
``cached_requests[i]``                         ``scheduled_cached_reqs``: one column of
                                               ``CachedRequestData`` (new block ids, computed
                                               count, outputs vLLM holds for the request)
``num_scheduled_tokens`` per request           ``num_scheduled_tokens`` / ``total_num_...``
=============================================  ================================================

Block ids: vLLM reserves block 0 (its null block), so our block ``b`` is vLLM's ``b + 1``
and the runner reports one block fewer than vLLM allocated.

Preemption: our scheduler drops a preempted request (``finished_request_ids``) and later
sends it again as new with its outputs appended to its tokens. vLLM then sees a fresh request
whose "prompt" holds those outputs, so the per-request sampling state is re-based on the
outputs already produced (``min_tokens`` minus them; the seed of output ``n`` is
``seed_for_token(seed, n)`` as in our sampler, re-applied every step; frequency and presence
penalties, which vLLM counts over outputs only, move to our logits processor, which counts
the outputs held in the prompt too: ``engine/worker/vllm/penalties.py``), and
``resumed_req_ids`` / ``preempted_req_ids`` stay empty: both runner versions free the state on
``finished_req_ids`` and rebuild it from the new request.

Prompt logprobs: vLLM's worker scores the prompt positions of each chunk into a per-request
buffer and returns the whole buffer with the prompt's last chunk (``prompt_logprobs_dict``);
rows before the tokens it was sent as computed (a prefix it did not run) are left unwritten,
so the runner reports only the rows from ``vllm_first_computed`` on, all in that last step.

Requests that are registered or extended without running (0 tokens scheduled) are held here
and reach vLLM with their next scheduled step: vLLM's V1 runner expects every request in its
batch to be scheduled.

This module imports vLLM lazily (``make_scheduler_output``), so its checks and bookkeeping run
and are testable without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.messages import SamplingParams, StepPlan
from engine.worker.plan_check import HeldState, PlanLimits, check_plan
from engine.worker.sampler import seed_for_token

#: ``extra_args`` key for a resumed request's penalties (``engine/worker/vllm/penalties.py``,
#: which imports vLLM; the key is repeated there).
RESUMED_PENALTIES = "engine_resumed_penalties"


@dataclass(slots=True)
class TrackedRequest:
    """What the adapter remembers of a request vLLM (or, until its first step, we) hold."""

    sampling: SamplingParams
    num_known: int  # prompt + every output so far
    num_blocks: int
    num_computed: int
    num_output: int  # outputs of the request in all (the seed index, min_tokens)
    vllm_num_output: int = 0  # outputs vLLM sampled since it last received the request
    sent: bool = False  # vLLM has it (it has been scheduled since it was new)
    #: Tokens computed when vLLM received the request: its prompt logprobs start there.
    vllm_first_computed: int = 0
    token_ids: list[int] | None = None  # until sent
    block_ids: list[int] = field(default_factory=list)  # vLLM ids not yet sent


@dataclass(slots=True)
class Translation:
    """One plan, ready for vLLM: the SchedulerOutput and who runs/samples."""

    scheduler_output: Any
    #: (request id, its state, tokens run) in SchedulerOutput order, tokens > 0.
    scheduled: list[tuple[str, TrackedRequest, int]]
    #: Request ids that sample this step (their tokens are now all computed), in order.
    sampling_ids: list[str]
    #: Seeded requests vLLM already holds: (id, generator seed for this step's token).
    reseed: list[tuple[str, int]]


class PlanTranslator:
    """Mirrors the per-request state vLLM's worker keeps, validates plans against it and
    turns them into ``SchedulerOutput``s."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...] = (),
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, TrackedRequest] = {}
        self._classes: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ translate

    def translate(self, plan: StepPlan) -> Translation:
        """Validate ``plan``, apply its deltas to the mirror and build the SchedulerOutput.

        Raises ValueError (naming the step and request) before any state changes."""
        self.validate(plan)
        NewRequestData, CachedRequestData, SchedulerOutput, VSamplingParams = self._vllm()
        requests = self.requests
        finished = set(plan.finished_request_ids)
        for rid in finished:
            requests.pop(rid, None)

        new_reqs: list[Any] = []
        cached_ids: list[str] = []
        cached_blocks: list[tuple[list[int], ...] | None] = []
        cached_computed: list[int] = []
        cached_outputs: list[int] = []
        num_scheduled: dict[str, int] = {}
        scheduled: list[tuple[str, TrackedRequest, int]] = []
        sampling_ids: list[str] = []
        reseed: list[tuple[str, int]] = []

        def send_new(rid: str, req: TrackedRequest) -> None:
            tokens = req.token_ids
            assert tokens is not None
            new_reqs.append(NewRequestData(
                req_id=rid, prompt_token_ids=tokens, mm_features=[],
                sampling_params=self._sampling_params(VSamplingParams, req),
                pooling_params=None, block_ids=(req.block_ids,),
                num_computed_tokens=req.num_computed, lora_request=None,
                prefill_token_ids=tokens,
            ))
            req.sent, req.token_ids, req.block_ids = True, None, []
            req.vllm_num_output = 0
            req.vllm_first_computed = req.num_computed

        for new in plan.new_requests:
            rid = new.request_id
            req = TrackedRequest(
                sampling=new.sampling, num_known=len(new.token_ids),
                num_blocks=len(new.block_ids), num_computed=new.num_computed_tokens,
                num_output=new.num_output_tokens, token_ids=list(new.token_ids),
                block_ids=[b + 1 for b in new.block_ids],
            )
            requests[rid] = req
            n = new.num_scheduled_tokens
            if n > 0:
                send_new(rid, req)
                num_scheduled[rid] = n
                scheduled.append((rid, req, n))
        for cached in plan.cached_requests:
            rid = cached.request_id
            req = requests[rid]
            n = cached.num_scheduled_tokens
            if cached.new_block_ids:
                req.num_blocks += len(cached.new_block_ids)
                req.block_ids.extend(b + 1 for b in cached.new_block_ids)
            if n == 0:
                continue
            if not req.sent:
                send_new(rid, req)
            else:
                cached_ids.append(rid)
                cached_blocks.append((req.block_ids,) if req.block_ids else None)
                req.block_ids = []
                cached_computed.append(req.num_computed)
                cached_outputs.append(req.vllm_num_output)
                seed = req.sampling.seed
                if seed is not None and req.sampling.temperature != 0.0:
                    reseed.append((rid, seed_for_token(seed, req.num_output)))
            num_scheduled[rid] = n
            scheduled.append((rid, req, n))

        total = 0
        for rid, req, n in scheduled:
            total += n
            if req.num_computed + n == req.num_known:
                sampling_ids.append(rid)
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=CachedRequestData(
                req_ids=cached_ids, resumed_req_ids=set(), new_token_ids=[],
                all_token_ids={}, new_block_ids=cached_blocks,
                num_computed_tokens=cached_computed, num_output_tokens=cached_outputs,
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=total,
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=finished,
            free_encoder_mm_hashes=[],
        )
        return Translation(out, scheduled, sampling_ids, reseed)

    def commit(self, translation: Translation, sampled: set[str] | None = None) -> None:
        """Advance the mirror after vLLM ran the step: computed counts, and one more known
        token (and output) for every request that sampled."""
        sampled = set(translation.sampling_ids) if sampled is None else sampled
        for rid, req, n in translation.scheduled:
            req.num_computed += n
            if rid in sampled:
                req.num_known += 1
                req.num_output += 1
                req.vllm_num_output += 1

    def _sampling_params(self, cls: Any, req: TrackedRequest) -> Any:
        """vLLM SamplingParams for a request that already produced ``req.num_output`` tokens.

        Token stops stay with our scheduler: vLLM ignores EOS and never stops a request
        (its worker does not, anyway); ``stop_token_ids`` (ours, plus EOS unless we ignore
        it) only feed its min_tokens mask, as in our sampler."""
        p = req.sampling
        done = req.num_output
        stops = list(p.stop_token_ids)
        if not p.ignore_eos:
            stops += [e for e in self.eos_token_ids if e not in stops]
        max_tokens = max(1, p.max_tokens - done)
        seed = p.seed
        if seed is not None and p.temperature != 0.0:
            seed = seed_for_token(seed, done)
        penalties: dict[str, Any] = dict(
            repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty)
        extra_args = None
        if done and (p.frequency_penalty or p.presence_penalty):
            # vLLM would count only outputs since the resume: the penalties move to our
            # logits processor, which also counts the ``done`` outputs now in the "prompt".
            extra_args = {RESUMED_PENALTIES: [done, p.repetition_penalty,
                                              p.frequency_penalty, p.presence_penalty]}
            penalties = dict(repetition_penalty=1.0, frequency_penalty=0.0,
                             presence_penalty=0.0)
        return cls(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=seed,
            # a grammar decides where a constrained output ends (as in our sampler)
            min_tokens=0 if p.structured is not None
            else min(max(0, p.min_tokens - done), max_tokens), max_tokens=max_tokens,
            **penalties, logit_bias=dict(p.logit_bias) or None,
            allowed_token_ids=list(p.allowed_token_ids) or None, extra_args=extra_args,
            logprobs=p.logprobs,
            # vLLM's "prompt" is every token it is sent: once outputs exist (a resume), the
            # prompt was scored before and the scheduler asks for none.
            prompt_logprobs=p.prompt_logprobs if done == 0 else None,
            stop_token_ids=stops, ignore_eos=True, detokenize=False,
        )

    def _vllm(self) -> tuple[Any, ...]:
        if self._classes is None:
            from vllm import SamplingParams as VSamplingParams
            from vllm.v1.core.sched.output import (
                CachedRequestData,
                NewRequestData,
                SchedulerOutput,
            )

            self._classes = (NewRequestData, CachedRequestData, SchedulerOutput,
                             VSamplingParams)
        return self._classes

    # ------------------------------------------------------------------ checks

    def validate(self, plan: StepPlan) -> None:
        """Reject an inconsistent plan before any state changes (ValueError); the same
        checks and messages as the native runner's, plus this runner's batch limits."""
        limits = PlanLimits(self.num_blocks, self.block_size, self.max_model_len, self.vocab_size)
        total = check_plan(plan, self._held, limits)
        step = plan.step_id
        if self.max_num_batched_tokens is not None and total > self.max_num_batched_tokens:
            raise ValueError(f"step {step}: {total} tokens exceed the vllm runner's "
                             f"max_num_batched_tokens {self.max_num_batched_tokens}")
        if self.max_num_seqs is not None and plan.num_requests > self.max_num_seqs:
            raise ValueError(f"step {step}: {plan.num_requests} requests exceed the vllm "
                             f"runner's max_num_seqs {self.max_num_seqs}")

    def _held(self, request_id: str) -> HeldState | None:
        req = self.requests.get(request_id)
        return None if req is None else (req.num_computed, req.num_known, req.num_blocks)


