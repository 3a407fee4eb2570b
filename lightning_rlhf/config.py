"""Configuration of PPO and of its rollouts, and the helpers every stage shares to build its optimizer.

``PPOConfig`` and ``GenerationConfig`` are validated and documented field by field (``--help`` shows each docstring).
Pure: no Lightning import, so recipes parse and configs validate without building anything.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_rlhf import functional as F
from lightning_rlhf.types import ForwardOptions

ScoreNorm = Literal["none", "batch", "running"]
SCORE_NORMS: tuple[str, ...] = ("none", "batch", "running")
SCORE_NORM_EPS = 1e-8
"""Added to the score standard deviation before dividing."""
ADVANTAGE_ESTIMATORS: tuple[str, ...] = (
    "gae",
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
)
"""``ppo.advantage_estimator`` values (verl's names); every one but ``gae`` is critic-free."""
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")
"""Estimators whose baseline is the other responses to the same prompt: they need ``samples_per_prompt >= 2``."""
KL_PLACEMENTS: tuple[str, ...] = ("reward", "loss")
ENGINES: tuple[str, ...] = ("cached", "hf", "vllm")
"""Sampling engines by name: ``cached`` and ``hf`` (:mod:`lightning_rlhf.models.engines`), ``vllm``
(:mod:`lightning_rlhf.models.vllm_engine`, the ``vllm`` extra)."""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO and RLHF hyperparameters. Defaults follow TRL / cleanrl unless a comment says otherwise."""

    advantage_estimator: Literal[
        "gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"
    ] = "gae"
    """How advantages are estimated (README "Advantage estimators"): ``gae`` with the critic (value head), or a
    critic-free one (no value head, no value forward or loss): ``grpo``, ``dr_grpo``, ``rloo``,
    ``reinforce_plus_plus_baseline`` (group baselines; need ``generation.samples_per_prompt >= 2``) or
    ``reinforce_plus_plus``."""
    group_std_norm: Literal["group", "batch", "none"] = "group"
    """``grpo`` only: divide the group-centered return by the group's std (``group``), by the std over the whole
    rollout (``batch``; over every process under ``stats_scope: global``), or not at all (``none``, which is
    ``dr_grpo``)."""
    filter_zero_std_groups: bool = False
    """Leave the responses of a group whose scores are all equal out of the loss and its token counts (DAPO's dynamic
    sampling, without refilling the batch); needs ``samples_per_prompt >= 2``. ``rollout/zero_std_frac`` is logged
    either way."""
    mask_truncated: bool = False
    """Leave responses that hit ``max_new_tokens`` without a stop token out of the loss (TRL
    ``mask_truncated_completions``)."""
    overlong_buffer: int | None = None
    """DAPO's soft over-long punishment: over the last this many tokens before ``generation.max_new_tokens`` the
    score falls linearly, by ``overlong_penalty`` at the limit; None = off."""
    overlong_penalty: float = 1.0
    """Score penalty of a response of ``max_new_tokens`` tokens when ``overlong_buffer`` is set (DAPO: 1.0)."""
    clip_coef: float = 0.2
    """Policy ratio clip epsilon (PPO paper, TRL `cliprange`)."""
    clip_coef_high: float | None = None
    """Upper epsilon of the ratio clip, ``clip(r, 1 - clip_coef, 1 + clip_coef_high)`` (DAPO's clip-higher, e.g.
    0.28); None = ``clip_coef``."""
    dual_clip_coef: float | None = None
    """Dual-clip c > 1 for negative advantages (Ye et al. 2020); None disables it."""
    value_clip_coef: float | None = 0.2
    """Clip of the value prediction around the rollout value (TRL `cliprange_value`); None = unclipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (TRL default 0.1)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0 = off, as in TRL, verl, OpenRLHF)."""
    kl_coef: float = 0.05
    """Initial beta of the per-token KL penalty (TRL default 0.05)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator: k1 (unbiased), k2 (>= 0, biased) or k3 (unbiased, >= 0; verl's ``low_var_kl``)."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """Where the KL penalty acts: ``reward`` (``-kl_coef * KL`` on every token's reward, InstructGPT) or ``loss``
    (``kl_coef`` times the aggregated KL of the current policy to the reference, added to the objective: GRPO's
    form, verl ``use_kl_loss``; k3 is the usual estimator there)."""
    target_kl: float | None = None
    """Target per-sequence KL (nats) of the adaptive controller; None keeps ``kl_coef`` fixed."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller in samples (Ziegler et al. 2019 use 10000)."""
    gamma: float = 1.0
    """Discount factor over response tokens (``gae`` and ``reinforce_plus_plus``)."""
    gae_lambda: float = 0.95
    """GAE lambda (TRL / DeepSpeed-Chat default)."""
    whiten_advantages: bool = True
    """``gae`` only: whiten advantages over the rollout's real tokens (zero mean, unit variance). REINFORCE++ always
    whitens (its definition); the group estimators never do."""
    critic_warmup_steps: int = 0
    """``gae`` only: for the first this many iterations only the value head trains (the policy loss is not applied and
    every other gradient is dropped), so the critic is not random when the policy starts moving."""
    value_head_lr: float | None = None
    """``gae`` only: learning rate of the value head (its own optimizer parameter group); None = the optimizer's."""
    stats_scope: Literal["global", "local"] = "global"
    """Over which data the advantage-whitening and score-normalization moments and the token-mean loss denominator
    are taken: ``global`` (all processes: results do not depend on the number of devices) or ``local`` (each
    process alone, as in TRL and cleanrl: no extra collective)."""
    score_norm: Literal["none", "batch", "running"] = "none"
    """Score normalization: none, batch (standardize per rollout) or running (standardize with running moments)."""
    score_clip: float | None = None
    """Clip normalized scores to [-score_clip, score_clip]; None = no clip."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit ``max_new_tokens`` without a stop token (TRL)."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer steps per PPO epoch; must divide the per-device rollout size (``data.batch_size x
    generation.samples_per_prompt`` responses)."""
    micro_batch_size: int | None = None
    """Responses per forward/backward (gradient accumulation within a minibatch; also the rows of each rollout scoring
    forward); None = the whole minibatch."""
    packing: bool = False
    """Pack the real tokens of a micro-batch's rows into fewer rows for every scoring and update forward (no compute
    on padding; :mod:`lightning_rlhf.models.packing`). Pays when responses end at different lengths; results equal the
    padded forward up to rounding. The model is checked to keep packed sequences apart before its first packed
    forward."""
    lm_head_chunk_size: int | None = None
    """Compute the logits, logprobs and entropy of this many response tokens at a time in every scoring and update
    forward, and recompute them in the backward pass, so a micro-batch's (tokens x vocabulary) logits and their
    gradient are never held at once (:func:`lightning_rlhf.models.head_outputs`). Saves memory with large
    vocabularies at the cost of one more ``lm_head`` matmul per token in the update; results equal up to rounding.
    None computes them all at once."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value before each optimizer step; None = no clipping."""
    early_stop_kl: float | None = None
    """Stop a rollout's remaining PPO updates once a minibatch's approx KL (k3, nats per token, global mean) exceeds
    this (cleanrl ``target_kl``, TRL <= 0.11 ``early_stopping``); None = off."""
    ratio_threshold: float | None = None
    """Skip a minibatch's optimizer step when its mean ratio pi / pi_old exceeds this (TRL <= 0.11: 10); None = off."""
    max_consecutive_skips: int = 10
    """Skipped updates (non-finite loss or gradient, ratio threshold) in a row before training stops with an
    error."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How per-token losses become one number: ``token-mean`` (all real tokens), ``seq-mean-token-mean`` (each
    response's token mean, then their mean), ``seq-mean-token-sum`` (token sums, then their mean) or
    ``seq-mean-token-sum-norm`` (token sums over ``generation.max_new_tokens``, then their mean: Dr. GRPO)."""
    rollout_correction: Literal["none", "token_tis", "seq_mis"] = "none"
    """How the policy loss corrects for the sampling engine's logprobs differing from the trainer's (only with
    ``generation.engine: vllm``, which keeps the engine's logprobs on the rollout; the other engines sample from the
    trainer's own distribution, so there is nothing to correct and setting it is an error): ``token_tis`` weights
    each token's loss by min(pi_old / pi_engine, cap) (truncated importance sampling, Yao et al. 2025), ``seq_mis``
    weights a response by its sequence ratio, or drops it past the cap (Liu et al. 2025)."""
    rollout_correction_cap: float = 2.0
    """The cap C of ``rollout_correction`` (verl's ``rollout_is_threshold`` default 2.0; TRL uses 3.0)."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, fix: str) -> None:
            if not ok:
                raise ValueError(f"model.ppo.{field}={getattr(self, field)!r} is invalid: {fix}.")

        need(
            self.advantage_estimator in ADVANTAGE_ESTIMATORS,
            "advantage_estimator",
            f"choose one of {ADVANTAGE_ESTIMATORS}",
        )
        need(self.group_std_norm in F.GROUP_STD_NORMS, "group_std_norm", f"choose one of {F.GROUP_STD_NORMS}")
        need(self.kl_placement in KL_PLACEMENTS, "kl_placement", f"choose one of {KL_PLACEMENTS}")
        need(self.overlong_buffer is None or self.overlong_buffer >= 1, "overlong_buffer", "use >= 1 token or null")
        need(self.overlong_penalty >= 0, "overlong_penalty", "use a penalty >= 0")
        need(self.clip_coef_high is None or self.clip_coef_high > 0, "clip_coef_high", "use a value > 0 or null")
        need(self.critic_warmup_steps >= 0, "critic_warmup_steps", "use a number of iterations >= 0")
        need(self.value_head_lr is None or self.value_head_lr > 0, "value_head_lr", "use a positive rate or null")
        if not self.uses_critic:
            for name, default in (("critic_warmup_steps", 0), ("value_head_lr", None)):
                need(
                    getattr(self, name) == default,
                    name,
                    f"advantage_estimator {self.advantage_estimator!r} has no critic; leave it at {default}",
                )
        need(self.kl_estimator in F.KL_ESTIMATORS, "kl_estimator", f"choose one of {F.KL_ESTIMATORS}")
        need(self.aggregation in F.AGGREGATIONS, "aggregation", f"choose one of {F.AGGREGATIONS}")
        need(
            self.rollout_correction in F.ROLLOUT_CORRECTIONS,
            "rollout_correction",
            f"choose one of {F.ROLLOUT_CORRECTIONS}",
        )
        need(self.rollout_correction_cap > 0, "rollout_correction_cap", "use a positive cap such as 2.0")
        need(self.score_norm in SCORE_NORMS, "score_norm", f"choose one of {SCORE_NORMS}")
        need(self.stats_scope in ("global", "local"), "stats_scope", "choose 'global' or 'local'")
        need(self.clip_coef > 0, "clip_coef", "use a positive clip range such as 0.2")
        need(
            self.dual_clip_coef is None or self.dual_clip_coef > 1,
            "dual_clip_coef",
            "use a value > 1 (e.g. 3.0) or null",
        )
        need(self.value_clip_coef is None or self.value_clip_coef > 0, "value_clip_coef", "use a value > 0 or null")
        need(self.vf_coef >= 0, "vf_coef", "use a value >= 0")
        need(self.kl_coef >= 0, "kl_coef", "use a value >= 0")
        need(self.target_kl is None or self.target_kl > 0, "target_kl", "use a positive KL in nats, or null for fixed")
        need(self.kl_horizon > 0, "kl_horizon", "use a positive number of samples")
        need(0 <= self.gamma <= 1, "gamma", "use a discount in [0, 1]")
        need(0 <= self.gae_lambda <= 1, "gae_lambda", "use a lambda in [0, 1]")
        need(self.score_clip is None or self.score_clip > 0, "score_clip", "use a value > 0 or null")
        need(self.ppo_epochs >= 1, "ppo_epochs", "use at least 1")
        need(self.num_minibatches >= 1, "num_minibatches", "use at least 1")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", "use >= 1 or null")
        need(self.lm_head_chunk_size is None or self.lm_head_chunk_size >= 1, "lm_head_chunk_size", "use >= 1 or null")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "use a value > 0 or null")
        need(self.early_stop_kl is None or self.early_stop_kl > 0, "early_stop_kl", "use a value > 0 or null")
        need(self.ratio_threshold is None or self.ratio_threshold > 1, "ratio_threshold", "use a value > 1 or null")
        need(self.max_consecutive_skips >= 0, "max_consecutive_skips", "use a value >= 0")

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator needs the critic (``gae``): a value head, values in the rollout, a value loss."""
        return self.advantage_estimator == "gae"

    @property
    def forward_options(self) -> ForwardOptions:
        """How the scoring and update forwards run: ``packing`` and ``lm_head_chunk_size``."""
        return ForwardOptions(packing=self.packing, lm_head_chunk_size=self.lm_head_chunk_size)


@dataclass(frozen=True)
class GenerationConfig:
    """How responses are sampled during rollouts."""

    max_new_tokens: int = 32
    """Longest response; a response that reaches it without a stop token has ``ended`` False."""
    temperature: float = 1.0
    """Softmax temperature of sampling; old and reference logprobs use it too, also with greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns it off (logprobs ignore the truncation)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 turns it off (logprobs ignore the truncation)."""
    do_sample: bool = True
    """False decodes greedily (deterministic tests); the logprobs still use ``temperature``."""
    samples_per_prompt: int = 1
    """Responses sampled for each prompt (n): a rollout on a process is ``data.batch_size x n`` responses, a prompt's n
    adjacent and on the same process (a group, for the group estimators). The prompt is encoded once; the ``cached``
    engine runs its prefill once for all n."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response besides the tokenizer's EOS."""
    min_new_tokens: int = 0
    """Stop tokens are forbidden before this many response tokens (the logprobs ignore that truncation)."""
    engine: str = "auto"
    """Sampling engine (:mod:`lightning_rlhf.models.engines`): ``"cached"`` (KV cache, finished rows leave the batch),
    ``"hf"`` (transformers ``generate``), ``"vllm"`` (vLLM in the training process, fed the current policy before
    every rollout: :mod:`lightning_rlhf.models.vllm_engine`; ``pip install 'lightning-rlhf[vllm]'``), or ``"auto"``:
    ``"cached"``, except ``"hf"`` when the model is sharded across processes (FSDP), where every process must run the
    same number of forwards."""
    merge_lora: bool = True
    """Merge the LoRA adapter into the base weights while generating (restored bit for bit afterwards); skipped where
    it cannot apply (no adapter, sharded or quantized weights, ``modules_to_save``, DoRA) and with ``engine: vllm``,
    which samples with its own copy of the weights."""
    batch_size: int | None = None
    """Prompts sampled at once (each with its ``samples_per_prompt`` responses); None samples the whole per-device
    batch together (fastest; set it to cap memory)."""
    cast_weights_once: bool = True
    """Under autocast (``precision: bf16-mixed``), cast the sampled LM's weights to bfloat16 once per rollout instead
    of once per decode step. Holds one bfloat16 copy of those weights while sampling; set false when memory is tight.
    Not applied to a model sharded across processes (FSDP)."""
    vllm_gpu_memory_utilization: float = 0.3
    """``engine: vllm`` only: the share of the GPU's memory vLLM may take for its weights and KV cache (TRL's colocate
    default 0.3); the trainer needs the rest. Not used when ``vllm_kv_cache_gib`` sizes the cache, which is always
    the case on CPU (where vLLM would read this as a share of host memory)."""
    vllm_kv_cache_gib: float | None = None
    """``engine: vllm`` only: the KV cache's size in GiB (vLLM ``kv_cache_memory_bytes``). None: on CUDA vLLM sizes it
    from ``vllm_gpu_memory_utilization``; on CPU it is sized for the first rollout, twice its sequences at full
    length, and at least one sequence of the engine's longest length."""
    vllm_sleep_level: int | None = None
    """``engine: vllm`` only: vLLM sleep mode between rollouts, so training gets the GPU memory back: 1 frees the KV
    cache and offloads the weights to host memory, 2 discards the weights too (they are reloaded from
    ``policy.name_or_path`` and the policy pushed again before the next rollout), 0 never sleeps. None: 1 on CUDA, 0
    on CPU (sleep mode needs CUDA)."""
    vllm_max_model_len: int | None = None
    """``engine: vllm`` only: the longest prompt + response the engine plans its KV cache for; None is the model's
    ``max_position_embeddings``. Smaller values leave more memory to the cache's concurrency."""
    vllm_enforce_eager: bool = False
    """``engine: vllm`` only: no CUDA graphs (faster start, slower decoding); vLLM's own option."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"model.generation.temperature must be > 0, got {self.temperature}; use do_sample=False for greedy."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"model.generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"model.generation.top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off.")
        if self.top_k < 0:
            raise ValueError(f"model.generation.top_k must be >= 0, got {self.top_k}; use 0 to turn it off.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"model.generation.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                f"{self.min_new_tokens}."
            )
        if self.engine not in (*ENGINES, "auto"):
            raise ValueError(f"model.generation.engine must be 'auto', 'cached', 'hf' or 'vllm', got {self.engine!r}.")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                "model.generation.vllm_gpu_memory_utilization must be in (0, 1], got "
                f"{self.vllm_gpu_memory_utilization}; e.g. 0.3 leaves 70% of the GPU to training."
            )
        if self.vllm_kv_cache_gib is not None and not self.vllm_kv_cache_gib > 0:
            raise ValueError(f"model.generation.vllm_kv_cache_gib must be > 0 or null, got {self.vllm_kv_cache_gib}.")
        if self.vllm_sleep_level not in (None, 0, 1, 2):
            raise ValueError(
                f"model.generation.vllm_sleep_level must be 0, 1, 2 or null (auto), got {self.vllm_sleep_level!r}."
            )
        if self.vllm_max_model_len is not None and self.vllm_max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"model.generation.vllm_max_model_len={self.vllm_max_model_len} leaves no room for a prompt before "
                f"max_new_tokens={self.max_new_tokens}; use a longer length or null (the model's)."
            )
        if self.samples_per_prompt < 1:
            raise ValueError(f"model.generation.samples_per_prompt must be >= 1, got {self.samples_per_prompt}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"model.generation.batch_size must be >= 1 or None (whole batch), got {self.batch_size}.")


def check_ppo_with_generation(ppo: PPOConfig, generation: GenerationConfig) -> None:
    """Raise ``ValueError`` naming the fields when ``ppo`` asks for something ``generation`` does not give."""
    n = generation.samples_per_prompt
    if n < 2:
        if ppo.advantage_estimator in GROUP_ESTIMATORS:
            raise ValueError(
                f"model.ppo.advantage_estimator={ppo.advantage_estimator!r} compares the responses to the same prompt: "
                f"set model.generation.samples_per_prompt >= 2 (e.g. 4), got {n}."
            )
        if ppo.filter_zero_std_groups:
            raise ValueError(
                "model.ppo.filter_zero_std_groups needs groups of responses to one prompt: set "
                f"model.generation.samples_per_prompt >= 2, got {n}."
            )
    if ppo.rollout_correction != "none" and generation.engine != "vllm":
        raise ValueError(
            f"model.ppo.rollout_correction={ppo.rollout_correction!r} corrects for a sampling engine whose logprobs "
            f"differ from the trainer's; model.generation.engine {generation.engine!r} samples from the trainer's own "
            "distribution. Set model.generation.engine vllm, or model.ppo.rollout_correction none."
        )
    if ppo.overlong_buffer is not None and ppo.overlong_buffer > generation.max_new_tokens:
        raise ValueError(
            f"model.ppo.overlong_buffer={ppo.overlong_buffer} is longer than model.generation.max_new_tokens="
            f"{generation.max_new_tokens}; use a buffer of at most max_new_tokens tokens."
        )


def build_optimizers(
    parameters: Iterable[torch.nn.Parameter] | list[dict[str, Any]],
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None,
    interval: str | None = "step",
) -> Any:
    """What a stage's ``configure_optimizers`` returns: the optimizer of the trainable ``parameters`` and its scheduler.

    Args:
        parameters: the module's parameters, or optimizer parameter groups (dicts with ``"params"`` and options such
            as ``"lr"``); those that require grad are optimized.
        optimizer_factory: builds the optimizer from them (LightningCLI ``OptimizerCallable``).
        lr_scheduler_factory: builds an LR scheduler from the optimizer, or None.
        interval: Lightning's scheduler ``interval`` (``"step"``: every optimizer step); None hands the scheduler back
            bare, for a module that steps it itself (PPO steps it once per iteration).
    Raises:
        ValueError: nothing is trainable.
    """
    items = list(parameters)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    if not any(group["params"] for group in groups):
        raise ValueError("No trainable parameters: enable LoRA (model.lora.enabled) or full fine-tuning.")
    # Plain parameters go in as a list, as every optimizer callable takes them.
    plain = len(groups) == 1 and groups[0].keys() == {"params"}
    optimizer = optimizer_factory(groups[0]["params"] if plain else groups)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {
        "optimizer": optimizer,
        "lr_scheduler": scheduler if interval is None else {"scheduler": scheduler, "interval": interval},
    }


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-5 and eps 1e-5 (torch's weight decay 0.01), used when the recipe names no optimizer.

    lr 1e-5 is the order of TRL <= 0.11's PPO default (1.41e-5) for fine-tuning a pretrained LM with LoRA; eps 1e-5 is
    the PPO Adam epsilon of OpenAI baselines and cleanrl. TRL 0.29's PPOTrainer uses lr 3e-6 and eps 1e-8 (transformers'
    default); OpenRLHF and verl default to lr 1e-6 for full fine-tuning. A tiny random model needs far more (the
    quickstart uses 5e-4)."""
    return torch.optim.AdamW(params, lr=1.0e-5, eps=1.0e-5)


def as_config(cls: type, value: Any) -> Any:
    """``value`` as an instance of the config dataclass ``cls``: None gives the defaults, a dict (as stored in a
    checkpoint's hyperparameters) is converted field by field, nested dataclasses included."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected {cls.__name__}, a dict of its fields, or None; got {type(value).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, item in value.items():
        hint = hints.get(name)
        fields[name] = as_config(hint, item) if dataclasses.is_dataclass(hint) and isinstance(item, dict) else item
    return cls(**fields)
