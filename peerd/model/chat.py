"""Chat prompts for clients that have only the `tokenizers` library (no transformers, no Jinja).

Models in the Llama family we serve use ChatML:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n            <- the generation prompt; the model answers here

Templates are named rather than evaluated: `format_chat` reimplements each known
HF chat template in plain Python, and the slow tests check it against
transformers' `apply_chat_template` on the real model. SmolLM2's template adds a
default system message when the first message is not a system message; plain
`chatml` adds none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "CHAT_TEMPLATES",
    "SMOLLM2_DEFAULT_SYSTEM",
    "ChatTemplate",
    "chat_prompt_ids",
    "chat_template_name",
    "eos_token_ids",
    "format_chat",
    "load_tokenizer",
]

# From SmolLM2-Instruct's chat template (GGUF key tokenizer.chat_template).
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class ChatTemplate:
    """A ChatML variant: the markers around each turn and the system text used when none is given."""

    name: str
    default_system: str | None  # inserted before a conversation whose first message is not "system"
    turn_start: str = "<|im_start|>"
    turn_end: str = "<|im_end|>"


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(name="chatml", default_system=None),
    "smollm2": ChatTemplate(name="smollm2", default_system=SMOLLM2_DEFAULT_SYSTEM),
}


def _template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    try:
        return CHAT_TEMPLATES[template.lower()]
    except KeyError:
        known = ", ".join(sorted(CHAT_TEMPLATES))
        raise ValueError(f"unknown chat template {template!r} (known: {known})") from None


def format_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | ChatTemplate = "smollm2",
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render `messages` ({"role": ..., "content": ...} dicts) as a prompt string.

    Equals HF `apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False)` for the named template: each turn is
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`, the template's default system
    turn comes first when the first message is not a system message, and
    `<|im_start|>assistant\\n` ends the prompt. Content is used verbatim, as in HF.
    Raises ValueError for an empty list (as HF does), a malformed message or an
    unknown template.
    """
    chat = _template(template)
    if not messages:
        raise ValueError("cannot format an empty conversation: give at least one message")
    parts = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ValueError(f"message {index} needs a non-empty string 'role' and a string 'content'")
        if index == 0 and role != "system" and chat.default_system is not None:
            parts.append(f"{chat.turn_start}system\n{chat.default_system}{chat.turn_end}\n")
        parts.append(f"{chat.turn_start}{role}\n{content}{chat.turn_end}\n")
    if add_generation_prompt:
        parts.append(f"{chat.turn_start}assistant\n")
    return "".join(parts)


def load_tokenizer(model_path: str | Path) -> tokenizers.Tokenizer:
    """Load `<model_path>/tokenizer.json` with the `tokenizers` library; FileNotFoundError if absent."""
    import tokenizers

    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {model_path} a converted model folder?")
    return tokenizers.Tokenizer.from_file(str(path))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def chat_template_name(model_path: str | Path) -> str:
    """Which named template a model folder uses: its peerd.json says, else its HF chat template.

    Raises ValueError when the folder's template is not ChatML (we do not
    evaluate arbitrary Jinja templates).
    """
    folder = Path(model_path)
    name = _read_json(folder / "peerd.json").get("chat_template")
    if isinstance(name, str) and name.lower() in CHAT_TEMPLATES:
        return name.lower()
    source = _read_json(folder / "tokenizer_config.json").get("chat_template")
    jinja = folder / "chat_template.jinja"
    if not isinstance(source, str) and jinja.is_file():
        source = jinja.read_text(encoding="utf-8")
    if isinstance(source, str) and "<|im_start|>" in source:
        return "smollm2" if SMOLLM2_DEFAULT_SYSTEM in source else "chatml"
    raise ValueError(f"{folder} has no ChatML chat template that peerd knows how to render")


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
    user_text: str,
    system: str | None = None,
    *,
    template: str | ChatTemplate = "smollm2",
) -> list[int]:
    """Token ids of a one-turn chat prompt ending with the assistant generation prompt.

    With `system` None the template's default system message applies. Special
    tokens are not added around the text (the template already has them), as HF's
    `apply_chat_template(tokenize=True)` does.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    prompt = format_chat(messages, template)
    ids: list[int] = tokenizer.encode(prompt, add_special_tokens=False).ids
    return ids
