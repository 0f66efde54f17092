"""PNG figures from result JSONs of ``python -m bench.loadgen run``.

    python -m bench.loadgen plot a.json b.json ... -o outdir

A result's ``label`` (``run --label``) names its series: a server or a configuration.

- ``latency_cdf.png``: CDFs of TTFT, TPOT and E2E over completed requests, one line per result;
- ``rate.png``: output throughput and TTFT p50 / p99 against request rate, one line per label
  (results at rate inf are left out: they have no rate to place them at);
- ``ttft_by_priority.png``: TTFT p50 and p99 per priority class, per result;
- ``prefix_hit_rate.png``: the prefix hit rate per result (e.g. one per placement policy).

A figure is written only when some result has its data. Figures are drawn on ``Figure``
objects (the Agg canvas), not through pyplot, so no global state or display is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

Result = Mapping[str, Any]
_CLASSES = ("critical", "normal", "sheddable")


def plot_all(results: Sequence[Result], outdir: str | Path) -> list[Path]:
    """Write every figure that has data into ``outdir``; returns the files written."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[Sequence[Result]], Figure | None]] = {
        "latency_cdf.png": latency_cdfs,
        "rate.png": rate_curves,
        "ttft_by_priority.png": ttft_by_priority,
        "prefix_hit_rate.png": prefix_hit_rates,
    }
    written = []
    for name, draw in figures.items():
        fig = draw(results)
        if fig is not None:
            fig.savefig(out / name, dpi=120)
            written.append(out / name)
    return written


def result_names(results: Sequence[Result]) -> list[str]:
    """One legend name per result: its label, with its rate when labels repeat."""
    labels = [str(r.get("label", "?")) for r in results]
    return [f"{label} @ {_rate_text(r)}" if labels.count(label) > 1 else label
            for label, r in zip(labels, results, strict=True)]


def latency_cdfs(results: Sequence[Result]) -> Figure | None:
    metrics = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
    if not any(_completed(r, "ttft_s").size for r in results):
        return None
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, 3), metrics, strict=True):
        for name, r in zip(result_names(results), results, strict=True):
            values = np.sort(_completed(r, key)) * 1e3
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                        label=name)
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction of requests",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    return fig


def rate_curves(results: Sequence[Result]) -> Figure | None:
    series: dict[str, list[Result]] = {}
    for r in results:
        if _finite_rate(r) is not None:
            series.setdefault(str(r.get("label", "?")), []).append(r)
    if not series:
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    tput, ttft = fig.subplots(1, 2)
    for label, runs in series.items():
        runs = sorted(runs, key=lambda r: _finite_rate(r) or 0.0)
        rates = [_finite_rate(r) for r in runs]
        tput.plot(rates, [r["throughput_tok_s"] for r in runs], "o-", label=label)
        line, = ttft.plot(rates, [_ms(r["ttft_p50"]) for r in runs], "o-", label=f"{label} p50")
        ttft.plot(rates, [_ms(r["ttft_p99"]) for r in runs], "s--", color=line.get_color(),
                  label=f"{label} p99")
    tput.set(title="output throughput", xlabel="request rate (req/s)", ylabel="tokens/s")
    ttft.set(title="TTFT", xlabel="request rate (req/s)", ylabel="ms")
    for ax in (tput, ttft):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def ttft_by_priority(results: Sequence[Result]) -> Figure | None:
    classes = [c for c in _CLASSES if any(c in r.get("per_priority", {}) for r in results)]
    if not classes:
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    names = result_names(results)
    x = np.arange(len(results))
    width = 0.8 / len(classes)
    for ax, stat in zip(fig.subplots(1, 2), ("p50", "p99"), strict=True):
        for i, cls in enumerate(classes):
            values = [_ms(r.get("per_priority", {}).get(cls, {}).get(f"ttft_{stat}"))
                      for r in results]
            ax.bar(x + (i - (len(classes) - 1) / 2) * width, values, width, label=cls)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set(title=f"TTFT {stat} by priority class", ylabel="ms")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", ncols=len(classes))
    return fig


def prefix_hit_rates(results: Sequence[Result]) -> Figure | None:
    pairs = [(name, r["prefix_hit_rate"]) for name, r in zip(result_names(results), results,
                                                             strict=True)
             if r.get("prefix_hit_rate") is not None]
    if not pairs:
        return None
    fig = Figure(figsize=(max(4.0, 1.2 * len(pairs) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar([n for n, _ in pairs], [100 * v for _, v in pairs])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set(title="prefix hit rate (cached / prompt tokens)", ylabel="%", ylim=(0, 105))
    ax.tick_params(axis="x", rotation=20)
    return fig


def _completed(result: Result, key: str) -> np.ndarray:
    return np.array([q[key] for q in result.get("requests", [])
                     if q["outcome"] == "completed" and q[key] is not None], dtype=np.float64)


def _finite_rate(result: Result) -> float | None:
    rate = result.get("request_rate")
    return float(rate) if isinstance(rate, int | float) and math.isfinite(rate) else None


def _rate_text(result: Result) -> str:
    rate = _finite_rate(result)
    return f"{rate:g} req/s" if rate is not None else f"rate {result.get('request_rate')}"


def _ms(seconds: float | None) -> float:
    return math.nan if seconds is None else seconds * 1e3
