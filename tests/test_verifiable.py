"""Verifiable rewards: math-verify's answer check, the worker pool that bounds every check, MathAnswerReward in fit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import TINY_POLICY, check_that_hangs_dies_or_raises, cpu_trainer

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.models import LoraConfig
from lightning_rlhf.module import PPOConfig, PPOModule
from lightning_rlhf.rewards import CheckPool, MathAnswerReward, check_math_answer, last_match
from lightning_rlhf.rollout import GenerationConfig


@pytest.mark.parametrize(
    ("response", "reference", "pattern", "expected"),
    [
        ("17 + 25 = 42, so the answer is \\boxed{42}.", "42", None, 1.0),
        ("The answer is \\boxed{41}.", "42", None, 0.0),
        ("Half of it: \\boxed{\\frac{1}{2}}", "0.5", None, 1.0),  # equal as numbers, not as strings
        ("First 3, then 4; finally 7", "7", None, 1.0),  # no box: the last expression
        ("no answer here", "7", None, 0.0),
        ("work... #### 12", "12", "#### (.+)", 1.0),  # GSM8K style: the pattern's group
        ("work... 12 but no marker", "12", "#### (.+)", 0.0),  # the pattern does not match: 0
        # Thousands separators: math-verify reads a comma before three digits as one, in either text...
        ("\\boxed{1234}", "1,234", None, 1.0),
        ("So 1,234 in all.", "1234", None, 1.0),
        ("\\boxed{1,234,567}", "1234567", None, 1.0),
        # ... and "1,2" as the set {1, 2}, which stripping commas would have turned into 12
        ("\\boxed{12}", "1,2", None, 0.0),
        ("\\boxed{-6}", "-6", None, 1.0),  # the arithmetic task's negative answers
    ],
)
def test_the_check_compares_the_answer_with_the_reference(response, reference, pattern, expected):
    assert check_math_answer((response, reference, pattern)) == expected


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"####\s*(.+)", "first #### 1\nthen #### 72", "72"),  # the last match; . stops at the newline
        (r"####\s*(.+)", "no marker", None),
        (r"\d+", "1 and 22 and 333", "333"),  # no group: the whole match
        (r"(\d+)-(\d+)", "1-2, 3-4", "3"),  # groups: the first of the last match
    ],
)
def test_last_match(pattern, text, expected):
    assert last_match(pattern, text) == expected


def test_a_check_that_hangs_dies_or_raises_scores_the_default_and_the_pool_carries_on():
    pool = CheckPool(check_that_hangs_dies_or_raises, num_workers=2, timeout_s=1.0)
    try:
        out = pool.map(["a", "hang", "b", "die", "c", "raise", "d"], default=None)
        assert out.values == ["aa", None, "bb", None, "cc", None, "dd"]
        assert (out.timed_out, out.crashed) == (1, 2)
        again = pool.map(["x", "y", "z"], default=None)  # the replaced workers check the next items
        assert again.values == ["xx", "yy", "zz"]
        assert (again.timed_out, again.crashed) == (0, 0)
    finally:
        pool.close()
    assert not pool.running


def test_the_pool_refuses_bad_settings():
    with pytest.raises(ValueError, match="num_workers=0 must be >= 1"):
        CheckPool(check_that_hangs_dies_or_raises, num_workers=0)
    with pytest.raises(ValueError, match="timeout_s=0 must be > 0"):
        CheckPool(check_that_hangs_dies_or_raises, timeout_s=0)


@pytest.fixture(scope="module")
def math_reward():
    reward = MathAnswerReward(format_reward=0.1, num_workers=1)
    reward.setup(torch.device("cpu"))
    yield reward
    reward.teardown()
    assert not reward.pool.running


def test_math_answer_reward_scores_answers_and_the_boxed_format(math_reward):
    responses = ["so \\boxed{42}", "it is 42", "\\boxed{41}", "I do not know"]
    scores = math_reward(["q"] * 4, responses, answer=["42", "42", "42", "42"])
    torch.testing.assert_close(scores, torch.tensor([1.1, 1.0, 0.1, 0.0]))


def test_math_answer_reward_names_a_missing_or_non_string_answer(math_reward):
    with pytest.raises(ValueError, match=r"needs the prompt field 'answer' \(answer_field\) .* carry \['level'\]"):
        math_reward(["q"], ["\\boxed{1}"], level=[1])
    with pytest.raises(ValueError, match=r"field 'answer' must be a string .* got int 42 for response 0; quote"):
        math_reward(["q"], ["\\boxed{42}"], answer=[42])


GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
"""A GSM8K answer column: the worked solution, then ``#### <answer>``."""


@pytest.fixture(scope="module")
def gsm8k_reward():
    reward = MathAnswerReward(reference_pattern=r"####\s*(.+)", num_workers=1)
    reward.setup(torch.device("cpu"))
    yield reward
    reward.teardown()


def test_reference_pattern_takes_the_answer_from_a_worked_solution(gsm8k_reward):
    responses = ["\\boxed{72}", "\\boxed{24}", "\\boxed{1234}", "\\boxed{1,234}", "\\boxed{1233}"]
    references = [GSM8K_ANSWER, GSM8K_ANSWER, "... #### 1,234", "... #### 1234  ", "#### 1,234"]
    # 72 is the answer (24, the solution's first number, is not); 1,234 equals 1234 either way round; 1233 does not.
    scores = gsm8k_reward(["q"] * 5, responses, answer=references)
    assert scores.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("reference", ["72 clips, no marker", "#### ", "###  72"], ids=["none", "empty", "short"])
def test_a_reference_without_a_match_is_refused_before_any_check(reference):
    pattern = r"####\s*(.*)"
    reward = MathAnswerReward(reference_pattern=pattern, num_workers=1)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"reference_pattern={pattern!r} has no non-empty match in the prompt field 'answer' of response 1, "
            f"{reference!r}; fix that row's answer or set reference_pattern"
        ),
    ):
        reward(["q", "q"], ["\\boxed{1}", "\\boxed{72}"], answer=["#### 1", reference])
    assert not reward.pool.running  # raised in this process, before a worker started


@pytest.mark.parametrize("field", ["pattern", "reference_pattern"])
def test_a_bad_regular_expression_is_refused_naming_its_field(field):
    with pytest.raises(ValueError, match=rf"MathAnswerReward {field}='#### \(' is not a regular expression"):
        MathAnswerReward(**{field: "#### ("})


def test_checks_past_the_time_limit_score_zero_with_a_warning():
    reward = MathAnswerReward(num_workers=1, timeout_s=1e-4)  # no check finishes in 0.1 ms
    reward.setup(torch.device("cpu"))
    try:
        with pytest.warns(UserWarning, match=r"2 of 2 checks ran past timeout_s=0.0001 and 0 crashed; they scored 0"):
            scores = reward(["q", "q"], ["\\boxed{1}", "\\boxed{2}"], answer=["1", "2"])
    finally:
        reward.teardown()
    assert scores.tolist() == [0.0, 0.0]


def test_math_answer_reward_runs_in_fit_and_stops_its_workers_at_the_end(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{k}+{k}=", "answer": str(2 * k)}) + "\n" for k in range(4)))
    reward = MathAnswerReward(num_workers=1)
    module = PPOModule(
        policy=TINY_POLICY,
        lora=LoraConfig(r=4, alpha=8),
        generation=GenerationConfig(max_new_tokens=4, samples_per_prompt=2),
        ppo=PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=2),
        reward=reward,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, datamodule=PromptDataModule(prompts=str(path), batch_size=2, shuffle=False))
    assert 0.0 <= float(trainer.logged_metrics["rollout/score"]) <= 1.0
    assert not reward.pool.running  # teardown at the end of fit
