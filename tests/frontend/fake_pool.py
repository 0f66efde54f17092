"""A fake pool for frontend tests: it binds the real pool sockets and answers each request
by echoing its prompt tokens cyclically, one token per output, then finish "length" (with
made-up logprobs when asked: -0.5 for the echoed token, top-k ``token + j`` at ``-0.5 - j``); it
records what it receives. Tenants steer it: "fail" gets an error, "slow" one token per
``SLOW_TOKEN_S``, "hold" nothing until aborted; ``scripts`` maps a tenant to the tokens to
answer with instead (one per output, then finish "stop", or "length" at max_tokens).
``stats`` overrides the pool's reported pressure (for admission tests, or zero live workers
for health tests); ``silent`` stops it sending anything, as a dead or stuck pool.

Pool death: ``kill()`` stops it at once (nothing more is sent, its sockets close, its
requests are lost); a new ``FakePool`` on the same ``run_dir`` and ``index`` is the restarted
pool, a new incarnation (``incarnation``, in its stats). It honours continuations: a request
with ``output_token_ids`` goes on from the next token, as if never interrupted."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import ipc
from engine.frontend.pool_client import PoolClient
from engine.frontend.serving import ServedModel
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineRequest,
    PoolOutputs,
    PoolStats,
    PoolTiming,
    PromptLogprobs,
    RequestOutput,
)

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")

MAX_MODEL_LEN = 64
EOS = 1
LIVE_WORKERS = 2
SLOW_TOKEN_S = 0.05  # per-token delay for requests with tenant "slow"
STATS_INTERVAL_S = 0.25  # as engine.pool.service's heartbeat


def make_model_dir(path: Path, chat_template: str = CHAT_TEMPLATE,
                   max_model_len: int = MAX_MODEL_LEN) -> Path:
    """config.json (what ModelInfo reads) and a byte-level BPE tokenizer trained here."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello world, hello again.", "The quick brown fox jumps over the lazy dog.",
              "héllo wörld, façade 中文 🎉"] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": chat_template}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.get_vocab_size(), "max_position_embeddings": max_model_len,
        "num_attention_heads": 2, "num_hidden_layers": 1, "hidden_size": 16,
        "eos_token_id": EOS}))
    return path


@dataclass
class _Active:
    req: EngineRequest
    sent: int = 0
    due: float = 0.0
    arrived: float = 0.0  # unix time, for the first token's PoolTiming


@dataclass
class FakePool:
    run_dir: str
    index: int
    added: list[EngineRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    stats: PoolStats | None = None
    scripts: dict[str, list[int]] = field(default_factory=dict)
    silent: bool = False
    incarnation: int = field(default_factory=lambda: random.getrandbits(63) | 1)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def kill(self) -> None:
        """Die mid-work: no final output, the requests are lost (a restart is a new pool)."""
        self.silent = True
        self.close()

    def _run(self) -> None:
        ctx = zmq.Context()
        addrs = ipc.pool_addresses(self.run_dir, self.index)
        pull = ipc.make_socket(ctx, zmq.PULL, addrs.requests, bind=True)
        push = ipc.make_socket(ctx, zmq.PUSH, addrs.outputs, bind=True)
        self._bound.set()
        active: dict[str, _Active] = {}

        def send(*outs: RequestOutput) -> None:
            if self.silent:
                return
            stats = msgspec.structs.replace(
                self.stats or PoolStats(num_running=len(active), live_workers=LIVE_WORKERS),
                pool_incarnation=self.incarnation)
            push.send(ipc.encode(PoolOutputs(outputs=list(outs), stats=stats)))

        last_stats = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_stats > STATS_INTERVAL_S:  # as a real pool, idle or not
                send()
                last_stats = time.monotonic()
            if pull.poll(1):
                msg = ipc.FRONTEND_TO_POOL.decode(pull.recv())
                if isinstance(msg, AddRequest):
                    req = msg.request
                    self.added.append(req)
                    if req.tenant == "fail":
                        send(RequestOutput(request_id=req.request_id, new_token_ids=[],
                                           error="worker exploded"))
                    else:  # a continuation goes on after its outputs
                        active[req.request_id] = _Active(req, sent=len(req.output_token_ids),
                                                         arrived=time.time())
                elif isinstance(msg, AbortRequests):
                    self.aborted.extend(msg.request_ids)
                    for rid in msg.request_ids:
                        if active.pop(rid, None) is not None:
                            send(RequestOutput(request_id=rid, new_token_ids=[],
                                               finish_reason="abort"))
            now = time.monotonic()
            for rid, a in list(active.items()):
                if a.due > now or a.req.tenant == "hold":
                    continue
                prompt = a.req.prompt_token_ids
                if (a.sent == 0 and a.req.sampling.prompt_logprobs is not None
                        and not a.req.output_token_ids):
                    send(*_prompt_logprobs(rid, prompt, a.req.sampling.prompt_logprobs))
                if a.req.sampling.max_tokens == 0:  # prefill only
                    del active[rid]
                    send(RequestOutput(request_id=rid, new_token_ids=[], finish_reason="length",
                                       num_prompt_tokens=len(prompt)))
                    continue
                script = self.scripts.get(a.req.tenant)
                a.sent += 1
                a.due = now + (SLOW_TOKEN_S if a.req.tenant == "slow" else 0.0)
                finish = "length" if a.sent >= a.req.sampling.max_tokens else None
                if script is not None:
                    token = script[a.sent - 1]
                    finish = "stop" if a.sent >= len(script) else finish
                else:
                    token = prompt[(a.sent - 1) % len(prompt)]
                if finish:
                    del active[rid]
                out = RequestOutput(request_id=rid, new_token_ids=[token],
                                    finish_reason=finish,
                                    num_prompt_tokens=len(prompt), num_cached_tokens=3)
                if a.sent == 1:  # stamped as a real pool does (engine.pool.first_token)
                    t = time.time()
                    out.timing = PoolTiming(arrived=a.arrived, scheduled=a.arrived,
                                            step_sent=a.arrived, step_done=t, sent=t,
                                            step_tokens=len(prompt), step_requests=1)
                k = a.req.sampling.logprobs
                if k is not None:  # the echoed token at -0.5, then tokens after it
                    out.logprobs = [-0.5]
                    if k:
                        out.top_token_ids = [[token + j for j in range(k)]]
                        out.top_logprobs = [[-0.5 - j for j in range(k)]]
                send(out)
        pull.close()
        push.close()
        ctx.term()




def _prompt_logprobs(rid: str, prompt: tuple[int, ...], k: int) -> list[RequestOutput]:
    """Made-up prompt logprobs in two chunks (as two prefill steps send them): token ``i``
    at ``-i / 10`` with rank ``i``, the top-k ``token + 1 + j`` at ``-0.1 * j``."""
    rows = list(range(1, len(prompt)))
    outs = []
    for part in (rows[: len(rows) // 2], rows[len(rows) // 2:]):
        if part:
            outs.append(RequestOutput(request_id=rid, new_token_ids=[],
                                      prompt_logprobs=PromptLogprobs(
                request_id=rid, first=part[0], token_logprobs=[-i / 10 for i in part],
                ranks=part, top_token_ids=[[prompt[i] + 1 + j for j in range(k)] for i in part],
                top_logprobs=[[-0.1 * j for j in range(k)] for _ in part])))
    return outs


class BackgroundFrontend:
    """Servers and their pool clients on an event loop in a background thread, connected to
    the pools of ``run_dir`` (one per ``infos`` entry). Subclasses start their servers in
    ``_serve`` and stop them in ``_unserve``; ``self.models`` holds the served models."""

    def __init__(self, run_dir: str, model_dir: Path, infos: list[Any]) -> None:
        from transformers import AutoTokenizer

        self.infos = infos
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.run_dir = run_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self) -> None:
        self.models = [ServedModel(info, self.tokenizer,
                                   PoolClient(ipc.pool_addresses(self.run_dir, i), info.name))
                       for i, info in enumerate(self.infos)]
        await self._serve()

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _unserve(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        await self._unserve()
        for m in self.models:
            await m.pool.close()

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
