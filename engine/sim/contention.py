"""CPU contention between workers that share cores: the ``[contention]`` term.

A step's time is ``(the cost model's time) x (1 + overlap x share)``, where ``share`` is
the part of the step during which other workers' steps, begun before it, are still
computing (summed over them, at most 1). The simulator knows every worker's step in flight
(``contended_time``); a recording gives the same share from each step's compute interval,
``[t_result - execute_s, t_result]`` (``engine.sim.calibrate.overlap_shares``), so fit and
simulation count alike; ``engine.sim.calibrate.fit_contention`` fits ``overlap``.
"""

from __future__ import annotations

OVERLAP_EPS = 1e-9  # steps starting this close together count as simultaneous


def overlap_share(computing: list[tuple[float, float]], w: int, start: float,
                  dt: float) -> float:
    """The share of worker ``w``'s step [start, start + dt] during which the other workers'
    steps (``computing``: each worker's latest (start, end)) begun before it still compute,
    summed over them, at most 1: its CPU contention. Steps that start together (one event
    offers both) do not count for each other."""
    if dt <= 0:
        return 0.0
    covered = sum(min(end, start + dt) - start for o, (since, end) in enumerate(computing)
                  if o != w and since < start - OVERLAP_EPS and end > start)
    return min(1.0, covered / dt)


def contended_time(computing: list[tuple[float, float]], w: int, start: float, dt: float,
                   overlap: float) -> float:
    """The step's time ``t = dt x (1 + overlap x share)`` where ``share`` is that of ``t``
    itself (``overlap_share``), as a recording measures it: a fixed point, a few rounds."""
    t = dt
    for _ in range(20):
        nxt = dt * (1.0 + overlap * overlap_share(computing, w, start, t))
        if abs(nxt - t) < 1e-12:
            break
        t = nxt
    return t
