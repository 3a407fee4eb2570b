"""Strategy presets for PPO: ``--trainer.strategy fsdp2`` and ``ddp_rlhf``.

Importing this module registers them in Lightning's ``StrategyRegistry`` (``lightning_rlhf.module`` imports it, so any
use of ``PPOModule`` or the CLI has them).

- ``fsdp2``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy`` with every
  process in the data-parallel dimension (Lightning's ``"auto"`` would give one data-parallel group per *node* and
  silently train every rank on the same data). ``PPOModule.configure_model`` does the sharding. Checkpoints are full
  files (gathered on rank 0 and pruned to the trained weights), because a pruned checkpoint does not load in the
  distributed-checkpoint format. Runs on CPU (gloo) as well as GPU.
- ``ddp_rlhf``: Lightning's DDP with a short process-group timeout.

Both use ``DEFAULT_TIMEOUT`` (10 minutes) instead of torch's 30: a rank that runs a different number of collectives
than the others (a desync) then fails with an error naming the timed-out collective instead of hanging for half an
hour. Raise it with ``--trainer.strategy.timeout`` for models whose generation or reward takes longer between
collectives.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry

DEFAULT_TIMEOUT = timedelta(minutes=10)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (``tensor_parallel_size=1``), full-file checkpoints.

    Args:
        data_parallel_size: processes that shard the model; ``"auto"`` = all of them (``num_nodes * devices``).
        save_distributed_checkpoint: keep False so checkpoints hold only the trained weights and load anywhere.
        timeout: process-group timeout.
        process_group_backend: ``nccl`` on GPU, ``gloo`` on CPU by default.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = False,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, which also resumes a run whose optimizer keeps no state (plain SGD).

        Lightning 2.6 cannot load an empty optimizer state from a full checkpoint (it reads the state's first key to
        decide whether to rekey it, and ``torch.distributed.checkpoint`` then finds no tensor to take a device from),
        so such a run could not be resumed. When every saved optimizer state is empty, the optimizers are kept out of
        Lightning's loader and get their parameter-group settings (learning rate, ...) back here, as
        ``Optimizer.load_state_dict`` would restore them.
        """
        path = Path(self.broadcast(checkpoint_path))
        saved = []
        if path.is_file():  # a full checkpoint: this preset's format
            checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
            saved = checkpoint.get("optimizer_states", [])
        if not saved or any(state["state"] for state in saved):
            return super().load_checkpoint(path, weights_only=weights_only)
        optimizers, self._optimizers = self._optimizers, []
        try:
            checkpoint = super().load_checkpoint(path, weights_only=weights_only)
        finally:
            self._optimizers = optimizers
        for optimizer, state in zip(optimizers, saved, strict=True):
            for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({key: value for key, value in saved_group.items() if key != "params"})
        return checkpoint


def _register(name: str, strategy: type, description: str, **kwargs: Any) -> None:
    if name not in StrategyRegistry:
        StrategyRegistry.register(name, strategy, description=description, **kwargs)


_register("fsdp2", FSDP2Strategy, "FSDP2 over all processes with a 10-minute process-group timeout (lightning_rlhf)")
_register(
    "ddp_rlhf",
    DDPStrategy,
    "DDP with a 10-minute process-group timeout (lightning_rlhf)",
    timeout=DEFAULT_TIMEOUT,
)
