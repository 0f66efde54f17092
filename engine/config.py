"""Engine configuration: frozen dataclasses per concern, composed into one ``EngineConfig``.

The config is built once, by the launcher (from CLI flags and an optional TOML file,
``engine.cli``) or by the in-process ``LLM``, validated, and handed whole to every process
it starts. Errors name the flag that is wrong (``--workers must be >= 1, got 0``).

Each field is declared with ``opt(default, "--flag", "help", ...)``: its default, flag and
help are written here once, and ``engine.cli`` derives the CLI, the TOML keys and
``config_from_dict`` from that metadata. This module knows nothing of argparse or TOML.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


RUNNERS = ("native", "vllm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SHARE_CORES = ("auto", "yes", "no")
WORKER_SCHEDS = ("auto", "normal", "idle")
#: ``--tool-call-parser`` names (vLLM's); engine.frontend.tool_parsers implements them.
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def opt(default: Any, flag: str, help: str, *, metavar: str | None = None,
        choices: Sequence[str] | None = None, type: Callable[[Any], Any] | None = None,
        action: str | None = None, aliases: Sequence[str] = (), shown: str | None = None,
        parse: Callable[[Any], Any] | None = None) -> Any:
    """A config field and its flag: the default and the help are written here once; the
    CLI (``engine.cli.build_parser``), TOML keys and ``engine.cli.config_from_dict`` are
    derived from it.
    ``shown``: the default as ``--help`` words it (when the value alone says too little).
    ``parse``: turns a flag's or TOML key's value into the field's (default: ``type``), after
    argparse, so its ``ConfigError`` reaches the user whole."""
    meta = {"flag": flag, "help": help, "metavar": metavar, "choices": choices, "type": type,
            "action": action, "aliases": tuple(aliases), "shown": shown,
            "parse": parse or type}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """One model pool. ``path`` None means the embedded default model."""

    path: str | None = opt(None, "--model", "Hugging Face model directory; repeat for one "
                           "pool per model", metavar="PATH", action="append",
                           shown="the embedded default model")
    served_name: str | None = opt(None, "--served-model-name", "name clients use for the "
                                  "model, one per --model", metavar="NAME", action="append",
                                  shown="the directory name, or 'default'")
    dtype: str = opt("auto", "--dtype", "weights and activations dtype", choices=DTYPES,
                     shown="auto = float32 on CPU, bfloat16 on CUDA")
    #: Resolved before any process starts (``engine.resolve``): the context every process
    #: uses, at most what the model and the runner can hold.
    max_model_len: int | None = opt(None, "--max-model-len", "longest prompt plus output, "
                                    "in tokens", metavar="N", type=int,
                                    shown="the model's context, at most its sliding window "
                                    "and, with --runner vllm, what the KV cache holds")
    seed: int = opt(0, "--seed", "seed for weights-free randomness", metavar="N", type=int)

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.path is None:
            return "default"
        return Path(self.path).name or self.path


@dataclass(frozen=True)
class KVEventsConfig:
    """``--kv-events-config``: vLLM's KV event publisher, same JSON keys (docs/kv_events.md).
    Each pool publishes on ``endpoint`` (and ``replay_endpoint``) with its tcp port + the
    pool index (ipc/inproc paths: ``-pool<index>`` appended from pool 1 on)."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""


def parse_kv_events_config(value: str | dict[str, Any] | None) -> KVEventsConfig | None:
    """``--kv-events-config`` (JSON text, or a TOML table) as vLLM reads it; None when
    events are off (``enable_kv_cache_events`` false, or publisher "null")."""
    if value is None:
        return None
    flag = "--kv-events-config"
    try:
        data = json.loads(value) if isinstance(value, str) else dict(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: must be a JSON object, got {value!r}")
    enabled = data.pop("enable_kv_cache_events", False)
    publisher = data.pop("publisher", None) or ("zmq" if enabled else "null")
    _check(isinstance(enabled, bool), flag, f"enable_kv_cache_events must be a boolean, got {enabled!r}")
    _check(publisher in ("zmq", "null"), flag, f"publisher must be 'zmq' or 'null', got {publisher!r}")
    known = {f.name for f in dataclasses.fields(KVEventsConfig)}
    _check(not set(data) - known, flag, f"unknown keys {sorted(set(data) - known)}")
    for key, val in data.items():
        want = str if key in ("endpoint", "topic") else int
        _check((isinstance(val, want) and not isinstance(val, bool))
               or (key == "replay_endpoint" and (val is None or isinstance(val, str))),
               flag, f"{key} has the wrong type: {val!r}")
    return KVEventsConfig(**data) if enabled and publisher == "zmq" else None


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``block_size`` tokens per block; capacity in blocks or in memory."""

    block_size: int = opt(16, "--block-size", "tokens per KV block", metavar="N", type=int,
                          shown="16; 32 with --runner vllm on CPU, whose attention kernel "
                          "needs a multiple of 32")
    num_blocks: int | None = opt(None, "--num-kv-blocks", "KV blocks per worker",
                                 metavar="N", type=int, shown="from --kv-cache-memory")
    kv_cache_memory_gib: float = opt(0.25, "--kv-cache-memory", "KV cache size per worker "
                                     "in GiB", metavar="GIB", type=float)
    #: No --block-size was given: ``engine.resolve`` may pick the size the runner needs
    #: instead (the vllm runner on CPU: 32) before any process starts; an explicit size is
    #: never changed, only refused.
    block_size_auto: bool = False
    kv_events: KVEventsConfig | None = opt(  # noqa: RUF009 - frozen, and opt() is field()
        None, "--kv-events-config", "publish KV cache events as vLLM does (its JSON keys: "
        "enable_kv_cache_events, publisher zmq|null, endpoint (default tcp://*:5557), "
        "replay_endpoint, buffer_steps, hwm, max_queue_size, topic); pool P uses the tcp "
        "port + P (docs/kv_events.md)", metavar="JSON", parse=parse_kv_events_config,
        shown="off")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: one token budget per step covers prefill chunks and decodes."""

    max_num_batched_tokens: int = opt(512, "--max-num-batched-tokens", "token budget of one "
                                      "step, prefill chunks and decodes", metavar="N", type=int)
    max_num_seqs: int = opt(64, "--max-num-seqs", "most requests in one step", metavar="N",
                            type=int)
    policy: str = opt("fcfs", "--policy", "scheduling policy: queue order, admission, "
                      "preemption victims (or module:Class)", metavar="NAME", type=str)
    placement: str = opt("cache-aware", "--placement", "placement across workers (or "
                         "module:Class)", metavar="NAME", type=str)
    #: Whether the workers compete for the same CPU cores (CPU workers on one machine):
    #: ``auto`` is resolved before any process starts (``engine.resolve``: ``yes`` for CPU
    #: workers, ``no`` otherwise). Policies that trade one worker's work for another's
    #: latency read it (``Policy.exclusive_prefill_across_workers``).
    workers_share_cores: str = opt("auto", "--workers-share-cores", "whether the workers "
                                   "compete for the same CPU cores: a critical prompt's step "
                                   "then pauses the work it outranks on every worker "
                                   "(--policy priority)", choices=SHARE_CORES,
                                   shown="auto: yes for CPU workers")
    #: Workers kept for non-sheddable requests while any arrived within
    #: ``engine.scheduler.state.RESERVE_WINDOW_S`` (sheddable ones are placed on the
    #: others). None (``auto``) is resolved before any process starts (``engine.resolve``:
    #: 1 where the workers share cores and there are two or more, else 0), and checked
    #: against the workers there (under torchrun the world size sets them); a scheduler
    #: built from an unresolved config reads None as 0.
    reserved_workers: int | None = opt(None, "--reserved-workers", "workers kept free of "
                                       "sheddable (priority < 0) requests while non-sheddable "
                                       "ones arrive: a critical request finds a worker with no "
                                       "sheddable step in flight, sheddable work gets the "
                                       "others", metavar="N", type=int,
                                       shown="1 where workers share cores (CPU) and there "
                                       "are two or more, else 0")
    record_decisions: str | None = opt(
        None, "--record-decisions", "write every input of the scheduler and every plan it "
        "makes to this file, for python -m engine.sim --replay (several models: "
        "PATH.<pool index>)", metavar="PATH", type=str, parse=os.path.abspath, shown="off")


#: ``--cuda-graph-max-batch`` when not given: ``--max-num-seqs``, at most this.
CUDA_GRAPH_MAX_BATCH = 256


@dataclass(frozen=True)
class WorkerConfig:
    """Worker processes: how many, which model runner, on which device."""

    num_workers: int = opt(1, "--workers", "worker processes per pool", metavar="N", type=int)
    runner: str = opt("native", "--runner", "model runner", choices=RUNNERS)
    #: ``auto`` is resolved to ``cpu`` or ``cuda`` before any process starts.
    device: str = opt("auto", "--device", "worker device", choices=DEVICES)
    num_threads: int | None = opt(None, "--num-threads", "torch threads per CPU worker",
                                  metavar="N", type=int, shown="cores / workers")
    #: The workers' CPU scheduling policy. On CPU a worker's step competes for the cores
    #: with the frontend and the pool, whose turns are on every request's critical path.
    #: ``idle`` (Linux ``SCHED_IDLE``): a worker runs only on cores nothing else wants, and
    #: the frontend and the pool preempt it the moment they wake; ``normal``: ``--worker-nice``
    #: sets its share. ``auto`` is resolved before any process starts (``engine.resolve``):
    #: ``idle`` for CPU workers on Linux unless ``--worker-nice`` is given, else ``normal``
    #: (issue 15: under a flood of sheddable requests, critical TTFT p50 and p99 fell against
    #: ``nice 5`` in every interleaved run, and more of the flood was served;
    #: docs/benchmarks.md, "Flood", eighth pass).
    sched: str = opt("auto", "--worker-sched", "CPU scheduling policy of the worker "
                     "processes: idle (SCHED_IDLE: they run on the cores the frontend, the "
                     "pool and every other process leave free) or normal (--worker-nice sets "
                     "their share)", choices=WORKER_SCHEDS,
                     shown="idle for CPU workers on Linux, normal otherwise")
    #: The workers' CPU scheduling priority (``nice``) under ``--worker-sched normal``;
    #: None: resolved with it (5 for CPU workers, 0 otherwise; 0 under ``idle``, where the
    #: kernel ignores it).
    nice: int | None = opt(None, "--worker-nice", "CPU scheduling priority (nice, 0-19) of "
                           "the worker processes under --worker-sched normal: the frontend "
                           "and the pool go first", metavar="N", type=int,
                           shown="5 for CPU workers, 0 otherwise")
    #: Ranks one worker's model is split over (Megatron-style).
    tensor_parallel_size: int = opt(1, "--tensor-parallel-size", "split each worker's model "
                                    "over N ranks, also under torchrun (launch/torchrun.sh)",
                                    metavar="N", type=int, aliases=("-tp",))
    enforce_eager: bool = opt(False, "--enforce-eager", "CUDA: run every step eagerly, no "
                              "CUDA graphs", action="store_true")
    #: Decode batches up to this many requests replay a captured graph (padded to the next
    #: captured size); larger ones run eagerly. None: filled in by ``EngineConfig``.
    cuda_graph_max_batch: int | None = opt(
        None, "--cuda-graph-max-batch", "CUDA: largest decode batch replayed from a CUDA "
        "graph", metavar="N", type=int, shown=f"--max-num-seqs, at most {CUDA_GRAPH_MAX_BATCH}")


@dataclass(frozen=True)
class FrontendConfig:
    """The APIs, their access control and their admission limits (docs/http.md)."""

    host: str = opt("127.0.0.1", "--host", "address to bind", type=str)
    http_port: int = opt(8000, "--http-port", "HTTP port", metavar="PORT", type=int)
    grpc_port: int = opt(50051, "--grpc-port", "gRPC port", metavar="PORT", type=int)
    api_keys: tuple[str, ...] = opt((), "--api-key", "require this bearer key on /v1/*; "
                                    "repeat for several", metavar="KEY", action="append",
                                    shown="none: no key needed")
    rate_limit_rpm: int | None = opt(None, "--rate-limit-rpm", "requests per minute per API "
                                     "key", metavar="N", type=int, shown="unlimited")
    rate_limit_tpm: int | None = opt(None, "--rate-limit-tpm", "tokens (prompt + max_tokens) "
                                     "per minute per API key", metavar="N", type=int,
                                     shown="unlimited")
    shed_queue_time_s: float = opt(1.0, "--shed-queue-time", "predicted queue wait above "
                                   "which sheddable (negative-priority) requests get 429",
                                   metavar="SECONDS", type=float)
    shed_latency_factor: float = opt(1.5, "--shed-latency-factor", "sheddable requests also "
                                     "get 429 while the pool's steps run this many times "
                                     "slower than its uncontended light ones or the frontend's event "
                                     "loop lags (0: off)", metavar="X", type=float)
    max_queue_time_s: float = opt(60.0, "--max-queue-time", "a request without its first "
                                  "token after this long gets 503", metavar="SECONDS",
                                  type=float)
    max_request_bytes: int = opt(16 << 20, "--max-request-bytes", "largest HTTP request "
                                 "body; larger gets 413", metavar="N", type=int,
                                 shown="16 MiB")
    max_prompt_tokens: int | None = opt(None, "--max-prompt-tokens", "longest prompt "
                                        "accepted", metavar="N", type=int,
                                        shown="the model's context")
    max_output_tokens: int | None = opt(None, "--max-output-tokens", "largest max_tokens "
                                        "accepted", metavar="N", type=int,
                                        shown="the model's context")
    #: How tool calls are found in the output for tool_choice "auto" (None: auto refused).
    tool_call_parser: str | None = opt(None, "--tool-call-parser", "how the model writes "
                                       "tool calls, for tool_choice auto (vLLM's names)",
                                       choices=TOOL_CALL_PARSERS, shown="none: auto is "
                                       "refused, required and named still work")
    #: Structured JSON outputs may hold any whitespace (default: compact, one space after
    #: ``:`` and ``,``, which keeps a weak model from running away in whitespace).
    structured_outputs_any_whitespace: bool = opt(
        False, "--structured-outputs-any-whitespace", "let structured JSON outputs hold any "
        "whitespace", action="store_true", shown="compact")


@dataclass(frozen=True)
class LaunchConfig:
    """The supervisor: readiness, restarts, logs (``engine.supervisor``)."""

    ready_timeout_s: float = opt(180.0, "--ready-timeout", "how long to wait for every "
                                 "process to be ready", metavar="SECONDS", type=float)
    log_level: str = opt("INFO", "--log-level", "log level", choices=LOG_LEVELS)
    max_restarts: int = opt(10, "--max-restarts", "a process (or tensor-parallel group) that "
                            "fails this many times within --restart-window stops the engine "
                            "(exit 1); restarts back off from 0.5 s to 8 s", metavar="N",
                            type=int)
    restart_window_s: float = opt(60.0, "--restart-window", "the window of --max-restarts",
                                  metavar="SECONDS", type=float)
    profile_steps: str | None = opt(None, "--profile-steps", "record every step (batch "
                                    "composition, worker and host times) as JSON lines here, "
                                    "to calibrate the simulator (engine.profiling)",
                                    metavar="PATH", type=str, shown="off")


@dataclass(frozen=True)
class EngineConfig:
    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        if self.worker.cuda_graph_max_batch is None:  # the same default however built
            object.__setattr__(self, "worker", dataclasses.replace(
                self.worker, cuda_graph_max_batch=cuda_graph_default(self.scheduler)))

    def validate(self) -> EngineConfig:
        """Raise ConfigError naming the flag of the first invalid value; return self."""
        _check(len(self.models) >= 1, "--model", "at least one model is needed")
        names = [m.name for m in self.models]
        _check(len(set(names)) == len(names), "--served-model-name",
               f"model names must be unique, got {names}")
        for m in self.models:
            _check(m.dtype in DTYPES, "--dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
            if m.path is not None:
                _check(Path(m.path).is_dir(), "--model",
                       f"{m.path!r} is not a directory (a Hugging Face model directory)")
            if m.max_model_len is not None:
                _check(m.max_model_len >= 1, "--max-model-len", f"must be >= 1, got {m.max_model_len}")
        c = self.cache
        _check(c.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "--block-size",
               f"must be a power of two in [1, 128], got {c.block_size}")
        if c.num_blocks is not None:
            _check(c.num_blocks >= 2, "--num-kv-blocks", f"must be >= 2, got {c.num_blocks}")
        _check(c.kv_cache_memory_gib > 0, "--kv-cache-memory",
               f"must be > 0 GiB, got {c.kv_cache_memory_gib}")
        if (e := c.kv_events) is not None:
            for key, url in (("endpoint", e.endpoint), ("replay_endpoint", e.replay_endpoint)):
                _check(url is None or url.startswith(("tcp://", "ipc://", "inproc://")),
                       "--kv-events-config", f"{key} must be a tcp://, ipc:// or inproc:// "
                       f"address, got {url!r}")
            for key, n, least in (("buffer_steps", e.buffer_steps, 1), ("hwm", e.hwm, 0),
                                  ("max_queue_size", e.max_queue_size, 1)):
                _check(n >= least, "--kv-events-config", f"{key} must be >= {least}, got {n}")
        s = self.scheduler
        _check(s.max_num_batched_tokens >= 1, "--max-num-batched-tokens",
               f"must be >= 1, got {s.max_num_batched_tokens}")
        _check(s.max_num_seqs >= 1, "--max-num-seqs", f"must be >= 1, got {s.max_num_seqs}")
        _check(s.workers_share_cores in SHARE_CORES, "--workers-share-cores",
               f"must be one of {SHARE_CORES}, got {s.workers_share_cores!r}")
        _check(s.reserved_workers is None or s.reserved_workers >= 0, "--reserved-workers",
               f"must be >= 0, got {s.reserved_workers}")
        _check(bool(s.policy), "--policy", "must not be empty")
        _check(bool(s.placement), "--placement", "must not be empty")
        w = self.worker
        _check(w.num_workers >= 1, "--workers", f"must be >= 1, got {w.num_workers}")
        _check(w.runner in RUNNERS, "--runner", f"must be one of {RUNNERS}, got {w.runner!r}")
        _check(w.device in DEVICES, "--device", f"must be one of {DEVICES}, got {w.device!r}")
        _check(w.nice is None or 0 <= w.nice <= 19, "--worker-nice",
               f"must be between 0 and 19, got {w.nice}")
        _check(w.sched in WORKER_SCHEDS, "--worker-sched",
               f"must be one of {WORKER_SCHEDS}, got {w.sched!r}")
        _check(w.sched != "idle" or not w.nice, "--worker-nice",
               f"has no effect under --worker-sched idle (got {w.nice}): give "
               "--worker-sched normal with it")
        if w.num_threads is not None:
            _check(w.num_threads >= 1, "--num-threads", f"must be >= 1, got {w.num_threads}")
        _check(w.tensor_parallel_size >= 1, "--tensor-parallel-size",
               f"must be >= 1, got {w.tensor_parallel_size}")
        _check(w.tensor_parallel_size == 1 or w.runner == "native", "--tensor-parallel-size",
               "only the native runner splits a model over ranks so far")
        _check(w.cuda_graph_max_batch is None or w.cuda_graph_max_batch >= 1,
               "--cuda-graph-max-batch",
               f"must be >= 1, got {w.cuda_graph_max_batch}")
        f = self.frontend
        for flag, port in (("--http-port", f.http_port), ("--grpc-port", f.grpc_port)):
            _check(0 <= port <= 65535, flag, f"must be a TCP port in [0, 65535], got {port}")
        _check(bool(f.host), "--host", "must not be empty")
        for key in f.api_keys:
            _check(bool(key) and not any(ch.isspace() for ch in key), "--api-key",
                   "keys must be non-empty and contain no whitespace")
        for flag, limit in (("--rate-limit-rpm", f.rate_limit_rpm),
                            ("--rate-limit-tpm", f.rate_limit_tpm),
                            ("--max-prompt-tokens", f.max_prompt_tokens),
                            ("--max-output-tokens", f.max_output_tokens)):
            _check(limit is None or limit >= 1, flag, f"must be >= 1, got {limit}")
        _check(f.shed_queue_time_s >= 0, "--shed-queue-time",
               f"must be >= 0 seconds, got {f.shed_queue_time_s}")
        _check(f.shed_latency_factor == 0 or f.shed_latency_factor >= 1,
               "--shed-latency-factor", f"must be 0 (off) or >= 1, got {f.shed_latency_factor}")
        _check(f.max_queue_time_s > 0, "--max-queue-time",
               f"must be > 0 seconds, got {f.max_queue_time_s}")
        _check(f.tool_call_parser in (None, *TOOL_CALL_PARSERS), "--tool-call-parser",
               f"must be one of {TOOL_CALL_PARSERS}, got {f.tool_call_parser!r}")
        _check(f.max_request_bytes >= 1024, "--max-request-bytes",
               f"must be >= 1024, got {f.max_request_bytes}")
        ln = self.launch
        _check(ln.ready_timeout_s > 0, "--ready-timeout",
               f"must be > 0 seconds, got {ln.ready_timeout_s}")
        _check(ln.max_restarts >= 1, "--max-restarts", f"must be >= 1, got {ln.max_restarts}")
        _check(ln.restart_window_s > 0, "--restart-window",
               f"must be > 0 seconds, got {ln.restart_window_s}")
        return self


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {message}")


def cuda_graph_default(scheduler: SchedulerConfig) -> int:
    return min(CUDA_GRAPH_MAX_BATCH, scheduler.max_num_seqs)


def replace(cfg: EngineConfig, **sections: Any) -> EngineConfig:
    """``dataclasses.replace`` on sections: ``replace(cfg, worker={"num_workers": 2})``."""
    changes = {
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    }
    return dataclasses.replace(cfg, **changes).validate()


def default_num_threads(num_workers: int) -> int:
    """Torch threads for one CPU worker: the cores shared evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))
