"""The pool process's memory against its prefix cache: is its RSS growth bounded, or a leak?

    python -m bench.pool_rss --requests 8000                  # RSS per checkpoint
    python -m bench.pool_rss --requests 8000 --tracemalloc    # and the top allocations
    python -m bench.pool_rss --requests 3000 --leak-bytes 1024 # a deliberate leak, to see it

A real ``PoolService`` (engine/pool/service.py, unchanged) runs in a child process on its
real ZeroMQ sockets; this process plays its frontend and ``--workers`` light fake workers
(threads: each sampled token is a random id, no model), so the pool's work per request is
the production code's and the memory measured is the pool's alone. The traffic is the soak's
(bench/soak.py ``draw_request``): prompts of 4-64 words tokenized by the model's tokenizer
(chat requests behind a fixed header), 8-96 greedy output tokens with ``ignore_eos``, 10%
abandoned mid-way (``AbortRequests``), ``--concurrency`` in flight.

Every ``--every`` requests the load pauses until the pool holds no request, and the child
reports (``SIGUSR1``, answered by its main thread between two loop turns, so the reading is
consistent): its RSS, the prefix-cache entries (``cached_blocks``, all workers), the requests
and owners it still holds and, with ``--tracemalloc``, the traced total and its largest
allocation sites (file:line). The cache fills to ``--workers * --blocks`` entries, then stays
there (LRU eviction): RSS that keeps climbing after that point is a leak; RSS that flattens
with the cache is the index's cost, bounded by the KV size.

``--leak-bytes N`` makes the child keep N bytes per request the pool receives (a
deliberate leak, in the harness, not the engine) to show what a leak looks like here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from bench.soak_requests import draw_request
from engine import ipc
from engine import messages as m

MIB = 1024.0 * 1024.0
#: Tokens before a chat prompt (the chat template's header, roughly), the same every time.
CHAT_HEADER = (1, 42, 1337, 7, 2024, 99, 512, 13)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- the child


def _pool_child(model: str, workers: int, block_size: int, run_dir: str, report: str,
                trace: bool, leak_bytes: int) -> None:
    from engine.cli import config_from_dict
    from engine.pool.service import PoolService

    if trace:
        tracemalloc.start(1)
    cfg = config_from_dict({"model": [model], "block_size": block_size, "workers": workers})
    service = PoolService(cfg, 0, run_dir)
    if leak_bytes:  # the deliberate leak: every request received keeps ``leak_bytes``
        kept: list[bytes] = []
        on_request = service._on_request

        def leaky(msg: m.FrontendToPool) -> None:
            if isinstance(msg, m.AddRequest):
                kept.append(os.urandom(leak_bytes))
            on_request(msg)

        service._on_request = leaky  # type: ignore[method-assign]

    def sample(_sig: int, _frame: Any) -> None:
        sched = service.scheduler
        row: dict[str, Any] = {
            "rss": rss_bytes(),
            "cached_blocks": sum(ws.blocks.num_cached_blocks for ws in sched.workers.values()),
            "requests": sched.num_unfinished, "owners": len(service.owners),
        }
        if trace:
            row["traced"] = tracemalloc.get_traced_memory()[0]
            stats = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]).statistics("lineno")
            row["top"] = [[f"{os.path.relpath(s.traceback[0].filename)}:"
                           f"{s.traceback[0].lineno}", s.size, s.count] for s in stats[:10]]
        with open(report, "a") as f:
            f.write(json.dumps(row) + "\n")

    signal.signal(signal.SIGUSR1, sample)
    try:
        service.run()
    finally:
        service.close()


# ---------------------------------------------------------------------------- fake workers


def _worker(run_dir: str, worker_id: int, num_blocks: int, block_size: int,
            stop: threading.Event, seed: int) -> None:
    """Runs every plan at once: tracks each request's known and computed tokens only, and
    samples a random token for each request whose known tokens are all computed."""
    rng = random.Random(seed)
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ipc.make_socket(ctx, zmq.DEALER, ipc.pool_addresses(run_dir, 0).workers, bind=False,
                           identity=ipc.worker_identity(worker_id))
    sock.send(ipc.encode(m.WorkerReady(worker_id=worker_id, num_blocks=num_blocks,
                                       block_size=block_size)))
    known: dict[str, list[int]] = {}  # request id -> [known tokens, computed tokens]
    while not stop.is_set():
        if not sock.poll(20):
            continue
        plan = ipc.POOL_TO_WORKER.decode(sock.recv())
        if not isinstance(plan, m.StepPlan):
            continue  # a PoolHello: registered already
        for rid in plan.finished_request_ids:
            known.pop(rid, None)
        for nr in plan.new_requests:
            known[nr.request_id] = [len(nr.token_ids), nr.num_computed_tokens]
        ids, toks = [], []
        for rid, n in plan.scheduled():
            st = known[rid]
            st[1] += n
            if st[1] == st[0]:
                st[0] += 1
                ids.append(rid)
                toks.append(rng.randrange(257, 4096))
        sock.send(ipc.encode(m.StepResult(step_id=plan.step_id, worker_id=worker_id,
                                          request_ids=ids, token_ids=toks)))
    sock.close(linger=0)


# ---------------------------------------------------------------------------- the frontend


class Frontend:
    """Sends soak-like requests, ``concurrency`` at a time, and abandons some mid-way."""

    def __init__(self, run_dir: str, tokenizer: Any, seed: int) -> None:
        ctx: zmq.Context[Any] = zmq.Context.instance()
        addrs = ipc.pool_addresses(run_dir, 0)
        self.push = ipc.make_socket(ctx, zmq.PUSH, addrs.requests, bind=False)
        self.pull = ipc.make_socket(ctx, zmq.PULL, addrs.outputs, bind=False)
        self.control = ipc.make_socket(ctx, zmq.PUSH, addrs.control, bind=False)
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.sent = 0
        self.open: dict[str, int | None] = {}  # request id -> abort after that many tokens
        self.tokens: dict[str, int] = {}
        self.live_workers = 0

    def send_one(self) -> None:
        spec = draw_request(self.rng, self.sent, 0.1)
        prompt = tuple(self.tokenizer.encode(spec.prompt).ids)
        if spec.chat:
            prompt = CHAT_HEADER + prompt
        rid = f"req-{self.sent}"
        abort_after = spec.abort_after_events
        if spec.abort_after_s is not None:  # a non-streamed abandon: after a few tokens
            abort_after = self.rng.randint(1, spec.max_tokens - 1)
        req = m.EngineRequest(request_id=rid, prompt_token_ids=prompt,
                              sampling=m.SamplingParams(max_tokens=spec.max_tokens,
                                                        temperature=0.0, ignore_eos=True),
                              arrival_time=time.time())
        self.push.send(ipc.encode(m.AddRequest(request=req)))
        self.open[rid] = abort_after
        self.tokens[rid] = 0
        self.sent += 1

    def receive(self, timeout_ms: int) -> None:
        if not self.pull.poll(timeout_ms):
            return
        while True:
            try:
                msg = ipc.POOL_TO_FRONTEND.decode(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if msg.stats is not None:
                self.live_workers = msg.stats.live_workers
            aborts = []
            for o in msg.outputs:
                if o.request_id not in self.open:
                    continue
                self.tokens[o.request_id] += len(o.new_token_ids)
                if o.finish_reason is not None:
                    if o.finish_reason not in ("length", "abort"):
                        raise RuntimeError(f"{o.request_id} ended with {o.finish_reason}: "
                                           f"{o.error}")
                    del self.open[o.request_id], self.tokens[o.request_id]
                    continue
                after = self.open[o.request_id]
                if after is not None and self.tokens[o.request_id] >= after:
                    aborts.append(o.request_id)
                    self.open[o.request_id] = None
            if aborts:
                self.push.send(ipc.encode(m.AbortRequests(request_ids=aborts)))

    def run(self, until: int, concurrency: int) -> None:
        while self.sent < until or self.open:
            while self.sent < until and len(self.open) < concurrency:
                self.send_one()
            self.receive(100)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tokenizers import Tokenizer

    from engine.models.default import default_model_dir

    model = args.model or str(default_model_dir())
    tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, report = os.path.join(tmp, "run"), os.path.join(tmp, "report.jsonl")
        os.mkdir(run_dir, 0o700)
        child = mp.get_context("spawn").Process(
            target=_pool_child, args=(model, args.workers, args.block_size, run_dir, report,
                                      args.tracemalloc, args.leak_bytes), daemon=True)
        child.start()
        stop = threading.Event()
        threads = [threading.Thread(target=_worker, args=(run_dir, w, args.blocks,
                                                          args.block_size, stop, args.seed + w),
                                    daemon=True) for w in range(args.workers)]
        for t in threads:
            t.start()
        front = Frontend(run_dir, tokenizer, args.seed)
        deadline = time.monotonic() + 30
        while front.live_workers < args.workers:
            if time.monotonic() > deadline or not child.is_alive():
                raise RuntimeError("the pool did not register its workers")
            front.receive(100)
        rows: list[dict[str, Any]] = []
        try:
            for until in [0, *range(args.every, args.requests + 1, args.every)]:
                front.run(until, args.concurrency)
                time.sleep(0.3)  # the pool's last outputs are out; it is idle
                n = len(_lines(report))
                os.kill(child.pid or 0, signal.SIGUSR1)
                while len(lines := _lines(report)) == n:
                    time.sleep(0.05)
                row = json.loads(lines[-1])
                row["sent"] = until
                rows.append(row)
                print(format_row(row, rows[0]), flush=True)
        finally:
            front.control.send(ipc.encode(m.Shutdown()))
            child.join(10)
            if child.is_alive():
                child.kill()
            stop.set()
            for t in threads:
                t.join()
    return rows


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.readlines()


def format_row(row: dict[str, Any], first: dict[str, Any]) -> str:
    text = (f"requests {row['sent']:>6}  cached blocks {row['cached_blocks']:>6}  "
            f"RSS {row['rss'] / MIB:6.1f} MiB ({(row['rss'] - first['rss']) / MIB:+5.1f})  "
            f"held {row['requests']}/{row['owners']}")
    if "traced" in row:
        text += f"  traced {row['traced'] / MIB:6.1f} MiB"
        text += "".join(f"\n    {site:<48}{size / 1024:9.0f} KiB {count:>8}"
                        for site, size, count in row["top"][:6])
    return text


def verdict(rows: Sequence[dict[str, Any]], capacity: int) -> dict[str, Any]:
    """RSS growth after the cache is full (the first checkpoint with 99% of ``capacity``
    entries: a few blocks are always private copies or unfilled tails): per request sent
    after it, and in all."""
    full = next((r for r in rows if r["cached_blocks"] >= 0.99 * capacity), None)
    if full is None or full is rows[-1]:
        return {"full_at": None, "growth_after_full_mib": None, "bytes_per_request": None}
    last = rows[-1]
    grown = last["rss"] - full["rss"]
    return {"full_at": full["sent"], "growth_after_full_mib": round(grown / MIB, 2),
            "bytes_per_request": round(grown / (last["sent"] - full["sent"]), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pool_rss", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8000)
    p.add_argument("--every", type=int, default=500, help="requests between readings")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--blocks", type=int, default=8192, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--leak-bytes", type=int, default=0)
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the readings here")
    args = p.parse_args(argv)
    rows = run(args)
    result = verdict(rows, args.workers * args.blocks)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
