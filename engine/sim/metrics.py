"""Serving metrics of a simulated run, defined as ``vllm bench serve`` defines them
(see ``../shared/WORKLOADS.md``); times in seconds.

- TTFT: first token time - arrival. TPOT: (E2E - TTFT) / (output tokens - 1), per request with
  at least 2 output tokens. ITL: every gap between two tokens of a request, pooled. E2E:
  finish - arrival. Each as p50, p90, p99 and mean (``ttft_p50`` ... ``ttft_mean``).
- Duration: first arrival to last finish. Throughput: output tokens / duration
  (``throughput_tok_s``), prompt + output tokens / duration (``total_tok_s``), completed
  requests / duration (``throughput_req_s``).
- Goodput (``goodput_req_s``): completed requests that met every SLO given (TTFT <= slo_ttft,
  TPOT <= slo_tpot) / duration; with no SLO it equals ``throughput_req_s``.
- Prefix hit rate: prompt tokens found in the prefix cache at (first) admission / prompt
  tokens, over completed requests.
- Preemptions: the scheduler's counter (``num_preemptions``) and the requests preempted at
  least once (``num_preempted_requests``).
- Per priority class (``classes``): critical (priority > 0), normal (0), sheddable (< 0).

Errored and aborted requests are counted (``num_errors``, ``num_aborted``), never dropped
silently; latency figures cover completed requests only.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.sim.simulator import RequestRecord, SimResult

PERCENTILES = (50, 90, 99)
COMPLETED = ("length", "stop")


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None


def distribution(prefix: str, values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """``{prefix}_p50``, ``_p90``, ``_p99`` and ``_mean`` of ``values`` (None when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"{prefix}_{k}": None for k in ("p50", "p90", "p99", "mean")}
    qs = np.percentile(arr, PERCENTILES)
    out: dict[str, float | None] = {f"{prefix}_p{p}": float(q)
                                    for p, q in zip(PERCENTILES, qs, strict=True)}
    out[f"{prefix}_mean"] = float(arr.mean())
    return out


def priority_class(priority: int) -> str:
    return "critical" if priority > 0 else "sheddable" if priority < 0 else "normal"


def request_metrics(records: Sequence[RequestRecord], slo: SLO, duration: float,
                    itl: array[float] | None = None) -> dict[str, Any]:
    """Latency, throughput, goodput, prefix and preemption figures of ``records``."""
    done = [r for r in records if r.finish_reason in COMPLETED and r.first_token is not None]
    ttft = np.array([r.first_token - r.arrival for r in done])  # type: ignore[operator]
    e2e = np.array([r.finish - r.arrival for r in done])  # type: ignore[operator]
    n_out = np.array([r.num_output_tokens for r in done], dtype=np.int64)
    multi = n_out > 1
    tpot = (e2e[multi] - ttft[multi]) / (n_out[multi] - 1)
    good = np.ones(len(done), dtype=bool)
    if slo.ttft_s is not None:
        good &= ttft <= slo.ttft_s
    if slo.tpot_s is not None:
        tpot_all = np.zeros(len(done))
        tpot_all[multi] = tpot
        good &= tpot_all <= slo.tpot_s
    prompt_tokens = sum(r.num_prompt_tokens for r in done)
    output_tokens = int(n_out.sum())
    per_s = 1.0 / duration if duration > 0 else math.nan
    out: dict[str, Any] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_errors": sum(r.finish_reason == "error" for r in records),
        "num_aborted": sum(r.finish_reason == "abort" for r in records),
        "num_unfinished": sum(r.finish_reason is None for r in records),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "throughput_tok_s": output_tokens * per_s,
        "total_tok_s": (prompt_tokens + output_tokens) * per_s,
        "throughput_req_s": len(done) * per_s,
        "goodput_req_s": int(good.sum()) * per_s,
        "slo_attainment": float(good.mean()) if len(done) else None,
        "prefix_hit_rate": (sum(r.num_cached_tokens for r in done) / prompt_tokens
                            if prompt_tokens else 0.0),
        "num_preempted_requests": sum(r.num_preemptions > 0 for r in records),
        "queue_time_mean": (float(np.mean([r.first_scheduled - r.arrival for r in done]))  # type: ignore[operator]
                            if done else None),
    }
    out.update(distribution("ttft", ttft))
    out.update(distribution("tpot", tpot))
    out.update(distribution("e2e", e2e))
    if itl is not None:
        out.update(distribution("itl", np.frombuffer(itl, dtype=np.float64)))
    return out


def summarize(result: SimResult, slo: SLO) -> dict[str, Any]:
    """Every metric of a run, overall and per priority class (classes that occur)."""
    records = result.records
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in records if r.finish is not None), default=start)
    duration = end - start
    out = request_metrics(records, slo, duration, result.itl)
    out["duration_s"] = duration
    out["num_preemptions"] = result.stats.num_preemptions
    out["num_steps"] = result.num_steps
    out["mean_batch_requests"] = result.num_scheduled / result.num_steps if result.num_steps else 0.0
    out["worker_utilization"] = (sum(result.busy_s) / (len(result.busy_s) * duration)
                                 if duration > 0 and result.busy_s else 0.0)
    out["wall_s"] = result.wall_s
    classes: dict[str, list[RequestRecord]] = {}
    for r in records:
        classes.setdefault(priority_class(r.priority), []).append(r)
    out["classes"] = {
        name: request_metrics(classes[name], slo, duration)
        for name in ("critical", "normal", "sheddable") if name in classes
    }
    return out
