"""PPOModule under a real Trainer on a tiny random Llama: what one PPO iteration changes, counts and logs."""

import json
import math

import pytest
import torch
from helpers import TINY_POLICY as TINY
from helpers import cpu_trainer
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.plugins import MixedPrecision

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig, PolicyConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward, Reward
from lightning_rlhf.rollout import GenerationConfig

PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: ", "Tell me ", "Once upon a time", "Yes", "No way "]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def make_module(**overrides) -> PPOModule:
    kwargs = {
        "policy": TINY,
        "lora": LoraConfig(r=4, alpha=8),
        "generation": GenerationConfig(max_new_tokens=6),
        "ppo": PPOConfig(ppo_epochs=2, num_minibatches=2),
        "reward": CharFractionReward(),
        "optimizer": sgd,
    }
    kwargs.update(overrides)
    return PPOModule(**kwargs)


def fit(module: PPOModule, steps: int = 1, batch_size: int = 4, prompts=None, callbacks=(), precision="32-true"):
    trainer = cpu_trainer(max_steps=steps, precision=precision, callbacks=list(callbacks))
    data = PromptDataModule(prompts=prompts or PROMPTS, batch_size=batch_size, shuffle=False)
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(module: PPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0, verbose=False)


def test_one_step_moves_only_trainable_weights():
    module = make_module()
    module.configure_model()
    before = snapshot(module)
    fit(module)
    after = snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("value_head" in n for n in trainable)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in changed if "value_head" in n}, "value head did not move"
    assert {n for n in changed if "lora_B" in n}, "LoRA B did not move"
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    assert all(torch.isfinite(p).all() for p in after.values())


def test_global_step_counts_ppo_iterations_and_metrics_are_logged():
    module = make_module()
    trainer = fit(module, steps=2)
    assert trainer.global_step == 2
    metrics = trainer.logged_metrics
    expected = {
        "rollout/score",
        "rollout/score_std",
        "rollout/response_len",
        "rollout/eos_frac",
        "objective/kl",
        "objective/kl_coef",
        "objective/rlhf_reward",
        "policy/approx_kl",
        "policy/clipfrac",
        "policy/entropy",
        "policy/grad_norm",
        "value/clipfrac",
        "value/explained_var",
        "loss/policy",
        "loss/value",
        "perf/tokens_per_sec",
    }
    assert expected <= set(metrics), sorted(expected - set(metrics))
    assert 0.0 <= float(metrics["rollout/score"]) <= 1.0
    assert 1.0 <= float(metrics["rollout/response_len"]) <= 6.0
    assert all(math.isfinite(float(metrics[k])) for k in expected)


def test_optimizer_steps_per_iteration():
    module = make_module(
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), ppo=PPOConfig(ppo_epochs=3, num_minibatches=2)
    )
    trainer = fit(module, steps=2)
    adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {2 * 3 * 2.0}
    assert trainer.global_step == 2


def test_micro_batches_accumulate_to_the_minibatch_gradient():
    def run(micro):
        seed_everything(0, verbose=False)
        module = make_module(
            generation=GenerationConfig(max_new_tokens=5, do_sample=False),
            ppo=PPOConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=micro),
        )
        fit(module, batch_size=4)
        return snapshot(module)

    whole, split = run(None), run(2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], msg=name)


def test_packing_trains_like_the_padded_update_on_fewer_positions():
    def run(packing):
        seed_everything(0, verbose=False)
        module = make_module(
            generation=GenerationConfig(max_new_tokens=5, do_sample=False),
            ppo=PPOConfig(ppo_epochs=2, num_minibatches=1, packing=packing),
        )
        module.configure_model()
        positions = []
        module.model.lm.get_base_model().get_decoder().register_forward_pre_hook(
            lambda m, a, kw: positions.append(kw["input_ids"].numel()) if not kw["use_cache"] else None,
            with_kwargs=True,
        )
        fit(module, batch_size=4, prompts=["a", "a much longer prompt, in bytes", "b", "xy"])
        return snapshot(module), sum(positions)

    (padded, padded_positions), (packed, packed_positions) = run(False), run(True)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], msg=name)
    # Scoring and update forwards all ran packed: 2 rows instead of 4 (plus the boundary check's 21 positions).
    assert packed_positions < 0.6 * padded_positions


def test_full_finetuning_keeps_reference_frozen():
    module = make_module(lora=LoraConfig(enabled=False))
    module.configure_model()
    ref_before = {n: p.detach().clone() for n, p in module.model.ref_lm.named_parameters()}
    lm_before = {n: p.detach().clone() for n, p in module.model.lm.named_parameters()}
    fit(module)
    assert all(torch.equal(p, ref_before[n]) for n, p in module.model.ref_lm.named_parameters())
    assert any(not torch.equal(p, lm_before[n]) for n, p in module.model.lm.named_parameters())


class UpdateStats(Callback):
    """Each iteration's update statistics, as logged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in ("policy/approx_kl", "policy/ratio_mean", "policy/clipfrac")})


def gpt2_with_dropout(tmp_path) -> PolicyConfig:
    """A tiny GPT-2 saved in training mode with its config's 0.1 dropouts (residual, embedding, attention)."""
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=384, n_positions=64)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    transformers.GPT2LMHeadModel(config).train().save_pretrained(tmp_path / "gpt2")
    return PolicyConfig(name_or_path=str(tmp_path / "gpt2"), tokenizer="byte")


@pytest.mark.parametrize(
    ("policy", "lora"),
    [("tiny", LoraConfig(r=4, dropout=0.1, modules_to_save=["lm_head"])), ("gpt2", LoraConfig(enabled=False))],
    ids=["lora-dropout", "gpt2-config-dropout"],
)
def test_the_ratio_is_one_before_the_policy_moves_whatever_the_dropout(tmp_path, policy, lora):
    # One epoch of one minibatch: the update's forward runs before any optimizer step, at pi == pi_old. The rollout's
    # forward is in eval mode and the update's in training mode, so any dropout left on shows as a ratio != 1 (a LoRA
    # dropout of 0.1 gave approx_kl 1e-6 to 4e-6 here; GPT-2's config dropouts ratios up to 1.25).
    stats = UpdateStats()
    module = make_module(
        policy=TINY if policy == "tiny" else gpt2_with_dropout(tmp_path),
        lora=lora,
        ppo=PPOConfig(ppo_epochs=1, num_minibatches=1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    fit(module, steps=4, callbacks=[stats])
    assert len(stats.rows) == 4
    for row in stats.rows:
        assert row["policy/approx_kl"] < 1e-10, row
        assert abs(row["policy/ratio_mean"] - 1) < 1e-6, row
        assert row["policy/clipfrac"] == 0.0, row
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


class RolloutSamplesCapture(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[list[int], bool, str]] = []

    def on_rollout_end(self, trainer, module, rollout, samples) -> None:
        rows = zip(rollout.response_ids.tolist(), rollout.ended.tolist(), samples.responses, strict=True)
        self.seen += list(rows)


def test_rewards_see_responses_without_a_stop_token_that_is_not_special():
    # Lowercase letters (ByT5 ids 100-125) end responses as generation.stop_token_ids: not special tokens, so
    # skip_special_tokens kept them in the text rewards and callbacks see.
    stops = list(range(100, 126))
    capture = RolloutSamplesCapture()
    module = make_module(generation=GenerationConfig(max_new_tokens=8, stop_token_ids=stops))
    fit(module, steps=3, callbacks=[capture])
    ended = [(ids, text) for ids, did_end, text in capture.seen if did_end]
    assert ended, "no response ended on a stop token"
    for ids, text in ended:
        first_stop = next(i for i, token in enumerate(ids) if token in stops)
        assert text == module.tokenizer.decode(ids[:first_stop], skip_special_tokens=True), (ids, text)


class PrecisionProbeReward(Reward):
    """Scores 1/3 with a tensor made without a dtype, recording the default dtype and autocast it runs under."""

    def __init__(self) -> None:
        self.seen: set[tuple[torch.dtype, bool]] = set()

    def __call__(self, prompts, responses, **tensors):
        self.seen.add((torch.get_default_dtype(), torch.is_autocast_enabled("cpu")))
        return torch.tensor([1 / 3] * len(responses))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_rewards_run_at_full_precision_whatever_the_trainer_precision(precision):
    # Lightning runs training_step with the default dtype bfloat16 (bf16-true) or inside autocast (bf16-mixed): a
    # reward's torch.tensor([...]) came out bfloat16 (1/3 -> 0.333984375) and a float32 reward model ran in bf16.
    reward, true_reward = PrecisionProbeReward(), PrecisionProbeReward()
    module = make_module(reward=reward, eval_reward=true_reward)
    trainer = fit(module, precision=precision)
    assert reward.seen == true_reward.seen == {(torch.float32, False)}
    third = torch.tensor(1 / 3, dtype=torch.float32).item()
    assert float(trainer.logged_metrics["rollout/score"]) == third
    assert float(trainer.logged_metrics["rollout/true_reward"]) == third
    assert torch.get_default_dtype() == torch.float32  # restored after fit


@pytest.mark.parametrize("stats_scope", ["local", "global"])
def test_a_rollout_of_one_token_skips_whitening_with_a_warning(stats_scope):
    # One prompt per device and a 1-token response: whitening had no variance to divide by and raised.
    module = make_module(
        generation=GenerationConfig(max_new_tokens=1), ppo=PPOConfig(ppo_epochs=1, stats_scope=stats_scope)
    )
    with pytest.warns(
        RuntimeWarning, match="Advantage whitening skipped for this rollout: it has fewer than 2 response tokens"
    ):
        trainer = fit(module, steps=2, batch_size=1)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.logged_metrics["loss/total"]))


class ConstantReward(Reward):
    def __init__(self, value):
        self.value = value

    def __call__(self, prompts, responses, **tensors):
        return self.value(len(responses))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (lambda n: torch.zeros(n + 1), "shape"),
        (lambda n: torch.full((n,), float("nan")), "NaN|nan|finite"),
        (lambda n: torch.zeros(n, dtype=torch.long), "dtype|float"),
    ],
)
def test_bad_reward_fails_before_weights_move(value, match):
    module = make_module(reward=ConstantReward(value))
    module.configure_model()
    before = snapshot(module)
    with pytest.raises(ValueError, match=match):
        fit(module)
    after = snapshot(module)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_reward_that_raises_is_named():
    class Broken(Reward):
        def __call__(self, prompts, responses, **tensors):
            raise KeyError("oops")

    with pytest.raises(RuntimeError, match="Broken"):
        fit(make_module(reward=Broken()))


def test_missing_reward_says_how_to_fix():
    with pytest.raises(NotImplementedError, match=r"model\.reward"):
        fit(make_module(reward=None))


def test_num_minibatches_must_divide_batch():
    with pytest.raises(ValueError, match="num_minibatches"):
        fit(make_module(ppo=PPOConfig(num_minibatches=3)), batch_size=4)


def test_micro_batch_size_must_divide_minibatch():
    with pytest.raises(ValueError, match="micro_batch_size"):
        fit(make_module(ppo=PPOConfig(num_minibatches=1, micro_batch_size=3)), batch_size=4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("kl_estimator", "k4"), ("aggregation", "sum"), ("score_norm", "zscore"), ("ppo_epochs", 0), ("clip_coef", -0.1)],
)
def test_bad_ppo_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ppo\.{field}"):
        PPOConfig(**{field: value})


def test_subclass_reward_override():
    class LengthPPO(PPOModule):
        def reward(self, prompts, responses, **tensors):
            return torch.tensor([len(r) / 10 for r in responses])

    module = LengthPPO(policy=TINY, lora=LoraConfig(r=4), generation=GenerationConfig(max_new_tokens=4), optimizer=sgd)
    trainer = fit(module)
    assert 0.0 <= float(trainer.logged_metrics["rollout/score"]) <= 0.4


def test_function_reward():
    def first_is_a(prompts, responses):
        return torch.tensor([float(r.startswith("a")) for r in responses])

    trainer = fit(make_module(reward=first_is_a))
    assert float(trainer.logged_metrics["rollout/score"]) in (0.0, 0.25, 0.5, 0.75, 1.0)


def math_prompts(tmp_path, n: int = 4) -> str:
    """A .jsonl of prompts "k+k=" with their answer (a string) and level (a number) as fields."""
    path = tmp_path / "math.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{k}+{k}=", "answer": str(2 * k), "level": k}) + "\n" for k in range(n))
    )
    return str(path)


def test_the_prompt_fields_reach_the_reward_the_eval_reward_and_an_override_with_each_response(tmp_path):
    seen = {}

    def exact(prompts, responses, answer):  # the field it names; not "level"
        seen["reward"] = (list(prompts), list(answer))
        return torch.tensor([float(r == a) for r, a in zip(responses, answer, strict=True)])

    def true_level(prompts, responses, **fields):  # every field
        seen["eval"] = {name: list(values) for name, values in fields.items()}
        return torch.zeros(len(responses))

    module = make_module(
        reward=exact,
        eval_reward=true_level,
        generation=GenerationConfig(max_new_tokens=4, samples_per_prompt=2),
    )
    fit(module, batch_size=2, prompts=math_prompts(tmp_path))
    # 2 prompts x 2 samples: each response with its own prompt's answer, samples adjacent
    assert seen["reward"] == (["0+0=", "0+0=", "1+1=", "1+1="], ["0", "0", "2", "2"])
    assert seen["eval"] == {"answer": ["0", "0", "2", "2"], "level": [0, 0, 1, 1]}

    class LevelPPO(PPOModule):
        def reward(self, prompts, responses, *, level, prompt_ids=None, response_ids=None, response_mask=None):
            seen["override"] = (list(level), response_ids.shape[0])
            return torch.zeros(len(responses))

    fit(LevelPPO(policy=TINY, lora=LoraConfig(r=4), optimizer=sgd), batch_size=2, prompts=math_prompts(tmp_path))
    assert seen["override"] == ([0, 1], 2)  # the field it names (not "answer"), and the token tensors as before


def test_a_reward_that_needs_a_field_the_prompts_lack_stops_before_any_weight_moves(tmp_path):
    def exact(prompts, responses, solution):
        return torch.zeros(len(responses))

    module = make_module(reward=exact)
    module.configure_model()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"needs the prompt field 'solution' .* carry 'answer', 'level'; add "):
        fit(module, batch_size=2, prompts=math_prompts(tmp_path))
    after = snapshot(module)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_adaptive_kl_controller_moves_beta():
    module = make_module(
        ppo=PPOConfig(kl_coef=0.1, kl_estimator="k3", target_kl=1e-6, kl_horizon=10, ppo_epochs=1, num_minibatches=1)
    )
    trainer = fit(module, steps=2)
    # Iteration 1: the fresh adapter equals the reference, KL = 0 < target -> error clipped to -0.2,
    # beta = 0.1 * (1 - 0.2 * 4 / 10) = 0.092. Iteration 2: the policy has moved, k3 KL > 1e-6 -> error +0.2,
    # beta = 0.092 * (1 + 0.2 * 4 / 10) = 0.09936.
    torch.testing.assert_close(module.kl_ctl.value, 0.1 * 0.92 * 1.08)
    torch.testing.assert_close(float(trainer.logged_metrics["objective/kl_coef"]), 0.092)


def test_process_scores_penalizes_only_responses_without_eos():
    module = make_module(ppo=PPOConfig(missing_eos_penalty=1.0))
    scores = module.process_scores(torch.tensor([0.5, 0.5]), ended=torch.tensor([True, False]))
    # The response that ended with EOS keeps 0.5; the truncated one pays the penalty: 0.5 - 1.0 = -0.5.
    torch.testing.assert_close(scores, torch.tensor([0.5, -0.5]))


def test_process_scores_batch_normalization_then_clip():
    module = make_module(ppo=PPOConfig(score_norm="batch", score_clip=1.0))
    # [0, 2, 4]: mean 2, unbiased std 2 -> [-1, 0, 1]; clip 1.0 leaves them.
    torch.testing.assert_close(
        module.process_scores(torch.tensor([0.0, 2.0, 4.0]), torch.ones(3, dtype=torch.bool)),
        torch.tensor([-1.0, 0.0, 1.0]),
    )
    clipped = make_module(ppo=PPOConfig(score_norm="batch", score_clip=0.5))
    torch.testing.assert_close(
        clipped.process_scores(torch.tensor([0.0, 2.0, 4.0]), torch.ones(3, dtype=torch.bool)),
        torch.tensor([-0.5, 0.0, 0.5]),
    )


def test_process_scores_running_normalization_uses_all_batches():
    module = make_module(ppo=PPOConfig(score_norm="running"))
    ended = torch.ones(2, dtype=torch.bool)
    module.process_scores(torch.tensor([0.0, 2.0]), ended)
    # After [0, 2] and [4, 6]: running mean 3, unbiased std of [0, 2, 4, 6] = sqrt(20 / 3).
    out = module.process_scores(torch.tensor([4.0, 6.0]), ended)
    torch.testing.assert_close(out, (torch.tensor([4.0, 6.0]) - 3.0) / math.sqrt(20 / 3))


def test_empty_prompt_batch_is_refused():
    module = make_module()
    empty = {"prompt_ids": torch.zeros(0, 3, dtype=torch.long), "prompt_mask": torch.zeros(0, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="empty prompt batch"):
        module.training_step({**empty, "prompts": []}, 0)


def test_lr_scheduler_steps_once_per_iteration():
    module = make_module(lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    trainer = fit(module, steps=3)
    # 3 iterations x 4 optimizer steps each, but the scheduler steps per iteration: 0.5 * 0.5^3.
    torch.testing.assert_close(trainer.optimizers[0].param_groups[0]["lr"], 0.5 * 0.5**3)


def test_reward_model_is_frozen_and_outside_the_module(tmp_path):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForSequenceClassification

    from lightning_rlhf.rewards import RewardModelScorer

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = RewardModelScorer(str(tmp_path))
    module = make_module(reward=scorer)
    trainer = fit(module)
    assert scorer.model is not None
    reloaded = LlamaForSequenceClassification.from_pretrained(tmp_path)
    for (name, p), q in zip(scorer.model.named_parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert not p.requires_grad
    assert not any(p is q for p in module.parameters() for q in scorer.model.parameters())
    assert math.isfinite(float(trainer.logged_metrics["rollout/score"]))


def test_checkpoint_holds_trained_weights_and_run_state(tmp_path):
    module = make_module(ppo=PPOConfig(kl_coef=0.1, target_kl=1e-6, kl_horizon=10, ppo_epochs=1, num_minibatches=1))
    trainer = fit(module, steps=2)
    path = tmp_path / "ppo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint["lightning_rlhf"]["kl_ctl"]["value"] == module.kl_ctl.value

    # The stored hyperparameters rebuild the same configuration.
    fresh = PPOModule(**checkpoint["hyper_parameters"], reward=CharFractionReward(), optimizer=sgd)
    assert fresh.ppo == module.ppo
    assert fresh.policy_config == module.policy_config
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert fresh.kl_ctl.value == module.kl_ctl.value
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, dict(module.named_parameters())[name], msg=name)


def test_early_stop_kl_stops_the_remaining_updates():
    module = make_module(ppo=PPOConfig(ppo_epochs=2, num_minibatches=2, early_stop_kl=1e-9))
    trainer = fit(module)
    metrics = trainer.logged_metrics
    # The first minibatch is evaluated at the rollout policy (KL ~ 0); after its update the second one's KL is
    # above 1e-9, so 2 of the 4 planned updates run.
    assert float(metrics["policy/updates"]) == 2.0
    assert float(metrics["policy/early_stop"]) == 1.0
    assert trainer.global_step == 1


class RatioBlowUpPPO(PPOModule):
    """Reports an absurd ratio for every minibatch, as after a policy blow-up."""

    def _accumulate_gradients(self, minibatch, units, stats):
        minibatch_stats, total_norm = super()._accumulate_gradients(minibatch, units, stats)
        return {**minibatch_stats, "policy/ratio_mean": 100.0}, total_norm


def test_ratio_threshold_skips_updates_but_counts_the_iteration():
    module = RatioBlowUpPPO(
        policy=TINY,
        generation=GenerationConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, num_minibatches=2, ratio_threshold=10.0),
        reward=CharFractionReward(),
        optimizer=sgd,
    )
    module.configure_model()
    before = snapshot(module)
    with pytest.warns(RuntimeWarning, match="ratio_threshold"):
        trainer = fit(module)
    assert float(trainer.logged_metrics["policy/skipped_updates"]) == 2.0
    assert float(trainer.logged_metrics["policy/updates"]) == 0.0
    assert trainer.global_step == 1
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


class NaNLossPPO(PPOModule):
    def _loss(self, part, stats, minibatch_stats):
        return super()._loss(part, stats, minibatch_stats) * float("nan")


def test_non_finite_updates_are_skipped_then_stop_with_an_error():
    module = NaNLossPPO(
        policy=TINY,
        generation=GenerationConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, num_minibatches=4, max_consecutive_skips=2),
        reward=CharFractionReward(),
        optimizer=sgd,
    )
    module.configure_model()
    before = snapshot(module)
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(RuntimeError, match="3 consecutive"):
        fit(module)
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


class RecordingCallback(Callback):
    """Records every RL-phase hook call."""

    def __init__(self):
        self.calls = []

    def on_rollout_end(self, trainer, module, rollout, samples):
        self.calls.append(("rollout", len(rollout), samples))

    def on_ppo_minibatch_end(self, trainer, module, epoch, index, stats):
        self.calls.append(("minibatch", epoch, index, stats))

    def on_ppo_epoch_end(self, trainer, module, epoch):
        self.calls.append(("epoch", epoch))


def test_rl_phase_hooks_are_called_in_order():
    recorder = RecordingCallback()
    module = make_module(ppo=PPOConfig(ppo_epochs=2, num_minibatches=2))
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    kinds = [c[0] if c[0] != "minibatch" else (c[0], c[1], c[2]) for c in recorder.calls]
    assert kinds == [
        "rollout",
        ("minibatch", 0, 0),
        ("minibatch", 0, 1),
        "epoch",
        ("minibatch", 1, 0),
        ("minibatch", 1, 1),
        "epoch",
    ]
    samples = recorder.calls[0][2]
    assert samples.prompts == PROMPTS[:4]
    assert len(samples.responses) == 4
    assert all(isinstance(r, str) for r in samples.responses)
    torch.testing.assert_close(samples.raw_scores, CharFractionReward()(samples.prompts, samples.responses))
    assert {"policy/approx_kl", "policy/clipfrac", "loss/total", "policy/grad_norm"} <= set(recorder.calls[1][3])


class FlakyReward(Reward):
    """Finite scores, except NaN on the calls listed in ``nan_calls`` (0-based)."""

    def __init__(self, nan_calls):
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def __call__(self, prompts, responses, **tensors):
        scores = CharFractionReward()(prompts, responses)
        if self.calls in self.nan_calls:
            scores[0] = float("nan")
        self.calls += 1
        return scores


class SnapshotEachStep(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(snapshot(module))


def test_non_finite_score_after_the_first_iteration_skips_that_iteration():
    snapshots = SnapshotEachStep()
    module = make_module(reward=FlakyReward(nan_calls={1}))
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[snapshots],
    )
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    assert trainer.global_step == 3  # the skipped iteration still counts
    first, skipped, third = snapshots.weights
    assert all(torch.equal(first[n], skipped[n]) for n in first)  # iteration 2 moved nothing
    assert any(not torch.equal(skipped[n], third[n]) for n in first)  # iteration 3 trained again
    assert module._consecutive_skips == 0


def test_persistently_non_finite_scores_stop_the_run():
    module = make_module(reward=FlakyReward(nan_calls=set(range(1, 100))), ppo=PPOConfig(max_consecutive_skips=2))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="3 consecutive"):
        fit(module, steps=10)


@pytest.mark.parametrize("ent_coef", [0.0, 0.5])
def test_entropy_bonus_changes_the_update_only_when_weighted(ent_coef):
    def run(coef):
        seed_everything(0, verbose=False)
        module = make_module(
            generation=GenerationConfig(max_new_tokens=5, do_sample=False),
            ppo=PPOConfig(ppo_epochs=1, num_minibatches=1, ent_coef=coef),
        )
        fit(module)
        return snapshot(module)

    baseline, weighted = run(0.0), run(ent_coef)
    same = all(torch.equal(baseline[n], weighted[n]) for n in baseline)
    assert same == (ent_coef == 0.0)


class GradNorms(Callback):
    def __init__(self):
        self.norms = []

    def on_ppo_minibatch_end(self, trainer, module, epoch, index, stats):
        self.norms.append(stats["policy/grad_norm"])


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])
def test_gradient_clipping_bounds_the_step_by_the_logged_norm(max_grad_norm):
    # One plain SGD step (lr 0.5): the weights move by exactly lr * min(grad_norm, max_grad_norm).
    norms = GradNorms()
    module = make_module(ppo=PPOConfig(ppo_epochs=1, num_minibatches=1, max_grad_norm=max_grad_norm))
    module.configure_model()
    before = snapshot(module)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[norms])
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    moved = torch.linalg.vector_norm(torch.stack([(after - before[n]).norm() for n, after in snapshot(module).items()]))
    assert len(norms.norms) == 1
    assert norms.norms[0] > 1e-2  # the clip is active at 1e-3 and not at 1e6
    assert math.isclose(moved.item(), 0.5 * min(norms.norms[0], max_grad_norm), rel_tol=1e-4)


def test_float16_with_a_gradient_scaler_is_refused():
    # On CPU Lightning turns precision="16-mixed" into bf16, so the float16 plugin (as on a GPU) is given directly.
    fp16 = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = Trainer(max_steps=1, accelerator="cpu", plugins=[fp16], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"precision 16-mixed .*bf16-mixed"):
        trainer.fit(make_module(), datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))


def test_update_forwards_skip_columns_that_are_padding_in_every_row():
    # One row per micro-batch: every update forward (with gradient) is as wide as that row's own prompt + response,
    # exactly like the rollout's scoring forwards (without gradient) of the same rows.
    module = make_module(ppo=PPOConfig(ppo_epochs=1, num_minibatches=2, micro_batch_size=1))
    module.configure_model()
    widths = {True: [], False: []}
    decoder = module.model.lm.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(
        lambda m, a, kw: (
            widths[torch.is_grad_enabled()].append(kw["input_ids"].shape[1]) if not kw["use_cache"] else None
        ),
        with_kwargs=True,
    )
    fit(module, prompts=["a", "a much longer prompt", "mid size", "xy"])
    scoring = widths[False][::2]  # policy forward, then reference forward, per row
    assert sorted(widths[True]) == sorted(scoring)
    assert len(set(scoring)) > 1
    # Within each minibatch (2 rows) the micro-batches run longest first: grouped by length, so they pad less.
    update = widths[True]
    assert all(update[i] >= update[i + 1] for i in range(0, len(update), 2))
    assert update != sorted(update, reverse=True)  # the minibatches themselves are still shuffled


def test_bf16_mixed_precision_runs_the_model_in_bf16_and_keeps_float32_weights():
    # The GPU recipe's precision on CPU: autocast makes the decoder's matmuls bf16 in the rollout and the update, while
    # the weights, the optimizer and every logged statistic stay float32.
    module = make_module()
    module.configure_model()
    dtypes = set()
    down_proj = module.model.lm.get_base_model().get_decoder().layers[0].mlp.down_proj.base_layer
    down_proj.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    trainer = Trainer(max_steps=1, accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=PromptDataModule(prompts=PROMPTS, batch_size=4, shuffle=False))
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    metrics = trainer.logged_metrics
    for name in ("loss/total", "policy/approx_kl", "objective/kl", "policy/grad_norm"):
        assert math.isfinite(float(metrics[name])), name


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["lora", "lora+lm_head"])
def test_bf16_true_keeps_the_trained_weights_float32_so_small_steps_are_not_lost(modules_to_save):
    # precision: bf16-true (the Qwen recipe's) with AdamW at lr 1e-5: cast to bfloat16, only 74 of 8,192 LoRA A
    # elements moved in 4 iterations x 4 steps (a step below half a bfloat16 rounding step is lost). The trained
    # weights must stay float32 masters while the frozen base is bfloat16.
    module = make_module(
        lora=LoraConfig(r=4, alpha=8, modules_to_save=modules_to_save),
        ppo=PPOConfig(ppo_epochs=4, num_minibatches=1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
    )
    module.configure_model()
    before = snapshot(module)
    trainer = fit(module, steps=4, precision="bf16-true")
    after = snapshot(module)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {after[n].dtype for n in trained} == {torch.float32}
    assert {p.dtype for n, p in module.named_parameters() if n not in trained} == {torch.bfloat16}
    for group in ("lora_A", "value_head", *(["modules_to_save"] if modules_to_save else [])):
        names = [n for n in trained if group in n]
        moved = sum(int((after[n] != before[n].to(after[n].dtype)).sum()) for n in names)
        total = sum(after[n].numel() for n in names)
        assert moved > 0.9 * total, f"{group}: {moved} of {total} elements moved"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits, values = module.model(ids, torch.ones_like(ids, dtype=torch.bool), mode="policy")
    assert values.dtype == torch.float32
    assert logits.dtype == torch.bfloat16  # the trained lm_head copy hands back the frozen model's dtype
    metrics = trainer.logged_metrics
    assert float(metrics["policy/updates"]) == module.ppo.ppo_epochs * module.ppo.num_minibatches
    for name in ("loss/total", "loss/value", "value/explained_var", "objective/kl", "policy/grad_norm"):
        assert math.isfinite(float(metrics[name])), name


def test_bf16_true_with_full_fine_tuning_trains_float32_weights_and_says_so():
    module = make_module(lora=LoraConfig(enabled=False))
    with pytest.warns(UserWarning, match="full fine-tuning: every LM weight trains"):
        trainer = fit(module, precision="bf16-true")
    assert {p.dtype for p in module.model.lm.parameters()} == {torch.float32}
    assert {p.dtype for p in module.model.ref_lm.parameters()} == {torch.bfloat16}
    assert math.isfinite(float(trainer.logged_metrics["loss/total"]))
