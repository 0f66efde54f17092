"""Decision recording and replay: a run with preemptions, aborts, prefix hits and a worker
that dies and comes back replays plan for plan; a changed policy, a tampered plan, a torn
file and a second pool incarnation are reported as documented."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest
from fakes import FakeWorker, make_request

from engine import ipc
from engine.cli import build_parser, config_from_args
from engine.config import SchedulerConfig
from engine.messages import StepPlan, StepResult
from engine.scheduler import record
from engine.scheduler.record import Header, RecordingScheduler, Schedule, Update, read_segments
from engine.sim.__main__ import main as sim_main
from engine.sim.replay import replay

PREFIX = tuple(range(500, 516))  # four blocks of 4 tokens shared by half the requests


def recorded_run(path: str, policy: str = "priority", run_id: str = "run",
                 wire: bool = False) -> RecordingScheduler:
    """Two workers with 24 blocks each, 14 requests (priorities, a shared prefix), one abort,
    worker 1 dying at tick 12 and coming back (incarnation 1) at tick 20. ``wire``: plans and
    results go over the wire as in the pool (``wire_step``)."""
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, policy=policy)
    sched = RecordingScheduler(path, cfg, block_size=4, max_model_len=256, run_id=run_id)
    workers = {w: FakeWorker(w, 24, 4) for w in (0, 1)}
    for w in workers:
        sched.add_worker(w, 24, 0.0)
    arrivals = {tick: [make_request(f"r{tick}-{i}", prompt_len=6 + 3 * i, max_tokens=12,
                                    priority=(tick + i) % 3 - 1, arrival=tick * 0.01,
                                    seed=tick * 10 + i, prefix=PREFIX if i % 2 else ())
                       for i in range(2)]
                for tick in range(0, 14, 2)}
    for tick in range(400):
        now = tick * 0.01
        for req in arrivals.get(tick, ()):
            sched.add(req, now)
        if tick == 5:
            sched.abort(["r2-0", "nope"], now)
        if tick == 12:
            sched.remove_worker(1, now)
            del workers[1]
        if tick == 20:
            workers[1] = FakeWorker(1, 24, 4, incarnation=1)
            sched.add_worker(1, 24, now, incarnation=1)
        for w, worker in workers.items():
            plan = sched.schedule(w, now)
            if plan is not None:
                result = wire_step(sched, worker, plan) if wire else worker.step(plan)
                sched.update(plan, result, now + 0.005)
            sched.check_integrity()
        sched.drain_outputs()
        if tick > 20 and sched.num_unfinished == 0:
            break
    assert sched.num_unfinished == 0
    sched.close()
    return sched


def wire_step(sched: RecordingScheduler, worker: FakeWorker, plan: StepPlan,
              logprobs: bool = False) -> StepResult:
    """What the pool does: send the plan's bytes (``plan_bytes``), decode the worker's result
    off the wire and tell the recording the bytes it came in (``received``)."""
    sent = ipc.POOL_TO_WORKER.decode(record.plan_encoder(sched, ipc.encode)(plan))
    assert sent == plan
    result = worker.step(sent)
    if logprobs:
        result.logprobs = [-0.5] * len(result.token_ids)
    data = ipc.encode(result)
    decoded = ipc.WORKER_TO_POOL.decode(data)
    assert isinstance(decoded, StepResult)
    tap = record.result_tap(sched)
    assert tap is not None
    tap(decoded, memoryview(data))
    return decoded


@pytest.fixture()
def recording(tmp_path):
    path = str(tmp_path / "decisions.rec")
    sched = recorded_run(path)
    stats = sched.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0  # the run has them
    return path


def test_replay_is_identical(recording, capsys):
    segments = read_segments(recording)
    assert len(segments) == 1
    kinds = {type(f).__name__ for f in segments[0]}
    assert kinds >= {"Header", "Add", "Abort", "AddWorker", "RemoveWorker", "Schedule", "Update"}
    report = replay(segments, check=True)
    num_plans = sum(isinstance(f, Schedule) for f in segments[0])
    assert report.divergence is None and report.num_plans == num_plans > 20
    assert sim_main(["--replay", recording]) == 0
    assert f"{num_plans} plans identical" in capsys.readouterr().out


def test_the_wire_tap_records_what_encoding_would(recording, tmp_path):
    """The pool's recording keeps the plan bytes it sends and the result bytes it receives:
    the file is byte for byte the one the in-process path (encoding everything) writes, and
    the plans sent are the plans made."""
    tapped = str(tmp_path / "tapped.rec")
    recorded_run(tapped, wire=True)
    with open(recording, "rb") as a, open(tapped, "rb") as b:
        assert a.read() == b.read()
    assert replay(read_segments(tapped), check=True).divergence is None


def test_the_recording_keeps_the_bytes_received(tmp_path):
    """``update`` records the bytes ``received`` names, not an encoding of its own (here the
    bytes carry another ``execute_time_s`` than the object, which a re-encoding would lose),
    and ``plan_bytes`` hands out the bytes recorded."""
    path = str(tmp_path / "rx.rec")
    sched = RecordingScheduler(path, SchedulerConfig(), block_size=4, max_model_len=256)
    sched.add_worker(0, 16, 0.0)
    sched.add(make_request("a", prompt_len=5, max_tokens=3), 0.0)
    plan = sched.schedule(0, 1.0)
    assert plan is not None
    sent = sched.plan_bytes(plan)
    assert sent is sched.plan_bytes(plan) and ipc.POOL_TO_WORKER.decode(sent) == plan
    result = FakeWorker(0, 16, 4).step(plan)
    sched.received(result, ipc.encode(msgspec.structs.replace(result, execute_time_s=0.25)))
    sched.update(plan, result, 1.5)
    sched.close()
    frames = read_segments(path)[0]
    assert isinstance(frames[-2], Schedule) and frames[-2].plan == plan
    assert isinstance(frames[-1], Update) and frames[-1].result.execute_time_s == 0.25


def test_the_wire_tap_drops_logprobs(tmp_path):
    path = str(tmp_path / "lp.rec")
    sched = RecordingScheduler(path, SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4),
                               block_size=4, max_model_len=256)
    worker = FakeWorker(0, 16, 4)
    sched.add_worker(0, 16, 0.0)
    sched.add(make_request("a", prompt_len=5, max_tokens=3), 0.0)
    while sched.num_unfinished:
        plan = sched.schedule(0, 1.0)
        assert plan is not None
        sched.update(plan, wire_step(sched, worker, plan, logprobs=True), 1.0)
    sched.close()
    updates = [f for f in read_segments(path)[0] if isinstance(f, Update)]
    assert len(updates) == 3 and all(u.result.logprobs is None and u.result.token_ids
                                     for u in updates)
    assert replay(read_segments(path)).divergence is None


def test_a_format_1_recording_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "old.rec"
    header = msgspec.msgpack.encode(Header(format=1, protocol_version=7, scheduler={},
                                           block_size=4, max_model_len=256))
    path.write_bytes(len(header).to_bytes(4, "little") + header)
    assert sim_main(["--replay", str(path)]) == 2
    assert f"recording format 1, this engine reads {record.FORMAT_VERSION}" in \
        capsys.readouterr().err


def test_changed_policy_reports_the_first_divergence(recording, capsys):
    report = replay(read_segments(recording), policy="fcfs")
    assert report.changed and report.divergence is not None
    assert report.divergence.differences
    assert sim_main(["--replay", recording, "--policy", "fcfs"]) == 0  # a change: no failure
    out = capsys.readouterr().out
    assert "first divergence: segment 1, plan" in out and "changed from the recording" in out


def test_a_tampered_plan_fails_the_replay(recording, tmp_path, capsys):
    segments = read_segments(recording)
    frames = segments[0]
    index = next(i for i, f in enumerate(frames)
                 if isinstance(f, Schedule) and f.plan is not None and f.plan.cached_requests
                 and f.plan.step_id > 5)
    frame = frames[index]
    assert isinstance(frame, Schedule) and frame.plan is not None
    cached = frame.plan.cached_requests
    tampered = msgspec.structs.replace(frame.plan, cached_requests=[
        msgspec.structs.replace(cached[0], num_scheduled_tokens=cached[0].num_scheduled_tokens + 1),
        *cached[1:]])
    frames[index] = msgspec.structs.replace(frame, plan=tampered)
    bad = str(tmp_path / "bad.rec")
    write(bad, frames)
    assert sim_main(["--replay", bad]) == 1
    out = capsys.readouterr().out
    rid = cached[0].request_id
    assert f"step {frame.plan.step_id}, worker {frame.worker_id}" in out
    assert "running requests: recorded [" in out and rid in out
    # The recorded policy named explicitly is no change: still a failure.
    policy = frames[0].scheduler["policy"]  # type: ignore[union-attr]
    assert sim_main(["--replay", bad, "--policy", policy]) == 1


def write(path: str, frames) -> None:
    rec = record.Recorder(path, frames[0])
    for f in frames[1:]:
        rec.emit(f)
    rec.close()


def test_torn_tail_and_segments(tmp_path, capsys):
    path = str(tmp_path / "d.rec")
    recorded_run(path, run_id="launch-1")
    size = os.path.getsize(path)
    recorded_run(path, run_id="launch-1")  # the pool restarted in the same launch: appended
    assert [len(s) > 1 for s in read_segments(path)] == [True, True]
    assert replay(read_segments(path)).num_segments == 2
    recorded_run(path, run_id="launch-2")  # a new launch: overwritten
    assert os.path.getsize(path) == size
    with open(path, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x93")  # a frame cut short by a kill
    assert replay(read_segments(path)).divergence is None
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x02\x00\x00\x00\xc1\xc1")
    assert sim_main(["--replay", str(junk)]) == 2
    assert "not a decision recording" in capsys.readouterr().err


def test_replay_does_not_depend_on_string_hashing(tmp_path):
    """Salted requests hash their blocks with str hashing (randomized per process): a replay
    in a process with another hash seed must make the same plans."""
    path = str(tmp_path / "salted.rec")
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4)
    sched = RecordingScheduler(path, cfg, block_size=4, max_model_len=256)
    worker = FakeWorker(0, 16, 4)
    sched.add_worker(0, 16, 0.0)
    for i in range(8):
        sched.add(make_request(f"s{i}", prompt_len=4, prefix=PREFIX, salt=f"tenant{i % 2}",
                               seed=i), 0.0)
    while sched.num_unfinished:
        plan = sched.schedule(0, 1.0)
        assert plan is not None
        sched.update(plan, worker.step(plan), 1.0)
    sched.close()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-m", "engine.sim", "--replay", path], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plans identical" in out.stdout


def test_flag_is_an_engine_option(tmp_path):
    cfg = config_from_args(["--record-decisions", "rel/d.rec"])
    assert "--record-decisions" in build_parser().format_help()
    assert cfg.scheduler.record_decisions == os.path.abspath("rel/d.rec")
    assert record.pool_record_path("/x/d.rec", 1, 2) == "/x/d.rec.1"
    assert record.pool_record_path("/x/d.rec", 0, 1) == "/x/d.rec"
    header = read_segments(recorded_path(tmp_path))[0][0]
    assert isinstance(header, Header) and "record_decisions" not in header.scheduler


def recorded_path(tmp_path) -> str:
    path = str(tmp_path / "h.rec")
    recorded_run(path)
    return path


def test_a_failing_disk_stops_the_recording_not_the_scheduler(tmp_path, monkeypatch, caplog):
    """The writer thread's failure is logged once; appending, flushing and closing go on
    without blocking, however many batches follow."""
    rec = record.Recorder(str(tmp_path / "f.rec"), Header(
        format=record.FORMAT_VERSION, protocol_version=7, scheduler={}, block_size=4,
        max_model_len=256))

    def full(data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rec._file, "write", full)
    for i in range(record.FLUSH_FRAMES * (record.QUEUE_BATCHES + 2)):
        rec.emit(record.Abort(now=float(i), request_ids=["x"]))
    rec.flush()
    rec.close()
    assert isinstance(rec.failed, OSError)
    assert sum("recording stops" in r.message for r in caplog.records) == 1
