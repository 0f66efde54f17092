"""Suspending workers whose step holds only outranked work, while a critical prompt's step
runs on a worker that shares their CPU cores (``priority``'s exclusive prefill across
workers, where ``--workers-share-cores`` is yes).

The scheduler already keeps new outranked steps off the other workers while such a step runs
(``Policy.exclusive_prefill_across_workers``); a step already in flight there ran on, and on
the 2-core machine it took half the cores the critical step needed: under the flood a
74-token critical prompt's step ran 10-13 ms against 6-7 alone (docs/benchmarks.md, "Flood",
ninth pass). The kernel cannot tell the two steps apart (both workers run under
``SCHED_IDLE``); the pool can, since it planned both. So it stops the outranked step's
worker process (``SIGSTOP``) when it sends the critical step, and continues it (``SIGCONT``)
when that step's result or failure is in, or its worker is gone. A paused step loses
nothing: it resumes where it stopped.

Signals go through pidfds (``os.pidfd_open``), never a bare pid: a pidfd names the process
the worker was when it registered, so a worker that died and whose pid was reused by another
process is never signalled. Only workers on this host say their pid (those that dial the
pool's ``ipc://`` socket); without pidfds (not Linux) nothing is suspended. A worker left
stopped by a pool that died is continued by the launcher (``Supervisor.resume_all``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

log = logging.getLogger(__name__)


def can_suspend() -> bool:
    """Whether this OS offers what suspension needs (pidfds: Linux 5.3+)."""
    return hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class Suspender:
    """The pool's pidfds of its local workers, and which are stopped on whose behalf."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and can_suspend()
        self._pidfds: dict[int, int] = {}  # worker id -> pidfd
        self._held: dict[int, list[int]] = {}  # holder worker id -> workers it stopped
        self.num_suspended = 0  # cumulative, for tests and logs

    def register(self, worker_id: int, pid: int) -> None:
        """Worker ``worker_id`` (a new incarnation, or its first) runs as process ``pid`` on
        this host (0: unknown or remote, never suspended)."""
        self.forget(worker_id)
        if not self.enabled or pid <= 0:
            return
        try:
            self._pidfds[worker_id] = os.pidfd_open(pid)
        except OSError as e:  # gone already, or pidfds refused (a sandbox): not suspended
            log.info("worker %d (pid %d) will not be suspended: %s", worker_id, pid, e)

    def forget(self, worker_id: int) -> None:
        """Worker ``worker_id`` is gone (or replaced): continue what it held, drop its pidfd."""
        self.resume(worker_id)
        for stopped in self._held.values():
            if worker_id in stopped:
                stopped.remove(worker_id)
        fd = self._pidfds.pop(worker_id, None)
        if fd is not None:
            os.close(fd)

    def suspend(self, holder: int, workers: list[int]) -> None:
        """Stop ``workers`` until ``holder``'s step ends (``resume(holder)``)."""
        stopped = self._held.setdefault(holder, [])
        for w in workers:
            if w in stopped or w not in self._pidfds or w == holder:
                continue
            if self.is_suspended(w) or self._signal(w, signal.SIGSTOP):
                stopped.append(w)
                self.num_suspended += 1

    def is_suspended(self, worker_id: int) -> bool:
        return any(worker_id in stopped for stopped in self._held.values())

    def resume(self, holder: int) -> None:
        """``holder``'s step ended: continue the workers it stopped (those no other holder
        stopped as well)."""
        for w in self._held.pop(holder, ()):
            if not self.is_suspended(w):
                self._signal(w, signal.SIGCONT)

    def resume_all(self) -> None:
        for holder in list(self._held):
            self.resume(holder)

    def close(self) -> None:
        if self.num_suspended:
            log.info("paused a worker's outranked step %d times", self.num_suspended)
        self.resume_all()
        for w in list(self._pidfds):
            self.forget(w)

    def _signal(self, worker_id: int, sig: signal.Signals) -> bool:
        with contextlib.suppress(ProcessLookupError):  # it died: its WorkerDied is coming
            signal.pidfd_send_signal(self._pidfds[worker_id], sig)
            return True
        return False
