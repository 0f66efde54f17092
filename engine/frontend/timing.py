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
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

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


def server_timing(scope: MutableMapping[str, Any]) -> str | None:
    """The ``Server-Timing`` value of the stages whose two stamps exist, then the notes
    (None if nothing)."""
    state = scope.get("state", {})
    stamps = state.get("stamps", {})
    parts = [f"{name};dur={1e3 * (stamps[end] - stamps[start]):.3f}"
             for name, start, end in STAGES if start in stamps and end in stamps]
    parts += [f"{name};dur={1e3 * s:.3f}" for name, s in state.get("notes", {}).items()
              if s != float("inf")]
    return ", ".join(parts) or None


def parse(value: str) -> dict[str, float]:
    """A ``Server-Timing`` value back into {stage: milliseconds} (what clients do)."""
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name and rest:
            out[name] = float(rest)
    return out
