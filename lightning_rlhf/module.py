"""``PPOModule``: RLHF with PPO as one LightningModule under ``trainer.fit()``.

Each ``training_step`` is one PPO iteration: a rollout from a batch of prompts, then ``ppo_epochs`` x
``num_minibatches`` clipped-surrogate updates (manual optimization). The policy is a LoRA adapter on a frozen base
model, the reference is the same base with the adapter disabled, and the critic is a value head on the same backbone.

Where this departs from the usual loop:

- ``trainer.global_step`` (so ``--trainer.max_steps`` and ``ModelCheckpoint(every_n_train_steps=...)``) counts PPO
  iterations, not optimizer steps: only the first optimizer step of an iteration goes through Lightning's step counter.
- The LR scheduler steps once per PPO iteration.
- ``objective/kl`` is the per-sequence KL (sum over the response's tokens, mean over sequences), the quantity the
  adaptive controller targets (Ziegler et al. 2019).
- Every logged metric is a global value over all processes (one summed all-reduce of (sum, count) pairs), not a mean
  of per-rank means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_rlhf import functional as F
from lightning_rlhf import strategies as _strategies  # noqa: F401  (registers --trainer.strategy fsdp2)
from lightning_rlhf.advantages import estimate_advantages
from lightning_rlhf.checkpointing import base_model_fingerprint, gather_rng_states, set_rng_state
from lightning_rlhf.config import (
    SCORE_NORM_EPS,
    GenerationConfig,
    PPOConfig,
    as_config,
    build_optimizers,
    check_ppo_with_generation,
    default_optimizer,
)
from lightning_rlhf.control import AdaptiveKLController, FixedKLController, RunningMoments, normalize_scores
from lightning_rlhf.distributed import GlobalStats, explained_variance, full_value, fully_shard_policy
from lightning_rlhf.functional.random_streams import response_keys
from lightning_rlhf.loss import loss_units, micro_batch_weight, ppo_objective
from lightning_rlhf.models import LoraConfig, PolicyConfig, PolicyValueModel, build_policy, cast_weights, load_tokenizer
from lightning_rlhf.models.config import check_dtype
from lightning_rlhf.models.vllm_engine import VLLMEngine, require_vllm, resolve_sleep_level
from lightning_rlhf.modes import full_precision
from lightning_rlhf.precision import keep_trained_weights_float32
from lightning_rlhf.rewards import CombinedReward, Reward, call_reward, fields_for, validate_scores
from lightning_rlhf.rollout import generate_rollout
from lightning_rlhf.types import Rollout, RolloutSamples


class PPOModule(LightningModule):
    """PPO for RLHF with a LoRA policy, an adapter-disabled reference and a value head on the shared backbone.

    With a critic-free ``ppo.advantage_estimator`` (GRPO, RLOO, REINFORCE++, ...) there is no value head, and
    ``generation.samples_per_prompt`` responses per prompt give the group baselines.

    Customize the reward by passing any :class:`~lightning_rlhf.rewards.Reward` (YAML ``class_path``) or a function
    ``f(prompts, responses) -> Tensor``, or by subclassing this module and overriding :meth:`reward`.

    Args:
        policy: which causal LM to train (hub id, local path, or a tiny random config) and its tokenizer.
        lora: the LoRA adapter; ``lora.enabled: false`` trains every weight against a frozen reference copy.
        generation: sampling settings of the rollout.
        ppo: PPO / RLHF hyperparameters.
        reward: the sequence-level reward; None means a subclass overrides :meth:`reward`.
        optimizer: builds the optimizer from the trainable parameters (LightningCLI ``OptimizerCallable``).
        lr_scheduler: builds an LR scheduler from the optimizer; it steps once per PPO iteration.
        eval_reward: a second reward, scored on the same rollouts and logged as ``rollout/true_reward``, never
            optimized (e.g. a ground-truth rule next to a learned reward model, so reward hacking shows as a gap).
    """

    def __init__(
        self,
        policy: PolicyConfig | None = None,
        lora: LoraConfig | None = None,
        generation: GenerationConfig | None = None,
        ppo: PPOConfig | None = None,
        reward: Reward | Callable[[list[str], list[str]], Any] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_reward: Reward | Callable[[list[str], list[str]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.policy_config = as_config(PolicyConfig, policy)
        self.lora_config = as_config(LoraConfig, lora)
        self.generation = as_config(GenerationConfig, generation)
        self.ppo = as_config(PPOConfig, ppo)
        check_ppo_with_generation(self.ppo, self.generation)
        # Plain dicts in the checkpoint, so it loads with torch.load(weights_only=True); __init__ accepts them back.
        self.save_hyperparameters(
            {
                "policy": dataclasses.asdict(self.policy_config),
                "lora": dataclasses.asdict(self.lora_config),
                "generation": dataclasses.asdict(self.generation),
                "ppo": dataclasses.asdict(self.ppo),
            }
        )
        self.automatic_optimization = False
        self.reward_fn = reward
        self.eval_reward = eval_reward
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tokenizer = load_tokenizer(self.policy_config)
        self.model: PolicyValueModel | None = None
        self.frozen_dtype: torch.dtype | None = None
        """The frozen weights' dtype under ``precision: bf16-true`` / ``16-true`` (set in ``setup``); None otherwise."""
        self.kl_ctl: FixedKLController | AdaptiveKLController = (
            FixedKLController(self.ppo.kl_coef)
            if self.ppo.target_kl is None
            else AdaptiveKLController(self.ppo.kl_coef, self.ppo.target_kl, self.ppo.kl_horizon)
        )
        self.score_moments = RunningMoments()
        self.shuffle_generator = torch.Generator()
        self.sampling_seed = torch.initial_seed()
        """Seed of the responses' random streams (:func:`~lightning_rlhf.functional.response_keys`): the run's seed,
        read again in ``setup`` (after ``seed_everything``) and restored from a checkpoint."""
        self._consecutive_skips = 0
        self._iteration_counted = False
        self._critic_warmup = False
        """True in the first ``ppo.critic_warmup_steps`` iterations, in which only the value head trains."""
        self._update_counts: dict[str, float] = {}
        self.engine: VLLMEngine | None = None
        """The vLLM engine of this process (``generation.engine: vllm``), built at the first rollout."""
        # Checkpoints hold only trained weights; the frozen base is rebuilt in configure_model.
        self.strict_loading = False

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Frozen weights in half precision under bf16-true before FSDP2 shards them; trained weights stay float32.
        policy = build_policy(self.policy_config, self.lora_config, self.tokenizer, value_head=self.ppo.uses_critic)
        self.model = cast_weights(policy, self.frozen_dtype)
        if self.device_mesh is not None:  # ModelParallelStrategy / fsdp2: shard with FSDP2 over data-parallel ranks
            fully_shard_policy(self.model, self.device_mesh["data_parallel"])

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across processes (then every process must run every collective)."""
        return self.device_mesh is not None

    def configure_optimizers(self) -> Any:
        # The scheduler is returned bare: ppo_update steps it once per PPO iteration.
        return build_optimizers(
            self._parameter_groups(), self.optimizer_factory, self.lr_scheduler_factory, interval=None
        )

    def _parameter_groups(self) -> Any:
        """The parameters, or with ``ppo.value_head_lr`` two groups: the value head at that rate, the rest."""
        if self.ppo.value_head_lr is None:
            return self.parameters()
        assert self.model is not None
        assert self.model.value_head is not None
        head = {id(p) for p in self.model.value_head.parameters()}
        return [
            {"params": [p for p in self.parameters() if id(p) not in head]},
            {"params": list(self.model.value_head.parameters()), "lr": self.ppo.value_head_lr},
        ]

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "--trainer.strategy fsdp (FSDP1) fails under PPO's manual optimization when Lightning wraps the "
                "whole LightningModule (Lightning-AI/pytorch-lightning#19685); use --trainer.strategy fsdp2, which "
                "shards the policy with FSDP2 and supports LoRA, generation and gradient clipping."
            )
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"--trainer.precision {self.trainer.precision} (float16 with a gradient scaler) is not supported: "
                "PPOModule checks and clips the gradients itself before each step. Use --trainer.precision "
                "bf16-mixed (or 32-true)."
            )
        if self.generation.engine == "vllm":  # before any weight moves: vLLM installed, sleep mode possible here
            require_vllm()
            resolve_sleep_level(self.generation.vllm_sleep_level, self.trainer.strategy.root_device)
        self.frozen_dtype = keep_trained_weights_float32(self.trainer)
        if self.frozen_dtype is not None and not self.lora_config.enabled:
            rank_zero_warn(
                f"--trainer.precision {self.trainer.precision} with full fine-tuning: every LM weight trains, so it is "
                "kept in float32 (a half-precision weight loses small optimizer steps) and the policy computes in "
                "float32; only the frozen reference copy is in half precision. Use --trainer.precision bf16-mixed "
                "to compute in bfloat16 with float32 weights."
            )
        # Seeded before a checkpoint restore (which then overwrites them); the shuffle is distinct per rank, the
        # sampling streams are named by prompt (the same seed everywhere, see rollout).
        self.sampling_seed = torch.initial_seed()
        self.shuffle_generator.manual_seed(torch.initial_seed() % 2**62 + self.global_rank)

    def on_fit_start(self) -> None:
        if isinstance(self.reward_fn, Reward):
            self.reward_fn.setup(self.device)
        if isinstance(self.eval_reward, Reward):
            self.eval_reward.setup(self.device)

    def teardown(self, stage: str) -> None:
        """Stop what the rewards started in ``setup`` (e.g. ``MathAnswerReward``'s check workers) and the vLLM
        engine."""
        for reward in (self.reward_fn, self.eval_reward):
            if isinstance(reward, Reward):
                reward.teardown()
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ---------------------------------------------------------------------------------------------------- the reward
    def reward(self, prompts: list[str], responses: list[str], **inputs: Any) -> Tensor:
        """Sequence-level scores, (B,). Override in a subclass to supply a custom reward.

        ``inputs`` are the policy's token tensors, as :meth:`lightning_rlhf.rewards.Reward.__call__` documents them
        (``prompt_ids``, ``response_ids``, ``response_mask``), and the prompt rows' own fields, one value per response
        (``answer=[...]`` for a ``.jsonl`` field ``"answer"``); an override receives the fields its signature names, or
        all with ``**kwargs``. The default calls the configured ``reward`` through
        :func:`~lightning_rlhf.rewards.call_reward` (a :class:`Reward` gets the token tensors too, every reward the
        fields it names) and wraps anything it raises in a ``RuntimeError`` that names it.
        """
        if self.reward_fn is None:
            raise NotImplementedError(
                "PPOModule has no reward: set `model.reward` (e.g. class_path: "
                "lightning_rlhf.rewards.CharFractionReward) or subclass PPOModule and override `reward(...)`."
            )
        return call_reward(
            self.reward_fn,
            prompts,
            responses,
            allow_non_finite=True,  # the caller decides: an error on the first iteration, a skipped one later
            **inputs,
        )

    # ------------------------------------------------------------------------------------------------ training step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        self._check_batch(batch)
        stats = GlobalStats()
        # 1. rollout (no grad): n responses per prompt; old and reference logprobs; values   -> rollout.py
        rollout = self.rollout(batch)
        # 1b. engine vs trainer (engine: vllm): logprob gap; truncated IS weights for the loss -> functional
        rollout = self.correct_rollout(rollout, stats)
        # 2. score: reward on (prompt, response), then penalties / normalize / clip; loss mask -> rewards/
        scored = self.score(batch["prompts"], rollout, stats, batch.get("fields"))
        if scored is None:  # non-finite scores after the first iteration: no update from this rollout
            self._skip_iteration()
            return
        rollout, samples = scored
        # 3. shape: per-token reward = score at last token - kl_coef * KL                   -> functional.token_rewards
        rollout = self.shape_rewards(rollout, stats)
        # 4. advantages: GAE with the critic, or a critic-free estimator (GRPO, RLOO, ...)   -> advantages.py
        rollout = self.estimate_advantages(rollout, stats)
        rollout_seconds = time.perf_counter() - started  # before the hooks: a slow callback is not the rollout's
        self._call_rl_hook("on_rollout_end", rollout=rollout, samples=samples)
        # 5. optimise: ppo_epochs x shuffled minibatches; manual_backward; clip; step        -> loss.ppo_objective
        self.ppo_update(rollout, stats)
        # 6. log: global metrics under group/name keys; update the KL controller
        self._log_and_control(rollout, stats, rollout_seconds, time.perf_counter() - started)

    def _check_batch(self, batch: dict[str, Any]) -> None:
        prompts, n = int(batch["prompt_ids"].shape[0]), self.generation.samples_per_prompt
        if prompts == 0:
            raise ValueError("Received an empty prompt batch; check the data source and data.batch_size.")
        size = prompts * n
        rollout_size = f"{size} (= data.batch_size {prompts} x model.generation.samples_per_prompt {n})"
        if size % self.ppo.num_minibatches:
            raise ValueError(
                f"model.ppo.num_minibatches={self.ppo.num_minibatches} must divide the per-device rollout size "
                f"{rollout_size}; change model.ppo.num_minibatches, data.batch_size or "
                "model.generation.samples_per_prompt."
            )
        minibatch = size // self.ppo.num_minibatches
        micro = self.ppo.micro_batch_size
        if micro is not None and minibatch % micro:
            raise ValueError(
                f"model.ppo.micro_batch_size={micro} must divide the minibatch size {minibatch} "
                f"(= rollout size {rollout_size} / model.ppo.num_minibatches {self.ppo.num_minibatches})."
            )

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Step 1: sample ``generation.samples_per_prompt`` responses to every prompt of ``batch`` and score them with
        the rollout policy, the reference and the critic (:func:`~lightning_rlhf.rollout.generate_rollout`)."""
        assert self.model is not None
        # One random stream per response, named by (seed, iteration, prompt, sample): processes sample different
        # responses because they hold different prompts, and a prompt's responses do not depend on the number of
        # devices.
        n = self.generation.samples_per_prompt
        prompt_index = self._prompt_index(batch).repeat_interleave(n)
        sample_index = torch.arange(n, device=prompt_index.device).repeat(len(prompt_index) // n)
        keys = response_keys(self.sampling_seed, self.global_step, prompt_index, sample_index)
        engine = self._vllm_engine()
        with self._engine_loaded(engine, batch):
            return generate_rollout(
                self.model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                self.generation,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                micro_batch_size=self.ppo.micro_batch_size,
                synced_gpus=self.sharded,
                options=self.ppo.forward_options,
                sample_keys=keys,
                engine=engine,
            )

    def _engine_loaded(self, engine: VLLMEngine | None, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """With a vLLM engine: the current policy loaded into it for the body, and the engine asleep afterwards; the
        first batch's shape (responses sampled at once, prompt + response length) sizes its CPU KV cache."""
        if engine is None:
            return contextlib.nullcontext()
        assert self.model is not None
        prompts, prompt_len = batch["prompt_ids"].shape
        sequences = min(self.generation.batch_size or prompts, prompts) * self.generation.samples_per_prompt
        return engine.sampling(self.model.lm, sequences, prompt_len + self.generation.max_new_tokens)

    def _vllm_engine(self) -> VLLMEngine | None:
        """This process's vLLM engine with ``generation.engine: vllm`` (built on first use), else None."""
        if self.generation.engine != "vllm":
            return None
        if self.engine is None:
            precision = str(self.trainer.precision)
            dtype = (
                torch.bfloat16
                if precision.startswith("bf16")
                else torch.float16
                if precision.startswith("16")
                else check_dtype(self.policy_config.dtype)
            )
            trainer = self.trainer
            process = (trainer.global_rank, trainer.local_rank, trainer.world_size) if trainer.world_size > 1 else None
            self.engine = VLLMEngine(self.policy_config, self.generation, dtype, self.device, process)
        return self.engine

    def correct_rollout(self, rollout: Rollout, stats: GlobalStats) -> Rollout:
        """Step 1b, with an engine that keeps its own logprobs (vLLM): log how far they are from the trainer's
        (``rollout/engine_logprob_gap``, mean |engine - trainer| per token) and, with ``ppo.rollout_correction``,
        set the loss's importance weights (:func:`~lightning_rlhf.functional.rollout_correction_weights`)."""
        if rollout.engine_logprobs is None:
            return rollout
        mask, n_tokens = rollout.response_mask, rollout.response_mask.sum()
        gap = (rollout.engine_logprobs - rollout.old_logprobs).abs()
        stats.add("rollout/engine_logprob_gap", F.masked_sum(gap, mask), n_tokens)
        if self.ppo.rollout_correction == "none":
            return rollout
        weights = F.rollout_correction_weights(
            rollout.old_logprobs,
            rollout.engine_logprobs,
            mask,
            self.ppo.rollout_correction,
            self.ppo.rollout_correction_cap,
        )
        stats.add("rollout/is_weight", F.masked_sum(weights, mask), n_tokens)
        if self.ppo.rollout_correction == "seq_mis":
            dropped = (weights == 0) & mask  # a response past the cap has every weight 0
            stats.add("rollout/is_masked_frac", dropped.any(-1).float().sum(), len(rollout))
        return dataclasses.replace(rollout, is_weights=weights)

    def _prompt_index(self, batch: dict[str, Any]) -> Tensor:
        """(B,) each prompt's index in the data (``PromptDataModule`` batches carry it); without one, the rows are
        numbered per process (``rank * B + row``), so responses then depend on the number of devices."""
        if "prompt_index" in batch:
            return batch["prompt_index"]
        size = batch["prompt_ids"].shape[0]
        return self.global_rank * size + torch.arange(size, device=batch["prompt_ids"].device)

    def decode_responses(self, rollout: Rollout) -> list[str]:
        """Response texts without the stop token (whether or not it is a special token) and padding."""
        rows = [ids[mask].tolist() for ids, mask in zip(rollout.response_ids, rollout.text_mask(), strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def score(
        self, prompts: list[str], rollout: Rollout, stats: GlobalStats, fields: dict[str, list[Any]] | None = None
    ) -> tuple[Rollout, RolloutSamples] | None:
        """Step 2: score the rollout; None when, after the first iteration, any process got a NaN or infinite score.

        ``prompts`` are the batch's prompt texts and ``fields`` its prompt rows' own fields, one value per prompt:
        each response is scored with its own prompt and fields (``rollout.group_index``). On the first iteration
        every problem with the scores (non-finite included) raises, so a broken reward stops the run before any weight
        moves; later, a rare non-finite score skips one iteration instead of a long run. Rewards run at full
        precision (:func:`~lightning_rlhf.modes.full_precision`), whatever the trainer's. Also sets the rollout's
        ``loss_mask`` (:meth:`trained_responses`). A :class:`~lightning_rlhf.rewards.CombinedReward` adds each
        component's raw mean score as ``rollout/score/<name>``.
        """
        fields = dict(fields or {})
        if rollout.group_index is not None:
            groups = rollout.group_index.tolist()
            prompts = [prompts[group] for group in groups]
            fields = {name: [values[group] for group in groups] for name, values in fields.items()}
        responses = self.decode_responses(rollout)
        tensors = {
            "prompt_ids": rollout.prompt_ids,
            "response_ids": rollout.response_ids,
            "response_mask": rollout.response_mask,
        }
        with full_precision(self.device.type):
            raw = self.reward(prompts, responses, **tensors, **fields_for(self.reward, fields))
        source = f"{type(self).__name__}.reward"
        raw = validate_scores(raw, len(rollout), source, allow_non_finite=True).to(self.device)
        non_finite = not bool(torch.isfinite(raw).all())
        if self.global_step > 0 and self._any_process(non_finite):
            return None
        if non_finite:
            validate_scores(raw, len(rollout), source)  # raises, naming the rows
        lengths = rollout.response_mask.sum(-1).float()
        shaped = raw
        if self.ppo.overlong_buffer is not None:  # part of the reward: before normalization and group baselines
            penalty = F.overlong_penalty(
                lengths, self.generation.max_new_tokens, self.ppo.overlong_buffer, self.ppo.overlong_penalty
            )
            shaped = raw + penalty
            stats.add("rollout/overlong_penalty", penalty.sum(), penalty.numel())
        scores = self.process_scores(shaped, rollout.ended)
        loss_mask = self.trained_responses(rollout, scores, stats)
        stats.add("rollout/score", raw.sum(), raw.numel())
        stats.add("rollout/_score_sq", raw.double().square().sum(), raw.numel())
        if isinstance(self.reward_fn, CombinedReward):  # the raw terms of rollout/score, before their weights
            for name, component in self.reward_fn.component_scores.items():
                stats.add(f"rollout/score/{name}", component.sum(), component.numel())
        stats.add("rollout/response_len", lengths.sum(), lengths.numel())
        stats.add("rollout/eos_frac", rollout.ended.float().sum(), lengths.numel())
        if self.eval_reward is not None:
            with full_precision(self.device.type):
                true_reward = call_reward(self.eval_reward, prompts, responses, **tensors, **fields)
            stats.add("rollout/true_reward", true_reward.sum(), true_reward.numel())
        scored = dataclasses.replace(rollout, scores=scores, loss_mask=loss_mask)
        return scored, RolloutSamples(prompts, responses, raw)

    def trained_responses(self, rollout: Rollout, scores: Tensor, stats: GlobalStats) -> Tensor | None:
        """(B,) bool ``loss_mask``: the responses the update trains on, or None for all of them.

        ``ppo.filter_zero_std_groups`` leaves out the groups whose ``scores`` are all equal (no signal: every
        group-relative advantage is 0; DAPO's dynamic sampling without refill), ``ppo.mask_truncated`` the responses
        without a stop token. With several samples per prompt the share of such groups is logged either way.
        """
        keep = None
        if self.generation.samples_per_prompt > 1 and rollout.group_index is not None:
            zero_std = F.zero_std_groups(scores, rollout.group_index)
            stats.add("rollout/zero_std_frac", zero_std.float().sum(), zero_std.numel())
            if self.ppo.filter_zero_std_groups:
                keep = ~zero_std
        if self.ppo.mask_truncated:
            keep = rollout.ended if keep is None else keep & rollout.ended
        if keep is not None:
            stats.add("rollout/trained_frac", keep.float().sum(), keep.numel())
        return keep

    def process_scores(self, raw: Tensor, ended: Tensor) -> Tensor:
        """Raw scores (B,) -> the scores PPO optimizes: normalize, clip, then the missing-EOS penalty.

        The penalty comes last so it is in the units of the normalized score whatever the reward's scale.
        """
        reduce_sum = self._all_reduce_sum if self.ppo.stats_scope == "global" else None
        scores = normalize_scores(raw, self.ppo.score_norm, self.score_moments, reduce_sum, SCORE_NORM_EPS)
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        if self.ppo.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - self.ppo.missing_eos_penalty)
        return scores

    def shape_rewards(self, rollout: Rollout, stats: GlobalStats) -> Rollout:
        """Step 3: per-token rewards, the score on the last real token plus, with ``ppo.kl_placement: reward``,
        ``-kl_coef * KL`` on every response token (with ``loss`` the KL is a term of the objective instead)."""
        kl = F.kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, self.ppo.kl_estimator)
        kl = torch.where(rollout.response_mask, kl, 0.0)
        in_reward = self.kl_ctl.value if self.ppo.kl_placement == "reward" else 0.0
        rewards = F.token_rewards(rollout.scores, kl, rollout.response_mask, in_reward)
        seq_kl = kl.sum(-1)
        stats.add("objective/kl", seq_kl.sum(), seq_kl.numel())
        stats.add("objective/rlhf_reward", (rollout.scores - self.kl_ctl.value * seq_kl).sum(), seq_kl.numel())
        return dataclasses.replace(rollout, kl=kl, rewards=rewards)

    def estimate_advantages(self, rollout: Rollout, stats: GlobalStats) -> Rollout:
        """Step 4: advantages by ``ppo.advantage_estimator`` (:func:`~lightning_rlhf.advantages.estimate_advantages`);
        with the critic also its value targets, logged with its explained variance."""
        reduce_sum = self._all_reduce_sum if self.ppo.stats_scope == "global" else None
        advantages, returns = estimate_advantages(rollout, self.ppo, reduce_sum)
        if self.ppo.uses_critic:
            mask, n_tokens = rollout.response_mask, rollout.response_mask.sum()
            stats.add("value/returns", F.masked_sum(returns, mask), n_tokens)
            # The same global value on every process: its mean over them is itself.
            explained = explained_variance(returns, rollout.old_values, mask, self._all_reduce_sum)
            stats.add("value/explained_var", explained)
        return dataclasses.replace(rollout, advantages=advantages, returns=returns)

    def _any_process(self, flag: bool) -> bool:
        """True when ``flag`` is True on any process (every process must call this at the same point)."""
        return bool(self._all_reduce_sum(torch.tensor(float(flag), dtype=torch.float32, device=self.device)) > 0)

    def _skip_iteration(self) -> None:
        """Count a rollout whose scores were not finite: no update, but the iteration still advances the step."""
        self._count_skip("the reward returned NaN or infinite scores", what="iteration")
        self._step_without_update(self.optimizers())
        self.log("rollout/skipped", 1.0, on_step=True, on_epoch=False, batch_size=1)

    def _count_skip(self, reason: str, what: str) -> None:
        """One more skipped ``what`` (iteration or update) in a row: warn, or raise past ``max_consecutive_skips``."""
        self._consecutive_skips += 1
        if self._consecutive_skips > self.ppo.max_consecutive_skips:
            raise RuntimeError(
                f"{self._consecutive_skips} consecutive PPO iterations or updates were skipped, the last because "
                f"{reason}. Lower the learning rate, fix the reward (guard divisions, clip extreme values), or raise "
                "model.ppo.max_consecutive_skips."
            )
        rank_zero_warn(f"Skipping a PPO {what} because {reason}.", category=RuntimeWarning)

    @staticmethod
    def _step_without_update(optimizer: Any) -> None:
        """An optimizer step with no gradients: parameters stay, but ``trainer.global_step`` counts the iteration."""
        optimizer.zero_grad(set_to_none=True)
        optimizer.step()

    # ---------------------------------------------------------------------------------------------- the PPO update
    def ppo_update(self, rollout: Rollout, stats: GlobalStats) -> None:
        """Step 5: ``ppo_epochs`` passes of ``num_minibatches`` shuffled minibatches, one optimizer step each.

        A minibatch with no trained token on any process (every response left out by ``loss_mask``) makes no step:
        a step with zero gradients would still move AdamW's weights (momentum, weight decay). During the critic
        warm-up (``ppo.critic_warmup_steps``) only the value head steps.
        """
        optimizer = self.optimizers()
        self._iteration_counted = False
        # Fixed for the whole iteration: global_step advances at its first optimizer step.
        self._critic_warmup = self.global_step < self.ppo.critic_warmup_steps
        applied = skipped = 0
        stop = False
        for epoch in range(self.ppo.ppo_epochs):
            for index, minibatch in enumerate(rollout.minibatches(self.ppo.num_minibatches, self.shuffle_generator)):
                units = self._minibatch_units(minibatch)
                if units is None:
                    continue
                minibatch_stats, total_norm = self._accumulate_gradients(minibatch, units, stats)
                if self._apply_update(optimizer, minibatch_stats, total_norm, stats):
                    applied += 1
                else:
                    skipped += 1
                self._call_rl_hook("on_ppo_minibatch_end", epoch=epoch, index=index, stats=minibatch_stats)
                # Global values (reduced across processes), so every process stops at the same minibatch.
                early_stop_kl = self.ppo.early_stop_kl
                if early_stop_kl is not None and minibatch_stats["policy/approx_kl"] > early_stop_kl:
                    stop = True
                    break
            self._call_rl_hook("on_ppo_epoch_end", epoch=epoch)
            if stop:
                break
        if not self._iteration_counted:  # every update was skipped
            self._step_without_update(optimizer)
        self._update_counts = {"policy/updates": applied, "policy/skipped_updates": skipped, "policy/early_stop": stop}
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _minibatch_units(self, minibatch: Rollout) -> Tensor | None:
        """What the minibatch's loss averages over (its trained tokens, or responses: :func:`~lightning_rlhf.loss.
        loss_units`), as the per-process mean over processes under ``stats_scope: global``; None when no process has
        any (only possible with a ``loss_mask``; every process gets the same answer)."""
        units = loss_units(minibatch, self.ppo.aggregation).double()
        # The mean over the *global* minibatch: data-parallel gradients are averaged over processes, so each process
        # divides its sum by the mean count per process. Results do not depend on how the batch is split across
        # devices.
        if self.ppo.stats_scope == "global":
            units = self._all_reduce_sum(units) / self.trainer.world_size
        if minibatch.loss_mask is not None:
            total = units if self.ppo.stats_scope == "global" else self._all_reduce_sum(units)
            if not bool(total > 0):
                return None
        return units

    def _accumulate_gradients(
        self, minibatch: Rollout, units: Tensor, stats: GlobalStats
    ) -> tuple[dict[str, float], Tensor]:
        """Backward over the minibatch in micro-batches; ``units`` is what its loss averages over
        (:meth:`_minibatch_units`).

        Returns its global (all-process) loss statistics and the gradient norm as ``_grad_norm`` returns it.
        """
        micro = self.ppo.micro_batch_size or len(minibatch)
        minibatch_stats = GlobalStats()
        if micro < len(minibatch):  # similar lengths in each micro-batch: less padding (the gradient sum is the same)
            minibatch = minibatch.select(minibatch.length_order())
        starts = range(0, len(minibatch), micro)
        for start in starts:
            rows = torch.arange(start, min(start + micro, len(minibatch)), device=self.device)
            micro_batch = minibatch.select(rows)
            # Each micro-batch's loss is weighted by its share of the minibatch, so the accumulated gradient equals
            # the gradient of the minibatch loss under every aggregation.
            weight = micro_batch_weight(micro_batch, units, self.ppo.aggregation)
            loss = self._loss(micro_batch, stats, minibatch_stats)
            # DDP all-reduces the gradient once per minibatch, after its last micro-batch (no_sync before: the sum is
            # the same). FSDP2 reduce-scatters after each, which keeps its gradients sharded.
            with contextlib.nullcontext() if start == starts[-1] else self._gradient_sync_blocked():
                self.manual_backward(loss * weight)
        if self._critic_warmup:
            self._keep_only_value_head_gradients()
        total_norm = self._grad_norm()
        minibatch_stats.add("policy/grad_norm", full_value(total_norm))
        return minibatch_stats.reduce(self._all_reduce_sum, self.device), total_norm

    def _gradient_sync_blocked(self) -> contextlib.AbstractContextManager[None]:
        """Backward passes inside accumulate gradients locally under DDP (``no_sync``); elsewhere a no-op."""
        strategy = self.trainer.strategy
        return strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else contextlib.nullcontext()

    def _apply_update(
        self, optimizer: Any, minibatch_stats: dict[str, float], total_norm: Tensor, stats: GlobalStats
    ) -> bool:
        """Clip and step, unless the loss or gradient is not finite or the ratio is past ``ratio_threshold``.

        Every input to the decision is a global value, so all processes take the same branch.
        """
        grad_norm = minibatch_stats["policy/grad_norm"]
        reason = None
        if not (math.isfinite(grad_norm) and math.isfinite(minibatch_stats["loss/total"])):
            reason = f"the loss ({minibatch_stats['loss/total']}) or gradient norm ({grad_norm}) is non-finite"
        elif self.ppo.ratio_threshold is not None and minibatch_stats["policy/ratio_mean"] > self.ppo.ratio_threshold:
            reason = f"the mean ratio {minibatch_stats['policy/ratio_mean']:.3g} > model.ppo.ratio_threshold"
        if reason is not None:
            optimizer.zero_grad(set_to_none=True)
            self._count_skip(reason, what="update")
            return False
        self._consecutive_skips = 0
        stats.add("policy/grad_norm", grad_norm)
        if self.ppo.max_grad_norm is not None:  # clip with the norm just logged: no second pass over the gradients
            torch.nn.utils.clip_grads_with_norm_(self._trainable, self.ppo.max_grad_norm, total_norm)
        self._optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return True

    def _loss(self, micro_batch: Rollout, stats: GlobalStats, minibatch_stats: GlobalStats) -> Tensor:
        assert self.model is not None
        terms = ppo_objective(
            self.model,
            micro_batch,
            self.ppo,
            self.generation.temperature,
            kl_coef=self.kl_ctl.value,
            norm_length=self.generation.max_new_tokens,
            train_policy=not self._critic_warmup,
        )
        n, units = terms.tokens, terms.units  # token statistics are token means; the loss terms, the loss's own mean
        for record in (stats, minibatch_stats):
            record.add("loss/policy", terms.policy_loss * units, units)
            if terms.value_loss is not None:
                record.add("loss/value", terms.value_loss * units, units)
            if terms.kl_loss is not None:
                record.add("loss/kl", terms.kl_loss * units, units)
            record.add("loss/total", terms.loss.detach() * units, units)
            record.add("policy/entropy", terms.entropy * n, n)
            record.add("policy/approx_kl", terms.policy.approx_kl * n, n)
            record.add("policy/clipfrac", terms.policy.clipfrac * n, n)
            record.add("policy/ratio_mean", terms.policy.ratio_mean * n, n)
            if terms.value is not None:
                record.add("value/clipfrac", terms.value.clipfrac * n, n)
        return terms.loss

    def _keep_only_value_head_gradients(self) -> None:
        """Drop every gradient but the value head's (the value loss reaches the shared LoRA backbone too); an
        optimizer skips a parameter without a gradient, weight decay included."""
        assert self.model is not None
        assert self.model.value_head is not None
        head = {id(p) for p in self.model.value_head.parameters()}
        for param in self.parameters():
            if id(param) not in head:
                param.grad = None

    @property
    def _trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def _grad_norm(self) -> Tensor:
        """L2 norm of all gradients, as ``clip_grad_norm_`` computes it (under FSDP2 a DTensor: see ``full_value``)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    def _optimizer_step(self, optimizer: Any) -> None:
        """Step the optimizer; only an iteration's first step advances ``trainer.global_step`` (one per iteration)."""
        if self._iteration_counted:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
        else:
            optimizer.step()
            self._iteration_counted = True

    def _call_rl_hook(self, name: str, **kwargs: Any) -> None:
        """Call ``name(trainer, module, **kwargs)`` on every callback that defines it (the RL-phase hooks)."""
        for callback in self.trainer.callbacks:
            hook = getattr(callback, name, None)
            if callable(hook):
                hook(self.trainer, self, **kwargs)

    # --------------------------------------------------------------------------------------------- logging, control
    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self._trainer is None:  # used outside fit (tests, notebooks): this process is the whole world
            return tensor
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum")

    def _log_and_control(self, rollout: Rollout, stats: GlobalStats, rollout_seconds: float, seconds: float) -> None:
        stats.add("perf/_gen_tokens", rollout.response_mask.sum(), 1.0)
        metrics = stats.reduce(self._all_reduce_sum, self.device)
        score_sq = metrics.pop("rollout/_score_sq")
        metrics["rollout/score_std"] = math.sqrt(max(score_sq - metrics["rollout/score"] ** 2, 0.0))
        gen_tokens = metrics.pop("perf/_gen_tokens") * self.trainer.world_size
        metrics["perf/tokens_per_sec"] = gen_tokens / max(seconds, 1e-9)
        metrics["perf/rollout_sec"] = rollout_seconds
        metrics["perf/iteration_sec"] = seconds
        metrics["objective/kl_coef"] = self.kl_ctl.value
        metrics["rollout/skipped"] = 0.0  # logged every iteration: a logger keeps a key's last value otherwise
        metrics.update({name: float(value) for name, value in self._update_counts.items()})
        self.kl_ctl.update(metrics["objective/kl"], n_steps=len(rollout) * self.trainer.world_size)
        progress = {"rollout/score", "objective/kl"}
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in progress, on_step=True, on_epoch=False, batch_size=len(rollout))

    # ------------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lightning_rlhf"] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "base_model": base_model_fingerprint(self.policy_config, self.lora_config),
            "sampling_seed": self.sampling_seed,
            # Every process's random states (minibatch shuffling, the global generators), so a resumed run continues
            # exactly; sampling needs only the seed and the step.
            "rng": gather_rng_states(self.shuffle_generator),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightning_rlhf")
        if state is None:
            raise ValueError("This checkpoint was not written by PPOModule (no 'lightning_rlhf' entry); cannot resume.")
        saved, current = state["base_model"], base_model_fingerprint(self.policy_config, self.lora_config)
        if saved != current:
            raise ValueError(
                f"The checkpoint was trained on another base model or adapter layout: it has {saved}, this run has "
                f"{current}. Resume with the checkpoint's model.policy / model.lora settings."
            )
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.sampling_seed = state.get("sampling_seed", self.sampling_seed)  # absent from older checkpoints
        rng, world_size = state["rng"], self.trainer.world_size if self._trainer is not None else 1
        if len(rng) == world_size:
            set_rng_state(rng[self.global_rank], self.shuffle_generator)
        else:
            rank_zero_warn(
                f"The checkpoint holds random states of {len(rng)} processes, this run has {world_size}: "
                "minibatch shuffling continues from fresh random states, so the run is not an exact continuation."
            )
