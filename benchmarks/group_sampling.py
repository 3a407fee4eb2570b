"""The cost of n samples per prompt: one prefill per prompt (prefix reuse) against the prompt repeated n times.

Prints one JSON line. The same model, prompts, keys (so the same responses) and settings for every variant, through
the package's own ``lightning_rlhf.rollout.sample_responses``:

- ``prefix_reuse``: ``generation.samples_per_prompt = n`` on the ``cached`` engine (the default): each prompt is
  prefilled once and its KV cache repeated for its n samples.
- ``repeated_prompts``: the B prompts repeated n times, one sample each, on the ``cached`` engine: n prefills per
  prompt, what a loop without prefix reuse does.
- ``hf``: ``samples_per_prompt = n`` on the ``hf`` engine (transformers ``generate``, which prefills every row).

The script checks that the three variants sample the same tokens. The variants run in turn in every repeat, so machine
noise hits all of them alike; each reports its median. Long prompts and short responses show the prefill's share.

Run ``python benchmarks/group_sampling.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import time
from collections.abc import Callable

import torch
from presets import add_model_arguments, run_on_random_model, sampling_policy, synchronize

from lightning_rlhf.functional import response_keys
from lightning_rlhf.rollout import GenerationConfig, sample_responses

VARIANTS: tuple[str, ...] = ("prefix_reuse", "repeated_prompts", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="n")
    parser.add_argument("--prompt-len", type=int, default=256, help="bytes of every prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="response length (every response has it)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and keys")
    args = parser.parse_args(argv)
    args.precision = "32-true"
    return args


def main(argv: list[str] | None = None) -> None:
    run_on_random_model(parse_args(argv), run)


def run(args: argparse.Namespace, model_dir: str) -> None:
    device = torch.device(args.device)
    policy, tokenizer = sampling_policy(args, model_dir)
    rng = random.Random(args.seed)
    texts = ["".join(rng.choices(string.ascii_lowercase + " ", k=args.prompt_len)) for _ in range(args.batch)]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    prompt_ids, prompt_mask = enc.input_ids.to(device), enc.attention_mask.bool().to(device)
    n = args.samples_per_prompt
    prompt_index, sample_index = torch.arange(args.batch).repeat_interleave(n), torch.arange(n).repeat(args.batch)
    keys = response_keys(args.seed, 0, prompt_index, sample_index)
    stops = [policy.lm.config.vocab_size]  # an id the model cannot sample: every response is full length
    pad = tokenizer.pad_token_id

    def call(engine: str, samples: int, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, engine=engine, samples_per_prompt=samples)
        return lambda: sample_responses(policy, ids, mask, config, stops, pad, False, keys).tokens

    repeated = (prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0))
    variants = {
        "prefix_reuse": call("cached", n, prompt_ids, prompt_mask),
        "repeated_prompts": call("cached", 1, *repeated),
        "hf": call("hf", n, prompt_ids, prompt_mask),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and the check that all sample the same
        same = all(torch.equal(out, outputs["prefix_reuse"]) for out in outputs.values())
        for _ in range(args.repeats):
            for name, fn in variants.items():
                synchronize(device)
                started = time.perf_counter()
                fn()
                synchronize(device)
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "config": {
            "preset": args.preset,
            "hidden": policy.lm.config.hidden_size,
            "layers": policy.lm.config.num_hidden_layers,
            "vocab": policy.lm.config.vocab_size,
            "batch": args.batch,
            "samples_per_prompt": n,
            "prompt_len": args.prompt_len,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "same_tokens": same,
        "seconds_median": {name: round(value, 4) for name, value in median.items()},
        "speedup_vs_repeated_prompts": {
            name: round(median["repeated_prompts"] / value, 3) for name, value in median.items()
        },
    }
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
