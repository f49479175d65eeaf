"""decoder_sequence_logprobs on tiny torchtune qwen2 models (plain, tied, LoRA, AC, compiled,
FSDP2 over 2 gloo processes) vs full model logits + rlhf.get_batch_log_probs.

The FSDP2 worker lives at the bottom of this file and runs as ``python <this file> --fsdp-worker``
(two OS processes with a gloo FileStore), so it does not depend on pytest's import mode.
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torchtune import rlhf, training
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from torchtune_prefopt.modules import decoder_sequence_logprobs, enable_sequence_logprobs
from torchtune_prefopt.modules.sequence_logprobs import _plain_linear

VOCAB = 96
DIMS = dict(
    vocab_size=VOCAB,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=64,
    max_seq_len=64,
)
TOL = dict(atol=1e-5, rtol=1e-5)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "untied":
        return qwen2(**DIMS, tie_word_embeddings=False)
    if kind == "tied":
        return qwen2(**DIMS, tie_word_embeddings=True)
    if kind == "lora":
        model = lora_qwen2(
            ["q_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=True,
            lora_rank=4,
            lora_alpha=8.0,
            **DIMS,
        )
        for name, p in model.named_parameters():
            if "lora_b" in name:  # lora_b starts at zero: make the adapters matter
                nn.init.normal_(p, std=0.1)
        set_trainable_params(model, get_adapter_params(model))
        return model
    raise ValueError(kind)


def batch(b: int = 4, s: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = tokens.clone()
    prompt = [3, 5, 2, 6, 4, 1][:b]
    pad = [0, 2, 4, 1, 0, 3][:b]
    for i in range(b):
        labels[i, : prompt[i]] = -100
        if pad[i]:
            labels[i, s - pad[i] :] = -100
            tokens[i, s - pad[i] :] = 0
    return tokens, labels


def loss_of(sum_, mean):
    w = torch.arange(1, sum_.shape[0] + 1, dtype=torch.float32)
    return (sum_ * w).sum() + (mean * w.flip(0)).sum()


def reference(model, tokens, labels, **kw):
    logits = model(tokens, **kw)
    if isinstance(logits, list):
        logits = logits[-1]
    return (
        rlhf.get_batch_log_probs(logits, labels),
        rlhf.get_batch_log_probs(logits, labels, return_average_logprobs=True),
    )


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def compare(model, tokens, labels, chunk_size=1024, **kw):
    params = trainable(model)
    ref_sum, ref_mean = reference(model, tokens, labels, **kw)
    g_ref = torch.autograd.grad(loss_of(ref_sum, ref_mean), [p for _, p in params])
    out = decoder_sequence_logprobs(model, tokens, labels, chunk_size=chunk_size, **kw)
    assert out.sum.dtype == torch.float32 and out.num_tokens.dtype == torch.int64
    torch.testing.assert_close(out.sum, ref_sum, **TOL)
    torch.testing.assert_close(out.mean, ref_mean, **TOL)
    torch.testing.assert_close(out.num_tokens, (labels[:, 1:] != -100).sum(1))
    g = torch.autograd.grad(loss_of(out.sum, out.mean), [p for _, p in params])
    nonzero = 0
    for (name, _), a, b in zip(params, g, g_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
        nonzero += bool(a.abs().sum() > 0)
    assert nonzero == len(params)
    return out


@pytest.mark.parametrize("kind", ["untied", "tied", "lora"])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_matches_full_logits(kind, chunk_size):
    model = build(kind)
    tokens, labels = batch()
    compare(model, tokens, labels, chunk_size=chunk_size)


def test_override_is_transparent_and_idempotent():
    model = build("tied")
    tokens, labels = batch()
    keys = list(model.state_dict().keys())
    with torch.no_grad():
        before = model(tokens)
        assert enable_sequence_logprobs(model) is model
        enable_sequence_logprobs(model)
        decoder_sequence_logprobs(model, tokens, labels)
        after = model(tokens)
    assert list(model.state_dict().keys()) == keys
    assert after.shape == (4, 12, VOCAB) and after.dtype == torch.float32
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_enabled_model_deepcopies():
    import copy

    model = enable_sequence_logprobs(build("untied"))
    clone = copy.deepcopy(model)
    assert clone.unembed.module is clone
    tokens, labels = batch()
    with torch.no_grad():
        a = decoder_sequence_logprobs(model, tokens, labels)
        b = decoder_sequence_logprobs(clone, tokens, labels)
        assert clone(tokens).shape == (4, 12, VOCAB)
    torch.testing.assert_close(a.sum, b.sum, atol=0, rtol=0)


def test_request_cleared_when_forward_raises():
    model = build("untied")
    tokens, labels = batch()
    bad = labels.clone()
    bad[0, -1] = VOCAB + 3  # out of vocabulary: fails inside the model's forward
    with pytest.raises((RuntimeError, IndexError)):
        decoder_sequence_logprobs(model, tokens, bad)
    with torch.no_grad():
        assert model(tokens).shape == (4, 12, VOCAB)


def test_empty_row_raises_before_forward():
    model = build("untied")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    tokens, labels = batch()
    labels[2] = -100
    with pytest.raises(ValueError, match=r"empty completion: rows \[2\]"):
        decoder_sequence_logprobs(model, tokens, labels)
    assert not calls


def test_activation_checkpointing_and_hidden_states():
    model = build("untied")
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.output_hidden_states = [1]  # forward then returns [hidden_1, output]
    tokens, labels = batch()
    compare(model, tokens, labels, chunk_size=7)


def test_packed_mask_and_input_pos_forwarded():
    model = build("untied")
    tokens, labels = batch(b=2, s=12)
    # two packed documents per row: block-causal mask, positions restart at 6
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    block = torch.zeros(12, 12, dtype=torch.bool)
    block[:6, :6] = True
    block[6:, 6:] = True
    mask = (causal & block).expand(2, 12, 12).contiguous()
    input_pos = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, 12).contiguous()
    compare(model, tokens, labels, chunk_size=4, mask=mask, input_pos=input_pos)


def test_per_layer_compile():
    # per-layer compile as torchtune's training.compile_model does; aot_eager keeps CPU fast
    model = build("lora")
    for layer in model.layers:
        layer.compile(backend="aot_eager")
    tokens, labels = batch()
    compare(model, tokens, labels, chunk_size=6)


# ----------------------------------------------------------------------------- FSDP2 (gloo)


def test_fsdp2_two_processes(tmp_path):
    """2 gloo ranks, each scores its half of the batch with the sharded model; sums and
    gradients (full_tensor) must match one unsharded process on the whole batch."""
    init_file = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--fsdp-worker", str(r), "2", str(init_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    deadline = time.monotonic() + 180
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("FSDP2 workers timed out")
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
        assert "FSDP2-OK" in out, out


def _fsdp_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokens, labels = batch(b=2 * world, s=12, seed=1)
        lo, hi = rank * 2, rank * 2 + 2
        for variant in ("untied", "tied", "lora", "untied+sharded_output"):
            kind = variant.split("+")[0]
            ref = build(kind)
            ref_out = decoder_sequence_logprobs(ref, tokens, labels, chunk_size=5)
            loss_of(ref_out.sum, ref_out.mean).backward()  # whole batch, one process

            model = build(kind)  # same seed: identical weights
            if kind == "lora":  # AC + shard, in the order torchtune's recipes use
                training.set_activation_checkpointing(
                    model, auto_wrap_policy={TransformerSelfAttentionLayer}
                )
            enable_sequence_logprobs(model)  # before sharding: survives fully_shard
            conditions = [lambda n, m: isinstance(m, TransformerSelfAttentionLayer)]
            if variant.endswith("sharded_output"):
                # custom_sharded_layers: ['output'] in torchtune configs: output is its own FSDP
                # unit, all-gathered per call (per chunk here, and again in recompute)
                conditions.append(lambda n, m: n == "output")
            training.shard_model(
                model,
                conditions,
                cpu_offload=False,
                reshard_after_forward=True,
            )
            assert type(model).__name__.startswith("FSDP")
            # separately sharded output: generic (checkpointed, calls the FSDP module per
            # chunk); otherwise the root's unsharded weight goes through the fused path
            sharded_output = variant.endswith("sharded_output")
            assert type(model.output).__name__.startswith("FSDP") == sharded_output
            paths = []
            model.norm.register_forward_hook(
                lambda m, i, o, paths=paths, model=model: paths.append(
                    _plain_linear(model.output) is not None
                )
            )
            out = decoder_sequence_logprobs(model, tokens[lo:hi], labels[lo:hi], chunk_size=5)
            assert paths == [kind != "lora" and not sharded_output], paths
            # loss over the local half; FSDP2 averages gradients over ranks
            w_all = torch.arange(1, 2 * world + 1, dtype=torch.float32)
            loss = (out.sum * w_all[lo:hi]).sum() + (out.mean * w_all.flip(0)[lo:hi]).sum()
            (loss * world).backward()

            gathered = [torch.empty(2) for _ in range(world)]
            dist.all_gather(gathered, out.sum.detach())
            torch.testing.assert_close(torch.cat(gathered), ref_out.sum.detach(), **TOL)

            ref_params = dict(ref.named_parameters())
            checked = 0
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                assert isinstance(p, DTensor) and p.grad is not None, name
                want = ref_params[name.replace("._checkpoint_wrapped_module", "")].grad
                torch.testing.assert_close(
                    p.grad.full_tensor(),
                    want,
                    atol=2e-5,
                    rtol=1e-5,
                    msg=lambda m, variant=variant, name=name: f"{variant} {name}: {m}",
                )
                checked += 1
            assert checked > 0
            # root params of interest were really sharded and got gradients
            root = {
                "untied": "output.weight",
                "tied": "tok_embeddings.weight",
                "lora": "output.lora_a.weight",
            }[kind]
            assert dict(model.named_parameters())[root].grad is not None
            # without labels the sharded model still returns plain logits
            with torch.no_grad():
                logits = model(tokens[lo:hi])
                torch.testing.assert_close(logits, ref(tokens[lo:hi]), **TOL)
        dist.barrier()
        print(f"FSDP2-OK rank {rank}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--fsdp-worker":
    _fsdp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
