"""A compact Llama-family causal LM: Llama (1-3.x), Mistral, Qwen2, Qwen3.

The family differs only in small switches, read from the checkpoint's ``config.json`` by
``LlamaConfig.from_hf``: biases on the q/k/v projections (Qwen2), per-head q/k RMSNorm
(Qwen3), an explicit ``head_dim`` (Qwen3, some Mistral), rotary scaling (Llama 3.1's
``llama3``), tied embeddings. Everything else is one code path.

``forward`` runs a flat ragged batch (see ``engine.models.layers``) and returns logits only
for ``logits_indices``: the LM head is the largest GEMM of a decode step for small models and
a prefill needs logits for one token per sequence, not for every prompt token.

With a ``TensorParallel`` of size > 1 the model is one rank's shard (Megatron layout, see
``engine.models.parallel``): its ``cfg`` is the per-rank config and every rank returns the
same full logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.models.cpu_linear import Linear, linear
from engine.models.info import sliding_window
from engine.models.layers import (
    SUPPORTED_ROPE_TYPES,
    Attention,
    AttentionMetadata,
    RMSNorm,
    RotaryEmbedding,
    SampledRows,
    SwiGLU,
)
from engine.models.parallel import TensorParallel, shard_config

#: ``architectures[0]`` of the checkpoints this module runs.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    #: Attention window of the checkpoint when it uses one (Mistral v0.1); not applied here,
    #: so contexts longer than it are refused by the runner.
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Parse a Hugging Face ``config.json`` (transformers 4.x or 5.x spelling)."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; the native runner supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {arch}; expected 'silu'")
        num_heads = int(hf["num_attention_heads"])
        attention_bias = bool(hf.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        theta, scaling = _rope_params(hf)
        window = sliding_window(hf)  # the one parser (engine.models.info)
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
        )


def _rope_params(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (4.x); scaling is None for plain rotary."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {**params, "rope_type": rope_type}


class DecoderLayer(nn.Module):
    """``cfg``: this rank's config (``shard_config``) under tensor parallelism ``tp``."""

    def __init__(
        self, cfg: LlamaConfig, *, dtype: torch.dtype, device: Any = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None, tp=tp, **kw,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, tp=tp, **kw)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """The next hidden states of every row, or only of ``sampled.rows``."""
        attn = self.self_attn(self.input_layernorm(h), cos, sin, meta, k_cache, v_cache, sampled)
        # The residual add and the next norm in one pass (attn is fresh: it takes the sum).
        h, normed = self.post_attention_layernorm.add_forward(
            attn, h if sampled is None else h[sampled.rows])
        mlp_out: torch.Tensor = self.mlp(normed)
        return h + mlp_out


class LlamaModel(nn.Module):
    """``cfg``: this rank's config (``shard_config``) under tensor parallelism ``tp``."""

    def __init__(
        self, cfg: LlamaConfig, *, dtype: torch.dtype, device: Any = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp=tp, **kw) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)


class LlamaForCausalLM(nn.Module):
    """Parameter names mirror Hugging Face's, except the fused ``qkv_proj`` and
    ``gate_up_proj`` (see ``engine.models.loader``).

    Construct on ``device="meta"`` to skip weight initialisation, then ``to_empty`` and
    ``init_rotary`` on the real device before loading weights (the loader does this).

    ``cfg`` is the checkpoint's config; with ``tp`` of size > 1 the module is this rank's
    shard: ``self.cfg`` is then the per-rank config (``shard_config``: this rank's heads, KV
    heads and intermediate features, which size its KV cache) and ``self.full_cfg`` the
    checkpoint's. Unsharded (``tp`` None or of size 1) both are ``cfg``.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        max_positions: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.full_cfg = cfg
        self.cfg = cfg = shard_config(cfg, tp)
        self.tp = tp
        self.dtype = dtype
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.model = LlamaModel(cfg, dtype=dtype, device=device, tp=tp)
        # Tied embeddings reuse embed_tokens.weight in forward rather than sharing one
        # Parameter between two modules, which to_empty() would silently untie.
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        )
        self.rotary: RotaryEmbedding | None = None
        if torch.device(device or "cpu").type != "meta":
            self.init_rotary(device)

    def init_rotary(self, device: Any) -> None:
        c = self.cfg
        self.rotary = RotaryEmbedding(
            c.head_dim, self.max_positions, c.rope_theta, c.rope_scaling,
            dtype=self.dtype, device=device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """Logits (float32 ``[len(logits_indices), vocab]``) of the flat batch's tokens at
        ``logits_indices``; writes every token's KV into ``kv_caches`` (one (k, v) per layer).

        ``sampled``: ``logits_indices`` described as ``SampledRows`` (each row the last new
        token of its sequence), for a last layer that computes only those rows: in a
        prefill chunk of 512 tokens with a few sequences ending in it, the last layer's
        query, attention, output projection and MLP shrink to those few rows (a quarter of
        a 4-layer model's prefill FLOPs). The caller vouches that it matches.
        """
        if self.rotary is None:
            raise RuntimeError("init_rotary() was not called after building on meta")
        cos, sin = self.rotary.lookup(positions)
        h = self.model.embed_tokens(input_ids)
        last = len(self.model.layers) - 1
        for i, (layer, (k_cache, v_cache)) in enumerate(
                zip(self.model.layers, kv_caches, strict=True)):
            h = layer(h, cos, sin, meta, k_cache, v_cache, sampled if i == last else None)
        # Norm and LM head only on the rows that sample: both are per-token.
        h = self.model.norm(h if sampled is not None else h[logits_indices])
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        return linear(h, weight).float()
