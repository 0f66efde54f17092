"""``python -m engine.child NAME``: the first code of every process the supervisor starts.

It reads ``(target, args, kwargs, parent pid)`` pickled on stdin, asks the kernel for
SIGKILL when its parent dies (before anything slow, so no window is left where the launcher
dies and this process lives on), and only then imports the target's module and calls it.
``NAME`` is on the command line so ``ps`` tells children apart until they set their title.

OpenMP (torch's intra-op threads in a CPU worker) is told to wait passively
(``OMP_WAIT_POLICY=PASSIVE``, unless the environment already says otherwise) before anything
imports torch: by default libgomp's idle threads spin between parallel regions, and on a
small machine a worker's spinning threads take the cores the frontend and the pool need
between steps (issue 15). A setting in the environment wins, so a dedicated machine can ask
for ``ACTIVE``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys


def main() -> None:
    # Ctrl-C reaches the whole process group; the supervisor coordinates shutdown, so a
    # child never dies of it (its target may install its own handler).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp
    target, args, kwargs, parent = pickle.load(sys.stdin.buffer)
    from engine.process import die_with_parent

    die_with_parent(parent)
    sys.stdin.close()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's stdin for its lifetime
    module, _, function = target.partition(":")
    fn = getattr(importlib.import_module(module), function)
    result = fn(*args, **kwargs)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
