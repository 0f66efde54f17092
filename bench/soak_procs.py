"""The engine's processes as the soak benchmark sees them (bench/soak.py): read from
``/proc`` under the launcher, named by their role, chosen as kill victims on a schedule, and
compared by resident memory (RSS) between the idle start and the idle end."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

KINDS = ("worker", "pool", "frontend")



@dataclass(frozen=True)
class Proc:
    pid: int
    name: str  # its role: "launcher", "frontend", "pool-0", "worker-0-0", or "other"
    rss: int = 0  # bytes

    @property
    def kind(self) -> str:
        return kind_of(self.name)


def kind_of(name: str) -> str:
    return name.split("-", 1)[0] if name.startswith(("worker-", "pool-")) else name


def role_of(argv: Sequence[str]) -> str:
    """A process's role from its command line: ``python -m engine.child NAME`` until it sets
    its title, then ``engine-NAME`` (``engine.process.init_process``)."""
    args = [a for a in argv if a]
    if not args:
        return "other"
    if args[0].startswith("engine-"):
        return args[0].split()[0].removeprefix("engine-")
    if "engine.child" in args and args.index("engine.child") + 1 < len(args):
        return args[args.index("engine.child") + 1]
    if "engine.launch" in args:
        return "launcher"
    return "other"


def read_processes(root: int, proc_dir: str = "/proc") -> list[Proc]:
    """``root`` and its descendants, each with its role and RSS (vanished ones skipped)."""
    parents: dict[int, int] = {}
    for entry in os.listdir(proc_dir):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{proc_dir}/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    procs = []
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in tree:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"{proc_dir}/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"{proc_dir}/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
            name = "launcher" if pid == root else role_of(argv)
            procs.append(Proc(pid, name, rss))
    return procs


def kill_schedule(duration_s: float, every_s: float, kinds: Sequence[str]
                  ) -> list[tuple[float, str]]:
    """(time, kind) of each kill: at ``every_s``, ``2 * every_s``, ... before ``duration_s``,
    cycling through ``kinds``."""
    if every_s <= 0:
        raise ValueError(f"--kill-every must be > 0, got {every_s}")
    if not kinds:
        return []
    n = int(duration_s // every_s)
    if n * every_s >= duration_s:
        n -= 1
    return [(every_s * (i + 1), kinds[i % len(kinds)]) for i in range(max(0, n))]


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown process kind(s) {', '.join(unknown)}: choose among {', '.join(KINDS)}")
    return kinds


def pick_victim(procs: Sequence[Proc], kind: str, rng: random.Random) -> Proc | None:
    candidates = sorted((p for p in procs if p.kind == kind), key=lambda p: p.name)
    return rng.choice(candidates) if candidates else None


def restart_counts(pids_seen: Mapping[str, set[int]]) -> dict[str, int]:
    """Restarts per role: the pids seen for it, less the first."""
    return {name: len(pids) - 1 for name, pids in sorted(pids_seen.items())
            if name not in ("launcher", "other")}


@dataclass(frozen=True)
class RssRow:
    name: str
    kind: str
    start_mib: float
    end_mib: float | None  # None: no process of that role at the end
    change: float | None  # (end - start) / start
    restarted: bool  # another pid at the end than at the start
    ok: bool  # present, and grown by at most the tolerance


def rss_table(start: Iterable[Proc], end: Iterable[Proc], tolerance: float = 0.10
              ) -> list[RssRow]:
    """One row per role present at the start (``other`` processes left out): its RSS then
    and at the end. A process may shrink (a restarted one starts cold); growing by more than
    ``tolerance`` fails."""
    ends = {p.name: p for p in end if p.name != "other"}
    rows = []
    order = {"launcher": 0, "frontend": 1, "pool": 2, "worker": 3}
    mib = 1024.0 * 1024.0
    for p in sorted(start, key=lambda p: (order.get(p.kind, 9), p.name)):
        if p.name == "other":
            continue
        q = ends.get(p.name)
        if q is None:
            rows.append(RssRow(p.name, p.kind, p.rss / mib, None, None, False, False))
            continue
        change = (q.rss - p.rss) / p.rss if p.rss else 0.0
        rows.append(RssRow(p.name, p.kind, p.rss / mib, q.rss / mib, change, q.pid != p.pid,
                           change <= tolerance))
    return rows
