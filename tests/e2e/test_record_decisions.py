"""``--record-decisions`` end to end: a launched engine (default model, one worker) serves
concurrent streams and a cancelled one while recording; once it is stopped (Ctrl-C),
``python -m engine.sim --replay`` rebuilds every plan the pool made, identically.

The recording goes through the pool's wire tap (the plan bytes it sends, the result bytes
it receives; engine/scheduler/record.py), which the scheduler tests drive in-process only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from e2e.engine_proc import GREEDY_PROMPTS, Streams, launched, wait_idle

from engine.frontend.proto import pb2, pb2_grpc
from engine.scheduler.record import Abort, Add, Schedule, Update, read_segments

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_KV_BLOCKS = 64


async def _cancel_after_tokens(port: int, n: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = pb2_grpc.EngineStub(ch).Generate(pb2.GenerateRequest(
            prompt="Return the", max_tokens=1000, temperature=0.0, ignore_eos=True))
        got = 0
        async for resp in call:
            got += len(resp.token_ids)
            if got >= n:
                call.cancel()
                break
        return got


def test_a_served_recording_replays_plan_for_plan(tmp_path) -> None:
    path = str(tmp_path / "decisions.rec")
    with launched("--workers", "1", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                  "--record-decisions", path) as (proc, port):
        base = f"http://127.0.0.1:{proc.http_port}"  # type: ignore[attr-defined]
        streams = Streams(base, GREEDY_PROMPTS[:4], 24)
        assert asyncio.run(_cancel_after_tokens(port, 8)) >= 8
        out = streams.join(timeout=60)
        assert not streams.errors and all(len(text) > 0 for text in out.values())
        assert wait_idle(port, [NUM_KV_BLOCKS]) == [NUM_KV_BLOCKS]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the pool closes its recording
        assert proc.wait(timeout=30) == 0

    [segment] = read_segments(path)
    kinds = {type(f) for f in segment}
    assert {Add, Abort, Schedule, Update} <= kinds
    assert sum(isinstance(f, Add) for f in segment) == 5
    plans = sum(isinstance(f, Schedule) for f in segment)
    done = subprocess.run([sys.executable, "-m", "engine.sim", "--replay", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"(\d+) plans identical", done.stdout)
    assert match is not None and int(match.group(1)) == plans > 10, done.stdout
