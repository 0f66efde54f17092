"""Checks a StepPlan against what a stateful worker holds, before any state changes.

Every runner applies the same rules (the scheduler owes each worker a consistent plan), so
the rules and their messages live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from engine.messages import StepPlan

#: For a request the worker holds: (computed tokens, known tokens, blocks in its table).
HeldState = tuple[int, int, int]


@dataclass(frozen=True)
class PlanLimits:
    num_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int


def fail(step_id: int, request_id: str, message: str) -> NoReturn:
    raise ValueError(f"step {step_id}: request {request_id!r}: {message}")


def check_plan(plan: StepPlan, held: Callable[[str], HeldState | None], limits: PlanLimits) -> int:
    """Raise ValueError on an inconsistent plan; return its number of scheduled tokens.

    ``held(request_id)`` describes a request the worker holds, or None.
    """
    finished = set(plan.finished_request_ids)
    seen: set[str] = set()
    step = plan.step_id
    total = 0
    for new in plan.new_requests:
        rid = new.request_id
        if rid in seen:
            fail(step, rid, "appears twice in the plan")
        seen.add(rid)
        if rid not in finished and held(rid) is not None:
            fail(step, rid, "is already running on this worker (new_requests must be new)")
        n_known = len(new.token_ids)
        if not 0 <= new.num_output_tokens <= n_known:
            fail(step, rid, f"num_output_tokens {new.num_output_tokens} not in [0, {n_known}]")
        _check_blocks(step, rid, new.block_ids, limits)
        _check_span(step, rid, new.num_computed_tokens, new.num_scheduled_tokens, n_known,
                    len(new.block_ids), limits)
        if any(not 0 <= t < limits.vocab_size for t in new.token_ids):
            fail(step, rid, f"token ids must be in [0, {limits.vocab_size})")
        total += new.num_scheduled_tokens
    for cached in plan.cached_requests:
        rid = cached.request_id
        if rid in seen:
            fail(step, rid, "appears twice in the plan")
        seen.add(rid)
        state = None if rid in finished else held(rid)
        if state is None:
            fail(step, rid, "unknown to this worker (send it as a new request first)")
        computed, known, num_blocks = state
        _check_blocks(step, rid, cached.new_block_ids, limits)
        _check_span(step, rid, computed, cached.num_scheduled_tokens, known,
                    num_blocks + len(cached.new_block_ids), limits)
        total += cached.num_scheduled_tokens
    return total


def _check_span(step: int, rid: str, computed: int, scheduled: int, known: int, num_blocks: int,
                limits: PlanLimits) -> None:
    if computed < 0 or scheduled < 0:
        fail(step, rid, f"negative token counts (computed {computed}, scheduled {scheduled})")
    end = computed + scheduled
    if end > known:
        fail(step, rid, f"schedules tokens up to {end} but only {known} are known "
                        f"({computed} computed + {scheduled} scheduled)")
    if end > limits.max_model_len:
        fail(step, rid, f"context of {end} tokens exceeds max_model_len {limits.max_model_len}")
    if end > num_blocks * limits.block_size:
        fail(step, rid, f"block table of {num_blocks} blocks holds "
                        f"{num_blocks * limits.block_size} tokens, too short for {end}")


def _check_blocks(step: int, rid: str, block_ids: list[int], limits: PlanLimits) -> None:
    if any(not 0 <= b < limits.num_blocks for b in block_ids):
        fail(step, rid, f"block ids must be in [0, {limits.num_blocks})")
