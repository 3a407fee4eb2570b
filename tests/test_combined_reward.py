"""CombinedReward: hand-worked weighted sums, fields reaching the components that name them, the checks of its
components, setup/teardown forwarding, and rollout/score/<name> from a YAML recipe through the CLI."""

import copy
import csv
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import TINY_OVERRIDES
from torch.testing import assert_close

from lightning_rlhf.cli import main
from lightning_rlhf.rewards import (
    CharFractionReward,
    CombinedReward,
    LengthReward,
    Reward,
    RewardComponent,
    call_reward,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def exact_answer(prompts, responses, answer):
    """1 where the response is the prompt's answer: needs the field ``answer``."""
    return torch.tensor([float(r == a) for r, a in zip(responses, answer, strict=True)])


def level_only(prompts, responses, level):
    """The prompt's ``level`` as the score: needs the field ``level``."""
    return torch.tensor([float(x) for x in level])


class Recorder(Reward):
    """Scores ``value`` for every response; records its setup/teardown into ``log`` and what each call received."""

    def __init__(self, name, log, value=0.0):
        self.name, self.log, self.value = name, log, value
        self.received = None

    def setup(self, device):
        self.log.append(("setup", self.name, device.type))

    def teardown(self):
        self.log.append(("teardown", self.name))

    def __call__(self, prompts, responses, **inputs):
        self.received = inputs
        return torch.full((len(responses),), self.value)


def test_the_score_is_the_weighted_sum_of_the_raw_component_scores():
    reward = CombinedReward(
        [
            RewardComponent("lowercase", CharFractionReward()),
            RewardComponent("length", LengthReward(target_len=4), weight=0.5),
        ]
    )
    assert reward.component_scores == {}  # before the first call
    scores = reward(["Say: "] * 3, ["abcd", "AB", "ab!!!!"])
    # lowercase share: abcd 4/4, AB 0/2, ab!!!! 2/6; length 1 - |len - 4| / 4: 1, 0.5, 0.5.
    # 1.0 * [1, 0, 1/3] + 0.5 * [1, 0.5, 0.5] = [1.5, 0.25, 7/12]
    assert_close(scores, torch.tensor([1.5, 0.25, 7 / 12]))
    components = reward.component_scores
    assert list(components) == ["lowercase", "length"]  # in the order of the components
    assert_close(components["lowercase"], torch.tensor([1.0, 0.0, 1 / 3]))  # raw, before the weights
    assert_close(components["length"], torch.tensor([1.0, 0.5, 0.5]))
    components.clear()  # a copy: the reward's own record is untouched
    assert list(reward.component_scores) == ["lowercase", "length"]


def test_a_negative_weight_subtracts_and_a_new_call_replaces_the_component_scores():
    reward = CombinedReward(
        [RewardComponent("one", lambda p, r: [1.0] * len(r)), RewardComponent("len", LengthReward(2), -2.0)]
    )
    # "ab": 1 - 2 * 1 = -1; "abc": length 1 - 1/2 = 0.5, so 1 - 2 * 0.5 = 0
    assert_close(reward(["q", "q"], ["ab", "abc"]), torch.tensor([-1.0, 0.0]))
    assert_close(reward(["q"], ["a"]), torch.tensor([0.0]))  # length 0.5: 1 - 1
    assert_close(reward.component_scores["len"], torch.tensor([0.5]))


def test_each_component_gets_the_fields_it_names_and_a_reward_the_token_tensors():
    log = []
    spy = Recorder("spy", log, value=2.0)
    reward = CombinedReward(
        [
            RewardComponent("exact", exact_answer),
            RewardComponent("level", level_only, weight=0.5),
            RewardComponent("spy", spy, weight=0.25),
        ]
    )
    ids = torch.ones(2, 3, dtype=torch.long)
    # As PPOModule calls it: call_reward hands CombinedReward (which takes **inputs) every field and the tensors.
    scores = call_reward(
        reward, ["q1", "q2"], ["42", "7"], answer=["42", "8"], level=[2, 4], prompt_ids=ids, response_ids=ids
    )
    # exact [1, 0] + 0.5 * level [2, 4] + 0.25 * 2 = [2.5, 2.5]
    assert_close(scores, torch.tensor([2.5, 2.5]))
    assert set(spy.received) == {"answer", "level", "prompt_ids", "response_ids"}  # **inputs: all of them
    assert spy.received["answer"] == ["42", "8"]


def test_a_component_that_needs_a_missing_field_fails_naming_the_component_and_the_field():
    reward = CombinedReward([RewardComponent("length", LengthReward()), RewardComponent("exact", exact_answer)])
    with pytest.raises(
        ValueError,
        match=r"CombinedReward.components\[1\] \('exact'\): reward exact_answer needs the prompt field 'answer' "
        r"for every response, but the prompt rows carry 'level'",
    ):
        reward(["q"], ["a"], level=[1])


def test_a_component_with_bad_scores_or_an_error_is_named():
    reward = CombinedReward(
        [RewardComponent("fine", LengthReward()), RewardComponent("wide", lambda p, r: torch.zeros(len(r), 1))]
    )
    with pytest.raises(ValueError, match=r"components\[1\] \('wide'\): reward .*<lambda> returned scores of shape"):
        reward(["q", "q"], ["a", "b"])
    broken = CombinedReward([RewardComponent("boom", lambda p, r: 1 / 0)])
    with pytest.raises(RuntimeError, match=r"components\[0\] \('boom'\): reward .*<lambda> raised ZeroDivisionError"):
        broken(["q"], ["a"])


def test_non_finite_scores_reach_the_sum_except_from_a_component_of_weight_zero():
    nan = lambda p, r: torch.full((len(r),), math.nan)  # noqa: E731
    monitored = CombinedReward([RewardComponent("len", LengthReward(2)), RewardComponent("nan", nan, weight=0.0)])
    assert_close(monitored(["q"], ["ab"]), torch.tensor([1.0]))  # 1.0 * 1 and the weight-0 NaN left out
    assert math.isnan(monitored.component_scores["nan"].item())  # still recorded, for the log
    trained = CombinedReward([RewardComponent("len", LengthReward(2)), RewardComponent("nan", nan, weight=0.1)])
    assert math.isnan(trained(["q"], ["ab"]).item())  # the caller decides what a NaN score means
    with pytest.raises(ValueError, match=r"reward CombinedReward returned non-finite scores \(NaN in rows 0\)"):
        call_reward(trained, ["q"], ["ab"])


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ([], "CombinedReward.components is empty; give at least one component"),
        ([RewardComponent("", LengthReward())], r"components\[0\].name='' must be a non-empty string"),
        ([RewardComponent("  ", LengthReward())], r"components\[0\].name='  ' must be a non-empty string"),
        (
            [RewardComponent("a", LengthReward()), RewardComponent("b", LengthReward()), RewardComponent("a", len)],
            r"components\[2\].name='a' is already the name of components\[0\]; give each component its own name",
        ),
        ([RewardComponent("a", LengthReward(), math.nan)], r"components\[0\].weight=nan must be a finite number"),
        ([RewardComponent("a", LengthReward(), math.inf)], r"components\[0\].weight=inf must be a finite number"),
        ([RewardComponent("a", LengthReward(), "1")], r"components\[0\].weight='1' must be a finite number"),
        ([RewardComponent("a", "LengthReward")], r"components\[0\].reward is a str; give a Reward"),
        ([{"name": "a", "reward": len}], r"components\[0\] is a dict; give a RewardComponent\(name, reward, weight\)"),
        (
            [RewardComponent("a", LengthReward(), 0.0), RewardComponent("b", LengthReward(), 0)],
            r"every CombinedReward.components\[i\].weight is 0",
        ),
    ],
    ids=["empty", "no-name", "blank-name", "duplicate", "nan", "inf", "str-weight", "str-reward", "dict", "all-0"],
)
def test_bad_components_are_refused_naming_the_field(components, message):
    with pytest.raises(ValueError, match=message):
        CombinedReward(components)


def test_setup_and_teardown_reach_every_reward_component():
    log = []
    reward = CombinedReward(
        [
            RewardComponent("first", Recorder("first", log)),
            RewardComponent("plain", exact_answer),  # a function: nothing to set up
            RewardComponent("second", Recorder("second", log)),
        ]
    )
    reward.setup(torch.device("cpu"))
    reward.teardown()
    assert log == [
        ("setup", "first", "cpu"),
        ("setup", "second", "cpu"),
        ("teardown", "second"),  # the reverse order: the last started stops first
        ("teardown", "first"),
    ]


COMBINED = yaml.safe_load(
    """
model:
  init_args:
    reward:
      class_path: lightning_rlhf.rewards.CombinedReward
      init_args:
        components:
          - {name: lowercase, reward: {class_path: lightning_rlhf.rewards.CharFractionReward}}
          - name: length
            weight: 0.5
            reward: {class_path: lightning_rlhf.rewards.LengthReward, init_args: {target_len: 2}}
          - {name: vowels, weight: 0.0, reward: custom_rewards.vowel_share}
"""
)
"""The quickstart's reward replaced by three components: a Reward, a Reward with arguments, a function at weight 0."""
TINY = [*TINY_OVERRIDES, "--trainer.callbacks=[]"]


def write_config(tmp_path, config) -> str:
    path = tmp_path / "combined.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_yaml_form_parses_through_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", write_config(tmp_path, COMBINED), "--print_config"])
    assert exit_info.value.code in (0, None)
    reward = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["reward"]
    assert reward["class_path"] == "lightning_rlhf.rewards.CombinedReward"
    components = reward["init_args"]["components"]
    assert [(c["name"], c["weight"]) for c in components] == [("lowercase", 1.0), ("length", 0.5), ("vowels", 0.0)]
    assert components[1]["reward"]["init_args"]["target_len"] == 2
    assert components[2]["reward"] == "custom_rewards.vowel_share"


def test_a_bad_component_in_yaml_stops_the_cli_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(COMBINED)
    config["model"]["init_args"]["reward"]["init_args"]["components"][1]["name"] = "lowercase"
    with pytest.raises(ValueError, match=re.escape("components[1].name='lowercase' is already the name of")):
        main(["fit", "--config", str(QUICKSTART), "--config", write_config(tmp_path, config), *TINY])
    assert not (tmp_path / "runs").exists()


def test_a_fit_logs_each_component_and_the_score_is_their_weighted_sum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(QUICKSTART), "--config", write_config(tmp_path, COMBINED), *TINY])
    rows = [r for r in csv.DictReader(next((tmp_path / "runs").rglob("metrics.csv")).open()) if r.get("rollout/score")]
    assert len(rows) == 2
    for row in rows:
        lowercase, length, vowels = (float(row[f"rollout/score/{n}"]) for n in ("lowercase", "length", "vowels"))
        assert 0.0 <= vowels <= 1.0  # logged though it is weighted 0
        # rollout/score is the mean of the raw (combined) score: 1.0 * mean(lowercase) + 0.5 * mean(length)
        assert_close(torch.tensor(float(row["rollout/score"])), torch.tensor(lowercase + 0.5 * length))
