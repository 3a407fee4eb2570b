"""Run the offline RLHF pipeline end to end (SFT -> reward model -> PPO on the synthetic world) and report.

Usage, from the repository root (about a minute on 2 idle CPU cores)::

    python scripts/run_pipeline.py [--out runs/pipeline] [--samples 32] [--seed 0]
    # then, reusing those SFT and reward models, PPO without the KL penalty, to watch reward hacking:
    python scripts/run_pipeline.py --ppo-only --ppo-override=--model.init_args.ppo.kl_coef=0 \\
        --ppo-override=--trainer.max_steps=150

Each stage runs through the ``lightning-rlhf`` command's own code (``lightning_rlhf.cli.main``) with its recipe under
``recipes/pipeline/``; only the output locations are overridden (``--out``), so what this script measures is what
the recipes do. After the three stages it evaluates, on the same fresh prompts and with the same sampling:

- the reward model on new preference pairs (held out: another seed), against the noisy labels it was trained on and
  against the noise-free hidden rule;
- the SFT policy (PPO's starting point and reference) and the PPO policy: mean true reward (the hidden rule), mean
  reward-model score, KL to the reference (k1, summed over the response, as ``objective/kl``) and response length.

It prints a Markdown table (the one in README's "The full pipeline") and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import yaml

from lightning_rlhf.cli import main as cli_main
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.module import PPOModule
from lightning_rlhf.rewards import RewardModelScorer
from lightning_rlhf.synthetic import WORLD, SyntheticTrueReward

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "pipeline"
EVAL_SEED = 1234
"""Seed of the evaluation prompts and preference pairs: different from every training seed (0)."""


def run_stage(recipe: str, overrides: list[str]) -> float:
    """Run ``lightning-rlhf fit --config recipes/pipeline/<recipe> <overrides>``; returns wall seconds."""
    started = time.perf_counter()
    cli_main(["fit", "--config", str(RECIPES / recipe), "--trainer.enable_progress_bar=false", *overrides])
    return time.perf_counter() - started


def latest_version(log_dir: Path) -> Path:
    """The newest ``version_N`` directory of a CSVLogger run."""
    versions = sorted(log_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no version_N directory under {log_dir}; did the stage run?")
    return versions[-1]


def last_logged(metrics_csv: Path, name: str) -> float:
    """The last value of metric ``name`` in a CSVLogger metrics file."""
    values = [float(row[name]) for row in csv.DictReader(metrics_csv.open()) if row.get(name)]
    if not values:
        raise ValueError(f"{metrics_csv} has no {name!r} values.")
    return values[-1]


def reward_model_accuracy(scorer: RewardModelScorer, num_pairs: int, label_noise: float) -> float:
    """Share of fresh pairs (seed ``EVAL_SEED``) whose chosen response the reward model scores higher."""
    pairs = WORLD.preference_pairs(num_pairs, seed=EVAL_SEED, label_noise=label_noise)
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    return float((chosen > rejected).float().mean())


def load_ppo_module(checkpoint: Path, trained: bool) -> PPOModule:
    """The PPO module of ``checkpoint``'s configuration; with ``trained`` its policy weights, else the SFT policy.

    A PPO checkpoint holds only the trained weights (the LoRA adapter); without them the adapter is the identity, so
    the policy *is* the SFT model, the reference.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module = PPOModule(**state["hyper_parameters"])
    module.configure_model()
    if trained:
        missing_trained = set(state["state_dict"]) - set(module.state_dict())
        if missing_trained:
            raise KeyError(f"checkpoint weights not in the module: {sorted(missing_trained)[:3]} ...")
        module.load_state_dict(state["state_dict"], strict=False)
    return module.eval()


@torch.no_grad()
def evaluate_policy(module: PPOModule, scorer: RewardModelScorer, prompts: list[str], seed: int) -> dict:
    """Sample one response per prompt (the PPO recipe's generation settings) and score it.

    Returns:
        ``true_reward``, ``rm_score``, ``kl`` (nats per response), ``response_len`` (tokens): means over prompts, and
        ``samples``: the first few (prompt, response) pairs.
    """
    data = PromptDataModule(prompts=prompts, tokenizer=module.tokenizer, batch_size=len(prompts), shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.sampling_seed = seed
    rollout = module.rollout(batch)
    responses = module.decode_responses(rollout)
    true_reward = SyntheticTrueReward()(batch["prompts"], responses)
    rm_score = scorer(batch["prompts"], responses)
    kl = torch.where(rollout.response_mask, rollout.old_logprobs - rollout.ref_logprobs, 0.0).sum(-1)  # (B,), k1
    return {
        "true_reward": float(true_reward.mean()),
        "rm_score": float(rm_score.mean()),
        "kl": float(kl.mean()),
        "response_len": float(rollout.response_mask.sum(-1).float().mean()),
        "samples": [[p.strip(), r] for p, r in zip(batch["prompts"][:6], responses[:6], strict=True)],
    }


def ppo_curve(metrics_csv: Path, last: int = 5) -> dict:
    """``rollout/score``, ``rollout/true_reward`` and ``objective/kl`` of PPO's rollouts: the first iteration and the
    mean of the last ``last`` iterations (the gap between the first two is what reward hacking widens)."""
    rows = list(csv.DictReader(metrics_csv.open()))
    curve = {}
    for name in ("rollout/score", "rollout/true_reward", "objective/kl"):
        values = [float(row[name]) for row in rows if row.get(name)]
        curve[name] = {"first": values[0], "last": statistics.mean(values[-last:]), "iterations": len(values)}
    return curve


def report_table(result: dict) -> str:
    """The Markdown table of README's "The full pipeline" section."""
    sft, ppo, times, curve = result["sft_policy"], result["ppo_policy"], result["seconds"], result["ppo_curve"]
    row = "| {name} | {true_reward:.3f} | {rm_score:.2f} | {kl:.2f} | {response_len:.1f} |"
    score, true = curve["rollout/score"], curve["rollout/true_reward"]
    lines = [
        "| policy | true reward (hidden rule) | reward-model score | KL to reference (nats) | response tokens |",
        "|---|---|---|---|---|",
        row.format(name="SFT (stage 1; PPO's reference)", **sft),
        row.format(name="PPO (stage 3)", **ppo),
        "",
        f"Reward model held-out accuracy: {result['rm_val_accuracy']:.3f} on its validation split (noisy labels, "
        f"ceiling {1 - result['label_noise']:.1f}), {result['rm_accuracy_noisy']:.3f} on {result['eval_pairs']} fresh "
        f"pairs with noisy labels, {result['rm_accuracy_true']:.3f} against the noise-free rule.",
        f"During PPO ({score['iterations']} iterations; first -> mean of the last 5): rollout/score "
        f"{score['first']:.2f} -> {score['last']:.2f}, rollout/true_reward {true['first']:.3f} -> {true['last']:.3f}, "
        f"objective/kl {curve['objective/kl']['first']:.1f} -> {curve['objective/kl']['last']:.1f}.",
        "Wall time on this machine: " + ", ".join(f"{stage} {sec:.0f} s" for stage, sec in times.items()) + ".",
    ]
    return "\n".join(lines)


def run(out: Path, samples: int, seed: int, ppo_only: bool = False, ppo_overrides: tuple[str, ...] = ()) -> dict:
    """Run the stages into ``out`` (only PPO with ``ppo_only``, reusing the earlier outputs) and evaluate."""
    out = out.resolve()
    logs = f"--trainer.logger.init_args.save_dir={out}"
    sft_model, rm_model = out / "sft-model", out / "rm-model"
    seconds = {}
    if not ppo_only:
        seconds["SFT"] = run_stage("sft.yaml", [logs, f"--model.init_args.output_dir={sft_model}"])
        seconds["RM"] = run_stage("rm.yaml", [logs, f"--model.init_args.output_dir={rm_model}"])
    ppo_args = [
        logs,
        f"--model.init_args.policy.name_or_path={sft_model}",
        f"--model.init_args.reward.init_args.name_or_path={rm_model}",
        f"--data.init_args.prompts={REPO / 'recipes' / 'data' / 'pipeline_prompts.jsonl'}",
        *ppo_overrides,
    ]
    seconds["PPO"] = run_stage("ppo.yaml", ppo_args)
    started = time.perf_counter()
    ppo_run = latest_version(out / "ppo")
    scorer = RewardModelScorer(str(rm_model))
    scorer.setup(torch.device("cpu"))
    label_noise = yaml.safe_load((RECIPES / "rm.yaml").read_text())["data"]["init_args"]["label_noise"]
    eval_pairs = 1024
    prompts = WORLD.prompts(samples * len(WORLD.topics), seed=EVAL_SEED)
    checkpoint = ppo_run / "checkpoints" / "last.ckpt"
    result = {
        "label_noise": label_noise,
        "eval_pairs": eval_pairs,
        "rm_val_accuracy": last_logged(latest_version(out / "rm") / "metrics.csv", "val/accuracy"),
        "rm_accuracy_noisy": reward_model_accuracy(scorer, eval_pairs, label_noise),
        "rm_accuracy_true": reward_model_accuracy(scorer, eval_pairs, 0.0),
        "sft_policy": evaluate_policy(load_ppo_module(checkpoint, trained=False), scorer, prompts, seed),
        "ppo_policy": evaluate_policy(load_ppo_module(checkpoint, trained=True), scorer, prompts, seed),
        "ppo_curve": ppo_curve(ppo_run / "metrics.csv"),
        "eval_prompts": len(prompts),
        "ppo_run": str(ppo_run),
    }
    seconds["evaluation"] = time.perf_counter() - started
    result["seconds"] = seconds
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pipeline", help="where every stage writes")
    parser.add_argument("--samples", type=int, default=32, help="evaluation responses per topic and policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation sampling")
    parser.add_argument(
        "--ppo-only", action="store_true", help="run only PPO, on the SFT and reward models already in --out"
    )
    parser.add_argument(
        "--ppo-override",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra lightning-rlhf argument for the PPO stage, e.g. --ppo-override=--model.init_args.ppo.kl_coef=0",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = run(args.out, args.samples, args.seed, args.ppo_only, tuple(args.ppo_override))
    print(report_table(result))
    for name in ("sft_policy", "ppo_policy"):
        print(f"{name} samples: {result[name]['samples']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
