"""Export a trained policy and its critic as files Hugging Face libraries load: ``lightning-rlhf-export CKPT OUT_DIR``.

:func:`export_policy` writes into ``out_dir``:

- ``adapter/`` (LoRA only): the peft adapter (``save_pretrained``: LoRA weights, ``modules_to_save`` such as a trained
  ``lm_head``, ``adapter_config.json``) and the tokenizer. Load it with
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir / "adapter")``.
- ``base/`` (LoRA on a tiny random base only, ``PolicyConfig.name_or_path=None``): that base model, so the adapter
  loads offline. For a hub or local base, ``base`` is the ``base_model_name_or_path`` in ``adapter_config.json``.
- ``merged/`` (full fine-tuning always; LoRA with ``merge=True``): a plain causal LM and the tokenizer, loaded by
  ``AutoModelForCausalLM.from_pretrained(out_dir / "merged")``.
- ``value_head.safetensors`` and ``value_head.json``: the critic and what it reads; :func:`load_value_head`.

Where this departs from the usual ``save_pretrained`` export:

- **The critic is exported too** (TRL's PPO trainer dropped it on save: trl#3293). It is a linear layer on the
  policy's last hidden state after the final norm (``AutoModelForCausalLM(...).get_decoder()(...).last_hidden_state``);
  ``values = value_head(hidden.float()).squeeze(-1)``. Training passes ``position_ids = attention_mask.cumsum(-1) - 1``
  (clamped at 0), so left-padded rows see the positions they would alone; pass the same to reproduce its values.
- **Merging works on a deep copy** of the adapter model: merging into the training model and unmerging again would not
  restore it bit for bit. A merged ``lm_head`` trained through ``modules_to_save`` replaces the base one; when the base
  ties it to the input embeddings, peft unties them in the merged config.
- **Full tensors only.** Under a sharded strategy the caller gathers the weights first and exports on one process
  (:class:`lightning_rlhf.callbacks.ExportCallback` does this under FSDP2).
- :func:`export_from_checkpoint` rebuilds the model from the checkpoint's ``policy`` and ``lora`` hyperparameters
  without constructing a ``PPOModule`` (so neither this module nor the command imports Lightning), then loads the
  checkpoint's trained weights (checkpoints hold only those; the frozen base is rebuilt).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import peft
import torch
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.models import LoraConfig, PolicyConfig, PolicyValueModel, build_policy, load_tokenizer

ADAPTER_DIR = "adapter"
BASE_DIR = "base"
MERGED_DIR = "merged"
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"
VALUE_HEAD_INPUT = "last_hidden_state of the policy's decoder, after the final norm"
"""What the value head reads, as written to ``value_head.json``."""
MODEL_PREFIX = "model."
"""Prefix of the policy's keys in a ``PPOModule`` checkpoint's ``state_dict`` (the module's ``self.model``)."""


def export_policy(
    model: PolicyValueModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    merge: bool = False,
    save_base: bool | None = None,
) -> dict[str, Path]:
    """Write the policy (adapter and/or merged model, with the tokenizer) and the value head into ``out_dir``.

    Args:
        model: the trained policy with full (unsharded) tensors; it is not modified.
        tokenizer: saved next to every model directory.
        out_dir: created if missing; files already there are overwritten.
        merge: LoRA only: also write the adapter merged into the base as a plain model (full fine-tuning always
            writes ``merged/``).
        save_base: LoRA only: also write the base model to ``base/``; None means only for a base that has no
            hub id or path (the tiny random model), from which the adapter could not be loaded otherwise.
    Returns:
        The paths written, by name: ``"adapter"``, ``"base"``, ``"merged"`` (directories) and ``"value_head"`` (the
        safetensors file; ``value_head.json`` lies beside it; not for a policy without a critic), each only when
        written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if model.uses_lora:
        paths["adapter"] = _save_pretrained(model.lm, tokenizer, out / ADAPTER_DIR)
        base_has_no_name = not model.lm.get_base_model().config.name_or_path
        if save_base or (save_base is None and base_has_no_name):
            paths["base"] = _save_pretrained(_unloaded_base(model.lm), tokenizer, out / BASE_DIR)
        if merge:
            paths["merged"] = _save_pretrained(copy.deepcopy(model.lm).merge_and_unload(), tokenizer, out / MERGED_DIR)
    else:
        paths["merged"] = _save_pretrained(model.lm, tokenizer, out / MERGED_DIR)
    if model.value_head is not None:  # a critic-free run has none
        paths["value_head"] = save_value_head(model.value_head, out)
    return paths


def _save_pretrained(lm: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    lm.save_pretrained(directory)
    # Saved with its padding side (left, for batched generation), which transformers keeps only as an init argument.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
    tokenizer.save_pretrained(directory)
    return directory


def _unloaded_base(lm: peft.PeftModel) -> nn.Module:
    """A copy of the base model without the adapter: LoRA layers and ``modules_to_save`` give back their originals.

    peft's ``unload()`` alone would keep the *trained* copy of each ``modules_to_save`` module.
    """
    lm = copy.deepcopy(lm)
    for name, module in list(lm.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent_name), child, module.original_module)
    return lm.unload()


def save_value_head(value_head: nn.Linear, out_dir: str | Path) -> Path:
    """Write ``value_head.safetensors`` (``weight`` (1, H), ``bias`` (1,), float32) and ``value_head.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in value_head.state_dict().items()}
    path = out / VALUE_HEAD_FILE
    save_file(tensors, path)
    config = {"hidden_size": value_head.in_features, "input": VALUE_HEAD_INPUT, "dtype": "float32"}
    (out / VALUE_HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_value_head(path: str | Path) -> nn.Linear:
    """The value head written by :func:`export_policy`, as a float32 ``nn.Linear(hidden_size, 1)``.

    Args:
        path: the export directory or its ``value_head.safetensors``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No value head at {str(path)!r}; export_policy writes {VALUE_HEAD_FILE}.")
    config = json.loads((path.parent / VALUE_HEAD_CONFIG).read_text())
    value_head = nn.Linear(config["hidden_size"], 1, dtype=torch.float32)
    value_head.load_state_dict(load_file(path))
    return value_head


def _config_from_dict(cls: type, value: Any) -> Any:
    """``cls`` built from a checkpoint's plain dict of its fields, nested config dataclasses included."""
    if not isinstance(value, dict):
        return cls() if value is None else value
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, item in value.items():
        hint = hints.get(name)
        fields[name] = _config_from_dict(hint, item) if dataclasses.is_dataclass(hint) else item
    return cls(**fields)


def _read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    if ckpt_path.is_dir():
        raise ValueError(
            f"{str(ckpt_path)!r} is a directory (a distributed checkpoint?); export needs a single-file checkpoint: "
            "train with the fsdp2 strategy's default save_distributed_checkpoint=False."
        )
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(ckpt_path)!r} does not exist.")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or others depending on what the file is
        raise ValueError(
            f"Could not read {str(ckpt_path)!r} as a PyTorch checkpoint (weights_only=True): {err}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not {"policy", "lora"} <= hparams.keys() or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(ckpt_path)!r} is not a lightning_rlhf PPOModule checkpoint: it needs 'hyper_parameters' with "
            "'policy' and 'lora', and a 'state_dict' (write one with ModelCheckpoint or trainer.save_checkpoint)."
        )
    return checkpoint


def policy_from_checkpoint(ckpt_path: str | Path) -> tuple[PolicyValueModel, PreTrainedTokenizerBase]:
    """Rebuild a ``PPOModule`` checkpoint's policy and value head (base rebuilt, trained weights loaded) on CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a single-file ``PPOModule`` checkpoint, or its weights do not fit its config.
    """
    ckpt_path = Path(ckpt_path)
    checkpoint = _read_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    policy_config = _config_from_dict(PolicyConfig, hparams["policy"])
    lora_config = _config_from_dict(LoraConfig, hparams["lora"])
    tokenizer = load_tokenizer(policy_config)
    model = build_policy(policy_config, lora_config, tokenizer)
    state = checkpoint["state_dict"]
    foreign = sorted(k for k in state if not k.startswith(MODEL_PREFIX))
    weights = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    trained_missing = sorted(set(missing) & {n for n, p in model.named_parameters() if p.requires_grad})
    if foreign or unexpected or trained_missing:
        raise ValueError(
            f"The weights in {str(ckpt_path)!r} do not fit the model its hyperparameters describe: "
            f"keys outside {MODEL_PREFIX!r}: {foreign[:3]}, unexpected: {unexpected[:3]}, "
            f"trained weights missing: {trained_missing[:3]}."
        )
    return model, tokenizer


def export_from_checkpoint(ckpt_path: str | Path, out_dir: str | Path, merge: bool = False) -> dict[str, Path]:
    """:func:`export_policy` of a ``PPOModule`` checkpoint (``ModelCheckpoint`` or ``trainer.save_checkpoint``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a single-file ``PPOModule`` checkpoint, or its weights do not fit its config.
    """
    model, tokenizer = policy_from_checkpoint(ckpt_path)
    return export_policy(model, tokenizer, out_dir, merge=merge)


def main(argv: list[str] | None = None) -> None:
    """``lightning-rlhf-export CKPT OUT_DIR [--merge]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf-export",
        description="Export a lightning_rlhf PPOModule checkpoint as a Hugging Face policy (peft adapter and/or "
        "merged model, with the tokenizer) plus the value head.",
    )
    parser.add_argument("ckpt", type=Path, help="single-file checkpoint (.ckpt) written by PPOModule training")
    parser.add_argument("out_dir", type=Path, help="directory to write adapter/, merged/, base/ and value_head.*")
    parser.add_argument("--merge", action="store_true", help="LoRA: also write the adapter merged into the base")
    args = parser.parse_args(argv)
    try:
        paths = export_from_checkpoint(args.ckpt, args.out_dir, merge=args.merge)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
