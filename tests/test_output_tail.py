"""The output tail (engine/output_tail.py), shared by the frontend and ``engine.LLM``: text
deltas with stop strings, the abort a stop string asks for, prompt logprobs on the first
delta, top-logprob pairs, and usage on the last."""

from __future__ import annotations

from engine.messages import PromptLogprobs, RequestOutput, SamplingParams
from engine.output_tail import OutputTail


class CharTokenizer:
    """Token id = code point (a slow-tokenizer stand-in: ``decode(ids, ...)``)."""

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(map(chr, ids))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def out(text: str, finish: str | None = None, **kw: object) -> RequestOutput:
    return RequestOutput(request_id="r", new_token_ids=ids(text), finish_reason=finish,
                         **kw)  # type: ignore[arg-type]


def test_a_stop_string_cuts_the_text_asks_for_an_abort_and_ends_the_tail() -> None:
    tail = OutputTail(CharTokenizer(), ids("Q: "), SamplingParams(stop=("END",)))
    first = tail.feed(out("ab", num_prompt_tokens=3, num_cached_tokens=2))
    assert first is not None and first.text == "ab" and first.finish_reason is None
    held = tail.feed(out("cE"))  # "E" may start the stop string: held back
    assert held is not None and held.text == "c" and held.token_ids == ids("cE")
    last = tail.feed(out("NDxy"))
    assert last is not None and last.finish_reason == "stop" and last.abort
    assert last.text == "" and tail.text == "abc"
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens,
                                       last.usage.cached_tokens) == (3, 8, 2)
    assert tail.feed(out("z", "length")) is None, "after its end a tail ignores outputs"


def test_the_pools_finish_releases_held_text_and_needs_no_abort() -> None:
    tail = OutputTail(CharTokenizer(), ids("p"), SamplingParams(stop=("END",)))
    assert tail.feed(out("xE")).text == "x"  # type: ignore[union-attr]
    last = tail.feed(out("N", "length"))
    assert last is not None and last.text == "EN" and last.finish_reason == "length"
    assert not last.abort and tail.text == "xEN"


def test_prompt_logprobs_come_whole_with_the_first_delta_and_tops_are_paired() -> None:
    tail = OutputTail(CharTokenizer(), ids("abc"), SamplingParams(prompt_logprobs=1))
    chunk = PromptLogprobs(request_id="r", first=1, token_logprobs=[-0.5, -1.5], ranks=[1, 2])
    assert tail.feed(RequestOutput(request_id="r", new_token_ids=[],
                                   prompt_logprobs=chunk)) is None, "nothing to tell yet"
    delta = tail.feed(out("d", logprobs=[-0.1], top_token_ids=[[100, 101]],
                          top_logprobs=[[-0.1, -2.0]]))
    assert delta is not None and delta.prompt_logprobs is not None
    assert [e and (e.token_id, e.logprob, e.rank) for e in delta.prompt_logprobs] == [
        None, (ord("b"), -0.5, 1), (ord("c"), -1.5, 2)]
    assert delta.top_logprobs == [[(100, -0.1), (101, -2.0)]]
    assert tail.feed(out("e", "length")).prompt_logprobs is None  # type: ignore[union-attr]
