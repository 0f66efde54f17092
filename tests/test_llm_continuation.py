"""A continuation on the real scheduler and the native runner, in one process (the runner of
``engine.LLM``): a request cut after k tokens (its pool died) and resubmitted to a fresh
scheduler with those tokens as ``output_token_ids`` produces exactly the tokens the
uninterrupted request produces after them: greedy, seeded sampling (the n-th token's noise
is seeded from (seed, n)), penalties over the outputs, and a grammar whose state is rebuilt
by replaying the outputs."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from engine import LLM, SamplingParams, StructuredOutput
from engine.core import EngineCore, InProcess
from engine.messages import EngineRequest
from engine.scheduler.scheduler import Scheduler

PROMPT = "Return a list of"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "kind": {"enum": ["list", "dict"]}},
          "required": ["name", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(workers=1, max_num_batched_tokens=32, num_kv_blocks=16)


def _pool(llm: LLM) -> EngineCore:
    """A fresh scheduler over the runner: a restarted pool, its worker's KV empty to it."""
    core = EngineCore(Scheduler(llm.config.scheduler, block_size=llm.config.cache.block_size,
                                max_model_len=llm.info.max_model_len))
    core.add_worker(0, InProcess(llm.runners[0].step), llm.runners[0].num_blocks, time.time())
    return core


def _run(llm: LLM, core: EngineCore, req: EngineRequest, stop_after: int | None = None,
         ) -> tuple[list[int], str | None]:
    """Run ``req``; with ``stop_after``, the pool dies once that many tokens are out."""
    core.add(req, time.time())
    assert core.take_outputs() == []
    tokens: list[int] = []
    finish = None
    while core.num_unfinished:
        core.step(time.time())
        for o in core.take_outputs():
            tokens += o.new_token_ids
            finish = o.finish_reason or finish
        if stop_after is not None and len(tokens) >= stop_after:
            core.abort([req.request_id], time.time())  # the runner drops it next plan
            core.step(time.time())
            return tokens, None
    return tokens, finish


@pytest.mark.parametrize("kind", ["greedy", "seeded", "penalised", "structured"])
def test_a_continuation_yields_the_uninterrupted_tokens(llm: LLM, kind: str) -> None:
    sp = {
        "greedy": SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234,
                                 ignore_eos=True),
        "penalised": SamplingParams(max_tokens=20, temperature=0.0, presence_penalty=1.5,
                                    frequency_penalty=1.0, repetition_penalty=1.3,
                                    min_tokens=12),
        "structured": SamplingParams(max_tokens=40, temperature=1.0, seed=3,
                                     structured=StructuredOutput(kind="json",
                                                                 value=json.dumps(SCHEMA))),
    }[kind]
    ids = tuple(llm.tokenizer.encode(PROMPT))
    req = EngineRequest(request_id=f"{kind}", prompt_token_ids=ids, sampling=sp,
                        eos_token_ids=llm.info.eos_token_ids)
    whole, finish = _run(llm, _pool(llm), req)
    assert len(whole) > 8, whole
    for k in (1, 7):
        first, _ = _run(llm, _pool(llm), msgspec.structs.replace(req, request_id=f"{kind}-a{k}"),
                        stop_after=k)
        assert first == whole[:k]
        cont = msgspec.structs.replace(req, request_id=f"{kind}-a{k}+2",
                                       output_token_ids=tuple(first))
        rest, cont_finish = _run(llm, _pool(llm), cont)
        assert first + rest == whole, (k, first, rest)
        assert cont_finish == finish
    if kind == "structured":
        assert set(json.loads(llm.tokenizer.decode(whole, skip_special_tokens=True))) == {"name", "kind"}
