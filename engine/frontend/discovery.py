"""What a router learns about a replica when it registers it: ``/server_info`` and
``/model_info``, in the shape SGLang's model gateway (sglang-router) reads.

sglang-router asks every HTTP worker it is given for these two (falling back to the
deprecated ``/get_server_info`` / ``/get_model_info`` on a 404) and turns the answers into the
worker's labels: ``served_model_name`` (else ``model_path``) becomes the worker's model id,
``model_type`` and ``architectures`` go on its model card; ``dp_size`` is read only for
``--dp-aware`` workers, which the router then addresses rank by rank. Every field here is a
fact of this engine, never a placeholder:

- ``dp_size`` is 1: the replica is one endpoint, whose own scheduler places each request on
  one of its workers (cache-aware); a router cannot and need not address them one by one.
- ``max_total_tokens`` is the KV capacity in tokens of the live workers (blocks times block
  size, from the pool's latest stats), ``max_running_requests`` the batch limit
  (``--max-num-seqs`` per worker), ``max_prefill_tokens`` is not reported (a step's token
  budget, ``--max-num-batched-tokens``, lives in the pool's config, not the frontend's).
- With several models (one pool each), the top level describes the default (first) model,
  the one a request without ``model`` reaches, and ``models`` lists them all;
  ``/model_info?model=NAME`` describes any of them.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from engine.frontend.serving import ModelRegistry, ServedModel


def engine_version() -> str:
    try:
        return metadata.version("engine")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _pool_facts(model: ServedModel, max_num_seqs: int) -> dict[str, Any]:
    stats = model.pool.stats
    live = stats.live_workers if stats is not None else 0
    facts: dict[str, Any] = {
        "served_model_name": model.name,
        "model_path": str(model.info.path),
        "max_model_len": model.info.max_model_len,
        "num_workers": live,
        "max_running_requests": max_num_seqs * live,
    }
    if stats is not None and stats.block_size:
        facts["block_size"] = stats.block_size
        facts["max_total_tokens"] = sum(stats.num_blocks) * stats.block_size
    return facts


def server_info(models: ModelRegistry, max_num_seqs: dict[str, int]) -> dict[str, Any]:
    """``max_num_seqs``: each model's per-worker batch limit, by name."""
    all_models = [_pool_facts(m, max_num_seqs[m.name]) for m in models]
    return {**all_models[0], "dp_size": 1, "version": engine_version(), "models": all_models}


def _hf_config(model: ServedModel) -> dict[str, Any]:
    try:
        config = json.loads((model.info.path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_info(model: ServedModel) -> dict[str, Any]:
    config = _hf_config(model)
    return {
        "model_path": str(model.info.path),
        "tokenizer_path": str(model.info.path),  # the tokenizer is loaded from the model dir
        "served_model_name": model.name,
        "is_generation": True,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures") or [model.info.architecture],
        "max_model_len": model.info.max_model_len,
    }
