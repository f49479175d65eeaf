"""Quantized reference model: torchao int8 / fp8 weight-only on the tiny Qwen2 decoder.

Accuracy bound. ``h = (pi_c - ref_c) - (pi_r - ref_r)`` is what DPO/IPO consume: a reference
error ``e`` on it moves the DPO loss ``-log sigmoid(beta * h)`` by at most ``beta * |e|`` and
the pair's gradient weight by at most ``beta * |e| / 4``. To first order a log-prob error is
linear in the weight perturbation, and for rounding errors (uncorrelated with the signal) its
size scales with the perturbation's relative norm ``rho = ||W_q - W||_F / ||W||_F``. So the
bound is stated in units of a yardstick measured on the same model, rows and layers: the same
weights rounded to bf16 (the precision a bf16 reference already has; fp32 compute), whose
``rho_bf16`` ~ 2^-9:

    error_q <= 2 * (rho_q / rho_bf16) * error_bf16      (max |error of h|, mean per-token error)

The factor 2 covers the different structure of the rounding (per-row absolute steps for int8,
relative for fp8 and bf16) and the sampling noise of a max over 12 pairs (measured ratio of
error to prediction: 0.7-1.5 on this and on a 4x wider model). ``rho_q`` itself is checked
against the rounding rule: int8 rounds each weight to within ``max|w_row| / 254``; e4m3 keeps
3 mantissa bits, a relative error <= 2^-4. A broken quantization (wrong scale, an embedding
quantized, a layer dropped) misses by far. The output projection is rescaled so its logits
have a standard deviation of 4 (peaked distributions, a few nats of entropy like a trained LM;
near-uniform random logits would hide errors); the rows are real tokenized synthetic pairs.
``pytest -s`` prints the numbers.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.modules import decoder_sequence_logprobs
from torchtune_prefopt.reference import (
    check_quantization_supported,
    quantize_reference,
    tensor_storage_bytes,
    weight_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_PAIRS = 12
SLACK = 2.0  # see the module docstring


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from torchtune_prefopt.data import paired_collate, preference_dataset, synthetic_data_file
    from torchtune_prefopt.models.tiny import TINY_QWEN2, tiny_qwen2, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_qwen2()
    with torch.no_grad():
        model.output.weight.normal_(0.0, 4.0 / TINY_QWEN2.embed_dim**0.5)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    src = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = synthetic_data_file("train").read_text().splitlines()[:N_PAIRS]
    src.write_text("\n".join(lines) + "\n")
    tok = tiny_tokenizer(max_seq_len=128)
    ds = preference_dataset(tok, source="json", data_files=str(src))
    batch = paired_collate([ds[i] for i in range(len(ds))], padding_idx=tok.pad_id)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        ref = decoder_sequence_logprobs(model, ids, labels)
    return model, ids, labels, ref


def _linear_names(model, quantize_output):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (quantize_output or m is not model.output)
    ]


def _dense(w):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return w.dequantize() if is_traceable_wrapper_subclass(w) else w


def _rho(base, model, names):
    num = den = 0.0
    for n in names:
        w0 = base.get_submodule(n).weight.double()
        num += float(((_dense(model.get_submodule(n).weight).double() - w0) ** 2).sum())
        den += float((w0**2).sum())
    return (num / den) ** 0.5


def _bf16_yardstick(base, ids, labels, ref, names):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w.copy_(w.to(torch.bfloat16).float())
        lp = decoder_sequence_logprobs(model, ids, labels)
    return _rho(base, model, names), _errors(lp, ref, ids.shape[0] // 2)


def _errors(lp, ref, n_pairs):
    d = lp.sum.double() - ref.sum.double()
    h = d[:n_pairs] - d[n_pairs:]
    per_tok = d.abs() / ref.num_tokens
    return {
        "seq_max": d.abs().max().item(),
        "seq_mean": d.abs().mean().item(),
        "tok_mean": per_tok.mean().item(),
        "h_max": h.abs().max().item(),
        "h_mean": h.abs().mean().item(),
    }


def _expected_bytes_bounds(model: nn.Module, quantized: list) -> tuple:
    """[low, high] for the quantized model's bytes, from the layer shapes.

    Every quantized [out, in] weight keeps out*in 1-byte values plus per-row scales:
    between 0 and 8 bytes per output row (scale + possible zero point, <= fp32 each).
    Everything else keeps its size.
    """
    names = set(quantized)
    low = high = 0
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if mname in names and pname == "weight":
                out_f, in_f = p.shape
                low += out_f * in_f
                high += out_f * in_f + 8 * out_f
            else:
                low += p.numel() * p.element_size()
                high += p.numel() * p.element_size()
    return low, high


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("quantize_output", [False, True])
def test_quantize_bytes_and_logprob_error(setup, mode, quantize_output):
    base, ids, labels, ref = setup
    model = copy.deepcopy(base)
    report = quantize_reference(model, mode, quantize_output=quantize_output)

    n_layers = len(base.layers)
    expected_linears = 7 * n_layers + int(quantize_output)  # q,k,v,o + w1,w2,w3 per layer
    assert len(report.quantized) == expected_linears, report.quantized
    assert report.output_quantized is quantize_output
    assert ("output" in report.kept) is (not quantize_output)
    assert not isinstance(model.tok_embeddings.weight, type(model.layers[0].attn.q_proj.weight))
    assert all(not p.requires_grad for p in model.parameters())

    # bytes: measured real storage, within the bounds derived from the shapes
    assert report.bytes_before == weight_bytes(base)
    assert report.bytes_after == weight_bytes(model)
    low, high = _expected_bytes_bounds(base, report.quantized)
    assert low <= report.bytes_after <= high, (low, report.bytes_after, high)
    linear_fp32 = sum(base.get_submodule(n).weight.numel() * 4 for n in report.quantized)
    assert report.bytes_before - report.bytes_after >= 0.75 * linear_fp32 - 8 * sum(
        base.get_submodule(n).weight.shape[0] for n in report.quantized
    )

    with torch.no_grad():
        lp = decoder_sequence_logprobs(model, ids, labels)
    assert torch.equal(lp.num_tokens, ref.num_tokens)
    e = _errors(lp, ref, ids.shape[0] // 2)
    print(
        f"\n[{mode} output={quantize_output}] bytes {report.bytes_before} -> {report.bytes_after} "
        f"({report.ratio:.3f}x, shape bounds [{low}, {high}]); |d seq| max {e['seq_max']:.2e} "
        f"mean {e['seq_mean']:.2e}; |d token| mean {e['tok_mean']:.2e}; |d h| max {e['h_max']:.2e} "
        f"mean {e['h_mean']:.2e}"
    )
    # the rounding really is what the scheme promises
    rho = _rho(base, model, report.quantized)
    if mode == "int8":
        num = den = 0.0
        for n in report.quantized:
            w0 = base.get_submodule(n).weight.double()
            step = w0.abs().amax(dim=1, keepdim=True) / 127
            assert bool(
                (
                    (_dense(model.get_submodule(n).weight).double() - w0).abs()
                    <= step / 2 * 1.001 + 1e-12
                ).all()
            ), n
            num += float((step / 2).pow(2).sum() * w0.shape[1])
            den += float(w0.pow(2).sum())
        rho_max = (num / den) ** 0.5
    else:
        rho_max = 2.0**-4
    # first-order yardstick: the same layers rounded to bf16
    rho_bf16, yard = _bf16_yardstick(base, ids, labels, ref, report.quantized)
    pred = rho / rho_bf16
    print(
        f"  rho {rho:.2e} (rule: <= {rho_max:.2e}), bf16 yardstick rho {rho_bf16:.2e}: predicted {pred:.1f}x; "
        f"measured h {e['h_max'] / yard['h_max']:.1f}x, token {e['tok_mean'] / yard['tok_mean']:.1f}x "
        f"(yardstick |d h| max {yard['h_max']:.2e}, |d token| mean {yard['tok_mean']:.2e})"
    )
    assert 0 < rho <= rho_max
    assert e["h_max"] <= SLACK * pred * yard["h_max"]
    assert e["tok_mean"] <= SLACK * pred * yard["tok_mean"]
    assert e["seq_max"] > 0  # it really is a different (quantized) model


def test_quantized_output_chunked_and_grad_mode(setup):
    """The quantized output projection goes through sequence_logprobs' fused chunk loop."""
    base, ids, labels, _ = setup
    model = copy.deepcopy(base)
    quantize_reference(model, "int8", quantize_output=True)
    with torch.no_grad():
        one = decoder_sequence_logprobs(model, ids, labels, chunk_size=4096)
        many = decoder_sequence_logprobs(model, ids, labels, chunk_size=7)
    torch.testing.assert_close(many.sum, one.sum, rtol=1e-5, atol=1e-4)
    # grad mode on (frozen weights): same numbers, nothing requires grad
    graded = decoder_sequence_logprobs(model, ids, labels, chunk_size=7)
    assert not graded.sum.requires_grad
    torch.testing.assert_close(graded.sum, many.sum, rtol=0, atol=0)


def test_bf16_model_int8(setup):
    """int8 on a bf16 model: bytes bound, and the error against the bf16 model is bounded by
    the triangle inequality |q16 - b16| <= |q16 - q32| + |q32 - f32| + |f32 - b16|, where
    |q16 - q32| (bf16 compute noise on the int8 model) is of the size of |b16 - f32|."""
    base, ids, labels, ref = setup
    ref16 = copy.deepcopy(base).to(torch.bfloat16)
    model = copy.deepcopy(ref16)
    report = quantize_reference(model, "int8")
    low, high = _expected_bytes_bounds(ref16, report.quantized)  # bf16: 2 bytes -> 1 (+ scales)
    assert low <= report.bytes_after <= high
    q32 = copy.deepcopy(base)
    quantize_reference(q32, "int8")
    with torch.no_grad():
        b16 = decoder_sequence_logprobs(ref16, ids, labels)
        q16 = decoder_sequence_logprobs(model, ids, labels)
        lq32 = decoder_sequence_logprobs(q32, ids, labels)
    assert q16.sum.dtype == torch.float32
    n = ids.shape[0] // 2
    e, e_q32, e_b16 = _errors(q16, b16, n), _errors(lq32, ref, n), _errors(b16, ref, n)
    print(
        f"\n[int8 on bf16 vs bf16] |d token| mean {e['tok_mean']:.2e}; |d h| max {e['h_max']:.2e}"
    )
    for k in ("h_max", "tok_mean"):
        assert e[k] <= 2 * e_b16[k] + e_q32[k], k


def test_weight_bytes_counts_inner_storage():
    lin = nn.Linear(64, 32)
    quantize_reference(nn.ModuleDict({"l": lin}), "int8")
    w = lin.weight
    names, _ = w.__tensor_flatten__()
    inner = sum(getattr(w, n).untyped_storage().nbytes() for n in names)
    assert inner == 32 * 64 + 32 * 4  # int8 data + one fp32 scale per row
    assert tensor_storage_bytes(w) == inner
    assert weight_bytes(nn.ModuleDict({"l": lin})) == inner + 32 * 4  # + fp32 bias
    # shared storage (tied weights, views) is counted once
    emb = nn.Embedding(10, 8)
    tied = nn.Module()
    tied.a = emb
    tied.b = nn.Linear(8, 10, bias=False)
    tied.b.weight = emb.weight
    assert weight_bytes(tied) == 10 * 8 * 4
    x = torch.zeros(100)
    seen = set()
    assert tensor_storage_bytes(x[:10], seen) == 400 and tensor_storage_bytes(x[50:], seen) == 0


def test_fp8_dynamic_on_cpu_is_a_user_error(setup):
    with pytest.raises(
        PrefOptUserError, match=r"fp8_dynamic needs a CUDA GPU with compute capability >= 8\.9"
    ) as ei:
        check_quantization_supported("fp8_dynamic", "cpu")
    assert "\n" not in str(ei.value)
    base = setup[0]
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrefOptUserError, match="fp8_dynamic"):
        quantize_reference(model, "fp8_dynamic")
    after = model.state_dict()
    assert all(
        type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items()
    )


def test_check_errors(monkeypatch):
    check_quantization_supported(None, "cpu")
    check_quantization_supported("int8", "cpu")
    check_quantization_supported("fp8", "cpu")
    with pytest.raises(PrefOptUserError, match="must be null or one of"):
        check_quantization_supported("int4", "cpu")
    import torchao.quantization as tq

    monkeypatch.delattr(tq, "Float8WeightOnlyConfig")
    with pytest.raises(
        PrefOptUserError,
        match=r"needs torchao\.quantization\.Float8WeightOnlyConfig, missing in torchao",
    ):
        check_quantization_supported("fp8", "cpu")
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(PrefOptUserError, match="needs torchao, which cannot be imported"):
        check_quantization_supported("int8", "cpu")


def test_refuses_meta_and_requantization(setup):
    from torchtune_prefopt.models.tiny import tiny_qwen2

    with torch.device("meta"):
        meta = tiny_qwen2()
    with pytest.raises(ValueError, match="meta device; load the weights first"):
        quantize_reference(meta, "int8")
    # weights assigned, RoPE cache still on meta (what a recipe gets from a meta-device build)
    meta.load_state_dict(copy.deepcopy(setup[0].state_dict()), assign=True)
    with pytest.raises(ValueError, match="buffer .* is on the meta device.*rope_init"):
        quantize_reference(meta, "int8")
    model = copy.deepcopy(setup[0])
    quantize_reference(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_reference(model, "fp8")


def test_report_summary(setup):
    model = copy.deepcopy(setup[0])
    rep = quantize_reference(model, "fp8", device="cpu")
    line = rep.summary()
    assert "\n" not in line and "fp8" in line and "MiB" in line
    json.dumps(rep.as_dict())
