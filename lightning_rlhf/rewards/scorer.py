"""``RewardModelScorer``: a Hugging Face sequence-classification reward model as a ``Reward``, and its text encoding.

- **Pooling.** The score is the logit of the last real token, read through the Hugging Face sequence-classification
  head, which pools at the rightmost token that is not ``config.pad_token_id``. The scorer right-pads with exactly that
  id, so the score of a text does not depend on the batch it is scored in. As in the head itself (and so in TRL's
  reward training), a text whose last token *is* the pad id (pad = EOS models) is read at the token before it.
- **Truncation.** Texts longer than ``max_length`` keep their **last** ``max_length`` tokens (the score is read at the
  end of the response), with a warning.
- **One encoding.** :func:`encode_scored_text` is how a (prompt, response) pair becomes tokens, here and in the
  reward model's training data (:class:`~lightning_rlhf.data.PreferenceDataModule`), so PPO optimizes the scores the
  model was trained to give.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import Reward


def encode_scored_texts(
    prompts: Sequence[str | list[dict[str, str]]], responses: Sequence[str], tokenizer: Any
) -> list[list[int]]:
    """Token ids of (prompt, response) pairs as a reward model scores them, not truncated.

    A text prompt: ``prompt + response`` with the tokenizer's special tokens. Chat messages: the conversation
    ``prompt messages + assistant response`` rendered with the chat template, without added special tokens.
    """
    pairs = list(zip(prompts, responses, strict=True))
    chats = [i for i, (p, _) in enumerate(pairs) if isinstance(p, list)]
    texts = [i for i, (p, _) in enumerate(pairs) if not isinstance(p, list)]
    ids: list[list[int]] = [[] for _ in pairs]
    if texts:
        encoded = tokenizer([pairs[i][0] + pairs[i][1] for i in texts], add_special_tokens=True)["input_ids"]
        for i, row in zip(texts, encoded, strict=True):
            ids[i] = list(row)
    if chats:
        rendered = [
            tokenizer.apply_chat_template([*pairs[i][0], {"role": "assistant", "content": pairs[i][1]}], tokenize=False)
            for i in chats
        ]
        for i, row in zip(chats, tokenizer(rendered, add_special_tokens=False)["input_ids"], strict=True):
            ids[i] = list(row)
    return ids


class RewardModelScorer(Reward):
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model with its own tokenizer.

    A scalar reward model (``num_labels=1``) is used as is; a classifier (e.g. a sentiment model) is used through the
    logit of one class, named by ``label_index`` (the classic "positive IMDB review" setup scores with the positive
    class logit).

    The score of a (prompt, response) pair is the logit at the last real token of ``prompt + response`` (or of the
    chat template applied to ``[user: prompt, assistant: response]``), computed without gradients in micro-batches.
    ``__init__`` only stores configuration; ``setup(device)`` loads the frozen model. This class is deliberately not an
    ``nn.Module``, so the reward model never lands in the policy's checkpoint, optimizer or DDP wrapper; pickling it
    (``ddp_spawn``) carries the configuration only, and ``setup`` loads the model again in the new process.

    Args:
        name_or_path: Hub id or local directory of the reward model.
        tokenizer: Hub id or directory of its tokenizer; defaults to ``name_or_path``.
        dtype: weights dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (as saved).
        batch_size: texts per forward pass.
        max_length: longest text in tokens; longer texts keep their last ``max_length`` tokens.
        trust_remote_code: allow custom modelling code from the model repository.
        use_chat_template: format each pair with the reward tokenizer's chat template instead of concatenating.
        label_index: the class whose logit is the score, for a model with several labels; None requires
            ``num_labels=1``.
        packing: run each micro-batch's texts packed into fewer rows
            (:func:`lightning_rlhf.models.packed_classifier_scores`): no compute on padding, the same scores up to
            rounding. Needs a decoder classifier with a ``score`` head (Llama, Qwen2, Mistral, GPT-2, ...); checked
            before the first packed forward.
    """

    DTYPES = ("float32", "bfloat16", "float16", "auto")

    def __init__(
        self,
        name_or_path: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: int = 1024,
        trust_remote_code: bool = False,
        use_chat_template: bool = False,
        label_index: int | None = None,
        packing: bool = False,
    ) -> None:
        if dtype not in self.DTYPES:
            raise ValueError(f"RewardModelScorer dtype={dtype!r} is not one of {self.DTYPES}.")
        if batch_size < 1 or max_length < 1:
            raise ValueError(
                f"RewardModelScorer batch_size and max_length must be >= 1, got {batch_size}, {max_length}."
            )
        self.name_or_path = name_or_path
        self.tokenizer_name_or_path = tokenizer or name_or_path
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.use_chat_template = use_chat_template
        self.label_index = label_index
        self.packing = packing
        self.model: Any = None
        self.tokenizer: Any = None
        self._warned_truncation = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None, "tokenizer": None}

    def setup(self, device: torch.device) -> None:
        """Load the tokenizer and the frozen model (eval mode, dropout off, no gradients) onto ``device``; idempotent.

        Raises:
            ValueError: if the model does not have exactly one label, no pad or EOS token exists, or
                ``use_chat_template`` is set and the tokenizer has no chat template.
        """
        if self.model is not None:
            self.model.to(device)
            return
        from transformers import AutoModelForSequenceClassification

        from lightning_rlhf.models import disable_dropout, ensure_pad_token, load_pretrained_tokenizer

        option = (
            "model.reward.init_args.tokenizer"
            if self.tokenizer_name_or_path != self.name_or_path
            else "model.reward.init_args.name_or_path"
        )
        tok = ensure_pad_token(
            load_pretrained_tokenizer(self.tokenizer_name_or_path, option, self.trust_remote_code), option
        )
        if self.use_chat_template and not tok.chat_template:
            raise ValueError(
                f"RewardModelScorer(use_chat_template=True) but tokenizer {self.tokenizer_name_or_path!r} has no chat "
                f"template; set use_chat_template=False or use a tokenizer that has one."
            )
        tok.padding_side = "right"
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, dtype=dtype, trust_remote_code=self.trust_remote_code
        )
        num_labels = model.config.num_labels
        if self.label_index is None and num_labels != 1:
            raise ValueError(
                f"reward model {self.name_or_path!r} has num_labels={num_labels}; a scalar reward model needs "
                f"num_labels=1, or set label_index to the class whose logit is the reward (e.g. the positive class)."
            )
        if self.label_index is not None and not 0 <= self.label_index < num_labels:
            raise ValueError(
                f"RewardModelScorer label_index={self.label_index} is out of range for num_labels={num_labels}."
            )
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            # Without it the head pools at the last column, i.e. at padding for all but the longest text.
            text_config.pad_token_id = model.config.pad_token_id = tok.pad_token_id
        model.requires_grad_(False)
        # Eval mode, and no dropout even if something puts the model back in training mode.
        self.model, self.tokenizer = disable_dropout(model).eval().to(device), tok

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        if self.use_chat_template:  # the prompt text as the user's message
            prompts = [[{"role": "user", "content": p}] for p in prompts]
        ids = encode_scored_texts(prompts, responses, self.tokenizer)
        if any(len(x) > self.max_length for x in ids) and not self._warned_truncation:
            warnings.warn(
                f"RewardModelScorer: some texts exceed max_length={self.max_length} tokens; keeping their last "
                f"{self.max_length} tokens.",
                stacklevel=3,
            )
            self._warned_truncation = True
        return [x[-self.max_length :] for x in ids]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """Score each pair with the reward model; token tensors of the policy are ignored (it has its own tokenizer).

        Returns:
            (B,) float32 logits of the last real token, on the reward model's device.
        """
        if self.model is None:
            raise RuntimeError("RewardModelScorer is not loaded; call setup(device) before scoring.")
        ids = self._encode(prompts, responses)
        pad_id = self.model.config.get_text_config().pad_token_id
        device = self.model.device
        scores = torch.empty(len(ids), dtype=torch.float32, device=device)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a micro-batch: less padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):  # right padding with the config's pad id: the head pools before it
                input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
                attention_mask[j, : len(ids[i])] = 1
            scores[torch.tensor(rows, device=device)] = self._scores(input_ids.to(device), attention_mask.to(device))
        return scores

    def _scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N,) float32 logits of the scored class for right-padded rows, packed with ``packing``."""
        label = self.label_index or 0
        if not self.packing:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, label].float()
        from lightning_rlhf.models import packed_classifier_scores  # transformers and peft load only when used

        return packed_classifier_scores(self.model, input_ids, attention_mask, "model.reward.init_args.packing", label)
