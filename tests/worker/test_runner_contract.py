"""What every model runner must do, the same way: each test runs on the native runner and on
the vllm runner (vLLM's own worker driven by our plans), the shared ones of conftest.py
(the default model, 32-token blocks).

Greedy tokens are compared with references both runners must equal (``vllm.LLM.generate``,
transformers' ``generate``), or with each other where no reference applies: prefix-cache
hits, chunked prefill, preemption with resume, abort, zero-token steps, finished ids,
sampling parameters, stop tokens and min_tokens, logprobs, seeds, invalid plans. Plans come
from the real scheduler (``run_engine``) or, for shapes a test needs exactly (chunks ending
mid-block, shared prefix blocks, zero-token entries), are built by hand (``Driver``).
"""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from engine.models.info import load_model_info

from .harness import (
    BLOCK,
    GREEDY,
    NUM_BLOCKS,
    Driver,
    greedy_on,
    held_request_ids,
    held_state,
    run_engine,
)

pytestmark = pytest.mark.slow

EOS = load_model_info(ModelConfig()).eos_token_ids
LONGER = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # long ones grow a block




# --------------------------------------------------------------------------- the real scheduler


def test_greedy_equals_vllm_llm_generate(vllm_llm_process, vllm_runner, native_runner, runner,
                                         prompts, long_prompts, vllm_llm_outputs) -> None:
    """The engine loop (our Scheduler driving the runner) gives vllm.LLM.generate's greedy
    tokens, with EOS ignored (every token compared) and with EOS stopping (finish reason
    "stop"). Both runners are asked for before the reference's outputs: they are built
    while it runs."""
    all_prompts = prompts + long_prompts
    for name, sampling in (("ignore_eos", GREEDY),
                           ("eos", SamplingParams(temperature=0.0, max_tokens=GREEDY.max_tokens))):
        want = vllm_llm_outputs[name]
        got = run_engine(runner, all_prompts, sampling)
        for i, prompt in enumerate(all_prompts):
            rid = f"r{i}"
            assert got.outputs[rid] == want[i], (name, i, prompt)
            stopped = name == "eos" and want[i][-1] in EOS
            assert got.reasons[rid] == ("stop" if stopped else "length"), (name, i)
    assert any(EOS[0] in o for o in vllm_llm_outputs["eos"]), "no prompt stopped at EOS"


def test_engine_under_pressure_prefix_hits_chunks_preemption_abort(runner, long_prompts,
                                                                   prompts) -> None:
    """Few KV blocks and a small token budget: prefills are chunked, the shared prefix is
    reused from the prefix cache, decodes run out of blocks and preempt (the victims come
    back as new requests with their outputs), one request is aborted; every other output is
    what the same prompts give with room to spare."""
    batch = long_prompts + prompts[:4]
    ample = run_engine(runner, batch, LONGER, tag="a")
    tight = run_engine(runner, batch, LONGER, num_blocks=7, max_num_batched_tokens=32,
                       abort_after={"t5": 3}, tag="t")
    stats = tight.scheduler.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens >= 2 * BLOCK
    assert any(n.num_computed_tokens > 0 for p in tight.plans for n in p.new_requests)
    assert any(n.num_computed_tokens + n.num_scheduled_tokens < len(n.token_ids)
               for p in tight.plans for n in p.new_requests), "no chunked prefill"
    resumed = [n for p in tight.plans for n in p.new_requests if n.num_output_tokens > 0]
    assert resumed, "no preempted request came back"
    assert tight.reasons["t5"] == "abort" and 3 <= len(tight.outputs["t5"]) < LONGER.max_tokens
    assert any("t5" in p.finished_request_ids for p in tight.plans), "abort never reached it"
    for i in range(len(batch)):
        if i != 5:
            assert tight.outputs[f"t{i}"] == ample.outputs[f"a{i}"], i


def test_runners_agree_plan_for_plan_under_pressure(vllm_runner, native_runner, long_prompts,
                                                    prompts) -> None:
    """The same tight run on both runners: the same plans, the same tokens."""
    kw = dict(num_blocks=6, max_num_batched_tokens=32)
    a = run_engine(vllm_runner, long_prompts + prompts, LONGER, **kw)
    b = run_engine(native_runner, long_prompts + prompts, LONGER, **kw)
    assert a.scheduler.stats().num_preemptions > 0
    assert a.outputs == b.outputs
    assert [p.num_scheduled_tokens for p in a.plans] == [p.num_scheduled_tokens for p in b.plans]
    assert held_request_ids(vllm_runner) == held_request_ids(native_runner) == []


# --------------------------------------------------------------------------- hand-built plans


def test_staggered_arrivals_and_chunked_prefill(runner, hf_greedy, long_prompts,
                                                prompts) -> None:
    """A long prompt prefilled 13 tokens per step (chunks end mid-block) while another
    decodes; it samples only once its last chunk ran; a late arrival."""
    d = Driver(runner, seed=1)
    long_prompt = long_prompts[0]
    d.add("short", prompts[0])
    d.step()
    d.add("long", long_prompt)
    while d.reqs["long"].computed < len(long_prompt):
        res = d.step({"short": 1, "long": 13})
        assert ("long" in res.request_ids) == (d.reqs["long"].computed == len(long_prompt))
    d.add("late", prompts[3])
    got = d.run_until({"short": 10, "long": 6, "late": 5})
    d.close()
    assert got["short"] == hf_greedy(prompts[0], 10)
    assert got["long"] == hf_greedy(long_prompt, 6)
    assert got["late"] == hf_greedy(prompts[3], 5)


def test_prefix_cache_hit(runner, hf_greedy, long_prompts) -> None:
    """B's first two blocks are A's (a 70-token shared prefix): B starts with 64 computed
    tokens and those block ids while A keeps decoding."""
    d = Driver(runner, seed=2)
    a_prompt, b_prompt = long_prompts[0], long_prompts[1]
    d.add("a", a_prompt)
    d.step()
    d.step()
    d.add("b", b_prompt, shared_blocks=d.reqs["a"].blocks[:2])
    res = d.step()
    assert "b" in res.request_ids
    got = d.run_until({"a": 6, "b": 6})
    d.close()
    assert got["a"] == hf_greedy(a_prompt, 6)
    assert got["b"] == hf_greedy(b_prompt, 6)


def test_preemption_and_resume(runner, hf_greedy, prompts, long_prompts) -> None:
    """A is dropped after 4 tokens and comes back as a new request carrying them: its
    remaining tokens continue exactly; B is undisturbed."""
    d = Driver(runner, seed=3)
    d.add("a", prompts[0])
    d.add("b", long_prompts[2])
    for _ in range(4):
        d.step()
    a = d.drop("a")
    assert len(a.outputs) == 4
    assert held_state(runner, "a") is not None  # forgotten with the next plan, not before
    d.step()
    assert held_state(runner, "a") is None
    d.step()
    d.add("a", a.tokens, num_output_tokens=len(a.outputs))
    got = d.run_until({"a": 4, "b": 9})
    d.close()
    assert a.outputs + got["a"] == hf_greedy(prompts[0], 8)
    assert got["b"] == hf_greedy(long_prompts[2], 9)


def test_abort_frees_blocks_for_others(runner, hf_greedy, prompts) -> None:
    """An aborted request is dropped mid-decode; its blocks go to a new request at once
    (stale KV in them must not leak into it)."""
    d = Driver(runner, seed=4)
    d.add("x", prompts[1])
    d.add("y", prompts[2])
    for _ in range(5):
        d.step()
    x = d.drop("x")
    d.free.append(x.blocks[0])  # hand x's block out next
    d.add("z", prompts[4])
    got = d.run_until({"y": 9, "z": 7})
    d.close()
    assert d.done["z"].blocks[0] == x.blocks[0]
    assert got["y"] == hf_greedy(prompts[2], 9)
    assert got["z"] == hf_greedy(prompts[4], 7)


def test_zero_token_steps_and_late_blocks(runner, hf_greedy, long_prompts) -> None:
    """A new request registered with nothing to run, and block ids appended in a step that
    does not run the request (the vllm runner holds both until the request's next scheduled
    step)."""
    d = Driver(runner, seed=5)
    d.add("w", long_prompts[3])
    assert d.step({}).request_ids == []  # registered, 0 tokens
    assert d.step({"w": 20}).request_ids == []
    d.reqs["w"].new_blocks.append(d.free.pop())  # pre-allocate ahead of need, 0 tokens
    d.step({})
    got = d.run_until({"w": 5})
    d.close()
    assert got["w"] == hf_greedy(long_prompts[3], 5)


# --------------------------------------------------------------------------- sampling


def test_top_k_1_equals_greedy(runner, hf_greedy, prompts) -> None:
    d = Driver(runner)
    d.add("k1", prompts[3], SamplingParams(temperature=1.5, top_k=1))
    got = d.run_until({"k1": 8})["k1"]
    d.close()
    assert got == hf_greedy(prompts[3], 8)


def test_greedy_processors_agree_across_runners(vllm_runner, native_runner, prompts) -> None:
    """Deterministic sampling parameters map one to one: repetition penalty, min_tokens with
    EOS (and a stop token) banned until then, top_k=1 at any temperature."""
    cases = [
        SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=10, stop_token_ids=(201,)),
        SamplingParams(temperature=1.7, top_k=1, max_tokens=12, seed=5),
    ]
    for sp in cases:
        outs = []
        for r in (vllm_runner, native_runner):
            outs.append(greedy_on(r, prompts[:4], sp))
            assert held_request_ids(r) == []
        assert outs[0] == outs[1], sp


def test_min_tokens_bans_eos_and_stop_ids(runner, prompts) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=8, stop_token_ids=(201,))
    d = Driver(runner)
    for i, p in enumerate(prompts):
        d.add(f"m{i}", p, sp)
    got = d.run_until({f"m{i}": 10 for i in range(len(prompts))})
    d.close()
    early = [t for o in got.values() for t in o[:8]]
    assert not set(early) & {*EOS, 201}
    # ... and without min_tokens those tokens do come early for some prompt
    d = Driver(runner)
    for i, p in enumerate(prompts):
        d.add(f"n{i}", p, GREEDY)
    free = d.run_until({f"n{i}": 8 for i in range(len(prompts))})
    d.close()
    assert {t for o in free.values() for t in o} & {*EOS, 201}


def test_greedy_logprobs(runner, hf_greedy, prompts) -> None:
    """The sampled token's logprob, as transformers computes it; 0.0 for a request of the
    batch that did not ask; None when no request of the step asked."""
    want_tokens, want_logprobs = hf_greedy(prompts[1], 6, logprobs=True)
    d = Driver(runner)
    d.add("lp", prompts[1], SamplingParams(temperature=0.0, logprobs=0, max_tokens=6))
    d.add("plain", prompts[0])
    res = d.step()
    assert res.logprobs is not None and len(res.logprobs) == len(res.token_ids) == 2
    assert res.logprobs[res.request_ids.index("plain")] == 0.0
    d.drop("plain")
    d.run_until({"lp": 6})
    d.add("none", prompts[2])
    assert d.step().logprobs is None  # no request asked
    d.close()
    assert d.done["lp"].outputs == want_tokens
    torch.testing.assert_close(torch.tensor(d.done["lp"].logprobs), torch.tensor(want_logprobs),
                               atol=1e-5, rtol=1e-5)


def test_top_logprobs(runner, hf_model, prompts) -> None:
    """The k most likely tokens and their logprobs at each sampled position, as transformers
    computes them (raw logits), best first; k is each request's own; empty rows for requests
    of the step that asked for none."""
    d = Driver(runner)
    d.add("top", prompts[3], SamplingParams(temperature=0.0, logprobs=3))
    d.add("plain", prompts[0], SamplingParams(temperature=0.0, logprobs=0))
    tops = []
    for _ in range(4):
        res = d.step()
        assert res.top_token_ids is not None and res.top_logprobs is not None
        assert res.top_token_ids[res.request_ids.index("plain")] == []
        i = res.request_ids.index("top")
        tops.append((res.top_token_ids[i], res.top_logprobs[i]))
    tokens = d.drop("top").tokens
    d.close()
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0].float()
    start = len(prompts[3]) - 1
    for pos, (ids, lps) in enumerate(tops):
        want = torch.log_softmax(logits[start + pos], -1).topk(3)
        assert ids == want.indices.tolist(), f"position {pos}"
        assert ids[0] == tokens[start + pos + 1]  # greedy: the best one was sampled
        torch.testing.assert_close(torch.tensor(lps), want.values, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- prompt logprobs


def _check_prompt_logprobs(hf_model, prompt: list[int], got: dict, first: int, k: int) -> None:
    """``got`` (Driver's rows by token index) holds tokens ``first .. len(prompt) - 1``, as
    transformers' log_softmax of a teacher-forced forward gives them (fp32, 1e-4)."""
    assert sorted(got) == list(range(first, len(prompt)))
    with torch.no_grad():
        lps = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), -1)
    for i in range(first, len(prompt)):
        lp, rank, top_ids, top_lps = got[i]
        row = lps[i - 1]  # position i - 1 scores token i
        want = row[prompt[i]].item()
        assert abs(lp - want) < 1e-4, (i, lp, want)
        assert rank == int((row >= row[prompt[i]]).sum()), i
        best = row.topk(k)
        assert top_ids == best.indices.tolist(), i
        torch.testing.assert_close(torch.tensor(top_lps), best.values, atol=1e-4, rtol=0)


def test_prompt_logprobs_across_chunks_equal_transformers(runner, hf_model, long_prompts,
                                                          prompts) -> None:
    """Every prompt token after the first is scored once, across a chunked prefill (chunks
    ending mid-block and one position short of the prompt's end); rank and the k best as
    transformers; the request decodes on afterwards and a request of the same steps that
    asked for none gets no rows."""
    prompt = long_prompts[1]
    n = len(prompt)
    d = Driver(runner, seed=6)
    d.add("p", prompt, SamplingParams(temperature=0.0, prompt_logprobs=3))
    d.add("plain", prompts[0])
    d.step({"p": 20, "plain": 2})
    d.step({"p": n - 21, "plain": 1})  # stops at position n - 2: the last row is scored
    res = d.step({"p": 1})
    assert res.request_ids == ["p"]
    d.run_until({"p": 3, "plain": 3})
    d.close()
    assert d.done["plain"].prompt_logprobs == {}
    _check_prompt_logprobs(hf_model, prompt, d.done["p"].prompt_logprobs, 1, 3)


def test_prompt_logprobs_after_a_cached_prefix(runner, hf_model, long_prompts) -> None:
    """A request that starts after a cached prefix (two blocks, as the scheduler does for
    one resumed after its first positions were scored) is scored from there on, in one
    step; k 0 returns the token's own logprob and rank only."""
    d = Driver(runner, seed=7)
    a_prompt, b_prompt = long_prompts[0], long_prompts[2]
    d.add("a", a_prompt)
    d.step()
    d.add("b", b_prompt, SamplingParams(temperature=0.0, prompt_logprobs=0),
          shared_blocks=d.reqs["a"].blocks[:2])
    res = d.step()
    assert "b" in res.request_ids
    got = d.reqs["b"].prompt_logprobs
    d.close()
    assert all(top == [] for _, _, top, _ in got.values())
    _check_prompt_logprobs(hf_model, b_prompt, got, 2 * BLOCK + 1, 0)


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=10)


def test_seeded_sampling_is_reproducible_across_batches_and_preemption(runner,
                                                                       prompts) -> None:
    """A seeded request samples the same tokens alone and in a crowd of other (seeded and
    unseeded) requests, preempted after 3 tokens and resumed; another seed differs. The
    random streams are each runner's own, so the runners' samples differ from each other."""
    alone = Driver(runner, seed=4)
    alone.add("x", prompts[0], SAMPLED)
    ref = alone.run_until({"x": 10})["x"]
    alone.close()

    crowd = Driver(runner, seed=5)
    crowd.add("g", prompts[1])
    crowd.add("u", prompts[2], SamplingParams(temperature=1.0))
    crowd.step()
    crowd.add("x", prompts[0], SAMPLED)
    crowd.add("y", prompts[3], SamplingParams(temperature=1.2, seed=99))
    for _ in range(3):
        crowd.step()
    x = crowd.preempt("x", SAMPLED)  # preempted after 3 tokens, resumed
    got = crowd.run_until({"x": 7, "g": 1, "u": 1, "y": 1})
    crowd.close()
    assert x.outputs + got["x"] == ref

    other = Driver(runner, seed=6)
    other.add("x", prompts[0], SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=4321))
    assert other.run_until({"x": 10})["x"] != ref
    other.close()


# --------------------------------------------------------------------------- invalid plans


def _new(rid: str, tokens: list[int], blocks: list[int], computed: int = 0,
         scheduled: int | None = None) -> NewRequestData:
    return NewRequestData(request_id=rid, token_ids=tokens, sampling=GREEDY, block_ids=blocks,
                          num_computed_tokens=computed,
                          num_scheduled_tokens=len(tokens) - computed if scheduled is None else scheduled)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (StepPlan(step_id=1, worker_id=0, cached_requests=[CachedRequestData("nope", 1)]),
         "unknown to this worker"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2, 3], [0], scheduled=4)]),
         "only 3 are known"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", list(range(1, 40)), [0])]),
         "too short"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2], [0]), _new("a", [1], [1])]),
         "twice"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2], [NUM_BLOCKS])]),
         "block ids"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 5000], [0])]),
         "token ids"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("r", [1, 2], [3])]),
         "already running"),
        (StepPlan(step_id=1, worker_id=0, cached_requests=[CachedRequestData("r", 2)]),
         "only 3 are known"),
        (StepPlan(step_id=1, worker_id=0, cached_requests=[CachedRequestData("r", 1)],
                  finished_request_ids=["r"]),
         "unknown to this worker"),
    ],
)
def test_invalid_plans_raise_and_change_nothing(runner, plan: StepPlan, match: str) -> None:
    ok = runner.step(StepPlan(step_id=0, worker_id=0, new_requests=[_new("r", [1, 2], [0])]))
    assert ok.request_ids == ["r"]
    before = held_state(runner, "r")
    assert before == (2, 3, 1)  # 2 computed, 2 known + 1 sampled, 1 block
    with pytest.raises(ValueError, match=rf"^step 1: .*{match}"):
        runner.step(plan)
    assert held_state(runner, "r") == before
    assert held_state(runner, "a") is None
    # r still decodes from where it was
    res = runner.step(StepPlan(step_id=2, worker_id=0, cached_requests=[CachedRequestData("r", 1)]))
    assert res.request_ids == ["r"]
    assert held_state(runner, "r") == (3, 4, 1)
    runner.step(StepPlan(step_id=3, worker_id=0, finished_request_ids=["r"]))
