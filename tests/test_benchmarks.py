"""The benchmark scripts still run: one tiny iteration of each on the Qwen2-shaped preset, the JSON line checked.

Timings are not asserted (benchmarks/README.md has them); what is checked is what the scripts promise: the preset's
shape reaches the model, every response runs to full length (an EOS the model's own vocabulary cannot sample), ids
past the byte tokenizer decode, and the separate design holds more parameter bytes than the shared one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_rlhf.models import (
    LoraConfig,
    PolicyConfig,
    PolicyValueModel,
    TinyModelConfig,
    build_policy,
    load_tokenizer,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_RUN = ("--preset", "qwen2-tiny", "--batch", "4", "--prompt-len", "4", "8", "--max-new-tokens", "4")


def run_script_stdout(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(BENCHMARKS / script), *args, "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_script_lines(script: str, *args: str) -> list[dict]:
    return [json.loads(line) for line in run_script_stdout(script, *args).strip().splitlines()]


def run_script(script: str, *args: str) -> dict:
    return run_script_lines(script, *args)[-1]


PHASES = ("generate", "old_logprobs_values_forward", "ref_forward", "score_advantages", "update")
"""The phases of ``ppo_iteration.py`` that make up an iteration's ``total``, in order."""


@pytest.mark.parametrize("design", ["shared", "separate"])
def test_ppo_iteration_benchmark_runs_the_preset_in_bf16_mixed(design):
    out = run_script(
        "ppo_iteration.py",
        *TINY_RUN,
        *("--design", design, "--precision", "bf16-mixed", "--iterations", "1", "--warmup", "0"),
        *("--ppo-epochs", "1", "--num-minibatches", "2", "--peak-tflops", "1"),
    )
    shape = out["config"]["shape"]
    assert (shape["num_kv_heads"], shape["num_heads"], shape["vocab_size"]) == (2, 4, 1000)
    assert out["config"]["precision"] == "bf16-mixed"
    assert out["config"]["generation"]["min_new_tokens"] == 4  # every response full length (the script checks it)
    assert out["utilization"]["matmul"].endswith("bfloat16")
    assert out["generated_tokens_per_sec"]["iteration"] > 0
    # The phases split the module's own perf/iteration_sec: each positive, together the total.
    seconds = out["seconds_median"]
    assert min(seconds[phase] for phase in PHASES) > 0
    assert sum(seconds[phase] for phase in PHASES) == pytest.approx(seconds["total"], abs=1e-3)
    assert 0 < seconds["update_forward"] < seconds["update"]
    assert seconds["step_wall"] >= seconds["total"]
    phases = out["utilization"]["phases"]
    assert phases["update"]["gflop"] > phases["ref_forward"]["gflop"] > 0
    assert "mfu" in phases["update"]
    roles = out["param_bytes"]
    if design == "shared":  # LoRA: the reference and the critic live in the policy's storage
        assert roles["all_roles_unique"] == roles["policy"] + 4 * (shape["hidden_size"] + 1)  # + the value head
        assert "rollout_critic_forward" not in seconds
    else:
        assert roles["all_roles_unique"] > 2.5 * roles["reference"]
        assert roles["trainable"] > roles["critic"]  # the critic is trained in full, next to the adapter
        # The critic_values override's time and the rest of the policy forward, inside the phases they split.
        for phase, calls in (("rollout", "old_logprobs_values_forward"), ("update", "update_forward")):
            parts = seconds[f"{phase}_policy_forward"], seconds[f"{phase}_critic_forward"]
            assert min(parts) > 0
            assert sum(parts) <= seconds[calls] + 1e-3


TINY_LLAMA = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def shared_and_separate(lora: LoraConfig, dtype: str) -> tuple[PolicyValueModel, PolicyValueModel]:
    """Both designs of ``ppo_iteration.py`` built from the same seed (the benchmarks are importable: conftest)."""
    import ppo_iteration

    cfg = PolicyConfig(tiny=TINY_LLAMA, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    shared = build_policy(cfg, lora, tokenizer)
    torch.manual_seed(0)
    return shared, ppo_iteration.build_separate(cfg, lora, tokenizer)


@pytest.mark.parametrize("lora", [LoraConfig(r=4, alpha=8), LoraConfig(enabled=False)], ids=["lora", "full"])
def test_ppo_iteration_separate_design_starts_from_the_shared_designs_init(lora):
    shared, separate = shared_and_separate(lora, "bfloat16")
    ours, theirs = dict(separate.lm.named_parameters()), dict(shared.lm.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, param in theirs.items():  # base weights and adapter: the same values, dtypes and trained flags
        assert ours[name].dtype == param.dtype, name
        assert ours[name].requires_grad == param.requires_grad, name
        torch.testing.assert_close(ours[name], param, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(separate.value_head.weight, shared.value_head.weight, rtol=0, atol=0)
    base = separate.ref_lm.get_decoder().state_dict()  # the frozen copy of the base model
    for name, param in separate.critic.state_dict().items():
        torch.testing.assert_close(param, base[name].float(), rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for p in separate.critic.parameters())
    assert not any(p.requires_grad for p in separate.ref_lm.parameters())


def test_ppo_iteration_separate_design_reads_the_values_from_its_own_critic():
    shared, separate = shared_and_separate(LoraConfig(r=4, alpha=8), "float32")
    input_ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    with torch.no_grad():
        logits, values = shared(input_ids, mask, logits_slice=(2, 6))
        # At init the critic is a copy of the base and the adapter's B is 0: every output is the shared design's.
        separate_logits, separate_values = separate(input_ids, mask, logits_slice=(2, 6))
        torch.testing.assert_close(separate_logits, logits)
        torch.testing.assert_close(separate_values, values)
        torch.testing.assert_close(separate(input_ids, mask, mode="ref"), shared(input_ids, mask, mode="ref"))
        separate.critic.norm.weight.mul_(2.0)  # a critic of its own: the values move, the logits do not
        moved_logits, moved_values = separate(input_ids, mask, logits_slice=(2, 6))
    torch.testing.assert_close(moved_logits, logits)
    assert not torch.allclose(moved_values, values)
    assert separate.critic_seconds["rollout"] > 0  # no grad: timed as a rollout forward


# vLLM's CPU attention needs a head size of at least 32 (qwen2-tiny's is 16): the tiny Llama, hidden 64, 2 heads.
VLLM_RUN = ("--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "2", *TINY_RUN[2:])


@pytest.mark.parametrize(
    ("model", "options", "variants", "vocab"),
    [
        pytest.param(
            TINY_RUN, (), ("plain_generate", "hf_merged", "cached_unmerged", "cached_merged"), 1000, id="default"
        ),
        pytest.param(
            VLLM_RUN,
            ("--variants", "cached_merged", "vllm"),
            ("cached_merged", "vllm"),
            384,
            id="vllm",
            marks=pytest.mark.vllm,
        ),
    ],
)
def test_generation_benchmark_runs_every_variant_to_full_length(model, options, variants, vocab):
    out = run_script(
        "generation.py", *model, *options, "--repeats", "1", "--precision", "bf16-mixed", "--device", "cpu"
    )
    assert out["config"]["vocab"] == vocab
    assert list(out["response_tokens_mean"]) == list(variants)
    assert set(out["response_tokens_mean"].values()) == {4 * 4}  # 4 rows x 4 tokens, no stop token reachable
    assert out[f"speedup_vs_{variants[0]}"][variants[0]] == 1.0
    if "vllm" in variants:  # started once, then the policy pushed again before each timed call
        assert out["vllm_start_seconds"] > out["vllm_load_policy_seconds_median"] > 0


def test_packing_benchmark_packs_short_responses_into_fewer_positions():
    args = ("--preset", "qwen2-tiny", "--batch", "8", "--num-minibatches", "2", "--prompt-len", "4", "8")
    full, skewed = run_script_lines(
        "packing.py", *args, "--max-new-tokens", "16", "--lengths", "full", "skewed", "--repeats", "1"
    )
    assert (full["config"]["lengths"], skewed["config"]["lengths"]) == ("full", "skewed")
    assert full["response_tokens_mean"] == 16 > skewed["response_tokens_mean"]
    # Rows of 20-24 positions: two never share a 24-wide row, so full-length responses leave nothing to pack.
    for phase in ("scoring", "update"):
        assert full["decoder_positions"][f"{phase}_packed"] == full["decoder_positions"][f"{phase}_padded"]
        positions = skewed["decoder_positions"]
        real = positions[f"real_tokens_{phase}"]
        assert real <= positions[f"{phase}_packed"] < 0.8 * positions[f"{phase}_padded"]
    assert set(skewed["seconds_median"]) == {"scoring_padded", "scoring_packed", "update_padded", "update_packed"}


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_stages_benchmark_gets_one_loss_from_every_variant_and_packs_short_examples(stage):
    args = ("--stage", stage, "--preset", "qwen2-tiny", "--batch", "8", "--prompt-len", "4", "8")
    full, skewed = run_script_lines(
        "stages.py", *args, "--max-response", "16", "--lengths", "full", "skewed", "--repeats", "1"
    )
    for out in (full, skewed):
        losses = list(out["loss"].values())
        assert len(losses) == {"sft": 3, "rm": 2}[stage]
        assert max(losses) - min(losses) < 1e-4 * losses[0]
        if stage == "sft":
            assert out["logits_elements"]["trained"] < out["logits_elements"]["all_logits"]  # prompts predict nothing
    assert full["packed_positions"] == full["padded_positions"]  # 20-24 wide rows: no two share one
    assert skewed["real_tokens"] <= skewed["packed_positions"] < skewed["padded_positions"]


def test_stages_benchmark_scores_the_same_texts_packed_and_padded():
    tiny = ("--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2")
    args = ("--stage", "scorer", *tiny, "--batch", "8", "--scorer-batch-size", "4", "--max-response", "16")
    for out in run_script_lines("stages.py", *args, "--lengths", "full", "skewed", "--repeats", "1"):
        assert out["scorer_batch_size"] == 4
        assert set(out["seconds"]) == {"padded", "packed"}
        assert out["max_score_difference"] < 1e-4


def test_lm_head_chunks_benchmark_gets_the_same_loss_from_every_chunk_size():
    args = ("--preset", "qwen2-tiny", "--batch", "4", "--prompt-len", "4", "8", "--max-new-tokens", "32")
    whole, chunked = run_script_lines("lm_head_chunks.py", *args, "--repeats", "1", "--chunks", "none", "5")
    assert (whole["chunk"], chunked["chunk"]) == ("none", "5")
    torch.testing.assert_close(torch.tensor(chunked["loss"]), torch.tensor(whole["loss"]))
    # The 128 x 1000 float32 logits (0.49 MiB) are not kept for the backward pass (values rounded to 0.1 MiB).
    assert chunked["saved_for_backward_mib"] <= whole["saved_for_backward_mib"] - 0.4
    for run in (whole, chunked):
        assert run["response_tokens"] == 4 * 32
        assert run["memory_peak_mib"] >= run["memory_before_mib"] > 0


def test_ppo_iteration_compile_update_compiles_the_layers_for_the_update_only():
    out = run_script(
        "ppo_iteration.py",
        *TINY_RUN,
        *("--compile-update", "--iterations", "1", "--warmup", "1", "--ppo-epochs", "1", "--num-minibatches", "2"),
    )
    assert out["config"]["compile_update"] is True
    assert out["config"]["compiled_layers"] == 2  # the tiny Qwen2's two decoder layers
    assert out["seconds_median"]["update"] > 0
    assert out["utilization"]["phases"]["update"]["gflop"] > 0


def test_profile_phases_profiles_the_update_of_the_second_iteration():
    args = ("--preset", "qwen2-tiny", "--batch", "4", "--prompt-len", "4", "8", "--max-new-tokens", "4")
    text = run_script_stdout("profile_phases.py", *args, "--design", "separate", "--ppo-epochs", "2")
    rollout, update = text.index("##### rollout: wall"), text.index("##### update: wall")
    assert text[rollout:update].strip().endswith("(not profiled)")  # without --profile-rollout
    update = text[update:]
    assert "aten::mm" in update  # the update's matmuls were recorded
    assert "Optimizer.step#AdamW.step" in update


def test_group_sampling_benchmark_samples_the_same_tokens_with_and_without_prefix_reuse():
    out = run_script(
        "group_sampling.py",
        *("--preset", "qwen2-tiny", "--batch", "2", "--samples-per-prompt", "3", "--prompt-len", "6"),
        *("--max-new-tokens", "3", "--repeats", "1"),
    )
    assert out["config"]["samples_per_prompt"] == 3
    assert out["same_tokens"] is True
    assert set(out["seconds_median"]) == {"prefix_reuse", "repeated_prompts", "hf"}
    assert all(seconds > 0 for seconds in out["seconds_median"].values())  # every variant was timed


def test_estimators_benchmark_builds_the_value_head_for_gae_only():
    lines = run_script_lines(
        "estimators.py",
        *("--preset", "qwen2-tiny", "--batch", "2", "--samples-per-prompt", "2", "--prompt-len", "4", "8"),
        *("--max-new-tokens", "3", "--ppo-epochs", "1", "--num-minibatches", "2", "--iterations", "1"),
        *("--warmup", "0", "--estimators", "gae", "grpo"),
    )
    gae, grpo = lines
    assert (gae["estimator"], gae["value_head"], grpo["estimator"], grpo["value_head"]) == ("gae", True, "grpo", False)
    # the value head is hidden + 1 float32 numbers (weight and bias); AdamW keeps two moments of each, and a float32
    # step count per tensor
    head_bytes = (gae["config"]["hidden"] + 1) * 4
    assert gae["trained_param_bytes"] - grpo["trained_param_bytes"] == head_bytes
    assert gae["optimizer_state_bytes"] - grpo["optimizer_state_bytes"] == 2 * head_bytes + 2 * 4


def test_large_dataset_benchmark_loads_caches_and_trains_on_the_dataset():
    lines = run_script_lines(
        "large_dataset.py",
        *("--num-prompts", "64", "--num-proc", "2", "--steps", "1", "--epochs", "2", "--epoch-prompts", "32"),
    )
    assert [line["phase"] for line in lines] == ["write", "cold", "warm", "fit", "epochs"]
    cold, warm, fit, epochs = lines[1:]
    assert cold["rows"] == warm["rows"] == 64
    assert (
        warm["first_row"]
        == cold["first_row"]
        == {
            "prompt": "Item 0: say something ",
            "index": 0,
            "fields": {"answer": "0"},
        }
    )
    assert fit["steps"] == 1
    assert len(epochs["rss_mib_after_epoch"]) == 2
    assert all(line["peak_rss_mib"] > 0 and line["wall_s"] >= 0 for line in lines)


def test_reward_server_load_every_request_of_every_client_gets_its_own_scores():
    # 4 client processes x 200 calls against one server; each checks every score against its own texts.
    out = run_script("reward_server_load.py", "--clients", "4", "--requests", "200")
    assert out["requests_answered"] == out["requests_sent"] == 800
    assert out["mismatches"] == 0
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p95"] <= out["latency_ms"]["p99"]
