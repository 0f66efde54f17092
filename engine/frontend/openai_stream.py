"""Running a response's generations, independent of the endpoints
(``engine.frontend.openai_server``).

A response's choices are generated at once (``start``): with ``n`` > 1, ``Merged``
interleaves their deltas as they arrive, one task per choice feeding one queue; the common
single choice is ``Single``, its one generation iterated directly (no task, no second queue
on top of the pool client's per-request one). Either way ``next`` gives ``(choice, delta)``
and closing (also on cancellation) aborts every generation still running. The deltas end
either in one body (``collect``) or as Server-Sent Events (``sse``).
``unless_disconnected`` waits for work unless the client goes away first, which aborts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import Any, cast

from fastapi import Request

from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_format import (
    ChatFormat,
    Choice,
    TextFormat,
    failed_error,
    sse_event,
    sse_event_fast,
    usage,
)
from engine.frontend.serving import Delta, GenerationFailed, ServedModel, generate


class Merged:
    """The deltas of several generations, interleaved as they arrive: ``(choice, delta)``.

    ``aclose`` (also on cancellation) stops every generation still running, which aborts
    it in its pool.
    """

    def __init__(self, model: ServedModel, choices: Sequence[Choice],
                 metrics: EngineMetrics) -> None:
        self._queue: asyncio.Queue[tuple[Choice, Delta | Exception | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(model, c, metrics)) for c in choices]
        self._open = len(choices)

    async def _pump(self, model: ServedModel, choice: Choice, metrics: EngineMetrics) -> None:
        try:
            async for delta in generate(model, choice.request, metrics):
                self._queue.put_nowait((choice, delta))
            self._queue.put_nowait((choice, None))
        except Exception as e:  # delivered to the consumer (cancellation propagates)
            self._queue.put_nowait((choice, e))

    async def next(self) -> tuple[Choice, Delta] | None:
        """The next delta, or None when every generation has ended."""
        while self._open:
            choice, item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            return choice, item
        return None

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Single:
    """One generation's deltas, ``(choice, delta)``, pulled straight from ``generate``.

    The generation starts on the first ``next``. A ``next`` cancelled while it waits
    (``--max-queue-time``, a client gone) closes the generation, which aborts it in its
    pool; ``aclose`` aborts one suspended between deltas.
    """

    def __init__(self, model: ServedModel, choice: Choice, metrics: EngineMetrics) -> None:
        self._choice = choice
        # ``generate`` is an async generator function (typed as the iterator it returns).
        self._deltas = cast(AsyncGenerator[Delta, None],
                            generate(model, choice.request, metrics))
        self._waiting = False

    async def next(self) -> tuple[Choice, Delta] | None:
        """The next delta, or None when the generation has ended."""
        self._waiting = True
        try:
            delta = await anext(self._deltas)
        except StopAsyncIteration:
            return None
        finally:
            self._waiting = False
        return self._choice, delta

    async def aclose(self) -> None:
        # A ``next`` still waiting here has been cancelled (the only way ``aclose`` runs
        # beside one): its CancelledError closes the generation; an async generator cannot
        # be closed while it runs.
        if not self._waiting:
            await self._deltas.aclose()


#: The running generations of one response.
Generations = Merged | Single


def start(model: ServedModel, choices: Sequence[Choice], metrics: EngineMetrics) -> Generations:
    """Run every choice's generation: directly for one, merged for several."""
    if len(choices) == 1:
        return Single(model, choices[0], metrics)
    return Merged(model, choices, metrics)


async def collect(merged: Generations, first: tuple[Choice, Delta] | None) -> None:
    """Add every delta to its choice, from ``first`` to the end of every generation."""
    item = first
    while item is not None:
        choice, delta = item
        choice.add(delta)
        item = await merged.next()


class ClientGone(Exception):
    """The client disconnected before its response started."""


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``await work``, unless the client disconnects first: then cancel it (which aborts
    its generations) and raise ``ClientGone``. After the body was read, ``receive`` only
    ever yields ``http.disconnect``."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def sse(merged: Generations, first: tuple[Choice, Delta] | None, choices: list[Choice],
              fmt: TextFormat | ChatFormat, include_usage: bool) -> AsyncIterator[str | bytes]:
    """The stream's SSE events: the opening chunks, one chunk per delta, the usage chunk
    when asked for, an error event if the generation fails, and ``[DONE]``. Chunks without
    logprobs (no float in them) are encoded by msgspec: the per-token hot path."""
    event = sse_event if fmt.logprobs else sse_event_fast
    try:
        for chunk in fmt.opening(choices):
            yield sse_event(chunk)
        item = first
        while item is not None:
            choice, delta = item
            choice.add(delta)
            yield event(fmt.chunk(choice, delta))
            item = await merged.next()
        if include_usage:
            yield sse_event(fmt.usage_chunk(usage(choices)))
    except GenerationFailed as e:
        err = failed_error(e)
        yield sse_event({"error": {"message": err.message, "type": err.type, "param": None,
                                "code": err.code}})
    finally:
        await merged.aclose()
    yield b"data: [DONE]\n\n"
