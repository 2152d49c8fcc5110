"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict), and what each refuses.

Every field is typed strictly (``"0.5"`` is no number, ``true`` no integer) and unknown fields
are refused, so a client never silently gets other semantics than it asked for. OpenAI fields
that change nothing here (``user``, ``stream_options``, ``metadata``, ``store``, ``logprobs: false``,
``n: 1``, penalties of 0, ...) are accepted; those that would change the output and are not
implemented (``n > 1``, ``logprobs``, ``tools``, ``response_format`` other than text, non-zero
penalties, ``logit_bias``, ``echo``, ``suffix``, ``best_of > 1``, ...) fail with a 400 naming the
field. hierspec's own fields: ``method`` (a method spec, `hierspec.methods.parse_method`),
``gamma`` (an integer >= 1 or ``"auto"``), ``rule`` (token | block | hsd), ``top_k``, ``min_p``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..methods import MethodError, entry_of, parse_method

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "GenerationRequest", "StreamOptions"]

SEED_MAX = 2**63 - 1


def _refuse(value: Any, allowed: tuple[Any, ...], what: str) -> Any:
    """``value`` if it is one of ``allowed`` (no effect here), else a ValueError saying ``what``
    is not supported (the error handler names the field)."""
    if value in allowed:
        return value
    raise ValueError(f"{what} is not supported by this server (got {value!r})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; usage rides on the last chunks anyway
    include_obfuscation: bool | None = None  # OpenAI's; nothing is obfuscated here


class GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # hierspec's own
    method: str | None = None
    gamma: int | str | None = None
    rule: Literal["token", "block", "hsd", "match"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported (one choice per request; send n requests), got {v}")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, v: float | None) -> float | None:
        return _refuse(v, (None, 0), "a non-zero penalty (it would change the model's law)")

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition(cls, v: float | None) -> float | None:
        return _refuse(v, (None, 1), "a repetition penalty other than 1")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            spec = parse_method(v)
        except MethodError as err:
            raise ValueError(str(err)) from None
        entry = entry_of(spec)
        if entry.peer:
            raise ValueError(f"{spec.kind!r} is a peer for `hierspec bench`, not a served method")
        if entry.remote:
            raise ValueError(
                f"{spec.kind} (a drafter in a second process) is not served; use it with `generate`"
            )
        return spec.name

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: int | str | None) -> int | str | None:
        if v is None or v == "auto" or (isinstance(v, int) and v >= 1):
            return v
        raise ValueError(f"expected an integer >= 1 or 'auto', got {v!r}")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def gamma_value(self) -> int | None:
        """None: the server's default; 0: auto (as `hierspec.methods.spec.parse_gamma`)."""
        return None if self.gamma is None else 0 if self.gamma == "auto" else int(self.gamma)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: ``prompt`` is one string or one list of token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not isinstance(v[0], int):
            if len(v) == 1:
                return v[0]
            raise ValueError("one prompt per request is supported (a string or a list of token ids)")
        if isinstance(v, list) and any(not isinstance(t, int) for t in v):
            raise ValueError("a token list must hold integers only")
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        return _refuse(v, (None, 0), "logprobs")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool | None:
        return _refuse(v, (None, False), "echo")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        return _refuse(v, (None, ""), "suffix (insertion)")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        return _refuse(v, (None, 1), "best_of > 1")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content parts other than text (images, audio, files) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        """As a chat template takes it (``developer`` is OpenAI's new name for ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: ``messages`` through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | None = None
    modalities: list[Literal["text"]] | None = None
    reasoning_effort: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool | None) -> bool | None:
        return _refuse(v, (None, False), "logprobs")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        return _refuse(v, (None, 0), "top_logprobs")

    @field_validator("tools", "functions")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool calling is not supported by this server")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _tool_choice(cls, v: str | None) -> str | None:
        return _refuse(v, (None, "none", "auto"), "tool_choice other than none")

    @field_validator("reasoning_effort", "audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        return _refuse(v, (None,), "this option")

    @property
    def max_new(self) -> int | None:
        """max_completion_tokens (OpenAI's new name) or max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
