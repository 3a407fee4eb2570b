"""A callback for the multi-process tests: each rank dumps what it saw and its trained weights after every step."""

from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor


class DumpRankState(Callback):
    """Writes ``rank{r}_step{k}.pt`` with the rank's raw scores of that step and its full trainable weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self._scores: list[float] = []

    def on_rollout_end(self, trainer, module, rollout, samples) -> None:
        self._scores = samples.raw_scores.tolist()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        weights = {}
        for name, p in module.named_parameters():
            if p.requires_grad:  # full_tensor() is a collective: every rank runs it for every parameter
                weights[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {"scores": self._scores, "weights": weights, "world_size": trainer.world_size}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")
