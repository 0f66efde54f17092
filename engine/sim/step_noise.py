"""The step-time noise the simulator draws from a cost file's ``[noise]`` table
(``StepNoise``; fitted by ``engine.sim.noise_fit``, read by ``engine.sim.cost_model``): per
worker, a seeded draw of each step's measured/fitted time ratio with the autocorrelation the
recording shows, optionally through a few-state regime model (``engine.sim.regimes``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random

import numpy as np


def grid(quantiles: tuple[float, ...]) -> np.ndarray:
    """The probability of each of ``quantiles`` (evenly spaced from 0 to 1)."""
    return np.linspace(0.0, 1.0, len(quantiles))


class StepNoise:
    """Per worker, a Gaussian score ``z`` mapped through the normal CDF onto the step-time
    ratio's quantiles (those of prefill steps for a step with prefill tokens, when given):
    ``z`` is a fast AR(1) (lag-1 correlation ``rho``), plus, with ``slow_share`` s > 0, a
    slow one (``slow_rho``): ``z = sqrt(1 - s) z_fast + sqrt(s) z_slow``, so slow spells
    last for many steps, as measured, and ``z`` stays standard normal.

    With regimes (``regime_switch``, engine/sim/regimes.py): each worker has a hidden state
    that moves once per step through the switching matrix (so its spells last as long as
    measured), and a step's ratio is drawn from its state's table through the state's AR(1)
    score (a decode step's, and a prefill step's when no prefill table is given); the host
    time after the step is multiplied by the state's ``regime_host`` factor."""

    def __init__(self, quantiles: tuple[float, ...], rho: float, num_workers: int,
                 seed: int = 0, prefill_quantiles: tuple[float, ...] = (),
                 slow_rho: float = 0.0, slow_share: float = 0.0,
                 regime_switch: tuple[tuple[float, ...], ...] = (),
                 regime_quantiles: tuple[tuple[float, ...], ...] = (),
                 regime_rho: tuple[float, ...] = (),
                 regime_host: tuple[float, ...] = ()) -> None:
        self.grid = grid(quantiles)
        self.quantiles = np.array(quantiles)
        self.prefill_grid = grid(prefill_quantiles or quantiles)
        self.prefill_quantiles = np.array(prefill_quantiles or quantiles)
        self.rho, self.scale = rho, math.sqrt(1.0 - rho * rho)
        self.slow_rho, self.slow_scale = slow_rho, math.sqrt(1.0 - slow_rho * slow_rho)
        self.fast_weight, self.slow_weight = math.sqrt(1.0 - slow_share), math.sqrt(slow_share)
        self.rng = random.Random(seed)
        self.z = [self.rng.gauss(0.0, 1.0) for _ in range(num_workers)]
        self.slow = ([self.rng.gauss(0.0, 1.0) for _ in range(num_workers)]
                     if slow_share else [])
        self.own_prefill = bool(prefill_quantiles)
        self.regime_cum = [list(itertools.accumulate(row)) for row in regime_switch]
        self.regime_grids = [grid(q) for q in regime_quantiles]
        self.regime_tables = [np.array(q) for q in regime_quantiles]
        self.regime_rho = list(regime_rho)
        self.regime_scale = [math.sqrt(1.0 - r * r) for r in regime_rho]
        self.regime_host = list(regime_host)
        self.state: list[int] = []
        if regime_switch:  # each worker starts in a state drawn from the stationary one
            start = list(itertools.accumulate(stationary(regime_switch)))
            self.state = [min(bisect.bisect_left(start, self.rng.random()), len(start) - 1)
                          for _ in range(num_workers)]

    def __call__(self, worker: int, prefill: bool = False) -> float:
        gauss = self.rng.gauss
        if self.state and not (prefill and self.own_prefill):
            return self._regime(worker)
        z = self.z[worker] = self.rho * self.z[worker] + self.scale * gauss(0.0, 1.0)
        if self.slow:
            slow = self.slow[worker] = (self.slow_rho * self.slow[worker]
                                        + self.slow_scale * gauss(0.0, 1.0))
            z = self.fast_weight * z + self.slow_weight * slow
        u = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        if prefill:
            return float(np.interp(u, self.prefill_grid, self.prefill_quantiles))
        return float(np.interp(u, self.grid, self.quantiles))

    def host_factor(self, worker: int) -> float:
        """The worker's host time factor in its present state (1 without regimes)."""
        return self.regime_host[self.state[worker]] if self.regime_host else 1.0

    def _regime(self, worker: int) -> float:
        cum = self.regime_cum[self.state[worker]]
        s = self.state[worker] = min(bisect.bisect_left(cum, self.rng.random()), len(cum) - 1)
        z = self.z[worker] = (self.regime_rho[s] * self.z[worker]
                              + self.regime_scale[s] * self.rng.gauss(0.0, 1.0))
        u = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        return float(np.interp(u, self.regime_grids[s], self.regime_tables[s]))


def stationary(switch: tuple[tuple[float, ...], ...]) -> list[float]:
    """The stationary distribution of a switching matrix (by power iteration)."""
    p = np.asarray(switch, dtype=float)
    v = np.full(len(p), 1.0 / len(p))
    for _ in range(10_000):
        nxt = v @ p
        if np.abs(nxt - v).max() < 1e-12:
            break
        v = nxt
    return [float(x) for x in v / v.sum()]
