"""Scheduler cost per step (schedule plus update), per running request, in steady decode.

    python -m bench.scheduler --running 1024 --workers 8 [--steps 200] [--json]

N requests run on W workers (placed by the scheduler); after every prompt is prefilled, the
benchmark times ``schedule`` + ``update`` for every worker, step after step, with a trivial
fake worker answering (its cost is excluded). Requests never finish during the measurement;
KV blocks fill and get registered in the prefix cache as decode crosses block boundaries, as
in real serving. Prints ``us_per_request_step``: microseconds per running request per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from engine.config import SchedulerConfig
from engine.messages import EngineRequest, SamplingParams, StepResult
from engine.scheduler.scheduler import Scheduler


def build(num_running: int, num_workers: int, prompt_len: int, block_size: int,
          policy: str, placement: str, steps: int) -> Scheduler:
    per_worker = -(-num_running // num_workers)
    blocks_per_req = -(-(prompt_len + steps + 64) // block_size)
    cfg = SchedulerConfig(max_num_batched_tokens=max(8192, per_worker * prompt_len),
                          max_num_seqs=per_worker, policy=policy, placement=placement)
    sched = Scheduler(cfg, block_size=block_size, max_model_len=1 << 20)
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
        block_size: int = 16, policy: str = "fcfs", placement: str = "cache-aware") -> dict:
    sched = build(num_running, num_workers, prompt_len, block_size, policy, placement, steps)
    workers = sorted(sched.workers)
    for w in workers:  # prefill everything in one step per worker
        plan = sched.schedule(w, 0.0)
        sched.update(plan, fake_result(plan), 0.0)
    assert sum(len(ws.running) for ws in sched.workers.values()) == num_running
    per_step = []
    for step in range(steps):
        now = 1.0 + step
        elapsed = 0.0
        for w in workers:
            t0 = time.perf_counter()
            plan = sched.schedule(w, now)
            t1 = time.perf_counter()
            result = fake_result(plan)
            t2 = time.perf_counter()
            sched.update(plan, result, now)
            elapsed += (t1 - t0) + (time.perf_counter() - t2)
        per_step.append(elapsed)
    median = statistics.median(per_step)
    return {
        "running": num_running, "workers": num_workers, "steps": steps,
        "policy": policy, "placement": placement,
        "us_per_step": round(median * 1e6, 1),
        "us_per_request_step": round(median * 1e6 / num_running, 3),
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--policy", default="fcfs")
    p.add_argument("--placement", default="cache-aware")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = run(args.running, args.workers, args.steps, policy=args.policy, placement=args.placement)
    print(json.dumps(result) if args.json else
          f"{result['running']} running on {result['workers']} workers: "
          f"{result['us_per_step']} us per step, {result['us_per_request_step']} us per request-step")


if __name__ == "__main__":
    main()
