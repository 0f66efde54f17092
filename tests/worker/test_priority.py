"""A worker process lowers its own CPU priority first (``--worker-sched``, ``--worker-nice``):
on CPU the frontend and the pool must run the moment they wake."""

from __future__ import annotations

import logging
import multiprocessing
import os

import pytest

from engine.cli import config_from_args
from engine.resolve import resolve_config
from engine.worker.process import lower_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def _lowered(argv: list[str], out: multiprocessing.Queue) -> None:
    lower_priority(resolve_config(config_from_args(argv)))
    out.put((os.sched_getscheduler(0), os.nice(0)))


def lowered(*argv: str) -> tuple[int, int]:
    """(scheduling policy, nice) of a child process after ``lower_priority``."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_lowered, args=(list(argv), out))
    child.start()
    try:
        return out.get(timeout=60)
    finally:
        child.join(timeout=10)


def test_cpu_workers_lower_their_priority_as_resolved():
    base = os.nice(0)
    assert lowered("--device", "cpu") == (os.SCHED_IDLE, base)
    assert lowered("--device", "cpu", "--worker-sched", "normal") == (os.SCHED_OTHER, base + 5)
    assert lowered("--device", "cpu", "--worker-nice", "3") == (os.SCHED_OTHER, base + 3)
    assert lowered("--device", "cpu", "--worker-nice", "0") == (os.SCHED_OTHER, base)


def test_a_refused_sched_idle_leaves_the_worker_serving(monkeypatch, caplog):
    """A sandbox may forbid ``sched_setscheduler``: the worker logs it and goes on."""
    def refuse(*_args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="engine.worker.process"):
        lower_priority(resolve_config(config_from_args(["--device", "cpu"])))
    assert "SCHED_IDLE refused" in caplog.text
