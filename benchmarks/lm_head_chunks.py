"""Memory and time of a PPO update micro-batch with ``ppo.lm_head_chunk_size``: logits made a chunk at a time.

Each variant (``--chunks``: ``none`` = all logits at once, or a chunk size in tokens) runs in a fresh process, so its
peak resident memory is its own: the process builds the policy, makes one synthetic rollout (the layout of
``benchmarks/packing.py``: left-padded prompts, responses of ``--max-new-tokens``), and times ``loss.ppo_objective``
plus its backward over the whole batch as one micro-batch (no optimizer step), ``--repeats`` times after a warm-up.
Reported per variant: the median seconds, the loss (equal across variants up to rounding), the tensors autograd
saves for the backward pass (weights excluded, each storage once), the resident memory before the first step and its
peak from there (Linux ``VmHWM`` after resetting it; on CUDA the peak allocated
memory), and the logits a whole
micro-batch would hold (response tokens x vocabulary, float32).

Run ``python benchmarks/lm_head_chunks.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from packing import make_rollout, synchronize
from presets import add_model_arguments, build_benchmark_policy
from torch import Tensor, nn

from lightning_rlhf.config import PPOConfig
from lightning_rlhf.loss import ppo_objective
from lightning_rlhf.types import Rollout

TEMPERATURE = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.set_defaults(preset="qwen2-h256")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--batch", type=int, default=16, help="rows in the micro-batch")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="response tokens per row")
    parser.add_argument("--chunks", nargs="+", default=["none", "512", "128"], help="'none' or tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("32-true", "bf16-true"), default="32-true", help="the LM's weights")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args(argv)
    args.lengths, args.num_minibatches = ["full"], 1  # what make_rollout reads
    return args


def saved_for_backward_mib(model: nn.Module, rollout: Rollout, ppo: PPOConfig) -> float:
    """Bytes autograd keeps for the backward pass after one forward of the objective (each storage counted once):
    the activation memory, independent of the allocator."""
    storages: dict[int, int] = {}

    def keep(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        ppo_objective(model, rollout, ppo, TEMPERATURE)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / 2**20


def reset_peak(device: torch.device) -> float:
    """Start counting the peak here (the model build's own peak must not count); returns the memory now, MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:  # Linux: "5" resets the peak resident set size
        clear_refs.write("5")
    return _status_mib("VmRSS")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # kB


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chunk = None if args.variant == "none" else int(args.variant)
    model = build_benchmark_policy(args)
    vocab = model.lm.config.vocab_size
    rollout = make_rollout(args, vocab, "full")
    ppo = PPOConfig(lm_head_chunk_size=chunk)
    before = reset_peak(device)
    seconds, loss = [], 0.0
    for repeat in range(args.repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        objective = ppo_objective(model, rollout, ppo, TEMPERATURE)
        objective.loss.backward()
        synchronize(device)
        if repeat:
            seconds.append(time.perf_counter() - started)
        loss = float(objective.loss.detach())
        model.zero_grad(set_to_none=True)
    tokens = int(rollout.response_mask.sum())
    peak = peak_mib(device)  # before the forward below (which holds no more than a training step's forward)
    return {
        "chunk": args.variant,
        "seconds_median": round(statistics.median(seconds), 4),
        "loss": loss,
        "saved_for_backward_mib": round(saved_for_backward_mib(model, rollout, ppo), 1),
        "memory_before_mib": round(before, 1),
        "memory_peak_mib": round(peak, 1),
        "response_tokens": tokens,
        "whole_batch_logits_mib": round(tokens * vocab * 4 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(measure(args)), flush=True)
        return
    header = {
        "preset": args.preset,
        "lora": not args.full,
        "batch": args.batch,
        "device": args.device,
        "precision": args.precision,
    }
    for variant in args.chunks:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        print(json.dumps({**header, **json.loads(done.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
