"""``RewardModelModule``: a scalar reward model trained on preference pairs with the Bradley-Terry loss.

The loss is ``-log sigmoid(r_chosen - r_rejected - margin)`` (:func:`lightning_rlhf.functional.bradley_terry_loss`)
on an ``AutoModelForSequenceClassification`` with ``num_labels=1``, whose score is the logit at the last real token
(the Hugging Face head pools at the last token that is not ``config.pad_token_id``). ``reward_model.name_or_path``
may name a sequence-classification checkpoint, or a causal LM (for instance the SFT stage's output): the same
backbone then gets a new scalar head ("a causal LM with a scalar head", as in InstructGPT, where the reward model
starts from the SFT model). ``None`` builds a tiny random Llama with a scalar head.

Speed: with ``packing: true`` each batch's sequences (both halves of every pair) run packed into fewer rows
(:mod:`lightning_rlhf.packing`): no compute on padding, scores equal to the padded forward's up to rounding.

Metrics (torchmetrics, per step in training and over the whole set in validation): ``train/loss``,
``train/accuracy`` (share of pairs with r_chosen > r_rejected; a tie counts as wrong), ``train/margin`` (mean
r_chosen - r_rejected), and the same under ``val/``.

The hand-off to PPO: at the end of ``fit`` the module writes ``output_dir`` as a plain Hugging Face
sequence-classification directory (merged weights if LoRA was used, ``num_labels=1``, ``pad_token_id`` set) with the
tokenizer, which :class:`~lightning_rlhf.rewards.RewardModelScorer` loads directly:
``reward: {class_path: lightning_rlhf.rewards.RewardModelScorer, init_args: {name_or_path: <output_dir>}}``. Training
data (:class:`~lightning_rlhf.pipeline_data.PreferenceDataModule`) is encoded exactly as the scorer encodes PPO's
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
from lightning_rlhf.config import as_config
from lightning_rlhf.models import (
    BYTE_TOKENIZER,
    LoraConfig,
    TinyModelConfig,
    _check_dtype,
    _enable_checkpointing,
    _naming_attn_implementation,
    build_tiny,
    load_pretrained_tokenizer,
    packed_classifier_scores,
)

METRICS = ("loss", "accuracy", "margin")
"""Logged under ``train/`` and ``val/``."""


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Which model becomes the reward model, and how to load it."""

    name_or_path: str | None = None
    """HF hub id or local directory of a sequence-classification model (``num_labels=1``) or of a causal LM, which
    gets a new scalar head; None builds a tiny random Llama with a scalar head from ``tiny``."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; None means the same as ``name_or_path``, or ``"byte"`` (ByT5, no files) when
    that is None."""
    dtype: str = "float32"
    """Parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code from the checkpoint's repository to run."""
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    """Shape of the tiny random model; used only when ``name_or_path`` is None."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (non-reentrant checkpointing) to save memory."""
    attn_implementation: str | None = None
    """Attention kernel, passed to ``transformers``: None keeps its default (``"sdpa"``); ``"eager"``, ``"sdpa"``,
    ``"flex_attention"``, or ``"flash_attention_2"`` (needs the ``flash-attn`` package and a GPU; it runs packed rows,
    ``packing``, with variable-length kernels instead of a block mask)."""


def default_rm_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-5 and no weight decay (InstructGPT-scale reward-model rate), used when the recipe names none."""
    return torch.optim.AdamW(params, lr=1.0e-5, weight_decay=0.0)


def load_rm_tokenizer(cfg: RewardModelConfig) -> Any:
    """The tokenizer of ``cfg`` with a pad token (EOS if it has none) and right padding.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
        OSError: it cannot be loaded (the message names ``reward_model.tokenizer`` or ``reward_model.name_or_path``).
    """
    name = cfg.tokenizer or cfg.name_or_path or BYTE_TOKENIZER
    option = "reward_model.tokenizer" if cfg.tokenizer else "reward_model.name_or_path"
    if name == BYTE_TOKENIZER:
        tokenizer = transformers.ByT5Tokenizer()
    else:
        tokenizer = load_pretrained_tokenizer(name, option, cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer {option}={name!r} has neither a pad nor an EOS token; add a pad token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


ATTN_OPTION = "reward_model.attn_implementation"


def _tiny_reward_model(cfg: RewardModelConfig, tokenizer: Any, dtype: torch.dtype) -> nn.Module:
    with _naming_attn_implementation(cfg.attn_implementation, ATTN_OPTION):
        return build_tiny(
            transformers.AutoModelForSequenceClassification,
            cfg.tiny,
            tokenizer,
            dtype,
            cfg.attn_implementation,
            num_labels=1,
        )


def _pretrained_reward_model(cfg: RewardModelConfig, dtype: torch.dtype) -> nn.Module:
    name = cfg.name_or_path
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise OSError(f"Could not load reward_model.name_or_path={name!r}: {err}") from err
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
    if is_classifier and config.num_labels != 1:
        raise ValueError(
            f"reward_model.name_or_path={name!r} is a classifier with num_labels={config.num_labels}; a reward model "
            f"has one scalar output. Start from its base model (a causal LM) or a num_labels=1 checkpoint."
        )
    try:
        with _naming_attn_implementation(cfg.attn_implementation, ATTN_OPTION):
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                name,
                num_labels=1,
                dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
            )
    except ValueError as err:
        if str(err).startswith(ATTN_OPTION):
            raise
        raise ValueError(
            f"reward_model.name_or_path={name!r} ({type(config).__name__}) has no sequence-classification class in "
            f"transformers: {err}"
        ) from err


def build_reward_model(cfg: RewardModelConfig, lora: LoraConfig, tokenizer: Any) -> nn.Module:
    """The scalar reward model of ``cfg``, with ``config.pad_token_id`` = the tokenizer's pad id, and LoRA or not.

    The pad id is set so the head reads the score at the last real token of a right-padded row, the way
    :class:`~lightning_rlhf.pipeline_data.PreferenceCollator` and ``RewardModelScorer`` pad.
    """
    dtype = _check_dtype(cfg.dtype)
    model = (
        _tiny_reward_model(cfg, tokenizer, dtype) if cfg.name_or_path is None else _pretrained_reward_model(cfg, dtype)
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if not lora.enabled:
        return model.requires_grad_(True)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",  # peft then trains the new scalar head ("score" / "classifier") in full as well
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
    )
    peft_model = peft.get_peft_model(model, config)
    if cfg.gradient_checkpointing:
        model.disable_input_require_grads()  # peft adds the hook again; only reentrant checkpointing needs it
    return peft_model


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
        self.tokenizer = load_rm_tokenizer(self.reward_model_config)
        self.model: nn.Module | None = None
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_reward_model(self.reward_model_config, self.lora_config, self.tokenizer)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("No trainable parameters: enable LoRA (lora.enabled) or full fine-tuning.")
        optimizer = self.optimizer_factory(trainable)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
