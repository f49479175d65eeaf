"""Model builders shipped with torchtune-prefopt (tiny, download-free Qwen2-style model)."""

from torchtune_prefopt.models.tiny import (
    TINY_QWEN2,
    TinyQwen2Dims,
    lora_tiny_qwen2,
    make_tiny_hf_checkpoint,
    tiny_hf_checkpointer,
    tiny_hf_config,
    tiny_qwen2,
    tiny_tokenizer,
)

__all__ = [
    "TINY_QWEN2",
    "TinyQwen2Dims",
    "lora_tiny_qwen2",
    "make_tiny_hf_checkpoint",
    "tiny_hf_checkpointer",
    "tiny_hf_config",
    "tiny_qwen2",
    "tiny_tokenizer",
]
