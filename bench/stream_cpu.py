"""The frontend's CPU per streamed token with many streams at once, as at saturation: the
real HTTP frontend (uvicorn, the OpenAI app, the pool client, the output tails) over a pool
stub that sends one ``PoolOutputs`` per step with one token for every running request, as
the real pool does when it decodes a full batch.

    python -m bench.stream_cpu [--streams 64] [--tokens 64] [--rounds 3] [--profile FILE]

Each round sends ``--streams`` streamed requests at once from another process
(``bench.flood_client --burst``), first with 1 token each, then with ``--tokens``; the
frontend's event-loop thread's CPU time (``time.thread_time`` read on the loop) for each,
and per streamed token ``(cpu_long - cpu_short) / (streams * (tokens - 1))``. The pool stub
runs in a thread of its own (its CPU is not counted), stepping every ``--step-ms``. The
tokenizer is the default model's (a byte-level BPE); the stub samples ids uniformly.
``--profile FILE``: cProfile of the loop thread over the long rounds (``pstats`` file).
Medians of the rounds are printed; the pool hop and the client are outside the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

from engine import ipc
from engine.config import FrontendConfig, ModelConfig
from engine.frontend.admission import Admission
from engine.frontend.http_server import start_http_server
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.pool_client import PoolClient
from engine.frontend.serving import ModelRegistry, ServedModel
from engine.messages import AbortRequests, AddRequest, PoolOutputs, PoolStats, RequestOutput
from engine.models.info import load_model_info

MODEL_DIR = Path(__file__).resolve().parent.parent / "engine" / "models" / "tiny_stdlib_llama"


class StepPool:
    """A pool stub: every ``step_s``, one message with one token for each running request."""

    def __init__(self, run_dir: str, vocab: int, step_s: float) -> None:
        self.run_dir, self.vocab, self.step_s = run_dir, vocab, step_s
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        addrs = ipc.pool_addresses(self.run_dir, 0)
        pull = ipc.make_socket(ctx, zmq.PULL, addrs.requests, bind=True)
        push = ipc.make_socket(ctx, zmq.PUSH, addrs.outputs, bind=True)
        self._bound.set()
        rng = random.Random(0)
        active: dict[str, list[int]] = {}  # id -> [sent, max_tokens, prompt length]
        stats = PoolStats(live_workers=1, pool_incarnation=1)
        next_step = time.monotonic()
        while not self._stop.is_set():
            while pull.poll(0):
                msg = ipc.FRONTEND_TO_POOL.decode(pull.recv())
                if isinstance(msg, AddRequest):
                    r = msg.request
                    active[r.request_id] = [0, r.sampling.max_tokens, len(r.prompt_token_ids)]
                elif isinstance(msg, AbortRequests):
                    for rid in msg.request_ids:
                        active.pop(rid, None)
            outs = []
            for rid, a in list(active.items()):
                a[0] += 1
                finish = "length" if a[0] >= a[1] else None
                if finish:
                    del active[rid]
                outs.append(RequestOutput(request_id=rid, new_token_ids=[rng.randrange(
                    3, self.vocab)], finish_reason=finish, num_prompt_tokens=a[2]))
            push.send(ipc.encode(PoolOutputs(outputs=outs, stats=msgspec.structs.replace(
                stats, num_running=len(active)))))
            next_step += self.step_s
            time.sleep(max(0.0, next_step - time.monotonic()))
        pull.close()
        push.close()
        ctx.term()


async def burst(port: int, streams: int, tokens: int, out: str) -> float:
    """Loop-thread CPU seconds while ``streams`` streamed requests of ``tokens`` run."""
    cmd = [sys.executable, "-m", "bench.flood_client", "--port", str(port), "--burst",
           str(streams), "--stream", "--max-tokens", str(tokens), "--prompt",
           "the quick brown fox jumps over the lazy dog", "-o", out]
    start = time.thread_time()
    proc = await asyncio.create_subprocess_exec(*cmd)
    assert await proc.wait() == 0
    cpu = time.thread_time() - start
    records = json.loads(Path(out).read_text())
    bad = [r for r in records if r.get("status") != 200 or "error" in r]
    assert not bad and len(records) == streams, bad[:3]
    return cpu


async def run(args: argparse.Namespace) -> dict[str, float]:
    run_dir = tempfile.mkdtemp(prefix="scpu-")
    info = load_model_info(ModelConfig(path=str(MODEL_DIR), served_name="m"))
    pool = StepPool(run_dir, info.vocab_size, args.step_ms / 1e3)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = ServedModel(info, tok, PoolClient(ipc.pool_addresses(run_dir, 0), "m"))
    registry = ModelRegistry([model])
    cfg = FrontendConfig()
    metrics = EngineMetrics()
    metrics.add_pool("m", model.pool)
    admission = Admission(registry, cfg, 1024)
    http = await start_http_server(OpenAIServer(registry, cfg, admission, metrics),
                                   "127.0.0.1", 0)
    await model.pool.has_stats.wait()
    out = os.path.join(run_dir, "records.json")
    prof = cProfile.Profile() if args.profile else None
    short, long_ = [], []
    try:
        await burst(http.port, args.streams, args.tokens, out)  # warm-up
        for _ in range(args.rounds):
            short.append(await burst(http.port, args.streams, 1, out))
            if prof:
                prof.enable()
            long_.append(await burst(http.port, args.streams, args.tokens, out))
            if prof:
                prof.disable()
    finally:
        await http.stop(1)
        admission.close()
        await model.pool.close()
        pool.close()
    if prof:
        prof.dump_stats(args.profile)
    per_token = [(b - a) / (args.streams * (args.tokens - 1)) for a, b in zip(short, long_,
                                                                             strict=True)]
    return {"short_cpu_s": statistics.median(short), "long_cpu_s": statistics.median(long_),
            "per_request_ms": 1e3 * statistics.median(short) / args.streams,
            "per_token_ms": 1e3 * statistics.median(per_token)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=12.0, help="the stub's step interval")
    p.add_argument("--profile", help="write a cProfile of the long rounds here")
    p.add_argument("--uvloop", action="store_true", help="run the loop on uvloop")
    args = p.parse_args()
    if args.uvloop:
        import uvloop
        print(json.dumps(uvloop.run(run(args))))
    else:
        print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
