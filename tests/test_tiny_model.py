"""Tiny download-free model/tokenizer: assets, tokenizer, HF checkpoint <-> torchtune."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from torchtune_prefopt.models import tiny
from torchtune_prefopt.models.tiny import (
    TINY_QWEN2,
    lora_tiny_qwen2,
    make_tiny_hf_checkpoint,
    tiny_hf_checkpointer,
    tiny_qwen2,
    tiny_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_assets", REPO / "scripts" / "make_tiny_assets.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "base", seed=0)


# ----------------------------------------------------------------------------- assets


def test_assets_are_up_to_date_and_deterministic(tmp_path):
    script = _load_script()
    script.write_assets(tmp_path)
    for rel in script.ASSET_FILES:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), rel


def test_script_constants_match_torchtune():
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    script = _load_script()
    assert script.PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    assert script.SPECIAL_TOKENS == list(QWEN2_5_SPECIAL_TOKENS)


def test_asset_files_are_small():
    for name in tiny.TOKENIZER_FILES:
        assert (tiny.ASSETS_DIR / name).stat().st_size < 100_000


# ----------------------------------------------------------------------------- tokenizer


def test_vocab_size_and_special_ids(tokenizer):
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    vocab = json.loads(tiny.VOCAB_FILE.read_text())
    assert 500 <= len(vocab) <= 1000
    assert sorted(vocab.values()) == list(range(len(vocab)))
    # The Qwen2.5 special tokens come right after the BPE vocab, in torchtune's order.
    assert list(tokenizer.special_tokens) == list(QWEN2_5_SPECIAL_TOKENS)
    assert list(tokenizer.special_tokens.values()) == list(
        range(len(vocab), len(vocab) + len(QWEN2_5_SPECIAL_TOKENS))
    )
    total = tiny.tiny_tokenizer_size()
    assert total == len(vocab) + len(QWEN2_5_SPECIAL_TOKENS)
    assert TINY_QWEN2.vocab_size == -(-total // 64) * 64
    assert max(tokenizer.special_tokens.values()) < TINY_QWEN2.vocab_size
    assert tokenizer.eos_id == tokenizer.special_tokens["<|im_end|>"]
    assert tokenizer.pad_id == tokenizer.special_tokens["<|endoftext|>"]


TEXTS = [
    "Hi! What kind of thing is an owl?",
    "An owl is a bird. Happy to help!",
    "Completely unrelated text: naïve café, 日本語, emoji 🙂, tabs\tand\nnew lines.",
    "  leading spaces and trailing  ",
    "don't I'll we've 12345 3.14",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip_and_matches_hf_tokenizers(tokenizer, text):
    from tokenizers import Tokenizer

    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < TINY_QWEN2.vocab_size for i in ids)
    hf = Tokenizer.from_file(str(tiny.TOKENIZER_JSON))
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == text


def test_synthetic_words_are_compact(tokenizer):
    # Trained on the synthetic text: common words are single tokens.
    for word in [" owl", " bird", " instrument", " Happy", " help"]:
        assert len(tokenizer.encode(word, add_bos=False, add_eos=False)) == 1, word


def test_chatml_template_applied(tokenizer):
    from torchtune.data import Message

    msgs = [
        Message("system", "You are a helpful assistant.", masked=True),
        Message("user", "What is an owl?", masked=True),
        Message("assistant", "An owl is a bird."),
    ]
    ids, mask = tokenizer.tokenize_messages(msgs)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is an owl?<|im_end|>\n"
        "<|im_start|>assistant\nAn owl is a bird.<|im_end|>"
    )
    assert ids[0] == tokenizer.special_tokens["<|im_start|>"]
    assert ids[-1] == tokenizer.eos_id
    assert ids.count(tokenizer.eos_id) == 3
    assert len(mask) == len(ids) and mask[0] and not mask[-1]


def test_tokenizer_max_seq_len():
    tok = tiny_tokenizer(max_seq_len=16)
    assert tok.max_seq_len == 16


# ----------------------------------------------------------------------------- models


def test_model_dims():
    model = tiny_qwen2()
    d = TINY_QWEN2
    assert model.tok_embeddings.weight.shape == (d.vocab_size, d.embed_dim)
    assert model.output.weight.shape == (d.vocab_size, d.embed_dim)
    assert len(model.layers) == d.num_layers
    attn = model.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 16)
    assert model.layers[0].mlp.w1.out_features == d.intermediate_dim
    assert model.max_seq_len == d.max_seq_len
    assert attn.pos_embeddings.base == d.rope_base
    assert model.norm.eps == d.norm_eps


def test_hf_config_matches_dims():
    cfg = tiny.tiny_hf_config()
    d = TINY_QWEN2
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        d.vocab_size,
        d.embed_dim,
        d.intermediate_dim,
    )
    assert cfg.num_hidden_layers == d.num_layers
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (d.num_heads, d.num_kv_heads)
    assert cfg.rms_norm_eps == d.norm_eps
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == d.rope_base
    assert cfg.tie_word_embeddings is False


def test_checkpoint_loads_strict_and_logits_match_transformers(ckpt_dir, tmp_path, tokenizer):
    from torchtune.data import Message
    from transformers import Qwen2ForCausalLM

    ckpt = tiny_hf_checkpointer(ckpt_dir, tmp_path / "out")
    state = ckpt.load_checkpoint()["model"]
    model = tiny_qwen2().eval()
    model.load_state_dict(state, strict=True)

    hf = Qwen2ForCausalLM.from_pretrained(str(ckpt_dir), attn_implementation="eager").eval()
    ids, _ = tokenizer.tokenize_messages(
        [Message("user", "What kind of thing is a harp?"), Message("assistant", "An instrument.")]
    )
    ids = ids[:16]
    assert len(ids) == 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat(
        [torch.tensor([ids]), torch.randint(0, TINY_QWEN2.vocab_size, (1, 16), generator=g)]
    )
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 16, TINY_QWEN2.vocab_size)
    assert ours.std() > 0.05  # not a degenerate (all-zero) model
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_lora_model_loads_base_weights(ckpt_dir, tmp_path):
    state = tiny_hf_checkpointer(ckpt_dir, tmp_path / "out").load_checkpoint()["model"]
    lora = lora_tiny_qwen2()
    missing, unexpected = lora.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all("lora_" in k for k in missing)
    assert sum("lora_a" in k for k in missing) == 2 * TINY_QWEN2.num_layers  # q, v
    base = tiny_qwen2()
    base.load_state_dict(state)
    x = torch.randint(0, TINY_QWEN2.vocab_size, (1, 10))
    with torch.no_grad():  # LoRA B is zero-initialised: same function at start
        torch.testing.assert_close(lora.eval()(x), base.eval()(x), atol=1e-5, rtol=1e-5)


def test_checkpoint_contents_idempotent_and_deterministic(ckpt_dir, tmp_path):
    files = sorted(os.listdir(ckpt_dir))
    assert {"config.json", "model.safetensors", *tiny.TOKENIZER_FILES} <= set(files)
    assert not [f for f in os.listdir(ckpt_dir.parent) if ".tmp-" in f]
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == TINY_QWEN2.vocab_size
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]  # tools (TRL, vLLM) read it

    weights = ckpt_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert make_tiny_hf_checkpoint(ckpt_dir, seed=0) == ckpt_dir
    assert weights.stat().st_mtime_ns == mtime  # skipped: already complete

    again = make_tiny_hf_checkpoint(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == weights.read_bytes()
    other = make_tiny_hf_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    # Our own directory with another seed is regenerated in place.
    make_tiny_hf_checkpoint(tmp_path / "other", seed=0)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == weights.read_bytes()


def test_checkpoint_refuses_foreign_dir_and_fills_empty_dir(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not empty"):
        make_tiny_hf_checkpoint(foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_tiny_hf_checkpoint(empty) / "model.safetensors").is_file()
