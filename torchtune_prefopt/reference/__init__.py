"""The reference side of preference optimization.

* :mod:`~torchtune_prefopt.reference.source`: :class:`ReferenceSource`, one object per way of
  getting reference log-probs (none, frozen model, LoRA adapters disabled, cached), the one
  interface the recipe calls.
* :mod:`~torchtune_prefopt.reference.quantize`: :func:`check_quantization_supported` (before
  any weights load), :func:`quantize_reference` (torchao int8 / fp8 / fp8_dynamic on the
  decoder's linear layers of an unsharded reference), :func:`weight_bytes`.
* :mod:`~torchtune_prefopt.reference.fingerprint`: :func:`reference_fingerprint`, the identity of
  cached log-probs (weights, data, tokenizer, settings).
* :mod:`~torchtune_prefopt.reference.store`: :class:`ReferenceLogpsCache` (safetensors, atomic,
  verified) and :func:`load_or_compute` (rank 0 reads, everyone gets the tensors).
* :mod:`~torchtune_prefopt.reference.precompute`: :func:`precompute_reference_logps` (one
  sharded no-grad pass), :class:`CachedReferenceLogps` (lookup by dataset position),
  :func:`kto_kl_pairs` (the KL pairs a KTO run will build).
"""

from torchtune_prefopt.reference.fingerprint import (
    FORMAT_VERSION,
    Fingerprint,
    hash_dataset,
    hash_tokenizer,
    hash_weights,
    reference_fingerprint,
)
from torchtune_prefopt.reference.precompute import (
    CachedReferenceLogps,
    kto_kl_pairs,
    precompute_reference_logps,
)
from torchtune_prefopt.reference.quantize import (
    MODES,
    QuantizationReport,
    check_quantization_supported,
    quantize_reference,
    tensor_storage_bytes,
    weight_bytes,
)
from torchtune_prefopt.reference.source import (
    AdaptersDisabled,
    CachedLogps,
    FrozenModel,
    NoReference,
    ReferenceSource,
)
from torchtune_prefopt.reference.store import DIGEST_MEMO, ReferenceLogpsCache, load_or_compute

__all__ = [
    "AdaptersDisabled",
    "CachedLogps",
    "CachedReferenceLogps",
    "DIGEST_MEMO",
    "FORMAT_VERSION",
    "Fingerprint",
    "FrozenModel",
    "MODES",
    "NoReference",
    "QuantizationReport",
    "ReferenceLogpsCache",
    "ReferenceSource",
    "check_quantization_supported",
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
