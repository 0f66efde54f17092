"""Load a Hugging Face model directory (config.json + safetensors) into the native model.

The model is built on the meta device (no random initialisation of weights that are
overwritten anyway), allocated uninitialised on the target device, then filled tensor by
tensor straight from the memory-mapped safetensors files, converting dtype on the copy: peak
host memory is one tensor beyond the model itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.models.llama import LlamaConfig, LlamaForCausalLM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# HF weight name -> (our parameter name, shard name) for the fused projections.
_FUSED = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_FUSED_TARGET = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}
# Checkpoint entries that are not weights of this model (older exports carry them).
_IGNORED = re.compile(r"\.rotary_emb\.")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is float32 on CPU (fast, exact kernels there) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {name!r}; expected one of auto, {', '.join(_DTYPES)}"
        ) from None


def read_config(path: Path) -> LlamaConfig:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path / 'config.json'}: {e}") from e
    return LlamaConfig.from_hf(hf)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    max_positions: int | None = None,
) -> LlamaForCausalLM:
    """Build the model of ``path`` and load its weights; raises ValueError on unsupported
    architectures, missing files, and missing or unexpected weights."""
    path = Path(path)
    cfg = read_config(path)
    model = LlamaForCausalLM(cfg, max_positions=max_positions, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.init_rotary(device)
    params = dict(model.named_parameters())
    filled: dict[str, int] = dict.fromkeys(params, 0)  # rows written, per parameter
    for name, tensor in _iter_safetensors(path):
        if _IGNORED.search(name) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        target, rows = _place(name, cfg)
        if target not in params:
            raise ValueError(f"{path}: unexpected weight {name!r} for {cfg.architecture}")
        dest = params[target].data
        if rows is not None:
            dest = dest[rows[0] : rows[1]]
        if dest.shape != tensor.shape:
            raise ValueError(
                f"{path}: weight {name!r} has shape {list(tensor.shape)}, expected "
                f"{list(dest.shape)} from config.json"
            )
        dest.copy_(tensor)  # converts dtype, moves to device
        filled[target] += dest.shape[0]
    missing = [n for n, p in params.items() if filled[n] != p.shape[0]]
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}")
    return model.eval()


def _place(name: str, cfg: LlamaConfig) -> tuple[str, tuple[int, int] | None]:
    """Our parameter and row range for an HF weight (None = the whole parameter)."""
    m = _FUSED.match(name)
    if m is None:
        return name, None
    prefix, shard, kind = m.groups()
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    start, size = {
        "q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
        "gate_proj": (0, inter), "up_proj": (inter, inter),
    }[shard]
    return f"{prefix}.{_FUSED_TARGET[shard]}.{kind}", (start, start + size)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (only safetensors checkpoints load)")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
