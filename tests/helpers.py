"""Shared by the tests: the tiny model's shape and a quiet CPU trainer (fixtures built on them are in conftest.py)."""

from typing import Any

from lightning.pytorch import Trainer

from lightning_rlhf.models import PolicyConfig, TinyModelConfig

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
"""The tests' tiny random Llama: 2 layers of width 32, seconds to build and train on a CPU."""
TINY_VLLM = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
"""The tiny Llama with one head of size 32, for the vLLM tests: vLLM's CPU attention has no kernel below 32."""
TINY_POLICY = PolicyConfig(tiny=TINY)
"""The tiny Llama as a policy, with the byte tokenizer."""


def cpu_trainer(**overrides: Any) -> Trainer:
    """A one-device CPU ``Trainer`` without logger, checkpoints, progress bar or model summary; ``overrides`` win."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(**(settings | overrides))


def check_that_hangs_dies_or_raises(item: str) -> str:
    """A check for ``CheckPool`` tests (module-level, so spawned workers import it): ``"hang"`` sleeps a minute,
    ``"die"`` exits its process, ``"raise"`` raises; anything else comes back doubled."""
    import os
    import time

    if item == "hang":
        time.sleep(60)
    if item == "die":
        os._exit(3)
    if item == "raise":
        raise ValueError("a check that raises")
    return item * 2


def save_tiny_reward_model(path: Any, tokenizer: Any, pad_token_id: int | None, num_labels: int = 1) -> str:
    """A tiny random Llama reward model (width 32, 2 layers, seed 0) and ``tokenizer``, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
