"""Step-time cost model: how long one worker's forward pass takes, from the batch's shape.

    step time = step_s                                  fixed per step (launch, sampling, I/O)
              + prefill_token_s   * prefill tokens      tokens of prompt chunks (and recompute)
              + decode_seq_s      * decode sequences    requests decoding one token
              + context_token_s   * context tokens      KV tokens attention reads (every request)
              + prefill_pair_s    * prefill pairs       (query, key) pairs of prefill chunks

The host path, outside the worker's forward pass, is four more numbers (an optional
``[host]`` table; all 0 when absent, as in the files fitted on the runner alone):

    admit_s            frontend stamp -> the scheduler has the request (added to TTFT)
    stream_s           the scheduler's output -> the client has it (added to every token)
    host_step_s        per step: the pool-worker round trip beyond the forward pass plus
    host_request_s     the gap before the worker's next plan, + this per request of the step

so a worker's step occupies it for ``step time + host_step_s + host_request_s * requests``
(its outputs come at the end of that).

Two fixed extras by the step's class (an optional ``[step_extra]`` table; 0 when absent):
``prefill_step_s`` for a step with prefill tokens (a prefill runs other code than a decode,
whatever its length), and ``cold_step_s`` for a step on a worker that held no request before
it (its first after idling, which on a lightly loaded engine is the step that gives most
requests their first token: caches and the CPU's clocks have gone cold). Live on the CPU
they are ~1.3 and ~0.8 ms on a ~3 ms step (docs/simulator.md); without them a linear fit on
all steps, mostly decodes, misses prefill steps by ~25% and first steps after idling by ~40%.

Step-time noise (an optional ``[noise]`` table, fitted from a recording; absent: every step
takes exactly the model's time): a live step's time over the model's varies (other load on
the machine, allocator, caches), and in bursts. ``quantiles`` is that ratio at evenly spaced
probabilities from 0 to 1, scaled so the mean step time is unchanged, and ``rho`` the lag-1
autocorrelation of its normal scores on a worker. The simulator multiplies each step by a
ratio drawn through a Gaussian AR(1) per worker (``StepNoise``; seeded: runs repeat).
Optionally ``prefill_quantiles`` (steps with prefill tokens: their ratio differs from that of
decode-only steps) and a second, slow AR(1) (``slow_rho``, ``slow_share``): live slowdowns
come both in short bursts and in spells of many steps. ``admit_quantiles``: a request's
delay from the client to the scheduler (HTTP, the frontend's turn on a busy machine, and
everything of the first token's path beyond ``stream_s``), drawn per request instead of the
constant ``admit_s``: live, that delay has a tail that sets much of a TTFT p99.
``host_quantiles``: a step's host time over ``host_time()`` (drawn per step, mean 1): live,
the pool's round trip and turn vary as much as the forward pass.
``regime_switch``, ``regime_quantiles``, ``regime_rho`` and (optional) ``regime_host``: a
few-state Markov-switching noise (engine/sim/regimes.py): per worker a hidden state moves
once per step through the switching matrix, each state has its own ratio table, score
lag-1 correlation and host time factor; live, slow steps come in spells of tens to
hundreds of steps, and the host path slows down with them.
``trace``, ``trace_host`` and ``trace_block``: the recording's own ratios and host factors,
per worker, replayed by a block bootstrap instead of any of the above (engine/sim/trace.py).
``admit_spell_edges``, ``admit_spell_delays`` and ``admit_spell_window`` (with
``admit_quantiles``): the admission delay drawn from the recorded delays of requests that
arrived at a like local step ratio, so the frontend slows down in the steps' slow spells
(engine/sim/admit_spell.py).

CPU contention between workers (an optional ``[contention]`` table, ``overlap``; 0 when
absent): workers that share cores slow each other down, so a step's time is multiplied by
``1 + overlap x o``, where ``o`` is the share of the step during which another worker's step,
begun before it, is still computing (the simulator knows the other workers' steps in flight;
a recording gives the same share from the workers' send and result times).
``python -m engine.sim fit`` fits all of these from a ``--profile-steps`` recording.

The parameters live in a TOML (or JSON) file with a ``[cost]`` table of the five step numbers,
an optional ``[host]`` table, and an optional ``[engine]`` table with the shape the numbers belong to (``num_blocks`` per
worker, ``block_size``, ``max_model_len``, ``max_num_batched_tokens``, ``max_num_seqs``),
which the simulator uses as defaults. ``bench/fit_cost_model.py`` fits ``default_cost.toml``
from measurements of the native runner (with ``fit`` below); ``gpu_h100_llama3_8b.toml`` is a roofline estimate
for research runs.
"""

from __future__ import annotations

import json
import random
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engine.sim.admit_spell import SPELL_KEYS, SpellDelays, SpellFit, parse_spell, spell_toml
from engine.sim.step_noise import StepNoise
from engine.sim.step_noise import grid as _grid
from engine.sim.trace import TRACE_KEYS, TraceFit, TraceNoise, parse_trace, trace_toml

DEFAULT_COST_FILE = Path(__file__).with_name("default_cost.toml")
GPU_COST_FILE = Path(__file__).with_name("gpu_h100_llama3_8b.toml")


class BatchShape(NamedTuple):
    """What the cost of one step depends on (a tuple: the simulator makes one per step)."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    prefill_pairs: int = 0

    def features(self) -> list[float]:
        """The regressors of the linear model, in the order of ``CostModel.coefficients``."""
        return [1.0, float(self.prefill_tokens), float(self.decode_seqs),
                float(self.context_tokens), float(self.prefill_pairs)]


@dataclass(frozen=True)
class EngineShape:
    """The engine settings a cost file was measured with: the simulator's defaults."""

    num_blocks: int = 4096
    block_size: int = 16
    max_model_len: int = 8192
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64


@dataclass(frozen=True)
class CostModel:
    step_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float
    prefill_pair_s: float = 0.0
    engine: EngineShape = field(default_factory=EngineShape)
    source: str = ""  # where the numbers come from (machine, model, date)
    admit_s: float = 0.0
    stream_s: float = 0.0
    host_step_s: float = 0.0
    host_request_s: float = 0.0
    noise_quantiles: tuple[float, ...] = ()
    noise_rho: float = 0.0
    noise_prefill_quantiles: tuple[float, ...] = ()  # steps with prefill tokens; () = same
    noise_slow_rho: float = 0.0  # a second, slow AR(1) component
    noise_slow_share: float = 0.0  # its share of the variance of the normal score
    admit_quantiles: tuple[float, ...] = ()  # a request's admission delay; () = admit_s
    host_quantiles: tuple[float, ...] = ()  # a step's host time over host_time(); () = 1
    # regimes (engine/sim/regimes.py): per state a ratio table and a score lag-1
    # correlation, and the per-step switching matrix; () = no regimes
    noise_regime_switch: tuple[tuple[float, ...], ...] = ()
    noise_regime_quantiles: tuple[tuple[float, ...], ...] = ()
    noise_regime_rho: tuple[float, ...] = ()
    noise_regime_host: tuple[float, ...] = ()  # per state: host time factor; () = 1
    noise_trace: TraceFit | None = None  # the recording's noise replayed (trace.py)
    admit_spell: SpellFit | None = None  # admission delays by the local ratio (admit_spell.py)
    overlap: float = 0.0  # [contention]: a step's time x (1 + overlap x its overlapped share)
    prefill_step_s: float = 0.0  # [step_extra]: added to a step with prefill tokens
    cold_step_s: float = 0.0  # [step_extra]: added to a step on a worker that held no request

    COEFFICIENTS = ("step_s", "prefill_token_s", "decode_seq_s", "context_token_s",
                    "prefill_pair_s")
    HOST = ("admit_s", "stream_s", "host_step_s", "host_request_s")
    STEP_EXTRA = ("prefill_step_s", "cold_step_s")

    @property
    def coefficients(self) -> list[float]:
        return [getattr(self, name) for name in self.COEFFICIENTS]

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int,
                  prefill_pairs: int = 0) -> float:
        return (self.step_s + self.prefill_token_s * prefill_tokens
                + self.decode_seq_s * decode_seqs + self.context_token_s * context_tokens
                + self.prefill_pair_s * prefill_pairs)

    def time_of(self, shape: BatchShape) -> float:
        return self.step_time(*shape)

    def extra_time(self, shape: BatchShape, cold: bool) -> float:
        """The ``[step_extra]`` time of a step of ``shape``; ``cold``: its worker held no
        request before it."""
        return ((self.prefill_step_s if shape.prefill_tokens else 0.0)
                + (self.cold_step_s if cold else 0.0))

    def host_time(self, num_requests: int) -> float:
        """Host time a step of ``num_requests`` adds to the worker's cycle."""
        return self.host_step_s + self.host_request_s * num_requests

    @property
    def has_host(self) -> bool:
        return any(getattr(self, name) for name in self.HOST)

    def noise(self, num_workers: int, seed: int = 0) -> StepNoise | TraceNoise | None:
        """Draws each step's time ratio, per worker; None without a ``[noise]`` table."""
        if self.noise_trace is not None:
            t = self.noise_trace
            return TraceNoise(t.ratio, t.host, t.block, num_workers, seed)
        if not self.noise_quantiles:
            return None
        return StepNoise(self.noise_quantiles, self.noise_rho, num_workers, seed,
                         self.noise_prefill_quantiles, self.noise_slow_rho,
                         self.noise_slow_share, self.noise_regime_switch,
                         self.noise_regime_quantiles, self.noise_regime_rho,
                         self.noise_regime_host)

    def admit_delays(self, seed: int = 0) -> Callable[[], float] | None:
        """Draws each request's admission delay from ``admit_quantiles`` (independent per
        request, seeded); None without them (every request then takes ``admit_s``)."""
        return _draws(self.admit_quantiles, seed)

    def spell_delays(self, seed: int = 0) -> SpellDelays | None:
        """Draws each request's admission delay by the local step ratio at its arrival
        (``admit_spell``, engine/sim/admit_spell.py); None without."""
        return SpellDelays(self.admit_spell, seed) if self.admit_spell is not None else None

    def host_ratios(self, seed: int = 0) -> Callable[[], float] | None:
        """Draws each step's host time over ``host_time`` from ``host_quantiles``
        (independent per step, seeded); None without them."""
        return _draws(self.host_quantiles, seed + 7919)

    # ------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | Path | None = None) -> CostModel:
        """Read a TOML or JSON cost file (default: ``default_cost.toml``); ValueError names
        ``--cost`` and the problem."""
        path = Path(path) if path is not None else DEFAULT_COST_FILE
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as e:
            raise ValueError(f"--cost: cannot read {path}: {e}") from e
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "cost file") -> CostModel:
        cost = data.get("cost")
        if not isinstance(cost, dict):
            raise ValueError(f"--cost: {where} has no [cost] table")
        missing = [k for k in cls.COEFFICIENTS[:4] if k not in cost]
        if missing:
            raise ValueError(f"--cost: {where}: [cost] lacks {missing}")
        unknown = set(cost) - set(cls.COEFFICIENTS)
        engine_keys = {f.name for f in fields(EngineShape)}
        unknown |= set(data.get("engine", {})) - engine_keys
        host = data.get("host", {})
        if not isinstance(host, dict):
            raise ValueError(f"--cost: {where}: [host] must be a table")
        unknown |= set(host) - set(cls.HOST)
        noise = data.get("noise", {})
        if not isinstance(noise, dict):
            raise ValueError(f"--cost: {where}: [noise] must be a table")
        unknown |= {f"noise.{k}" for k in set(noise) - set(NOISE_KEYS)}
        contention = data.get("contention", {})
        if not isinstance(contention, dict):
            raise ValueError(f"--cost: {where}: [contention] must be a table")
        unknown |= {f"contention.{k}" for k in set(contention) - {"overlap"}}
        extra = data.get("step_extra", {})
        if not isinstance(extra, dict):
            raise ValueError(f"--cost: {where}: [step_extra] must be a table")
        unknown |= {f"step_extra.{k}" for k in set(extra) - set(cls.STEP_EXTRA)}
        if unknown:
            raise ValueError(f"--cost: {where}: unknown keys {sorted(unknown)}")
        values = {k: float(v) for k, v in (cost | host).items()}
        if any(v < 0 for v in values.values()):
            raise ValueError(f"--cost: {where}: coefficients must be >= 0, got {values}")
        engine = EngineShape(**{k: int(v) for k, v in data.get("engine", {}).items()})
        quantiles = tuple(float(q) for q in noise.get("quantiles", ()))
        prefill_q = tuple(float(q) for q in noise.get("prefill_quantiles", ()))
        admit_q = tuple(float(q) for q in noise.get("admit_quantiles", ()))
        host_q = tuple(float(q) for q in noise.get("host_quantiles", ()))
        for name, q in (("admit_quantiles", admit_q), ("host_quantiles", host_q)):
            if q and (len(q) < 2 or min(q) < 0 or list(q) != sorted(q)):
                raise ValueError(f"--cost: {where}: [noise] {name} must be >= 2 increasing "
                                 f"values >= 0")
        rho = float(noise.get("rho", 0.0))
        slow_rho = float(noise.get("slow_rho", 0.0))
        slow_share = float(noise.get("slow_share", 0.0))
        if (quantiles or prefill_q) and (
                not _valid_quantiles(quantiles) or not -1 < rho < 1 or not -1 < slow_rho < 1
                or not 0 <= slow_share <= 1 or (prefill_q and not _valid_quantiles(prefill_q))):
            raise ValueError(f"--cost: {where}: [noise] needs >= 2 increasing positive "
                             f"quantiles (and prefill_quantiles if any), -1 < rho, slow_rho "
                             f"< 1 and 0 <= slow_share <= 1")
        regime = _regimes(noise, where)
        trace = parse_trace(noise, where)
        spell = parse_spell(noise, where)
        if spell is not None and not admit_q:
            raise ValueError(f"--cost: {where}: [noise] admit_spell_* go with admit_quantiles")
        overlap = float(contention.get("overlap", 0.0))
        if overlap < 0:
            raise ValueError(f"--cost: {where}: [contention] overlap must be >= 0")
        extras = {k: float(v) for k, v in extra.items()}
        if any(v < 0 for v in extras.values()):
            raise ValueError(f"--cost: {where}: [step_extra] values must be >= 0")
        return cls(**values, engine=engine, source=str(data.get("source", "")),
                   noise_quantiles=quantiles, noise_rho=rho, noise_prefill_quantiles=prefill_q,
                   noise_slow_rho=slow_rho, noise_slow_share=slow_share,
                   admit_quantiles=admit_q, host_quantiles=host_q, overlap=overlap,
                   noise_regime_switch=regime[0], noise_regime_quantiles=regime[1],
                   noise_regime_rho=regime[2], noise_regime_host=regime[3],
                   noise_trace=trace, admit_spell=spell,
                   prefill_step_s=extras.get("prefill_step_s", 0.0),
                   cold_step_s=extras.get("cold_step_s", 0.0))

    def to_toml(self, comment: str = "") -> str:
        lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
        lines += [f"source = {json.dumps(self.source)}", "", "[cost]"]
        lines += [f"{name} = {value!r}" for name, value in zip(self.COEFFICIENTS,
                                                                 self.coefficients, strict=True)]
        if self.has_host:
            lines += ["", "[host]"]
            lines += [f"{name} = {getattr(self, name)!r}" for name in self.HOST]
        if (self.noise_quantiles or self.admit_quantiles or self.host_quantiles
                or self.noise_trace is not None):
            lines += ["", "[noise]"]
        if self.noise_quantiles:
            lines += [f"rho = {self.noise_rho!r}",
                      f"quantiles = [{_floats(self.noise_quantiles)}]"]
            if self.noise_prefill_quantiles:
                lines += [f"prefill_quantiles = [{_floats(self.noise_prefill_quantiles)}]"]
            if self.noise_slow_share:
                lines += [f"slow_rho = {self.noise_slow_rho!r}",
                          f"slow_share = {self.noise_slow_share!r}"]
            if self.noise_regime_switch:
                lines += [f"regime_rho = [{_floats(self.noise_regime_rho)}]",
                          "regime_switch = [" + ", ".join(
                              f"[{', '.join(repr(p) for p in row)}]"
                              for row in self.noise_regime_switch) + "]",
                          "regime_quantiles = [" + ", ".join(
                              f"[{_floats(q)}]" for q in self.noise_regime_quantiles) + "]"]
                if self.noise_regime_host:
                    lines += [f"regime_host = [{_floats(self.noise_regime_host)}]"]
        if self.admit_quantiles:
            lines += [f"admit_quantiles = [{_floats(self.admit_quantiles)}]"]
        if self.admit_spell is not None:
            lines += spell_toml(self.admit_spell)
        if self.host_quantiles:
            lines += [f"host_quantiles = [{_floats(self.host_quantiles)}]"]
        if self.noise_trace is not None:
            lines += trace_toml(self.noise_trace)
        if self.overlap:
            lines += ["", "[contention]", f"overlap = {self.overlap!r}"]
        if self.prefill_step_s or self.cold_step_s:
            lines += ["", "[step_extra]"]
            lines += [f"{name} = {getattr(self, name)!r}" for name in self.STEP_EXTRA]
        lines += ["", "[engine]"]
        lines += [f"{k} = {v}" for k, v in asdict(self.engine).items()]
        return "\n".join(lines) + "\n"

    def describe(self) -> dict[str, Any]:
        host = {name: getattr(self, name) for name in self.HOST} if self.has_host else {}
        regime = ({"noise_regime_p50": [float(np.interp(0.5, _grid(q), q))
                                        for q in self.noise_regime_quantiles],
                   "noise_regime_dwell": [1.0 / max(1e-9, 1.0 - row[i]) for i, row
                                          in enumerate(self.noise_regime_switch)]}
                  if self.noise_regime_switch else {})
        noise = ({"noise_rho": self.noise_rho,
                  "noise_p50": float(np.interp(0.5, _grid(self.noise_quantiles),
                                               self.noise_quantiles)),
                  "noise_p99": float(np.interp(0.99, _grid(self.noise_quantiles),
                                               self.noise_quantiles))}
                 if self.noise_quantiles else {}) | regime
        if self.noise_trace is not None:
            noise |= {"noise_trace_block": self.noise_trace.block,
                      "noise_trace_steps": [len(r) for r in self.noise_trace.ratio]}
        if self.admit_spell is not None:
            noise |= {"admit_spell_edges": list(self.admit_spell.edges),
                      "admit_spell_p50_ms": [1e3 * float(np.median(b))
                                             for b in self.admit_spell.delays]}
        contention = {"overlap": self.overlap} if self.overlap else {}
        extra = {name: getattr(self, name) for name in self.STEP_EXTRA if getattr(self, name)}
        return {**dict(zip(self.COEFFICIENTS, self.coefficients, strict=True)), **host,
                **noise, **contention, **extra, "source": self.source}


def _draws(quantiles: tuple[float, ...], seed: int) -> Callable[[], float] | None:
    if not quantiles:
        return None
    rng, grid = random.Random(seed), _grid(quantiles)
    return lambda: float(np.interp(rng.random(), grid, quantiles))


NOISE_KEYS = ("quantiles", "rho", "prefill_quantiles", "slow_rho", "slow_share",
              "admit_quantiles", "host_quantiles", "regime_switch", "regime_quantiles",
              "regime_rho", "regime_host", *TRACE_KEYS, *SPELL_KEYS)


def _regimes(noise: dict[str, Any], where: str) -> tuple[tuple[tuple[float, ...], ...],
                                                         tuple[tuple[float, ...], ...],
                                                         tuple[float, ...], tuple[float, ...]]:
    """The ``[noise]`` regime keys, checked: (switch, quantiles, rho, host), all () when
    absent."""
    keys = ("regime_switch", "regime_quantiles", "regime_rho", "regime_host")
    if not any(k in noise for k in keys):
        return (), (), (), ()
    bad = ValueError(f"--cost: {where}: [noise] regime_switch (a k x k matrix of "
                     f"probabilities, rows summing to 1), regime_quantiles (k tables of >= 2 "
                     f"increasing positive values) and regime_rho (k values in [0, 1)) go "
                     f"together, k >= 1; regime_host (k values >= 0) is optional")
    try:
        switch = tuple(tuple(float(p) for p in row) for row in noise["regime_switch"])
        tables = tuple(tuple(float(q) for q in t) for t in noise["regime_quantiles"])
        rho = tuple(float(r) for r in noise["regime_rho"])
        host = tuple(float(h) for h in noise.get("regime_host", ()))
    except (KeyError, TypeError, ValueError) as e:
        raise bad from e
    k = len(switch)
    if (k < 1 or len(tables) != k or len(rho) != k
            or any(len(row) != k or min(row) < 0 or abs(sum(row) - 1.0) > 1e-6
                   for row in switch)
            or not all(_valid_quantiles(t) for t in tables)
            or not all(0 <= r < 1 for r in rho)
            or (host and (len(host) != k or min(host) < 0))):
        raise bad
    return switch, tables, rho, host


def _valid_quantiles(q: tuple[float, ...]) -> bool:
    return len(q) >= 2 and min(q) > 0 and list(q) == sorted(q)


def _floats(values: tuple[float, ...]) -> str:
    return ", ".join(f"{q:.5g}" for q in values)


def fit(rows: list[tuple[float, BatchShape]], relative: bool = True
        ) -> tuple[list[float], np.ndarray]:
    """Least squares on relative error of measured (seconds, shape) rows, every coefficient
    >= 0 (a negative one is dropped and the rest refitted). Returns the coefficients, in the
    order of ``CostModel.COEFFICIENTS``, and the fitted times of the rows.
    ``relative=False``: on absolute error (the fitted mean then equals the measured one)."""
    y = np.array([s for s, _ in rows])
    x = np.array([shape.features() for _, shape in rows])
    return nonnegative_lstsq(x, y, relative)


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray, relative: bool = True
                      ) -> tuple[list[float], np.ndarray]:
    """``fit`` on any regressors ``x`` (rows) of ``y``."""
    active = list(range(x.shape[1]))
    while True:
        # relative error: short steps matter as much as long ones
        w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
        coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all():
            break
        active.pop(int(np.argmin(coef)))
    full = [0.0] * x.shape[1]
    for i, c in zip(active, coef, strict=True):
        full[i] = float(c)
    return full, x @ np.array(full)
