"""Shared test setup: one thread per process (2-core CI machine), offline Hugging Face libraries, the benchmarks'
modules importable (``flops``, ``presets``: the benchmarks' own code, tested here), and the fixtures most tests use:
the byte tokenizers, a tiny policy and a quiet CPU trainer (``helpers.py`` holds their shapes)."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(
        reason="needs vllm (pip install 'lightning-rlhf[vllm]'; on CPU the vLLM CI job's venv)"
    )
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tokenizer():
    """The policy's byte tokenizer (ByT5, pad token, left padding), as ``load_tokenizer(PolicyConfig())`` makes it."""
    from lightning_rlhf.models import PolicyConfig, load_tokenizer

    return load_tokenizer(PolicyConfig())


@pytest.fixture(scope="session")
def byt5():
    """A plain ``ByT5Tokenizer`` (pad 0, EOS 1, unk 2, byte c -> c + 3), as a data module or a scorer receives it."""
    return transformers.ByT5Tokenizer()


@pytest.fixture
def tiny_policy(tokenizer):
    """Builds the tiny policy: ``tiny_policy(lora=LoraConfig(...), **PolicyConfig fields)`` (LoRA r=8 by default)."""
    from helpers import TINY

    from lightning_rlhf.models import LoraConfig, PolicyConfig, build_policy

    def build(lora=None, **policy):
        return build_policy(PolicyConfig(tiny=TINY, **policy), lora or LoraConfig(), tokenizer)

    return build


@pytest.fixture
def cpu_trainer():
    """``helpers.cpu_trainer``: a quiet one-device CPU ``Trainer`` factory."""
    from helpers import cpu_trainer

    return cpu_trainer
