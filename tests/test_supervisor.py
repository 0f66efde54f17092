"""The supervisor (engine/supervisor.py) with real child processes: stdlib functions as
targets (``os:_exit`` crashes at start, ``time:sleep`` runs), so no engine is needed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from fakes import wait_stopped

from engine.supervisor import (
    ChildExited,
    ProcessSpec,
    RestartPolicy,
    RestartStorm,
    Supervisor,
)

CRASH = ProcessSpec("crasher", "os:_exit", (3,), restart=True)


class Recording(Supervisor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spawned: list[tuple[str, int, float]] = []

    def spawn(self, spec, incarnation=0):
        self.spawned.append((spec.name, incarnation, time.monotonic()))
        return super().spawn(spec, incarnation)


def _run_until(sup: Supervisor, timeout: float) -> BaseException | None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sup.check()
            time.sleep(0.01)
    except Exception as e:
        return e
    finally:
        sup.shutdown(grace_s=2)
    return None


def test_policy_backs_off_exponentially_and_resets_with_the_window():
    policy = RestartPolicy(max_restarts=10, window_s=60, backoff_s=0.5, max_backoff_s=8)
    assert [policy.delay(n) for n in range(1, 8)] == [0, 0.5, 1, 2, 4, 8, 8]


def test_a_child_that_keeps_crashing_at_start_backs_off_then_stops_the_engine():
    deaths = []
    sup = Recording(RestartPolicy(max_restarts=4, window_s=30, backoff_s=0.2, max_backoff_s=1),
                    on_restart=lambda child, inc: deaths.append((child.incarnation, inc)))
    sup.spawn(CRASH)
    err = _run_until(sup, timeout=20)
    assert isinstance(err, RestartStorm), err
    assert "crasher exited with code 3: 4 failures within 30s" in str(err)
    assert "--max-restarts 4" in str(err) and "--restart-window 30" in str(err)
    assert [inc for _, inc, _ in sup.spawned] == [0, 1, 2, 3]
    assert deaths == [(0, 1), (1, 2), (2, 3)]  # told before each restart, not at the storm
    gaps = [b[2] - a[2] for a, b in zip(sup.spawned, sup.spawned[1:], strict=False)]
    # Each gap is the crash (a Python start-up) plus the backoff: none, 0.2 s, 0.4 s.
    assert gaps[1] - gaps[0] > 0.1 and gaps[2] - gaps[1] > 0.1, gaps
    assert gaps[2] >= 0.4


def test_failures_outside_the_window_do_not_count():
    sup = Recording(RestartPolicy(max_restarts=2, window_s=0.01, backoff_s=0.01))
    sup.spawn(CRASH)
    assert _run_until(sup, timeout=1.5) is None  # never two failures within 10 ms
    assert len(sup.spawned) >= 3


def test_a_group_restarts_as_one_and_other_children_are_fatal():
    sup = Recording(RestartPolicy(max_restarts=5, window_s=30))
    sleeper = sup.spawn(ProcessSpec("rank1", "time:sleep", (30,), restart=True, group="g"))
    sup.spawn(ProcessSpec("rank0", "os:_exit", (1,), restart=True, group="g"))
    deadline = time.monotonic() + 10
    while len(sup.spawned) < 4 and time.monotonic() < deadline:
        sup.check()
        time.sleep(0.01)
    assert [(n, i) for n, i, _ in sup.spawned[2:4]] == [("rank1", 1), ("rank0", 1)]
    assert sleeper.proc.returncode is not None, "the live rank was not restarted with it"
    sup.shutdown(grace_s=2)

    sup = Supervisor()
    sup.spawn(ProcessSpec("pool-0", "os:_exit", (7,)))
    with pytest.raises(ChildExited, match="pool-0 exited with code 7"):
        _wait_raise(sup)
    sup = Supervisor()
    sup.spawn(ProcessSpec("w", "os:_exit", (0,), restart=True, done_on_clean_exit=True))
    deadline = time.monotonic() + 10
    while not sup.done and time.monotonic() < deadline:
        sup.check()
        time.sleep(0.01)
    assert sup.done and sup.exit_code("w") == 0


def _wait_raise(sup: Supervisor) -> None:
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            sup.check()
            time.sleep(0.01)
    finally:
        sup.shutdown(grace_s=2)


def test_shutdown_terminates_then_kills():
    sup = Supervisor()
    child = sup.spawn(ProcessSpec("s", "time:sleep", (30,)))
    time.sleep(0.5)
    sup.shutdown(grace_s=5)
    assert child.proc.returncode is not None and sup.exit_code("s") is not None


def test_children_a_dead_pool_left_paused_are_continued_and_can_stop():
    """A pool pauses workers (SIGSTOP) while a critical step runs (engine/pool/suspend.py);
    if it dies then, the launcher continues them (``resume_all``), and shutdown continues
    what it terminates (a stopped process acts on SIGTERM only once continued)."""
    sup = Supervisor()
    child = sup.spawn(ProcessSpec("s", "time:sleep", (30,)))
    time.sleep(0.3)
    child.proc.send_signal(signal.SIGSTOP)
    wait_stopped(child.pid, stopped=True)
    sup.resume_all()
    wait_stopped(child.pid, stopped=False)
    child.proc.send_signal(signal.SIGSTOP)
    start = time.monotonic()
    sup.shutdown(grace_s=10)
    assert child.proc.returncode is not None and time.monotonic() - start < 5


def test_launcher_does_not_load_the_frontend_stack():
    code = ("import sys, engine.launch, engine.torchrun\n"
            "bad = [m for m in ('fastapi', 'grpc', 'uvicorn', 'torch', 'vllm') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_launcher_restarts_pools_except_under_torchrun() -> None:
    """A pool's spec restarts it alone (its workers live on and register with the new one);
    under torchrun its TCP port was handed out once, so its death stays fatal there. The
    frontend restarts everywhere (it talks to the pools over ipc://), told its incarnation."""
    from engine.config import EngineConfig
    from engine.ipc import CurveKeys
    from engine.launch import process_specs
    from engine.topology import Topology

    cfg = EngineConfig()
    local = {s.name: s for s in process_specs(cfg, Topology.local(cfg, num_gpus=0), "/run")}
    assert local["pool-0"].restart and local["pool-0"].group_key == "pool-0"
    assert local["worker-0-0"].restart
    assert local["frontend"].restart and local["frontend"].pass_incarnation
    torchrun = Topology.torchrun(cfg, CurveKeys.generate())
    ranks = {s.name: s for s in process_specs(cfg, torchrun, "/run")}
    assert not ranks["pool-0"].restart and ranks["frontend"].restart


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_children_wait_passively_in_openmp_unless_told(tmp_path, monkeypatch, given, seen):
    """A worker's idle OpenMP threads must not spin on the cores the frontend and the pool
    need (engine/child.py); an explicit OMP_WAIT_POLICY in the environment wins."""
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    out = tmp_path / "policy"
    sup = Supervisor()
    child = sup.spawn(ProcessSpec("env", "os:system", (f'echo "$OMP_WAIT_POLICY" > {out}',)))
    assert child.proc.wait(timeout=30) == 0
    assert out.read_text().strip() == seen
