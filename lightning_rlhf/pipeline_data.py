"""Data for the SFT and reward-model stages: (prompt, response) examples and (prompt, chosen, rejected) pairs.

Sources: a ``.jsonl`` file (one JSON object per line), an inline list of such objects, or the built-in synthetic world
(``synthetic: true``, :mod:`lightning_rlhf.synthetic`). A prompt is text or a list of chat messages
``{"role", "content"}``; responses are text. Every row is validated and tokenized in ``setup``, so a bad row fails
before training, with its file and line in the message. ``val_fraction`` holds out a seeded random share of the rows
for validation.

Tokenization, chosen so each stage sees exactly what the next one will:

- **SFT** tokenizes prompt and response separately and the loss covers the response tokens only. A text prompt is
  encoded as :class:`~lightning_rlhf.data.PromptDataModule` encodes PPO prompts (special tokens, minus a trailing EOS);
  the response is encoded without special tokens and followed by EOS, the token PPO's rollouts stop at. A chat prompt
  is rendered with ``add_generation_prompt=True`` and the response is the rest of the rendered conversation (the
  template's end-of-turn tokens included; EOS is appended only if the template wrote none).
- **Preference** pairs are encoded exactly as :class:`~lightning_rlhf.rewards.RewardModelScorer` encodes PPO's
  (prompt, response) pairs: text as ``prompt + response`` with the tokenizer's special tokens, chat as the rendered
  conversation ``prompt messages + assistant response`` without added special tokens (score it in PPO with
  ``use_chat_template: true``; the scorer sees only the last user message, so keep such prompts single-turn).
  Over-long sequences keep their last ``max_length`` tokens, as the scorer does, when ``truncation="left"``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data import _appends_eos
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


class PreferenceCollator:
    """Right-pad ``{"chosen_ids", "rejected_ids"[, "margin"]}`` rows into a :class:`PreferenceDataModule` batch.

    Chosen and rejected rows are padded to one common width, so a module can score them in one forward pass.

    Args:
        pad_token_id: the id written in padding positions; use the reward model's ``config.pad_token_id``, since its
            head reads the score at the last token that is not this id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Returns ``chosen_ids``, ``chosen_mask``, ``rejected_ids``, ``rejected_mask``, each (B, L), and ``margin``
        (B,) float32 when the rows have one."""
        width = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
        batch: dict[str, Tensor] = {}
        for side in ("chosen", "rejected"):
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, L)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, L), True = real token
            for b, row in enumerate(rows):
                n = len(row[f"{side}_ids"])
                ids[b, :n] = torch.tensor(row[f"{side}_ids"], dtype=torch.long)
                mask[b, :n] = True
            batch[f"{side}_ids"], batch[f"{side}_mask"] = ids, mask
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)  # (B,)
        return batch


class _Encoded(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _read_jsonl(path: Path, option: str) -> tuple[list[Row], list[str]]:
    if not path.is_file():
        raise ValueError(f"data.{option}: file {str(path)!r} does not exist.")
    if path.suffix != ".jsonl":
        raise ValueError(f"data.{option}: {str(path)!r} must be a .jsonl file (one JSON object per line).")
    rows, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"data.{option}: {path.name}:{i} is not valid JSON ({err}).") from err
        labels.append(f"{path.name}:{i}")
    return rows, labels


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list)


def _check_row(row: Any, label: str, fields: tuple[str, ...], option: str, number_field: str | None = None) -> None:
    """``fields`` = the prompt, then text fields; ``number_field`` (if any) must hold a number."""
    required = fields + (() if number_field is None else (number_field,))
    if not isinstance(row, dict) or any(f not in row for f in required):
        raise ValueError(f"data.{option}: row {label} must be an object with the fields {', '.join(required)}.")
    prompt = row["prompt"]
    if _is_chat(prompt):
        messages_ok = prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
        if not messages_ok:
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


def _need_chat_template(tokenizer: PreTrainedTokenizerBase, label: str, option: str) -> None:
    if not tokenizer.chat_template:
        raise ValueError(
            f"data.{option}: row {label} has a chat prompt but the tokenizer has no chat template; set "
            f"tokenizer.chat_template or give the prompts as text."
        )


def encode_sft_example(
    prompt: str | list[dict[str, str]], response: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one SFT example; see the module docstring for the rules.

    Raises:
        ValueError: the chat template renders the conversation so that it does not start with the rendered prompt.
    """
    eos = tokenizer.eos_token_id
    if _is_chat(prompt):
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
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if _appends_eos(tokenizer):
        prompt_ids = prompt_ids[:-1]
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids, response_ids + ([] if eos is None else [eos])


def encode_scored_text(
    prompt: str | list[dict[str, str]], response: str, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Token ids of (prompt, response) exactly as :class:`~lightning_rlhf.rewards.RewardModelScorer` encodes them."""
    if _is_chat(prompt):
        text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])


class _ExampleDataModule(LightningDataModule):
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
        for field, value in ((self.count_option, num_examples), ("batch_size", batch_size), ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"data.{field} must be >= 1, got {value}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
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
        self._train: _Encoded | None = None
        self._val: _Encoded | None = None
        self._pad_token_id = 0

    # Subclasses define how rows are generated, encoded and collated.
    def _synthetic_rows(self) -> list[Row]:
        raise NotImplementedError

    def _encode(self, row: Row, label: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        raise NotImplementedError

    def _collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        raise NotImplementedError

    @property
    def train_rows(self) -> _Encoded:
        """The encoded training rows (after ``setup``)."""
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet; the data loads there.")
        return self._train

    @property
    def val_rows(self) -> _Encoded:
        """The encoded validation rows (after ``setup``; empty when ``val_fraction`` is 0)."""
        self.train_rows  # noqa: B018  (raises before setup)
        assert self._val is not None
        return self._val

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        tokenizer = getattr(getattr(self.trainer, "lightning_module", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer: pass tokenizer=... or train a LightningModule that has a "
                "`tokenizer` attribute after __init__."
            )
        return tokenizer

    def _raw_rows(self) -> tuple[list[Row], list[str]]:
        if self.synthetic:
            rows = self._synthetic_rows()
            return rows, [f"synthetic[{i}]" for i in range(len(rows))]
        if isinstance(self.source, str | Path):
            return _read_jsonl(Path(self.source), self.option)
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
        tokenizer = self._resolve_tokenizer()
        rows, labels = self._raw_rows()
        if not rows:
            raise ValueError(f"data.{self.option}: no rows found in {self.source!r}.")
        for row, label in zip(rows, labels, strict=True):
            _check_row(row, label, self.fields, self.option, self.number_field)
        items = [self._encode(row, label, tokenizer) for row, label in zip(rows, labels, strict=True)]
        order = list(range(len(items)))
        random.Random(self.seed).shuffle(order)
        num_val = round(len(items) * self.val_fraction)
        self._val = _Encoded([items[i] for i in sorted(order[:num_val])])
        self._train = _Encoded([items[i] for i in sorted(order[num_val:])])
        if len(self._train) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self._train)} training rows; lower "
                f"data.batch_size or data.val_fraction, or add rows."
            )
        if self.val_fraction > 0 and not len(self._val):
            raise ValueError(f"data.val_fraction={self.val_fraction} of {len(items)} rows holds out no row; raise it.")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_token_id = 0 if pad is None else pad

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


class SFTDataModule(_ExampleDataModule):
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
        if _is_chat(row["prompt"]):
            _need_chat_template(tokenizer, label, self.option)
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


class PreferenceDataModule(_ExampleDataModule):
    """(prompt, chosen, rejected) preference pairs for reward-model training, served as right-padded batches.

    Each batch is ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}``, each (B, L) with one common L
    (masks bool, True = real token), plus ``"margin"`` (B,) float32 when ``margin_key`` is set.

    Args:
        pairs: a .jsonl file with ``{"prompt": text or chat messages, "chosen": text, "rejected": text}`` per line,
            or an inline list of such objects.
        synthetic: use the synthetic world's pairs (:meth:`SyntheticWorld.preference_pairs`) instead.
        num_pairs: how many synthetic pairs to generate.
        label_noise: share of synthetic pairs whose label is flipped (the worse response marked chosen).
        margin_key: a numeric field of every row used as the Bradley-Terry target margin (Llama 2); None = no margin.
        val_fraction: share of the pairs held out for validation (``val/accuracy``); 0 turns validation off.
        batch_size: pairs per batch and per device.
        max_length: longest prompt + response in tokens.
        truncation: what to do with a longer sequence: ``"error"``, or ``"left"`` to keep its last ``max_length``
            tokens (as ``RewardModelScorer`` does when scoring).
        shuffle: shuffle the training pairs every epoch (seeded by ``seed``).
        num_workers: DataLoader worker processes.
        seed: seed of the synthetic data, the validation split and the shuffling.
        tokenizer: the reward model's tokenizer; by default the ``tokenizer`` attribute of the LightningModule.
    """

    option = "pairs"
    count_option = "num_pairs"
    fields = ("prompt", "chosen", "rejected")

    def __init__(
        self,
        pairs: str | list[Row] | None = None,
        synthetic: bool = False,
        num_pairs: int = 2048,
        label_noise: float = 0.1,
        margin_key: str | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        max_length: int = 512,
        truncation: Literal["error", "left"] = "error",
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if truncation not in ("error", "left"):
            raise ValueError(f"data.truncation must be 'error' or 'left', got {truncation!r}.")
        if not 0 <= label_noise < 0.5:
            raise ValueError(f"data.label_noise must be in [0, 0.5), got {label_noise}.")
        if synthetic and margin_key is not None:
            raise ValueError("data.margin_key needs data.pairs with that field; synthetic pairs have no margin.")
        super().__init__(
            pairs, synthetic, num_pairs, val_fraction, batch_size, max_length, shuffle, num_workers, seed, tokenizer
        )
        self.label_noise = label_noise
        self.margin_key = margin_key
        self.truncation = truncation
        self.number_field = margin_key

    def _synthetic_rows(self) -> list[Row]:
        return WORLD.preference_pairs(self.num_examples, self.seed, self.label_noise)

    def _encode(self, row: Row, label: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        if _is_chat(row["prompt"]):
            _need_chat_template(tokenizer, label, self.option)
        item: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            ids = encode_scored_text(row["prompt"], row[side], tokenizer)
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise self._too_long(f"{label} ({side})", len(ids), "set data.truncation=left")
                ids = ids[-self.max_length :]
            item[f"{side}_ids"] = ids
        if self.margin_key is not None:
            item["margin"] = float(row[self.margin_key])
        return item

    def _collator(self) -> PreferenceCollator:
        return PreferenceCollator(self._pad_token_id)
