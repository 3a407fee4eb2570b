"""Sequence-level rewards: the interface, the Hugging Face reward-model scorer, and rule rewards for the built-in tasks.

A reward maps a batch of (prompt, response) texts to one float score per sequence, ``(B,)``. Subclass :class:`Reward`
and implement ``__call__`` to add your own; load anything heavy in ``setup(device)``, which the trainer calls once
before training. Every call goes through :func:`call_reward`, which names the reward in any error it raises and checks
the scores with :func:`validate_scores`, so a broken reward fails on the first rollout with a message that says how to
fix it instead of silently training on NaNs.

Choices worth knowing:

- **Reward-model pooling.** :class:`RewardModelScorer` reads the logit of the last real token, through the Hugging
  Face sequence-classification head, which pools at the rightmost token that is not ``config.pad_token_id``. The
  scorer right-pads with exactly that id, so the score of a text does not depend on the batch it is scored in. As in
  the head itself (and so in TRL's reward training), a text whose last token *is* the pad id (pad = EOS models) is read
  at the token before it.
- **Reward-model truncation.** Texts longer than ``max_length`` keep their **last** ``max_length`` tokens (the score
  is read at the end of the response), with a warning.
- **Rule rewards** are pure Python, deterministic, and count Unicode characters of the decoded response, not tokens.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

_MAX_ROWS_IN_MESSAGE = 8
"""Errors list at most this many offending rows."""


class Reward:
    """Base class of a sequence-level reward; the extension point for custom rewards.

    Subclass it and implement ``__call__``. The trainer calls ``setup(device)`` once before training (load models,
    move tensors there), then calls the reward on every rollout with the decoded texts and, as keyword arguments, the
    token tensors of the policy (ignore them unless you need them).

    Example:
        >>> class ShortReward(Reward):
        ...     def __call__(self, prompts, responses, **tensors):
        ...         return torch.tensor([-float(len(r)) for r in responses])
    """

    def setup(self, device: torch.device) -> None:
        """Prepare for scoring on ``device``: load and move heavy state here, not in ``__init__``. Default: no-op.

        Args:
            device: the device the policy trains on.
        """

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        prompt_ids: Tensor | None = None,
        response_ids: Tensor | None = None,
        response_mask: Tensor | None = None,
    ) -> Tensor:
        """Score each (prompt, response) pair.

        Args:
            prompts: the B prompt texts as given in the data.
            responses: the B decoded responses (special tokens skipped).
            prompt_ids: (B, P) long, left-padded policy prompt tokens.
            response_ids: (B, T) long, right-padded policy response tokens.
            response_mask: (B, T) bool, True for a real response token.

        Returns:
            (B,) floating scores, higher is better, on any device (the caller moves them).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(prompts, responses, **tensors).")


def _rows(index: Tensor) -> str:
    rows = index.tolist()
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    return shown + (f", ... ({len(rows)} rows)" if len(rows) > _MAX_ROWS_IN_MESSAGE else "")


def validate_scores(scores: Any, batch_size: int, source: str, allow_non_finite: bool = False) -> Tensor:
    """Check the output of a reward and return it as a detached ``(B,)`` float32 tensor.

    Lists, tuples and NumPy arrays of numbers are converted with ``torch.as_tensor`` (and then checked like tensors);
    anything else that is not a tensor is an error. Half-precision scores are upcast to float32.

    Args:
        scores: what the reward returned.
        batch_size: B, the number of (prompt, response) pairs scored.
        source: the reward's name, used in error messages.
        allow_non_finite: let NaN and infinity through (the caller decides what to do with them).

    Returns:
        (B,) float32 tensor on the device ``scores`` was on.

    Raises:
        ValueError: naming ``source`` and the fix, if ``scores`` is not a tensor (or convertible), does not have shape
            (B,), is not floating point, or holds NaN or infinity.
    """
    if not isinstance(scores, Tensor):
        converted = None
        if isinstance(scores, list | tuple) or hasattr(scores, "__array__"):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                converted = torch.as_tensor(scores)
        if converted is None:
            raise ValueError(
                f"reward {source} returned {type(scores).__name__}; return a torch.Tensor of shape ({batch_size},) "
                f"with one float score per response (a list or NumPy array of numbers is converted automatically)."
            )
        scores = converted
    if scores.shape != (batch_size,):
        hint = " (use .squeeze(-1))" if scores.shape == (batch_size, 1) else ""
        raise ValueError(
            f"reward {source} returned scores of shape {tuple(scores.shape)}; expected ({batch_size},), one score "
            f"per response{hint}."
        )
    if not scores.is_floating_point():
        raise ValueError(
            f"reward {source} returned scores of dtype {scores.dtype}; rewards must be floating point "
            f"(convert with .float())."
        )
    scores = scores.detach().float()
    if not allow_non_finite and not torch.isfinite(scores).all():
        found = "; ".join(
            f"{kind} in rows {_rows(rows)}"
            for kind, rows in (
                ("NaN", torch.isnan(scores).nonzero().flatten()),
                ("inf", torch.isinf(scores).nonzero().flatten()),
            )
            if len(rows)
        )
        raise ValueError(
            f"reward {source} returned non-finite scores ({found}); return finite values (e.g. guard divisions, "
            f"use torch.nan_to_num, or clip)."
        )
    return scores


def reward_name(reward: Callable[..., Any]) -> str:
    """The name used for ``reward`` in messages: a function's qualified name, else the class name."""
    return getattr(reward, "__qualname__", None) or type(reward).__name__


def call_reward(
    reward: Callable[..., Any],
    prompts: list[str],
    responses: list[str],
    allow_non_finite: bool = False,
    **tensors: Tensor | None,
) -> Tensor:
    """Call ``reward`` and return its validated ``(B,)`` float32 scores.

    A :class:`Reward` receives ``tensors`` (``prompt_ids``, ``response_ids``, ``response_mask``) as keyword arguments;
    any other callable is called as ``reward(prompts, responses)``.

    Args:
        reward: a :class:`Reward` or a plain callable ``(prompts, responses) -> scores``.
        prompts: the B prompt texts.
        responses: the B response texts.
        allow_non_finite: passed to :func:`validate_scores`.
        **tensors: token tensors passed on to a :class:`Reward`.

    Returns:
        (B,) float32 scores, see :func:`validate_scores`.

    Raises:
        ValueError: if ``prompts`` and ``responses`` differ in length, or the scores are invalid.
        RuntimeError: ``reward <Name> raised ...``, chained to whatever the reward raised.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up.")
    name = reward_name(reward)
    try:
        scores = reward(prompts, responses, **tensors) if isinstance(reward, Reward) else reward(prompts, responses)
    except Exception as err:
        raise RuntimeError(f"reward {name} raised {type(err).__name__}: {err}") from err
    return validate_scores(scores, len(prompts), name, allow_non_finite=allow_non_finite)


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

        from lightning_rlhf.models import disable_dropout, load_pretrained_tokenizer

        option = (
            "reward.init_args.tokenizer"
            if self.tokenizer_name_or_path != self.name_or_path
            else "reward.init_args.name_or_path"
        )
        tok = load_pretrained_tokenizer(self.tokenizer_name_or_path, option, self.trust_remote_code)
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(
                    f"reward tokenizer {self.tokenizer_name_or_path!r} has neither a pad nor an EOS token."
                )
            tok.pad_token = tok.eos_token
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
        tok = self.tokenizer
        if self.use_chat_template:
            chats = [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, responses, strict=True)
            ]
            texts = [tok.apply_chat_template(c, tokenize=False) for c in chats]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
        else:
            ids = tok([p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=True)["input_ids"]
        if any(len(x) > self.max_length for x in ids) and not self._warned_truncation:
            warnings.warn(
                f"RewardModelScorer: some texts exceed max_length={self.max_length} tokens; keeping their last "
                f"{self.max_length} tokens.",
                stacklevel=3,
            )
            self._warned_truncation = True
        return [x[-self.max_length :] for x in ids]

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        *,
        prompt_ids: Tensor | None = None,
        response_ids: Tensor | None = None,
        response_mask: Tensor | None = None,
    ) -> Tensor:
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

        return packed_classifier_scores(self.model, input_ids, attention_mask, "reward.init_args.packing", label)


def _word_list(words: Sequence[str]) -> frozenset[str]:
    return frozenset(w.lower() for w in words)


class CharFractionReward(Reward):
    """Share of the response's characters that belong to ``chars``: ``matches / max(len(response), min_len)``.

    With the default, the policy learns to write lowercase letters and spaces, a task a tiny random byte-level model
    starts near chance at (27 of 384 ByT5 tokens) and learns in a few dozen PPO steps.

    ``min_len`` closes the obvious hack of a plain fraction: without it, "a" followed by EOS scores 1.0, and PPO
    finds that within a hundred steps (responses shrink to one letter). Set it to ``max_new_tokens`` so that only
    a full-length response of rewarded characters scores 1.

    Args:
        chars: the rewarded characters.
        min_len: the smallest denominator; 0 gives the plain fraction (an empty response scores 0).
    """

    def __init__(self, chars: str = "abcdefghijklmnopqrstuvwxyz ", min_len: int = 0) -> None:
        if not chars:
            raise ValueError("CharFractionReward chars must not be empty.")
        if min_len < 0:
            raise ValueError(f"CharFractionReward min_len must be >= 0, got {min_len}.")
        self.chars = chars
        self.min_len = min_len
        self._set = frozenset(chars)

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 share in [0, 1]."""
        scores = [sum(c in self._set for c in r) / max(len(r), self.min_len, 1) for r in responses]
        return torch.tensor(scores, dtype=torch.float32)


# fmt: off
DEFAULT_POSITIVE_WORDS = (
    "good", "great", "excellent", "amazing", "wonderful", "fantastic", "brilliant", "superb", "beautiful", "lovely",
    "enjoyable", "fun", "funny", "delightful", "charming", "moving", "touching", "best", "love", "loved", "loving",
    "perfect", "masterpiece", "awesome", "happy", "impressive", "memorable", "stunning", "recommend", "gripping",
)
"""Default positive lexicon of :class:`LexiconSentimentReward`."""

DEFAULT_NEGATIVE_WORDS = (
    "bad", "terrible", "awful", "horrible", "boring", "dull", "worst", "poor", "weak", "waste", "hate",
    "hated", "stupid", "annoying", "disappointing", "disappointed", "mediocre", "bland", "predictable", "painful",
    "ugly", "mess", "pointless", "forgettable", "lame", "slow", "tedious", "unwatchable", "cheap", "clumsy",
)
"""Default negative lexicon of :class:`LexiconSentimentReward`."""
# fmt: on

_WORD = re.compile(r"[a-z']+")


class LexiconSentimentReward(Reward):
    """Positivity of the response, in the spirit of the GPT-2 IMDB sentiment example, from a word lexicon.

    ``score = clip((#positive words - #negative words) / max(1, #words), -1, 1)``, where words are runs of letters and
    apostrophes of the lowercased response and each occurrence counts.

    Args:
        positive: positive words (matched lowercase); defaults to ``DEFAULT_POSITIVE_WORDS``.
        negative: negative words (matched lowercase); defaults to ``DEFAULT_NEGATIVE_WORDS``.
    """

    def __init__(self, positive: list[str] | None = None, negative: list[str] | None = None) -> None:
        self.positive = _word_list(DEFAULT_POSITIVE_WORDS if positive is None else positive)
        self.negative = _word_list(DEFAULT_NEGATIVE_WORDS if negative is None else negative)
        if both := self.positive & self.negative:
            raise ValueError(f"LexiconSentimentReward: words in both lexicons: {sorted(both)}.")

    def score(self, text: str) -> float:
        """The score of one text, see the class docstring."""
        words = _WORD.findall(text.lower())
        net = sum(w in self.positive for w in words) - sum(w in self.negative for w in words)
        return min(max(net / max(1, len(words)), -1.0), 1.0)

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 scores in [-1, 1]."""
        return torch.tensor([self.score(r) for r in responses], dtype=torch.float32)


class LengthReward(Reward):
    """Closeness of the response length (in characters) to a target: ``clip(1 - |len - target| / target, 0, 1)``.

    Trivial to hack on purpose: handy in tests and for seeing reward hacking happen.

    Args:
        target_len: the rewarded length in characters (> 0).
    """

    def __init__(self, target_len: int = 20) -> None:
        if target_len <= 0 or not math.isfinite(target_len):
            raise ValueError(f"LengthReward target_len must be > 0, got {target_len}.")
        self.target_len = target_len

    def __call__(self, prompts: list[str], responses: list[str], **tensors: Tensor | None) -> Tensor:
        """(B,) float32 scores in [0, 1]."""
        t = self.target_len
        return torch.tensor([min(max(1 - abs(len(r) - t) / t, 0.0), 1.0) for r in responses], dtype=torch.float32)
