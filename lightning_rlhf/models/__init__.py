"""Models: configuration, the one builder, the policy with its value head and reference, heads, packing, engines.

- :mod:`~lightning_rlhf.models.config`: ``PolicyConfig``, ``TinyModelConfig``, ``LoraConfig``, ``RewardModelConfig``.
- :mod:`~lightning_rlhf.models.loading`: tokenizers and :func:`build_model`, the one builder of every stage.
- :mod:`~lightning_rlhf.models.weights`: dropout off, float32 trained weights beside a frozen base.
- :mod:`~lightning_rlhf.models.heads`: final hidden states, logits only where asked, heads a chunk at a time.
- :mod:`~lightning_rlhf.models.policy`: ``PolicyValueModel``, :func:`build_policy` and the response forward.
- :mod:`~lightning_rlhf.models.packing`: sequence packing (``ppo.packing``).
- :mod:`~lightning_rlhf.models.engines`: sampling engines (``generation.engine``).

The names of the first five are re-exported here.
"""

from lightning_rlhf.models.config import (
    BYTE_TOKENIZER,
    DTYPES,
    LoraConfig,
    PolicyConfig,
    RewardModelConfig,
    TinyModelConfig,
    check_dtype,
)
from lightning_rlhf.models.heads import (
    LOGITS_CHECK_TOLERANCE,
    HeadFn,
    check_logits_path,
    final_hidden,
    head_outputs,
    lm_logits,
    logits_or_head,
    packed_classifier_scores,
    unwrap_peft,
)
from lightning_rlhf.models.loading import (
    TOKENIZER_PROBE,
    ModelSource,
    attach_lora,
    build_model,
    build_tiny,
    check_local_path,
    enable_checkpointing,
    ensure_pad_token,
    load_pretrained_tokenizer,
    load_tokenizer,
    naming_attn_implementation,
)
from lightning_rlhf.models.policy import (
    ENTROPY,
    MODES,
    VALUE_HEAD_INIT_SCALE,
    PolicyValueModel,
    ResponseForward,
    adapter_disabled,
    build_policy,
    forward_response,
    scatter_tokens,
)
from lightning_rlhf.models.weights import DROPOUT_MODULES, CastAround, cast_weights, check_dropout_off, disable_dropout

__all__ = [
    "BYTE_TOKENIZER",
    "DROPOUT_MODULES",
    "DTYPES",
    "ENTROPY",
    "LOGITS_CHECK_TOLERANCE",
    "MODES",
    "TOKENIZER_PROBE",
    "VALUE_HEAD_INIT_SCALE",
    "CastAround",
    "HeadFn",
    "LoraConfig",
    "ModelSource",
    "PolicyConfig",
    "PolicyValueModel",
    "ResponseForward",
    "RewardModelConfig",
    "TinyModelConfig",
    "adapter_disabled",
    "attach_lora",
    "build_model",
    "build_policy",
    "build_tiny",
    "cast_weights",
    "check_dropout_off",
    "check_dtype",
    "check_local_path",
    "check_logits_path",
    "disable_dropout",
    "enable_checkpointing",
    "ensure_pad_token",
    "final_hidden",
    "forward_response",
    "head_outputs",
    "lm_logits",
    "load_pretrained_tokenizer",
    "load_tokenizer",
    "logits_or_head",
    "naming_attn_implementation",
    "packed_classifier_scores",
    "scatter_tokens",
    "unwrap_peft",
]
