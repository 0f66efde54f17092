"""Shedding before parsing: under a flood, a sheddable request's 429 must cost the frontend
as little as possible, or the flood's refusals alone slow down the critical requests that
share its event loop.

``EarlyShed`` is ASGI middleware in front of the OpenAI app. While no pool is saturated for
sheddable work (the common case) it passes every request through untouched: one prediction
per pool, nothing read. While one is, a ``POST`` to ``/v1/completions`` or
``/v1/chat/completions`` is looked at before FastAPI validates its body and before its prompt
is tokenized: only ``model`` and ``priority`` are decoded from the JSON (msgspec skips every
other field without building it), the ``x-request-priority`` header counts when the body
has no priority, and a sheddable request to a saturated pool gets its 429 with
``Retry-After`` at once, exactly the refusal the full path would give (same message, same
metric). Anything the early look cannot settle goes the full path: a body that is not JSON,
a field of the wrong type, an unknown model, a request that fails the API-key check (its
401 comes first), a priority >= 0. So a malformed sheddable request may be refused with 429
while the pool is saturated, where it would get 400 otherwise; it gets its 400 when retried.
"""

from __future__ import annotations

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.frontend.openai_format import ApiError, refusal_error
from engine.frontend.openai_server import PRIORITY_HEADER, OpenAIServer
from engine.frontend.serving import ModelNotFound
from engine.frontend.timing import stamp

PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class _Head(msgspec.Struct):
    """The two fields of a request body that shedding needs; the rest is skipped."""

    model: str | None = None
    priority: int | None = None


_decode_head = msgspec.json.Decoder(_Head).decode


class EarlyShed:
    """Refuses sheddable requests to a saturated pool before the app parses them."""

    def __init__(self, app: ASGIApp, server: OpenAIServer) -> None:
        self.app, self.server = app, server

    def _saturated(self) -> bool:
        return any(self.server.admission.shed(name, -1) is not None
                   for name in self.server.admission.loads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        stamp(scope, "received")
        if not self._saturated():
            await self.app(scope, receive, send)
            return
        chunks: list[Message] = []
        body = b""
        while True:
            message = await receive()
            chunks.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        refused = self._refusal(scope, body)
        if refused is not None:
            await refused.response()(scope, receive, send)
            return

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope, body: bytes) -> ApiError | None:
        server = self.server
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        if server.admission.keys.check(auth.decode("latin-1") if auth else None) is None:
            return None
        try:
            head = _decode_head(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        priority = head.priority
        if priority is None:
            raw = headers.get(PRIORITY_HEADER.encode())
            if raw is None or not raw.strip().lstrip(b"-").isdigit():
                return None
            priority = int(raw)
        if priority >= 0:
            return None
        try:
            model = server.models.get(head.model)
        except ModelNotFound:
            return None
        refusal = server.admission.shed(model.name, priority)
        if refusal is None:
            return None
        server.metrics.count_refused(model.name, refusal.reason, priority)
        return refusal_error(refusal)
