"""The gRPC API (``engine.v1.Engine``) on grpc.aio: validate, tokenize, route to the
model's pool, stream detokenized deltas back. Validation and the request lifecycle are
shared with the HTTP API (``engine.frontend.serving``); this module maps them to protobuf
messages and gRPC status codes.

Client request ids are mapped to fresh engine ids (``<id>.<random>``), so an id reused
right after its request ended can never receive the old request's late outputs. The client's
id is kept beside the engine's (``_running``: client id -> model and engine id), never
recovered from the engine's id.

The same port serves the standard ``grpc.health.v1.Health`` (``engine.frontend.health``:
SERVING exactly when ``/health`` says 200, for the service ``""`` and ``engine.v1.Engine``)
and server reflection, so grpcurl and Kubernetes gRPC probes work without the proto file.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import msgspec
from google.protobuf.message import DecodeError
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.frontend.health import StandardHealth
from engine.frontend.health import check as check_health
from engine.frontend.proto import SERVICE, pb2
from engine.frontend.serving import (
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    ModelRegistry,
    ServedModel,
    check,
    check_token_ids,
    encode_text,
    engine_request,
    generate,
    resolve_max_tokens,
    sampling_params,
)
from engine.frontend.structured import structured_from_proto, validate
from engine.messages import EngineRequest, Explanation

if TYPE_CHECKING:
    from engine.frontend.admission import Admission
    from engine.frontend.metrics import EngineMetrics

log = logging.getLogger(__name__)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


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


def client_request_id(req: Any) -> str:
    """The id the client knows the request by: its own, or a fresh one if it gave none."""
    return str(req.request_id) or f"req-{uuid.uuid4().hex}"


def engine_request_from_proto(req: Any, model: ServedModel, client_id: str, *,
                              any_whitespace: bool = False) -> EngineRequest:
    """Validate a GenerateRequest into the pool's EngineRequest, under a fresh engine id
    derived from ``client_id`` (raises InvalidRequest; a structured output is only parsed
    here: ``validate`` it off the event loop)."""
    has = req.HasField
    sampling = sampling_params(
        vocab_size=model.info.vocab_size,
        temperature=req.temperature if has("temperature") else None,
        top_p=req.top_p if has("top_p") else None, top_k=req.top_k,
        min_tokens=req.min_tokens, seed=req.seed if has("seed") else None,
        stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
        ignore_eos=req.ignore_eos, logprobs=req.logprobs if has("logprobs") else None,
        repetition_penalty=req.repetition_penalty if has("repetition_penalty") else None,
        presence_penalty=req.presence_penalty if has("presence_penalty") else None,
        frequency_penalty=req.frequency_penalty if has("frequency_penalty") else None,
        logit_bias=dict(req.logit_bias),
        allowed_token_ids=list(req.allowed_token_ids) or None,
        prompt_logprobs=req.prompt_logprobs if has("prompt_logprobs") else None,
    )
    if has("structured"):
        sampling = msgspec.structs.replace(sampling, structured=structured_from_proto(
            req.structured, any_whitespace=any_whitespace))
    check(not (req.prompt and req.prompt_token_ids),
          "give either prompt or prompt_token_ids, not both", "prompt")
    if req.prompt_token_ids:
        ids = check_token_ids(model, list(req.prompt_token_ids), "prompt_token_ids")
    else:
        check(bool(req.prompt), "prompt is empty: give prompt or prompt_token_ids", "prompt")
        ids = encode_text(model, req.prompt)
    limit = resolve_max_tokens(req.max_tokens if has("max_tokens") else None, len(ids),
                               model.info.max_model_len,
                               allow_zero=sampling.prompt_logprobs is not None)
    return engine_request(model, client_id, ids, sampling, limit, priority=req.priority,
                          tenant=req.tenant)


def fill_explanation(target: Any, e: Explanation) -> None:
    target.worker_id = e.worker_id
    target.placement = e.placement
    target.placement_scores.update(e.placement_scores)
    target.predicted_cached_tokens = e.predicted_cached_tokens
    target.realized_cached_tokens = e.realized_cached_tokens
    target.queue_time_s = e.queue_time_s
    target.num_preemptions = e.num_preemptions


class EngineServicer:
    """The service. With an ``Admission``, Generate, Abort and ListModels need the API key
    (metadata ``authorization: Bearer KEY``; UNAUTHENTICATED otherwise), and Generate is
    charged to the key's rate limit and shed like HTTP requests (RESOURCE_EXHAUSTED, with
    the seconds to wait in the trailing metadata ``retry-after``)."""

    def __init__(self, models: ModelRegistry, metrics: EngineMetrics | None = None,
                 admission: Admission | None = None, *,
                 structured_any_whitespace: bool = False) -> None:
        self.models = models
        self.structured_any_whitespace = structured_any_whitespace
        self.metrics = metrics
        self.admission = admission
        self._running: dict[str, tuple[ServedModel, str]] = {}  # client id -> (model, engine id)
        self.health_task: asyncio.Task[None] | None = None  # grpc.health.v1 watchers' refresh

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        if self.admission is None:
            return ""
        metadata = dict(context.invocation_metadata() or ())
        key = self.admission.keys.check(metadata.get("authorization"))
        if key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key: "
                                "send metadata 'authorization: Bearer KEY'")
        return key or ""

    async def _admit(self, key: str, model: ServedModel, ereq: EngineRequest,
                     context: grpc.aio.ServicerContext) -> None:
        if self.admission is None:
            return
        cost = len(ereq.prompt_token_ids) + ereq.sampling.max_tokens
        refusal = self.admission.admit(key, model.name, ereq.priority, cost, [ereq])
        if refusal is not None:
            if self.metrics is not None:
                self.metrics.count_refused(model.name, refusal.reason, ereq.priority)
            if refusal.retry_after is not None:
                context.set_trailing_metadata((("retry-after", refusal.retry_after),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        key = await self._authenticate(context)
        try:
            if isinstance(request, _Unparsable):
                raise InvalidRequest(request.message)
            model = self.models.get(request.model)
            client_id = client_request_id(request)
            ereq = engine_request_from_proto(
                request, model, client_id, any_whitespace=self.structured_any_whitespace)
            if ereq.sampling.structured is not None:
                await validate(ereq.sampling.structured, "structured")
        except InvalidRequest as e:
            await context.abort(INVALID, e.message)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, e.message)
        if client_id in self._running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {client_id!r} is already running")
        await self._admit(key, model, ereq, context)
        self._running[client_id] = (model, ereq.request_id)
        try:
            async for delta in generate(model, ereq, self.metrics):
                resp = pb2.GenerateResponse(request_id=client_id, text=delta.text,
                                            token_ids=delta.token_ids,
                                            finish_reason=delta.finish_reason or "")
                if delta.logprobs:
                    resp.logprobs.extend(delta.logprobs)
                for top in delta.top_logprobs or ():
                    resp.top_logprobs.add(token_ids=[t for t, _ in top],
                                          logprobs=[lp for _, lp in top])
                for entry in (delta.prompt_logprobs or ())[1:]:
                    if entry is not None:
                        resp.prompt_logprobs.add(
                            token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank,
                            top=pb2.TopLogprobs(token_ids=[t for t, _ in entry.top],
                                                logprobs=[lp for _, lp in entry.top]))
                if delta.usage is not None:
                    resp.usage.prompt_tokens = delta.usage.prompt_tokens
                    resp.usage.completion_tokens = delta.usage.completion_tokens
                    resp.usage.cached_tokens = delta.usage.cached_tokens
                if delta.explanation is not None and request.explain:
                    fill_explanation(resp.explanation, delta.explanation)
                yield resp
        except GenerationFailed as e:
            code = grpc.StatusCode.UNAVAILABLE if e.unavailable else grpc.StatusCode.INTERNAL
            await context.abort(code, f"request {client_id} failed: {e}")
        finally:
            self._running.pop(client_id, None)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        if isinstance(request, _Unparsable):
            await context.abort(INVALID, request.message)
        entry = self._running.get(request.request_id)
        if entry is not None:
            entry[0].pool.abort([entry[1]])
        return pb2.AbortResponse(found=entry is not None)

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        health = check_health(self.models)
        resp = pb2.HealthResponse(ok=health.ok, status="SERVING" if health.ok else "NOT_SERVING",
                                  reason=health.reason or "")
        for p in health.pools:
            pool = resp.pools.add(model=p.name, ok=p.ok, reason=p.reason or "")
            if p.age_s is not None:
                pool.last_report_s = p.age_s
            stats = p.stats
            if stats is not None:
                pool.live_workers = stats.live_workers
                pool.num_waiting = stats.num_waiting
                pool.num_running = stats.num_running
                pool.num_free_blocks.extend(stats.num_free_blocks)
                pool.kv_usage.extend(stats.kv_usage)
                pool.num_preemptions = stats.num_preemptions
        return resp

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        return pb2.ListModelsResponse(models=[
            pb2.ModelCard(name=m.name, max_model_len=m.info.max_model_len,
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


async def start_grpc_server(models: Sequence[ServedModel] | ModelRegistry, host: str, port: int,
                            metrics: EngineMetrics | None = None,
                            admission: Admission | None = None, *,
                            structured_any_whitespace: bool = False,
                            ) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port actually bound (``port=0`` picks one)."""
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry(models)
    server = grpc.aio.server()
    servicer = EngineServicer(registry, metrics, admission,
                              structured_any_whitespace=structured_any_whitespace)
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    health = StandardHealth(registry, [SERVICE])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(host_port(host, port))
    if not bound:
        raise OSError(f"cannot bind gRPC to {host_port(host, port)}")
    await health.refresh()
    await server.start()
    servicer.health_task = asyncio.get_running_loop().create_task(
        health.keep_fresh(server), name="grpc-health")
    log.info("gRPC serving on %s", host_port(host, bound))
    return server, bound
