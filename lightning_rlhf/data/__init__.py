"""Data for every stage: PPO's prompts, SFT's examples, the reward model's preference pairs.

- :mod:`~lightning_rlhf.data.prompts`: ``PromptDataModule`` (left-padded prompt batches, resumable sampling).
- :mod:`~lightning_rlhf.data.prompt_rows`: reading, checking and tokenising prompt rows (lists or a dataset).
- :mod:`~lightning_rlhf.data.sft`: ``SFTDataModule``.
- :mod:`~lightning_rlhf.data.preferences`: ``PreferenceDataModule``.
- :mod:`~lightning_rlhf.data.examples`: the loading, checks and validation split both example stages share.
- :mod:`~lightning_rlhf.data.sources`: Hugging Face datasets (hub, ``save_to_disk``, local files), fingerprints.
- :mod:`~lightning_rlhf.data.formats`: column layouts (TRL's dataset formats) and ``*_key`` renames.
- :mod:`~lightning_rlhf.data.common`: readers, chat checks, the text-prompt encoding, the tokenizer.

Every name is re-exported here: ``class_path: lightning_rlhf.data.PromptDataModule`` keeps working.
"""

from lightning_rlhf.data.common import Prompt
from lightning_rlhf.data.examples import EncodedRows, ExampleDataModule, Row
from lightning_rlhf.data.preferences import PreferenceCollator, PreferenceDataModule
from lightning_rlhf.data.prompt_rows import LeftPadCollator
from lightning_rlhf.data.prompts import PromptDataModule, ResumableSampler
from lightning_rlhf.data.sft import SFTCollator, SFTDataModule, SFTEncoder, encode_sft_example
from lightning_rlhf.data.sources import DatasetSource

__all__ = [
    "DatasetSource",
    "EncodedRows",
    "ExampleDataModule",
    "LeftPadCollator",
    "PreferenceCollator",
    "PreferenceDataModule",
    "Prompt",
    "PromptDataModule",
    "ResumableSampler",
    "Row",
    "SFTCollator",
    "SFTDataModule",
    "SFTEncoder",
    "encode_sft_example",
]
