"""A million short prompts: load, tokenise, cache, and start training in bounded time and memory.

Prints one JSON line per phase, each run in a fresh process (so its peak RSS is its own), all through the package's
``PromptDataModule`` on a parquet file written by ``datasets``:

- ``write``: ``--num-prompts`` prompts (``"Item 123456: say something "``, with an ``answer`` field) to parquet.
- ``cold``: ``setup()`` with an empty ``HF_DATASETS_CACHE``: read the parquet, tokenise in ``--num-proc``
  processes (``datasets.map``), write the cache, check every length.
- ``warm``: ``setup()`` again: the tokenised cache is read, nothing is tokenised.
- ``fit``: ``Trainer.fit`` of the quickstart's tiny PPO model for ``--steps`` iterations on the whole dataset (warm
  cache): wall time from the start of the process to the end of fit, and the peak RSS.
- ``epochs``: the data loader over ``--epoch-prompts`` of the prompts for ``--epochs`` epochs (no model): the RSS
  after each epoch, to show it does not grow.
- ``jsonl`` (with ``--compare-jsonl``): ``setup()`` of the same prompts from a ``.jsonl`` file, the in-memory path
  (every row tokenised into Python lists).

Run ``python benchmarks/large_dataset.py --help`` for the options; ``benchmarks/README.md`` has measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("write", "cold", "warm", "fit", "epochs")


def peak_rss_mib() -> float:
    """This process's peak resident set size, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now, MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def data_module(args: argparse.Namespace, **overrides):
    from lightning_rlhf.data import PromptDataModule
    from lightning_rlhf.models import PolicyConfig, load_tokenizer

    source = {"data_files": str(Path(args.workdir) / "prompts.parquet"), "num_proc": args.num_proc}
    kwargs = {**source, "batch_size": args.batch_size, "max_prompt_length": 64, **overrides}
    return PromptDataModule(tokenizer=load_tokenizer(PolicyConfig()), **kwargs)


def run_phase(args: argparse.Namespace) -> dict:
    import datasets  # noqa: F401  (imports before the clock starts: the phases time the work, not the imports)
    import lightning

    import lightning_rlhf.data
    import lightning_rlhf.module  # noqa: F401

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: dict = {"phase": args.phase}
    if args.phase == "write":
        from datasets import Dataset

        rows = {
            "prompt": [f"Item {i}: say something " for i in range(args.num_prompts)],
            "answer": [str(i % 97) for i in range(args.num_prompts)],
        }
        Dataset.from_dict(rows).to_parquet(str(Path(args.workdir) / "prompts.parquet"))
        if args.compare_jsonl:
            with open(Path(args.workdir) / "prompts.jsonl", "w") as f:
                for prompt, answer in zip(rows["prompt"], rows["answer"], strict=True):
                    f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        out["parquet_mib"] = (Path(args.workdir) / "prompts.parquet").stat().st_size / 2**20
    elif args.phase in ("cold", "warm"):
        dm = data_module(args)
        dm.setup("fit")
        out["rows"] = len(dm.rows)
        out["first_row"] = {k: v for k, v in dm.rows[0].items() if k != "input_ids"}
    elif args.phase == "jsonl":
        dm = data_module(args, data_files=None, num_proc=None, prompts=str(Path(args.workdir) / "prompts.jsonl"))
        dm.setup("fit")
        out["rows"] = len(dm.rows)
    elif args.phase == "fit":
        import lightning

        from lightning_rlhf.module import PPOModule
        from lightning_rlhf.rewards import CharFractionReward

        lightning.seed_everything(0)
        model = PPOModule(
            policy={"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}},
            lora={"r": 8, "modules_to_save": ["lm_head"]},
            generation={"max_new_tokens": 8},
            reward=CharFractionReward(min_len=8),
        )
        trainer = lightning.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=data_module(args))
        out["steps"] = trainer.global_step
    else:
        dm = data_module(args, split=f"train[:{args.epoch_prompts}]")
        dm.setup("fit")
        loader, out["rss_mib_after_epoch"] = dm.train_dataloader(), []
        for _ in range(args.epochs):
            for _ in loader:
                pass
            out["rss_mib_after_epoch"].append(round(current_rss_mib(), 1))
    out["wall_s"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2, help="tokenising processes (datasets.map)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--steps", type=int, default=2, help="PPO iterations of the fit phase")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-prompts", type=int, default=20_000, help="prompts per epoch of the epochs phase")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=[*PHASES, "jsonl"])
    parser.add_argument("--compare-jsonl", action="store_true", help="also write a .jsonl and time its setup")
    parser.add_argument("--threads", type=int, help="torch threads of each phase's process")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(run_phase(args)))
        return
    phases = [*args.phases, *(["jsonl"] if args.compare_jsonl and "jsonl" not in args.phases else [])]
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(workdir) / "cache"), "TOKENIZERS_PARALLELISM": "false"}
        for phase in phases:
            command = [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--workdir", workdir]
            start = time.perf_counter()
            result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            line = json.loads(result.stdout.strip().splitlines()[-1])
            line["process_wall_s"] = round(time.perf_counter() - start, 2)  # with interpreter start and imports
            line["num_prompts"] = args.num_prompts
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
