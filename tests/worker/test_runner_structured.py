"""Structured outputs, the runner contract: on the native runner and on the vllm runner
(vLLM's ``sample_tokens(GrammarOutput)``), the shared runners of conftest.py.

The default model is weak and knows no JSON: every valid output here is the grammar's doing.
Schemas are bounded (enum, maxLength) so that the model closes the object well within
``max_tokens``; EOS ends the request (finish reason "stop"), as the grammar allows only EOS
once it is complete.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine.messages import SamplingParams, StructuredOutput

from .harness import Driver, held_state, run_engine

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["list", "dict", "set"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "kind", "ok"],
    "additionalProperties": False,
}
JSON = StructuredOutput(kind="json", value=json.dumps(SCHEMA))
REGEX = r"[a-z]{2,8}\(\d{1,3}\)"
CHOICES = ["yes", "no", "maybe"]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in CHOICES, text


SPECS = {"json": JSON, "regex": StructuredOutput(kind="regex", value=REGEX),
         "choice": StructuredOutput(kind="choice", value=json.dumps(CHOICES))}


@pytest.mark.parametrize("kind", list(SPECS))
def test_constrained_output_parses_greedy_and_sampled(runner, tokenizer, prompts,
                                                      kind) -> None:
    """Greedy and temperature-1 seeded outputs follow the spec and end with "stop"; the
    seeded ones are reproducible; a request without a grammar in the same batch is
    unconstrained (it keeps its greedy tokens)."""
    spec = SPECS[kind]
    free = run_engine(runner, prompts[:1], SamplingParams(temperature=0.0, max_tokens=8,
                                                          ignore_eos=True), tag="f")
    for sampling in (SamplingParams(temperature=0.0, max_tokens=80, structured=spec),
                     SamplingParams(temperature=1.0, seed=7, max_tokens=80, structured=spec)):
        run = run_engine(runner, prompts[:4], sampling)
        for rid, ids in run.outputs.items():
            assert run.reasons[rid] == "stop", (rid, _text(tokenizer, ids))
            _check(kind, _text(tokenizer, ids))
        if sampling.seed is not None:
            again = run_engine(runner, prompts[:4], sampling)
            assert again.outputs == run.outputs
    # mixed batch: the unconstrained row is untouched by its neighbours' masks
    d = Driver(runner, seed=1)
    d.add("free", prompts[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    d.add("json", prompts[1], SamplingParams(temperature=0.0, max_tokens=8, structured=spec))
    got = d.run_until({"free": 8, "json": 1})
    d.close()
    assert got["free"] == free.outputs["f0"]


def test_grammar_end_stops_under_ignore_eos(runner, tokenizer, prompts) -> None:
    """ignore_eos does not run past a finished grammar: the runner reports it ended."""
    sampling = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True,
                              structured=SPECS["choice"])
    run = run_engine(runner, prompts[:2], sampling)
    for rid, ids in run.outputs.items():
        assert run.reasons[rid] == "stop"
        _check("choice", _text(tokenizer, ids))


def test_preempted_mid_object_resumes_to_the_same_valid_json(runner, tokenizer,
                                                             prompts) -> None:
    """A request dropped in the middle of its JSON object and sent again as new with its
    outputs (recompute) rebuilds its matcher by replaying them: it ends with exactly the
    tokens it would have produced uninterrupted, valid JSON."""
    sampling = SamplingParams(temperature=0.0, max_tokens=80, structured=JSON)
    ref = run_engine(runner, prompts[2:3], sampling).outputs["r0"]
    assert len(ref) > 8

    d = Driver(runner, seed=2)
    d.add("a", prompts[2], sampling)
    d.add("b", prompts[3], SamplingParams(temperature=0.0, max_tokens=80, structured=JSON))
    for _ in range(6):
        d.step()
    a = d.drop("a")
    text = _text(tokenizer, a.outputs)
    assert text.startswith("{") and not text.endswith("}"), text  # in the middle
    d.step()
    assert "a" not in runner.grammars.matchers
    d.add("a", a.tokens, sampling, num_output_tokens=len(a.outputs))
    outputs = list(a.outputs)
    while True:
        result = d.step()
        if "a" in result.request_ids:
            outputs.append(result.token_ids[result.request_ids.index("a")])
        if "b" in result.grammar_ended_ids:
            d.drop("b")
        if "a" in result.grammar_ended_ids:
            break
        assert len(outputs) < 80
    d.close()
    assert outputs == ref  # ending with EOS
    jsonschema.validate(json.loads(_text(tokenizer, outputs)), SCHEMA)


def test_abort_frees_matcher_and_kv(runner, prompts) -> None:
    """An aborted constrained request leaves no matcher and no state on the runner."""
    d = Driver(runner, seed=3)
    d.add("x", prompts[4], SamplingParams(temperature=0.0, max_tokens=80, structured=JSON))
    d.add("y", prompts[5], SamplingParams(temperature=1.0, seed=3, max_tokens=80,
                                          structured=SPECS["regex"]))
    for _ in range(3):
        d.step()
    assert set(runner.grammars.matchers) == {"x", "y"}
    d.drop("x")
    d.step()
    assert set(runner.grammars.matchers) == {"y"}
    assert held_state(runner, "x") is None
    d.close()
    assert not runner.grammars.matchers
    assert held_state(runner, "y") is None
