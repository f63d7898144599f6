"""Client adapters and the fine-tuning helpers, on a local model (no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peerd.cli.finetune import plot_losses
from peerd.client.adapters import ClientAdapter
from peerd.client.training import DEFAULT_DATA, TokenBatches, lm_loss, train_step
from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead
from peerd.model.stage import Stage

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def make_head(seed: int = 0) -> ClientHead:
    torch.manual_seed(seed)
    head = ClientHead(CONFIG)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return head.requires_grad_(False)


def test_fresh_adapter_without_prompt_changes_nothing() -> None:
    head = make_head()
    adapter = ClientAdapter(head, head_rank=4, embed_rank=4)
    ids = torch.randint(0, 64, (2, 5))
    hidden = torch.randn(2, 5, 32)
    torch.testing.assert_close(adapter.embed(ids), head.embed(ids))  # LoRA B (or A for embeddings) starts at 0
    torch.testing.assert_close(adapter.logits(hidden), head.logits(hidden))
    assert adapter.prefix_length == 0


def test_soft_prompt_goes_in_front_only_when_asked() -> None:
    head = make_head()
    adapter = ClientAdapter(head, prompt_tokens=3, init_prompt_ids=[5, 6])
    ids = torch.randint(0, 64, (2, 4))
    with_prompt = adapter.embed(ids)
    assert with_prompt.shape == (2, 7, 32)
    assert adapter.prompt is not None
    torch.testing.assert_close(adapter.prompt[:2], head.embed_tokens.weight[[5, 6]])  # initialised from tokens
    torch.testing.assert_close(with_prompt[:, 3:], head.embed(ids))
    assert adapter.embed(ids, with_prompt=False).shape == (2, 4, 32)


def test_only_adapter_parameters_train(tmp_path: Path) -> None:
    head = make_head()
    stage = Stage.random(CONFIG, 0, 2)
    adapter = ClientAdapter(head, prompt_tokens=4, head_rank=2, embed_rank=2)
    names = set(adapter.trainable_parameters())
    assert names == {"prompt", "head_lora_a", "head_lora_b", "embed_lora_a", "embed_lora_b"}
    before = {name: p.detach().clone() for name, p in head.state_dict().items()}
    optimizer = torch.optim.AdamW(list(adapter.trainable_parameters().values()), lr=1e-2)
    train_step(adapter, stage, optimizer, torch.randint(0, 64, (2, 6)))
    for name, p in head.state_dict().items():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)
    assert all(p.grad is not None for p in adapter.trainable_parameters().values())


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    head = make_head()
    adapter = ClientAdapter(head, prompt_tokens=4, head_rank=2, embed_rank=3, alpha=8.0, seed=3)
    with torch.no_grad():
        for p in adapter.trainable_parameters().values():
            p.add_(torch.randn_like(p))
    path = adapter.save(tmp_path / "a" / "adapter.safetensors", model_id="tiny")
    loaded = ClientAdapter.load(path, head)
    assert (loaded.prompt_tokens, loaded.head_rank, loaded.embed_rank, loaded.alpha) == (4, 2, 3, 8.0)
    ids, hidden = torch.randint(0, 64, (1, 5)), torch.randn(1, 5, 32)
    torch.testing.assert_close(loaded.embed(ids), adapter.embed(ids))
    torch.testing.assert_close(loaded.logits(hidden), adapter.logits(hidden))

    other = ClientHead(ModelConfig(**{**CONFIG.__dict__, "hidden_size": 16, "head_dim": 4}))
    with pytest.raises(ValueError, match="trained for hidden 32"):
        ClientAdapter.load(path, other)


def test_lm_loss_targets_every_token_after_a_soft_prompt() -> None:
    head = make_head()
    stage = Stage.random(CONFIG, 0, 2)
    adapter = ClientAdapter(head, prompt_tokens=2)
    ids = torch.randint(0, 64, (3, 5))
    out = stage(adapter.embed(ids))  # [3, 7, 32]
    expected = torch.nn.functional.cross_entropy(head.logits(out[:, 1:6]).flatten(0, 1), ids.flatten())
    torch.testing.assert_close(lm_loss(adapter, stage, ids), expected)
    plain = ClientAdapter(head)
    out = stage(head.embed(ids))
    expected = torch.nn.functional.cross_entropy(head.logits(out[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(lm_loss(plain, stage, ids), expected)


def test_token_batches_are_windows_of_the_text() -> None:
    ids = list(range(100))
    batches = TokenBatches(ids, seq_len=10, batch_size=4, seed=0)
    assert len(batches) == 19  # windows start every 5 tokens
    batch = batches.sample()
    assert batch.shape == (4, 10)
    for row in batch.tolist():
        assert row == list(range(row[0], row[0] + 10)) and row[0] % 5 == 0
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenBatches([1, 2, 3], seq_len=10, batch_size=1)


def test_shipped_training_text_and_loss_plot(tmp_path: Path) -> None:
    assert DEFAULT_DATA.is_file() and len(DEFAULT_DATA.read_text(encoding="utf-8")) > 2000
    path = plot_losses([3.0, 2.5, 2.6, 2.0, 1.8], tmp_path / "loss.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_without_matplotlib_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from peerd.cli.main import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["finetune", "--initial-peers", "/ip4/127.0.0.1/tcp/1"]) == 2  # before any connection
    assert "pip install 'peerd[finetune]'" in capsys.readouterr().err
