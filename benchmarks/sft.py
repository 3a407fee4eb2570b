"""SFT step speed: logits at every position against logits at the trained positions only, and packing.

Prints one JSON line per response-length distribution. Every variant gets the same right-padded batches of prompts
of ``--prompt-len`` tokens and responses whose lengths follow ``--lengths`` (``full``: every response
``--max-response`` long; ``uniform``: uniform in ``[1, --max-response]``; ``skewed``: mostly short, a few long, as in
``benchmarks/packing.py``). Timed, in turn within every repeat (machine noise hits all alike): the loss and its
backward for one batch (no optimizer step, so every repeat sees the same weights):

- ``all_logits``: the LM's own forward, (B, L, V) logits, then ``functional.sft_loss`` (the package before
  ``SFTModule.loss``; what a plain Hugging Face causal-LM loss does);
- ``trained_logits``: ``SFTModule.loss`` with ``packing: false``: ``lm_head`` only where a trained token is predicted;
- ``packed``: ``SFTModule.loss`` with ``packing: true``.

Also reported: the losses (equal up to rounding), the decoder positions each variant runs, and the logits elements.

Run ``python benchmarks/sft.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
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
from presets import add_model_arguments, policy_config, save_random_model

from lightning_rlhf.functional import sft_loss
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.packing import pack_rows
from lightning_rlhf.pipeline_data import SFTCollator
from lightning_rlhf.sft import SFTModule

DISTRIBUTIONS: tuple[str, ...] = ("full", "uniform", "skewed")
VARIANTS: tuple[str, ...] = ("all_logits", "trained_logits", "packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--batch", type=int, default=16, help="examples per batch")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="tokens")
    parser.add_argument("--max-response", type=int, default=128, help="longest response, tokens")
    parser.add_argument("--lengths", choices=DISTRIBUTIONS, nargs="+", default=list(DISTRIBUTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (after one warm-up)")
    parser.add_argument("--precision", choices=("32-true", "bf16-true"), default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def response_lengths(distribution: str, count: int, longest: int, rng: random.Random) -> list[int]:
    if distribution == "full":
        return [longest] * count
    if distribution == "uniform":
        return [rng.randint(1, longest) for _ in range(count)]
    return [min(longest, 1 + int(rng.expovariate(4 / longest))) for _ in range(count)]


def make_batch(args: argparse.Namespace, distribution: str, vocab: int, rng: random.Random) -> dict[str, Any]:
    """A right-padded SFT batch of random tokens (ids 3..vocab-1: no special token), as ``SFTDataModule`` serves."""
    rows = []
    for length in response_lengths(distribution, args.batch, args.max_response, rng):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))]
        rows.append({"prompt_ids": prompt, "response_ids": [rng.randrange(3, vocab) for _ in range(length)]})
    return SFTCollator(pad_token_id=0)(rows)


def step(module: SFTModule, variant: str, batch: dict[str, Any]) -> tuple[float, float]:
    """Seconds of one loss + backward, and the loss."""
    module.zero_grad(set_to_none=True)
    module.packing = variant == "packed"
    started = time.perf_counter()
    if variant == "all_logits":
        loss, _ = sft_loss(module(batch["input_ids"], batch["attention_mask"]), batch["input_ids"], batch["loss_mask"])
    else:
        loss, _ = module.loss(batch)
    loss.backward()
    return time.perf_counter() - started, float(loss.detach())


def run(args: argparse.Namespace, module: SFTModule, distribution: str) -> dict[str, Any]:
    batch = make_batch(args, distribution, module.lm.get_input_embeddings().num_embeddings, random.Random(args.seed))
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for variant in VARIANTS:
            elapsed, losses[variant] = step(module, variant, batch)
            if repeat:
                seconds[variant].append(elapsed)
    mask, loss_mask = batch["attention_mask"], batch["loss_mask"]
    vocab = module.lm.get_output_embeddings().weight.shape[0]
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    return {
        "lengths": distribution,
        "seconds": median,
        "speedup_vs_all_logits": {v: median["all_logits"] / median[v] for v in VARIANTS[1:]},
        "loss": losses,
        "real_tokens": int(mask.sum()),
        "padded_positions": mask.numel(),
        "packed_positions": packed_positions(mask),
        "logits_elements": {"all_logits": mask.numel() * vocab, "trained": int(loss_mask[:, 1:].sum()) * vocab},
    }


def packed_positions(mask: torch.Tensor) -> int:
    return pack_rows(torch.zeros_like(mask, dtype=torch.long), mask).input_ids.numel()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as model_dir:
        if args.preset != "none":
            save_random_model(args.preset, model_dir, args.seed)
        module = SFTModule(
            policy=policy_config(args, model_dir),
            lora=LoraConfig(enabled=not args.full, r=args.lora_r, alpha=2 * args.lora_r),
        )
        module.configure_model()
        module.train()
        header = {"preset": args.preset, "lora": not args.full, "batch": args.batch, "threads": torch.get_num_threads()}
        for distribution in args.lengths:
            print(json.dumps({**header, **run(args, module, distribution)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
