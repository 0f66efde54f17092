"""The frontend delay drawn with the slow spells (engine/sim/admit_spell.py, ``--terms
admit,spell``): the local ratio at an arrival, the bins fitted back from a synthetic
dependence, the simulator drawing from the bin of the moment, cost files, the terms."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_calibrate import CONFIG, TRUTH, client_records, recorded_run, workload

from engine.profiling import read_recording
from engine.sim.admit_spell import SpellDelays, SpellFit, fit_spell_delays, local_ratios
from engine.sim.calibrate import fit_recording, matched_ttfts, terms_error
from engine.sim.cost_model import CostModel
from engine.sim.simulator import Simulator
from engine.sim.trace import TraceFit


def test_local_ratio_is_the_windows_mean_else_the_last_steps_else_one():
    ends = np.array([0.15, 0.0, 0.05, 0.12])  # any order
    ratios = np.array([5.0, 1.0, 2.0, 3.0])
    got = local_ratios(ends, ratios, np.array([0.16, 0.11, 0.3, -1.0]), window=0.1)
    assert got.tolist() == pytest.approx([4.0, 2.0, 5.0, 1.0])
    # the simulator's side counts alike
    spell = SpellDelays(SpellFit((1.5,), ((0.001,), (0.01,)), 0.1))
    assert spell.local_ratio(0.0) == 1.0
    for end, ratio in sorted(zip(ends, ratios, strict=True)):
        spell.step(float(end), float(ratio))
    for t, want in zip((0.11, 0.16, 0.3), (2.0, 4.0, 5.0), strict=True):
        assert spell.local_ratio(t) == pytest.approx(want), t
    assert spell.local_ratio(10.0) == 5.0  # long forgotten: the last step's


def test_the_fit_bins_the_recorded_delays_by_the_local_ratio():
    rng = np.random.default_rng(4)
    local = rng.lognormal(0.0, 0.25, 4000)
    delays = 0.004 * local ** 2 * rng.lognormal(0.0, 0.2, 4000)
    fit = fit_spell_delays(delays, local)
    assert fit.edges == pytest.approx(tuple(np.quantile(local, (0.5, 0.8, 0.95))))
    assert sorted(x for b in fit.delays for x in b) == pytest.approx(sorted(delays))
    assert [len(b) for b in fit.delays] == [2000, 1200, 600, 200]
    medians = [float(np.median(b)) for b in fit.delays]
    assert medians == sorted(medians) and medians[-1] > 2 * medians[0]
    top = delays[local > fit.edges[-1]]
    assert fit.delays[-1] == pytest.approx(tuple(sorted(top)))  # the recorded ones, no table
    small = fit_spell_delays(delays[:12], local[:12])  # the slowest bins merged downwards
    assert all(len(b) >= 5 for b in small.delays) and len(small.edges) < 3
    with pytest.raises(ValueError):
        fit_spell_delays([0.1, 0.2], [1.0, 1.0])


def test_the_simulator_draws_each_delay_from_the_bin_of_the_moment():
    spell = SpellFit((1.5,), ((0.001,), (0.030,)), 0.1)

    def waits(ratio_log: int) -> list[float]:
        cost = replace(TRUTH, admit_quantiles=(0.001, 0.030), admit_spell=spell,
                       noise_quantiles=(0.5, 1.5),
                       noise_trace=TraceFit(((ratio_log,) * 50,), (), 50.0))
        sim = Simulator(iter(workload(seed=2, rate=4.0)), cost, CONFIG)
        sim.run()
        return [rec.first_scheduled - rec.arrival for rec in sim.records.values()
                if rec.first_scheduled is not None]

    slow, fast = waits(693), waits(0)  # every step x2, x1
    # at ratio 2 every request arriving after the first steps waits the slow bin's 30 ms
    assert np.mean(np.array(slow) >= 0.0299) > 0.9
    assert np.mean(np.array(fast) >= 0.0299) < 0.05
    assert waits(693) == slow  # seeded


def test_spell_cost_files_round_trip_and_bad_ones_are_refused(tmp_path):
    cost = replace(TRUTH, admit_quantiles=(0.001, 0.002, 0.01),
                   admit_spell=SpellFit((0.9, 1.25), ((0.001, 0.002), (0.003,), (0.004, 0.02)),
                                        0.1))
    path = tmp_path / "c.toml"
    path.write_text(cost.to_toml())
    assert CostModel.load(path) == cost
    good = path.read_text()
    bad = {
        "edges down": good.replace("[0.9, 1.25]", "[1.25, 0.9]"),
        "edge 0": good.replace("[0.9, 1.25]", "[0, 1.25]"),
        "a bin short": good.replace("  [0.003],\n", ""),
        "empty bin": good.replace("[0.003]", "[]"),
        "negative delay": good.replace("[0.003]", "[-0.003]"),
        "window 0": good.replace("admit_spell_window = 0.1", "admit_spell_window = 0"),
        "no window": good.replace("admit_spell_window = 0.1\n", ""),
        "without admit_quantiles": good.replace("admit_quantiles = ", "x_admit_quantiles = "),
    }
    for name, text in bad.items():
        assert text != good, name
        path.write_text(text.replace("x_admit_quantiles = [0.001, 0.002, 0.01]\n", ""))
        with pytest.raises(ValueError, match="--cost"):
            CostModel.load(path)


def test_the_spell_term_is_fitted_from_matched_requests_and_needs_admit(tmp_path):
    assert terms_error(["spell"]) is not None and terms_error(["admit", "spell"]) is None
    result = recorded_run(tmp_path / "r.jsonl")
    rows = read_recording(tmp_path / "r.jsonl")
    client = client_records(result)
    matched = matched_ttfts(rows, client)
    plain = fit_recording(rows, CostModel.load(), terms=("admit",), matched=matched).cost
    assert plain.admit_spell is None  # optional
    cal = fit_recording(rows, CostModel.load(), terms=("admit", "spell"), matched=matched)
    spell = cal.cost.admit_spell
    assert spell is not None and cal.report["admit_spell_bins"] == [len(b) for b in spell.delays]
    # the bins hold the very delays admit's table is made of
    assert sorted(x for b in spell.delays for x in b) == pytest.approx(
        sorted(np.maximum(0.0, [c - p - cal.cost.stream_s for c, p, *_ in matched])))
    assert min(x for b in spell.delays for x in b) == pytest.approx(cal.cost.admit_quantiles[0])
