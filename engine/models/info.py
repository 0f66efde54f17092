"""What the scheduler and frontend need to know about a model, read from its directory
without torch: context length, EOS ids, KV geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


#: Architectures whose config.json carries ``sliding_window`` but applies it only with
#: ``use_sliding_window: true`` (transformers' default for them is false).
_WINDOW_OPT_IN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM")


def sliding_window(hf: dict[str, Any]) -> int | None:
    """The attention window a model's ``config.json`` applies, or None: the one parser of
    it (``engine.models.llama`` and the context length both use it)."""
    window = hf.get("sliding_window")
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if not window or not hf.get("use_sliding_window", arch not in _WINDOW_OPT_IN):
        return None
    return int(window)


def context_length(hf: dict[str, Any], requested: int | None,
                   capacity: tuple[int, str] | None = None) -> int:
    """The one ``max_model_len`` check: the model's context (``max_position_embeddings``,
    at most its sliding window: no runner applies the window, past it they would diverge
    from the model), at most ``capacity`` (tokens a runner can hold, and what bounds it),
    and ``requested`` (``--max-model-len``) if given, which may not exceed either."""
    limit = int(hf.get("max_position_embeddings", 2048))
    what = "max_position_embeddings"
    window = sliding_window(hf)
    if window is not None and window < limit:
        limit, what = window, "sliding_window"
    if capacity is not None and capacity[0] < limit:
        limit, what = capacity
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"--max-model-len: {requested} exceeds the model's {what} ({limit})")
    return requested


def read_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    path = resolve_model_path(cfg)
    try:
        hf: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model: cannot read {path / 'config.json'}: {e}") from e
    return hf


def load_model_info(cfg: ModelConfig) -> ModelInfo:
    path = resolve_model_path(cfg)
    hf = read_hf_config(cfg)
    eos: list[int] = []
    gen_path = path / "generation_config.json"
    for source in (json.loads(gen_path.read_text()) if gen_path.exists() else {}, hf):
        value = source.get("eos_token_id")
        if value is not None:
            eos.extend(value if isinstance(value, list) else [value])
    model_len = context_length(hf, cfg.max_model_len)
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
