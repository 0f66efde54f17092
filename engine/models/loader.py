"""Load a Hugging Face model directory (config.json + safetensors) into the native model.

The model is built on the meta device (no random initialisation of weights that are
overwritten anyway), allocated uninitialised on the target device, then filled tensor by
tensor straight from the memory-mapped safetensors files, converting dtype on the copy: peak
host memory is one tensor beyond the model itself.

Under tensor parallelism (``tp`` of size > 1) the model is this rank's shard and only this
rank's slice of each split weight is read (``safe_open(...).get_slice``): rows of the
column-parallel q/k/v and gate/up projections, input columns of the row-parallel o and down
projections; everything else (norms, embeddings, LM head, row-parallel biases) whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.models.llama import LlamaConfig, LlamaForCausalLM
from engine.models.parallel import TensorParallel

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# HF weight name -> (our parameter name, shard name) for the fused projections.
_FUSED = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_FUSED_TARGET = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}
# Row-parallel weights: a rank holds a block of their input columns.
_ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj)\.weight$")
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
    tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """Build the model of ``path`` and load its weights; raises ValueError on unsupported
    architectures, missing files, and missing or unexpected weights.

    With ``tp`` of size > 1: this rank's shard, whose ``cfg`` is the per-rank config
    (ValueError when the heads, KV heads or intermediate size do not split evenly)."""
    path = Path(path)
    model = LlamaForCausalLM(
        read_config(path), max_positions=max_positions, dtype=dtype, device="meta", tp=tp
    )
    model.to_empty(device=device)
    model.init_rotary(device)
    cfg = model.cfg  # this rank's
    params = dict(model.named_parameters())
    filled: dict[str, int] = dict.fromkeys(params, 0)  # rows written, per parameter
    for name, f in _iter_safetensors(path):
        if _IGNORED.search(name) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        target, rows, split = _place(name, cfg)
        if target not in params:
            raise ValueError(f"{path}: unexpected weight {name!r} for {cfg.architecture}")
        dest = params[target].data
        if rows is not None:
            dest = dest[rows[0] : rows[1]]
        if tp is not None and tp.size > 1 and split is not None:
            # The checkpoint holds every rank's block along `split`: read only this rank's.
            src = f.get_slice(name)
            n = dest.shape[split]
            want = [d * tp.size if i == split else d for i, d in enumerate(dest.shape)]
            if list(src.get_shape()) != want:
                raise _shape_error(path, name, list(src.get_shape()), want)
            tensor = src[(slice(None),) * split + (slice(tp.rank * n, (tp.rank + 1) * n),)]
        else:
            tensor = f.get_tensor(name)
            if dest.shape != tensor.shape:
                raise _shape_error(path, name, list(tensor.shape), list(dest.shape))
        dest.copy_(tensor)  # converts dtype, moves to device
        filled[target] += dest.shape[0]
    missing = [n for n, p in params.items() if filled[n] != p.shape[0]]
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}")
    return model.eval()


def _shape_error(path: Path, name: str, got: list[int], want: list[int]) -> ValueError:
    return ValueError(
        f"{path}: weight {name!r} has shape {got}, expected {want} from config.json"
    )


def _place(name: str, cfg: LlamaConfig) -> tuple[str, tuple[int, int] | None, int | None]:
    """Our parameter, its row range for an HF weight (None = the whole parameter), and the
    dimension along which tensor parallelism splits the HF weight (None = replicated).

    ``cfg`` is this rank's config: row ranges are within this rank's fused parameter."""
    m = _FUSED.match(name)
    if m is None:
        return name, None, 1 if _ROW_PARALLEL.search(name) else None
    prefix, shard, kind = m.groups()
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    start, size = {
        "q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
        "gate_proj": (0, inter), "up_proj": (inter, inter),
    }[shard]
    return f"{prefix}.{_FUSED_TARGET[shard]}.{kind}", (start, start + size), 0


def _iter_safetensors(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, open safetensors file holding it), file by file; read with ``get_tensor`` or
    ``get_slice`` before the next item."""
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
                yield name, f
