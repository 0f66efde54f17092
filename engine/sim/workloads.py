"""Seeded, token-level workloads of ``../shared/WORKLOADS.md`` for the simulator.

A workload is a stream of ``SimRequest`` in arrival order, regenerated identically from its
``WorkloadConfig`` (seed included) every time ``Workload.requests()`` is called, so several
policies see exactly the same requests without holding them all in memory.

Token ids are drawn uniformly from ``[0, vocab_size)``; prefixes meant to be shared (the
system prompts of ``shared-prefix``, the history of ``multi-turn``) are literally the same
ids, so the scheduler's prefix cache can hit on them, and nothing else is shared.

Generators (``--workload``):

- ``chat-short``: ShareGPT-like lognormal lengths, prompt mean ~215 in [4, 1024], output
  mean ~195, prompt + output <= 2048.
- ``chat-long``: Azure conversation trace: prompt lognormal(6.63, 0.99), output
  lognormal(5.02, 0.86) <= 1000.
- ``code``: Azure code trace: prompt lognormal(7.0, 1.36), output lognormal(2.79, 0.85),
  bursty Gamma arrivals (default coefficient of variation 8).
- ``shared-prefix``: G groups x R requests, each group sharing an S-token system prompt, then
  a Q-token question, O output tokens, in a random interleaving; exactly G x R requests.
- ``priority-mix``: any base workload (``base``) with a fraction ``critical_fraction`` of
  requests critical (priority 1) and the rest sheddable (priority -1).
- ``multi-turn``: conversations of T turns, arrivals of conversations at the rate; each later
  turn arrives ``think_time`` (exponential mean) after the previous one finishes, its prompt
  the whole history (earlier prompts and the responses the simulated model gave) plus a new
  chat-short-like message.

Arrivals: Gamma inter-arrival times with shape ``burstiness`` b (coefficient of variation
1/sqrt(b); b = 1 is Poisson) at ``rate`` requests/s, during ``duration`` seconds (or up to
``num_requests``); rate ``inf`` sends ``num_requests`` at time 0. ``scale`` divides every
length (for 2-core machines), keeping the ratios; lengths are clipped so prompt + output
stays below ``max_model_len``.

JSON lines (``write_jsonl`` / ``read_jsonl``): one request per line with ``request_id``,
``arrival_time``, ``prompt_token_ids``, ``max_tokens``, ``priority``, ``tenant``, ``seed``,
and, for a request that follows another (a later turn), ``after`` and ``think_time``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("chat-short", "chat-long", "code", "shared-prefix", "priority-mix", "multi-turn")
BASE_WORKLOADS = ("chat-short", "chat-long", "code", "shared-prefix", "multi-turn")

# Salts of independent random streams, so that e.g. a new rate leaves the prompts unchanged.
_ARRIVALS, _LENGTHS, _TOKENS, _TENANTS, _PRIORITY, _ORDER, _THINK = range(7)


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request as the simulator sends it to the scheduler.

    A request with ``after`` arrives ``think_time`` seconds after request ``after`` finishes
    (its ``arrival_time`` is then only its place in the stream). The simulated model's
    ``n``-th output token for the request is ``output_token(seed, n, vocab)``.
    """

    request_id: str
    arrival_time: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    priority: int = 0
    tenant: str = ""
    seed: int = 0
    after: str = ""
    think_time: float = 0.0


def output_token(seed: int, n: int, vocab_size: int) -> int:
    """The simulated model's ``n``-th output token (0-based) for a request seeded ``seed``:
    cheap, deterministic, independent of batch and worker (the fake worker uses it too)."""
    return (seed * 1_000_003 + n * 7_919 + 12_345) % vocab_size


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = "chat-short"
    rate: float = 10.0  # requests/s (conversations/s for multi-turn); math.inf: all at once
    burstiness: float | None = None  # Gamma shape b; None: the workload's default
    duration: float = 600.0  # seconds of arrivals
    num_requests: int | None = None  # at most this many (default 1000 when rate is inf)
    seed: int = 0
    scale: float = 1.0  # divides every length
    vocab_size: int = 4096
    max_model_len: int = 8192
    tenants: int = 1  # requests spread uniformly over tenants "t0".."t{n-1}" ("" when 1)
    # shared-prefix
    groups: int = 64
    per_group: int = 16
    system_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    # priority-mix
    base: str = "chat-short"
    critical_fraction: float = 0.2
    # multi-turn
    turns: int = 4
    think_time: float = 5.0

    def validate(self) -> WorkloadConfig:
        """Raise ValueError naming the CLI flag of the first invalid value; return self."""
        checks: list[tuple[bool, str]] = [
            (self.name in WORKLOADS, f"--workload: unknown {self.name!r}; known: {WORKLOADS}"),
            (self.rate > 0, f"--rate: must be > 0 or inf, got {self.rate}"),
            (self.burstiness is None or self.burstiness > 0,
             f"--burstiness: must be > 0, got {self.burstiness}"),
            (self.duration > 0, f"--duration: must be > 0, got {self.duration}"),
            (self.num_requests is None or self.num_requests >= 1,
             f"--num-requests: must be >= 1, got {self.num_requests}"),
            (self.scale >= 1, f"--scale: must be >= 1, got {self.scale}"),
            (self.vocab_size >= 2, f"--vocab-size: must be >= 2, got {self.vocab_size}"),
            (self.max_model_len >= 3, f"--max-model-len: must be >= 3, got {self.max_model_len}"),
            (self.tenants >= 1, f"--tenants: must be >= 1, got {self.tenants}"),
            (min(self.groups, self.per_group, self.system_len, self.question_len,
                 self.output_len) >= 1, "--groups/--per-group/--system-len/--question-len/"
             "--output-len: must be >= 1"),
            (self.base in BASE_WORKLOADS, f"--base: must be one of {BASE_WORKLOADS}, "
             f"got {self.base!r}"),
            (0 <= self.critical_fraction <= 1,
             f"--critical-fraction: must be in [0, 1], got {self.critical_fraction}"),
            (self.turns >= 1, f"--turns: must be >= 1, got {self.turns}"),
            (self.think_time >= 0, f"--think-time: must be >= 0, got {self.think_time}"),
        ]
        if self.name == "shared-prefix" or (self.name, self.base) == ("priority-mix",
                                                                     "shared-prefix"):
            lengths = [max(1, round(n / self.scale))
                       for n in (self.system_len, self.question_len, self.output_len)]
            checks.append((sum(lengths) < self.max_model_len,
                           f"--system-len + --question-len + --output-len (scaled: "
                           f"{' + '.join(map(str, lengths))}) must be < --max-model-len "
                           f"{self.max_model_len}; use --scale"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


@dataclass(frozen=True)
class Workload:
    """A replayable stream of requests plus what describes it in reports."""

    name: str
    make: Callable[[], Iterator[SimRequest]] = field(repr=False)
    description: dict[str, Any] = field(default_factory=dict)
    #: False when prompts are independent random tokens: the prefix-hit ceiling is then 0.
    reuses_prefixes: bool = True

    def requests(self) -> Iterator[SimRequest]:
        return self.make()


# --------------------------------------------------------------------------- building blocks


def _rng(cfg: WorkloadConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream])


def arrival_times(cfg: WorkloadConfig, burstiness: float) -> Iterator[float]:
    """Gamma(b) inter-arrival times at ``cfg.rate`` within ``cfg.duration``, at most
    ``cfg.num_requests``; all at 0 for an infinite rate."""
    limit = cfg.num_requests
    if math.isinf(cfg.rate):
        yield from (0.0 for _ in range(limit if limit is not None else 1000))
        return
    rng = _rng(cfg, _ARRIVALS)
    scale = 1.0 / (cfg.rate * burstiness)
    t, n = 0.0, 0
    while limit is None or n < limit:
        for gap in rng.gamma(burstiness, scale, 1024).tolist():
            t += gap
            if t >= cfg.duration or (limit is not None and n >= limit):
                return
            n += 1
            yield t


class _Draws:
    """Values of one random stream drawn a chunk at a time (numpy calls are costly one by
    one); deterministic for a seed and a given order of ``take``/``one`` calls."""

    def __init__(self, draw: Callable[[int], np.ndarray], chunk: int = 4096) -> None:
        self.draw = draw
        self.chunk = chunk
        self.values: list[Any] = []
        self.pos = 0

    def take(self, n: int) -> list[Any]:
        out: list[Any] = []
        while n > 0:
            if self.pos == len(self.values):
                self.values, self.pos = self.draw(max(self.chunk, n)).tolist(), 0
            got = self.values[self.pos:self.pos + n]
            self.pos += len(got)
            n -= len(got)
            out += got
        return out

    def one(self) -> Any:
        if self.pos == len(self.values):
            self.values, self.pos = self.draw(self.chunk).tolist(), 0
        self.pos += 1
        return self.values[self.pos - 1]


class _Lengths:
    """Lognormal lengths, clipped, then divided by the scale and fitted into the context."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        rng = _rng(cfg, _LENGTHS)
        self.normal = _Draws(rng.standard_normal)
        self.scale = cfg.scale
        self.max_model_len = cfg.max_model_len

    def raw(self, mu: float, sigma: float, lo: float, hi: float) -> float:
        """A lognormal(mu, sigma) draw clipped to [lo, hi], unscaled."""
        return min(max(math.exp(mu + sigma * self.normal.one()), lo), hi)

    def lognormal(self, mu: float, sigma: float, lo: float, hi: float) -> int:
        return self.scaled(self.raw(mu, sigma, lo, hi))

    def scaled(self, n: float) -> int:
        return max(1, round(n / self.scale))

    def fit(self, prompt: int, output: int) -> tuple[int, int]:
        """Clip so that prompt + output < max_model_len (the prompt keeps one output)."""
        prompt = min(prompt, self.max_model_len - 2)
        return prompt, max(1, min(output, self.max_model_len - 1 - prompt))


class _Tokens:
    def __init__(self, cfg: WorkloadConfig) -> None:
        rng = _rng(cfg, _TOKENS)
        self.draws = _Draws(lambda n: rng.integers(0, cfg.vocab_size, n), chunk=1 << 16)

    def __call__(self, n: int) -> tuple[int, ...]:
        return tuple(self.draws.take(n))


def _tenants(cfg: WorkloadConfig) -> Callable[[], str]:
    if cfg.tenants == 1:
        return lambda: ""
    rng = _rng(cfg, _TENANTS)
    draws = _Draws(lambda n: rng.integers(0, cfg.tenants, n))
    return lambda: f"t{draws.one()}"


# --------------------------------------------------------------------------- generators

# (prompt mu, sigma, lo, hi), (output mu, sigma, lo, hi), max prompt + output (unscaled)
_LOGNORMAL_SPECS: dict[str, tuple[tuple[float, ...], tuple[float, ...], float]] = {
    # means ~215 and ~195: mu = ln(mean) - sigma^2 / 2
    "chat-short": ((5.05, 0.8, 4, 1024), (4.95, 0.8, 1, 2048), 2048),
    "chat-long": ((6.63, 0.99, 4, math.inf), (5.02, 0.86, 1, 1000), math.inf),
    "code": ((7.0, 1.36, 4, math.inf), (2.79, 0.85, 1, math.inf), math.inf),
}
_DEFAULT_BURSTINESS = {"code": 1 / 64}  # coefficient of variation 8


def _lognormal_workload(cfg: WorkloadConfig) -> Iterator[SimRequest]:
    (pmu, psig, plo, phi), (omu, osig, olo, ohi), total = _LOGNORMAL_SPECS[cfg.name]
    lengths, tokens, tenant = _Lengths(cfg), _Tokens(cfg), _tenants(cfg)
    burstiness = cfg.burstiness or _DEFAULT_BURSTINESS.get(cfg.name, 1.0)
    for i, t in enumerate(arrival_times(cfg, burstiness)):
        p_raw = lengths.raw(pmu, psig, plo, phi)
        o_raw = min(lengths.raw(omu, osig, olo, ohi), max(1.0, total - p_raw))
        prompt, output = lengths.fit(lengths.scaled(p_raw), lengths.scaled(o_raw))
        yield SimRequest(str(i), t, tokens(prompt), output, tenant=tenant(), seed=i)


def _shared_prefix(cfg: WorkloadConfig) -> Iterator[SimRequest]:
    lengths, tokens, tenant = _Lengths(cfg), _Tokens(cfg), _tenants(cfg)
    system_len, question_len, output = (lengths.scaled(n) for n in (
        cfg.system_len, cfg.question_len, cfg.output_len))
    systems = [tokens(system_len) for _ in range(cfg.groups)]
    order = _rng(cfg, _ORDER).permutation(cfg.groups * cfg.per_group).tolist()
    arrivals = arrival_times(replace(cfg, num_requests=len(order), duration=math.inf),
                             cfg.burstiness or 1.0)
    for i, (t, slot) in enumerate(zip(arrivals, order, strict=False)):
        prompt = systems[slot // cfg.per_group] + tokens(question_len)
        yield SimRequest(str(i), t, prompt, output, tenant=tenant(), seed=i)


def _multi_turn(cfg: WorkloadConfig) -> Iterator[SimRequest]:
    lengths, tokens, tenant = _Lengths(cfg), _Tokens(cfg), _tenants(cfg)
    think = _Draws(_rng(cfg, _THINK).standard_exponential)
    seed = 0
    for c, t in enumerate(arrival_times(cfg, cfg.burstiness or 1.0)):
        history: tuple[int, ...] = ()
        who, previous = tenant(), ""
        for turn in range(cfg.turns):
            message = lengths.lognormal(5.05, 0.8, 4, 1024)
            output = lengths.lognormal(4.95, 0.8, 1, 2048)
            if len(history) + message + output >= cfg.max_model_len:
                break  # the conversation has filled the context
            prompt = history + tokens(message)
            rid = f"c{c}.{turn}"
            yield SimRequest(rid, t, prompt, output, tenant=who, seed=seed, after=previous,
                             think_time=think.one() * cfg.think_time if turn else 0.0)
            history = prompt + tuple(output_token(seed, n, cfg.vocab_size) for n in range(output))
            previous, seed = rid, seed + 1


def _priority_mix(cfg: WorkloadConfig) -> Iterator[SimRequest]:
    uniform = _Draws(_rng(cfg, _PRIORITY).random)
    for req in _GENERATORS[cfg.base](replace(cfg, name=cfg.base)):
        critical = uniform.one() < cfg.critical_fraction
        yield replace(req, priority=1 if critical else -1)


_GENERATORS: dict[str, Callable[[WorkloadConfig], Iterator[SimRequest]]] = {
    "chat-short": _lognormal_workload,
    "chat-long": _lognormal_workload,
    "code": _lognormal_workload,
    "shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
    "priority-mix": _priority_mix,
}


def make_workload(cfg: WorkloadConfig) -> Workload:
    """The workload ``cfg.name`` (ValueError naming the flag if ``cfg`` is invalid)."""
    cfg.validate()
    base = cfg.base if cfg.name == "priority-mix" else cfg.name
    description: dict[str, Any] = {
        k: v for k, v in asdict(cfg).items() if k in _RELEVANT[base] or k in _RELEVANT["*"]
    }
    if cfg.name == "priority-mix":
        description.update(base=cfg.base, critical_fraction=cfg.critical_fraction)
    if base == "shared-prefix":
        description["system_prompt_hit_ceiling"] = 1 - 1 / cfg.per_group
    if cfg.burstiness is None:
        description["burstiness"] = _DEFAULT_BURSTINESS.get(base, 1.0)
    description["rate"] = "inf" if math.isinf(cfg.rate) else cfg.rate
    return Workload(cfg.name, lambda: _GENERATORS[cfg.name](cfg), description,
                    reuses_prefixes=base in ("shared-prefix", "multi-turn"))


_RELEVANT: dict[str, tuple[str, ...]] = {
    "*": ("name", "rate", "burstiness", "seed", "scale", "vocab_size", "max_model_len", "tenants"),
    "chat-short": ("duration", "num_requests"),
    "chat-long": ("duration", "num_requests"),
    "code": ("duration", "num_requests"),
    "shared-prefix": ("groups", "per_group", "system_len", "question_len", "output_len"),
    "multi-turn": ("duration", "num_requests", "turns", "think_time"),
}


# --------------------------------------------------------------------------- JSON lines


def write_jsonl(requests: Iterable[SimRequest], path: str | Path) -> int:
    """Write one JSON object per request; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for req in requests:
            row: dict[str, Any] = {
                "request_id": req.request_id, "arrival_time": req.arrival_time,
                "prompt_token_ids": list(req.prompt_token_ids), "max_tokens": req.max_tokens,
                "priority": req.priority, "tenant": req.tenant, "seed": req.seed,
            }
            if req.after:
                row.update(after=req.after, think_time=req.think_time)
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Workload:
    """A workload replaying a JSON lines file (unknown keys are ignored; ``request_id``
    defaults to the line number, ``priority`` to 0, ``tenant`` to "", ``seed`` to the line
    number). Requests are sent in order of ``arrival_time`` (stable)."""
    requests = []
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise ValueError(f"--workload-file: cannot read {path}: {e}") from e
    with f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                requests.append(SimRequest(
                    request_id=str(row.get("request_id", i)),
                    arrival_time=float(row["arrival_time"]),
                    prompt_token_ids=tuple(int(t) for t in row["prompt_token_ids"]),
                    max_tokens=int(row["max_tokens"]),
                    priority=int(row.get("priority", 0)),
                    tenant=str(row.get("tenant", "")),
                    seed=int(row.get("seed", i)),
                    after=str(row.get("after", "")),
                    think_time=float(row.get("think_time", 0.0)),
                ))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"--workload-file: {path}:{i + 1}: bad request line "
                                 f"({e!r})") from e
    requests.sort(key=lambda r: r.arrival_time)
    return Workload(f"file:{Path(path).name}", lambda: iter(requests),
                    {"name": "file", "path": str(path), "num_requests": len(requests)})


# --------------------------------------------------------------------------- prefix ceiling


def prefix_hit_ceiling(requests: Iterable[SimRequest], block_size: int, vocab_size: int) -> float:
    """Cached prompt tokens / prompt tokens with one infinite cache, in stream order.

    An upper bound of any placement's prefix hit rate: a request can hit the full blocks of
    its first ``len - 1`` prompt tokens (one token is always computed) that some earlier
    request's sequence (prompt and output, whose KV was computed) already held.
    """
    seen: set[int] = set()
    hit = total = 0
    for req in requests:
        prompt = req.prompt_token_ids
        total += len(prompt)
        sequence = prompt + tuple(output_token(req.seed, n, vocab_size)
                                  for n in range(req.max_tokens - 1))
        num_hittable = (len(prompt) - 1) // block_size
        chain, hitting = 0, True
        for b in range(len(sequence) // block_size):
            chain = hash((chain, sequence[b * block_size:(b + 1) * block_size]))
            if hitting and b < num_hittable:
                if chain in seen:
                    hit += block_size
                    continue
                hitting = False
            seen.add(chain)
    return hit / total if total else 0.0
