"""Checkpoints: crash-safe files (``AtomicCheckpointIO``) and the run state PPO keeps beside the weights.

The run state is plain Python and tensors, so a checkpoint loads with ``torch.load(weights_only=True)``: every
process's random states (:func:`gather_rng_states`, :func:`set_rng_state`) and what the trained weights are only
valid with (:func:`base_model_fingerprint`).


Lightning's default writer goes through an fsspec transaction whose temporary file lives in the system temp
directory; when that is another filesystem than the checkpoint directory, the final move is a copy, and a process
killed during it leaves a truncated checkpoint under the real name. ``AtomicCheckpointIO`` writes to a temporary file
*in the checkpoint's own directory*, fsyncs it, then renames it over the target with ``os.replace`` (atomic on POSIX
and Windows). A kill at any moment leaves either the previous file or the complete new one, never a partial one;
at worst a hidden ``.<name>.*.tmp`` file is left behind. The ``lightning-rlhf`` CLI uses it by default.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _write(checkpoint: dict[str, Any], file: Any) -> None:
    torch.save(checkpoint, file)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temporary file in the same directory + ``os.replace``).

    Remote paths (``s3://`` and other fsspec protocols) fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                _write(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------------------------- run state
def get_rng_state(shuffle_generator: torch.Generator) -> dict[str, Any]:
    """This process's random states as plain tensors and lists (loadable with ``weights_only=True``)."""
    version, mt_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "shuffle": shuffle_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], shuffle_generator: torch.Generator) -> None:
    """Restore what :func:`get_rng_state` saved, into the global generators and ``shuffle_generator``."""
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    shuffle_generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(shuffle_generator: torch.Generator) -> list[dict[str, Any]]:
    """Every process's :func:`get_rng_state`, by rank (a collective under ``torch.distributed``; one entry without)."""
    state = get_rng_state(shuffle_generator)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def base_model_fingerprint(policy: Any, lora: Any) -> dict[str, Any]:
    """What trained weights are only valid with: the base model (hub id or directory, or the tiny model's shape and
    seed) and the adapter layout, as plain dicts of the ``PolicyConfig`` ``policy`` and ``LoraConfig`` ``lora``."""
    return {
        "name_or_path": policy.name_or_path,
        "tiny": None if policy.name_or_path else dataclasses.asdict(policy.tiny),
        "lora": dataclasses.asdict(lora),
    }
