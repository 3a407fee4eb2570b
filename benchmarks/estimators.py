"""Critic-free estimators against GAE: seconds per iteration, trained parameters, optimizer state and peak memory.

Prints one JSON line per estimator. Each runs ``trainer.fit`` of ``PPOModule`` in a process of its own (its own peak
RSS), on the same prompts, with ``--batch`` prompts x ``--samples-per-prompt`` responses per rollout, every response
``--max-new-tokens`` long (``min_new_tokens`` forbids stopping earlier), so every estimator pushes the same tokens
through the same model. Timings are the module's own ``perf/iteration_sec`` and ``perf/rollout_sec`` (medians over
the timed iterations); ``trained_param_bytes`` and ``optimizer_state_bytes`` count what the optimizer holds (AdamW).

Run ``python benchmarks/estimators.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from ppo_iteration import BenchPPOModule, make_prompts
from presets import add_model_arguments, policy_config, random_model_dir

from lightning_rlhf.config import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.module import PPOConfig
from lightning_rlhf.rewards import CharFractionReward
from lightning_rlhf.rollout import GenerationConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--estimators", nargs="+", choices=ADVANTAGE_ESTIMATORS, default=["gae", "grpo", "rloo"])
    parser.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="n (every estimator gets the same)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 32), metavar=("MIN", "MAX"), help="bytes")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response length (every response has it)")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    parser.add_argument("--num-minibatches", type=int, default=4, help="optimizer steps per PPO epoch")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None keeps torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling")
    parser.add_argument("--one", choices=ADVANTAGE_ESTIMATORS, help=argparse.SUPPRESS)  # a child process's estimator
    args = parser.parse_args(argv)
    args.precision = "32-true"
    return args


class IterationTimes(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[f"perf/{k}"]) for k in ("iteration_sec", "rollout_sec")})


def run_one(args: argparse.Namespace, model_dir: str) -> dict:
    seed_everything(args.seed, verbose=False)
    estimator = args.one
    module = BenchPPOModule(  # the package's PPOModule, decoding a preset's ids past the byte tokenizer
        policy=policy_config(args, model_dir),
        lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r),
        generation=GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            samples_per_prompt=args.samples_per_prompt,
        ),
        ppo=PPOConfig(advantage_estimator=estimator, ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
    )
    times = IterationTimes()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[times],
    )
    prompts = make_prompts(args.batch * (args.warmup + args.iterations), *args.prompt_len, seed=args.seed)
    trainer.fit(module, datamodule=PromptDataModule(prompts=prompts, batch_size=args.batch, shuffle=False))
    optimizer = trainer.optimizers[0]
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    timed = times.rows[args.warmup :]
    return {
        "estimator": estimator,
        "config": {
            "hidden": module.model.lm.config.hidden_size,
            "layers": module.model.lm.config.num_hidden_layers,
            "batch": args.batch,
            "samples_per_prompt": args.samples_per_prompt,
            "responses": args.batch * args.samples_per_prompt,
            "max_new_tokens": args.max_new_tokens,
            "ppo_epochs": args.ppo_epochs,
            "num_minibatches": args.num_minibatches,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "value_head": module.model.value_head is not None,
        "iteration_sec_median": round(statistics.median(r["iteration_sec"] for r in timed), 4),
        "rollout_sec_median": round(statistics.median(r["rollout_sec"] for r in timed), 4),
        "trained_param_bytes": sum(p.numel() * p.element_size() for p in trained),
        "optimizer_state_bytes": sum(
            t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
        ),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one is None:  # one child process per estimator, each printing its line
        if args.samples_per_prompt < 2 and any(e in GROUP_ESTIMATORS for e in args.estimators):
            raise SystemExit("the group estimators need --samples-per-prompt >= 2")
        for estimator in args.estimators:
            subprocess.run([sys.executable, __file__, *argv, "--one", estimator], check=True)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with random_model_dir(args) as model_dir:
        print(json.dumps(run_one(args, model_dir)), flush=True)


if __name__ == "__main__":
    main()
