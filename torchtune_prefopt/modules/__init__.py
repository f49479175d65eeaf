"""Model-side building blocks: memory-lean per-sequence log-probs."""

from torchtune_prefopt.modules.decoder_logprobs import (
    decoder_sequence_logprobs,
    enable_sequence_logprobs,
)
from torchtune_prefopt.modules.sequence_logprobs import (
    SequenceLogProbs,
    check_label_rows,
    sequence_logprobs,
)

__all__ = [
    "SequenceLogProbs",
    "check_label_rows",
    "decoder_sequence_logprobs",
    "enable_sequence_logprobs",
    "sequence_logprobs",
]
