"""Configuration from flags and TOML: validated, with errors that name the flag."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import config_from_args, config_from_dict
from engine.config import ConfigError, replace


def test_defaults_serve_the_embedded_model_on_localhost():
    cfg = config_from_args([])
    assert cfg.models[0].path is None and cfg.models[0].name == "default"
    assert (cfg.frontend.host, cfg.frontend.http_port, cfg.frontend.grpc_port) == ("127.0.0.1", 8000, 50051)
    assert cfg.worker.num_workers == 1 and cfg.worker.runner == "native"


@pytest.mark.parametrize("argv,flag", [
    (["--workers", "0"], "--workers"),
    (["--block-size", "12"], "--block-size"),
    (["--grpc-port", "70000"], "--grpc-port"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--num-kv-blocks", "1"], "--num-kv-blocks"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory"),
    (["--model", "/no/such/dir"], "--model"),
    (["--served-model-name", "a", "--served-model-name", "b"], "--served-model-name"),
    (["--api-key", "has space"], "--api-key"),
    (["--rate-limit-rpm", "0"], "--rate-limit-rpm"),
    (["--shed-queue-time", "-1"], "--shed-queue-time"),
    (["--max-queue-time", "0"], "--max-queue-time"),
    (["--max-request-bytes", "10"], "--max-request-bytes"),
    (["--api-key-file", "/no/such/file"], "--api-key-file"),
    (["--cuda-graph-max-batch", "0"], "--cuda-graph-max-batch"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--worker-nice", "20"], "--worker-nice"),
    (["--worker-nice", "-1"], "--worker-nice"),
    (["--worker-sched", "idle", "--worker-nice", "5"], "--worker-nice"),
    (["--runner", "vllm", "-tp", "2"], "--tensor-parallel-size"),
    (["--reserved-workers", "-1"], "--reserved-workers"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        config_from_args(argv)


def test_cuda_graph_flags():
    cfg = config_from_args([])
    assert not cfg.worker.enforce_eager and cfg.worker.cuda_graph_max_batch == 64
    assert config_from_args(["--max-num-seqs", "512"]).worker.cuda_graph_max_batch == 256
    cfg = config_from_args(["--enforce-eager", "--cuda-graph-max-batch", "24"])
    assert cfg.worker.enforce_eager and cfg.worker.cuda_graph_max_batch == 24


def test_toml_file_with_flags_winning(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text('workers = 3\nmax_num_batched_tokens = 128\napi_key = "k1"\n')
    cfg = config_from_args(["--config", str(path), "--workers", "2"])
    assert cfg.worker.num_workers == 2
    assert cfg.scheduler.max_num_batched_tokens == 128
    assert cfg.frontend.api_keys == ("k1",)


def test_api_key_file_and_example_config(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# ops team\nk-one\n\n  k-two  \n")
    cfg = config_from_args(["--api-key", "k0", "--api-key-file", str(keys)])
    assert cfg.frontend.api_keys == ("k0", "k-one", "k-two")
    keys.write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"--api-key-file: .* holds no key"):
        config_from_args(["--api-key-file", str(keys)])
    example = Path(__file__).resolve().parents[1] / "launch" / "example.toml"
    cfg = config_from_args(["--config", str(example)])
    assert (cfg.scheduler.policy, cfg.frontend.http_port) == ("priority", 8000)


def test_toml_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("wokers = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'wokers'"):
        config_from_args(["--config", str(path)])
    path.write_text("workers = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(["--config", str(tmp_path / "missing.toml")])


def test_replace_revalidates():
    cfg = config_from_args([])
    assert replace(cfg, worker={"num_workers": 4}).worker.num_workers == 4
    with pytest.raises(ConfigError, match="--workers"):
        replace(cfg, worker={"num_workers": -1})


def test_help_documents_the_public_flags():
    out = subprocess.run([sys.executable, "-m", "engine.launch", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--model", "--workers", "--runner", "--host", "--http-port", "--grpc-port",
                 "--api-key", "--policy", "--config", "--served-model-name", "--num-kv-blocks",
                 "--max-num-batched-tokens", "--ready-timeout"):
        assert flag in out


def test_cli_errors_exit_2_with_the_flag_named():
    res = subprocess.run([sys.executable, "-m", "engine.launch", "--workers", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "--workers" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "engine.launch", "--policy", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--policy" in res.stderr
    res = subprocess.run([sys.executable, "-m", "engine.launch", "-tp", "3"],
                         capture_output=True, text=True)  # the default model: 4 heads
    assert res.returncode == 2 and "--tensor-parallel-size: 3 does not divide" in res.stderr
    # Refused before any process starts (and before vLLM's slow import), when on CPU.
    res = subprocess.run([sys.executable, "-m", "engine.launch", "--runner", "vllm",
                          "--device", "cpu", "--block-size", "16"], capture_output=True, text=True)
    assert res.returncode == 2 and "--block-size: the vllm runner on CPU needs a multiple of 32" \
        in res.stderr


# launch/k8s/ (engine.yaml's flags, ports and probes included): tests/test_k8s_manifests.py


def test_vllm_on_cpu_resolves_the_block_size_once_before_anything_starts(caplog):
    """No --block-size: the vllm runner on CPU gets vLLM's 32-token blocks (logged once), in
    the config every process is handed; an explicit size is kept or refused, never changed;
    the native runner keeps the default."""
    import logging

    from engine.resolve import resolve_config as resolve_runner_config

    with caplog.at_level(logging.INFO, logger="engine.resolve"):
        cfg = resolve_runner_config(config_from_args(["--runner", "vllm", "--device", "cpu"]))
    assert cfg.cache.block_size == 32
    assert [r.message for r in caplog.records if "KV blocks of 32" in r.message] != []
    assert len(caplog.records) == 1
    assert resolve_runner_config(cfg) == cfg  # resolved once, stable
    assert resolve_runner_config(config_from_args(["--runner", "vllm", "--device", "cpu",
                                                   "--block-size", "64"])).cache.block_size == 64
    with pytest.raises(ConfigError, match=r"^--block-size: the vllm runner on CPU needs a "
                       r"multiple of 32 .*got 16"):
        resolve_runner_config(config_from_args(["--runner", "vllm", "--device", "cpu",
                                                "--block-size", "16"]))
    assert resolve_runner_config(config_from_args([])).cache.block_size == 16
    assert resolve_runner_config(config_from_args(["--device", "cpu"])).cache.block_size == 16


def test_cli_is_built_from_the_config_fields():
    """Every flag-carrying field is a flag whose --help shows the field's default; the
    dataclasses and the CLI agree on every default (cuda_graph_max_batch included)."""
    import dataclasses

    from engine.cli import SECTIONS, build_parser, flag_fields
    from engine.config import EngineConfig

    help_text = " ".join(build_parser().format_help().split())
    for _, section in SECTIONS:
        for _, f in flag_fields(section):
            assert f.metadata["flag"] in help_text
    assert "--max-num-seqs N most requests in one step (default: 64)" in help_text
    assert "--max-restarts N" in help_text and "--restart-window SECONDS" in help_text
    cli, plain = config_from_args([]), EngineConfig()
    for name in ("cache", "scheduler", "worker", "frontend", "launch"):
        a, b = dataclasses.asdict(getattr(cli, name)), dataclasses.asdict(getattr(plain, name))
        a.pop("block_size_auto", None), b.pop("block_size_auto", None)
        assert a == b, name
    assert cli.models == plain.models
    with pytest.raises(ConfigError, match="unknown option 'wokers'"):
        config_from_dict({"wokers": 2})


def test_resolve_decides_every_auto_once(tmp_path):
    """The device, the context (sliding window, the vllm runner's KV capacity, the one
    check of --max-model-len) are decided before any process starts."""
    import json

    from engine.models.default import default_model_dir
    from engine.models.info import load_model_info, sliding_window
    from engine.resolve import resolve_config

    cfg = resolve_config(config_from_args([]))
    assert cfg.worker.device in ("cpu", "cuda")
    native_len = cfg.models[0].max_model_len
    assert native_len == load_model_info(config_from_args([]).models[0]).max_model_len
    assert resolve_config(cfg) == cfg
    # Workers share cores on CPU (priority's exclusive prefill across workers); a given
    # value is kept.
    cpu = resolve_config(config_from_args(["--device", "cpu"]))
    assert cpu.scheduler.workers_share_cores == "yes"
    with pytest.raises(ConfigError, match="--workers-share-cores"):
        config_from_dict({"workers_share_cores": "maybe"})
    kept = resolve_config(config_from_args(["--device", "cpu", "--workers-share-cores", "no"]))
    assert kept.scheduler.workers_share_cores == "no"
    # The vllm runner holds at most its KV cache: 4 blocks of 32 tokens.
    small = resolve_config(config_from_args(["--runner", "vllm", "--device", "cpu",
                                             "--num-kv-blocks", "4"]))
    assert small.models[0].max_model_len == min(128, native_len)
    with pytest.raises(ConfigError, match=r"^--max-model-len: 512 exceeds the model's KV cache"):
        resolve_config(config_from_args(["--runner", "vllm", "--device", "cpu",
                                         "--num-kv-blocks", "4", "--max-model-len", "512"]))
    # One parser of the sliding window: Mistral-style applies it, Qwen2 only when asked.
    assert sliding_window({"sliding_window": 64}) == 64
    assert sliding_window({"sliding_window": 64, "use_sliding_window": False}) is None
    qwen = {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64}
    assert sliding_window(qwen) is None
    assert sliding_window({**qwen, "use_sliding_window": True}) == 64
    model = tmp_path / "m"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(default_model_dir(), model)
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "sliding_window": 96}))
    windowed = resolve_config(config_from_args(["--model", str(model)]))
    assert windowed.models[0].max_model_len == 96
    from engine.models.loader import read_config

    assert read_config(model).sliding_window == 96


def test_cpu_workers_yield_the_cores_to_the_frontend_and_the_pool(monkeypatch):
    """``--worker-sched auto``: SCHED_IDLE for CPU workers on Linux, unless a nice level is
    asked for; ``normal`` for GPU workers and where the OS has no SCHED_IDLE."""
    from engine.resolve import resolve_config

    def worker(*argv):
        w = resolve_config(config_from_args(list(argv))).worker
        return w.sched, w.nice

    assert worker("--device", "cpu") == ("idle", 0)
    assert worker("--device", "cpu", "--worker-sched", "normal") == ("normal", 5)
    assert worker("--device", "cpu", "--worker-nice", "7") == ("normal", 7)
    assert worker("--device", "cpu", "--worker-nice", "0") == ("normal", 0)
    assert worker("--device", "cuda") == ("normal", 0)
    assert worker("--device", "cuda", "--worker-sched", "idle") == ("idle", 0)
    with pytest.raises(ConfigError, match="--worker-sched"):
        config_from_dict({"worker_sched": "low"})
    monkeypatch.delattr(os, "SCHED_IDLE")
    assert worker("--device", "cpu") == ("normal", 5)
    with pytest.raises(ConfigError, match="--worker-sched: idle needs Linux"):
        worker("--device", "cpu", "--worker-sched", "idle")


def test_cpu_workers_keep_one_free_of_sheddable_requests():
    """``--reserved-workers`` not given: 1 where the workers share cores and there are two or
    more, 0 on GPUs and for a lone worker; a count must leave a worker for sheddable
    requests, checked against the workers the engine runs (under torchrun, those the world
    size gives)."""
    from engine.resolve import resolve_config
    from engine.torchrun import torchrun_config

    def reserved(*argv):
        return resolve_config(config_from_args(list(argv))).scheduler.reserved_workers

    assert reserved("--device", "cpu", "--workers", "2") == 1
    assert reserved("--device", "cpu", "--workers", "4") == 1
    assert reserved("--device", "cpu") == 0
    assert reserved("--device", "cuda", "--workers", "2") == 0
    assert reserved("--device", "cpu", "--workers", "2", "--workers-share-cores", "no") == 0
    assert reserved("--device", "cpu", "--workers", "2", "--reserved-workers", "0") == 0
    assert reserved("--device", "cuda", "--workers", "4", "--reserved-workers", "3") == 3
    for workers, n in (("2", "2"), ("1", "1")):
        with pytest.raises(ConfigError, match="--reserved-workers: must leave a worker"):
            reserved("--device", "cpu", "--workers", workers, "--reserved-workers", n)
    cfg = torchrun_config(["--device", "cpu"], world_size=2, local_world_size=2)
    assert (cfg.worker.num_workers, cfg.scheduler.reserved_workers) == (2, 1)
    with pytest.raises(ConfigError, match="--reserved-workers"):
        torchrun_config(["--device", "cpu", "--reserved-workers", "2"], world_size=2,
                        local_world_size=2)
