"""torchrun: two ranks on this machine form one engine, serve, survive a dead worker and stop
together; as two data-parallel workers, and as one worker split over both ranks (tensor
parallel).

``NPROC=2 launch/torchrun.sh`` (``torchrun --standalone --nproc-per-node 2 -m
engine.torchrun``): rank 0 runs the
launcher, pool and frontend and its own worker; rank 1 is a worker that dials the pool over
TCP. Both workers must hold running requests at once (the scheduler places across ranks),
every stream completes, no KV block leaks, and SIGTERM to torchrun leaves no process. The
TCP sockets are CURVE: a rogue peer (plain, or with keys of its own) never completes a
handshake with the pool or the launcher, and the engine serves on unharmed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import zmq
from e2e.engine_proc import Streams, alive, free_blocks, launched, metric, wait_idle
from zmq.utils.monitor import recv_monitor_message

from engine import ipc, torchrun
from engine.models.default import default_model_dir
from engine.topology import Topology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 48


PROMPTS = ("The first story begins", "A different tale starts", "def read(path):")
MAX_TOKENS = 160
#: The first two streams' length: long enough that both ranks' requests overlap for over a
#: second even when the Health RPC that sees it takes a while on a loaded machine.
LONG_TOKENS = 480


def _descendants(pid: int) -> dict[int, str]:
    """pid -> title of every process below ``pid`` (torchrun starts each rank in a session
    of its own, so the process group does not hold them)."""
    rows = [r.split(None, 2) for r in subprocess.run(
        ["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()]
    children: dict[int, list[tuple[int, str]]] = {}
    for r in rows:
        children.setdefault(int(r[1]), []).append((int(r[0]), r[2].strip() if len(r) > 2 else ""))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, title in children.get(todo.pop(), []):
            found[child] = title
            todo.append(child)
    return found


def _named(proc, name: str) -> list[int]:
    return [p for p, title in _descendants(proc.pid).items() if title == name]


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on (/proc: its socket inodes in the LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _rogue_gets_nothing_through(port: int) -> None:
    """A plain ZeroMQ peer and a CURVE peer with keys of its own dial ``port`` with a
    worker's identity: neither completes a handshake (socket monitor), so nothing they send
    is delivered (if it were, the pool would fail to decode it)."""
    ctx: zmq.Context = zmq.Context()
    try:
        server_public, _ = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        for keys in (None, (server_public, client_public, client_secret)):
            rogue = ctx.socket(zmq.DEALER)
            rogue.linger = 0
            rogue.identity = ipc.worker_identity(1)
            if keys is not None:
                rogue.curve_serverkey, rogue.curve_publickey, rogue.curve_secretkey = keys
            mon = rogue.get_monitor_socket()
            rogue.connect(f"tcp://127.0.0.1:{port}")
            rogue.send(b"\xc1 not msgpack", zmq.NOBLOCK)  # queued while it connects
            events = []
            deadline = time.monotonic() + 3
            while mon.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                events.append(recv_monitor_message(mon)["event"])
                if events[-1] & (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                 | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                 | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                    break
            assert zmq.EVENT_CONNECTED in events, f"port {port}: no connection ({events})"
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, \
                f"port {port}: a rogue ({'plain' if keys is None else 'CURVE'}) got in"
            rogue.disable_monitor()
            mon.close(linger=0)
            rogue.close(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_two_ranks_serve_together_survive_a_dead_worker_and_stop_on_sigterm() -> None:
    """Both ranks hold running requests at once; then rank 1's worker is SIGKILLed
    mid-stream: its rank restarts it, the pool recomputes its requests, every stream ends
    with the unsharded model's greedy text."""
    from engine import LLM, SamplingParams

    llm = LLM(num_kv_blocks=64)
    want = {p: o.text for p, o in zip(PROMPTS, llm.generate(
        list(PROMPTS), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)),
        strict=True)}
    want_long = {p: o.text for p, o in zip(PROMPTS[:2], llm.generate(
        list(PROMPTS[:2]), SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS,
                                          ignore_eos=True)), strict=True)}
    with launched("--num-kv-blocks", str(NUM_BLOCKS), "--max-num-batched-tokens", "64",
                  command=("bash", str(REPO / "launch" / "torchrun.sh")),
                  env={"NPROC": "2", "PYTHON": sys.executable}) as (proc, port):
        assert wait_idle(port, [NUM_BLOCKS] * 2) == [NUM_BLOCKS] * 2, "two workers, one per rank"
        base = f"http://127.0.0.1:{proc.http_port}"
        streams = Streams(base, PROMPTS[:2], LONG_TOKENS)
        seen: list[list[int]] = []
        busy_both = False
        deadline = time.time() + 60
        while time.time() < deadline and any(t.is_alive() for t in streams.threads):
            seen.append(free := free_blocks(port))
            if all(f < NUM_BLOCKS for f in free):
                busy_both = True
                break
            time.sleep(0.02)
        outs = streams.join()
        assert busy_both, f"the two requests never ran on both ranks at once: {seen}"
        assert outs == want_long
        assert wait_idle(port, [NUM_BLOCKS, NUM_BLOCKS]) == [NUM_BLOCKS, NUM_BLOCKS]

        (pool,) = _named(proc, "engine-pool-0")  # its worker socket on TCP, and the
        launcher = int(Path(f"/proc/{pool}/stat").read_text().split(") ")[1].split()[1])
        tcp = [*_listening_tcp_ports(pool), *_listening_tcp_ports(launcher)]  # inbox's
        assert len(tcp) == 2, tcp
        for listener in tcp:
            _rogue_gets_nothing_through(listener)
        assert _named(proc, "engine-pool-0") == [pool], "the pool did not survive the rogues"

        (victim,) = _named(proc, "engine-worker-0-1")
        streams = Streams(base, PROMPTS, MAX_TOKENS)
        streams.wait_under_way()
        assert free_blocks(port)[1] < NUM_BLOCKS, "no stream on the worker about to die"
        os.kill(victim, signal.SIGKILL)
        assert streams.join() == want, "a stream was lost or changed by the restart"
        deadline = time.time() + 60
        while time.time() < deadline and _named(proc, "engine-worker-0-1") in ([], [victim]):
            time.sleep(0.2)
        assert len(_named(proc, "engine-worker-0-1")) == 1
        assert wait_idle(port, [NUM_BLOCKS, NUM_BLOCKS]) == [NUM_BLOCKS, NUM_BLOCKS]
        _stop_and_check_gone(proc)


def _stop_and_check_gone(proc) -> None:
    below = _descendants(proc.pid)
    assert len([t for t in below.values() if t.startswith("engine-")]) >= 3, below
    proc.send_signal(signal.SIGTERM)  # what a job scheduler does to torchrun
    proc.wait(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(p) for p in below):
        time.sleep(0.2)
    assert not [t for p, t in below.items() if alive(p)], "processes outlived torchrun"


def test_tensor_parallel_group_generates_what_one_process_does() -> None:
    """Two ranks, ``-tp 2``: one worker whose model is split over both ranks (heads and MLP
    features; the pool sees one worker). Greedy completions equal the unsharded model's in
    this process, streamed and not."""
    from engine import LLM, SamplingParams

    prompts = ["Once upon a time", "def main():\n    ", "The list of files"]
    llm = LLM(num_kv_blocks=64)
    want = [o.text for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                                                 ignore_eos=True))]
    with launched("-tp", "2", "--num-kv-blocks", str(NUM_BLOCKS),
                  command=("bash", str(REPO / "launch" / "torchrun.sh")),
                  env={"NPROC": "2", "PYTHON": sys.executable}) as (proc, port):
        assert wait_idle(port, [NUM_BLOCKS]) == [NUM_BLOCKS], "one worker: the group of both ranks"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proc.http_port}/v1", api_key="x",
                               max_retries=0, timeout=120)
        got = client.completions.create(model="default", prompt=prompts, max_tokens=24,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(
                model="default", prompt=prompts[0], max_tokens=24, temperature=0.0,
                stream=True, extra_body={"ignore_eos": True}) if c.choices)
        assert streamed == want[0]
        assert wait_idle(port, [NUM_BLOCKS]) == [NUM_BLOCKS]
        _stop_and_check_gone(proc)


def test_two_models_split_the_ranks() -> None:
    """Two ``--model``s over two ranks: one pool each, each pool's worker on its own rank;
    requests reach the pool their ``model`` names."""
    model = str(default_model_dir())
    with launched("--model", model, "--served-model-name", "a", "--model", model,
                  "--served-model-name", "b", "--num-kv-blocks", str(NUM_BLOCKS),
                  command=("bash", str(REPO / "launch" / "torchrun.sh")),
                  env={"NPROC": "2", "PYTHON": sys.executable}) as (proc, port):
        assert wait_idle(port, [NUM_BLOCKS] * 2) == [NUM_BLOCKS] * 2, "a worker in each pool"
        assert sorted(_descendants(proc.pid).values()).count("engine-worker-0-0") == 1
        assert sorted(_descendants(proc.pid).values()).count("engine-worker-1-0") == 1
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{proc.http_port}/v1", api_key="x",
                               max_retries=0, timeout=120)
        assert sorted(m.id for m in client.models.list()) == ["a", "b"]
        base, queries = f"http://127.0.0.1:{proc.http_port}", "vllm:prefix_cache_queries_total"
        for name, other in (("a", "b"), ("b", "a")):
            before = {m: metric(base, queries, m) for m in "ab"}
            got = client.completions.create(model=name, prompt="Once upon a time",
                                            max_tokens=8, temperature=0.0,
                                            extra_body={"ignore_eos": True})
            assert got.usage.completion_tokens == 8
            deadline = time.time() + 10  # the pools' counters come with their next stats
            while time.time() < deadline and metric(base, queries, name) == before[name]:
                time.sleep(0.1)
            assert metric(base, queries, name) > before[name], f"pool {name} served nothing"
            assert metric(base, queries, other) == before[other], f"pool {other} served {name}"
        _stop_and_check_gone(proc)


def test_flag_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert torchrun.main([]) == 2
    assert "run under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun.main(["--workers", "3"]) == 2
    assert "--workers: under torchrun it is the world size" in capsys.readouterr().err
    assert torchrun.main(["-tp", "3"]) == 2
    assert "--tensor-parallel-size: the world size (2) must be a multiple" in \
        capsys.readouterr().err
    model = str(default_model_dir())
    two = ["--model", model, "--model", model, "--served-model-name", "a",
           "--served-model-name", "b"]
    assert torchrun.main([*two, "-tp", "2"]) == 2
    assert "must be a multiple of 2 models x it, got 2" in capsys.readouterr().err
    cfg = torchrun.torchrun_config(two, world_size=4, local_world_size=4)
    assert cfg.worker.num_workers == 2 and len(cfg.models) == 2
    cfg = torchrun.torchrun_config(["--workers", "2"], world_size=2, local_world_size=2)
    assert cfg.worker.num_workers == 2 and cfg.worker.device in ("cpu", "cuda")
    keys = ipc.CurveKeys.generate()
    topo = Topology.torchrun(cfg, keys)  # the control plane: every worker dials in over TCP
    assert (topo.local_workers, topo.listen_host, topo.curve) == ((), "0.0.0.0", keys)
    assert topo.remote_workers == ("worker-0-0", "worker-0-1")
    assert Topology.rank_slot(cfg, 1, 2, 1).name == "worker-0-1"
    cfg = torchrun.torchrun_config(["-tp", "2"], world_size=4, local_world_size=4)
    assert cfg.worker.num_workers == 2 and cfg.worker.tensor_parallel_size == 2
