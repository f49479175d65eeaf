"""The packed layout (``packed: true``) and prompt sharing (``share_prompt: true``) against the
padded layout, piece by piece:

* the layout itself, hand-derived (documents, positions, branches, what each slot scores);
* real tokenizer rows (the tiny Qwen2 ChatML one and a Llama-3 one, truncation included): every
  sequence read back out of the packed rows is the padded row, token for token, with the same
  positions and scored labels;
* the attention rule: per-document SDPA and flex_attention (eager on CPU) against a dense
  ``[L, L]`` mask built from the rule independently;
* the model: log-probs and every parameter gradient of padded vs packed vs packed + shared, in
  float64 (so any difference beyond rounding is a bug), for untied, tied and LoRA models, with
  activation checkpointing and per-layer compile (aot_eager);
* prompt gradients: a shared prompt position receives the sum of what the chosen and the
  rejected copies of that position receive in the padded layout.

The recipe-level step-by-step equality (losses, rewards, grad norms, weights over 20 steps for
every loss, LoRA, AC, compile, 2 processes, precompute) is in ``test_packing_recipe.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune import training
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from torchtune_prefopt.data import (
    PackedBatch,
    PackingLayout,
    PairedBatch,
    PreferenceCollator,
    UnpairedBatch,
    pack_sequences,
    unpaired_from_paired,
)
from torchtune_prefopt.modules.packed_attention import PackedAttention, tree_mask_rule

IGNORE = -100


# ----------------------------------------------------------------------------- the layout


def test_shared_document_hand_derived():
    # pair 0: prompt [1, 2], chosen [3, 4], rejected [5, 6]; pair 1: prompt [7], chosen
    # [8], rejected [8, 9] (rejected's first completion token equals chosen's: shared too)
    first = [([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ([7, 8], [IGNORE, 8])]
    second = [([1, 2, 5, 6], [IGNORE, IGNORE, 5, 6]), ([7, 8, 9], [IGNORE, 8, 9])]
    out = pack_sequences(first, second, PackingLayout(True, capacity=64, multiple_of=4), pad_id=0)
    # documents, longest first: pair 0 (6 tokens) then pair 1 (3 tokens), one row of 9 -> 12
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert out["input_pos"].tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 2, 0, 0, 0]]
    assert out["branch"].tolist() == [[0, 0, 1, 1, 2, 2, 0, 0, 2, 0, 0, 0]]
    assert out["doc"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1]]
    # (row, start, end, shared): pair 1's chosen is a prefix of its rejected: plain causal
    assert out["spans"].tolist() == [[0, 0, 6, 1], [0, 6, 9, 0]]
    # slot 0 (chosen 0): 3 at pos 1, 4 at pos 2; slot 1 (chosen 1): 8 at 6; slot 2
    # (rejected 0): 5 predicted by the shared prompt end (1), 6 by its own first token (4);
    # slot 3 (rejected 1): 8 at 6 (shared with slot 1), 9 at 7
    assert out["slots"].tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert out["positions"].tolist() == [1, 2, 6, 1, 4, 6, 7]
    assert out["targets"].tolist() == [3, 4, 8, 5, 6, 8, 9]
    assert out["num_tokens"].tolist() == [2, 1, 2, 2]


def test_unshared_documents_and_rows():
    first = [([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ([7, 8], [IGNORE, 8])]
    second = [([1, 2, 5, 6], [IGNORE, IGNORE, 5, 6]), ([7, 8, 9], [IGNORE, 8, 9])]
    out = pack_sequences(first, second, PackingLayout(False, capacity=8, multiple_of=1))
    # 4 documents (4, 4, 3, 2 tokens = 13) into rows of <= 8: the cheapest row length is 7
    # (rows [4, 3], [4, 2]): 14 positions instead of 2 x 8
    assert out["input_ids"].shape == (2, 7)
    assert out["spans"][:, 3].tolist() == [0, 0, 0, 0]
    assert sorted((out["spans"][:, 2] - out["spans"][:, 1]).tolist()) == [2, 3, 4, 4]
    assert out["num_tokens"].tolist() == [2, 1, 2, 2]
    # a shared document longer than a row falls back to two documents
    out = pack_sequences(first, second, PackingLayout(True, capacity=5, multiple_of=1))
    assert int(out["spans"][:, 3].sum()) == 0 and out["input_ids"].shape[1] <= 5
    with pytest.raises(ValueError, match="does not fit the model's max_seq_len"):
        pack_sequences(first, second, PackingLayout(True, capacity=3, multiple_of=1))
    with pytest.raises(ValueError, match=r"empty completion: rows \[1\]"):
        pack_sequences([first[0], ([7, 8], [IGNORE, IGNORE])], second, PackingLayout(True, 64))


def _read_back(batch: PackedBatch, slot: int):
    """Sequence ``slot`` read out of the packed rows from the layout fields alone: its
    document (the one holding its first scored position), the shared positions and its own
    branch, in row order."""
    length = batch.input_ids.shape[1]
    first_pos = int(batch.positions[batch.slots == slot][0])
    row, col = divmod(first_pos, length)
    doc = int(batch.doc[row, col])
    n = len(batch.num_tokens) // 2
    own = 1 if slot < n else 2
    cols = (batch.doc[row] == doc).nonzero().flatten()
    branches = batch.branch[row, cols]
    shared_doc = bool((branches == 1).any() or (branches == 2).any())
    keep = (
        (branches == 0) | (branches == own)
        if shared_doc
        else torch.ones_like(branches, dtype=torch.bool)
    )
    cols = cols[keep]
    return (
        batch.input_ids[row, cols].tolist(),
        batch.input_pos[row, cols].tolist(),
        [(row * length + int(c)) for c in cols],
    )


def _check_against_padded(packed: PackedBatch, ids: torch.Tensor, labels: torch.Tensor, pad_id):
    """Every slot of ``packed`` is row ``slot`` of the padded ``ids``/``labels``."""
    for slot in range(ids.shape[0]):
        tokens, pos, flat = _read_back(packed, slot)
        n = len(tokens)
        assert tokens == ids[slot, :n].tolist(), f"slot {slot}: tokens differ"
        assert (ids[slot, n:] == pad_id).all() and (labels[slot, n:] == IGNORE).all()
        assert pos == list(range(n)), f"slot {slot}: positions differ"
        # what the slot scores: at its t-th position, labels[slot, t + 1]
        want = [
            (flat[t], int(labels[slot, t + 1]))
            for t in range(n - 1)
            if labels[slot, t + 1] != IGNORE
        ]
        sel = packed.slots == slot
        got = list(zip(packed.positions[sel].tolist(), packed.targets[sel].tolist()))
        assert got == want, f"slot {slot}: scored tokens differ"


@pytest.fixture(scope="module")
def qwen():
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    return tiny_tokenizer(max_seq_len=32)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from tune_harness import byte_llama3_tokenizer

    return byte_llama3_tokenizer(tmp_path_factory.mktemp("llama3"), max_seq_len=120)


def _paired_rows(tok, tmp_path, n=8):
    from torchtune_prefopt.data import preference_dataset
    from tune_harness import synthetic_rows, write_jsonl

    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows(n))
    ds = preference_dataset(tok, source="json", data_files=str(path))
    assert ds.stats["truncated_prompt"] > 0, ds.stats  # the rows exercise truncation
    return [ds[i] for i in range(len(ds))]


def _kto_rows(tok, tmp_path, n=8):
    from tune_harness import synthetic_rows, write_jsonl

    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows(n))
    ds = unpaired_from_paired(tok, source="json", data_files=str(path))
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("tokenizer", ["qwen", "llama3"])
@pytest.mark.parametrize("share", [False, True])
def test_packed_rows_are_the_padded_rows(tokenizer, share, request, tmp_path):
    """Truncation, BOS/EOS, masking: what the packed rows hold is what the padded rows hold
    (small max_seq_len: prompts are cut from the left, KL rows truncated like the dataset)."""
    tok = request.getfixturevalue(tokenizer)
    layout = PackingLayout(share, capacity=512, multiple_of=8)
    items = _paired_rows(tok, tmp_path)
    padded = PairedBatch.collate(items, pad_id=tok.pad_id)
    packed = PreferenceCollator(paired=True, pad_id=tok.pad_id, packing=layout)(items)
    _check_against_padded(packed, padded.input_ids, padded.labels, tok.pad_id)
    assert torch.equal(packed.index, padded.index)
    if share:
        assert packed.computed_tokens() < padded.computed_tokens()
    assert (
        packed.real_tokens()
        == padded.real_tokens()
        == sum(len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in items)
    )

    rows = _kto_rows(tok, tmp_path)
    for lo, hi in ((0, len(rows)), (2, 6)):  # whole global micro-batch, and one rank's part
        collate = PreferenceCollator(paired=False, pad_id=tok.pad_id, max_seq_len=tok.max_seq_len)
        ref = collate(rows)
        ref = ref.rows(lo, hi) if (lo, hi) != (0, len(rows)) else ref
        packed = PackedBatch.pack_unpaired(rows, lo, hi, layout, tok.pad_id, tok.max_seq_len)
        ids = torch.cat([_pad_to(ref.input_ids, ref.kl_input_ids, tok.pad_id)])
        labels = torch.cat([_pad_to(ref.labels, ref.kl_labels, IGNORE)])
        _check_against_padded(packed, ids, labels, tok.pad_id)
        assert torch.equal(packed.is_desirable, ref.is_desirable)
        assert torch.equal(packed.kl_completion_index, ref.kl_completion_index)
        assert torch.equal(packed.label_counts(), ref.label_counts())
        assert packed.real_tokens() == ref.real_tokens()


def _pad_to(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    return torch.cat(
        [
            F.pad(a, (0, width - a.shape[1]), value=value),
            F.pad(b, (0, width - b.shape[1]), value=value),
        ]
    )


# ----------------------------------------------------------------------------- attention


def _random_layout(seed: int = 0):
    """Rows of a realistic mix: shared documents, plain ones, and row padding."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for i in range(5):
        p = torch.randint(
            1, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g
        ).tolist()
        a = torch.randint(
            50, 99, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g
        ).tolist()
        b = torch.randint(
            50, 99, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g
        ).tolist()
        if i == 3:
            b = p[:1] + b  # a shorter common prefix than the prompt
            first.append((p + a, [IGNORE] * len(p) + a))
            second.append((b, [IGNORE] + b[1:]))
            continue
        first.append((p + a, [IGNORE] * len(p) + a))
        second.append((p + b, [IGNORE] * len(p) + b))
    return pack_sequences(first, second, PackingLayout(True, capacity=24, multiple_of=8))


def _dense_reference(q, k, v, doc, branch):
    """Attention with the full ``[L, L]`` mask of the rule, built position by position."""
    rows, _, length, _ = q.shape
    out = torch.zeros_like(q)
    for r in range(rows):
        mask = torch.zeros(length, length, dtype=torch.bool)
        for i in range(length):
            for j in range(length):
                mask[i, j] = bool(
                    doc[r, i] == doc[r, j]
                    and j <= i
                    and not (branch[r, i] == 2 and branch[r, j] == 1)
                )
        out[r] = F.scaled_dot_product_attention(q[r], k[r], v[r], attn_mask=mask)
    return out


@pytest.mark.parametrize("block_sparse", [False, True])
def test_packed_attention_equals_dense_mask(block_sparse):
    lay = _random_layout()
    assert lay["spans"][:, 3].sum() >= 3 and lay["input_ids"].shape[0] >= 2
    rows, length = lay["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = PackedAttention(lay["doc"], lay["branch"], lay["spans"], block_sparse=block_sparse)
    if block_sparse:
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            got = flex_attention(q, k, v, block_mask=mask.block_mask())
    else:
        got = mask.per_document(q, k, v)
    want = _dense_reference(q, k, v, lay["doc"], lay["branch"])
    real = (lay["doc"] >= 0)[:, None, :, None].expand_as(q)
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=1e-12)
    # the rule, vectorised, agrees with the loop
    d, b = lay["doc"][0], lay["branch"][0]
    idx = torch.arange(length)
    rule = tree_mask_rule(
        d[:, None], d[None, :], b[:, None], b[None, :], idx[None, :] <= idx[:, None]
    )
    assert rule[0, 0] and not rule[0, 1]


# ----------------------------------------------------------------------------- the model

DIMS = dict(
    vocab_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=64,
    max_seq_len=64,
)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lora":
        model = lora_qwen2(
            ["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
            lora_rank=4, lora_alpha=8.0, **DIMS,
        )  # fmt: skip
        for name, p in model.named_parameters():
            if "lora_b" in name:
                nn.init.normal_(p, std=0.1)
        set_trainable_params(model, get_adapter_params(model))
    else:
        model = qwen2(**DIMS, tie_word_embeddings=(kind == "tied"))
    return model.double()


def _pairs(seed: int = 0, n: int = 4):
    """``n`` pairs of random tokens with prompts of different lengths (rejected shorter or
    longer than chosen), as dataset items."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        p = torch.randint(1, 128, (3 + 2 * i,), generator=g).tolist()
        c = torch.randint(1, 128, (4 + i,), generator=g).tolist()
        r = torch.randint(1, 128, (7 - i,), generator=g).tolist()
        items.append(
            {
                "chosen_input_ids": p + c, "chosen_labels": [IGNORE] * len(p) + c,
                "rejected_input_ids": p + r, "rejected_labels": [IGNORE] * len(p) + r,
                "index": i,
            }
        )  # fmt: skip
    return items


def _assert_scaled_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    """Every element within ``rel`` of the tensor's largest magnitude. torchtune's RMSNorm
    computes in fp32 even in a float64 model, so fp32 rounding of a different accumulation
    order (~1e-7 of the scale) is the only difference left between the layouts."""
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x {scale:.3g}"


def _logps_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    lp = batch.logps(model, chunk_size=5)
    n = len(lp) // 2
    w = torch.linspace(0.5, 1.5, 2 * n, dtype=lp.sum.dtype)
    # a DPO-like objective through both halves, sums and means
    loss = -F.logsigmoid((lp.sum[:n] - lp.sum[n:]) * 0.1).sum() + (w * lp.mean).sum()
    return lp, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("kind", ["untied", "tied", "lora"])
@pytest.mark.parametrize("variant", ["eager", "activation_checkpointing", "compile"])
def test_model_logps_and_gradients_equal_padded(kind, variant):
    model = _model(kind)
    if variant == "activation_checkpointing":
        training.set_activation_checkpointing(
            model, auto_wrap_policy={TransformerSelfAttentionLayer}
        )
    if variant == "compile":
        for layer in model.layers:
            layer.compile(backend="aot_eager")
    items = _pairs()
    padded = PairedBatch.collate(items)
    lp0, g0 = _logps_and_grads(model, padded)
    for share in (False, True):
        packed = PreferenceCollator(
            paired=True, pad_id=0, packing=PackingLayout(share, capacity=64, multiple_of=8)
        )(items)
        lp, g = _logps_and_grads(model, packed)
        torch.testing.assert_close(lp.sum, lp0.sum, atol=1e-10, rtol=1e-12)
        torch.testing.assert_close(lp.mean, lp0.mean, atol=1e-10, rtol=1e-12)
        assert torch.equal(lp.num_tokens, lp0.num_tokens)
        for a, b in zip(g, g0):
            _assert_scaled_close(a, b)
    assert sum(bool(x.abs().sum() > 0) for x in g0) == len(g0)


def test_prompt_gradient_is_the_sum_over_both_completions():
    """The shared prompt's embedding outputs get d(loss)/dh(chosen copy) + d(loss)/dh(rejected
    copy) of the padded layout."""
    model = _model("untied")
    items = _pairs()
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["h"] = out

    model.tok_embeddings.register_forward_hook(keep)
    padded = PairedBatch.collate(items)
    lp = padded.logps(model)
    n = len(items)
    loss = -F.logsigmoid((lp.sum[:n] - lp.sum[n:]) * 0.1).sum()
    loss.backward()
    g_padded = captured["h"].grad
    packed = PreferenceCollator(paired=True, pad_id=0, packing=PackingLayout(True, 64, 8))(items)
    lp = packed.logps(model)
    (-F.logsigmoid((lp.sum[:n] - lp.sum[n:]) * 0.1).sum()).backward()
    g_packed = captured["h"].grad
    checked = 0
    for i, it in enumerate(items):
        prompt = it["chosen_labels"].count(IGNORE)
        row, start, _, shared = _doc_of(packed, i)
        assert shared
        want = g_padded[i, :prompt] + g_padded[n + i, :prompt]
        got = g_packed[row, start : start + prompt]
        _assert_scaled_close(got, want)
        # and it is not just one side's gradient
        assert (g_padded[i, :prompt] - want).abs().max() > 1e-8
        checked += prompt
    assert checked == sum(it["chosen_labels"].count(IGNORE) for it in items)


def _doc_of(packed: PackedBatch, slot: int):
    length = packed.input_ids.shape[1]
    row, col = divmod(int(packed.positions[packed.slots == slot][0]), length)
    for r, s, e, shared in packed.spans.tolist():
        if r == row and s <= col < e:
            return r, s, e, shared
    raise AssertionError(f"no document holds slot {slot}")


def test_kto_packed_logps_equal_padded():
    """KTO rows and their KL rows (prompt i + completion of row i+1) in one packed forward."""
    model = _model("untied")
    g = torch.Generator().manual_seed(3)
    items = [
        {
            "prompt_ids": torch.randint(1, 128, (4 + i,), generator=g).tolist(),
            "completion_ids": torch.randint(1, 128, (3 + (i % 3),), generator=g).tolist(),
            "label": bool(i % 2),
            "index": i,
        }
        for i in range(6)
    ]
    padded = UnpairedBatch.collate(items, max_seq_len=12)
    with torch.no_grad():
        lp0 = padded.logps(model)
        for share in (False, True):
            packed = PackedBatch.pack_unpaired(items, 0, 6, PackingLayout(share, 64, 8), 0, 12)
            lp = packed.logps(model)
            torch.testing.assert_close(lp.sum, lp0.sum, atol=1e-10, rtol=1e-12)
            assert torch.equal(lp.num_tokens, lp0.num_tokens)
