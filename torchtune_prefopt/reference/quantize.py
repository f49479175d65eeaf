"""Quantized, frozen reference model (torchao weight-only int8 / fp8, or fp8 dynamic).

The reference model of DPO/IPO/KTO is frozen: it only runs forward passes under
``torch.no_grad``. Storing its ``nn.Linear`` weights in 8 bits roughly halves (bf16) or
quarters (fp32) their memory. Modes:

===============  ==================================================  ===========================
mode             torchao config                                      needs
===============  ==================================================  ===========================
``int8``         ``Int8WeightOnlyConfig`` (per output row scale)     any device
``fp8``          ``Float8WeightOnlyConfig`` (e4m3, per row)          any device
``fp8_dynamic``  ``Float8DynamicActivationFloat8WeightConfig``       CUDA compute >= 8.9 / MI300
===============  ==================================================  ===========================

Weight-only modes dequantize on the fly: activations and the matmul stay in the model's
dtype, so only the weights are rounded. ``fp8_dynamic`` also rounds each activation row to
e4m3 and runs an fp8 matmul (``torch._scaled_mm``); per-row scales when the weights are
bf16, per-tensor scales otherwise (torchao's per-row path only accepts bf16 weights).

What is quantized: every ``nn.Linear`` of the decoder layers (attention q/k/v/output
projections, MLP w1/w2/w3). **Not** quantized, by default:

* ``tok_embeddings`` (an ``nn.Embedding``; a row lookup, no matmul to speed up), and so
  also a *tied* output projection (torchtune's ``TiedLinear`` reads the embedding weight);
* the untied ``output`` projection (``quantize_output=False``). Every scored token's
  log-prob goes through it and its rounding shifts the logits directly, with nothing after it
  to average the error out: quantizing it too multiplies the error of the DPO log-ratio ``h``
  (BENCHMARKS.md, "Quantized reference", has the measured ratios). Its weights are
  ``vocab x dim``, a small part of a large model (Llama 3.1 8B: 6.5 %, 70B: 1.5 %), so it
  stays in full precision unless you ask.

Accuracy in one rule (checked in the tests): to first order a log-prob error is linear in the
weight perturbation, so it scales with ``rho = ||W_q - W||_F / ||W||_F`` over the quantized
layers (int8 per-row rounding is a few times a bf16 rounding of the same weights, e4m3 about
an order of magnitude more; measured values in BENCHMARKS.md).

Sharding: torchao's quantized tensor subclasses (``Int8Tensor``, ``Float8Tensor``,
``AffineQuantizedTensor``) do not compose with FSDP2 in torchao 0.15 / torch 2.13, in either
order: ``fully_shard`` after quantizing fails (``aten.split`` is not implemented for the
subclass; ``Float8Tensor``: unpack error), quantizing after ``fully_shard`` fails (the
subclass has no ``_local_tensor``). So the quantized reference is a plain (unsharded)
module, replicated on every rank; :func:`quantize_reference` refuses a sharded model.

Use :func:`check_quantization_supported` before any weights load (one-line
:class:`~torchtune_prefopt.errors.PrefOptUserError`), then build the reference model on
plain tensors, load its weights, and call :func:`quantize_reference`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "MODES",
    "QuantizationReport",
    "check_quantization_supported",
    "quantize_reference",
    "tensor_storage_bytes",
    "weight_bytes",
]

MODES = ("int8", "fp8", "fp8_dynamic")

_CONFIG_CLASS = {
    "int8": "Int8WeightOnlyConfig",
    "fp8": "Float8WeightOnlyConfig",
    "fp8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
}

DeviceLike = Union[str, torch.device, None]


# --------------------------------------------------------------------------- bytes


def _is_wrapper_subclass(t: Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def tensor_storage_bytes(t: Tensor, _seen: Optional[Set[Tuple[str, int]]] = None) -> int:
    """Bytes of memory really held by ``t``.

    Tensor subclasses (torchao's ``Int8Tensor``/``Float8Tensor``/``AffineQuantizedTensor``,
    ``DTensor``) are opened through ``__tensor_flatten__`` down to their plain inner tensors
    (e.g. the int8 ``qdata`` plus the per-row ``scale``), and each plain tensor counts its
    whole underlying storage once (``_seen``: shared storages, e.g. views or tied weights,
    are counted once). The logical ``shape x dtype`` of a subclass is never used.
    Meta tensors count ``numel x element_size``.
    """
    seen = set() if _seen is None else _seen
    if _is_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        total = 0
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, Tensor):
                total += tensor_storage_bytes(inner, seen)
        return total
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    storage = t.untyped_storage()
    key = (str(t.device), storage.data_ptr())
    if storage.nbytes() == 0 or key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def weight_bytes(model: nn.Module, include_buffers: bool = False) -> int:
    """Real bytes of ``model``'s parameters (and buffers if ``include_buffers``).

    See :func:`tensor_storage_bytes`: quantized weights count their inner int8/fp8 data and
    scales; shared storages count once. Buffers (e.g. the RoPE cache) are excluded by
    default: they are not weights and quantization does not touch them.
    """
    seen: Set[Tuple[str, int]] = set()
    total = 0
    for p in model.parameters():
        total += tensor_storage_bytes(p, seen)
    if include_buffers:
        for b in model.buffers():
            total += tensor_storage_bytes(b, seen)
    return total


# --------------------------------------------------------------------------- checks


def _device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _fp8_dynamic_hardware_ok(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the reference runs on {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        if any(a in arch for a in ("gfx940", "gfx941", "gfx942")):
            return True, ""
        return False, f"ROCm device {arch or '?'} is not MI300-class"
    cap = torch.cuda.get_device_capability(device)
    if cap >= (8, 9):
        return True, ""
    name = torch.cuda.get_device_name(device)
    return False, f"{name} has compute capability {cap[0]}.{cap[1]}"


def check_quantization_supported(
    mode: Optional[str], device: DeviceLike = None, hardware: bool = True
) -> None:
    """Raise a one-line :class:`PrefOptUserError` if ``mode`` cannot run on ``device``.

    Cheap (no weights needed); call it before loading any checkpoint. ``mode=None`` (no
    quantization) always passes. Checks: the mode name, that torchao imports and has the
    mode's config class, and for ``fp8_dynamic`` a CUDA device with compute capability
    >= 8.9 (H100/L4/RTX 4090 class) or an MI300 (the same condition torchao asserts);
    ``hardware=False`` skips that last check (a config checked here to run elsewhere).
    """
    if mode is None:
        return
    if mode not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise PrefOptUserError(
            f"reference.quantization must be null or one of {allowed}, got {mode!r}"
        )
    try:
        import torchao  # noqa: F401
        import torchao.quantization as tq
    except Exception as err:  # noqa: BLE001 - any import failure means unusable
        raise PrefOptUserError(
            f"reference.quantization={mode} needs torchao, which cannot be imported "
            f"({type(err).__name__}: {err}); pip install torchao"
        ) from err
    cls_name = _CONFIG_CLASS[mode]
    if getattr(tq, cls_name, None) is None:
        version = getattr(torchao, "__version__", "?")
        raise PrefOptUserError(
            f"reference.quantization={mode} needs torchao.quantization.{cls_name}, "
            f"missing in torchao {version}; upgrade torchao"
        )
    if mode in ("fp8", "fp8_dynamic") and not hasattr(torch, "float8_e4m3fn"):
        raise PrefOptUserError(
            f"reference.quantization={mode} needs torch.float8_e4m3fn (torch >= 2.1), "
            f"this is torch {torch.__version__}"
        )
    if mode == "fp8_dynamic" and hardware:
        ok, why = _fp8_dynamic_hardware_ok(_device(device))
        if not ok:
            raise PrefOptUserError(
                "reference.quantization=fp8_dynamic needs a CUDA GPU with compute capability "
                f">= 8.9 (H100/L4/RTX 4090 class) or an MI300, but {why}; use 'fp8' "
                "(weight-only) or 'int8' on this hardware"
            )


# --------------------------------------------------------------------------- quantize


@dataclass
class QuantizationReport:
    """What :func:`quantize_reference` did.

    Attributes:
        mode: ``int8`` / ``fp8`` / ``fp8_dynamic``.
        bytes_before / bytes_after: :func:`weight_bytes` of the model (parameters only).
        quantized: fully qualified names of the ``nn.Linear`` layers now quantized.
        kept: ``nn.Linear`` layers left in full precision, ``{name: reason}``.
        output_quantized: whether the output projection was quantized.
        seconds: wall time of the quantization.
    """

    mode: str
    bytes_before: int
    bytes_after: int
    quantized: List[str] = field(default_factory=list)
    kept: Dict[str, str] = field(default_factory=dict)
    output_quantized: bool = False
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before``."""
        return self.bytes_after / max(self.bytes_before, 1)

    def summary(self) -> str:
        """One log line."""
        kept = (
            f", kept {len(self.kept)} in full precision ({', '.join(sorted(self.kept))})"
            if self.kept
            else ""
        )
        return (
            f"reference quantized to {self.mode}: {len(self.quantized)} linear layers{kept}; "
            f"weights {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.ratio:.2f}x) in {self.seconds:.1f}s"
        )

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _torchao_config(mode: str, weight_dtype: torch.dtype):
    import torchao.quantization as tq

    cls = getattr(tq, _CONFIG_CLASS[mode])
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    if "set_inductor_config" in names:
        # True would change global torch._inductor settings (and so the policy's compile).
        kwargs["set_inductor_config"] = False
    if mode == "int8" and "version" in names:
        kwargs["version"] = 2  # Int8Tensor (qdata + scale); version 1 is deprecated in 0.15
    if mode == "fp8_dynamic" and "granularity" in names:
        from torchao.quantization.granularity import PerRow, PerTensor

        kwargs["granularity"] = PerRow() if weight_dtype == torch.bfloat16 else PerTensor()
    return cls(**kwargs)


def _is_quantized(t: Tensor) -> bool:
    return _is_wrapper_subclass(t) and not _is_dtensor(t)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def quantize_reference(
    model: nn.Module,
    mode: str,
    *,
    quantize_output: bool = False,
    device: DeviceLike = None,
) -> QuantizationReport:
    """Quantize ``model``'s ``nn.Linear`` weights in place for use as a frozen reference.

    Args:
        model: a torchtune ``TransformerDecoder`` with its weights loaded as plain tensors
            (not FSDP2-sharded, not on the meta device). All its parameters are frozen
            (``requires_grad=False``) and it is put in ``eval()`` mode.
        mode: ``"int8"``, ``"fp8"`` or ``"fp8_dynamic"``.
        quantize_output: also quantize an untied ``output`` projection (default False; see
            the module docstring). A tied output projection follows the embedding, which is
            never quantized.
        device: if given, each layer is moved there just before it is quantized (torchao's
            ``quantize_(device=...)``: full-precision weights can stay on the CPU, so the
            accelerator never holds the full-precision model) and the whole model is moved
            there afterwards.

    Returns:
        :class:`QuantizationReport` (bytes before/after, layers quantized/kept).

    Raises:
        PrefOptUserError: unsupported mode/device (see :func:`check_quantization_supported`).
        ValueError: a sharded (DTensor) or meta-device model.
    """
    check_quantization_supported(mode, device if device is not None else _model_device(model))
    for name, p in model.named_parameters():
        if _is_dtensor(p):
            raise ValueError(
                f"quantize_reference needs an unsharded model, but '{name}' is a DTensor "
                "(torchao quantized tensors do not compose with FSDP2): build the reference "
                "without fully_shard/shard_model and keep it replicated on every rank"
            )
        if p.device.type == "meta":
            raise ValueError(
                f"quantize_reference: '{name}' is on the meta device; load the weights first"
            )
        if _is_quantized(p):
            raise ValueError(
                f"quantize_reference: '{name}' is already quantized ({type(p).__name__})"
            )
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise ValueError(
                f"quantize_reference: buffer '{name}' is on the meta device; initialise it first "
                "(torchtune RoPE caches: call rope_init() on the modules that have it)"
            )
    start = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = weight_bytes(model)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    output_mod = getattr(model, "output", None)
    kept: Dict[str, str] = {}
    selected: Set[int] = set()
    for name, mod in linears.items():
        if mod is output_mod and not quantize_output:
            kept[name] = "output projection (quantize_output=False)"
        else:
            selected.add(id(mod))
    weight_dtypes = {m.weight.dtype for m in linears.values()}
    weight_dtype = weight_dtypes.pop() if len(weight_dtypes) == 1 else torch.float32
    config = _torchao_config(mode, weight_dtype)

    from torchao.quantization import quantize_

    def _filter(mod: nn.Module, fqn: str) -> bool:  # noqa: ARG001
        return id(mod) in selected

    with torch.no_grad():
        quantize_(
            model, config, filter_fn=_filter, device=_device(device) if device is not None else None
        )
        if device is not None:
            model.to(_device(device))
    quantized = []
    for name, mod in linears.items():
        if id(mod) not in selected:
            continue
        if _is_quantized(mod.weight):
            quantized.append(name)
        else:
            # torchao silently skips shapes its kernels cannot take (fp8 matmul: dims % 16)
            kept[name] = f"torchao left it unquantized (shape {tuple(mod.weight.shape)})"
    for p in model.parameters():
        p.requires_grad_(False)
    return QuantizationReport(
        mode=mode,
        bytes_before=before,
        bytes_after=weight_bytes(model),
        quantized=quantized,
        kept=kept,
        output_quantized=isinstance(output_mod, nn.Linear) and _is_quantized(output_mod.weight),
        seconds=time.perf_counter() - start,
    )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
