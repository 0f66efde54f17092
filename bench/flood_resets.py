"""A non-streaming flood of sheddable requests: every request must get an HTTP answer.

    python -m bench.flood_resets --rate 150 --seconds 20 -- --workers 2 --policy priority

Launches the engine (``bench.engine_server.running_engine``; flags after ``--``) and, from
this process, sends Poisson arrivals of non-streamed ``/v1/completions`` at ``--rate`` for
``--seconds``: short prompts, ``--max-tokens`` greedy tokens, ``priority`` -1 (sheddable, so
admission may answer 429). The client is the load generator's (``bench.loadgen.client``:
unlimited pooled keep-alive connections with httpx's 5 s idle expiry), the one that saw 3
connection resets in about 1,870 requests when the server's keep-alive was uvicorn's 5 s
(docs/http.md, "Why 120 s").

Each request ends as an HTTP status or a transport error (the exception's name). The run
passes when every answer is 200 or 429: no 5xx, no reset, no timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx

from bench.engine_server import running_engine
from bench.loadgen.client import ClientConfig, make_client

_WORDS = ("return", "the", "value", "of", "a", "list", "when", "file", "is", "open")
ALLOWED = ("200", "429")


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
    try:
        return str((await client.post(url, json=body)).status_code)
    except httpx.HTTPError as e:
        return type(e).__name__


async def flood(base_url: str, rate: float, seconds: float, max_tokens: int, seed: int,
                timeout_s: float) -> Counter[str]:
    rng = random.Random(seed)
    url = f"{base_url}/v1/completions"
    tasks = []
    async with make_client(ClientConfig(base_url, "default", timeout_s=timeout_s)) as client:
        start, at = time.monotonic(), 0.0
        while at < seconds:
            body = {"model": "default", "max_tokens": max_tokens, "temperature": 0.0,
                    "priority": -1,
                    "prompt": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24)))}
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, url, body)))
            at += rng.expovariate(rate)
        return Counter(await asyncio.gather(*tasks))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flood_resets", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=150.0, help="requests per second (Poisson)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("engine_args", nargs="*", help="after --: flags for engine.launch")
    args = p.parse_args(argv)
    with running_engine(args.engine_args) as engine:
        counts = asyncio.run(flood(f"http://127.0.0.1:{engine.http_port}", args.rate,
                                   args.seconds, args.max_tokens, args.seed, args.timeout))
    bad = {k: v for k, v in counts.items() if k not in ALLOWED}
    print(json.dumps({"requests": sum(counts.values()), "answers": dict(sorted(counts.items())),
                      "not_200_or_429": sum(bad.values()), "passed": not bad}))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
