"""Parameter and AdamW-state bytes of the policy under ``precision: bf16-true``: Lightning's plain ``HalfPrecision``
(every weight bfloat16) against the package's ``FrozenHalfPrecision`` (frozen base bfloat16, trained weights float32).

Builds the policy with the package's ``build_policy`` (a preset of ``benchmarks/presets.py`` with random weights, or
the tiny Llama), converts it with each plugin's ``convert_module`` and counts bytes by dtype; AdamW keeps two states
per trained element in the trained weight's dtype. Prints one JSON line per plugin::

    python benchmarks/precision_memory.py --preset qwen2-0.5b --lora-r 16
"""

from __future__ import annotations

import argparse
import copy
import json

from lightning.pytorch.plugins.precision import HalfPrecision
from presets import add_model_arguments, build_benchmark_policy
from torch import nn

from lightning_rlhf.precision import FrozenHalfPrecision

MIB = 2**20


def parameter_bytes(model: nn.Module) -> dict[str, float]:
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "frozen_mib": frozen / MIB,
        "trained_mib": trained / MIB,
        "adamw_state_mib": 2 * trained / MIB,
        "total_mib": (frozen + 3 * trained) / MIB,  # + the gradient, in the trained weight's dtype
        "trained_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.precision, args.device = "32-true", "cpu"
    policy = build_benchmark_policy(args)
    for name, plugin in (
        ("HalfPrecision", HalfPrecision("bf16-true")),
        ("FrozenHalfPrecision", FrozenHalfPrecision("bf16-true")),
    ):
        converted = plugin.convert_module(copy.deepcopy(policy))
        print(
            json.dumps(
                {"plugin": name, "preset": args.preset, "lora_r": None if args.full else args.lora_r}
                | parameter_bytes(converted)
            )
        )


if __name__ == "__main__":
    main()
