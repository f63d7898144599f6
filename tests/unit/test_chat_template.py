"""Chat templates rendered from the model folder: the same text as transformers' apply_chat_template.

The three templates below are written for these tests in the styles of SmolLM2 (ChatML with a
default system turn), Llama 3 (header tokens, BOS from the tokenizer, trimmed content) and Qwen2
(ChatML, default system, a tools branch through tojson); they use the Jinja features real
templates lean on (trim_blocks/lstrip_blocks whitespace, loop controls, namespace, raise_exception).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from peerd.model import chat
from peerd.model.chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from tests.helpers.tiny_model import write_tiny_tokenizer

SMOLLM2_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant named Tiny.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_STYLE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

QWEN2_STYLE = """{% set ns = namespace(system_given=false) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% set ns.system_given = true %}{% endif %}
{% endfor %}
{% if tools %}
    {{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{{ '<|im_end|>\\n' }}
{% elif not ns.system_given %}
    {{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "  Sky colour?  "}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me\na joke in 日本語."},
    ],
]


def _folder(tmp_path: Path, name: str, template: str, *, as_file: bool = False) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    write_tiny_tokenizer(folder, 256)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if as_file:  # transformers 5 keeps the template in its own file
        (folder / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("name", "template", "as_file"),
    [("smollm2", SMOLLM2_STYLE, True), ("llama3", LLAMA3_STYLE, False), ("qwen2", QWEN2_STYLE, False)],
)
def test_render_matches_transformers(tmp_path, name, template, as_file):
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, name, template, as_file=as_file)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.from_folder(folder)
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            want = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.render(messages, add_generation_prompt=generation_prompt) == want
    tokenizer = chat.load_tokenizer(folder)
    want_ids = hf.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat.chat_prompt_ids(tokenizer, ours, CONVERSATIONS[2]) == list(want_ids["input_ids"])


def test_llama3_style_uses_the_tokenizers_bos_and_raises_for_unknown_roles(tmp_path):
    ours = ChatTemplate.from_folder(_folder(tmp_path, "llama3", LLAMA3_STYLE))
    assert ours.render([{"role": "user", "content": "hi"}]).startswith("<s><|start_header_id|>user")
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        ours.render([{"role": "robot", "content": "beep"}])


def test_named_templates_and_special_token_dicts(tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    config = {
        "bos_token": {"content": "<s>", "lstrip": False},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}"},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_folder(folder).render([{"role": "user", "content": "x"}]) == "<s>"


@pytest.mark.parametrize(
    ("messages", "match"),
    [([], "empty conversation"), ([{"role": "user"}], "content"), ([{"role": "", "content": "x"}], "role")],
)
def test_render_rejects_malformed_conversations(messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(SMOLLM2_STYLE).render(messages)


def test_the_sandbox_keeps_templates_away_from_python_internals():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(escape).render([{"role": "user", "content": "x"}])
    mutate = "{{ messages.append(1) }}"  # immutable sandbox: the caller's list stays as it was
    with pytest.raises(ChatTemplateError):
        ChatTemplate(mutate).render([{"role": "user", "content": "x"}])


def test_a_base_model_without_template_is_named_as_such(tmp_path):
    write_tiny_tokenizer(tmp_path, 256)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(NoChatTemplateError, match="--raw"):
        ChatTemplate.from_folder(tmp_path)


def test_chat_prompt_ids_encodes_without_extra_special_tokens():
    seen = []

    class FakeTokenizer:
        def encode(self, text, add_special_tokens=True):
            seen.append((text, add_special_tokens))
            return SimpleNamespace(ids=[1, 2, 3])

    ids = chat.chat_prompt_ids(cast(Any, FakeTokenizer()), ChatTemplate(SMOLLM2_STYLE), CONVERSATIONS[0])
    assert ids == [1, 2, 3]
    assert seen == [(ChatTemplate(SMOLLM2_STYLE).render(CONVERSATIONS[0]), False)]


def test_eos_from_folder(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert chat.eos_token_ids(tmp_path) == [2]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert chat.eos_token_ids(other) == [2, 0]
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        chat.load_tokenizer(tmp_path)
