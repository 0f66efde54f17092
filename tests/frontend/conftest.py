"""Fixtures shared by the frontend tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import FrontendConfig


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The HTTP frontend over fake pools shared by a module's tests (tests/frontend/http_env.py)."""
    from frontend.http_env import Env

    e = Env(tmp_path_factory.mktemp("http"), FrontendConfig(max_prompt_tokens=40,
                                                            max_output_tokens=30,
                                                            max_request_bytes=4096))
    yield e
    e.close()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """A separate HTTP frontend over fake pools, with its own config (keys, limits,
    shedding); closed after the test."""
    from frontend.http_env import Env

    made: list[Env] = []

    def make(**cfg: Any) -> Env:
        made.append(Env(tmp_path, FrontendConfig(**cfg)))
        return made[-1]

    yield make
    for e in made:
        e.close()
