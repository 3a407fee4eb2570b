"""PPO's prompt rows: read, check and tokenise them, and serve them as a map-style dataset.

Two backings with one row contract (``{"input_ids", "prompt", "index"[, "fields"]}``), which
:class:`LeftPadCollator` turns into batches:

- :class:`PromptRows`: Python lists, for files (``.jsonl`` / ``.txt``), inline lists and built-in tasks.
- :class:`ArrowPromptRows`: a Hugging Face dataset tokenised by :class:`PromptEncoder` through ``datasets.map``
  (cached on disk, ``num_proc`` processes) and read row by row from the memory-mapped table, so memory does not grow
  with the number of prompts or epochs.

Both check every prompt with :func:`check_prompt` and tokenise with :func:`tokenize_prompts`, the rules of
:mod:`lightning_rlhf.data.prompts`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import (
    Prompt,
    encode_text_prompts,
    is_chat,
    need_chat_template,
    parse_jsonl,
    read_lines,
)
from lightning_rlhf.data.formats import row_prompt, templated
from lightning_rlhf.errors import list_rows
from lightning_rlhf.rewards import RESERVED_FIELDS

if TYPE_CHECKING:
    from datasets import Dataset as HFDataset

Fields = dict[str, list[Any]]
"""Prompt fields by name, one value per prompt row."""
IDS_COLUMN, TEXT_COLUMN, LENGTH_COLUMN = "__prompt_ids", "__prompt_text", "__prompt_tokens"
"""The columns :class:`PromptEncoder` adds to a dataset (named so no dataset's own column clashes)."""


def read_prompt_file(path: Path) -> tuple[list[Any], list[str]]:
    """The rows of a .jsonl file (JSON objects) or a .txt file (one prompt per line, verbatim: ``{"prompt": line}``),
    and a label per row (``"file:line"``) for error messages."""
    lines = read_lines(path, "prompts", (".jsonl", ".txt"))
    if path.suffix == ".txt":  # one prompt per line, verbatim (trailing spaces included)
        return [{"prompt": line} for line in lines], [f"{path.name}:{i}" for i in range(1, len(lines) + 1)]
    records, labels = parse_jsonl(lines, path.name, "prompts")
    for record, label in zip(records, labels, strict=True):
        if not isinstance(record, dict):
            raise ValueError(f'data.prompts: {label} is not a JSON object; each line needs {{"prompt": ...}}.')
    return records, labels


def check_field_names(names: Sequence[str], option: str) -> None:
    """Refuse a prompt field named like one of the reward's own arguments (:data:`RESERVED_FIELDS`)."""
    if reserved := [name for name in names if name in RESERVED_FIELDS]:
        raise ValueError(
            f"data.{option}: a row has a field named {reserved[0]!r}, a name the reward's own arguments take "
            f"({', '.join(RESERVED_FIELDS)}); rename the field."
        )


def row_fields(records: list[dict[str, Any]], labels: list[str], prompt_column: str, option: str) -> Fields:
    """The fields every row has besides its prompt column, as lists. A field only some rows have is left out, with a
    warning that names it and a row without it (a reward that needs it then says it is missing)."""
    names = [key for key in records[0] if key != prompt_column]
    for record in records[1:]:
        names += [key for key in record if key != prompt_column and key not in names]
    check_field_names(names, option)
    fields: Fields = {}
    for name in names:
        lacking = [label for record, label in zip(records, labels, strict=True) if name not in record]
        if lacking:
            warnings.warn(
                f"data.{option}: field {name!r} is missing from {len(lacking)} of {len(records)} rows (first: "
                f"{lacking[0]}); only the fields every row has reach the reward, so {name!r} is left out.",
                stacklevel=3,
            )
        else:
            fields[name] = [record[name] for record in records]
    return fields


def check_prompt(prompt: Any, label: str, option: str = "prompts") -> None:
    """Refuse an empty text prompt, a value that is neither text nor chat messages, or a chat without a user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"data.{option}: prompt {label} is empty; remove it or give it text.")
        return
    if not is_chat(prompt):
        raise ValueError(
            f"data.{option}: prompt {label} is a {type(prompt).__name__}; a prompt is text or a non-empty list of "
            f'chat messages {{"role": str, "content": str}}.'
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise ValueError(f"data.{option}: prompt {label} has no user message with content.")


def reward_text(prompt: Prompt) -> str:
    """The prompt text rewards see: the text itself, or the content of the last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def tokenize_prompts(
    prompts: list[Prompt], labels: list[str], tokenizer: PreTrainedTokenizerBase, option: str = "prompts"
) -> list[list[int]]:
    """Token ids of each prompt (not truncated); see :mod:`lightning_rlhf.data.prompts` for the rules.

    Raises:
        ValueError: a chat prompt is given and the tokenizer has no chat template, or a prompt encodes to no tokens.
    """
    chats = [(p, label) for p, label in zip(prompts, labels, strict=True) if not isinstance(p, str)]
    if chats:
        need_chat_template(tokenizer, chats[0][1], option)
    text_ids = iter(encode_text_prompts([p for p in prompts if isinstance(p, str)], tokenizer))
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c, _ in chats]
    chat_ids = iter(tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else [])
    ids = [next(text_ids) if isinstance(p, str) else list(next(chat_ids)) for p in prompts]
    if no_tokens := [label for x, label in zip(ids, labels, strict=True) if not x]:
        raise ValueError(f"data.{option}: prompt {list_rows(no_tokens)} encodes to no tokens.")
    return ids


class LeftPadCollator:
    """Collate ``{"input_ids": list[int], "prompt": str, "index": int, "fields": dict}`` rows into a left-padded
    :class:`PromptDataModule` batch (rows without ``"index"`` give no ``prompt_index``, rows without ``"fields"`` no
    ``fields``).

    A top-level class rather than a closure so it pickles (worker processes, DDP spawn).

    Args:
        pad_token_id: the id written in padding positions (masked out, so any valid id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor | list[str]]:
        """Returns ``{"prompt_ids": (B, P) long, "prompt_mask": (B, P) bool, "prompts": list[str],
        "prompt_index": (B,) long, "fields": {name: list of B values}}``: each row's index in the dataset names its
        responses' random streams (:func:`lightning_rlhf.functional.random_streams.response_keys`)."""
        width = max(len(r["input_ids"]) for r in rows)
        prompt_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, P)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, P), True = real token
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            prompt_ids[b, width - n :] = torch.tensor(row["input_ids"], dtype=torch.long)
            prompt_mask[b, width - n :] = True
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompts": [r["prompt"] for r in rows]}
        if all("index" in r for r in rows):
            batch["prompt_index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        if rows[0].get("fields"):
            batch["fields"] = {name: [r["fields"][name] for r in rows] for name in rows[0]["fields"]}
        return batch


class PromptRows(Dataset):
    """Prompt rows held in Python lists (files, inline lists, tasks): token ids, reward texts and fields."""

    def __init__(self, input_ids: list[list[int]], texts: list[str], fields: Fields) -> None:
        self.input_ids, self.texts, self.fields = input_ids, texts, fields

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = {"input_ids": self.input_ids[index], "prompt": self.texts[index], "index": index}
        if self.fields:
            row["fields"] = {name: values[index] for name, values in self.fields.items()}
        return row


class PromptEncoder:
    """The ``datasets.map`` function (batched, with indices) that checks and tokenises a dataset's prompts.

    Adds :data:`IDS_COLUMN` (token ids, not truncated), :data:`TEXT_COLUMN` (the text rewards see) and
    :data:`LENGTH_COLUMN` (the token count). A class, not a closure, so it pickles to ``num_proc`` workers and
    ``datasets`` fingerprints it by its settings and tokenizer (a changed template or tokenizer re-tokenises).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_key: str,
        template: str | None,
        as_chat: bool,
        system_prompt: str | None,
        split: str,
    ) -> None:
        self.tokenizer, self.prompt_key, self.split = tokenizer, prompt_key, split
        self.template, self.as_chat, self.system_prompt = template, as_chat, system_prompt

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        labels = [f"{self.split}[{i}]" for i in indices]
        prompts = []
        for row, label in zip(rows, labels, strict=True):
            prompt = templated(
                row_prompt(row, self.prompt_key, label, "dataset"), self.template, self.as_chat, self.system_prompt
            )
            check_prompt(prompt, label, "dataset")
            prompts.append(prompt)
        ids = tokenize_prompts(prompts, labels, self.tokenizer, "dataset")
        return {IDS_COLUMN: ids, TEXT_COLUMN: [reward_text(p) for p in prompts], LENGTH_COLUMN: [len(x) for x in ids]}


class ArrowPromptRows(Dataset):
    """Prompt rows read one at a time from a dataset :class:`PromptEncoder` has tokenised (memory-mapped).

    Args:
        rows: the encoded dataset (its prompt column removed).
        field_names: the columns that travel as prompt fields.
        max_prompt_length: token ids are cut to their last ``max_prompt_length`` (already checked to fit, unless
            ``truncation="left"``).
    """

    def __init__(self, rows: HFDataset, field_names: list[str], max_prompt_length: int) -> None:
        self.rows, self.field_names, self.max_prompt_length = rows, field_names, max_prompt_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.rows[index]
        row = {"input_ids": record[IDS_COLUMN][-self.max_prompt_length :], "prompt": record[TEXT_COLUMN]}
        row["index"] = index
        if self.field_names:
            row["fields"] = {name: record[name] for name in self.field_names}
        return row

    @property
    def input_ids(self) -> list[list[int]]:
        """Every row's token ids (reads the whole column)."""
        return [ids[-self.max_prompt_length :] for ids in self.rows[IDS_COLUMN]]

    @property
    def texts(self) -> list[str]:
        """Every row's reward text (reads the whole column)."""
        return list(self.rows[TEXT_COLUMN])

    @property
    def fields(self) -> Fields:
        """Every row's fields by name (reads the whole columns)."""
        return {name: list(self.rows[name]) for name in self.field_names}

    def lengths(self) -> np.ndarray:
        """(N,) every row's token count before truncation, read from the table without building the rows."""
        return self.rows.data.column(LENGTH_COLUMN).to_numpy()
