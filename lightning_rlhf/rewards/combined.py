"""A weighted sum of rewards, each scored on its own and kept for logging.

:class:`CombinedReward` scores a batch with every component (:class:`RewardComponent`: a name, a reward, a weight)
and returns ``sum_i weight_i * score_i``. Each component is called through :func:`~lightning_rlhf.rewards.call_reward`,
so it receives the prompt fields its own signature names (a component that needs a field the prompts lack fails,
naming it) and its scores are checked like any reward's. The raw scores of the last call, before weighting, stay in
:attr:`CombinedReward.component_scores`; ``PPOModule`` logs each one's mean as ``rollout/score/<name>``.

From YAML::

    reward:
      class_path: lightning_rlhf.rewards.CombinedReward
      init_args:
        components:
          - {name: correct, weight: 1.0, reward: {class_path: lightning_rlhf.rewards.MathAnswerReward}}
          - {name: length, weight: 0.1, reward: {class_path: lightning_rlhf.rewards.LengthReward}}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.rewards.base import Reward, call_reward


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One term of a :class:`CombinedReward`."""

    name: str
    """Unique within the combination; its raw mean score is logged as ``rollout/score/<name>``."""
    reward: Reward | Callable[[list[str], list[str]], Any]
    """A :class:`~lightning_rlhf.rewards.Reward` (YAML ``class_path``) or a function ``f(prompts, responses,
    **fields) -> scores``."""
    weight: float = 1.0
    """Multiplies the component's scores in the sum; finite. Weight 0 scores and logs the component without
    training on it (it is left out of the sum, so even a non-finite score of it cannot reach the update)."""


class CombinedReward(Reward):
    """``sum_i weight_i * score_i`` over ``components``, with the last call's raw component scores kept.

    ``setup`` and ``teardown`` reach every component that is a :class:`~lightning_rlhf.rewards.Reward` (teardown in
    the reverse order). Non-finite component scores pass through to the sum (the caller decides: ``PPOModule``
    raises on the first iteration and skips the iteration later), except from a component of weight 0.

    Args:
        components: the terms, each a name, a reward and a weight; at least one, names unique and non-empty,
            weights finite and not all 0.

    Raises:
        ValueError: naming ``components[i].<field>`` and the fix, for a bad entry.

    Example:
        >>> from lightning_rlhf.rewards import LengthReward, CharFractionReward
        >>> reward = CombinedReward(
        ...     [RewardComponent("lowercase", CharFractionReward()), RewardComponent("length", LengthReward(4), 0.5)]
        ... )
        >>> reward(["Say: "], ["abcd"]).tolist()  # 1.0 * 1.0 + 0.5 * 1.0
        [1.5]
        >>> {name: scores.tolist() for name, scores in reward.component_scores.items()}
        {'lowercase': [1.0], 'length': [1.0]}
    """

    def __init__(self, components: list[RewardComponent]) -> None:
        _check_components(components)
        self.components = list(components)
        self._component_scores: dict[str, Tensor] = {}

    @property
    def component_scores(self) -> dict[str, Tensor]:
        """Each component's raw (unweighted) ``(B,)`` float32 CPU scores from the last call, by name, in the order of
        ``components``; empty before the first call."""
        return dict(self._component_scores)

    def setup(self, device: torch.device) -> None:
        for component in self.components:
            if isinstance(component.reward, Reward):
                component.reward.setup(device)

    def teardown(self) -> None:
        for component in reversed(self.components):
            if isinstance(component.reward, Reward):
                component.reward.teardown()

    def __call__(self, prompts: list[str], responses: list[str], **inputs: Any) -> Tensor:
        """(B,) float32 CPU scores, the weighted sum of the components' scores.

        ``inputs`` are the token tensors and every prompt field; each component gets the ones it takes
        (:func:`~lightning_rlhf.rewards.call_reward`).

        Raises:
            ValueError, RuntimeError: what ``call_reward`` raises for a component, prefixed with
                ``CombinedReward.components[i] (<name>)``.
        """
        scores: dict[str, Tensor] = {}
        for index, component in enumerate(self.components):
            try:
                raw = call_reward(component.reward, prompts, responses, allow_non_finite=True, **inputs)
            except (ValueError, RuntimeError) as err:
                raise type(err)(f"CombinedReward.components[{index}] ({component.name!r}): {err}") from err
            scores[component.name] = raw.cpu()
        self._component_scores = scores
        total = torch.zeros(len(responses), dtype=torch.float32)
        for component in self.components:
            if component.weight != 0:
                total = total + component.weight * scores[component.name]
        return total


def _check_components(components: list[RewardComponent]) -> None:
    """Raise a ValueError naming ``components[i].<field>`` and the fix for the first bad entry of ``components``."""
    if not components:
        raise ValueError(
            "CombinedReward.components is empty; give at least one component (name, reward, weight) to combine."
        )
    seen: dict[str, int] = {}
    for index, component in enumerate(components):
        where = f"CombinedReward.components[{index}]"
        if not isinstance(component, RewardComponent):
            raise ValueError(
                f"{where} is a {type(component).__name__}; give a RewardComponent(name, reward, weight) "
                "(in YAML, a mapping with name, reward and weight)."
            )
        name, weight = component.name, component.weight
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"{where}.name={name!r} must be a non-empty string; name the component (its mean score is logged "
                "as rollout/score/<name>)."
            )
        if name in seen:
            raise ValueError(
                f"{where}.name={name!r} is already the name of components[{seen[name]}]; give each component its "
                "own name (each is logged as rollout/score/<name>)."
            )
        seen[name] = index
        if not callable(component.reward):
            raise ValueError(
                f"{where}.reward is a {type(component.reward).__name__}; give a Reward (YAML class_path) or a "
                "function (prompts, responses, **fields) -> scores."
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"{where}.weight={weight!r} must be a finite number; set it to e.g. 1.0.")
    if all(component.weight == 0 for component in components):
        raise ValueError(
            "every CombinedReward.components[i].weight is 0, so every response would score 0; give at least one "
            "component a nonzero weight."
        )
