"""The launcher's command line and TOML file, built from the config's field metadata.

Every flag is a field of a config dataclass in ``engine.config`` declared with ``opt(...)``;
this module turns that metadata into the ``argparse`` CLI (``build_parser``; help and
default from the field, groups in ``SECTIONS`` order), reads a ``--config`` TOML file
(``load_toml``) and turns flat flag-named values, from either or from ``LLM(**options)``,
into one validated ``EngineConfig`` (``config_from_dict``).

A TOML file uses the long flag names with ``_`` for ``-`` (``workers = 2``,
``model = ["path/a", "path/b"]``); flags on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    FrontendConfig,
    LaunchConfig,
    ModelConfig,
    SchedulerConfig,
    WorkerConfig,
)

#: (group title, section) in ``--help`` order; each flag-carrying field of a section is a flag.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig), ("workers", WorkerConfig), ("KV cache", CacheConfig),
    ("scheduler", SchedulerConfig), ("frontend", FrontendConfig), ("launcher", LaunchConfig))
#: EngineConfig attribute of each section but the per-model one.
_SECTION_ATTR = {CacheConfig: "cache", SchedulerConfig: "scheduler", WorkerConfig: "worker",
                 FrontendConfig: "frontend", LaunchConfig: "launch"}


def flag_fields(section: type) -> list[tuple[str, dataclasses.Field[Any]]]:
    """(snake_case flag name = TOML key, field) of each field of ``section`` with a flag."""
    return [(f.metadata["flag"][2:].replace("-", "_"), f)
            for f in dataclasses.fields(section) if "flag" in f.metadata]


def _help(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    shown = meta["shown"]
    if shown is None:
        shown = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
    return f"{meta['help']} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    """The launcher's CLI, one flag per config field (help and default from the field)."""
    p = argparse.ArgumentParser(
        prog="python -m engine.launch",
        description="Serve LLMs: a gRPC frontend, one global scheduler per model pool, and "
        "one worker process per GPU (or CPU worker slot). With no arguments it serves the "
        "embedded default model on 127.0.0.1.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with any of these flags "
                   "(snake_case keys); flags given on the command line win")
    for title, section in SECTIONS:
        g = p.add_argument_group(title)
        for _, f in flag_fields(section):
            meta = f.metadata
            kw: dict[str, Any] = {"help": _help(f)}
            for key in ("metavar", "choices", "type", "action"):
                if meta[key] is not None:
                    kw[key] = meta[key]
            g.add_argument(meta["flag"], *meta["aliases"], **kw)
        if section is FrontendConfig:
            g.add_argument("--api-key-file", metavar="FILE",
                           help="file with one API key per line (added to --api-key)")
    return p


#: Flags that repeat; a TOML file may give one value or a list.
_LIST_KEYS = {name for _, sec in SECTIONS for name, f in flag_fields(sec)
              if f.metadata["action"] == "append"}
_KEYS = {name for _, sec in SECTIONS for name, _ in flag_fields(sec)} | {"api_key_file"}


def load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not valid TOML: {e}") from e
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in _KEYS:
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


def _section(section: type, v: dict[str, Any], **extra: Any) -> Any:
    """``section`` from the flat values it has flags for (absent: the field's default)."""
    kw: dict[str, Any] = {}
    for name, f in flag_fields(section):
        if name in v and f.metadata["action"] != "append":
            convert = f.metadata["parse"]
            value = v[name]
            kw[f.name] = convert(value) if convert is not None and value is not None else value
    return section(**kw, **extra)


def config_from_dict(v: dict[str, Any]) -> EngineConfig:
    """Build from flat flag-named values (``workers``, ``model``, ...), as a TOML file or
    ``LLM(**options)`` gives them; unknown names are refused."""
    unknown = sorted(set(v) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} (the long flag names in snake_case)")
    paths: list[str | None] = list(v.get("model") or [None])
    names = list(v.get("served_model_name") or [])
    if names and len(names) != len(paths):
        raise ConfigError(f"--served-model-name: give one per --model ({len(paths)}), got {len(names)}")
    try:
        models = tuple(
            _section(ModelConfig, v, path=str(Path(p).expanduser()) if p is not None else None,
                     served_name=names[i] if names else None)
            for i, p in enumerate(paths))
        keys = tuple(v.get("api_key") or ()) + _read_keys(v.get("api_key_file"))
        sections = {attr: _section(sec, v) for sec, attr in _SECTION_ATTR.items()
                    if sec not in (CacheConfig, FrontendConfig)}
        cfg = EngineConfig(
            models=models,
            cache=_section(CacheConfig, v, block_size_auto=v.get("block_size") is None),
            frontend=_section(FrontendConfig, v, api_keys=keys),
            **sections,
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config: a value has the wrong type: {e}") from e
    return cfg.validate()


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
