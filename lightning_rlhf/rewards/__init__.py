"""Sequence-level rewards: the interface, the Hugging Face reward-model scorer, and rule rewards.

- :mod:`~lightning_rlhf.rewards.base`: ``Reward``, :func:`validate_scores`, :func:`call_reward`, :func:`fields_for`
  (which prompt fields a reward takes).
- :mod:`~lightning_rlhf.rewards.scorer`: ``RewardModelScorer`` and :func:`encode_scored_texts`, the one encoding of
  a (prompt, response) pair for a reward model (PPO's scorer and the reward model's training data).
- :mod:`~lightning_rlhf.rewards.rules`: ``CharFractionReward``, ``LexiconSentimentReward``, ``LengthReward``.

Every name is re-exported here: ``class_path: lightning_rlhf.rewards.RewardModelScorer`` keeps working.
"""

from lightning_rlhf.rewards.base import (
    RESERVED_FIELDS,
    TOKEN_INPUTS,
    Reward,
    call_reward,
    fields_for,
    reward_name,
    validate_scores,
)
from lightning_rlhf.rewards.rules import (
    DEFAULT_NEGATIVE_WORDS,
    DEFAULT_POSITIVE_WORDS,
    CharFractionReward,
    LengthReward,
    LexiconSentimentReward,
)
from lightning_rlhf.rewards.scorer import RewardModelScorer, encode_scored_texts

__all__ = [
    "DEFAULT_NEGATIVE_WORDS",
    "DEFAULT_POSITIVE_WORDS",
    "RESERVED_FIELDS",
    "TOKEN_INPUTS",
    "CharFractionReward",
    "LengthReward",
    "LexiconSentimentReward",
    "Reward",
    "RewardModelScorer",
    "call_reward",
    "encode_scored_texts",
    "fields_for",
    "reward_name",
    "validate_scores",
]
