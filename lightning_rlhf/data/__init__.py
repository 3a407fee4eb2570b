"""Data for every stage: PPO's prompts, SFT's examples, the reward model's preference pairs.

- :mod:`~lightning_rlhf.data.prompts`: ``PromptDataModule`` (left-padded prompt batches, resumable sampling).
- :mod:`~lightning_rlhf.data.examples`: ``SFTDataModule`` and the loading every example stage shares.
- :mod:`~lightning_rlhf.data.preferences`: ``PreferenceDataModule``.
- :mod:`~lightning_rlhf.data.common`: readers, chat checks, the text-prompt encoding, the tokenizer.

Every name is re-exported here: ``class_path: lightning_rlhf.data.PromptDataModule`` keeps working.
"""

from lightning_rlhf.data.common import Prompt
from lightning_rlhf.data.examples import (
    EncodedRows,
    ExampleDataModule,
    Row,
    SFTCollator,
    SFTDataModule,
    encode_sft_example,
)
from lightning_rlhf.data.preferences import PreferenceCollator, PreferenceDataModule
from lightning_rlhf.data.prompts import LeftPadCollator, PromptDataModule, ResumableSampler

__all__ = [
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
    "encode_sft_example",
]
