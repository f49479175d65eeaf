"""Model-side building blocks: memory-lean per-sequence log-probs."""

from torchtune_prefopt.modules.decoder_logprobs import (
    decoder_sequence_logprobs,
    enable_sequence_logprobs,
)
from torchtune_prefopt.modules.sequence_logprobs import (
    SequenceLogProbs,
    TokenSelection,
    check_label_rows,
    selected_logprobs,
    sequence_logprobs,
)

__all__ = [
    "SequenceLogProbs",
    "TokenSelection",
    "check_label_rows",
    "decoder_sequence_logprobs",
    "enable_sequence_logprobs",
    "selected_logprobs",
    "sequence_logprobs",
]
