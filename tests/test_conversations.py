"""Preferences over whole conversations: a completion is a trajectory (several assistant turns
with user or tool turns between them) and every assistant message of it is scored.

The oracle is independent of the datasets' own rendering: ``transformers``'
``apply_chat_template`` renders the whole conversation; the assistant messages are found in
that text by the template's own markers (ChatML ``<|im_start|>assistant\\n ... <|im_end|>``,
Llama 3 ``<|start_header_id|>assistant<|end_header_id|>\\n\\n ... <|eot_id|>``); a token is
scored when its character offset lies in such a span after the shared prefix; log-probs are
``transformers``' own forward in float64. Templates: ChatML with a default system prompt
(SmolLM2's), a Llama 3 header template with BOS and a default system prompt, and a ChatML
template with tools (Qwen2.5-style ``<tools>`` / ``<tool_call>`` / ``<tool_response>``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from hf_families import make_family_folder, our_model

from torchtune_prefopt.data import kto_dataset, preference_dataset
from torchtune_prefopt.errors import PrefOptUserError
from tune_harness import (
    CPU_FP32,
    RunPool,
    RunSpec,
    assert_steps_match,
    uses_runs,
    wanted_runs,
    write_jsonl,
)

IGNORE = -100

LLAMA3_WITH_SYSTEM = (
    "{{- bos_token }}{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023'"
    " + '<|eot_id|>' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' + (messages[0]['content'] if messages[0]['role']"
    " == 'system' else 'You are a helpful assistant.') + '\\n\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' and (tools or not loop.first) %}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] is defined %}"
    "{{- '<|im_start|>assistant\\n' + m['content'] }}{%- for c in m['tool_calls'] %}"
    "{{- '<tool_call>\\n' + (c['function'] | tojson) + '\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: template -> (family folder it starts from, chat template or None, span regex)
TEMPLATES = {
    "chatml": ("smollm2", None, r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"),
    "llama3": (
        "llama3",
        LLAMA3_WITH_SYSTEM,
        r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eot_id\|>)",
    ),
    "chatml_tools": ("qwen2", CHATML_TOOLS, r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"),
}


def msg(role: str, content: str, **kw) -> dict:
    return {"role": role, "content": content, **kw}


SYSTEM, USER = msg("system", "Answer in one short sentence."), msg("user", "Name a bird.")
A1, B1 = msg("assistant", "An owl is a bird."), msg("assistant", "A cat, maybe.")
U2 = msg("user", "And a fish that lives in rivers?")
A2, B2 = msg("assistant", "A trout."), msg("assistant", "Dogs swim.")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = msg(
    "assistant",
    "",
    tool_calls=[
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ],
)
TOOL = msg("tool", '{"temp_c": 3}')
ASK_WEATHER = msg("user", "Is it cold in Oslo?")

#: shape -> (row, the shared prefix's messages, chosen conversation, rejected conversation)
SHAPES: Dict[str, tuple] = {
    "prompt_and_continuation": (
        {"prompt": [SYSTEM, USER], "chosen": [A1, U2, A2], "rejected": [B1, U2, B2]},
        [SYSTEM, USER],
    ),
    "prompt_repeated_in_the_conversation": (
        {"prompt": [SYSTEM, USER], "chosen": [SYSTEM, USER, A1, U2, A2], "rejected": [B1, U2, B2]},
        [SYSTEM, USER],
    ),
    "whole_conversations_branching_at_the_first_answer": (
        {"chosen": [USER, A1, U2, A2], "rejected": [USER, B1, U2, B2]},
        [USER],
    ),
    "whole_conversations_sharing_the_first_turn": (
        {"chosen": [SYSTEM, USER, A1, U2, A2], "rejected": [SYSTEM, USER, A1, U2, B2]},
        [SYSTEM, USER, A1, U2],
    ),
    "single_turn": ({"prompt": "Name a bird.", "chosen": "An owl.", "rejected": "A cat."}, [USER]),
}
TOOL_SHAPE = (
    {
        "prompt": [ASK_WEATHER],
        "chosen": [CALL, TOOL, msg("assistant", "Yes: 3 degrees.")],
        "rejected": [msg("assistant", "No idea.")],
        "tools": [WEATHER],
    },
    [ASK_WEATHER],
)


def conversations(row: dict, prefix: List[dict]) -> tuple:
    def side(value):
        if isinstance(value, str):
            return prefix + [msg("assistant", value)]
        return value if value[: len(prefix)] == prefix else prefix + value

    return side(row["chosen"]), side(row["rejected"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversation_folders")
    out = {}
    for name, (family, template, _) in TEMPLATES.items():
        folder = make_family_folder(family, root / "base" / family)
        if template is not None:
            folder = root / name
            shutil.copytree(root / "base" / family, folder)
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(
                json.dumps({**cfg, "chat_template": template})
            )
        out[name] = folder
    return out


def oracle(folder: Path, template: str, conversation: List[dict], n_prefix: int, tools=None):
    """``(ids, scored)`` by transformers alone: the rendering's tokens (trailing whitespace
    dropped) and, per token, whether it lies in an assistant span after the prefix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    kw = {"tools": tools} if tools else {}
    text = tok.apply_chat_template(conversation, tokenize=False, **kw).rstrip()
    ids = tok.apply_chat_template(conversation, tokenize=True, **kw)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids[: len(enc["input_ids"])]  # the same tokens, minus the tail
    skip = sum(m["role"] == "assistant" for m in conversation[:n_prefix])
    spans = [m.span(1) for m in re.finditer(TEMPLATES[template][2], text, re.S)][skip:]
    assert spans, "no assistant span after the prefix"
    scored = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return enc["input_ids"], scored


def hf_tok(folder: Path):
    from torchtune_prefopt.models.hf import hf_tokenizer

    return hf_tokenizer(str(folder))


def labelled(ids: List[int], labels: List[int]) -> List[bool]:
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    return [lab != IGNORE for lab in labels]


# ----------------------------------------------------------------------------- what is scored
@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paired_labels_are_the_assistant_spans(folders, tmp_path, template, shape):
    row, prefix = SHAPES[shape]
    item = preference_dataset(
        hf_tok(folders[template]),
        source="json",
        data_files=str(write_jsonl(tmp_path / "rows.jsonl", [row])),
    )[0]
    for side, conv in zip(("chosen", "rejected"), conversations(row, prefix)):
        ids, scored = oracle(folders[template], template, conv, len(prefix))
        assert item[f"{side}_input_ids"] == ids, side
        assert labelled(ids, item[f"{side}_labels"]) == scored, side
    n_turns = sum(m["role"] == "assistant" for m in conversations(row, prefix)[0][len(prefix) :])
    assert n_turns == (
        2 if "continuation" in shape or "branching" in shape or "repeated" in shape else 1
    )


def test_a_tool_turn(folders, tmp_path):
    """tools reach the template as apply_chat_template(..., tools=...) passes them; the tool
    call is the assistant's (scored), the tool's result is not."""
    row, prefix = TOOL_SHAPE
    item = preference_dataset(
        hf_tok(folders["chatml_tools"]),
        source="json",
        data_files=str(write_jsonl(tmp_path / "rows.jsonl", [row])),
    )[0]
    for side, conv in zip(("chosen", "rejected"), conversations(row, prefix)):
        ids, scored = oracle(folders["chatml_tools"], "chatml_tools", conv, 1, tools=[WEATHER])
        assert item[f"{side}_input_ids"] == ids, side
        assert labelled(ids, item[f"{side}_labels"]) == scored, side
    tok = hf_tok(folders["chatml_tools"])
    text = tok.hf.decode(
        [i for i, lab in zip(item["chosen_input_ids"], item["chosen_labels"]) if lab != IGNORE]
    )
    assert "get_weather" in text and "temp_c" not in text and "<tools>" not in text


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_kto_completion_is_a_trajectory(folders, tmp_path, template):
    rows = [
        {"prompt": [SYSTEM, USER], "completion": [A1, U2, A2], "label": True},
        {"prompt": "Name a bird.", "completion": "A cat.", "label": False},
    ]
    ds = kto_dataset(
        hf_tok(folders[template]),
        source="json",
        data_files=str(write_jsonl(tmp_path / "k.jsonl", rows)),
    )
    for item, prefix, conv in (
        (ds[0], [SYSTEM, USER], [SYSTEM, USER, A1, U2, A2]),
        (ds[1], [USER], [USER, msg("assistant", "A cat.")]),
    ):
        ids, scored = oracle(folders[template], template, conv, len(prefix))
        assert item["prompt_ids"] + item["completion_ids"] == ids
        n = len(item["prompt_ids"])
        assert not any(scored[:n]) and scored[n]  # the prompt ends where scoring starts
        assert labelled(item["completion_ids"], item["completion_labels"]) == scored[n:]


def test_torchtune_tokenizer_scores_the_same_turns():
    """torchtune's own ChatML tokenizer (the tiny model's): every assistant turn after the
    prompt is scored as ``content<|im_end|>``, found by parsing its tokens."""
    from torchtune_prefopt.data._conversation import encode_row, read_row
    from torchtune_prefopt.models.tiny import tiny_special_tokens, tiny_tokenizer

    tok = tiny_tokenizer()
    special = tiny_special_tokens()
    start, end = special["<|im_start|>"], special["<|im_end|>"]
    header = tok.encode("assistant\n", add_bos=False, add_eos=False)
    row, prefix = SHAPES["prompt_and_continuation"]
    conv = read_row(row, "row 0", prompt_col="prompt", completion_cols=("chosen", "rejected"))
    enc = encode_row(tok, conv)
    for e in enc:
        want, i = [False] * len(e.ids), 0
        while i < len(e.ids):
            if e.ids[i] == start and e.ids[i + 1 : i + 1 + len(header)] == header:
                j = i + 1 + len(header)
                k = e.ids.index(end, j)
                want[j : k + 1] = [True] * (k + 1 - j)
                i = k
            i += 1
        assert labelled(e.ids, e.labels) == want
        assert sum(want) > 0 and e.n_prompt == want.index(True)


# ----------------------------------------------------------------------------- refused in one line
@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {"prompt": [USER], "chosen": [A1, U2], "rejected": [B1]},
            "field 'chosen' ends on a user turn; a conversation must end with an assistant message",
        ),
        (
            {"chosen": [USER, A1], "rejected": [USER, A1, U2, A2]},
            "field 'chosen' has no assistant message after the prompt",
        ),
        (
            {"prompt": [USER], "chosen": [U2, A2], "rejected": [B1]},
            "field 'chosen' starts with a user message that does not repeat field 'prompt'",
        ),
    ],
)
def test_refused_in_one_line(folders, tmp_path, row, problem):
    f = write_jsonl(tmp_path / "bad.jsonl", [SHAPES["single_turn"][0], row])
    with pytest.raises(PrefOptUserError) as e:
        preference_dataset(hf_tok(folders["chatml"]), source="json", data_files=str(f))
    assert str(e.value) == f"{f} row 1 (line 2): {problem}" or str(e.value).startswith(
        f"{f} row 1 (line 2): {problem}"
    ), str(e.value)
    assert "\n" not in str(e.value)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """Qwen3-style templates render the last assistant turn with a ``<think>`` block and the
    earlier ones without: the turn's tokens as generated are not in the conversation."""
    folder = make_family_folder("qwen3", tmp_path / "qwen3")
    f = write_jsonl(tmp_path / "rows.jsonl", [SHAPES["prompt_and_continuation"][0]])
    with pytest.raises(
        PrefOptUserError,
        match=r"row 0 \(line 1\): field 'chosen' cannot be tokenized: .*assistant message 2 differently",
    ) as e:
        preference_dataset(hf_tok(folder), source="json", data_files=str(f))
    assert "\n" not in str(e.value)
    # one turn per row is fine
    single = write_jsonl(tmp_path / "single.jsonl", [SHAPES["single_turn"][0]])
    assert len(preference_dataset(hf_tok(folder), source="json", data_files=str(single))) == 1


def test_tools_need_the_models_template(tmp_path):
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    f = write_jsonl(tmp_path / "rows.jsonl", [TOOL_SHAPE[0]])
    with pytest.raises(PrefOptUserError) as e:
        preference_dataset(tiny_tokenizer(), source="json", data_files=str(f))
    assert str(e.value).startswith(
        f"{f} row 0 (line 1): field 'tools' needs the model's own chat template to render "
        "function schemas, and Qwen2_5Tokenizer has none; for a Hugging Face folder use "
        "torchtune_prefopt.models.hf.hf_tokenizer"
    ), str(e.value)


# ----------------------------------------------------------------------------- exact log-probs
def transformers_logps(folder: Path, ids: List[int], scored: List[bool]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1], dim=-1)
    token = logp.gather(-1, x[0, 1:, None])[:, 0]
    return token[torch.tensor(scored[1:])].sum().item()


@pytest.mark.parametrize("layout", ["padded", "packed_shared"])
def test_logps_equal_transformers_over_the_assistant_spans(folders, tmp_path, layout):
    from torchtune_prefopt.data import PackingLayout, PreferenceCollator

    rows = [
        SHAPES[s][0]
        for s in ("prompt_and_continuation", "whole_conversations_sharing_the_first_turn")
    ]
    prefixes = [
        SHAPES[s][1]
        for s in ("prompt_and_continuation", "whole_conversations_sharing_the_first_turn")
    ]
    folder = folders["chatml"]
    ds = preference_dataset(
        hf_tok(folder), source="json", data_files=str(write_jsonl(tmp_path / "r.jsonl", rows))
    )
    items = [ds[i] for i in range(len(ds))]
    packing = PackingLayout(share_prompt=True, capacity=256) if layout == "packed_shared" else None
    batch = PreferenceCollator(paired=True, pad_id=0, packing=packing)(items)
    with torch.no_grad():
        lp = batch.logps(our_model(folder), 64)
    chosen, rejected = lp.halves()
    for i, (row, prefix) in enumerate(zip(rows, prefixes)):
        for side, got in zip(conversations(row, prefix), (chosen, rejected)):
            ids, scored = oracle(folder, "chatml", side, len(prefix))
            want = transformers_logps(folder, ids, scored)
            assert got.sum[i].item() == pytest.approx(want, rel=1e-5)
            n = sum(scored[1:])
            assert got.num_tokens[i].item() == n
            assert got.mean[i].item() == pytest.approx(want / n, rel=1e-5)


# ----------------------------------------------------------------------------- the recipe
#: four conversation pairs of every shape (trajectories of one and two scored turns)
RECIPE_ROWS = [
    SHAPES["prompt_and_continuation"],
    SHAPES["whole_conversations_sharing_the_first_turn"],
    SHAPES["whole_conversations_branching_at_the_first_answer"],
    SHAPES["prompt_repeated_in_the_conversation"],
]
RECIPE_SPECS = {
    "dpo-1p": RunSpec("dpo-1p", "hf/dpo"),
    "dpo-2p": RunSpec("dpo-2p", "hf/dpo", nproc=2),
    "kto-1p": RunSpec("kto-1p", "hf/kto"),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, folders):
    root = tmp_path_factory.mktemp("conversation_runs")
    data = write_jsonl(root / "conversations.jsonl", [row for row, _ in RECIPE_ROWS])

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        return [
            *CPU_FP32,
            f"model_dir={folders['chatml']}",
            "optimizer.fused=false",
            "optimizer.lr=1e-3",
            "lr_scheduler=null",
            "shuffle=false",
            "gradient_accumulation_steps=1",
            f"batch_size={2 // spec.nproc}",
            "save_every_n_steps=null",
            "log_every_n_steps=1",
            "dataset.source=json",
            "dataset.split=train",
            f"dataset.data_files={data}",
            "eval_dataset.source=json",
            "eval_dataset.split=train",
            f"eval_dataset.data_files={data}",
            "eval_every_n_steps=2",
            "reference.precompute=true",  # packed + shared prompt is the hf/ default
            f"output_dir={out_dir}",
        ]

    pool = RunPool(root, RECIPE_SPECS, overrides)
    for key in sorted(wanted_runs(request), key=lambda k: "2p" not in k):
        pool.submit(key)
    yield pool
    pool.close()


def oracle_logps(folder: Path, row_index: int, side: int) -> float:
    row, prefix = RECIPE_ROWS[row_index]
    ids, scored = oracle(folder, "chatml", conversations(row, prefix)[side], len(prefix))
    return transformers_logps(folder, ids, scored)


@pytest.mark.slow
@uses_runs("dpo-1p", "dpo-2p")
def test_dpo_recipe_scores_conversations_exactly(runs, folders):
    """Packed + shared prompt, precomputed reference: step 1's ``logps/chosen`` is
    transformers' sum over the assistant spans (rows 0 and 1); the held-out evaluation after
    step 2 scores the exported weights the same way; 2 processes equal 1."""
    one = runs.get("dpo-1p").check()
    steps = one.steps()
    base = folders["chatml"]
    assert steps[1]["logps/chosen"] == pytest.approx(
        (oracle_logps(base, 0, 0) + oracle_logps(base, 1, 0)) / 2, rel=1e-5
    )
    assert steps[1]["logps/rejected"] == pytest.approx(
        (oracle_logps(base, 0, 1) + oracle_logps(base, 1, 1)) / 2, rel=1e-5
    )
    assert steps[1]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference
    final = one.final.resolve()
    held_out = one.evals()[2]
    assert held_out["eval/logps/chosen"] == pytest.approx(
        sum(oracle_logps(final, i, 0) for i in range(4)) / 4, rel=1e-5
    )
    two = runs.get("dpo-2p").check()
    assert_steps_match(steps, two.steps(), "conversations: 2 processes vs 1", rel=1e-5, abs_=1e-6)


@pytest.mark.slow
@uses_runs("kto-1p")
def test_kto_recipe_scores_trajectories_exactly(runs, folders):
    """unpaired_from_paired: item 0 is pair 0's chosen trajectory (desirable), item 1 pair 3's
    rejected one (undesirable)."""
    steps = runs.get("kto-1p").check().steps()
    base = folders["chatml"]
    assert steps[1]["logps/desirable"] == pytest.approx(oracle_logps(base, 0, 0), rel=1e-5)
    assert steps[1]["logps/undesirable"] == pytest.approx(oracle_logps(base, 3, 1), rel=1e-5)


# ----------------------------------------------------------------------------- the README
def test_show_scored_command_is_the_readme_example(tmp_path):
    """The README's command, verbatim, prints what the README shows (the bundled example's
    first pair, both assistant turns of the continuation marked and nothing else)."""
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmd = (
        "python -m torchtune_prefopt.data.show_scored --config tiny/dpo "
        "dataset._component_=torchtune_prefopt.data.example_conversations_dataset"
    )
    assert re.search(rf"^{re.escape(cmd)}$", readme, re.M), "not in README.md"
    shown = readme.split("```text\n--- chosen", 1)[1].split("```", 1)[0]
    proc = subprocess.run(
        [sys.executable, *cmd.split()[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"--- chosen{shown}" in proc.stdout, proc.stdout
    assert proc.stdout.count("[[") == 5  # the header line, two turns in chosen, two in rejected
