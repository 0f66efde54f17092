"""Recording the scheduler's decisions: every input it is given and every plan it makes.

``--record-decisions PATH`` makes the pool build a ``RecordingScheduler``: the ``Scheduler``
itself, whose public entry points also append one frame each to a recording. Because the
scheduler is pure (time comes in as ``now``, no randomness, no clock; its queues and maps
iterate in insertion order), those frames are all it takes to rebuild its every decision:
``python -m engine.sim --replay PATH`` (engine/sim/replay.py) feeds them to a fresh
scheduler and checks that each plan it makes is the recorded one.

The file is a stream of *batches*, each a 4-byte little-endian length and one MessagePack
array of ``Frame``s (msgspec tagged array structs, the wire's encoding):

- ``Header``: the format, the protocol version, the ``SchedulerConfig`` as a table, the
  block size and the model's context: what it takes to rebuild the scheduler; ``run_id``
  names the launch. A header starts a *segment* (and is a batch of its own): a pool
  restarted in the same launch appends a new segment (its scheduler starts empty); a new
  launch overwrites the file.
- ``Add`` (the ``EngineRequest``), ``Abort``, ``AddWorker``, ``RemoveWorker``: the inputs,
  each with its ``now``;
- ``Schedule``: a call that could do something (the worker was idle with work), its ``now``
  and the plan it returned (or None); calls on a busy or empty worker return None and change
  nothing, so they are not written;
- ``Update``: the ``StepResult`` applied to the worker's plan in flight, with its ``now``
  (the logprobs are dropped: they reach the outputs and never a decision); results the
  scheduler would ignore as stale are not written; ``FailStep``: a worker's error.

Cost: a tap on the wire. The pool encodes every plan to send it and decodes every result
it receives; the recording keeps those very bytes instead of encoding them again:
``schedule`` encodes the plan once and the pool sends those bytes (``plan_bytes``), and the
pool hands ``update`` the bytes the result came in (``received``). MessagePack nests a value
by writing its bytes in place, so a ``Schedule`` frame is the tuple ``(5, now, worker id,
msgspec.Raw(plan bytes))`` and decodes as the typed frame. The hot path appends that tuple
to a list; each ``FLUSH_FRAMES`` frames the list is encoded as one batch (in C, the bytes
copied once) and handed to a writer thread, so the scheduler's loop never waits on the disk.
The in-process ``LLM`` encodes its plans and results for the recording only.
``bench.scheduler --record`` measures the pool's step with and without recording
(docs/simulator.md). A pool killed outright loses the batches not yet written; the reader
stops at a torn last batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
from msgspec import Raw

from engine.config import SchedulerConfig
from engine.messages import (
    PROTOCOL_VERSION,
    EngineRequest,
    RequestOutput,
    StepPlan,
    StepResult,
)
from engine.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: one length-prefixed frame at a time
#: A batch goes to the file once it holds this many frames, or once the frames encoded by
#: ``Recorder.emit`` (arrivals, workers: not plans or results) reach ``FLUSH_BYTES``.
FLUSH_FRAMES = 512
FLUSH_BYTES = 1 << 20
#: Batches encoded and waiting for the writer thread, at most.
QUEUE_BATCHES = 64
_LEN = struct.Struct("<I")
_SCHEDULE, _UPDATE = 5, 6  # the tags of ``Schedule`` and ``Update``
_NOTHING_RECEIVED: tuple[StepResult | None, bytes | memoryview] = (None, b"")


class _Frame(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    pass


class Header(_Frame, tag=0):
    format: int
    protocol_version: int
    scheduler: dict[str, Any]  # SchedulerConfig's fields
    block_size: int
    max_model_len: int
    run_id: str = ""
    pool: str = ""


class Add(_Frame, tag=1):
    now: float
    request: EngineRequest


class Abort(_Frame, tag=2):
    now: float
    request_ids: list[str]


class AddWorker(_Frame, tag=3):
    now: float
    worker_id: int
    num_blocks: int
    incarnation: int = 0


class RemoveWorker(_Frame, tag=4):
    now: float
    worker_id: int


class Schedule(_Frame, tag=5):
    now: float
    worker_id: int
    plan: StepPlan | None = None


class Update(_Frame, tag=6):
    now: float
    worker_id: int  # the plan's worker (the plan answered is the one in flight there)
    result: StepResult


class FailStep(_Frame, tag=7):
    worker_id: int
    message: str


Frame = Header | Add | Abort | AddWorker | RemoveWorker | Schedule | Update | FailStep


class Recorder:
    """Appends frames to a file in batches: ``frames`` is the batch being built (the
    ``RecordingScheduler`` appends its hot frames to it directly). A batch is encoded here
    once it holds ``FLUSH_FRAMES`` frames or the frames ``emit`` encoded reach
    ``FLUSH_BYTES`` (``spill``), and written by a thread of its own: the write's system call
    (the kernel copying the bytes, the bulk of the cost) runs without the interpreter lock,
    off the scheduler's loop. ``flush`` waits until everything appended is in the file. A
    write that fails is logged once and recording stops (the engine serves on); at most
    ``QUEUE_BATCHES`` batches wait for the writer, then ``spill`` waits for it."""

    def __init__(self, path: str, header: Header) -> None:
        self.path = path
        self._enc = msgspec.msgpack.Encoder()
        #: Each an encoded frame (``msgspec.Raw``) or a ``(tag, now, worker id, Raw)``.
        self.frames: list[Any] = []
        self._size = 0  # bytes ``emit`` encoded since the last spill
        mode = "ab" if _same_run(path, header.run_id) else "wb"
        self._file = open(path, mode)  # noqa: SIM115 - closed by close()
        self._queue: queue.Queue[tuple[bytes, bytes] | threading.Event | None] = queue.Queue(
            QUEUE_BATCHES)
        self.failed: Exception | None = None
        self._writer = threading.Thread(target=self._write, name="record-decisions",
                                        daemon=True)
        self._writer.start()
        self.emit(header)
        self.flush()  # the header, a batch of its own: ``_same_run`` reads it alone

    def emit(self, frame: Frame) -> None:
        """Append ``frame``, encoded now (it may hold objects that change later)."""
        data = self._enc.encode(frame)
        self.frames.append(Raw(data))
        self._size += len(data)
        if self._size >= FLUSH_BYTES or len(self.frames) >= FLUSH_FRAMES:
            self.spill()

    def spill(self) -> None:
        """Encode the batch and hand it to the writer."""
        if self.frames:
            batch = self._enc.encode(self.frames)
            self.frames.clear()  # in place: the recording scheduler holds the list
            self._size = 0
            self._queue.put((_LEN.pack(len(batch)), batch))

    def flush(self) -> None:
        """Return once every frame appended so far is written to the file."""
        self.spill()
        if self._writer.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()

    def close(self) -> None:
        if self._writer.is_alive():
            self.spill()
            self._queue.put(None)
            self._writer.join()
        self._file.close()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if isinstance(item, threading.Event):
                    self._file.flush()
                    item.set()
                elif self.failed is None:
                    self._file.write(item[0])
                    self._file.write(item[1])
            except Exception as e:  # the disk is full, the file gone: the engine serves on
                if self.failed is None:
                    log.error("--record-decisions: writing %s failed, recording stops: %s",
                              self.path, e)
                self.failed = e
                if isinstance(item, threading.Event):
                    item.set()


def _same_run(path: str, run_id: str) -> bool:
    """Whether ``path`` holds a recording of launch ``run_id`` (a restarted pool appends)."""
    if not run_id or not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        first = next(iter_frames(head), None)
    except (msgspec.DecodeError, msgspec.ValidationError, FormatError):
        return False  # not a recording of this format: overwritten
    return isinstance(first, Header) and first.run_id == run_id


class RecordingScheduler(Scheduler):
    """The ``Scheduler``, each public entry point also writing its frame (after the call;
    ``add_worker``'s own removal of a worker of the same id is not written: replaying
    ``add_worker`` does it again)."""

    def __init__(self, path: str, config: SchedulerConfig, *, block_size: int,
                 max_model_len: int, kv_events: bool = False, run_id: str = "",
                 pool: str = "") -> None:
        super().__init__(config, block_size=block_size, max_model_len=max_model_len,
                         kv_events=kv_events)
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "record_decisions"}
        self.recorder = Recorder(path, Header(
            format=FORMAT_VERSION, protocol_version=PROTOCOL_VERSION, scheduler=fields,
            block_size=block_size, max_model_len=max_model_len, run_id=run_id, pool=pool))
        self._emit = self.recorder.emit
        self._frames = self.recorder.frames
        self._encode = msgspec.msgpack.Encoder().encode
        self._in_add_worker = False
        self._plan: StepPlan | None = None  # the last plan made, and its bytes
        self._plan_data = b""
        #: The result ``received`` last and its bytes.
        self._received: tuple[StepResult | None, bytes | memoryview] = _NOTHING_RECEIVED

    def close(self) -> None:
        self.recorder.close()

    def add(self, request: EngineRequest, now: float) -> list[RequestOutput]:
        out = super().add(request, now)
        self._emit(Add(now=now, request=request))
        return out

    def abort(self, request_ids: Iterable[str], now: float) -> list[RequestOutput]:
        ids = list(request_ids)
        out = super().abort(ids, now)
        self._emit(Abort(now=now, request_ids=ids))
        return out

    def add_worker(self, worker_id: int, num_blocks: int, now: float,
                   incarnation: int = 0) -> None:
        self._in_add_worker = True
        try:
            super().add_worker(worker_id, num_blocks, now, incarnation)
        finally:
            self._in_add_worker = False
        self._emit(AddWorker(now=now, worker_id=worker_id, num_blocks=num_blocks,
                             incarnation=incarnation))

    def remove_worker(self, worker_id: int, now: float) -> list[str]:
        moved = super().remove_worker(worker_id, now)
        if not self._in_add_worker:
            self._emit(RemoveWorker(now=now, worker_id=worker_id))
        return moved

    def schedule(self, worker_id: int, now: float) -> StepPlan | None:
        ws = self.workers.get(worker_id)
        if ws is None or ws.in_flight is not None or not (ws.running or ws.waiting):
            return None  # what schedule() answers, changing nothing: not written
        plan = Scheduler.schedule(self, worker_id, now)
        if plan is None:
            self._emit(Schedule(now=now, worker_id=worker_id))
            return None
        data = self._encode(plan)  # the bytes the pool sends (``plan_bytes``)
        self._plan, self._plan_data = plan, data
        frames = self._frames
        frames.append((_SCHEDULE, now, worker_id, Raw(data)))
        if len(frames) >= FLUSH_FRAMES:
            self.recorder.spill()
        return plan

    def plan_bytes(self, plan: StepPlan) -> bytes:
        """``plan`` encoded for the wire: the bytes recorded when it was made (the pool sends
        these instead of encoding the plan again)."""
        return self._plan_data if plan is self._plan else self._encode(plan)

    def received(self, result: StepResult, data: bytes | memoryview) -> None:
        """``result`` was decoded from ``data`` (the pool's worker socket): ``update`` records
        these bytes instead of encoding it again. Only the next ``update`` of this very
        object uses them."""
        self._received = (result, data)

    def update(self, plan: StepPlan, result: StepResult, now: float) -> list[RequestOutput]:
        ws = self.workers.get(plan.worker_id)
        if ws is None or ws.in_flight is not plan:
            return []  # a stale plan: update() ignores it
        out = Scheduler.update(self, plan, result, now)
        received, self._received = self._received, _NOTHING_RECEIVED  # let its frame go
        data: bytes | memoryview
        if result.logprobs is not None or result.top_logprobs is not None:
            data = self._encode(msgspec.structs.replace(
                result, logprobs=None, top_token_ids=None, top_logprobs=None))
        elif received[0] is result:
            data = received[1]
        else:
            data = self._encode(result)
        frames = self._frames
        frames.append((_UPDATE, now, plan.worker_id, Raw(data)))
        if len(frames) >= FLUSH_FRAMES:
            self.recorder.spill()
        return out

    def fail_step(self, plan: StepPlan, message: str) -> list[RequestOutput]:
        if self.in_flight(plan.worker_id) is not plan:
            return []
        out = super().fail_step(plan, message)
        self._emit(FailStep(worker_id=plan.worker_id, message=message))
        return out


def open_scheduler(config: SchedulerConfig, *, block_size: int, max_model_len: int,
                   kv_events: bool = False, record_path: str | None = None, run_id: str = "",
                   pool: str = "") -> Scheduler:
    """A ``Scheduler``, recording to ``record_path`` when one is given."""
    if record_path is None:
        return Scheduler(config, block_size=block_size, max_model_len=max_model_len,
                         kv_events=kv_events)
    return RecordingScheduler(record_path, config, block_size=block_size,
                              max_model_len=max_model_len, kv_events=kv_events,
                              run_id=run_id, pool=pool)


def plan_encoder(sched: Scheduler,
                 encode: Callable[[StepPlan], bytes]) -> Callable[[StepPlan], bytes]:
    """How the pool encodes a plan for its worker: ``encode``, or, when ``sched`` records,
    the bytes it recorded (the plan is encoded once)."""
    return sched.plan_bytes if isinstance(sched, RecordingScheduler) else encode


def result_tap(sched: Scheduler) -> Callable[[StepResult, bytes | memoryview], None] | None:
    """What the pool tells of each ``StepResult`` it decodes, with the bytes it came in
    (``RecordingScheduler.received``); None when ``sched`` does not record."""
    return sched.received if isinstance(sched, RecordingScheduler) else None


def pool_record_path(path: str | None, pool_index: int, num_pools: int) -> str | None:
    """Where pool ``pool_index`` records: ``PATH`` with one pool, ``PATH.<index>`` with more."""
    if path is None:
        return None
    return path if num_pools == 1 else f"{path}.{pool_index}"


def flush_recording(sched: Scheduler) -> None:
    """Write out what ``sched`` recorded so far, if it records."""
    if isinstance(sched, RecordingScheduler):
        sched.recorder.flush()


def close_recording(sched: Scheduler) -> None:
    """Flush and close ``sched``'s recording, if it records."""
    if isinstance(sched, RecordingScheduler):
        sched.close()


def iter_frames(data: bytes | memoryview) -> Iterator[Frame]:
    """The frames of a recording in order; a torn last batch (a pool killed mid-write) ends
    the stream. ``msgspec.ValidationError`` for a batch that is not one, ValueError for a
    recording of another format."""
    dec = msgspec.msgpack.Decoder(list[Frame])
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos + 4 <= end:
        (n,) = _LEN.unpack_from(view, pos)
        if pos + 4 + n > end:
            return
        chunk = view[pos + 4:pos + 4 + n]
        try:
            frames = dec.decode(chunk)
        except msgspec.ValidationError:
            if pos == 0:
                _check_format_1(chunk)
            raise
        yield from frames
        pos += 4 + n


class FormatError(ValueError):
    """A recording of a format this engine does not read."""


def _check_format_1(chunk: memoryview) -> None:
    """ValueError naming the format if ``chunk`` is the header of a format 1 recording (one
    frame, not an array of them)."""
    try:
        header = msgspec.msgpack.decode(chunk, type=Frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if isinstance(header, Header):
        raise FormatError(f"recording format {header.format}, this engine reads "
                         f"{FORMAT_VERSION}")


def read_segments(path: str) -> list[list[Frame]]:
    """The segments of a recording (each a ``Header`` and the frames after it).
    ValueError for a file that is not a recording."""
    with open(path, "rb") as f:
        data = f.read()
    segments: list[list[Frame]] = []
    try:
        for frame in iter_frames(data):
            if isinstance(frame, Header):
                if frame.format != FORMAT_VERSION:
                    raise ValueError(f"{path}: recording format {frame.format}, this engine "
                                     f"reads {FORMAT_VERSION}")
                segments.append([frame])
            elif not segments:
                raise ValueError(f"{path}: no header before the first frame")
            else:
                segments[-1].append(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"{path}: not a decision recording: {e}") from e
    except FormatError as e:
        raise ValueError(f"{path}: {e}") from e
    if not segments:
        raise ValueError(f"{path}: empty, or not a decision recording")
    return segments
