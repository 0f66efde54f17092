"""The penalties of a resumed request under the vllm runner: a vLLM logits processor.

Our scheduler preempts by dropping a request and later sending it again as new, its outputs
appended to its tokens (``engine/worker/vllm/plan.py``). vLLM then holds those outputs as
*prompt* tokens, and its own frequency and presence penalties, which count output tokens
only, would forget them: the resumed request would repeat what it was told not to. (The
repetition penalty covers prompt and output alike, so it alone is unaffected.)

So a resumed request that has a frequency or presence penalty reaches vLLM with all three of
vLLM's penalties off and ``extra_args[RESUMED_PENALTIES] = [num_prior_outputs, repetition,
frequency, presence]``, and this processor applies them, with the native sampler's own
``apply_penalties``, over ``prompt[-num_prior_outputs:] + outputs`` (output history) and
``prompt + outputs`` (repetition history). vLLM applies custom processors after its
allowed-ids mask, min_tokens and logit_bias and before its own penalties (off here), so the
order is the native sampler's. Requests that were never preempted keep vLLM's own penalties.

The processor is registered with the engine config (``logits_processors``) and costs nothing
for requests without the marker (vLLM skips them); for one with it, one vectorised
``apply_penalties`` call on its row per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from engine.messages import SamplingParams
from engine.worker.sampler import apply_penalties
from engine.worker.vllm.plan import RESUMED_PENALTIES

__all__ = ["RESUMED_PENALTIES", "ResumedPenalties"]


@dataclass(slots=True)
class _Row:
    """A sampler row (``engine.worker.sampler.SamplingRow``) over vLLM's token lists."""

    sampling: SamplingParams
    token_ids: list[int]
    num_output_tokens: int


class ResumedPenalties(AdapterLogitsProcessor):
    """Repetition, frequency and presence penalties over a history that includes the
    outputs a resumed request carries in its prompt."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(
        self, params: Any
    ) -> Callable[[list[int], list[int], torch.Tensor], torch.Tensor] | None:
        spec = (params.extra_args or {}).get(RESUMED_PENALTIES)
        if spec is None:
            return None
        num_prior, repetition, frequency, presence = spec
        sampling = SamplingParams(repetition_penalty=float(repetition),
                                  frequency_penalty=float(frequency),
                                  presence_penalty=float(presence))

        def apply(prompt_ids: list[int], output_ids: list[int],
                  logits: torch.Tensor) -> torch.Tensor:
            row = _Row(sampling, list(prompt_ids) + list(output_ids),
                       int(num_prior) + len(output_ids))
            apply_penalties(logits[None], [row], [0])  # in place, through the view
            return logits

        return apply
