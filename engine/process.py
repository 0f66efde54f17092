"""What every engine child process does first: name itself, log, die with its parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def init_process(title: str, log_level: str = "INFO") -> None:
    """Set the process title and logging; make SIGTERM exit cleanly and SIGINT harmless.

    The launcher coordinates shutdown: Ctrl-C reaches the whole process group, so children
    ignore SIGINT and wait for the launcher's SIGTERM. If the launcher itself is killed,
    the kernel sends SIGKILL to its children (PR_SET_PDEATHSIG), so nothing is left behind.
    """
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - optional nicety
        pass
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s {title}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    die_with_parent()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def fail_start() -> SystemExit:
    """The exception a child raises when it could not start (after telling the launcher).

    The launcher answers a failed start by stopping everything, so its SIGTERM may arrive
    while this process already runs its exit handlers (vLLM registers some); ignoring it
    from here on keeps a second SystemExit out of them.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return SystemExit(1)


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL from the kernel when the parent dies. ``parent``: the pid the parent had
    when it started this process; if the parent is already another one (it died before
    prctl took effect, and this process was re-parented), exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover
        return
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(1)
