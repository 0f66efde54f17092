"""The ``[noise]`` fit (engine/sim/noise_fit.py): the ratio's quantiles and burstiness
recovered from steps drawn with known noise, the prefill steps' table and a slow component;
and noise in the simulator (seeded, around the model)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_calibrate import CONFIG, TRUTH, workload

from engine.sim.cost_model import CostModel
from engine.sim.metrics import SLO, summarize
from engine.sim.noise_fit import fit_noise, sampled_mean
from engine.sim.simulator import Simulator
from engine.sim.step_noise import StepNoise


def test_noise_fit_recovers_the_ratio_distribution_and_its_burstiness():
    truth_q = tuple(float(q) for q in np.quantile(
        np.random.default_rng(0).lognormal(0.0, 0.5, 5000), np.linspace(0, 1, 101)))
    noise = StepNoise(truth_q, 0.8, num_workers=2, seed=3)
    steps, pred = [], []
    for i in range(6000):
        w = i % 2
        steps.append({"worker": w, "t_send": float(i), "execute_s": 0.01 * noise(w)})
        pred.append(0.01)
    quantiles, rho, prefill_q, _, slow_share, *_ = fit_noise(steps, np.array(pred))
    assert rho == pytest.approx(0.8, abs=0.05)
    assert slow_share == 0 and prefill_q == ()  # one AR(1), one class: nothing more fitted
    measured = np.array([s["execute_s"] for s in steps])
    assert sampled_mean(quantiles) * 0.01 == pytest.approx(measured.mean())  # mean kept
    for p in (0.1, 0.5, 0.9):
        assert np.interp(p, np.linspace(0, 1, 101), quantiles) * 0.01 == pytest.approx(
            np.quantile(measured, p), rel=0.02)


def test_noise_makes_steps_vary_around_the_model_and_repeats_per_seed(tmp_path):
    q = tuple(float(x) for x in np.linspace(0.5, 1.5, 11))
    noisy = replace(TRUTH, noise_quantiles=q, noise_rho=0.5)
    path = tmp_path / "c.toml"
    path.write_text(noisy.to_toml())
    assert CostModel.load(path) == replace(noisy, noise_quantiles=tuple(
        float(f"{x:.5g}") for x in q))
    runs = [Simulator(iter(workload()), cost, CONFIG).run() for cost in (TRUTH, noisy, noisy)]
    plain, a, b = (summarize(r, SLO()) for r in runs)
    assert a == b | {"wall_s": a["wall_s"]}  # seeded
    assert a["tpot_p99"] != plain["tpot_p99"]
    mean = [sum(r.busy_s) / r.num_steps for r in runs]
    assert mean[1] == pytest.approx(mean[0], rel=0.1)


def test_noise_fit_recovers_a_slow_component_and_the_prefill_steps_table():
    rng = np.random.default_rng(1)
    decode_q = tuple(float(q) for q in np.quantile(rng.lognormal(0.0, 0.3, 5000),
                                                  np.linspace(0, 1, 101)))
    prefill_q = tuple(1.4 * q for q in decode_q)
    noise = StepNoise(decode_q, 0.5, num_workers=2, seed=5, prefill_quantiles=prefill_q,
                      slow_rho=0.99, slow_share=0.3)
    steps = []
    for i in range(40000):
        w, prefill = i % 2, i % 7 == 0
        steps.append({"worker": w, "t_send": float(i), "prefill_tokens": int(prefill),
                      "execute_s": 0.01 * noise(w, prefill)})
    fitted = fit_noise(steps, np.full(len(steps), 0.01), by_shape=True, slow=True)
    assert fitted.rho == pytest.approx(0.5, abs=0.08)
    assert fitted.slow_rho == pytest.approx(0.99, abs=0.01)
    assert fitted.slow_share == pytest.approx(0.3, abs=0.08)
    grid = np.linspace(0, 1, 101)
    ratio = np.interp(0.5, grid, fitted.prefill_quantiles) / np.interp(0.5, grid,
                                                                        fitted.quantiles)
    assert ratio == pytest.approx(1.4, rel=0.05)
    # one AR(1) alone cannot hold spells this long: lag-20 correlation as measured
    z_fast_only = fit_noise(steps, np.full(len(steps), 0.01), by_shape=True)
    assert z_fast_only.slow_share == 0 and z_fast_only.rho > fitted.rho
