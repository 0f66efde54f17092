"""A disaggregated LLM serving engine with a global, prefix-cache-aware scheduler.

``from engine import LLM, SamplingParams`` gives the in-process API; ``python -m
engine.launch`` serves models over gRPC. Heavy imports (torch, transformers) happen only
when ``LLM`` is first used, so the launcher and the scheduler stay light.
"""

from typing import Any

from engine.messages import SamplingParams, StructuredOutput

__all__ = ["LLM", "CompletionOutput", "SamplingParams", "StructuredOutput"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "CompletionOutput"):
        from engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
