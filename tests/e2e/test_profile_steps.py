"""``--profile-steps``: an engine serving a few requests writes a recording that the fit
(``python -m engine.sim fit``) turns into a cost file."""

from __future__ import annotations

import signal

import httpx

from engine.profiling import read_recording
from engine.sim.__main__ import main as sim_main
from engine.sim.cost_model import CostModel
from tests.e2e.engine_proc import launched


def test_a_recording_of_served_requests_fits_a_cost_file(tmp_path):
    rec = tmp_path / "steps.jsonl"
    with launched("--profile-steps", str(rec), "--num-threads", "1") as (proc, _grpc):
        url = f"http://127.0.0.1:{proc.http_port}/v1/completions"
        with httpx.Client(timeout=60) as client:
            for i in range(4):
                r = client.post(url, json={"model": "default", "prompt": f"hello {i} " * 8,
                                           "max_tokens": 8, "ignore_eos": True})
                assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)  # a clean stop: the pool flushes its recording
        proc.wait(60)
    rows = read_recording(rec)
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "start" and kinds.count("add") == 4 and kinds.count("first") == 4
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) >= 4 * 8  # each request alone: one prefill, 7 decodes
    assert all(r["execute_s"] > 0 and r["t_result"] >= r["t_send"] for r in steps)
    assert sum(r["decode_seqs"] for r in steps) == 4 * 7
    out = tmp_path / "cost.toml"
    assert sim_main(["fit", str(rec), "--out", str(out)]) == 0
    cost = CostModel.load(out)
    assert cost.admit_s > 0 and cost.host_step_s + cost.host_request_s > 0
