"""bench.model_step on CPU: the byte counts of the roofline, the JSON, the flag checks.

The timings themselves are for a GPU (docs/benchmarks.md); here a tiny model runs the
eager path only, since CUDA graphs need CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import model_step


def test_tiny_run_reports_bytes_and_roofline(capsys: pytest.CaptureFixture[str]) -> None:
    assert model_step.main(["--model", "tiny", "--device", "cpu", "--batch", "2", "3",
                            "--context", "40", "--iters", "2", "--peak-tbps", "0.1",
                            "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = model_step.MODELS["tiny"]
    assert out["device"] == "cpu" and out["dtype"] == "float32" and out["peak_tbps"] == 0.1
    # Every parameter but the input embedding (only the batch's rows are gathered).
    layer = (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
             + cfg.num_heads * cfg.head_dim * cfg.hidden_size
             + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size)
    params = cfg.num_layers * layer + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size
    for row, batch in zip(out["results"], (2, 3), strict=True):
        assert row["batch"] == batch and row["context"] == 40
        assert row["weight_bytes"] == 4 * (params + batch * cfg.hidden_size)
        assert row["kv_bytes"] == 4 * 2 * cfg.num_layers * batch * 41 * cfg.num_kv_heads \
            * cfg.head_dim
        roof = (row["weight_bytes"] + row["kv_bytes"]) / 0.1e12 * 1e3
        assert row["roofline_ms"] == pytest.approx(roof)
        assert row["eager_ms"] > 0
        assert row["eager_x_roofline"] == pytest.approx(row["eager_ms"] / roof)
        assert row["graph_x_roofline"] is None and "graph_ms" not in row


def test_table_and_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert model_step.main(["--model", "tiny", "--device", "cpu", "--batch", "1",
                            "--context", "8", "--iters", "1"]) == 0
    table = capsys.readouterr().out
    assert "tiny decode step, float32" in table and "peak - TB/s" in table
    if not torch.cuda.is_available():  # the default device is CUDA: say so, measure nothing
        assert model_step.main([]) == 0
        assert "no CUDA device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        model_step.main(["--batch", "0"])
    assert "--batch: values must be >= 1" in capsys.readouterr().err
