"""``RewardModelModule``: a scalar reward model trained on preference pairs with the Bradley-Terry loss.

The loss is ``-log sigmoid(r_chosen - r_rejected - margin)`` (:func:`lightning_rlhf.functional.bradley_terry_loss`)
on an ``AutoModelForSequenceClassification`` with ``num_labels=1``, whose score is the logit at the last real token
(the Hugging Face head pools at the last token that is not ``config.pad_token_id``). ``reward_model.name_or_path``
may name a sequence-classification checkpoint, or a causal LM (for instance the SFT stage's output): the same
backbone then gets a new scalar head ("a causal LM with a scalar head", as in InstructGPT, where the reward model
starts from the SFT model). ``None`` builds a tiny random Llama with a scalar head.

Speed: with ``packing: true`` each batch's sequences (both halves of every pair) run packed into fewer rows
(:mod:`lightning_rlhf.models.packing`): no compute on padding, scores equal to the padded forward's up to rounding.

Metrics (torchmetrics, per step in training and over the whole set in validation): ``train/loss``,
``train/accuracy`` (share of pairs with r_chosen > r_rejected; a tie counts as wrong), ``train/margin`` (mean
r_chosen - r_rejected), and the same under ``val/``.

The hand-off to PPO: at the end of ``fit`` the module writes ``output_dir`` as a plain Hugging Face
sequence-classification directory (merged weights if LoRA was used, ``num_labels=1``, ``pad_token_id`` set) with the
tokenizer, which :class:`~lightning_rlhf.rewards.RewardModelScorer` loads directly:
``reward: {class_path: lightning_rlhf.rewards.RewardModelScorer, init_args: {name_or_path: <output_dir>}}``. Training
data (:class:`~lightning_rlhf.data.PreferenceDataModule`) is encoded exactly as the scorer encodes PPO's
rollouts, so the scores PPO optimizes are the ones the model was trained to give.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_rlhf import functional as F
from lightning_rlhf.config import as_config, build_optimizers
from lightning_rlhf.models import (
    LoraConfig,
    RewardModelConfig,
    build_model,
    cast_weights,
    check_local_path,
    load_tokenizer,
    packed_classifier_scores,
)
from lightning_rlhf.precision import keep_trained_weights_float32

METRICS = ("loss", "accuracy", "margin")
"""Logged under ``train/`` and ``val/``."""


def default_rm_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-5 and no weight decay (InstructGPT-scale reward-model rate), used when the recipe names none."""
    return torch.optim.AdamW(params, lr=1.0e-5, weight_decay=0.0)


def build_reward_model(cfg: RewardModelConfig, lora: LoraConfig, tokenizer: Any) -> nn.Module:
    """The scalar reward model of ``cfg`` (:func:`~lightning_rlhf.models.build_model` as a sequence classifier with
    one label, LoRA training its new head in full), with ``config.pad_token_id`` = the tokenizer's pad id.

    The pad id is set so the head reads the score at the last real token of a right-padded row, the way
    :class:`~lightning_rlhf.data.PreferenceCollator` and ``RewardModelScorer`` pad.

    Raises:
        ValueError: ``reward_model.name_or_path`` is a classifier with several labels.
    """
    if cfg.name_or_path is not None:
        check_local_path(cfg.name_or_path, "model.reward_model.name_or_path")
        try:
            config = transformers.AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        except OSError as err:
            raise OSError(f"Could not load model.reward_model.name_or_path={cfg.name_or_path!r}: {err}") from err
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
        if is_classifier and config.num_labels != 1:
            raise ValueError(
                f"model.reward_model.name_or_path={cfg.name_or_path!r} is a classifier with "
                f"num_labels={config.num_labels}; a reward model has one scalar output. Start from its base model (a "
                "causal LM) or a num_labels=1 checkpoint."
            )
    classifier = transformers.AutoModelForSequenceClassification
    model = build_model(cfg, lora, tokenizer, "model.reward_model", classifier, "SEQ_CLS", num_labels=1)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.pad_token_id = tokenizer.pad_token_id
    return model


class RewardModelModule(LightningModule):
    """A scalar reward model trained with the Bradley-Terry pairwise loss; saves an HF directory PPO's scorer loads.

    Args:
        reward_model: which model to train (sequence classifier, causal LM + new head, or tiny random) and its
            tokenizer.
        lora: LoRA adapter (the scalar head trains in full); ``lora.enabled: false`` trains every weight.
        output_dir: where ``fit`` writes the model and tokenizer at its end (rank 0); None writes nothing. It is
            PPO's ``RewardModelScorer(name_or_path=...)``.
        save_adapter: with LoRA, also write the adapter alone to ``output_dir/adapter``.
        packing: score each batch's sequences packed into fewer rows
            (:func:`lightning_rlhf.models.packed_classifier_scores`); pays when sequences differ in length. The model
            is checked to keep packed sequences apart before its first packed forward.
        optimizer: builds the optimizer from the trainable parameters (LightningCLI ``OptimizerCallable``).
        lr_scheduler: builds an LR scheduler from the optimizer; it steps every optimizer step.
    """

    def __init__(
        self,
        reward_model: RewardModelConfig | None = None,
        lora: LoraConfig | None = None,
        output_dir: str | None = None,
        save_adapter: bool = True,
        packing: bool = False,
        optimizer: OptimizerCallable = default_rm_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.reward_model_config = as_config(RewardModelConfig, reward_model)
        self.lora_config = as_config(LoraConfig, lora)
        self.save_hyperparameters(
            {
                "reward_model": dataclasses.asdict(self.reward_model_config),
                "lora": dataclasses.asdict(self.lora_config),
                "output_dir": output_dir,
                "save_adapter": save_adapter,
                "packing": packing,
            }
        )
        self.output_dir = output_dir
        self.save_adapter = save_adapter
        self.packing = packing
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tokenizer = load_tokenizer(self.reward_model_config, "model.reward_model", padding_side="right")
        self.model: nn.Module | None = None
        self.frozen_dtype: torch.dtype | None = None
        """The frozen weights' dtype under ``precision: bf16-true`` (set in ``setup``): trained weights stay float32."""
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        self.frozen_dtype = keep_trained_weights_float32(self.trainer)

    def configure_model(self) -> None:
        if self.model is None:
            model = build_reward_model(self.reward_model_config, self.lora_config, self.tokenizer)
            self.model = cast_weights(model, self.frozen_dtype)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N,) float32 scores of right-padded sequences ``input_ids`` (N, L) with bool ``attention_mask``."""
        if self.model is None:
            raise RuntimeError("RewardModelModule has no model yet; call configure_model() (trainer.fit does).")
        if self.packing:
            return packed_classifier_scores(self.model, input_ids, attention_mask, "model.packing")
        return self.model(input_ids=input_ids, attention_mask=attention_mask.long()).logits[:, 0].float()

    def pair_scores(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) scores, each (B,), from one forward over both halves of a preference batch."""
        size = batch["chosen_ids"].shape[0]
        scores = self(
            torch.cat([batch["chosen_ids"], batch["rejected_ids"]]),
            torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
        )  # (2B,)
        return scores[:size], scores[size:]

    def _step(self, batch: dict[str, Tensor], metrics: nn.ModuleDict, stage: str) -> Tensor:
        chosen, rejected = self.pair_scores(batch)
        loss, stats = F.bradley_terry_loss(chosen, rejected, batch.get("margin"))
        size = chosen.shape[0]
        in_training = stage == "train"
        for name, value in (("loss", loss.detach()), ("accuracy", stats.accuracy), ("margin", stats.margin)):
            metric = metrics[name]
            if in_training:
                metric(value, weight=size)  # forward: this batch's value, and the running mean
            else:
                metric.update(value, weight=size)
            self.log(
                f"{stage}/{name}",
                metric,
                prog_bar=name in ("loss", "accuracy"),
                on_step=in_training,
                on_epoch=not in_training,
                batch_size=size,
            )
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, self.train_metrics, "train")

    def on_validation_epoch_start(self) -> None:
        # Fresh states in this loop's grad mode: states last reset inside trainer.validate() are inference tensors,
        # which fit's validation (no_grad, not inference mode) could not update.
        for metric in self.val_metrics.values():
            metric.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def on_fit_end(self) -> None:
        if self.output_dir is not None and self.trainer.is_global_zero:
            self.save_pretrained(self.output_dir)

    # ------------------------------------------------------------------------------------------------------ export
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the (merged) sequence-classification model and the tokenizer to ``path``, loadable by
        ``RewardModelScorer(name_or_path=path)``; with LoRA and ``save_adapter`` also the adapter to
        ``path/adapter``. The merge runs on a copy, so training can go on afterwards.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        if self.model is None:
            raise RuntimeError("RewardModelModule has no model to save; call configure_model() first.")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        if isinstance(model, peft.PeftModel):
            if self.save_adapter:
                model.save_pretrained(path / "adapter")
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path
