"""What the SFT and reward-model stages share: rows loaded from any source, checked, encoded, split for validation.

Sources: a ``.jsonl`` file (one JSON object per line), an inline list of such objects, a Hugging Face dataset (a hub
id, a ``save_to_disk`` directory, local parquet / JSON / CSV / Arrow files: :mod:`lightning_rlhf.data.sources`), or
the built-in synthetic world (``synthetic: true``, :mod:`lightning_rlhf.synthetic`). A row's columns are read in TRL's
layouts (:mod:`lightning_rlhf.data.formats`: prompt + completion / response, ``messages``, explicit or implicit
preference prompts; ``*_key`` options rename them). A prompt is text or a list of chat messages ``{"role",
"content"}``; responses are text. Every row is validated and tokenized in ``setup`` (a dataset through a cached
``datasets.map``, ``num_proc`` processes), so a bad row fails before training, with its file and line (or split and
index) in the message. ``val_fraction`` holds out a seeded random share of the rows for validation.

The stages: :mod:`lightning_rlhf.data.sft` (``SFTDataModule``) and :mod:`lightning_rlhf.data.preferences`
(``PreferenceDataModule``), each an :class:`ExampleDataModule` with its own row encoder and collator.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import check_counts, is_chat, pad_token_id, read_jsonl, resolve_tokenizer
from lightning_rlhf.data.sources import DataFiles, DatasetSource, FingerprintState, RowMap, fingerprint

if TYPE_CHECKING:
    from datasets import Dataset as HFDataset

Row = dict[str, Any]
"""One raw example: ``{"prompt": text or messages, "response": text}`` or ``{"prompt", "chosen", "rejected"}``."""


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


RowEncoder = Callable[[Any, str], dict[str, Any]]
"""A stage's encoding of one raw row, given its label: read its layout, check it, tokenize it (picklable, so
``datasets.map`` can run it in ``num_proc`` processes)."""


def too_long(option: str, label: str, length: int, max_length: int, fix: str) -> ValueError:
    """The error of a row longer than ``data.max_length``."""
    return ValueError(
        f"data.{option}: row {label} has {length} tokens, more than data.max_length={max_length}; raise "
        f"data.max_length, shorten the row, or {fix}."
    )


def take(items: EncodedRows | HFDataset, indices: list[int]) -> EncodedRows | HFDataset:
    """The rows ``indices`` of encoded rows, in memory or a dataset (which selects without copying)."""
    if isinstance(items, EncodedRows):
        return EncodedRows([items[i] for i in indices])
    return items.select(indices)


class ExampleDataModule(FingerprintState, LightningDataModule):
    """Loading, validation, the validation split and the loaders shared by the SFT and preference data modules."""

    option: str
    """Name of the source argument (``examples`` or ``pairs``), for messages."""
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
        dataset: str | None = None,
        data_files: DataFiles | None = None,
        split: str = "train",
        subset: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        from_dataset = dataset is not None or data_files is not None
        if (source is not None) + synthetic + from_dataset != 1:
            raise ValueError(
                f"give exactly one of data.{self.option} (a .jsonl file or a list), data.dataset / data.data_files "
                "(a Hugging Face dataset) or data.synthetic=true."
            )
        check_counts(
            **{self.count_option: num_examples},
            batch_size=batch_size,
            max_length=max_length,
            num_workers=num_workers,
            **({} if num_proc is None else {"num_proc": num_proc}),
        )
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        self.source = source
        self.synthetic = synthetic
        self.dataset = DatasetSource(dataset, data_files, split, subset) if from_dataset else None
        self.num_proc = num_proc
        self.num_examples = num_examples
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.max_length = max_length
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self._train: EncodedRows | HFDataset | None = None
        self._val: EncodedRows | HFDataset | None = None
        self._fingerprint: str | None = None
        self._pad_token_id = 0

    # Subclasses define how rows are generated, encoded and collated.
    def _synthetic_rows(self) -> list[Row]:
        raise NotImplementedError

    def encoder(self, tokenizer: PreTrainedTokenizerBase) -> RowEncoder:
        """This stage's :data:`RowEncoder` with its settings and ``tokenizer``."""
        raise NotImplementedError

    def _collator(self) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
        raise NotImplementedError

    @property
    def train_rows(self) -> EncodedRows | HFDataset:
        """The encoded training rows (after ``setup``)."""
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet; the data loads there.")
        return self._train

    @property
    def val_rows(self) -> EncodedRows | HFDataset:
        """The encoded validation rows (after ``setup``; empty when ``val_fraction`` is 0)."""
        self.train_rows  # noqa: B018  (raises before setup)
        assert self._val is not None
        return self._val

    def describe(self) -> str:
        """The source in one phrase, for messages."""
        if self.dataset is not None:
            return self.dataset.describe()
        return "data.synthetic=true" if self.synthetic else f"data.{self.option}={self.source!r}"[:200]

    def _raw_rows(self) -> tuple[list[Row], list[str]]:
        if self.synthetic:
            rows = self._synthetic_rows()
            return rows, [f"synthetic[{i}]" for i in range(len(rows))]
        if isinstance(self.source, str | Path):
            return read_jsonl(Path(self.source), self.option)
        if not isinstance(self.source, list | tuple):
            raise ValueError(f"data.{self.option} must be a .jsonl path or a list, got {type(self.source).__name__}.")
        return list(self.source), [f"{self.option}[{i}]" for i in range(len(self.source))]

    def _encoded(self, tokenizer: PreTrainedTokenizerBase) -> EncodedRows | HFDataset:
        encode = self.encoder(tokenizer)
        if self.dataset is not None:
            rows = self.dataset.load()
            self._fingerprint = fingerprint(rows)
            return rows.map(
                RowMap(encode, self.dataset.split),
                batched=True,
                with_indices=True,
                num_proc=self.num_proc,
                remove_columns=rows.column_names,
                desc=f"Tokenizing {self.option}",
            )
        rows, labels = self._raw_rows()
        if not rows:
            raise ValueError(f"data.{self.option}: no rows found in {self.source!r}.")
        self._fingerprint = fingerprint(rows)
        return EncodedRows([encode(row, label) for row, label in zip(rows, labels, strict=True)])

    def prepare_data(self) -> None:
        """Download and tokenise a Hugging Face dataset once per machine (Lightning calls this on one process per
        node before ``setup``), so every process's ``setup`` reads the cache instead of tokenising it again."""
        if self.dataset is not None:
            self._encoded(resolve_tokenizer(self))

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, tokenize and split every row (once; later calls do nothing).

        Raises:
            ValueError: naming the ``data.*`` field and the row, for a missing file, split or column, a malformed
                row, a chat prompt without a chat template, an over-long row under ``truncation="error"``, or fewer
                training rows than ``batch_size``.
        """
        if self._train is not None:
            return
        tokenizer = resolve_tokenizer(self)
        items = self._encoded(tokenizer)
        order = list(range(len(items)))
        random.Random(self.seed).shuffle(order)
        num_val = round(len(items) * self.val_fraction)
        self._val = take(items, sorted(order[:num_val]))
        self._train = take(items, sorted(order[num_val:]))
        if len(self._train) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {len(self._train)} training rows; lower "
                f"data.batch_size or data.val_fraction, or add rows."
            )
        if self.val_fraction > 0 and not len(self._val):
            raise ValueError(f"data.val_fraction={self.val_fraction} of {len(items)} rows holds out no row; raise it.")
        self._pad_token_id = pad_token_id(tokenizer)

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
