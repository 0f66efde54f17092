"""Fixtures of the pool service's tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def model_dir(tmp_path):
    """A model directory with only a config: the pool reads the model's limits, no weights."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "num_hidden_layers": 2, "eos_token_id": 999}))
    return d
