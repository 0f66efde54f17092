"""``python -m engine.launch -tp 2``: one worker split over two processes on this machine.

Greedy completions equal the unsharded model's; killing the group's second rank mid-stream
restarts the whole group (the leader cannot go on alone) and every stream still completes
with the same text; no KV block leaks; Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest
from e2e.engine_proc import (
    Streams,
    assert_ctrl_c_leaves_nothing,
    launched,
    wait_idle,
    worker_pids,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_BLOCKS = 64
PROMPTS = ["Once upon a time", "def main():\n    ", "The list of files"]
MAX_TOKENS = 160


def test_tensor_parallel_worker_serves_restarts_and_stops() -> None:
    from engine import LLM, SamplingParams

    want = [o.text for o in LLM(num_kv_blocks=64).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))]
    with launched("-tp", "2", "--num-kv-blocks", str(NUM_BLOCKS), "--num-threads", "1") as (
            proc, port):
        # The ready line waits for the pool's stats showing its worker; polling costs nothing.
        assert wait_idle(port, [NUM_BLOCKS]) == [NUM_BLOCKS], "one worker: the group of two processes"
        base = f"http://127.0.0.1:{proc.http_port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        got = client.completions.create(model="default", prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want

        before = worker_pids(proc.pid)
        assert sorted(before) == ["engine-worker-0-0", "engine-worker-0-0-tp1"]
        streams = Streams(base, PROMPTS, MAX_TOKENS)
        streams.wait_under_way()
        os.kill(before["engine-worker-0-0-tp1"], signal.SIGKILL)
        outs = streams.join()
        assert [outs.get(p) for p in PROMPTS] == want, "a stream lost or changed by the restart"
        deadline = time.time() + 60
        while time.time() < deadline:
            after = worker_pids(proc.pid)
            if sorted(after) == sorted(before) and all(after[n] != before[n] for n in before):
                break
            time.sleep(0.2)
        assert sorted(after) == sorted(before)
        assert all(after[n] != before[n] for n in before), "the group was not restarted whole"
        assert wait_idle(port, [NUM_BLOCKS], timeout=60) == [NUM_BLOCKS]
        assert_ctrl_c_leaves_nothing(proc, worker_names=sorted(before))
