"""The latency guard of shedding: sheddable work is refused not only when the queue is long
(``engine.frontend.drain``) but while serving it would slow down everything else.

Measured on a flood (docs/benchmarks.md, "Flood"): with a queue-wait threshold alone, the
engine admits sheddable requests up to ``--shed-queue-time`` of queued work, and critical
requests, although first in the scheduler's queue, pay for them twice: each waits for the
step in flight, which the admitted sheddable decodes and prefill chunks make several times
longer, and for the frontend's event loop, busy parsing, tokenizing and streaming them.
Two signals, each what a critical request would wait for:

- **step slowdown**: the median of the pool's latest steps over its light decode step
  uncontended (the lower quartile of its latest 512 decode steps of at most two requests:
  ``StepTimes.slowdown``). Above ``--shed-latency-factor`` (default 1.5, the issue's goal
  for critical TTFT p99 under a flood; docs/benchmarks.md, "Flood", sixth pass: 2 admitted
  more of the flood and missed the goal) sheddable requests get 429 (once the pool has run
  enough steps to tell a trend). Shedding empties the batches, the steps get light again, and admission resumes: a
  feedback loop, with no model of the hardware.
- **event-loop lag** (``LoopLag``): how late a periodic timer fires in the frontend's loop,
  smoothed. Above ``LOOP_LAG_LIMIT_S``, with at least ``LAG_MIN_IN_FLIGHT`` requests in
  flight, the frontend itself is the bottleneck; a shed 429 is
  decided before parsing (``engine.frontend.early_shed``), the cheapest answer it has.

Their ``Retry-After`` is the predicted queue wait, at least ``GUARD_RETRY_S``: the guard
lifts as soon as the steps are light again, which nothing predicts better than a second.

The guard holds only while there is latency to protect (``PoolLoad.protects_latency``): a
non-sheddable request open on the pool, or arrived within ``PROTECT_WINDOW_S``. Sheddable
traffic alone is bounded by the queue wait only: its own steps slowing down as its batches
grow is the throughput it asked for, not a cost to anyone else. And the step signal counts
only while the workers are busy (``PoolLoad.busy_fraction`` at least ``GUARD_BUSY_MIN`` of
the latest second in steps): at a moderate load steps are slower than light ones by their
own size (prefill chunks, larger batches) but the workers idle between them, and a critical
request seldom waits for one; without that gate the guard shed 17-43% of a moderate
priority-mix load's sheddable requests and bought its critical ones nothing
(docs/benchmarks.md, "Flood", seventh pass).
"""

from __future__ import annotations

import asyncio
import time

#: Smoothed event-loop lag above which the frontend counts as overloaded.
LOOP_LAG_LIMIT_S = 0.005
#: Requests in flight at the frontend (to the pool) below which its loop lag is not theirs.
LAG_MIN_IN_FLIGHT = 16
#: How often the loop-lag timer fires.
LOOP_LAG_PERIOD_S = 0.02
#: Weight of each new lag sample in the smoothed lag.
LOOP_LAG_EWMA = 0.2
#: The least ``Retry-After`` of a request shed by the guard.
GUARD_RETRY_S = 1.0


class LoopLag:
    """The frontend event loop's lag: how late a ``LOOP_LAG_PERIOD_S`` timer fires,
    smoothed (``lag_s``)."""

    def __init__(self) -> None:
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def on_running_loop(cls) -> LoopLag | None:
        """A monitor running on the current loop; None outside one (nothing to watch)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        lag = cls()
        lag._task = loop.create_task(lag._run(), name="loop-lag")
        return lag

    def close(self) -> None:
        """Stop the timer (the frontend's shutdown; a loop closed with it pending warns)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def sample(self, late_s: float) -> None:
        self.lag_s += LOOP_LAG_EWMA * (max(0.0, late_s) - self.lag_s)

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(LOOP_LAG_PERIOD_S)
            self.sample(time.perf_counter() - start - LOOP_LAG_PERIOD_S)


def guard_reason(slowdown: float | None, loop_lag: LoopLag | None, factor: float,
                 in_flight: int) -> str | None:
    """Why sheddable work must wait now (None: it need not). ``factor`` 0: no guard. The
    loop lag counts only with ``LAG_MIN_IN_FLIGHT`` requests in flight: with fewer, they are
    not what slows the loop, and shedding would not help."""
    if not factor:
        return None
    if slowdown is not None and slowdown > factor:
        return (f"its steps run {slowdown:.1f}x slower than its light ones, more than "
                f"--shed-latency-factor {factor}")
    if (loop_lag is not None and loop_lag.lag_s > LOOP_LAG_LIMIT_S
            and in_flight >= LAG_MIN_IN_FLIGHT):
        return (f"the frontend's event loop lags {1e3 * loop_lag.lag_s:.1f} ms, more than "
                f"{1e3 * LOOP_LAG_LIMIT_S:.0f} ms")
    return None
