"""Fixtures of the pool service's tests."""

from __future__ import annotations

import pytest
from fakes import config_only_model_dir


@pytest.fixture
def model_dir(tmp_path):
    """A model directory with only a config: the pool reads the model's limits, no weights."""
    return config_only_model_dir(tmp_path / "model")
