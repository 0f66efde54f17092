"""Cost of structured outputs in a decode step: batch 64 on the default model (native
runner), every row constrained by a JSON schema against no row constrained.

    python -m pytest bench/micro/test_structured_step.py --benchmark-enable

Target (issue 13): the constrained step costs at most 10% more. Results: docs/benchmarks.md.
The schema asks for a long array of objects, so no row's grammar ends during the rounds and
every row is masked in every step (strings, numbers, keys: JSON's usual states).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import pytest

from engine.config import CacheConfig, ModelConfig, WorkerConfig
from engine.messages import (
    CachedRequestData,
    NewRequestData,
    SamplingParams,
    StepPlan,
    StructuredOutput,
)

BATCH = 64
BLOCK = 16
BLOCKS_PER_REQUEST = 8  # 128 tokens: the prompt and every round's token
PROMPT = [5, 17, 230, 41, 9, 300, 12, 77]
ROUNDS = 60
SCHEMA = {"type": "array", "minItems": 500, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "n", "tags"]}}
SPECS = {"none": None, "json": StructuredOutput(kind="json", value=json.dumps(SCHEMA))}


@pytest.fixture(scope="module")
def runner():
    from engine.worker.native_runner import NativeRunner

    r = NativeRunner(ModelConfig(), CacheConfig(block_size=BLOCK,
                                                num_blocks=2 * BATCH * BLOCKS_PER_REQUEST),
                     WorkerConfig())
    yield r
    r.close()


class _Batch:
    """``BATCH`` decoding requests held by the runner, all constrained or none."""

    step_ids = itertools.count()

    def __init__(self, runner, constrained: str, first_block: int = 0) -> None:
        self.runner = runner
        sampling = SamplingParams(temperature=0.0, max_tokens=1000,
                                  structured=SPECS[constrained])
        self.ids = [f"{constrained}-{i}" for i in range(BATCH)]
        runner.step(StepPlan(step_id=next(self.step_ids), worker_id=0, new_requests=[
            NewRequestData(request_id=rid, token_ids=list(PROMPT), sampling=sampling,
                           block_ids=list(range(first_block + i * BLOCKS_PER_REQUEST,
                                                first_block + (i + 1) * BLOCKS_PER_REQUEST)),
                           num_computed_tokens=0, num_scheduled_tokens=len(PROMPT))
            for i, rid in enumerate(self.ids)]))
        self.decode = [CachedRequestData(request_id=rid, num_scheduled_tokens=1)
                       for rid in self.ids]

    def step(self) -> None:
        result = self.runner.step(StepPlan(step_id=next(self.step_ids), worker_id=0,
                                           cached_requests=self.decode))
        assert not result.grammar_ended_ids and len(result.token_ids) == BATCH

    def close(self) -> None:
        self.runner.step(StepPlan(step_id=next(self.step_ids), worker_id=0,
                                  finished_request_ids=self.ids))


@pytest.mark.parametrize("constrained", list(SPECS))
def test_decode_step_batch_64(benchmark, runner, constrained):
    batch = _Batch(runner, constrained)
    benchmark.pedantic(batch.step, rounds=ROUNDS, warmup_rounds=3)
    benchmark.extra_info["constrained_rows"] = BATCH if constrained != "none" else 0
    batch.close()
    assert not runner.requests and not runner.grammars.matchers


def test_constrained_over_unconstrained_ratio(benchmark, runner):
    """Both batches held at once and stepped in alternation, so that load on the machine
    hits both alike: the ratio of their median step times (in ``extra_info``)."""
    free = _Batch(runner, "none")
    json_batch = _Batch(runner, "json", first_block=BATCH * BLOCKS_PER_REQUEST)
    times: dict[str, list[float]] = {"none": [], "json": []}

    def pair():
        for name, b in (("none", free), ("json", json_batch)):
            start = time.perf_counter()
            b.step()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=ROUNDS // 2, warmup_rounds=2)
    free.close()
    json_batch.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["json"] / medians["none"]
    benchmark.extra_info.update({f"median_{k}_ms": round(v * 1e3, 3) for k, v in medians.items()})
    benchmark.extra_info["ratio"] = round(ratio, 3)
    print(f"\ndecode step, batch {BATCH}: median none {medians['none'] * 1e3:.2f} ms, "
          f"json {medians['json'] * 1e3:.2f} ms, ratio {ratio:.3f}")
    assert not runner.requests and not runner.grammars.matchers
