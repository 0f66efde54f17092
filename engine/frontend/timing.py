"""Where a request's time goes in the frontend, per request: stage timestamps on the ASGI
scope, sent back in a ``Server-Timing`` header (the W3C header browsers and proxies show).

The stamps, in order: ``received`` (the ASGI app is called: headers read, body not yet),
``parsed`` (the handler starts: body read and validated by FastAPI), ``tokenized`` (prompt
tokenized, sampling checked), ``admitted`` (rate limit and shedding passed; the request is
sent to its pool next), ``first`` (its first token came back from the pool). The response's
status and headers are committed at ``first`` (``engine.frontend.openai_server``), so every
stage is known when the header goes out, streaming or not. The header gives each stage's
duration in milliseconds::

    Server-Timing: parse;dur=0.41, tokenize;dur=0.12, admit;dur=0.01, pool;dur=18.3,
                   predicted;dur=12.0

``predicted`` is the queue wait admission predicted for the request when it was admitted
(``engine.frontend.drain``): against ``pool``, what it really waited, it is the predictor's
error (``bench.flood`` reports it). ``pool`` is the time from sending to the first token: the pool's queue, the step that runs
the prefill, the hops between processes, and the frontend's event loop delivering it. The
client measures the rest (first byte received) itself; ``bench.flood`` reads these.

``pool`` split (``pool_stages``, from the ``PoolTiming`` the pool puts on the first output:
engine/pool/first_token.py; unix-clock stamps of two processes on one machine):
``to_pool`` (admitted until the pool's loop took the request: the frontend's task handing
it over, the socket, a pool loop busy with other messages or a step), ``queue`` (until the
request was first in a plan), ``chunks`` (earlier prefill chunks, until the plan that gave
its first token went out), ``step`` (that plan out and its result back; ``execute`` is the
worker's own part of it, ``step_tokens`` / ``step_requests`` its size, not durations),
``step_wait`` (the part of ``queue`` spent waiting for the step its worker was running
to end; ``prev_step`` that step's length and ``prev_step_tokens`` its size; ``queue_steps``
the steps of any worker that ended while it waited, a count), ``out`` (the pool's loop
until the output went out), ``back`` (until the frontend's pool
client read it: the socket and the frontend's event loop), ``wake`` (until the handler ran
again: the event loop). ``received`` carries the unix time the app was called, as
``desc``, so a client on the same machine can tell the time before the app saw the request
(TCP accept, the HTTP server's parsing: the event loop again).
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from engine.messages import PoolTiming

HEADER = "Server-Timing"
#: (stage name in the header, the stamp that starts it, the stamp that ends it)
STAGES = (("parse", "received", "parsed"), ("tokenize", "parsed", "tokenized"),
          ("admit", "tokenized", "admitted"), ("pool", "admitted", "first"))


def stamp(scope: MutableMapping[str, Any], name: str) -> None:
    """Record ``name`` now on the request's scope (``request.scope`` in a handler)."""
    scope.setdefault("state", {}).setdefault("stamps", {})[name] = time.perf_counter()


def note(scope: MutableMapping[str, Any], name: str, seconds: float) -> None:
    """Record a duration that is not between two stamps (e.g. the predicted queue wait)."""
    scope.setdefault("state", {}).setdefault("notes", {})[name] = seconds


def pool_stages(scope: MutableMapping[str, Any], t: PoolTiming | None) -> None:
    """Note the ``pool`` stage's parts from the pool's stamps (call after ``first``)."""
    stamps = scope.get("state", {}).get("stamps", {})
    if t is None or "admitted" not in stamps or "first" not in stamps:
        return
    wall = time.time() - time.perf_counter()  # perf_counter -> unix time, now
    for name, start, end in (("to_pool", wall + stamps["admitted"], t.arrived),
                             ("queue", t.arrived, t.scheduled),
                             ("chunks", t.scheduled, t.step_sent),
                             ("step", t.step_sent, t.step_done),
                             ("out", t.step_done, t.sent), ("back", t.sent, t.received),
                             ("wake", t.received, wall + stamps["first"])):
        note(scope, name, end - start)
    note(scope, "execute", t.execute_s)
    note(scope, "step_tokens", t.step_tokens / 1e3)  # counts, shown as the "duration"
    note(scope, "step_requests", t.step_requests / 1e3)
    if t.prev_step_done:  # what the queue waited for
        note(scope, "step_wait", max(0.0, min(t.scheduled, t.prev_step_done) - t.arrived))
        note(scope, "prev_step", t.prev_step_done - t.prev_step_sent)
        note(scope, "prev_step_tokens", t.prev_step_tokens / 1e3)
    note(scope, "queue_steps", t.queue_steps / 1e3)


def server_timing(scope: MutableMapping[str, Any]) -> str | None:
    """The ``Server-Timing`` value of the stages whose two stamps exist, then the notes,
    then ``received;desc=UNIX`` (None if nothing)."""
    state = scope.get("state", {})
    stamps = state.get("stamps", {})
    parts = [f"{name};dur={1e3 * (stamps[end] - stamps[start]):.3f}"
             for name, start, end in STAGES if start in stamps and end in stamps]
    parts += [f"{name};dur={1e3 * s:.3f}" for name, s in state.get("notes", {}).items()
              if s != float("inf")]
    if "received" in stamps:
        received = time.time() - (time.perf_counter() - stamps["received"])
        parts.append(f"received;desc={received:.6f}")
    return ", ".join(parts) or None


def parse(value: str) -> dict[str, float]:
    """A ``Server-Timing`` value back into {stage: milliseconds} (what clients do); a
    numeric ``desc`` is kept as is (``received``: unix seconds)."""
    out = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        key, _, rest = params.partition("=")
        if name and key in ("dur", "desc") and rest:
            try:
                out[name] = float(rest.strip('"'))
            except ValueError:
                continue
    return out
