"""Soak benchmark: mixed load, client aborts and SIGKILLs, for minutes; nothing may be lost.

    python -m bench.soak --minutes 30                      # the real run (a quiet machine)
    python -m bench.soak --minutes 2 --rate 2 --kill worker --kill-every 30 --json soak.json \\
        -- --num-threads 1                                  # after "--": engine.launch flags

It launches the engine (``bench.engine_server.running_engine``), warms it up, fills every
pool's prefix cache (``fill_cache``: the index grows with the cache and is bounded by the KV
size, so the baseline is taken once it is full and only a leak can grow past it), then
measures the idle baseline: every process's RSS (from ``/proc``: the launcher's descendants, each named by
its role, ``worker-0-0``, ``pool-0``, ``frontend``) and each pool's free KV blocks (the gRPC
``Health`` RPC: exact per-worker counts). Then, for ``--minutes``:

- **Load**: one request every ``1/--rate`` seconds (a steady rate, open loop), each drawn
  from a seeded generator: ``/v1/chat/completions`` or ``/v1/completions``, streamed or not,
  a prompt of 4-64 words, 8-96 output tokens, greedy with ``ignore_eos`` (so a completed
  request must have exactly ``max_tokens`` tokens: a repeated or dropped token after a
  recomputation or a continuation shows up as a mismatch).
- **Client aborts**: ``--abort-fraction`` of the requests are abandoned on purpose: a stream
  is closed after a random number of token events, a non-streamed request after a random
  delay (the connection closes; the engine must free the request's KV).
- **Kills**: every ``--kill-every`` seconds one process is SIGKILLed, cycling through the
  kinds of ``--kill`` (default ``worker,pool,frontend``); the victim is a random process of
  that kind. After each kill the benchmark waits (``--recovery-timeout``) for a new process
  of that role and ``/health`` 200, and records the time. If the launcher exits (an
  unhandled death), the run stops there and fails: it never hangs.

Each request ends in exactly one outcome (``classify``): ``completed`` (with its token
count), ``aborted`` (by us), ``cut`` (a transport error on a connection that was open when a
frontend was killed: the connection reset is the designed outcome), ``failed`` (an HTTP
error, a connection error, an error event, a finish reason of ``abort``/``error``), or
``lost`` (no answer and no error within ``--request-timeout``, or a stream that ended
without a ``finish_reason``). After the load the benchmark waits for the engine to be idle
and measures again. The run passes when nothing is lost, the engine survived every kill,
every process's RSS grew by at most ``--rss-tolerance`` (10%) over its start, and each
pool's free KV blocks are back at the baseline. A JSON report (``--json``) and a short table;
exit code 0 on a pass, 1 otherwise.

Not in CI: ``tests/bench/test_soak.py`` covers the pure parts (outcome accounting, the kill
schedule, the process roles, the RSS table) without an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.engine_server import RunningEngine, running_engine
from bench.loadgen.client import ClientConfig, make_client
from bench.soak_procs import (
    KINDS,
    Proc,
    kill_schedule,
    parse_kinds,
    pick_victim,
    read_processes,
    restart_counts,
    rss_table,
)
from bench.soak_requests import (
    COMPLETED,
    HEALTH_STALE_S,
    LOST,
    OUTCOMES,
    WORDS,
    Result,
    draw_request,
    run_request,
    summarize,
)

# ---------------------------------------------------------------------------- the engine


async def free_blocks(grpc_port: int) -> dict[str, dict[str, Any]]:
    """Per pool: free KV blocks (summed over its workers), running and waiting requests,
    from the gRPC ``Health`` RPC (exact counts; ``/metrics`` has only a usage fraction)."""
    import grpc

    from engine.frontend.proto import pb2, pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        resp = await pb2_grpc.EngineStub(channel).Health(pb2.HealthRequest(), timeout=5.0)
    return {p.model: {"free_blocks": sum(p.num_free_blocks), "running": p.num_running,
                      "waiting": p.num_waiting, "live_workers": p.live_workers, "ok": p.ok}
            for p in resp.pools}


async def healthy(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        return (await client.get(base_url + "/health", timeout=2.0)).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_idle(engine: RunningEngine, client: httpx.AsyncClient, base_url: str,
                    timeout_s: float, want_free: Mapping[str, int] | None = None
                    ) -> dict[str, dict[str, Any]] | None:
    """Poll until healthy with nothing running or waiting (and, given ``want_free``, those
    free blocks per pool); the last reading (None if none could be had)."""
    deadline, last = time.monotonic() + timeout_s, None
    while engine.proc.poll() is None:
        if await healthy(client, base_url):
            with contextlib.suppress(Exception):
                last = await free_blocks(engine.grpc_port)
                idle = all(p["running"] == 0 and p["waiting"] == 0 for p in last.values())
                if idle and (want_free is None or all(
                        last.get(k, {}).get("free_blocks") == v for k, v in want_free.items())):
                    return last
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return last


@dataclass
class Soak:
    """The run's mutable state: results, kills, pids seen per role."""

    engine: RunningEngine
    args: argparse.Namespace
    t0: float = 0.0
    results: list[Result] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    frontend_kills_s: list[float] = field(default_factory=list)
    pids_seen: dict[str, set[int]] = field(default_factory=dict)
    engine_exit: str = ""  # why the engine stopped during the run ("" if it did not)
    sending_s: float = 0.0  # when the load stopped sending (its drain not counted)
    fill: dict[str, int] = field(default_factory=dict)  # the prefix-cache fill (fill_cache)
    end_fill: dict[str, Any] = field(default_factory=dict)  # the one before the end reading

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.engine.http_port}"

    def now(self) -> float:
        return time.monotonic() - self.t0

    def scan(self) -> list[Proc]:
        procs = read_processes(self.engine.proc.pid)
        for p in procs:
            self.pids_seen.setdefault(p.name, set()).add(p.pid)
        return procs

    def engine_died(self, after: str) -> bool:
        code = self.engine.proc.poll()
        if code is None:
            return False
        if not self.engine_exit:
            self.engine_exit = f"the engine exited (code {code}) {after}"
        return True


async def load(soak: Soak, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
    args, rng = soak.args, random.Random(soak.args.seed)
    tasks: list[asyncio.Task[Result]] = []
    duration, interval = args.minutes * 60.0, 1.0 / args.rate
    i = 0
    while not stop.is_set() and soak.now() < duration:
        spec = draw_request(rng, i, args.abort_fraction, args.stream_fraction)
        tasks.append(asyncio.create_task(run_request(
            client, soak.base_url, spec, args.model, args.request_timeout, soak.t0,
            soak.frontend_kills_s)))
        i += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, i * interval - soak.now()))
    soak.sending_s = soak.now()
    soak.results = list(await asyncio.gather(*tasks))


async def killer(soak: Soak, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
    args, rng = soak.args, random.Random(soak.args.seed + 1)
    for at, kind in kill_schedule(args.minutes * 60.0, args.kill_every, args.kill):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, at - soak.now()))
        if stop.is_set():
            return
        victim = pick_victim(soak.scan(), kind, rng)
        if victim is None:
            soak.kills.append({"at_s": round(soak.now(), 2), "kind": kind, "victim": None})
            continue
        killed_at = soak.now()
        if kind == "frontend":
            soak.frontend_kills_s.append(killed_at)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        event: dict[str, Any] = {"at_s": round(killed_at, 2), "kind": kind,
                                 "victim": victim.name, "pid": victim.pid, "recovered_s": None}
        soak.kills.append(event)
        seen_down = False
        while soak.now() - killed_at < args.recovery_timeout:
            await asyncio.sleep(0.2)
            if soak.engine_died(f"after {victim.name} was killed at {killed_at:.1f} s"):
                event["engine_exited"] = True
                stop.set()
                return
            back = any(p.name == victim.name and p.pid != victim.pid for p in soak.scan())
            up = await healthy(client, soak.base_url)
            seen_down = seen_down or not up
            # /health may still show the stats from before the death for up to its
            # staleness limit: a 200 counts once a 503 was seen or that time has passed.
            if back and up and (seen_down or soak.now() - killed_at > HEALTH_STALE_S):
                event["recovered_s"] = round(soak.now() - killed_at, 2)
                break


async def watcher(soak: Soak, stop: asyncio.Event) -> None:
    """Notices the engine's exit even without a kill (and records every pid seen)."""
    while not stop.is_set():
        if soak.engine_died("during the run"):
            stop.set()
            return
        soak.scan()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def warm_up(soak: Soak, client: httpx.AsyncClient) -> None:
    rng = random.Random(soak.args.seed - 1)
    specs = [draw_request(rng, -1 - i, 0.0) for i in range(soak.args.warmup)]
    results = await asyncio.gather(*(run_request(client, soak.base_url, s, soak.args.model,
                                                 soak.args.request_timeout, soak.t0, [])
                                     for s in specs))
    bad = [r for r in results if r.outcome != COMPLETED]
    if bad:
        raise RuntimeError(f"warm-up request failed: {bad[0].outcome} {bad[0].reason}")


def fill_prompt(rng: random.Random, words: int) -> str:
    """A prompt of ``words`` random words: its blocks are new to the prefix cache."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def fill_done(blocks_cached: int, total_blocks: int, factor: float) -> bool:
    """Whether the fill's requests have cached ``factor`` times every KV block of the pool:
    placement spreads them over the workers, so a margin above 1 fills every worker."""
    return blocks_cached >= factor * total_blocks


async def fill_cache(soak: Soak, client: httpx.AsyncClient,
                     idle: Mapping[str, dict[str, Any]], seed: int) -> dict[str, int]:
    """Fill every pool's prefix cache before the baseline, and again before the end reading
    (``--fill-factor``; 0: no fill), with prompts drawn from ``seed``.

    The pool's prefix-cache index holds an entry per cached block (its hash, its tokens, its
    place in the LRU queue: about 0.9 KiB each, docs/benchmarks.md "The pool's RSS"), so a
    pool's RSS grows until the cache is full, then stays flat while LRU eviction replaces
    entries. Measured from an empty cache, that bounded growth reads as a leak (31 -> 37 MiB
    in the first 30-minute run); measured from a full one, only a leak grows. The end is
    read with a full cache too, so a restarted process (a pool restarted with an empty
    index) is compared at the same cached-block count, and a leak cannot hide behind the
    index it has not refilled yet. Prefill-only
    requests (``max_tokens`` 1, prompts of ``--fill-words`` random words) fill it fast: the
    prompt's full blocks are cached once computed, counted from each answer's
    ``usage.prompt_tokens``, until ``fill_done``."""
    args = soak.args
    total = sum(p["free_blocks"] for p in idle.values())  # idle: every block is free
    if args.fill_factor <= 0:
        return {"requests": 0, "blocks": 0, "total_blocks": total}
    rng = random.Random(seed)
    url = f"{soak.base_url}/v1/completions"
    cached = sent = 0

    async def one() -> int:
        body = {"model": args.model, "prompt": fill_prompt(rng, args.fill_words),
                "max_tokens": 1, "temperature": 0.0}
        resp = await client.post(url, json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"cache fill request failed: HTTP {resp.status_code} "
                               f"{resp.text[:200]}")
        return int(resp.json()["usage"]["prompt_tokens"]) // int(args.block_size)

    while not fill_done(cached, total, args.fill_factor):
        batch = await asyncio.gather(*(one() for _ in range(8)))
        cached, sent = cached + sum(batch), sent + len(batch)
    return {"requests": sent, "blocks": cached, "total_blocks": total}


async def soak_run(engine: RunningEngine, args: argparse.Namespace) -> dict[str, Any]:
    soak = Soak(engine, args, t0=time.monotonic())
    cfg = ClientConfig(soak.base_url, args.model, timeout_s=args.request_timeout + 5.0)
    async with make_client(cfg) as client:
        await warm_up(soak, client)
        idle = await wait_idle(engine, client, soak.base_url, args.settle_timeout)
        if idle is None:
            raise RuntimeError("no idle reading of the engine after the warm-up")
        soak.fill = await fill_cache(soak, client, idle, args.seed - 2)
        baseline = await wait_idle(engine, client, soak.base_url, args.settle_timeout)
        if baseline is None:
            raise RuntimeError("no idle reading of the engine after the cache fill")
        start_procs = soak.scan()
        soak.t0 = time.monotonic()
        stop = asyncio.Event()
        watch = asyncio.create_task(watcher(soak, stop))
        kill = asyncio.create_task(killer(soak, client, stop))
        try:
            await load(soak, client, stop)
        finally:
            load_s = soak.sending_s or soak.now()
            stop.set()
            await asyncio.gather(watch, kill)
        want = {k: v["free_blocks"] for k, v in baseline.items()}
        end = None
        if not soak.engine_died("during the drain"):
            end = await wait_idle(engine, client, soak.base_url, args.settle_timeout, want)
        if end is not None and args.fill_factor > 0:  # new prompts: the cache full again
            try:
                soak.end_fill = await fill_cache(soak, client, end, args.seed - 3)
            except (RuntimeError, httpx.HTTPError) as e:
                soak.end_fill = {"error": f"{type(e).__name__}: {e}"[:200]}
            end = await wait_idle(engine, client, soak.base_url, args.settle_timeout, want)
        end_procs = soak.scan() if engine.proc.poll() is None else []
    return report(soak, load_s, baseline, end, start_procs, end_procs)


def report(soak: Soak, load_s: float, baseline: Mapping[str, dict[str, Any]],
           end: Mapping[str, dict[str, Any]] | None, start_procs: Sequence[Proc],
           end_procs: Sequence[Proc]) -> dict[str, Any]:
    args = soak.args
    summary = summarize(soak.results)
    rows = rss_table(start_procs, end_procs, args.rss_tolerance)
    kv = {name: {"baseline_free": b["free_blocks"],
                 "end_free": None if end is None else end.get(name, {}).get("free_blocks")}
          for name, b in baseline.items()}
    problems = []
    if summary["outcomes"][LOST]:
        problems.append(f"{summary['outcomes'][LOST]} request(s) lost")
    if soak.engine_exit:
        problems.append(soak.engine_exit)
    if "error" in soak.end_fill:
        problems.append(f"the cache fill before the end reading failed: {soak.end_fill['error']}")
    if summary["token_count_mismatches"]:
        problems.append(f"{summary['token_count_mismatches']} completed request(s) with a "
                        "token count other than max_tokens")
    problems += [f"RSS of {r.name}: " + ("gone" if r.end_mib is None else
                                         f"{r.start_mib:.0f} -> {r.end_mib:.0f} MiB")
                 for r in rows if not r.ok and end_procs]
    problems += [f"KV blocks of pool {n}: {v['baseline_free']} free at baseline, "
                 f"{v['end_free']} at the end" for n, v in kv.items()
                 if v["end_free"] != v["baseline_free"] and not soak.engine_exit]
    problems += [f"{k['victim']} killed at {k['at_s']} s: no recovery within "
                 f"{args.recovery_timeout:g} s" for k in soak.kills
                 if k.get("victim") and k["recovered_s"] is None and not k.get("engine_exited")]
    return {
        "config": {k: v for k, v in vars(args).items()},
        "load_s": round(load_s, 1),
        "offered_rate": round(len(soak.results) / load_s, 3) if load_s else 0.0,
        **summary,
        "cache_fill": soak.fill,
        "cache_fill_end": soak.end_fill,
        "kills": soak.kills,
        "restarts": restart_counts(soak.pids_seen),
        "rss": [asdict(r) for r in rows],
        "kv": kv,
        "engine_exit": soak.engine_exit or None,
        "passed": not problems,
        "problems": problems,
    }


def format_report(rep: Mapping[str, Any]) -> str:
    out = rep["outcomes"]
    lines = [
        f"soak: {rep['requests']} requests in {rep['load_s']:.0f} s "
        f"({rep['offered_rate']:.2f} req/s), {rep['completed_tokens']} tokens completed",
        f"{'outcome':<19}" + "".join(f"{o:>10}" for o in OUTCOMES),
        f"{'all':<19}" + "".join(f"{out[o]:>10}" for o in OUTCOMES),
    ]
    lines += [f"{k:<19}" + "".join(f"{c[o]:>10}" for o in OUTCOMES)
              for k, c in rep["by_kind"].items()]
    if rep["failure_reasons"]:
        lines.append("failed: " + ", ".join(f"{r} x{n}" for r, n in
                                            rep["failure_reasons"].items()))
    for k in rep["kills"]:
        if k.get("victim") is None:
            lines.append(f"kill {k['kind']} at {k['at_s']} s: no such process")
        else:
            rec = k["recovered_s"]
            lines.append(f"kill {k['victim']} (pid {k['pid']}) at {k['at_s']} s: "
                         + ("engine exited" if k.get("engine_exited") else
                            f"back in {rec} s" if rec is not None else "not back"))
    for what, key in (("cache fill", "cache_fill"), ("cache fill at the end", "cache_fill_end")):
        if (fill := rep.get(key)) and "error" not in fill:
            lines.append(f"{what}: {fill['requests']} requests, {fill['blocks']} blocks "
                         f"cached for {fill['total_blocks']} KV blocks")
    lines.append("restarts: " + (", ".join(f"{n} {c}" for n, c in rep["restarts"].items()
                                           if c) or "none"))
    lines.append(f"{'process':<19}{'RSS start MiB':>14}{'end MiB':>9}  change")
    for r in rep["rss"]:
        end = "-" if r["end_mib"] is None else f"{r['end_mib']:.0f}"
        change = "-" if r["change"] is None else f"{r['change']:+.1%}"
        lines.append(f"{r['name']:<19}{r['start_mib']:>14.0f}{end:>9}  {change}"
                     + (" (restarted)" if r["restarted"] else ""))
    for name, v in rep["kv"].items():
        lines.append(f"KV free blocks, pool {name}: baseline {v['baseline_free']}, "
                     f"end {v['end_free']}")
    lines.append("PASS" if rep["passed"] else "FAIL: " + "; ".join(rep["problems"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second, steady")
    p.add_argument("--kill", type=parse_kinds, default=list(KINDS),
                   help="process kinds to SIGKILL in turn, comma-separated (empty: none)")
    p.add_argument("--kill-every", type=float, default=180.0, help="seconds between kills")
    p.add_argument("--abort-fraction", type=float, default=0.1,
                   help="share of the requests the client abandons mid-way")
    p.add_argument("--stream-fraction", type=float, default=0.7, help="share streamed")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds without an answer or an error before a request counts lost")
    p.add_argument("--recovery-timeout", type=float, default=60.0,
                   help="seconds a killed process has to be back (and /health 200)")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds for the engine to be idle with its KV back at the end")
    p.add_argument("--rss-tolerance", type=float, default=0.10,
                   help="the RSS growth per process that fails the run")
    p.add_argument("--warmup", type=int, default=8, help="requests before the baseline")
    p.add_argument("--fill-factor", type=float, default=1.25,
                   help="before the baseline, cache this many times the pool's KV blocks "
                        "with prefill-only requests, so the prefix-cache index is full "
                        "(0: no fill; the RSS check then counts the index's growth)")
    p.add_argument("--fill-words", type=int, default=400, help="words per fill prompt")
    p.add_argument("--block-size", type=int, default=16,
                   help="the engine's KV block size (counts the fill's cached blocks)")
    p.add_argument("--model", default="default", help="served model name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("engine_args", nargs="*", help="after --: flags for engine.launch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.minutes <= 0:
        build_parser().error("--rate and --minutes must be > 0")
    if args.kill:
        kill_schedule(args.minutes * 60.0, args.kill_every, args.kill)  # validates
    with running_engine(args.engine_args) as engine:
        rep = asyncio.run(soak_run(engine, args))
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
