"""Multi-process PPO on CPU (gloo): DDP and FSDP2 through the real CLI, in subprocesses killed as a group on timeout.

One process with a per-device batch of 4 and two processes with 2 each must see the same prompts, sample the same
responses (each response's random stream is named by its prompt, not by its process), log the same global metrics and
reach the same weights (SGD); FSDP2 must match DDP, and both resume from their own checkpoints to the metrics and
weights of an uninterrupted run. Processes given the same prompt text sample different responses.
"""

import csv
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from dist_helpers import run_cli_fit

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 300
PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: ", "Tell me ", "Once upon a time", "Yes", "No "]


def config(out_dir: Path, batch_size: int, max_steps: int, ckpt_dir: Path | None = None) -> dict:
    callbacks = [{"class_path": "dist_helpers.DumpRankState", "init_args": {"out_dir": str(out_dir)}}]
    if ckpt_dir is not None:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_top_k": -1},
            }
        )
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out_dir)}},
        },
        "model": {
            "class_path": "lightning_rlhf.module.PPOModule",
            "init_args": {
                "policy": {"tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "lora": {"r": 4, "modules_to_save": ["lm_head"]},
                "generation": {"max_new_tokens": 6},
                "ppo": {"ppo_epochs": 2, "num_minibatches": 1, "kl_coef": 0.05},
                "reward": {"class_path": "lightning_rlhf.rewards.CharFractionReward"},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.5}},
            },
        },
        "data": {
            "class_path": "lightning_rlhf.data.PromptDataModule",
            "init_args": {"prompts": PROMPTS, "batch_size": batch_size, "shuffle": False},
        },
    }


def run_cli(tmp: Path, name: str, cfg: dict, *extra: str) -> Path:
    """Run ``lightning-rlhf fit`` in ``tmp / name`` (see ``dist_helpers.run_cli_fit``); returns that directory."""
    out = tmp / name
    out.mkdir(parents=True)
    run_cli_fit(out, cfg, *extra, timeout_s=TIMEOUT_S)
    return out


def dumps(out: Path, step: int) -> list[dict]:
    files = sorted(out.glob(f"rank*_step{step}.pt"))
    return [torch.load(f, weights_only=True) for f in files]


def metrics(out: Path) -> list[dict]:
    return list(csv.DictReader(next(out.rglob("metrics.csv")).open()))


def two_processes(strategy: str) -> list[str]:
    return ["--trainer.devices=2", f"--trainer.strategy={strategy}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = {"single": run_cli(tmp, "single", config(tmp / "single", batch_size=4, max_steps=2))}
    for name, strategy in (("ddp", "ddp_rlhf"), ("fsdp2", "fsdp2")):
        cfg = config(tmp / name, batch_size=2, max_steps=3, ckpt_dir=tmp / f"{name}_ckpt")
        out[name] = run_cli(tmp, name, cfg, *two_processes(strategy))
        ckpt = next((tmp / f"{name}_ckpt").glob("*step=1.ckpt"))  # the middle of epoch 0 (2 batches per epoch)
        cfg = config(tmp / f"{name}_resumed", batch_size=2, max_steps=3)
        out[f"{name}_resumed"] = run_cli(tmp, f"{name}_resumed", cfg, *two_processes(strategy), f"--ckpt_path={ckpt}")
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_ddp_logs_global_means_and_keeps_ranks_identical(runs):
    for step in (1, 2):
        rank0, rank1 = dumps(runs["ddp"], step)
        assert rank0["world_size"] == 2
        for name in rank0["weights"]:
            assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    rows = metrics(runs["ddp"])
    for step, row in enumerate(rows, start=1):
        scores = [s for d in dumps(runs["ddp"], step) for s in d["scores"]]
        assert len(scores) == 4  # 2 prompts on each of 2 ranks
        torch.testing.assert_close(float(row["rollout/score"]), sum(scores) / len(scores))


def test_one_process_and_two_processes_sample_the_same_responses_and_reach_the_same_weights(runs):
    for step in (1, 2):
        (single,) = dumps(runs["single"], step)
        ddp = dumps(runs["ddp"], step)
        assert sorted(single["responses"]) == sorted(r for d in ddp for r in d["responses"])
        assert sorted(single["scores"]) == pytest.approx(sorted(s for d in ddp for s in d["scores"]))
        assert_same_weights(single["weights"], ddp[0]["weights"])
    assert len({r for step in (1, 2) for r in dumps(runs["single"], step)[0]["responses"]}) > 1  # sampled, not greedy
    for a, b in zip(metrics(runs["single"]), metrics(runs["ddp"])[:2], strict=True):
        for key in ("rollout/score", "objective/kl", "loss/policy", "loss/value", "policy/approx_kl"):
            # float32 values (computed in float32, written as text): compare at float32 tolerances
            torch.testing.assert_close(torch.tensor(float(a[key])), torch.tensor(float(b[key])), msg=key)


def test_fsdp2_matches_ddp(runs):
    for step in (1, 2):
        fsdp = dumps(runs["fsdp2"], step)
        assert_same_weights(fsdp[0]["weights"], dumps(runs["ddp"], step)[0]["weights"])
        assert_same_weights(fsdp[0]["weights"], fsdp[1]["weights"])


@pytest.mark.parametrize(("strategy", "padded_run"), [("fsdp2", "fsdp2"), ("ddp_rlhf", "ddp")])
def test_packing_and_lm_head_chunks_match_the_padded_run_on_two_processes(runs, tmp_path, strategy, padded_run):
    # The boundary check and the packed scoring and update forwards run on every rank (a sharded model under FSDP2),
    # and lm_head runs on 2 tokens at a time, again in the backward pass (the root's parameters under FSDP2).
    cfg = config(tmp_path / "packed", batch_size=2, max_steps=2)
    cfg["model"]["init_args"]["ppo"]["packing"] = True
    cfg["model"]["init_args"]["ppo"]["lm_head_chunk_size"] = 2
    packed = run_cli(tmp_path, "packed", cfg, *two_processes(strategy))
    for step in (1, 2):
        ranks = dumps(packed, step)
        assert len(ranks) == 2
        assert_same_weights(ranks[0]["weights"], dumps(runs[padded_run], step)[0]["weights"])


def test_ddp_all_reduces_the_gradient_once_per_minibatch_whatever_the_micro_batches(tmp_path):
    # 2 rows per process in one minibatch: 1 micro-batch, or 2 of 1 row whose first backward must not all-reduce.
    syncs, weights = {}, {}
    for micro in (None, 1):
        name = f"micro{micro}"
        cfg = config(tmp_path / name, batch_size=2, max_steps=1)
        cfg["model"]["init_args"]["ppo"]["micro_batch_size"] = micro
        counter = {"class_path": "dist_helpers.CountGradientSyncs", "init_args": {"out_dir": str(tmp_path / name)}}
        cfg["trainer"]["callbacks"].append(counter)
        out = run_cli(tmp_path, name, cfg, *two_processes("ddp_rlhf"))
        syncs[micro] = [torch.load(out / f"rank{r}_syncs.pt", weights_only=True)["calls"] for r in (0, 1)]
        weights[micro] = dumps(out, 1)[0]["weights"]
    assert syncs[None][0] > 0
    assert syncs[1] == syncs[None]  # without no_sync the 2-micro-batch run would all-reduce twice as often
    assert_same_weights(weights[1], weights[None])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_mid_epoch_continues_exactly(runs, strategy):
    straight_run, resumed_run = runs[strategy], runs[f"{strategy}_resumed"]
    assert not list(resumed_run.glob("rank*_step1.pt")), "the resumed run repeated step 1"
    for step in (2, 3):
        resumed, straight = dumps(resumed_run, step), dumps(straight_run, step)
        assert len(resumed) == 2
        for rank in (0, 1):  # the same prompts and responses on each rank as the uninterrupted run, the same weights
            assert resumed[rank]["responses"] == straight[rank]["responses"]
            assert resumed[rank]["scores"] == straight[rank]["scores"]
        assert_same_weights(resumed[0]["weights"], straight[0]["weights"])
    # Every metric but the timings, written as text, step by step.
    untimed = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics(resumed_run)]
    assert untimed == [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics(straight_run)[1:]]


def test_processes_given_the_same_prompt_sample_different_responses(tmp_path):
    # Every prompt the same text: before, both processes drew from the same random stream and wrote the same
    # responses at every iteration.
    prompt_file = tmp_path / "same.txt"
    prompt_file.write_text("Say something: \n" * 4)
    cfg = config(tmp_path / "same", batch_size=2, max_steps=2)
    cfg["data"]["init_args"]["prompts"] = str(prompt_file)
    out = run_cli(tmp_path, "same", cfg, *two_processes("ddp_rlhf"))
    for step in (1, 2):
        rank0, rank1 = dumps(out, step)
        assert rank0["responses"] != rank1["responses"]
        assert len(set(rank0["responses"] + rank1["responses"])) == 4


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_rlhf.module import PPOModule

    module = PPOModule()
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    trainer.strategy._lightning_module = module
    module._trainer = trainer
    trainer.strategy.__class__ = FSDPStrategy  # the CPU check happens earlier; only the module's refusal is tested
    with pytest.raises(ValueError, match="fsdp2"):
        module.setup("fit")


def test_fsdp2_resumes_with_an_optimizer_that_keeps_no_state(tmp_path):
    # Plain SGD has an empty optimizer state. Lightning's full-checkpoint loader read the first key of that state
    # (IndexError), so such a run could not be resumed; the fsdp2 preset loads it and restores the learning rate.
    def sgd_config(name: str, **kwargs) -> dict:
        cfg = config(tmp_path / name, batch_size=2, max_steps=2, **kwargs)
        cfg["model"]["init_args"]["optimizer"]["init_args"] = {"lr": 0.5}
        # StepLR multiplies the optimizer's current lr: a resume that lost the parameter groups' lr would diverge.
        scheduler = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}
        cfg["model"]["init_args"]["lr_scheduler"] = scheduler
        return cfg

    straight = run_cli(
        tmp_path, "straight", sgd_config("straight", ckpt_dir=tmp_path / "ckpt"), *two_processes("fsdp2")
    )
    ckpt = next((tmp_path / "ckpt").glob("*step=1.ckpt"))
    assert torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"] == {}
    resumed = run_cli(tmp_path, "resumed", sgd_config("resumed"), *two_processes("fsdp2"), f"--ckpt_path={ckpt}")
    for a, b in zip(dumps(resumed, 2), dumps(straight, 2), strict=True):
        assert_same_weights(a["weights"], b["weights"])


@pytest.mark.parametrize(
    ("lora", "half"),
    [(True, "policy.dtype"), (False, "policy.dtype"), (True, "bf16-true")],
    ids=["lora-dtype", "full-dtype", "lora-bf16-true"],
)
def test_fsdp2_trains_float32_weights_beside_a_bf16_frozen_base(tmp_path, lora, half):
    # A bfloat16 base (policy.dtype, or precision bf16-true) with float32 trained weights: FSDP2 shards units that mix
    # both (LoRA layers), and the trained weights of every unit (value head, lm_head copy, LoRA) stay float32.
    cfg = config(tmp_path / "run", batch_size=2, max_steps=2)
    if half == "policy.dtype":
        cfg["model"]["init_args"]["policy"]["dtype"] = "bfloat16"
    else:
        cfg["trainer"]["precision"] = "bf16-true"
    if not lora:
        cfg["model"]["init_args"]["lora"] = {"enabled": False}
    out = run_cli(tmp_path, "run", cfg, *two_processes("fsdp2"))
    step1, step2 = dumps(out, 1)[0], dumps(out, 2)[0]
    assert {w.dtype for w in step2["weights"].values()} == {torch.float32}
    assert step2["frozen_dtypes"] == ["torch.bfloat16"]  # LoRA: the base; full: the reference copy
    assert any("value_head" in name for name in step2["weights"])
    assert not all(torch.equal(step1["weights"][name], step2["weights"][name]) for name in step2["weights"])
    assert all(math.isfinite(float(row["loss/total"])) for row in metrics(out))


# ------------------------------------------------------------------------------------- several samples per prompt
GROUP_METRICS = ("rollout/score", "rollout/zero_std_frac", "objective/kl", "loss/policy", "loss/kl", "policy/approx_kl")


def group_config(out_dir: Path, batch_size: int, max_steps: int, ckpt_dir: Path | None = None) -> dict:
    """GRPO with 4 samples per prompt and every statistic that crosses processes: the batch std of the returns, the
    KL as a loss term, and the constant-normalised token sums of Dr. GRPO's aggregation. The prompts come from a
    parquet dataset (written by ``datasets``) whose rows carry a column of their own, which the reward needs with
    each response."""
    cfg = config(out_dir, batch_size, max_steps, ckpt_dir)
    prompts = out_dir.with_suffix(".parquet")
    Dataset.from_list([{"prompt": p, "reversed_prompt": p[::-1]} for p in PROMPTS]).to_parquet(str(prompts))
    del cfg["data"]["init_args"]["prompts"]
    cfg["data"]["init_args"]["data_files"] = str(prompts)
    cfg["model"]["init_args"]["reward"] = {"class_path": "dist_helpers.CharFractionNeedingPromptFields"}
    init = cfg["model"]["init_args"]
    init["generation"] = {"max_new_tokens": 5, "samples_per_prompt": 4, "stop_token_ids": list(range(100, 200))}
    init["ppo"] |= {
        "advantage_estimator": "grpo",
        "group_std_norm": "batch",
        "kl_placement": "loss",
        "kl_estimator": "k3",
        "aggregation": "seq-mean-token-sum-norm",
    }
    return cfg


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groups")
    out = {"single": run_cli(tmp, "single", group_config(tmp / "single", batch_size=4, max_steps=2))}
    out["ddp"] = run_cli(tmp, "ddp", group_config(tmp / "ddp", batch_size=2, max_steps=2), *two_processes("ddp_rlhf"))
    # The grouped resume under FSDP2 only: DDP's resume is the same code (test_resume_mid_epoch_continues_exactly).
    cfg = group_config(tmp / "fsdp2", batch_size=2, max_steps=3, ckpt_dir=tmp / "fsdp2_ckpt")
    out["fsdp2"] = run_cli(tmp, "fsdp2", cfg, *two_processes("fsdp2"))
    ckpt = next((tmp / "fsdp2_ckpt").glob("*step=1.ckpt"))
    cfg = group_config(tmp / "fsdp2_resumed", batch_size=2, max_steps=3)
    out["fsdp2_resumed"] = run_cli(tmp, "fsdp2_resumed", cfg, *two_processes("fsdp2"), f"--ckpt_path={ckpt}")
    return out


def test_each_process_samples_whole_groups_and_reaches_the_one_process_weights(group_runs):
    # 4 prompts x 4 samples on one process, 2 x 4 on each of two: the same 16 responses, each group on one process
    # (its statistics are its own), the batch std and every denominator global, so the same weights. Each response
    # reached the reward with its own prompt's field (the reward raises otherwise), on both processes.
    for step in (1, 2):
        (single,) = dumps(group_runs["single"], step)
        ddp = dumps(group_runs["ddp"], step)
        assert [len(d["responses"]) for d in ddp] == [8, 8]
        assert sorted(single["responses"]) == sorted(r for d in ddp for r in d["responses"])
        # the distributed sampler deals prompts 0 and 2 to rank 0, 1 and 3 to rank 1: each with its 4 samples, adjacent
        by_prompt = [single["responses"][4 * p : 4 * p + 4] for p in range(4)]
        assert ddp[0]["responses"] == by_prompt[0] + by_prompt[2]
        assert ddp[1]["responses"] == by_prompt[1] + by_prompt[3]
        assert_same_weights(single["weights"], ddp[0]["weights"])
        assert not any("value_head" in name for name in single["weights"])  # GRPO: no critic
    for a, b in zip(metrics(group_runs["single"]), metrics(group_runs["ddp"]), strict=True):
        for key in GROUP_METRICS:
            torch.testing.assert_close(torch.tensor(float(a[key])), torch.tensor(float(b[key])), msg=key)


def test_fsdp2_matches_ddp_with_groups(group_runs):
    for step in (1, 2):
        fsdp = dumps(group_runs["fsdp2"], step)
        assert fsdp[0]["responses"] == dumps(group_runs["ddp"], step)[0]["responses"]
        assert_same_weights(fsdp[0]["weights"], dumps(group_runs["ddp"], step)[0]["weights"])


def test_a_grouped_run_resumes_exactly(group_runs):
    straight_run, resumed_run = group_runs["fsdp2"], group_runs["fsdp2_resumed"]
    for step in (2, 3):
        resumed, straight = dumps(resumed_run, step), dumps(straight_run, step)
        for rank in (0, 1):
            assert resumed[rank]["responses"] == straight[rank]["responses"]
        assert_same_weights(resumed[0]["weights"], straight[0]["weights"])
    untimed = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics(resumed_run)]
    assert untimed == [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics(straight_run)[1:]]


def test_filtered_groups_keep_every_process_in_step(tmp_path):
    # Every group of rank 0 scores the same (its prompts, 0 and 2, start with "Same"), so its whole rollout is left out
    # of the loss; rank 1's is not. Both still run every forward, backward and collective (FSDP2 would hang
    # otherwise), the step trains on rank 1's responses alone, and the weights stay identical on both ranks.
    cfg = group_config(tmp_path / "filtered", batch_size=2, max_steps=2)
    cfg["model"]["init_args"]["ppo"] |= {"filter_zero_std_groups": True, "group_std_norm": "group"}
    cfg["model"]["init_args"]["reward"] = {"class_path": "dist_helpers.SameScoreForSamePrompts"}
    del cfg["data"]["init_args"]["data_files"]
    cfg["data"]["init_args"]["prompts"] = ["Same one", "abc", "Same two", "Tell me ", *PROMPTS[4:]]
    out = run_cli(tmp_path, "filtered", cfg, *two_processes("fsdp2"))
    rows = metrics(out)
    assert float(rows[0]["rollout/zero_std_frac"]) == 0.5
    assert float(rows[0]["rollout/trained_frac"]) == 0.5
    assert float(rows[0]["policy/updates"]) == 2.0  # two epochs of one minibatch, rank 1's responses in each
    for step in (1, 2):
        rank0, rank1 = dumps(out, step)
        assert_same_weights(rank0["weights"], rank1["weights"])
    assert not all(torch.equal(dumps(out, 1)[0]["weights"][k], v) for k, v in dumps(out, 2)[0]["weights"].items())
