"""Prompt data for PPO: load, tokenize and validate every prompt up front, then serve left-padded batches.

Sources: a ``.jsonl`` file (a ``"prompt"`` field per line: text, or a list of chat messages), a ``.txt`` file (one
prompt per line, kept verbatim, trailing spaces included), an inline Python list, or a built-in task
(:mod:`lightning_rlhf.tasks`).

**Prompt fields.** Every other field of a ``.jsonl`` row (``{"prompt": ..., "answer": "42", "level": 3}``) travels
with its prompt: batches carry them as ``"fields": {name: [one value per prompt]}``, and the reward receives those it
names, one value per response (:func:`lightning_rlhf.rewards.call_reward`). Only the fields every row has travel
(a field some rows lack is left out, with a warning).

Tokenization, chosen so the policy continues the prompt rather than a finished sequence:

- **Text** is encoded with the tokenizer's special tokens minus a trailing EOS (:mod:`lightning_rlhf.data.common`).
- **Chat messages** go through ``apply_chat_template(..., add_generation_prompt=True)`` and are encoded without adding
  special tokens (the template writes its own). Rewards receive the content of the last user message as the prompt
  text, so a chat-formatted reward model can apply its own template.
- **Left truncation** (``truncation="left"``) keeps the last ``max_prompt_length`` tokens, which drops a BOS; rewards
  still see the full prompt text.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import (
    Prompt,
    check_counts,
    encode_text_prompts,
    is_chat,
    need_chat_template,
    pad_token_id,
    parse_jsonl,
    read_lines,
    resolve_tokenizer,
)
from lightning_rlhf.errors import list_rows
from lightning_rlhf.rewards import RESERVED_FIELDS
from lightning_rlhf.tasks import get_task

Fields = dict[str, list[Any]]
"""Prompt fields by name, one value per prompt row."""


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


class ResumableSampler(DistributedSampler):
    """Seeded, per-process prompt order that resumes mid-epoch.

    A ``DistributedSampler`` (so Lightning keeps it instead of wrapping it) with ``drop_last=True``: epoch ``e``
    uses the permutation seeded by ``seed + e`` (or the file order without shuffle), truncated to a multiple of the
    number of processes, and process ``rank`` takes every ``num_replicas``-th index. When ``completed_batches()``
    is non-zero at the start of an epoch (a run resumed from a mid-epoch checkpoint), that many of this process's
    batches are skipped.

    Args:
        num_samples: dataset size.
        batch_size: per-process batch size, to turn completed batches into skipped samples.
        shuffle: permute the prompts each epoch.
        seed: base seed of the permutation.
        num_replicas: number of processes.
        rank: this process.
        completed_batches: returns the number of batches of the current epoch already trained on.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        completed_batches: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.completed_batches = completed_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip = self.completed_batches() * self.batch_size if self.completed_batches is not None else 0
        return iter(indices[skip:])


class _PromptDataset(Dataset):
    def __init__(self, input_ids: list[list[int]], texts: list[str], fields: Fields) -> None:
        self.input_ids, self.texts, self.fields = input_ids, texts, fields

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = {"input_ids": self.input_ids[index], "prompt": self.texts[index], "index": index}
        if self.fields:
            row["fields"] = {name: values[index] for name, values in self.fields.items()}
        return row


def _read_prompt_file(path: Path) -> tuple[list[Any], list[str], Fields]:
    """Raw prompts of a .jsonl or .txt file, a label per prompt (``"file:line"``) for error messages, and the rows'
    other fields (:func:`_prompt_fields`; none for .txt)."""
    lines = read_lines(path, "prompts", (".jsonl", ".txt"))
    if path.suffix == ".txt":  # one prompt per line, verbatim (trailing spaces included)
        return lines, [f"{path.name}:{i}" for i in range(1, len(lines) + 1)], {}
    records, labels = parse_jsonl(lines, path.name, "prompts")
    for record, label in zip(records, labels, strict=True):
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f'data.prompts: {label} has no "prompt" field; each line needs {{"prompt": ...}}.')
    return [record["prompt"] for record in records], labels, _prompt_fields(records, labels)


def _prompt_fields(records: list[dict[str, Any]], labels: list[str]) -> Fields:
    """The fields every row has besides ``"prompt"``, as lists; none may be named like a reward argument
    (:data:`~lightning_rlhf.rewards.RESERVED_FIELDS`). A field only some rows have is left out, with a warning that
    names it and a row without it (a reward that needs it then says it is missing)."""
    names = [key for key in records[0] if key != "prompt"]
    for record in records[1:]:
        names += [key for key in record if key != "prompt" and key not in names]
    if reserved := [name for name in names if name in RESERVED_FIELDS]:
        raise ValueError(
            f"data.prompts: a row has a field named {reserved[0]!r}, a name the reward's own arguments take "
            f"({', '.join(RESERVED_FIELDS)}); rename the field."
        )
    fields: Fields = {}
    for name in names:
        lacking = [label for record, label in zip(records, labels, strict=True) if name not in record]
        if lacking:
            warnings.warn(
                f"data.prompts: field {name!r} is missing from {len(lacking)} of {len(records)} rows (first: "
                f"{lacking[0]}); only the fields every row has reach the reward, so {name!r} is left out.",
                stacklevel=3,
            )
        else:
            fields[name] = [record[name] for record in records]
    return fields


def _check_prompt(prompt: Any, label: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"data.prompts: prompt {label} is empty; remove it or give it text.")
        return
    if not is_chat(prompt):
        raise ValueError(
            f"data.prompts: prompt {label} is a {type(prompt).__name__}; a prompt is text or a non-empty list of "
            f'chat messages {{"role": str, "content": str}}.'
        )
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise ValueError(f"data.prompts: prompt {label} has no user message with content.")


def _reward_text(prompt: Prompt) -> str:
    """The prompt text rewards see: the text itself, or the content of the last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def _tokenize(prompts: list[Prompt], labels: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each prompt (not truncated), see the module docstring for the rules.

    Raises:
        ValueError: if a chat prompt is given and the tokenizer has no chat template.
    """
    chats = [(p, label) for p, label in zip(prompts, labels, strict=True) if not isinstance(p, str)]
    if chats:
        need_chat_template(tokenizer, chats[0][1], "prompts")
    text_ids = iter(encode_text_prompts([p for p in prompts if isinstance(p, str)], tokenizer))
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c, _ in chats]
    chat_ids = iter(tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else [])
    return [next(text_ids) if isinstance(p, str) else list(next(chat_ids)) for p in prompts]


class PromptDataModule(LightningDataModule):
    """Prompts for PPO rollouts, served as left-padded batches.

    Give exactly one of ``prompts`` or ``task``. All prompts are loaded, tokenized and checked in ``setup`` so a bad
    row fails before any training. Each batch is ``{"prompt_ids": (B, P) long, "prompt_mask": (B, P) bool (True =
    real token), "prompts": list[str], "prompt_index": (B,) long}``, left-padded to the longest prompt of the batch;
    ``prompt_index`` is each prompt's row in the data, which names its responses' random streams. Rows with fields of
    their own (a ``.jsonl`` row's fields beside ``"prompt"``) add ``"fields": {name: list}``, which reach the reward.

    Args:
        prompts: path of a .jsonl file (a "prompt" field per line: text or a list of chat messages; its other fields
            reach the reward) or a .txt file (one prompt per line), or an inline list of prompts.
        task: name of a built-in task (lowercase, sentiment) whose generated prompts to use instead.
        num_prompts: how many prompts to generate for ``task``.
        batch_size: prompts per rollout and per device; constant (the last incomplete batch is dropped).
        max_prompt_length: longest prompt in tokens; longer ones are an error or left-truncated (see ``truncation``).
        truncation: what to do with a prompt longer than ``max_prompt_length``: "error", or "left" to keep its last
            tokens.
        shuffle: shuffle the prompts every epoch (with a generator seeded by ``seed``; under DDP Lightning swaps in a
            DistributedSampler seeded by ``seed_everything``).
        num_workers: DataLoader worker processes.
        seed: seed of the task's prompt generator and of the shuffling order.
        tokenizer: the policy tokenizer; by default the ``tokenizer`` attribute of the LightningModule being trained.
    """

    def __init__(
        self,
        prompts: str | list[str] | list[list[dict]] | None = None,
        task: str | None = None,
        num_prompts: int = 1024,
        batch_size: int = 8,
        max_prompt_length: int = 128,
        truncation: Literal["error", "left"] = "error",
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        if (prompts is None) == (task is None):
            raise ValueError("give exactly one of data.prompts (a file or a list) or data.task (a built-in task name).")
        if task is not None:
            get_task(task)
        if truncation not in ("error", "left"):
            raise ValueError(f"data.truncation must be 'error' or 'left', got {truncation!r}.")
        check_counts(
            num_prompts=num_prompts, batch_size=batch_size, max_prompt_length=max_prompt_length, num_workers=num_workers
        )
        self.prompts = prompts
        self.task = task
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self._dataset: _PromptDataset | None = None
        self._pad_token_id = 0

    @property
    def prompt_texts(self) -> list[str]:
        """The prompt text of every row as rewards see it (available after ``setup``)."""
        return self._loaded().texts

    @property
    def prompt_fields(self) -> Fields:
        """Every row's own fields (a ``.jsonl`` row's fields but ``"prompt"``), by name (available after ``setup``)."""
        return self._loaded().fields

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        """The (possibly truncated) token ids of every row (available after ``setup``)."""
        return self._loaded().input_ids

    def _loaded(self) -> _PromptDataset:
        if self._dataset is None:
            raise RuntimeError("PromptDataModule.setup() has not run yet; prompts load there.")
        return self._dataset

    def _raw_prompts(self) -> tuple[list[Any], list[str], Fields]:
        if self.task is not None:
            prompts = get_task(self.task).prompts(self.num_prompts, self.seed)
            return prompts, [f"{self.task}[{i}]" for i in range(len(prompts))], {}
        if isinstance(self.prompts, str | Path):
            return _read_prompt_file(Path(self.prompts))
        if not isinstance(self.prompts, list | tuple):
            raise ValueError(f"data.prompts must be a path or a list, got {type(self.prompts).__name__}.")
        return list(self.prompts), [f"prompts[{i}]" for i in range(len(self.prompts))], {}

    def _fit_length(self, ids: list[list[int]], labels: list[str]) -> list[list[int]]:
        limit = self.max_prompt_length
        too_long = [f"{label} ({len(x)} tokens)" for x, label in zip(ids, labels, strict=True) if len(x) > limit]
        if too_long and self.truncation == "error":
            raise ValueError(
                f"{len(too_long)} prompts are longer than data.max_prompt_length={limit} tokens: "
                f"{list_rows(too_long)}; raise data.max_prompt_length, shorten them, or set data.truncation=left to "
                f"keep their last {limit} tokens."
            )
        return [x[-limit:] for x in ids]

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize and validate every prompt (once; later calls do nothing).

        Raises:
            ValueError: naming the ``data.*`` field and the row, for a missing or empty file, no prompts, an empty or
                malformed prompt, a chat prompt without a chat template, a prompt longer than ``max_prompt_length``
                under ``truncation="error"``, or fewer prompts per device than ``batch_size``.
        """
        if self._dataset is not None:
            return
        tokenizer = resolve_tokenizer(self)
        prompts, labels, fields = self._raw_prompts()
        if not prompts:
            raise ValueError(f"data.prompts: no prompts found in {self.prompts!r}.")
        for prompt, label in zip(prompts, labels, strict=True):
            _check_prompt(prompt, label)
        ids = _tokenize(prompts, labels, tokenizer)
        if no_tokens := [label for x, label in zip(ids, labels, strict=True) if not x]:
            raise ValueError(f"data.prompts: prompt {list_rows(no_tokens)} encodes to no tokens.")
        ids = self._fit_length(ids, labels)
        self._check_batch_size(len(ids))
        self._pad_token_id = pad_token_id(tokenizer)
        self._dataset = _PromptDataset(ids, [_reward_text(p) for p in prompts], fields)

    def _check_batch_size(self, num_prompts: int) -> None:
        world_size = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        if num_prompts // world_size < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the {num_prompts} prompts"
                + (f" split over {world_size} devices" if world_size > 1 else "")
                + "; lower data.batch_size or add prompts (batches are full-size only, the remainder is dropped)."
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded), full-size, left-padded batches; see the class docstring for the batch layout.

        The sampler is a :class:`ResumableSampler`: each process gets its own share of the prompts, the order of
        epoch ``e`` depends only on ``(seed, e)``, and a run resumed mid-epoch continues with the prompts it would
        have seen next instead of replaying the epoch from its start.
        """
        dataset = self._loaded()
        self._check_batch_size(len(dataset))
        trainer = self.trainer
        sampler = ResumableSampler(
            len(dataset),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            completed_batches=self._completed_batches,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,  # constant batch size, so PPO minibatch splits always divide it
            num_workers=self.num_workers,
            collate_fn=LeftPadCollator(self._pad_token_id),
            # Its own generator: creating an iterator (every epoch, and on resume) must not draw from the global RNG
            # that sampling uses, or a resumed run would sample differently.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _completed_batches(self) -> int:
        """Batches of the current epoch already trained on (non-zero when a run resumes mid-epoch)."""
        if self.trainer is None:
            return 0
        # Lightning restores its loop progress before the training iterator is created, but not the data position.
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)
