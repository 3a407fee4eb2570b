"""PPOModule with several samples per prompt and the critic-free estimators, under a real Trainer on the tiny Llama:
what each option changes in the rollout, the loss and the update (the math itself is in ``test_advantages.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_POLICY, cpu_trainer
from lightning.pytorch import Callback, seed_everything

from lightning_rlhf.config import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CharFractionReward, Reward
from lightning_rlhf.rollout import GenerationConfig

PROMPTS = ["Say: ", "Hello there. ", "abc", "Write something nice: ", "Tell me ", "Once upon a time", "Yes", "No way "]
STOPS = list(range(100, 200))
"""A quarter of the near-uniform tiny model's vocabulary as stop tokens: responses end at various lengths."""


def make_module(n: int = 2, **ppo) -> PPOModule:
    return PPOModule(
        policy=TINY_POLICY,
        lora=LoraConfig(r=4, alpha=8),
        generation=GenerationConfig(max_new_tokens=6, samples_per_prompt=n, stop_token_ids=STOPS),
        ppo=PPOConfig(**{"ppo_epochs": 2, "num_minibatches": 2} | ppo),
        reward=CharFractionReward(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )


def fit(module: PPOModule, steps: int = 1, batch_size: int = 4, callbacks=(), prompts=PROMPTS):
    trainer = cpu_trainer(max_steps=steps, callbacks=list(callbacks))
    trainer.fit(module, datamodule=PromptDataModule(prompts=prompts, batch_size=batch_size, shuffle=False))
    return trainer


def snapshot(module: PPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class Rollouts(Callback):
    """Every rollout (after step 4) and its samples, and the logged metrics of every iteration."""

    def __init__(self) -> None:
        self.rollouts, self.samples, self.metrics = [], [], []

    def on_rollout_end(self, trainer, module, rollout, samples) -> None:
        self.rollouts.append(rollout)
        self.samples.append(samples)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0, verbose=False)


# ------------------------------------------------------------------------------------------------- the rollout
def test_a_rollout_holds_n_responses_per_prompt_each_scored_with_its_prompt():
    seen = Rollouts()
    fit(make_module(n=3), batch_size=4, callbacks=[seen])
    rollout, samples = seen.rollouts[0], seen.samples[0]
    assert len(rollout) == 12
    assert rollout.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert samples.prompts == [p for p in PROMPTS[:4] for _ in range(3)]
    assert torch.equal(samples.raw_scores, CharFractionReward()(samples.prompts, samples.responses))
    assert len(set(samples.responses)) > 4  # the samples of a prompt are drawn from different streams


def test_the_first_sample_of_each_prompt_is_the_response_of_a_one_sample_run():
    # Sample 0's stream is the one a run with one sample per prompt uses: raising n adds responses, it does not
    # change the first one.
    one, three = Rollouts(), Rollouts()
    fit(make_module(n=1), batch_size=4, callbacks=[one])
    seed_everything(0, verbose=False)
    fit(make_module(n=3), batch_size=4, callbacks=[three])
    assert three.samples[0].responses[::3] == one.samples[0].responses


def test_the_rollout_size_checks_count_every_sample():
    with pytest.raises(
        ValueError, match=r"rollout size 12 \(= data.batch_size 4 x model.generation.samples_per_prompt 3\)"
    ):
        fit(make_module(n=3, num_minibatches=5), batch_size=4)
    with pytest.raises(ValueError, match=r"micro_batch_size=4 must divide the minibatch size 6"):
        fit(make_module(n=3, num_minibatches=2, micro_batch_size=4), batch_size=4)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_estimators_need_two_samples_per_prompt(estimator):
    with pytest.raises(ValueError, match=r"set model.generation.samples_per_prompt >= 2 \(e.g. 4\), got 1"):
        make_module(n=1, advantage_estimator=estimator)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"n": 1, "filter_zero_std_groups": True}, "filter_zero_std_groups needs groups"),
        ({"overlong_buffer": 7}, r"overlong_buffer=7 is longer than model.generation.max_new_tokens=6"),
        ({"advantage_estimator": "grpo", "critic_warmup_steps": 2}, r"critic_warmup_steps=2 is invalid: .* no critic"),
        ({"advantage_estimator": "rloo", "value_head_lr": 1e-3}, r"value_head_lr=0.001 is invalid: .* no critic"),
        ({"advantage_estimator": "ppo"}, r"model.ppo.advantage_estimator='ppo' is invalid"),
        ({"group_std_norm": "std"}, r"model.ppo.group_std_norm='std' is invalid"),
        ({"kl_placement": "both"}, r"model.ppo.kl_placement='both' is invalid"),
        ({"clip_coef_high": 0.0}, r"model.ppo.clip_coef_high=0.0 is invalid"),
    ],
)
def test_bad_settings_name_the_field_before_anything_is_built(settings, match):
    with pytest.raises(ValueError, match=match):
        make_module(**settings)


# --------------------------------------------------------------------------------------------- critic-free runs
@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_every_estimator_trains_through_fit(estimator):
    seen = Rollouts()
    module = make_module(n=2, advantage_estimator=estimator)
    module.configure_model()
    before = snapshot(module)
    fit(module, steps=2, callbacks=[seen])
    moved = [name for name, p in module.named_parameters() if not torch.equal(before[name], p)]
    assert any("lora_" in name for name in moved)
    metrics = seen.metrics[-1]
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss/", "policy/", "rollout/"))), metrics
    assert "rollout/zero_std_frac" in metrics
    critic = estimator == "gae"
    assert (module.model.value_head is not None) == critic
    assert ("loss/value" in metrics) == ("value/explained_var" in metrics) == ("value/clipfrac" in metrics) == critic
    assert (seen.rollouts[0].old_values is not None) == critic


def test_a_critic_free_run_holds_no_value_head_parameters_or_optimizer_state():
    def trained(estimator):
        seed_everything(0, verbose=False)
        module = make_module(n=2, advantage_estimator=estimator)
        module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
        trainer = fit(module)
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        return module, sum(p.numel() for p in params), state_bytes

    gae, gae_params, gae_state = trained("gae")
    grpo, grpo_params, grpo_state = trained("grpo")
    head = gae.model.value_head.weight.numel() + gae.model.value_head.bias.numel()  # hidden size + 1
    assert grpo.model.value_head is None
    assert gae_params - grpo_params == head
    assert gae_state - grpo_state == 2 * 4 * head + 2 * 4  # AdamW: exp_avg, exp_avg_sq per weight; a step per tensor


def test_a_critic_free_rollout_runs_no_value_head():
    calls = []
    module = make_module(n=2, advantage_estimator="rloo")
    module.configure_model()
    original = module.model.critic_values
    module.model.critic_values = lambda *a: calls.append(1) or original(*a)
    fit(module)
    assert calls == []


# --------------------------------------------------------------------------------------------------- loss mask
class PromptOrResponseReward(Reward):
    """The same score for every response to a prompt that starts with "Same"; the response's length in characters
    otherwise (responses end at various lengths)."""

    def __call__(self, prompts, responses, **tensors):
        scores = [0.5 if p.startswith("Same") else float(len(r)) for p, r in zip(prompts, responses, strict=True)]
        return torch.tensor(scores)


@pytest.mark.parametrize("filter_zero_std_groups", [False, True])
def test_groups_that_all_scored_the_same_are_counted_and_left_out_on_request(filter_zero_std_groups):
    seen = Rollouts()
    module = make_module(n=3, advantage_estimator="grpo", filter_zero_std_groups=filter_zero_std_groups)
    module.reward_fn = PromptOrResponseReward()
    prompts = ["Same here", "abc", "Same again", "Tell me "]
    fit(module, batch_size=4, callbacks=[seen], prompts=prompts)
    rollout = seen.rollouts[0]
    zero_std = torch.tensor([True] * 3 + [False] * 3 + [True] * 3 + [False] * 3)
    assert seen.metrics[0]["rollout/zero_std_frac"] == 0.5
    assert (rollout.advantages[zero_std] == 0).all()
    if filter_zero_std_groups:
        assert torch.equal(rollout.loss_mask, ~zero_std)
        assert seen.metrics[0]["rollout/trained_frac"] == 0.5
    else:
        assert rollout.loss_mask is None
        assert "rollout/trained_frac" not in seen.metrics[0]


class FlatReward(Reward):
    def __call__(self, prompts, responses, **tensors):
        return torch.full((len(responses),), 0.25)


@pytest.mark.parametrize("filter_zero_std_groups", [False, True])
def test_a_rollout_with_nothing_to_train_on_makes_no_optimizer_step(filter_zero_std_groups):
    # Every group scored the same: GRPO's advantages are all 0. AdamW would still move the weights (its weight decay)
    # on zero gradients; with the groups filtered out no step runs at all.
    module = make_module(n=2, advantage_estimator="grpo", filter_zero_std_groups=filter_zero_std_groups)
    module.reward_fn = FlatReward()
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    module.configure_model()
    before = snapshot(module)
    trainer = fit(module)
    unchanged = all(torch.equal(before[name], p) for name, p in module.named_parameters())
    assert unchanged == filter_zero_std_groups
    assert trainer.global_step == 1  # the iteration still counts
    assert float(trainer.logged_metrics["policy/updates"]) == (0.0 if filter_zero_std_groups else 4.0)


def test_mask_truncated_trains_only_on_responses_that_ended():
    seen = Rollouts()
    fit(make_module(n=2, mask_truncated=True), batch_size=4, callbacks=[seen])
    rollout = seen.rollouts[0]
    assert 0 < int(rollout.ended.sum()) < len(rollout)
    assert torch.equal(rollout.loss_mask, rollout.ended)
    assert torch.equal(rollout.trained_mask, rollout.response_mask & rollout.ended[:, None])
    assert seen.metrics[0]["rollout/trained_frac"] == pytest.approx(float(rollout.ended.float().mean()))


@pytest.mark.parametrize(
    "aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize(("estimator", "mask_truncated"), [("gae", True), ("grpo", False), ("grpo", True)])
def test_micro_batches_accumulate_to_the_minibatch_gradient(aggregation, estimator, mask_truncated):
    # Every aggregation, with and without responses left out of the loss: the weighted micro-batch gradients add up
    # to the minibatch's, so the weights after an update do not depend on micro_batch_size; nor does the logged loss
    # (each micro-batch's terms weigh what they average over, not its tokens) or the logged entropy (a token mean).
    def run(micro):
        seed_everything(0, verbose=False)
        module = make_module(
            n=2,
            advantage_estimator=estimator,
            aggregation=aggregation,
            mask_truncated=mask_truncated,
            ppo_epochs=1,
            num_minibatches=1,
            micro_batch_size=micro,
        )
        logged = fit(module, batch_size=4).logged_metrics
        return snapshot(module), {key: logged[key] for key in ("loss/policy", "loss/total", "policy/entropy")}

    (whole, whole_logged), (split, split_logged) = run(None), run(2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], msg=name)
    for key, value in whole_logged.items():
        torch.testing.assert_close(split_logged[key], value, msg=key)


# ---------------------------------------------------------------------------------------------- reward shaping
def test_the_kl_goes_into_the_loss_instead_of_the_reward():
    seen = Rollouts()
    module = make_module(n=2, advantage_estimator="grpo", kl_placement="loss", kl_estimator="k3", kl_coef=0.3)
    module.reward_fn = PromptOrResponseReward()  # the response's length: a signal that moves the policy
    fit(module, steps=2, callbacks=[seen])
    rollout = seen.rollouts[1]
    last = torch.nn.functional.one_hot(rollout.response_mask.sum(-1) - 1, rollout.response_mask.shape[1]).bool()
    # the per-token reward is the score on the last token and nothing else
    assert torch.equal(rollout.rewards, torch.where(last, rollout.scores[:, None], 0.0))
    assert (rollout.kl[rollout.response_mask] != 0).any()  # the policy moved in iteration 1: the KL is not 0
    assert seen.metrics[1]["loss/kl"] > 0


def test_the_overlong_penalty_lowers_the_score_of_long_responses():
    seen = Rollouts()
    fit(make_module(n=2, overlong_buffer=3, overlong_penalty=2.0), batch_size=4, callbacks=[seen])
    rollout, samples = seen.rollouts[0], seen.samples[0]
    lengths = rollout.response_mask.sum(-1).float()
    # max_new_tokens 6, buffer 3: from 4 tokens on, -2 * (length - 3) / 3
    penalty = -2.0 * (lengths - 3).clamp(min=0) / 3
    assert (penalty < 0).any()
    assert (penalty == 0).any()
    torch.testing.assert_close(rollout.scores, samples.raw_scores + penalty)
    assert seen.metrics[0]["rollout/overlong_penalty"] == pytest.approx(float(penalty.mean()))
    assert seen.metrics[0]["rollout/score"] == pytest.approx(float(samples.raw_scores.mean()))  # the reward's own


def test_clip_higher_reaches_the_update():
    # One epoch, one minibatch, the first update at pi == pi_old: the clip range does not act; the second epoch's does.
    def clipfrac(high):
        seed_everything(0, verbose=False)
        seen = Rollouts()
        fit(make_module(n=2, clip_coef=0.05, clip_coef_high=high, ppo_epochs=3, num_minibatches=1), callbacks=[seen])
        return seen.metrics[0]["policy/clipfrac"]

    assert clipfrac(10.0) < clipfrac(None)


# ---------------------------------------------------------------------------------------------------- the critic
def test_the_critic_warmup_trains_only_the_value_head():
    module = make_module(n=1, critic_warmup_steps=1)
    module.configure_model()
    start = snapshot(module)
    fit(module, steps=1)
    after_warmup = snapshot(module)
    changed = {name for name in start if not torch.equal(start[name], after_warmup[name])}
    assert changed == {"model.value_head.weight", "model.value_head.bias"}
    module = make_module(n=1, critic_warmup_steps=1)
    fit(module, steps=2)  # the second iteration trains the policy too
    assert any("lora_" in name and not torch.equal(start[name], p) for name, p in module.named_parameters())


def test_the_value_head_gets_a_learning_rate_of_its_own():
    module = make_module(n=1, value_head_lr=0.125)
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3)
    trainer = fit(module)
    groups = trainer.optimizers[0].param_groups
    assert [group["lr"] for group in groups] == [1e-3, 0.125]
    head = {id(p) for p in module.model.value_head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
