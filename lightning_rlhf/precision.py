"""``precision: bf16-true`` (and ``16-true``) with float32 trained weights: the frozen base in half precision only.

Lightning's ``HalfPrecision`` casts the whole module, trained weights included, and keeps no float32 copy, so an
optimizer step smaller than half a bfloat16 rounding step of a weight is lost: with AdamW at lr 1e-5 most LoRA ``A``
elements and value-head weights never moved. :func:`keep_trained_weights_float32` swaps the trainer's plugin for
:class:`FrozenHalfPrecision`, whose ``convert_module`` casts only the frozen parameters
(:func:`lightning_rlhf.models.cast_weights`); everything else about the plugin (inputs, the default dtype inside
``forward``) is Lightning's. The modules call it in ``setup`` and cast in ``configure_model`` too, so a model is in
its final dtypes before FSDP2 shards it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch import nn

from lightning_rlhf.models import cast_weights

HALF_PRECISIONS: dict[str, torch.dtype] = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


class FrozenHalfPrecision(HalfPrecision):
    """``HalfPrecision`` that casts frozen parameters to the half dtype and keeps trained ones float32."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        return cast_weights(module, HALF_PRECISIONS[self.precision])


def keep_trained_weights_float32(trainer: Any) -> torch.dtype | None:
    """Replace the trainer's ``HalfPrecision`` plugin by :class:`FrozenHalfPrecision` (before the model is built).

    Returns:
        The dtype of the frozen weights under that precision, or None for any other precision (nothing changed).
    """
    plugin = trainer.strategy.precision_plugin
    if type(plugin) is HalfPrecision:
        trainer.strategy.precision_plugin = FrozenHalfPrecision(plugin.precision)
        return HALF_PRECISIONS[plugin.precision]
    if isinstance(plugin, FrozenHalfPrecision):
        return HALF_PRECISIONS[plugin.precision]
    return None
