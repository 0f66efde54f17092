"""bench.compare: configuration parsing, the side-by-side tables from result objects, and one
real run against this engine (no vLLM) that must leave no process behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import compare
from bench.compare import build_parser, build_specs, parse_engine_config, vllm_priority_mode
from bench.compare_report import format_tables
from bench.compare_workload import prefix_hit_ceiling, shift_prompts, truncate, warmup_requests
from bench.loadgen.client import COMPLETED, RATE_LIMITED, RequestRecord
from bench.loadgen.metrics import summarize
from bench.servers import Server, ServerSpec, omp_bind, session_processes, vllm_kv_space
from engine.sim.workloads import WorkloadConfig, make_workload

# ----------------------------------------------------------------------------- configurations


def test_engine_configs_become_launch_flags():
    assert parse_engine_config("placement=round-robin") == (
        "engine[placement=round-robin]", ["--placement", "round-robin"])
    label, flags = parse_engine_config(" policy=priority , shed_queue_time=0.5 ")
    assert label == "engine[policy=priority,shed_queue_time=0.5]"
    assert flags == ["--policy", "priority", "--shed-queue-time", "0.5"]
    assert parse_engine_config("default") == ("engine", [])
    assert parse_engine_config("") == ("engine", [])
    for bad in ("placement", "=x", "placement=", "no-such-flag=1"):
        with pytest.raises(ValueError, match="--engine-configs"):
            parse_engine_config(bad)


def test_vllm_gets_priorities_negated_only_with_priority_scheduling():
    assert vllm_priority_mode([]) == "omit"
    assert vllm_priority_mode(["--scheduling-policy", "priority"]) == "negate"
    assert vllm_priority_mode(["--scheduling-policy=priority"]) == "negate"
    assert vllm_priority_mode(["--scheduling-policy", "priority",
                               "--scheduling-policy", "fcfs"]) == "omit"  # the last one wins
    assert vllm_priority_mode([], "as-is") == "as-is"


def test_thread_binding_matches_the_engines_threads():
    assert omp_bind("matched", 1, 1, cpus=[0, 1]) == "0"
    assert omp_bind("matched", 2, 1, cpus=[0, 1]) == "0|1"
    assert omp_bind("matched", 1, None, cpus=[0, 1]) == "0,1"  # the engine's default share
    assert omp_bind("matched", 2, None, cpus=[2, 3, 4, 5]) == "2,3|4,5"
    assert omp_bind("matched", 3, 1, cpus=[0, 1]) is None  # not enough CPUs: vLLM decides
    assert omp_bind("auto", 2, 1, cpus=[0, 1]) is None
    assert omp_bind("0-1", 1, 1, cpus=[0, 1]) == "0-1"


def test_specs_give_both_servers_the_same_workers_kv_and_limits():
    args = build_parser().parse_args([
        "-o", "x", "--workers", "2", "--kv-cache-gib", "2", "--max-num-seqs", "8",
        "--engine-configs", "placement=cache-aware", "placement=round-robin",
        "--vllm-args", "--scheduling-policy priority", "--engine-args", "--policy fcfs"])
    specs = build_specs(args)
    assert [(s.label, mode) for s, mode in specs] == [
        ("engine[placement=cache-aware]", "as-is"), ("engine[placement=round-robin]", "as-is"),
        ("vllm", "negate")]
    engine_cmd = specs[1][0].command(None)
    for flag, value in (("--workers", "2"), ("--kv-cache-memory", "2"), ("--max-num-seqs", "8"),
                        ("--num-threads", "1"), ("--placement", "round-robin"),
                        ("--http-port", "0")):
        assert engine_cmd[engine_cmd.index(flag) + 1] == value
    assert engine_cmd[-2:] == ["--policy", "fcfs"]  # passthrough last: it wins
    vllm = specs[2][0]
    cmd = vllm.command(8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--data-parallel-size", "2"), ("--max-num-seqs", "8"), ("--port", "8123"),
                        ("--scheduling-policy", "priority")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prompt-tokens-details" in cmd
    env = vllm.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    if len(os.sched_getaffinity(0)) >= 2:
        assert env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1


def test_bad_flags_fail_before_anything_starts(tmp_path: Path):
    with pytest.raises(ValueError, match="whole GiB"):
        vllm_kv_space(0.5)
    args = build_parser().parse_args(["-o", "x", "--kv-cache-gib", "0.5"])
    with pytest.raises(ValueError, match="whole GiB"):
        build_specs(args)
    args = build_parser().parse_args(["-o", "x", "--servers", "engine,sglang"])
    with pytest.raises(ValueError, match="--servers"):
        build_specs(args)
    assert compare.main(["-o", str(tmp_path / "out"), "--servers", "tgi"]) == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- workloads


def test_prefix_hit_ceiling_of_shared_prefix_is_one_minus_one_over_r_of_system_tokens():
    cfg = WorkloadConfig("shared-prefix", rate=10, groups=4, per_group=8, system_len=256,
                         question_len=16, output_len=4, vocab_size=4096)
    requests = list(make_workload(cfg).requests())
    ceiling = prefix_hit_ceiling(requests)
    assert ceiling == pytest.approx((1 - 1 / 8) * 256 / 272, abs=0.002)
    assert prefix_hit_ceiling(list(make_workload(WorkloadConfig(
        "chat-short", rate=10, num_requests=50)).requests())) < 0.01


def test_shifted_prompts_keep_the_structure_but_share_nothing_with_the_original():
    cfg = WorkloadConfig("shared-prefix", rate=10, groups=3, per_group=4, system_len=64,
                         question_len=8, output_len=4, vocab_size=512)
    requests = list(make_workload(cfg).requests())
    shifted = shift_prompts(requests, 1, 512)
    assert shift_prompts(requests, 0, 512) == requests
    assert [len(r.prompt_token_ids) for r in shifted] == [len(r.prompt_token_ids)
                                                          for r in requests]
    assert [r.arrival_time for r in shifted] == [r.arrival_time for r in requests]
    assert prefix_hit_ceiling(shifted) == pytest.approx(prefix_hit_ceiling(requests))
    assert prefix_hit_ceiling(requests + shifted) == pytest.approx(
        prefix_hit_ceiling(requests), abs=0.01)  # the second half hits nothing of the first
    warm = warmup_requests(requests, 3)
    assert {r.prompt_token_ids[0] for r in warm}.isdisjoint(
        {r.prompt_token_ids[0] for r in requests})


def test_max_duration_keeps_the_leading_requests_and_their_later_turns():
    cfg = WorkloadConfig("multi-turn", rate=2, duration=10, turns=3, scale=16)
    requests = list(make_workload(cfg).requests())
    kept = truncate(requests, 3.0)
    heads = [r for r in kept if not r.after]
    assert heads and all(r.arrival_time < 3.0 for r in heads)
    assert len(heads) == sum(1 for r in requests if not r.after and r.arrival_time < 3.0)
    ids = {r.request_id for r in kept}
    assert all(r.after in ids for r in kept if r.after)
    assert len(kept) > len(heads)  # later turns come along
    assert truncate(requests, None) == requests


# ----------------------------------------------------------------------------- tables


def _record(rid: str, priority: int, ttft: float, *, outcome: str = COMPLETED,
            tokens: int = 5, cached: int | None = 2) -> RequestRecord:
    rec = RequestRecord(rid, priority, 0.0, outcome=outcome, status=200)
    if outcome == COMPLETED:
        rec.num_prompt_tokens, rec.num_output_tokens, rec.num_cached_tokens = 10, tokens, cached
        rec.token_times_s = [ttft + 0.01 * i for i in range(tokens)]
    else:
        rec.status, rec.retry_after_s = 429, 1.0
    return rec


def _result(label: str, rate: float, ttft: float, *, shed: int = 0) -> dict:
    records = [_record(f"c{i}", 1, ttft) for i in range(4)]
    records += [_record(f"s{i}", -1, 2 * ttft) for i in range(4 - shed)]
    records += [_record(f"x{i}", -1, 0, outcome=RATE_LIMITED) for i in range(shed)]
    return {"label": label, "request_rate": rate, "workload_file": "w.jsonl",
            "prefix_hit_ceiling": 0.25, "loadavg_1min_before": 1.5,
            **summarize(records, 2.0, {})}


def test_tables_put_servers_side_by_side_with_ratios_and_priority_classes():
    results = [_result("engine", 2.0, 0.010), _result("engine", 8.0, 0.020, shed=2),
               _result("vllm", 2.0, 0.020), _result("vllm", 8.0, 0.080)]
    text = format_tables(results, title="priority-mix", notes=["2-core shared CPU machine"])
    lines = text.splitlines()
    assert lines[0] == "## priority-mix" and "- 2-core shared CPU machine" in lines
    rows = [line for line in lines if line.startswith("| `")]
    main = [r.split(" | ") for r in rows[:4]]
    assert [(c[0], c[1], c[2], c[3]) for c in main] == [
        ("| `engine`", "2", "8/8", "0"), ("| `engine`", "8", "6/8", "2"),
        ("| `vllm`", "2", "8/8", "0"), ("| `vllm`", "8", "8/8", "0")]
    assert "TTFT p50" in lines[lines.index(rows[0]) - 2]
    # 2 cached of 10 prompt tokens, against a ceiling of 25%
    assert "20.0% (80% of 25.0%)" in rows[0]
    # ratios: vllm / engine at the same rate
    ratio_rows = [r for r in rows if r.count("x |") >= 3]
    assert len(ratio_rows) == 2 and all(r.startswith("| `vllm`") for r in ratio_rows)
    assert "| 2.00x |" in ratio_rows[0]  # TTFT p50 doubled at rate 2
    # per class: critical and sheddable for each run, TTFT p99 against the lowest rate's
    classes = [r.split(" | ") for r in rows if "| critical |" in r or "| sheddable |" in r]
    assert len(classes) == 8
    engine_shed_8 = next(c for c in classes if c[0] == "| `engine`" and c[1] == "8"
                         and c[2] == "sheddable")
    assert engine_shed_8[3:6] == ["2/4", "2", "50%"]
    vllm_crit_8 = next(c for c in classes if c[0] == "| `vllm`" and c[1] == "8"
                       and c[2] == "critical")
    assert vllm_crit_8[10] == "4.00x"
    json.dumps(results)  # the results stay plain JSON


def test_one_server_has_no_ratio_table_and_unreported_hits_say_so():
    r = _result("engine", 4.0, 0.01)
    r["prefix_hit_rate"] = None
    r["per_priority"] = {"normal": r["per_priority"]["critical"]}
    text = format_tables([r])
    assert "Ratios" not in text and "Per priority class" not in text
    assert "not reported" in text


# ----------------------------------------------------------------------------- a real run


def _descendants(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-e"], capture_output=True,
                         text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        p, pp, *args = line.split(None, 2)
        children.setdefault(int(pp), []).append((int(p), args[0] if args else ""))
    found, todo = [], [pid]
    while todo:
        for child, args in children.get(todo.pop(), []):
            if not args.startswith("ps "):
                found.append(f"{child} {args}")
                todo.append(child)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_real_run_against_the_engine_writes_the_table_and_leaves_no_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    started: list[Server] = []

    class Recorded(Server):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(compare, "Server", Recorded)
    before = _descendants(os.getpid())
    out = tmp_path / "out"
    code = compare.main([
        "--servers", "engine", "--workload", "chat-short", "--num-requests", "6",
        "--rate", "4", "--duration", "10", "--scale", "16", "--rates", "6", "inf",
        "--warmup", "2", "--no-progress", "-o", str(out)])
    assert code == 0

    assert len(started) == 1 and started[0].sid is not None
    assert session_processes(started[0].sid) == []
    assert _descendants(os.getpid()) == before

    text = (out / "compare.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "lengths scaled by 1/16" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `engine`")]
    assert [(r[1], r[2], r[4], r[5]) for r in rows] == [("6", "6/6", "0", "0"),
                                                        ("inf", "6/6", "0", "0")]
    results = sorted((out / "results").glob("*.json"))
    assert [p.name for p in results] == ["engine@6.json", "engine@inf.json"]
    result = json.loads(results[0].read_text())
    assert result["num_completed"] == 6 and result["server"]["kind"] == "engine"
    assert result["request_rate"] == pytest.approx(6.0)
    assert (out / "workload.jsonl").exists() and (out / "logs" / "engine.log").exists()
    assert (out / "plots" / "latency_cdf.png").exists()


def test_a_server_that_cannot_start_is_reported_and_cleaned_up(tmp_path: Path):
    spec = ServerSpec("engine", "broken", model=str(tmp_path / "no-model"),
                      served_model_name="x")
    server = Server(spec, tmp_path / "broken.log", ready_timeout_s=60)
    with pytest.raises(RuntimeError, match="broken: exited"):
        server.start()
    assert server.sid is not None and session_processes(server.sid) == []
