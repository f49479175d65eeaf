"""Preference data: paired (DPO/IPO/SimPO) and unpaired (KTO) datasets, batches, synthetic set.

Row kinds and batch layouts are owned by :mod:`torchtune_prefopt.data._batch` (see also
docs/ARCHITECTURE.md, section Data).
"""

from torchtune_prefopt.data._batch import (
    PairedBatch,
    PreferenceBatch,
    PreferenceCollator,
    UnpairedBatch,
    is_paired_row,
    join_logps,
    kl_partner,
    kto_collate,
    kto_sequences,
    paired_collate,
    paired_sequences,
)
from torchtune_prefopt.data._builders import (
    hh_rlhf_dataset,
    parse_hh_transcript,
    preference_dataset,
    stack_exchange_paired_dataset,
    thumbs_dataset,
    thumbs_label,
    ultrafeedback_binarized_dataset,
)
from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX
from torchtune_prefopt.data._packed import PackedBatch, PackingLayout, pack_sequences
from torchtune_prefopt.data._paired import PreferenceDataset
from torchtune_prefopt.data._position import PositionIndexed
from torchtune_prefopt.data._sft import SFTDataset, sft_dataset
from torchtune_prefopt.data._synthetic import (
    SYNTHETIC_DIR,
    synthetic_data_file,
    synthetic_kto_dataset,
    synthetic_preference_dataset,
)
from torchtune_prefopt.data._unpaired import (
    KTO_RATIO_RANGE,
    KTODataset,
    kto_balance_warning,
    kto_dataset,
    unpaired_from_paired,
)
from torchtune_prefopt.data._validation import DataRowError

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "DataRowError",
    "KTODataset",
    "KTO_RATIO_RANGE",
    "PackedBatch",
    "PackingLayout",
    "PairedBatch",
    "PositionIndexed",
    "PreferenceBatch",
    "PreferenceCollator",
    "PreferenceDataset",
    "SFTDataset",
    "UnpairedBatch",
    "SYNTHETIC_DIR",
    "hh_rlhf_dataset",
    "is_paired_row",
    "kl_partner",
    "kto_balance_warning",
    "join_logps",
    "kto_collate",
    "kto_sequences",
    "pack_sequences",
    "kto_dataset",
    "paired_collate",
    "paired_sequences",
    "parse_hh_transcript",
    "preference_dataset",
    "stack_exchange_paired_dataset",
    "synthetic_data_file",
    "synthetic_kto_dataset",
    "sft_dataset",
    "synthetic_preference_dataset",
    "thumbs_dataset",
    "thumbs_label",
    "ultrafeedback_binarized_dataset",
    "unpaired_from_paired",
]
