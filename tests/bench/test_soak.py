"""The soak benchmark's pure parts: outcome accounting, the kill schedule, process roles from
``/proc``, the RSS table and the pass/fail verdict. No engine is launched."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import pytest

from bench.soak import build_parser, format_report
from bench.soak_procs import (
    Proc,
    kill_schedule,
    parse_kinds,
    pick_victim,
    read_processes,
    restart_counts,
    role_of,
    rss_table,
)
from bench.soak_requests import (
    ABORTED,
    COMPLETED,
    CUT,
    FAILED,
    LOST,
    Result,
    StreamState,
    answer_outcome,
    draw_request,
    request_body,
    summarize,
    transport_outcome,
)

MIB = 1024 * 1024


# ------------------------------------------------------------------ outcomes


def test_a_stream_with_a_finish_reason_completes_with_the_usage_token_count():
    s = StreamState()
    s.feed({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for _ in range(3):
        s.feed({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
    s.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    s.feed({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
    assert s.end() == (COMPLETED, "")
    assert s.tokens == 4 and s.token_events == 3


def test_a_stream_without_usage_counts_its_token_events():
    s = StreamState()
    s.feed({"choices": [{"text": "a"}]})
    s.feed({"choices": [{"text": "b", "finish_reason": "stop"}]})
    assert s.end() == (COMPLETED, "") and s.tokens == 2


def test_a_stream_that_ends_without_finish_reason_is_lost():
    s = StreamState()
    s.feed({"choices": [{"text": "a"}]})
    assert s.end() == (LOST, "ended without finish_reason")


def test_an_error_event_or_an_abort_finish_reason_is_a_failure():
    s = StreamState()
    s.feed({"choices": [{"text": "a"}]})
    s.feed({"error": {"message": "pool gone", "code": 503}})
    outcome, reason = s.end()
    assert outcome == FAILED and "pool gone" in reason
    assert answer_outcome("abort") == (FAILED, "finish_reason abort")
    assert answer_outcome("error")[0] == FAILED
    assert answer_outcome(None) == (LOST, "ended without finish_reason")
    assert answer_outcome("length") == (COMPLETED, "")


def test_a_reset_is_cut_only_when_a_frontend_kill_fell_inside_the_request():
    assert transport_outcome(1.0, 3.0, [2.0], "ReadError") == (CUT, "ReadError")
    assert transport_outcome(1.0, 3.0, [-5.0, 3.5], "ReadError") == (FAILED, "ReadError")
    assert transport_outcome(1.0, 3.0, [], "RemoteProtocolError")[0] == FAILED
    # sent while the frontend was down: refused, not cut
    assert transport_outcome(2.5, 2.6, [2.0], "ConnectError")[0] == FAILED
    # sent just after the kill on a kept-alive connection to the dead process: cut
    assert transport_outcome(2.5, 2.6, [2.0], "ReadError") == (CUT, "ReadError")
    assert transport_outcome(5.0, 5.1, [2.0], "ReadError")[0] == FAILED


def result(i: int, outcome: str, *, kind: str = "chat stream", tokens: int = 10,
           max_tokens: int = 10, reason: str = "") -> Result:
    return Result(i, kind, max_tokens, sent_s=0.0, end_s=1.0, outcome=outcome, reason=reason,
                  tokens=tokens)


def test_summary_counts_each_outcome_once_and_checks_token_counts():
    results = [result(0, COMPLETED), result(1, COMPLETED, tokens=9, kind="completions"),
               result(2, ABORTED, tokens=3), result(3, CUT, reason="ReadError"),
               result(4, FAILED, reason="HTTP 503"), result(5, FAILED, reason="HTTP 503"),
               result(6, LOST, reason="ended without finish_reason")]
    s = summarize(results)
    assert s["requests"] == 7
    assert s["outcomes"] == {COMPLETED: 2, ABORTED: 1, CUT: 1, FAILED: 2, LOST: 1}
    assert sum(s["outcomes"].values()) == len(results)
    assert s["by_kind"]["completions"][COMPLETED] == 1
    assert s["by_kind"]["chat stream"][LOST] == 1
    assert s["completed_tokens"] == 19  # aborted tokens not counted
    assert s["token_count_mismatches"] == 1 and s["mismatched_requests"] == [1]
    assert s["failure_reasons"] == {"HTTP 503": 2}
    assert s["cut_reasons"] == {"ReadError": 1}
    assert s["lost_requests"] == [{"index": 6, "kind": "chat stream",
                                   "reason": "ended without finish_reason"}]


def test_drawn_requests_are_seeded_mixed_and_abort_mid_way():
    a = [draw_request(random.Random(3), i, 0.5) for i in range(200)]
    rng = random.Random(3)
    assert a[0] == draw_request(rng, 0, 0.5)
    rng = random.Random(3)
    b = [draw_request(rng, i, 0.5) for i in range(200)]
    assert {r.kind for r in b} == {"chat", "chat stream", "completions", "completions stream"}
    for r in b:
        assert 8 <= r.max_tokens <= 96
        if r.abort_after_events is not None:
            assert r.stream and 1 <= r.abort_after_events < r.max_tokens
        if r.abort_after_s is not None:
            assert not r.stream
    assert 40 < sum(r.abort_after_events is not None or r.abort_after_s is not None
                    for r in b) < 160
    assert all(r.abort_after_events is None and r.abort_after_s is None
               for r in (draw_request(rng, i, 0.0) for i in range(50)))


def test_request_bodies_are_greedy_with_exact_lengths():
    rng = random.Random(0)
    specs = [draw_request(rng, i, 0.0) for i in range(40)]
    chat = next(s for s in specs if s.chat and s.stream)
    body = request_body(chat, "m")
    assert body["messages"][0]["content"] == chat.prompt and "prompt" not in body
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    plain = request_body(next(s for s in specs if not s.chat and not s.stream), "m")
    assert "messages" not in plain and "stream_options" not in plain and not plain["stream"]


# ------------------------------------------------------------------ kills


def test_kill_schedule_cycles_through_the_kinds_within_the_run():
    assert kill_schedule(600, 180, ["worker", "pool", "frontend"]) == [
        (180, "worker"), (360, "pool"), (540, "frontend")]
    assert kill_schedule(1800, 180, ["worker", "pool", "frontend"])[3:5] == [
        (720, "worker"), (900, "pool")]
    assert len(kill_schedule(1800, 180, ["worker"])) == 9  # none at the very end
    assert kill_schedule(120, 30, ["worker"]) == [(30, "worker"), (60, "worker"),
                                                   (90, "worker")]
    assert kill_schedule(20, 30, ["worker"]) == []
    assert kill_schedule(600, 60, []) == []
    with pytest.raises(ValueError):
        kill_schedule(60, 0, ["worker"])


def test_kinds_are_checked():
    assert parse_kinds("worker, pool") == ["worker", "pool"]
    assert parse_kinds("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="launcher"):
        parse_kinds("worker,launcher")
    assert build_parser().parse_args([]).kill == ["worker", "pool", "frontend"]
    args = build_parser().parse_args(["--kill", "worker", "--minutes", "0.5", "--",
                                      "--num-threads", "1"])
    assert args.kill == ["worker"] and args.minutes == 0.5
    assert args.engine_args == ["--num-threads", "1"]


def test_process_roles_from_command_lines():
    assert role_of(["python", "-m", "engine.child", "frontend", ""]) == "frontend"
    assert role_of(["/v/bin/python3", "-m", "engine.child", "worker-0-1"]) == "worker-0-1"
    assert role_of(["engine-pool-0", "", ""]) == "pool-0"  # setproctitle's title
    assert role_of(["engine-worker-1-0-tp1"]) == "worker-1-0-tp1"
    assert role_of(["python", "-m", "engine.launch", "--http-port", "0"]) == "launcher"
    assert role_of(["python", "-c", "from multiprocessing.resource_tracker import main"]) \
        == "other"
    assert role_of([]) == "other"
    assert [Proc(1, n).kind for n in ("worker-0-0", "pool-1", "frontend", "launcher")] == [
        "worker", "pool", "frontend", "launcher"]


def test_victims_are_drawn_among_the_kind_only():
    procs = [Proc(1, "launcher"), Proc(2, "pool-0"), Proc(3, "worker-0-0"),
             Proc(4, "worker-0-1"), Proc(5, "frontend")]
    rng = random.Random(0)
    assert {pick_victim(procs, "worker", rng).pid for _ in range(50)} == {3, 4}  # type: ignore[union-attr]
    assert pick_victim(procs, "pool", rng) == Proc(2, "pool-0")
    assert pick_victim(procs[:2], "frontend", rng) is None


def test_restarts_count_the_pids_seen_per_role():
    seen = {"launcher": {1}, "worker-0-0": {3, 7, 9}, "pool-0": {2}, "other": {5, 6}}
    assert restart_counts(seen) == {"pool-0": 0, "worker-0-0": 2}


def fake_proc(root: Path, pid: int, ppid: int, argv: list[str], rss_pages: int) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_text(f"{pid} (python3 (x)) S {ppid} {pid} {pid} 0 -1\n")
    (d / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (d / "statm").write_text(f"1000 {rss_pages} 10 1 0 50 0\n")


def test_the_process_tree_is_read_from_proc(tmp_path: Path):
    fake_proc(tmp_path, 100, 1, ["python", "-m", "engine.launch"], 10)
    fake_proc(tmp_path, 101, 100, ["engine-pool-0"], 20)
    fake_proc(tmp_path, 102, 100, ["engine-worker-0-0"], 30)
    fake_proc(tmp_path, 103, 100, ["python", "-m", "engine.child", "frontend"], 40)
    fake_proc(tmp_path, 104, 102, ["python", "-c", "helper"], 5)  # a grandchild
    fake_proc(tmp_path, 200, 1, ["engine-worker-9-9"], 99)  # another engine's
    (tmp_path / "self").mkdir()
    page = os.sysconf("SC_PAGE_SIZE")
    procs = {p.pid: p for p in read_processes(100, str(tmp_path))}
    assert sorted(procs) == [100, 101, 102, 103, 104]
    assert [procs[p].name for p in (100, 101, 102, 103, 104)] == [
        "launcher", "pool-0", "worker-0-0", "frontend", "other"]
    assert procs[102].rss == 30 * page


# ------------------------------------------------------------------ RSS and the report


def test_rss_table_flags_growth_beyond_the_tolerance_and_missing_roles():
    start = [Proc(1, "launcher", 100 * MIB), Proc(3, "worker-0-0", 700 * MIB),
             Proc(2, "pool-0", 40 * MIB), Proc(4, "frontend", 500 * MIB),
             Proc(9, "other", 1 * MIB)]
    end = [Proc(1, "launcher", 100 * MIB), Proc(8, "worker-0-0", 600 * MIB),
           Proc(2, "pool-0", 45 * MIB)]
    rows = {r.name: r for r in rss_table(start, end, tolerance=0.10)}
    assert list(rows) == ["launcher", "frontend", "pool-0", "worker-0-0"]  # "other" left out
    assert rows["launcher"].ok and rows["launcher"].change == 0.0
    assert rows["pool-0"].change == pytest.approx(0.125) and not rows["pool-0"].ok
    w = rows["worker-0-0"]
    assert w.restarted and w.ok and w.change == pytest.approx(-1 / 7)  # shrinking is fine
    assert w.start_mib == 700 and w.end_mib == 600
    assert rows["frontend"].end_mib is None and not rows["frontend"].ok
    assert not rows["frontend"].restarted


def test_the_table_shows_outcomes_kills_rss_kv_and_the_verdict():
    s = summarize([result(0, COMPLETED), result(1, CUT, reason="ReadError")])
    rep = {**s, "load_s": 60.0, "offered_rate": 2.0,
           "kills": [{"at_s": 30.0, "kind": "worker", "victim": "worker-0-0", "pid": 7,
                      "recovered_s": 1.5},
                     {"at_s": 45.0, "kind": "frontend", "victim": "frontend", "pid": 8,
                      "recovered_s": None, "engine_exited": True},
                     {"at_s": 50.0, "kind": "pool", "victim": None}],
           "restarts": {"worker-0-0": 1, "pool-0": 0},
           "rss": [{"name": "pool-0", "start_mib": 40.0, "end_mib": 41.0, "change": 0.025,
                    "restarted": False}],
           "kv": {"default": {"baseline_free": 4096, "end_free": 4096}},
           "passed": False, "problems": ["the engine exited (code 1) after frontend was killed"]}
    text = format_report(rep)
    assert "worker-0-0 (pid 7) at 30.0 s: back in 1.5 s" in text
    assert "frontend (pid 8) at 45.0 s: engine exited" in text
    assert "kill pool at 50.0 s: no such process" in text
    assert "restarts: worker-0-0 1" in text and "+2.5%" in text
    assert "baseline 4096, end 4096" in text
    assert text.splitlines()[-1].startswith("FAIL: the engine exited")


def test_the_cache_fill_stops_once_the_pool_blocks_are_cached_with_margin():
    from bench.soak import fill_done, fill_prompt

    assert not fill_done(16_383, 16_384, 1.0) and fill_done(16_384, 16_384, 1.0)
    assert not fill_done(20_000, 16_384, 1.25) and fill_done(20_480, 16_384, 1.25)
    rng_a, rng_b = random.Random(3), random.Random(3)
    a, b = fill_prompt(rng_a, 400), fill_prompt(rng_a, 400)
    assert a == fill_prompt(rng_b, 400) and a != b and len(a.split()) == 400


def test_the_report_shows_the_cache_fill():
    rep = {**summarize([result(0, COMPLETED)]), "load_s": 60.0, "offered_rate": 1.0,
           "cache_fill": {"requests": 400, "blocks": 20_500, "total_blocks": 16_384},
           "cache_fill_end": {"requests": 392, "blocks": 20_490, "total_blocks": 16_384},
           "kills": [], "restarts": {}, "rss": [], "kv": {}, "passed": True, "problems": []}
    text = format_report(rep)
    assert "cache fill: 400 requests, 20500 blocks cached for 16384 KV blocks" in text
    assert "cache fill at the end: 392 requests, 20490 blocks cached" in text


def test_pool_rss_verdict_is_the_growth_after_the_cache_is_full():
    from bench.pool_rss import verdict

    rows = [{"sent": n, "cached_blocks": c, "rss": r * MIB}
            for n, c, r in ((0, 0, 50), (1000, 8000, 57), (2000, 16_300, 64), (8000, 16_301, 71))]
    v = verdict(rows, 16_384)  # full at 2000 (99%): 7 MiB over 6000 requests
    assert v["full_at"] == 2000 and v["growth_after_full_mib"] == 7.0
    assert v["bytes_per_request"] == pytest.approx(7 * MIB / 6000, abs=0.1)
    assert verdict(rows[:2], 16_384)["full_at"] is None
