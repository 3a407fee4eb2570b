"""Data for the SFT and reward-model stages: (prompt, response) examples and (prompt, chosen, rejected) pairs.

Sources: a ``.jsonl`` file (one JSON object per line), an inline list of such objects, or the built-in synthetic world
(``synthetic: true``, :mod:`lightning_rlhf.synthetic`). A prompt is text or a list of chat messages
``{"role", "content"}``; responses are text. Every row is validated and tokenized in ``setup``, so a bad row fails
before training, with its file and line in the message. ``val_fraction`` holds out a seeded random share of the rows
for validation.

Tokenization, chosen so each stage sees exactly what the next one will:

- **SFT** tokenizes prompt and response separately and the loss covers the response tokens only. A text prompt is
  encoded as :class:`~lightning_rlhf.data.PromptDataModule` encodes PPO prompts (:mod:`lightning_rlhf.data.common`);
  the response is encoded without special tokens and followed by EOS, the token PPO's rollouts stop at. A chat prompt
  is rendered with ``add_generation_prompt=True`` and the response is the rest of the rendered conversation (the
  template's end-of-turn tokens included; EOS is appended only if the template wrote none).
- **Preference** pairs: :mod:`lightning_rlhf.data.preferences`, on the same base (:class:`ExampleDataModule`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import (
    check_counts,
    encode_text_prompts,
    is_chat,
    need_chat_template,
    pad_token_id,
    read_jsonl,
    resolve_tokenizer,
)
from lightning_rlhf.synthetic import WORLD

Row = dict[str, Any]
"""One raw example: ``{"prompt": text or messages, "response": text}`` or ``{"prompt", "chosen", "rejected"}``."""


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


class EncodedRows(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def check_row(row: Any, label: str, fields: tuple[str, ...], option: str, number_field: str | None = None) -> None:
    """``fields`` = the prompt, then text fields; ``number_field`` (if any) must hold a number."""
    required = fields + (() if number_field is None else (number_field,))
    if not isinstance(row, dict) or any(f not in row for f in required):
        raise ValueError(f"data.{option}: row {label} must be an object with the fields {', '.join(required)}.")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        if not is_chat(prompt):
            raise ValueError(
                f'data.{option}: row {label}: a chat prompt is a non-empty list of {{"role": str, "content": str}}.'
            )
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"data.{option}: row {label}: the prompt must be non-empty text or a list of chat messages.")
    for name in fields[1:]:
        if not isinstance(row[name], str) or not row[name].strip():
            raise ValueError(f"data.{option}: row {label}: {name!r} must be non-empty text.")
    if number_field is not None:
        value = row[number_field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"data.{option}: row {label}: {number_field!r} must be a number, got {value!r}.")


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


class ExampleDataModule(LightningDataModule):
    """Loading, validation, the validation split and the loaders shared by the SFT and preference data modules."""

    option: str
    """Name of the source argument (``examples`` or ``pairs``), for messages."""
    fields: tuple[str, ...]
    """Text fields every row must have, the prompt first."""
    number_field: str | None = None
    """A numeric field every row must have, if any."""
    count_option: str
    """Name of the synthetic row count argument, for messages."""

    def __init__(
        self,
        source: str | list[Row] | None,
        synthetic: bool,
        num_examples: int,
        val_fraction: float,
        batch_size: int,
        max_length: int,
        shuffle: bool,
        num_workers: int,
        seed: int,
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        super().__init__()
        if (source is None) == (not synthetic):
            raise ValueError(
                f"give exactly one of data.{self.option} (a .jsonl file or a list) or data.synthetic=true."
            )
        check_counts(
            **{self.count_option: num_examples}, batch_size=batch_size, max_length=max_length, num_workers=num_workers
        )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        self.source = source
        self.synthetic = synthetic
        self.num_examples = num_examples
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.max_length = max_length
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self._train: EncodedRows | None = None
        self._val: EncodedRows | None = None
        self._pad_token_id = 0

    # Subclasses define how rows are generated, encoded and collated.
    def _synthetic_rows(self) -> list[Row]:
        raise NotImplementedError

    def _encode(self, row: Row, label: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        raise NotImplementedError

    def _collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        raise NotImplementedError

    @property
    def train_rows(self) -> EncodedRows:
        """The encoded training rows (after ``setup``)."""
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet; the data loads there.")
        return self._train

    @property
    def val_rows(self) -> EncodedRows:
        """The encoded validation rows (after ``setup``; empty when ``val_fraction`` is 0)."""
        self.train_rows  # noqa: B018  (raises before setup)
        assert self._val is not None
        return self._val

    def _raw_rows(self) -> tuple[list[Row], list[str]]:
        if self.synthetic:
            rows = self._synthetic_rows()
            return rows, [f"synthetic[{i}]" for i in range(len(rows))]
        if isinstance(self.source, str | Path):
            return read_jsonl(Path(self.source), self.option)
        if not isinstance(self.source, list | tuple):
            raise ValueError(f"data.{self.option} must be a .jsonl path or a list, got {type(self.source).__name__}.")
        return list(self.source), [f"{self.option}[{i}]" for i in range(len(self.source))]

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, tokenize and split every row (once; later calls do nothing).

        Raises:
            ValueError: naming the ``data.*`` field and the row, for a missing file, a malformed row, a chat prompt
                without a chat template, an over-long row under ``truncation="error"``, or fewer training rows than
                ``batch_size``.
        """
        if self._train is not None:
            return
        tokenizer = resolve_tokenizer(self)
        rows, labels = self._raw_rows()
        if not rows:
            raise ValueError(f"data.{self.option}: no rows found in {self.source!r}.")
        for row, label in zip(rows, labels, strict=True):
            check_row(row, label, self.fields, self.option, self.number_field)
        items = [self._encode(row, label, tokenizer) for row, label in zip(rows, labels, strict=True)]
        order = list(range(len(items)))
        random.Random(self.seed).shuffle(order)
        num_val = round(len(items) * self.val_fraction)
        self._val = EncodedRows([items[i] for i in sorted(order[:num_val])])
        self._train = EncodedRows([items[i] for i in sorted(order[num_val:])])
        if len(self._train) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self._train)} training rows; lower "
                f"data.batch_size or data.val_fraction, or add rows."
            )
        if self.val_fraction > 0 and not len(self._val):
            raise ValueError(f"data.val_fraction={self.val_fraction} of {len(items)} rows holds out no row; raise it.")
        self._pad_token_id = pad_token_id(tokenizer)

    def _too_long(self, label: str, length: int, fix: str) -> ValueError:
        return ValueError(
            f"data.{self.option}: row {label} has {length} tokens, more than data.max_length={self.max_length}; raise "
            f"data.max_length, shorten the row, or {fix}."
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches."""
        return DataLoader(
            self.train_rows,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            collate_fn=self._collator(),
            generator=torch.Generator().manual_seed(self.seed) if self.shuffle else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order; an empty list (no validation) when ``val_fraction`` is 0."""
        if not len(self.val_rows):
            return []
        return DataLoader(
            self.val_rows, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self._collator()
        )


class SFTDataModule(ExampleDataModule):
    """(prompt, response) examples for supervised fine-tuning, served as right-padded batches.

    Each batch is ``{"input_ids": (B, L) long, "attention_mask": (B, L) bool (True = real token), "loss_mask": (B, L)
    bool (True = response token, the ones the loss trains)}``.

    Args:
        examples: a .jsonl file with ``{"prompt": text or chat messages, "response": text}`` per line, or an inline
            list of such objects.
        synthetic: use the synthetic world's demonstrations (:meth:`SyntheticWorld.demonstrations`) instead.
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
    fields = ("prompt", "response")

    def __init__(
        self,
        examples: str | list[Row] | None = None,
        synthetic: bool = False,
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
        )
        self.truncation = truncation

    def _synthetic_rows(self) -> list[Row]:
        return WORLD.demonstrations(self.num_examples, self.seed)

    def _encode(self, row: Row, label: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        if isinstance(row["prompt"], list):
            need_chat_template(tokenizer, label, self.option)
        prompt_ids, response_ids = encode_sft_example(row["prompt"], row["response"], tokenizer)
        length = len(prompt_ids) + len(response_ids)
        if length > self.max_length:
            if self.truncation == "error" or len(prompt_ids) >= self.max_length:
                raise self._too_long(label, length, "set data.truncation=right (the prompt must fit)")
            response_ids = response_ids[: self.max_length - len(prompt_ids)]
        if not prompt_ids:
            raise ValueError(f"data.{self.option}: row {label}: the prompt encodes to no tokens.")
        return {"prompt_ids": prompt_ids, "response_ids": response_ids}

    def _collator(self) -> SFTCollator:
        return SFTCollator(self._pad_token_id)
