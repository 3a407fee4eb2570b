"""Test-only: simulate a process killed (SIGKILL) in the middle of writing a checkpoint."""

import io
import os
import signal

import torch
from lightning.pytorch import Callback

import lightning_rlhf.checkpointing as checkpointing


def _write_half_then_die(checkpoint, file) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    os.fsync(file.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Callback):
    """At ``at_step``, the checkpoint writer writes half the file and the process kills itself with SIGKILL."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.at_step:
            checkpointing._write = _write_half_then_die
