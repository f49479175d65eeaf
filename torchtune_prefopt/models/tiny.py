"""A tiny Qwen2-style model and tokenizer that need no download.

Everything here is built from files shipped in the package (``assets/tiny``) or generated
locally and deterministically:

* :func:`tiny_tokenizer`: torchtune's real Qwen2.5 tokenizer (ChatML template) over a small
  byte-level BPE vocab; the Qwen2.5 special tokens sit right after the small vocab.
* :func:`tiny_qwen2` / :func:`lora_tiny_qwen2`: torchtune ``qwen2`` / ``lora_qwen2``
  component builders with the dims in :data:`TINY_QWEN2`.
* :func:`make_tiny_hf_checkpoint`: a random ``transformers`` ``Qwen2ForCausalLM`` with the
  same dims, saved in HF format (safetensors + config + tokenizer files).
* :func:`tiny_hf_checkpointer`: makes sure that checkpoint exists, then returns torchtune's
  ``FullModelHFCheckpointer`` over it.

The assets are produced by ``scripts/make_tiny_assets.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
VOCAB_FILE = ASSETS_DIR / "vocab.json"
MERGES_FILE = ASSETS_DIR / "merges.txt"
TOKENIZER_JSON = ASSETS_DIR / "tokenizer.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")

# Written last into a generated checkpoint directory: its presence (with matching content)
# means the checkpoint is complete.
_MARKER = "tiny_checkpoint.json"
# 2: + tokenizer_config.json (HF tools read the EOS from it); 3: config.json names its
# architecture (TRL, vLLM and AutoModel read `architectures`)
_MARKER_VERSION = 3


@dataclass(frozen=True)
class TinyQwen2Dims:
    """The one place that defines the tiny model's dims."""

    # = tokenizer size (645 BPE + 22 Qwen2.5 special tokens = 667) rounded up to 64.
    vocab_size: int = 704
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    embed_dim: int = 64
    intermediate_dim: int = 128
    max_seq_len: int = 512
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


TINY_QWEN2 = TinyQwen2Dims()


# --------------------------------------------------------------------------- tokenizer


def tiny_tokenizer(max_seq_len: Optional[int] = None, **kwargs: Any):
    """torchtune Qwen2.5 tokenizer over the bundled tiny vocab (ChatML template).

    ``kwargs`` go to :func:`torchtune.models.qwen2_5.qwen2_5_tokenizer` (e.g.
    ``prompt_template``).
    """
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    return qwen2_5_tokenizer(
        path=str(VOCAB_FILE),
        merges_file=str(MERGES_FILE),
        special_tokens_path=str(TOKENIZER_JSON),
        max_seq_len=max_seq_len,
        **kwargs,
    )


def tiny_special_tokens() -> dict:
    """Special token -> id, as recorded in the bundled tokenizer.json."""
    data = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in data["added_tokens"]}


def tiny_tokenizer_size() -> int:
    """Total number of token ids used by the tiny tokenizer (BPE vocab + specials)."""
    vocab = json.loads(VOCAB_FILE.read_text(encoding="utf-8"))
    return max(max(vocab.values()), max(tiny_special_tokens().values())) + 1


# --------------------------------------------------------------------------- models


def _qwen2_kwargs() -> dict:
    d = TINY_QWEN2
    return dict(
        vocab_size=d.vocab_size,
        num_layers=d.num_layers,
        num_heads=d.num_heads,
        num_kv_heads=d.num_kv_heads,
        embed_dim=d.embed_dim,
        intermediate_dim=d.intermediate_dim,
        max_seq_len=d.max_seq_len,
        norm_eps=d.norm_eps,
        rope_base=d.rope_base,
        tie_word_embeddings=d.tie_word_embeddings,
    )


def tiny_qwen2():
    """Tiny torchtune Qwen2 ``TransformerDecoder`` (random init; load weights separately)."""
    from torchtune.models.qwen2._component_builders import qwen2

    return qwen2(**_qwen2_kwargs())


def lora_tiny_qwen2(
    lora_attn_modules: Optional[List[str]] = None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
):
    """Tiny Qwen2 with LoRA adapters (torchtune ``lora_qwen2``).

    ``lora_attn_modules`` defaults to ``["q_proj", "v_proj"]``.
    """
    from torchtune.models.qwen2._component_builders import lora_qwen2

    if lora_attn_modules is None:
        lora_attn_modules = ["q_proj", "v_proj"]
    return lora_qwen2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **_qwen2_kwargs(),
    )


# --------------------------------------------------------------------------- HF checkpoint


def tiny_hf_config():
    """``transformers.Qwen2Config`` with the same dims/rope/eps as :func:`tiny_qwen2`."""
    from transformers import Qwen2Config

    d = TINY_QWEN2
    special = tiny_special_tokens()
    kwargs = dict(
        vocab_size=d.vocab_size,
        hidden_size=d.embed_dim,
        intermediate_size=d.intermediate_dim,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads,
        max_position_embeddings=d.max_seq_len,
        rms_norm_eps=d.norm_eps,
        tie_word_embeddings=d.tie_word_embeddings,
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    # transformers >= 5 takes rope_parameters; 4.x takes rope_theta.
    import inspect

    params = inspect.signature(Qwen2Config.__init__).parameters
    if "rope_parameters" in params:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": d.rope_base}
    else:
        kwargs["rope_theta"] = d.rope_base
    return Qwen2Config(**kwargs)


HF_TOKENIZER_CONFIG = "tokenizer_config.json"
#: ChatML, as torchtune's Qwen2.5 tokenizer formats messages (no default system prompt)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_tokenizer_config() -> dict:
    """``tokenizer_config.json`` for Hugging Face tools loading a tiny checkpoint: the EOS that
    ends an answer is ``<|im_end|>`` (the fast tokenizer's default would be
    ``<|endoftext|>``, the padding token), no BOS, and the ChatML chat template."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": TINY_QWEN2.max_seq_len,
        "chat_template": _CHATML,
        "clean_up_tokenization_spaces": False,
    }


def _marker_content(seed: int) -> dict:
    import hashlib

    tokenizer_sha256 = {
        name: hashlib.sha256((ASSETS_DIR / name).read_bytes()).hexdigest()
        for name in TOKENIZER_FILES
    }
    return {
        "version": _MARKER_VERSION,
        "seed": int(seed),
        "dims": asdict(TINY_QWEN2),
        "tokenizer_sha256": tokenizer_sha256,
    }


def _weight_files(checkpoint_dir: Path) -> List[str]:
    return sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))


def _is_complete(checkpoint_dir: Path, seed: int) -> bool:
    marker = checkpoint_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        content = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if content != json.loads(json.dumps(_marker_content(seed))):
        return False
    needed = ["config.json", HF_TOKENIZER_CONFIG, *TOKENIZER_FILES]
    return all((checkpoint_dir / f).is_file() for f in needed) and bool(
        _weight_files(checkpoint_dir)
    )


def _write_checkpoint(target: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    config = tiny_hf_config()
    # Deterministic init from the seed without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        # HF zero-inits biases and ones-inits norms; randomise them a little so the
        # checkpoint exercises every weight mapping (and stays a sane training init).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, config.initializer_range)
                elif "norm" in name:
                    p.add_(torch.randn_like(p), alpha=0.1)
    model = model.to(torch.float32).eval()
    # safetensors + config.json directly, not save_pretrained: transformers 5 writes nothing
    # on a rank other than 0 once torch.distributed is initialised, and every rank of a
    # first `--nproc_per_node N` run builds its own copy of the checkpoint
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # what save_pretrained would write
    model.config.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        shutil.copyfile(ASSETS_DIR / name, target / name)
    (target / HF_TOKENIZER_CONFIG).write_text(json.dumps(hf_tokenizer_config(), indent=2) + "\n")
    (target / _MARKER).write_text(json.dumps(_marker_content(seed), indent=2) + "\n")


def make_tiny_hf_checkpoint(checkpoint_dir: Union[str, os.PathLike], seed: int = 0) -> Path:
    """Create (once) a random tiny Qwen2 checkpoint in HF format in ``checkpoint_dir``.

    Deterministic in ``seed``. Written into a temporary sibling directory and renamed into
    place, so concurrent callers (e.g. several ranks) and interrupted runs never leave a
    half-written checkpoint. If a complete checkpoint with the same seed and dims already
    exists, nothing is written. A directory previously generated here with another seed or
    older dims is replaced; any other non-empty directory raises ``ValueError``.

    Returns the checkpoint directory.
    """
    target = Path(checkpoint_dir).expanduser().resolve()
    if _is_complete(target, seed):
        return target
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"tiny checkpoint_dir {target} exists and is not a directory")
        if any(target.iterdir()) and not (target / _MARKER).exists():
            raise ValueError(
                f"tiny checkpoint_dir {target} is not empty and was not created by "
                "make_tiny_hf_checkpoint; use an empty or new directory"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_checkpoint(tmp, seed)
        if target.exists() and (target / _MARKER).exists() and not _is_complete(target, seed):
            # Our own stale checkpoint (other seed/dims): move it aside, then replace.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, stale / "ckpt")
            except OSError:
                pass  # someone else replaced it concurrently
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic; also replaces an empty directory
        except OSError:
            # Lost a race with a concurrent writer (target is now non-empty).
            if not _is_complete(target, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target, seed):
        raise RuntimeError(f"failed to create a complete tiny checkpoint in {target}")
    return target


def tiny_hf_checkpointer(
    checkpoint_dir: Union[str, os.PathLike],
    output_dir: Union[str, os.PathLike],
    seed: int = 0,
    **kwargs: Any,
):
    """torchtune ``FullModelHFCheckpointer`` over the tiny checkpoint (created on first use).

    ``kwargs`` go to ``FullModelHFCheckpointer`` (e.g. ``should_load_recipe_state``).
    """
    from torchtune.training import FullModelHFCheckpointer

    ckpt = make_tiny_hf_checkpoint(checkpoint_dir, seed=seed)
    kwargs.setdefault("checkpoint_files", _weight_files(ckpt))
    kwargs.setdefault("model_type", "QWEN2")
    return FullModelHFCheckpointer(checkpoint_dir=str(ckpt), output_dir=str(output_dir), **kwargs)
