"""``SFTModule``: supervised fine-tuning of a causal LM on (prompt, response) pairs, the first stage of RLHF.

The loss is the next-token negative log-likelihood of the **response tokens only** (token-mean over the batch,
:func:`lightning_rlhf.functional.sft_loss`); prompt and padding tokens are context, never targets. Data comes from
:class:`lightning_rlhf.data.SFTDataModule`, which encodes prompts exactly as PPO's
:class:`~lightning_rlhf.data.PromptDataModule` does, so the PPO policy continues prompts the way it was taught to.

The hand-off to PPO: at the end of ``fit`` the module writes ``output_dir`` as a plain Hugging Face model directory,
the **merged** weights (a LoRA adapter folded into the base) with ``config.json`` and the tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained``. Point PPO's ``policy.name_or_path`` at it: PPO's policy starts from it and
its reference *is* it (with LoRA in PPO the reference is that model with PPO's adapter disabled; with full fine-tuning
a frozen copy of it). With LoRA and ``save_adapter``, the SFT adapter alone is also written to ``output_dir/adapter``.

Speed: ``lm_head`` runs only at the positions that predict a trained token (with a 150k-token vocabulary the logits
of prompt and padding positions would otherwise be most of the step's memory; ``lm_head_chunk_size`` makes and
recomputes them a chunk of tokens at a time), and ``packing: true`` packs each
batch's sequences into fewer rows (:mod:`lightning_rlhf.models.packing`), so no compute goes to padding. Packing stays
within a batch, like TRL's ``padding_free``: every step sees the same sequences and the same token-mean loss as the
padded run (equal up to rounding), unlike TRL's ``packing``, which cuts a stream of examples into fixed-length rows.

Where this departs from TRL's ``SFTTrainer``: the output is always merged, so the next stage needs no PEFT-specific
loading.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import peft
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_rlhf import functional as F
from lightning_rlhf.config import as_config, build_optimizers
from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    build_model,
    cast_weights,
    final_hidden,
    head_outputs,
    load_tokenizer,
    unwrap_peft,
)
from lightning_rlhf.precision import keep_trained_weights_float32
from lightning_rlhf.types import SFTLossStats


def default_sft_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with lr 1e-4 and no weight decay, used when the recipe names no optimizer."""
    return torch.optim.AdamW(params, lr=1.0e-4, weight_decay=0.0)


class SFTModule(LightningModule):
    """Supervised fine-tuning with the loss on response tokens only; saves an HF model directory for PPO.

    Args:
        policy: which causal LM to fine-tune (hub id, local path, or a tiny random config) and its tokenizer.
        lora: the LoRA adapter; ``lora.enabled: false`` trains every weight.
        output_dir: where ``fit`` writes the merged model and tokenizer at its end (rank 0); None writes nothing.
            This directory is the next stages' ``policy.name_or_path`` (PPO) and may be the reward model's init.
        save_adapter: with LoRA, also write the adapter alone to ``output_dir/adapter``.
        packing: pack each batch's sequences into fewer rows for the training and validation forwards (no compute on
            padding; :mod:`lightning_rlhf.models.packing`). Pays when examples differ in length; the loss equals the
            padded forward's up to rounding. The model is checked to keep packed sequences apart before its first packed
            forward.
        lm_head_chunk_size: compute the logits of this many trained tokens at a time and recompute them in the
            backward pass, so the batch's (tokens x vocabulary) logits and their gradient are never held at once
            (:func:`lightning_rlhf.models.head_outputs`); None computes them all at once.
        optimizer: builds the optimizer from the trainable parameters (LightningCLI ``OptimizerCallable``).
        lr_scheduler: builds an LR scheduler from the optimizer; it steps every optimizer step.
    """

    def __init__(
        self,
        policy: PolicyConfig | None = None,
        lora: LoraConfig | None = None,
        output_dir: str | None = None,
        save_adapter: bool = True,
        packing: bool = False,
        lm_head_chunk_size: int | None = None,
        optimizer: OptimizerCallable = default_sft_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.policy_config = as_config(PolicyConfig, policy)
        self.lora_config = as_config(LoraConfig, lora)
        self.save_hyperparameters(
            {
                "policy": dataclasses.asdict(self.policy_config),
                "lora": dataclasses.asdict(self.lora_config),
                "output_dir": output_dir,
                "save_adapter": save_adapter,
                "packing": packing,
                "lm_head_chunk_size": lm_head_chunk_size,
            }
        )
        self.output_dir = output_dir
        self.save_adapter = save_adapter
        self.packing = packing
        if lm_head_chunk_size is not None and lm_head_chunk_size < 1:
            raise ValueError(f"model.lm_head_chunk_size={lm_head_chunk_size} is invalid: use >= 1 or null.")
        self.lm_head_chunk_size = lm_head_chunk_size
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.tokenizer = load_tokenizer(self.policy_config)
        self.lm: nn.Module | None = None
        self.frozen_dtype: torch.dtype | None = None
        """The frozen weights' dtype under ``precision: bf16-true`` (set in ``setup``): trained weights stay float32."""
        self.val_loss = MeanMetric()
        self.val_token_accuracy = MeanMetric()

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        self.frozen_dtype = keep_trained_weights_float32(self.trainer)

    def configure_model(self) -> None:
        if self.lm is None:
            model = build_model(self.policy_config, self.lora_config, self.tokenizer, "model.policy")
            self.lm = cast_weights(model, self.frozen_dtype)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, V) logits of the causal LM for right-padded ``input_ids`` (B, L) and bool ``attention_mask``."""
        return self._lm()(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).logits

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, SFTLossStats]:
        """The SFT loss of a batch (:func:`lightning_rlhf.functional.sft_token_loss`), with logits computed only at
        the positions that predict a trained token, ``lm_head_chunk_size`` tokens at a time if set, and the rows
        packed when ``packing`` is on."""
        lm = unwrap_peft(self._lm())
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        predicts = F.sft_predicting_positions(loss_mask)  # (B, L - 1): position t predicts trained token t + 1
        targets = input_ids[:, 1:][predicts]  # (N,)
        hidden = final_hidden(
            lm, input_ids, batch["attention_mask"], (0, input_ids.shape[1] - 1), self.packing, "model.packing"
        )  # (B, L - 1, H)
        terms = head_outputs(
            lm, hidden[predicts], lambda logits, rows: F.sft_token_terms(logits, targets[rows]), self.lm_head_chunk_size
        )
        return F.sft_loss_from_terms(*terms)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, stats = self.loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/token_accuracy", stats.token_accuracy, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Fresh states in this loop's grad mode: states last reset inside trainer.validate() are inference tensors,
        # which fit's validation (no_grad, not inference mode) could not update.
        self.val_loss.reset()
        self.val_token_accuracy.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, stats = self.loss(batch)
        # Weighted by trained tokens: the epoch value is the token-mean over the whole validation set.
        self.val_loss.update(loss, weight=stats.num_tokens)
        self.val_token_accuracy.update(stats.token_accuracy, weight=stats.num_tokens)
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("val/token_accuracy", self.val_token_accuracy, on_step=False, on_epoch=True)

    def on_fit_end(self) -> None:
        if self.output_dir is not None and self.trainer.is_global_zero:
            self.save_pretrained(self.output_dir)

    # ------------------------------------------------------------------------------------------------------ export
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the merged model (``config.json``, weights) and the tokenizer to ``path``; with LoRA and
        ``save_adapter`` also the adapter alone to ``path/adapter``.

        The merge runs on a copy, so training can go on afterwards.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = self._lm()
        if isinstance(lm, peft.PeftModel):
            if self.save_adapter:
                lm.save_pretrained(path / "adapter")
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def _lm(self) -> nn.Module:
        if self.lm is None:
            raise RuntimeError("SFTModule has no model yet; call configure_model() (trainer.fit does).")
        return self.lm
