"""Scheduler cost per step (schedule plus update), per running request, in steady decode.

    python -m bench.scheduler --running 1024 --workers 8 [--steps 200] [--prompt-len 64]
        [--json] [--compare-vllm] [--kv-events]

N requests run on W workers (placed by the scheduler); after every prompt is prefilled, the
benchmark times ``schedule`` + ``update`` for every worker, step after step, with a trivial
fake worker answering (its cost is excluded). Requests never finish during the measurement;
KV blocks fill and get registered in the prefix cache as decode crosses block boundaries, as
in real serving. ``us_per_step`` is the median of one worker's schedule + update over every
(step, worker), times W: on a shared machine a median per call shrugs off the time slices
other processes take, which a sum over the workers of one step would catch more often.
Prints ``us_per_request_step`` (``us_per_step`` / N: microseconds per running request per
step), ``us_per_step_mean`` (the mean: steps that register blocks included),
``cpu_us_per_step`` (the process's CPU time, every thread, per step of all W workers), and in
that state the median cost of one cache-aware ``add`` (placement over the W
workers) of a prompt whose first ``--prompt-len`` tokens one worker holds (``us_per_add_hit``)
and of one cached nowhere (``us_per_add_miss``), both ``--prompt-len`` + 192 tokens long.

``--kv-events`` records the scheduler's KV events and, after every ``update``, drains them and
hands them to a real ``KVEventPublisher`` (its thread encodes and sends them on an ipc PUB
socket nobody reads), as the pool does with ``--kv-events-config``; the drain and the hand-off
are timed with the step, and the thread competes for the interpreter as it does in the pool.

``--core`` drives the scheduler through the engine core (engine/core.py) as the pool does:
each worker's ``core.step(now, (w,))`` schedules and submits to a handle whose result comes
later, then ``core.complete(w, result, now)`` applies it; both are timed (the fake result is
not), so the figures include the core's own cost on the hot path.

``--record`` (alone) times the pool's step (``schedule``, the plan's encoding, the result's
decoding, ``update``) of a scheduler recording its decisions (``--record-decisions``) beside
a plain one, stepped alternately; docs/simulator.md holds its figures.

``--compare-vllm`` runs vLLM's own v1 scheduler (``vllm.v1.core.sched.scheduler.Scheduler``,
from the installed vLLM) on the same requests in the same process: one vLLM scheduler per
worker (a vLLM engine schedules one worker, or one data-parallel rank), each with the same
token budget, sequence cap, block size, KV blocks and prefix caching, and times
``schedule()`` + ``update_from_output()`` the same way (the fake ``ModelRunnerOutput`` is
excluded). Its config comes from the embedded default model's ``config.json``; no weights are
loaded. The JSON then also holds ``vllm_us_per_request_step``, ``vllm_us_per_add_hit`` and
``_miss`` (request construction with vLLM's block hashing plus ``add_request``; vLLM places
nothing and looks its cache up at admission) and ``vllm_ratio``: vLLM's cost per
request-step over ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from engine import ipc
from engine.config import KVEventsConfig, SchedulerConfig
from engine.core import EngineCore
from engine.kv_events import KVEventPublisher
from engine.messages import EngineRequest, SamplingParams, StepPlan, StepResult
from engine.scheduler.record import close_recording, open_scheduler, plan_encoder, result_tap
from engine.scheduler.scheduler import Scheduler


def build(num_running: int, num_workers: int, prompt_len: int, block_size: int,
          policy: str, placement: str, steps: int, kv_events: bool = False,
          record_path: str | None = None) -> Scheduler:
    per_worker = -(-num_running // num_workers)
    blocks_per_req = -(-(prompt_len + steps + 64) // block_size)
    cfg = SchedulerConfig(max_num_batched_tokens=max(8192, per_worker * prompt_len),
                          max_num_seqs=per_worker, policy=policy, placement=placement)
    sched = open_scheduler(cfg, block_size=block_size, max_model_len=1 << 20,
                           kv_events=kv_events, record_path=record_path)
    for w in range(num_workers):
        sched.add_worker(w, per_worker * blocks_per_req + 16, 0.0)
    sp = SamplingParams(max_tokens=1 << 30, temperature=0.0, ignore_eos=True)
    for i in range(num_running):
        prompt = tuple((i * 7919 + j * 31) % 32000 for j in range(prompt_len))
        sched.add(EngineRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sp), 0.0)
    return sched


def fake_result(plan) -> StepResult:
    ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
    return StepResult(step_id=plan.step_id, worker_id=plan.worker_id, request_ids=ids,
                      token_ids=[7] * len(ids))


def run(num_running: int, num_workers: int, steps: int = 200, prompt_len: int = 64,
        block_size: int = 16, policy: str = "fcfs", placement: str = "cache-aware",
        kv_events: bool = False, core: bool = False) -> dict:
    sched = build(num_running, num_workers, prompt_len, block_size, policy, placement, steps,
                  kv_events)
    with tempfile.TemporaryDirectory() as tmp:
        publisher = (KVEventPublisher(KVEventsConfig(endpoint=f"ipc://{tmp}/kv"), 0, block_size)
                     if kv_events else None)
        cpu = time.process_time()
        try:
            per_call = (_time_core_steps(sched, steps) if core
                        else _time_steps(sched, steps, publisher))
        finally:
            if publisher is not None:
                publisher.close()  # waits for its thread to send everything queued
        cpu = time.process_time() - cpu
    assert sum(len(ws.running) for ws in sched.workers.values()) == num_running
    median = statistics.median(per_call) * num_workers
    return {
        "running": num_running, "workers": num_workers, "steps": steps, "prompt_len": prompt_len,
        "policy": policy, "placement": placement, "kv_events": kv_events, "core": core,
        "us_per_step": round(median * 1e6, 1),
        "us_per_request_step": round(median * 1e6 / num_running, 3),
        # The mean keeps the steps in which decodes cross a block boundary (registrations).
        "us_per_step_mean": round(statistics.mean(per_call) * num_workers * 1e6, 1),
        # CPU time of the process (every thread: the KV events publisher's too) per step of
        # all workers, prefill step included: time other processes take is not counted.
        "cpu_us_per_step": round(cpu * 1e6 / steps, 1),
        "python": platform.python_version(),
    } | _add_figures("", time_adds(sched, prompt_len + ADD_TOKENS))


def _time_steps(sched: Scheduler, steps: int, publisher: KVEventPublisher | None) -> list[float]:
    """Seconds of each worker's schedule + update (+ the KV events' drain and hand-off)."""
    _prefill(sched)
    if publisher is not None:
        publisher.publish(sched.drain_kv_events(), 0.0)
    per_call = []
    for step in range(steps):
        per_call += _time_step(sched, 1.0 + step, publisher)
    return per_call


class _Deferred:
    """A handle keeping the plan, as the pool's socket does; the result comes later."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: StepPlan | None = None

    def ready(self) -> bool:
        return True

    def submit(self, plan: StepPlan, now: float) -> None:
        self.plan = plan


def _time_core_steps(sched: Scheduler, steps: int) -> list[float]:
    """``_time_steps`` through the engine core: seconds of each worker's ``core.step`` +
    ``core.complete``."""
    workers = sorted(sched.workers)
    handles = {w: _Deferred() for w in workers}
    core = EngineCore(sched, handles=handles)
    per_call = []
    for step in range(steps + 1):  # the first: prefill everything, untimed
        now = float(step)
        for w in workers:
            handle = handles[w]
            t0 = time.perf_counter()
            core.step(now, (w,))
            t1 = time.perf_counter()
            assert handle.plan is not None
            result = fake_result(handle.plan)
            t2 = time.perf_counter()
            core.complete(w, result, now)
            core.outputs.clear()  # the pool sends them once a turn
            if step:
                per_call.append((t1 - t0) + (time.perf_counter() - t2))
    return per_call


def _prefill(sched: Scheduler) -> None:
    for w in sorted(sched.workers):  # prefill everything in one step per worker
        plan = sched.schedule(w, 0.0)
        sched.update(plan, fake_result(plan), 0.0)


def _time_step(sched: Scheduler, now: float,
               publisher: KVEventPublisher | None = None) -> list[float]:
    per_call = []
    for w in sorted(sched.workers):
        t0 = time.perf_counter()
        plan = sched.schedule(w, now)
        t1 = time.perf_counter()
        result = fake_result(plan)
        t2 = time.perf_counter()
        sched.update(plan, result, now)
        if publisher is not None:
            publisher.publish(sched.drain_kv_events(), now)
        per_call.append((t1 - t0) + (time.perf_counter() - t2))
    return per_call


def run_record(num_running: int, num_workers: int, steps: int = 200, prompt_len: int = 64,
               block_size: int = 16, policy: str = "fcfs",
               placement: str = "cache-aware") -> dict:
    """The cost of ``--record-decisions`` to the pool: two schedulers on the same requests,
    one recording to a file, stepped alternately (so the machine's noise hits both alike).
    Each times one worker's pool step: ``schedule``, the plan's encoding for the worker
    (the recording one hands over the bytes it recorded), the result's decoding off the
    wire (the fake worker's encoding is not timed) and ``update`` (the recording one records
    the result's bytes as received). Reports the median of each and the recording's bytes
    per step."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "decisions.rec")
        plain = build(num_running, num_workers, prompt_len, block_size, policy, placement, steps)
        rec = build(num_running, num_workers, prompt_len, block_size, policy, placement, steps,
                    record_path=path)
        _prefill(plain)
        _prefill(rec)
        times: tuple[list[float], list[float]] = ([], [])
        for step in range(steps):
            for sched, acc in ((plain, times[0]), (rec, times[1])) if step % 2 else (
                    (rec, times[1]), (plain, times[0])):
                acc += _time_pool_step(sched, 1.0 + step)
        close_recording(rec)
        size = os.path.getsize(path)
    base, recorded = (statistics.median(t) * num_workers for t in times)
    return {"running": num_running, "workers": num_workers, "steps": steps,
            "us_per_step": round(base * 1e6, 1), "record_us_per_step": round(recorded * 1e6, 1),
            "record_overhead": round(recorded / base - 1, 4),
            "record_bytes_per_step": round(size / (steps + 1)),
            "python": platform.python_version()}


def _time_pool_step(sched: Scheduler, now: float) -> list[float]:
    """Seconds of each worker's step as the pool pays it (``run_record``)."""
    encode_plan = plan_encoder(sched, ipc.encode)
    tap = result_tap(sched)
    decode = ipc.WORKER_TO_POOL.decode
    per_call = []
    for w in sorted(sched.workers):
        t0 = time.perf_counter()
        plan = sched.schedule(w, now)
        assert plan is not None
        sent = encode_plan(plan)
        t1 = time.perf_counter()
        assert ipc.POOL_TO_WORKER.decode(sent) == plan
        data = ipc.encode(fake_result(plan))  # the worker's
        t2 = time.perf_counter()
        result = decode(data)
        assert isinstance(result, StepResult)
        if tap is not None:
            tap(result, data)
        sched.update(plan, result, now)
        per_call.append((t1 - t0) + (time.perf_counter() - t2))
    return per_call


ADD_TOKENS = 192  # new prompt tokens of each request ``time_adds`` adds


def _add_figures(prefix: str, times: tuple[float, float]) -> dict[str, float]:
    hit, miss = times
    return {f"{prefix}us_per_add_hit": round(hit * 1e6, 2),
            f"{prefix}us_per_add_miss": round(miss * 1e6, 2)}


def time_adds(sched: Scheduler, add_len: int, num: int = 256) -> tuple[float, float]:
    """(hit, miss): median seconds of one ``add`` of an ``add_len``-token prompt on the
    scheduler as the steps left it (every worker's cache holding the running requests'
    blocks), for prompts that start with a running request's prompt (placement finds that
    prefix cached on one worker and verifies it token by token) and for prompts cached
    nowhere, half of the ``num`` requests each. The requests are aborted afterwards."""
    running = [r for ws in sched.workers.values() for r in ws.running]
    sp = SamplingParams(max_tokens=16, temperature=0.0)
    times = []
    for i in range(num):
        fresh = tuple((i * 104729 + j * 17) % 32000 for j in range(add_len))
        prompt = fresh
        if i % 2 == 0:
            shared = running[i % len(running)].prompt_token_ids
            prompt = shared + fresh[len(shared):]
        req = EngineRequest(request_id=f"add{i}", prompt_token_ids=prompt, sampling=sp)
        t0 = time.perf_counter()
        sched.add(req, 2.0)
        times.append(time.perf_counter() - t0)
    sched.abort([f"add{i}" for i in range(num)], 2.0)
    return statistics.median(times[0::2]), statistics.median(times[1::2])


VLLM_MAX_MODEL_LEN = 2048  # the embedded default model's context


def run_vllm(num_running: int, num_workers: int, steps: int = 200, prompt_len: int = 64,
             block_size: int = 16) -> dict:
    """vLLM's v1 scheduler on ``run``'s requests and shapes; see the module docstring."""
    if prompt_len + max(steps, ADD_TOKENS) + 2 > VLLM_MAX_MODEL_LEN:
        raise ValueError(f"--compare-vllm: --prompt-len ({prompt_len}) + --steps ({steps}) must "
                         f"stay below the default model's context of {VLLM_MAX_MODEL_LEN} tokens")
    # vLLM logs to stdout, which --json keeps for its one line: quiet, and to stderr.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with contextlib.redirect_stdout(sys.stderr):
        schedulers, make_request = _vllm_schedulers(num_running, num_workers, prompt_len,
                                                    block_size, steps)
    per_worker = -(-num_running // num_workers)
    for i in range(num_running):  # the same prompts as ``build``, worker by worker
        prompt = [(i * 7919 + j * 31) % 32000 for j in range(prompt_len)]
        schedulers[i // per_worker].add_request(make_request(f"r{i}", prompt))
    for sched in schedulers:  # prefill everything in one step per worker
        out = sched.schedule()
        sched.update_from_output(out, _vllm_fake_output(out))
    assert sum(len(s.running) for s in schedulers) == num_running
    per_call = []
    for _ in range(steps):
        for sched in schedulers:
            t0 = time.perf_counter()
            out = sched.schedule()
            t1 = time.perf_counter()
            result = _vllm_fake_output(out)
            t2 = time.perf_counter()
            sched.update_from_output(out, result)
            per_call.append((t1 - t0) + (time.perf_counter() - t2))
    median = statistics.median(per_call) * num_workers
    return {
        "vllm_version": _vllm_version(),
        "vllm_us_per_step": round(median * 1e6, 1),
        "vllm_us_per_request_step": round(median * 1e6 / num_running, 3),
    } | _add_figures("vllm_", _time_vllm_adds(schedulers[0], make_request,
                                              prompt_len + ADD_TOKENS))


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def _vllm_schedulers(num_running: int, num_workers: int, prompt_len: int, block_size: int,
                     steps: int) -> tuple[list[Any], Callable[[str, list[int]], Any]]:
    """``num_workers`` vLLM schedulers configured like ``build``'s workers, and a function
    making a vLLM request (greedy, ignoring EOS, hashed for its prefix cache)."""
    import torch
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request as VllmRequest
    from vllm.v1.structured_output import StructuredOutputManager

    from engine.models.default import default_model_dir

    per_worker = -(-num_running // num_workers)
    num_blocks = per_worker * -(-(prompt_len + steps + 64) // block_size) + 16
    config = EngineArgs(
        model=str(default_model_dir()), skip_tokenizer_init=True,
        max_model_len=VLLM_MAX_MODEL_LEN, block_size=block_size, enable_prefix_caching=True,
        max_num_batched_tokens=max(8192, per_worker * prompt_len), max_num_seqs=per_worker,
        async_scheduling=False, disable_log_stats=True, enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,  # sizes nothing here: the KV config below does
    ).create_engine_config()
    config.cache_config.num_gpu_blocks = num_blocks + 1  # + vLLM's null block
    # The hash vLLM's engine core uses (the default, sha256), set up as it does.
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(block_size, hash_fn)
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1,
                             dtype=torch.float32)
    schedulers = [
        VllmScheduler(
            vllm_config=config,
            kv_cache_config=KVCacheConfig(num_blocks=num_blocks + 1, kv_cache_tensors=[],
                                          kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]),
            structured_output_manager=StructuredOutputManager(config),
            block_size=block_size, log_stats=False)
        for _ in range(num_workers)
    ]
    sampling = VllmSamplingParams(max_tokens=VLLM_MAX_MODEL_LEN, temperature=0.0,
                                  ignore_eos=True)

    def make_request(request_id: str, prompt: list[int]) -> Any:
        return VllmRequest(request_id=request_id, prompt_token_ids=prompt,
                           sampling_params=sampling, pooling_params=None,
                           arrival_time=0.0, block_hasher=hasher)

    return schedulers, make_request


def _vllm_fake_output(out: Any) -> Any:
    """A ``ModelRunnerOutput`` sampling token 7 for every scheduled request."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[7] for _ in ids])


def _time_vllm_adds(sched: Any, make_request: Callable[[str, list[int]], Any],
                    add_len: int, num: int = 256) -> tuple[float, float]:
    """``time_adds`` for vLLM: median seconds to build a request (hashing its blocks) and
    ``add_request`` it, with the same prompts; then they are aborted."""
    from vllm.v1.request import RequestStatus as VllmStatus

    running = list(sched.running)
    times = []
    for i in range(num):
        fresh = [(i * 104729 + j * 17) % 32000 for j in range(add_len)]
        prompt = fresh
        if i % 2 == 0:
            shared = running[i % len(running)].prompt_token_ids
            prompt = list(shared) + fresh[len(shared):]
        t0 = time.perf_counter()
        sched.add_request(make_request(f"add{i}", prompt))
        times.append(time.perf_counter() - t0)
    sched.finish_requests([f"add{i}" for i in range(num)], VllmStatus.FINISHED_ABORTED)
    return statistics.median(times[0::2]), statistics.median(times[1::2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=64,
                   help="prompt tokens of each running request (64)")
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--placement", default="cache-aware")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kv-events", action="store_true",
                   help="record KV events and publish them as the pool does")
    p.add_argument("--core", action="store_true",
                   help="drive the scheduler through the engine core, as the pool does")
    p.add_argument("--compare-vllm", action="store_true",
                   help="also run vLLM's v1 scheduler on the same requests")
    p.add_argument("--record", action="store_true",
                   help="only: the cost of --record-decisions to the pool's step (plan "
                   "encoding and result decoding included), a recording scheduler beside a "
                   "plain one")
    args = p.parse_args()
    if args.record:
        result = run_record(args.running, args.workers, args.steps, args.prompt_len,
                            policy=args.policy, placement=args.placement)
        print(json.dumps(result) if args.json else
              f"{result['running']} running on {result['workers']} workers: "
              f"{result['us_per_step']} us per step, {result['record_us_per_step']} us "
              f"recording ({result['record_overhead']:+.1%}), "
              f"{result['record_bytes_per_step']} bytes per step")
        return
    result = run(args.running, args.workers, args.steps, args.prompt_len, policy=args.policy,
                 placement=args.placement, kv_events=args.kv_events, core=args.core)
    if args.compare_vllm:
        result.update(run_vllm(args.running, args.workers, args.steps, args.prompt_len))
        result["vllm_ratio"] = round(result["vllm_us_per_request_step"]
                                     / result["us_per_request_step"], 2)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['running']} running on {result['workers']} workers"
          f"{' (KV events published)' if args.kv_events else ''}: "
          f"{result['us_per_step']} us per step, {result['us_per_request_step']} us per "
          f"request-step; add: {result['us_per_add_hit']} us (prefix cached on a worker), "
          f"{result['us_per_add_miss']} us (cached nowhere)")
    if args.compare_vllm:
        print(f"vLLM {result['vllm_version']} v1 scheduler, same requests: "
              f"{result['vllm_us_per_step']} us per step, {result['vllm_us_per_request_step']} "
              f"us per request-step ({result['vllm_ratio']}x ours), "
              f"add (no placement): {result['vllm_us_per_add_hit']} / "
              f"{result['vllm_us_per_add_miss']} us")


if __name__ == "__main__":
    main()
