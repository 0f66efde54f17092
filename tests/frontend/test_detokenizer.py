"""Incremental detokenization and stop strings, against a byte-level BPE tokenizer trained
here on a few sentences (accents, CJK, emoji), so multi-byte characters split across tokens."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "Hello world, this is a test of the engine.",
    "Les élèves étudient à l'école près du château.",
    "日本語のテキストです。中文也可以。",
    "Emoji 🎉🚀 party and ünïcödé façade.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


def run(tok: Tokenizer, prompt: list[int], out: list[int], rng: random.Random,
        stop: tuple[str, ...] = ()) -> tuple[str, list[str], bool, IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, prompt, stop)
    deltas: list[str] = []
    stopped = False
    i = 0
    while i < len(out) and not stopped:
        n = rng.randint(1, 3)
        delta, stopped = d.append(out[i:i + n])
        deltas.append(delta)
        i += n
    if not stopped:
        deltas.append(d.finish())
    return "".join(deltas), deltas, stopped, d


def reference(tok: Tokenizer, prompt: list[int], out: list[int]) -> str:
    return tok.decode(prompt + out)[len(tok.decode(prompt)):]


def test_multibyte_characters_span_tokens(tok: Tokenizer) -> None:
    # Rare characters are encoded byte by byte: several tokens per character.
    ids = tok.encode("🎉 中").ids
    assert len(ids) > 3
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)


def test_random_sequences_match_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    vocab = tok.get_vocab_size()
    for trial in range(1500):
        if trial % 3 == 0:
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        else:
            prompt = tok.encode(rng.choice(CORPUS)).ids
        if trial % 2:
            out = tok.encode(rng.choice(CORPUS)).ids  # real text: every character complete
        else:
            out = [rng.randrange(vocab) for _ in range(rng.randrange(0, 24))]
        text, deltas, _, d = run(tok, prompt, out, rng)
        assert text == reference(tok, prompt, out) == d.text
        assert d.output_token_ids == out
        if trial % 2:
            assert not any(x.endswith("\ufffd") for x in deltas)


def test_partial_character_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("a🎉").ids
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.append([t])[0] for t in ids]
    assert "".join(deltas) == "a🎉"
    assert all("\ufffd" not in x for x in deltas)
    assert deltas[-1].endswith("🎉") and deltas[-2] == ""


def test_special_tokens_skipped(tok: Tokenizer) -> None:
    eos = tok.token_to_id("</s>")
    d = IncrementalDetokenizer(tok, tok.encode("Hello").ids)
    text = d.append([*tok.encode(" world").ids, eos])[0] + d.finish()
    assert text == " world"
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert d.append([eos])[0] + d.finish() == "</s>"


@pytest.mark.parametrize("stop", ["fox jumps", "ü", "🚀", "x", "lazy dog."])
def test_stop_string_across_tokens(tok: Tokenizer, stop: str) -> None:
    rng = random.Random(7)
    sentence = "The quick brown fox jumps over the lazy dog. Emoji 🎉🚀 ünïcödé"
    out = tok.encode(sentence).ids
    for _ in range(20):
        text, _, stopped, d = run(tok, [], out, rng, stop=(stop, "never-there"))
        assert stopped and d.stopped and d.stop_reason == stop
        assert text == sentence[: sentence.index(stop)] == d.text
        assert d.append(out[:2]) == ("", True) and d.finish() == ""


def test_held_back_text_released_at_end(tok: Tokenizer) -> None:
    out = tok.encode("over the la").ids
    d = IncrementalDetokenizer(tok, [], stop=["lazy dog"])
    streamed = "".join(d.append([t])[0] for t in out)
    assert streamed == "over the "  # "la" could start the stop string
    assert d.finish() == "la"
    assert d.text == "over the la" and not d.stopped


def test_earliest_stop_wins_and_partial_prefixes() -> None:
    m = StopStringMatcher(["abcd", "c", ""])
    assert m.feed("xab") == ("x", False)  # "ab" may begin "abcd"
    assert m.feed("c") == ("ab", True)  # "c" matched first
    assert m.matched == "c"
    m = StopStringMatcher(["aab"])
    assert m.feed("aaa") == ("a", False)
    assert m.feed("b") == ("", True)  # "aaab": the text before "aab" is "a", already out
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)
