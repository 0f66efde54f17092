"""Write a random-weight Llama model directory that ``python -m engine.launch`` serves.

    python -m bench.random_model OUTDIR [--preset llama3-8b] [--device cuda] [--seed 0]

For serving benchmarks where no checkpoint can be downloaded (the lent GPU machine reaches
nothing): ``config.json`` with the preset's shapes (``llama3-8b``: Llama-3-8B's 32 layers,
hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocabulary 128256, llama3
rope; ``gqa-small``: 4 layers, hidden 256, 8/2 heads, the saturation benchmark's model
(issue 15); ``tiny``: a few MiB, for dry runs), ``generation_config.json``, the weights in bf16
safetensors shards of at most ``--shard-gib`` with Hugging Face's names and an index (so
transformers loads the directory too), and a tokenizer.

Weights are normal(0, 0.02), norms 1, drawn on ``--device`` (a GPU draws 8 B values in well
under a second; the time goes to writing 16 GB). Outputs of such a model are noise, but
every byte a step reads is real, which is what throughput depends on.

The tokenizer: the default model's files (``engine/models/tiny_stdlib_llama``) when its
vocabulary is the preset's (``tiny``); otherwise a word-level tokenizer with exactly the
preset's vocabulary, token ``i`` spelled ``<i>``, so every id the model can emit decodes and
a prompt of ids (what ``bench.loadgen`` sends) is taken as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.models.default import COMMITTED_DIR

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    # The issue-15 saturation model: one this project was not trained on (4 layers, hidden
    # 256, GQA 8 query / 2 KV heads of 32, the default model's vocabulary and tokenizer).
    "gqa-small": {
        "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": 0,
    },
    "tiny": {
        "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": 0,
    },
}


def hf_config(preset: str) -> dict[str, Any]:
    """The ``config.json`` of a preset (transformers' Llama spelling)."""
    shapes = PRESETS[preset]
    rope = {"rope_type": "default", "rope_theta": shapes["rope_theta"]}
    if shapes["rope_scaling"]:
        rope = {**shapes["rope_scaling"], "rope_theta": shapes["rope_theta"]}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "dtype": "bfloat16", "rope_parameters": rope, **shapes,
    }


def weight_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every weight of a Llama checkpoint, in Hugging Face's names, in layer order."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (q, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, q)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (cfg["vocab_size"], hidden)


def write_weights(cfg: dict[str, Any], out: Path, device: torch.device, seed: int,
                  shard_bytes: int) -> int:
    """Random bf16 weights in shards of at most ``shard_bytes``; returns the total bytes."""
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, shape in weight_shapes(cfg):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(
                0.0, 0.02, generator=gen)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
        shard.clear()  # free this shard's device memory before the next one is copied
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def write_tokenizer(cfg: dict[str, Any], out: Path) -> str:
    """The default model's tokenizer when its vocabulary is the model's, else a word-level
    one with exactly ``vocab_size`` tokens; returns which."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if Tokenizer.from_file(str(COMMITTED_DIR / "tokenizer.json")).get_vocab_size() == cfg[
            "vocab_size"]:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(COMMITTED_DIR / name, out / name)
        return "default model's"

    vocab = {f"<{i}>": i for i in range(cfg["vocab_size"])}
    eos = f"<{cfg['eos_token_id']}>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
        "model_max_length": cfg["max_position_embeddings"]}))
    return f"word-level, {cfg['vocab_size']} tokens"


def write_model_dir(out: Path, preset: str, device: torch.device, seed: int = 0,
                    shard_gib: float = 4.0) -> dict[str, Any]:
    """Write the whole directory; returns what was written (for a benchmark's record)."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(preset)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}))
    nbytes = write_weights(cfg, out, device, seed, int(shard_gib * (1 << 30)))
    tokenizer = write_tokenizer(cfg, out)
    return {"path": str(out), "preset": preset, "weight_bytes": nbytes,
            "tokenizer": tokenizer, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.random_model",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gib", type=float, default=4.0)
    args = p.parse_args(argv)
    done = write_model_dir(args.outdir, args.preset, torch.device(args.device), args.seed,
                           args.shard_gib)
    print(json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
