"""A pool process dies mid-stream and a new one takes its sockets: the real pool service and
scheduler (fake workers in threads, which register afresh with the new pool) and the real
frontend pool client. The client resubmits every open request as a continuation, and each
request's tokens, across both pools, equal an uninterrupted run: none repeated or missing."""

from __future__ import annotations

import asyncio
import threading
import time

from fakes import make_request, reference_output
from pool.test_pool_service import fake_worker_thread

from engine import ipc
from engine.cli import config_from_dict
from engine.frontend.pool_client import PoolClient
from engine.pool.service import PoolService


class RunningPool:
    """A pool service and two fake workers, in threads."""

    def __init__(self, cfg, run_dir: str) -> None:
        self.service = PoolService(cfg, 0, run_dir)
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=fake_worker_thread,
                                         args=(run_dir, w, 32, self.stop), daemon=True)
                        for w in (0, 1)]
        for t in self.workers:
            t.start()

    def die(self) -> None:
        """The process is gone: no more outputs; its workers drop everything and leave."""
        self.service.running = False
        self.thread.join(5)
        self.stop.set()
        for t in self.workers:
            t.join(5)
        self.service.close()


async def _scenario(cfg, run_dir: str) -> None:
    first = RunningPool(cfg, run_dir)
    client = PoolClient(ipc.pool_addresses(run_dir, 0), "m", resume_timeout_s=30)
    second = None
    try:
        await asyncio.wait_for(client.has_stats.wait(), 10)
        reqs = [make_request(f"r{i}", prompt_len=6, max_tokens=40, seed=i) for i in range(8)]
        streams = [client.add(r) for r in reqs]
        tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        finish: dict[str, str | None] = {}

        async def read(stream) -> None:
            async for out in stream:
                tokens[stream.request_id] += out.new_token_ids
                finish[stream.request_id] = out.finish_reason

        readers = [asyncio.create_task(read(s)) for s in streams]
        deadline = time.monotonic() + 10
        while sum(map(len, tokens.values())) < 40:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await asyncio.to_thread(first.die)
        assert not all(finish.values()) or len(finish) < len(reqs), "all done before the death"
        second = await asyncio.to_thread(RunningPool, cfg, run_dir)
        await asyncio.wait_for(asyncio.gather(*readers), 20)
        assert client.num_resubmitted >= 1
        for r in reqs:
            assert tokens[r.request_id] == reference_output(r), r.request_id
            assert finish[r.request_id] == "length"
        assert client.num_active == 0
        stats = client.stats
        deadline = time.monotonic() + 5
        while stats is None or stats.num_running or stats.num_waiting:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            stats = client.stats
        assert stats.pool_incarnation == second.service.incarnation
        assert stats.num_free_blocks == [32, 32]
    finally:  # the pool first: its PUSH would block without the client's PULL
        if second is not None:
            await asyncio.to_thread(second.die)
        await client.close()


def test_a_restarted_pool_continues_every_request(tmp_path, model_dir) -> None:
    cfg = config_from_dict({"model": [str(model_dir)], "block_size": 4, "workers": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    asyncio.run(_scenario(cfg, str(run_dir)))
