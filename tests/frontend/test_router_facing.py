"""What routers read from a replica, over real HTTP against fake pools: ``/metrics`` parsed with
prometheus_client's own parser (``vllm:cache_config_info``, ``vllm:lora_requests_info`` beside
the gauges an autoscaler reads), and the ``/server_info`` / ``/model_info`` pair sglang-router
asks for when it registers a worker."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from frontend.fake_pool import BackgroundFrontend, FakePool, make_model_dir
from prometheus_client.parser import text_string_to_metric_families

from engine.config import FrontendConfig, ModelConfig
from engine.frontend.admission import Admission
from engine.frontend.http_server import start_http_server
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.serving import ModelRegistry
from engine.messages import PoolStats
from engine.models.info import load_model_info

MAX_NUM_SEQS = 8
KEY = "k-router"


class Frontend(BackgroundFrontend):
    def __init__(self, run_dir: str, model_dir: Path, names: list[str]) -> None:
        super().__init__(run_dir, model_dir, [
            load_model_info(ModelConfig(path=str(model_dir), served_name=n)) for n in names])

    async def _serve(self) -> None:
        registry = ModelRegistry(self.models)
        metrics = EngineMetrics()
        for m in registry:
            metrics.add_pool(m.name, m.pool)
        cfg = FrontendConfig(api_keys=(KEY,))
        self.admission = Admission(registry, cfg, MAX_NUM_SEQS)
        self.api = OpenAIServer(registry, cfg, self.admission, metrics)
        self.http = await start_http_server(self.api, "127.0.0.1", 0)

    async def _unserve(self) -> None:
        await self.http.stop(1)
        self.admission.close()


# Pool 0: two workers of different capacities (a restarted worker may report another);
# pool 1: one worker, another block size.
STATS = [PoolStats(num_waiting=3, num_running=2, kv_usage=[0.5, 0.25], live_workers=2,
                   worker_ids=[0, 1], num_waiting_per_worker=[1, 2], block_size=16,
                   num_blocks=[100, 60], num_free_blocks=[50, 45]),
         PoolStats(live_workers=1, worker_ids=[4], kv_usage=[0.0], block_size=32,
                   num_blocks=[10], num_free_blocks=[10], num_waiting_per_worker=[0])]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    model_dir = make_model_dir(tmp_path_factory.mktemp("m") / "tiny")
    run_dir = tempfile.mkdtemp(prefix="rt-")
    pools = [FakePool(run_dir, i, stats=s) for i, s in enumerate(STATS)]
    fe = Frontend(run_dir, model_dir, ["tiny", "tiny-b"])
    with httpx.Client(base_url=f"http://127.0.0.1:{fe.http.port}", timeout=20) as c:
        # The pools report every 0.5 s; wait for both reports.
        for _ in range(100):
            if all(m.pool.stats is not None for m in fe.models):
                break
            time.sleep(0.05)
        c.model_dir = model_dir  # type: ignore[attr-defined]
        yield c
    fe.close()
    for p in pools:
        p.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_carry_vllms_info_gauges(client: httpx.Client) -> None:
    fams = families(client.get("/metrics").text)
    info = fams["vllm:cache_config_info"]
    assert info.type == "gauge"
    got = sorted((s.labels["model_name"], s.labels["engine"], s.labels["block_size"],
                  s.labels["num_gpu_blocks"], s.value) for s in info.samples)
    assert got == [("tiny", "0", "16", "100", 1.0), ("tiny", "1", "16", "60", 1.0),
                   ("tiny-b", "4", "32", "10", 1.0)]
    for s in info.samples:
        assert (s.labels["cache_dtype"], s.labels["enable_prefix_caching"]) == ("auto", "True")
    lora = fams["vllm:lora_requests_info"]
    assert lora.type == "gauge" and lora.samples == []  # no LoRA: declared, no sample
    # The gauges an autoscaler reads, per pool.
    waiting = {s.labels["model_name"]: s.value for s in fams["vllm:num_requests_waiting"].samples}
    kv = {s.labels["model_name"]: s.value for s in fams["vllm:kv_cache_usage_perc"].samples}
    assert waiting == {"tiny": 3.0, "tiny-b": 0.0}
    assert kv == {"tiny": 0.375, "tiny-b": 0.0}


def test_server_info_is_what_sglang_router_reads(client: httpx.Client) -> None:
    assert client.get("/server_info").status_code == 401  # named model paths: behind the key
    auth = {"Authorization": f"Bearer {KEY}"}
    info = client.get("/server_info", headers=auth).json()
    model_dir = str(client.model_dir)  # type: ignore[attr-defined]
    assert info["served_model_name"] == "tiny" and info["model_path"] == model_dir
    assert info["dp_size"] == 1 and isinstance(info["version"], str)
    assert info["max_total_tokens"] == (100 + 60) * 16
    assert info["max_running_requests"] == 2 * MAX_NUM_SEQS
    assert info["block_size"] == 16 and info["num_workers"] == 2
    assert [m["served_model_name"] for m in info["models"]] == ["tiny", "tiny-b"]
    assert info["models"][1]["max_total_tokens"] == 10 * 32


def test_model_info_reads_the_models_config(client: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    info = client.get("/model_info", headers=auth).json()
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    assert info["is_generation"] is True and info["served_model_name"] == "tiny"
    assert info["tokenizer_path"] == info["model_path"]
    assert client.get("/model_info", params={"model": "tiny-b"},
                      headers=auth).json()["served_model_name"] == "tiny-b"
    err = client.get("/model_info", params={"model": "nope"}, headers=auth)
    assert err.status_code == 404 and err.json()["error"]["param"] == "model"
