"""The state of a model's weights for training: dropout off (PPO), trained weights in float32 beside a frozen base.

- :func:`disable_dropout` and :func:`check_dropout_off`: PPO's old logprobs come from an eval-mode forward and the
  update's from a training-mode one, so any dropout would make the ratio differ from 1 where the policy has not moved.
- :func:`cast_weights`: a trained weight stored in bfloat16 loses every optimizer step smaller than half its rounding
  step, so trained weights are float32 master weights whatever the frozen base is stored in.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
import transformers
from torch import Tensor, nn

from lightning_rlhf.modes import eval_mode

DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _is_dropout_name(name: str) -> bool:
    # transformers names dropout probabilities "*dropout*" (attention_dropout, hidden_dropout_prob, lora_dropout) or
    # "*pdrop" (GPT-2: resid_pdrop, embd_pdrop, attn_pdrop).
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every dropout of ``model``, in training mode as in eval mode; returns ``model``.

    Sets ``p = 0`` on every dropout module (LoRA's ``lora_dropout`` included), and 0 on every float attribute of a
    module or a ``transformers`` config whose name says dropout: attention kernels read those probabilities directly
    (``LlamaAttention.attention_dropout``), not through a module.
    """
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and _is_dropout_name(name):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, transformers.PretrainedConfig):
            for part in {id(c): c for c in (config, config.get_text_config())}.values():
                for name, value in part.to_dict().items():
                    if isinstance(value, float) and _is_dropout_name(name):
                        setattr(part, name, 0.0)
    return model


def check_dropout_off(model: nn.Module, option: str = "model.policy.name_or_path") -> None:
    """Refuse a model whose outputs on a few tokens differ between training and eval mode (dropout left on).

    Raises:
        NotImplementedError: naming ``option``; PPO's ratio would not be 1 where the policy has not moved.
    """
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    text = base.config.get_text_config()
    input_ids = torch.arange(4, device=next(model.parameters()).device).remainder(text.vocab_size)[None]  # (1, 4)
    attention_mask = torch.ones_like(input_ids)
    outputs = []
    with torch.no_grad():
        for training in (False, True):
            with eval_mode(model):
                model.train(training)
                outputs.append(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)
    if not torch.equal(*outputs):
        raise NotImplementedError(
            f"{type(base).__name__} gives other outputs in training mode than in eval mode after its "
            f"dropout was turned off (max difference {(outputs[0] - outputs[1]).abs().max().item():.3g}), so PPO's "
            f"ratio would not be 1 before the policy moves; choose another {option}."
        )


def cast_weights(model: nn.Module, frozen_dtype: torch.dtype | None = None) -> nn.Module:
    """Every trainable parameter in float32, and with ``frozen_dtype`` every frozen floating parameter in it.

    A trained weight stored in bfloat16 loses every optimizer step smaller than half its rounding step (with AdamW at
    lr 1e-5 most LoRA elements never moved), so trained weights are float32 master weights whatever the frozen base is
    stored in (``policy.dtype``, ``precision: bf16-true``): the base stays in half precision, the adapter computes in
    float32 (peft casts its input and result), and a full copy trained next to a frozen original
    (``lora.modules_to_save``) gets its input cast to float32 and its output back to the original's dtype
    (:class:`CastAround`). Buffers keep their dtype, as ``from_pretrained(dtype=...)`` leaves them (rotary
    frequencies stay float32). Casts only what differs, so it can run again on a sharded model. Returns ``model``.
    """
    for param in model.parameters():
        target = torch.float32 if param.requires_grad else frozen_dtype
        if target is not None and param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
    for wrapper in model.modules():
        if isinstance(wrapper, peft.utils.ModulesToSaveWrapper):
            for trained in wrapper.modules_to_save.values():
                if getattr(trained, "cast_around", None) is None:  # hooked once, however often this runs
                    trained.cast_around = CastAround(wrapper.original_module)
                    trained.register_forward_pre_hook(trained.cast_around)
                    trained.register_forward_hook(trained.cast_around.output)
    return model


class CastAround:
    """Hooks of a float32 module trained in place of a frozen ``original`` of another dtype: floating inputs are cast
    to the module's own dtype, floating outputs to the original's, so its neighbours see the dtype they expect.

    A top-level class (not a closure), so a model holding it pickles.
    """

    def __init__(self, original: nn.Module) -> None:
        self.original = original

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def output(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        dtype = next(self.original.parameters()).dtype
        return out.to(dtype) if isinstance(out, Tensor) and out.is_floating_point() else out
