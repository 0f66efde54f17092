"""``python -m engine.sim fit RECORDING``: a cost file from the engine's own step recording.

The recording is what ``--profile-steps`` writes (engine/profiling.py). The fit (terms
marked *optional* only with ``--terms``, e.g. ``--terms contention,shape,slow,admit,host``
or ``--terms regime``):

- **step time** (the ``[cost]`` table): the five coefficients of ``cost_model`` by
  non-negative least squares of each step's ``execute_s`` (the worker's own timing) on its
  batch features. By default on absolute error, so the fitted mean step time equals the
  measured one (``--relative``: on relative error, as ``bench/fit_cost_model.py``);
- **step extras** (``[step_extra]``; ``extras=False`` / ``--no-step-extra``: none): two more
  regressors of the same least squares, ``prefill_step_s`` (the step has prefill tokens) and
  ``cold_step_s`` (its worker held no request before it: ``busy`` false, its first step
  after idling). Without them the fit, dominated by decode steps, misses prefill steps by
  ~25% and first steps after idling by ~40%, the steps that give most requests at a light
  load their first token (docs/simulator.md, "Per request");
- *optional* **levels** (``--terms levels``): the same least squares with a speed level per
  worker and ``LEVEL_WINDOW_S`` window of its steps (``fit_levels``): the machine's speed
  drifts by +-15% over tens of seconds at one batch shape, and a calibration serves its
  workloads one after another, so a plain fit lends each workload's drift to the features
  it has most of (on the 2026-12-07 recordings of the C-kernel engine: 4x the context cost
  with two workers, and shared-prefix's steps 10% too long); the levels keep only the
  differences within a window for the coefficients, which are then scaled so the fitted
  mean step time equals the measured one (the drift stays in the noise's ratio);
- **host per step** (``host_step_s``, ``host_request_s``): for each step followed by another
  on the same worker while that worker still held requests (``busy``), the time the worker's
  cycle spent outside its forward pass: ``t_result - t_send - execute_s`` (IPC both ways,
  encoding, the pool's turn) plus the next plan's ``gap_s`` (the scheduler's update and
  schedule, other workers' handling); least squares on the step's requests;
- *optional* **contention** (``[contention]``, ``overlap``; with several workers): a step's time is
  ``(linear model) x (1 + overlap x o)``, ``o`` the share of its compute interval that other
  workers' steps begun before it overlap (``overlap_shares``, as the simulator counts it);
  alternating least squares with the step coefficients;
- **noise** (``[noise]``, fitted in ``engine.sim.noise_fit``): the ratio of each step's measured to fitted time, as 101
  quantiles scaled so the mean step time is kept, and the lag-1 autocorrelation of its normal
  scores along each worker's steps (``step_noise.StepNoise``; ``--no-noise``: none);
  *optional* ``shape``: a table of its own for steps with prefill tokens (their ratio's
  median is ~1.25 against ~0.9 for decode-only steps); *optional* ``slow``: the
  autocorrelation at lags 1 to 120 fitted as a fast plus a slow AR(1) (``fit_acf``: live, it
  is still 0.1 at lag 100, where one AR(1) of lag-1 0.6 is 0); *optional* ``regime``: a
  few-state Markov-switching model of the ratio along each worker's steps, with each
  state's own ratio table, burstiness and host factor (``regimes.fit_regimes``: live, slow
  steps come in spells of tens to hundreds of steps, and the host path slows with them);
  *optional* ``trace``: instead of drawing from a model, the recording's own ratio and host
  factor series per worker, stored in the cost file and replayed by a stationary block
  bootstrap (``trace.fit_trace``; the mean block length from the ratio's autocorrelation,
  or ``--trace-block``): the spells, their depth and the host path's slowdown as recorded.
  It replaces the drawn step ratio and host ratio, so it goes with none of ``shape``,
  ``slow``, ``regime``, ``host`` (with ``levels`` the drift it carries is the recording's);
- **admit** (``admit_s``): the mean of ``t - frontend_t`` of the ``add`` rows (frontend stamp
  to the scheduler);
- **stream** (``stream_s``): only with the client's view of the same requests
  (``--client-results``, ``bench.loadgen run --json`` files): the mean client TTFT minus the
  mean pool-side TTFT (``first`` minus ``add``) minus ``admit_s``, i.e. what the frontend
  adds before its stamp (HTTP, tokenizing) and after the pool's output (detokenizing, SSE),
  lumped into the stream term; 0 without client results;
- *optional* **host noise** (``[noise] host_quantiles``): each host sample over the fitted host time,
  as quantiles scaled to keep the mean (the round trip and the pool's turn have a tail:
  p99 about 5x the median);
- *optional* **admission delay per request** (``[noise] admit_quantiles``): when the client's requests
  pair up with the recording's (``matched_ttfts``: one run, one client file), what each
  request's client TTFT holds beyond its pool TTFT varies (a p99 several times its median:
  the frontend's turn on a busy machine), and that tail sets much of a TTFT p99. Its 1st
  percentile, less the recorded admission, becomes the constant ``stream_s``, and the rest
  a per-request delay before admission, drawn from its quantiles (``fit_admit_delays``);
- *optional* **spell** (with ``admit``; ``[noise] admit_spell_*``): that delay drawn by the
  machine's speed at the request's arrival, the mean step ratio (measured over fitted time)
  of the steps that ended in the 0.1 s before its frontend stamp: the matched requests'
  delays in bins of that ratio, a draw one of its bin's recorded delays
  (engine/sim/admit_spell.py; live, the frontend slows down in the steps' slow spells).

``--since``/``--until`` (unix seconds) keep a window of the recording (rows by their ``t`` or
``t_send``). The engine shape (``[engine]``) is ``--base``'s (default: the default cost file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.profiling import read_recording
from engine.sim.admit_spell import SpellFit, fit_spell_delays, local_ratios
from engine.sim.contention import OVERLAP_EPS
from engine.sim.cost_model import BatchShape, CostModel, nonnegative_lstsq
from engine.sim.noise_fit import (
    MIN_CLASS_STEPS,
    NoiseFit,
    fit_noise,
    host_by_step,
    mean_kept_quantiles,
)

PROG = "python -m engine.sim fit"
# optional terms (``--terms``): CPU contention between workers, prefill steps' own noise
# table, a slow noise component, drawn admission delays, drawn host times, noise regimes
# (slow spells, engine/sim/regimes.py); none by default:
# on the shared machine's recordings none of them made the judged runs closer (see
# docs/simulator.md, "Tail terms"; ``levels``: "Drift", it halves the mean step's error on
# the C-kernel engine's recordings but not every metric's worst run)
TERMS = ("contention", "shape", "slow", "admit", "host", "regime", "levels", "trace", "spell")
# terms that draw the step ratio or the host ratio, which ``trace`` replays instead
NOT_WITH_TRACE = ("shape", "slow", "regime", "host")
LEVEL_WINDOW_S = 5.0  # ``levels``: the span of a worker's steps that shares one speed level
LEVEL_ITERATIONS = 8


@dataclass(frozen=True)
class Calibration:
    cost: CostModel
    report: dict[str, Any]  # sample counts and fit errors, for the cost file's comment


def terms_error(terms: Collection[str]) -> str | None:
    """Why ``terms`` cannot be fitted together (None when they can)."""
    unknown = sorted(set(terms) - set(TERMS))
    if unknown:
        return f"--terms: unknown {unknown}; choose from {TERMS}"
    if "spell" in terms and "admit" not in terms:
        return "--terms: spell draws the admission delay (admit) by the step ratio; add admit"
    clash = sorted(set(terms) & set(NOT_WITH_TRACE))
    if "trace" in terms and clash:
        return (f"--terms: trace replays the recorded step and host ratios; it does not go "
                f"with {clash}, which draw them")
    return None


def window(rows: Sequence[dict[str, Any]], since: float | None = None,
           until: float | None = None) -> list[dict[str, Any]]:
    """The rows whose time (``t``, or ``t_send`` for a step) is in [since, until]."""
    lo = -np.inf if since is None else since
    hi = np.inf if until is None else until
    return [r for r in rows if lo <= r.get("t", r.get("t_send", lo)) <= hi]


def step_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == "step" and r.get("execute_s", 0) > 0]


def extra_flags(steps: Sequence[dict[str, Any]]) -> np.ndarray:
    """The ``[step_extra]`` regressors, a row per step: (1 if it has prefill tokens, 1 if its
    worker held no request before it: ``busy`` false, its first step after idling, as the
    simulator counts it)."""
    return np.array([[1.0 if r["prefill_tokens"] else 0.0, 0.0 if r.get("busy", True) else 1.0]
                     for r in steps]).reshape(len(steps), 2)


def shape_of(row: dict[str, Any]) -> BatchShape:
    return BatchShape(row["prefill_tokens"], row["decode_seqs"], row["context_tokens"],
                      row["prefill_pairs"])


def host_samples(steps: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(requests, host seconds of the worker's cycle) for each step followed by a busy one
    on its worker (see the module doc; ``noise_fit.host_by_step`` counts them)."""
    host = host_by_step(steps)
    return [(r["requests"], float(h)) for r, h in zip(steps, host, strict=True)
            if not np.isnan(h)]


def overlap_shares(steps: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per step (in the order given): the share of its compute interval, ``[t_result -
    execute_s, t_result]``, during which other workers' steps begun before it still computed
    (summed, at most 1): what the simulator's ``overlap_share`` computes for its own steps."""
    order = sorted(range(len(steps)), key=lambda i: steps[i]["t_result"] - steps[i]["execute_s"])
    computing: dict[int, tuple[float, float]] = {}
    out = np.zeros(len(steps))
    for i in order:
        r = steps[i]
        start, end, w = r["t_result"] - r["execute_s"], r["t_result"], r["worker"]
        covered = sum(min(until, end) - start for o, (since, until) in computing.items()
                      if o != w and since < start - OVERLAP_EPS and until > start)
        out[i] = min(1.0, covered / (end - start)) if end > start else 0.0
        computing[w] = (start, end)
    return out


def fit_contention(x: np.ndarray, y: np.ndarray, share: np.ndarray, relative: bool = False,
                   largest: float = 4.0) -> tuple[list[float], float, np.ndarray]:
    """``y = (x @ coef) x (1 + overlap x share)``, coef >= 0 and 0 <= overlap <= ``largest``:
    for a given overlap coef is a least-squares fit, so overlap is found by a 1-D search (a
    grid, then golden section); (coef, overlap, fitted y). 0 when no step overlaps another."""
    if not share.any():
        coef, pred = nonnegative_lstsq(x, y, relative)
        return coef, 0.0, pred
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)

    def loss(c: float) -> float:
        factor = 1.0 + c * share
        _, pred = nonnegative_lstsq(x * factor[:, None], y, relative)
        return float((((pred - y) * w) ** 2).sum())

    grid = np.linspace(0.0, largest, 41)
    k = int(np.argmin([loss(c) for c in grid]))
    lo, hi = grid[max(0, k - 1)], grid[min(len(grid) - 1, k + 1)]
    golden = (np.sqrt(5.0) - 1) / 2
    for _ in range(60):
        c1, c2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if loss(c1) <= loss(c2):
            hi = c2
        else:
            lo = c1
    overlap = float((lo + hi) / 2)
    factor = 1.0 + overlap * share
    coef, pred = nonnegative_lstsq(x * factor[:, None], y, relative)
    return coef, overlap, pred


def level_keys(steps: Sequence[dict[str, Any]], span_s: float | None = None) -> np.ndarray:
    """Per step: the index of its (worker, ``span_s`` window of ``t_send``) group (default
    ``LEVEL_WINDOW_S``)."""
    span_s = span_s or LEVEL_WINDOW_S
    groups: dict[tuple[int, int], int] = {}
    return np.array([groups.setdefault((r["worker"], int(r["t_send"] // span_s)), len(groups))
                     for r in steps], dtype=int)


def fit_levels(x: np.ndarray, y: np.ndarray, keys: np.ndarray, share: np.ndarray,
               relative: bool = False, iterations: int = LEVEL_ITERATIONS
               ) -> tuple[list[float], float, np.ndarray]:
    """``fit_contention`` with a speed level per group of steps (``keys``: a worker's steps
    in one short window): ``y = level[key] x model(x)``, the levels the median ratio of
    measured over fitted time in each group, alternating with the coefficients. The machine's
    speed drifts by +-15% over tens of seconds at the same batch shape, and a calibration
    serves its workloads one after the other, so a plain fit lends a workload's drift to the
    features that workload has most of (e.g. long contexts); with the levels, only the
    differences within a group fit the coefficients. The coefficients are then scaled so
    the fitted mean step time equals the measured one (the drift stays in the ratio the
    noise fit draws from). (coef, overlap, fitted y without the levels)."""
    level = np.ones(len(y))
    groups = [keys == k for k in np.unique(keys)]
    for _ in range(iterations):
        coef, overlap, pred = fit_contention(x, y / level, share, relative)
        ratio = y / np.maximum(pred, 1e-9)
        for members in groups:
            level[members] = np.median(ratio[members])
        level /= level.mean()
    scale = y.sum() / max(pred.sum(), 1e-30)
    return [float(c * scale) for c in coef], overlap, pred * scale


def pool_ttfts(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Per request: its first token out of the pool minus its arrival at the pool."""
    added = {r["request"]: r["t"] for r in rows if r["kind"] == "add"}
    return [r["t"] - added[r["request"]] for r in rows
            if r["kind"] == "first" and r["request"] in added]


def paired_requests(rows: Sequence[dict[str, Any]], client_requests: Sequence[dict[str, Any]]
                    ) -> tuple[dict[str, float], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """The recording's first-token times (request id -> ``t``) and its ``add`` rows paired
    with the client's completed requests (``bench.loadgen run --json`` rows) of one run: the
    client's in send order against the recording's in frontend-stamp order; no pairs unless
    they pair up one to one (same count, same prompt lengths)."""
    first = {r["request"]: r["t"] for r in rows if r["kind"] == "first"}
    adds = sorted((r for r in rows if r["kind"] == "add" and r.get("frontend_t")
                   and r["request"] in first), key=lambda r: r["frontend_t"])
    done = sorted((q for q in client_requests if q.get("outcome") == "completed"
                   and q.get("ttft_s") is not None), key=lambda q: q["sent_s"])
    if len(adds) != len(done) or any(a["prompt_tokens"] != q["num_prompt_tokens"]
                                     for a, q in zip(adds, done, strict=True)):
        return first, []
    return first, list(zip(adds, done, strict=True))


def matched_ttfts(rows: Sequence[dict[str, Any]], client_requests: Sequence[dict[str, Any]]
                  ) -> list[tuple[float, float, float, float]]:
    """(client TTFT, pool TTFT, admission delay, frontend stamp) per request of one run,
    paired as ``paired_requests`` does; [] unless they pair up."""
    first, pairs = paired_requests(rows, client_requests)
    return [(q["ttft_s"], first[a["request"]] - a["t"], a["t"] - a["frontend_t"],
             a["frontend_t"]) for a, q in pairs]


MIN_MATCHED = 20  # requests matched with the client's for a drawn admission delay


def fit_admit_delays(matched: Sequence[Sequence[float]], points: int = 101
                     ) -> tuple[tuple[float, ...], float]:
    """(admit_quantiles, stream_s) from matched requests: what the client sees beyond the
    pool's TTFT is ``admission delay + extra`` per request; the extra's 1st percentile is
    the constant ``stream_s`` every token pays, and the rest, ``client - pool - stream_s``,
    is the admission delay a request draws (its quantiles)."""
    delays, stream = admit_delays_of(matched)
    return tuple(float(q) for q in np.quantile(delays, np.linspace(0, 1, points))), stream


def admit_delays_of(matched: Sequence[Sequence[float]]) -> tuple[np.ndarray, float]:
    """Per matched request, its delay beyond the pool's TTFT and ``stream_s`` (see
    ``fit_admit_delays``), and ``stream_s``."""
    client, pool, admit = (np.array([m[i] for m in matched]) for i in range(3))
    stream = max(0.0, float(np.quantile(client - pool - admit, 0.01)))
    return np.maximum(0.0, client - pool - stream), stream


def fit_spell(steps: Sequence[dict[str, Any]], pred: np.ndarray,
              matched: Sequence[Sequence[float]]) -> SpellFit:
    """``--terms spell``: the admission delays binned by the local step ratio (measured over
    fitted step time) at each matched request's frontend stamp (engine/sim/admit_spell.py)."""
    delays, _ = admit_delays_of(matched)
    ratio = np.array([r["execute_s"] for r in steps]) / np.maximum(pred, 1e-4)
    ends = np.array([r["t_result"] for r in steps])
    local = local_ratios(ends, ratio, np.array([m[3] for m in matched]))
    return fit_spell_delays(delays, local)


def fit_recording(rows: Sequence[dict[str, Any]], base: CostModel,
                  client_ttfts: Sequence[float] = (), relative: bool = False,
                  source: str = "", noise: bool = True, terms: Collection[str] = (),
                  matched: Sequence[Sequence[float]] = (),
                  extras: bool = True, trace_block: float | None = None) -> Calibration:
    """A cost model from recording ``rows`` (see the module doc); ValueError when the
    recording holds too few steps to fit, or for terms that do not go together.
    ``extras``: fit ``[step_extra]`` (the default); ``trace_block``: with ``trace``, the
    bootstrap's mean block length (default: chosen from the recording)."""
    error = terms_error(terms)
    if error:
        raise ValueError(f"{PROG}: {error}")
    steps = step_rows(rows)
    if len(steps) < len(CostModel.COEFFICIENTS):
        raise ValueError(f"{PROG}: the recording holds {len(steps)} timed steps; at least "
                         f"{len(CostModel.COEFFICIENTS)} are needed")
    y = np.array([r["execute_s"] for r in steps])
    x = np.array([shape_of(r).features() for r in steps])
    if extras:  # two more regressors: the step has prefill tokens, is its worker's first
        x = np.hstack([x, extra_flags(steps)])
    share = overlap_shares(steps) if "contention" in terms else np.zeros(len(steps))
    coef, overlap, pred = (fit_levels(x, y, level_keys(steps), share, relative)
                           if "levels" in terms else fit_contention(x, y, share, relative))
    prefill_step, cold_step = coef[len(CostModel.COEFFICIENTS):] if extras else (0.0, 0.0)
    coef = coef[:len(CostModel.COEFFICIENTS)]
    rel = np.abs(pred - y) / y
    host = host_samples(steps)
    host_step = host_request = 0.0
    host_q: tuple[float, ...] = ()
    if len(host) >= 2:
        x = np.array([[1.0, float(n)] for n, _ in host])
        host_s = np.array([s for _, s in host])
        (host_step, host_request), host_pred = nonnegative_lstsq(x, host_s, relative=False)
        if noise and "host" in terms and len(host) >= MIN_CLASS_STEPS and host_pred.min() > 0:
            host_q = mean_kept_quantiles(host_s / host_pred, host_s.sum() / host_pred.sum())
    admits = [r["t"] - r["frontend_t"] for r in rows
              if r["kind"] == "add" and r.get("frontend_t")]
    admit = max(0.0, float(np.mean(admits))) if admits else 0.0
    ttfts = pool_ttfts(rows)
    stream = 0.0
    if client_ttfts and ttfts:
        stream = max(0.0, float(np.mean(client_ttfts)) - float(np.mean(ttfts)) - admit)
    admit_q: tuple[float, ...] = ()
    if noise and "admit" in terms and len(matched) >= MIN_MATCHED:
        admit_q, stream = fit_admit_delays(matched)
    spell = (fit_spell(steps, pred, matched)
             if admit_q and "spell" in terms and all(len(m) >= 4 for m in matched) else None)
    values: dict[str, Any] = dict(zip(CostModel.COEFFICIENTS, coef, strict=True))
    nf = (fit_noise(steps, pred, by_shape="shape" in terms, slow="slow" in terms,
                    regime="regime" in terms, host_model=(host_step, host_request),
                    trace="trace" in terms, trace_block=trace_block)
          if noise else NoiseFit((), 0.0))
    reg = nf.regime
    cost = replace(base, **values, admit_s=admit, stream_s=stream, host_step_s=host_step,
                   host_request_s=host_request, source=source or base.source,
                   noise_quantiles=nf.quantiles, noise_rho=nf.rho,
                   noise_prefill_quantiles=nf.prefill_quantiles, noise_slow_rho=nf.slow_rho,
                   noise_slow_share=nf.slow_share, admit_quantiles=admit_q, host_quantiles=host_q,
                   noise_regime_switch=reg.switch if reg else (),
                   noise_regime_quantiles=reg.quantiles if reg else (),
                   noise_regime_rho=reg.rho if reg else (),
                   noise_regime_host=reg.host if reg else (), noise_trace=nf.trace,
                   admit_spell=spell,
                   overlap=overlap, prefill_step_s=prefill_step, cold_step_s=cold_step)
    report: dict[str, Any] = {
        "steps": len(steps), "median_rel_error": float(np.median(rel)),
        "p90_rel_error": float(np.quantile(rel, 0.9)),
        "mean_step_s": float(y.mean()), "fitted_mean_step_s": float(pred.mean()),
        "host_samples": len(host),
        "mean_host_s": float(np.mean([s for _, s in host])) if host else 0.0,
        "admit_samples": len(admits), "pool_ttft_samples": len(ttfts),
        "client_ttft_samples": len(client_ttfts), "matched_requests": len(matched),
    }
    if reg is not None:  # the regime model's chosen shape (the rest is in the cost file)
        report |= {"regime_states": len(reg.switch), "regime_window": reg.window}
    if nf.trace is not None:
        report |= {"trace_block": nf.trace.block}
    if spell is not None:
        report["admit_spell_bins"] = [len(b) for b in spell.delays]
    return Calibration(cost, report)


def client_requests_of(path: str) -> list[dict[str, Any]]:
    """The per-request rows of one ``bench.loadgen run --json`` result file."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--client-results: cannot read {path}: {e}") from e
    return list(result.get("requests", []))


def client_ttfts_of(paths: Sequence[str]) -> list[float]:
    """TTFTs of the completed requests of ``bench.loadgen run --json`` result files."""
    out: list[float] = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--client-results: cannot read {path}: {e}") from e
        out += [r["ttft_s"] for r in result.get("requests", [])
                if r.get("outcome") == "completed" and r.get("ttft_s") is not None]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recording", help="written by the engine's --profile-steps")
    p.add_argument("--out", required=True, help="the cost file to write (TOML)")
    p.add_argument("--base", help="cost file whose [engine] table to keep (default: the "
                   "default cost file)")
    p.add_argument("--client-results", action="append", default=[], metavar="JSON",
                   help="bench.loadgen run --json results of the same requests (stream_s)")
    p.add_argument("--since", type=float, help="unix seconds: ignore rows before")
    p.add_argument("--until", type=float, help="unix seconds: ignore rows after")
    p.add_argument("--relative", action="store_true", help="fit step times on relative error")
    p.add_argument("--terms", default="", help="optional model terms to fit, comma-separated: "
                   f"{', '.join(TERMS)} (see the module doc; none by default)")
    p.add_argument("--trace-block", type=float, help="with --terms trace: the bootstrap's "
                   "mean block length in steps (default: chosen from the recording)")
    p.add_argument("--no-noise", action="store_true", help="no [noise] table: every simulated "
                   "step takes exactly the model's time")
    p.add_argument("--no-step-extra", action="store_true", help="no [step_extra]: prefill "
                   "steps and a worker's first step after idling cost what their shape says")
    args = p.parse_args(argv)
    terms = [t for t in args.terms.split(",") if t]
    if terms_error(terms):
        p.error(str(terms_error(terms)))
    if args.trace_block is not None and not (math.isfinite(args.trace_block)
                                             and args.trace_block >= 1):
        p.error("--trace-block: a number of steps >= 1")
    if args.trace_block is not None and "trace" not in terms:
        p.error("--trace-block goes with --terms trace")
    try:
        base = CostModel.load(args.base)
        rows = window(read_recording(args.recording), args.since, args.until)
        matched = (matched_ttfts(rows, client_requests_of(args.client_results[0]))
                   if len(args.client_results) == 1 else [])
        cal = fit_recording(rows, base, client_ttfts_of(args.client_results), args.relative,
                            matched=matched,
                            source=f"{PROG} {args.recording}", noise=not args.no_noise,
                            terms=terms, extras=not args.no_step_extra,
                            trace_block=args.trace_block)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    comment = (f"Fitted from {args.recording}: "
               + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in cal.report.items())
               + f"\nRegenerate: {PROG} {args.recording} --out {args.out}")
    Path(args.out).write_text(cal.cost.to_toml(comment), encoding="utf-8")
    for name in (*CostModel.COEFFICIENTS, *CostModel.HOST, "overlap", *CostModel.STEP_EXTRA):
        print(f"{name:16s} {getattr(cal.cost, name):.4g}")
    print(json.dumps(cal.report))
    return 0
