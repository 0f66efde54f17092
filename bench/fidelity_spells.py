"""Slow spells of the step time, live and simulated: ``python -m bench.fidelity_spells``.

    python -m bench.fidelity_spells --from DIR [--workers 1,2] [--seeds 3]

On the calibration runs kept by ``bench.fidelity --keep DIR`` (no engine), per worker count:
the step-time ratio (measured over the fitted model, as ``engine.sim fit`` computes it)
along each worker's steps; the regime model fitted on it (``engine.sim.regimes``: states,
moving-average window, per-state median ratio and host factor, per-step dwell); then, for
the recording and for series drawn with the same lengths from the regime model and from
the one-AR(1) default noise (``--seeds`` draws, medians), the window spread (p99 over p50 of
the ratio's mean over 4 to 128 consecutive steps: how much slower a request living that
many steps can be) and the mean length of each state's spells (the fitted HMM classifying
every series alike).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.fidelity import load_runs
from engine.sim.calibrate import extra_flags, host_samples, shape_of, step_rows, window
from engine.sim.cost_model import nonnegative_lstsq
from engine.sim.noise_fit import fit_noise, worker_series
from engine.sim.regimes import (
    fit_hmm,
    most_likely_states,
    moving_average,
    simulate,
    spells,
    window_spread,
)
from engine.sim.step_noise import StepNoise

LENGTHS = (1, 4, 8, 16, 32, 64, 128)


def calibration_steps(directory: Path, workers: int) -> list[dict[str, Any]]:
    rows, runs = load_runs(workers, directory)
    return step_rows([r for _, t0, t1 in runs["calib"].values() for r in window(rows, t0, t1)])


def measure(steps: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """The spells and window spreads of one recording (see the module doc)."""
    y = np.array([r["execute_s"] for r in steps])
    x = np.hstack([np.array([shape_of(r).features() for r in steps]), extra_flags(steps)])
    _, pred = nonnegative_lstsq(x, y, relative=False)
    live = worker_series(steps, y / pred)
    host = host_samples(steps)
    (host_step, host_request), _ = nonnegative_lstsq(
        np.array([[1.0, float(n)] for n, _ in host]), np.array([s for _, s in host]), False)
    fitted = fit_noise(steps, pred, regime=True, host_model=(host_step, host_request)).regime
    if fitted is None:
        raise ValueError("too few steps for a regime model")
    k = len(fitted.switch)
    hmm = fit_hmm([moving_average(np.log(s), fitted.window) for s in live], k)

    def spell_means(series: list[np.ndarray]) -> list[float]:
        labels = most_likely_states([moving_average(np.log(s), fitted.window)
                                     for s in series], hmm)
        return [float(np.mean(v)) if v else 0.0 for v in spells(labels, k)]

    ar1 = fit_noise(steps, pred)
    lengths = [len(s) for s in live]
    drawn_regime = [simulate(fitted, lengths, seed) for seed in range(seeds)]
    drawn_ar1 = []
    for seed in range(seeds):
        noise = StepNoise(ar1.quantiles, ar1.rho, len(live), seed)
        drawn_ar1.append([np.array([noise(w) for _ in range(n)]) for w, n in enumerate(lengths)])

    def median_spread(draws: list[list[np.ndarray]]) -> dict[int, float]:
        spreads = [window_spread(d, LENGTHS) for d in draws]
        return {n: float(np.median([s[n] for s in spreads])) for n in LENGTHS}

    return {
        "steps": len(steps), "states": k, "window": fitted.window,
        "state_p50": [float(np.interp(0.5, np.linspace(0, 1, len(q)), q))
                      for q in fitted.quantiles],
        "host_factor": list(fitted.host), "dwell": [1.0 / max(1e-9, 1.0 - row[i])
                                                    for i, row in enumerate(fitted.switch)],
        "spells_live": spell_means(live),
        "spells_regime": list(np.median([spell_means(d) for d in drawn_regime], axis=0)),
        "spread_live": window_spread(live, LENGTHS),
        "spread_regime": median_spread(drawn_regime),
        "spread_ar1": median_spread(drawn_ar1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity_spells", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="from_dir", required=True, metavar="DIR",
                   help="a directory kept by bench.fidelity --keep")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--seeds", type=int, default=3, help="draws of each model (3)")
    args = p.parse_args(argv)
    for w in (int(x) for x in args.workers.split(",")):
        try:
            m = measure(calibration_steps(Path(args.from_dir), w), args.seeds)
        except (OSError, ValueError) as e:
            print(f"bench.fidelity_spells: error: {e}", file=sys.stderr)
            return 2
        print(f"{args.from_dir}, {w} worker(s): {m['steps']} steps, {m['states']} states "
              f"fitted on a {m['window']}-step moving average")
        print("  state median ratio " + " ".join(f"{v:.2f}" for v in m["state_p50"])
              + " | host factor " + " ".join(f"{v:.2f}" for v in m["host_factor"])
              + " | dwell (steps) " + " ".join(f"{v:.0f}" for v in m["dwell"]))
        print("  mean spell (steps), live " + " ".join(f"{v:.0f}" for v in m["spells_live"])
              + " | drawn " + " ".join(f"{v:.0f}" for v in m["spells_regime"]))
        print("  window spread (p99/p50 of the mean over L steps), L = "
              + " ".join(str(n) for n in LENGTHS))
        for name in ("live", "regime", "ar1"):
            print(f"    {name:7s}" + " ".join(f"{m['spread_' + name][n]:.2f}" for n in LENGTHS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
