"""What the runner tests share: a toy scheduler that builds StepPlans by hand (``Driver``),
the real scheduler's loop around one runner (``run_engine``), and what a runner holds.

Both work with any ``ModelRunner`` and take the block size from the runner.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass, field

import pytest

from engine.config import SchedulerConfig
from engine.core import CoreObserver, EngineCore, InProcess
from engine.messages import (
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.scheduler.scheduler import Scheduler

#: The shared runners on the default model (tests/worker/conftest.py): vLLM's CPU attention
#: needs blocks of a multiple of 32 tokens, and both runners get the same KV capacity.
BLOCK = 32
NUM_BLOCKS = 96
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def require_vllm() -> None:
    """Skip a test that needs vLLM when it is missing; fail it in CI (``make test``
    installs vLLM, so CI must run these tests)."""
    if importlib.util.find_spec("vllm") is None:  # pragma: no cover - depends on the install
        if os.environ.get("CI"):
            pytest.fail("CI must run the vllm runner's tests: `make test` installs vLLM "
                        "(make install-vllm); it is missing")
        pytest.skip("vLLM is not installed (make install-vllm)")


def held_request_ids(runner) -> list[str]:
    """The requests a runner holds state for (the vllm runner: its mirror of vLLM's)."""
    translator = getattr(runner, "translator", None)
    return list(translator.requests if translator is not None else runner.requests)


def held_state(runner, request_id: str) -> tuple[int, int, int] | None:
    """(computed tokens, known tokens, blocks) a runner holds for a request, or None."""
    translator = getattr(runner, "translator", None)
    if translator is not None:
        t = translator.requests.get(request_id)
        return None if t is None else (t.num_computed, t.num_known, t.num_blocks)
    r = runner.requests.get(request_id)
    return None if r is None else (r.num_computed_tokens, len(r.token_ids), len(r.block_ids))


# --------------------------------------------------------------------------- hand-built plans


@dataclass
class _Req:
    tokens: list[int]
    sampling: SamplingParams
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    sent: bool = False
    #: Prompt logprobs received, by prompt token index: (logprob, rank, top ids, top lps).
    prompt_logprobs: dict[int, tuple[float, int, list[int], list[float]]] = field(
        default_factory=dict)


class Driver:
    """A toy scheduler: hands out shuffled block ids, builds the plans (per-step budgets,
    shared prefix blocks, drops), mirrors the state."""

    def __init__(self, runner, seed: int = 0) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.reqs: dict[str, _Req] = {}
        self.finished: list[str] = []
        self.done: dict[str, _Req] = {}
        self.step_id = 0

    def add(self, rid: str, tokens: list[int], sampling: SamplingParams = GREEDY, *,
            num_output_tokens: int = 0, shared_blocks: list[int] | None = None) -> None:
        r = _Req(list(tokens), sampling, num_output_tokens=num_output_tokens)
        if shared_blocks:  # a prefix-cache hit: these full blocks already hold our KV
            r.blocks = list(shared_blocks)
            r.computed = len(shared_blocks) * self.block_size
        self.reqs[rid] = r

    def drop(self, rid: str) -> _Req:
        """Finish, abort or preempt: the worker forgets it, its blocks go back."""
        r = self.reqs.pop(rid)
        self.done[rid] = r
        self.finished.append(rid)
        in_use = {b for other in self.reqs.values() for b in other.blocks}  # shared prefixes
        self.free.extend(b for b in r.blocks + r.new_blocks if b not in in_use)
        return r

    def preempt(self, rid: str, sampling: SamplingParams = GREEDY) -> _Req:
        """Preempt ``rid`` and bring it back: dropped, one step without it (the runner
        forgets it), re-added carrying its prompt and outputs; returns what it had."""
        r = self.drop(rid)
        self.step()
        self.add(rid, r.tokens, sampling, num_output_tokens=len(r.outputs))
        return r

    def step(self, budget: dict[str, int] | None = None) -> StepResult:
        """One plan: every request's remaining known tokens, or at most ``budget[rid]``
        (requests missing from a given budget run 0 tokens)."""
        new, cached = [], []
        for rid, r in self.reqs.items():
            n = min((budget or {}).get(rid, 1 << 30), len(r.tokens) - r.computed)
            if budget is not None and rid not in budget:
                n = 0
            need = -(-(r.computed + n) // self.block_size) - len(r.blocks) - len(r.new_blocks)
            for _ in range(max(0, need)):
                r.new_blocks.append(self.free.pop())
            if not r.sent:
                r.blocks += r.new_blocks
                r.new_blocks = []
                new.append(NewRequestData(
                    request_id=rid, token_ids=list(r.tokens), sampling=r.sampling,
                    block_ids=list(r.blocks), num_computed_tokens=r.computed,
                    num_scheduled_tokens=n, num_output_tokens=r.num_output_tokens))
                r.sent = True
            elif n or r.new_blocks:
                cached.append(CachedRequestData(request_id=rid, num_scheduled_tokens=n,
                                                new_block_ids=r.new_blocks))
                r.blocks += r.new_blocks
                r.new_blocks = []
            r.computed += n
        plan = StepPlan(step_id=self.step_id, worker_id=0, new_requests=new,
                        cached_requests=cached, finished_request_ids=self.finished)
        self.step_id += 1
        self.finished = []
        result = self.runner.step(plan)
        for pl in result.prompt_logprobs or ():
            r = self.reqs[pl.request_id]
            for j, lp in enumerate(pl.token_logprobs):
                assert pl.first + j not in r.prompt_logprobs, f"position {pl.first + j} twice"
                r.prompt_logprobs[pl.first + j] = (
                    lp, pl.ranks[j], pl.top_token_ids[j] if pl.top_token_ids else [],
                    pl.top_logprobs[j] if pl.top_logprobs else [])
        for i, (rid, tok) in enumerate(zip(result.request_ids, result.token_ids, strict=True)):
            r = self.reqs[rid]
            r.tokens.append(tok)
            r.outputs.append(tok)
            r.num_output_tokens += 1
            if result.logprobs is not None:
                r.logprobs.append(result.logprobs[i])
        return result

    def run_until(self, n_out: dict[str, int]) -> dict[str, list[int]]:
        """Step (full prefills, then decodes) until each request has n_out outputs; drop
        each as it gets there."""
        outs = {}
        while True:
            for rid in [rid for rid in self.reqs if rid in n_out]:
                if len(self.reqs[rid].outputs) >= n_out[rid]:
                    outs[rid] = self.drop(rid).outputs
            if not any(rid in n_out for rid in self.reqs):
                return outs
            self.step()

    def close(self) -> None:
        """Drop every request and hand the finished ids to the runner (a shared runner must
        end up empty)."""
        for rid in list(self.reqs):
            self.drop(rid)
        self.runner.step(StepPlan(step_id=self.step_id, worker_id=0,
                                  finished_request_ids=self.finished))
        self.finished = []


# --------------------------------------------------------------------------- the real scheduler


def greedy_on(runner, prompts: list[list[int]], sampling: SamplingParams,
              max_tokens: int = 12) -> dict[str, list[int]]:
    """The outputs of ``prompts`` (``p0``, ``p1``, ...) run together on ``runner`` until
    each has ``max_tokens``: what two runners are compared on, plan for plan."""
    d = Driver(runner)
    for i, p in enumerate(prompts):
        d.add(f"p{i}", p, sampling)
    outs = d.run_until({f"p{i}": max_tokens for i in range(len(prompts))})
    d.close()
    return outs


class _Plans(CoreObserver):
    """Every plan the core made, in order."""

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        if plan is not None:
            self.plans.append(plan)


@dataclass
class EngineRun:
    outputs: dict[str, list[int]]
    reasons: dict[str, str | None]
    scheduler: Scheduler
    plans: list[StepPlan]
    logprobs: dict[str, list[float]] = field(default_factory=dict)  # when sampling asks


def run_engine(runner, prompts: list[list[int]], sampling: SamplingParams = GREEDY, *,
               num_blocks: int | None = None, max_num_batched_tokens: int = 512,
               abort_after: dict[str, int] | None = None, tag: str = "r") -> EngineRun:
    """Our Scheduler driving one runner through the engine core (as ``engine.LLM`` does),
    on at most ``num_blocks`` of its KV blocks (all by default). ``abort_after``: abort a
    request once it has that many tokens. Requests are ``f"{tag}{i}"``; EOS is the runner's
    model's."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
                      block_size=runner.block_size, max_model_len=runner.max_model_len)
    plans = _Plans()
    core = EngineCore(sched, plans)
    core.add_worker(0, InProcess(runner.step),
                    runner.num_blocks if num_blocks is None else num_blocks, 0.0)
    eos = tuple(runner.info.eos_token_ids)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    logprobs: dict[str, list[float]] = {}
    for i, p in enumerate(prompts):
        rid = f"{tag}{i}"
        outputs[rid], reasons[rid] = [], None
        core.add(EngineRequest(request_id=rid, prompt_token_ids=tuple(p), sampling=sampling,
                               eos_token_ids=eos), 0.0)
        assert not core.take_outputs()
    now = 0.0
    while sched.num_unfinished:
        now += 1.0
        assert core.step(now), "the scheduler stalled"
        for o in core.take_outputs():
            outputs[o.request_id].extend(o.new_token_ids)
            if o.logprobs is not None:
                logprobs.setdefault(o.request_id, []).extend(o.logprobs)
            reasons[o.request_id] = o.finish_reason or reasons[o.request_id]
        for rid, n in (abort_after or {}).items():
            if rid in sched.requests and len(outputs[rid]) >= n:
                core.abort([rid], now)
                core.take_outputs()
                reasons[rid] = "abort"
    # hand the last finished ids to the worker: a shared runner must end up empty
    ws = sched.workers[0]
    runner.step(StepPlan(step_id=10**9, worker_id=0, finished_request_ids=ws.to_drop))
    ws.to_drop = []
    sched.check_integrity()
    return EngineRun(outputs, reasons, sched, plans.plans, logprobs)
