"""Step noise replayed from the recording itself (``--terms trace``): a block bootstrap.

Live, a step's measured time over the cost model's (its *ratio*) comes in spells of tens to
hundreds of steps, and the host path (the pool's round trip and the gap before the next
plan) slows down with it (docs/simulator.md, "Slow spells", "Drift"). The parametric noise
terms (one or two AR(1)s on the ratio's normal scores, a regime model, drift levels) each
reproduce some of that and miss the rest. This term stores the recording's noise instead of
a model of it, and replays it:

1. per worker of the recording, the series along its steps (in send order) of the log ratio
   and, from the same steps, the log of the **host factor** (measured host seconds after
   the step over the fitted host model's, as ``noise_fit.host_by_step`` and the regime
   model count them; a step without a measured host time, its worker's last before idling,
   gets the mean factor);
2. the ratios are scaled so that their mean (every stored step alike, as the replay draws
   them) is the measured mean step over the fitted one, and the host factors so that
   theirs is the measured host time over the model's: the mean step and host time are
   kept, as the quantile tables keep them;
3. both are stored as ``round(1000 x log)`` integers (``TRACE_UNIT``; 1e-3 in the log is
   0.1% of a step), per worker, in the cost file's ``[noise]`` table (``trace``,
   ``trace_host``, ``trace_block``): about 5-6 characters a step for each series, so a cost
   file fitted on 28,000 steps is about 0.3 MB;
4. the simulator (``TraceNoise``) walks, per worker, a **stationary bootstrap** of its
   series (Politis and Romano 1994): it starts at a random step, moves one step along the
   series per simulated step (circularly), and with probability ``1 / trace_block`` jumps
   to a random step instead. Each drawn ratio and host factor is a recorded pair, so the
   marginal distribution, the autocorrelation up to about the block length, the spells'
   depth and length and the step/host correlation are the recording's by construction;
   the mean is the stored one (the walk visits every step alike).

The mean block length comes from the recording (``block_length``): Politis and White's
(2004) automatic choice for the stationary bootstrap (with Patton, Politis and White's 2009
correction), from the log ratio's autocorrelation: the lag where it falls inside its noise
band, and the flat-top-weighted sums of the autocovariances up to twice that lag. On the
2026-12-07 recordings the autocorrelation falls to the noise band at 400-1600 steps.
A simulated worker ``w`` replays the recording's worker ``w mod`` (number recorded).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

TRACE_UNIT = 1000  # stored integers are round(TRACE_UNIT x log(value))
TRACE_LIMIT = 20 * TRACE_UNIT  # |stored value| at most e^20: anything more is a broken file
HOST_FLOOR = 1e-3  # a host factor below this (a host time of ~0) is stored as this
MAX_LAG = 4000  # autocorrelation lags ``block_length`` looks at


class TraceFit(NamedTuple):
    """The ``[noise]`` trace keys: per recorded worker, ``round(TRACE_UNIT x log)`` of each
    step's ratio and host factor (``host`` () when not fitted), and the mean block length."""

    ratio: tuple[tuple[int, ...], ...]
    host: tuple[tuple[int, ...], ...]
    block: float


def encode(values: np.ndarray) -> tuple[int, ...]:
    """Positive values as ``round(TRACE_UNIT x log)`` integers."""
    return tuple(int(v) for v in np.rint(np.log(values) * TRACE_UNIT))


def decode(stored: Sequence[int]) -> np.ndarray:
    return np.exp(np.asarray(stored, dtype=float) / TRACE_UNIT)


def fit_trace(ratios: Sequence[np.ndarray], mean: float,
              host: Sequence[tuple[np.ndarray, np.ndarray]] = (),
              block: float | None = None) -> TraceFit:
    """The trace of per-worker ratio series (see the module doc): the ratios scaled so that
    they average ``mean``; ``host``, per worker (measured host seconds after each step, NaN
    where not measured; the host model's seconds): the host factors, scaled so that they
    average the measured host time over the model's; ``block``: the mean block length
    (default ``block_length`` of the log ratios)."""
    series = [np.asarray(r, dtype=float) for r in ratios]
    if not series or any(len(s) == 0 for s in series):
        raise ValueError("fit_trace: every worker needs at least one step")
    if any(not np.isfinite(s).all() or s.min() <= 0 for s in series):
        raise ValueError("fit_trace: ratios must be finite and positive")
    if host and len(host) != len(series):
        raise ValueError("fit_trace: host needs one (measured, model) pair per worker")
    scale = mean / float(np.concatenate(series).mean())
    stored_ratio = tuple(encode(s * scale) for s in series)
    stored_host: tuple[tuple[int, ...], ...] = ()
    if host:
        stored_host = tuple(encode(f) for f in host_factors(host, [len(s) for s in series]))
    if block is None:
        block = block_length([np.log(s) for s in series])
    block = float(min(max(1.0, block), max(len(s) for s in series)))
    return TraceFit(stored_ratio, stored_host, block)


def host_factors(host: Sequence[tuple[np.ndarray, np.ndarray]], lengths: Sequence[int]
                 ) -> list[np.ndarray]:
    """Per worker, each step's measured host time over the model's (at least
    ``HOST_FLOOR``), the unmeasured ones the mean factor, all scaled so that their mean is
    the measured host time over the model's (1 when nothing was measured)."""
    measured = [np.asarray(m, dtype=float) for m, _ in host]
    model = [np.asarray(p, dtype=float) for _, p in host]
    if [len(m) for m in measured] != list(lengths) or [len(p) for p in model] != list(lengths):
        raise ValueError("fit_trace: host series must have the ratio series' lengths")
    ok = [np.isfinite(m) & (p > 0) for m, p in zip(measured, model, strict=True)]
    total_m = sum(float(m[k].sum()) for m, k in zip(measured, ok, strict=True))
    total_p = sum(float(p[k].sum()) for p, k in zip(model, ok, strict=True))
    target = total_m / total_p if total_p > 0 else 1.0
    factors = []
    for m, p, k in zip(measured, model, ok, strict=True):
        f = np.full(len(m), np.nan)
        f[k] = np.maximum(m[k] / p[k], HOST_FLOOR)
        factors.append(f)
    flat = np.concatenate(factors)
    fill = float(np.nanmean(flat)) if np.isfinite(flat).any() else 1.0
    factors = [np.where(np.isfinite(f), f, fill) for f in factors]
    scale = target / max(float(np.concatenate(factors).mean()), 1e-30)
    return [np.maximum(f * scale, HOST_FLOOR) for f in factors]


def autocorrelation(series: Sequence[np.ndarray], max_lag: int) -> np.ndarray:
    """Lag 0..``max_lag`` autocorrelation of several series (each about its own mean,
    pairs pooled over the series, normalized by the pooled variance)."""
    centred = [np.asarray(s, dtype=float) - np.mean(s) for s in series if len(s)]
    n = sum(len(s) for s in centred)
    var = sum(float((s * s).sum()) for s in centred) / max(n, 1)
    out = np.zeros(max_lag + 1)
    if var <= 0:
        out[0] = 1.0
        return out
    for s in centred:
        m = len(s)
        spec = np.fft.rfft(s, 2 * m)  # zero-padded: linear, not circular, lags
        cov = np.fft.irfft(spec * np.conj(spec))[:m]
        k = min(m - 1, max_lag)
        out[:k + 1] += cov[:k + 1]
    return out / (n * var)


def block_length(series: Sequence[np.ndarray], max_lag: int = MAX_LAG) -> float:
    """Politis and White's (2004; Patton, Politis and White 2009) mean block length of a
    stationary bootstrap of the pooled series: ``m`` the first lag after which the
    autocorrelation stays inside ``2 sqrt(log10(n) / n)`` for ``max(5, sqrt(log10 n))``
    lags, and with the flat-top kernel to ``M = 2m``, ``(2 G^2 / D)^(1/3) n^(1/3)``,
    ``G = sum |k| l(k/M) R(k)``, ``D = 2 g^2``, ``g = sum l(k/M) R(k)``."""
    n = sum(len(s) for s in series)
    longest = max((len(s) for s in series), default=0)
    if n < 8 or longest < 4:
        return 1.0
    lags = min(max_lag, longest - 1)
    rho = autocorrelation(series, lags)
    band = 2.0 * math.sqrt(math.log10(n) / n)
    run = max(5, math.ceil(math.sqrt(math.log10(n))))
    inside = np.abs(rho) < band
    m = lags // 2
    for lag in range(lags - run + 1):
        if inside[lag + 1:lag + 1 + run].all():
            m = lag
            break
    big_m = min(2 * max(m, 1), lags)
    k = np.arange(1, big_m + 1)
    t = k / big_m
    weight = np.where(t <= 0.5, 1.0, 2.0 * (1.0 - t))
    g = 1.0 + 2.0 * float((weight * rho[1:big_m + 1]).sum())  # in units of the variance
    big_g = 2.0 * float((weight * k * rho[1:big_m + 1]).sum())
    if g <= 0:
        return 1.0
    return float((2.0 * big_g * big_g / (2.0 * g * g)) ** (1.0 / 3.0) * n ** (1.0 / 3.0))


class TraceNoise:
    """Per simulated worker, a stationary bootstrap walk over a recorded worker's stored
    ratios and host factors (see the module doc); the interface of
    ``step_noise.StepNoise``: call once per step for its ratio, then ``host_factor`` for
    the host time after it. Seeded: runs repeat."""

    def __init__(self, ratio: Sequence[Sequence[int]], host: Sequence[Sequence[int]],
                 block: float, num_workers: int, seed: int = 0) -> None:
        self.ratio: list[list[float]] = [decode(r).tolist() for r in ratio]
        self.host: list[list[float]] = [decode(h).tolist() for h in host]
        self.jump = 1.0 / max(1.0, block)
        self.rng = random.Random(seed)
        self.series = [w % len(self.ratio) for w in range(num_workers)]
        # one step before a random start, so that the first call lands on it
        self.pos = [self.rng.randrange(len(self.ratio[s])) - 1 for s in self.series]

    def __call__(self, worker: int, prefill: bool = False) -> float:
        ratio = self.ratio[self.series[worker]]
        if self.rng.random() < self.jump:
            p = self.rng.randrange(len(ratio))
        else:
            p = (self.pos[worker] + 1) % len(ratio)
        self.pos[worker] = p
        return ratio[p]

    def host_factor(self, worker: int) -> float:
        """The host factor recorded with the step last drawn for ``worker`` (1 without)."""
        if not self.host:
            return 1.0
        return self.host[self.series[worker]][max(0, self.pos[worker])]


def simulate(fitted: TraceFit, lengths: Sequence[int], seed: int = 0
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ratios, host factors) series of the given lengths drawn as the simulator draws them,
    one simulated worker per length."""
    noise = TraceNoise(fitted.ratio, fitted.host, fitted.block, len(lengths), seed)
    out = []
    for w, n in enumerate(lengths):
        pairs = [(noise(w), noise.host_factor(w)) for _ in range(n)]
        out.append((np.array([r for r, _ in pairs]), np.array([h for _, h in pairs])))
    return out


TRACE_KEYS = ("trace", "trace_host", "trace_block")


def parse_trace(noise: dict[str, Any], where: str) -> TraceFit | None:
    """The ``[noise]`` trace keys of a cost file, checked (None when absent): ``trace`` a
    non-empty list per worker of non-empty integer lists, ``trace_host`` (optional) the same
    lengths, every value an integer within +-``TRACE_LIMIT``, ``trace_block`` >= 1."""
    if not any(k in noise for k in TRACE_KEYS):
        return None
    bad = (f"--cost: {where}: [noise] trace (per worker, a non-empty list of integers "
           f"round({TRACE_UNIT} x log ratio), each within +-{TRACE_LIMIT}) and trace_block "
           f"(a finite number >= 1) go together; trace_host (optional) has trace's lengths")
    ratio = _int_lists(noise.get("trace"), bad)
    host: tuple[tuple[int, ...], ...] = ()
    if "trace_host" in noise:
        host = _int_lists(noise["trace_host"], bad)
        if [len(h) for h in host] != [len(r) for r in ratio]:
            raise ValueError(bad)
    block = noise.get("trace_block")
    if (isinstance(block, bool) or not isinstance(block, int | float)
            or not math.isfinite(block) or block < 1):
        raise ValueError(bad)
    return TraceFit(ratio, host, float(block))


def _int_lists(value: Any, bad: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(bad)
    out = []
    for row in value:
        if (not isinstance(row, list) or not row
                or not all(isinstance(v, int) and not isinstance(v, bool)
                           and -TRACE_LIMIT <= v <= TRACE_LIMIT for v in row)):
            raise ValueError(bad)
        out.append(tuple(row))
    return tuple(out)


def trace_toml(fitted: TraceFit, per_line: int = 24) -> list[str]:
    """The ``[noise]`` trace keys as TOML lines (integer arrays wrapped ``per_line`` values
    a line)."""
    lines = [f"trace_block = {fitted.block!r}"]
    for key, rows in (("trace", fitted.ratio), ("trace_host", fitted.host)):
        if not rows:
            continue
        lines.append(f"{key} = [")
        for row in rows:
            chunks = [", ".join(str(v) for v in row[i:i + per_line])
                      for i in range(0, len(row), per_line)]
            lines.append("  [" + ",\n   ".join(chunks) + "],")
        lines.append("]")
    return lines
