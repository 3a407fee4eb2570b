"""Rollout generation speed: the package's sampling engines against plain ``model.generate`` with its defaults.

Prints one JSON line. Same model, prompts, sampling settings and stop tokens for every variant:

- ``plain_generate``: ``policy.lm.generate(input_ids, attention_mask, max_new_tokens, do_sample=True, ...)`` on the
  LoRA policy as a user would call it (peft model, adapter unmerged, transformers' default ``DynamicCache``).
- ``hf_merged``: ``generation.engine: hf`` (transformers ``generate``) with the LoRA adapter merged while sampling.
- ``cached_unmerged``: ``generation.engine: cached`` (own loop, preallocated KV cache, finished rows leave the batch),
  adapter not merged.
- ``cached_merged``: the package default (``engine: auto`` -> ``cached``, ``merge_lora: true``).

The variants run in turn in every repeat, so machine noise hits all of them alike; each reports its median.
``--stop-fraction 0`` (default) uses a stop token the model cannot sample, so every response is exactly
``--max-new-tokens`` long (pure decode speed); a positive fraction makes that share of the vocabulary stop tokens, so
responses end at different steps and finished rows matter.

Run ``python benchmarks/generation.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import string
import sys
import time
from collections.abc import Callable

import torch
from presets import add_model_arguments, run_on_random_model, sampling_policy, synchronize

from lightning_rlhf.rollout import GenerationConfig, sample_responses, truncate_at_stop

VARIANTS: tuple[str, ...] = ("plain_generate", "hf_merged", "cached_unmerged", "cached_merged")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="bytes")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response length limit")
    parser.add_argument("--stop-fraction", type=float, default=0.0, help="share of the vocabulary that stops a row")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed", "bf16-true"),
        help="32-true; bf16-mixed (bfloat16 autocast, float32 weights); bf16-true (the LM's weights in bfloat16). "
        "None: bf16-true on CUDA, 32-true on CPU",
    )
    parser.add_argument(
        "--no-cast-weights-once",
        action="store_true",
        help="generation.cast_weights_once false (bf16-mixed sampling casts the weights at every decode step)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling")
    args = parser.parse_args(argv)
    if not 0.0 <= args.stop_fraction < 1.0:
        parser.error("--stop-fraction must be in [0, 1)")
    if args.precision is None:
        args.precision = "bf16-true" if args.device.startswith("cuda") else "32-true"
    return args


def main(argv: list[str] | None = None) -> None:
    run_on_random_model(parse_args(argv), run)


def run(args: argparse.Namespace, model_dir: str) -> None:
    device = torch.device(args.device)
    policy, tokenizer = sampling_policy(args, model_dir)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at initialization
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    vocab = policy.lm.config.vocab_size
    rng = random.Random(args.seed)
    texts = [
        "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randint(*args.prompt_len)))
        for _ in range(args.batch)
    ]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    prompt_ids, prompt_mask = enc.input_ids.to(device), enc.attention_mask.bool().to(device)
    count = math.ceil(args.stop_fraction * vocab)
    stops = list(range(3, 3 + count)) if count else [vocab]  # vocab: an id the model cannot sample

    def package(engine: str, merge: bool) -> Callable[[], torch.Tensor]:
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            engine=engine,
            merge_lora=merge,
            cast_weights_once=not args.no_cast_weights_once,
        )
        return lambda: (
            sample_responses(policy, prompt_ids, prompt_mask, config, stops, tokenizer.pad_token_id, False).tokens
        )

    def plain() -> torch.Tensor:
        out = policy.lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[:, prompt_ids.shape[1] :]

    variants = {
        "plain_generate": plain,
        "hf_merged": package("hf", True),
        "cached_unmerged": package("cached", False),
        "cached_merged": package("cached", True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {name: [] for name in variants}
    autocast = (  # without the weight-cast cache, as Lightning's bf16-mixed plugin runs training_step
        torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        for fn in variants.values():  # warm-up
            fn()
        for repeat in range(args.repeats):
            for name, fn in variants.items():
                torch.manual_seed(args.seed + repeat)  # the same draws for every variant in this repeat
                synchronize(device)
                started = time.perf_counter()
                out = fn()
                synchronize(device)
                seconds[name].append(time.perf_counter() - started)
                _, mask, _ = truncate_at_stop(out, stops, tokenizer.pad_token_id)
                tokens[name].append(int(mask.sum()))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    # Tokens/s, not seconds, is compared: with stop tokens the variants sample different responses (the cached engine
    # draws fewer random numbers once rows leave the batch), so their lengths differ a little.
    rate = {name: statistics.mean(tokens[name]) / median[name] for name in variants}
    result = {
        "config": {
            "preset": args.preset,
            "hidden": policy.lm.config.hidden_size,
            "intermediate": policy.lm.config.intermediate_size,
            "layers": policy.lm.config.num_hidden_layers,
            "heads": policy.lm.config.num_attention_heads,
            "kv_heads": policy.lm.config.num_key_value_heads,
            "vocab": vocab,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": args.precision,
            "cast_weights_once": not args.no_cast_weights_once,
            "lora_r": args.lora_r,
            "batch": args.batch,
            "prompt_len": list(args.prompt_len),
            "max_new_tokens": args.max_new_tokens,
            "stop_fraction": args.stop_fraction,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "seconds_median": {name: round(value, 4) for name, value in median.items()},
        "response_tokens_mean": {name: round(statistics.mean(values), 1) for name, values in tokens.items()},
        "tokens_per_sec": {name: round(value, 1) for name, value in rate.items()},
        "speedup_vs_plain_generate": {name: round(rate[name] / rate["plain_generate"], 3) for name in variants},
        "cuda_max_allocated_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
    }
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
