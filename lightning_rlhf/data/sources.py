"""Hugging Face datasets as a source for every stage: a hub id, a ``save_to_disk`` directory, or local files.

:class:`DatasetSource` says where the rows are (``data.dataset``, ``data.data_files``, ``data.split``,
``data.subset``) and loads them with the ``datasets`` library, the field's standard reader: it reads parquet, JSON
Lines, JSON, CSV and Arrow, streams nothing into Python lists, memory-maps the result, and caches every ``map`` over
it on disk under a fingerprint of the source and the function, so a second run tokenises nothing. ``datasets`` is
imported on first use, so parsing a recipe does not pay for it.

Sources, in the order they are tried:

- ``data_files`` alone: local files whose extension names the format (``.parquet``, ``.jsonl`` / ``.json``,
  ``.csv``, ``.arrow``); ``dataset`` may name the builder instead (``dataset: json`` with ``data_files: rows.txt``).
- ``dataset`` a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` directory picks ``split``).
- ``dataset`` a hub id such as ``openai/gsm8k`` (with ``subset: main``), loaded when online or from the local cache
  with ``HF_DATASETS_OFFLINE=1``.

:func:`check_fingerprint` is the resume check: a checkpoint stores the fingerprint of the rows it was trained on, and
a run resumed over different rows warns, naming the source (the sampler position is restored either way).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}
"""The ``datasets`` builder that reads each local file extension."""
FINGERPRINT_BATCH = 65_536
"""Rows per Arrow batch hashed by :func:`fingerprint` (fixed, so equal rows hash alike however they are stored)."""
DataFiles = str | list[str] | dict[str, str | list[str]]
"""``data_files`` as ``load_dataset`` takes it: a path, a list of paths, or paths by split name."""


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """Where a data module's rows come from when they come from a Hugging Face dataset.

    Attributes:
        dataset: a hub id (``openai/gsm8k``), a ``save_to_disk`` directory, or a builder name for ``data_files``
            (``parquet``, ``json``, ``csv``, ``arrow``); None with ``data_files`` infers the builder.
        data_files: local files (a path, a list, or paths by split), read with the builder their extension names.
        split: the split to use (``train``, ``test``, or a slice such as ``train[:1000]``).
        subset: the dataset's configuration name (``load_dataset(..., name=subset)``), e.g. ``main`` for GSM8K.
    """

    dataset: str | None
    data_files: DataFiles | None
    split: str
    subset: str | None

    def describe(self) -> str:
        """The source in one phrase, for messages: ``data.dataset='openai/gsm8k' (subset main, split train)``."""
        where = f"data.dataset={self.dataset!r}" if self.dataset is not None else ""
        if self.data_files is not None:
            where = f"{where} data.data_files={self.data_files!r}".strip()
        subset = f"subset {self.subset}, " if self.subset else ""
        return f"{where} ({subset}split {self.split})"

    def load(self) -> Dataset:
        """The rows of ``split``, memory-mapped.

        Raises:
            ValueError: naming the ``data.*`` field and the fix, for a missing file, an extension no builder reads, a
                split the source lacks (listing those it has), or an empty split.
            ConnectionError: a hub id that cannot be reached (offline, or no such dataset), with the ways out.
        """
        import datasets  # here, not at the top: the heavy import happens only when a dataset is used

        if self.data_files is not None:
            rows = self._load_files(datasets)
        elif self.dataset is not None and Path(self.dataset).is_dir():
            rows = self._load_directory(datasets)
        elif self.dataset is not None and self.dataset in BUILDERS.values():
            raise ValueError(f"data.dataset={self.dataset!r} is a file format: give the files with data.data_files.")
        elif self.dataset is not None:
            rows = self._load_hub(datasets)
        else:
            raise ValueError("give data.dataset (a hub id or a save_to_disk directory) or data.data_files.")
        if len(rows) == 0:
            raise self._empty()
        return rows

    def _load_files(self, datasets: Any) -> Dataset:
        paths = _paths(self.data_files)
        if missing := [p for p in paths if not glob.glob(p)]:
            raise ValueError(f"data.data_files: {missing[0]!r} does not exist.")
        builder = self.dataset
        if builder is None:
            suffixes = {Path(p).suffix for p in paths}
            if len(suffixes) != 1 or (suffix := suffixes.pop()) not in BUILDERS:
                raise ValueError(
                    f"data.data_files: cannot tell the format of {paths!r} from the extension; name the files "
                    f"{' / '.join(BUILDERS)} (one kind), or set data.dataset to the builder "
                    f"({', '.join(sorted(set(BUILDERS.values())))})."
                )
            builder = BUILDERS[suffix]
        return self._split(datasets.load_dataset, builder, data_files=self.data_files, name=self.subset)

    def _load_directory(self, datasets: Any) -> Dataset:
        loaded = datasets.load_from_disk(self.dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise ValueError(
                    f"data.split={self.split!r}: the saved dataset {self.dataset!r} has the splits "
                    f"{sorted(loaded)}; choose one of them."
                )
            return loaded[self.split]
        return loaded

    def _load_hub(self, datasets: Any) -> Dataset:
        try:
            return self._split(datasets.load_dataset, self.dataset, name=self.subset)
        except ConnectionError as err:
            raise ConnectionError(
                f"data.dataset={self.dataset!r}: the Hugging Face Hub cannot be reached or has no such dataset "
                f"({err}). Check the id and the network; offline, set HF_DATASETS_OFFLINE=1 to use a copy in the "
                f"local cache, or point data.dataset at a save_to_disk directory or data.data_files at local files."
            ) from err

    def _split(self, load: Any, path: str, **kwargs: Any) -> Dataset:
        try:
            return load(path, split=self.split, **kwargs)
        except ValueError as err:
            if "corresponds to no data" in str(err):  # an empty split, or a slice past its end
                raise self._empty() from err
            if "split" not in str(err).lower():
                raise
            raise ValueError(f"data.split={self.split!r}: {err} ({self.describe()})") from err

    def _empty(self) -> ValueError:
        return ValueError(f"data: split {self.split!r} of {self.describe()} has no rows; choose another data.split.")


def _paths(data_files: DataFiles | None) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str | os.PathLike):
        return [str(data_files)]
    if isinstance(data_files, dict):
        return [str(p) for files in data_files.values() for p in _paths(files)]
    return [str(p) for p in data_files]


class RowMap:
    """A batched ``datasets.map`` function (with indices) that encodes each row of a batch with ``encode(row,
    label)``, labels ``"split[index]"``, and returns the encoded columns (picklable for ``num_proc``)."""

    def __init__(self, encode: Callable[[dict[str, Any], str], dict[str, Any]], split: str) -> None:
        self.encode, self.split = encode, split

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        items = [self.encode(row, f"{self.split}[{i}]") for row, i in zip(rows, indices, strict=True)]
        return {key: [item[key] for item in items] for key in items[0]} if items else {}


def check_columns(rows: Dataset, needed: dict[str, str], source: DatasetSource) -> None:
    """Refuse a dataset that lacks a column ``needed`` maps to the option that names it (``{"question":
    "prompt_key"}``), listing the columns it has."""
    for column, option in needed.items():
        if column not in rows.column_names:
            raise ValueError(
                f"data.{option}={column!r}: {source.describe()} has no column {column!r}; its columns are "
                f"{rows.column_names}. Set data.{option} to one of them."
            )


def fingerprint(rows: Dataset | list[Any]) -> str:
    """An identifier of the rows' content: a hash of a dataset's Arrow data (batches of 65,536 rows written as Arrow
    IPC; 0.1 s for a million short rows), or of in-memory rows (prompts, fields) as JSON. Content, not the files'
    names or times: the same rows copied elsewhere or rewritten give the same fingerprint (``datasets``' own
    fingerprint of local files changes with their modification time)."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(rows, list):
        digest.update(json.dumps(rows, sort_keys=True, default=repr).encode())
        return digest.hexdigest()
    import pyarrow as pa  # datasets' own dependency

    for batch in rows.with_format("arrow").iter(batch_size=FINGERPRINT_BATCH):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(sink.getvalue())
    return digest.hexdigest()


class FingerprintState:
    """A data module's checkpoint state: the fingerprint of its rows (set by its ``setup`` as ``_fingerprint``),
    checked against the one a checkpoint stores when the run resumes. Mixed in before ``LightningDataModule``."""

    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """An identifier of the rows (after ``setup``); checkpoints store it and resuming compares it."""
        if self._fingerprint is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet; the data loads there.")
        return self._fingerprint

    def describe(self) -> str:
        """The data's source in one phrase, for messages."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the rows' fingerprint, checked when the run resumes."""
        return {} if self._fingerprint is None else {"fingerprint": self._fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the rows differ from those the checkpoint was trained on (:func:`check_fingerprint`)."""
        if self._fingerprint is not None:
            check_fingerprint(state_dict.get("fingerprint"), self._fingerprint, self.describe())


def check_fingerprint(saved: str | None, current: str, description: str) -> None:
    """Warn when a resumed run's rows (``current``) are not the rows its checkpoint was trained on (``saved``)."""
    if saved is not None and saved != current:
        warnings.warn(
            f"data: the rows of {description} changed since the checkpoint was written (fingerprint {saved} -> "
            f"{current}); the run resumes at the checkpoint's position in the new rows, so it does not continue "
            "the run it resumes. Point the data at the rows the checkpoint was trained on to resume exactly.",
            stacklevel=2,
        )
