"""``python -m engine.sim fit RECORDING``: a cost file from the engine's own step recording.

The recording is what ``--profile-steps`` writes (engine/profiling.py). The fit:

- **step time** (the ``[cost]`` table): the five coefficients of ``cost_model`` by
  non-negative least squares of each step's ``execute_s`` (the worker's own timing) on its
  batch features. By default on absolute error, so the fitted mean step time equals the
  measured one (``--relative``: on relative error, as ``bench/fit_cost_model.py``);
- **host per step** (``host_step_s``, ``host_request_s``): for each step followed by another
  on the same worker while that worker still held requests (``busy``), the time the worker's
  cycle spent outside its forward pass: ``t_result - t_send - execute_s`` (IPC both ways,
  encoding, the pool's turn) plus the next plan's ``gap_s`` (the scheduler's update and
  schedule, other workers' handling); least squares on the step's requests;
- **noise** (``[noise]``): the ratio of each step's measured to fitted time, as 101
  quantiles scaled so the mean step time is kept, and the lag-1 autocorrelation of its normal
  scores along each worker's steps (``cost_model.StepNoise``; ``--no-noise``: none);
- **admit** (``admit_s``): the mean of ``t - frontend_t`` of the ``add`` rows (frontend stamp
  to the scheduler);
- **stream** (``stream_s``): only with the client's view of the same requests
  (``--client-results``, ``bench.loadgen run --json`` files): the mean client TTFT minus the
  mean pool-side TTFT (``first`` minus ``add``) minus ``admit_s``, i.e. what the frontend
  adds before its stamp (HTTP, tokenizing) and after the pool's output (detokenizing, SSE),
  lumped into the stream term; 0 without client results.

``--since``/``--until`` (unix seconds) keep a window of the recording (rows by their ``t`` or
``t_send``). The engine shape (``[engine]``) is ``--base``'s (default: the default cost file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from engine.profiling import read_recording
from engine.sim.cost_model import BatchShape, CostModel, fit, nonnegative_lstsq

PROG = "python -m engine.sim fit"


@dataclass(frozen=True)
class Calibration:
    cost: CostModel
    report: dict[str, Any]  # sample counts and fit errors, for the cost file's comment


def window(rows: Sequence[dict[str, Any]], since: float | None = None,
           until: float | None = None) -> list[dict[str, Any]]:
    """The rows whose time (``t``, or ``t_send`` for a step) is in [since, until]."""
    lo = -np.inf if since is None else since
    hi = np.inf if until is None else until
    return [r for r in rows if lo <= r.get("t", r.get("t_send", lo)) <= hi]


def step_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == "step" and r.get("execute_s", 0) > 0]


def shape_of(row: dict[str, Any]) -> BatchShape:
    return BatchShape(row["prefill_tokens"], row["decode_seqs"], row["context_tokens"],
                      row["prefill_pairs"])


def host_samples(steps: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(requests, host seconds of the worker's cycle) for each step followed by a busy one
    on its worker (see the module doc)."""
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for r in steps:
        by_worker.setdefault(r["worker"], []).append(r)
    out = []
    for rows in by_worker.values():
        rows.sort(key=lambda r: r["t_send"])
        for cur, nxt in itertools.pairwise(rows):
            if not nxt["busy"] or nxt["gap_s"] is None:
                continue
            round_trip = cur["t_result"] - cur["t_send"] - cur["execute_s"]
            out.append((cur["requests"], max(0.0, round_trip) + nxt["gap_s"]))
    return out


def pool_ttfts(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Per request: its first token out of the pool minus its arrival at the pool."""
    added = {r["request"]: r["t"] for r in rows if r["kind"] == "add"}
    return [r["t"] - added[r["request"]] for r in rows
            if r["kind"] == "first" and r["request"] in added]


def fit_noise(steps: Sequence[dict[str, Any]], pred: np.ndarray,
              points: int = 101) -> tuple[tuple[float, ...], float]:
    """(ratio quantiles, rho) of measured over fitted step times (see the module doc)."""
    y = np.array([r["execute_s"] for r in steps])
    pred = np.maximum(pred, 1e-4)
    ratio = y / pred
    q = np.quantile(ratio, np.linspace(0.0, 1.0, points))
    # StepNoise interpolates between quantiles: its mean is their trapezoid mean; scale it to
    # E[ratio] = mean measured / mean fitted, so the simulated mean step is the measured one
    q *= (y.sum() / pred.sum()) / sampled_mean(q)
    quantiles = tuple(float(x) for x in q)
    ranks = np.empty(len(ratio))
    ranks[np.argsort(ratio, kind="stable")] = np.arange(len(ratio))
    normal = NormalDist()
    z = [normal.inv_cdf((k + 0.5) / len(ratio)) for k in ranks]
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for row, score in zip(steps, z, strict=True):
        by_worker.setdefault(row["worker"], []).append((row["t_send"], score))
    pairs = [(a[1], b[1]) for series in by_worker.values()
             for a, b in itertools.pairwise(sorted(series))]
    rho = 0.0
    if len(pairs) >= 3:
        rho = float(np.corrcoef(np.array(pairs).T)[0, 1])
        rho = 0.0 if not np.isfinite(rho) else min(0.99, max(-0.99, rho))
    return quantiles, rho


def sampled_mean(quantiles: Sequence[float] | np.ndarray) -> float:
    """The mean ratio ``StepNoise`` draws from these quantiles."""
    q = np.asarray(quantiles, dtype=float)
    return float((q[:-1] + q[1:]).mean() / 2)


def fit_recording(rows: Sequence[dict[str, Any]], base: CostModel,
                  client_ttfts: Sequence[float] = (), relative: bool = False,
                  source: str = "", noise: bool = True) -> Calibration:
    """A cost model from recording ``rows`` (see the module doc); ValueError when the
    recording holds too few steps to fit."""
    steps = step_rows(rows)
    if len(steps) < len(CostModel.COEFFICIENTS):
        raise ValueError(f"{PROG}: the recording holds {len(steps)} timed steps; at least "
                         f"{len(CostModel.COEFFICIENTS)} are needed")
    coef, pred = fit([(r["execute_s"], shape_of(r)) for r in steps], relative=relative)
    y = np.array([r["execute_s"] for r in steps])
    rel = np.abs(pred - y) / y
    host = host_samples(steps)
    host_step = host_request = 0.0
    if len(host) >= 2:
        x = np.array([[1.0, float(n)] for n, _ in host])
        (host_step, host_request), _ = nonnegative_lstsq(
            x, np.array([s for _, s in host]), relative=False)
    admits = [r["t"] - r["frontend_t"] for r in rows
              if r["kind"] == "add" and r.get("frontend_t")]
    admit = max(0.0, float(np.mean(admits))) if admits else 0.0
    ttfts = pool_ttfts(rows)
    stream = 0.0
    if client_ttfts and ttfts:
        stream = max(0.0, float(np.mean(client_ttfts)) - float(np.mean(ttfts)) - admit)
    values: dict[str, Any] = dict(zip(CostModel.COEFFICIENTS, coef, strict=True))
    quantiles, rho = fit_noise(steps, pred) if noise else ((), 0.0)
    cost = replace(base, **values, admit_s=admit, stream_s=stream, host_step_s=host_step,
                   host_request_s=host_request, source=source or base.source,
                   noise_quantiles=quantiles, noise_rho=rho)
    report = {
        "steps": len(steps), "median_rel_error": float(np.median(rel)),
        "p90_rel_error": float(np.quantile(rel, 0.9)),
        "mean_step_s": float(y.mean()), "fitted_mean_step_s": float(pred.mean()),
        "host_samples": len(host),
        "mean_host_s": float(np.mean([s for _, s in host])) if host else 0.0,
        "admit_samples": len(admits), "pool_ttft_samples": len(ttfts),
        "client_ttft_samples": len(client_ttfts),
    }
    return Calibration(cost, report)


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
    p.add_argument("--no-noise", action="store_true", help="no [noise] table: every simulated "
                   "step takes exactly the model's time")
    args = p.parse_args(argv)
    try:
        base = CostModel.load(args.base)
        rows = window(read_recording(args.recording), args.since, args.until)
        cal = fit_recording(rows, base, client_ttfts_of(args.client_results), args.relative,
                            source=f"{PROG} {args.recording}", noise=not args.no_noise)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    comment = (f"Fitted from {args.recording}: "
               + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in cal.report.items())
               + f"\nRegenerate: {PROG} {args.recording} --out {args.out}")
    Path(args.out).write_text(cal.cost.to_toml(comment), encoding="utf-8")
    for name in (*CostModel.COEFFICIENTS, *CostModel.HOST):
        print(f"{name:16s} {getattr(cal.cost, name):.4g}")
    print(json.dumps(cal.report))
    return 0
