"""The RL-phase hooks ``PPOModule`` calls on every callback that defines them, documented by :class:`RLCallback`."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_rlhf.types import Rollout, RolloutSamples


class RLCallback(Callback):
    """A Lightning ``Callback`` with the RL-phase hooks that ``PPOModule`` calls (all no-ops here).

    Order within one PPO iteration (one ``training_step``): ``on_train_batch_start``, ``on_rollout_end``, then for
    each PPO epoch ``on_ppo_minibatch_end`` per minibatch and ``on_ppo_epoch_end``, then ``on_train_batch_end``.
    Every process calls every hook, so a hook may run a collective (``trainer.strategy.reduce``) if it does so
    unconditionally. The module passes the arguments after ``pl_module`` by keyword: keep their names.
    """

    def on_rollout_end(
        self, trainer: Trainer, pl_module: LightningModule, rollout: Rollout, samples: RolloutSamples
    ) -> None:
        """After scoring, KL shaping and advantages, before the first PPO update.

        Args:
            rollout: this process's rollout with every field filled (``scores``, ``kl``, ``advantages``, ...).
            samples: its prompts, decoded responses and raw scores, row for row.
        """

    def on_ppo_minibatch_end(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int, index: int, stats: dict[str, float]
    ) -> None:
        """After each minibatch's update (also when the update was skipped).

        Args:
            epoch: the PPO epoch, from 0.
            index: the minibatch within the epoch, from 0.
            stats: global (all-process) means over the minibatch: ``loss/*``, ``policy/approx_kl``,
                ``policy/clipfrac``, ``policy/ratio_mean``, ``policy/entropy``, ``value/clipfrac``,
                ``policy/grad_norm``.
        """

    def on_ppo_epoch_end(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """After each pass over the rollout (also the pass that ``ppo.early_stop_kl`` cut short).

        Args:
            epoch: the PPO epoch that ended, from 0.
        """
