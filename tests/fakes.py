"""Test doubles at the bottom of the pyramid: a fake stateful worker and request makers."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

from engine.config import SchedulerConfig
from engine.core import EngineCore, InProcess, IntegrityCheck
from engine.messages import EngineRequest, PromptLogprobs, SamplingParams, StepPlan, StepResult
from engine.scheduler.scheduler import Scheduler

VOCAB = 1000

log = logging.getLogger(__name__)


def next_token(token_ids: list[int]) -> int:
    """A deterministic 'model': the next token is a hash of the whole context."""
    return zlib.crc32(bytes(str(token_ids), "ascii")) % VOCAB


def prompt_logprob(token_ids: list[int] | tuple[int, ...], i: int) -> float:
    """The fake model's logprob of token ``i`` after the tokens before it."""
    return -(zlib.crc32(bytes(str(list(token_ids[: i + 1])), "ascii")) % 997) / 100


class FakeWorker:
    """Applies StepPlans exactly as a real runner must (drop, add, extend, run, sample) and
    checks every plan against the KV it holds: it writes each computed token's id into its
    slot, and before a step verifies that every slot of the context already computed holds
    the right token — so a prefix hit on wrong blocks, or a write into a block that another
    request shares, fails the test.

    ``incarnation`` is this process's restart count, as the real worker's: ``serve`` drops a
    plan addressed to another incarnation (a restarted worker receives what the pool sent
    its dead predecessor before it heard of the death), and results carry it."""

    def __init__(self, worker_id: int, num_blocks: int, block_size: int,
                 incarnation: int = 0) -> None:
        self.worker_id = worker_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.incarnation = incarnation
        self.reqs: dict[str, dict] = {}
        self.kv: dict[int, int] = {}  # slot -> token id written there
        self.dropped: list[StepPlan] = []  # plans for another incarnation, as received

    def serve(self, plan: StepPlan) -> StepResult | None:
        """What the worker process does with a plan: run it, or drop it (None) when it is
        addressed to another incarnation, as ``engine.worker.process.serve`` does."""
        if plan.incarnation != self.incarnation:
            log.warning("worker %d incarnation %d: dropped step %d of incarnation %d",
                        self.worker_id, self.incarnation, plan.step_id, plan.incarnation)
            self.dropped.append(plan)
            return None
        return self.step(plan)

    def step(self, plan: StepPlan) -> StepResult:
        assert plan.worker_id == self.worker_id
        assert plan.incarnation == self.incarnation, "a plan for another incarnation"
        for rid in plan.finished_request_ids:
            self.reqs.pop(rid, None)
        for nr in plan.new_requests:
            assert nr.request_id not in self.reqs, f"{nr.request_id} added twice"
            self.reqs[nr.request_id] = {"tokens": list(nr.token_ids), "blocks": list(nr.block_ids),
                                        "computed": nr.num_computed_tokens,
                                        "prompt": len(nr.token_ids) - nr.num_output_tokens,
                                        "prompt_logprobs": nr.sampling.prompt_logprobs}
        for cr in plan.cached_requests:
            assert cr.request_id in self.reqs, f"a delta for {cr.request_id}, never seen here"
            self.reqs[cr.request_id]["blocks"].extend(cr.new_block_ids)
        ids, toks = [], []
        bs = self.block_size
        for rid, n in plan.scheduled():
            st = self.reqs[rid]
            c = st["computed"]
            assert n >= 1 and c + n <= len(st["tokens"]), (rid, n, st)
            assert len(st["blocks"]) * bs >= c + n, "KV slots missing"
            assert all(0 <= b < self.num_blocks for b in st["blocks"])
            slots = [st["blocks"][p // bs] * bs + p % bs for p in range(c + n)]
            for p in range(c):
                assert self.kv.get(slots[p]) == st["tokens"][p], f"{rid}: wrong KV at position {p}"
        for rid, n in plan.scheduled():  # write after every check: a shared slot is caught
            st = self.reqs[rid]
            c = st["computed"]
            for p in range(c, c + n):
                self.kv[st["blocks"][p // bs] * bs + p % bs] = st["tokens"][p]
        prompt_lps = []
        for rid, n in plan.scheduled():
            st = self.reqs[rid]
            c, end = st["computed"], min(st["computed"] + n, st["prompt"] - 1)
            if st["prompt_logprobs"] is not None and c < end:  # rows scoring tokens c+1..end
                lps = [prompt_logprob(st["tokens"], i) for i in range(c + 1, end + 1)]
                prompt_lps.append(PromptLogprobs(request_id=rid, first=c + 1, token_logprobs=lps,
                                                 ranks=[1] * len(lps)))
            st["computed"] += n
            if st["computed"] == len(st["tokens"]):
                tok = next_token(st["tokens"])
                st["tokens"].append(tok)
                ids.append(rid)
                toks.append(tok)
        return StepResult(step_id=plan.step_id, worker_id=plan.worker_id,
                          incarnation=self.incarnation, request_ids=ids, token_ids=toks,
                          prompt_logprobs=prompt_lps or None)


def make_scheduler(*, max_num_batched_tokens: int = 64, max_num_seqs: int = 8, block_size: int = 4,
                   max_model_len: int = 256, policy: str = "fcfs",
                   placement: str = "cache-aware", workers_share_cores: str = "auto",
                   reserved_workers: int | None = 0) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs, policy=policy, placement=placement,
                          workers_share_cores=workers_share_cores,
                          reserved_workers=reserved_workers)
    return Scheduler(cfg, block_size=block_size, max_model_len=max_model_len)


def make_request(rid: str, prompt_len: int = 10, max_tokens: int = 5, *, priority: int = 0,
                 arrival: float = 0.0, seed: int = 0, eos: tuple[int, ...] = (),
                 prefix: tuple[int, ...] = (), tenant: str = "", salt: str = "") -> EngineRequest:
    """A greedy request; ``prefix`` tokens (shared with other requests) come first."""
    prompt = prefix + tuple((seed * 7919 + i * 31) % VOCAB for i in range(prompt_len))
    return EngineRequest(request_id=rid, prompt_token_ids=prompt,
                         sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                         priority=priority, arrival_time=arrival, eos_token_ids=eos,
                         tenant=tenant, cache_salt=salt)


def reference_output(req: EngineRequest) -> list[int]:
    """What an uninterrupted greedy run of the fake model produces."""
    tokens = list(req.prompt_token_ids)
    out: list[int] = []
    for _ in range(req.sampling.max_tokens):
        tok = next_token(tokens)
        tokens.append(tok)
        out.append(tok)
        if tok in req.eos_token_ids:
            break
    return out


def run_to_completion(sched: Scheduler, workers: dict[int, FakeWorker], now: float = 0.0,
                      max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step every worker (the engine core's loop, integrity checked after every scheduler
    call) until no request is left; return each request's output tokens."""
    core = EngineCore(sched, IntegrityCheck(sched),
                      handles={w: InProcess(worker.step) for w, worker in workers.items()})
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if sched.num_unfinished == 0:
            return outputs
        progressed = core.step(now)
        for o in core.take_outputs():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert progressed or sched.num_unfinished == 0, "scheduler stalled"
    raise AssertionError("did not finish")


def config_only_model_dir(d: Path) -> Path:
    """A model directory with only a config: enough for what reads the model's limits (the
    pool, the scheduler), no weights."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
        "num_hidden_layers": 2, "eos_token_id": 999}))
    return d


def pool_peers(run_dir: Path | str, service: Any, num_workers: int,
               timeout_s: float = 10.0) -> tuple[Any, Any, Any]:
    """The frontend's and the launcher's sockets to pool 0 of ``run_dir`` (push requests,
    pull outputs, push control), once ``service`` (a ``PoolService`` in a thread) has
    registered ``num_workers`` workers."""
    import time

    import zmq

    from engine import ipc

    ctx = zmq.Context.instance()
    addrs = ipc.pool_addresses(str(run_dir), 0)
    push = ipc.make_socket(ctx, zmq.PUSH, addrs.requests, bind=False)
    pull = ipc.make_socket(ctx, zmq.PULL, addrs.outputs, bind=False)
    control = ipc.make_socket(ctx, zmq.PUSH, addrs.control, bind=False)
    deadline = time.time() + timeout_s
    while time.time() < deadline and len(service.scheduler.workers) < num_workers:
        time.sleep(0.01)
    return push, pull, control


def process_state(pid: int) -> str:
    """A Linux process's state letter (``T``: stopped, by SIGSTOP)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int, stopped: bool, timeout_s: float = 5.0) -> None:
    """Wait until process ``pid`` is stopped (or, ``stopped`` False, runs again)."""
    import time

    deadline = time.monotonic() + timeout_s
    while (process_state(pid) == "T") != stopped:
        assert time.monotonic() < deadline, f"pid {pid} is {process_state(pid)}"
        time.sleep(0.005)
