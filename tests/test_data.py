"""Data: paired/unpaired datasets, validation errors, truncation, collates, synthetic set."""

import json
import re

import pytest
import torch

from torchtune_prefopt.data import (
    KTODataset,
    PreferenceDataset,
    kto_balance_warning,
    kto_collate,
    kto_dataset,
    paired_collate,
    preference_dataset,
    synthetic_data_file,
    synthetic_kto_dataset,
    synthetic_preference_dataset,
    unpaired_from_paired,
)
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.tiny import tiny_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def enc(tok, text):
    return tok.encode(text, add_bos=False, add_eos=False)


def chatml_prompt(tok, *turns):
    """Expected prompt tokens: each (role, text) turn + the assistant header."""
    ids = []
    for role, text in turns:
        ids += [tok.im_start_id] + enc(tok, f"{role}\n") + enc(tok, text)
        ids += [tok.im_end_id] + enc(tok, "\n")
    return ids + [tok.im_start_id] + enc(tok, "assistant\n")


def completion(tok, text):
    return enc(tok, text) + [tok.eos_id]


ROWS = [
    {"prompt": "What is an owl?", "chosen": "An owl is a bird.", "rejected": "Go away."},
    {"prompt": "What is a harp?", "chosen": "A harp is an instrument.", "rejected": "No idea."},
]


# ----------------------------------------------------------------------------- layouts


def test_paired_exact_layout(tok, tmp_path):
    ds = preference_dataset(tok, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert isinstance(ds, PreferenceDataset) and len(ds) == 2
    item = ds[0]
    assert set(item) == {
        "chosen_input_ids",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_labels",
        "index",
    }
    prompt = chatml_prompt(tok, ("user", "What is an owl?"))
    chosen = completion(tok, "An owl is a bird.")
    rejected = completion(tok, "Go away.")
    assert item["chosen_input_ids"] == prompt + chosen
    assert item["rejected_input_ids"] == prompt + rejected
    assert item["chosen_labels"] == [IGNORE] * len(prompt) + chosen
    assert item["rejected_labels"] == [IGNORE] * len(prompt) + rejected
    assert item["index"] == 0 and ds[1]["index"] == 1
    # exactly what the chat template produces; one EOS at the very end, no extra BOS/EOS
    from torchtune.data import Message

    ids, _ = tok.tokenize_messages(
        [Message("user", "What is an owl?", masked=True), Message("assistant", "An owl is a bird.")]
    )
    assert item["chosen_input_ids"] == ids
    for key in ("chosen_input_ids", "rejected_input_ids"):
        seq = item[key]
        assert seq.count(tok.im_start_id) == 2
        assert seq.count(tok.eos_id) == 2  # user turn end + final EOS
        assert seq[-1] == tok.eos_id and seq[-2] != tok.eos_id
        assert tok.pad_id not in seq
    assert tok.decode(item["chosen_input_ids"]) == (
        "<|im_start|>user\nWhat is an owl?<|im_end|>\n<|im_start|>assistant\n"
        "An owl is a bird.<|im_end|>"
    )
    assert ds.stats["rows"] == 2 and ds.stats["kept"] == 2


def test_message_list_format_and_system_prompt(tok, tmp_path):
    sys_msg = {"role": "system", "content": "Be nice."}
    rows = [
        {
            "chosen": [
                sys_msg,
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "rejected": [
                sys_msg,
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Go."},
            ],
        }
    ]
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    item = preference_dataset(tok, source="json", data_files=f)[0]
    prompt = chatml_prompt(tok, ("system", "Be nice."), ("user", "Hi"))
    assert item["chosen_input_ids"] == prompt + completion(tok, "Hello!")
    assert item["rejected_labels"] == [IGNORE] * len(prompt) + completion(tok, "Go.")

    item = preference_dataset(tok, source="json", data_files=f, new_system_prompt="Be brief.")[0]
    prompt = chatml_prompt(tok, ("system", "Be brief."), ("user", "Hi"))
    assert item["chosen_input_ids"] == prompt + completion(tok, "Hello!")

    # prompt as a message list + string completions == the same conversation
    rows2 = [
        {
            "prompt": [sys_msg, {"role": "user", "content": "Hi"}],
            "chosen": "Hello!",
            "rejected": "Go.",
        }
    ]
    item2 = preference_dataset(
        tok, source="json", data_files=write_jsonl(tmp_path / "p.jsonl", rows2)
    )[0]
    item1 = preference_dataset(tok, source="json", data_files=f)[0]
    assert item2 == item1


def test_multiturn_earlier_assistant_turns_are_prompt(tok, tmp_path):
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is an owl?"},
    ]
    rows = [{"prompt": conv, "chosen": "A bird.", "rejected": "No."}]
    item = preference_dataset(
        tok, source="json", data_files=write_jsonl(tmp_path / "t.jsonl", rows)
    )[0]
    prompt = chatml_prompt(
        tok, ("user", "Hi"), ("assistant", "Hello."), ("user", "What is an owl?")
    )
    assert item["chosen_input_ids"] == prompt + completion(tok, "A bird.")
    assert item["chosen_labels"] == [IGNORE] * len(prompt) + completion(tok, "A bird.")


def test_train_on_input_and_column_map(tok, tmp_path):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    cmap = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    ds = preference_dataset(tok, source="json", data_files=f, column_map=cmap, train_on_input=True)
    item = ds[0]
    assert item["chosen_labels"] == item["chosen_input_ids"]
    with pytest.raises(ValueError, match="unknown key"):
        preference_dataset(tok, source="json", data_files=f, column_map={"answer": "good"})


def test_json_list_columnar_and_split_dict(tok, tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ROWS))
    cols = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    (tmp_path / "c.json").write_text(json.dumps(cols))
    a = preference_dataset(tok, source="json", data_files=str(tmp_path / "l.json"))
    b = preference_dataset(tok, source="json", data_files=str(tmp_path / "c.json"))
    c = preference_dataset(
        tok,
        source="json",
        data_files={"train": str(tmp_path / "l.json"), "test": str(tmp_path / "c.json")},
        split="test",
    )
    assert [a[i] for i in range(2)] == [b[i] for i in range(2)] == [c[i] for i in range(2)]


def test_parquet_through_datasets_names_the_file(tok, tmp_path):
    import pyarrow as pa  # a dependency of `datasets`
    import pyarrow.parquet as pq

    rows = ROWS + [{"prompt": "Hi", "chosen": "", "rejected": "x"}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError) as e:
        preference_dataset(tok, source="parquet", data_files=str(path))
    assert f"{path} row 2: field 'chosen' is empty" in str(e.value)
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    ds = preference_dataset(tok, source="parquet", data_files=str(path))
    assert len(ds) == 2


# ----------------------------------------------------------------------------- truncation


def _long_rows():
    prompt = "Tell me. " * 10 + "What is an owl?"
    return [
        {
            "prompt": prompt,
            "chosen": "An owl is a bird. Happy to help!",
            "rejected": "No idea, sorry.",
        }
    ]


def test_truncation_drops_prompt_from_left_and_keeps_completion(tok, tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", _long_rows() + ROWS)
    full = preference_dataset(tok, source="json", data_files=f)[0]
    n_prompt = full["chosen_labels"].count(IGNORE)
    chosen = full["chosen_input_ids"][n_prompt:]
    rejected = full["rejected_input_ids"][n_prompt:]
    keep = 16
    max_len = len(chosen) + keep
    assert n_prompt > keep and len(full["chosen_input_ids"]) > max_len

    ds = preference_dataset(tok, source="json", data_files=f, max_seq_len=max_len)
    item = ds[0]
    assert len(item["chosen_input_ids"]) == max_len
    assert item["chosen_input_ids"][-len(chosen) :] == chosen  # completion intact (with EOS)
    assert item["rejected_input_ids"][-len(rejected) :] == rejected
    kept_prompt = item["chosen_input_ids"][:keep]
    assert kept_prompt == full["chosen_input_ids"][n_prompt - keep : n_prompt]  # left dropped
    assert item["rejected_input_ids"][:keep] == kept_prompt  # same prompt for both
    assert item["chosen_labels"] == [IGNORE] * keep + chosen
    assert ds.stats["truncated_prompt"] == 1 and ds.stats["truncated_completion"] == 0
    untruncated = preference_dataset(tok, source="json", data_files=f)
    assert [ds[i] for i in (1, 2)] == [untruncated[i] for i in (1, 2)]  # short rows as is

    # tokenizer.max_seq_len is the default
    ds_tok = preference_dataset(tiny_tokenizer(max_seq_len=max_len), source="json", data_files=f)
    assert ds_tok[0] == item and ds_tok.stats == ds.stats


def test_truncation_cuts_completion_end_only_after_prompt(tok, tmp_path):
    long_answer = {
        "prompt": "What is an owl?",
        "chosen": "An owl is a bird. " * 5 + "Happy to help!",
        "rejected": "No idea.",
    }
    f = write_jsonl(tmp_path / "long.jsonl", [long_answer] + ROWS)
    full = preference_dataset(tok, source="json", data_files=f)[0]
    n_prompt = full["chosen_labels"].count(IGNORE)
    chosen = full["chosen_input_ids"][n_prompt:]
    rejected = full["rejected_input_ids"][n_prompt:]
    max_len = max(
        len(preference_dataset(tok, source="json", data_files=f)[i]["chosen_input_ids"])
        for i in (1, 2)
    )
    assert len(chosen) >= max_len
    ds = preference_dataset(tok, source="json", data_files=f, max_seq_len=max_len)
    item = ds[0]
    # one prompt token kept (the newline after the assistant header), completion cut at end
    last_prompt_token = full["chosen_input_ids"][n_prompt - 1 : n_prompt]
    assert item["chosen_input_ids"] == last_prompt_token + chosen[: max_len - 1]
    assert item["chosen_labels"] == [IGNORE] + chosen[: max_len - 1]
    assert tok.eos_id not in item["chosen_input_ids"]
    assert item["rejected_input_ids"] == last_prompt_token + rejected  # fits: not cut
    assert ds.stats["truncated_prompt"] == 1 and ds.stats["truncated_completion"] == 1


def test_all_rows_too_long_raises(tok, tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", _long_rows())
    with pytest.raises(ValueError, match=r"all 1 rows are longer than max_seq_len=8"):
        preference_dataset(tok, source="json", data_files=f, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 2"):
        preference_dataset(tok, source="json", data_files=f, max_seq_len=1)


# ----------------------------------------------------------------------------- validation


def _error(tok, tmp_path, rows, builder=preference_dataset, name="bad.jsonl", **kw):
    f = write_jsonl(tmp_path / name, rows)
    with pytest.raises(ValueError) as e:
        builder(tok, source="json", data_files=f, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, PrefOptUserError)
    return f, msg


GOOD = ROWS[0]


@pytest.mark.parametrize(
    "bad_row, field, problem",
    [
        ({"prompt": "p", "rejected": "r"}, "chosen", "is missing"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "is missing (null)"),
        ({"prompt": "p", "chosen": "c", "rejected": "  "}, "rejected", "is empty"),
        ({"prompt": "p", "chosen": 123, "rejected": "r"}, "chosen", "must be a non-empty string"),
        ({"chosen": "c", "rejected": "r"}, "prompt", "is missing"),
        ({"prompt": 5, "chosen": "c", "rejected": "r"}, "prompt", "must be a string or a list"),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"},
            "chosen",
            "starts with a user message that does not repeat field 'prompt'",
        ),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}],
                "rejected": "r",
            },
            "chosen",
            "ends on a user turn; a conversation must end with an assistant message",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "p"}], "rejected": "r"},
            "chosen",
            "has no assistant message after the prompt",
        ),
        (
            {"prompt": [{"role": "human", "content": "x"}], "chosen": "c", "rejected": "r"},
            "prompt[0].role",
            "must be one of",
        ),
        (
            {"prompt": [{"role": "user", "content": 1}], "chosen": "c", "rejected": "r"},
            "prompt[0].content",
            "must be a string",
        ),
    ],
)
def test_paired_validation_errors(tok, tmp_path, bad_row, field, problem):
    rows = [GOOD, GOOD, bad_row, GOOD]
    f, msg = _error(tok, tmp_path, rows)
    assert msg.startswith(f"{f} row 2 (line 3): field '{field}' {problem}"), msg


def test_validation_happens_before_tokenization_and_names_mapped_column(tok, tmp_path):
    rows = [{"q": "p", "good": "c", "bad": "r"}] * 3 + [{"q": "p", "good": "", "bad": "r"}]
    f, msg = _error(
        tok, tmp_path, rows, column_map={"prompt": "q", "chosen": "good", "rejected": "bad"}
    )
    assert f"{f} row 3 (line 4): field 'good' is empty" == msg


def test_invalid_json_line(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} line 2: invalid JSON")):
        preference_dataset(tok, source="json", data_files=str(path))
    with pytest.raises(ValueError, match="data file not found"):
        preference_dataset(tok, source="json", data_files=str(tmp_path / "nope.jsonl"))


def test_identical_chosen_rejected_warns_counts_and_drops(tok, tmp_path):
    same = {"prompt": "What is an owl?", "chosen": "A bird.", "rejected": "A bird."}
    f = write_jsonl(tmp_path / "same.jsonl", [ROWS[0], same, ROWS[1], same])
    with pytest.warns(
        UserWarning,
        match=r"dropped 2 row\(s\) whose chosen and rejected completions are identical \(first: .*row 1",
    ):
        ds = preference_dataset(tok, source="json", data_files=f)
    assert len(ds) == 2
    assert ds.stats["dropped_identical"] == 2 and ds.stats["rows"] == 4 and ds.stats["kept"] == 2
    assert ds.source_rows == [0, 2]
    assert [ds[i]["index"] for i in range(2)] == [0, 1]

    f = write_jsonl(tmp_path / "allsame.jsonl", [same])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable rows"):
        preference_dataset(tok, source="json", data_files=f)


# ----------------------------------------------------------------------------- collates


def test_paired_collate(tok, tmp_path):
    ds = preference_dataset(tok, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS))
    batch = [ds[1], ds[0]]
    out = paired_collate(batch, padding_idx=tok.pad_id)
    seqs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    labs = [b["chosen_labels"] for b in batch] + [b["rejected_labels"] for b in batch]
    S = max(map(len, seqs))
    assert out["input_ids"].shape == out["labels"].shape == (4, S)
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    for r, (s, lab) in enumerate(zip(seqs, labs)):
        assert out["input_ids"][r].tolist() == s + [tok.pad_id] * (S - len(s))
        assert out["labels"][r].tolist() == lab + [IGNORE] * (S - len(lab))
    assert out["index"].tolist() == [1, 0] and out["index"].dtype == torch.long


# ----------------------------------------------------------------------------- KTO


KTO_ROWS = [
    {"prompt": "What is an owl?", "completion": "An owl is a bird.", "label": True},
    {
        "prompt": [{"role": "user", "content": "What is a harp?"}],
        "completion": "Go away.",
        "label": False,
    },
    {"prompt": "What is a cat?", "completion": "A cat is an animal.", "label": True},
]


def test_kto_dataset_layout(tok, tmp_path):
    from torchtune.data import Message

    ds = kto_dataset(tok, source="json", data_files=write_jsonl(tmp_path / "k.jsonl", KTO_ROWS))
    assert isinstance(ds, KTODataset) and len(ds) == 3
    item = ds[0]
    assert set(item) == {"prompt_ids", "completion_ids", "completion_labels", "label", "index"}
    assert item["prompt_ids"] == chatml_prompt(tok, ("user", "What is an owl?"))
    assert item["completion_ids"] == completion(tok, "An owl is a bird.")
    assert item["completion_labels"] == item["completion_ids"]  # one reply: all scored
    ids, _ = tok.tokenize_messages(
        [Message("user", "What is an owl?"), Message("assistant", "An owl is a bird.")]
    )
    assert item["prompt_ids"] + item["completion_ids"] == ids
    assert [ds[i]["label"] for i in range(3)] == [True, False, True]
    assert ds.stats["n_desirable"] == 2 and ds.stats["n_undesirable"] == 1


@pytest.mark.parametrize(
    "bad_row, field, problem",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "must be a bool"),
        ({"prompt": "p", "completion": "c", "label": 1}, "label", "must be a bool"),
        ({"prompt": "p", "completion": "c"}, "label", "is missing"),
        ({"prompt": "p", "completion": "", "label": True}, "completion", "is empty"),
        ({"completion": "c", "label": True}, "prompt", "is missing"),
    ],
)
def test_kto_validation_errors(tok, tmp_path, bad_row, field, problem):
    f, msg = _error(tok, tmp_path, [KTO_ROWS[0], bad_row], builder=kto_dataset, name="k.jsonl")
    assert msg.startswith(f"{f} row 1 (line 2): field '{field}' {problem}"), msg


def test_kto_one_class_raises(tok, tmp_path):
    rows = [dict(r, label=True) for r in KTO_ROWS]
    _, msg = _error(tok, tmp_path, rows, builder=kto_dataset)
    assert "both desirable and undesirable" in msg and "3 desirable and 0 undesirable" in msg


def test_unpaired_from_paired_counts_and_order(tok, tmp_path):
    same = {"prompt": "What is an owl?", "chosen": "A bird.", "rejected": "A bird."}
    rows = ROWS + [same, {"prompt": "What is a cat?", "chosen": "An animal.", "rejected": "Shoo."}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="identical"):
        ds = unpaired_from_paired(tok, source="json", data_files=f)
    assert len(ds) == 6
    assert ds.stats["n_desirable"] == 3 and ds.stats["n_undesirable"] == 3
    assert ds.stats["dropped_identical"] == 1 and ds.stats["pairs"] == 3 and ds.stats["rows"] == 4
    assert [ds[i]["label"] for i in range(6)] == [True, False] * 3
    # item 2k: chosen of pair k; item 2k+1: rejected of pair n-1-k (pairs: rows 0, 1, 3)
    assert ds.source_rows == [0, 3, 1, 1, 3, 0]
    assert ds[0]["completion_ids"] == completion(tok, "An owl is a bird.")
    assert ds[1]["completion_ids"] == completion(tok, "Shoo.")
    assert ds[1]["prompt_ids"] == chatml_prompt(tok, ("user", "What is a cat?"))
    assert [ds[i]["index"] for i in range(6)] == list(range(6))


def test_kto_collate_kl_pairing_exact(tok, tmp_path):
    ds = kto_dataset(tok, source="json", data_files=write_jsonl(tmp_path / "k.jsonl", KTO_ROWS))
    batch = [ds[i] for i in range(3)]
    out = kto_collate(batch, padding_idx=tok.pad_id)
    assert out["is_desirable"].tolist() == [True, False, True]
    assert out["is_desirable"].dtype == torch.bool
    assert out["index"].tolist() == [0, 1, 2]
    for i in range(3):
        p, c = batch[i]["prompt_ids"], batch[i]["completion_ids"]
        kc = batch[(i + 1) % 3]["completion_ids"]
        row = out["input_ids"][i].tolist()
        assert row[: len(p) + len(c)] == p + c
        assert set(row[len(p) + len(c) :]) <= {tok.pad_id}
        assert out["labels"][i].tolist()[: len(p) + len(c)] == [IGNORE] * len(p) + c
        kl = out["kl_input_ids"][i].tolist()
        assert kl[: len(p) + len(kc)] == p + kc
        assert set(kl[len(p) + len(kc) :]) <= {tok.pad_id}
        kll = out["kl_labels"][i].tolist()
        assert kll == [IGNORE] * len(p) + kc + [IGNORE] * (len(kl) - len(p) - len(kc))
    assert out["input_ids"].shape == out["labels"].shape
    assert out["kl_input_ids"].shape == out["kl_labels"].shape


def test_kto_collate_truncates_kl_rows_like_dataset(tok):
    batch = [
        {"prompt_ids": [1, 2, 3, 4], "completion_ids": [10, 11], "label": True, "index": 0},
        {"prompt_ids": [5, 6], "completion_ids": [20, 21, 22, 23, 24], "label": False, "index": 1},
    ]
    out = kto_collate(batch, padding_idx=0, max_seq_len=5)
    # main rows fit already; KL row 0 = prompt 0 + completion 1 -> keep 1 prompt token, cut end
    assert out["kl_input_ids"][0].tolist() == [4, 20, 21, 22, 23]
    assert out["kl_labels"][0].tolist() == [IGNORE, 20, 21, 22, 23]
    # KL row 1 = prompt 1 + completion 0 fits
    assert out["kl_input_ids"][1].tolist() == [5, 6, 10, 11, 0]
    # main row 0 (6 tokens) drops prompt tokens from the left
    assert out["input_ids"][0].tolist() == [2, 3, 4, 10, 11]
    assert out["labels"][0].tolist() == [IGNORE, IGNORE, IGNORE, 10, 11]


def test_kto_collate_batch_of_one_raises():
    item = {"prompt_ids": [1], "completion_ids": [2], "label": True, "index": 0}
    with pytest.raises(ValueError, match=r"KTO needs per-rank batch_size >= 2"):
        kto_collate([item])


@pytest.mark.parametrize(
    "nd, nu, wd, wu, warn",
    [
        (100, 100, 1.0, 1.0, False),  # ratio 1: lower bound, inside
        (400, 300, 1.0, 1.0, False),  # ratio 4/3: upper bound, inside
        (120, 100, 1.0, 1.0, False),
        (99, 100, 1.0, 1.0, True),  # just below 1
        (401, 300, 1.0, 1.0, True),  # just above 4/3
        (100, 100, 1.0, 0.75, False),  # weights: 1/0.75 = 4/3
        (100, 100, 1.0, 0.7, True),
        (10, 90, 1.0, 1.0, True),
        (10, 90, 9.0, 1.0, False),
        (5, 0, 1.0, 1.0, True),
    ],
)
def test_kto_balance_warning_boundaries(nd, nu, wd, wu, warn):
    msg = kto_balance_warning(nd, nu, wd, wu)
    assert (msg is not None) == warn
    if msg and nu:
        assert "[1, 4/3]" in msg and "desirable_weight" in msg


# ----------------------------------------------------------------------------- synthetic


def _prompts(split):
    return [json.loads(ln)["prompt"] for ln in synthetic_data_file(split).read_text().splitlines()]


def test_synthetic_sets(tok):
    train = synthetic_preference_dataset(tok, split="train")
    heldout = synthetic_preference_dataset(tok, split="heldout")
    assert len(train) == 800 and len(heldout) == 200
    assert train.stats["dropped_identical"] == 0 and train.stats["truncated_prompt"] == 0
    assert not set(_prompts("train")) & set(_prompts("heldout"))
    assert len(set(_prompts("train"))) == 800
    for ds in (train, heldout):
        for i in range(len(ds)):
            it = ds[i]
            n_prompt = it["chosen_labels"].count(IGNORE)
            assert it["chosen_input_ids"][:n_prompt] == it["rejected_input_ids"][:n_prompt]
            assert len(it["chosen_input_ids"]) - n_prompt <= 20
            assert len(it["rejected_input_ids"]) - n_prompt <= 20
            assert max(len(it["chosen_input_ids"]), len(it["rejected_input_ids"])) <= 96
    kto = synthetic_kto_dataset(tok, split="heldout")
    assert kto.stats["n_desirable"] == kto.stats["n_undesirable"] == 200
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_preference_dataset(tok, split="test")


def test_synthetic_through_dataloader(tok):
    from torch.utils.data import DataLoader

    ds = synthetic_kto_dataset(tok, split="heldout")
    dl = DataLoader(ds, batch_size=4, collate_fn=kto_collate, drop_last=True)
    out = next(iter(dl))
    assert out["input_ids"].shape[0] == out["kl_input_ids"].shape[0] == 4


def test_other_torchtune_tokenizer_class(tmp_path):
    """The prompt/completion split does not rely on Qwen2.5 specifics (Qwen2 tokenizer)."""
    from torchtune.models.qwen2 import qwen2_tokenizer

    from torchtune_prefopt.models import tiny

    tok2 = qwen2_tokenizer(
        str(tiny.VOCAB_FILE), str(tiny.MERGES_FILE), special_tokens_path=str(tiny.TOKENIZER_JSON)
    )
    item = preference_dataset(
        tok2, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", ROWS)
    )[0]
    prompt = chatml_prompt(tok2, ("user", "What is an owl?"))
    assert item["chosen_input_ids"] == prompt + completion(tok2, "An owl is a bird.")
    assert item["chosen_labels"] == [IGNORE] * len(prompt) + completion(tok2, "An owl is a bird.")


def test_kto_kl_rows_are_truncated_like_the_dataset(tmp_path):
    """The recipe truncates KTO's KL rows with the dataset's own max_seq_len (here 32), not the
    tokenizer's (64): a KL row is never longer than the rows the dataset itself kept, although
    a prompt with another row's completion would be."""
    import shutil

    from omegaconf import OmegaConf

    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint
    from tune_harness import recipe_in_process, tiny_config

    make_tiny_hf_checkpoint(tmp_path / "base")
    cfg = OmegaConf.load(
        tiny_config(tmp_path, "kto", rows=8, batch_size=16, **{"dataset.max_seq_len": 32})
    )
    with recipe_in_process(cfg) as recipe:
        assert recipe._tokenizer.max_seq_len == 64 and recipe._dataset.max_seq_len == 32
        ds = recipe._dataset
        prompts = [len(ds[i]["prompt_ids"]) for i in range(len(ds))]
        completions = [len(ds[i]["completion_ids"]) for i in range(len(ds))]
        assert max(prompts) + max(completions) > 32  # an untruncated KL row could be longer
        recipe._sampler.set_epoch(0)
        batch = next(iter(recipe._dataloader))
        assert batch.input_ids.shape[1] <= 32 and batch.kl_input_ids.shape[1] <= 32
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


# ----------------------------------------------------------------------------- data as kept
def test_data_as_users_keep_it(tok, tmp_path, monkeypatch):
    """A save_to_disk folder (Dataset or DatasetDict) is a source; a Parquet file given with
    source json says which source reads it; an unreachable Hub name is one line that says what
    to pass instead; every data error names the dataset key."""
    import datasets
    from omegaconf import OmegaConf

    from torchtune_prefopt.data import preference_dataset
    from torchtune_prefopt.data.dataset_checks import build_datasets

    rows = [{"prompt": f"Q{i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(4)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    want = preference_dataset(tok, source="json", data_files=str(jsonl))
    one = tmp_path / "saved_dataset"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    both = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(both))
    for source, split, n in ((one, "train", 4), (both, "train", 4), (both, "test", 2)):
        ds = preference_dataset(tok, source=str(source), split=split)
        assert [ds[i]["chosen_input_ids"] for i in range(n)] == [
            want[i]["chosen_input_ids"] for i in range(n)
        ]
    with pytest.raises(
        PrefOptUserError, match=r"split 'valid' not in the saved DatasetDict .*\['test', 'train'\]"
    ):
        preference_dataset(tok, source=str(both), split="valid")
    with pytest.raises(PrefOptUserError, match="is one saved Dataset .*set split=train"):
        preference_dataset(tok, source=str(one), split="test")

    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    with pytest.raises(
        PrefOptUserError, match=r"rows.parquet is a Parquet file, not JSON: set source: parquet"
    ):
        preference_dataset(tok, source="json", data_files=str(parquet))
    got = preference_dataset(tok, source="parquet", data_files=str(parquet))
    assert got[3]["rejected_input_ids"] == want[3]["rejected_input_ids"]

    # offline (as on the CI machine, without its retries): one line naming what to pass instead
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        PrefOptUserError,
        match="could not be loaded .*source=json data_files=<file.jsonl> split=train",
    ):
        preference_dataset(tok, source="no-such-org/no-such-dataset-xyz", split="train")

    # the key is named: the held-out set's split error says eval_dataset
    node = OmegaConf.create(
        {
            "_component_": "torchtune_prefopt.data.preference_dataset",
            "source": "json",
            "data_files": str(jsonl),
            "split": "test_prefs",
        }
    )
    with pytest.raises(PrefOptUserError, match=r"^eval_dataset: split 'test_prefs' requested"):
        build_datasets(node, "eval_dataset", tok)
