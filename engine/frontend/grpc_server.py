"""The gRPC API (``engine.v1.Engine``) on grpc.aio: validate, tokenize, route to the
model's pool, stream detokenized deltas back.

Client request ids are mapped to fresh engine ids (``<id>.<random>``), so an id reused
right after its request ended can never receive the old request's late outputs.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import msgspec
from google.protobuf.message import DecodeError

from engine.detokenizer import IncrementalDetokenizer
from engine.frontend.pool_client import PoolClient
from engine.frontend.proto import SERVICE, pb2
from engine.messages import EngineRequest, Explanation, SamplingParams
from engine.models.info import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class ServedModel:
    info: ModelInfo
    tokenizer: Any  # a transformers tokenizer (or a tokenizers.Tokenizer)
    pool: PoolClient


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Unparsable:
    """What the deserializer hands the handler for bytes that are not a valid message."""

    message: str


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return _Unparsable(f"malformed {cls.DESCRIPTOR.full_name} (string fields must be "
                               f"valid UTF-8): {e}")
    return parse


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError(INVALID, message)


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def sampling_params(req: Any, vocab_size: int) -> SamplingParams:
    """The request's sampling fields, validated; ``max_tokens`` is set later (it depends on
    the prompt length when unset)."""
    has = req.HasField
    _check(not has("max_tokens") or req.max_tokens >= 1,
           f"max_tokens must be >= 1, got {req.max_tokens}")
    temperature = req.temperature if has("temperature") else 1.0
    _check(math.isfinite(temperature) and temperature >= 0,
           f"temperature must be >= 0, got {temperature}")
    top_p = req.top_p if has("top_p") else 1.0
    _check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    _check(req.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {req.top_k}")
    _check(req.min_tokens >= 0, f"min_tokens must be >= 0, got {req.min_tokens}")
    _check(not has("logprobs") or req.logprobs >= 0, f"logprobs must be >= 0, got {req.logprobs}")
    penalty = req.repetition_penalty if has("repetition_penalty") else 1.0
    _check(math.isfinite(penalty) and penalty > 0,
           f"repetition_penalty must be > 0, got {penalty}")
    _check(all(req.stop), "stop strings must not be empty")
    bad = [t for t in req.stop_token_ids if t >= vocab_size]
    _check(not bad, f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=req.top_k, min_tokens=req.min_tokens,
        seed=req.seed if has("seed") else None, stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
        logprobs=req.logprobs if has("logprobs") else None, repetition_penalty=penalty,
    )


def prompt_ids(req: Any, model: ServedModel) -> list[int]:
    _check(not (req.prompt and req.prompt_token_ids),
           "give either prompt or prompt_token_ids, not both")
    if req.prompt_token_ids:
        ids = list(req.prompt_token_ids)
        vocab = model.info.vocab_size
        bad = sorted({t for t in ids if t >= vocab})
        _check(not bad, f"prompt_token_ids {bad[:8]} are outside the vocabulary (size {vocab})")
        return ids
    _check(bool(req.prompt), "prompt is empty: give prompt or prompt_token_ids")
    ids = _encode(model.tokenizer, req.prompt)
    _check(bool(ids), "prompt is empty after tokenization")
    return ids


def max_tokens(req: Any, num_prompt: int, max_model_len: int) -> int:
    room = max_model_len - num_prompt
    _check(num_prompt <= max_model_len, f"prompt longer than the model's context: {num_prompt} "
           f"tokens, max_model_len is {max_model_len}")
    _check(room > 0, f"prompt fills the model's context ({num_prompt} tokens = max_model_len), "
           "no room to generate")
    if not req.HasField("max_tokens"):
        return min(DEFAULT_MAX_TOKENS, room)
    _check(req.max_tokens <= room, f"prompt ({num_prompt} tokens) + max_tokens "
           f"({req.max_tokens}) exceeds the model's context (max_model_len {max_model_len})")
    return int(req.max_tokens)


def fill_explanation(target: Any, e: Explanation) -> None:
    target.worker_id = e.worker_id
    target.placement = e.placement
    target.placement_scores.update(e.placement_scores)
    target.predicted_cached_tokens = e.predicted_cached_tokens
    target.realized_cached_tokens = e.realized_cached_tokens
    target.queue_time_s = e.queue_time_s
    target.num_preemptions = e.num_preemptions


class EngineServicer:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("the gRPC frontend needs at least one model")
        self.models = list(models)
        self._by_name = {m.info.name: m for m in self.models}
        self._running: dict[str, tuple[ServedModel, str]] = {}  # client id -> (model, engine id)

    def _model(self, name: str) -> ServedModel:
        if not name:
            return self.models[0]
        model = self._by_name.get(name)
        if model is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found; served "
                               f"models: {', '.join(self._by_name)}")
        return model

    def _prepare(self, req: Any) -> tuple[ServedModel, str, EngineRequest]:
        if isinstance(req, _Unparsable):
            raise RequestError(INVALID, req.message)
        model = self._model(req.model)
        sampling = sampling_params(req, model.info.vocab_size)
        ids = prompt_ids(req, model)
        limit = max_tokens(req, len(ids), model.info.max_model_len)
        _check(sampling.min_tokens <= limit,
               f"min_tokens ({sampling.min_tokens}) must be <= max_tokens ({limit})")
        client_id = req.request_id or f"req-{uuid.uuid4().hex}"
        if client_id in self._running:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request id {client_id!r} is already running")
        engine_req = EngineRequest(
            request_id=f"{client_id}.{secrets.token_hex(4)}", prompt_token_ids=tuple(ids),
            sampling=msgspec.structs.replace(sampling, max_tokens=limit), priority=req.priority,
            arrival_time=time.time(), eos_token_ids=model.info.eos_token_ids,
            tenant=req.tenant,
        )
        return model, client_id, engine_req

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            model, client_id, ereq = self._prepare(request)
            stream = model.pool.add(ereq)
        except RequestError as e:
            await context.abort(e.code, e.message)
        except RuntimeError as e:  # the pool client is closed or broken
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        self._running[client_id] = (model, ereq.request_id)
        detok = IncrementalDetokenizer(model.tokenizer, ereq.prompt_token_ids, ereq.sampling.stop)
        done = False
        completion = cached = 0
        try:
            async for out in stream:
                if out.finish_reason == "error":
                    done = True
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"request {client_id} failed: {out.error or 'error'}")
                completion += len(out.new_token_ids)
                cached = out.num_cached_tokens or cached
                text, stopped = detok.append(out.new_token_ids)
                finish = out.finish_reason
                if stopped:
                    if finish is None:  # the pool is still generating: stop it
                        model.pool.abort([ereq.request_id])
                    finish = "stop"
                elif finish is not None:
                    text += detok.finish()
                    finish = "stop" if detok.stopped else finish
                resp = pb2.GenerateResponse(request_id=client_id, text=text,
                                            token_ids=out.new_token_ids,
                                            finish_reason=finish or "")
                if out.logprobs:
                    resp.logprobs.extend(out.logprobs)
                if finish is not None:
                    done = True
                    resp.usage.prompt_tokens = out.num_prompt_tokens or len(ereq.prompt_token_ids)
                    resp.usage.completion_tokens = completion
                    resp.usage.cached_tokens = cached
                    if out.explanation is not None:
                        log.debug("request %s explanation: %s", client_id, out.explanation)
                        if request.explain:
                            fill_explanation(resp.explanation, out.explanation)
                    yield resp
                    return
                if text or out.new_token_ids:
                    yield resp
        finally:
            if not done:  # cancelled by the client, or the server is stopping
                model.pool.abort([ereq.request_id])
            self._running.pop(client_id, None)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            await context.abort(INVALID, request.message)
        entry = self._running.get(request.request_id)
        if entry is not None:
            entry[0].pool.abort([entry[1]])
        return pb2.AbortResponse(found=entry is not None)

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        resp = pb2.HealthResponse()
        ok = True
        for m in self.models:
            pool = resp.pools.add(model=m.info.name)
            stats = m.pool.stats
            if stats is not None:
                pool.live_workers = stats.live_workers
                pool.num_waiting = stats.num_waiting
                pool.num_running = stats.num_running
                pool.num_free_blocks.extend(stats.num_free_blocks)
                pool.kv_usage.extend(stats.kv_usage)
                pool.num_preemptions = stats.num_preemptions
                ok = ok and stats.live_workers > 0
        resp.ok = ok
        resp.status = "SERVING" if ok else "NOT_SERVING"
        return resp

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb2.ListModelsResponse(models=[
            pb2.ModelCard(name=m.info.name, max_model_len=m.info.max_model_len,
                          vocab_size=m.info.vocab_size)
            for m in self.models
        ])


def generic_handler(servicer: EngineServicer) -> grpc.GenericRpcHandler:
    """The service's handlers, with deserializers that turn unparsable bytes (such as
    invalid UTF-8 in a string field) into INVALID_ARGUMENT rather than gRPC's INTERNAL."""
    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_deserializer(req),
            response_serializer=resp.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_deserializer(pb2.GenerateRequest),
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "Abort": unary(servicer.Abort, pb2.AbortRequest, pb2.AbortResponse),
        "Health": unary(servicer.Health, pb2.HealthRequest, pb2.HealthResponse),
        "ListModels": unary(servicer.ListModels, pb2.ListModelsRequest, pb2.ListModelsResponse),
    })


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc_server(models: Sequence[ServedModel], host: str,
                            port: int) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port actually bound (``port=0`` picks one)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((generic_handler(EngineServicer(models)),))
    bound = server.add_insecure_port(host_port(host, port))
    if not bound:
        raise OSError(f"cannot bind gRPC to {host_port(host, port)}")
    await server.start()
    log.info("gRPC serving on %s", host_port(host, bound))
    return server, bound
