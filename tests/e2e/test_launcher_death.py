"""SIGKILL of the launcher (issue 14): every process of its group is gone within 5 s, the
frontend included (the parent-death signal is set by ``engine.child`` for every child), and
no multiprocessing resource tracker is left (the supervisor starts none)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from e2e.engine_proc import alive, children, launched

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _group(pgid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True,
                         text=True).stdout
    rows = {}
    for line in out.splitlines():
        pid, group, *args = line.split(None, 2)
        if int(group) == pgid:
            rows[int(pid)] = args[0] if args else ""
    return rows


def test_sigkill_of_the_launcher_leaves_no_process_of_its_group() -> None:
    with launched("--workers", "2", "--num-kv-blocks", "16", "--num-threads", "1") as (proc, _):
        names = sorted(args for _, args in children(proc.pid))
        assert names == ["engine-frontend", "engine-pool-0", "engine-worker-0-0",
                         "engine-worker-0-1"], names
        group = _group(proc.pid)  # launched() starts a session: pgid == the launcher's pid
        assert len(group) >= 5, group
        assert not [a for a in group.values() if "resource_tracker" in a], group
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        deadline = time.time() + 5
        while time.time() < deadline and any(alive(p) for p in group):
            time.sleep(0.1)
        left = {p: a for p, a in group.items() if alive(p)}
        assert not left, f"outlived the launcher by 5 s: {left}"
