"""SIGKILL the pool (scheduler) process under 16 concurrent greedy streams, with one worker
paused as a pool leaves it when it dies during a critical step: the launcher continues the
worker and restarts the pool, its workers reset their KV and register with the new
incarnation, and the frontend resubmits every stream as a continuation. Every stream
completes with transformers' greedy text (no token repeated or missing), the KV blocks
return to their idle baseline, and health says so again.

Needs the launcher's pool restart (the supervisor of issue 14): with a launcher that exits
when its pool dies, this test fails, as it should.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch
from e2e.engine_proc import GREEDY_PROMPTS, Streams, children, launched, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NUM_KV_BLOCKS = 256
MAX_TOKENS = 400
PROMPTS = list(GREEDY_PROMPTS)


def greedy_texts(prompts: list[str], max_tokens: int) -> dict[str, str]:
    """transformers' greedy text of each prompt, EOS ignored (the streams' ``ignore_eos``),
    decoded as the frontend does (special tokens skipped). Prompts of one token length run
    as one batch (no padding, so no masking differs from a lone run): a few ``generate``
    calls instead of sixteen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.models.default import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    by_len: dict[int, list[str]] = {}
    for p in prompts:
        by_len.setdefault(len(tok(p).input_ids), []).append(p)
    texts = {}
    for group in by_len.values():
        ids = torch.tensor([tok(p).input_ids for p in group])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, eos_token_id=None)
        for p, row in zip(group, out[:, ids.shape[1]:].tolist(), strict=True):
            texts[p] = tok.decode(row, skip_special_tokens=True)
    return texts


def _pool_pid(launcher_pid: int) -> int | None:
    pids = [pid for pid, args in children(launcher_pid) if args.startswith("engine-pool-0")]
    return pids[0] if pids else None


def test_sigkill_the_pool_mid_stream_loses_nothing() -> None:
    with launched("--workers", "2", "--num-kv-blocks", str(NUM_KV_BLOCKS)) as (proc, port):
        base = f"http://127.0.0.1:{proc.http_port}"  # type: ignore[attr-defined]
        reference = greedy_texts(PROMPTS, MAX_TOKENS)
        assert wait_idle(port, [NUM_KV_BLOCKS] * 2) == [NUM_KV_BLOCKS] * 2
        pool = _pool_pid(proc.pid)
        assert pool is not None

        streams = Streams(base, PROMPTS, MAX_TOKENS)
        streams.wait_under_way()
        # A pool pauses a worker (SIGSTOP) while a critical prompt's step runs on the other
        # (engine/pool/suspend.py); one that dies then leaves it paused, and the launcher
        # must continue it, or it never answers the new pool's hello.
        paused = [pid for pid, args in children(proc.pid)
                  if args.startswith("engine-worker-0-1")]
        assert len(paused) == 1
        os.kill(paused[0], signal.SIGSTOP)
        os.kill(pool, signal.SIGKILL)
        out = streams.join(timeout=120)
        assert all(not t.is_alive() for t in streams.threads), "a stream hangs"
        for prompt in PROMPTS:
            assert out.get(prompt) == reference[prompt], prompt

        restarted = _pool_pid(proc.pid)
        assert restarted is not None and restarted != pool, "the pool was not restarted"
        assert wait_idle(port, [NUM_KV_BLOCKS] * 2, timeout=60) == [NUM_KV_BLOCKS] * 2
        deadline = time.time() + 10
        while time.time() < deadline and httpx.get(f"{base}/health").status_code != 200:
            time.sleep(0.2)
        assert httpx.get(f"{base}/health").status_code == 200
