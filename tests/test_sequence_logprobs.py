"""sequence_logprobs vs the full-logits computation and torchtune's rlhf.get_batch_log_probs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune import rlhf
from torchtune.modules import TiedLinear
from torchtune.modules.peft import LoRALinear

from torchtune_prefopt.modules import SequenceLogProbs, sequence_logprobs
from torchtune_prefopt.modules.sequence_logprobs import _plain_linear

B, S, D, V = 3, 9, 16, 37
TOL = dict(atol=1e-5, rtol=1e-5)


def _labels(batch=B, seq=S, vocab=V, seed=0):
    """Unshifted labels with prompts (left) and right padding masked with -100."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    prompt = [2, 4, 1, 5, 3][:batch]
    pad = [0, 2, 3, 1, 0][:batch]
    for i in range(batch):
        labels[i, : prompt[i]] = -100
        if pad[i]:
            labels[i, seq - pad[i] :] = -100
    return labels


def _full_logits_reference(hidden, proj, labels):
    """Materialise [B, S, V] logits, fp32 log_softmax, gather (the thing we replace)."""
    logits = proj(hidden).float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    total = tok.sum(-1)
    n = keep.sum(-1)
    return total, total / n, n


def _via(path, proj):
    """fused: pass the projection as is; generic: hide it behind a plain callable."""
    if path == "fused":
        return proj
    fn = (lambda x: F.linear(x, proj)) if isinstance(proj, torch.Tensor) else proj
    return lambda x: fn(x)


def _grads(out, params, w_sum, w_mean):
    loss = (out[0] * w_sum).sum() + (out[1] * w_mean).sum()
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])  # < , < and > the 22 label tokens
def test_matches_full_logits_and_torchtune_with_grads(chunk_size, path):
    torch.manual_seed(0)
    hidden = torch.randn(B, S, D, requires_grad=True)
    lin = nn.Linear(D, V, bias=False)
    labels = _labels()

    ours = sequence_logprobs(hidden, _via(path, lin), labels, chunk_size=chunk_size)
    assert isinstance(ours, SequenceLogProbs)
    assert ours.sum.dtype == torch.float32 and ours.mean.dtype == torch.float32
    assert ours.num_tokens.dtype == torch.int64
    ref_sum, ref_mean, ref_n = _full_logits_reference(hidden, lin, labels)
    assert torch.equal(ours.num_tokens, ref_n)
    torch.testing.assert_close(ours.sum, ref_sum, **TOL)
    torch.testing.assert_close(ours.mean, ref_mean, **TOL)

    logits = lin(hidden).float()
    tt_sum = rlhf.get_batch_log_probs(logits, labels)
    tt_mean = rlhf.get_batch_log_probs(logits, labels, return_average_logprobs=True)
    torch.testing.assert_close(ours.sum, tt_sum, **TOL)
    torch.testing.assert_close(ours.mean, tt_mean, **TOL)

    w_sum, w_mean = torch.randn(B), torch.randn(B)
    params = (hidden, lin.weight)
    g_ours = _grads((ours.sum, ours.mean), params, w_sum, w_mean)
    g_ref = _grads((tt_sum, tt_mean), params, w_sum, w_mean)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, **TOL)
    # masked positions (prompt, padding and the last position) get exactly zero gradient
    tgt_keep = torch.cat([labels[:, 1:] != -100, torch.zeros(B, 1, dtype=torch.bool)], 1)
    assert torch.all(g_ours[0][~tgt_keep] == 0)


def _proj_variants():
    torch.manual_seed(1)
    with_bias = nn.Linear(D, V, bias=True)
    weight = torch.randn(V, D, requires_grad=True)
    emb = nn.Embedding(V, D)
    tied = TiedLinear(emb)  # not an nn.Module
    lora = LoRALinear(D, V, rank=4, alpha=8.0)
    nn.init.normal_(lora.lora_b.weight)  # lora_b starts at zero; make it matter
    frozen = nn.Linear(D, V, bias=False).requires_grad_(False)
    return {
        "linear_bias": (with_bias, [with_bias.weight, with_bias.bias]),
        "frozen_linear": (frozen, []),
        "weight_tensor": (weight, [weight]),
        "tied_linear": (tied, [emb.weight]),
        "lora_linear": (lora, [lora.lora_a.weight, lora.lora_b.weight]),
    }


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize(
    "kind", ["linear_bias", "frozen_linear", "weight_tensor", "tied_linear", "lora_linear"]
)
def test_projection_kinds_value_and_weight_grads(kind, path):
    proj, params = _proj_variants()[kind]
    fn = (lambda x: F.linear(x, proj)) if isinstance(proj, torch.Tensor) else proj
    expect_fused = path == "fused" and kind != "lora_linear"
    assert (_plain_linear(_via(path, proj)) is not None) == expect_fused
    hidden = torch.randn(B, S, D, requires_grad=True)
    labels = _labels(seed=3)
    ours = sequence_logprobs(hidden, _via(path, proj), labels, chunk_size=5)
    ref_sum, ref_mean, _ = _full_logits_reference(hidden, fn, labels)
    torch.testing.assert_close(ours.sum, ref_sum, **TOL)
    torch.testing.assert_close(ours.mean, ref_mean, **TOL)
    w_sum, w_mean = torch.randn(B), torch.randn(B)
    g_ours = _grads((ours.sum, ours.mean), [hidden, *params], w_sum, w_mean)
    g_ref = _grads((ref_sum, ref_mean), [hidden, *params], w_sum, w_mean)
    for a, b in zip(g_ours, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **TOL)


def test_only_labelled_positions_are_projected_in_chunks():
    seen = []
    lin = nn.Linear(D, V, bias=False)

    def proj(x):
        seen.append(x.shape[0])
        return lin(x)

    labels = _labels()
    n = int((labels[:, 1:] != -100).sum())
    hidden = torch.randn(B, S, D)
    with torch.no_grad():
        sequence_logprobs(hidden, proj, labels, chunk_size=6)
    assert sum(seen) == n  # prompt/padding/last position never reach the projection
    assert max(seen) <= 6 and len(seen) == -(-n // 6)


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_no_vocab_sized_tensor_saved_for_backward(path):
    """Logits are recomputed in backward: nothing [N, V] is saved (only the weight itself,
    by reference, on the fused path)."""
    big_v = 4096
    lin = nn.Linear(D, big_v, bias=False)
    hidden = torch.randn(B, S, D, requires_grad=True)
    labels = _labels(vocab=big_v)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sequence_logprobs(hidden, _via(path, lin), labels, chunk_size=4)
    assert saved
    for t in saved:
        assert t.numel() < big_v or t.data_ptr() == lin.weight.data_ptr(), tuple(t.shape)
    out.sum.sum().backward()
    assert lin.weight.grad is not None and hidden.grad is not None


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_bf16_uses_fp32_log_softmax(path):
    torch.manual_seed(0)
    b, s, d, v = 4, 32, 64, 2000
    hidden = torch.randn(b, s, d).bfloat16().requires_grad_()
    weight = (torch.randn(v, d) * 0.3).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (b, s))
    labels[:, :5] = -100

    ours = sequence_logprobs(hidden, _via(path, weight), labels, chunk_size=16)
    assert ours.sum.dtype == torch.float32 and ours.mean.dtype == torch.float32

    # torchtune's own path for a bf16 model: bf16 logits, .float(), fp32 log_softmax
    tt = rlhf.get_batch_log_probs(F.linear(hidden, weight).float(), labels)
    torch.testing.assert_close(ours.sum, tt, atol=1e-3, rtol=1e-5)
    # fp32-upcast reference: the only difference left is bf16 rounding of the logits
    up = rlhf.get_batch_log_probs(F.linear(hidden.float(), weight.float()), labels)
    torch.testing.assert_close(ours.sum, up, atol=0.5, rtol=2e-3)
    # a bf16 log_softmax would be far worse
    naive = rlhf.get_batch_log_probs(F.linear(hidden, weight), labels).float()
    assert (ours.sum - up).abs().max() * 5 < (naive - up).abs().max()

    g_ours = torch.autograd.grad(ours.sum.sum(), [hidden, weight])
    g_tt = torch.autograd.grad(tt.sum(), [hidden, weight])
    for a, b_ in zip(g_ours, g_tt):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b_.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_gradcheck_float64(path):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 3, 1, 6, -100], [-100, -100, 0, 2, 5]])

    def f(h, w, b):
        lin = nn.Linear(4, 7).double()
        del lin.weight, lin.bias
        lin.weight, lin.bias = w, b  # plain tensors: still a hook-free nn.Linear
        out = sequence_logprobs(h, _via(path, lin), labels, chunk_size=2)
        return out.sum, out.mean

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_no_grad_path_matches_and_builds_no_graph(path):
    lin = nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, S, D, requires_grad=True)
    labels = _labels()
    with torch.no_grad():
        a = sequence_logprobs(hidden, _via(path, lin), labels, chunk_size=4)
    assert a.sum.grad_fn is None
    b = sequence_logprobs(hidden, _via(path, lin), labels, chunk_size=4)
    torch.testing.assert_close(a.sum, b.sum.detach(), atol=0, rtol=0)


def test_hooked_linear_takes_generic_path_and_hooks_run_per_chunk():
    lin = nn.Linear(D, V, bias=False)
    calls = []
    lin.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    assert _plain_linear(lin) is None  # e.g. torchtune's activation-offloading NoOpManager
    hidden = torch.randn(B, S, D, requires_grad=True)
    labels = _labels()
    ours = sequence_logprobs(hidden, lin, labels, chunk_size=8)
    ours.sum.sum().backward()  # recompute in backward calls the module (and hook) again
    n = int((labels[:, 1:] != -100).sum())
    assert sum(calls) == 2 * n and max(calls) <= 8


def test_empty_completion_names_rows():
    hidden = torch.randn(5, S, D)
    labels = _labels(batch=5)
    labels[3] = -100
    labels[1] = -100
    labels[1, 0] = 7  # a label at position 0 is never predicted: still empty after the shift
    with pytest.raises(ValueError, match=r"empty completion: rows \[1, 3\] have no label tokens"):
        sequence_logprobs(hidden, nn.Linear(D, V), labels)


def test_argument_errors():
    hidden = torch.randn(B, S, D)
    lin = nn.Linear(D, V)
    with pytest.raises(ValueError, match="must match"):
        sequence_logprobs(hidden, lin, _labels()[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(hidden, lin, _labels(), chunk_size=0)
    with pytest.raises(ValueError, match="negative"):
        bad = _labels()
        bad[0, -1] = -1
        sequence_logprobs(hidden, lin, bad)
    with pytest.raises(TypeError, match="output_proj"):
        sequence_logprobs(hidden, "lm_head", _labels())


def test_custom_ignore_index():
    lin = nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, S, D)
    labels = _labels()
    alt = labels.masked_fill(labels == -100, V + 5)
    with torch.no_grad():
        a = sequence_logprobs(hidden, lin, labels)
        b = sequence_logprobs(hidden, lin, alt, ignore_index=V + 5)
    torch.testing.assert_close(a.sum, b.sum, atol=0, rtol=0)
