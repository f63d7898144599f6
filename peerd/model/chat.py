"""Chat prompts from the model's own chat template (Jinja2, sandboxed), for the CLI, SDK and API alike.

A Hugging Face model folder carries its prompt format as a Jinja template: ``chat_template.jinja``
(transformers 5) or the ``chat_template`` key of ``tokenizer_config.json`` (older folders; a string,
or a list of named templates of which we take ``default``). We render it the way transformers'
``apply_chat_template`` does -- an immutable sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a
``tojson`` that keeps non-ASCII text -- so any model folder gets its own format and a template from
a downloaded folder cannot reach Python objects beyond the data we hand it. The tests check our
output against ``apply_chat_template`` for SmolLM2-, Llama-3- and Qwen2-style templates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    import tokenizers

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "NoChatTemplateError",
    "PromptTextError",
    "chat_prompt_ids",
    "check_text",
    "eos_token_ids",
    "load_tokenizer",
]

# the special-token names a template may refer to, as tokenizer_config.json spells them
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: malformed messages, or the template refused them."""


class NoChatTemplateError(ChatTemplateError):
    """The model folder has no chat template (a base model): send the prompt as is (``--raw``)."""


class PromptTextError(ValueError):
    """A prompt that is not text: it holds bytes that are not UTF-8 (or lone surrogates)."""


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise PromptTextError naming the first character that has no UTF-8 form.

    Python hands undecodable command-line bytes over as lone surrogates (U+DC80..U+DCFF), and JSON
    can carry lone surrogates too; the tokenizer would fail on them with an error far from the cause.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise PromptTextError(
            f"{what} is not valid UTF-8 text ({bad} at character {exc.start}); "
            "pass UTF-8 text (check the terminal's or the file's encoding)"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the special tokens it may use; ``render`` turns messages into a prompt."""

    source: str  # the Jinja template text
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # e.g. {"bos_token": "<s>"}

    @classmethod
    def from_folder(cls, model_path: str | Path) -> ChatTemplate:
        """The template of a HF-format folder; NoChatTemplateError when it has none."""
        folder = Path(model_path)
        config = _read_json(folder / "tokenizer_config.json")
        tokens = {key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None}
        jinja = folder / "chat_template.jinja"
        # transformers 5 writes the template to its own file and prefers it over the config's copy
        source: object = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            raise NoChatTemplateError(
                f"{folder} has no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                "chat_template): it is probably a base model; send the prompt as is (--raw)"
            )
        return cls(source=source, special_tokens=tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ({"role", "content"} dicts), as ``apply_chat_template`` gives it.

        ``add_generation_prompt`` ends the prompt where the assistant's reply starts. Raises
        ChatTemplateError for an empty or malformed conversation, or one the template rejects
        (many templates insist on alternating user/assistant turns).
        """
        import jinja2

        if not messages:
            raise ChatTemplateError("cannot format an empty conversation: give at least one message")
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not role or not isinstance(content, str):
                raise ChatTemplateError(f"message {index} needs a non-empty string 'role' and a string 'content'")
        try:
            return _compile(self.source).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:  # syntax errors, sandbox violations, raise_exception(...)
            raise ChatTemplateError(f"the model's chat template refused this conversation: {exc}") from exc


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; chat templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    """Compile once per template text (a server renders the same template for every request)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def load_tokenizer(model_path: str | Path) -> tokenizers.Tokenizer:
    """Load `<model_path>/tokenizer.json` with the `tokenizers` library; FileNotFoundError if absent."""
    import tokenizers

    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {model_path} a converted model folder?")
    return tokenizers.Tokenizer.from_file(str(path))


def eos_token_ids(model_path: str | Path) -> list[int]:
    """The ids that end a reply: generation_config.json's eos_token_id, else config.json's."""
    folder = Path(model_path)
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        if isinstance(value, int):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return list(value)
    raise ValueError(f"{folder} declares no eos_token_id in generation_config.json or config.json")


def chat_prompt_ids(
    tokenizer: tokenizers.Tokenizer,
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
) -> list[int]:
    """Token ids of ``messages`` rendered by ``template``, ending with the assistant generation prompt.

    Special tokens are not added around the text (the template already has them), as HF's
    ``apply_chat_template(tokenize=True)`` does.
    """
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            check_text(content, f"a {message.get('role', 'chat')} message")
    prompt = template.render(messages)
    ids: list[int] = tokenizer.encode(prompt, add_special_tokens=False).ids
    return ids
