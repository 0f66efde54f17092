"""Engine configuration: frozen dataclasses per concern, composed into one ``EngineConfig``.

The config is built once, by the launcher (from CLI flags and an optional TOML file) or by
the in-process ``LLM``, validated, and handed whole to every process it starts. Errors name
the flag that is wrong (``--workers must be >= 1, got 0``).

A TOML file uses the long flag names with ``_`` for ``-`` (``workers = 2``,
``model = ["path/a", "path/b"]``); flags on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


RUNNERS = ("native", "vllm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
#: ``--tool-call-parser`` names (vLLM's); engine.frontend.tool_parsers implements them.
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")


@dataclass(frozen=True)
class ModelConfig:
    """One model pool. ``path`` None means the embedded default model."""

    path: str | None = None
    served_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0

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


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``block_size`` tokens per block; capacity in blocks or in memory."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float = 0.25
    #: No --block-size was given: ``engine.worker.factory.resolve_runner_config`` may pick
    #: the size the runner needs instead (the vllm runner on CPU: 32) before any process
    #: starts; an explicit size is never changed, only refused.
    block_size_auto: bool = False
    kv_events: KVEventsConfig | None = None  # None: no KV events published


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: one token budget per step covers prefill chunks and decodes."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    policy: str = "fcfs"  # queue order, admission, victims
    placement: str = "cache-aware"  # which worker a request queues on


@dataclass(frozen=True)
class WorkerConfig:
    """Worker processes: how many, which model runner, on which device."""

    num_workers: int = 1
    runner: str = "native"
    device: str = "auto"
    num_threads: int | None = None
    #: Ranks one worker's model is split over (Megatron-style; torchrun launches only).
    tensor_parallel_size: int = 1
    #: CUDA only: run every step eagerly instead of replaying decode steps from CUDA graphs.
    enforce_eager: bool = False
    #: CUDA only: decode batches up to this many requests replay a captured graph (padded
    #: to the next captured size); larger ones run eagerly.
    cuda_graph_max_batch: int = 256


@dataclass(frozen=True)
class FrontendConfig:
    """The APIs, their access control and their admission limits (docs/http.md)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    api_keys: tuple[str, ...] = ()
    rate_limit_rpm: int | None = None  # per API key
    rate_limit_tpm: int | None = None  # per API key, prompt + max_tokens
    shed_queue_time_s: float = 1.0  # predicted wait above which sheddable requests get 429
    max_queue_time_s: float = 60.0  # no first token after this long: 503
    max_request_bytes: int = 16 << 20  # HTTP bodies over this get 413
    max_prompt_tokens: int | None = None  # default: the model's context
    max_output_tokens: int | None = None  # default: the model's context
    #: How tool calls are found in the output for tool_choice "auto" (None: auto refused).
    tool_call_parser: str | None = None
    #: Structured JSON outputs may hold any whitespace (default: compact, one space after
    #: ``:`` and ``,``, which keeps a weak model from running away in whitespace).
    structured_outputs_any_whitespace: bool = False


@dataclass(frozen=True)
class LaunchConfig:
    ready_timeout_s: float = 180.0
    log_level: str = "INFO"
    max_worker_restarts: int = 10
    #: Set by engine.torchrun, not a flag: the pools' worker sockets and the launcher's inbox
    #: also listen on TCP at this address, for workers on other ranks to dial in.
    listen_host: str | None = None
    #: Set by engine.torchrun: the launcher starts workers ``0..num_local_workers-1`` itself;
    #: the rest of ``--workers`` dial in from other ranks (None: all are local).
    num_local_workers: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

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
        _check(bool(s.policy), "--policy", "must not be empty")
        _check(bool(s.placement), "--placement", "must not be empty")
        w = self.worker
        _check(w.num_workers >= 1, "--workers", f"must be >= 1, got {w.num_workers}")
        _check(w.runner in RUNNERS, "--runner", f"must be one of {RUNNERS}, got {w.runner!r}")
        _check(w.device in DEVICES, "--device", f"must be one of {DEVICES}, got {w.device!r}")
        if w.num_threads is not None:
            _check(w.num_threads >= 1, "--num-threads", f"must be >= 1, got {w.num_threads}")
        _check(w.tensor_parallel_size >= 1, "--tensor-parallel-size",
               f"must be >= 1, got {w.tensor_parallel_size}")
        _check(w.tensor_parallel_size == 1 or w.runner == "native", "--tensor-parallel-size",
               "only the native runner splits a model over ranks so far")
        _check(w.cuda_graph_max_batch >= 1, "--cuda-graph-max-batch",
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
        _check(f.max_queue_time_s > 0, "--max-queue-time",
               f"must be > 0 seconds, got {f.max_queue_time_s}")
        _check(f.tool_call_parser in (None, *TOOL_CALL_PARSERS), "--tool-call-parser",
               f"must be one of {TOOL_CALL_PARSERS}, got {f.tool_call_parser!r}")
        _check(f.max_request_bytes >= 1024, "--max-request-bytes",
               f"must be >= 1024, got {f.max_request_bytes}")
        _check(self.launch.ready_timeout_s > 0, "--ready-timeout",
               f"must be > 0 seconds, got {self.launch.ready_timeout_s}")
        return self


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {message}")


# --------------------------------------------------------------------------- CLI + TOML


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.launch",
        description="Serve LLMs: a gRPC frontend, one global scheduler per model pool, and "
        "one worker process per GPU (or CPU worker slot). With no arguments it serves the "
        "embedded default model on 127.0.0.1.",
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("--config", metavar="FILE", help="TOML file with any of these flags (snake_case keys); "
        "flags given on the command line win")
    g = p.add_argument_group("model")
    g.add_argument("--model", action="append", metavar="PATH",
                   help="Hugging Face model directory; repeat for one pool per model "
                   "(default: the embedded default model)")
    g.add_argument("--served-model-name", action="append", metavar="NAME",
                   help="name clients use for the model, one per --model (default: the "
                   "directory name, or 'default')")
    g.add_argument("--dtype", choices=DTYPES, help="weights and activations dtype (default: "
                   "auto = float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-model-len", type=int, metavar="N",
                   help="longest prompt plus output, in tokens (default: the model's)")
    g.add_argument("--seed", type=int, help="seed for weights-free randomness (default 0)")
    g = p.add_argument_group("workers")
    g.add_argument("--workers", type=int, metavar="N", help="worker processes per pool (default 1)")
    g.add_argument("--runner", choices=RUNNERS, help="model runner (default native)")
    g.add_argument("--device", choices=DEVICES, help="worker device (default auto)")
    g.add_argument("--num-threads", type=int, metavar="N",
                   help="torch threads per CPU worker (default: cores / workers)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, metavar="N",
                   help="split each worker's model over N ranks (under torchrun: "
                   "launch/torchrun.sh; default 1)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly, no CUDA graphs")
    g.add_argument("--cuda-graph-max-batch", type=int, metavar="N",
                   help="CUDA: largest decode batch replayed from a CUDA graph "
                   "(default: --max-num-seqs, at most 256)")
    g = p.add_argument_group("KV cache")
    g.add_argument("--block-size", type=int, metavar="N", help="tokens per KV block (default 16; 32 with --runner vllm on CPU, whose attention "
                   "kernel needs a multiple of 32)")
    g.add_argument("--num-kv-blocks", type=int, metavar="N",
                   help="KV blocks per worker (default: from --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                   help="KV cache size per worker in GiB (default 0.25)")
    g.add_argument("--kv-events-config", metavar="JSON",
                   help="publish KV cache events as vLLM does (its JSON keys: "
                   "enable_kv_cache_events, publisher zmq|null, endpoint (default "
                   "tcp://*:5557), replay_endpoint, buffer_steps, hwm, max_queue_size, topic); "
                   "pool P uses the tcp port + P (docs/kv_events.md)")
    g = p.add_argument_group("scheduler")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                   help="token budget of one step, prefill chunks and decodes (default 512)")
    g.add_argument("--max-num-seqs", type=int, metavar="N",
                   help="most requests in one step (default 64)")
    g.add_argument("--policy", metavar="NAME", help="scheduling policy: queue order, admission, "
                   "preemption victims (default fcfs; or module:Class)")
    g.add_argument("--placement", metavar="NAME", help="placement across workers "
                   "(default cache-aware; or module:Class)")
    g = p.add_argument_group("frontend")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--http-port", type=int, metavar="PORT", help="HTTP port (default 8000)")
    g.add_argument("--grpc-port", type=int, metavar="PORT", help="gRPC port (default 50051)")
    g.add_argument("--api-key", action="append", metavar="KEY",
                   help="require this bearer key on /v1/*; repeat for several")
    g.add_argument("--api-key-file", metavar="FILE",
                   help="file with one API key per line (added to --api-key)")
    g.add_argument("--rate-limit-rpm", type=int, metavar="N",
                   help="requests per minute per API key (default unlimited)")
    g.add_argument("--rate-limit-tpm", type=int, metavar="N",
                   help="tokens (prompt + max_tokens) per minute per API key "
                   "(default unlimited)")
    g.add_argument("--shed-queue-time", type=float, metavar="SECONDS",
                   help="predicted queue wait above which sheddable (negative-priority) "
                   "requests get 429 (default 1.0)")
    g.add_argument("--max-queue-time", type=float, metavar="SECONDS",
                   help="a request without its first token after this long gets 503 "
                   "(default 60)")
    g.add_argument("--max-request-bytes", type=int, metavar="N",
                   help="largest HTTP request body; larger gets 413 (default 16 MiB)")
    g.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="longest prompt accepted (default: the model's context)")
    g.add_argument("--max-output-tokens", type=int, metavar="N",
                   help="largest max_tokens accepted (default: the model's context)")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                   help="how the model writes tool calls, for tool_choice auto (vLLM's "
                   "names; default none: auto is refused, required and named still work)")
    g.add_argument("--structured-outputs-any-whitespace", action="store_true",
                   help="let structured JSON outputs hold any whitespace (default: compact)")
    g = p.add_argument_group("launcher")
    g.add_argument("--ready-timeout", type=float, metavar="SECONDS",
                   help="how long to wait for every process to be ready (default 180)")
    g.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level (default INFO)")
    return p


_LIST_KEYS = {"model", "served_model_name", "api_key"}


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not valid TOML: {e}") from e
    known = {a.dest for a in build_parser()._actions if a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise ConfigError(f"--config: unknown key {key!r} in {path!r}")
        if dest in _LIST_KEYS and not isinstance(value, list):
            value = [value]
        out[dest] = value
    return out


def config_from_args(argv: Sequence[str] | None = None) -> EngineConfig:
    """Parse CLI flags (and ``--config FILE``) into a validated EngineConfig.

    Raises ConfigError with a message naming the flag; ``SystemExit`` for ``--help`` and for
    flags argparse itself rejects.
    """
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in ns:
        values.update(load_toml(ns.pop("config")))
    values.update(ns)
    return config_from_dict(values)


def config_from_dict(v: dict[str, Any]) -> EngineConfig:
    """Build from flat flag-named values (``workers``, ``model``, ...)."""
    paths: list[str | None] = list(v.get("model") or [None])
    names = list(v.get("served_model_name") or [])
    if names and len(names) != len(paths):
        raise ConfigError(f"--served-model-name: give one per --model ({len(paths)}), got {len(names)}")
    try:
        models = tuple(
            ModelConfig(
                path=str(Path(p).expanduser()) if p is not None else None,
                served_name=names[i] if names else None,
                dtype=v.get("dtype", "auto"),
                max_model_len=v.get("max_model_len"),
                seed=int(v.get("seed", 0)),
            )
            for i, p in enumerate(paths)
        )
        cfg = EngineConfig(
            models=models,
            cache=CacheConfig(
                block_size=int(v.get("block_size") or 16),
                block_size_auto=v.get("block_size") is None,
                num_blocks=v.get("num_kv_blocks"),
                kv_cache_memory_gib=float(v.get("kv_cache_memory", 0.25)),
                kv_events=parse_kv_events_config(v.get("kv_events_config")),
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=int(v.get("max_num_batched_tokens", 512)),
                max_num_seqs=int(v.get("max_num_seqs", 64)),
                policy=str(v.get("policy", "fcfs")),
                placement=str(v.get("placement", "cache-aware")),
            ),
            worker=WorkerConfig(
                num_workers=int(v.get("workers", 1)),
                runner=str(v.get("runner", "native")),
                device=str(v.get("device", "auto")),
                num_threads=v.get("num_threads"),
                tensor_parallel_size=int(v.get("tensor_parallel_size", 1)),
                enforce_eager=bool(v.get("enforce_eager", False)),
                cuda_graph_max_batch=int(v.get(
                    "cuda_graph_max_batch", min(256, int(v.get("max_num_seqs", 64))))),
            ),
            frontend=FrontendConfig(
                host=str(v.get("host", "127.0.0.1")),
                http_port=int(v.get("http_port", 8000)),
                grpc_port=int(v.get("grpc_port", 50051)),
                api_keys=tuple(v.get("api_key") or ()) + _read_keys(v.get("api_key_file")),
                rate_limit_rpm=v.get("rate_limit_rpm"),
                rate_limit_tpm=v.get("rate_limit_tpm"),
                shed_queue_time_s=float(v.get("shed_queue_time", 1.0)),
                max_queue_time_s=float(v.get("max_queue_time", 60.0)),
                max_request_bytes=int(v.get("max_request_bytes", 16 << 20)),
                max_prompt_tokens=v.get("max_prompt_tokens"),
                max_output_tokens=v.get("max_output_tokens"),
                tool_call_parser=v.get("tool_call_parser"),
                structured_outputs_any_whitespace=bool(
                    v.get("structured_outputs_any_whitespace", False)),
            ),
            launch=LaunchConfig(
                ready_timeout_s=float(v.get("ready_timeout", 180.0)),
                log_level=str(v.get("log_level", "INFO")),
            ),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config: a value has the wrong type: {e}") from e
    return cfg.validate()


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


def _read_keys(path: str | None) -> tuple[str, ...]:
    """API keys from a file, one per line; blank lines and ``#`` comments are skipped."""
    if path is None:
        return ()
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--api-key-file: cannot read {path!r}: {e.strerror}") from e
    keys = tuple(k for k in (ln.strip() for ln in lines) if k and not k.startswith("#"))
    if not keys:
        raise ConfigError(f"--api-key-file: {path!r} holds no key")
    return keys


def replace(cfg: EngineConfig, **sections: Any) -> EngineConfig:
    """``dataclasses.replace`` on sections: ``replace(cfg, worker={"num_workers": 2})``."""
    changes = {
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    }
    return dataclasses.replace(cfg, **changes).validate()


def default_num_threads(num_workers: int) -> int:
    """Torch threads for one CPU worker: the cores shared evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))
