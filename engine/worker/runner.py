"""The model-runner interface a worker drives.

A runner is stateful like vLLM's GPU model runner: it keeps, per request, the tokens it
knows and the block table the scheduler gave it, and applies each ``StepPlan``'s deltas:

1. drop ``plan.finished_request_ids`` (finished, aborted or preempted requests);
2. register ``plan.new_requests`` (token ids, sampling params, block ids, computed count);
3. extend the block tables of ``plan.cached_requests`` with their ``new_block_ids``;
4. run one forward pass over the ragged batch: for each scheduled request, the next
   ``num_scheduled_tokens`` of its known tokens, starting at its computed count, writing
   their KV into the slots its block table gives, attending to its whole context;
5. sample one token for every request whose known tokens are now all computed, append it
   to the request's known tokens, and return them in a ``StepResult``.

When its pool restarts, the worker forgets every request it holds (``drop``): the new pool
knows none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.messages import StepPlan, StepResult


class ModelRunner(ABC):
    #: KV capacity in blocks, reported to the scheduler in ``WorkerReady``.
    num_blocks: int
    block_size: int

    @abstractmethod
    def step(self, plan: StepPlan) -> StepResult:
        """Apply the plan's deltas, run the forward pass, sample; see the module doc."""

    def drop(self, request_ids: list[str]) -> None:
        """Forget these requests (their state, their grammar matchers; ids it does not hold
        are ignored); their KV blocks are simply overwritten later. The default runs a plan
        that only finishes them, the path every runner takes for aborted requests."""
        if request_ids:
            self.step(StepPlan(step_id=-1, worker_id=-1, finished_request_ids=list(request_ids)))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory; the runner is not used afterwards."""


class GroupError(RuntimeError):
    """A tensor-parallel step failed once its batch had gone to the group (a rank died, a
    collective broke): the ranks are out of step, so the group must restart as one. The
    worker process exits on it; the launcher restarts the group and the pool recomputes the
    worker's requests, as for any dead worker."""
