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
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import CacheConfig, ModelConfig, WorkerConfig
from engine.messages import SamplingParams
from engine.worker.cuda_graphs import capture_sizes
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
    """The CPU runner (also on a GPU machine: the `gpu` tests below cover CUDA)."""
    return NativeRunner(ModelConfig(path=str(model_dir), dtype="float32"),
                        CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
                        WorkerConfig(device="cpu"))


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
                          WorkerConfig(num_threads=1, device="cpu"))
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    assert runner.num_blocks == int(0.001 * (1 << 30)) // per_block
    assert runner.block_size == 16
    assert torch.get_num_threads() == 1
    assert runner.sampler.eos_token_ids == (2,)
    assert runner.kv_caches[0][0].shape == (runner.num_blocks, 16, 2, 16)
    runner.close()
    made = make_runner(ModelConfig(path=str(model_dir)), CacheConfig(num_blocks=4),
                       WorkerConfig(num_threads=2, device="cpu"))
    assert isinstance(made, NativeRunner) and made.dtype == torch.float32 and made.num_blocks == 4
    with pytest.raises(ValueError, match="at least 2 are needed"):
        NativeRunner(ModelConfig(path=str(model_dir)), CacheConfig(kv_cache_memory_gib=1e-6),
                     WorkerConfig(num_threads=1, device="cpu"))


def test_a_cpu_runner_warms_up_and_leaves_no_trace(model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Before serving, a CPU runner runs one prompt and one decode (the process's first
    forward pass is several times slower: docs/kernels.md), then holds nothing: no request,
    every KV slot zero again, so the scheduler's first plan meets a fresh cache."""
    steps: list[tuple[int, int]] = []
    real_step = NativeRunner.step

    def spy(self: NativeRunner, plan):  # type: ignore[no-untyped-def]
        steps.append((len(plan.new_requests), plan.num_scheduled_tokens))
        return real_step(self, plan)

    monkeypatch.setattr(NativeRunner, "step", spy)
    runner = NativeRunner(ModelConfig(path=str(model_dir)), CacheConfig(block_size=16,
                                                                         num_blocks=6),
                          WorkerConfig(num_threads=1, device="cpu"))
    assert steps[:2] == [(1, 64), (0, 1)]  # the prompt, its decode (then the drop)
    assert held_request_ids(runner) == []
    assert all(not k.any() and not v.any() for k, v in runner.kv_caches)
    runner.close()


# --------------------------------------------------------------------------- decode graphs


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64)[-3:] == [48, 56, 64]


def test_padded_decode_path_matches_hf(model_dir: Path, hf_greedy,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph decode path without the graphs (``capture=False``): decode batches go
    through the static buffers padded to the next size (1, 2, 4, 5), larger ones and every
    prefill run eagerly, and under the scheduler's preemption and chunked prefill every
    output is still transformers'."""
    runner = make(model_dir)
    with pytest.raises(ValueError, match="need a CUDA device"):
        runner.enable_decode_graphs(max_batch=4)
    runner.enable_decode_graphs(max_batch=5, capture=False)
    graphs = runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 5]
    seen: list[tuple[int, int]] = []  # (rows, padded size) of each graph-path step
    real_run = graphs.run

    def spy(input_ids, *args):
        seen.append((len(input_ids), graphs.padded_size(len(input_ids))))
        return real_run(input_ids, *args)

    monkeypatch.setattr(graphs, "run", spy)
    prompts = [*PROMPTS, [*PROMPTS[1][:12], 60, 61, 62], list(range(30, 53)), [3, 4]]
    tight = run_engine(runner, prompts, GREEDY, num_blocks=14, max_num_batched_tokens=8)
    assert tight.scheduler.stats().num_preemptions > 0
    for i, p in enumerate(prompts):
        assert tight.outputs[f"r{i}"] == hf_greedy(p, 8), f"prompt {i}"
    # Hand-built decode batches of 3 (padded to 4), 5, 7 (above the graphs: eager), and one
    # with a prompt's first token beside the decodes (one new token that samples nothing).
    d = Driver(runner)
    for i, p in enumerate(prompts):
        d.add(f"d{i}", p)
    d.step()  # the prompts, eagerly
    ids = [f"d{i}" for i in range(len(prompts))]
    for subset in (ids[:3], ids[2:7], ids, ids[1:4], ids[:2]):
        d.step(dict.fromkeys(subset, 1))
    d.add("late", PROMPTS[1])
    d.step({"late": 1, **dict.fromkeys(ids[:3], 1)})
    d.step({"late": len(PROMPTS[1]) - 1})
    assert (3, 4) in seen and (5, 5) in seen and (4, 4) in seen, seen
    assert all(n != 7 for n, _ in seen), "a batch above the largest graph took the graph path"
    for i, p in enumerate(prompts):
        got = d.reqs[f"d{i}"].outputs
        assert got == hf_greedy(p, len(got)), f"prompt {i}"
    assert d.reqs["late"].outputs == hf_greedy(PROMPTS[1], 1)
    d.close()
    assert held_request_ids(runner) == []
    runner.close()


def test_prompt_logprob_rows_never_take_the_graph_path(model_dir: Path, hf_greedy,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt scored one token per step beside decodes is a decode-shaped batch, yet its
    rows are prefill rows: those steps run eagerly, and every prompt logprob is
    transformers'; the decodes alone take the (padded) graph path again."""
    runner = make(model_dir)
    runner.enable_decode_graphs(max_batch=4, capture=False)
    graphs = runner.graphs
    assert graphs is not None
    calls: list[int] = []
    real_run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda ids, *a: calls.append(len(ids)) or real_run(ids, *a))
    d = Driver(runner)
    d.add("dec", PROMPTS[0])
    d.step()
    prompt = PROMPTS[1]
    d.add("scored", prompt, SamplingParams(temperature=0.0, prompt_logprobs=2))
    for _ in range(len(prompt) - 1):
        d.step({"dec": 1, "scored": 1})
    assert calls == [], "a batch with prompt-logprob rows took the graph path"
    d.step({"dec": 1})
    assert calls == [1]
    got = d.reqs["scored"].prompt_logprobs
    d.close()
    runner.close()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lps = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert sorted(got) == list(range(1, len(prompt)))
    for i in range(1, len(prompt)):
        lp, rank, top_ids, _ = got[i]
        assert rank == int((lps[i - 1] >= lps[i - 1, prompt[i]]).sum()), i
        assert abs(lp - lps[i - 1, prompt[i]].item()) < 1e-4, i
        assert top_ids == lps[i - 1].topk(2).indices.tolist(), i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager_on_gpu(model_dir: Path, hf_greedy, dtype: str) -> None:
    """On a GPU: decode steps replayed from CUDA graphs give the eager runner's tokens and
    logprobs (bitwise: the same kernels run), and in float32 transformers' greedy tokens."""
    pytest.importorskip("triton")
    sampling = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    outputs = {}
    for eager in (True, False):
        runner = NativeRunner(ModelConfig(path=str(model_dir), dtype=dtype),
                              CacheConfig(block_size=16, num_blocks=64),
                              WorkerConfig(device="cuda", enforce_eager=eager,
                                           cuda_graph_max_batch=8))
        assert (runner.graphs is None) == eager
        outputs[eager] = run_engine(runner, PROMPTS * 2, sampling, num_blocks=64,
                                    max_num_batched_tokens=64)
        runner.close()
    assert outputs[True].outputs == outputs[False].outputs
    assert outputs[True].logprobs == outputs[False].logprobs
    if dtype == "float32":
        for i, p in enumerate(PROMPTS * 2):
            assert outputs[False].outputs[f"r{i}"] == hf_greedy(p, 8), f"prompt {i}"


def _larger_llama(path: Path) -> Path:
    """A random Llama with Llama-3's attention shapes in small: head_dim 128, 4 query heads
    per KV head, llama3 rope; ~175M parameters (made only where a GPU test runs)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=4096, initializer_range=0.05, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 1024},
    )
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["default", "larger-llama"])
def test_gpu_greedy_matches_transformers(which: str, dtype: str, tmp_path: Path) -> None:
    """On a GPU, the native runner (Triton kernels, CUDA graphs, chunked prefill across
    steps) generates transformers' greedy tokens. Checked teacher-forced: transformers runs
    each prompt with our output appended, and at every position our token must be its
    argmax (float32: exactly; bfloat16: within 0.1 of the top logit, since the two sides
    round differently and random weights give near-ties)."""
    from engine.models.default import default_model_dir

    path = default_model_dir() if which == "default" else _larger_llama(tmp_path / "llama")
    runner = NativeRunner(ModelConfig(path=str(path), dtype=dtype),
                          CacheConfig(block_size=16, num_blocks=512),
                          WorkerConfig(device="cuda", cuda_graph_max_batch=16))
    assert runner.graphs is not None
    gen = torch.Generator().manual_seed(1)
    vocab = runner.info.vocab_size
    lengths = [3, 17, 64, 200, 333, 15, 1, 90]
    prompts = [torch.randint(vocab, (n,), generator=gen).tolist() for n in lengths]
    sampling = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    run = run_engine(runner, prompts, sampling, max_num_batched_tokens=128)
    runner.close()
    torch_dtype = getattr(torch, dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    hf = hf.to("cuda").eval()
    for i, prompt in enumerate(prompts):
        out = run.outputs[f"r{i}"]
        assert len(out) == 24
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + out], device="cuda")).logits[0].float()
        logits = logits[len(prompt) - 1 : -1]
        ours = torch.tensor(out, device="cuda")
        if dtype == "float32":
            assert out == logits.argmax(-1).tolist(), f"prompt {i}"
        else:
            gap = logits.max(-1).values - logits.gather(1, ours[:, None])[:, 0]
            assert gap.max().item() <= 0.1, f"prompt {i}: {gap.tolist()}"


class _HostSyncProbe(TorchDispatchMode):
    """Records what a CUDA-graph capture forbids: reading a tensor's values on the host
    (``.item()``, ``bool()``, ``.tolist()``, ``.numpy()``, and ops whose output size depends
    on values), outside the Triton kernels themselves (which the interpreter runs on the
    host, and which on a GPU are plain launches)."""

    SYNC_OPS = frozenset({"item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero",
                          "masked_select", "unique", "_unique2", "unique_consecutive"})

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.found: list[str] = []
        self.in_kernel = 0
        from triton.runtime.interpreter import InterpretedFunction

        real_run = InterpretedFunction.run

        def run(fn_self, *args, **kwargs):
            self.in_kernel += 1
            try:
                return real_run(fn_self, *args, **kwargs)
            finally:
                self.in_kernel -= 1

        monkeypatch.setattr(InterpretedFunction, "run", run)
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def read(t, *a, _real=real, _name=name, **kw):
                if self.active and not self.in_kernel:
                    self.found.append(_name)
                return _real(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, read)
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel and func.overloadpacket.__name__ in self.SYNC_OPS:
            self.found.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, the gpu tests capture")
def test_decode_forward_reads_no_tensor_on_the_host(model_dir: Path, hf_greedy,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture's precondition, checked without a GPU: the forward pass the decode graphs
    record (the model, the kernels' wrappers, the Triton kernels under the interpreter) never
    reads a tensor's values on the host, so its launches depend on sizes alone. The torch
    reference does read them (its decode buckets) and the probe sees that, which shows the
    probe can fail."""
    pytest.importorskip("triton")
    import kernels

    probe = _HostSyncProbe(monkeypatch)
    runner = make(model_dir)
    runner.enable_decode_graphs(max_batch=4, capture=False)
    graphs = runner.graphs
    assert graphs is not None
    d = Driver(runner)
    for i, p in enumerate(PROMPTS[:3]):
        d.add(f"h{i}", p)
    d.step()  # prefills, on the reference
    recorded: list[list[str]] = []
    real_forward = graphs._forward

    def forward(size: int) -> torch.Tensor:
        with probe:
            out = real_forward(size)
        recorded.append(list(probe.found))
        probe.found.clear()
        return out

    monkeypatch.setattr(graphs, "_forward", forward)
    monkeypatch.setenv("ENGINE_CPU_ATTENTION", "torch")  # not the C kernel, CPU's default
    d.step(dict.fromkeys(["h0", "h1", "h2"], 1))  # the torch reference: reads lengths
    assert "tolist" in recorded[-1], recorded
    monkeypatch.setenv("ENGINE_TRITON_INTERPRET", "1")
    if not kernels._triton_kernels().interpreted:
        pytest.skip("triton was imported for a GPU before the interpreter could be enabled")
    d.step(dict.fromkeys(["h0", "h1", "h2"], 1))  # Triton, padded 3 -> 4
    assert recorded[-1] == [], f"host reads in the captured forward: {recorded[-1]}"
    for i, p in enumerate(PROMPTS[:3]):  # and the interpreted kernels computed the right thing
        assert d.reqs[f"h{i}"].outputs == hf_greedy(p, 3), f"prompt {i}"
    d.close()
