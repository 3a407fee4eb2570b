"""Pure tensor math of RLHF with PPO: no Lightning import, no in-place writes to inputs, no logging, no ``backward``.

- :mod:`~lightning_rlhf.functional.ppo`: KL penalty, per-token rewards, GAE and discounted returns, the over-long
  penalty, the clipped policy loss, the value loss, the loss aggregations, the rollout-correction weights.
- :mod:`~lightning_rlhf.functional.advantages`: critic-free group baselines (GRPO, Dr. GRPO, RLOO, REINFORCE++).
- :mod:`~lightning_rlhf.functional.stats`: masked sums, means, variances, whitening, explained variance.
- :mod:`~lightning_rlhf.functional.logprobs`: float32, chunked log-probabilities and entropies of the logits.
- :mod:`~lightning_rlhf.functional.supervised`: the SFT and Bradley-Terry losses of the earlier stages.
- :mod:`~lightning_rlhf.functional.random_streams`: one counter-based random stream per sampled response.
- :mod:`~lightning_rlhf.functional.checks`: the argument checks they share.

Every public name is re-exported here, so ``from lightning_rlhf import functional as F; F.gae(...)`` keeps working.
"""

from lightning_rlhf.functional.advantages import (
    GROUP_STD_EPS,
    GROUP_STD_NORMS,
    GroupStdNorm,
    broadcast_to_tokens,
    group_mean,
    group_std,
    grpo_advantages,
    rloo_advantages,
    zero_std_groups,
)
from lightning_rlhf.functional.checks import check_choice, check_mask, check_same_shape
from lightning_rlhf.functional.logprobs import (
    LOGSOFTMAX_CHUNK_ELEMENTS,
    entropy_from_logits,
    logprobs_from_logits,
    row_chunks,
)
from lightning_rlhf.functional.ppo import (
    AGGREGATIONS,
    K3_CLAMP,
    K3_LOG_RATIO_CLAMP,
    KL_ESTIMATORS,
    ROLLOUT_CORRECTIONS,
    SEQUENCE_AGGREGATIONS,
    Aggregation,
    KLEstimator,
    RolloutCorrection,
    aggregate,
    discounted_returns,
    gae,
    kl_penalty,
    last_token_index,
    overlong_penalty,
    policy_loss,
    rollout_correction_weights,
    token_rewards,
    value_loss,
)
from lightning_rlhf.functional.random_streams import KEY_BITS, draw_tokens, lowbias32, response_keys, response_uniforms
from lightning_rlhf.functional.stats import (
    WHITEN_EPS,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    moment_sums,
)
from lightning_rlhf.functional.supervised import (
    bradley_terry_loss,
    sft_loss,
    sft_loss_from_terms,
    sft_predicting_positions,
    sft_token_loss,
    sft_token_terms,
)

__all__ = [
    "AGGREGATIONS",
    "GROUP_STD_EPS",
    "GROUP_STD_NORMS",
    "K3_CLAMP",
    "K3_LOG_RATIO_CLAMP",
    "KEY_BITS",
    "KL_ESTIMATORS",
    "LOGSOFTMAX_CHUNK_ELEMENTS",
    "ROLLOUT_CORRECTIONS",
    "SEQUENCE_AGGREGATIONS",
    "WHITEN_EPS",
    "Aggregation",
    "GroupStdNorm",
    "KLEstimator",
    "RolloutCorrection",
    "aggregate",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "check_choice",
    "check_mask",
    "check_same_shape",
    "discounted_returns",
    "draw_tokens",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_mean",
    "group_std",
    "grpo_advantages",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "lowbias32",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moment_sums",
    "overlong_penalty",
    "policy_loss",
    "response_keys",
    "response_uniforms",
    "rloo_advantages",
    "rollout_correction_weights",
    "row_chunks",
    "sft_loss",
    "sft_loss_from_terms",
    "sft_predicting_positions",
    "sft_token_loss",
    "sft_token_terms",
    "token_rewards",
    "value_loss",
    "zero_std_groups",
]
