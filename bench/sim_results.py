"""Three published results reproduced in the simulator, on the engine's own scheduler.

    python -m bench.sim_results chunked|lpm|vtc|all [--json] [--small]

- ``chunked`` (Sarathi-Serve): with a small token budget long prompts are computed in chunks
  between decodes, so decodes never wait behind a whole prompt: the time between tokens
  (TBT, here ITL) p99 drops, at some cost in TTFT. Same requests, one worker, budget 2048
  (every prompt in one step: no chunking) against 256.
- ``lpm`` (SGLang): ordering the waiting queue by the longest cached prefix (``--policy
  lpm``) groups requests that share a system prompt, so prefixes are reused before they
  are evicted: the prefix hit rate rises over FCFS. Shared-prefix requests all queued at
  once, one worker whose KV cache holds a few groups' prefixes.
- ``vtc`` (Sheng et al., "Fairness in Serving LLMs", OSDI 2024): the ``fair`` policy's
  service gap between two backlogged tenants stays within the paper's bound
  ``2 * max(w_p * L_input, w_q * M)`` (``w_p``, ``w_q``: prompt and output token weights,
  1 and 2; ``L_input``: the longest prompt; ``M``: the most tokens the batch can hold, the
  worker's KV capacity), where FCFS lets the tenant that came first take everything. The gap
  is the largest ``|W_a(t1, t2) - W_b(t1, t2)|`` over intervals in which both tenants have
  a request waiting, ``W`` the weighted tokens computed for a tenant.

Each prints one line per arm and whether the result holds; ``--small`` runs the tiny
workloads the tests use. docs/simulator.md has the figures and commands.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from typing import Any

from engine.config import SchedulerConfig
from engine.messages import EngineRequest, RequestOutput, StepPlan, StepResult
from engine.scheduler.policy import FairShare
from engine.scheduler.request import Request, RequestStatus
from engine.sim.cost_model import CostModel
from engine.sim.metrics import SLO, summarize
from engine.sim.simulator import SimConfig, Simulator
from engine.sim.workloads import SimRequest, WorkloadConfig, make_workload


def _run(requests: list[SimRequest], config: SimConfig) -> dict[str, Any]:
    return summarize(Simulator(requests, CostModel.load(None), config).run(), SLO())


def chunked(small: bool = False) -> dict[str, Any]:
    """ITL p99 with every prompt in one step (budget 2048) and chunked (budget 256)."""
    wl = WorkloadConfig(name="chat-long", rate=4.0 if small else 2.0,
                        duration=15.0 if small else 60.0, seed=1, max_model_len=2048,
                        scale=2.0 if small else 1.0)
    requests = list(make_workload(wl).requests())
    arms = {}
    for name, budget in (("whole prompts", 2048), ("chunked", 256)):
        cfg = SimConfig(num_workers=1, num_blocks=4096, max_model_len=2048,
                        scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                  max_num_seqs=64))
        m = _run(requests, cfg)
        arms[name] = {"budget": budget, "itl_p99": m["itl_p99"], "itl_p50": m["itl_p50"],
                      "ttft_p50": m["ttft_p50"], "num_requests": m["num_completed"]}
    return {"result": "chunked", "arms": arms,
            "holds": arms["chunked"]["itl_p99"] < arms["whole prompts"]["itl_p99"]}


def lpm(small: bool = False) -> dict[str, Any]:
    """Prefix hit rate of FCFS and LPM on shared-prefix requests all queued at once."""
    groups = 8 if small else 16
    wl = WorkloadConfig(name="shared-prefix", rate=float("inf"), groups=groups, per_group=8,
                        system_len=256, question_len=16, output_len=16, seed=2,
                        max_model_len=2048)
    requests = list(make_workload(wl).requests())
    arms = {}
    for policy in ("fcfs", "lpm"):
        cfg = SimConfig(num_workers=1, num_blocks=96, max_model_len=2048,
                        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8,
                                                  policy=policy))
        m = _run(requests, cfg)
        arms[policy] = {"prefix_hit_rate": m["prefix_hit_rate"], "ttft_p50": m["ttft_p50"],
                        "num_requests": m["num_completed"]}
    return {"result": "lpm", "arms": arms,
            "holds": arms["lpm"]["prefix_hit_rate"] > arms["fcfs"]["prefix_hit_rate"]}


def _tenant_requests(small: bool) -> list[SimRequest]:
    """Tenant ``a`` queues many requests first; ``b`` a few later (both at once, in order)."""
    rng = random.Random(3)
    n_a, n_b = (40, 20) if small else (200, 100)
    out = []
    for i in range(n_a + n_b):
        tenant = "a" if i < n_a else "b"
        prompt = tuple(rng.randrange(4096) for _ in range(rng.randint(32, 256)))
        out.append(SimRequest(request_id=f"{tenant}{i}", arrival_time=i * 1e-4,
                              prompt_token_ids=prompt, max_tokens=rng.randint(16, 128),
                              tenant=tenant, seed=i))
    return out


class ServiceGap:
    """Follows the weighted service of each tenant after every step and the largest gap
    over intervals in which both tenants have a waiting request."""

    def __init__(self, sim: Simulator, w_p: float, w_q: float) -> None:
        self.w_p, self.w_q = w_p, w_q
        self.requests: list[Request] = []
        self.low = self.high = 0.0  # min and max of W_a - W_b in the current backlog period
        self.gap = 0.0
        self.in_period = False
        sched = sim.sched
        add, update = sched.add, sched.update

        def traced_add(request: EngineRequest, now: float) -> list[RequestOutput]:
            out = add(request, now)
            if request.request_id in sched.requests:
                self.requests.append(sched.requests[request.request_id])
            return out

        def traced_update(plan: StepPlan, result: StepResult, now: float) -> list[RequestOutput]:
            out = update(plan, result, now)
            self.sample()
            return out

        sched.add = traced_add  # type: ignore[method-assign]
        sched.update = traced_update  # type: ignore[method-assign]

    def sample(self) -> None:
        service = {"a": 0.0, "b": 0.0}
        waiting = {"a": False, "b": False}
        for r in self.requests:
            prompt = min(r.num_computed_tokens, r.num_prompt_tokens)
            if r.status is RequestStatus.FINISHED:
                prompt = r.num_prompt_tokens
            service[r.tenant] += self.w_p * prompt + self.w_q * len(r.output_token_ids)
            waiting[r.tenant] |= r.status is RequestStatus.WAITING
        diff = service["a"] - service["b"]
        if waiting["a"] and waiting["b"]:
            if not self.in_period:
                self.low = self.high = diff
            self.in_period = True
            self.low, self.high = min(self.low, diff), max(self.high, diff)
            self.gap = max(self.gap, self.high - self.low)
        else:
            self.in_period = False


def vtc(small: bool = False) -> dict[str, Any]:
    """The largest service gap of FCFS and of ``fair``, against the VTC bound."""
    requests = _tenant_requests(small)
    num_blocks, block_size = 64, 16
    w_p, w_q = FairShare.prompt_weight, FairShare.output_weight
    longest = max(len(r.prompt_token_ids) for r in requests)
    bound = 2 * max(w_p * longest, w_q * num_blocks * block_size)
    arms = {}
    for policy in ("fcfs", "fair"):
        cfg = SimConfig(num_workers=1, num_blocks=num_blocks, block_size=block_size,
                        max_model_len=2048,
                        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16,
                                                  policy=policy))
        sim = Simulator(requests, CostModel.load(None), cfg)
        tracker = ServiceGap(sim, w_p, w_q)
        sim.run()
        arms[policy] = {"max_service_gap": tracker.gap, "bound": bound,
                        "within_bound": tracker.gap <= bound}
    return {"result": "vtc", "arms": arms, "bound": bound,
            "holds": arms["fair"]["within_bound"] and not arms["fcfs"]["within_bound"]}


RESULTS: dict[str, Callable[[bool], dict[str, Any]]] = {"chunked": chunked, "lpm": lpm,
                                                         "vtc": vtc}


def _line(report: dict[str, Any]) -> str:
    arms = "; ".join(f"{name}: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fig.items())
        for name, fig in report["arms"].items())
    return f"{report['result']}: {arms} -> {'holds' if report['holds'] else 'DOES NOT HOLD'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_results",
                                description=__doc__.split("\n")[0])
    p.add_argument("result", choices=[*RESULTS, "all"])
    p.add_argument("--small", action="store_true", help="the tests' tiny workloads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = list(RESULTS) if args.result == "all" else [args.result]
    reports = [RESULTS[name](args.small) for name in names]
    for r in reports:
        print(json.dumps(r) if args.json else _line(r))
    return 0 if all(r["holds"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
