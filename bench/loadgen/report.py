"""A run's result object as a readable summary (latencies in milliseconds)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_LATENCIES = ("ttft", "tpot", "itl", "e2e")
_CLASS_COLUMNS = (("requests", "num_requests"), ("done", "num_completed"), ("429", "num_429"),
                  ("timeouts", "num_timeouts"), ("errors", "num_errors"))
_CLASS_LATENCIES = ("ttft_p50", "ttft_p99", "tpot_p50", "e2e_p99")


def format_summary(result: Mapping[str, Any]) -> str:
    """Header lines, a latency table and, when several classes occur, a per-priority table."""
    lines = [*_header(result), "", *_latency_table(result)]
    classes = result.get("per_priority", {})
    if set(classes) - {"normal"}:
        lines += ["", *_priority_table(classes)]
    if result.get("errors"):
        lines += ["", "errors (most frequent):"]
        lines += [f"  {n:6d}  {message}" for message, n in result["errors"].items()]
    return "\n".join(lines)


def _header(r: Mapping[str, Any]) -> list[str]:
    slos = ", ".join(f"{k} <= {v:g} s" for k, v in r["slo"].items()) or "no SLO"
    hit = r["prefix_hit_rate"]
    return [
        f"{r['label']}: {r['num_requests']} requests of {r['workload_file']} at "
        f"{_rate(r['request_rate'])} to {r['url']} ({r['model']}) in {r['duration_s']:.1f} s",
        f"outcomes    {r['num_completed']} completed, {r['num_429']} HTTP 429, "
        f"{r['num_timeouts']} timeouts, {r['num_errors']} errors",
        f"throughput  {r['request_throughput']:.2f} req/s, {r['throughput_tok_s']:.1f} output "
        f"tok/s, {r['total_tok_s']:.1f} total tok/s",
        f"goodput     {r['goodput_req_s']:.2f} req/s ({slos})",
        f"prefix hit  {'not reported' if hit is None else f'{hit:.1%}'}",
        f"send delay  at most {r['send_delay_max_s'] * 1e3:.0f} ms after due",
    ]


def _latency_table(r: Mapping[str, Any]) -> list[str]:
    lines = [f"{'ms':<6}" + "".join(f"{k:>10}" for k in ("p50", "p90", "p99", "mean"))]
    for name in _LATENCIES:
        cells = (_ms(r[f"{name}_{k}"]) for k in ("p50", "p90", "p99", "mean"))
        lines.append(f"{name.upper():<6}" + "".join(f"{c:>10}" for c in cells))
    return lines


def _priority_table(classes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    heads = [h for h, _ in _CLASS_COLUMNS] + [f"{k} ms" for k in _CLASS_LATENCIES]
    lines = [f"{'class':<10}" + "".join(f"{h:>13}" for h in heads)]
    for name, m in classes.items():
        cells = [str(m[key]) for _, key in _CLASS_COLUMNS] + [_ms(m[k]) for k in _CLASS_LATENCIES]
        lines.append(f"{name:<10}" + "".join(f"{c:>13}" for c in cells))
    return lines


def _rate(rate: float | str) -> str:
    return f"{rate:.3g} req/s" if isinstance(rate, float | int) else f"rate {rate}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"
