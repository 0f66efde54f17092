"""The three published results hold on tiny workloads (the direction, not the magnitude)."""

from __future__ import annotations

from bench import sim_results


def test_chunked_prefill_lowers_itl_p99():
    r = sim_results.chunked(small=True)
    assert r["arms"]["chunked"]["itl_p99"] < r["arms"]["whole prompts"]["itl_p99"]
    assert r["holds"]


def test_lpm_raises_the_prefix_hit_rate():
    r = sim_results.lpm(small=True)
    assert r["arms"]["lpm"]["prefix_hit_rate"] > r["arms"]["fcfs"]["prefix_hit_rate"]


def test_fair_service_gap_stays_within_the_vtc_bound_and_fcfs_does_not():
    r = sim_results.vtc(small=True)
    assert 0 < r["arms"]["fair"]["max_service_gap"] <= r["bound"]
    assert r["arms"]["fcfs"]["max_service_gap"] > r["bound"]


def test_cli_exit_status(capsys):
    assert sim_results.main(["lpm", "--small"]) == 0
    assert "lpm:" in capsys.readouterr().out
