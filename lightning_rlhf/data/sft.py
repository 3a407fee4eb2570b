"""Data for the SFT stage: (prompt, response) examples as right-padded batches whose loss covers the response.

Loading, validation and the validation split are those of :class:`~lightning_rlhf.data.examples.ExampleDataModule`.
Tokenization, chosen so each stage sees exactly what the next one will: SFT tokenizes prompt and response separately
and the loss covers the response tokens only. A text prompt is encoded as
:class:`~lightning_rlhf.data.PromptDataModule` encodes PPO prompts (:mod:`lightning_rlhf.data.common`); the response
is encoded without special tokens and followed by EOS, the token PPO's rollouts stop at. A chat prompt is rendered with
``add_generation_prompt=True`` and the response is the rest of the rendered conversation (the template's end-of-turn
tokens included; EOS is appended only if the template wrote none).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import encode_text_prompts, need_chat_template
from lightning_rlhf.data.examples import ExampleDataModule, Row, check_row, too_long
from lightning_rlhf.data.formats import sft_row
from lightning_rlhf.data.sources import DataFiles
from lightning_rlhf.synthetic import WORLD


class SFTCollator:
    """Right-pad ``{"prompt_ids", "response_ids"}`` rows into an :class:`SFTDataModule` batch (picklable).

    Args:
        pad_token_id: the id written in padding positions (masked out, so any valid id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Returns ``{"input_ids": (B, L) long, "attention_mask": (B, L) bool, "loss_mask": (B, L) bool}``."""
        width = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, L), True = real token
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, L), True = response token
        for b, row in enumerate(rows):
            p, n = len(row["prompt_ids"]), len(row["prompt_ids"]) + len(row["response_ids"])
            input_ids[b, :n] = torch.tensor(row["prompt_ids"] + row["response_ids"], dtype=torch.long)
            attention_mask[b, :n] = True
            loss_mask[b, p:n] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def encode_sft_example(
    prompt: str | list[dict[str, str]], response: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one SFT example; see the module docstring for the rules.

    Raises:
        ValueError: the chat template renders the conversation so that it does not start with the rendered prompt.
    """
    eos = tokenizer.eos_token_id
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template renders prompt + response so that it does not start with the prompt rendered with "
                "add_generation_prompt=True; SFT cannot tell the response tokens apart. Fix the template."
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        if eos is not None and eos not in response_ids:
            response_ids = [*response_ids, eos]
        return list(prompt_ids), list(response_ids)
    (prompt_ids,) = encode_text_prompts([prompt], tokenizer)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids, response_ids + ([] if eos is None else [eos])


class SFTEncoder:
    """:data:`RowEncoder` of SFT: the row's layout (:func:`~lightning_rlhf.data.formats.sft_row`), its check, then
    :func:`encode_sft_example` with ``max_length`` applied."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_key: str,
        response_key: str | None,
        max_length: int,
        truncation: str,
        option: str,
    ) -> None:
        self.tokenizer, self.prompt_key, self.response_key = tokenizer, prompt_key, response_key
        self.max_length, self.truncation, self.option = max_length, truncation, option

    def __call__(self, row: Any, label: str) -> dict[str, Any]:
        if not isinstance(row, dict):
            check_row(row, label, ("prompt", "response"), self.option)  # raises: not an object
        row = sft_row(row, self.prompt_key, self.response_key, label, self.option)
        check_row(row, label, ("prompt", "response"), self.option)
        if isinstance(row["prompt"], list):
            need_chat_template(self.tokenizer, label, self.option)
        prompt_ids, response_ids = encode_sft_example(row["prompt"], row["response"], self.tokenizer)
        length = len(prompt_ids) + len(response_ids)
        if length > self.max_length:
            if self.truncation == "error" or len(prompt_ids) >= self.max_length:
                fix = "set data.truncation=right (the prompt must fit)"
                raise too_long(self.option, label, length, self.max_length, fix)
            response_ids = response_ids[: self.max_length - len(prompt_ids)]
        if not prompt_ids:
            raise ValueError(f"data.{self.option}: row {label}: the prompt encodes to no tokens.")
        return {"prompt_ids": prompt_ids, "response_ids": response_ids}


class SFTDataModule(ExampleDataModule):
    """(prompt, response) examples for supervised fine-tuning, served as right-padded batches.

    Each batch is ``{"input_ids": (B, L) long, "attention_mask": (B, L) bool (True = real token), "loss_mask": (B, L)
    bool (True = response token, the ones the loss trains)}``.

    Args:
        examples: a .jsonl file with ``{"prompt": text or chat messages, "response": text}`` per line (or another
            layout below), or an inline list of such objects.
        synthetic: use the synthetic world's demonstrations (:meth:`SyntheticWorld.demonstrations`) instead.
        dataset: a Hugging Face dataset: a hub id, a ``save_to_disk`` directory, or the builder of ``data_files``.
        data_files: local dataset files (parquet, jsonl/json, csv, arrow).
        split: the dataset split.
        subset: the dataset's configuration name.
        prompt_key: the prompt column; without it a ``messages`` column is used: the conversation before its last
            assistant turn is the prompt, that turn the response.
        response_key: the response column; None reads ``response``, else ``completion`` (text, or one assistant
            message).
        num_proc: processes that tokenise a dataset (``datasets.map``, cached).
        num_examples: how many synthetic demonstrations to generate.
        val_fraction: share of the rows held out for validation (``val/loss``); 0 turns validation off.
        batch_size: examples per batch and per device.
        max_length: longest prompt + response in tokens.
        truncation: what to do with a longer example: ``"error"``, or ``"right"`` to cut the end of the response.
        shuffle: shuffle the training rows every epoch (seeded by ``seed``).
        num_workers: DataLoader worker processes.
        seed: seed of the synthetic data, the validation split and the shuffling.
        tokenizer: the policy tokenizer; by default the ``tokenizer`` attribute of the LightningModule being trained.
    """

    option = "examples"
    count_option = "num_examples"

    def __init__(
        self,
        examples: str | list[Row] | None = None,
        synthetic: bool = False,
        dataset: str | None = None,
        data_files: DataFiles | None = None,
        split: str = "train",
        subset: str | None = None,
        prompt_key: str = "prompt",
        response_key: str | None = None,
        num_proc: int | None = None,
        num_examples: int = 2048,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        max_length: int = 512,
        truncation: Literal["error", "right"] = "error",
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if truncation not in ("error", "right"):
            raise ValueError(f"data.truncation must be 'error' or 'right', got {truncation!r}.")
        super().__init__(
            examples,
            synthetic,
            num_examples,
            val_fraction,
            batch_size,
            max_length,
            shuffle,
            num_workers,
            seed,
            tokenizer,
            dataset,
            data_files,
            split,
            subset,
            num_proc,
        )
        self.truncation = truncation
        self.prompt_key = prompt_key
        self.response_key = response_key

    def _synthetic_rows(self) -> list[Row]:
        return WORLD.demonstrations(self.num_examples, self.seed)

    def encoder(self, tokenizer: PreTrainedTokenizerBase) -> SFTEncoder:
        option = "dataset" if self.dataset is not None else self.option
        return SFTEncoder(tokenizer, self.prompt_key, self.response_key, self.max_length, self.truncation, option)

    def _collator(self) -> SFTCollator:
        return SFTCollator(self._pad_token_id)
