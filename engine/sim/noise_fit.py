"""The step-time noise of a cost file (``[noise]``, ``step_noise.StepNoise``), fitted from a
recording's steps against the fitted step model (``engine.sim.calibrate``, which reads the
recording and fits the rest).

The ratio of each step's measured to fitted time, as quantiles scaled so the mean step time
is kept (``shape``: a table of its own for steps with prefill tokens), and the autocorrelation
of its normal scores along each worker's steps: one AR(1), or (``slow``) a fast plus a slow
one (``fit_acf``), or (``regime``) a few-state Markov-switching model with each state's own
table, burstiness and host factor (``engine.sim.regimes``); or (``trace``) the ratio and host
factor series themselves, replayed by a block bootstrap (``engine.sim.trace``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from engine.sim.regimes import RegimeFit, fit_regimes
from engine.sim.step_noise import stationary
from engine.sim.trace import TraceFit, fit_trace


class NoiseFit(NamedTuple):
    """The ``[noise]`` table (``step_noise.StepNoise``)."""

    quantiles: tuple[float, ...]
    rho: float
    prefill_quantiles: tuple[float, ...] = ()
    slow_rho: float = 0.0
    slow_share: float = 0.0
    regime: RegimeFit | None = None
    trace: TraceFit | None = None


ACF_LAGS = (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 120)


def fit_noise(steps: Sequence[dict[str, Any]], pred: np.ndarray, points: int = 101,
              by_shape: bool = False, slow: bool = False, regime: bool = False,
              host_model: tuple[float, float] | None = None, trace: bool = False,
              trace_block: float | None = None) -> NoiseFit:
    """The ratio of measured over fitted step times (see the module doc): its quantiles
    (``by_shape``: separately for steps with prefill tokens, when there are enough of them),
    each table scaled so that its steps' mean time is kept, and the autocorrelation of its
    normal scores along each worker's steps, as one AR(1) or (``slow``) a fast plus a slow;
    ``regime``: also the regime model of the ratio along each worker's steps
    (``regimes.fit_regimes``), its tables scaled so that the mean step time is kept, and
    with ``host_model`` (host_step_s, host_request_s) each state's host time factor;
    ``trace``: also the ratio series and (with ``host_model``) the host factor series of
    each worker, for a block bootstrap of mean block ``trace_block`` (default: chosen from
    the recording; ``trace.fit_trace``), the ratios scaled so the mean step time is kept."""
    y = np.array([r["execute_s"] for r in steps])
    pred = np.maximum(pred, 1e-4)
    ratio = y / pred
    prefill = np.array([r.get("prefill_tokens", 0) > 0 for r in steps])
    split = by_shape and MIN_CLASS_STEPS <= prefill.sum() <= len(steps) - MIN_CLASS_STEPS
    classes = [~prefill, prefill] if split else [np.ones(len(steps), dtype=bool)]
    tables, z = [], np.zeros(len(steps))
    normal = NormalDist()
    for members in classes:
        r = ratio[members]
        q = np.quantile(r, np.linspace(0.0, 1.0, points))
        # StepNoise interpolates between quantiles: its mean is their trapezoid mean; scale
        # it to E[ratio] = mean measured / mean fitted, so the simulated mean step is kept
        q *= (y[members].sum() / pred[members].sum()) / sampled_mean(q)
        tables.append(tuple(float(x) for x in q))
        ranks = np.empty(len(r))
        ranks[np.argsort(r, kind="stable")] = np.arange(len(r))
        z[members] = [normal.inv_cdf((k + 0.5) / len(r)) for k in ranks]
    acf = score_acf(steps, z)
    rho, slow_rho, slow_share = fit_acf(acf) if slow else (acf.get(1, 0.0), 0.0, 0.0)
    fitted = None
    host: list[tuple[np.ndarray, np.ndarray]] = []
    if (regime or trace) and host_model is not None:
        measured = host_by_step(steps)
        model = np.array([host_model[0] + host_model[1] * r["requests"] for r in steps])
        host = list(zip(worker_series(steps, measured), worker_series(steps, model),
                        strict=True))
    if regime:
        fitted = fit_regimes(worker_series(steps, ratio), host=host)
    if fitted is not None:
        weights = stationary(fitted.switch)
        mean = sum(w * sampled_mean(q) for w, q in zip(weights, fitted.quantiles, strict=True))
        factor = (y.sum() / pred.sum()) / mean
        fitted = fitted._replace(quantiles=tuple(tuple(float(x) * factor for x in q)
                                                 for q in fitted.quantiles))
    traced = (fit_trace(worker_series(steps, ratio), y.sum() / pred.sum(), host, trace_block)
              if trace else None)
    return NoiseFit(tables[0], rho, tables[1] if split else (), slow_rho, slow_share, fitted,
                    traced)


def host_by_step(steps: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per step (in the order given): the host seconds of its worker's cycle after it, as
    ``host_samples`` counts them, NaN when the next step on its worker is not busy."""
    order: dict[int, list[int]] = {}
    for i, r in enumerate(steps):
        order.setdefault(r["worker"], []).append(i)
    out = np.full(len(steps), np.nan)
    for idx in order.values():
        idx.sort(key=lambda i: steps[i]["t_send"])
        for i, j in itertools.pairwise(idx):
            cur, nxt = steps[i], steps[j]
            if nxt["busy"] and nxt["gap_s"] is not None:
                round_trip = cur["t_result"] - cur["t_send"] - cur["execute_s"]
                out[i] = max(0.0, round_trip) + nxt["gap_s"]
    return out


def worker_series(steps: Sequence[dict[str, Any]], values: np.ndarray) -> list[np.ndarray]:
    """``values`` (one per step) along each worker's steps, in send order."""
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for row, v in zip(steps, values, strict=True):
        by_worker.setdefault(row["worker"], []).append((row["t_send"], float(v)))
    return [np.array([v for _, v in sorted(rows)]) for _, rows in sorted(by_worker.items())]


MIN_CLASS_STEPS = 50  # steps of a class (prefill, decode-only) for a table of its own


def score_acf(steps: Sequence[dict[str, Any]], z: np.ndarray) -> dict[int, float]:
    """Lag -> autocorrelation of the scores ``z`` along each worker's steps (lags with at
    least 3 pairs)."""
    series = worker_series(steps, z)
    out = {}
    for lag in ACF_LAGS:
        a = np.concatenate([x[:-lag] for x in series if len(x) > lag] or [np.zeros(0)])
        b = np.concatenate([x[lag:] for x in series if len(x) > lag] or [np.zeros(0)])
        if len(a) >= 3:
            c = float(np.corrcoef(a, b)[0, 1])
            out[lag] = c if np.isfinite(c) else 0.0
    return out


def fit_acf(acf: dict[int, float]) -> tuple[float, float, float]:
    """(rho, slow_rho, slow_share) of ``acf(k) = (1 - s) rho^k + s slow_rho^k`` closest (least
    squares over the lags) to the measured autocorrelation; s 0 when one AR(1) fits as well."""
    if not acf:
        return 0.0, 0.0, 0.0
    lags = np.array(sorted(acf), dtype=float)
    target = np.array([acf[int(k)] for k in lags])
    one = min(0.99, max(0.0, acf.get(1, 0.0)))
    best = (float(((one ** lags - target) ** 2).sum()), one, 0.0, 0.0)
    if len(lags) < 4:
        return best[1], 0.0, 0.0
    fast = np.arange(0.0, 0.97, 0.02)
    slow = np.array([0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998])
    share = np.arange(0.0, 0.71, 0.01)
    f, sl, sh = np.meshgrid(fast, slow, share, indexing="ij")
    model = ((1 - sh)[..., None] * f[..., None] ** lags + sh[..., None] * sl[..., None] ** lags)
    err = ((model - target) ** 2).sum(-1)
    i = np.unravel_index(np.argmin(err), err.shape)
    if err[i] < 0.8 * best[0]:  # the slow component must earn its keep
        best = (float(err[i]), float(f[i]), float(sl[i]), float(sh[i]))
    _, rho, slow_rho, slow_share = best
    return rho, slow_rho, slow_share


def mean_kept_quantiles(ratio: np.ndarray, mean: float, points: int = 101
                        ) -> tuple[float, ...]:
    """Quantiles of ``ratio`` scaled so that drawing from them averages ``mean``."""
    q = np.quantile(ratio, np.linspace(0.0, 1.0, points))
    q *= mean / max(sampled_mean(q), 1e-30)
    return tuple(float(x) for x in q)


def sampled_mean(quantiles: Sequence[float] | np.ndarray) -> float:
    """The mean ratio ``StepNoise`` draws from these quantiles."""
    q = np.asarray(quantiles, dtype=float)
    return float((q[:-1] + q[1:]).mean() / 2)
