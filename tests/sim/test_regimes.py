"""The regime (Markov-switching) step noise: fitted back from a series with known spells,
drawn by the simulator with the spells' lengths and spread, kept in cost files."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from test_calibrate import CONFIG, TRUTH, recorded_run, workload

from engine.profiling import read_recording
from engine.sim import noise_fit
from engine.sim.calibrate import fit_recording, step_rows
from engine.sim.cost_model import CostModel
from engine.sim.noise_fit import fit_noise, sampled_mean
from engine.sim.regimes import (
    fit_hmm,
    fit_regimes,
    most_likely_states,
    moving_average,
    simulate,
    spells,
    window_spread,
)
from engine.sim.simulator import Simulator
from engine.sim.step_noise import StepNoise, stationary

STAY = (0.99, 0.975)  # per step: dwell 100 steps in the fast state, 40 in the slow one
LEVEL = (1.0, 1.5)
WINDOW = 8


def known_regimes(steps: int = 5000, workers: int = 2, seed: int = 0
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ratio series with two known regimes (levels ``LEVEL``, stays ``STAY``) times iid
    lognormal spikes; (ratios, true states) per worker."""
    rng = np.random.default_rng(seed)
    ratios, states = [], []
    for _ in range(workers):
        s, lab = 0, np.empty(steps, dtype=int)
        for t in range(steps):
            if rng.random() > STAY[s]:
                s = 1 - s
            lab[t] = s
        ratios.append(np.array(LEVEL)[lab] * rng.lognormal(0.0, 0.15, steps))
        states.append(lab)
    return ratios, states


def test_a_series_with_known_regimes_gives_them_back():
    ratios, truth = known_regimes()
    fitted = fit_regimes(ratios, states=(2,), windows=(WINDOW,))
    assert fitted is not None and len(fitted.switch) == 2 and fitted.window == WINDOW
    for j in range(2):
        # the mean length of the state's runs in this series (the chain's nominal 100 and 40
        # steps, less its sampling error); the fit's runs are ~15% longer: the moving
        # average merges spells shorter than a few steps into their neighbours
        dwell = 1.0 / (1.0 - fitted.switch[j][j])
        assert dwell == pytest.approx(np.mean(spells(truth, 2)[j]), rel=0.25), j
        assert np.interp(0.5, np.linspace(0, 1, 101), fitted.quantiles[j]) == pytest.approx(
            LEVEL[j], rel=0.05)
    # the states it finds are the true ones, step by step, nearly everywhere
    labels = most_likely_states([moving_average(np.log(r), WINDOW) for r in ratios],
                                hmm_of(ratios))
    agree = np.mean(np.concatenate(labels) == np.concatenate(truth))
    assert agree > 0.9


def hmm_of(ratios):
    return fit_hmm([moving_average(np.log(r), WINDOW) for r in ratios], 2)


def test_drawn_regimes_have_the_recordings_spells_and_window_spread():
    ratios, _ = known_regimes()
    fitted = fit_regimes(ratios, states=(2,), windows=(WINDOW,))
    assert fitted is not None
    drawn = simulate(fitted, [len(r) for r in ratios], seed=1)
    # spells, as measured on a recording (the same classifier on both series): the
    # recording's against the drawn series'; the drawn ones run 0-35% longer (the fitted
    # dwell is long by the spells the moving average merges, and classifying merges again)
    hmm = hmm_of(ratios)
    labels = [most_likely_states([moving_average(np.log(r), WINDOW) for r in x], hmm)
              for x in (ratios, drawn)]
    for j in range(2):
        live, sim = (np.mean(spells(lab, 2)[j]) for lab in labels)
        assert live * 0.9 < sim < live * 1.4, j
    live_spread, sim_spread = window_spread(ratios), window_spread(drawn)
    for n in (8, 16, 32, 64):
        assert sim_spread[n] == pytest.approx(live_spread[n], rel=0.08), n
    # one AR(1) on the ratio's scores (the default noise) forgets the spells: its spread
    # over 32 and 64 steps falls short
    steps = [{"worker": w, "t_send": float(t), "execute_s": float(x)}
             for w, r in enumerate(ratios) for t, x in enumerate(r)]
    ar1 = fit_noise(steps, np.ones(len(steps)))
    noise = StepNoise(ar1.quantiles, ar1.rho, len(ratios), seed=1)
    ar1_drawn = [np.array([noise(w) for _ in range(len(r))]) for w, r in enumerate(ratios)]
    ar1_spread = window_spread(ar1_drawn)
    for n in (32, 64):
        assert ar1_spread[n] < live_spread[n] / 1.1, n


def test_fit_regimes_picks_the_states_and_window_that_reproduce_the_spread():
    ratios, _ = known_regimes(steps=3000)
    fitted = fit_regimes(ratios, states=(1, 2), windows=(16,))
    assert fitted is not None and len(fitted.switch) == 2  # one state has no spells
    assert fit_regimes([np.ones(10)]) is None  # too few steps


@pytest.fixture
def quick_search(monkeypatch):
    """Tests of the fit's plumbing: one candidate (states, window) instead of twelve."""
    monkeypatch.setattr(noise_fit, "fit_regimes",
                        functools.partial(fit_regimes, states=(2,), windows=(WINDOW,)))


def test_regime_noise_is_fitted_from_a_recording_keeps_the_mean_and_slows_the_host(
        quick_search):
    ratios, _ = known_regimes(steps=3000)
    steps, pred = [], []
    for w, r in enumerate(ratios):
        for t, x in enumerate(r):
            steps.append({"worker": w, "t_send": float(t), "execute_s": 0.01 * float(x),
                          "requests": 2, "busy": True, "gap_s": 0.0,
                          # the host path slows down with the regime, as live
                          "t_result": float(t) + 0.01 * float(x) + 0.001 * float(x) / 1.2})
            pred.append(0.01)
    nf = fit_noise(steps, np.array(pred), regime=True, host_model=(0.001, 0.0))
    reg = nf.regime
    assert reg is not None
    weights = stationary(reg.switch)
    measured = np.mean([s["execute_s"] for s in steps])
    assert sum(w * sampled_mean(q) for w, q in zip(weights, reg.quantiles,
                                                   strict=True)) * 0.01 == pytest.approx(
        measured, rel=1e-6)
    assert reg.host[-1] > 1.1 * reg.host[0]  # the slow state's host time is longer
    assert reg.host[0] == pytest.approx(1.0 / 1.2, rel=0.1)


def test_regime_keys_round_trip_and_are_checked(tmp_path):
    cost = replace(TRUTH, noise_quantiles=(0.5, 1.0, 2.0), noise_rho=0.4,
                   noise_regime_switch=((0.99, 0.01), (0.025, 0.975)),
                   noise_regime_quantiles=((0.5, 0.9, 1.5), (0.8, 1.4, 3.0)),
                   noise_regime_rho=(0.5, 0.3), noise_regime_host=(0.9, 1.3))
    path = tmp_path / "c.toml"
    path.write_text(cost.to_toml())
    assert CostModel.load(path) == cost
    assert cost.describe()["noise_regime_dwell"] == pytest.approx([100.0, 40.0])
    for old, new in (("[0.99, 0.01]", "[0.99, 0.02]"),  # a row not summing to 1
                     ("regime_rho = [0.5, 0.3]", "regime_rho = [0.5]"),
                     ("regime_host = [0.9, 1.3]", "regime_host = [0.9, -1]"),
                     ("[0.8, 1.4, 3]", "[0.8, 0.4, 3]")):  # not increasing
        text = cost.to_toml()
        assert old in text, old
        path.write_text(text.replace(old, new))
        with pytest.raises(ValueError, match="regime"):
            CostModel.load(path)


def test_the_simulator_draws_regimes_per_worker_and_scales_host_time():
    one_state = dict(noise_quantiles=(1.0, 1.0), noise_regime_switch=((1.0,),),
                     noise_regime_quantiles=((1.0, 1.0),), noise_regime_rho=(0.0,))
    plain = replace(TRUTH, **one_state, noise_regime_host=(1.0,))
    slow_host = replace(TRUTH, **one_state, noise_regime_host=(3.0,))
    reqs = workload()
    a = Simulator(iter(reqs), plain, CONFIG).run()
    b = Simulator(iter(reqs), TRUTH, CONFIG).run()
    c = Simulator(iter(reqs), slow_host, CONFIG).run()
    # ratio 1 in the only state: as without noise; a host factor 3 makes every cycle longer
    assert [r.finish for r in a.records] == pytest.approx([r.finish for r in b.records])
    tpot = [(r.finish - r.first_token) / (r.num_output_tokens - 1) for r in a.records
            if r.num_output_tokens > 1]
    tpot_c = [(r.finish - r.first_token) / (r.num_output_tokens - 1) for r in c.records
              if r.num_output_tokens > 1]
    assert np.median(tpot_c) > np.median(tpot) + TRUTH.host_step_s
    # two states: the draws repeat per seed and follow each worker's own state
    two = replace(TRUTH, noise_quantiles=(0.5, 2.0), noise_regime_switch=((0.9, 0.1),
                                                                            (0.1, 0.9)),
                  noise_regime_quantiles=((0.9, 1.0), (1.9, 2.0)), noise_regime_rho=(0.0, 0.0))
    n1, n2 = two.noise(2, seed=4), two.noise(2, seed=4)
    assert n1 is not None and n2 is not None
    draws = [n1(i % 2) for i in range(400)]
    assert draws == [n2(i % 2) for i in range(400)]
    slow = np.array(draws[0::2]) > 1.5
    assert 0.2 < slow.mean() < 0.8 and np.mean(slow[1:] == slow[:-1]) > 0.8  # spells


def test_fit_recording_fits_regimes_only_when_asked(tmp_path, quick_search):
    recorded_run(tmp_path / "r.jsonl", cost=replace(TRUTH, noise_quantiles=(0.5, 1.0, 2.0),
                                                     noise_rho=0.5))
    rows = read_recording(tmp_path / "r.jsonl")
    assert len(step_rows(rows)) > 200
    assert fit_recording(rows, CostModel.load()).cost.noise_regime_switch == ()
    got = fit_recording(rows, CostModel.load(), terms=["regime"]).cost
    assert got.noise_regime_switch and len(got.noise_regime_quantiles) == len(
        got.noise_regime_switch) == len(got.noise_regime_host)
