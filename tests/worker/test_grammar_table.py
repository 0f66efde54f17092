"""The worker's grammar table on the default model's tokenizer: no cost for unconstrained
batches, one compilation per spec, a cache bounded in bytes, replay on resume."""

from __future__ import annotations

import json

import torch

from engine.config import ModelConfig
from engine.messages import StructuredOutput
from engine.models.info import load_model_info
from engine.worker.structured import GrammarTable, apply_bitmask

INFO = load_model_info(ModelConfig())
CHOICE = StructuredOutput(kind="choice", value=json.dumps(["yes", "no"]))


def _table(**kw) -> GrammarTable:
    return GrammarTable(INFO.path, INFO.vocab_size, INFO.eos_token_ids, **kw)


def _allowed(table: GrammarTable, rids: list[str]) -> list[list[int]]:
    mask = table.bitmask(rids)
    assert mask is not None
    logits = torch.zeros(len(rids), INFO.vocab_size)
    apply_bitmask(logits, mask)
    return [torch.isfinite(row).nonzero()[:, 0].tolist() for row in logits]


def test_unconstrained_rows_cost_nothing_and_stay_open() -> None:
    t = _table()
    assert t.bitmask(["a", "b"]) is None  # nothing held: no allocation
    t.add("c", CHOICE)
    assert t.bitmask(["a", "b"]) is None  # none of these rows is constrained
    free, constrained = _allowed(t, ["a", "c"])
    assert len(free) == INFO.vocab_size and 0 < len(constrained) < 10
    t.close()


def test_one_compilation_per_spec_and_a_byte_bound() -> None:
    t = _table()
    t.add("a", CHOICE)
    t.add("b", StructuredOutput(kind="choice", value=json.dumps(["yes", "no"])))
    assert t.matchers["a"].compiled is t.matchers["b"].compiled
    t.matchers["a"].compiled.result()
    one = t.cache_size_bytes
    assert one > 0
    small = _table(cache_bytes=one)  # room for one compiled grammar
    specs = [StructuredOutput(kind="regex", value=f"x{i}[0-9]+") for i in range(4)]
    for i, spec in enumerate(specs):
        small.add(f"r{i}", spec)
        small.matchers[f"r{i}"].compiled.result()
    # evicted in the compile thread after each compilation: at most the last one over
    assert len(small._cache) <= 2
    assert small.bitmask([f"r{i}" for i in range(4)]) is not None  # held ones still work
    t.close()
    small.close()


def test_resumed_request_replays_its_outputs() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(INFO.path))
    t = _table()
    t.add("fresh", CHOICE)
    (first,) = _allowed(t, ["fresh"])
    y = tok.encode("y")
    assert y[0] in first
    t.add("resumed", CHOICE, outputs=y)
    (after_y,) = _allowed(t, ["resumed"])
    assert y[0] not in after_y and after_y  # continues "yes", not from the start
    assert t.accept(["fresh"], [tok.encode("no")[0]]) == []
    t.drop("fresh")
    t.drop("resumed")
    assert not t.matchers
    t.close()
