"""bench.compare's workload handling: load or generate the requests, and derive what a
side-by-side run needs from them (the prefix-hit ceiling, per-rate epochs that share no
prefix, a duration cap, warm-up requests)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.replay import check_dependencies
from engine.sim.workloads import SimRequest, WorkloadConfig, make_workload, read_jsonl, write_jsonl


def load_workload(args: argparse.Namespace, outdir: Path) -> tuple[Path, list[SimRequest],
                                                                   dict[str, Any]]:
    """The workload file (written into ``outdir`` when generated from flags), its requests and
    what describes it (the generator's description, or the file's path)."""
    if args.workload_file:
        path = Path(args.workload_file)
        requests = list(read_jsonl(path).requests())
        description: dict[str, Any] = {"file": str(path)}
    else:
        cfg = WorkloadConfig(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(WorkloadConfig)})
        workload = make_workload(cfg)
        path = outdir / "workload.jsonl"
        write_jsonl(workload.requests(), path)
        requests = list(read_jsonl(path).requests())
        description = dict(workload.description)
    if not requests:
        raise ValueError(f"--workload-file: {path} holds no request")
    check_dependencies(requests)
    return path, requests, description


def prefix_hit_ceiling(requests: Iterable[SimRequest]) -> float:
    """The workload's own prefix-hit ceiling: over all prompt tokens, the share that repeats a
    prefix of some earlier prompt (an unbounded cache, any block size, one worker). For
    shared-prefix it is (1 - 1/R) x S / (S + Q): the first request of each group misses."""
    root: dict[int, Any] = {}
    hits = total = 0
    for req in requests:
        node, matching = root, True
        for tok in req.prompt_token_ids:
            child = node.get(tok)
            if child is None:
                matching = False
                child = node[tok] = {}
            elif matching:
                hits += 1
            node = child
        total += len(req.prompt_token_ids)
    return hits / total if total else 0.0


def shift_prompts(requests: Sequence[SimRequest], epoch: int, vocab: int) -> list[SimRequest]:
    """The same requests with every prompt token id shifted by ``epoch * 7919`` modulo
    ``vocab``: the same lengths, arrivals and prefix structure, but no prompt that repeats a
    prefix of an earlier epoch's (a server's prefix cache outlives one rate's replay). Epoch 0
    is the workload itself."""
    if epoch == 0:
        return list(requests)
    shift = epoch * 7919 % vocab
    return [dataclasses.replace(r, prompt_token_ids=tuple((t + shift) % vocab
                                                          for t in r.prompt_token_ids))
            for r in requests]


def truncate(requests: Sequence[SimRequest], max_duration: float | None) -> list[SimRequest]:
    """The requests that arrive within ``max_duration`` seconds (all with None), and the later
    turns of the conversations they start."""
    if max_duration is None:
        return list(requests)
    kept: set[str] = set()
    out = []
    for r in requests:
        if (r.after in kept) if r.after else r.arrival_time < max_duration:
            kept.add(r.request_id)
            out.append(r)
    return out


def vocab_bound(requests: Sequence[SimRequest]) -> int:
    """One more than the largest token id of the workload (at most the model's vocabulary)."""
    return max((max(r.prompt_token_ids, default=0) for r in requests), default=0) + 1


def warmup_requests(requests: Sequence[SimRequest], n: int) -> list[SimRequest]:
    """``n`` short requests that share no prefix with the workload (their first token is one
    no workload prompt starts with, when there is one), sent before measuring."""
    vocab = vocab_bound(requests)
    firsts = {r.prompt_token_ids[0] for r in requests if r.prompt_token_ids}
    first = next((t for t in range(vocab) if t not in firsts), vocab - 1)
    out = []
    for i in range(n):
        prompt = tuple([first] + [(7919 * (i + 1) * (k + 3)) % vocab for k in range(31)])
        out.append(SimRequest(f"warmup-{i}", 0.0, prompt, 8))
    return out
