"""Any Hugging Face decoder from its folder (``models.hf``), family by family, against
``transformers`` itself.

For each family (Llama 3.x with ``rope_scaling`` llama3 and tied embeddings, Qwen2 untied and
tied with q/k/v biases, Qwen3 with q/k norms and its own head_dim, Mistral, SmolLM2-style
Llama with plain RoPE theta 1e5) a tiny random ``transformers`` model saved with
``save_pretrained`` plus a tokenizer folder with the family's chat template
(``tests/hf_families.py``):

* our logits equal ``transformers``' (fp32, 1e-5), and a wrong RoPE setting does not (the
  comparison can fail);
* our prompt/completion split equals ``apply_chat_template``'s tokens;
* ``tune run prefopt_distributed --config hf/dpo model_dir=<folder>``: step-1 ``logps/chosen``
  equals the summed log-prob ``transformers`` computes for the same pairs tokenized with
  ``apply_chat_template``; 2 processes (FSDP2) equal 1 step by step and in the final weights;
  at a negligible learning rate the exported folder's logits (loaded by ``transformers``) equal
  the input folder's, tied weights stay tied and the tokenizer files travel along.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import List

import pytest
import torch
from hf_families import (
    DIMS,
    FAMILIES,
    completion_logps_by_transformers,
    make_family_folder,
    our_model,
    template_ids,
)

from torchtune_prefopt.models.hf.spec import RopeSpec
from tune_harness import (
    CPU_FP32,
    NO_EVAL,
    RunPool,
    RunSpec,
    assert_same_training,
    assert_steps_match,
    load_weights,
    run_recipe,
    step_metrics,
    synthetic_rows,
    uses_runs,
    wanted_runs,
    write_jsonl,
)

ROWS, BATCH = 4, 2  # two optimizer steps

COMMON = (
    *CPU_FP32,
    "optimizer.fused=false",
    "dataset.source=json",
    "dataset.split=train",
    "eval_dataset=null",
    "shuffle=false",
    "gradient_accumulation_steps=1",
    "lr_scheduler=null",
    "save_every_n_steps=null",
    "log_every_n_steps=1",
)

SPECS = {}
for _fam in FAMILIES:
    SPECS[f"{_fam}-1p"] = RunSpec(f"{_fam}-1p", "hf/dpo", ("optimizer.lr=1e-3",), tags=(_fam,))
    SPECS[f"{_fam}-2p"] = RunSpec(
        f"{_fam}-2p", "hf/dpo", ("optimizer.lr=1e-3",), nproc=2, tags=(_fam,)
    )
    SPECS[f"{_fam}-lr0"] = RunSpec(
        f"{_fam}-lr0", "hf/dpo", ("optimizer.lr=1e-30", "max_steps_per_epoch=1"), tags=(_fam,)
    )
SPECS["qwen3-ac-compile"] = RunSpec(
    "qwen3-ac-compile",
    "hf/dpo",
    ("optimizer.lr=1e-3", "enable_activation_checkpointing=true", "compile=true"),
    env=(("TORCH_COMPILE_BACKEND", "aot_eager"),),
    tags=("qwen3",),
)
for _fam in ("qwen3", "qwen3_moe", "mixtral"):
    SPECS[f"{_fam}-lora"] = RunSpec(
        f"{_fam}-lora",
        "hf/dpo_lora",
        ("optimizer.lr=1e-2", "model.lora_rank=4", "model.lora_alpha=8"),
        tags=(_fam,),
    )
for _layout in ("packed", "padded"):
    SPECS[f"qwen3_moe-aux-{_layout}"] = RunSpec(
        f"qwen3_moe-aux-{_layout}",
        "hf/dpo",
        (
            "optimizer.lr=1e-3",
            "router_aux_loss_coef=0.01",
            f"packed={_layout == 'packed'}",
            f"share_prompt={_layout == 'packed'}",
        ),
        tags=("qwen3_moe",),
    )
#: LoRA targets of hf/dpo_lora (attention + MLP; an MoE: every expert, never the router) and
#: the number of adapted projections in the two layers
LORA_TARGETS = {
    "qwen3": ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 14),
    # layer 0: 4 attention + 4 experts x 3; layer 1 (mlp_only_layers): 4 + 3
    "qwen3_moe": (
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        23,
    ),
    "mixtral": ({"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}, 32),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families")
    return {fam: make_family_folder(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hf_data") / "pairs.jsonl", synthetic_rows(ROWS))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, folders, pairs_file):
    root = tmp_path_factory.mktemp("hf_runs")

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        return [
            *COMMON,
            f"dataset.data_files={pairs_file}",
            f"batch_size={BATCH // spec.nproc}",
            f"model_dir={folders[spec.tags[0]]}",
            *spec.overrides,
            f"output_dir={out_dir}",
        ]

    pool = RunPool(root, SPECS, overrides)
    for key in sorted(wanted_runs(request), key=lambda k: "2p" not in k):
        pool.submit(key)
    yield pool
    pool.close()


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(folders, family):
    ids = torch.randint(0, DIMS["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    expected = _hf_logits(folders[family], ids)
    with torch.no_grad():
        ours = our_model(folders[family])(ids)
        # packed rows: positions restart per document (the recipe's packed layout)
        pos = torch.cat([torch.arange(40), torch.arange(56)])[None].expand(2, -1)
        packed_second = our_model(folders[family])(ids, input_pos=pos)[:, 40:]
    # fp32 rounding: 1e-5 of the largest logit (0.0 for every family but Gemma 3, whose
    # query_pre_attn_scalar scales q before SDPA: 1.5e-5 on logits up to 7.8)
    assert (ours - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    # the second document at positions 0.. sees the whole row (no mask here) but RoPE
    # restarts: it must differ from the unpacked logits, proving input_pos reaches RoPE
    assert (packed_second - expected[:, 40:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_with_kv_cache_equals_transformers(folders, family):
    """The comparison's generation (with and without the KV cache, a left-padded batch whose
    prompts contain the pad id) on our model equals greedy decoding by transformers' own
    forward on each prompt alone, token for token."""
    from transformers import AutoModelForCausalLM

    from torchtune_prefopt.compare.generation import generate_completions

    prompt = [
        5,
        17,
        42,
        9,
        33,
        2,
        71,
        8,
        15,
        99,
        120,
        6,
        64,
        3,
        12,
        77,
        31,
        50,
        4,
        23,
    ]  # > 16: Gemma 3's window
    # a second, shorter prompt: left-padded in the batch; pad_id 2 also occurs in both prompts
    # (as ChatML's <|im_end|> is SmolLM2's pad token) and must stay visible
    prompts = [prompt, prompt[3:]]
    hf = AutoModelForCausalLM.from_pretrained(str(folders[family]), dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(ids[len(p) :])
    model = our_model(folders[family], max_seq_len=64)
    for kv_cache in (True, False):
        got = generate_completions(
            model, prompts, max_new_tokens=6, stop_tokens=[], pad_id=2, device=torch.device("cpu"),
            dtype=torch.float32, kv_cache=kv_cache, batch_size=2,
        )  # fmt: skip
        assert got == expected, (family, kv_cache)


def test_wrong_rope_setting_would_be_caught(folders):
    """Negative control: the llama3 family with its rope_scaling dropped (the silent mistake
    of picking a builder by hand) differs from transformers by far more than 1e-5."""
    import dataclasses

    from torchtune import training

    from torchtune_prefopt.models.hf import hf_checkpointer
    from torchtune_prefopt.models.hf.builder import build_decoder
    from torchtune_prefopt.models.hf.spec import RopeSpec, read_spec

    folder = folders["llama3"]
    spec = read_spec(folder)
    assert spec.rope.rope_type == "llama3" and spec.rope.factor == 8.0
    wrong = dataclasses.replace(spec, rope=RopeSpec(theta=spec.rope.theta))
    model = build_decoder(wrong, 256).eval()
    model.load_state_dict(
        hf_checkpointer(str(folder), str(folder.parent / "s")).load_checkpoint()[training.MODEL_KEY]
    )
    ids = torch.randint(0, DIMS["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(folder, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "family, part, mistake",
    [
        ("qwen3_moe", "moe", {"norm_topk_prob": False}),  # the weights not renormalised
        ("qwen3_moe", "moe", {"top_k": 1}),
        ("qwen3_moe", "moe", {"sparse_layers": (True, True)}),  # mlp_only_layers ignored
        ("mixtral", "moe", {"top_k": 3}),
        ("gemma3", "gemma", {"layer_windows": (None, None)}),  # no sliding window
        ("gemma3", "gemma", {"query_scale": 32.0}),  # the default 1 / sqrt(head_dim)
        ("gemma3", "gemma", {"local_rope": RopeSpec(theta=1000000.0)}),  # one RoPE for all
        ("phi3", "rope", {"partial": 1.0}),  # every dimension rotated
        ("gemma2", "gemma", {"attn_softcap": None}),  # scores not capped
        ("gemma2", "gemma", {"final_softcap": None}),  # logits not capped
    ],
)
def test_wrong_moe_or_gemma_setting_would_be_caught(folders, family, part, mistake):
    """Negative control for the MoE, Gemma 3 and Phi-3 families: one setting read wrong changes the
    logits by far more than 1e-5 (or the weights do not fit)."""
    import dataclasses

    from torchtune import training

    from torchtune_prefopt.models.hf import hf_checkpointer
    from torchtune_prefopt.models.hf.builder import build_decoder
    from torchtune_prefopt.models.hf.spec import read_spec

    folder = folders[family]
    spec = read_spec(folder)
    wrong = dataclasses.replace(spec, **{part: dataclasses.replace(getattr(spec, part), **mistake)})
    model = build_decoder(wrong, 256).eval()
    sd = hf_checkpointer(str(folder), str(folder.parent / "s")).load_checkpoint()
    try:
        model.load_state_dict(sd[training.MODEL_KEY])
    except RuntimeError:
        assert "sparse_layers" in mistake
        return
    ids = torch.randint(0, DIMS["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - _hf_logits(folder, ids)).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"architectures": ["GemmaForCausalLM"]},
            "architectures 'GemmaForCausalLM' is not supported",
        ),
        (
            {"architectures": ["Phi3ForCausalLM"], "rope_parameters": {"rope_type": "longrope"}},
            "rope type 'longrope' is not supported",
        ),
        ({"architectures": ["OlmoForCausalLM"]}, "supported: LlamaForCausalLM, MistralForCausalLM"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e5}},
            "rope type 'yarn' is not supported",
        ),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope type 'dynamic' is not supported",
        ),
        ({"hidden_act": "relu2"}, "hidden_act 'relu2' is not supported"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        ({"architectures": ["GptOssForCausalLM"]}, "gpt-oss has attention sinks"),
        ({"architectures": ["DeepseekV3ForCausalLM"]}, "multi-head latent attention"),
        (
            {"architectures": ["Gemma3ForConditionalGeneration"]},
            "architectures 'Gemma3ForConditionalGeneration' is not supported",
        ),
        (
            {"architectures": ["LlavaForConditionalGeneration"]},
            "a multimodal model; only the text decoders",
        ),
        ({"architectures": None, "model_type": "gpt2"}, "architectures 'gpt2' is not supported"),
    ],
)
def test_unsupported_is_one_line_before_weights(folders, tmp_path, config, message):
    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.models.hf import hf_decoder

    cfg = json.loads((folders["smollm2"] / "config.json").read_text())
    cfg.update(config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights at all in this folder
    with pytest.raises(PrefOptUserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_decoder(str(tmp_path))


def test_a_folder_without_architectures_is_read_from_its_model_type(folders, tmp_path):
    """transformers loads a config.json without ``architectures`` from its ``model_type``;
    so does the builder (the same model, the same logits)."""
    import shutil

    from torchtune_prefopt.models.hf.spec import read_spec

    for family in ("smollm2", "qwen3_moe"):
        folder = tmp_path / family
        shutil.copytree(folders[family], folder)
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["architectures"]
        (folder / "config.json").write_text(json.dumps(cfg))
        assert read_spec(folder) == read_spec(folders[family])
        ids = torch.randint(
            0, DIMS["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(4)
        )
        with torch.no_grad():
            torch.testing.assert_close(
                our_model(folder)(ids), _hf_logits(folder, ids), rtol=0, atol=1e-5
            )


def test_weights_that_do_not_fit_are_named_as_in_the_users_files(folders, pairs_file, tmp_path):
    """A config.json that does not describe its weights: the one line names the weight by its
    name in the folder's files, not by torchtune's."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders["qwen3_moe"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe_intermediate_size"] = 16  # the files hold experts of width 32
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = run_recipe(
        "hf/dpo", *COMMON, f"model_dir={folder}", f"dataset.data_files={pairs_file}",
        "batch_size=2", f"output_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert re.search(
        r"weight 'model\.layers\.0\.mlp\.experts\.0\.(gate|up|down)_proj\.weight' has shape",
        errors[0],
    ), errors[0]
    assert "layers.0.mlp.experts.0.w" not in errors[0]


def test_a_tied_model_with_its_own_lm_head_is_refused(folders, tmp_path):
    """tie_word_embeddings true, but the file's lm_head.weight differs from the embedding:
    not silently another model (transformers 5 would tie them and drop the file's head)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.models.hf import hf_checkpointer

    folder = tmp_path / "model"
    shutil.copytree(folders["smollm2"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1.0
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        PrefOptUserError, match="lm_head.weight differs from model.embed_tokens.weight"
    ) as e:
        hf_checkpointer(str(folder), str(tmp_path / "out")).load_checkpoint()
    assert "\n" not in str(e.value)
    # a copy equal to the embedding (some exporters keep one) is dropped, as transformers does
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert (
        "output.weight"
        not in hf_checkpointer(str(folder), str(tmp_path / "o2")).load_checkpoint()["model"]
    )


def test_sliding_window_shorter_than_context_is_refused(folders, tmp_path):
    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.models.hf import hf_decoder

    cfg = json.loads((folders["mistral"] / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrefOptUserError, match="sliding_window 64 is shorter than the context 256"):
        hf_decoder(str(tmp_path))
    assert hf_decoder(str(tmp_path), max_seq_len=64).max_seq_len == 64  # every row fits: exact


@pytest.mark.slow
def test_unsupported_architecture_through_the_cli(folders, tmp_path):
    """The whole command: one ``error:`` line, exit 2, nothing written to output_dir."""
    bad = tmp_path / "gemma"
    bad.mkdir()
    cfg = json.loads((folders["smollm2"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GemmaForCausalLM"]}))
    proc = run_recipe(
        "hf/dpo", f"model_dir={bad}", "device=cpu", f"output_dir={tmp_path / 'out'}", cwd=tmp_path
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "GemmaForCausalLM" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_model_dir_is_one_line(tmp_path):
    proc = run_recipe("hf/dpo", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: config key 'model_dir' is required")
    )


# ----------------------------------------------------------------------------- the tokenizer
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": " Hello!  "},
    ],
    [
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": "An eagle."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "A heron.\n"},
    ],
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_and_completion_equal_apply_chat_template(folders, family):
    from torchtune.data import Message
    from transformers import AutoTokenizer

    from torchtune_prefopt.models.hf import hf_tokenizer

    ours = hf_tokenizer(str(folders[family]))
    ref = AutoTokenizer.from_pretrained(str(folders[family]))
    for conv in CONVERSATIONS:
        prompt, completion = ours.tokenize_prompt_completion(
            [Message(role=m["role"], content=m["content"]) for m in conv]
        )
        assert prompt == template_ids(ref, conv[:-1], add_generation_prompt=True)
        full = template_ids(ref, conv)
        assert prompt + completion == full[: len(prompt) + len(completion)]
        # what is left unscored is whitespace the template puts after the end of turn
        assert ref.decode(full[len(prompt) + len(completion) :]).strip() == ""
        assert completion[-1] == ref.convert_tokens_to_ids(FAMILIES[family]["eos"]) or (
            family in ("llama3",) and ref.decode(completion[-1:]) == "<|eot_id|>"
        )


def test_template_that_does_not_extend_the_prompt_is_one_line(folders, tmp_path):
    import shutil

    from torchtune.data import Message

    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.models.hf import hf_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(folders["qwen2"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    # the generation prompt says "bot", the rendered answer says "assistant"
    cfg["chat_template"] = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>bot\\n' }}"
        "{%- endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = hf_tokenizer(str(folder))
    with pytest.raises(PrefOptUserError, match="does not render the prompt"):
        tok.tokenize_prompt_completion(
            [Message(role="user", content="hi"), Message(role="assistant", content="yo")]
        )


def test_tokenizer_without_chat_support_is_one_line(folders):
    """torchtune's HuggingFaceBaseTokenizer has no tokenize_messages: one line, with the fix."""
    from omegaconf import OmegaConf

    from torchtune_prefopt.data import build_tokenizer
    from torchtune_prefopt.errors import PrefOptUserError

    folder = folders["smollm2"]
    node = OmegaConf.create(
        {
            "_component_": "torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer",
            "tokenizer_json_path": str(folder / "tokenizer.json"),
            "tokenizer_config_json_path": str(folder / "tokenizer_config.json"),
        }
    )
    with pytest.raises(PrefOptUserError, match="has no integer pad_id.*hf_tokenizer"):
        build_tokenizer(node, 704)
    # a tokenizer that loads but cannot render a conversation: one line from the datasets
    from torchtune.data import Message

    from torchtune_prefopt.data._common import tokenize_split

    class IdsOnly:
        pad_id = 0

    with pytest.raises(PrefOptUserError, match="IdsOnly has no tokenize_messages.*hf_tokenizer"):
        tokenize_split(
            IdsOnly(), [Message(role="user", content="hi"), Message(role="assistant", content="yo")]
        )
    # torchtune's Llama 3 tokenizer pointed at a tokenizer.json (tiktoken cannot read it)
    node = OmegaConf.create(
        {
            "_component_": "torchtune.models.llama3.llama3_tokenizer",
            "path": str(folder / "tokenizer.json"),
        }
    )
    with pytest.raises(PrefOptUserError, match="could not be built.*hf_tokenizer"):
        build_tokenizer(node, 704)


# ----------------------------------------------------------------------------- the recipe
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@uses_runs(lambda family: [f"{family}-1p"])
def test_step_one_logps_equal_transformers(runs, folders, family):
    run = runs.get(f"{family}-1p").check()
    steps = run.steps()
    expected = completion_logps_by_transformers(folders[family], synthetic_rows(ROWS)[:BATCH])
    assert steps[1]["logps/chosen"] == pytest.approx(sum(expected) / BATCH, rel=1e-5)
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@uses_runs(lambda family: [f"{family}-1p", f"{family}-2p"])
def test_two_processes_equal_one(runs, folders, family):
    one, two = runs.get(f"{family}-1p").check(), runs.get(f"{family}-2p").check()
    assert sorted(one.steps()) == [1, 2]
    assert_steps_match(one.steps(), two.steps(), f"{family}: 2 processes vs 1", rel=1e-5, abs_=1e-6)
    # the project's 1-vs-N rule (FSDP2 sums gradients in another order; Adam turns float
    # noise in the near-zero k-bias gradients into lr-sized steps): each tensor within 1e-4,
    # the two updates within 1e-3 of the update's norm; and the runs trained
    base = load_weights(folders[family])
    w1 = load_weights(one.final)
    assert_same_training(load_weights(two.final), w1, base, f"{family}: 2 processes vs 1")
    assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@uses_runs(lambda family: [f"{family}-lr0", f"{family}-1p"])
def test_export_reloads_in_transformers_with_the_same_logits(runs, folders, family):
    from transformers import AutoTokenizer

    run = runs.get(f"{family}-lr0").check()
    final = run.final.resolve()
    ids = torch.randint(0, DIMS["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _hf_logits(final, ids), _hf_logits(folders[family], ids), rtol=0, atol=1e-5
    )
    exported = load_weights(final)
    tied = FAMILIES[family]["kw"]["tie_word_embeddings"]
    assert ("lm_head.weight" in exported) == (not tied)
    assert json.loads((final / "config.json").read_text()) == json.loads(
        (folders[family] / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (final / name).read_bytes() == (folders[family] / name).read_bytes()
    assert AutoTokenizer.from_pretrained(str(final)).chat_template == FAMILIES[family]["template"]
    # the final export is what a user ships: no optimizer state in it
    state = torch.load(final / "recipe_state.pt", weights_only=True)
    assert "optimizer" not in state
    # a trained (lr 1e-3) export differs from its input: the comparison above can fail
    trained = runs.get(f"{family}-1p").check().final.resolve()
    assert (_hf_logits(trained, ids) - _hf_logits(folders[family], ids)).abs().max().item() > 1e-4


@pytest.mark.slow
@uses_runs("qwen3-1p", "qwen3-ac-compile")
def test_activation_checkpointing_and_compile_equal_eager(runs):
    """torchtune's activation checkpointing and per-layer compile (aot_eager here) wrap the
    HF-folder model like any torchtune decoder: the same steps as eager."""
    eager, wrapped = runs.get("qwen3-1p").check(), runs.get("qwen3-ac-compile").check()
    assert "Compiling model layers with torch.compile" in wrapped.output
    assert_steps_match(eager.steps(), wrapped.steps(), "AC + compile vs eager", rel=1e-5, abs_=1e-6)


def test_a_builder_that_is_not_a_decoder_is_one_line():
    from omegaconf import OmegaConf

    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.models.build import meta_model

    node = OmegaConf.create({"_component_": "torch.nn.Linear", "in_features": 4, "out_features": 4})
    with pytest.raises(
        PrefOptUserError, match="builds a Linear, not a torchtune TransformerDecoder.*hf_decoder"
    ):
        meta_model(node, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(LORA_TARGETS))
@uses_runs(lambda family: [f"{family}-lora"])
def test_lora_export_is_peft_and_merged(runs, folders, family):
    """LoRA on Qwen3 (q/k norms), Qwen3-MoE and Mixtral: the PEFT adapter names are the HF
    modules of the model (transformers 5 fuses an MoE's experts into one tensor: an expert's
    adapter is named after the expert's weight in the Hub files, which the merged export
    keeps), the router has no adapter, and the merged weights are base + (alpha / rank) B A."""
    from transformers import AutoModelForCausalLM

    run = runs.get(f"{family}-lora").check()
    final = run.final.resolve()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    targets, n_adapted = LORA_TARGETS[family]
    assert set(config["target_modules"]) == targets
    adapter = load_weights(final, adapter=True)
    merged, base = load_weights(final), load_weights(folders[family])
    assert set(merged) == set(base)  # the Hub layout, per expert
    modules = dict(
        AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).named_modules()
    )
    a_keys = [k for k in adapter if k.endswith(".lora_A.weight")]
    assert len(a_keys) == n_adapted
    assert not any(".gate.lora" in k for k in adapter)  # the router
    for key in a_keys:
        module = key[len("base_model.model.") : -len(".lora_A.weight")]
        assert module in modules or ".experts." in module, module
        assert f"{module}.weight" in base, module
        a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
        expected = base[f"{module}.weight"] + (8 / 4) * (b @ a)
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert max((adapter[k.replace("lora_A", "lora_B")]).abs().max().item() for k in a_keys) > 0


@pytest.mark.slow
def test_local_component_under_torchrun_with_the_hf_tokenizer(folders, pairs_file, tmp_path):
    """A tokenizer component from a file next to the config (not installed) works on 2
    processes (torchrun workers get the working directory on their import path); the packaged
    tiny/dpo config with the HF chat-template tokenizer over a folder trains (ChatML, the
    folder's default system prompt); and the console has none of the known noise (torchao's
    C++-extension notice, torchtune's scratch-folder paths)."""
    (tmp_path / "my_tokenizers.py").write_text(
        "from torchtune_prefopt.models.hf import hf_tokenizer\n\n\n"
        "def chat_tokenizer(model_dir, max_seq_len=None):\n"
        "    return hf_tokenizer(model_dir, max_seq_len=max_seq_len)\n"
    )
    out = tmp_path / "out"
    proc = run_recipe(
        "tiny/dpo", "tokenizer._component_=my_tokenizers.chat_tokenizer", f"tokenizer.model_dir={folders['qwen2']}",
        "dataset._component_=torchtune_prefopt.data.preference_dataset", "dataset.source=json",
        f"dataset.data_files={pairs_file}", *NO_EVAL,
        "batch_size=1", "max_steps_per_epoch=2", f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tmp_path / 'base'}", "save_every_n_steps=1",
        cwd=tmp_path, nproc=2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "Skipping import of cpp extensions" not in both
    assert ".hf_scratch" not in both and "epoch_0" not in both
    steps = step_metrics(out)[0]
    assert sorted(steps) == [1, 2] and steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def _transformers_aux_loss(folder: Path, rows) -> float:
    """transformers' own router load-balancing loss (``output_router_logits=True``) over the
    pairs' chosen + rejected sequences, right-padded with an attention mask (TRL's forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    seqs = []
    for column in ("chosen", "rejected"):
        for row in rows:
            conv = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row[column]},
            ]
            ids = template_ids(tok, conv)
            while tok.decode(ids[-1:]).strip() == "":
                ids = ids[:-1]
            seqs.append(ids)
    width = max(len(x) for x in seqs)
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in seqs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, output_router_logits=True)
    return out.aux_loss.item()


@pytest.mark.slow
@uses_runs("qwen3_moe-aux-packed", "qwen3_moe-aux-padded")
def test_router_aux_loss_is_transformers_and_trl(runs, folders):
    """router_aux_loss_coef=0.01 on Qwen3-MoE: step 1's ``loss/router_aux`` is the
    load-balancing loss transformers computes over the step's chosen + rejected sequences,
    the loss is DPO's log 2 plus 0.01 of it (TRL's sum), and the packed + shared-prompt layout
    (each prompt once, counted twice) equals the padded one step by step."""
    packed = runs.get("qwen3_moe-aux-packed").check().steps()
    padded = runs.get("qwen3_moe-aux-padded").check().steps()
    aux = _transformers_aux_loss(folders["qwen3_moe"], synthetic_rows(ROWS)[:BATCH])
    assert padded[1]["loss/router_aux"] == pytest.approx(aux, rel=1e-5)
    assert padded[1]["loss"] == pytest.approx(math.log(2) + 0.01 * aux, rel=1e-6)
    assert_steps_match(packed, padded, "router aux: packed vs padded", rel=1e-5, abs_=1e-6)
    plain = runs.get("qwen3_moe-1p").check().steps()
    assert "loss/router_aux" not in plain[1]  # off by default
    assert padded[2]["loss"] != pytest.approx(plain[2]["loss"], rel=1e-9)  # it trains the router


def test_router_aux_loss_needs_an_moe_model(folders, tmp_path):
    proc = run_recipe(
        "hf/dpo", *COMMON, f"model_dir={folders['qwen2']}", "router_aux_loss_coef=0.01",
        "dataset.data_files=none.jsonl", f"output_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        "error: router_aux_loss_coef: 0.01 is set, but the model has no Mixture-of-Experts "
        "layer (a router); set it to 0"
    ], proc.stderr


@pytest.mark.slow
@uses_runs("qwen3-lora")
def test_a_lora_final_folder_starts_a_new_run(runs, pairs_file, tmp_path):
    """A LoRA run's ``final/`` (merged weights + the PEFT adapter file + recipe state) is a
    valid ``model_dir`` for a new run: the adapter file is not read as model weights, and the
    new run's step-1 log-probs are transformers' on that folder."""
    final = runs.get("qwen3-lora").check().final.resolve()
    assert (final / "adapter_model.safetensors").is_file()
    out = tmp_path / "out"
    proc = run_recipe(
        "hf/dpo", *COMMON, f"model_dir={final}", f"dataset.data_files={pairs_file}",
        "batch_size=2", "max_steps_per_epoch=1", f"output_dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = step_metrics(out)[0]
    expected = completion_logps_by_transformers(final, synthetic_rows(ROWS)[:BATCH])
    assert steps[1]["logps/chosen"] == pytest.approx(sum(expected) / BATCH, rel=1e-5)
