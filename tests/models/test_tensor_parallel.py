"""Tensor parallelism of the native Llama-family model: two CPU ranks (gloo) against the
unsharded model, plus the sharded loader and ``shard_config`` in process."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models.paged import ragged_logits

from engine.models.llama import LlamaConfig
from engine.models.loader import load_model, read_config
from engine.models.parallel import TensorParallel, shard_config

# llama: GQA (4 heads / 2 KV heads); llama-bias: q/k/v/o and MLP biases, all nonzero;
# qwen2-tied: qkv bias, tied embeddings; qwen3: q/k norms, explicit head_dim.
KINDS = ["llama", "llama-bias", "qwen2-tied", "qwen3"]
PROMPTS = [[5, 9, 2, 33, 71, 8, 1, 0, 64], [3], list(range(40, 90)), [96, 95, 94, 4, 4, 4, 4]]
MISSING = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random HF checkpoint per kind, plus ``broken``: llama without ``MISSING``."""
    pytest.importorskip("transformers")
    from models.test_llama_vs_hf import save_random_model
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tp")
    paths = {kind: save_random_model(kind, root / kind) for kind in KINDS}
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((paths["llama"] / "config.json").read_text())
    weights = load_file(paths["llama"] / "model.safetensors")
    del weights[MISSING]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    paths["broken"] = broken
    return paths


def _rank_main(rank: int, store: str, paths: dict[str, str], out: str) -> None:
    """One of two ranks: load each checkpoint's shard, save its logits to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        # A group of its own rather than the default one: the model must use tp.group.
        tp = TensorParallel(rank=rank, size=2, group=dist.new_group([0, 1]))
        results: dict[str, Any] = {}
        for kind in KINDS:
            model = load_model(paths[kind], dtype=torch.float32, tp=tp)
            assert model.tp is tp
            assert model.cfg == shard_config(read_config(Path(paths[kind])), tp)
            results[kind] = ragged_logits(model, PROMPTS)
        results["broken"] = "loaded without error"
        try:
            load_model(paths["broken"], dtype=torch.float32, tp=tp)
        except ValueError as e:
            results["broken"] = str(e)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_unsharded(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    want = {kind: ragged_logits(load_model(checkpoints[kind], dtype=torch.float32), PROMPTS)
            for kind in KINDS}
    paths = {kind: str(p) for kind, p in checkpoints.items()}
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), paths, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in KINDS:
        for r0, r1, w in zip(got[0][kind], got[1][kind], want[kind], strict=True):
            assert torch.equal(r0, r1), f"{kind}: ranks disagree"
            torch.testing.assert_close(r0, w, atol=1e-5, rtol=1e-5, msg=_prefixed(kind))
    for r in range(2):
        assert "weights missing" in got[r]["broken"]
        assert "layers.1.mlp.gate_up_proj.weight" in got[r]["broken"]


def _prefixed(kind: str) -> Callable[[str], str]:
    return lambda msg: f"{kind}: {msg}"


def test_shards_hold_their_slices(checkpoints: dict[str, Path]) -> None:
    """Each rank's parameters are its blocks of the unsharded ones (no process group is needed
    to load: only forward communicates)."""
    full = load_model(checkpoints["llama-bias"], dtype=torch.float32)
    c = full.cfg
    hd, q, kv, inter = c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    fp = dict(full.named_parameters())
    for rank in range(2):
        shard = load_model(checkpoints["llama-bias"], dtype=torch.float32,
                           tp=TensorParallel(rank=rank, size=2))
        assert (shard.cfg.num_heads, shard.cfg.num_kv_heads, shard.cfg.intermediate_size) == (
            c.num_heads // 2, c.num_kv_heads // 2, inter // 2)
        assert shard.full_cfg == c
        sp = dict(shard.named_parameters())
        assert sp.keys() == fp.keys()
        ql, kvl, il = q // 2, kv // 2, inter // 2
        for i in range(c.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            for kind in ("weight", "bias"):
                qkv = fp[a + "qkv_proj." + kind]
                want = torch.cat([qkv[rank * ql : (rank + 1) * ql],
                                  qkv[q + rank * kvl : q + (rank + 1) * kvl],
                                  qkv[q + kv + rank * kvl : q + kv + (rank + 1) * kvl]])
                assert torch.equal(sp[a + "qkv_proj." + kind], want)
                gu = fp[m + "gate_up_proj." + kind]
                want = torch.cat([gu[rank * il : (rank + 1) * il],
                                  gu[inter + rank * il : inter + (rank + 1) * il]])
                assert torch.equal(sp[m + "gate_up_proj." + kind], want)
            assert torch.equal(sp[a + "o_proj.weight"], fp[a + "o_proj.weight"][:, rank * ql : (rank + 1) * ql])
            assert torch.equal(sp[m + "down_proj.weight"], fp[m + "down_proj.weight"][:, rank * il : (rank + 1) * il])
            # Row-parallel biases are whole on every rank: added once, after the all-reduce.
            assert torch.equal(sp[a + "o_proj.bias"], fp[a + "o_proj.bias"])
            assert torch.equal(sp[m + "down_proj.bias"], fp[m + "down_proj.bias"])
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                     "model.layers.0.input_layernorm.weight"):
            assert torch.equal(sp[name], fp[name])
        assert ql == 2 * hd  # two of the four query heads, one of the two KV heads


def test_sharded_load_checks_weights(checkpoints: dict[str, Path]) -> None:
    tp = TensorParallel(rank=1, size=2)
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.mlp\.gate_up_proj\.weight"):
        load_model(checkpoints["broken"], dtype=torch.float32, tp=tp)


@pytest.mark.parametrize("tp", [None, TensorParallel(rank=0, size=1)])
def test_unsharded_loads_as_before(checkpoints: dict[str, Path], tp: TensorParallel | None) -> None:
    path = checkpoints["qwen3"]
    base = load_model(path, dtype=torch.float32)
    model = load_model(path, dtype=torch.float32, tp=tp)
    assert model.cfg == base.cfg == read_config(path)
    assert model.tp == tp
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    for g, w in zip(ragged_logits(model, PROMPTS), ragged_logits(base, PROMPTS), strict=True):
        assert torch.equal(g, w)


def _hf_config(**over: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 48,
            "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 6,
            "num_key_value_heads": 3, **over}


def test_shard_config_must_divide(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_hf(_hf_config())  # 6 heads, 3 KV heads, 96 intermediate
    tp2 = TensorParallel(rank=0, size=2)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2 .*num_key_value_heads \(3\)"):
        shard_config(cfg, tp2)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 4 .*num_attention_heads \(6\)"):
        shard_config(dataclasses.replace(cfg, num_kv_heads=4), TensorParallel(rank=0, size=4))
    three = shard_config(cfg, TensorParallel(rank=2, size=3))
    assert (three.num_heads, three.num_kv_heads, three.intermediate_size) == (2, 1, 32)
    assert three.head_dim == cfg.head_dim == 8 and three.hidden_size == 48
    assert shard_config(cfg, None) is cfg
    assert shard_config(cfg, TensorParallel(rank=0, size=1)) is cfg
    # load_model refuses before reading any weight (the directory holds only config.json).
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    with pytest.raises(ValueError, match="--tensor-parallel-size 2"):
        load_model(tmp_path, dtype=torch.float32, tp=tp2)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        TensorParallel(rank=2, size=2)
