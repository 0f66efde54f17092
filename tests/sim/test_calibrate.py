"""The step recorder (engine/profiling.py), the fit from a recording (engine/sim/calibrate.py)
and the simulator's host terms."""

from __future__ import annotations

import tomllib
from dataclasses import replace

import msgspec
import numpy as np
import pytest
from fakes import config_only_model_dir

from engine import messages as m
from engine.config import EngineConfig, LaunchConfig, ModelConfig, SchedulerConfig
from engine.profiling import StepProfiler, profile_path, read_recording
from engine.sim.__main__ import main
from engine.sim.calibrate import (
    LEVEL_WINDOW_S,
    fit_recording,
    host_samples,
    level_keys,
    matched_ttfts,
    overlap_shares,
    pool_ttfts,
    step_rows,
)
from engine.sim.contention import overlap_share
from engine.sim.cost_model import BatchShape, CostModel
from engine.sim.metrics import SLO, summarize
from engine.sim.noise_fit import sampled_mean
from engine.sim.simulator import SimConfig, Simulator
from engine.sim.workloads import WorkloadConfig, make_workload

TRUTH = CostModel(step_s=3e-3, prefill_token_s=1e-4, decode_seq_s=2e-4, context_token_s=2e-6,
                  prefill_pair_s=1e-8, admit_s=2e-3, stream_s=5e-3, host_step_s=1e-3,
                  host_request_s=5e-5)
CONFIG = SimConfig(num_workers=2, num_blocks=512, max_model_len=1024,
                   scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16))
GREEDY = m.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def workload(seed: int = 0, rate: float = 12.0):
    return list(make_workload(WorkloadConfig(name="chat-short", rate=rate, duration=20.0,
                                             seed=seed, scale=4, max_model_len=1024)).requests())


def client_records(result, seed: int = 3) -> list[dict]:
    """The client's view of a simulated run: each request's TTFT plus a frontend delay (drawn:
    exponential, 4 ms mean), as bench.loadgen writes it."""
    extra = np.random.default_rng(seed).exponential(0.004, len(result.records))
    return [{"outcome": "completed", "sent_s": rec.arrival, "ttft_s": rec.first_token
             - rec.arrival + x, "num_prompt_tokens": rec.num_prompt_tokens}
            for rec, x in zip(result.records, extra, strict=True)]


def recorded_run(path, cost: CostModel = TRUTH, seed: int = 0):
    """Simulate with ``cost`` while a StepProfiler records the scheduler's real plans, as the
    pool's hooks do: a synthetic recording whose truth is known."""
    sim = Simulator(iter(workload(seed)), cost, CONFIG)
    prof = StepProfiler(path)
    sched = sim.sched
    add, schedule, update, drain = sched.add, sched.schedule, sched.update, sched.drain_outputs

    def on_add(req, now):
        stamped = msgspec.structs.replace(req, arrival_time=now - cost.admit_s)
        prof.on_add(stamped, now)
        return add(req, now)

    def on_schedule(w, now):
        plan = schedule(w, now)
        if plan is not None:
            prof.on_send(plan, now)
        sim.last_now = now
        return plan

    def on_update(plan, result, now):
        prof.on_result(plan, result, now)
        outputs = update(plan, result, now)
        prof.on_outputs(outputs, now)
        return outputs

    def on_drain():
        outputs = drain()
        prof.on_outputs(outputs, sim.last_now)
        return outputs

    sched.add, sched.schedule, sched.update, sched.drain_outputs = (
        on_add, on_schedule, on_update, on_drain)
    result = sim.run()
    prof.close()
    return result


# --------------------------------------------------------------------------- the recorder


def test_profiling_is_off_by_default(tmp_path, model_dir_cfg):
    from engine.pool.service import PoolService

    assert LaunchConfig().profile_steps is None
    pool = PoolService(model_dir_cfg, 0, str(tmp_path))
    try:
        assert pool.profiler is None
    finally:
        pool.close(stop_workers=False)
    assert not list(tmp_path.glob("*.jsonl"))


def test_the_pool_opens_a_recording_when_asked(tmp_path, model_dir_cfg):
    from engine.pool.service import PoolService

    path = tmp_path / "steps.jsonl"
    cfg = replace(model_dir_cfg, launch=LaunchConfig(profile_steps=str(path)))
    pool = PoolService(cfg, 0, str(tmp_path))
    pool.close(stop_workers=False)
    rows = read_recording(path)
    assert [r["kind"] for r in rows] == ["start"]
    assert rows[0]["incarnation"] == pool.incarnation
    assert profile_path(str(path), 1) == f"{path}.pool1"


@pytest.fixture
def model_dir_cfg(tmp_path):
    d = config_only_model_dir(tmp_path / "model")
    return EngineConfig(models=(ModelConfig(path=str(d)),))


def test_recorder_writes_steps_with_the_batch_composition(tmp_path):
    path = tmp_path / "r.jsonl"
    prof = StepProfiler(path)
    req = m.EngineRequest(request_id="a", prompt_token_ids=list(range(10)), sampling=GREEDY,
                          arrival_time=99.5)
    prof.on_add(req, 100.0)
    new = m.NewRequestData(request_id="a", token_ids=list(range(10)), sampling=GREEDY,
                           block_ids=[0], num_computed_tokens=4, num_scheduled_tokens=6)
    plan = m.StepPlan(step_id=1, worker_id=0, new_requests=[new])
    prof.on_send(plan, 100.0)
    prof.on_result(plan, m.StepResult(step_id=1, worker_id=0, request_ids=["a"], token_ids=[7],
                                      execute_time_s=0.01), 100.02)
    prof.on_outputs([m.RequestOutput(request_id="a", new_token_ids=[7])], 100.021)
    plan2 = m.StepPlan(step_id=2, worker_id=0, cached_requests=[
        m.CachedRequestData(request_id="a", num_scheduled_tokens=1)])
    prof.on_send(plan2, 100.025)
    prof.on_result(plan2, m.StepResult(step_id=2, worker_id=0, request_ids=["a"],
                                       token_ids=[8], execute_time_s=0.004), 100.03)
    prof.close()
    rows = read_recording(path)
    assert [r["kind"] for r in rows] == ["start", "add", "step", "first", "step"]
    add, s1, first, s2 = rows[1:]
    assert add["t"] - add["frontend_t"] == pytest.approx(0.5) and add["prompt_tokens"] == 10
    assert s1 == s1 | {"worker": 0, "requests": 1, "tokens": 6, "prefill_rows": 1,
                       "decode_rows": 0, "prefill_tokens": 6, "decode_seqs": 0,
                       "context_tokens": 10, "prefill_pairs": 6 * 4 + 21, "max_context": 10,
                       "t_send": 100.0, "t_result": 100.02, "execute_s": 0.01,
                       "gap_s": None, "busy": False}
    assert first["request"] == "a" and first["t"] == 100.021
    assert s2["decode_seqs"] == 1 and s2["prefill_tokens"] == 0 and s2["context_tokens"] == 11
    assert s2["busy"] and s2["gap_s"] == pytest.approx(0.005)
    assert host_samples(step_rows(rows)) == [(1, pytest.approx(0.01 + 0.005))]
    assert pool_ttfts(rows) == [pytest.approx(0.021)]


# --------------------------------------------------------------------------- the fit


def test_fit_recovers_a_known_cost_model_from_a_recording(tmp_path):
    result = recorded_run(tmp_path / "r.jsonl")
    rows = read_recording(tmp_path / "r.jsonl")
    assert len(step_rows(rows)) == result.num_steps
    client_ttfts = [r.first_token - r.arrival for r in result.records]
    cal = fit_recording(rows, CostModel.load(), client_ttfts)
    got = cal.cost
    for name in (*CostModel.COEFFICIENTS, *CostModel.HOST):
        assert getattr(got, name) == pytest.approx(getattr(TRUTH, name), rel=1e-3, abs=1e-9), name
    assert cal.report["median_rel_error"] < 1e-6


def test_a_fitted_cost_file_predicts_other_seeds(tmp_path, capsys):
    recorded_run(tmp_path / "r.jsonl", seed=1)
    out = tmp_path / "fit.toml"
    assert main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out)]) == 0
    fitted = CostModel.load(out)  # no client results: stream_s is 0
    assert fitted.stream_s == 0 and fitted.admit_s == pytest.approx(TRUTH.admit_s)
    fitted = replace(fitted, stream_s=TRUTH.stream_s, engine=TRUTH.engine)
    judge = workload(seed=2)
    a = summarize(Simulator(iter(judge), TRUTH, CONFIG).run(), SLO())
    b = summarize(Simulator(iter(judge), fitted, CONFIG).run(), SLO())
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "throughput_tok_s"):
        assert b[k] == pytest.approx(a[k], rel=1e-3), k


def test_fit_refuses_a_recording_without_steps(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    StepProfiler(path).close()
    assert main(["fit", str(path), "--out", str(tmp_path / "c.toml")]) == 2
    assert "timed steps" in capsys.readouterr().err
    path.write_text("not json\n")
    assert main(["fit", str(path), "--out", str(tmp_path / "c.toml")]) == 2
    assert "r.jsonl:1" in capsys.readouterr().err


# --------------------------------------------------------------------------- host terms


def test_host_terms_delay_admission_streaming_and_the_next_step():
    base = replace(TRUTH, admit_s=0.0, stream_s=0.0, host_step_s=0.0, host_request_s=0.0)
    one = [r for r in workload() if r.max_tokens >= 2][:1]
    one = [replace(one[0], arrival_time=1.0)]
    a = Simulator(iter(one), base, CONFIG).run().records[0]
    b = Simulator(iter(one), TRUTH, CONFIG).run().records[0]
    assert a.arrival == b.arrival == 1.0
    p = a.num_prompt_tokens
    prefill = base.time_of(BatchShape(p, 0, p, p * (p + 1) // 2))
    assert a.first_token - a.arrival == pytest.approx(prefill)
    # a step's outputs come its host time after its forward pass (one request per step)
    assert b.first_token - b.arrival == pytest.approx(
        TRUTH.admit_s + prefill + TRUTH.host_time(1) + TRUTH.stream_s)
    n = a.num_output_tokens
    assert (b.finish - b.first_token) - (a.finish - a.first_token) == pytest.approx(
        (n - 1) * TRUTH.host_time(1))


def test_cost_files_round_trip_host_terms_and_refuse_unknown_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TRUTH.to_toml("x"))
    assert CostModel.load(path) == TRUTH
    assert "[host]" not in CostModel.load().to_toml()
    path.write_text(TRUTH.to_toml().replace("admit_s", "admitt_s"))
    with pytest.raises(ValueError, match="admitt_s"):
        CostModel.load(path)


def test_step_extras_are_fitted_back_from_a_recording(tmp_path):
    truth = replace(TRUTH, prefill_step_s=1.5e-3, cold_step_s=0.8e-3)
    recorded_run(tmp_path / "r.jsonl", cost=truth)
    rows = read_recording(tmp_path / "r.jsonl")
    steps = step_rows(rows)
    cold = sum(not r["busy"] for r in steps)
    prefill = sum(r["prefill_tokens"] > 0 for r in steps)
    assert 0 < cold < prefill < len(steps)  # both classes present, and not the same steps
    got = fit_recording(rows, CostModel.load()).cost
    for name in (*CostModel.COEFFICIENTS, *CostModel.STEP_EXTRA):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-3, abs=1e-9), name
    plain = fit_recording(rows, CostModel.load(), extras=False).cost  # without: the fit errs
    assert plain.prefill_step_s == plain.cold_step_s == 0 and plain.step_s > truth.step_s


def test_the_simulator_adds_the_step_extras_to_prefill_and_cold_steps():
    base = replace(TRUTH, admit_s=0.0, stream_s=0.0, host_step_s=0.0, host_request_s=0.0)
    extra = replace(base, prefill_step_s=2e-3, cold_step_s=1e-3)
    reqs = [r for r in workload() if r.max_tokens >= 4][:2]
    # the first on an idle worker (cold), the second while it still decodes (a busy step)
    reqs = [replace(reqs[0], arrival_time=1.0), replace(reqs[1], arrival_time=1.001)]
    config = replace(CONFIG, num_workers=1)
    a = {r.request_id: r for r in Simulator(iter(reqs), base, config).run().records}
    b = {r.request_id: r for r in Simulator(iter(reqs), extra, config).run().records}
    first, second = (r.request_id for r in reqs)
    assert b[first].first_token - a[first].first_token == pytest.approx(3e-3)  # cold prefill
    # the second's prefill step is busy: the prefill extra only, after the first's steps
    assert b[second].first_token - a[second].first_token == pytest.approx(3e-3 + 2e-3)
    path_cost = extra.to_toml()
    assert "[step_extra]" in path_cost and "[step_extra]" not in base.to_toml()
    assert CostModel.from_dict(tomllib.loads(path_cost)) == extra
    with pytest.raises(ValueError, match="step_extra"):
        CostModel.from_dict(tomllib.loads(path_cost.replace("cold_step_s = 0.001",
                                                            "cold_step_s = -1.0")))
    with pytest.raises(ValueError, match=r"step_extra\.warm_s"):
        CostModel.from_dict(tomllib.loads(path_cost.replace("cold_step_s", "warm_s")))


def test_pool_cycles_pair_each_client_request_with_its_steps_in_the_recording(tmp_path):
    from bench.fidelity_requests import pair, pool_cycles, report

    truth = replace(TRUTH, prefill_step_s=1e-3, cold_step_s=5e-4)
    result = recorded_run(tmp_path / "r.jsonl", cost=truth)
    rows = read_recording(tmp_path / "r.jsonl")
    recs = [r for r in result.records if r.finish is not None]
    client = [{"request_id": r.request_id, "outcome": "completed", "sent_s": r.arrival,
               "ttft_s": r.first_token - r.arrival, "num_prompt_tokens": r.num_prompt_tokens,
               "num_output_tokens": r.num_output_tokens,
               "tpot_s": ((r.finish - r.first_token) / (r.num_output_tokens - 1)
                          if r.num_output_tokens > 1 else None)} for r in recs]
    cycles = pool_cycles(rows, client, truth)
    several = [r for r in recs if r.num_output_tokens > 1]
    assert len(cycles) == len(several) > 100
    for r, q in zip(recs, client, strict=True):
        if r.num_output_tokens < 2:
            continue
        c = cycles[r.request_id]
        assert c.tpot_s == pytest.approx(q["tpot_s"], rel=1e-9)  # the client's TPOT, exactly
        assert c.execute_s == pytest.approx(c.model_s, rel=1e-9)  # no noise: as modelled
        assert c.host_s == pytest.approx(c.tpot_s - c.execute_s) and c.host_s > 0
    assert pool_cycles(rows, client[1:], truth) == {}  # not one to one: no pairing
    text = report("x", pair(client, cycles, {}), top=3)
    assert "| pool cycle |" in text and "slowest 5%" in text


# --------------------------------------------------------------------------- step-time noise


def test_new_noise_and_contention_keys_round_trip_and_are_checked(tmp_path):
    cost = replace(TRUTH, noise_quantiles=(0.5, 1.0, 2.0), noise_rho=0.4,
                   noise_prefill_quantiles=(0.7, 1.2, 3.0), noise_slow_rho=0.99,
                   noise_slow_share=0.25, overlap=0.35)
    path = tmp_path / "c.toml"
    path.write_text(cost.to_toml())
    assert CostModel.load(path) == cost
    path.write_text(cost.to_toml().replace("slow_share = 0.25", "slow_share = 1.5"))
    with pytest.raises(ValueError, match="slow_share"):
        CostModel.load(path)
    path.write_text(cost.to_toml().replace("overlap = 0.35", "overlap = -1.0"))
    with pytest.raises(ValueError, match="overlap"):
        CostModel.load(path)


# --------------------------------------------------------------------------- contention


def test_fit_recovers_the_overlap_factor_of_two_workers_sharing_cores(tmp_path):
    truth = replace(TRUTH, host_step_s=0.0, host_request_s=0.0, overlap=0.6)
    result = recorded_run(tmp_path / "r.jsonl", cost=truth)
    rows = read_recording(tmp_path / "r.jsonl")
    steps = step_rows(rows)
    shares = overlap_shares(steps)
    assert 0.05 < shares.mean() < 0.95  # the workload overlaps the workers' steps in part
    cal = fit_recording(rows, CostModel.load(), terms=("contention",))
    assert cal.cost.overlap == pytest.approx(0.6, rel=1e-3)
    for name in CostModel.COEFFICIENTS:
        assert getattr(cal.cost, name) == pytest.approx(getattr(truth, name), rel=1e-3,
                                                        abs=1e-9), name
    assert cal.report["median_rel_error"] < 1e-6
    # without the term the same recording fits worse, and the simulated steps are too fast
    plain = fit_recording(rows, CostModel.load())  # the term is optional
    assert plain.cost.overlap == 0 and plain.report["median_rel_error"] > 0.01
    mean = sum(result.busy_s) / result.num_steps
    alone = Simulator(iter(workload()), replace(truth, overlap=0.0), CONFIG).run()
    assert sum(alone.busy_s) / alone.num_steps < mean


# --------------------------------------------------------------------------- speed levels


def test_levels_fit_recovers_the_costs_under_a_drift_confounded_with_the_batches(tmp_path):
    """The machine's speed drifts, and the windows of long contexts happen to run slow (as
    when a calibration serves its long-context workload during a slow spell): a plain fit
    lends the drift to the context cost; with a level per worker and window the fitted
    coefficients are the truth's, all scaled alike (to keep the mean step time)."""
    truth = replace(TRUTH, host_step_s=0.0, host_request_s=0.0)
    recorded_run(tmp_path / "r.jsonl", cost=truth)
    rows = read_recording(tmp_path / "r.jsonl")
    steps = step_rows(rows)
    keys = level_keys(steps)
    assert list(keys) == list(level_keys(steps, LEVEL_WINDOW_S))
    assert len(set(keys)) >= 8  # two workers, 20 s of arrivals: several windows each
    context = {k: np.mean([s["context_tokens"] for s, j in zip(steps, keys, strict=True)
                           if j == k]) for k in set(keys)}
    longest = max(context.values())
    for s, k in zip(steps, keys, strict=True):
        s["execute_s"] *= 1.0 + 0.5 * context[k] / longest
    measured = np.mean([s["execute_s"] for s in steps])

    def ratios(cost: CostModel) -> list[float]:
        return [getattr(cost, n) / getattr(truth, n) for n in CostModel.COEFFICIENTS]

    plain = fit_recording(rows, CostModel.load(), noise=False)
    assert abs(ratios(plain.cost)[3] / ratios(plain.cost)[0] - 1) > 0.3  # context: biased
    cal = fit_recording(rows, CostModel.load(), noise=False, terms=("levels",))
    got = ratios(cal.cost)
    assert 1.1 < got[0] < 1.5  # the mean drift (1 + 0.5 x a window's share of the longest)
    assert got == pytest.approx([got[0]] * len(got), rel=1e-3)
    assert cal.cost.prefill_step_s == pytest.approx(0.0, abs=1e-6)
    assert cal.cost.cold_step_s == pytest.approx(0.0, abs=1e-6)
    assert cal.report["fitted_mean_step_s"] == pytest.approx(measured, rel=1e-9)


def test_overlap_share_counts_the_other_workers_steps_in_flight():
    assert overlap_share([(0, 0), (1, 5)], 0, 2.0, 4.0) == pytest.approx(0.75)  # 2..5 of 2..6
    assert overlap_share([(0, 0), (0, 1)], 0, 2.0, 4.0) == 0.0  # the other one ended before
    assert overlap_share([(0, 9), (0, 1), (1, 9)], 1, 2.0, 4.0) == 1.0  # two: at most 1
    assert overlap_share([(0, 0), (2, 9)], 0, 2.0, 4.0) == 0.0  # started together: neither
    steps = [{"worker": 0, "t_result": 6.0, "execute_s": 4.0},
             {"worker": 1, "t_result": 5.0, "execute_s": 5.0},
             {"worker": 1, "t_result": 9.0, "execute_s": 2.0}]
    # step 0 (2..6) overlaps worker 1's 0..5; worker 1's 7..9 starts after 2..6 ends
    assert list(overlap_shares(steps)) == pytest.approx([0.75, 0.0, 0.0])


# --------------------------------------------------------------------------- drawn host terms


def test_drawn_host_times_are_fitted_back_from_a_recording(tmp_path):
    ratios = tuple(float(q) for q in np.quantile(
        np.random.default_rng(2).lognormal(0.0, 0.6, 4000), np.linspace(0, 1, 101)))
    ratios = tuple(q / sampled_mean(ratios) for q in ratios)  # mean 1
    truth = replace(TRUTH, host_quantiles=ratios)
    recorded_run(tmp_path / "r.jsonl", cost=truth)
    rows = read_recording(tmp_path / "r.jsonl")
    assert fit_recording(rows, CostModel.load()).cost.host_quantiles == ()  # optional
    got = fit_recording(rows, CostModel.load(), terms=("host",)).cost
    assert sampled_mean(got.host_quantiles) == pytest.approx(1.0, rel=1e-6)
    grid = np.linspace(0, 1, 101)
    for p in (0.1, 0.5, 0.9):
        assert np.interp(p, grid, got.host_quantiles) == pytest.approx(
            np.interp(p, grid, ratios), rel=0.1), p


def test_admission_delays_pair_client_and_pool_and_are_drawn_per_request(tmp_path):
    result = recorded_run(tmp_path / "r.jsonl")
    rows = read_recording(tmp_path / "r.jsonl")
    client = client_records(result)
    matched = matched_ttfts(rows, client)
    assert len(matched) == len(client)
    records = sorted(result.records, key=lambda r: r.arrival)
    for (c, pool, admit, _), q, rec in zip(matched, sorted(client, key=lambda q: q["sent_s"]),
                                        records, strict=True):
        assert c == q["ttft_s"] and admit == pytest.approx(TRUTH.admit_s)
        # the pool's TTFT: its first output less its taking the request (no stream, no admit)
        assert pool == pytest.approx(rec.first_token - rec.arrival - TRUTH.stream_s
                                     - TRUTH.admit_s, abs=1e-9)
    assert matched_ttfts(rows, client[1:]) == []  # no one-to-one pairing: nothing
    cal = fit_recording(rows, CostModel.load(), terms=("admit",), matched=matched)
    q, stream = cal.cost.admit_quantiles, cal.cost.stream_s
    delays = np.array([c - pool for c, pool, *_ in matched])
    assert stream == pytest.approx(np.quantile(delays - TRUTH.admit_s, 0.01), abs=1e-9)
    assert q[-1] == pytest.approx(delays.max() - stream)
    # in the simulator: each request draws its delay; its arrival stays the workload's, and
    # the drawn delays follow the quantiles
    judge = workload(seed=2, rate=2.0)
    sim = Simulator(iter(judge), replace(TRUTH, admit_quantiles=q, stream_s=stream), CONFIG)
    delays_drawn = []
    admit = sim._admit

    def spy(req, now):
        delays_drawn.append(sim.delay.get(req.request_id))
        admit(req, now)

    sim._admit = spy  # type: ignore[method-assign]
    res = sim.run()
    assert {r.request_id: r.arrival for r in res.records} == pytest.approx(
        {r.request_id: r.arrival_time for r in judge})
    assert np.median(delays_drawn) == pytest.approx(np.interp(0.5, np.linspace(0, 1, 101), q),
                                                    rel=0.15)


def test_fit_cli_fits_the_optional_terms_asked_for_and_refuses_unknown_ones(tmp_path, capsys):
    truth = replace(TRUTH, host_step_s=0.0, host_request_s=0.0, overlap=0.5)
    recorded_run(tmp_path / "r.jsonl", cost=truth)
    out = tmp_path / "fit.toml"
    assert main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out),
                 "--terms", "contention,slow"]) == 0
    fitted = CostModel.load(out)
    assert fitted.overlap == pytest.approx(0.5, rel=1e-3)
    assert main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out)]) == 0
    assert CostModel.load(out).overlap == 0  # not asked for
    with pytest.raises(SystemExit) as e:
        main(["fit", str(tmp_path / "r.jsonl"), "--out", str(out), "--terms", "contention,x"])
    assert e.value.code == 2 and "--terms: unknown ['x']" in capsys.readouterr().err
