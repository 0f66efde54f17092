"""The native runner's own paths, checked against transformers' generate on a random tiny
Qwen3 (q/k norms) with 4-token blocks, which vLLM's CPU attention cannot run: a batch,
the scheduler's chunked prefill, prefix hits and preemption through many small blocks,
KV capacity from memory, threads, EOS and the factory.

What every runner must do alike (on the default model, against vLLM and transformers) is in
test_runner_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, ModelConfig, WorkerConfig
from engine.messages import SamplingParams
from engine.worker.factory import make_runner
from engine.worker.native_runner import NativeRunner

from .harness import Driver, held_request_ids, run_engine

transformers = pytest.importorskip("transformers")

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
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


def test_greedy_batch_matches_hf(model_dir: Path, hf_greedy) -> None:
    d = Driver(make(model_dir))
    for i, p in enumerate(PROMPTS):
        d.add(f"r{i}", p)
    got = d.run_until({f"r{i}": 8 for i in range(len(PROMPTS))})
    for i, p in enumerate(PROMPTS):
        assert got[f"r{i}"] == hf_greedy(p, 8), f"prompt {i}"


def test_small_blocks_under_pressure_match_hf(model_dir: Path, hf_greedy) -> None:
    """The scheduler on 10 blocks of 4 tokens and 6 tokens a step: prompts are chunked
    across block boundaries, the prompt sharing PROMPTS[1]'s first 3 blocks starts after
    them, decodes preempt and resume; every output is transformers' for the prompt alone."""
    prompts = [*PROMPTS, [*PROMPTS[1][:12], 60, 61, 62], list(range(30, 53))]
    runner = make(model_dir)
    run = run_engine(runner, prompts, GREEDY, num_blocks=10, max_num_batched_tokens=6)
    stats = run.scheduler.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_hit_tokens >= 3 * BLOCK
    assert any(n.num_computed_tokens + n.num_scheduled_tokens < len(n.token_ids)
               for p in run.plans for n in p.new_requests), "no chunked prefill"
    assert any(n.num_output_tokens > 0 for p in run.plans for n in p.new_requests), \
        "no preempted request came back"
    for i, p in enumerate(prompts):
        assert run.outputs[f"r{i}"] == hf_greedy(p, 8), f"prompt {i}"
    assert held_request_ids(runner) == []


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
    with pytest.raises(ValueError, match="at least 2 are needed"):
        NativeRunner(ModelConfig(path=str(model_dir)), CacheConfig(kv_cache_memory_gib=1e-6),
                     WorkerConfig(num_threads=1))
