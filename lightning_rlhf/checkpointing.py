"""Crash-safe checkpoint files: ``AtomicCheckpointIO``.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in the system temp
directory; when that is another filesystem than the checkpoint directory, the final move is a copy, and a process
killed during it leaves a truncated checkpoint under the real name. ``AtomicCheckpointIO`` writes to a temporary file
*in the checkpoint's own directory*, fsyncs it, then renames it over the target with ``os.replace`` (atomic on POSIX
and Windows). A kill at any moment leaves either the previous file or the complete new one, never a partial one;
at worst a hidden ``.<name>.*.tmp`` file is left behind. The ``lightning-rlhf`` CLI uses it by default.
"""

from __future__ import annotations

import os
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
