"""Model presets of the benchmarks: published architectures with random weights, loaded through ``from_pretrained``;
and the helpers every benchmark shares (the model options, the CUDA wait before a clock read).

A preset is a ``transformers`` config. :func:`save_random_model` builds the causal LM from it with seeded random
weights and saves it to a directory, which the benchmark then loads as ``PolicyConfig(name_or_path=directory,
tokenizer="byte")``: the same path a user's checkpoint takes. The prompts are bytes (``ByT5Tokenizer``), the model keeps
its own vocabulary: ids past the byte tokenizer's 384 are sampled like any other and folded into the byte range only
to give the reward some text (:func:`fold_to_tokenizer`), so the model's cost is the real architecture's.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers

from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    TinyModelConfig,
    build_policy,
    load_tokenizer,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2-0.5B's config.json (hub: Qwen/Qwen2-0.5B): 494 M parameters, tied embeddings, q/k/v biases, GQA 14/2.
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # The reference config's backbone (hidden 256, 4 layers) with Qwen2's real vocabulary: lm_head and the
    # full-vocabulary log-softmax dominate, as they do in small LLMs (lm_head is 27% of Qwen2-0.5B's forward FLOPs).
    "qwen2-h256": {
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 151936,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    # The same architecture at toy size: a seconds-long CPU check of the preset path.
    "qwen2-tiny": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
}
"""``--preset`` choices: ``transformers.AutoConfig.for_model`` keyword arguments."""


def preset_config(name: str) -> transformers.PretrainedConfig:
    fields = dict(PRESETS[name])
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def save_random_model(name: str, directory: str, seed: int) -> transformers.PretrainedConfig:
    """Build preset ``name`` with random weights drawn from ``seed`` (float32) and save it to ``directory``."""
    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return config


@contextlib.contextmanager
def random_model_dir(args: argparse.Namespace) -> Iterator[str]:
    """A temporary directory for the benchmark's model: ``--preset``'s random weights (drawn from ``--seed``) saved
    in it, or left empty for the tiny Llama that :func:`policy_config` builds; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="lightning_rlhf_bench_") as model_dir:
        if args.preset != "none":
            save_random_model(args.preset, model_dir, args.seed)
        yield model_dir


def run_on_random_model(args: argparse.Namespace, run: Callable[[argparse.Namespace, str], None]) -> None:
    """A benchmark's ``main``: ``--threads`` and ``--seed`` applied, then ``run(args, model_dir)`` with the model
    directory of :func:`random_model_dir`."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with random_model_dir(args) as model_dir:
        run(args, model_dir)


def sampling_policy(args: argparse.Namespace, model_dir: str) -> tuple[PolicyValueModel, Any]:
    """The policy of ``args`` (LoRA of ``--lora-r``) in eval mode on ``--device``, and its tokenizer: what the
    sampling benchmarks sample from."""
    cfg = policy_config(args, model_dir)
    tokenizer = load_tokenizer(cfg)
    policy = build_policy(cfg, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r), tokenizer)
    return policy.to(torch.device(args.device)).eval(), tokenizer


def fold_to_tokenizer(ids: list[list[int]], size: int) -> list[list[int]]:
    """Token ids folded into ``range(size)``, so a tokenizer smaller than the model's vocabulary can decode them."""
    return [[i % size for i in row] for row in ids]


def add_model_arguments(group: Any) -> None:
    """The benchmark model's options on an ``argparse`` parser or argument group: the tiny Llama's shape (the issue's
    reference config by default), ``--preset`` and the LoRA rank."""
    group.add_argument("--hidden", type=int, default=256, help="hidden size")
    group.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    group.add_argument("--layers", type=int, default=4, help="decoder layers")
    group.add_argument("--heads", type=int, default=4, help="attention heads")
    group.add_argument(
        "--preset",
        choices=("none", *PRESETS),
        default="none",
        help="a published architecture with random weights (benchmarks/presets.py), loaded with from_pretrained, "
        "instead of the tiny Llama; overrides --hidden, --intermediate, --layers, --heads",
    )
    group.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 r, every linear layer)")


def policy_config(args: argparse.Namespace, model_dir: str) -> PolicyConfig:
    """The benchmark's model: ``args.preset`` saved in ``model_dir`` by :func:`save_random_model`, or the tiny Llama
    of ``--hidden/--intermediate/--layers/--heads``; the LM's weights in bfloat16 with ``--precision bf16-true``."""
    dtype = "bfloat16" if args.precision == "bf16-true" else "float32"
    if args.preset != "none":
        return PolicyConfig(name_or_path=model_dir, tokenizer="byte", dtype=dtype)
    tiny = TinyModelConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    return PolicyConfig(tiny=tiny, dtype=dtype)


def build_benchmark_policy(args: argparse.Namespace) -> PolicyValueModel:
    """The policy of ``args`` (``--preset`` or the tiny Llama, LoRA of ``--lora-r`` or ``--full`` fine-tuning), its
    weights drawn from ``--seed``, on ``--device`` in training mode."""
    with random_model_dir(args) as model_dir:
        torch.manual_seed(args.seed)
        cfg = policy_config(args, model_dir)
        lora = LoraConfig(enabled=False) if args.full else LoraConfig(r=args.lora_r, alpha=2 * args.lora_r)
        return build_policy(cfg, lora, load_tokenizer(cfg)).to(args.device).train()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so the clock reads when the kernels are done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
