"""One open-loop request stream at a fixed rate, in its own process: ``bench.flood`` runs one
for the critical stream and one for the flood, so neither client's work delays the other's
sending (a single Python client with a thousand connections is itself the bottleneck).

    python -m bench.flood_client --port P --rate 150 --duration 20 --priority -1 -o out.json

The client is bare asyncio over TCP (one connection per request, ``Connection: close``), no
HTTP library: sending costs it a few tens of microseconds, so the rate it offers is the rate
asked. Requests go out at ``start + i / rate`` whatever the answers (open loop); ``--burst N``
sends N at once instead. Each record: the send time, the status, ``Retry-After``, the time to
the first streamed event (``ttft_ms``, streamed requests) and to the end (``e2e_ms``), the
server's ``Server-Timing`` stages (``engine.frontend.timing``), a shed 429's predicted queue
wait (``predicted_s``, from its message: ``Retry-After`` is whole seconds), and with ``--retry`` the
retry of a 429 sent ``Retry-After`` seconds later (its own record under ``retry``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

from engine.frontend.timing import parse as parse_timing

TIMEOUT_S = 120.0
#: The predicted queue wait in a shed 429's message (engine.frontend.admission.Shedder).
PREDICTED = re.compile(rb"predicted queue wait ([0-9.]+) s")


def request_bytes(port: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + data


async def send(port: int, payload: bytes, stream: bool) -> dict[str, Any]:
    """One request; its record (times in ms from just before the connection opens)."""
    start = time.perf_counter()
    rec: dict[str, Any] = {"sent": time.time()}
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        rec["status"] = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "retry-after" in headers:
            rec["retry_after"] = float(headers["retry-after"])
        if "server-timing" in headers:
            rec["timing"] = parse_timing(headers["server-timing"])
        body = b""
        while chunk := await reader.read(65536):
            if stream and "ttft_ms" not in rec and b"data: {" in body + chunk:
                rec["ttft_ms"] = 1e3 * (time.perf_counter() - start)
            body += chunk
        rec["e2e_ms"] = 1e3 * (time.perf_counter() - start)
        if rec["status"] == 200 and stream and b"data: [DONE]" not in body:
            rec["error"] = "stream ended without [DONE]"
        if rec["status"] == 429 and (m := PREDICTED.search(body)):
            rec["predicted_s"] = float(m.group(1))
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
    return rec


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens,
                            "temperature": 0, "ignore_eos": True, "priority": args.priority}
    if args.stream:
        body["stream"] = True
    body.update(json.loads(args.extra))
    records: list[dict[str, Any]] = []
    counter = iter(range(1 << 62))

    async def one() -> None:
        # A distinct first word per request: no prompt is a cached prefix of another.
        payload = request_bytes(args.port, {**body, "prompt": f"{args.tag}{next(counter)} "
                                            f"{args.prompt}"})
        rec = await asyncio.wait_for(send(args.port, payload, args.stream), TIMEOUT_S)
        records.append(rec)
        if args.retry and rec.get("status") == 429 and "retry_after" in rec:
            await asyncio.sleep(rec["retry_after"])
            rec["retry"] = await asyncio.wait_for(send(args.port, payload, args.stream),
                                                  TIMEOUT_S)

    if args.start_at:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
    tasks = []
    if args.burst:
        tasks = [asyncio.create_task(one()) for _ in range(args.burst)]
    else:
        t0 = time.perf_counter()
        for i in range(int(args.rate * args.duration)):
            delay = t0 + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            records.append({"error": f"{type(r).__name__}: {r}"})
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--burst", type=int, default=0, help="send this many at once instead")
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--retry", action="store_true", help="retry each 429 after Retry-After")
    p.add_argument("--prompt", default="hello")
    p.add_argument("--extra", default="{}", help="JSON object merged into each body")
    p.add_argument("--tag", default="r", help="prefix of each request's distinct first word")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    records = asyncio.run(run(args))
    with open(args.output, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
