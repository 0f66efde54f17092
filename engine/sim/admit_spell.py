"""A request's frontend delay drawn with the machine's slow spells (``--terms admit,spell``).

The ``admit`` term draws each request's delay beyond its pool TTFT (HTTP, tokenizing,
admission, detokenizing, SSE: ``calibrate.fit_admit_delays``) independently of the step
noise. Live, the frontend shares the cores with the workers and slows down in the same
spells: on the 2026-12-07 recordings (docs/simulator.md, "The frontend delay in the slow
spells"), a request's frontend delay correlates with the step ratio (measured over fitted
step time) of the steps that ended in the 0.1 s before it arrived (Spearman 0.14-0.32 per
run), as much as with its own pool time (0.22-0.35), so the two tails stack in the TTFT p99.

This term conditions the drawn delay on that **local ratio**: the mean ratio of the steps
(every worker's) that ended in the ``window`` seconds before the request's frontend stamp
(none: the last step's before it; no step yet: 1).

- **Fit** (``fit_spell_delays``): the calibration's matched requests are put in bins by
  their local ratio, the bin edges at its ``SPELL_PROBS`` quantiles (the slowest 5% of
  arrivals have a bin of their own), and each bin keeps its requests' delays themselves,
  sorted: a draw is one of them, uniformly (an empirical bootstrap, so the tail is the
  recorded one, not a quantile table's top bin spread up to the maximum).
- **Cost file**: ``[noise] admit_spell_edges`` (the ratios between bins, increasing),
  ``admit_spell_delays`` (per bin, its delays in seconds) and ``admit_spell_window``;
  checked on load (``parse_spell``).
- **Simulator** (``SpellDelays``): each step's drawn ratio (the noise's: the replayed trace,
  or a draw from the quantile table) is noted with the time its compute ends; a request's
  delay is drawn from the bin of the local ratio at the moment it arrives.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

SPELL_WINDOW_S = 0.1  # seconds before an arrival whose steps make its local ratio
SPELL_PROBS = (0.5, 0.8, 0.95)  # quantiles of the arrivals' local ratio between bins
KEEP_S = 1.0  # seconds the simulator keeps a step beyond the window
MIN_BIN = 5  # requests a bin needs (fewer: merged with its neighbour below)
SPELL_KEYS = ("admit_spell_edges", "admit_spell_delays", "admit_spell_window")


class SpellFit(NamedTuple):
    """The local ratios between bins, each bin's delays (seconds, sorted) and the window."""

    edges: tuple[float, ...]
    delays: tuple[tuple[float, ...], ...]
    window: float


def local_ratios(ends: np.ndarray, ratios: np.ndarray, arrivals: np.ndarray,
                 window: float = SPELL_WINDOW_S) -> np.ndarray:
    """Per arrival time: the mean of ``ratios`` of the steps whose ``ends`` fall in
    ``[t - window, t]``; none there: the last step's ending before ``t``; none: 1."""
    order = np.argsort(ends, kind="stable")
    ends, ratios = np.asarray(ends, dtype=float)[order], np.asarray(ratios, dtype=float)[order]
    cum = np.concatenate([[0.0], np.cumsum(ratios)])
    out = np.ones(len(arrivals))
    for i, t in enumerate(np.asarray(arrivals, dtype=float)):
        hi = int(np.searchsorted(ends, t, side="right"))
        lo = int(np.searchsorted(ends, t - window, side="left"))
        if hi > lo:
            out[i] = (cum[hi] - cum[lo]) / (hi - lo)
        elif hi > 0:
            out[i] = ratios[hi - 1]
    return out


def fit_spell_delays(delays: Sequence[float] | np.ndarray, local: Sequence[float] | np.ndarray,
                     probs: Sequence[float] = SPELL_PROBS,
                     window: float = SPELL_WINDOW_S) -> SpellFit:
    """Bins of the delays by their local ratio (see the module doc); a bin of fewer than
    ``MIN_BIN`` requests is merged into the one below."""
    d, lr = np.asarray(delays, dtype=float), np.asarray(local, dtype=float)
    if len(d) != len(lr) or len(d) < MIN_BIN:
        raise ValueError(f"fit_spell_delays: needs >= {MIN_BIN} (delay, local ratio) pairs")
    edges = sorted({float(e) for e in np.quantile(lr, probs)})
    while True:
        which = np.searchsorted(edges, lr, side="right")
        counts = np.bincount(which, minlength=len(edges) + 1)
        small = [k for k, c in enumerate(counts) if c < MIN_BIN]
        if not small or not edges:
            break
        edges.pop(max(0, small[0] - 1))  # merge the bin with its neighbour below
    bins = tuple(tuple(float(x) for x in np.sort(np.maximum(d[which == k], 0.0)))
                 for k in range(len(edges) + 1))
    return SpellFit(tuple(edges), bins, float(window))


class SpellDelays:
    """The simulator's side: ``step(end, ratio)`` for each step started (its compute's end,
    its drawn ratio), ``draw(now)`` a request's delay from the bin of the local ratio at
    ``now``. Seeded: runs repeat."""

    def __init__(self, fit: SpellFit, seed: int = 0) -> None:
        self.edges = list(fit.edges)
        self.delays = [list(b) for b in fit.delays]
        self.window = fit.window
        self.rng = random.Random(seed + 104_729)
        self.recent: deque[tuple[float, float]] = deque()  # (end, ratio), in start order
        self.last = (-math.inf, 1.0)  # the latest-ending step dropped from ``recent``

    def step(self, end: float, ratio: float) -> None:
        self.recent.append((end, ratio))

    def local_ratio(self, now: float) -> float:
        """The mean ratio of the steps ending in ``[now - window, now]`` (none: the last
        one's before it; none yet: 1). Steps are forgotten ``KEEP_S`` after the window,
        so a draw for a slightly earlier time (a follower's) still finds its own."""
        recent, since = self.recent, now - self.window
        while recent and recent[0][0] < since - KEEP_S:
            old = recent.popleft()
            if old[0] > self.last[0]:
                self.last = old
        total = n = 0.0
        latest = self.last
        for end, ratio in recent:
            if since <= end <= now:
                total += ratio
                n += 1
            elif end < since and end > latest[0]:
                latest = (end, ratio)
        return total / n if n else latest[1]

    def draw(self, now: float) -> float:
        b = self.delays[bisect.bisect_right(self.edges, self.local_ratio(now))]
        return b[self.rng.randrange(len(b))]

    @property
    def least(self) -> float:
        return min(b[0] for b in self.delays)


def parse_spell(noise: dict[str, Any], where: str) -> SpellFit | None:
    """The ``[noise]`` spell keys, checked (None when absent): ``admit_spell_edges``
    increasing positive numbers, ``admit_spell_delays`` one more non-empty list of numbers
    >= 0, ``admit_spell_window`` a number > 0."""
    if not any(k in noise for k in SPELL_KEYS):
        return None
    bad = (f"--cost: {where}: [noise] admit_spell_edges (k increasing ratios > 0), "
           f"admit_spell_delays (k + 1 non-empty lists of seconds >= 0) and "
           f"admit_spell_window (seconds > 0) go together")
    edges, bins, value = (noise.get(k) for k in SPELL_KEYS)
    window = float(value) if isinstance(value, int | float) and _number(value) else 0.0
    if (not isinstance(edges, list) or not isinstance(bins, list)
            or len(bins) != len(edges) + 1 or window <= 0
            or not all(_number(e) and e > 0 for e in edges) or edges != sorted(set(edges))
            or not all(isinstance(b, list) and b and all(_number(x) and x >= 0 for x in b)
                       for b in bins)):
        raise ValueError(bad)
    return SpellFit(tuple(float(e) for e in edges),
                    tuple(tuple(sorted(float(x) for x in b)) for b in bins), window)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def spell_toml(fit: SpellFit) -> list[str]:
    """The ``[noise]`` spell keys as TOML lines (one line a bin)."""
    return ([f"admit_spell_window = {fit.window!r}",
             "admit_spell_edges = [" + ", ".join(repr(e) for e in fit.edges) + "]",
             "admit_spell_delays = ["]
            + ["  [" + ", ".join(f"{x:.5g}" for x in b) + "]," for b in fit.delays] + ["]"])
