"""How long a request arriving now would wait before its pool runs it, from the pool's real
state: what admission sheds by (``engine.frontend.admission``) and what ``Retry-After`` says.

A waiting request waits for three things, and the prediction is the longest of the three:

- **prefill**: the prompt tokens queued ahead of it (the pool's ``num_waiting_tokens`` plus
  the prompts this frontend admitted since the pool's latest stats, or, when more, the
  prompts of every request in flight without a first token: the pool takes requests into
  its running set before their prefill is done) go through the workers' token budgets, less
  the one token per step that each running request's decode takes. The rate is measured
  from the pool's own step timings (``PoolStats.step_num_tokens`` / ``step_times_s``) over
  its recent *full* steps (at least half the budget): small steps cost mostly their fixed
  overhead and would understate it. Before any full step is seen the rate is a cold prior,
  one budget per ``COLD_STEP_S``.
- **slots**: a worker runs at most ``max_num_seqs`` requests; requests beyond the free slots
  wait for running ones to finish.
- **KV**: prompt tokens beyond the workers' free KV blocks wait for running requests to finish
  and free theirs.

The finish rate that frees slots and KV is the measured one (requests finished per second,
``PoolLoad``'s window) once there is one; before the first completions it is predicted: every
slot frees after one request's output budget (the mean ``max_tokens`` of the requests sent)
of decode steps, each as long as the pool's recent steps (or ``COLD_STEP_S``). So a fresh
engine sheds from its first second by its queue, its KV and its running requests, with no
completion history. The prediction is pure: tests feed it fake stats.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

#: Assumed duration of one step, full or not, before the pool has reported one.
COLD_STEP_S = 0.1
#: Steps kept for the step-rate estimates.
STEP_WINDOW = 128
#: A step with at least this share of the token budget counts as full (its tokens/s is the
#: prefill rate).
FULL_STEP_SHARE = 0.5
#: Decode steps of at most this many requests are light: the reference of
#: ``StepTimes.slowdown``.
LIGHT_BATCH = 2
#: Light steps kept for the reference: long enough to reach back past a flood, during which
#: few steps are light.
LIGHT_WINDOW = 512
#: The reference is this quantile of the light steps kept: the engine's speed when nothing
#: else competes for it, not its light steps slowed by the load it is under.
LIGHT_QUANTILE = 0.25
#: Steps behind the current step time of ``StepTimes.slowdown``.
RECENT_STEPS = 16
#: Light steps needed before ``StepTimes.slowdown`` says anything.
MIN_LIGHT_STEPS = 8
#: Decodes never take more than this share of a step's budget in the prediction (the
#: scheduler fills the rest with prefill chunks).
MAX_DECODE_SHARE = 0.9


@dataclass(frozen=True)
class Backlog:
    """A pool's state as the frontend sees it."""

    live_workers: int
    waiting_requests: int  # in the pool's queues, and sent since its latest stats
    waiting_tokens: int  # their uncomputed prompt tokens
    running_requests: int
    free_kv_tokens: int | None = None  # all workers' free KV blocks x block size; None: unknown


@dataclass(frozen=True)
class Prediction:
    """The predicted wait, and what bounds it (``"prefill"``, ``"slots"``, ``"kv"``, or
    ``""`` when nothing waits)."""

    wait_s: float
    bound: str
    detail: str


class StepTimes:
    """The pool's recent step timings: the prefill rate of its full steps and the typical
    step time."""

    def __init__(self, budget: int, window: int = STEP_WINDOW) -> None:
        self.budget = budget
        self._full: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        self._all: deque[float] = deque(maxlen=window)
        self._light: deque[float] = deque(maxlen=LIGHT_WINDOW)
        self._light_s: float | None = None  # light_step_s, updated as light steps come
        #: slowdown, tokens_per_s and step_s, computed once per ``add`` (admission asks for
        #: them twice per request, and a flood's requests outnumber the pool's stats).
        self._derived: tuple[float | None, float, float] | None = None

    def add(self, tokens: list[int], times_s: list[float],
            batch_sizes: list[int] | None = None, counted: list[bool] | None = None) -> None:
        """Steps just finished. ``counted`` (one per step; None: all) picks those of the
        workers whose load is judged: the others' steps feed only the light reference."""
        sizes = batch_sizes if batch_sizes and len(batch_sizes) == len(times_s) else None
        judged = counted if counted is not None and len(counted) == len(times_s) else None
        self._derived = None
        for i, (n, t) in enumerate(zip(tokens, times_s, strict=False)):
            if t <= 0:
                continue
            if judged is None or judged[i]:
                self._all.append(t)
                if n >= FULL_STEP_SHARE * self.budget:
                    self._full.append((n, t))
            if sizes is not None and n <= sizes[i] <= LIGHT_BATCH:  # decodes only
                self._light.append(t)
                self._light_s = None
        if self._light_s is None and len(self._light) >= MIN_LIGHT_STEPS:
            ordered = sorted(self._light)
            self._light_s = ordered[int(LIGHT_QUANTILE * (len(ordered) - 1))]

    def light_step_s(self) -> float | None:
        """The reference step time: the ``LIGHT_QUANTILE`` of the latest ``LIGHT_WINDOW``
        light steps (decodes of at most ``LIGHT_BATCH`` requests, no prompt tokens). A
        prefill step of one request is not light (a critical prompt's step under a flood
        would raise the reference to its own length), and a low quantile of a long window
        is the engine's uncontended speed: on a machine whose cores the workers share with
        the frontend, light steps run slower too while a flood is served, and a median of
        them would hide the slowdown it causes. None before ``MIN_LIGHT_STEPS``."""
        return self._light_s

    def _derive(self) -> tuple[float | None, float, float]:
        if self._derived is None:
            light = self.light_step_s()
            slowdown = None
            if light is not None and len(self._all) >= RECENT_STEPS:
                slowdown = statistics.median(list(self._all)[-RECENT_STEPS:]) / light
            tokens_per_s = (sum(n for n, _ in self._full) / sum(t for _, t in self._full)
                            if self._full else self.budget / COLD_STEP_S)
            step_s = statistics.median(self._all) if self._all else COLD_STEP_S
            self._derived = (slowdown, tokens_per_s, step_s)
        return self._derived

    def slowdown(self) -> float | None:
        """How many times slower the latest steps are than light ones (``light_step_s``):
        what a critical request's wait for a step grows by. None before ``MIN_LIGHT_STEPS``
        light steps and ``RECENT_STEPS`` steps in all (a start is no trend)."""
        return self._derive()[0]

    def tokens_per_s(self) -> float:
        """One worker's token rate in full steps (the cold prior before any)."""
        return self._derive()[1]

    def step_s(self) -> float:
        """The median recent step time (``COLD_STEP_S`` before any)."""
        return self._derive()[2]


def predict(backlog: Backlog, *, max_num_seqs: int, budget: int, tokens_per_s: float,
            step_s: float, finish_rate: float, mean_output_tokens: float) -> Prediction:
    """The predicted wait of a request arriving now. ``finish_rate``: measured requests
    finished per second (0: none yet, predicted from ``mean_output_tokens`` decode steps of
    ``step_s`` per slot)."""
    b = backlog
    if b.waiting_requests <= 0 and b.waiting_tokens <= 0:
        return Prediction(0.0, "", "nothing waits")
    live = max(b.live_workers, 1)
    running_per_worker = b.running_requests / live
    decode_share = min(MAX_DECODE_SHARE, running_per_worker / budget)
    prefill_rate = tokens_per_s * (1 - decode_share) * live
    predictions = [Prediction(b.waiting_tokens / prefill_rate, "prefill",
                              f"{b.waiting_tokens} prompt tokens queued, prefill at "
                              f"~{prefill_rate:.0f} tokens/s")]
    if finish_rate <= 0:  # each running request finishes after one output budget
        finish_rate = max(b.running_requests, 1) / max(mean_output_tokens * step_s, 1e-3)
    over_slots = b.waiting_requests - (max_num_seqs * live - b.running_requests)
    if over_slots > 0:
        predictions.append(Prediction(over_slots / finish_rate, "slots",
                                      f"{over_slots} requests beyond the free slots, "
                                      f"~{finish_rate:.1f} finishing per s"))
    if b.free_kv_tokens is not None and b.waiting_tokens > b.free_kv_tokens > -1:
        share = (b.waiting_tokens - b.free_kv_tokens) / b.waiting_tokens
        over_kv = math.ceil(share * b.waiting_requests)
        predictions.append(Prediction(over_kv / finish_rate, "kv",
                                      f"{b.waiting_tokens - b.free_kv_tokens} prompt tokens "
                                      f"beyond the free KV, ~{finish_rate:.1f} finishing per s"))
    return max(predictions, key=lambda p: p.wait_s)
