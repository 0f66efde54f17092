"""Worker bring-up: the one KV block sizing both runners use, the one device resolution,
and the vllm package's import direction (the factory imports it, never the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, ConfigError, ModelConfig
from engine.models.info import load_model_info
from engine.resolve import kv_cache_blocks, torch_device, vllm_num_blocks

INFO = load_model_info(ModelConfig())


def test_kv_cache_blocks_sizes_the_memory_and_refuses_too_few() -> None:
    per_block = INFO.kv_bytes_per_block(16, 4)
    cache = CacheConfig(block_size=16, kv_cache_memory_gib=100 * per_block / (1 << 30))
    assert kv_cache_blocks(cache, INFO, 4) == 100
    assert kv_cache_blocks(cache, INFO, 4, tp_size=2) == 200  # a rank holds half the heads
    assert kv_cache_blocks(cache, INFO, 4, reserved=1) == 99  # vLLM's block 0
    assert vllm_num_blocks(cache, INFO, "auto", "cpu") == 99  # float32 on CPU
    assert kv_cache_blocks(CacheConfig(block_size=16, num_blocks=7), INFO, 4, reserved=1) == 7
    tiny = CacheConfig(block_size=16, kv_cache_memory_gib=2.5 * per_block / (1 << 30))
    with pytest.raises(ConfigError, match=r"^--kv-cache-memory: .* holds 1 blocks of 16 tokens "
                                          r"besides 1 reserved; at least 2 are needed"):
        kv_cache_blocks(tiny, INFO, 4, reserved=1)
    assert kv_cache_blocks(tiny, INFO, 4, reserved=1, check=False) == 1


def test_torch_device_resolves_auto_and_checks_cuda() -> None:
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device(torch.device("cpu")) == torch.device("cpu")
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            torch_device("cuda:1")


def test_vllm_package_never_imports_the_factory() -> None:
    package = Path(__file__).parents[2] / "engine" / "worker" / "vllm"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith(("engine.worker.factory",
                                                          "engine.worker.process"))], path
