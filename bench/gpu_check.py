"""The Python half of ``bench/gpu_check.sh``: what its steps need beyond a plain command.

    python -m bench.gpu_check env --payload FILE [--copy-gib 8]      # step 1
    python -m bench.gpu_check serve --payload FILE [...] -- ENGINE_ARGS  # step 6
    python -m bench.gpu_check record --step N --name NAME --rc RC ...  # one step's JSON
    python -m bench.gpu_check summary OUTDIR                         # the targets, last
    python -m bench.gpu_check wheels [--dir .whl] [--limit-mib 64]  # what travels, checked

Every step of the script writes its result to ``OUTDIR/stepN_NAME.json`` as soon as it ends
(``record``), whether it passed, failed or ran out of time: ``{"step", "name", "status"
(ok / failed / timeout / skipped), "rc", "seconds", "limit_s", "results": {...}}``, where
``results`` holds what the step's commands wrote (JSON documents, pytest's JUnit XML turned
into counts and failure messages), each possibly partial. ``summary`` reads them back and
sets each headline figure beside its target (``TARGETS``) in ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench.gpu_wheels import wheels_command

REPO = Path(__file__).resolve().parents[1]
#: What the engine, the tests and the load generator import that a bare GPU machine (see
#: requirements/gpu-wheels.txt) may lack: module name -> distribution, checked in step 1.
IMPORTS = {
    "msgspec": "msgspec", "zmq": "pyzmq", "fastapi": "fastapi", "starlette": "starlette",
    "uvicorn": "uvicorn", "pydantic": "pydantic", "pydantic_core": "pydantic-core",
    "setproctitle": "setproctitle", "grpc": "grpcio", "grpc_tools": "grpcio-tools",
    "google.protobuf": "protobuf", "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection", "xgrammar": "xgrammar", "httpx": "httpx", "tqdm": "tqdm",
    "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers",
}
#: Exit codes of a command that ``timeout`` stopped (SIGTERM, then SIGKILL).
TIMEOUT_RCS = (124, 137)


def write_json(doc: Any, path: str | Path) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------- step 1


def copy_bandwidth(gib: float, device: str, reps: int = 10) -> dict[str, Any]:
    """A device-to-device copy of ``gib`` GiB: bytes read plus bytes written over the median
    time (events on CUDA, the host clock elsewhere), after two warm-up copies."""
    import torch

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    assert torch.equal(dst[:: max(1, n // 4096)], src[:: max(1, n // 4096)]), "copy mismatch"
    sec = statistics.median(times)
    return {"copy_bytes": n, "moved_bytes": 2 * n, "median_s": sec, "reps": reps,
            "tbps": 2 * n / sec / 1e12, "counted": "bytes read + bytes written"}


def matmul_rate(n: int, device: str, reps: int = 10) -> dict[str, Any]:
    """An n x n x n matrix product on random data (bf16 on CUDA, float32 elsewhere)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": sec,
            "tflops": 2 * n**3 / sec / 1e12}


def import_check() -> dict[str, str]:
    """Each module's version (or the error importing it), and the gRPC protos generated."""
    import importlib
    import importlib.metadata

    found: dict[str, str] = {}
    for module, dist in IMPORTS.items():
        try:
            mod = importlib.import_module(module)
            where = str(Path(getattr(mod, "__file__", "") or "?").parent)
            found[module] = f"{importlib.metadata.version(dist)} ({where})"
        except Exception as e:  # recorded, not raised: the step reports it
            found[module] = f"ERROR {type(e).__name__}: {e}"
    try:
        from engine.frontend import proto

        found["engine.frontend.proto"] = f"ok ({proto.SERVICE})"
    except Exception as e:
        found["engine.frontend.proto"] = f"ERROR {type(e).__name__}: {e}"
    return found


def env_command(args: argparse.Namespace) -> int:
    import torch

    doc: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        doc["triton"] = triton.__version__
    except ImportError as e:
        doc["triton"] = f"ERROR {e}"
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30,
                             check=False)
        doc["nvidia_smi"] = (smi.stdout + smi.stderr).splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        doc["nvidia_smi"] = [f"ERROR {type(e).__name__}: {e}"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc["device"] = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        doc |= {"device_name": props.name, "sm_count": props.multi_processor_count,
                "memory_bytes": props.total_memory, "capability": list(torch.cuda.
                                                                        get_device_capability()),
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    doc["imports"] = import_check()
    write_json(doc, args.payload)
    doc["copy"] = copy_bandwidth(args.copy_gib, device)
    write_json(doc, args.payload)
    doc["matmul"] = matmul_rate(args.matmul_n, device)
    write_json(doc, args.payload)
    print(f"{doc.get('device_name', device)}: copy {doc['copy']['tbps']:.3f} TB/s, "
          f"matmul {doc['matmul']['tflops']:.1f} TFLOP/s")
    bad = [m for m, v in doc["imports"].items() if v.startswith("ERROR")]
    if bad:
        print(f"imports failing: {bad}", file=sys.stderr)
    return 1 if bad else 0


# --------------------------------------------------------------------------- step 6


def serve_command(args: argparse.Namespace) -> int:
    """A random-weight model directory, the engine on it, and ``bench.loadgen`` at
    saturation (every request sent at once); the payload is rewritten after each phase."""
    from bench.engine_server import launched_engine
    from bench.loadgen import cli as loadgen
    from bench.random_model import hf_config, write_model_dir
    from engine.sim.workloads import WorkloadConfig, make_workload, write_jsonl

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the engine is stopped on a timeout
    doc: dict[str, Any] = {"preset": args.preset, "engine_args": args.engine_args}
    model_dir = Path(args.model_dir)
    doc["model_dir"] = write_model_dir(model_dir, args.preset, _device(args.device))
    write_json(doc, args.payload)
    cfg = hf_config(args.preset)
    work = Path(args.payload).parent
    workload = work / "serve_workload.jsonl"
    # shared-prefix with one request per group: every prompt is its own random ids.
    question = min(128, args.input_len // 2)
    wcfg = WorkloadConfig(
        name="shared-prefix", rate=float("inf"), groups=args.num_requests, per_group=1,
        system_len=args.input_len - question, question_len=question,
        output_len=args.output_len, vocab_size=cfg["vocab_size"],
        max_model_len=args.input_len + args.output_len + 1, seed=0)
    write_jsonl(make_workload(wcfg).requests(), workload)
    doc["workload"] = {"num_requests": args.num_requests, "input_len": args.input_len,
                       "output_len": args.output_len, "rate": "inf"}
    t0 = time.perf_counter()
    engine_args = ["--model", str(model_dir), "--served-model-name", "random",
                   *args.engine_args]
    with launched_engine(engine_args, stop_timeout_s=5) as (http_port, _):
        doc["launch_s"] = time.perf_counter() - t0
        write_json(doc, args.payload)
        result = work / "serve_loadgen.json"
        rc = loadgen.main(["run", "--url", f"http://127.0.0.1:{http_port}", "--workload-file",
                           str(workload), "--model", "random", "--timeout", "300",
                           "--label", f"{args.preset} random", "--json", str(result),
                           "--no-progress"])
    full = json.loads(result.read_text())
    doc["loadgen"] = {k: v for k, v in full.items() if k not in ("requests", "per_priority")}
    write_json(doc, args.payload)
    ok = rc == 0 and full["num_completed"] == args.num_requests
    return 0 if ok else 1


def _device(name: str) -> Any:
    import torch

    return torch.device(name)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- record


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the failing/skipped tests of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path}: no testsuite"
    cases: list[dict[str, Any]] = []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "") + "\n" + (el.text or "")
                break
        row = {"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0)}
        if outcome != "passed":
            row["message"] = message.strip()[:3000]
        cases.append(row)
    counts = {k: sum(c["outcome"] == k for c in cases)
              for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "seconds": float(suite.get("time") or 0), "tests": cases}


def record_command(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    for spec in args.payload:
        key, _, file = spec.partition("=")
        path = Path(file)
        if not path.is_file():
            results[key] = None
            continue
        try:
            results[key] = (junit_summary(path) if path.suffix == ".xml"
                            else json.loads(path.read_text()))
        except (ValueError, ET.ParseError, AssertionError) as e:
            results[key] = {"unreadable": f"{type(e).__name__}: {e}"}
    rc = args.rc
    status = ("skipped" if rc < 0 else "ok" if rc == 0
              else "timeout" if rc in TIMEOUT_RCS else "failed")
    doc = {"step": args.step, "name": args.name, "status": status, "rc": rc,
           "seconds": args.seconds, "limit_s": args.limit, "dry_run": args.dry_run,
           "results": results}
    write_json(doc, args.out)
    print(f"step {args.step} {args.name}: {status} (rc {rc}, {args.seconds} s of "
          f"{args.limit} s)")
    return 0


# --------------------------------------------------------------------------- summary

# The targets on an H200: (figure, key in headline_figures, target, comparison).
# {decode}, {prefill}, {small} and {large} are the shapes the summary was told to read.
TARGETS = (
    ("decode {decode} bf16, of the step-1 copy bandwidth", "decode_fraction", 0.85, ">="),
    ("prefill {prefill} causal bf16, TFLOP/s", "prefill_tflops", 450.0, ">="),
    ("decode step with graphs, batch {large}, x roofline", "graph_x_roofline_large", 1.3,
     "<="),
    ("graphs speed-up over eager, batch {small}", "graph_speedup_small", 2.0, ">="),
)


def _load_steps(outdir: Path) -> dict[str, dict[str, Any]]:
    steps = {}
    for path in sorted(outdir.glob("step*_*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        steps[doc["name"]] = doc
    return steps


def _res(steps: dict[str, dict[str, Any]], step: str, key: str) -> Any:
    return ((steps.get(step) or {}).get("results") or {}).get(key) or {}


def headline_figures(steps: dict[str, dict[str, Any]], decode: tuple[int, int],
                     prefill: tuple[int, int], small: int, large: int) -> dict[str, Any]:
    """The figures the targets are about, at the given shapes (batch, context) and model-step
    batches; None where a step did not produce them."""
    env = _res(steps, "env", "env")
    copy = (env.get("copy") or {}).get("tbps")
    figs: dict[str, Any] = {"device": env.get("device_name", env.get("device")),
                            "copy_tbps": copy,
                            "matmul_tflops": (env.get("matmul") or {}).get("tflops")}

    def row(doc: dict[str, Any], kind: str, batch: int, context: int) -> dict[str, Any]:
        return next((r for r in doc.get("rows", []) if (r["kind"], r["batch"], r["context"])
                     == (kind, batch, context)), {})

    dec = row(_res(steps, "kernels", "decode"), "decode", *decode)
    figs["decode_tbps"] = dec.get("triton_tbps")
    figs["decode_sdpa_tbps"] = dec.get("sdpa_tbps")
    figs["decode_fraction"] = dec["triton_tbps"] / copy if dec and copy else None
    pre = row(_res(steps, "kernels", "prefill"), "prefill", *prefill)
    figs["prefill_tflops"] = pre.get("triton_tflops")
    figs["prefill_sdpa_tflops"] = pre.get("sdpa_tflops")
    ext = row(_res(steps, "kernels", "extend"), "prefill", *prefill)
    figs["extend_tflops"] = ext.get("triton_tflops")
    figs["extend_prefix_len"] = ext.get("prefix_len")
    ms = {r["batch"]: r for r in _res(steps, "graphs", "model_step").get("results", [])}
    figs["graph_x_roofline_large"] = (ms.get(large) or {}).get("graph_x_roofline")
    one = ms.get(small) or {}
    figs["graph_speedup_small"] = (one["eager_ms"] / one["graph_ms"]
                                   if one.get("graph_ms") and one.get("eager_ms") else None)
    figs["model_step"] = {b: {k: r.get(k) for k in ("eager_ms", "graph_ms", "roofline_ms",
                                                    "graph_x_roofline")} for b, r in ms.items()}
    lg = _res(steps, "serve", "serve").get("loadgen") or {}
    figs["serve"] = {k: lg.get(k) for k in ("num_completed", "num_errors", "throughput_tok_s",
                                            "total_tok_s", "ttft_p50", "ttft_p99", "tpot_p50",
                                            "tpot_p99", "duration_s")}
    return figs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return "-" if v is None else str(v)


def summary_command(args: argparse.Namespace) -> int:
    outdir = Path(args.outdir)
    steps = _load_steps(outdir)
    figs = headline_figures(steps, args.decode, args.prefill, args.small, args.large)
    step_rows: list[dict[str, Any]] = _res(steps, "graphs", "model_step").get("results", [])
    context = step_rows[0]["context"] if step_rows else "?"
    shapes = {"decode": "x".join(map(str, args.decode)),
              "prefill": "x".join(map(str, args.prefill)),
              "small": f"{args.small} x {context}", "large": f"{args.large} x {context}"}
    matmul = _res(steps, "env", "env").get("matmul") or {}
    lines = [f"# gpu_check summary: {figs['device']}", "",
             "| step | status | seconds | tests passed/failed/skipped |", "|---|---|---|---|"]
    for doc in sorted(steps.values(), key=lambda d: d["step"]):
        counts = [r["counts"] for r in (doc.get("results") or {}).values()
                  if isinstance(r, dict) and "counts" in r]
        tests = "/".join(str(sum(c[k] + (c["error"] if k == "failed" else 0) for c in counts))
                         for k in ("passed", "failed", "skipped")) if counts else ""
        lines.append(f"| {doc['step']} {doc['name']} | {doc['status']} | {doc['seconds']} | "
                     f"{tests} |")
    lines += ["", f"copy bandwidth (read + written): {_fmt(figs['copy_tbps'])} TB/s; "
              f"{matmul.get('dtype', '?')} {matmul.get('n', '?')}^3 matmul: "
              f"{_fmt(figs['matmul_tflops'])} TFLOP/s", "",
              "| figure | measured | target | met |", "|---|---|---|---|"]
    met_all = True
    for label, key, target, cmp in TARGETS:
        value = figs.get(key)
        met: bool | None = None
        if value is not None:
            met = value >= target if cmp == ">=" else value <= target
            met_all &= met
        lines.append(f"| {label.format(**shapes)} | {_fmt(value)} | {cmp} {target:g} | "
                     f"{'-' if met is None else 'yes' if met else 'NO'} |")
    lines += ["", f"decode {shapes['decode']}: Triton {_fmt(figs['decode_tbps'])} TB/s, SDPA "
              f"{_fmt(figs['decode_sdpa_tbps'])} TB/s; prefill {shapes['prefill']}: Triton "
              f"{_fmt(figs['prefill_tflops'])}, SDPA {_fmt(figs['prefill_sdpa_tflops'])} "
              f"TFLOP/s; extend {shapes['prefill']} (prefix {_fmt(figs['extend_prefix_len'])}):"
              f" {_fmt(figs['extend_tflops'])} TFLOP/s",
              f"model step (ms): {json.dumps(figs['model_step'])}",
              f"serve: {json.dumps(figs['serve'])}"]
    text = "\n".join(lines) + "\n"
    (outdir / "summary.md").write_text(text)
    print(text)
    return 0


def _shape(text: str) -> tuple[int, int]:
    batch, _, context = text.partition("x")
    return int(batch), int(context)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="step 1: versions, nvidia-smi, copy bandwidth, imports")
    env.add_argument("--payload", required=True)
    env.add_argument("--copy-gib", type=float, default=8.0)
    env.add_argument("--matmul-n", type=int, default=8192)
    serve = sub.add_parser("serve", help="step 6: a random model served and loaded")
    serve.add_argument("--payload", required=True)
    serve.add_argument("--preset", default="llama3-8b")
    serve.add_argument("--model-dir", required=True)
    serve.add_argument("--device", default="cuda", help="where the random weights are drawn")
    serve.add_argument("--num-requests", type=int, default=256)
    serve.add_argument("--input-len", type=int, default=1024)
    serve.add_argument("--output-len", type=int, default=128)
    serve.add_argument("engine_args", nargs="*", help="after --: python -m engine.launch flags")
    rec = sub.add_parser("record", help="write one step's JSON")
    rec.add_argument("--step", type=int, required=True)
    rec.add_argument("--name", required=True)
    rec.add_argument("--rc", type=int, required=True)
    rec.add_argument("--seconds", type=int, required=True)
    rec.add_argument("--limit", type=int, required=True)
    rec.add_argument("--out", required=True)
    rec.add_argument("--dry-run", action="store_true")
    rec.add_argument("--payload", action="append", default=[], metavar="KEY=FILE",
                     help=".json documents or pytest .xml (JUnit) files; repeatable")
    summ = sub.add_parser("summary", help="the targets against the step files of OUTDIR")
    summ.add_argument("outdir")
    summ.add_argument("--decode", type=_shape, default=(64, 4096), metavar="BxC")
    summ.add_argument("--prefill", type=_shape, default=(8, 4096), metavar="BxC")
    summ.add_argument("--small", type=int, default=1, help="model-step batch of the speed-up")
    summ.add_argument("--large", type=int, default=64, help="model-step batch of the roofline")
    wh = sub.add_parser("wheels", help="check the wheels for the GPU machine")
    wh.add_argument("--dir", default=".whl")
    wh.add_argument("--limit-mib", type=float, default=64.0)
    return p.parse_args(argv)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "env": env_command, "serve": serve_command, "record": record_command,
    "summary": summary_command, "wheels": wheels_command,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
