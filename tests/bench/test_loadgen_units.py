"""The load generator's pure parts: metrics from known token times, SLOs, Retry-After,
arrival rescaling, dependencies, request bodies, the summary table and plots' data checks."""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime, timedelta

import pytest

from bench.loadgen.client import (
    COMPLETED,
    ERROR,
    RATE_LIMITED,
    TIMEOUT,
    ClientConfig,
    RequestRecord,
    build_payload,
    parse_retry_after,
)
from bench.loadgen.metrics import parse_slo, summarize
from bench.loadgen.plots import plot_all
from bench.loadgen.replay import check_dependencies, offered_rate, rescale
from bench.loadgen.report import format_summary
from engine.sim.workloads import SimRequest


def record(rid: str, times: list[float], *, priority: int = 0, outcome: str = COMPLETED,
           cached: int | None = None) -> RequestRecord:
    return RequestRecord(rid, priority, scheduled_s=0.0, outcome=outcome, token_times_s=times,
                         num_prompt_tokens=10, num_output_tokens=len(times),
                         num_cached_tokens=cached)


def test_ttft_tpot_itl_e2e_from_token_times():
    rec = record("a", [0.1, 0.15, 0.25, 0.3])
    assert rec.ttft_s == 0.1 and rec.e2e_s == 0.3
    assert rec.tpot_s == pytest.approx(0.2 / 3)
    assert rec.itl_s == pytest.approx([0.05, 0.1, 0.05])
    assert record("one", [0.2]).tpot_s is None  # TPOT needs two output tokens


def test_summary_pools_itl_applies_slos_and_splits_by_priority():
    records = [
        record("fast", [0.1, 0.2, 0.3], priority=1, cached=5),  # TPOT 0.1
        record("slow", [0.6, 0.7], priority=1, cached=0),  # TTFT 0.6
        record("one", [0.2], priority=-1),  # one token: TPOT counts as 0 for goodput
        record("refused", [], priority=-1, outcome=RATE_LIMITED),
        record("late", [0.5], outcome=TIMEOUT),
        record("broken", [], outcome=ERROR),
    ]
    records[3].retry_after_s = 3.0
    records[5].error = "HTTP 500: boom"
    out = summarize(records, 2.0, {"ttft": 0.5, "tpot": 0.1})

    assert (out["num_completed"], out["num_429"], out["num_timeouts"], out["num_errors"]) == (
        3, 1, 1, 1)
    assert out["goodput_req_s"] == 2 / 2.0  # "fast" and "one"; "slow" misses the TTFT bound
    assert out["request_throughput"] == 3 / 2.0
    assert out["throughput_tok_s"] == 6 / 2.0 and out["total_tok_s"] == (30 + 6) / 2.0
    assert out["itl_p50"] == pytest.approx(0.1) and out["itl_mean"] == pytest.approx(0.1)
    assert out["tpot_mean"] == pytest.approx(0.1)  # over requests with two tokens or more
    assert out["ttft_p50"] == pytest.approx(0.2)
    assert out["prefix_hit_rate"] == 5 / 20  # over the requests that reported cached tokens
    assert out["retry_after_mean"] == 3.0
    assert out["errors"] == {"HTTP 500: boom": 1}
    critical, sheddable = out["per_priority"]["critical"], out["per_priority"]["sheddable"]
    assert set(out["per_priority"]) == {"critical", "normal", "sheddable"}
    assert critical["num_completed"] == 2 and critical["ttft_p99"] == pytest.approx(0.6, abs=0.01)
    assert sheddable["num_429"] == 1 and sheddable["rate_429"] == 0.5
    assert out["per_priority"]["normal"]["num_timeouts"] == 1


def test_prefix_hit_rate_is_none_when_the_server_reports_nothing():
    assert summarize([record("a", [0.1])], 1.0, {})["prefix_hit_rate"] is None


def test_parse_slo():
    assert parse_slo("TTFT=0.5") == ("ttft", 0.5)
    for bad in ("ttft", "itl=0.1", "tpot=fast", "e2e=0"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after(later) <= 30


def _req(rid: str, arrival: float, after: str = "") -> SimRequest:
    return SimRequest(rid, arrival, (1, 2), 4, after=after)


def test_rescale_keeps_the_arrival_pattern():
    requests = [_req("a", 0.5), _req("a.1", 0.5, after="a"), _req("b", 1.0), _req("c", 1.5)]
    assert offered_rate(requests) == 2.0  # 3 independent requests by t = 1.5
    faster = rescale(requests, 4.0)
    assert [r.arrival_time for r in faster] == [0.25, 0.25, 0.5, 0.75]
    assert offered_rate(faster) == 4.0
    assert {r.arrival_time for r in rescale(requests, math.inf)} == {0.0}
    with pytest.raises(ValueError, match="arrives at 0"):
        rescale(rescale(requests, math.inf), 1.0)
    with pytest.raises(ValueError, match="--rate"):
        rescale(requests, 0.0)


def test_dependencies_must_name_an_earlier_request():
    check_dependencies([_req("a", 0), _req("b", 0, after="a")])
    with pytest.raises(ValueError, match="does not come before it"):
        check_dependencies([_req("b", 0, after="a"), _req("a", 0)])
    with pytest.raises(ValueError, match="duplicate"):
        check_dependencies([_req("a", 0), _req("a", 1)])


def test_priority_is_sent_as_is_negated_or_not_at_all():
    req = SimRequest("a", 0.0, (5, 6), 3, priority=1)
    sent = {mode: build_payload(req, ClientConfig("http://x", "m", priority_mode=mode))
            for mode in ("as-is", "negate", "omit")}
    assert sent["as-is"]["priority"] == 1 and sent["negate"]["priority"] == -1
    assert "priority" not in sent["omit"]
    assert ClientConfig("http://x:1/", "m").endpoint == "http://x:1/v1/completions"


def _result(records: list[RequestRecord], **extra: object) -> dict[str, object]:
    return {"label": "x", "url": "http://x", "model": "m", "workload_file": "w.jsonl",
            "request_rate": "inf", "slo": {}, **summarize(records, 1.0, {}),
            "requests": [r.to_json() for r in records], **extra}


def test_summary_table_shows_classes_and_errors():
    broken = record("b", [], priority=-1, outcome=ERROR)
    broken.error = "HTTP 500: boom"
    text = format_summary(_result([record("a", [0.1, 0.2], priority=1), broken]))
    assert "1 completed, 0 HTTP 429, 0 timeouts, 1 errors" in text
    assert "critical" in text and "sheddable" in text and "HTTP 500: boom" in text
    assert "prefix hit  not reported" in text


def test_plots_are_written_only_for_what_the_results_hold(tmp_path):
    failed = record("a", [], outcome=ERROR)
    assert plot_all([_result([failed])], tmp_path) == [tmp_path / "ttft_by_priority.png"]
    cached = record("b", [0.1, 0.2], cached=4)
    written = plot_all([_result([cached], label="placement-a", request_rate=2.0)], tmp_path)
    assert {p.name for p in written} == {"latency_cdf.png", "rate.png", "ttft_by_priority.png",
                                         "prefix_hit_rate.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
