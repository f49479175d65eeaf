"""The one key table of ``prefopt_distributed`` (``training/recipe_config.py``): what is
derived from it agrees with it, and its defaults and checks behave as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from torchtune_prefopt import _config
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training import recipe_config as rc

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny(*overrides):
    return _config.load_config(["--config", "tiny/dpo", *overrides])


def test_architecture_key_table_is_generated_from_the_table():
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("<!-- config-keys:begin -->\n", 1)[1].split("\n<!-- config-keys:end -->")[0]
    assert table == rc.key_table_markdown()
    # one row per key, every key of the table
    assert len(table.splitlines()) == 2 + len(rc.RECIPE_KEYS)


def test_identity_keys_come_from_the_table():
    assert ckpt.IDENTITY_KEYS == rc.identity_keys()
    assert set(rc.content_identity_keys()) == {
        "dataset",
        "tokenizer",
        "checkpointer",
        "ref_checkpointer",
    }
    assert set(rc.content_identity_keys()) <= set(ckpt.IDENTITY_KEYS)
    assert {"loss", "optimizer", "seed", "reference.quantization"} <= set(ckpt.IDENTITY_KEYS)
    assert "output_dir" not in ckpt.IDENTITY_KEYS and "compile" not in ckpt.IDENTITY_KEYS


def test_defaults_fill_absent_and_null_keys_but_seed_null_stays_random():
    s = rc.read_settings(OmegaConf.create({"output_dir": "x"}))
    assert (s.seed, s.log_every_n_steps, s.logprobs_chunk_size) == (0, 1, 1024)
    assert (s.compile, s.fsdp_reshard_after_forward, s.nonfinite, s.dtype) == (
        False,
        True,
        "stop",
        "fp32",
    )
    assert s.reference_quantization is None and s.reference_precompute is False
    assert s.metric_logger is None and s.batch_size is None  # required keys have no default
    s = rc.read_settings(OmegaConf.create({"seed": None, "log_every_n_steps": None}))
    assert s.seed is None and s.log_every_n_steps == 1


def test_null_flag_is_an_error_and_absent_flag_is_its_default():
    rc.validate_config(_tiny(), local=False)
    with pytest.raises(PrefOptUserError, match=r"^compile must be true or false, got None$"):
        rc.validate_config(_tiny("compile=null"), local=False)
    with pytest.raises(PrefOptUserError, match=r"^seed must be an integer >= 0"):
        rc.validate_config(_tiny("seed=-1"), local=False)
    assert rc.validate_config(_tiny("seed=null"), local=False).seed is None


def test_unknown_key_hint_is_shared_by_both_recipes():
    with pytest.raises(
        PrefOptUserError, match=r"unknown config key 'bacth_size' \(did you mean 'batch_size'\?\)"
    ):
        rc.validate_config(OmegaConf.merge(_tiny(), {"bacth_size": 2}), local=False)
    err = rc.unknown_key_error("heldot", ["heldout", "losses"], "compare.")
    assert str(err) == "unknown config key 'compare.heldot' (did you mean 'heldout'?)"


def test_identity_ignores_paths_outside_the_table_and_takes_effective_values():
    content = {k: f"digest-of-{k}" for k in rc.content_identity_keys()}  # what the recipe hashes
    a = rc.identity_digests(_tiny("output_dir=/tmp/a"), content)
    b = rc.identity_digests(
        _tiny("output_dir=/tmp/b", "dataset.data_files=/elsewhere.jsonl"), content
    )
    assert a == b  # paths are not the identity; the content digests are
    assert (
        rc.identity_digests(_tiny(), {**content, "dataset": "other rows"})["dataset"]
        != a["dataset"]
    )
    c = rc.identity_digests(_tiny("reference.quantization=int8"), content)
    assert c["reference.quantization"] != a["reference.quantization"]
    # a LoRA run ignores the quantization: the plan's effective None is what the identity holds
    d = rc.identity_digests(
        _tiny("reference.quantization=int8"), {**content, "reference.quantization": None}
    )
    assert d == a
