"""Prompt data for PPO: load, tokenize and validate every prompt up front, then serve left-padded batches.

Sources: a ``.jsonl`` file (a ``"prompt"`` field per line: text, or a list of chat messages), a ``.txt`` file (one
prompt per line, kept verbatim, trailing spaces included), an inline Python list (prompts, or rows
``{"prompt": ..., **fields}``), a built-in task (:mod:`lightning_rlhf.tasks`), or a Hugging Face dataset (a hub id,
a ``save_to_disk`` directory or local parquet / JSON / CSV / Arrow files: :mod:`lightning_rlhf.data.sources`), whose
``prompt`` column (``prompt_key``) or ``messages`` conversation is the prompt (:mod:`lightning_rlhf.data.formats`).

**Prompt fields.** Every other field of a row (``{"prompt": ..., "answer": "42", "level": 3}``, a dataset's other
columns, a task's answers) travels with its prompt: batches carry them as ``"fields": {name: [one value per
prompt]}``, and the reward receives those it names, one value per response (:func:`lightning_rlhf.rewards.call_reward`).
Only the fields every row has travel (a field some rows lack is left out, with a warning).

Tokenization, chosen so the policy continues the prompt rather than a finished sequence:

- **Text** is encoded with the tokenizer's special tokens minus a trailing EOS (:mod:`lightning_rlhf.data.common`).
- **Chat messages** go through ``apply_chat_template(..., add_generation_prompt=True)`` and are encoded without adding
  special tokens (the template writes its own). Rewards receive the content of the last user message as the prompt
  text, so a chat-formatted reward model can apply its own template. ``apply_chat_template: true`` makes every text
  prompt a user message (after ``system_prompt``, if given); ``prompt_template`` rewrites the text first.
- **Left truncation** (``truncation="left"``) keeps the last ``max_prompt_length`` tokens, which drops a BOS; rewards
  still see the full prompt text.

A dataset is tokenised once by ``datasets.map`` (``num_proc`` processes, cached on disk: a second run reads the
cache) and read row by row from its memory-mapped table. Checkpoints store the rows' fingerprint; resuming over
different rows warns, naming them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import check_counts, pad_token_id, resolve_tokenizer
from lightning_rlhf.data.formats import prompt_columns, row_prompt, templated
from lightning_rlhf.data.prompt_rows import (
    ArrowPromptRows,
    Fields,
    LeftPadCollator,
    PromptEncoder,
    PromptRows,
    check_field_names,
    check_prompt,
    read_prompt_file,
    reward_text,
    row_fields,
    tokenize_prompts,
)
from lightning_rlhf.data.sources import DataFiles, DatasetSource, FingerprintState, check_columns, fingerprint
from lightning_rlhf.errors import list_rows
from lightning_rlhf.tasks import get_task


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


class PromptDataModule(FingerprintState, LightningDataModule):
    """Prompts for PPO rollouts, served as left-padded batches.

    Give exactly one source: ``prompts``, ``task``, or a Hugging Face dataset (``dataset`` and/or ``data_files``).
    All prompts are loaded, tokenized and checked in ``setup`` so a bad row fails before any training. Each batch is
    ``{"prompt_ids": (B, P) long, "prompt_mask": (B, P) bool (True = real token), "prompts": list[str],
    "prompt_index": (B,) long}``, left-padded to the longest prompt of the batch; ``prompt_index`` is each prompt's
    row in the data, which names its responses' random streams. Rows with fields of their own (every column but the
    prompt) add ``"fields": {name: list}``, which reach the reward.

    Args:
        prompts: path of a .jsonl file (a "prompt" field per line: text or a list of chat messages; its other fields
            reach the reward) or a .txt file (one prompt per line), or an inline list of prompts or of rows
            ``{"prompt": ..., **fields}``.
        task: name of a built-in task (lowercase, sentiment, arithmetic) whose generated prompts to use instead.
        dataset: a Hugging Face dataset: a hub id (``openai/gsm8k``), a ``save_to_disk`` directory, or the builder
            of ``data_files`` (``parquet``, ``json``, ``csv``, ``arrow``).
        data_files: local dataset files (a path, a list, or paths by split); the extension names the format.
        split: the dataset split (``train``, ``test``, ``train[:1000]``).
        subset: the dataset's configuration name (``load_dataset(name=...)``), e.g. ``main`` for GSM8K.
        prompt_key: the column (or row field) holding the prompt; without it a ``messages`` column is used, up to its
            last user turn. Every other column is a prompt field.
        prompt_template: rewrites each prompt's text (a chat prompt's last user message): ``{prompt}`` is replaced by
            it, e.g. ``"{prompt} Put the final answer in \\boxed{}."``.
        apply_chat_template: make each text prompt a user message, rendered by the tokenizer's chat template (for
            instruct models).
        system_prompt: with ``apply_chat_template``, a system message before each prompt.
        num_proc: processes that tokenise a dataset (``datasets.map``); None = this process.
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
        prompts: str | list[str] | list[list[dict]] | list[dict] | None = None,
        task: str | None = None,
        dataset: str | None = None,
        data_files: DataFiles | None = None,
        split: str = "train",
        subset: str | None = None,
        prompt_key: str = "prompt",
        prompt_template: str | None = None,
        apply_chat_template: bool = False,
        system_prompt: str | None = None,
        num_proc: int | None = None,
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
        from_dataset = dataset is not None or data_files is not None
        if (prompts is not None) + (task is not None) + from_dataset != 1:
            raise ValueError(
                "give exactly one of data.prompts (a file or a list), data.task (a built-in task name) or "
                "data.dataset / data.data_files (a Hugging Face dataset)."
            )
        if task is not None:
            get_task(task)
        if truncation not in ("error", "left"):
            raise ValueError(f"data.truncation must be 'error' or 'left', got {truncation!r}.")
        if system_prompt is not None and not apply_chat_template:
            raise ValueError("data.system_prompt needs data.apply_chat_template=true (it is a chat message).")
        check_counts(
            num_prompts=num_prompts,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            num_workers=num_workers,
            **({} if num_proc is None else {"num_proc": num_proc}),
        )
        self.prompts = prompts
        self.task = task
        self.source = DatasetSource(dataset, data_files, split, subset) if from_dataset else None
        self.prompt_key = prompt_key
        self.prompt_template = prompt_template
        self.apply_chat_template = apply_chat_template
        self.system_prompt = system_prompt
        self.num_proc = num_proc
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = tokenizer
        self._dataset: PromptRows | ArrowPromptRows | None = None
        self._fingerprint: str | None = None
        self._pad_token_id = 0

    @property
    def prompt_texts(self) -> list[str]:
        """The prompt text of every row as rewards see it (available after ``setup``)."""
        return self._loaded().texts

    @property
    def prompt_fields(self) -> Fields:
        """Every row's own fields (all but the prompt), by name (available after ``setup``)."""
        return self._loaded().fields

    @property
    def prompt_token_ids(self) -> list[list[int]]:
        """The (possibly truncated) token ids of every row (available after ``setup``)."""
        return self._loaded().input_ids

    @property
    def rows(self) -> PromptRows | ArrowPromptRows:
        """The loaded prompt rows, a map-style dataset (available after ``setup``)."""
        return self._loaded()

    def _loaded(self) -> PromptRows | ArrowPromptRows:
        if self._dataset is None:
            raise RuntimeError("PromptDataModule.setup() has not run yet; prompts load there.")
        return self._dataset

    def describe(self) -> str:
        """The prompt source in one phrase, for messages."""
        if self.source is not None:
            return self.source.describe()
        return f"data.task={self.task!r}" if self.task is not None else f"data.prompts={self.prompts!r}"[:200]

    def _raw_rows(self) -> tuple[list[Any], list[str]]:
        """The source's rows: dicts with the prompt under ``prompt_key`` (and fields), or bare prompts."""
        if self.task is not None:
            rows = get_task(self.task).rows(self.num_prompts, self.seed)
            return rows, [f"{self.task}[{i}]" for i in range(len(rows))]
        if isinstance(self.prompts, str | Path):
            return read_prompt_file(Path(self.prompts))
        if not isinstance(self.prompts, list | tuple):
            raise ValueError(f"data.prompts must be a path or a list, got {type(self.prompts).__name__}.")
        return list(self.prompts), [f"prompts[{i}]" for i in range(len(self.prompts))]

    def _check_lengths(self, lengths: np.ndarray, labels: Callable[[int], str]) -> None:
        limit = self.max_prompt_length
        if self.truncation == "error" and len(too_long := np.flatnonzero(lengths > limit)):
            rows = [f"{labels(int(i))} ({int(lengths[i])} tokens)" for i in too_long[:8]]
            raise ValueError(
                f"{len(too_long)} prompts are longer than data.max_prompt_length={limit} tokens: "
                f"{list_rows(rows)}; raise data.max_prompt_length, shorten them, or set data.truncation=left to "
                f"keep their last {limit} tokens."
            )

    def _load_rows(self, tokenizer: PreTrainedTokenizerBase) -> PromptRows:
        rows, labels = self._raw_rows()
        if not rows:
            raise ValueError(f"data.prompts: no prompts found in {self.describe()}.")
        records = [row for row in rows if isinstance(row, dict)]
        if records and len(records) != len(rows):
            raise ValueError('data.prompts: give every row as {"prompt": ..., **fields} or none of them.')
        self._fingerprint = fingerprint(rows)  # the rows as given: a changed template or key is not a changed dataset
        if records:
            rows = [row_prompt(row, self.prompt_key, label, "prompts") for row, label in zip(rows, labels, strict=True)]
        prompts = [templated(p, self.prompt_template, self.apply_chat_template, self.system_prompt) for p in rows]
        for prompt, label in zip(prompts, labels, strict=True):
            check_prompt(prompt, label)
        column = prompt_columns(list(records[0]), self.prompt_key) if records else self.prompt_key
        fields = row_fields(records, labels, column, "prompts") if records else {}
        ids = tokenize_prompts(prompts, labels, tokenizer)
        self._check_lengths(np.array([len(x) for x in ids]), labels.__getitem__)
        return PromptRows([x[-self.max_prompt_length :] for x in ids], [reward_text(p) for p in prompts], fields)

    def _load_dataset(self, tokenizer: PreTrainedTokenizerBase) -> ArrowPromptRows:
        assert self.source is not None
        rows = self.source.load()
        column = prompt_columns(rows.column_names, self.prompt_key)
        check_columns(rows, {column: "prompt_key"}, self.source)
        fields = [name for name in rows.column_names if name != column]
        check_field_names(fields, "dataset")
        self._fingerprint = fingerprint(rows)
        encoder = PromptEncoder(
            tokenizer,
            self.prompt_key,
            self.prompt_template,
            self.apply_chat_template,
            self.system_prompt,
            self.source.split,
        )
        encoded = rows.map(
            encoder,
            batched=True,
            with_indices=True,
            num_proc=self.num_proc,
            remove_columns=[column],
            desc="Tokenizing prompts",
        )
        dataset = ArrowPromptRows(encoded, fields, self.max_prompt_length)
        self._check_lengths(dataset.lengths(), lambda i: f"{self.source.split}[{i}]")
        return dataset

    def prepare_data(self) -> None:
        """Download and tokenise a Hugging Face dataset once per machine (Lightning calls this on one process per
        node before ``setup``), so every process's ``setup`` reads the cache instead of tokenising it again."""
        if self.source is not None:
            self._load_dataset(resolve_tokenizer(self))

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize and validate every prompt (once; later calls do nothing).

        Raises:
            ValueError: naming the ``data.*`` field and the row, for a missing or empty file or split, a missing
                column, no prompts, an empty or malformed prompt, a chat prompt without a chat template, a prompt
                longer than ``max_prompt_length`` under ``truncation="error"``, or fewer prompts per device than
                ``batch_size``.
        """
        if self._dataset is not None:
            return
        tokenizer = resolve_tokenizer(self)
        dataset = self._load_dataset(tokenizer) if self.source is not None else self._load_rows(tokenizer)
        self._check_batch_size(len(dataset))
        self._pad_token_id = pad_token_id(tokenizer)
        self._dataset = dataset

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
