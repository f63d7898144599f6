"""OpenAI request bodies -> one validated :class:`CompletionRequest`; errors in OpenAI's shape.

Checked before any work starts, field by field, with the field named in the error (``param``), as
OpenAI and vLLM answer: a client library shows that message to its user. Fields we do not use
(``user``, ``logit_bias`` ...) are ignored, so existing apps that send them keep working.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from peerd.client.sampling import SamplingParams

__all__ = ["ApiError", "CompletionRequest", "parse_request"]

MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM more; a bound keeps the per-token stop check cheap


class ApiError(Exception):
    """An error the API answers with: HTTP status plus OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


@dataclass(frozen=True)
class CompletionRequest:
    """One validated request: a chat (``messages``) or a plain completion (``prompt``)."""

    model: str
    messages: list[dict[str, str]] | None  # chat: {"role", "content"} with text content
    prompt: str | list[int] | None  # completions: text, or token ids
    max_tokens: int | None  # None: as many as the context allows (capped by the server's default)
    sampling: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with token counts


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{name} must be a number", name)
    if not low <= value <= high:
        raise _bad(f"{value} is out of range for {name}: must be in [{low:g}, {high:g}]", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer", name)
    if value < low:
        raise _bad(f"{value} is less than the minimum of {low} for {name}", name)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where} must be a string or a list of text parts", where)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise _bad(f"messages[{i}] needs a string role", f"messages[{i}].role")
        out.append({"role": message["role"], "content": _text(message.get("content", ""), f"messages[{i}].content")})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise _bad("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def _stops(body: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise _bad("stop_token_ids must be a list of token ids", "stop_token_ids")
    return tuple(stops), tuple(ids)


def _sampling(body: dict[str, Any]) -> SamplingParams:
    top_k = _integer(body, "top_k", -1)
    stop, stop_token_ids = _stops(body)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=max(top_k or 0, 0),  # -1 (vLLM) and 0 both mean off
        seed=_integer(body, "seed", -(2**63)),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 100.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=stop,
        stop_token_ids=stop_token_ids,
    )


def parse_request(raw: bytes, *, chat: bool) -> CompletionRequest:
    """Validate a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body; ApiError(400) if wrong.

    OpenAI's default temperature is 1 (sampling), as here; send 0 for greedy output.
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (GET /v1/models lists it)", "model")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise _bad("only n = 1 is supported: send one request per choice", "n")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    name = next((key for key in names if body.get(key) is not None), names[-1])
    max_tokens = _integer(body, name, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return CompletionRequest(
        model=model,
        messages=_messages(body) if chat else None,
        prompt=None if chat else _prompt(body),
        max_tokens=max_tokens,
        sampling=_sampling(body),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )
