"""The HTTP frontend harness of the frontend tests: the HTTP and gRPC servers in-process
(uvicorn on a background event loop) over two fake pools that bind the real pool sockets
(tests/frontend/fake_pool.py), and the helpers that read their answers."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from frontend.fake_pool import (
    BackgroundFrontend,
    FakePool,
    make_model_dir,
)

from engine.config import FrontendConfig, ModelConfig
from engine.frontend.admission import Admission
from engine.frontend.grpc_server import start_grpc_server
from engine.frontend.http_server import start_http_server
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.serving import ModelRegistry
from engine.models.info import load_model_info

MAX_NUM_SEQS = 4


class HttpFrontend(BackgroundFrontend):
    """The HTTP and gRPC servers, sharing one admission state, over two fake pools."""

    def __init__(self, run_dir: str, model_dir: Path, cfg: FrontendConfig) -> None:
        self.cfg = cfg
        super().__init__(run_dir, model_dir, [
            load_model_info(ModelConfig(path=str(model_dir), served_name=name))
            for name in ("tiny", "tiny-b")])
        self.url = f"http://127.0.0.1:{self.http.port}"

    async def _serve(self) -> None:
        registry = ModelRegistry(self.models)
        self.metrics = EngineMetrics()
        for m in registry:
            self.metrics.add_pool(m.name, m.pool)
        self.admission = Admission(registry, self.cfg, MAX_NUM_SEQS)
        self.api = OpenAIServer(registry, self.cfg, self.admission, self.metrics)
        self.http = await start_http_server(self.api, "127.0.0.1", 0)
        self.grpc, self.grpc_port = await start_grpc_server(registry, "127.0.0.1", 0,
                                                            self.metrics, self.admission)

    async def _unserve(self) -> None:
        await self.grpc.stop(0)
        await self.http.stop(1)
        self.admission.close()


class Env:
    def __init__(self, tmp: Path, cfg: FrontendConfig) -> None:
        self.model_dir = make_model_dir(tmp / "tiny")
        self.run_dir = tempfile.mkdtemp(prefix="http-")  # short: ipc paths have a length limit
        self.pools = [FakePool(self.run_dir, 0), FakePool(self.run_dir, 1)]
        self.fe = HttpFrontend(self.run_dir, self.model_dir, cfg)
        self.client = httpx.Client(base_url=self.fe.url, timeout=20)

    def close(self) -> None:
        self.client.close()
        self.fe.close()
        for p in self.pools:
            p.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def encode(self, text: str) -> list[int]:
        return list(self.fe.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.fe.tokenizer.decode(ids))

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kw)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def sse(resp: httpx.Response) -> list[Any]:
    """The events of an SSE body; the last must be [DONE]."""
    events = [line[len("data: "):] for line in resp.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def assert_error(resp: httpx.Response, status: int, type_: str, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_ and set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    return err
