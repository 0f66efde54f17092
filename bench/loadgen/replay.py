"""Replaying a workload on the clock: arrival times, multi-turn dependencies, concurrency.

A request without ``after`` is sent at its ``arrival_time`` (seconds after the run starts). A
later turn of a conversation (``after`` set) is sent ``think_time`` seconds after the request it
follows has ended, whatever that request's outcome: its prompt (the history) was fixed when the
file was written, so the conversation goes on and every request of the file is sent. With
``max_concurrency``, a due request also waits for a free slot (as ``vllm bench serve
--max-concurrency``); its TTFT counts from when it is sent, its wait shows in ``send_delay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import httpx
from tqdm import tqdm

from bench.loadgen.client import ClientConfig, RequestRecord, make_client, send
from engine.sim.workloads import SimRequest


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]  # in the order of the requests given
    duration_s: float  # from the start to the end of the last request


def check_dependencies(requests: Sequence[SimRequest]) -> None:
    """Raise ValueError unless request ids are unique and every ``after`` names an earlier
    request: a later turn then always has something to wait for, and no cycle can hang."""
    seen: set[str] = set()
    for req in requests:
        if req.request_id in seen:
            raise ValueError(f"--workload-file: duplicate request_id {req.request_id!r}")
        if req.after and req.after not in seen:
            raise ValueError(f"--workload-file: request {req.request_id!r} follows "
                             f"{req.after!r}, which does not come before it")
        seen.add(req.request_id)


def offered_rate(requests: Sequence[SimRequest]) -> float:
    """Requests per second the file offers (conversations per second for multi-turn):
    n / the last arrival, as its arrivals are the sums of n drawn gaps; inf when all arrive
    at 0."""
    starts = [r.arrival_time for r in requests if not r.after]
    last = max(starts, default=0.0)
    return len(starts) / last if last > 0 else math.inf


def rescale(requests: Sequence[SimRequest], rate: float) -> list[SimRequest]:
    """The same requests offered at ``rate``: arrival times stretched or squeezed by one
    factor, so the arrival pattern (burstiness included) is kept; rate inf: all at 0."""
    if not rate > 0:
        raise ValueError(f"--rate: must be > 0 or inf, got {rate}")
    if math.isinf(rate):
        return [replace(r, arrival_time=0.0) for r in requests]
    current = offered_rate(requests)
    if math.isinf(current):
        raise ValueError("--rate: every request of this file arrives at 0 (written at rate "
                         "inf); there are no arrival gaps to rescale")
    factor = current / rate
    return [replace(r, arrival_time=r.arrival_time * factor) for r in requests]


async def replay(requests: Sequence[SimRequest], cfg: ClientConfig, *,
                 max_concurrency: int | None = None, progress: bool = False) -> RunResult:
    """Send every request on time and wait for all of them; one record per request."""
    check_dependencies(requests)
    loop = asyncio.get_running_loop()
    ended: dict[str, asyncio.Future[float]] = {r.request_id: loop.create_future()
                                               for r in requests}
    slots = (asyncio.Semaphore(max_concurrency) if max_concurrency
             else contextlib.nullcontext())
    bar = tqdm(total=len(requests), unit="req", disable=not progress, file=sys.stderr)

    async def one(client: httpx.AsyncClient, req: SimRequest, start: float) -> RequestRecord:
        due = await _wait_until_due(req, start, ended)
        async with slots:
            rec = await send(client, req, cfg, due, start)
        ended[req.request_id].set_result(rec.end_s)
        bar.update()
        return rec

    with bar:
        async with make_client(cfg) as client:
            start = time.perf_counter()
            records = await asyncio.gather(*(one(client, r, start) for r in requests))
            duration = time.perf_counter() - start
    return RunResult(list(records), duration)


async def _wait_until_due(req: SimRequest, start: float,
                          ended: dict[str, asyncio.Future[float]]) -> float:
    """Sleep until ``req`` is due; returns when it was due, in seconds since ``start``."""
    due = (await ended[req.after] + req.think_time) if req.after else req.arrival_time
    await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
    return due
