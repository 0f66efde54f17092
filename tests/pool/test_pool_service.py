"""The pool process's service loop over real ZeroMQ sockets, with fake workers in threads."""

from __future__ import annotations

import threading
import time

import zmq
from fakes import FakeWorker, make_request, pool_peers, reference_output

from engine import ipc
from engine import messages as m
from engine.cli import config_from_dict
from engine.pool.service import PoolService


def fake_worker_thread(run_dir, worker_id, num_blocks, stop: threading.Event, incarnation=0):
    ctx = zmq.Context.instance()
    sock = ipc.make_socket(ctx, zmq.DEALER, ipc.pool_addresses(run_dir, 0).workers, bind=False,
                           identity=ipc.worker_identity(worker_id))
    worker = FakeWorker(worker_id, num_blocks, 4, incarnation)
    sock.send(ipc.encode(m.WorkerReady(worker_id=worker_id, num_blocks=num_blocks, block_size=4,
                                       incarnation=incarnation)))
    while not stop.is_set():
        if sock.poll(20):
            msg = ipc.POOL_TO_WORKER.decode(sock.recv())
            # A restarted worker may receive a plan sent to its predecessor: dropped.
            if isinstance(msg, m.StepPlan) and (result := worker.serve(msg)) is not None:
                sock.send(ipc.encode(result))
    sock.close()


def test_pool_serves_requests_and_survives_a_worker_loss(tmp_path, model_dir):
    cfg = config_from_dict({"model": [str(model_dir)], "block_size": 4, "workers": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    service = PoolService(cfg, 0, str(run_dir))
    pool = threading.Thread(target=service.run, daemon=True)
    pool.start()
    stops = {w: threading.Event() for w in (0, 1)}
    threads = {w: threading.Thread(target=fake_worker_thread, args=(run_dir, w, 32, stops[w]),
                                   daemon=True) for w in (0, 1)}
    for t in threads.values():
        t.start()

    push, pull, control = pool_peers(run_dir, service, 2)
    deadline = time.time() + 10

    reqs = [make_request(f"r{i}", prompt_len=6, max_tokens=40, seed=i) for i in range(8)]
    for r in reqs:
        push.send(ipc.encode(m.AddRequest(request=r)))
    push.send(ipc.encode(m.AbortRequests(request_ids=["r7"])))
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    killed = False
    stepped: set[int] = set()
    while len(finished) < len(reqs) and time.time() < deadline:
        if not pull.poll(100):
            continue
        msg = ipc.POOL_TO_FRONTEND.decode(pull.recv())
        if msg.stats is not None:  # each step's worker, for admission (reserved workers)
            st = msg.stats
            assert len(st.step_worker_ids) == len(st.step_times_s) == len(st.step_num_tokens)
            stepped.update(st.step_worker_ids)
        for o in msg.outputs:
            first = o.request_id not in tokens and bool(o.new_token_ids)
            assert (o.timing is not None) == first  # the pool's stamps ride on the first
            if o.timing is not None:
                t = o.timing
                assert t.arrived <= t.scheduled <= t.step_sent <= t.step_done <= t.sent
            if o.new_token_ids or o.request_id in tokens:
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                finished[o.request_id] = o.finish_reason
        if not killed and sum(map(len, tokens.values())) > 20:
            # Worker 1 dies mid-stream; a new incarnation comes up and the pool is told.
            stops[1].set()
            threads[1].join()
            control.send(ipc.encode(m.WorkerDied(worker_id=1, incarnation=0)))
            stops[1] = threading.Event()
            threads[1] = threading.Thread(target=fake_worker_thread,
                                          args=(run_dir, 1, 32, stops[1], 1), daemon=True)
            threads[1].start()
            killed = True
    control.send(ipc.encode(m.Shutdown()))
    pool.join(5)
    for s in stops.values():
        s.set()
    assert killed and not pool.is_alive()
    assert stepped == {0, 1}
    assert finished.pop("r7") == "abort"
    for r in reqs[:7]:
        assert finished[r.request_id] == "length"
        assert tokens[r.request_id] == reference_output(r), r.request_id
    service.close()
    for s in (push, pull, control):
        s.close()
