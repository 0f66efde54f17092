"""The recorded noise replayed (engine/sim/trace.py, ``--terms trace``): the fit gives back
a synthetic recording's spells, the bootstrap keeps their mean, marginal, autocorrelation
and step/host correlation, the block length follows the theory, bad cost files are
refused, and the simulator applies the drawn ratio and host factor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_calibrate import CONFIG, TRUTH, recorded_run, workload

from engine.profiling import read_recording
from engine.sim.__main__ import main
from engine.sim.calibrate import fit_recording
from engine.sim.cost_model import CostModel
from engine.sim.metrics import SLO, summarize
from engine.sim.noise_fit import fit_noise
from engine.sim.regimes import window_spread
from engine.sim.simulator import Simulator
from engine.sim.trace import (
    TRACE_LIMIT,
    TraceFit,
    autocorrelation,
    block_length,
    decode,
    simulate,
)

HOST_MODEL = (4e-4, 1e-4)  # host_step_s, host_request_s


def spells(n: int, rng: np.random.Generator) -> np.ndarray:
    """A ratio series with spells: a fast level (0.85, mean 200 steps) and a slow one (1.5,
    mean 60 steps), each step x lognormal(0, 0.1)."""
    out, slow = np.empty(n), False
    i = 0
    while i < n:
        run = int(rng.geometric(1 / 60 if slow else 1 / 200))
        out[i:i + run] = 1.5 if slow else 0.85
        i += run
        slow = not slow
    return out * rng.lognormal(0.0, 0.1, n)


def recording(n: int = 6000, seed: int = 0) -> tuple[list[dict], np.ndarray, list[np.ndarray],
                                                     list[np.ndarray]]:
    """Steps of two workers whose ratio (over a constant model of 2 ms) has spells, and
    whose host time (round trip + the next gap) is the host model's x the step's level."""
    rng = np.random.default_rng(seed)
    truth = [spells(n, rng), spells(n, rng)]
    host = [r * rng.lognormal(0.0, 0.2, n) for r in truth]
    steps: list[dict] = []
    for w in (0, 1):
        t = 0.0
        for i in range(n):
            requests = 1 + i % 3
            execute = 2e-3 * truth[w][i]
            round_trip = 0.5 * (HOST_MODEL[0] + HOST_MODEL[1] * requests) * host[w][i]
            steps.append({"worker": w, "t_send": t, "t_result": t + execute + round_trip,
                          "execute_s": execute, "requests": requests, "busy": True,
                          "prefill_tokens": 0, "gap_s": None})
            if i:  # the gap before this step closes the previous step's host time
                prev = steps[-2]
                steps[-1]["gap_s"] = 0.5 * (HOST_MODEL[0] + HOST_MODEL[1] * prev["requests"]
                                            ) * host[w][i - 1]
            t += execute + 2 * round_trip + 1e-6
    return steps, np.full(len(steps), 2e-3), truth, host


def test_the_fit_gives_back_each_workers_ratio_and_host_factor_series():
    steps, pred, truth, host = recording()
    fitted = fit_noise(steps, pred, trace=True, host_model=HOST_MODEL).trace
    assert fitted is not None and len(fitted.ratio) == 2
    for w in (0, 1):
        # the model is constant, so keeping the mean step scales the ratios by 1
        np.testing.assert_allclose(decode(fitted.ratio[w]), truth[w], rtol=6e-4)
        got = decode(fitted.host[w])[:-1]  # the last step has no next one: no host time
        np.testing.assert_allclose(got / got.mean(), host[w][:-1] / host[w][:-1].mean(),
                                   rtol=2e-3)
    assert fit_noise(steps, pred).trace is None  # optional


def test_the_drawn_series_keeps_the_mean_marginal_autocorrelation_and_host_link():
    steps, pred, _, _ = recording()
    fitted = fit_noise(steps, pred, trace=True, host_model=HOST_MODEL).trace
    assert fitted is not None
    assert 20 < fitted.block < 2000  # the spells' scale, chosen from the recording
    recorded = [decode(r) for r in fitted.ratio]
    drawn = simulate(fitted, [40_000, 40_000], seed=3)
    ratios = [r for r, _ in drawn]
    flat, rec = np.concatenate(ratios), np.concatenate(recorded)
    assert flat.mean() == pytest.approx(rec.mean(), rel=0.03)
    for p in (0.1, 0.5, 0.9, 0.99):
        assert np.quantile(flat, p) == pytest.approx(np.quantile(rec, p), rel=0.04), p
    # a stationary bootstrap of mean block L keeps lag k's correlation x (1 - 1/L)^k
    acf_rec = autocorrelation([np.log(r) for r in recorded], 40)
    acf_drawn = autocorrelation([np.log(r) for r in ratios], 40)
    for k in (1, 5, 20, 40):
        expected = acf_rec[k] * (1 - 1 / fitted.block) ** k
        assert acf_drawn[k] == pytest.approx(expected, abs=0.05), k
    assert acf_rec[20] > 0.5  # the spells: still correlated 20 steps on
    spread_rec, spread_drawn = window_spread(recorded, (8, 32)), window_spread(ratios, (8, 32))
    for n in (8, 32):
        assert spread_drawn[n] == pytest.approx(spread_rec[n], rel=0.08), n
    # each drawn host factor is the one recorded with its ratio: the spells slow both
    link_rec = np.corrcoef(rec, np.concatenate([decode(h) for h in fitted.host]))[0, 1]
    link = np.corrcoef(flat, np.concatenate([h for _, h in drawn]))[0, 1]
    assert link_rec > 0.5 and link == pytest.approx(link_rec, abs=0.05)


def test_block_length_follows_politis_white_for_an_ar1():
    rng = np.random.default_rng(7)
    n = 40_000
    assert block_length([rng.normal(size=n)]) < 6  # no memory: short blocks
    for rho in (0.5, 0.9):
        got = []
        for _ in range(5):  # the estimate's spread is wide at rho 0.9: the median of five
            e = rng.normal(size=n) * np.sqrt(1 - rho * rho)
            x = np.empty(n)
            x[0] = rng.normal()
            for i in range(1, n):
                x[i] = rho * x[i - 1] + e[i]
            got.append(block_length([x[: n // 2], x[n // 2:]]))
        # theory: (G / g)^(2/3) n^(1/3), G / g = 2 rho / (1 - rho^2)
        theory = (2 * rho / (1 - rho * rho)) ** (2 / 3) * n ** (1 / 3)
        assert np.median(got) == pytest.approx(theory, rel=0.2), (rho, got)


def trace_cost(ratio: list[int], host: list[int] | None = None, block: float = 50.0
               ) -> CostModel:
    fitted = TraceFit((tuple(ratio),), (tuple(host),) if host else (), block)
    return replace(TRUTH, noise_quantiles=(0.5, 1.5), noise_trace=fitted)


def test_trace_cost_files_round_trip_and_bad_ones_are_refused(tmp_path):
    cost = trace_cost(list(range(-60, 60)), [0, 5, -5] * 40, 12.5)
    path = tmp_path / "c.toml"
    path.write_text(cost.to_toml())
    assert CostModel.load(path) == cost
    good = path.read_text()
    bad = {
        "no block": good.replace("trace_block = 12.5\n", ""),
        "block < 1": good.replace("trace_block = 12.5", "trace_block = 0.5"),
        "nan block": good.replace("trace_block = 12.5", "trace_block = nan"),
        "a float": good.replace("[-60, ", "[-60.5, "),
        "a bool": good.replace("[-60, ", "[true, "),
        "too big": good.replace("[-60, ", f"[{TRACE_LIMIT + 1}, "),
        "empty worker": good.replace("trace = [\n", "trace = [\n  [],\n"),
        "host length": good.replace("trace_host = [\n  [0, ", "trace_host = [\n  ["),
        "host without trace": good.replace("trace = [", "other_trace = [", 1),
    }
    for name, text in bad.items():
        assert text != good, name
        path.write_text(text)
        with pytest.raises(ValueError, match="--cost"):
            CostModel.load(path)
    path.write_text(trace_cost([3, 4, 5]).to_toml().replace("trace = [", "trace = [[1, 2],"))
    loaded = CostModel.load(path).noise_trace  # a second worker, no host factors
    assert loaded is not None and loaded.ratio == ((1, 2), (3, 4, 5)) and loaded.host == ()


def test_the_simulator_multiplies_steps_and_host_times_by_the_replayed_trace():
    def run(cost: CostModel):
        result = Simulator(iter(workload()), cost, CONFIG).run()
        return summarize(result, SLO()), sum(result.busy_s) / result.num_steps

    plain, plain_step = run(TRUTH)
    same, same_step = run(trace_cost([0] * 100, [0] * 100))  # ratios and factors all 1
    assert same == plain | {"wall_s": same["wall_s"]} and same_step == plain_step
    slow, slow_step = run(trace_cost([693] * 100))  # every step x e^0.693
    f = float(np.exp(0.693))
    twice = replace(TRUTH, **{k: f * getattr(TRUTH, k) for k in CostModel.COEFFICIENTS})
    twice_metrics, twice_step = run(twice)
    assert slow_step == pytest.approx(twice_step, rel=1e-6)
    assert slow["tpot_p50"] == pytest.approx(twice_metrics["tpot_p50"], rel=1e-6)
    host, host_step = run(trace_cost([0] * 100, [1099] * 100))  # host times x e^1.099
    f = float(np.exp(1.099))
    slow_host = replace(TRUTH, host_step_s=f * TRUTH.host_step_s,
                        host_request_s=f * TRUTH.host_request_s)
    slow_host_metrics, slow_host_step = run(slow_host)
    assert host_step == pytest.approx(slow_host_step, rel=1e-6)
    assert host["tpot_p50"] == pytest.approx(slow_host_metrics["tpot_p50"], rel=1e-6)
    assert host["tpot_p50"] > plain["tpot_p50"] + 1.5 * TRUTH.host_time(1)
    spells_cost = trace_cost(list(np.rint(np.log(spells(3000, np.random.default_rng(1)))
                                          * 1000).astype(int).tolist()))
    a, _ = run(spells_cost)
    b, _ = run(spells_cost)
    assert a == b | {"wall_s": a["wall_s"]}  # seeded


def test_fit_cli_fits_the_trace_and_refuses_it_with_terms_that_draw_the_same(tmp_path, capsys):
    recorded_run(tmp_path / "r.jsonl")
    rows = read_recording(tmp_path / "r.jsonl")
    cost = fit_recording(rows, CostModel.load(), terms=("trace",)).cost
    assert cost.noise_trace is not None and len(cost.noise_trace.ratio) == CONFIG.num_workers
    assert sum(len(r) for r in cost.noise_trace.ratio) == len(
        [r for r in rows if r["kind"] == "step"])
    with pytest.raises(ValueError, match="does not go with"):
        fit_recording(rows, CostModel.load(), terms=("trace", "regime"))
    out = tmp_path / "fit.toml"
    assert main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out), "--terms", "trace",
                 "--trace-block", "30"]) == 0
    assert CostModel.load(out).noise_trace.block == 30.0  # type: ignore[union-attr]
    for bad in (["--terms", "trace,host"], ["--trace-block", "30"]):
        with pytest.raises(SystemExit) as e:
            main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out), *bad])
        assert e.value.code == 2
    assert "does not go with ['host']" in capsys.readouterr().err
