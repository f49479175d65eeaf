"""The reference side of preference optimization.

* :mod:`~torchtune_prefopt.reference.build`: :func:`plan_reference` (decided once, before any
  weights load), :func:`build_reference` (the plan's source) and :func:`precompute_reference`.
* :mod:`~torchtune_prefopt.reference.source`: :class:`ReferenceSource`, one object per way of
  getting reference log-probs (none, frozen model, LoRA adapters disabled, cached), the one
  interface the recipe calls.
* :mod:`~torchtune_prefopt.reference.quantize`: :func:`check_quantization_supported` (before
  any weights load), :func:`quantize_reference` (torchao int8 / fp8 / fp8_dynamic on the
  decoder's linear layers of an unsharded reference), :func:`weight_bytes`.
* :mod:`~torchtune_prefopt.reference.fingerprint`: :func:`reference_fingerprint`, the identity of
  cached log-probs (weights, data, tokenizer, settings).
* :mod:`~torchtune_prefopt.reference.store`: :class:`ReferenceCacheFile` (safetensors, atomic,
  verified) and :func:`load_or_compute` (rank 0 reads, everyone gets the tensors).
* :mod:`~torchtune_prefopt.reference.precompute`: :func:`precompute_reference_logps` (one
  sharded no-grad pass), :class:`ReferenceLogpsTable` (lookup by dataset position),
  :func:`kto_kl_pairs` (the KL pairs a KTO run will build).
"""

from torchtune_prefopt.reference.build import (
    ReferencePlan,
    build_reference,
    plan_reference,
    precompute_reference,
)
from torchtune_prefopt.reference.fingerprint import (
    FORMAT_VERSION,
    Fingerprint,
    hash_dataset,
    hash_tokenizer,
    hash_weights,
    reference_fingerprint,
)
from torchtune_prefopt.reference.precompute import (
    PrecomputeJob,
    ReferenceLogpsTable,
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
    FrozenModel,
    NoReference,
    PrecomputedReference,
    ReferenceSource,
)
from torchtune_prefopt.reference.store import ReferenceCacheFile, load_or_compute

__all__ = [
    "AdaptersDisabled",
    "PrecomputeJob",
    "ReferencePlan",
    "build_reference",
    "plan_reference",
    "precompute_reference",
    "PrecomputedReference",
    "ReferenceLogpsTable",
    "FORMAT_VERSION",
    "Fingerprint",
    "FrozenModel",
    "MODES",
    "NoReference",
    "QuantizationReport",
    "ReferenceCacheFile",
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
