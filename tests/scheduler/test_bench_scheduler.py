"""``python -m bench.scheduler``: our scheduler's cost per request-step, and vLLM's beside it."""

from __future__ import annotations

import pytest

from bench import scheduler as bench


def test_bench_reports_cost_per_request_step_and_per_add():
    result = bench.run(16, 2, steps=5)
    assert result["running"] == 16 and result["workers"] == 2
    assert result["us_per_step"] > 0
    assert result["us_per_add_hit"] > 0 and result["us_per_add_miss"] > 0
    assert result["us_per_request_step"] == pytest.approx(result["us_per_step"] / 16, abs=0.01)


@pytest.mark.slow
def test_vllm_scheduler_runs_the_same_requests():
    pytest.importorskip("vllm")
    result = bench.run_vllm(16, 2, steps=5)
    assert result["vllm_version"] == "0.32.0"
    assert result["vllm_us_per_request_step"] > 0
    assert result["vllm_us_per_add_hit"] > 0 and result["vllm_us_per_add_miss"] > 0


def test_vllm_comparison_refuses_runs_longer_than_the_models_context():
    with pytest.raises(ValueError, match="--steps"):
        bench.run_vllm(16, 2, steps=bench.VLLM_MAX_MODEL_LEN)


def test_bench_times_steps_with_kv_events_published():
    result = bench.run(16, 2, steps=20, kv_events=True)
    assert result["kv_events"] is True and result["us_per_step"] > 0


def test_bench_times_the_pool_step_with_and_without_recording():
    result = bench.run_record(16, 2, steps=10)
    assert result["us_per_step"] > 0 and result["record_us_per_step"] > 0
    assert result["record_bytes_per_step"] > 100  # two plans and two results a step
