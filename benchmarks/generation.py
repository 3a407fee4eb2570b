"""Rollout generation speed: the package's sampling engines against plain ``model.generate`` with its defaults.

Prints one JSON line. Same model, prompts, sampling settings and stop tokens for every variant (``--variants``):

- ``plain_generate``: ``policy.lm.generate(input_ids, attention_mask, max_new_tokens, do_sample=True, ...)`` on the
  LoRA policy as a user would call it (peft model, adapter unmerged, transformers' default ``DynamicCache``).
- ``hf_merged``: ``generation.engine: hf`` (transformers ``generate``) with the LoRA adapter merged while sampling.
- ``cached_unmerged``: ``generation.engine: cached`` (own loop, preallocated KV cache, finished rows leave the batch),
  adapter not merged.
- ``cached_merged``: the package default (``engine: auto`` -> ``cached``, ``merge_lora: true``).
- ``vllm``, opt-in (``--variants ... vllm``; it needs vLLM installed and fails with the package's install hint
  otherwise): ``generation.engine: vllm``, a :class:`~lightning_rlhf.models.vllm_engine.VLLMEngine` in this process
  passed to ``sample_responses(..., engine=engine)``, as ``PPOModule.rollout`` does. Its first ``load_policy`` (the
  engine's start on the base model and the adapter's first push) runs before the warm-up and is reported as
  ``vllm_start_seconds``; every repeat then pushes the policy again with ``load_policy`` (as every rollout does),
  timed apart from sampling as ``vllm_load_policy_seconds_median``. Engine dtype: float32 with ``32-true``, else
  bfloat16 (``PPOModule``'s choice for bf16 trainer precisions). On CPU vLLM's attention needs a head size of at
  least 32: the default tiny Llama (hidden 256, 4 heads) has 64; ``--preset qwen2-tiny`` (16) fails at the engine's
  start with the package's own error naming the fields to change.

The variants run in turn in every repeat, so machine noise hits all of them alike; each reports its median, and
``speedup_vs_<first variant>`` compares tokens/s with the first one named. ``--stop-fraction 0`` (default) uses a stop
token the model cannot sample, so every response is exactly ``--max-new-tokens`` long (pure decode speed; the script
checks it for every variant); a positive fraction makes that share of the vocabulary stop tokens, so responses end at
different steps and finished rows matter.

Run ``python benchmarks/generation.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from presets import add_model_arguments, policy_config, run_on_random_model, sampling_policy, synchronize

from lightning_rlhf.models import PolicyValueModel
from lightning_rlhf.models.vllm_engine import VLLMEngine
from lightning_rlhf.rollout import GenerationConfig, sample_responses, truncate_at_stop

VARIANTS: tuple[str, ...] = ("plain_generate", "hf_merged", "cached_unmerged", "cached_merged", "vllm")
DEFAULT_VARIANTS: tuple[str, ...] = VARIANTS[:4]
"""``--variants`` unless given: every engine that runs without vLLM installed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(DEFAULT_VARIANTS),
        help="what to time, in this order; the first is the speedups' baseline. vllm needs vLLM installed",
    )
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
    if len(set(args.variants)) != len(args.variants):
        parser.error("--variants names a variant twice")
    if args.precision is None:
        args.precision = "bf16-true" if args.device.startswith("cuda") else "32-true"
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout by default; JSON only there
    run_on_random_model(parse_args(argv), run)


class VLLMVariant:
    """The ``vllm`` variant: a :class:`VLLMEngine` started on the policy (its first ``load_policy``, as at a run's first
    rollout, timed as :attr:`start_seconds`), then called as ``sample_responses(..., engine=engine)``. :meth:`load`
    pushes the policy again, as every rollout does. :meth:`close` shuts the engine down."""

    def __init__(
        self,
        args: argparse.Namespace,
        model_dir: str,
        policy: PolicyValueModel,
        prompts: tuple[torch.Tensor, torch.Tensor],
        stops: list[int],
        pad: int,
    ) -> None:
        self.policy, self.prompts, self.stops, self.pad = policy, prompts, stops, pad
        self.generation = GenerationConfig(max_new_tokens=args.max_new_tokens, engine="vllm")
        self.sequences, self.sequence_len = args.batch, prompts[0].shape[1] + args.max_new_tokens
        dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16  # PPOModule's for bf16 precisions
        self.engine = VLLMEngine(policy_config(args, model_dir), self.generation, dtype, torch.device(args.device))
        self.load_seconds: list[float] = []
        """Seconds of every :meth:`load` timed by the caller."""
        started = time.perf_counter()
        try:
            self.load()
        except BaseException:  # an engine that failed to start leaves no scratch directory behind
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started

    def load(self) -> None:
        self.engine.load_policy(self.policy.lm, self.sequences, self.sequence_len)

    def __call__(self) -> torch.Tensor:
        return sample_responses(
            self.policy, *self.prompts, self.generation, self.stops, self.pad, False, engine=self.engine
        ).tokens

    def close(self) -> None:
        self.engine.close()


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
    pad = tokenizer.pad_token_id

    def package(engine: str, merge: bool) -> Callable[[], torch.Tensor]:
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            engine=engine,
            merge_lora=merge,
            cast_weights_once=not args.no_cast_weights_once,
        )
        return lambda: sample_responses(policy, prompt_ids, prompt_mask, config, stops, pad, False).tokens

    def plain() -> torch.Tensor:
        out = policy.lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        return out[:, prompt_ids.shape[1] :]

    available = {
        "plain_generate": plain,
        "hf_merged": package("hf", True),
        "cached_unmerged": package("cached", False),
        "cached_merged": package("cached", True),
    }
    # Started before any variant's warm-up: whatever the engine's start changes in this process, all variants see.
    # vLLM refuses a stop id outside the vocabulary: it gets none where that id stands for "nothing stops a row".
    engine_stops = stops if count else []
    vllm = (
        VLLMVariant(args, model_dir, policy, (prompt_ids, prompt_mask), engine_stops, pad)
        if "vllm" in args.variants
        else None
    )
    try:
        variants = {name: vllm if name == "vllm" else available[name] for name in args.variants}
        seconds, tokens = time_variants(args, device, variants, stops, pad)
    finally:
        if vllm is not None:
            vllm.close()
    report(args, policy, device, seconds, tokens, vllm)


def time_variants(
    args: argparse.Namespace,
    device: torch.device,
    variants: dict[str, Callable[[], torch.Tensor]],
    stops: list[int],
    pad: int,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and response tokens of every variant in every repeat, after one warm-up call each. A
    :class:`VLLMVariant` gets the policy pushed again before each timed call, timed apart (its ``load_seconds``)."""
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
                if isinstance(fn, VLLMVariant):
                    fn.load_seconds.append(timed(device, fn.load)[0])
                torch.manual_seed(args.seed + repeat)  # the same draws for every variant in this repeat
                elapsed, out = timed(device, fn)
                seconds[name].append(elapsed)
                _, mask, _ = truncate_at_stop(out, stops, pad)
                if args.stop_fraction == 0 and (out.shape[1] != args.max_new_tokens or not bool(mask.all())):
                    raise RuntimeError(f"{name}: a response ended before --max-new-tokens with no stop token reachable")
                tokens[name].append(int(mask.sum()))
    return seconds, tokens


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``fn()`` (queued CUDA work included) and its result."""
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


def report(
    args: argparse.Namespace,
    policy: PolicyValueModel,
    device: torch.device,
    seconds: dict[str, list[float]],
    tokens: dict[str, list[int]],
    vllm: VLLMVariant | None,
) -> None:
    """Print the JSON line."""
    config = policy.lm.config
    median = {name: statistics.median(values) for name, values in seconds.items()}
    # Tokens/s, not seconds, is compared: with stop tokens the variants sample different responses (the cached engine
    # draws fewer random numbers once rows leave the batch), so their lengths differ a little.
    rate = {name: statistics.mean(tokens[name]) / median[name] for name in seconds}
    baseline = args.variants[0]
    result = {
        "config": {
            "preset": args.preset,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "vocab": config.vocab_size,
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
            "variants": list(args.variants),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "vllm": None if vllm is None else vllm_version(),
        },
        "seconds_median": {name: round(value, 4) for name, value in median.items()},
        "response_tokens_mean": {name: round(statistics.mean(values), 1) for name, values in tokens.items()},
        "tokens_per_sec": {name: round(value, 1) for name, value in rate.items()},
        f"speedup_vs_{baseline}": {name: round(rate[name] / rate[baseline], 3) for name in rate},
        "cuda_max_allocated_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
    }
    if vllm is not None:
        result["vllm_start_seconds"] = round(vllm.start_seconds, 3)
        result["vllm_load_policy_seconds_median"] = round(statistics.median(vllm.load_seconds), 4)
    print(json.dumps(result), file=sys.stdout, flush=True)


def vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    main()
