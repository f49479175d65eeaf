"""Tiny random Hugging Face model folders of every supported family, built offline.

:func:`make_family_folder` writes what ``save_pretrained`` writes for a tiny random
``transformers`` model of the family (built from its config class), plus a tokenizer folder:
the bundled tiny byte-level BPE with the family's special tokens and a chat template in the
family's format (ChatML with a default system prompt, Llama 3 headers, Mistral ``[INST]``,
Qwen3 with its ``<think>`` block), so the tests compare with ``transformers``' own forward
and ``apply_chat_template``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set sys = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}"
    "{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
    "{{- '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
QWEN3 = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)

GEMMA = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

PHI3 = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

#: family -> (config class, config kwargs, template, special tokens, bos, eos)
FAMILIES: Dict[str, dict] = {
    "llama3": dict(
        cls="LlamaConfig",
        kw=dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
        ),
        template=LLAMA3,
        specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
    ),
    "qwen2": dict(
        cls="Qwen2Config",
        kw=dict(rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False),
        template=CHATML.replace("default_system", "'You are Qwen, a helpful assistant.'"),
        specials=_CHATML_TOKENS,
        bos=None,
        eos="<|im_end|>",
    ),
    "qwen2_tied": dict(
        cls="Qwen2Config",
        kw=dict(rope_theta=1000000.0, tie_word_embeddings=True),
        template=CHATML.replace("default_system", "'You are Qwen, a helpful assistant.'"),
        specials=_CHATML_TOKENS,
        bos=None,
        eos="<|im_end|>",
    ),
    "qwen3": dict(
        cls="Qwen3Config",
        kw=dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=False),
        template=QWEN3,
        specials=_CHATML_TOKENS + ["<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
    ),
    "mistral": dict(
        cls="MistralConfig",
        kw=dict(rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
        template=MISTRAL,
        specials=["<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
    ),
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig",
        kw=dict(
            rope_theta=1000000.0,
            head_dim=32,
            tie_word_embeddings=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],  # layer 1 is a dense MLP
            initializer_range=0.1,  # routing and experts that matter
        ),
        template=QWEN3,
        specials=_CHATML_TOKENS + ["<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
    ),
    "mixtral": dict(
        cls="MixtralConfig",
        kw=dict(
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            num_local_experts=4,
            num_experts_per_tok=2,
            initializer_range=0.1,
        ),
        template=MISTRAL,
        specials=["<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
    ),
    "gemma2": dict(
        cls="Gemma2Config",
        kw=dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,  # shorter than the rows
            attn_logit_softcapping=5.0,  # small caps: the tanh matters at these scales
            final_logit_softcapping=3.0,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            initializer_range=0.1,
        ),
        template=GEMMA,
        specials=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<end_of_turn>",
    ),
    "gemma3": dict(
        cls="Gemma3TextConfig",
        kw=dict(
            head_dim=32,
            query_pre_attn_scalar=24,  # scores / sqrt(24), not / sqrt(head_dim)
            sliding_window=16,  # the rows are longer: the window is exact inside documents
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
            tie_word_embeddings=True,
            initializer_range=0.1,
        ),
        template=GEMMA,
        specials=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<end_of_turn>",
    ),
    "phi3": dict(
        cls="Phi3Config",
        kw=dict(
            rope_theta=10000.0,
            partial_rotary_factor=0.5,  # Phi-4-mini rotates 3/4 of each head
            sliding_window=None,
            initializer_range=0.1,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),
        template=PHI3,
        specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos=None,
        eos="<|end|>",
    ),
    "smollm2": dict(
        cls="LlamaConfig",
        kw=dict(rope_theta=100000.0, tie_word_embeddings=True),
        template=CHATML.replace(
            "default_system",
            "'You are a helpful AI assistant named SmolLM, trained by Hugging Face'",
        ),
        specials=_CHATML_TOKENS,
        bos="<|im_start|>",
        eos="<|im_end|>",
    ),
}

#: the sizes every family's tiny model shares
DIMS = dict(
    vocab_size=704,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def write_tokenizer_folder(family: str, folder: Path) -> None:
    """The tiny BPE (``models/assets/tiny/tokenizer.json``) with the family's special tokens
    and chat template, as a ``transformers`` tokenizer folder."""
    from tokenizers import AddedToken, Tokenizer

    from torchtune_prefopt.models.tiny import TOKENIZER_JSON

    spec = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(TOKENIZER_JSON))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in spec["specials"]]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": spec["template"],
        "eos_token": spec["eos"],
        "bos_token": spec["bos"],
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def hf_model(family: str, seed: int = 0):
    """A tiny random ``transformers`` model of ``family`` (fp32, eval mode)."""
    import torch
    import transformers

    spec = FAMILIES[family]
    config = getattr(transformers, spec["cls"])(**DIMS, **spec["kw"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # q/k norms and biases are 1 and 0 at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def make_family_folder(family: str, folder: Path, seed: int = 0) -> Path:
    """``save_pretrained`` of :func:`hf_model` plus :func:`write_tokenizer_folder` in
    ``folder`` (created once: a folder with ``config.json`` is reused)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    hf_model(family, seed).save_pretrained(str(folder))
    write_tokenizer_folder(family, folder)
    return folder


def template_ids(hf_tok, messages, **kw):
    """``apply_chat_template``'s token ids (a list, whatever transformers returns)."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def completion_logps_by_transformers(folder: Path, rows, column: str = "chosen") -> list:
    """Summed log-prob of each row's ``column`` completion, by transformers alone (float64;
    an MoE model float32):
    the pair tokenized with apply_chat_template, the completion = what follows the generation
    prompt up to the end-of-turn token (trailing whitespace tokens are not scored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((Path(folder) / "config.json").read_text())
    # transformers 5's MoE experts run grouped matmuls, which have no float64 kernel
    dtype = torch.float32 if "num_experts_per_tok" in config else torch.float64
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    out = []
    for row in rows:
        conv = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row[column]},
        ]
        prompt = template_ids(tok, conv[:1], add_generation_prompt=True)
        full = template_ids(tok, conv)
        while tok.decode(full[-1:]).strip() == "":
            full = full[:-1]
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
        targets = ids[0, 1:]
        token_logps = logp.gather(-1, targets[:, None])[:, 0]
        out.append(token_logps[len(prompt) - 1 :].sum().item())
    return out


def our_model(folder: Path, max_seq_len=None):
    """Our decoder of ``folder`` (``models.hf``) with the folder's weights, eval mode."""
    from torchtune import training

    from torchtune_prefopt.models.hf import hf_checkpointer, hf_decoder

    model = hf_decoder(str(folder), max_seq_len=max_seq_len).eval()
    sd = hf_checkpointer(str(folder), str(Path(folder).parent / "scratch")).load_checkpoint()
    model.load_state_dict(sd[training.MODEL_KEY], strict=True)
    return model
