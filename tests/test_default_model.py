"""The embedded default model: the committed directory loads with transformers as is, and
``engine.models.default`` finds it (or rebuilds it into the cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.models import default as default_mod
from engine.models.default import COMMITTED_DIR, MODEL_FILES, default_model_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(COMMITTED_DIR)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(COMMITTED_DIR, dtype=torch.float32)
    m.eval()
    return m


def test_committed_files_present():
    for name in MODEL_FILES:
        assert (COMMITTED_DIR / name).is_file(), name
    assert (COMMITTED_DIR / "model.safetensors").stat().st_size < 9 * 1024 * 1024


def test_config_is_llama_with_gqa():
    cfg = json.loads((COMMITTED_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 4096
    gen = json.loads((COMMITTED_DIR / "generation_config.json").read_text())
    assert cfg["eos_token_id"] in gen["eos_token_id"]
    assert len(gen["eos_token_id"]) == 2


def test_model_loads_unchanged(model, tokenizer):
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2
    assert model.config.num_attention_heads == 4
    assert model.get_input_embeddings().weight.shape == (4096, 256)
    # tied: the LM head is the embedding matrix
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == model.config.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "Return a list of the lines in the string.",
    "  leading spaces\n\ttabs and newlines\r\n",
    "unicode: héllo wörld — 日本語 🐍 ∑x² ",
    "",
])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(tok, add_special_tokens=False)) == 1


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does json.dumps do?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("assistant\n")


def _greedy(model, tokenizer, prompt: str, n: int = 20) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_generation_is_deterministic_and_readable(model, tokenizer):
    first = _greedy(model, tokenizer, "Return the")
    second = _greedy(model, tokenizer, "Return the")
    assert first == second
    assert len(first) > 0
    text = tokenizer.decode(first, skip_special_tokens=True)
    assert text.strip()
    printable = sum(c.isprintable() or c.isspace() for c in text)
    assert printable / len(text) >= 0.9, text
    assert sum(c.isalpha() for c in text) >= len(text) // 3, text


def test_module_prints_the_directory(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ENGINE_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "engine.models.default"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    path = Path(lines[0])
    assert path.is_dir()
    assert path.resolve() == COMMITTED_DIR.resolve()
    for name in MODEL_FILES:
        assert (path / name).is_file(), name


def test_model_info_reads_default():
    from engine.config import ModelConfig
    from engine.models.info import load_model_info

    info = load_model_info(ModelConfig())
    assert info.path == default_model_dir()
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_kv_heads == 2 and info.head_dim == 64 and info.num_layers == 4
    assert info.max_model_len == 2048
    assert set(info.eos_token_ids) == {0, 2}


def test_missing_committed_dir_falls_back_to_cache(tmp_path, monkeypatch):
    """Without the committed files, the model is built once into $ENGINE_CACHE_DIR."""
    from engine.models import train_default

    calls = []

    def fake_build(out, **kwargs):
        calls.append(Path(out))
        for name in MODEL_FILES:
            (Path(out) / name).write_text("x")
        return Path(out)

    monkeypatch.setattr(default_mod, "COMMITTED_DIR", tmp_path / "missing")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(train_default, "build", fake_build)
    first = default_mod.default_model_dir()
    assert first == tmp_path / "cache" / "default-model"
    assert default_mod.is_complete(first)
    assert default_mod.default_model_dir() == first
    assert len(calls) == 1


def test_corpus_from_a_small_stdlib(tmp_path):
    from engine.models.stdlib_corpus import IM_END, IM_START, build_corpus

    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The pkg package."""\n')
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module docstring."""\n'
        "class Thing:\n"
        '    """A thing.\n\n    More about the thing."""\n'
        "    def spin(self):\n"
        '        """Spin the thing around."""\n'
        "    def _hidden(self):\n"
        '        """Private helper, not asked about."""\n'
    )
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "test" / "test_x.py").write_text('"""Skipped test module."""\n')
    corpus = build_corpus(tmp_path)
    assert corpus.files == 2
    assert "Skipped test module." not in corpus.docs
    assert "A thing.\n\nMore about the thing." in corpus.docs
    assert "Private helper, not asked about." in corpus.docs
    assert corpus.questions == ["What does pkg.mod.Thing do?", "What does pkg.mod.Thing.spin do?"]
    assert corpus.chats[0] == (
        f"{IM_START}user\nWhat does pkg.mod.Thing do?{IM_END}\n"
        f"{IM_START}assistant\nA thing.{IM_END}\n"
    )
