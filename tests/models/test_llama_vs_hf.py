"""The native Llama-family forward against Hugging Face transformers on random tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models.paged import ragged_logits

from engine.models.loader import load_model, read_config

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    initializer_range=0.08, rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "llama3-tied": lambda: transformers.LlamaConfig(
        **COMMON, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
    "llama-bias": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**{**COMMON, "num_key_value_heads": 1}),
    "qwen2-tied": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
}


def save_random_model(kind: str, path: Path, seed: int = 0, **save_kw: object) -> Path:
    torch.manual_seed(seed)
    cfg = CONFIGS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if kind == "llama-bias" or kind.startswith("qwen2"):
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.1)
    model.save_pretrained(path, **save_kw)
    return path


def hf_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([p])).logits[0] for p in prompts]


PROMPTS = [[5, 9, 2, 33, 71, 8, 1, 0, 64], [3], list(range(40, 90)), [96, 95, 94, 4, 4, 4, 4]]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_hf(kind: str, tmp_path: Path) -> None:
    path = save_random_model(kind, tmp_path / kind)
    model = load_model(path, dtype=torch.float32)
    got = ragged_logits(model, PROMPTS)
    want = hf_logits(path, PROMPTS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_sharded_checkpoint_and_legacy_config(tmp_path: Path) -> None:
    """A sharded save (index.json) and a transformers-4.x config.json (rope_theta +
    rope_scaling) load to the same logits."""
    path = save_random_model("llama3-tied", tmp_path / "m", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    want = hf_logits(path, PROMPTS[:2])
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg))
    assert read_config(path).rope_scaling == {**rope}
    got = ragged_logits(load_model(path, dtype=torch.float32), PROMPTS[:2])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype: torch.dtype, tmp_path: Path) -> None:
    """Half-precision loads convert every weight and stay close to the float32 logits."""
    path = save_random_model("qwen3", tmp_path / "m")
    want = hf_logits(path, PROMPTS[:1])[0]
    model = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    got = ragged_logits(model, PROMPTS[:1])[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = save_random_model("llama", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM"):
        load_model(path, dtype=torch.float32)


def test_missing_and_unexpected_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = save_random_model("llama", tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.mlp\.gate_up_proj\.weight"):
        load_model(path, dtype=torch.float32)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.extra\.weight'"):
        load_model(path, dtype=torch.float32)


def test_resolve_dtype() -> None:
    from engine.models.loader import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "cpu")
