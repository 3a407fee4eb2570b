"""Pure tensor math of RLHF with PPO: no Lightning import, no in-place writes to inputs, no logging, no ``backward``.

- :mod:`~lightning_rlhf.functional.ppo`: KL penalty, per-token rewards, GAE, the clipped policy loss, the value loss.
- :mod:`~lightning_rlhf.functional.stats`: masked sums, means, variances, whitening, explained variance.
- :mod:`~lightning_rlhf.functional.logprobs`: float32, chunked log-probabilities and entropies of the logits.
- :mod:`~lightning_rlhf.functional.supervised`: the SFT and Bradley-Terry losses of the earlier stages.
- :mod:`~lightning_rlhf.functional.random_streams`: one counter-based random stream per sampled response.
- :mod:`~lightning_rlhf.functional.checks`: the argument checks they share.

Every public name is re-exported here, so ``from lightning_rlhf import functional as F; F.gae(...)`` keeps working.
"""

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
    Aggregation,
    KLEstimator,
    aggregate,
    gae,
    kl_penalty,
    last_token_index,
    policy_loss,
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
    "K3_CLAMP",
    "K3_LOG_RATIO_CLAMP",
    "KEY_BITS",
    "KL_ESTIMATORS",
    "LOGSOFTMAX_CHUNK_ELEMENTS",
    "WHITEN_EPS",
    "Aggregation",
    "KLEstimator",
    "aggregate",
    "bradley_terry_loss",
    "check_choice",
    "check_mask",
    "check_same_shape",
    "draw_tokens",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "lowbias32",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moment_sums",
    "policy_loss",
    "response_keys",
    "response_uniforms",
    "row_chunks",
    "sft_loss",
    "sft_loss_from_terms",
    "sft_predicting_positions",
    "sft_token_loss",
    "sft_token_terms",
    "token_rewards",
    "value_loss",
]
