"""Request bodies of the OpenAI-compatible API (pydantic, so ``/openapi.json`` documents
them), with the vLLM extensions benchmark clients and integrations send.

Fields OpenAI defines that this engine cannot honour (``best_of`` > 1, ``suffix``,
``UNSUPPORTED``) are refused with 400 rather than silently ignored; fields nobody defines
are ignored with a logged warning, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str | None = None
    n: int = Field(1, description="choices to generate per prompt (1 to 128)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="0 is greedy; default 1")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, description="end user; the fair-share policy's tenant")
    presence_penalty: float | None = Field(None, description="in [-2, 2]; subtracted once "
                                           "from each token already in the output")
    frequency_penalty: float | None = Field(None, description="in [-2, 2]; subtracted per "
                                            "occurrence of a token in the output")
    # values checked by engine.frontend.serving (400 with param "logit_bias", not a pydantic
    # error on "logit_bias.<key>")
    logit_bias: dict[str, Any] | None = Field(
        None, description="token id (a decimal string) -> bias in [-100, 100] added to its logit")
    # vLLM extensions
    top_k: int | None = Field(None, description="0 or -1 disable it")
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[Any] | None = Field(
        None, description="when given, only these token ids may be generated")
    cache_salt: str | None = Field(None, description="isolates this request's prefix cache")
    prompt_logprobs: int | None = Field(
        None, description="k: each prompt token's logprob and rank, and the k most likely "
        "tokens at each prompt position (not with stream)")
    # structured outputs (engine/frontend/structured.py): OpenAI's, vLLM's, vLLM's older names
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object, or json_schema (enforced, strict or not)")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: one of json, regex, choice, grammar, json_object")
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # this engine's
    priority: int | None = Field(
        None, description="higher is more important; negative is sheddable (429 under "
        "overload). Also settable with the x-request-priority header.")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids")
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, description="return the sampled tokens' logprobs")
    echo: bool = Field(False, description="prepend the prompt (and, with logprobs, its "
                       "tokens' logprobs) to the choice")
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field("", description="JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = Field(None, description='[{"type": "function", "function": '
                                    '{"name", "description", "parameters"}}]')
    tool_choice: Any = Field(
        None, description='"none", "auto" (default with tools; needs --tool-call-parser), '
        '"required", or {"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True


#: Fields defined by OpenAI or vLLM that are accepted and do not change the answer here
#: (no warning): bookkeeping for OpenAI's platform, or hints this engine needs no help with.
KNOWN_NO_OPS = frozenset({"metadata", "store", "service_tier",
                          "prompt_cache_key", "safety_identifier"})

#: Fields OpenAI defines that would change the answer and that this engine does not
#: implement: refused with 400 (param: the field) rather than ignored. Value: what to do.
UNSUPPORTED = {
    "functions": "the deprecated functions API is not supported; send tools",
    "function_call": "the deprecated function_call is not supported; send tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this engine serves no reasoning models; reasoning_effort is not "
                        "supported",
    "web_search_options": "web search is not supported",
    "verbosity": "verbosity is not supported",
}


#: Fields accepted only at the value this engine always behaves by (accepted silently at it,
#: refused at any other): vLLM's ``skip_special_tokens`` (the frontend always skips them),
#: and what SGLang's router (sglang-router) adds to every request it forwards.
DEFAULT_ONLY: dict[str, Any] = {
    "skip_special_tokens": True,
    "no_stop_trim": False, "return_hidden_states": False, "continue_final_message": False,
    "separate_reasoning": True, "stream_reasoning": True,
}


def unsupported_field(extra: dict[str, Any]) -> tuple[str, str] | None:
    """The first OpenAI field of ``extra`` (a body's undeclared fields) that this engine
    refuses, with the reason; None when there is none. ``null`` values and
    ``modalities: ["text"]`` ask for nothing and pass."""
    for name, why in UNSUPPORTED.items():
        if extra.get(name) is not None:
            return name, why
    for name, default in DEFAULT_ONLY.items():
        if extra.get(name) not in (None, default):
            return name, f"only {name}: {str(default).lower()} is supported"
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        return "modalities", 'only text output is supported (modalities: ["text"])'
    return None
