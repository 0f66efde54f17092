"""A discrete-event simulator driving the real scheduler with simulated workers.

Events are request arrivals (a sorted stream, plus later turns that arrive after their
predecessor finishes) and step completions (a heap). The drive loop is the engine core's
(engine/core.py), as in the pool: after every event each idle worker is offered a step
(``core.step(now, idle workers)``); its handle (``SimWorker``) has a ``FakeWorker`` apply
the plan as a stateful runner would and answer with deterministic tokens, and the step
completes at ``now + cost_model(batch shape)``, when ``core.complete(w, result, now)``
applies it. The scheduler is the very code the engine runs; only the model and the clock
are simulated.
The cost model's host terms (``CostModel.HOST``) delay a request's admission by ``admit_s``
(or a per-request draw from ``admit_quantiles``, or with ``admit_spell`` from the recorded
delays of requests that arrived at a like step ratio: engine/sim/admit_spell.py),
each token's arrival at the client by ``stream_s``, and a worker's next step by
``host_time(requests)``; all 0 in a cost file fitted on the runner alone. A ``[noise]``
table multiplies each step's time by a seeded draw (``step_noise.StepNoise``) and each
step's host time by one from ``host_quantiles``; a ``[contention]`` table multiplies a
step's time by ``1 + overlap x`` the share of it that other workers' steps in flight
overlap (engine/sim/contention.py); a ``[step_extra]`` table adds ``prefill_step_s`` to a
step with prefill tokens and ``cold_step_s`` to one on a worker that held no request before
it (as the recording's ``busy`` flag counts it).
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from engine.config import SchedulerConfig
from engine.core import CoreObserver, EngineCore, IntegrityCheck, ObserverTee
from engine.messages import (
    CachedRequestData,
    EngineRequest,
    NewRequestData,
    PoolStats,
    RequestOutput,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.scheduler.scheduler import Scheduler
from engine.sim.contention import contended_time
from engine.sim.cost_model import BatchShape, CostModel
from engine.sim.workloads import SimRequest

_STEP, _ARRIVAL = 0, 1  # event kinds


@dataclass(frozen=True)
class SimConfig:
    num_workers: int = 8
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    num_blocks: int = 4096  # per worker
    max_model_len: int = 8192
    vocab_size: int = 4096
    check: bool = False  # check_integrity() after every scheduler call (slow; for tests)
    noise_seed: int = 0  # the cost file's step-time noise draws


class RequestRecord:
    """What happened to one request, in simulated seconds."""

    __slots__ = ("arrival", "error", "finish", "finish_reason", "first_scheduled", "first_token",
                 "last_token", "max_tokens", "num_admissions", "num_cached_tokens",
                 "num_output_tokens", "num_prompt_tokens", "priority", "request_id", "tenant")

    def __init__(self, req: SimRequest, arrival: float) -> None:
        self.request_id = req.request_id
        self.arrival = arrival
        self.priority = req.priority
        self.tenant = req.tenant
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.max_tokens = req.max_tokens
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token = arrival
        self.finish: float | None = None
        self.finish_reason: str | None = None
        self.error = ""
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.num_admissions = 0  # 1 + preemptions: a resumed request is sent anew

    @property
    def num_preemptions(self) -> int:
        return max(0, self.num_admissions - 1)


@dataclass
class SimResult:
    records: list[RequestRecord]
    itl: array[float]  # every gap between two tokens of a request, pooled (seconds)
    num_steps: int
    num_scheduled: int  # request-steps: requests summed over all steps
    busy_s: list[float]  # per worker: simulated time spent in steps
    end_time: float  # simulated time of the last event
    stats: PoolStats  # the scheduler's own counters at the end
    wall_s: float  # real seconds the simulation took


class FakeWorker:
    """A stateful worker without a model. Per request it keeps [known tokens, computed tokens,
    the next token before ``% vocab``, output tokens]; the n-th output token of a request
    seeded s is ``workloads.output_token(s, n, vocab)``, whatever the batch or preemptions."""

    __slots__ = ("reqs", "vocab_size", "worker_id")

    def __init__(self, worker_id: int, vocab_size: int) -> None:
        self.worker_id = worker_id
        self.vocab_size = vocab_size
        self.reqs: dict[str, list[int]] = {}

    def step(self, plan: StepPlan) -> tuple[StepResult, BatchShape]:
        """Apply the plan, sample, and return the result with the batch's shape."""
        reqs, vocab = self.reqs, self.vocab_size
        for rid in plan.finished_request_ids:
            reqs.pop(rid, None)
        for nr in plan.new_requests:
            n_out = nr.num_output_tokens
            reqs[nr.request_id] = [len(nr.token_ids), nr.num_computed_tokens,
                                   (nr.sampling.seed or 0) * 1_000_003 + n_out * 7_919 + 12_345,
                                   n_out]
        ids: list[str] = []
        tokens: list[int] = []
        prefill = decodes = context = pairs = 0
        items: Iterable[NewRequestData | CachedRequestData] = chain(plan.new_requests,
                                                                    plan.cached_requests)
        for r in items:
            st = reqs[r.request_id]
            n = r.num_scheduled_tokens
            done = st[1] + n
            if done > st[0]:
                raise AssertionError(f"step {plan.step_id} runs {r.request_id!r} to token "
                                     f"{done}, past its {st[0]} known tokens")
            st[1] = done
            context += done
            if n == 1 and st[3] and done == st[0]:
                decodes += 1
            else:
                prefill += n
                pairs += n * (done - n) + n * (n + 1) // 2
            if done == st[0]:  # every known token computed: sample the next one
                tokens.append(st[2] % vocab)  # == output_token(seed, outputs so far)
                ids.append(r.request_id)
                st[0] = done + 1
                st[2] += 7_919
                st[3] += 1
        result = StepResult(step_id=plan.step_id, worker_id=plan.worker_id, request_ids=ids,
                            token_ids=tokens)
        return result, BatchShape(prefill, decodes, context, pairs)


class Simulator:
    def __init__(self, requests: Iterable[SimRequest], cost: CostModel, config: SimConfig,
                 observer: CoreObserver | None = None) -> None:
        """``observer`` sees the scheduler's inputs and decisions (engine/core.py)."""
        self.cost = cost
        self.config = config
        self.sched = Scheduler(config.scheduler, block_size=config.block_size,
                               max_model_len=config.max_model_len)
        if config.check:  # check_integrity() after every scheduler call
            check = IntegrityCheck(self.sched)
            observer = check if observer is None else ObserverTee(observer, check)
        self.core = EngineCore(self.sched, observer)
        self.workers = [FakeWorker(w, config.vocab_size) for w in range(config.num_workers)]
        for w in range(config.num_workers):
            self.core.add_worker(w, SimWorker(self, self.workers[w]), config.num_blocks, 0.0)
        self.stream: Iterator[SimRequest] = iter(requests)
        self.idle = list(range(config.num_workers))
        self.in_flight: list[StepResult | None] = [None] * config.num_workers
        self.events: list[tuple[float, int, int, object]] = []  # (time, seq, kind, payload)
        self.seq = 0
        self.records: dict[str, RequestRecord] = {}
        self.followers: dict[str, list[SimRequest]] = {}  # by the request they wait for
        self.deferred: set[str] = set()  # followers seen in the stream, not yet arrived
        self.itl = array("d")
        self.num_steps = 0
        self.num_scheduled = 0
        self.busy_s = [0.0] * config.num_workers
        self.stream_s = cost.stream_s
        self.admit_delays = cost.admit_delays(config.noise_seed)
        self.spell = cost.spell_delays(config.noise_seed)  # delays by the local step ratio
        self.host_ratios = cost.host_ratios(config.noise_seed)
        # the least admission delay: requests are taken from the stream that long after
        # their arrival (a drawn delay beyond it is pushed as an event)
        self.admit_s = cost.admit_quantiles[0] if cost.admit_quantiles else cost.admit_s
        if self.spell is not None:
            self.admit_s = min(self.admit_s, self.spell.least)
        self.delay: dict[str, float] = {}  # request -> its drawn admission delay
        self.noise = cost.noise(config.num_workers, config.noise_seed)
        self.computing = [(0.0, 0.0)] * config.num_workers  # each worker's step: start, end

    def run(self) -> SimResult:
        start = time.perf_counter()
        events, now, heappop = self.events, 0.0, heapq.heappop
        nxt = next(self.stream, None)
        while nxt is not None or events:
            if nxt is not None and (not events or nxt.arrival_time + self.admit_s <= events[0][0]):
                now = max(now, nxt.arrival_time + self.admit_s)
                self._arrive(nxt, now)
                nxt = next(self.stream, None)
            else:
                now, _, kind, payload = heappop(events)
                if kind == _STEP:
                    self._complete(payload, now)  # type: ignore[arg-type]
                else:
                    self._admit(payload, now)  # type: ignore[arg-type]
            if self.idle:
                self._offer_steps(now)
        if self.sched.num_unfinished:
            raise RuntimeError(f"the scheduler stalled with {self.sched.num_unfinished} "
                               f"unfinished requests at t={now:.3f}s")
        return SimResult(list(self.records.values()), self.itl, self.num_steps,
                         self.num_scheduled, self.busy_s, now, self.sched.stats(),
                         time.perf_counter() - start)

    # ------------------------------------------------------------------ events

    def _arrive(self, req: SimRequest, now: float) -> None:
        """A request from the stream: admitted now, or, if it follows another request, once
        that one has finished and ``think_time`` has passed."""
        if not req.after:
            extra = self._delay(req, now) - self.admit_s
            if extra > 0:  # a drawn delay beyond the constant one: admitted later
                self._push(now + extra, _ARRIVAL, req)
            else:
                self._admit(req, now)
            return
        prev = self.records.get(req.after)
        if prev is None and req.after not in self.deferred:
            raise ValueError(f"request {req.request_id!r} follows {req.after!r}, which does not "
                             "come before it in the workload")
        self.deferred.add(req.request_id)
        if prev is None or prev.finish is None:
            self.followers.setdefault(req.after, []).append(req)
        else:
            self._push(max(now, prev.finish + req.think_time + self._delay(req, now)), _ARRIVAL,
                       req)

    def _admit(self, req: SimRequest, now: float) -> None:
        self.deferred.discard(req.request_id)
        if req.request_id in self.records:
            raise ValueError(f"duplicate request id {req.request_id!r} in the workload")
        self.records[req.request_id] = RequestRecord(
            req, now - self.delay.pop(req.request_id, self.admit_s))
        sampling = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True,
                                  seed=req.seed)
        self.core.add(EngineRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, sampling=sampling,
            priority=req.priority, arrival_time=now, tenant=req.tenant), now)
        if self.core.outputs:
            self._record(self.core.take_outputs(), now)

    def _offer_steps(self, now: float) -> None:
        core = self.core
        core.step(now, self.idle[:])
        if core.outputs:
            self._record(core.take_outputs(), now)

    def _started(self, plan: StepPlan, result: StepResult, shape: BatchShape,
                 now: float, cold: bool = False) -> None:
        """Worker ``plan.worker_id`` runs ``plan`` from ``now``; ``result`` is its answer,
        due when the cost model says (``cold``: the worker held no request before it)."""
        w = plan.worker_id
        self.idle.remove(w)
        dt = self.cost.step_time(*shape) + self.cost.extra_time(shape, cold)
        ratio = 1.0
        if self.noise is not None:
            ratio = self.noise(w, shape.prefill_tokens > 0)
            dt *= ratio
        if self.cost.overlap:
            dt = contended_time(self.computing, w, now, dt, self.cost.overlap)
        self.computing[w] = (now, now + dt)
        if self.spell is not None:
            self.spell.step(now + dt, ratio)
        result.execute_time_s = dt
        self.in_flight[w] = result
        self.seq += 1
        host = self.cost.host_time(plan.num_requests)
        if self.host_ratios is not None:
            host *= self.host_ratios()
        if self.noise is not None:
            host *= self.noise.host_factor(w)
        heapq.heappush(self.events, (now + dt + host, self.seq, _STEP, w))
        self.busy_s[w] += dt
        self.num_steps += 1
        self.num_scheduled += len(plan.new_requests) + len(plan.cached_requests)
        records = self.records
        for nr in plan.new_requests:
            rec = records[nr.request_id]
            rec.num_admissions += 1
            if rec.first_scheduled is None:
                rec.first_scheduled = now

    def _complete(self, w: int, now: float) -> None:
        result, self.in_flight[w] = self.in_flight[w], None
        assert result is not None
        core = self.core
        core.complete(w, result, now)
        if core.outputs:
            self._record(core.take_outputs(), now)
        self.idle.append(w)

    def _record(self, outputs: list[RequestOutput], now: float) -> None:
        records, append = self.records, self.itl.append
        now += self.stream_s  # when the client has them
        for out in outputs:
            rec = records[out.request_id]
            if out.new_token_ids:
                if rec.first_token is None:
                    rec.first_token = now
                    rec.num_cached_tokens = out.num_cached_tokens
                else:
                    append(now - rec.last_token)
                rec.last_token = now
                rec.num_output_tokens += len(out.new_token_ids)
            if out.finish_reason is not None:
                rec.finish = now
                rec.finish_reason = out.finish_reason
                rec.error = out.error
                for follower in self.followers.pop(out.request_id, ()):
                    at = now + follower.think_time
                    self._push(at + self._delay(follower, at), _ARRIVAL, follower)

    def _delay(self, req: SimRequest, now: float) -> float:
        """The request's admission delay: ``admit_s``, or a draw (kept for its record; with
        ``admit_spell``, by the local step ratio at ``now``)."""
        if self.spell is not None:
            d = self.delay[req.request_id] = self.spell.draw(now)
            return d
        if self.admit_delays is None:
            return self.admit_s
        d = self.delay[req.request_id] = self.admit_delays()
        return d

    def _push(self, at: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))


class SimWorker:
    """A simulated worker as the engine core drives it: ``submit`` runs the plan on its
    ``FakeWorker`` at once and schedules the step's end; the result reaches the core then
    (``Simulator._complete``)."""

    __slots__ = ("sim", "worker")

    def __init__(self, sim: Simulator, worker: FakeWorker) -> None:
        self.sim = sim
        self.worker = worker

    def ready(self) -> bool:
        return True

    def submit(self, plan: StepPlan, now: float) -> None:
        finished = plan.finished_request_ids
        cold = not any(rid not in finished for rid in self.worker.reqs)  # the recording's busy
        result, shape = self.worker.step(plan)
        self.sim._started(plan, result, shape, now, cold)


def instrument(sched: Scheduler) -> dict[str, list[float]]:
    """Time the scheduler's entry points on this instance: name -> [calls, seconds]."""
    timings: dict[str, list[float]] = {}
    for name in ("add", "schedule", "update", "drain_outputs"):
        timings[name] = [0, 0.0]
        setattr(sched, name, _timed(getattr(sched, name), timings[name]))
    return timings


def _timed(method: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        out = method(*args)
        acc[1] += time.perf_counter() - start
        acc[0] += 1
        return out

    return timed


def simulate(requests: Iterable[SimRequest], cost: CostModel, config: SimConfig) -> SimResult:
    """Run ``requests`` through a fresh scheduler and ``config.num_workers`` fake workers."""
    return Simulator(requests, cost, config).run()
