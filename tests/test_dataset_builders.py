"""Public data set builders: hh-rlhf, UltraFeedback (binarized), StackExchange pairs, thumbs.

No download: every test writes a few rows in the exact upstream format (column names, value
types, transcript markers, split names) to local files and loads them through the same
code paths as Hub names (``source="json", data_files=...`` and ``datasets.load_dataset`` on a
folder laid out like the Hub repository). Chat templates: the tiny tokenizer (Qwen2.5's
ChatML) and a real torchtune Llama-3 tokenizer over a 256-token byte-level tiktoken file
(Llama 3's BOS, header and eot/eos tokens, no download).
"""

from __future__ import annotations

import json
import warnings

import pytest
from torchtune.data import Message

from torchtune_prefopt.data import (
    DataRowError,
    KTODataset,
    PreferenceDataset,
    hh_rlhf_dataset,
    parse_hh_transcript,
    stack_exchange_paired_dataset,
    thumbs_dataset,
    thumbs_label,
    ultrafeedback_binarized_dataset,
)
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.tiny import tiny_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def qwen():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """torchtune's Llama-3 tokenizer (real template and special tokens) over byte-level BPE."""
    from tune_harness import byte_llama3_tokenizer

    return byte_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def split_item(item, side):
    ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
    b = next(i for i, x in enumerate(labels) if x != IGNORE)
    assert labels[b:] == ids[b:]
    return ids[:b], ids[b:]


def full_tokens(tok, conv):
    msgs = [Message(m["role"], m["content"], masked=True) for m in conv[:-1]]
    msgs.append(Message(conv[-1]["role"], conv[-1]["content"]))
    return tok.tokenize_messages(msgs)[0]


# upstream hh-rlhf format: two full transcripts sharing every turn but the last answer
HH_ROWS = [
    {
        "chosen": "\n\nHuman: What is an owl?\n\nAssistant: A bird.\n\nHuman: Does it hunt at night?"
        "\n\nAssistant: Yes, owls are mostly nocturnal hunters.",
        "rejected": "\n\nHuman: What is an owl?\n\nAssistant: A bird.\n\nHuman: Does it hunt at night?"
        "\n\nAssistant: Go look it up.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: What.",
    },
]
HH_CONV0 = [
    {"role": "user", "content": "What is an owl?"},
    {"role": "assistant", "content": "A bird."},
    {"role": "user", "content": "Does it hunt at night?"},
    {"role": "assistant", "content": "Yes, owls are mostly nocturnal hunters."},
]


def test_parse_hh_transcript():
    assert parse_hh_transcript(HH_ROWS[0]["chosen"]) == HH_CONV0
    assert parse_hh_transcript("Human: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(ValueError):
        parse_hh_transcript("no markers at all")


def _check_no_duplicated_special(tok, item, bos, eos, turn_end):
    """prompt + completion is ONE chat-template tokenization; BOS once at the start, EOS once at
    the end, the completion starts with content and ends with the turn end (+ EOS)."""
    for side in ("chosen", "rejected"):
        prompt, completion = split_item(item, side)
        seq = prompt + completion
        if bos is not None:
            assert seq.count(bos) == 1 and seq[0] == bos
        assert seq.count(eos) == (1 if eos != turn_end else seq.count(turn_end))
        assert seq[-1] == eos
        assert completion[-1] == eos and bos not in completion
        assert completion[0] not in (bos, eos, turn_end)
        assert eos not in prompt or eos == turn_end
        if eos != turn_end:
            assert completion[-2] == turn_end and completion.count(turn_end) == 1


def test_hh_rlhf_multiturn_qwen_chatml(qwen, tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    ds = hh_rlhf_dataset(qwen, source="json", data_files=f)
    assert isinstance(ds, PreferenceDataset) and len(ds) == 2
    item = ds[0]
    c_prompt, c_comp = split_item(item, "chosen")
    r_prompt, r_comp = split_item(item, "rejected")
    assert c_prompt == r_prompt  # the shared turns are the prompt
    assert c_prompt + c_comp == full_tokens(qwen, HH_CONV0)
    assert qwen.decode(c_prompt) == (
        "<|im_start|>user\nWhat is an owl?<|im_end|>\n<|im_start|>assistant\nA bird.<|im_end|>\n"
        "<|im_start|>user\nDoes it hunt at night?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen.decode(r_comp) == "Go look it up.<|im_end|>"
    assert "Human:" not in qwen.decode(c_prompt)
    # ChatML: no BOS; <|im_end|> ends every turn and is the EOS -> one per message.
    for side in ("chosen", "rejected"):
        p, c = split_item(item, side)
        assert (
            (p + c).count(qwen.eos_id) == 4 and c.count(qwen.eos_id) == 1 and c[-1] == qwen.eos_id
        )
        assert c[0] != qwen.im_start_id and (p + c).count(qwen.im_start_id) == 4


def test_hh_rlhf_llama3_template_no_duplicated_bos_eos(llama3, tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    ds = hh_rlhf_dataset(llama3, source="json", data_files=f)
    eot = llama3.special_tokens["<|eot_id|>"]
    for item in (ds[0], ds[1]):
        _check_no_duplicated_special(
            llama3, item, bos=llama3.bos_id, eos=llama3.eos_id, turn_end=eot
        )
        prompt, comp = split_item(item, "chosen")
        assert llama3.decode(prompt, skip_special_tokens=False).endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    prompt, comp = split_item(ds[0], "chosen")
    assert prompt + comp == full_tokens(llama3, HH_CONV0)
    # every earlier turn ends with <|eot_id|>, never with <|end_of_text|>
    assert prompt.count(eot) == 3 and llama3.eos_id not in prompt


def test_hh_rlhf_drops_and_counts_broken_rows(qwen, tmp_path):
    bad = [
        {
            "chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: good",
            "rejected": "\n\nHuman: a\n\nAssistant: y\n\nHuman: b\n\nAssistant: bad",
        },  # diverges early
        {
            "chosen": "\n\nHuman: a\n\nAssistant: ",
            "rejected": "\n\nHuman: a\n\nAssistant: no",
        },  # empty
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
            "rejected": "\n\nHuman: a\n\nAssistant: d",
        },
        {"chosen": "garbage", "rejected": "garbage 2"},
    ]
    f = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS + bad)
    with pytest.warns(UserWarning, match=r"dropped 4 row\(s\)"):
        ds = hh_rlhf_dataset(qwen, source="json", data_files=f)
    assert len(ds) == 2
    assert ds.stats["rows"] == 6
    assert ds.stats["dropped_diverging_prompt"] == 1
    assert ds.stats["dropped_empty_answer"] == 1
    assert ds.stats["dropped_no_final_answer"] == 1
    assert ds.stats["dropped_unparseable"] == 1
    # a missing column is a mistake, not a broken row
    f2 = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(
        DataRowError, match=r"wrong\.jsonl row 0 \(line 1\): field 'good' is missing"
    ):
        hh_rlhf_dataset(qwen, source="json", data_files=f2, column_map={"chosen": "good"})


def test_hh_rlhf_unpaired_for_kto(qwen, tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    ds = hh_rlhf_dataset(qwen, source="json", data_files=f, unpaired=True)
    assert isinstance(ds, KTODataset) and len(ds) == 4
    assert [it["label"] for it in ds] == [True, False, True, False]
    paired = hh_rlhf_dataset(qwen, source="json", data_files=f)
    p, c = split_item(paired[0], "chosen")
    assert ds[0]["prompt_ids"] == p and ds[0]["completion_ids"] == c


UF_ROWS = [
    {
        "prompt": "Name a prime number.",
        "prompt_id": "p0",
        "chosen": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7 is prime."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "8."},
        ],
        "messages": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7 is prime."},
        ],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
    {
        "prompt": "Say hi.",
        "prompt_id": "p1",
        "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        "rejected": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "No."},
        ],
        "messages": [],
        "score_chosen": 5.0,
        "score_rejected": 5.0,  # tie
    },
]


def test_ultrafeedback_local_splits_and_ties(qwen, tmp_path):
    train = write_jsonl(tmp_path / "train_prefs.jsonl", UF_ROWS)
    test = write_jsonl(tmp_path / "test_prefs.jsonl", UF_ROWS[:1])
    with pytest.warns(UserWarning, match="tied scores"):
        ds = ultrafeedback_binarized_dataset(
            qwen, source="json", data_files={"train_prefs": train, "test_prefs": test}
        )  # default split: train_prefs
    assert len(ds) == 1 and ds.stats["dropped_tied_scores"] == 1 and ds.stats["rows"] == 2
    p, c = split_item(ds[0], "chosen")
    assert p + c == full_tokens(qwen, UF_ROWS[0]["chosen"])
    assert qwen.decode(c) == "7 is prime.<|im_end|>"
    heldout = ultrafeedback_binarized_dataset(
        qwen,
        source="json",
        data_files={"train_prefs": train, "test_prefs": test},
        split="test_prefs",
    )
    assert len(heldout) == 1
    # one local file: the split is "train"; ties kept on request
    ds2 = ultrafeedback_binarized_dataset(qwen, source="json", data_files=train, drop_ties=False)
    assert len(ds2) == 2
    with pytest.warns(UserWarning, match="tied scores"):
        ds3 = ultrafeedback_binarized_dataset(
            qwen, source="json", data_files=train, new_system_prompt="Be exact."
        )
    p3, _ = split_item(ds3[0], "chosen")
    assert qwen.decode(p3).startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")


def test_ultrafeedback_through_load_dataset_hub_layout(qwen, tmp_path):
    """The Hub repository layout (data/<split>-00000-of-00001.*) through datasets.load_dataset,
    i.e. the code path of source="HuggingFaceH4/ultrafeedback_binarized"."""
    repo = tmp_path / "ultrafeedback_binarized"
    write_jsonl(repo / "data" / "train_prefs-00000-of-00001.jsonl", UF_ROWS)
    write_jsonl(repo / "data" / "test_prefs-00000-of-00001.jsonl", UF_ROWS[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ultrafeedback_binarized_dataset(
            qwen, source=str(repo), cache_dir=str(tmp_path / "cache")
        )
        test = ultrafeedback_binarized_dataset(
            qwen, source=str(repo), split="test_prefs", cache_dir=str(tmp_path / "cache")
        )
    assert len(ds) == 1 and ds.stats["dropped_tied_scores"] == 1 and len(test) == 1
    assert ds.name.endswith("[train_prefs]")


def test_stack_exchange_paired(qwen, llama3, tmp_path):
    rows = [
        {
            "qid": 1,
            "question": "How do I reverse a list in Python?",
            "date": "2020/01/01",
            "metadata": ["https://stackoverflow.com/questions/1"],
            "response_j": "Use `lst[::-1]` or `lst.reverse()`.",
            "response_k": "You can't.",
        },
        {
            "qid": 2,
            "question": "Tabs or spaces?",
            "date": "2020/01/02",
            "metadata": [],
            "response_j": "Spaces, per PEP 8.",
            "response_k": "",
        },  # empty answer: dropped
    ]
    f = write_jsonl(tmp_path / "se.jsonl", rows)
    with pytest.warns(UserWarning, match="empty answer"):
        ds = stack_exchange_paired_dataset(qwen, source="json", data_files=f)
    assert len(ds) == 1 and ds.stats["dropped_empty_answer"] == 1
    p, c = split_item(ds[0], "chosen")
    assert qwen.decode(c) == "Use `lst[::-1]` or `lst.reverse()`.<|im_end|>"
    assert qwen.decode(split_item(ds[0], "rejected")[1]) == "You can't.<|im_end|>"
    assert (
        qwen.decode(p)
        == "<|im_start|>user\nHow do I reverse a list in Python?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.warns(UserWarning):
        ds_l = stack_exchange_paired_dataset(llama3, source="json", data_files=f)
    _check_no_duplicated_special(
        llama3,
        ds_l[0],
        bos=llama3.bos_id,
        eos=llama3.eos_id,
        turn_end=llama3.special_tokens["<|eot_id|>"],
    )
    # swapped roles through column_map
    with pytest.warns(UserWarning):
        sw = stack_exchange_paired_dataset(
            qwen,
            source="json",
            data_files=f,
            column_map={"chosen": "response_k", "rejected": "response_j"},
        )
    assert qwen.decode(split_item(sw[0], "chosen")[1]) == "You can't.<|im_end|>"


def test_thumbs_labels():
    assert thumbs_label("up") and thumbs_label("UP") and thumbs_label(True) and thumbs_label(1)
    assert not thumbs_label("down") and not thumbs_label(False) and not thumbs_label(0)
    assert thumbs_label("\U0001f44d") and not thumbs_label("thumbs_down")
    for bad in ("meh", 2, None, 0.5):
        with pytest.raises(ValueError):
            thumbs_label(bad)


def test_thumbs_dataset(qwen, llama3, tmp_path):
    rows = [
        {"prompt": "What is a harp?", "completion": "A harp is an instrument.", "thumbs": "up"},
        {"prompt": "What is a harp?", "completion": "Whatever.", "thumbs": "down"},
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
            ],
            "completion": "Hello!",
            "thumbs": True,
        },
        {"prompt": "Hi", "completion": "  ", "thumbs": False},  # empty: dropped
    ]
    f = write_jsonl(tmp_path / "fb.jsonl", rows)
    with pytest.warns(UserWarning, match="empty completion"):
        ds = thumbs_dataset(qwen, source="json", data_files=f)
    assert isinstance(ds, KTODataset) and len(ds) == 3
    assert ds.labels == [True, False, True]
    assert ds.stats["n_desirable"] == 2 and ds.stats["dropped_empty_completion"] == 1
    it = ds[0]
    assert it["prompt_ids"] + it["completion_ids"] == full_tokens(
        qwen,
        [
            {"role": "user", "content": "What is a harp?"},
            {"role": "assistant", "content": "A harp is an instrument."},
        ],
    )
    assert qwen.decode(ds[2]["prompt_ids"]).startswith("<|im_start|>system\nBe kind.")
    # "label" column (bools) is the default when present; Llama-3 template: BOS once, EOS once
    rows2 = [
        {"prompt": "Q", "completion": "good", "label": True},
        {"prompt": "Q", "completion": "bad", "label": False},
    ]
    ds2 = thumbs_dataset(llama3, source="json", data_files=write_jsonl(tmp_path / "l.jsonl", rows2))
    for it in ds2:
        seq = it["prompt_ids"] + it["completion_ids"]
        assert seq.count(llama3.bos_id) == 1 and seq[0] == llama3.bos_id
        assert seq.count(llama3.eos_id) == 1 and seq[-1] == llama3.eos_id
        assert llama3.bos_id not in it["completion_ids"]
    # an unknown feedback value names file, row and column
    f3 = write_jsonl(
        tmp_path / "bad.jsonl", rows[:2] + [{"prompt": "a", "completion": "b", "thumbs": "meh"}]
    )
    with pytest.raises(DataRowError, match=r"bad\.jsonl row 2 \(line 3\): field 'thumbs'"):
        thumbs_dataset(qwen, source="json", data_files=f3)
    with pytest.raises(PrefOptUserError, match="both desirable and undesirable"):
        thumbs_dataset(
            qwen, source="json", data_files=write_jsonl(tmp_path / "one.jsonl", rows[:1])
        )


def test_builders_from_a_config(qwen, tmp_path):
    """The YAML form the recipe uses (config.instantiate with the tokenizer)."""
    from omegaconf import OmegaConf
    from torchtune import config

    f = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    cfg = OmegaConf.create(
        {
            "_component_": "torchtune_prefopt.data.hh_rlhf_dataset",
            "source": "json",
            "data_files": f,
            "max_seq_len": 64,
        }
    )
    ds = config.instantiate(cfg, tokenizer=qwen)
    assert len(ds) == 2 and ds.stats["max_seq_len"] == 64
