"""bench.flood_resets' accounting: every answer is its HTTP status, every transport failure
its exception's name, so a reset can never pass as an answer. No engine is launched."""

from __future__ import annotations

import asyncio

import httpx

from bench.flood_resets import ALLOWED, one


def test_statuses_and_transport_errors_are_told_apart():
    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params["n"])
        if n == 2:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response")
        if n == 3:
            raise httpx.ReadError("Connection reset by peer")
        return httpx.Response({0: 200, 1: 429, 4: 503}[n])

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return [await one(client, f"http://x/v1/completions?n={n}", {}) for n in range(5)]

    answers = asyncio.run(run())
    assert answers == ["200", "429", "RemoteProtocolError", "ReadError", "503"]
    assert [a in ALLOWED for a in answers] == [True, True, False, False, False]
