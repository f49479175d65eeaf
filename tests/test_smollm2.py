"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, RoPE
theta 1e5, ChatML with a default system prompt), from the package index's GGUF through the
one helper (``torchtune_prefopt.models.smollm2``, cached once per machine), trained with the
packaged ``smollm2/135M_dpo`` config on CPU.

* our logits equal ``transformers``' on the same weights;
* DPO's step-1 loss is ln 2 and held-out reward accuracy rises on a real-format pair set
  (training rows in UltraFeedback-binarized form: message lists and extra columns; held-out
  rows in TRL's plain ``prompt/chosen/rejected`` strings);
* packed + prompt-shared steps equal the padded ones;
* the export reloads in ``transformers`` and generates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import pytest
import torch

from tune_harness import (
    CPU_FP32,
    RunPool,
    RunSpec,
    assert_steps_match,
    uses_runs,
    wanted_runs,
    write_jsonl,
)

pytestmark = pytest.mark.slow

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Greece", "Athens"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Chile", "Santiago"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"), ("Mexico", "Mexico City"), ("India", "New Delhi"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"),
]  # fmt: skip
HELDOUT = [
    ("What is 3 + 4?", "3 + 4 = 7."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("What do bees make?", "Bees make honey."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("How many continents are there?", "There are seven continents."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide."),
    ("What is 10 times 10?", "10 times 10 is 100."),
    ("Which animal is known as the king of the jungle?", "The lion."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
]
RUDE = [
    "I don't know, look it up yourself.",
    "Why would I tell you that?",
    "Not my problem.",
    "Ask someone else.",
]
STEPS, BATCH = 8, 4

COMMON = (
    *CPU_FP32,
    "optimizer.fused=false",
    "optimizer.lr=1e-5",
    "lr_scheduler=null",
    "dataset.source=json",
    "dataset.split=train",
    "eval_dataset.source=json",
    "eval_dataset.split=train",
    f"batch_size={BATCH}",
    "gradient_accumulation_steps=1",
    "save_every_n_steps=null",
    "log_every_n_steps=1",
)
SPECS = {
    # the packaged config's layout: packed + share_prompt
    "train": RunSpec("train", "smollm2/135M_dpo", (f"max_steps_per_epoch={STEPS}", f"eval_every_n_steps={STEPS}")),
    "padded": RunSpec("padded", "smollm2/135M_dpo", ("max_steps_per_epoch=2", "packed=false", "share_prompt=false", "eval_every_n_steps=100")),
}  # fmt: skip


@pytest.fixture(scope="module")
def folder() -> Path:
    from torchtune_prefopt.models.smollm2 import smollm2_135m_instruct

    return smollm2_135m_instruct()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_data")
    train = []
    for i, (country, capital) in enumerate(CAPITALS):
        prompt = f"What is the capital of {country}?"
        train.append(
            {
                "prompt": prompt,
                "prompt_id": str(i),
                "chosen": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"The capital of {country} is {capital}."},
                ],
                "rejected": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": RUDE[i % 4]},
                ],
                "score_chosen": 9.0,
                "score_rejected": 2.0,
            }
        )
    heldout = [
        {"prompt": p, "chosen": a, "rejected": RUDE[(i + 1) % 4]}
        for i, (p, a) in enumerate(HELDOUT)
    ]
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "heldout.jsonl", heldout)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, folder, data):
    root = tmp_path_factory.mktemp("smollm2_runs")

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        return [
            *COMMON,
            f"model_dir={folder}",
            f"dataset.data_files={data[0]}",
            f"eval_dataset.data_files={data[1]}",
            *spec.overrides,
            f"output_dir={out_dir}",
        ]

    pool = RunPool(root, SPECS, overrides)
    for key in wanted_runs(request):
        pool.submit(key)
    yield pool
    pool.close()


def test_the_folder_is_the_real_model(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 100000.0


def test_logits_equal_transformers(folder):
    from torchtune import training
    from torchtune.data import Message
    from transformers import AutoModelForCausalLM

    from torchtune_prefopt.models.hf import hf_checkpointer, hf_decoder, hf_tokenizer

    tok = hf_tokenizer(str(folder))
    prompt, completion = tok.tokenize_prompt_completion(
        [Message(role="user", content="What is the capital of France?"),
         Message(role="assistant", content="The capital of France is Paris.")]
    )  # fmt: skip
    assert tok.decode(prompt, skip_special_tokens=False).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    ids = torch.tensor([prompt + completion])
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = hf_decoder(str(folder)).eval()
    ours.load_state_dict(
        hf_checkpointer(str(folder), str(folder / ".scratch")).load_checkpoint()[training.MODEL_KEY]
    )
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    # a pretrained model, not noise: "Paris" is its greedy answer
    assert "Paris" in tok.decode(expected[0, len(prompt) - 1 : -1].argmax(-1).tolist())


@uses_runs("train")
def test_dpo_trains_a_real_model(runs):
    run = runs.get("train").check()
    steps, evals = run.steps(), run.evals()
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert steps[STEPS]["loss"] < 0.5 * math.log(2)
    first, last = (
        evals[min(evals)]["eval/rewards/accuracies"],
        evals[max(evals)]["eval/rewards/accuracies"],
    )
    assert min(evals) == 0 and max(evals) == STEPS
    assert last > first and last >= 0.8, evals


@uses_runs("train", "padded")
def test_packed_and_shared_equal_padded(runs):
    packed, padded = runs.get("train").check(), runs.get("padded").check()
    s_pack, s_pad = packed.steps(), padded.steps()
    # rewards are beta x (difference of ~-60-nat sums): compare them at the log-probs' scale
    rewards = {k for k in s_pad[1] if k.startswith("rewards/") and k != "rewards/accuracies"}
    assert_steps_match(
        s_pad, s_pack, "packed + shared vs padded", rel=1e-5, abs_=1e-6, steps=[1, 2], skip=rewards
    )
    for step in (1, 2):
        for k in rewards:
            assert s_pack[step][k] == pytest.approx(s_pad[step][k], abs=1e-4)


@uses_runs("train")
def test_export_reloads_and_generates(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = runs.get("train").check().final.resolve()
    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Kenya?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert (final / "recipe_state.pt").stat().st_size < 1 << 20  # no optimizer state in the export
