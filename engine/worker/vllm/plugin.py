"""The project's Triton kernels as vLLM's CUSTOM attention backend (a ``vllm.general_plugins``
entry point, see pyproject.toml).

vLLM calls ``register()`` in every process that builds a worker. It maps
``AttentionBackendEnum.CUSTOM`` to ``EngineAttentionBackend`` below; vLLM uses it only when
asked: ``attention_backend="CUSTOM"``, which the vllm runner passes when
``ENGINE_VLLM_ATTENTION=engine`` is set (``python -m engine.launch --runner vllm`` on a CUDA
host). Otherwise nothing changes: vLLM keeps its own backend (FlashAttention on CUDA,
CPU_ATTN on CPU, which ignores any other choice).

The backend delegates to ``kernels.write_kv`` (new keys/values into the paged cache) and
``kernels.paged_attention`` (causal attention of the ragged batch over it). What runs without
CUDA, and is tested on CPU: registration, the backend's declarations, metadata building from
vLLM's ``CommonAttentionMetadata``, and the K/V views of vLLM's cache tensor. The forward
pass is GPU-only and untested until a GPU with vLLM is available (docs/vllm.md): vLLM 0.32
packs each slot's K and V side by side (``[blocks, kv_heads, block_size, 2 * head_size]``,
stored block-size-major), so the K and V views are strided, and ``kernels`` checks for
contiguous caches (its Triton kernels already take strides; the check is the one thing to
relax).

Imports of vLLM are lazy inside functions, or guarded, so the module itself imports anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

log = logging.getLogger(__name__)

#: Name of the backend in vLLM's registry and logs.
BACKEND_NAME = "CUSTOM"  # ``ENGINE_VLLM_ATTENTION=engine`` selects it (checks.py)
BACKEND_PATH = "engine.worker.vllm.plugin.EngineAttentionBackend"

try:  # vLLM's base classes when it is installed; plain objects otherwise
    from vllm.v1.attention.backend import (
        AttentionBackend as _Backend,
    )
    from vllm.v1.attention.backend import (
        AttentionImpl as _Impl,
    )
    from vllm.v1.attention.backend import (
        AttentionMetadataBuilder as _Builder,
    )
    from vllm.v1.attention.backend import (
        MultipleOf,
    )
except ImportError:  # pragma: no cover - exercised only without vLLM
    _Backend = _Impl = _Builder = object  # type: ignore[assignment,misc]
    MultipleOf = None  # type: ignore[assignment,misc]


def register() -> None:
    """vLLM's ``vllm.general_plugins`` hook: register the CUSTOM attention backend. Cheap and
    idempotent (vLLM may call it several times per process)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    log.debug("registered %s as vLLM's CUSTOM attention backend", BACKEND_PATH)


@dataclass
class EngineAttentionMetadata:
    """What ``kernels.paged_attention`` / ``kernels.write_kv`` take, per step."""

    num_actual_tokens: int  # tokens before any padding (CUDA graphs pad the batch)
    query_start_loc: torch.Tensor  # int32 [batch + 1]
    seq_lens: torch.Tensor  # int32 [batch], context incl. the new tokens
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens], -1 = padding (skipped)
    max_query_len: int
    is_decode_only: bool  # one new token per sequence: the decode kernel


def kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[num_blocks, block_size, num_kv_heads, head_size]`` (the layout
    ``kernels`` uses) of one layer's vLLM 0.32 cache, logically
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` with K then V in the last
    dimension. No copy: the views share the cache's memory."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"expected a [blocks, kv_heads, block_size, 2 * {head_size}] KV cache, "
                         f"got {list(kv_cache.shape)}")
    key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key, value


class EngineAttentionMetadataBuilder(_Builder):  # type: ignore[misc,valid-type]
    """Builds ``EngineAttentionMetadata`` from vLLM's per-batch ``CommonAttentionMetadata``:
    the tensors already have our kernels' dtypes and meaning, so this is a view, no copy."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
                 device: torch.device) -> None:
        self.kv_cache_spec = kv_cache_spec
        self.layer_names = layer_names
        self.vllm_config = vllm_config
        self.device = device

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> EngineAttentionMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        return EngineAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc[: num_reqs + 1].to(torch.int32),
            seq_lens=m.seq_lens[:num_reqs].to(torch.int32),
            block_tables=m.block_table_tensor[:num_reqs].to(torch.int32),
            slot_mapping=m.slot_mapping[: m.num_actual_tokens].to(torch.int64),
            max_query_len=m.max_query_len,
            is_decode_only=m.max_query_len == 1,
        )


class EngineAttentionImpl(_Impl):  # type: ignore[misc,valid-type]
    """Decoder self-attention through ``kernels`` (GPU-only, see the module doc)."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = "decoder",
                 kv_sharing_target_layer_name: str | None = None, **extra: Any) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window not in (None, -1),
            "logits_soft_cap": bool(logits_soft_cap),
            "kv_cache_dtype": kv_cache_dtype != "auto",
            "attn_type": str(getattr(attn_type, "value", attn_type)) != "decoder",
            "kv_sharing": kv_sharing_target_layer_name is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"the engine attention backend does not support {bad}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: EngineAttentionMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if attn_metadata is None:  # a profiling run: nothing to attend to
            return output.fill_(0)
        import kernels

        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        k_cache, v_cache = kv_views(kv_cache, self.head_size)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise NotImplementedError(
                "kernels.write_kv/paged_attention take contiguous K and V caches, but vLLM "
                "0.32 packs K|V per slot (strided views); relax the contiguity check in "
                "kernels (its Triton kernels take strides) to run this backend, see docs/vllm.md"
            )
        kernels.write_kv(k, v, k_cache, v_cache, attn_metadata.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, attn_metadata.query_start_loc,
                                      attn_metadata.seq_lens, attn_metadata.block_tables,
                                      self.scale)
        output[:n].view(n, self.num_heads * self.head_size).copy_(out.reshape(n, -1))
        return output


class EngineAttentionBackend(_Backend):  # type: ignore[misc,valid-type]
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[EngineAttentionImpl]:
        return EngineAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[EngineAttentionMetadataBuilder]:
        return EngineAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[Any]:
        # Our kernels take any block size; 16 keeps the same tiles as the native runner.
        return [MultipleOf(16)] if MultipleOf is not None else [16]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [16, 32, 64, 128, 256]  # powers of two: what the Triton kernels compile

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in cls.get_supported_head_sizes()
