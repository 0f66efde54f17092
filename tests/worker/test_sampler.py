"""The batched sampler on crafted logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.messages import SamplingParams
from engine.worker.sampler import Sampler, seed_for_token


@dataclass
class Row:
    sampling: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


G = SamplingParams(temperature=0.0)


def test_greedy_is_argmax_and_no_logprobs() -> None:
    x = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(x.clone(), [Row(G)] * 5)
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs is None


def test_logprobs_aligned_and_raw() -> None:
    x = logits_of([0.0, 2.0, 1.0], [3.0, 0.0, 0.0])
    rows = [Row(SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=3.0), [1]),
            Row(G)]
    out = Sampler()(x.clone(), rows)
    # the penalty moves the choice to token 2; the logprob is the raw model's, of token 2
    assert out.token_ids == [2, 0]
    assert out.logprobs is not None
    assert abs(out.logprobs[0] - torch.log_softmax(x[0], -1)[2].item()) < 1e-6
    assert out.logprobs[1] == 0.0


def test_top_logprobs_per_row_k() -> None:
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    rows = [Row(SamplingParams(temperature=0.0, logprobs=4)), Row(G),
            Row(SamplingParams(temperature=0.0, logprobs=0))]
    out = Sampler()(x.clone(), rows)
    want = torch.log_softmax(x[0], -1).topk(4)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids[0] == want.indices.tolist()
    torch.testing.assert_close(torch.tensor(out.top_logprobs[0]), want.values)
    assert out.top_token_ids[1:] == [[], []] and out.top_logprobs[1:] == [[], []]
    only_k0 = Sampler()(x[2:].clone(), rows[2:])
    assert only_k0.logprobs is not None and only_k0.top_token_ids is None


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    x = logits_of([2.0, 1.5, -1.0, -1.2])
    s = Sampler()
    assert s(x.clone(), [Row(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0])]).token_ids == [1]
    y = logits_of([-1.0, -1.1, -3.0, -5.0])
    # -1.0 * 2 = -2.0 < -1.1: the seen token loses
    assert s(y.clone(), [Row(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0, 0])]).token_ids == [1]
    # a penalty < 1 rewards seen tokens
    assert s(y.clone(), [Row(SamplingParams(temperature=0.0, repetition_penalty=0.5), [1])]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    s = Sampler(eos_token_ids=[0])
    x = logits_of([9.0, 8.0, 7.0, 1.0])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,))
    assert s(x.clone(), [Row(p, num_output_tokens=1)]).token_ids == [2]
    assert s(x.clone(), [Row(p, num_output_tokens=2)]).token_ids == [0]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(1,), ignore_eos=True)
    assert s(x.clone(), [Row(ignore)]).token_ids == [0]


def test_top_k_1_is_greedy_and_top_k_top_p_bound_the_support() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 30, generator=g).repeat(2000, 1)
    s = Sampler(seed=3)
    out = s(x.clone(), [Row(SamplingParams(temperature=2.0, top_k=1))] * 2000)
    assert set(out.token_ids) == {int(x[0].argmax())}
    out = s(x.clone(), [Row(SamplingParams(temperature=1.0, top_k=3))] * 2000)
    assert set(out.token_ids) == set(x[0].topk(3).indices.tolist())
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(2000, 1)
    out = s(probs.clone(), [Row(SamplingParams(temperature=1.0, top_p=0.7))] * 2000)
    assert set(out.token_ids) == {0, 1}


def test_temperature_sampling_follows_the_distribution() -> None:
    n = 20000
    x = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).repeat(n, 1)
    out = Sampler(seed=7)(x.clone(), [Row(SamplingParams(temperature=0.7))] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
    want = torch.softmax(x[0] / 0.7, -1)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)


def test_seeded_rows_ignore_batch_composition() -> None:
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler()(x.clone(), [Row(p, num_output_tokens=n)]).token_ids[0] for n in range(12)]
    crowd = torch.randn(3, 64)
    batch = torch.cat([crowd[:2], x, crowd[2:]])
    others = [Row(SamplingParams(temperature=1.0)), Row(G), Row(SamplingParams(temperature=1.0, seed=1))]
    again = [Sampler(seed=9)(batch.clone(), [others[0], others[1], Row(p, num_output_tokens=n),
                                             others[2]]).token_ids[2] for n in range(12)]
    assert again == alone
    assert len(set(alone)) > 3  # the index n changes the draw


def test_unseeded_rows_use_the_worker_seed() -> None:
    x = torch.zeros(8, 100)
    rows = [Row(SamplingParams(temperature=1.0))] * 8
    assert Sampler(seed=5)(x.clone(), rows).token_ids == Sampler(seed=5)(x.clone(), rows).token_ids
    assert Sampler(seed=5)(x.clone(), rows).token_ids != Sampler(seed=6)(x.clone(), rows).token_ids


def test_seed_for_token_is_well_spread() -> None:
    seeds = {seed_for_token(s, n) for s in range(-3, 30) for n in range(50)}
    assert len(seeds) == 33 * 50
    assert all(0 <= v < 1 << 64 for v in seeds)


def _allowed(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Naive support of top-k then top-p, ties at the cut kept."""
    x = row / temperature
    if top_k:
        x = torch.where(x < x.topk(min(top_k, len(x))).values[-1], float("-inf"), x)
    probs = x.softmax(-1)
    order = sorted(range(len(x)), key=lambda i: -probs[i].item())
    keep, mass = set(), 0.0
    for i in order:
        if probs[i] == 0:
            break
        keep.add(i)
        mass += probs[i].item()
        if mass >= top_p - 1e-6:
            # keep everything tied with the last kept token
            keep |= {j for j in order if probs[j] == probs[i]}
            break
    return keep


@settings(max_examples=40, deadline=None)
@given(
    vals=st.lists(st.integers(-8, 8), min_size=2, max_size=12),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.integers(0, 6),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.2]),
    seed=st.integers(0, 2**40),
)
def test_samples_stay_in_the_filtered_support(vals, temperature, top_k, top_p, seed) -> None:
    row = torch.tensor(vals, dtype=torch.float32) / 2
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    rows = [Row(p, num_output_tokens=n) for n in range(16)]
    out = Sampler()(row.repeat(16, 1), rows)
    # (a hair of slack on top_p: float rounding right at the cut may keep one more token)
    assert set(out.token_ids) <= _allowed(row, temperature, top_k, min(1.0, top_p + 1e-4))


# --------------------------------------------------------------------------- OpenAI's processors


def _reference(x: torch.Tensor, p: SamplingParams, token_ids: list[int], n_out: int,
               eos: tuple[int, ...] = ()) -> torch.Tensor:
    """The processors written out token by token, in vLLM's order, for one row."""
    x = x.clone()
    if p.allowed_token_ids:
        keep = torch.full_like(x, float("-inf"))
        for t in p.allowed_token_ids:
            keep[t] = 0.0
        x = x + keep
    for t, b in p.logit_bias:
        x[t] += b
    if n_out < p.min_tokens:
        for t in [*p.stop_token_ids, *([] if p.ignore_eos else eos)]:
            x[t] = float("-inf")
    for t in set(token_ids):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    outputs = token_ids[len(token_ids) - n_out:] if n_out else []
    for t in set(outputs):
        x[t] -= p.frequency_penalty * outputs.count(t)
        x[t] -= p.presence_penalty
    return x


def test_frequency_and_presence_count_output_tokens_only() -> None:
    """``logit -= frequency * count + presence * (count > 0)`` over the outputs: the prompt
    (the first tokens of ``token_ids``) is not penalised."""
    x = logits_of([5.0, 4.9, 4.8, 0.0, 0.0])
    prompt, outputs = [1, 1, 1], [0, 0, 2]
    rows = [Row(SamplingParams(temperature=0.0, frequency_penalty=0.2), prompt + outputs, 3)]
    out = Sampler()(x.clone(), rows)
    assert out.token_ids == [1]  # 5.0 - 0.4 = 4.6 < 4.9; token 1 only in the prompt
    rows = [Row(SamplingParams(temperature=0.0, presence_penalty=0.15), prompt + outputs, 3)]
    assert Sampler()(x.clone(), rows).token_ids == [1]  # 4.85 < 4.9, 4.65
    rows = [Row(SamplingParams(temperature=0.0, presence_penalty=-1.0), prompt + outputs, 3)]
    assert Sampler()(x.clone(), rows).token_ids == [0]  # negative: rewards seen outputs
    rows = [Row(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt + outputs, 0)]
    assert Sampler()(x.clone(), rows).token_ids == [0]  # nothing output yet


def test_logit_bias_and_allowed_token_ids() -> None:
    x = logits_of([3.0, 2.0, 1.0, 0.0])
    s = Sampler()
    assert s(x.clone(), [Row(SamplingParams(temperature=0.0, logit_bias=((3, 3.5),)))]).token_ids == [3]
    assert s(x.clone(), [Row(SamplingParams(temperature=0.0, logit_bias=((0, -100.0),)))]).token_ids == [1]
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=(1, 3), seed=3)
    out = s(x.repeat(500, 1), [Row(allowed, num_output_tokens=n) for n in range(500)])
    assert set(out.token_ids) == {1, 3}
    # the bias applies inside the allowed set
    both = SamplingParams(temperature=0.0, allowed_token_ids=(1, 3), logit_bias=((3, 2.5),))
    assert s(x.clone(), [Row(both)]).token_ids == [3]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_processors_match_a_token_by_token_reference(data) -> None:
    """A batch mixing rows with every processor (and rows with none) gives each row the
    reference's processed logits; the logprobs stay the raw model's."""
    vocab = 12
    n = data.draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(n, vocab, generator=g) * 3
    tok = st.integers(0, vocab - 1)
    pen = st.sampled_from([0.0, 0.5, -0.7, 2.0])
    rows = []
    for _ in range(n):
        ids = data.draw(st.lists(tok, max_size=10))
        bias = data.draw(st.dictionaries(tok, st.floats(-100, 100), max_size=3))
        p = SamplingParams(
            temperature=0.0, logprobs=0, min_tokens=data.draw(st.integers(0, 3)),
            stop_token_ids=(5,), frequency_penalty=data.draw(pen),
            presence_penalty=data.draw(pen),
            repetition_penalty=data.draw(st.sampled_from([1.0, 1.3, 0.8])),
            logit_bias=tuple(bias.items()),
            allowed_token_ids=tuple(data.draw(st.sets(tok, max_size=4))))
        rows.append(Row(p, ids, data.draw(st.integers(0, len(ids)))))
    processed = x.clone()
    out = Sampler(eos_token_ids=[0])(processed, rows)
    for i, r in enumerate(rows):
        want = _reference(x[i], r.sampling, r.token_ids, r.num_output_tokens, eos=(0,))
        torch.testing.assert_close(processed[i], want, rtol=1e-6, atol=1e-5)
        if want.isfinite().any():
            assert want[out.token_ids[i]] == want.max()
        assert out.logprobs is not None
        assert abs(out.logprobs[i] - torch.log_softmax(x[i], -1)[out.token_ids[i]].item()) < 1e-5


def test_penalised_rows_are_reproducible_with_a_seed() -> None:
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(temperature=1.0, seed=7, frequency_penalty=0.8, presence_penalty=0.4,
                       logit_bias=((3, 2.0),))
    history = [3, 3, 9, 10]
    a = [Sampler(seed=1)(x.clone(), [Row(p, history, 2)]).token_ids[0] for _ in range(3)]
    crowd = torch.cat([torch.randn(2, 64), x])
    b = Sampler(seed=2)(crowd, [Row(G), Row(SamplingParams(temperature=1.0)), Row(p, history, 2)])
    assert a == [b.token_ids[2]] * 3
