"""One process pays no sharding cost: the recipe does not wrap its models in FSDP2 when one
process holds every weight anyway (``models.build.shards_model``), and that changes no number:
the plain model's log-probs and gradients equal the FSDP2-wrapped one's bit for bit (a
one-rank all-gather / reduce-scatter is a copy). The 1-vs-2-process equality tests
(``test_recipe_e2e``, ``test_loss_terms_recipe``, ``test_kto_distributed``) compare the plain
one-process run with the sharded two-process run."""

from __future__ import annotations

import pytest
import torch

from tune_harness import recipe_in_process, synthetic_rows, tiny_config, write_jsonl


def test_shards_model_by_world_size():
    from torchtune_prefopt.models.build import shards_model

    assert [shards_model(n, False) for n in (1, 2, 8)] == [False, True, True]
    assert shards_model(1, True)  # fsdp_cpu_offload is an FSDP2 feature


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def test_plain_model_equals_the_fsdp2_model_bitwise(tmp_path):
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.tensor import DTensor

    from torchtune_prefopt.data import PreferenceCollator, preference_dataset
    from torchtune_prefopt.models.build import ModelPlacement, build_model
    from torchtune_prefopt.models.tiny import tiny_hf_checkpointer, tiny_tokenizer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")
    sd = tiny_hf_checkpointer(tmp_path / "base", tmp_path / "out").load_checkpoint()["model"]
    data = write_jsonl(tmp_path / "rows.jsonl", synthetic_rows(4))
    tok = tiny_tokenizer(max_seq_len=64)
    ds = preference_dataset(tok, source="json", data_files=str(data))
    batch = PreferenceCollator(paired=True, pad_id=tok.pad_id, packing=None)(
        [ds[i] for i in range(4)]
    )
    model_cfg = OmegaConf.create({"_component_": "torchtune_prefopt.models.tiny.tiny_qwen2"})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        results = {}
        for shard in (False, True):
            placement = ModelPlacement(torch.device("cpu"), torch.float32, shard=shard)
            model = build_model(model_cfg, sd, placement, source="tiny", trainable=True)
            assert bool(_fsdp_modules(model)) is shard
            assert any(isinstance(p, DTensor) for p in model.parameters()) is shard
            logps = batch.logps(model)
            (logps.sum.double() * torch.arange(1, 9, dtype=torch.float64)).sum().backward()
            grads = {
                n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                for n, p in model.named_parameters()
            }
            results[shard] = (logps.sum.detach().clone(), grads)
    finally:
        dist.destroy_process_group()
    (plain_lp, plain_g), (fsdp_lp, fsdp_g) = results[False], results[True]
    assert torch.equal(plain_lp, fsdp_lp), (plain_lp, fsdp_lp)
    assert sorted(plain_g) == sorted(fsdp_g)
    for name in plain_g:
        assert torch.equal(plain_g[name], fsdp_g[name]), name
    assert any(g.abs().sum() > 0 for g in plain_g.values())


def test_one_process_recipe_holds_plain_models(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tiny_config(tmp_path, "dpo", rows=8))
    with recipe_in_process(cfg) as recipe:
        assert recipe.world_size == 1
        assert not _fsdp_modules(recipe._model)
        assert not _fsdp_modules(recipe._reference.model)
