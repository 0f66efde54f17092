"""``python -m engine.sim --replay PATH``: replay a decision recording, compare every plan.

A recording (``--record-decisions``, engine/scheduler/record.py) holds every input the
pool's scheduler was given and every plan it made. Replaying feeds the inputs, in order and
with their ``now``, to a fresh ``Scheduler`` built from the recording's header (or with
``--policy`` / ``--placement`` changed), and compares each plan it makes with the recorded
one, field by field. Results are applied to the replayed scheduler's plan in flight on the
worker; they are the recorded ones, so once a plan differs the rest cannot be compared:
replay stops at the first divergence and reports it (segment, plan number, step id, worker,
time, what differs). Otherwise it reports "N plans identical".

Exit status: 0 when every plan is identical, or when the policy or placement was changed
(the divergence is then the answer); 1 on a divergence with the recorded policy and
placement (the scheduler is not deterministic, or its code changed); 2 for a bad file.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import SchedulerConfig
from engine.messages import StepPlan
from engine.scheduler.record import (
    Abort,
    Add,
    AddWorker,
    FailStep,
    Frame,
    Header,
    RemoveWorker,
    Schedule,
    Update,
    read_segments,
)
from engine.scheduler.scheduler import Scheduler


@dataclass
class Divergence:
    segment: int  # 1-based
    plan_index: int  # 1-based count of plans (Schedule frames) in the segment
    step_id: int  # the recorded plan's (-1: none recorded)
    worker_id: int
    now: float
    differences: list[str]

    def describe(self) -> str:
        step = f"step {self.step_id}" if self.step_id >= 0 else "no recorded step"
        return (f"first divergence: segment {self.segment}, plan {self.plan_index} ({step}, "
                f"worker {self.worker_id}, t={self.now:.6f}): " + "; ".join(self.differences))


@dataclass
class ReplayReport:
    num_plans: int = 0  # plans compared and identical
    num_frames: int = 0
    num_segments: int = 0
    divergence: Divergence | None = None
    policy: str = ""
    placement: str = ""
    changed: bool = False  # policy or placement differs from the recording's

    def describe(self) -> str:
        what = f"policy {self.policy}, placement {self.placement}"
        if self.changed:
            what += " (changed from the recording)"
        if self.divergence is None:
            return (f"{self.num_plans} plans identical ({self.num_segments} segment(s), "
                    f"{self.num_frames} frames; {what})")
        return f"{self.divergence.describe()}\n{self.num_plans} plans identical before it ({what})"


def scheduler_config(header: Header, policy: str | None = None,
                     placement: str | None = None) -> SchedulerConfig:
    """The recording's ``SchedulerConfig`` (fields this engine does not know are dropped),
    with ``policy`` / ``placement`` replaced when given."""
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
    cfg = SchedulerConfig(**{k: v for k, v in header.scheduler.items() if k in known})
    changes: dict[str, Any] = {k: v for k, v in (("policy", policy), ("placement", placement))
                               if v is not None}
    return dataclasses.replace(cfg, **changes)


def replay(segments: Sequence[Sequence[Frame]], policy: str | None = None,
           placement: str | None = None, check: bool = False) -> ReplayReport:
    """Replay every segment through a fresh scheduler each; stop at the first divergence.
    ValueError (naming --policy / --placement) for an unknown name."""
    report = ReplayReport()
    for index, segment in enumerate(segments, 1):
        header = segment[0]
        assert isinstance(header, Header)
        cfg = scheduler_config(header, policy, placement)
        report.policy, report.placement = cfg.policy, cfg.placement
        report.changed = report.changed or (cfg.policy, cfg.placement) != (
            header.scheduler.get("policy"), header.scheduler.get("placement"))
        sched = Scheduler(cfg, block_size=header.block_size, max_model_len=header.max_model_len)
        report.num_segments += 1
        report.divergence = _replay_segment(sched, segment[1:], index, report, check)
        if report.divergence is not None:
            break
    return report


def _replay_segment(sched: Scheduler, frames: Sequence[Frame], segment: int,
                    report: ReplayReport, check: bool) -> Divergence | None:
    plans = 0
    for frame in frames:
        report.num_frames += 1
        match frame:
            case Add(now=now, request=request):
                sched.add(request, now)
            case Abort(now=now, request_ids=ids):
                sched.abort(ids, now)
            case AddWorker(now=now, worker_id=w, num_blocks=n, incarnation=inc):
                sched.add_worker(w, n, now, inc)
            case RemoveWorker(now=now, worker_id=w):
                sched.remove_worker(w, now)
            case Schedule(now=now, worker_id=w, plan=recorded):
                plans += 1
                plan = sched.schedule(w, now)
                sched.drain_outputs()
                if plan != recorded:
                    return Divergence(segment, plans, recorded.step_id if recorded else -1, w,
                                      now, diff_plans(recorded, plan))
                report.num_plans += 1
            case Update(now=now, worker_id=w, result=result):
                plan = sched.in_flight(w)
                if plan is None:
                    return Divergence(segment, plans, result.step_id, w, now,
                                      ["a result arrives for a worker with no plan in flight"])
                sched.update(plan, result, now)
            case FailStep(worker_id=w, message=message):
                plan = sched.in_flight(w)
                if plan is not None:
                    sched.fail_step(plan, message)
            case Header():
                raise AssertionError("a header inside a segment")
        if check:
            sched.check_integrity()
    return None


def _summary(plan: StepPlan) -> dict[str, str]:
    """Each field of ``plan`` in a short, comparable form."""
    return {
        "new requests": " ".join(f"{r.request_id}:{r.num_scheduled_tokens}"
                                 + (f"+{r.num_computed_tokens}cached" if r.num_computed_tokens
                                    else "") for r in plan.new_requests),
        "new requests' blocks": " ".join(f"{r.request_id}:{r.block_ids}"
                                         for r in plan.new_requests),
        "running requests": " ".join(f"{r.request_id}:{r.num_scheduled_tokens}"
                                     for r in plan.cached_requests),
        "running requests' new blocks": " ".join(f"{r.request_id}:{r.new_block_ids}"
                                                 for r in plan.cached_requests
                                                 if r.new_block_ids),
        "dropped": " ".join(plan.finished_request_ids),
        "step id": str(plan.step_id),
        "incarnation": str(plan.incarnation),
    }


def _clip(text: str, limit: int = 240) -> str:
    return f"[{text}]" if len(text) <= limit else f"[{text[:limit]}...]"


def diff_plans(recorded: StepPlan | None, replayed: StepPlan | None) -> list[str]:
    """What differs between two plans for one worker, field by field."""
    if recorded is None or replayed is None:
        which, plan = ("recorded", recorded) if replayed is None else ("replayed", replayed)
        assert plan is not None
        s = _summary(plan)
        return [f"only the {which} run makes a step: step {plan.step_id}, new "
                f"{_clip(s['new requests'])}, running {_clip(s['running requests'])}"]
    a, b = _summary(recorded), _summary(replayed)
    out = [f"{key}: recorded {_clip(a[key])}, replayed {_clip(b[key])}"
           for key in a if a[key] != b[key]]
    if not out:  # a field the summary leaves out (sampling, token ids, output counts)
        out = ["the new requests' data (tokens, sampling or output counts)"]
    return out


def main(path: str, policy: str | None, placement: str | None, check: bool = False) -> int:
    """The CLI's ``--replay``: print the report; the exit status of the module docstring."""
    try:
        segments = read_segments(path)
        report = replay(segments, policy, placement, check)
    except (OSError, ValueError) as e:
        print(f"python -m engine.sim: error: --replay: {e}", file=sys.stderr)
        return 2
    print(f"replay of {path}: {report.describe()}")
    return 1 if report.divergence is not None and not report.changed else 0
