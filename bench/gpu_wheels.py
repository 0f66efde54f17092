"""``python -m bench.gpu_check wheels``: what travels to the GPU machine, checked before it
goes. The wheels in ``.whl`` (``make gpu-wheels``) must be exactly ``requirements/gpu-wheels.txt``
(one per pinned distribution, the pinned version, none extra), and they and the working tree
must fit the device tool's limit on what a run carries."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked files and
    untracked files git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())


def wheels_command(args: argparse.Namespace) -> int:
    """Check .whl against requirements/gpu-wheels.txt: one wheel per pinned distribution,
    the pinned version, none extra; print the sizes; fail over ``--limit-mib`` in all."""
    wanted = {}
    for line in (REPO / "requirements" / "gpu-wheels.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            wanted[_norm(name)] = version
    folder = REPO / args.dir
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    have: dict[str, list[str]] = {}
    for w in wheels:
        name, version = w.name.split("-")[:2]
        have.setdefault(_norm(name), []).append(version)
    problems = [f"missing {n}=={v}" for n, v in wanted.items() if v not in have.get(n, [])]
    problems += [f"unpinned {n} {vs}" for n, vs in have.items() if n not in wanted]
    problems += [f"several versions of {n}: {vs}" for n, vs in have.items() if len(vs) > 1]
    whl = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    mib = 1 << 20
    print(f"{len(wheels)} wheels in {args.dir}/: {whl / mib:.1f} MiB; the working tree: "
          f"{tree / mib:.1f} MiB; together {(whl + tree) / mib:.1f} MiB "
          f"(limit {args.limit_mib} MiB)")
    if whl + tree > args.limit_mib * mib:
        problems.append(f"over the {args.limit_mib} MiB that can travel")
    for p in problems:
        print(f"wheels: {p}", file=sys.stderr)
    return 1 if problems else 0


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
