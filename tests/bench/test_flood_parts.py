"""bench.flood's split of a critical request's TTFT (``ttft_parts``): the client's send time
and the server's ``received`` stamp give ``accept``; the rest of the client's TTFT after the
server's parts is ``stream``; requests without the pool's stamps are left out."""

from __future__ import annotations

import pytest

from bench.flood import PARTS, critical_summary, ttft_parts
from engine.frontend import timing


def record(sent: float, ttft_ms: float, header: str) -> dict:
    return {"status": 200, "sent": sent, "ttft_ms": ttft_ms, "timing": timing.parse(header)}


HEADER = ("parse;dur=1.0, tokenize;dur=2.0, admit;dur=0.5, pool;dur=30.0, predicted;dur=5.0, "
          "to_pool;dur=1.0, queue;dur=10.0, chunks;dur=0.0, step;dur=15.0, out;dur=0.5, "
          "back;dur=2.0, wake;dur=1.5, execute;dur=12.0, step_tokens;dur=70.000, "
          "step_requests;dur=2.000, step_wait;dur=9.0, prev_step;dur=20.0, "
          "prev_step_tokens;dur=64.000, queue_steps;dur=1.000, received;desc=1000.004000")


def test_a_ttft_splits_into_parts_that_add_up() -> None:
    p = ttft_parts(record(1000.0, 45.0, HEADER))
    assert p is not None
    assert p["accept"] == pytest.approx(4.0)
    assert p["queue"] == 10.0 and p["step_tokens"] == 70 and p["prev_step_tokens"] == 64
    assert sum(p[s] for s in PARTS) == pytest.approx(45.0)
    assert p["stream"] == pytest.approx(45.0 - 4.0 - 1.0 - 2.0 - 0.5 - 30.0)


def test_records_without_pool_stamps_are_left_out() -> None:
    bare = record(1000.0, 45.0, "parse;dur=1.0, pool;dur=30.0")
    assert ttft_parts(bare) is None
    assert ttft_parts({**record(1000.0, 45.0, HEADER), "status": 429}) is None
    summary = critical_summary([bare, record(1000.0, 45.0, HEADER)])
    assert summary["served"] == 2 and len(summary["worst"]) == 1
    assert summary["queue_p99_ms"] == 10.0
