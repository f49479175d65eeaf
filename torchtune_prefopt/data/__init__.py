"""Preference data: paired (DPO/IPO/SimPO) and unpaired (KTO) datasets, batches, synthetic set.

Row kinds and batch layouts are owned by :mod:`torchtune_prefopt.data._batch` (padded) and
:mod:`torchtune_prefopt.data._packed`; :mod:`torchtune_prefopt.data.collate` lays a global
micro-batch out; :mod:`torchtune_prefopt.data.dataset_checks` builds the recipe's datasets and
checks them against the loss and the model (see also docs/ARCHITECTURE.md, section Data).
"""

from torchtune_prefopt.data._batch import (
    PairedBatch,
    UnpairedBatch,
    completion_labels,
    is_paired_row,
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
from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, decode_text
from torchtune_prefopt.data._packed import PackedBatch, PackingLayout, pack_sequences
from torchtune_prefopt.data._paired import PreferenceDataset
from torchtune_prefopt.data._position import PositionIndexed
from torchtune_prefopt.data._sft import SFTDataset, sft_dataset
from torchtune_prefopt.data._synthetic import (
    EXAMPLE_CONVERSATIONS,
    SYNTHETIC_DIR,
    example_conversations_dataset,
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
from torchtune_prefopt.data.collate import PreferenceBatch, PreferenceCollator
from torchtune_prefopt.data.dataset_checks import (
    build_datasets,
    build_tokenizer,
    check_dataset_kind,
    check_fits_context,
    check_tokenizer_fits,
)

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "DataRowError",
    "EXAMPLE_CONVERSATIONS",
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
    "build_datasets",
    "check_dataset_kind",
    "check_fits_context",
    "build_tokenizer",
    "check_tokenizer_fits",
    "completion_labels",
    "decode_text",
    "example_conversations_dataset",
    "hh_rlhf_dataset",
    "is_paired_row",
    "kl_partner",
    "kto_balance_warning",
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
