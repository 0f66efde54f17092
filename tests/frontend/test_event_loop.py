"""The frontend's event loop choice (engine/frontend/process.py)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from engine.frontend.process import event_loop_factory


def test_the_frontend_loop_is_uvloop_unless_asked_for_asyncio(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ENGINE_FRONTEND_LOOP", raising=False)
    factory = event_loop_factory()
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    monkeypatch.setenv("ENGINE_FRONTEND_LOOP", "asyncio")
    assert event_loop_factory() is None
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)
