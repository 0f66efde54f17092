"""The GPU check's parts that run anywhere: the random model directory, the step records and
the summary against the targets, the wheel check, bench.kernels' extend FLOPs and CPU path.

The whole script end to end on CPU (about two minutes on two cores, so not here):
``bash bench/gpu_check.sh --dry-run`` (docs/kernels.md, "To verify on a GPU").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check, random_model
from bench.kernels import prefill_flops

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- random model


def test_tiny_random_model_loads_natively_and_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from engine.models.loader import load_model

    done = random_model.write_model_dir(tmp_path / "m", "tiny", torch.device("cpu"),
                                        shard_gib=0.001)  # 1 MiB: several shards
    assert done["tokenizer"] == "default model's"
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_model(tmp_path / "m", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m",
                                                           dtype=torch.float32).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert done["weight_bytes"] == 2 * sum(p.numel() for p in hf.parameters())
    w = hf.model.layers[1].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025  # drawn, not left at zero or init
    ids = torch.tensor([[5, 17, 300, 4000, 9]])
    with torch.inference_mode():
        want = hf(ids).logits[0, -1]
    assert torch.isfinite(want).all() and want.std() > 0


def test_word_level_tokenizer_covers_the_whole_vocabulary(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from tokenizers import Tokenizer

    preset = dict(random_model.PRESETS["tiny"], vocab_size=300, eos_token_id=299)
    monkeypatch.setitem(random_model.PRESETS, "v300", preset)
    done = random_model.write_model_dir(tmp_path, "v300", torch.device("cpu"))
    assert done["tokenizer"] == "word-level, 300 tokens"
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 300
    assert tok.decode([0, 150, 299]) == "<0> <150> <299>"
    assert tok.encode("<7> <299>").ids == [7, 299]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<299>"


def test_llama3_8b_preset_has_the_real_shapes() -> None:
    from bench.model_step import MODELS

    cfg = random_model.hf_config("llama3-8b")
    n = sum(torch.Size(s).numel() for _, s in random_model.weight_shapes(cfg))
    assert n == 8_030_261_248  # Llama-3-8B's parameter count
    native = MODELS["llama3-8b"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (
        native.num_layers, native.num_kv_heads, native.vocab_size)
    assert cfg["rope_parameters"]["rope_type"] == "llama3"


# --------------------------------------------------------------------------- record, summary


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
errors="0" failures="1" skipped="1" tests="3" time="2.5">
<testcase classname="tests.kernels.t" name="test_a[bf16]" time="1.0"/>
<testcase classname="tests.kernels.t" name="test_b" time="1.2"><failure message="boom">
assert 1 == 2</failure></testcase>
<testcase classname="tests.kernels.t" name="test_c" time="0"><skipped message="needs CUDA"/>
</testcase></testsuite></testsuites>"""


def record(tmp: Path, out: Path, step: int, name: str, rc: int, **docs: object) -> dict:
    args = ["record", "--step", str(step), "--name", name, "--rc", str(rc), "--seconds", "7",
            "--limit", "60", "--out", str(out / f"step{step}_{name}.json")]
    for key, doc in docs.items():
        path = tmp / f"{name}_{key}.{'xml' if isinstance(doc, str) else 'json'}"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        args += ["--payload", f"{key}={path}"]
    args += ["--payload", f"absent={tmp / 'never-written.json'}"]
    assert gpu_check.main(args) == 0
    return json.loads((out / f"step{step}_{name}.json").read_text())


def test_records_and_summary_against_the_targets(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"device_name": "NVIDIA H200", "copy": {"tbps": 4.0}, "matmul": {"tflops": 780.0,
                                                                           "dtype": "bfloat16",
                                                                           "n": 8192}}
    doc = record(tmp_path, out, 1, "env", 0, env=env)
    assert doc["status"] == "ok" and doc["results"]["env"] == env
    assert doc["results"]["absent"] is None
    doc = record(tmp_path, out, 2, "kernel_tests", 1, tests=JUNIT)
    tests = doc["results"]["tests"]
    assert doc["status"] == "failed"
    assert tests["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert "assert 1 == 2" in tests["tests"][1]["message"]
    decode = {"rows": [{"kind": "decode", "batch": 64, "context": 4096, "triton_tbps": 3.6,
                        "sdpa_tbps": 2.0}, {"kind": "decode", "batch": 1, "context": 4096,
                                            "triton_tbps": 0.5}]}
    prefill = {"rows": [{"kind": "prefill", "batch": 8, "context": 4096, "prefix_len": 0,
                         "triton_tflops": 400.0, "sdpa_tflops": 500.0}]}
    doc = record(tmp_path, out, 3, "kernels", 124, decode=decode, prefill=prefill)
    assert doc["status"] == "timeout" and doc["results"]["absent"] is None
    model_step = {"results": [
        {"batch": 1, "context": 2048, "eager_ms": 30.0, "graph_ms": 10.0},
        {"batch": 64, "context": 2048, "eager_ms": 20.0, "graph_ms": 12.0,
         "graph_x_roofline": 1.2}]}
    record(tmp_path, out, 5, "graphs", 0, model_step=model_step)
    doc = record(tmp_path, out, 6, "serve", -1)
    assert doc["status"] == "skipped"
    capsys.readouterr()
    assert gpu_check.main(["summary", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "# gpu_check summary: NVIDIA H200" in text
    assert "| 2 kernel_tests | failed | 7 | 1/1/1 |" in text
    assert "| 3 kernels | timeout | 7 |  |" in text
    assert "| decode 64x4096 bf16, of the step-1 copy bandwidth | 0.9 | >= 0.85 | yes |" in text
    assert "| prefill 8x4096 causal bf16, TFLOP/s | 400 | >= 450 | NO |" in text
    assert "| decode step with graphs, batch 64 x 2048, x roofline | 1.2 | <= 1.3 | yes |" in text
    assert "| graphs speed-up over eager, batch 1 x 2048 | 3 | >= 2 | yes |" in text
    assert "copy bandwidth (read + written): 4 TB/s; bfloat16 8192^3 matmul: 780 TFLOP/s" in text


# --------------------------------------------------------------------------- wheels


def test_wheel_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pins = [line.split("#")[0].strip() for line in
            (REPO / "requirements" / "gpu-wheels.txt").read_text().splitlines()]
    pins = [p for p in pins if p]
    assert {"msgspec", "pyzmq", "fastapi", "uvicorn", "pydantic", "xgrammar",
            "grpcio-tools"} <= {p.split("==")[0] for p in pins}

    def wheel(spec: str) -> None:
        name, version = spec.split("==")
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"x")

    for spec in pins[1:]:
        wheel(spec)
    assert gpu_check.main(["wheels", "--dir", str(tmp_path)]) == 1
    assert f"missing {pins[0]}" in capsys.readouterr().err
    wheel(pins[0])
    assert gpu_check.main(["wheels", "--dir", str(tmp_path)]) == 0
    assert "MiB" in capsys.readouterr().out
    wheel("msgspec==0.1.0")
    wheel("leftpad==1.0")
    assert gpu_check.main(["wheels", "--dir", str(tmp_path), "--limit-mib", "0.001"]) == 1
    err = capsys.readouterr().err
    assert "several versions of msgspec" in err and "unpinned leftpad" in err
    assert "over the 0.001 MiB" in err


# --------------------------------------------------------------------------- bench.kernels


def test_extend_flops_count_the_keys_each_new_token_sees() -> None:
    per_pair = 4.0 * 32 * 128  # QK^T and PV multiply-adds per (query, key) pair, all heads
    assert prefill_flops(1, 4) == per_pair * (1 + 2 + 3 + 4)
    assert prefill_flops(2, 4, prefix=2) == 2 * per_pair * (3 + 4)
    assert prefill_flops(8, 4096, prefix=4095) == 8 * per_pair * 4096  # one decode each


@pytest.mark.slow
def test_bench_kernels_runs_on_cpu_under_the_interpreter(tmp_path: Path) -> None:
    """The script's own code paths (inputs, timing, SDPA reference, extend, partial JSON) on
    the smallest shapes; the interpreter only, so no figure means anything."""
    partial = tmp_path / "k.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "bench.kernels", "--device", "cpu", "--dtype",
                           "fp16", "--batch", "1", "--context", "20", "--prefix-len", "12",
                           "--peak-tbps", "1", "--json", "--partial", str(partial)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc == json.loads(partial.read_text())
    assert [(r["kind"], r["batch"], r["context"]) for r in doc["rows"]] == [
        ("decode", 1, 20), ("prefill", 1, 20)]
    assert doc["rows"][1]["prefix_len"] == 12 and doc["peak_source"]["tbps"] == "--peak-tbps"
    assert all(r["triton_us"] > 0 and r["sdpa_us"] > 0 for r in doc["rows"])
