"""Reference-model helpers: a quantized frozen reference, and cached reference log-probs.

* :mod:`~torchtune_prefopt.reference.quantize`: :func:`check_quantization_supported` (before
  any weights load), :func:`quantize_reference` (torchao int8 / fp8 / fp8_dynamic on the
  decoder's linear layers of an unsharded reference), :func:`weight_bytes`.
* :mod:`~torchtune_prefopt.reference.cache`: :func:`reference_fingerprint`,
  :class:`ReferenceLogpsCache` (safetensors, atomic, verified), :func:`precompute_reference_logps`
  (one sharded no-grad pass), :class:`CachedReferenceLogps` (lookup by dataset position),
  :func:`kto_kl_pairs` (the KL pairs a KTO run will build).
"""

from torchtune_prefopt.reference.cache import (
    FORMAT_VERSION,
    CachedReferenceLogps,
    PositionIndexed,
    ReferenceLogpsCache,
    fingerprint_parts,
    hash_dataset,
    hash_tokenizer,
    hash_weights,
    kto_kl_pairs,
    load_or_compute,
    precompute_reference_logps,
    reference_fingerprint,
)
from torchtune_prefopt.reference.quantize import (
    MODES,
    QuantizationReport,
    check_quantization_supported,
    quantize_reference,
    tensor_storage_bytes,
    weight_bytes,
)

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "CachedReferenceLogps",
    "PositionIndexed",
    "QuantizationReport",
    "ReferenceLogpsCache",
    "check_quantization_supported",
    "fingerprint_parts",
    "hash_dataset",
    "hash_tokenizer",
    "hash_weights",
    "kto_kl_pairs",
    "load_or_compute",
    "precompute_reference_logps",
    "quantize_reference",
    "reference_fingerprint",
    "tensor_storage_bytes",
    "weight_bytes",
]
