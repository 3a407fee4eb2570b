"""The earlier stages' training steps: SFT (logits at every position vs at the trained positions only, and packing)
and reward-model training (padded vs packed).

Prints one JSON line per response-length distribution. Every variant gets the same right-padded batch of prompts of
``--prompt-len`` tokens and responses whose lengths follow ``--lengths`` (``full``: every response
``--max-response`` long; ``uniform``: uniform in ``[1, --max-response]``; ``skewed``: mostly short, a few long, as in
``benchmarks/packing.py``); a preference pair draws its two responses' lengths independently. Timed, in turn within
every repeat (machine noise hits all alike): the loss and its backward for one batch (no optimizer step, so every
repeat sees the same weights).

``--stage sft`` (``SFTModule``):

- ``all_logits``: the LM's own forward, (B, L, V) logits, then ``functional.sft_loss`` (the package before
  ``SFTModule.loss``; what a plain Hugging Face causal-LM loss does);
- ``trained_logits``: ``SFTModule.loss`` with ``packing: false``: ``lm_head`` only where a trained token is predicted;
- ``packed``: ``SFTModule.loss`` with ``packing: true``.

``--stage rm`` (``RewardModelModule``, the Bradley-Terry loss over B pairs = 2B sequences in one forward):
``padded`` (the Hugging Face classifier's forward) and ``packed`` (``packing: true``).

``--stage scorer`` (PPO's reward phase: ``RewardModelScorer`` on B (prompt, response) texts, no gradient, micro-batches
of ``--scorer-batch-size`` texts of similar length): ``padded`` and ``packed`` (``packing: true``); the time is the
call, the "loss" the sum of the scores.

Also reported: the losses (equal up to rounding), the decoder positions each variant runs, and for SFT the logits
elements.

Run ``python benchmarks/stages.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from packing import DISTRIBUTIONS, response_lengths
from presets import add_model_arguments, policy_config, save_random_model
from torch import Tensor

from lightning_rlhf.data import PreferenceCollator, SFTCollator
from lightning_rlhf.functional import bradley_terry_loss, sft_loss
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.models.packing import pack_rows
from lightning_rlhf.reward_model import RewardModelConfig, RewardModelModule
from lightning_rlhf.rewards import RewardModelScorer
from lightning_rlhf.sft import SFTModule

VARIANTS: dict[str, tuple[str, ...]] = {
    "sft": ("all_logits", "trained_logits", "packed"),
    "rm": ("padded", "packed"),
    "scorer": ("padded", "packed"),
}
FIRST_ID = 3
"""Random token ids start here, so no sequence holds a special token (ByT5: 0 pad, 1 EOS, 2 unknown)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--stage", choices=tuple(VARIANTS), default="sft", help="SFT, reward-model training, or reward-model scoring"
    )
    parser.add_argument("--scorer-batch-size", type=int, default=16, help="--stage scorer: texts per forward")
    add_model_arguments(parser)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--batch", type=int, default=16, help="examples (sft), pairs (rm) or texts (scorer) per batch")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="tokens")
    parser.add_argument("--max-response", type=int, default=128, help="longest response, tokens")
    parser.add_argument("--lengths", choices=DISTRIBUTIONS, nargs="+", default=list(DISTRIBUTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (after one warm-up)")
    parser.add_argument("--precision", choices=("32-true", "bf16-true"), default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.stage == "scorer" and args.preset != "none":
        # A preset's directory names its own tokenizer family, which AutoTokenizer then prefers to the saved ByT5.
        parser.error("--stage scorer runs the tiny Llama (the scorer's speed does not depend on the vocabulary)")
    return args


def make_batch(args: argparse.Namespace, distribution: str, vocab: int, rng: random.Random) -> dict[str, Tensor]:
    """A right-padded batch of random tokens, as ``SFTDataModule`` or ``PreferenceDataModule`` serves it."""

    def tokens(count: int) -> list[int]:
        return [rng.randrange(FIRST_ID, vocab) for _ in range(count)]

    prompts = [tokens(rng.randint(*args.prompt_len)) for _ in range(args.batch)]
    lengths = response_lengths(distribution, 2 * args.batch, args.max_response, rng)  # two per pair
    if args.stage == "sft":  # one response per example: the first B lengths
        rows = [
            {"prompt_ids": p, "response_ids": tokens(n)} for p, n in zip(prompts, lengths[: args.batch], strict=True)
        ]
        return SFTCollator(pad_token_id=0)(rows)
    pairs = [
        {"chosen_ids": p + tokens(lengths[2 * i]), "rejected_ids": p + tokens(lengths[2 * i + 1])}
        for i, p in enumerate(prompts)
    ]
    return PreferenceCollator(pad_token_id=0)(pairs)


def loss_of(module: SFTModule | RewardModelModule, variant: str, batch: dict[str, Tensor]) -> Tensor:
    module.packing = variant == "packed"
    if isinstance(module, RewardModelModule):
        return bradley_terry_loss(*module.pair_scores(batch))[0]
    if variant == "all_logits":
        return sft_loss(module(batch["input_ids"], batch["attention_mask"]), batch["input_ids"], batch["loss_mask"])[0]
    return module.loss(batch)[0]


def step(module: SFTModule | RewardModelModule, variant: str, batch: dict[str, Tensor]) -> tuple[float, float]:
    """Seconds of one loss + backward, and the loss."""
    module.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss = loss_of(module, variant, batch)
    loss.backward()
    return time.perf_counter() - started, float(loss.detach())


def run_scorer(args: argparse.Namespace, module: RewardModelModule, distribution: str) -> dict[str, Any]:
    """``--stage scorer``: the reward model saved as PPO's ``RewardModelScorer`` loads it, scoring random texts."""
    rng = random.Random(args.seed)

    def text(count: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(count))

    prompts = [text(rng.randint(*args.prompt_len)) for _ in range(args.batch)]
    responses = [text(n) for n in response_lengths(distribution, args.batch, args.max_response, rng)]
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        scorer = RewardModelScorer(str(module.save_pretrained(directory)), batch_size=args.scorer_batch_size)
        scorer.setup(torch.device("cpu"))
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS["scorer"]}
    scores: dict[str, Tensor] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for variant in seconds:
            scorer.packing = variant == "packed"
            started = time.perf_counter()
            scores[variant] = scorer(prompts, responses)
            if repeat:
                seconds[variant].append(time.perf_counter() - started)
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    return {
        "lengths": distribution,
        "scorer_batch_size": args.scorer_batch_size,
        "seconds": median,
        "speedup_vs_padded": {"packed": median["padded"] / median["packed"]},
        "loss": {variant: float(values.sum()) for variant, values in scores.items()},
        "max_score_difference": float((scores["packed"] - scores["padded"]).abs().max()),
    }


def run(args: argparse.Namespace, module: SFTModule | RewardModelModule, distribution: str) -> dict[str, Any]:
    if args.stage == "scorer":
        return run_scorer(args, module, distribution)
    lm = module.lm if isinstance(module, SFTModule) else module.model
    batch = make_batch(args, distribution, lm.get_input_embeddings().num_embeddings, random.Random(args.seed))
    variants = VARIANTS[args.stage]
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for variant in variants:
            elapsed, losses[variant] = step(module, variant, batch)
            if repeat:
                seconds[variant].append(elapsed)
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    if args.stage == "sft":
        mask = batch["attention_mask"]
        vocab = lm.get_output_embeddings().weight.shape[0]
        extra = {
            "logits_elements": {
                "all_logits": mask.numel() * vocab,
                "trained": int(batch["loss_mask"][:, 1:].sum()) * vocab,
            }
        }
    else:
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])  # one forward over both halves
        extra = {}
    return {
        "lengths": distribution,
        "seconds": median,
        f"speedup_vs_{variants[0]}": {v: median[variants[0]] / median[v] for v in variants[1:]},
        "loss": losses,
        "real_tokens": int(mask.sum()),
        "padded_positions": mask.numel(),
        "packed_positions": pack_rows(torch.zeros_like(mask, dtype=torch.long), mask).input_ids.numel(),
        **extra,
    }


def build(args: argparse.Namespace, model_dir: str) -> SFTModule | RewardModelModule:
    lora = LoraConfig(enabled=not args.full, r=args.lora_r, alpha=2 * args.lora_r)
    policy = policy_config(args, model_dir)
    if args.stage == "sft":
        module = SFTModule(policy=policy, lora=lora)
    else:  # the same model with a new scalar head (a causal LM directory), or the same tiny shape
        reward_model = RewardModelConfig(
            name_or_path=policy.name_or_path, tokenizer="byte", dtype=policy.dtype, tiny=policy.tiny
        )
        module = RewardModelModule(reward_model=reward_model, lora=lora)
    module.configure_model()
    return module.train()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as model_dir:
        if args.preset != "none":
            save_random_model(args.preset, model_dir, args.seed)
        module = build(args, model_dir)
        header = {
            "stage": args.stage,
            "preset": args.preset,
            "lora": not args.full,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
        }
        for distribution in args.lengths:
            print(json.dumps({**header, **run(args, module, distribution)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
