"""OpenAI's logits processors on every model runner (native and vllm, the shared ones of
conftest.py): presence and frequency penalties, ``logit_bias`` and ``allowed_token_ids`` equal
a teacher-forced reference computed by hand from transformers' logits, agree across runners,
and seeded sampling with them is reproducible across batches and preemption."""

from __future__ import annotations

import pytest
import torch

from engine.messages import SamplingParams

from .harness import Driver, greedy_on

pytestmark = pytest.mark.slow


def _by_hand(logits: torch.Tensor, sp: SamplingParams, prompt: list[int],
             outputs: list[int]) -> torch.Tensor:
    """One position's logits processed as vLLM documents it, token by token: allowed ids,
    logit_bias, repetition penalty over prompt + outputs, then OpenAI's
    ``logit -= frequency * count + presence * (count > 0)`` over the outputs."""
    x = logits.clone()
    if sp.allowed_token_ids:
        keep = torch.full_like(x, float("-inf"))
        keep[list(sp.allowed_token_ids)] = 0.0
        x += keep
    for t, b in sp.logit_bias:
        x[t] += b
    if sp.repetition_penalty != 1.0:
        for t in set(prompt + outputs):
            x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
    for t in set(outputs):
        x[t] -= sp.frequency_penalty * outputs.count(t) + sp.presence_penalty
    return x


PENALISED = [
    SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=1.2),
    SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.5, logit_bias=((13, 4.0),)),
    SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=0.6, presence_penalty=0.6,
                   repetition_penalty=1.2),
    SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=-0.5, logit_bias=((262, -100.0),)),
]


@pytest.mark.parametrize("sp", PENALISED, ids=["frequency", "presence+bias", "all", "negative"])
def test_penalised_greedy_equals_teacher_forced_reference(runner, hf_model, hf_greedy, prompts,
                                                          sp) -> None:
    """Greedy tokens with penalties and logit_bias are transformers' argmax of the logits
    processed by hand at every position (teacher-forced on the runner's own tokens), also
    after a preemption: the request is dropped after 5 tokens and comes back carrying them,
    and its penalties keep counting them (on the vllm runner they are then prompt tokens)."""
    prompt = prompts[5]
    d = Driver(runner, seed=8)
    d.add("p", prompt, sp)
    d.add("q", prompts[6], sp)
    for _ in range(5):
        d.step()
    first = d.preempt("p", sp)
    got = d.run_until({"p": 7, "q": 12})
    d.close()
    outputs = first.outputs + got["p"]
    assert len(outputs) == 12
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + outputs])).logits[0].float()
    for t, tok in enumerate(outputs):
        x = _by_hand(logits[len(prompt) - 1 + t], sp, prompt, outputs[:t])
        assert tok == int(x.argmax()), f"position {t}: {tok} vs {int(x.argmax())}"
    assert outputs != hf_greedy(prompt, 12)  # the processors changed the answer


def test_allowed_token_ids_and_logit_bias_bound_the_output(runner, hf_model, prompts) -> None:
    """Only allowed ids come out, sampled or greedy; greedy is the argmax over them (with the
    bias applied inside the set)."""
    allowed = (262, 284, 286, 290, 318)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, allowed_token_ids=allowed,
                            logit_bias=((318, 1.5),))
    sampled = SamplingParams(temperature=1.5, max_tokens=6, allowed_token_ids=allowed, seed=2)
    d = Driver(runner)
    d.add("g", prompts[0], greedy)
    d.add("s", prompts[1], sampled)
    got = d.run_until({"g": 6, "s": 6})
    d.close()
    assert set(got["g"]) | set(got["s"]) <= set(allowed)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompts[0] + got["g"]])).logits[0].float()
    for t, tok in enumerate(got["g"]):
        x = _by_hand(logits[len(prompts[0]) - 1 + t], greedy, prompts[0], got["g"][:t])
        assert tok == int(x.argmax())


def test_penalised_greedy_agrees_across_runners(vllm_runner, native_runner, prompts) -> None:
    """Plan for plan, the same tokens from both runners for every processor combination."""
    for sp in [*PENALISED, SamplingParams(temperature=0.0, max_tokens=12,
                                          allowed_token_ids=tuple(range(200, 400)))]:
        outs = [greedy_on(r, prompts[:4], sp) for r in (vllm_runner, native_runner)]
        assert outs[0] == outs[1], sp


PENALISED_SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, seed=77, max_tokens=10,
                                   frequency_penalty=0.8, presence_penalty=0.3,
                                   logit_bias=((13, 2.0),))


def test_seeded_penalised_sampling_is_reproducible_across_preemption(runner, prompts) -> None:
    """A seeded request with penalties and logit_bias samples the same tokens alone and in a
    crowd, preempted after 4 tokens and resumed carrying them."""
    alone = Driver(runner, seed=4)
    alone.add("x", prompts[2], PENALISED_SAMPLED)
    ref = alone.run_until({"x": 10})["x"]
    alone.close()

    crowd = Driver(runner, seed=5)
    crowd.add("u", prompts[3], SamplingParams(temperature=1.0, frequency_penalty=0.5))
    crowd.add("x", prompts[2], PENALISED_SAMPLED)
    for _ in range(4):
        crowd.step()
    x = crowd.preempt("x", PENALISED_SAMPLED)
    got = crowd.run_until({"x": 6, "u": 1})
    crowd.close()
    assert x.outputs + got["x"] == ref
