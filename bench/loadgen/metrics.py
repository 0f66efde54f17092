"""The summary of a run, with the metrics of ``vllm bench serve`` (``../shared/WORKLOADS.md``).

Times in seconds. Latencies cover completed requests; every request is counted in exactly one
outcome (``num_completed``, ``num_429``, ``num_timeouts``, ``num_errors``), none is dropped.

- TTFT: send to first token event. E2E: send to last token event. TPOT: (E2E - TTFT) /
  (output tokens - 1), over requests with at least 2 output tokens. ITL: every gap between two
  token events of a request, pooled over requests. Each as ``_p50``, ``_p90``, ``_p99``,
  ``_mean``.
- Throughputs over the run's duration (start to the end of the last request):
  ``request_throughput`` (completed requests/s), ``throughput_tok_s`` (output tokens/s),
  ``total_tok_s`` (prompt + output tokens/s), of completed requests.
- Goodput (``goodput_req_s``): completed requests that met every SLO given (``ttft``,
  ``tpot``, ``e2e``: each request's value <= the bound; a request with one output token has
  TPOT 0, as in vLLM) per second; with no SLO it equals ``request_throughput``.
- ``prefix_hit_rate``: cached prompt tokens / prompt tokens, over completed requests whose
  server reported ``cached_tokens``; None when none did.
- ``send_delay_max_s``: the latest a request was sent after it was due: a large value means the
  client (or ``--max-concurrency``) held requests back and the offered rate was not met.
- ``per_priority``: the same per class, critical (priority > 0), normal (0), sheddable (< 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bench.loadgen.client import COMPLETED, ERROR, RATE_LIMITED, TIMEOUT, RequestRecord
from engine.sim.metrics import distribution, priority_class

SLO_METRICS = ("ttft", "tpot", "e2e")
PRIORITY_CLASSES = ("critical", "normal", "sheddable")


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slos: Mapping[str, float]) -> dict[str, Any]:
    """Every metric of a run, overall and ``per_priority`` (the classes that occur)."""
    out = class_metrics(records, duration_s, slos)
    errors = Counter(r.error[:120] for r in records if r.outcome == ERROR)
    out["errors"] = dict(errors.most_common(10))  # the most frequent messages, to diagnose
    by_class: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_class.setdefault(priority_class(r.priority), []).append(r)
    out["per_priority"] = {name: class_metrics(by_class[name], duration_s, slos)
                           for name in PRIORITY_CLASSES if name in by_class}
    return out


def class_metrics(records: Sequence[RequestRecord], duration_s: float,
                  slos: Mapping[str, float]) -> dict[str, Any]:
    """Outcome counts, throughputs, goodput and latency distributions of ``records``."""
    outcomes = Counter(r.outcome for r in records)
    done = [r for r in records if r.outcome == COMPLETED]
    prompt_tokens = sum(r.num_prompt_tokens for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    num_good = sum(meets_slos(r, slos) for r in done)
    reported = [r for r in done if r.num_cached_tokens is not None]
    reported_prompt = sum(r.num_prompt_tokens for r in reported)
    out: dict[str, Any] = {
        "num_requests": len(records),
        "num_completed": outcomes[COMPLETED],
        "num_429": outcomes[RATE_LIMITED],
        "num_timeouts": outcomes[TIMEOUT],
        "num_errors": outcomes[ERROR],
        "rate_429": outcomes[RATE_LIMITED] / len(records) if records else 0.0,
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "throughput_tok_s": output_tokens / duration_s,
        "total_tok_s": (prompt_tokens + output_tokens) / duration_s,
        "goodput_req_s": num_good / duration_s,
        "slo_attainment": num_good / len(done) if done else None,
        "prefix_hit_rate": (sum(r.num_cached_tokens or 0 for r in reported) / reported_prompt
                            if reported_prompt else None),
        "send_delay_max_s": max((r.sent_s - r.scheduled_s for r in records), default=0.0),
    }
    # (a completed request has a token, so every one has a TTFT and an E2E)
    out.update(distribution("ttft", [r.ttft_s for r in done if r.ttft_s is not None]))
    out.update(distribution("tpot", [r.tpot_s for r in done if r.tpot_s is not None]))
    out.update(distribution("itl", [gap for r in done for gap in r.itl_s]))
    out.update(distribution("e2e", [r.e2e_s for r in done if r.e2e_s is not None]))
    out.update(distribution("retry_after", [r.retry_after_s for r in records
                                            if r.retry_after_s is not None]))
    return out


def meets_slos(rec: RequestRecord, slos: Mapping[str, float]) -> bool:
    """Whether a completed request met every SLO in ``slos`` (keys of ``SLO_METRICS``)."""
    assert rec.ttft_s is not None and rec.e2e_s is not None  # completed: it has tokens
    values = {"ttft": rec.ttft_s, "tpot": rec.tpot_s or 0.0, "e2e": rec.e2e_s}
    return all(values[name] <= bound for name, bound in slos.items())


def parse_slo(text: str) -> tuple[str, float]:
    """``ttft=0.5`` -> ("ttft", 0.5): a metric of ``SLO_METRICS`` and a bound in seconds."""
    name, sep, value = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in SLO_METRICS:
        raise ValueError(f"--slo: expected METRIC=SECONDS with METRIC in {SLO_METRICS}, "
                         f"got {text!r}")
    try:
        bound = float(value)
    except ValueError:
        raise ValueError(f"--slo: {text!r}: {value!r} is not a number of seconds") from None
    if not bound > 0:
        raise ValueError(f"--slo: {text!r}: the bound must be > 0")
    return name, bound
