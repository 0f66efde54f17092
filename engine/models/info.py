"""What the scheduler and frontend need to know about a model, read from its directory
without torch: context length, EOS ids, KV geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    architecture: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int = 0
    intermediate_size: int = 0

    def check_tensor_parallel(self, size: int) -> None:
        """Refuse a tensor-parallel size that does not split the heads and the MLP evenly
        (before any worker starts), naming the flag."""
        bad = [f"{what} ({n})" for what, n in (
            ("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size)) if n % size]
        if bad:
            raise ConfigError(f"--tensor-parallel-size: {size} does not divide the model's "
                              f"{' and '.join(bad)}")

    def kv_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        """Keys and values of ``block_size`` tokens across every layer."""
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_bytes


def resolve_model_path(cfg: ModelConfig) -> Path:
    if cfg.path is None:
        from engine.models.default import default_model_dir

        return default_model_dir()
    return Path(cfg.path)


def load_model_info(cfg: ModelConfig) -> ModelInfo:
    path = resolve_model_path(cfg)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot read {path / 'config.json'}: {e}") from e
    eos: list[int] = []
    gen_path = path / "generation_config.json"
    for source in (json.loads(gen_path.read_text()) if gen_path.exists() else {}, hf):
        value = source.get("eos_token_id")
        if value is not None:
            eos.extend(value if isinstance(value, list) else [value])
    model_len = int(hf.get("max_position_embeddings", 2048))
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        # The native runner attends to the whole context; past the window it would diverge.
        model_len = min(model_len, int(hf["sliding_window"]))
    if cfg.max_model_len is not None:
        if cfg.max_model_len > model_len:
            raise ConfigError(
                f"--max-model-len: {cfg.max_model_len} exceeds the model's "
                f"max_position_embeddings ({model_len})"
            )
        model_len = cfg.max_model_len
    num_heads = int(hf["num_attention_heads"])
    return ModelInfo(
        name=cfg.name,
        path=path,
        architecture=(hf.get("architectures") or ["LlamaForCausalLM"])[0],
        vocab_size=int(hf["vocab_size"]),
        max_model_len=model_len,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        num_layers=int(hf["num_hidden_layers"]),
        num_kv_heads=int(hf.get("num_key_value_heads", num_heads)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        num_heads=num_heads,
        intermediate_size=int(hf.get("intermediate_size", 0)),
    )
