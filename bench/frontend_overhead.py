"""The frontend's overhead per request and per streamed token: the same requests, one at a
time, in-process (``engine.LLM``), over gRPC and over HTTP (streaming SSE), side by side.

    python -m bench.frontend_overhead [--num-requests 20] [--max-tokens 64] [--json]
    python -m bench.frontend_overhead --cpu [--max-tokens 64] [--json]

Per request: the median latency of a 1-token request through each API minus in-process.
Per token: the median of (latency of a ``--max-tokens`` request minus the 1-token latency)
over the extra tokens, through each API against in-process. Requests are sequential, so the
figures are the cost one request pays (tokenization, two process hops, detokenization, JSON
or protobuf, the event loop), not throughput under load. Every request ignores EOS. The
APIs take turns request by request, so load from other jobs on a shared machine falls on
all of them alike.

``--cpu``: the frontend process's own CPU time per request by kind (400, early 429, a whole
request) and per streamed token, under fixed-rate load from a client that is not the
bottleneck (``bench.frontend_cpu``).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from collections.abc import Callable

import grpc
import httpx

from bench import frontend_cpu
from bench.engine_server import launched_engine
from engine import LLM, SamplingParams
from engine.frontend.proto import pb2, pb2_grpc

PROMPT = "def read_config(path):"


def one(fn: Callable[[int], int], max_tokens: int) -> float:
    start = time.perf_counter()
    produced = fn(max_tokens)
    elapsed = time.perf_counter() - start
    assert produced == max_tokens, (produced, max_tokens)
    return elapsed


def in_process(llm: LLM) -> Callable[[int], int]:
    def run(max_tokens: int) -> int:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return len(llm.generate([PROMPT], sp)[0].token_ids)
    return run


def over_grpc(port: int) -> Callable[[int], int]:
    stub = pb2_grpc.EngineStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def run(max_tokens: int) -> int:
        req = pb2.GenerateRequest(prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                  ignore_eos=True)
        return sum(len(m.token_ids) for m in stub.Generate(req, timeout=120))
    return run


def over_http(port: int) -> Callable[[int], int]:
    # TCP_NODELAY as curl and asyncio set it: httpx's sync transport writes headers and body
    # separately, and Nagle's algorithm against the server's delayed ACK adds ~40 ms.
    transport = httpx.HTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, transport=transport)

    def run(max_tokens: int) -> int:
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        usage = None
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        assert usage is not None
        return int(usage["completion_tokens"])
    return run


def run(n: int, max_tokens: int, launch_args: list[str]) -> dict[str, dict[str, float]]:
    threads = launch_args[launch_args.index("--num-threads") + 1] if (
        "--num-threads" in launch_args) else None
    llm = LLM(num_threads=int(threads)) if threads else LLM()  # as the engine's worker
    with launched_engine(launch_args) as (http_port, grpc_port):
        apis = {"in_process": in_process(llm), "grpc": over_grpc(grpc_port),
                "http": over_http(http_port)}
        times: dict[str, dict[int, list[float]]] = {api: {1: [], max_tokens: []} for api in apis}
        for fn in apis.values():  # warm-up
            one(fn, max_tokens)
        for _ in range(n):
            for length in (1, max_tokens):
                for api, fn in apis.items():
                    times[api][length].append(one(fn, length))
    results = {}
    for api, by_length in times.items():
        short, long = (statistics.median(by_length[k]) for k in (1, max_tokens))
        results[api] = {"request_ms": 1e3 * short,
                        "per_token_ms": 1e3 * (long - short) / (max_tokens - 1)}
    base = results["in_process"]
    for api in ("grpc", "http"):
        r = results[api]
        r["request_overhead_ms"] = r["request_ms"] - base["request_ms"]
        r["token_overhead_ms"] = r["per_token_ms"] - base["per_token_ms"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=20, help="timed requests per case")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens of the long requests")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--cpu", action="store_true", help="the frontend's CPU per request kind "
                   "and per streamed token (bench.frontend_cpu)")
    p.add_argument("launch_args", nargs="*", help="extra flags for engine.launch (after --)")
    args = p.parse_args()
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2")
    if args.cpu:
        cpu = frontend_cpu.run(args.launch_args, max_tokens=args.max_tokens)
        if args.json:
            print(json.dumps(cpu, indent=2))
        else:
            frontend_cpu.report(cpu)
        return
    results = run(args.num_requests, args.max_tokens, args.launch_args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'api':<12}{'1-token request ms':>20}{'per token ms':>14}"
          f"{'request overhead ms':>21}{'token overhead ms':>19}")
    for api, r in results.items():
        print(f"{api:<12}{r['request_ms']:>20.2f}{r['per_token_ms']:>14.3f}"
              f"{r.get('request_overhead_ms', 0.0):>21.2f}{r.get('token_overhead_ms', 0.0):>19.3f}")


if __name__ == "__main__":
    main()
