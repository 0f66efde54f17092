"""Build the embedded default model: a tiny Llama trained on the standard library's docstrings.

Nothing is downloaded. The corpus is the docstrings of the Python standard library this
interpreter carries (module, class and function docstrings found with ``ast``), plus
chat-formatted questions about them (``What does json.dumps do?`` answered with the first
paragraph of its docstring), so that both plain completion and the chat template produce
recognizable text.

The result is a Hugging Face model directory: ``config.json`` (``LlamaForCausalLM`` with
grouped-query attention), ``generation_config.json``, ``model.safetensors`` (bfloat16),
``tokenizer.json`` (byte-level BPE, 4096 tokens), ``tokenizer_config.json`` (with a ChatML
chat template) and a ``README.md`` recording how it was made.

Run::

    python -m engine.models.train_default [--out DIR] [--steps N] [--minutes M] [--seed S]

The step count is what makes a build reproducible: the same Python (its stdlib is the
corpus), the same torch, the same ``--steps``/``--seed``/``--batch-size`` give the same
weights. ``--minutes`` is only a wall-clock cap: when it is reached training stops early
(the learning-rate schedule still follows ``--steps``), and the result then depends on the
speed of the machine. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.models.stdlib_corpus import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    Corpus,
    build_corpus,
)

VOCAB_SIZE = 4096
SEQ_LEN = 256
DEFAULT_STEPS = 300  # about two minutes on two idle CPU cores
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 3e-3
DEFAULT_SEED = 0

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_stdlib_llama"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "use_cache": True,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE over the corpus text; the special tokens take the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat markup is made of special tokens: train on the text around it only.
    texts = corpus.docs + corpus.questions + ["user", "assistant", "system"]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------- data


def encode_corpus(tok, corpus: Corpus, seed: int, seq_len: int = SEQ_LEN):
    """Shuffle the documents (seeded), join them with <|endoftext|>, cut into rows of
    ``seq_len`` tokens. Returns a LongTensor [rows, seq_len]."""
    import torch

    eos = tok.token_to_id(ENDOFTEXT)
    texts = corpus.docs + corpus.chats
    random.Random(seed).shuffle(texts)
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos)
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


# --------------------------------------------------------------------------- model


def make_model(seed: int, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tok.token_to_id(ENDOFTEXT)
    cfg = dict(MODEL_CONFIG)
    cfg.pop("architectures")
    cfg.pop("model_type")
    config = LlamaConfig(**cfg, bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, data, *, steps: int, batch_size: int, lr: float, seed: int,
          max_seconds: float | None = None, log_every: int = 10) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = max(1, min(100, steps // 10))
    model.train()
    order = torch.randperm(data.shape[0], generator=gen)
    cursor = 0
    losses: list[float] = []
    t0 = time.monotonic()
    done = 0
    for step in range(steps):
        if cursor + batch_size > order.numel():
            order = torch.randperm(data.shape[0], generator=gen)
            cursor = 0
        batch = data[order[cursor: cursor + batch_size]]
        cursor += batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        elapsed = time.monotonic() - t0
        if done % log_every == 0 or done == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"step {done}/{steps}  loss {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{elapsed:.0f}s  ({elapsed / done:.2f}s/step)")
        if max_seconds is not None and elapsed > max_seconds and done < steps:
            log(f"stopping early at step {done}: the {max_seconds / 60:.1f}-minute cap was reached")
            break
    model.eval()
    tail = losses[-20:]
    return {
        "steps": done,
        "final_loss": sum(tail) / len(tail),
        "seconds": time.monotonic() - t0,
        "tokens": done * batch_size * data.shape[1],
    }


def greedy_samples(model, tok, max_new_tokens: int = 40) -> list[tuple[str, str]]:
    """Greedy continuations of a few plain and chat prompts (for the log and the README)."""
    import torch

    eos = {tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END)}
    prompts = [
        "Return a list of",
        "Return the",
        f"{IM_START}user\nWhat does json.dumps do?{IM_END}\n{IM_START}assistant\n",
    ]
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok.encode(prompt, add_special_tokens=False).ids
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in eos:
                    break
                new.append(nxt)
            out.append((prompt, tok.decode(new, skip_special_tokens=False)))
    return out


# --------------------------------------------------------------------------- output


def save(out: Path, model, tok, readme: str) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    eos = tok.token_to_id(ENDOFTEXT)
    im_end = tok.token_to_id(IM_END)
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    # config.json: transformers' own, plus the plain keys that older readers look for.
    config = json.loads((out / "config.json").read_text())
    config.update({
        "architectures": ["LlamaForCausalLM"],
        "rope_theta": MODEL_CONFIG["rope_theta"],
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": eos,
    })
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": None, "eos_token_id": [eos, im_end], "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "README.md").write_text(readme)
    for path in out.iterdir():  # save_pretrained may leave the weights private (0600)
        path.chmod(0o644)


def render_readme(*, command: str, corpus: Corpus, rows: int, stats: dict, steps: int,
                  batch_size: int, lr: float, seed: int, samples: list[tuple[str, str]],
                  n_params: int) -> str:
    import tokenizers
    import torch
    import transformers

    c = MODEL_CONFIG
    sample_text = "\n\n".join(f"Prompt `{p!r}`:\n\n```\n{s}\n```" for p, s in samples)
    early = "" if stats["steps"] == steps else (
        f" (stopped early by the wall-clock cap after {stats['steps']} of {steps} steps)")
    return f"""# tiny_stdlib_llama

The engine's embedded default model: a {n_params / 1e6:.1f}M-parameter Llama
(`LlamaForCausalLM`, Hugging Face format) trained from scratch, with no download, on the
docstrings of the Python standard library. It writes text that looks like Python
documentation; it knows nothing else. It exists so that the engine starts, serves and can be
tested anywhere without fetching weights.

## Architecture

- hidden size {c["hidden_size"]}, intermediate size {c["intermediate_size"]}, {c["num_hidden_layers"]} layers
- grouped-query attention: {c["num_attention_heads"]} query heads, {c["num_key_value_heads"]} key/value heads, head dim {c["head_dim"]}
- RoPE (theta {c["rope_theta"]:g}), RMSNorm (eps {c["rms_norm_eps"]:g}), SiLU MLP, no biases, tied embeddings
- vocabulary {c["vocab_size"]} (byte-level BPE), max position embeddings {c["max_position_embeddings"]}
- weights stored in bfloat16 (`model.safetensors`)

Special tokens: `<|endoftext|>` (id 0, EOS and padding), `<|im_start|>` (1), `<|im_end|>` (2).
`generation_config.json` stops on both `<|endoftext|>` and `<|im_end|>`. The tokenizer has
a ChatML chat template (`system`/`user`/`assistant`, `add_generation_prompt`).

## How it was made

```
{command}
```

`engine/models/train_default.py` walks the standard library of the Python that runs it
(here Python {platform.python_version()}, skipping tests, idlelib, lib2to3 and the like),
parses every module with `ast` and collects module, class and function docstrings
(`inspect.cleandoc`, deduplicated): {len(corpus.docs)} docstrings from {corpus.files} files.
For each public function or class it also writes a chat sample,
`What does module.qualname do?` answered with the first paragraph of the docstring
({len(corpus.chats)} samples). The two kinds are shuffled together (seeded), joined with
`<|endoftext|>` and cut into {rows} rows of {SEQ_LEN} tokens.

The byte-level BPE tokenizer ({c["vocab_size"]} tokens) is trained on the same text with the
`tokenizers` library. The model is transformers' own `LlamaForCausalLM`, initialized with
`torch.manual_seed({seed})` and trained in float32 on CPU (2 threads) with AdamW
(peak lr {lr:g}, betas 0.9/0.95, weight decay 0.1, linear warmup then cosine decay to 10%,
gradient clipping 1.0), batch {batch_size} x {SEQ_LEN} tokens, {stats["steps"]} steps{early}
({stats["tokens"]:,} tokens) in {stats["seconds"] / 60:.1f} minutes.
Final training loss (mean of the last 20 steps): **{stats["final_loss"]:.3f}**.

Built with torch {torch.__version__}, transformers {transformers.__version__},
tokenizers {tokenizers.__version__}. The same command with the same Python, torch and
seed reproduces the weights.

## Greedy samples

{sample_text}
"""


def build(out: Path | str = DEFAULT_OUT, *, steps: int = DEFAULT_STEPS,
          batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR, seed: int = DEFAULT_SEED,
          minutes: float | None = None, stdlib: Path | str | None = None,
          command: str | None = None) -> Path:
    """Train the default model and write the model directory ``out``; return it."""
    import torch

    out = Path(out)
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    random.seed(seed)
    t0 = time.monotonic()
    corpus = build_corpus(Path(stdlib) if stdlib else None)
    log(f"corpus: {len(corpus.docs)} docstrings and {len(corpus.chats)} chat samples "
        f"from {corpus.files} files ({time.monotonic() - t0:.1f}s)")
    tok = train_tokenizer(corpus)
    data = encode_corpus(tok, corpus, seed)
    log(f"tokenizer: {tok.get_vocab_size()} tokens; data: {data.shape[0]} rows of "
        f"{data.shape[1]} tokens ({data.numel():,} tokens, {time.monotonic() - t0:.1f}s)")
    model = make_model(seed, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; training {steps} steps of {batch_size}x{SEQ_LEN}")
    stats = train(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                  max_seconds=None if minutes is None else minutes * 60)
    log(f"final loss {stats['final_loss']:.4f} after {stats['steps']} steps "
        f"({stats['seconds']:.0f}s)")
    # Sample from the weights rounded to bfloat16, as they are saved.
    model.to(torch.bfloat16).to(torch.float32)
    samples = greedy_samples(model, tok)
    for prompt, text in samples:
        log(f"sample {prompt!r} -> {text!r}")
    if command is None:
        command = "python -m engine.models.train_default " + shlex.join(
            ["--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size),
             "--lr", str(lr), "--seed", str(seed)]
            + ([] if minutes is None else ["--minutes", str(minutes)]))
    readme = render_readme(command=command, corpus=corpus, rows=data.shape[0], stats=stats,
                           steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           samples=samples, n_params=n_params)
    save(out, model, tok, readme)
    log(f"wrote {out} in {time.monotonic() - t0:.0f}s")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.models.train_default",
        description="Train the embedded default model (a tiny Llama) on the stdlib's docstrings.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output model directory")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps (default {DEFAULT_STEPS}, about 2 minutes on 2 cores)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock cap: stop early after this many minutes of training "
                        "(makes the result machine-dependent; default: no cap)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    command = "python -m engine.models.train_default " + shlex.join(
        list(sys.argv[1:] if argv is None else argv))
    build(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          minutes=args.minutes, command=command.rstrip())
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
