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

Step-time noise (an optional ``[noise]`` table, fitted from a recording; absent: every step
takes exactly the model's time): a live step's time over the model's varies (other load on
the machine, allocator, caches), and in bursts. ``quantiles`` is that ratio at evenly spaced
probabilities from 0 to 1, scaled so the mean step time is unchanged, and ``rho`` the lag-1
autocorrelation of its normal scores on a worker. The simulator multiplies each step by a
ratio drawn through a Gaussian AR(1) per worker (``StepNoise``; seeded: runs repeat).
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
import math
import random
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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

    COEFFICIENTS = ("step_s", "prefill_token_s", "decode_seq_s", "context_token_s",
                    "prefill_pair_s")
    HOST = ("admit_s", "stream_s", "host_step_s", "host_request_s")

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

    def host_time(self, num_requests: int) -> float:
        """Host time a step of ``num_requests`` adds to the worker's cycle."""
        return self.host_step_s + self.host_request_s * num_requests

    @property
    def has_host(self) -> bool:
        return any(getattr(self, name) for name in self.HOST)

    def noise(self, num_workers: int, seed: int = 0) -> StepNoise | None:
        """Draws each step's time ratio, per worker; None without a ``[noise]`` table."""
        if not self.noise_quantiles:
            return None
        return StepNoise(self.noise_quantiles, self.noise_rho, num_workers, seed)

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
        unknown |= {f"noise.{k}" for k in set(noise) - {"quantiles", "rho"}}
        if unknown:
            raise ValueError(f"--cost: {where}: unknown keys {sorted(unknown)}")
        values = {k: float(v) for k, v in (cost | host).items()}
        if any(v < 0 for v in values.values()):
            raise ValueError(f"--cost: {where}: coefficients must be >= 0, got {values}")
        engine = EngineShape(**{k: int(v) for k, v in data.get("engine", {}).items()})
        quantiles = tuple(float(q) for q in noise.get("quantiles", ()))
        rho = float(noise.get("rho", 0.0))
        if quantiles and (len(quantiles) < 2 or min(quantiles) <= 0
                          or list(quantiles) != sorted(quantiles) or not -1 < rho < 1):
            raise ValueError(f"--cost: {where}: [noise] needs >= 2 increasing positive "
                             f"quantiles and -1 < rho < 1")
        return cls(**values, engine=engine, source=str(data.get("source", "")),
                   noise_quantiles=quantiles, noise_rho=rho)

    def to_toml(self, comment: str = "") -> str:
        lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
        lines += [f"source = {json.dumps(self.source)}", "", "[cost]"]
        lines += [f"{name} = {value!r}" for name, value in zip(self.COEFFICIENTS,
                                                                 self.coefficients, strict=True)]
        if self.has_host:
            lines += ["", "[host]"]
            lines += [f"{name} = {getattr(self, name)!r}" for name in self.HOST]
        if self.noise_quantiles:
            lines += ["", "[noise]", f"rho = {self.noise_rho!r}",
                      f"quantiles = [{', '.join(f'{q:.5g}' for q in self.noise_quantiles)}]"]
        lines += ["", "[engine]"]
        lines += [f"{k} = {v}" for k, v in asdict(self.engine).items()]
        return "\n".join(lines) + "\n"

    def describe(self) -> dict[str, Any]:
        host = {name: getattr(self, name) for name in self.HOST} if self.has_host else {}
        noise = ({"noise_rho": self.noise_rho,
                  "noise_p50": float(np.interp(0.5, _grid(self.noise_quantiles),
                                               self.noise_quantiles)),
                  "noise_p99": float(np.interp(0.99, _grid(self.noise_quantiles),
                                               self.noise_quantiles))}
                 if self.noise_quantiles else {})
        return {**dict(zip(self.COEFFICIENTS, self.coefficients, strict=True)), **host,
                **noise, "source": self.source}


def _grid(quantiles: tuple[float, ...]) -> np.ndarray:
    return np.linspace(0.0, 1.0, len(quantiles))


class StepNoise:
    """Per worker, a Gaussian AR(1) ``z`` (lag-1 correlation ``rho``) mapped through the
    normal CDF onto the step-time ratio's quantiles: bursts of slow steps, as measured."""

    def __init__(self, quantiles: tuple[float, ...], rho: float, num_workers: int,
                 seed: int = 0) -> None:
        self.grid = _grid(quantiles)
        self.quantiles = np.array(quantiles)
        self.rho, self.scale = rho, math.sqrt(1.0 - rho * rho)
        self.rng = random.Random(seed)
        self.z = [self.rng.gauss(0.0, 1.0) for _ in range(num_workers)]

    def __call__(self, worker: int) -> float:
        z = self.z[worker] = self.rho * self.z[worker] + self.scale * self.rng.gauss(0.0, 1.0)
        u = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        return float(np.interp(u, self.grid, self.quantiles))


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
