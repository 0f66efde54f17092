"""A command-line client for the gRPC API, and small helpers to call it from Python.

    python -m engine.client "Once upon a time" --max-tokens 32
    python -m engine.client "Hello" --json

Helpers: ``build_request(...)`` makes a ``GenerateRequest``; ``stream(...)`` yields the
responses (sync); ``generate(...)`` / ``agenerate(...)`` return one ``Completion``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.env import client_api_key
from engine.frontend.proto import pb2, pb2_grpc

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 50051


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict[str, int] = field(default_factory=dict)

    def add(self, resp: Any) -> None:
        self.request_id = resp.request_id or self.request_id
        self.text += resp.text
        self.token_ids.extend(resp.token_ids)
        self.logprobs.extend(resp.logprobs)
        if resp.finish_reason:
            self.finish_reason = resp.finish_reason
            u = resp.usage
            self.usage = {"prompt_tokens": u.prompt_tokens,
                          "completion_tokens": u.completion_tokens,
                          "cached_tokens": u.cached_tokens}

    def to_json(self) -> str:
        return json.dumps({"request_id": self.request_id, "text": self.text,
                           "token_ids": self.token_ids, "usage": self.usage,
                           "finish_reason": self.finish_reason}, ensure_ascii=False)


def build_request(prompt: str | Sequence[int], **kw: Any) -> Any:
    """A ``GenerateRequest`` from a prompt (text, or token ids) and any of its fields;
    fields given as None stay unset (server defaults)."""
    fields = {k: v for k, v in kw.items() if v is not None}
    if isinstance(prompt, str):
        return pb2.GenerateRequest(prompt=prompt, **fields)
    return pb2.GenerateRequest(prompt_token_ids=list(prompt), **fields)


def target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata an engine started with ``--api-key`` wants."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def stream(prompt: str | Sequence[int], *, host: str = DEFAULT_HOST,
           port: int = DEFAULT_GRPC_PORT, timeout: float | None = None,
           api_key: str | None = None, **kw: Any) -> Iterator[Any]:
    """Yield the ``GenerateResponse`` messages as they arrive; raises ``grpc.RpcError``."""
    with grpc.insecure_channel(target(host, port)) as channel:
        call = pb2_grpc.EngineStub(channel).Generate(build_request(prompt, **kw), timeout=timeout,
                                                     metadata=auth_metadata(api_key))
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended; aborts it otherwise


def generate(prompt: str | Sequence[int], **kw: Any) -> Completion:
    """The whole completion (blocking); same arguments as ``stream``."""
    return _collect(stream(prompt, **kw))


async def agenerate(prompt: str | Sequence[int], *, host: str = DEFAULT_HOST,
                    port: int = DEFAULT_GRPC_PORT, timeout: float | None = None,
                    api_key: str | None = None, **kw: Any) -> Completion:
    """The whole completion, from asyncio code."""
    async with grpc.aio.insecure_channel(target(host, port)) as channel:
        call = pb2_grpc.EngineStub(channel).Generate(build_request(prompt, **kw), timeout=timeout,
                                                     metadata=auth_metadata(api_key))
        out = Completion()
        async for resp in call:
            out.add(resp)
        return out


def _collect(responses: Iterable[Any]) -> Completion:
    out = Completion()
    for resp in responses:
        out.add(resp)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.client",
                                description="Stream a completion from the engine's gRPC API.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default {DEFAULT_HOST})")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, metavar="PORT",
                   help=f"server gRPC port (default {DEFAULT_GRPC_PORT})")
    p.add_argument("--model", default="", help="served model name (default: the first)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest (default 0: all)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string, excluded from the output; repeatable")
    p.add_argument("--priority", type=int, help="higher is more important (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line (text, token_ids, usage, finish_reason) at the end")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline for the request")
    p.add_argument("--api-key", metavar="KEY", default=client_api_key(),
                   help="API key of an engine started with --api-key (default: $ENGINE_API_KEY)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    kw = dict(model=a.model, max_tokens=a.max_tokens, temperature=a.temperature,
              top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=a.stop, priority=a.priority)
    out = Completion()
    try:
        for resp in stream(a.prompt, host=a.host, port=a.grpc_port, timeout=a.timeout,
                           api_key=a.api_key, **kw):
            out.add(resp)
            if not a.json and resp.text:
                sys.stdout.write(resp.text)
                sys.stdout.flush()
    except grpc.RpcError as e:
        if not a.json and out.text:
            sys.stdout.write("\n")
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if a.json:
        print(out.to_json())
    else:
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
