"""bench.router_compare's pieces that need no server: the router's command line parsed by
sglang-router's own parser, text prompts in the load generator's payload, the table."""

from __future__ import annotations

import pytest

from bench.loadgen.client import ClientConfig, build_payload
from bench.router_compare import RouterSpec, format_table
from engine.sim.workloads import SimRequest


def test_router_command_is_what_sglang_router_parses() -> None:
    launch = pytest.importorskip("sglang_router.launch_router")
    spec = RouterSpec("r", "default", ("http://127.0.0.1:1", "http://127.0.0.1:2"))
    cmd = spec.command(30001)
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"]
    args = launch.parse_router_args(cmd[3:])
    assert args.worker_urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert (args.policy, args.port, args.host) == ("cache_aware", 30001, "127.0.0.1")


def test_text_prompts_replace_token_ids_by_request_id() -> None:
    req = SimRequest("a", 0.0, (5, 6, 7), 4)
    assert build_payload(req, ClientConfig("http://x", "m"))["prompt"] == [5, 6, 7]
    text = build_payload(req, ClientConfig("http://x", "m", prompt_texts={"a": "hi there"}))
    assert text["prompt"] == "hi there"
    with pytest.raises(KeyError):  # a request without its text is a bug, never token ids
        build_payload(SimRequest("b", 0.0, (1,), 1),
                      ClientConfig("http://x", "m", prompt_texts={"a": "hi"}))


def test_table_rows() -> None:
    row = {"label": "x", "num_completed": 3, "num_requests": 4, "ttft_p50": 0.0412,
           "ttft_p99": 0.5, "throughput_tok_s": 12.34, "request_throughput": 1.5,
           "prefix_hit_rate": 0.75, "metrics_prefix_hit_rate": None,
           "requests_per_engine": [2.0, 1.0], "prefix_hit_ceiling": 0.8}
    table = format_table([row])
    assert "| x | 3/4 | 41 | 500 | 12.3 | 1.50 | 75.0% | - | 2 / 1 |" in table
    assert "80.0%" in table
