"""Fixtures shared by the frontend tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import FrontendConfig


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """A separate HTTP frontend over fake pools, with its own config (keys, limits,
    shedding); closed after the test."""
    from frontend.test_http_api import Env

    made: list[Env] = []

    def make(**cfg: Any) -> Env:
        made.append(Env(tmp_path, FrontendConfig(**cfg)))
        return made[-1]

    yield make
    for e in made:
        e.close()
