"""Sequence packing (``ppo.packing``): the PPO update and the scoring forwards, packed against padded.

Prints one JSON line per response-length distribution. Both variants get the same rollout: left-padded prompts of
``--prompt-len`` tokens and responses whose lengths follow ``--lengths``:

- ``full``: every response ``--max-new-tokens`` long (no stop token sampled: only prompt padding to pack);
- ``uniform``: lengths uniform in ``[1, --max-new-tokens]``;
- ``skewed``: most responses short, a few long (1 + an exponential draw of mean ``--max-new-tokens / 4``, capped),
  the shape of a policy that usually stops early.

Timed per variant, in turn within every repeat (machine noise hits both alike): ``scoring`` = the rollout's policy
and reference forwards over the whole batch (no gradient); ``update`` = one PPO epoch: ``loss.ppo_objective`` and
its backward for each of ``--num-minibatches`` minibatches (no optimizer step, so every repeat sees the same
weights). Also reported: the positions each phase and variant ran through the decoders, against the real tokens.

Run ``python benchmarks/packing.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from typing import Any

import torch
from presets import add_model_arguments, build_benchmark_policy, synchronize
from torch import Tensor

from lightning_rlhf.config import PPOConfig
from lightning_rlhf.loss import ppo_objective
from lightning_rlhf.models import PolicyValueModel, forward_response, unwrap_peft
from lightning_rlhf.models.packing import verify_packing
from lightning_rlhf.types import ForwardOptions, Rollout

DISTRIBUTIONS: tuple[str, ...] = ("full", "uniform", "skewed")
TEMPERATURE = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--batch", type=int, default=32, help="rollout rows")
    parser.add_argument("--num-minibatches", type=int, default=4, help="minibatches of the update epoch")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    parser.add_argument("--lengths", choices=DISTRIBUTIONS, nargs="+", default=list(DISTRIBUTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "bf16-true"), default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, lengths and tokens")
    args = parser.parse_args(argv)
    if args.batch % args.num_minibatches:
        parser.error("--num-minibatches must divide --batch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_benchmark_policy(args)
    for distribution in args.lengths:
        print(json.dumps(run(args, model, distribution)), file=sys.stdout, flush=True)


def response_lengths(distribution: str, count: int, longest: int, rng: random.Random) -> list[int]:
    if distribution == "full":
        return [longest] * count
    if distribution == "uniform":
        return [rng.randint(1, longest) for _ in range(count)]
    return [min(longest, 1 + int(rng.expovariate(4 / longest))) for _ in range(count)]


def make_rollout(args: argparse.Namespace, vocab: int, distribution: str) -> Rollout:
    """Random tokens in the layout ``generate_rollout`` returns, with random old logprobs, values and advantages."""
    rng = random.Random(args.seed)
    prompt_lengths = [rng.randint(*args.prompt_len) for _ in range(args.batch)]
    lengths = response_lengths(distribution, args.batch, args.max_new_tokens, rng)
    generator = torch.Generator().manual_seed(args.seed)
    width, longest = max(prompt_lengths), max(lengths)
    prompt_mask = torch.arange(width) >= width - torch.tensor(prompt_lengths)[:, None]  # (B, P) left-padded
    response_mask = torch.arange(longest) < torch.tensor(lengths)[:, None]  # (B, T) right-padded
    prompt_ids = torch.randint(3, vocab, prompt_mask.shape, generator=generator).where(prompt_mask, 0)
    response_ids = torch.randint(3, vocab, response_mask.shape, generator=generator).where(response_mask, 0)

    def per_token(mean: float, std: float) -> Tensor:
        return (mean + std * torch.randn(response_mask.shape, generator=generator)).where(response_mask, 0.0)

    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        old_logprobs=per_token(-6.0, 0.5),
        ref_logprobs=per_token(-6.0, 0.5),
        old_values=per_token(0.0, 0.1),
        ended=torch.tensor([n < args.max_new_tokens for n in lengths]),
        advantages=per_token(0.0, 1.0),
        returns=per_token(0.0, 1.0),
    )
    return rollout.to(args.device)


def run(args: argparse.Namespace, model: PolicyValueModel, distribution: str) -> dict[str, Any]:
    device = torch.device(args.device)
    rollout = make_rollout(args, model.lm.config.vocab_size, distribution)
    order = torch.randperm(args.batch, generator=torch.Generator().manual_seed(args.seed)).to(device)
    minibatches = [rollout.select(rows) for rows in order.chunk(args.num_minibatches)]
    positions: dict[str, int] = {}
    counting: list[str] = []  # the variant whose decoder positions are being counted, if any

    def count(module: torch.nn.Module, inputs: tuple, kwargs: dict) -> None:
        if counting:
            positions[counting[0]] = positions.get(counting[0], 0) + kwargs["input_ids"].numel()

    hooks = []
    for lm in (unwrap_peft(model.lm), model.ref_lm):  # full fine-tuning: the reference is a copy
        if lm is not None:
            verify_packing(lm.get_decoder())  # once, before the positions are counted
            hooks.append(lm.get_decoder().register_forward_pre_hook(count, with_kwargs=True))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def scoring(packing: bool) -> None:
        with torch.no_grad():
            batch = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
            for mode in ("policy", "ref"):
                forward_response(model, *batch, TEMPERATURE, mode=mode, options=ForwardOptions(packing=packing))

    def update(packing: bool) -> None:
        ppo = PPOConfig(packing=packing)
        for minibatch in minibatches:
            ppo_objective(model, minibatch, ppo, TEMPERATURE).loss.backward()
        model.zero_grad(set_to_none=True)

    seconds: dict[str, list[float]] = {}
    with autocast:
        for variant, packing in (("padded", False), ("packed", True)):  # warm-up; counts the positions once
            for phase, fn in (("scoring", scoring), ("update", update)):
                counting[:] = [f"{phase}_{variant}"]
                fn(packing)
            counting.clear()
        for _ in range(args.repeats):
            for variant, packing in (("padded", False), ("packed", True)):
                for phase, fn in (("scoring", scoring), ("update", update)):
                    synchronize(device)
                    started = time.perf_counter()
                    fn(packing)
                    synchronize(device)
                    seconds.setdefault(f"{phase}_{variant}", []).append(time.perf_counter() - started)
    for hook in hooks:
        hook.remove()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    real = int(rollout.prompt_mask.sum() + rollout.response_mask.sum())
    return {
        "config": {
            "preset": args.preset,
            "hidden": model.lm.config.hidden_size,
            "layers": model.lm.config.num_hidden_layers,
            "lora_r": None if args.full else args.lora_r,
            "batch": args.batch,
            "num_minibatches": args.num_minibatches,
            "prompt_len": list(args.prompt_len),
            "max_new_tokens": args.max_new_tokens,
            "lengths": distribution,
            "device": str(device),
            "precision": args.precision,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "response_tokens_mean": round(float(rollout.response_mask.sum(-1).float().mean()), 1),
        "seconds_median": {name: round(value, 4) for name, value in sorted(median.items())},
        "speedup": {
            phase: round(median[f"{phase}_padded"] / median[f"{phase}_packed"], 3) for phase in ("scoring", "update")
        },
        # Per phase and variant; scoring is 2 forwards over the batch (policy, reference), the update epoch 1.
        "decoder_positions": positions | {"real_tokens_scoring": 2 * real, "real_tokens_update": real},
    }


if __name__ == "__main__":
    main()
