"""Slow spells in the step noise: a few-state Markov-switching model of the step-time ratio.

Live, a step's measured time over the cost model's (its *ratio*) comes in spells: the slowest
requests of a run are those whose whole (short) life fell in a spell of steps 1.4-1.7x the
model, and such spells last tens to hundreds of steps (docs/simulator.md, "Per request").
One AR(1) on the ratio's normal scores forgets them within a few steps, and mapping a slow
AR(1) onto the ratio's quantiles sends a long spell into the table's far tail (its spikes).
So here the ratio has a persistent **regime** (a hidden state with its own level and its
own spikes), fitted from the recording:

1. per worker, the log ratio along its steps, smoothed by a centred moving average of
   ``window`` steps (short spikes average out, spells stay);
2. a Gaussian hidden Markov model with ``k`` states fitted to the smoothed series by EM
   (Baum-Welch, scaled forward-backward; deterministic start: the states' means at evenly
   spaced quantiles): its transition matrix is the per-step switching probabilities;
3. each step is given its most probable state, and each state keeps the quantiles of the
   *raw* ratio of its steps (so a slow state has both a higher level and heavier spikes),
   the lag-1 correlation of the ratio's normal scores within the state (short bursts) and,
   given the host samples, its host factor (live, the pool's round trip slows down in a
   slow spell as much as the forward pass: 1.2-1.9x in the slowest state);
4. ``k`` (``REGIME_STATES``) and ``window`` (``REGIME_WINDOWS``) are chosen from the
   recording itself: each candidate's drawn series (same lengths, seeded) is compared with
   the recording's ``window_spread`` over ``SPREAD_LENGTHS`` steps, and the closest kept.

The simulator (``step_noise.StepNoise``) walks each worker's state through the transition
matrix, one move per step, draws the step's ratio from the state's table through a Gaussian
AR(1) score, and multiplies the host time after the step by the state's factor. ``spells``
and ``window_spread`` measure what the model is meant to reproduce (the lengths of the
states' runs; the spread of the ratio's means over windows of 4 to 128 steps), on a
recording and on a drawn series alike (``python -m bench.fidelity_spells``). Known bias:
spells shorter than about the window merge into their neighbours, so the fitted dwell runs
~15% long on a series with known regimes (tests/sim/test_regimes.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

REGIME_STATES = (2, 3, 4)  # numbers of hidden states tried
REGIME_WINDOWS = (8, 16, 32, 64)  # moving-average lengths (steps) tried
SPREAD_LENGTHS = (4, 8, 16, 32, 64)  # windows whose spread the chosen model matches best
MIN_STATE_STEPS = 20  # steps a state needs for a table of its own


class Hmm(NamedTuple):
    """A Gaussian hidden Markov model, states ordered by mean."""

    means: np.ndarray
    sds: np.ndarray
    trans: np.ndarray  # trans[i, j]: P(state j at the next step | state i)
    start: np.ndarray
    log_likelihood: float


class RegimeFit(NamedTuple):
    """The ``[noise]`` regime keys: per state its ratio quantiles and score lag-1
    correlation, and the per-step switching matrix."""

    switch: tuple[tuple[float, ...], ...]
    quantiles: tuple[tuple[float, ...], ...]
    rho: tuple[float, ...]
    host: tuple[float, ...] = ()  # per state: its steps' host time over the host model's
    window: int = 0  # the moving average's length it was fitted on (not in the cost file)


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``window`` points (the ends padded with the end values)."""
    if window <= 1 or len(x) == 0:
        return np.asarray(x, dtype=float)
    padded = np.pad(np.asarray(x, dtype=float), (window // 2, window - 1 - window // 2),
                    mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _forward_backward(x: np.ndarray, hmm: Hmm) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """Scaled forward-backward: (alpha, beta, emission densities, scales)."""
    n, k = len(x), len(hmm.means)
    dens = (np.exp(-0.5 * ((x[:, None] - hmm.means) / hmm.sds) ** 2) / hmm.sds) + 1e-300
    alpha, scale = np.empty((n, k)), np.empty(n)
    a = hmm.start * dens[0]
    scale[0] = a.sum()
    alpha[0] = a / scale[0]
    trans = hmm.trans
    for t in range(1, n):
        a = (alpha[t - 1] @ trans) * dens[t]
        scale[t] = a.sum()
        alpha[t] = a / scale[t]
    beta = np.empty((n, k))
    beta[-1] = 1.0
    for t in range(n - 2, -1, -1):
        beta[t] = trans @ (dens[t + 1] * beta[t + 1]) / scale[t + 1]
    return alpha, beta, dens, scale


def fit_hmm(series: Sequence[np.ndarray], k: int, iters: int = 100, tol: float = 1e-6) -> Hmm:
    """EM fit of a ``k``-state Gaussian HMM to several independent sequences."""
    x = np.concatenate(series)
    means = np.quantile(x, (np.arange(k) + 0.5) / k)
    sds = np.full(k, max(float(x.std()) / k, 1e-3))
    trans = np.full((k, k), 0.05 / max(1, k - 1))
    np.fill_diagonal(trans, 0.95 if k > 1 else 1.0)
    hmm = Hmm(means, sds, trans, np.full(k, 1.0 / k), -math.inf)
    for _ in range(iters):
        occ, occ_x, occ_xx = np.zeros(k), np.zeros(k), np.zeros(k)
        moves, first, ll = np.zeros((k, k)), np.zeros(k), 0.0
        for s in series:
            if len(s) < 2:
                continue
            alpha, beta, dens, scale = _forward_backward(s, hmm)
            g = alpha * beta
            moves += np.einsum("ti,ij,tj->ij", alpha[:-1], hmm.trans,
                               dens[1:] * beta[1:] / scale[1:, None])
            occ += g.sum(0)
            occ_x += (g * s[:, None]).sum(0)
            occ_xx += (g * s[:, None] ** 2).sum(0)
            first += g[0]
            ll += float(np.log(scale).sum())
        occ = np.maximum(occ, 1e-12)
        means = occ_x / occ
        sds = np.sqrt(np.maximum(occ_xx / occ - means ** 2, 1e-8))
        trans = (moves + 1e-12) / (moves + 1e-12).sum(1, keepdims=True)
        done = ll - hmm.log_likelihood < tol * abs(ll)
        hmm = Hmm(means, sds, trans, first / max(first.sum(), 1e-12), ll)
        if done:
            break
    order = np.argsort(hmm.means)
    return Hmm(hmm.means[order], hmm.sds[order], hmm.trans[np.ix_(order, order)],
               hmm.start[order], hmm.log_likelihood)


def most_likely_states(series: Sequence[np.ndarray], hmm: Hmm) -> list[np.ndarray]:
    """Per sequence, each point's state of highest posterior probability."""
    out = []
    for s in series:
        if len(s) == 0:
            out.append(np.zeros(0, dtype=int))
            continue
        alpha, beta, _, _ = _forward_backward(s, hmm)
        out.append(np.argmax(alpha * beta, axis=1))
    return out


def normal_scores(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` mapped onto standard normal quantiles."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    inv = NormalDist().inv_cdf
    return np.array([inv((r + 0.5) / len(x)) for r in ranks])


def fit_regimes(ratios: Sequence[np.ndarray], states: Sequence[int] = REGIME_STATES,
                windows: Sequence[int] = REGIME_WINDOWS, points: int = 101,
                host: Sequence[tuple[np.ndarray, np.ndarray]] = (), seed: int = 0
                ) -> RegimeFit | None:
    """The regime model of per-worker ratio sequences (see the module doc). Each number of
    states in ``states`` and moving-average length in ``windows`` is fitted, and the one
    kept whose simulated ratio series (same lengths, ``seed``) has the window spread
    (``window_spread`` over ``SPREAD_LENGTHS``) closest to the recording's; None when no
    candidate has ``MIN_STATE_STEPS`` steps in every state. ``host``: per worker (host
    seconds after each step, NaN where not measured; the host model's seconds): each state's
    host factor, the sum of its measured host times over the model's (live, the host path
    slows down with the forward pass)."""
    if host and len(host) != len(ratios):
        raise ValueError("fit_regimes: host needs one (measured, model) pair per worker")
    pairs = [h for r, h in zip(ratios, host, strict=True) if len(r)] if host else []
    ratios = [np.asarray(r, dtype=float) for r in ratios if len(r)]
    if sum(len(r) for r in ratios) < 2 * MIN_STATE_STEPS:
        return None
    target = window_spread(ratios, SPREAD_LENGTHS)
    best: tuple[float, RegimeFit] | None = None
    for window in windows:
        smooth = [moving_average(np.log(r), window) for r in ratios]
        for k in states:
            fitted = _fit_states(ratios, smooth, k, points, pairs)
            if fitted is None:
                continue
            fitted = fitted._replace(window=window)
            spread = window_spread(simulate(fitted, [len(r) for r in ratios], seed),
                                   SPREAD_LENGTHS)
            miss = sum(abs(math.log(spread[n] / target[n])) for n in target if n in spread)
            if best is None or miss < best[0]:
                best = (miss, fitted)
    return best[1] if best is not None else None


def _fit_states(ratios: Sequence[np.ndarray], smooth: Sequence[np.ndarray], k: int,
                points: int, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
                ) -> RegimeFit | None:
    """One candidate of ``fit_regimes``: ``k`` states fitted on the smoothed series."""
    hmm = fit_hmm(smooth, k)
    labels = most_likely_states(smooth, hmm)
    flat, ratio = np.concatenate(labels), np.concatenate(ratios)
    if np.bincount(flat, minlength=k).min() < MIN_STATE_STEPS:
        return None
    grid = np.linspace(0.0, 1.0, points)
    tables, rhos = [], []
    for j in range(k):
        members = flat == j
        tables.append(tuple(float(q) for q in np.quantile(ratio[members], grid)))
        z = np.zeros(len(ratio))
        z[members] = normal_scores(ratio[members])
        a, b = [], []
        offset = 0
        for lab in labels:  # consecutive steps of one worker, both in state j
            pair = (lab[:-1] == j) & (lab[1:] == j)
            zz = z[offset:offset + len(lab)]
            a.append(zz[:-1][pair])
            b.append(zz[1:][pair])
            offset += len(lab)
        x, y = np.concatenate(a), np.concatenate(b)
        c = float(np.corrcoef(x, y)[0, 1]) if len(x) >= 3 else 0.0
        rhos.append(min(0.99, max(0.0, c)) if np.isfinite(c) else 0.0)
    switch = tuple(tuple(float(p) for p in row) for row in hmm.trans)
    factors: tuple[float, ...] = ()
    if pairs:
        measured = np.concatenate([np.asarray(m, dtype=float) for m, _ in pairs])
        model = np.concatenate([np.asarray(p, dtype=float) for _, p in pairs])
        ok = np.isfinite(measured) & (model > 0)
        factors = tuple(float(measured[ok & (flat == j)].sum()
                              / max(model[ok & (flat == j)].sum(), 1e-12))
                        if (ok & (flat == j)).sum() >= MIN_STATE_STEPS else 1.0
                        for j in range(k))
    return RegimeFit(switch, tuple(tables), tuple(rhos), factors)


def simulate(fitted: RegimeFit, lengths: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Ratio series of the given lengths drawn from a regime model, as the simulator draws
    them (``step_noise.StepNoise``, one worker per series)."""
    from engine.sim.step_noise import StepNoise

    noise = StepNoise(fitted.quantiles[0], 0.0, len(lengths), seed,
                      regime_switch=fitted.switch, regime_quantiles=fitted.quantiles,
                      regime_rho=fitted.rho)
    return [np.array([noise(w) for _ in range(n)]) for w, n in enumerate(lengths)]


def spells(labels: Sequence[np.ndarray], k: int) -> list[list[int]]:
    """Per state, the lengths of its runs (consecutive steps in it) in each sequence."""
    out: list[list[int]] = [[] for _ in range(k)]
    for lab in labels:
        if len(lab) == 0:
            continue
        edges = np.r_[0, np.flatnonzero(np.diff(lab)) + 1, len(lab)]
        for a, b in itertools.pairwise(edges.tolist()):
            out[int(lab[a])].append(b - a)
    return out


def window_spread(series: Sequence[np.ndarray], lengths: Sequence[int] = (1, 4, 8, 16, 32, 64,
                                                                           128)
                  ) -> dict[int, float]:
    """Per window length L: the p99 over the p50 of the ratio's means over every window of
    L consecutive steps of a worker (how much slower a request living L steps can be)."""
    out = {}
    for n in lengths:
        means = [np.convolve(s, np.ones(n) / n, mode="valid") for s in series if len(s) >= n]
        if means:
            m = np.concatenate(means)
            out[n] = float(np.quantile(m, 0.99) / np.quantile(m, 0.5))
    return out
