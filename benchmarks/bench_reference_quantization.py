"""Quantized reference: weight bytes and log-prob error per mode (not a test).

A torchtune Qwen2 decoder with a realistic vocabulary (default 128256, Llama 3's) and a few
layers is built with random weights, then for each mode a copy is quantized with
:func:`torchtune_prefopt.reference.quantize_reference` and its reference log-probs are
compared with the unquantized fp32 model's:

* per sequence: ``|sum_q - sum|`` of the completion's summed log-prob
  (through :func:`torchtune_prefopt.modules.decoder_sequence_logprobs`, the recipe's path);
* per token: ``|logp_q - logp|`` of each scored token;
* DPO log-ratio: the reference's contribution to ``h = (pi_c - ref_c) - (pi_r - ref_r)``
  changes by ``(d_c - d_r)`` per pair.

Random weights are near-uniform over a big vocabulary, which hides errors, so the output
projection is rescaled to give logits of standard deviation ``--logit-std`` (default 4,
entropy of a few nats, like a trained LM) and the label tokens are *sampled from the fp32
model's own next-token distribution* at each position (the inputs are random tokens): the
scored tokens have realistic log-probs, not ``-log V``. Still random weights, not a
trained model: trained weights have outlier channels that per-row scales absorb worse, so
read the absolute numbers as indicative (random networks are far less robust to weight noise
than trained ones) and the ratios as the result. The yardstick rows round the same layers'
weights to bf16 (fp32 compute): the precision a bf16 reference already has.

Weight bytes are measured with :func:`torchtune_prefopt.reference.weight_bytes` (inner
int8/fp8 data + scales of torchao's tensors). For Llama 3.1 8B / 70B shapes the bytes are
computed from the layer shapes (no weights are built) with the formula this benchmark
checks against the measured model: each quantized ``[out, in]`` weight becomes
``out * in`` bytes + one scale per output row (int8: model dtype; fp8: fp32).

Usage:
  python benchmarks/bench_reference_quantization.py                 # print the section
  python benchmarks/bench_reference_quantization.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings

from _markdown import write_section  # benchmarks/ is the script's directory  # noqa: E402

SECTION = "## Quantized reference"


def _qwen2(vocab: int, dim: int, layers: int, heads: int, kv_heads: int, inter: int):
    from torchtune.models.qwen2._component_builders import qwen2

    return qwen2(
        vocab_size=vocab,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        embed_dim=dim,
        intermediate_dim=inter,
        max_seq_len=4096,
        tie_word_embeddings=False,
    )


def estimate_bytes(model, mode: str, quantize_output: bool, dtype) -> tuple:
    """(before, after) weight bytes from parameter shapes only (works on the meta device)."""
    import torch
    from torch import nn

    itemsize = torch.empty((), dtype=dtype).element_size()
    before = sum(p.numel() * itemsize for p in model.parameters())
    after = before
    scale_bytes = itemsize if mode == "int8" else 4
    for m in model.modules():
        if isinstance(m, nn.Linear) and (
            quantize_output or m is not getattr(model, "output", None)
        ):
            out_f, in_f = m.weight.shape
            after += out_f * in_f * 1 + out_f * scale_bytes - out_f * in_f * itemsize
    return before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=192)
    p.add_argument("--logit-std", type=float, default=4.0)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", metavar="MARKDOWN", help=f"update the '{SECTION}' section")
    a = p.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    from torch import nn

    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.modules import decoder_sequence_logprobs
    from torchtune_prefopt.reference import (
        check_quantization_supported,
        quantize_reference,
        weight_bytes,
    )

    torch.manual_seed(a.seed)
    base = _qwen2(a.vocab, a.dim, a.layers, a.heads, a.kv_heads, a.inter)
    with torch.no_grad():
        for name, prm in base.named_parameters():
            if name.endswith("norm.scale"):
                prm.fill_(1.0)
            elif name == "output.weight":
                prm.normal_(0.0, a.logit_std / a.dim**0.5)
            else:
                prm.normal_(0.0, 0.02)  # embeddings, linear weights, q/k/v biases
    base.eval()
    for prm in base.parameters():
        prm.requires_grad_(False)

    # ---- inputs: shared prompts, random completion inputs, labels sampled from the model
    n, s = 2 * a.pairs, a.prompt_len + a.completion_len
    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, a.vocab, (n, s), generator=g)
    tokens[a.pairs :, : a.prompt_len] = tokens[: a.pairs, : a.prompt_len]  # same prompt per pair
    captured = {}
    hook = base.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        labels = torch.full((n, s), -100, dtype=torch.long)
        # one plain forward for the next-token distributions at the completion positions
        h = _hidden(base, tokens, captured)
        for r in range(n):
            for c0 in range(a.prompt_len - 1, s - 1, 128):
                c1 = min(c0 + 128, s - 1)
                probs = torch.softmax(base.output(h[r, c0:c1]).float(), dim=-1)
                labels[r, c0 + 1 : c1 + 1] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    hook.remove()

    def run(model):
        cap = {}
        hk = model.norm.register_forward_hook(lambda m, i, o: cap.__setitem__("h", o))
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = decoder_sequence_logprobs(model, tokens, labels, chunk_size=a.chunk_size)
        dt = time.perf_counter() - t0
        hk.remove()
        with torch.no_grad():
            per_tok = _per_token(model, cap["h"], labels)
        return seq.sum.double(), per_tok, dt

    ref_sum, ref_tok, ref_dt = run(base)
    mask = labels[:, 1:] != -100
    n_tok = int(mask.sum())
    mean_logp = float(ref_tok[mask].mean())

    def errors(q_sum, q_tok):
        d = (q_sum - ref_sum).abs()
        dt = (q_tok - ref_tok)[mask].abs()
        hd = ((q_sum - ref_sum)[: a.pairs] - (q_sum - ref_sum)[a.pairs :]).abs()
        return (
            d.mean().item(),
            d.max().item(),
            dt.mean().item(),
            dt.max().item(),
            hd.mean().item(),
            hd.max().item(),
        )

    rows = []
    total_before = weight_bytes(base)
    linear_before = sum(weight_bytes(m) for m in base.modules() if isinstance(m, nn.Linear))

    def linear_names(qout):
        return [
            n
            for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and (qout or m is not base.output)
        ]

    def rho(model, names):
        """Relative Frobenius norm of the weight perturbation over ``names``."""
        num = den = 0.0
        for name in names:
            w0 = base.get_submodule(name).weight.double()
            w = model.get_submodule(name).weight
            wq = (w.dequantize() if _is_subclass(w) else w).double()
            num += float(((wq - w0) ** 2).sum())
            den += float((w0**2).sum())
        return (num / den) ** 0.5

    yard = {}
    for qout in (False, True):
        names = linear_names(qout)
        bw = copy.deepcopy(base)
        with torch.no_grad():
            for name in names:
                w = bw.get_submodule(name).weight
                w.copy_(w.to(torch.bfloat16).to(w.dtype))
        q_sum, q_tok, dt = run(bw)
        e = errors(q_sum, q_tok.double())
        yard[qout] = (rho(bw, names), e)
        rows.append(
            (
                "bf16-rounded weights (yardstick)",
                "yes" if qout else "no",
                None,
                None,
                e,
                dt,
                yard[qout][0],
                None,
            )
        )
        del bw

    for mode in ("int8", "fp8", "fp8_dynamic"):
        for qout in (False, True):
            try:
                check_quantization_supported(mode, "cpu")
            except PrefOptUserError as err:
                if not qout:
                    rows.append((f"{mode}", "-", None, str(err), None, None, None, None))
                continue
            m = copy.deepcopy(base)
            rep = quantize_reference(m, mode, quantize_output=qout)
            est = estimate_bytes(base, mode, qout, torch.float32)[1]
            if est != rep.bytes_after:
                print(
                    f"WARNING: {mode} output={qout}: measured {rep.bytes_after} B, shape formula {est} B",
                    file=sys.stderr,
                )
            q_sum, q_tok, dt = run(m)
            e = errors(q_sum, q_tok.double())
            r = rho(m, rep.quantized)
            y_rho, y_e = yard[qout]
            measured = e[5] / y_e[5]  # h max, in units of the yardstick
            rows.append(
                (
                    mode,
                    "yes" if qout else "no",
                    rep.bytes_after,
                    None,
                    e,
                    dt,
                    r,
                    (measured, r / y_rho),
                )
            )
            del m

    # ---- table
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    head = (
        f"fp32 Qwen2-style decoder with random weights: vocab {a.vocab}, dim {a.dim}, {a.layers} layers "
        f"({a.heads} heads, {a.kv_heads} KV heads, MLP {a.inter}), untied output; {a.pairs} pairs, "
        f"prompt {a.prompt_len} + completion {a.completion_len} tokens ({n_tok} scored tokens, labels "
        f"sampled from the model: mean log-prob {mean_logp:.2f} nats/token, output logit std {a.logit_std}). "
        f"`{platform.machine()}`, torch {torch.__version__}, torchao {_torchao_version()}. "
        "Command: `python benchmarks/bench_reference_quantization.py --write BENCHMARKS.md`.\n\n"
        "Random weights (no trained checkpoint can be downloaded here): a random network is far more "
        "sensitive to weight noise than a trained one, so read the absolute errors as an upper-end "
        "illustration and the ratios between rows as the result. "
        "Errors are absolute differences from the fp32 unquantized reference, in nats. *seq*: summed "
        "completion log-prob per sequence; *token*: per scored token; *h*: the reference's part of the "
        "DPO log-ratio per pair, `(d_chosen - d_rejected)`. *rho*: relative size of the weight rounding, "
        "`||W_q - W||_F / ||W||_F` over the rounded layers; *h max / yardstick*: the measured error in units "
        "of the yardstick's (the same layers' weights rounded to bf16, fp32 compute) next to the first-order "
        "prediction `rho / rho_bf16` (log-prob errors are linear in a small weight perturbation). "
        "Weight bytes: parameters, real storage "
        f"(fp32 model: {mib(total_before)} MiB, of which {mib(linear_before)} MiB in `nn.Linear` layers "
        f"incl. the output projection). Forward s: one no-grad reference forward, 2 shared CPU cores "
        f"(fp32 unquantized: {ref_dt:.2f} s); CPU int8/fp8 weight-only kernels dequantize, so no speed-up is "
        "expected here.\n\n"
    )
    table = [
        "| reference | output proj. rounded | weights MiB | x fp32 | seq mean | seq max | token mean | token max "
        "| h mean | h max | rho | h max / yardstick (predicted) | forward s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, qout, b, err_msg, e, dt, r, ratio in rows:
        if err_msg is not None:
            table.append(f"| {name} | - | n/a | | {err_msg} | | | | | | | | |")
            continue
        cells = " | ".join(f"{x:.1e}" for x in e)
        size = f"{mib(b)} | {b / total_before:.2f}" if b is not None else "(fp32) | 1.00"
        rat = f"{ratio[0]:.1f}x ({ratio[1]:.1f}x)" if ratio is not None else "1x"
        table.append(f"| {name} | {qout} | {size} | {cells} | {r:.1e} | {rat} | {dt:.2f} |")

    # ---- real model shapes (meta device, no weights)
    from torchtune.models.llama3_1 import llama3_1_8b, llama3_1_70b

    shape_rows = [
        "",
        "Weight bytes of full-size models from their layer shapes (same formula, checked against the "
        "measured bytes above; bf16 weights; int8 scales bf16, fp8 scales fp32):",
        "",
        "| model | bf16 GiB | int8 GiB (output bf16) | int8 GiB (all linear) | fp8 GiB (output bf16) | output proj. share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, builder in (("Llama 3.1 8B", llama3_1_8b), ("Llama 3.1 70B", llama3_1_70b)):
        with torch.device("meta"):
            meta = builder()
        gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
        b0, i8 = estimate_bytes(meta, "int8", False, torch.bfloat16)
        _, i8o = estimate_bytes(meta, "int8", True, torch.bfloat16)
        _, f8 = estimate_bytes(meta, "fp8", False, torch.bfloat16)
        share = meta.output.weight.numel() * 2 / b0
        shape_rows.append(
            f"| {label} | {gib(b0)} | {gib(i8)} | {gib(i8o)} | {gib(f8)} | {share:.1%} |"
        )
        del meta

    body = head + "\n".join(table) + "\n" + "\n".join(shape_rows) + "\n" + NOTES
    print(body)
    if a.write:
        write_section(a.write, SECTION, body)


NOTES = """
Reading the tables:

- Bytes: on this small model most bytes are the 128k x 512 embedding and output projection,
  so int8 with the output kept saves little (0.94x); on real models the layers dominate
  (second table: Llama 3.1 8B 15.0 -> 8.5 GiB, 70B 131.4 -> 67.7 GiB). int8 and fp8 weights
  are both 1 byte per weight; the scales (one per output row) are negligible.
- Accuracy follows the first-order rule `error ~ rho`: measured/predicted 0.5-1.2x here,
  0.7-1.5x in `tests/test_reference_quantize.py`. int8's weight rounding (`rho` ~ 7.6e-3 at
  512 inputs per row) is 4.5x bf16's, e4m3's (2.6e-2) 15x: fp8 weight-only costs 2.5-3.5x
  int8's error on `h` and per token here (8x on the tiny test model) for the same bytes, so
  **int8 is the mode to use for memory**; `fp8_dynamic` exists for the fp8 matmul speed on
  H100-class GPUs (not measurable here: no GPU in this run).
- fp8's per-sequence errors are much larger than its per-token errors times sqrt(tokens): its
  rounding shifts most tokens' log-probs the same way (a bias), which partly cancels in the
  DPO log-ratio `h` (chosen minus rejected).
- Output projection: quantizing it too raised int8's `h` error 1.2x here and 3x on the tiny
  test model, for 1.5-6.5 % of a real model's bytes: `quantize_reference` keeps it in full
  precision unless `quantize_output=True`.
"""


def _hidden(model, tokens, captured):
    """Final-norm hidden states of a plain forward, without building the [B, S, V] logits."""
    import torch

    saved = model.__dict__.get("unembed")
    model.__dict__["unembed"] = lambda h: model.norm(h)
    try:
        model(tokens)
    finally:
        if saved is None:
            model.__dict__.pop("unembed", None)
        else:
            model.__dict__["unembed"] = saved
    return (
        captured["h"].to(torch.float32) if captured["h"].dtype != torch.float32 else captured["h"]
    )


def _per_token(model, h, labels, chunk: int = 512):
    """[B, S-1] per-token log-probs of labels[:, 1:] (0 where unlabelled), chunked."""
    import torch

    targets = labels[:, 1:]
    out = torch.zeros(targets.shape, dtype=torch.float32)
    keep = targets != -100
    hs = h[:, :-1][keep]
    ts = targets[keep]
    vals = []
    for i in range(0, hs.shape[0], chunk):
        logits = model.output(hs[i : i + chunk]).float()
        vals.append(torch.log_softmax(logits, -1).gather(1, ts[i : i + chunk, None]).squeeze(1))
    out[keep] = torch.cat(vals)
    return out


def _is_subclass(t) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def _torchao_version() -> str:
    try:
        import torchao

        return torchao.__version__
    except Exception:  # noqa: BLE001
        return "n/a"


if __name__ == "__main__":
    main()
