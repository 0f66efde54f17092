"""The in-process API on the default model: same scheduler and runner, no sockets."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models.default import default_model_dir

PROMPTS = [
    "Return a list of", "The default value is", "Raise ValueError if", "This module provides",
    "Create a new", "If the file", "Return True if the", "The result is a",
    "Convert the string", "Open the socket and", "Return the number of", "Set the current",
    "This class implements", "Read the data from", "Return a new dictionary", "When the timeout",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_greedy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        refs[prompt] = out[0, ids.shape[1]:].tolist()
    return refs


@pytest.fixture(scope="module")
def llm():
    # A small budget and cache: prompts are chunked and requests preempted along the way.
    return LLM(workers=2, max_num_batched_tokens=32, num_kv_blocks=6)


def test_greedy_outputs_equal_transformers(llm, hf_greedy):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [o.token_ids for o in outs] == [hf_greedy[p] for p in PROMPTS]
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert llm.scheduler.num_preemptions > 0, "the small cache should have forced preemption"
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)
    assert all(ws.blocks.num_free_blocks == 6 for ws in llm.scheduler.workers.values())


def test_stop_string_truncates_and_frees(llm, hf_greedy):
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    (out,) = llm.generate(PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                     stop=(stop,)))
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert llm.scheduler.num_unfinished == 0


def test_seeded_sampling_is_reproducible(llm):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = llm.generate(PROMPTS[:4], sp)
    b = llm.generate(PROMPTS[3:4], sp)  # alone, in another batch composition
    assert a[3].token_ids == b[0].token_ids


@pytest.mark.parametrize(("sp", "param"), [
    (SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(frequency_penalty=float("inf")), "frequency_penalty"),
    (SamplingParams(logit_bias=((10**6, 1.0),)), "logit_bias"),
    (SamplingParams(logit_bias=((5, 1.0), (5, 2.0))), "logit_bias"),
    (SamplingParams(logit_bias=((5, -101.0),)), "logit_bias"),
    (SamplingParams(allowed_token_ids=(3, -1)), "allowed_token_ids"),
    (SamplingParams(temperature=-1.0), "temperature"),
])
def test_invalid_sampling_is_refused_before_anything_runs(llm, sp, param):
    from engine.frontend.serving import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        llm.generate(["Return a list of", "If the file"], [SamplingParams(), sp])
    assert e.value.param == param
    assert llm.scheduler.num_unfinished == 0


def test_penalties_and_allowed_ids_apply(llm):
    tokens = tuple(range(300, 340))
    [out] = llm.generate(["Return a list of"], SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, allowed_token_ids=tokens,
        frequency_penalty=2.0))
    assert len(out.token_ids) == 12 and set(out.token_ids) <= set(tokens)
    assert max(out.token_ids.count(t) for t in out.token_ids) <= 3

def test_prompt_logprobs_over_chunks_and_a_cached_prefix_equal_transformers(llm):
    """max_tokens 0 with prompt_logprobs scores the prompt only; the prompt (longer than the
    32-token step budget: chunked) is cached by an earlier plain request, yet every position
    is computed (no cached tokens) and equals transformers' log_softmax (fp32, 1e-4)."""
    from transformers import AutoModelForCausalLM

    prompt = " ".join(PROMPTS)
    ids = list(llm.tokenizer.encode(prompt))
    assert 32 < len(ids) < 80
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([ids], greedy)  # caches the prompt's full blocks
    assert llm.generate([ids], greedy)[0].num_cached_tokens > 0
    (out,) = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert out.finish_reason == "length" and out.token_ids == [] and out.num_cached_tokens == 0
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        e = got[i]
        assert e is not None and e.token_id == ids[i]
        assert abs(e.logprob - lps[i - 1, ids[i]].item()) < 1e-4, i
        assert e.rank == int((lps[i - 1] >= lps[i - 1, ids[i]]).sum()), i
        assert [t for t, _ in e.top] == lps[i - 1].topk(2).indices.tolist(), i
    assert all(ws.blocks.num_free_blocks == 6 for ws in llm.scheduler.workers.values())


def test_structured_output_survives_preemption_and_bad_spec_raises(llm):
    """Every output follows its JSON schema although the small cache preempts requests in
    the middle of their object (their matchers are rebuilt by replaying); a bad spec is a
    ValueError before anything runs."""
    import json

    from engine import StructuredOutput

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "kind": {"enum": ["list", "dict"]}},
              "required": ["name", "kind"], "additionalProperties": False}
    spec = StructuredOutput(kind="json", value=json.dumps(schema))
    before = llm.scheduler.num_preemptions
    outs = llm.generate(PROMPTS[:8], SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                                                    structured=spec))
    assert llm.scheduler.num_preemptions > before
    for o in outs:
        assert o.finish_reason == "stop", o.text
        obj = json.loads(o.text)
        assert set(obj) == {"name", "kind"} and obj["kind"] in ("list", "dict")
    bad = StructuredOutput(kind="regex", value="(unclosed")
    with pytest.raises(ValueError, match="structured"):
        llm.generate(PROMPTS[0], SamplingParams(structured=bad))
    assert llm.scheduler.num_unfinished == 0


def test_recorded_decisions_replay_with_logprobs(tmp_path):
    """The in-process path records by encoding (no wire): a run with sampled logprobs (not
    recorded) replays plan for plan once ``generate`` returns."""
    from engine.scheduler.record import Update, read_segments
    from engine.sim.replay import replay

    path = str(tmp_path / "llm.rec")
    llm = LLM(max_num_batched_tokens=32, num_kv_blocks=6, record_decisions=path)
    outs = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=8, temperature=0.0, logprobs=2,
                                                         ignore_eos=True))
    assert all(len(o.token_ids) == 8 and o.logprobs and len(o.logprobs) == 8 for o in outs)
    segments = read_segments(path)  # readable now: ``generate`` flushed the recording
    updates = [f for f in segments[0] if isinstance(f, Update)]
    assert updates and all(u.result.logprobs is None for u in updates)
    report = replay(segments, check=True)
    assert report.divergence is None and report.num_plans > 4
