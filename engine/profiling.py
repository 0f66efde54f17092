"""``--profile-steps PATH``: the pool records every step it runs, for calibrating the simulator.

Off by default and free when off: the pool holds ``profiler = None`` and each hook is behind
one ``is not None`` check. On, the pool calls

- ``on_add(request, now)`` when a request reaches the scheduler,
- ``on_send(plan, now)`` when a plan goes out to a worker,
- ``on_result(plan, result, now)`` when its ``StepResult`` is taken,
- ``on_outputs(outputs, now)`` when a batch of outputs goes to the frontend,
- ``close()`` when the pool stops,

and the profiler writes one JSON object per line (``kind`` says which):

- ``start``: ``t`` (unix seconds), ``pool`` index, ``incarnation``, ``block_size``.
- ``add``: ``t`` (the pool took it), ``frontend_t`` (the frontend stamped it:
  ``EngineRequest.arrival_time``), ``prompt_tokens``, ``max_tokens``.
- ``step``: ``worker``, ``t_send``, ``t_result`` (the pool's clock), ``execute_s`` (the
  worker's own ``StepResult.execute_time_s``), ``gap_s`` (the worker's previous result to
  this plan; None for its first), ``busy`` (whether the worker still held a request after
  its previous result: only then is ``gap_s`` host time rather than idleness), and the
  batch's composition: ``requests``, ``prefill_rows``, ``decode_rows``, ``tokens`` (scheduled),
  ``prefill_tokens``, ``decode_seqs``, ``context_tokens``, ``prefill_pairs`` (the cost
  model's features), ``max_context``.
- ``first``: ``t`` when the pool sent a request's first token out (``request`` id).

The batch features are counted by the simulator's own ``FakeWorker`` replaying the plans
the pool sends (one twin per worker), so a recording and a simulation count alike; the fit
(``python -m engine.sim fit``) turns a recording into a cost file.
A pool restart appends to the file after a new ``start`` line. The file is flushed every
``FLUSH_EVERY`` records and on ``close``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import IO, Any

import msgspec

from engine import messages as m

log = logging.getLogger(__name__)

FLUSH_EVERY = 256


class StepProfiler:
    def __init__(self, path: str | Path, pool_index: int = 0, incarnation: int = 0,
                 block_size: int = 16) -> None:
        from engine.sim.simulator import FakeWorker  # only when profiling

        self._fake_worker = FakeWorker
        self.path = Path(path)
        self.file: IO[bytes] = self.path.open("ab")
        self.encoder = msgspec.json.Encoder()
        self.twins: dict[int, Any] = {}  # worker id -> FakeWorker replaying its plans
        self.sent: dict[int, tuple[float, dict[str, Any]]] = {}  # worker -> (t_send, row)
        self.last_result: dict[int, float] = {}
        self.started: set[str] = set()  # requests whose first token went out
        self.pending = 0
        self._write({"kind": "start", "t": _now(), "pool": pool_index,
                     "incarnation": incarnation, "block_size": block_size})

    def on_add(self, req: m.EngineRequest, now: float) -> None:
        self._write({"kind": "add", "request": req.request_id, "t": now,
                     "frontend_t": req.arrival_time, "prompt_tokens": len(req.prompt_token_ids),
                     "max_tokens": req.sampling.max_tokens})

    def on_send(self, plan: m.StepPlan, now: float) -> None:
        w = plan.worker_id
        twin = self.twins.get(w)
        if twin is None:
            twin = self.twins[w] = self._fake_worker(w, 1 << 30)
        finished = set(plan.finished_request_ids)
        busy = any(rid not in finished for rid in twin.reqs)
        try:
            _, shape = twin.step(plan)
        except (AssertionError, KeyError) as e:  # a plan the twin cannot follow (a restart)
            log.warning("--profile-steps: step %d of worker %d not recorded: %r",
                        plan.step_id, w, e)
            self.twins.pop(w, None)
            return
        last = self.last_result.get(w)
        row = {"kind": "step", "worker": w, "step": plan.step_id, "t_send": now,
               "gap_s": None if last is None else now - last, "busy": busy,
               "requests": plan.num_requests, "tokens": plan.num_scheduled_tokens,
               "decode_rows": shape.decode_seqs,
               "prefill_rows": plan.num_requests - shape.decode_seqs,
               "prefill_tokens": shape.prefill_tokens, "decode_seqs": shape.decode_seqs,
               "context_tokens": shape.context_tokens, "prefill_pairs": shape.prefill_pairs,
               "max_context": max((twin.reqs[rid][1] for rid, _ in plan.scheduled()),
                                  default=0)}
        self.sent[w] = (now, row)

    def on_result(self, plan: m.StepPlan, result: m.StepResult, now: float) -> None:
        w = plan.worker_id
        self.last_result[w] = now
        sent = self.sent.pop(w, None)
        if sent is None or sent[1]["step"] != plan.step_id:
            return
        row = sent[1]
        row["t_result"] = now
        row["execute_s"] = result.execute_time_s
        self._write(row)

    def on_outputs(self, outputs: list[m.RequestOutput], now: float) -> None:
        started = self.started
        for out in outputs:
            if out.new_token_ids and out.request_id not in started:
                started.add(out.request_id)
                self._write({"kind": "first", "request": out.request_id, "t": now})
            if out.finish_reason is not None:
                started.discard(out.request_id)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            self.file.close()

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(self.encoder.encode(row) + b"\n")
        self.pending += 1
        if self.pending >= FLUSH_EVERY:
            self.file.flush()
            self.pending = 0


def _now() -> float:
    return time.time()


def profile_path(path: str, pool_index: int) -> str:
    """Pool 0 writes ``path``; pool i > 0 ``path.pool<i>``."""
    return path if pool_index == 0 else f"{path}.pool{pool_index}"


def read_recording(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a recording; ValueError naming the file and line of a bad one."""
    rows = []
    decoder = msgspec.json.Decoder()
    with Path(path).open("rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = decoder.decode(line)
            except msgspec.DecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object: {e}") from e
            if not isinstance(row, dict) or "kind" not in row:
                raise ValueError(f"{path}:{i}: not a profile record (no 'kind')")
            rows.append(row)
    return rows
