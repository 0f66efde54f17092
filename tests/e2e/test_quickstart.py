"""The README's serve command, as a new user runs it: `make serve`, then the CLI client and
an OpenAI-style HTTP request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_make_serve_then_client(tmp_path):
    venv = Path(sys.prefix)  # the environment `make test` built; `make serve` reuses it
    proc = subprocess.Popen(
        ["make", "-s", "-C", str(ROOT), "serve", f"VENV={venv}",
         "ARGS=--grpc-port 0 --http-port 0 --log-level WARNING"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        line = ""
        while time.time() < deadline and not line.startswith("engine ready:"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("engine ready: http://127.0.0.1:"), line
        http_url, grpc_url = line.split()[2:4]
        port = grpc_url.rsplit(":", 1)[1]
        res = subprocess.run([str(venv / "bin" / "python"), "-m", "engine.client",
                              "Return a list of", "--grpc-port", port, "--max-tokens", "8"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip()
        reply = httpx.post(f"{http_url}/v1/chat/completions", timeout=60, json={
            "model": "default", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Return a list of"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
