"""One supervisor for every process the engine starts: spawn, restart policy, shutdown.

Both entry points use it: ``python -m engine.launch`` (pools, workers, frontend) and each
torchrun rank (``engine/torchrun.py``: its worker, and on rank 0 the control plane).

- **Spawn.** A child is ``python -m engine.child`` with its ``ProcessSpec`` (a target named
  ``"module:function"`` and its arguments) pickled on stdin. The child sets the parent-death
  signal first (``PR_SET_PDEATHSIG`` = SIGKILL, checked against the supervisor's pid for the
  race where the parent died first), then imports only its target's module: the frontend
  stack (fastapi, grpc) is loaded by the frontend process alone, and no multiprocessing
  resource tracker is started (nothing of ``multiprocessing`` is used), so a SIGKILLed
  launcher leaves nothing behind.
- **Restart policy.** A child whose spec says ``restart`` is restarted when it exits
  (code 0 means "done" where ``done_on_clean_exit``), together with the rest of its
  ``group`` (a tensor-parallel group cannot go on with one rank gone). The first failure
  in a window restarts at once; each further one waits twice as long as the last
  (``RestartPolicy.backoff_s`` up to ``max_backoff_s``), so a process that keeps crashing
  at start does not spin. ``max_restarts`` failures of one group within ``window_s``
  seconds is a restart storm: ``RestartStorm`` says why and the engine exits non-zero. A
  child without ``restart`` that exits ends the engine (``ChildExited``).
- **Shutdown.** SIGTERM to every child in the order given, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("engine.supervisor")

SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True)
class RestartPolicy:
    """``max_restarts`` failures within ``window_s`` seconds stop the engine
    (``--max-restarts``, ``--restart-window``)."""

    max_restarts: int = 10
    window_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, recent_failures: int) -> float:
        """Wait before the restart that follows ``recent_failures`` failures in the window:
        none after the first, then ``backoff_s``, doubling up to ``max_backoff_s``."""
        if recent_failures <= 1:
            return 0.0
        return float(min(self.max_backoff_s, self.backoff_s * 2.0 ** (recent_failures - 2)))


@dataclass(frozen=True)
class ProcessSpec:
    """One child. ``target(*args, **kwargs)`` runs in it; with ``pass_incarnation`` it also
    gets ``incarnation=`` (0, then 1, 2, ... per restart)."""

    name: str
    target: str  # "package.module:function", imported in the child only
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    restart: bool = False
    group: str = ""  # restarted as one with every child of the same group ("": itself)
    done_on_clean_exit: bool = False  # exit code 0: finished, not restarted
    pass_incarnation: bool = False

    @property
    def group_key(self) -> str:
        return self.group or self.name


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    incarnation: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()


class SupervisorError(RuntimeError):
    """The engine must stop; the message says why."""


class ChildExited(SupervisorError):
    pass


class RestartStorm(SupervisorError):
    pass


#: ``on_restart(dead, incarnation)``: a restartable child exited with a failure and its
#: group is about to restart (the launcher tells the pool, a torchrun rank the launcher).
OnRestart = Callable[[Child, int], None]


class Supervisor:
    def __init__(self, policy: RestartPolicy | None = None,
                 on_restart: OnRestart | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.on_restart = on_restart
        self.children: dict[str, Child] = {}
        self.finished: dict[str, int] = {}  # done_on_clean_exit children that ended
        self.exit_codes: dict[str, int] = {}  # children stopped by shutdown()
        self.failures: dict[str, deque[float]] = {}  # group -> failure times in the window
        self.pending: dict[str, tuple[float, list[ProcessSpec], int]] = {}  # restarts due

    # ------------------------------------------------------------------ spawn

    def spawn(self, spec: ProcessSpec, incarnation: int = 0) -> Child:
        kwargs = dict(spec.kwargs)
        if spec.pass_incarnation:
            kwargs["incarnation"] = incarnation
        payload = pickle.dumps((spec.target, spec.args, kwargs, os.getpid()))
        # The child sees the modules this process sees (as multiprocessing's spawn does).
        path = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen([sys.executable, "-m", "engine.child", spec.name],
                                stdin=subprocess.PIPE, close_fds=True,
                                env={**os.environ, "PYTHONPATH": path})
        assert proc.stdin is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; check() sees the exit
            pass
        child = Child(spec=spec, proc=proc, incarnation=incarnation)
        self.children[spec.name] = child
        return child

    def spawn_all(self, specs: Iterable[ProcessSpec]) -> None:
        for spec in specs:
            self.spawn(spec)

    def exit_code(self, name: str) -> int | None:
        """The exit code of child ``name`` (None while it runs or if it never ran)."""
        if name in self.children:
            return self.children[name].exitcode
        return self.finished.get(name, self.exit_codes.get(name))

    @property
    def done(self) -> bool:
        """Every child finished cleanly (and none is due to restart)."""
        return not self.children and not self.pending and bool(self.finished)

    # ------------------------------------------------------------------ policy

    def check(self, now: float | None = None) -> None:
        """Reap exited children, apply the restart policy, start restarts that are due.
        Raises ``ChildExited`` for a child that may not restart, ``RestartStorm`` when a
        group failed ``max_restarts`` times within the window."""
        now = time.monotonic() if now is None else now
        for child in list(self.children.values()):
            code = child.exitcode
            if code is None or child.name not in self.children:
                continue
            spec = child.spec
            if code == 0 and spec.done_on_clean_exit:
                del self.children[child.name]
                self.finished[child.name] = code
                continue
            if not spec.restart:
                raise ChildExited(f"{child.name} exited with code {code}")
            self._fail(child, code, now)
        for key, (due, specs, incarnation) in list(self.pending.items()):
            if due <= now:
                del self.pending[key]
                for spec in specs:
                    self.spawn(spec, incarnation)

    def _fail(self, child: Child, code: int, now: float) -> None:
        key = child.spec.group_key
        times = self.failures.setdefault(key, deque())
        times.append(now)
        while times and times[0] < now - self.policy.window_s:
            times.popleft()
        if len(times) >= self.policy.max_restarts:
            raise RestartStorm(
                f"{child.name} exited with code {code}: {len(times)} failures within "
                f"{self.policy.window_s:.0f}s (--max-restarts {self.policy.max_restarts}, "
                f"--restart-window {self.policy.window_s:.0f}); giving up")
        group = [c for c in self.children.values() if c.spec.group_key == key]
        for other in group:  # the rest of its group cannot go on without it
            if other is not child and other.exitcode is None:
                other.proc.kill()
            other.proc.wait()
            del self.children[other.name]
        delay = self.policy.delay(len(times))
        log.warning("%s exited with code %s; restarting %s%s", child.name, code,
                    "its group" if len(group) > 1 else "it",
                    f" in {delay:.1f}s" if delay else "")
        incarnation = child.incarnation + 1
        if self.on_restart is not None:
            self.on_restart(child, incarnation)
        self.pending[key] = (now + delay, [c.spec for c in group], incarnation)

    def resume_all(self) -> None:
        """Continue (SIGCONT) every live child: a pool pauses workers while a critical step
        runs (engine/pool/suspend.py), and one that died with a worker paused leaves it so;
        for a running child the signal is nothing."""
        for child in self.children.values():
            if child.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGCONT)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, order: Callable[[Child], Any] | None = None,
                 grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """SIGTERM every child (sorted by ``order``), SIGKILL what is left after ``grace_s``."""
        self.pending.clear()
        children = sorted(self.children.values(), key=order) if order else list(
            self.children.values())
        for child in children:
            if child.exitcode is None:
                child.proc.send_signal(signal.SIGTERM)
        self.resume_all()  # a stopped child acts on its SIGTERM once continued
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, grace_s)
                child.proc.kill()
                child.proc.wait()
            self.exit_codes[child.name] = child.proc.returncode
        self.children.clear()
