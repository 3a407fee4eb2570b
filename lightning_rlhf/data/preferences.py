"""Preference pairs for the reward-model stage: (prompt, chosen, rejected), with an optional margin per pair.

Pairs are encoded exactly as :class:`~lightning_rlhf.rewards.RewardModelScorer` encodes PPO's (prompt, response)
pairs (:func:`~lightning_rlhf.rewards.encode_scored_texts`): text as ``prompt + response`` with the tokenizer's special
tokens, chat as the rendered conversation ``prompt messages + assistant response`` without added special tokens (score
it in PPO with ``use_chat_template: true``; the scorer sees only the last user message, so keep such prompts
single-turn). Over-long sequences keep their last ``max_length`` tokens, as the scorer does, when
``truncation="left"``. Loading, validation and the validation split are those of
:class:`~lightning_rlhf.data.examples.ExampleDataModule`; a row's layout (explicit or implicit prompt, text or
conversational) is read by :func:`~lightning_rlhf.data.formats.preference_row`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.common import need_chat_template
from lightning_rlhf.data.examples import ExampleDataModule, Row, check_row, too_long
from lightning_rlhf.data.formats import preference_row
from lightning_rlhf.data.sources import DataFiles
from lightning_rlhf.rewards.scorer import encode_scored_texts
from lightning_rlhf.synthetic import WORLD


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


class PreferenceEncoder:
    """:data:`~lightning_rlhf.data.examples.RowEncoder` of preference pairs: the row's layout, its check, then the
    scorer's encoding of both sides with ``max_length`` applied (and the margin, when ``margin_key`` is set)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        keys: tuple[str, str, str],
        margin_key: str | None,
        max_length: int,
        truncation: str,
        option: str,
    ) -> None:
        self.tokenizer, self.keys, self.margin_key = tokenizer, keys, margin_key
        self.max_length, self.truncation, self.option = max_length, truncation, option

    def __call__(self, row: Any, label: str) -> dict[str, Any]:
        fields = ("prompt", "chosen", "rejected")
        if not isinstance(row, dict):
            check_row(row, label, fields, self.option)  # raises: not an object
        row = preference_row(row, *self.keys, label, self.option)
        check_row(row, label, fields, self.option, self.margin_key)
        if isinstance(row["prompt"], list):
            need_chat_template(self.tokenizer, label, self.option)
        item: dict[str, Any] = {}
        chosen, rejected = encode_scored_texts([row["prompt"]] * 2, [row["chosen"], row["rejected"]], self.tokenizer)
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise too_long(
                        self.option, f"{label} ({side})", len(ids), self.max_length, "set data.truncation=left"
                    )
                ids = ids[-self.max_length :]
            item[f"{side}_ids"] = ids
        if self.margin_key is not None:
            item["margin"] = float(row[self.margin_key])
        return item


class PreferenceDataModule(ExampleDataModule):
    """(prompt, chosen, rejected) preference pairs for reward-model training, served as right-padded batches.

    Each batch is ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}``, each (B, L) with one common L
    (masks bool, True = real token), plus ``"margin"`` (B,) float32 when ``margin_key`` is set.

    Args:
        pairs: a .jsonl file with ``{"prompt": text or chat messages, "chosen": text, "rejected": text}`` per line
            (or another layout below), or an inline list of such objects.
        synthetic: use the synthetic world's pairs (:meth:`SyntheticWorld.preference_pairs`) instead.
        dataset: a Hugging Face dataset: a hub id (``trl-lib/ultrafeedback_binarized``), a ``save_to_disk``
            directory, or the builder of ``data_files``.
        data_files: local dataset files (parquet, jsonl/json, csv, arrow).
        split: the dataset split.
        subset: the dataset's configuration name.
        prompt_key: the prompt column; a dataset without it has an implicit prompt: the beginning ``chosen`` and
            ``rejected`` share (text, or the messages before the last, differing, assistant turn).
        chosen_key: the chosen response column (text, or one assistant message with an explicit prompt).
        rejected_key: the rejected response column.
        num_proc: processes that tokenise a dataset (``datasets.map``, cached).
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

    def __init__(
        self,
        pairs: str | list[Row] | None = None,
        synthetic: bool = False,
        dataset: str | None = None,
        data_files: DataFiles | None = None,
        split: str = "train",
        subset: str | None = None,
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        num_proc: int | None = None,
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
            pairs,
            synthetic,
            num_pairs,
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
        self.label_noise = label_noise
        self.margin_key = margin_key
        self.truncation = truncation
        self.keys = (prompt_key, chosen_key, rejected_key)

    def _synthetic_rows(self) -> list[Row]:
        return WORLD.preference_pairs(self.num_examples, self.seed, self.label_noise)

    def encoder(self, tokenizer: PreTrainedTokenizerBase) -> PreferenceEncoder:
        option = "dataset" if self.dataset is not None else self.option
        return PreferenceEncoder(tokenizer, self.keys, self.margin_key, self.max_length, self.truncation, option)

    def _collator(self) -> PreferenceCollator:
        return PreferenceCollator(self._pad_token_id)
