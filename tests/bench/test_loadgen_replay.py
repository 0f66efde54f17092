"""The load generator against a fake OpenAI-compatible server with known delays: what it
sends, what it measures, and that every request ends in exactly one outcome."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import ITL_S, RETRY_AFTER_S, TTFT_S, Behaviour, FakeOpenAIServer, serve

from bench.loadgen.cli import main
from bench.loadgen.client import COMPLETED, ERROR, RATE_LIMITED, TIMEOUT, ClientConfig
from bench.loadgen.metrics import summarize
from bench.loadgen.replay import RunResult, replay
from engine.sim.workloads import (
    SimRequest,
    WorkloadConfig,
    make_workload,
    read_jsonl,
    write_jsonl,
)

# Scheduling noise on a loaded 2-core machine: latencies may come this much late.
SLACK_S = 0.15


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeOpenAIServer]]:
    with serve() as (url, fake):
        yield url, fake


def request(rid: str, first_token: int = 1, *, arrival: float = 0.0, max_tokens: int = 6,
            priority: int = 0, after: str = "", think_time: float = 0.0) -> SimRequest:
    return SimRequest(rid, arrival, (first_token, 2, 3, 4), max_tokens, priority,
                      after=after, think_time=think_time)


def run(url: str, requests: list[SimRequest], *, timeout_s: float = 10.0,
        api_key: str | None = None, max_concurrency: int | None = None) -> RunResult:
    cfg = ClientConfig(url, "fake-model", api_key=api_key, timeout_s=timeout_s)
    return asyncio.run(replay(requests, cfg, max_concurrency=max_concurrency))


def test_sends_token_ids_and_measures_the_servers_delays(server):
    url, fake = server
    fake.received.clear()
    requests = [request("crit", priority=1), request("norm", arrival=0.05),
                request("shed", arrival=0.1, priority=-1)]
    result = run(url, requests, api_key="secret")

    for got in fake.received:
        body = got["body"]
        assert got["authorization"] == "Bearer secret"
        assert body["prompt"] == [1, 2, 3, 4] and body["model"] == "fake-model"
        assert body["max_tokens"] == 6 and body["temperature"] == 0.0
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    assert sorted(g["body"]["priority"] for g in fake.received) == [-1, 0, 1]

    for rec in result.records:
        assert rec.outcome == COMPLETED, rec.error
        assert (rec.num_prompt_tokens, rec.num_output_tokens, rec.num_cached_tokens) == (4, 6, 2)
        assert TTFT_S <= rec.ttft_s < TTFT_S + SLACK_S
        assert len(rec.itl_s) == 5
        assert rec.tpot_s == pytest.approx((rec.e2e_s - rec.ttft_s) / 5)
        assert 0.5 * ITL_S < rec.tpot_s < ITL_S + SLACK_S / 5
        assert rec.sent_s - rec.scheduled_s < SLACK_S

    summary = summarize(result.records, result.duration_s, {})
    assert 0.5 * ITL_S < summary["itl_p50"] < ITL_S + SLACK_S
    assert TTFT_S + 5 * 0.5 * ITL_S < summary["e2e_p50"] < TTFT_S + 5 * ITL_S + SLACK_S
    assert summary["prefix_hit_rate"] == 0.5
    assert summary["output_tokens"] == 18 and summary["prompt_tokens"] == 12
    assert summary["throughput_tok_s"] == pytest.approx(18 / result.duration_s)
    assert summary["goodput_req_s"] == summary["request_throughput"]  # no SLO given
    classes = summary["per_priority"]
    assert set(classes) == {"critical", "normal", "sheddable"}
    assert all(c["num_requests"] == c["num_completed"] == 1 for c in classes.values())


def test_every_request_ends_in_exactly_one_outcome(server):
    url, _ = server
    requests = [request("ok"), request("429", Behaviour.RATE_LIMITED),
                request("500", Behaviour.SERVER_ERROR), request("hang", Behaviour.HANG),
                request("event", Behaviour.ERROR_EVENT), request("cut", Behaviour.TRUNCATED)]
    result = run(url, requests, timeout_s=0.4)
    by_id = {r.request_id: r for r in result.records}

    assert by_id["ok"].outcome == COMPLETED
    assert by_id["429"].outcome == RATE_LIMITED and by_id["429"].status == 429
    assert by_id["429"].retry_after_s == RETRY_AFTER_S
    assert by_id["500"].outcome == ERROR and by_id["500"].error.startswith("HTTP 500")
    assert by_id["hang"].outcome == TIMEOUT
    assert 0.4 <= by_id["hang"].end_s - by_id["hang"].sent_s < 0.4 + 1.0
    assert by_id["event"].outcome == ERROR and "worker died" in by_id["event"].error
    assert by_id["cut"].outcome == ERROR and "without [DONE]" in by_id["cut"].error

    summary = summarize(result.records, result.duration_s, {})
    counts = [summary[k] for k in ("num_completed", "num_429", "num_timeouts", "num_errors")]
    assert counts == [1, 1, 1, 3] and sum(counts) == summary["num_requests"] == 6
    assert summary["rate_429"] == pytest.approx(1 / 6)
    assert summary["retry_after_p50"] == RETRY_AFTER_S
    assert len(summary["errors"]) == 3
    assert summary["ttft_p50"] is not None  # from the one completed request only


def test_a_refused_connection_is_an_error():
    with serve() as (url, _):
        pass  # the server has stopped: its port now refuses connections
    result = run(url, [request("a"), request("b")], timeout_s=5.0)
    assert [r.outcome for r in result.records] == [ERROR, ERROR]
    assert all("Connect" in r.error for r in result.records)


def test_arrival_times_and_later_turns(server):
    url, _ = server
    requests = [request("c0.0", max_tokens=2),
                request("c0.1", max_tokens=2, after="c0.0", think_time=0.1),
                request("other", max_tokens=2, arrival=0.2)]
    first, turn, other = run(url, requests).records
    assert turn.scheduled_s == first.end_s + 0.1  # due: its predecessor's end + think time
    assert 0 <= turn.sent_s - turn.scheduled_s < SLACK_S
    assert 0.2 <= other.sent_s < 0.2 + SLACK_S


def test_max_concurrency_holds_requests_back(server):
    url, _ = server
    records = run(url, [request(str(i), max_tokens=1) for i in range(3)],
                  max_concurrency=1).records
    records.sort(key=lambda r: r.sent_s)
    for before, after in itertools.pairwise(records):
        assert after.sent_s >= before.end_s
    assert summarize(records, 1.0, {})["send_delay_max_s"] >= 2 * TTFT_S


def test_cli_write_run_plot(server, tmp_path: Path, capsys):
    url, _ = server
    workload_file = tmp_path / "mix.jsonl"
    flags = ["--workload", "priority-mix", "--num-requests", "8", "--scale", "64",
             "--vocab-size", "100", "--seed", "3", "--rate", "10"]
    assert main(["write", *flags, "-o", str(workload_file)]) == 0
    cfg = WorkloadConfig(name="priority-mix", num_requests=8, scale=64, vocab_size=100, seed=3,
                         rate=10)
    assert list(read_jsonl(workload_file).requests()) == list(make_workload(cfg).requests())

    result_file = tmp_path / "result.json"
    assert main(["run", "--url", url, "--workload-file", str(workload_file), "--model", "m",
                 "--rate", "40", "--slo", "ttft=10", "--label", "fake", "--json",
                 str(result_file), "--no-progress"]) == 0
    result = json.loads(result_file.read_text())
    for key in ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "itl_p50", "e2e_p50",
                "throughput_tok_s", "request_throughput", "goodput_req_s", "num_errors",
                "num_429", "num_timeouts", "prefix_hit_rate", "per_priority"):
        assert key in result
    assert result["num_completed"] == len(result["requests"]) == 8
    assert result["request_rate"] == pytest.approx(40.0)
    assert result["slo"] == {"ttft": 10.0}
    assert set(result["per_priority"]) <= {"critical", "sheddable"}
    printed = capsys.readouterr().out
    assert "outcomes    8 completed" in printed and "TTFT" in printed

    plots = tmp_path / "plots"
    assert main(["plot", str(result_file), "-o", str(plots)]) == 0
    for name in ("latency_cdf.png", "rate.png", "ttft_by_priority.png", "prefix_hit_rate.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_cli_refuses_bad_inputs(tmp_path: Path, capsys):
    workload_file = tmp_path / "orphan.jsonl"
    write_jsonl([request("b", after="a")], workload_file)
    base = ["run", "--workload-file", str(workload_file), "--model", "m"]
    assert main(base) == 2
    assert "'b' follows 'a', which does not come before it" in capsys.readouterr().err
    write_jsonl([request("a"), request("b")], workload_file)
    assert main([*base, "--rate", "2"]) == 2
    assert "no arrival gaps to rescale" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.json"), "-o", str(tmp_path)]) == 2
