"""Any Hugging Face decoder from its folder: ``model_dir`` is enough.

* :func:`hf_decoder` / :func:`lora_hf_decoder`: the ``model`` (architecture and options from
  ``config.json``, :mod:`.spec`; torchtune modules, :mod:`.builder`);
* :func:`hf_checkpointer`: the ``checkpointer`` (weights mapped to and from HF names by one
  table, :mod:`.weights`; exports load in ``transformers``);
* :func:`hf_tokenizer`: the ``tokenizer`` with the folder's own chat template.

Packaged configs: ``hf/<loss>`` and ``hf/<loss>_lora``:
``tune run prefopt_distributed --config hf/dpo model_dir=<folder>``.
"""

from torchtune_prefopt.models.hf.builder import hf_decoder, lora_hf_decoder
from torchtune_prefopt.models.hf.checkpointer import HFFolderCheckpointer, hf_checkpointer
from torchtune_prefopt.models.hf.spec import SUPPORTED_ARCHITECTURES, DecoderSpec, read_spec
from torchtune_prefopt.models.hf.tokenizer import HFChatTokenizer, hf_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DecoderSpec",
    "HFChatTokenizer",
    "HFFolderCheckpointer",
    "hf_checkpointer",
    "hf_decoder",
    "hf_tokenizer",
    "lora_hf_decoder",
    "read_spec",
]
