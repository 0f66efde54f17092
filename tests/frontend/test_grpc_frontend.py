"""The gRPC frontend in-process (on its own event loop thread) against fake pools that bind
the real pool sockets: each request is answered by echoing its prompt tokens cyclically,
one token per output, then finish "length". The fake pools record what they receive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
from frontend.fake_pool import (
    EOS,
    LIVE_WORKERS,
    MAX_MODEL_LEN,
    BackgroundFrontend,
    FakePool,
    make_model_dir,
)
from frontend.http_env import wait_for

from engine import ipc
from engine.client import generate, stream
from engine.config import ModelConfig
from engine.frontend.grpc_server import start_grpc_server
from engine.frontend.proto import pb2, pb2_grpc
from engine.messages import (
    ProcessFailed,
    ProcessReady,
)
from engine.models.info import load_model_info

REPO = Path(__file__).resolve().parents[2]


class Frontend(BackgroundFrontend):
    """The gRPC server over two fake pools (the second with a shorter context)."""

    def __init__(self, run_dir: str, model_dir: Path) -> None:
        super().__init__(run_dir, model_dir, [
            load_model_info(ModelConfig(path=str(model_dir), served_name="tiny")),
            load_model_info(ModelConfig(path=str(model_dir), served_name="tiny-b",
                                        max_model_len=32)),
        ])

    async def _serve(self) -> None:
        self.server, self.port = await start_grpc_server(self.models, "127.0.0.1", 0)

    async def _unserve(self) -> None:
        await self.server.stop(0)


@dataclass
class Env:
    fe: Frontend
    pools: list[FakePool]
    stub: Any
    channel: grpc.Channel
    model_dir: Path

    @property
    def port(self) -> int:
        return self.fe.port

    def encode(self, text: str) -> list[int]:
        return list(self.fe.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.fe.tokenizer.decode(ids))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    model_dir = make_model_dir(tmp_path_factory.mktemp("model") / "tiny")
    run_dir = tempfile.mkdtemp(prefix="fe-")  # short: ipc paths have a length limit
    pools = [FakePool(run_dir, 0), FakePool(run_dir, 1)]
    fe = Frontend(run_dir, model_dir)
    channel = grpc.insecure_channel(f"127.0.0.1:{fe.port}")
    yield Env(fe, pools, pb2_grpc.EngineStub(channel), channel, model_dir)
    channel.close()
    fe.close()
    for p in pools:
        p.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def engine_id(pool: FakePool, client_id: str) -> str:
    ids = [r.request_id for r in pool.added if r.request_id.startswith(client_id + ".")]
    assert len(ids) == 1, ids
    return ids[0]


# --------------------------------------------------------------------------- streaming


def test_streams_deltas_and_usage(env: Env) -> None:
    prompt = "Hello world, hello again."
    ids = env.encode(prompt)
    t0 = time.time()
    req = pb2.GenerateRequest(request_id="s1", prompt=prompt, max_tokens=len(ids) + 2,
                              temperature=0.5, seed=7, priority=3, tenant="acme", top_k=5)
    msgs = list(env.stub.Generate(req, timeout=10))
    assert len(msgs) >= len(ids) // 2  # streamed, not one message
    expected = (ids + ids)[: len(ids) + 2]
    assert [t for m in msgs for t in m.token_ids] == expected
    assert "".join(m.text for m in msgs) == env.decode(expected)
    assert all(m.request_id == "s1" for m in msgs)
    assert [m.finish_reason for m in msgs[:-1]] == [""] * (len(msgs) - 1)
    last = msgs[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.cached_tokens) == (len(ids), len(expected), 3)
    sent = env.pools[0].added[-1]
    assert sent.request_id.startswith("s1.") and sent.prompt_token_ids == tuple(ids)
    assert sent.eos_token_ids == (EOS,) and sent.priority == 3 and sent.tenant == "acme"
    assert t0 - 1 <= sent.arrival_time <= time.time()
    sp = sent.sampling
    assert (sp.temperature, sp.seed, sp.top_k, sp.top_p, sp.max_tokens) == (0.5, 7, 5, 1.0,
                                                                            len(ids) + 2)


def test_penalties_logit_bias_and_allowed_ids_reach_the_pool(env: Env) -> None:
    req = pb2.GenerateRequest(prompt="Hello", max_tokens=2, presence_penalty=-0.5,
                              frequency_penalty=1.5, logit_bias={7: -100.0, 12: 2.5},
                              allowed_token_ids=[7, 12, 40])
    list(env.stub.Generate(req, timeout=10))
    sp = env.pools[0].added[-1].sampling
    assert (sp.presence_penalty, sp.frequency_penalty) == (-0.5, 1.5)
    assert sorted(sp.logit_bias) == [(7, -100.0), (12, 2.5)]
    assert sp.allowed_token_ids == (7, 12, 40)


def test_defaults_token_ids_prompt_and_second_model(env: Env) -> None:
    out = generate([5, 6, 7], port=env.port, model="tiny-b")
    assert out.token_ids == [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5]  # 16 by default
    assert out.finish_reason == "length" and out.request_id.startswith("req-")
    sent = env.pools[1].added[-1]
    assert sent.sampling.temperature == 1.0 and sent.sampling.seed is None
    # Unset max_tokens is clamped to the context left (32 - 20 = 12).
    out = generate([5] * 20, port=env.port, model="tiny-b")
    assert len(out.token_ids) == 12


def test_multibyte_text_streams_whole_characters(env: Env) -> None:
    text = "héllo wörld, façade 中文 🎉"
    out = list(stream(text, port=env.port, max_tokens=len(env.encode(text))))
    assert "".join(m.text for m in out) == text
    assert not any("\ufffd" in m.text for m in out)


def test_concurrent_streams_do_not_mix(env: Env) -> None:
    prompts = ["Hello world", "The quick brown fox", "héllo wörld", "lazy dog", "中文 🎉",
               "jumps over", "hello again", "façade"]
    results: dict[str, str] = {}

    def one(p: str) -> None:
        n = len(env.encode(p)) * 3
        results[p] = generate(p, port=env.port, max_tokens=n, timeout=20).text

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {p: p * 3 for p in prompts}


# --------------------------------------------------------------------------- stops, aborts


def test_stop_string_truncates_and_aborts(env: Env) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    out = generate(prompt, port=env.port, max_tokens=40, stop=["over the", "zzz"],
                   request_id="stop1")
    assert out.text == "The quick brown fox jumps "
    assert out.finish_reason == "stop"
    eid = engine_id(env.pools[0], "stop1")
    assert wait_for(lambda: eid in env.pools[0].aborted)


def test_cancelled_stream_aborts_in_pool(env: Env) -> None:
    call = env.stub.Generate(pb2.GenerateRequest(request_id="cancel1", prompt="Hello world",
                                                 max_tokens=60, tenant="slow"), timeout=20)
    first = next(call)
    assert first.token_ids
    call.cancel()
    assert wait_for(lambda: any(r.startswith("cancel1.") for r in env.pools[0].aborted))
    eid = engine_id(env.pools[0], "cancel1")
    assert eid in env.pools[0].aborted
    # The id is free again once the stream is gone.
    assert wait_for(lambda: not env.fe.models[0].pool.num_active)
    assert generate("Hello", port=env.port, request_id="cancel1", max_tokens=2).token_ids


def test_abort_rpc_ends_stream(env: Env) -> None:
    call = env.stub.Generate(pb2.GenerateRequest(request_id="ab1", prompt="Hello world",
                                                 max_tokens=60, tenant="slow"), timeout=20)
    got = [next(call)]
    assert env.stub.Abort(pb2.AbortRequest(request_id="ab1")).found
    got += list(call)
    assert got[-1].finish_reason == "abort"
    assert got[-1].usage.completion_tokens == sum(len(m.token_ids) for m in got) < 60
    rid = engine_id(env.pools[0], "ab1")
    assert wait_for(lambda: rid in env.pools[0].aborted)  # the pool hears of it a bit later
    assert not env.stub.Abort(pb2.AbortRequest(request_id="ab1")).found


def test_duplicate_running_id_rejected(env: Env) -> None:
    call = env.stub.Generate(pb2.GenerateRequest(request_id="dup", prompt="Hello",
                                                 max_tokens=60, tenant="slow"), timeout=20)
    next(call)
    with pytest.raises(grpc.RpcError) as e:
        generate("Hello", port=env.port, request_id="dup")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call.cancel()


def test_prompt_logprobs_with_max_tokens_zero(env: Env) -> None:
    """Field 30 asks; the first (here the only) message carries prompt tokens 1.. (fields 9),
    from the fake pool's made-up values: token i at -i/10, rank i, top-k ``token + 1 + j``."""
    ids = [5, 9, 14, 3]
    msgs = list(env.stub.Generate(pb2.GenerateRequest(prompt_token_ids=ids, max_tokens=0,
                                                      prompt_logprobs=2), timeout=10))
    assert len(msgs) == 1 and msgs[0].finish_reason == "length" and not msgs[0].token_ids
    got = [(e.token_id, round(e.logprob, 5), e.rank, list(e.top.token_ids))
           for e in msgs[0].prompt_logprobs]
    assert got == [(ids[i], -i / 10, i, [ids[i] + 1, ids[i] + 2]) for i in range(1, 4)]
    assert env.pools[0].added[-1].sampling.prompt_logprobs == 2


def test_pool_error_ends_stream(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate("Hello", port=env.port, tenant="fail", timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "worker exploded" in str(e.value.details())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": "Hi", "max_tokens": -4}, "max_tokens must be >= 1"),
    ({"prompt": "Hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "Hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "top_k": -2}, "top_k"),
    ({"prompt": "Hi", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "Hi", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "Hi", "stop": [""]}, "stop strings"),
    ({"prompt": "Hi", "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": "Hi", "presence_penalty": 2.01}, "presence_penalty must be in [-2, 2]"),
    ({"prompt": "Hi", "frequency_penalty": float("nan")}, "frequency_penalty must be in"),
    ({"prompt": "Hi", "logit_bias": {99999: 1.0}}, "logit_bias token ids [99999]"),
    ({"prompt": "Hi", "logit_bias": {5: -100.5}}, "logit_bias values must be in [-100, 100]"),
    ({"prompt": "Hi", "allowed_token_ids": [3, 99999]}, "allowed_token_ids [99999]"),
    ({"prompt_token_ids": [3, 99999]}, "outside the vocabulary"),
    ({"prompt": "Hi", "prompt_token_ids": [3]}, "not both"),
    ({"prompt_token_ids": [5] * (MAX_MODEL_LEN + 1)}, "prompt longer than the model's context"),
    ({"prompt_token_ids": [5] * MAX_MODEL_LEN}, "context"),
    ({"prompt_token_ids": [5] * 60, "max_tokens": 10}, "exceeds the model's context"),
    ({"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20]"),
    ({"prompt": "Hi", "prompt_logprobs": 1, "max_tokens": -1}, "max_tokens must be >= 0"),
])
def test_invalid_arguments(env: Env, fields: dict[str, Any], message: str) -> None:
    before = sum(len(p.added) for p in env.pools)
    with pytest.raises(grpc.RpcError) as e:
        list(env.stub.Generate(pb2.GenerateRequest(**fields), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(e.value.details())
    assert sum(len(p.added) for p in env.pools) == before


def test_invalid_utf8_is_invalid_argument(env: Env) -> None:
    raw = pb2.GenerateRequest(prompt="é!").SerializeToString()
    raw = raw.replace("é".encode(), b"\xff\xfe")
    call = env.channel.unary_stream("/engine.v1.Engine/Generate")  # identity (de)serializers
    with pytest.raises(grpc.RpcError) as e:
        list(call(raw, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in str(e.value.details())


def test_unknown_model_is_not_found(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as e:
        generate("Hi", port=env.port, model="nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tiny" in str(e.value.details()) and "tiny-b" in str(e.value.details())


# --------------------------------------------------------------------------- other RPCs


def test_list_models_and_health(env: Env) -> None:
    models = env.stub.ListModels(pb2.ListModelsRequest()).models
    assert [(m.name, m.max_model_len) for m in models] == [("tiny", MAX_MODEL_LEN), ("tiny-b", 32)]
    generate("Hello", port=env.port, max_tokens=1)
    h = env.stub.Health(pb2.HealthRequest())
    assert h.ok and h.status == "SERVING"
    assert h.pools[0].model == "tiny" and h.pools[0].live_workers == LIVE_WORKERS


# --------------------------------------------------------------------------- CLI, process


def _env_vars() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_client_cli(env: Env) -> None:
    run = [sys.executable, "-m", "engine.client"]
    r = subprocess.run([*run, "--help"], capture_output=True, text=True, env=_env_vars(),
                       timeout=60)
    assert r.returncode == 0 and "--grpc-port" in r.stdout and "--stop" in r.stdout
    r = subprocess.run([*run, "Hello world", "--grpc-port", str(env.port), "--max-tokens", "4",
                        "--json"], capture_output=True, text=True, env=_env_vars(), timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == "Hello world" * 2 and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4 and len(out["token_ids"]) == 4
    r = subprocess.run([*run, "Hi", "--grpc-port", str(env.port), "--model", "nope"],
                       capture_output=True, text=True, env=_env_vars(), timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: NOT_FOUND: ")


def _launch_frontend(run_dir: str, model_dir: Path) -> subprocess.Popen[str]:
    code = ("import sys; from engine.config import *; from engine.frontend.process import "
            "run_frontend; run_frontend(EngineConfig(models=(ModelConfig(path=sys.argv[1]),), "
            "frontend=FrontendConfig(grpc_port=0, http_port=0)), sys.argv[2])")
    return subprocess.Popen([sys.executable, "-c", code, str(model_dir), run_dir],
                            env=_env_vars(), text=True)


@pytest.mark.slow
def test_frontend_process_ready_and_sigterm(env: Env) -> None:
    run_dir = tempfile.mkdtemp(prefix="fe-")
    ctx = zmq.Context()
    launcher = ipc.make_socket(ctx, zmq.PULL, ipc.launcher_address(run_dir), bind=True)
    pool = FakePool(run_dir, 0)
    proc = _launch_frontend(run_dir, env.model_dir)
    try:
        assert launcher.poll(60_000), "no message from the frontend"
        msg = ipc.TO_LAUNCHER.decode(launcher.recv())
        assert isinstance(msg, ProcessReady) and msg.name == "frontend", msg
        port = msg.info["grpc_port"]
        assert port > 0 and msg.info["http_port"] > 0
        out = generate("Hello", port=port, max_tokens=3, timeout=10)
        assert out.text == "HelloHelloHello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        pool.close()
        launcher.close()
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_frontend_process_startup_failure(tmp_path: Path) -> None:
    run_dir = tempfile.mkdtemp(prefix="fe-")
    ctx = zmq.Context()
    launcher = ipc.make_socket(ctx, zmq.PULL, ipc.launcher_address(run_dir), bind=True)
    proc = _launch_frontend(run_dir, tmp_path)  # no config.json there
    try:
        assert launcher.poll(60_000)
        msg = ipc.TO_LAUNCHER.decode(launcher.recv())
        assert isinstance(msg, ProcessFailed) and "config.json" in msg.message, msg
        assert proc.wait(20) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        launcher.close()
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
