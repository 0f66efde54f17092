"""NativeRunner driven by hand-built StepPlans, checked against transformers' generate."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, ConfigError, ModelConfig, WorkerConfig
from engine.messages import (
    CachedRequestData,
    NewRequestData,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.worker.factory import make_runner
from engine.worker.native_runner import NativeRunner

transformers = pytest.importorskip("transformers")

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = [
    [5, 9, 2, 33, 71],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [42],
    [7, 7, 7, 8, 8, 8, 90, 91],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, initializer_range=0.08, eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("tiny-qwen3")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_greedy(model_dir: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def generate(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in memo:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    return generate


def make(model_dir: Path, num_blocks: int = 64) -> NativeRunner:
    return NativeRunner(ModelConfig(path=str(model_dir), dtype="float32"),
                        CacheConfig(block_size=BLOCK, num_blocks=num_blocks), WorkerConfig())


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
    """A toy scheduler: hands out shuffled block ids, builds the plans, mirrors the state."""

    def __init__(self, runner: NativeRunner, seed: int = 0) -> None:
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
        if shared_blocks:  # a prefix-cache hit: these full blocks already hold our KV
            r.blocks = list(shared_blocks)
            r.computed = len(shared_blocks) * BLOCK
        self.reqs[rid] = r

    def drop(self, rid: str) -> _Req:
        """Finish or preempt: the worker forgets it, its blocks go back."""
        r = self.reqs.pop(rid)
        self.done[rid] = r
        self.finished.append(rid)
        in_use = {b for other in self.reqs.values() for b in other.blocks}  # shared prefixes
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
        """Step (full prefills, then decodes) until each request has n_out outputs."""
        outs = {}
        while True:
            for rid in [rid for rid in self.reqs if rid in n_out]:
                if len(self.reqs[rid].outputs) >= n_out[rid]:
                    outs[rid] = self.drop(rid).outputs
            if not any(rid in n_out for rid in self.reqs):
                return outs
            self.step()


def test_greedy_batch_matches_hf(model_dir: Path, hf_greedy) -> None:
    d = Driver(make(model_dir))
    for i, p in enumerate(PROMPTS):
        d.add(f"r{i}", p)
    got = d.run_until({f"r{i}": 8 for i in range(len(PROMPTS))})
    for i, p in enumerate(PROMPTS):
        assert got[f"r{i}"] == hf_greedy(p, 8), f"prompt {i}"


def test_staggered_arrivals_and_chunked_prefill(model_dir: Path, hf_greedy) -> None:
    """A long prompt prefilled 5 tokens per step while others decode; a late arrival."""
    d = Driver(make(model_dir), seed=1)
    long_prompt = list(range(30, 53))  # 23 tokens: chunks end mid-block
    d.add("short", PROMPTS[0])
    d.step()
    d.add("long", long_prompt)
    while d.reqs["long"].computed < len(long_prompt):
        res = d.step({"short": 1, "long": 5})
        assert ("long" in res.request_ids) == (d.reqs["long"].computed == len(long_prompt))
    d.add("late", PROMPTS[3])
    got = d.run_until({"short": 10, "long": 6, "late": 5})
    assert got["short"] == hf_greedy(PROMPTS[0], 10)
    assert got["long"] == hf_greedy(long_prompt, 6)
    assert got["late"] == hf_greedy(PROMPTS[3], 5)


def test_prefix_cache_hit(model_dir: Path, hf_greedy) -> None:
    """B's first three blocks are A's (same prompt prefix): B starts with 12 computed tokens
    and those block ids, while A keeps decoding."""
    d = Driver(make(model_dir), seed=2)
    prefix = PROMPTS[1][:12]
    d.add("a", PROMPTS[1])
    d.step()
    d.step()
    b_prompt = [*prefix, 60, 61, 62]
    d.add("b", b_prompt, shared_blocks=d.reqs["a"].blocks[:3])
    got = d.run_until({"a": 6, "b": 6})
    assert got["a"] == hf_greedy(PROMPTS[1], 6)
    assert got["b"] == hf_greedy(b_prompt, 6)


def test_preemption_and_resume(model_dir: Path, hf_greedy) -> None:
    d = Driver(make(model_dir), seed=3)
    d.add("a", PROMPTS[0])
    d.add("b", PROMPTS[3])
    for _ in range(4):
        d.step()
    a = d.drop("a")  # preempted: the worker forgets it
    assert len(a.outputs) == 4
    d.step()
    d.step()
    d.add("a", a.tokens, num_output_tokens=len(a.outputs))  # resumes as a new request
    got = d.run_until({"a": 4, "b": 9})
    assert a.outputs + got["a"] == hf_greedy(PROMPTS[0], 8)
    assert got["b"] == hf_greedy(PROMPTS[3], 9)


def test_greedy_logprobs_match_hf(model_dir: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=4, do_sample=False,
                      eos_token_id=None, pad_token_id=0, output_logits=True,
                      return_dict_in_generate=True)
    want = [torch.log_softmax(lg[0], -1)[t].item()
            for lg, t in zip(out.logits, out.sequences[0, len(PROMPTS[1]):], strict=True)]
    d = Driver(make(model_dir))
    d.add("lp", PROMPTS[1], SamplingParams(temperature=0.0, logprobs=0))
    d.add("plain", PROMPTS[0])
    res = d.step()
    assert res.logprobs is not None and len(res.logprobs) == len(res.token_ids) == 2
    assert res.logprobs[res.request_ids.index("plain")] == 0.0
    d.drop("plain")
    d.run_until({"lp": 4})
    assert d.done["lp"].outputs == out.sequences[0, len(PROMPTS[1]):].tolist()
    torch.testing.assert_close(torch.tensor(d.done["lp"].logprobs), torch.tensor(want),
                               atol=1e-5, rtol=1e-5)
    d.add("none", PROMPTS[2])
    assert d.step().logprobs is None  # no request asked


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=10)


def test_seeded_sampling_is_reproducible(model_dir: Path) -> None:
    alone = Driver(make(model_dir), seed=4)
    alone.add("x", PROMPTS[0], SAMPLED)
    ref = alone.run_until({"x": 10})["x"]

    crowd = Driver(make(model_dir), seed=5)
    crowd.add("g", PROMPTS[1])
    crowd.add("u", PROMPTS[2], SamplingParams(temperature=1.0))
    crowd.step()
    crowd.add("x", PROMPTS[0], SAMPLED)
    crowd.add("y", PROMPTS[3], SamplingParams(temperature=1.2, seed=99))
    for _ in range(3):
        crowd.step()
    x = crowd.drop("x")  # preempted after 3 tokens, resumed later
    crowd.step()
    crowd.add("x", x.tokens, SAMPLED, num_output_tokens=len(x.outputs))
    got = crowd.run_until({"x": 7, "g": 1, "u": 1, "y": 1})
    assert x.outputs + got["x"] == ref

    other = Driver(make(model_dir), seed=6)
    other.add("x", PROMPTS[0], SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=4321))
    assert other.run_until({"x": 10})["x"] != ref


def test_top_k_1_equals_greedy(model_dir: Path, hf_greedy) -> None:
    d = Driver(make(model_dir))
    d.add("k1", PROMPTS[3], SamplingParams(temperature=1.5, top_k=1))
    assert d.run_until({"k1": 8})["k1"] == hf_greedy(PROMPTS[3], 8)


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
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2, 3, 4, 5], [0])]),
         "too short"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2], [0]), _new("a", [1], [1])]),
         "twice"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 2], [999])]),
         "block ids"),
        (StepPlan(step_id=1, worker_id=0, new_requests=[_new("a", [1, 500], [0])]),
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
def test_invalid_plans_raise(model_dir: Path, plan: StepPlan, match: str) -> None:
    runner = make(model_dir, num_blocks=8)
    ok = runner.step(StepPlan(step_id=0, worker_id=0, new_requests=[_new("r", [1, 2], [0])]))
    assert ok.request_ids == ["r"]
    with pytest.raises(ValueError, match=match):
        runner.step(plan)
    # the failed plan changed nothing: r still decodes from where it was
    res = runner.step(StepPlan(step_id=2, worker_id=0, cached_requests=[CachedRequestData("r", 1)]))
    assert res.request_ids == ["r"]
    assert runner.requests["r"].num_computed_tokens == 3


def test_capacity_threads_eos_and_factory(model_dir: Path) -> None:
    runner = NativeRunner(ModelConfig(path=str(model_dir), dtype="float32"),
                          CacheConfig(block_size=16, kv_cache_memory_gib=0.001),
                          WorkerConfig(num_threads=1))
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    assert runner.num_blocks == int(0.001 * (1 << 30)) // per_block
    assert runner.block_size == 16
    assert torch.get_num_threads() == 1
    assert runner.sampler.eos_token_ids == (2,)
    assert runner.kv_caches[0][0].shape == (runner.num_blocks, 16, 2, 16)
    runner.close()
    made = make_runner(ModelConfig(path=str(model_dir)), CacheConfig(num_blocks=4),
                       WorkerConfig(num_threads=2))
    assert isinstance(made, NativeRunner) and made.dtype == torch.float32 and made.num_blocks == 4
    # vllm runner: without vLLM "--runner: ... needs vLLM 0.32.0"; with it on CPU, 16-token
    # blocks are refused (tests/worker/test_vllm_runner.py covers the runner itself)
    with pytest.raises(ConfigError, match=r"--runner|--block-size"):
        make_runner(ModelConfig(path=str(model_dir)), CacheConfig(), WorkerConfig(runner="vllm"))
