#!/usr/bin/env python
"""Generate the bundled tiny assets (deterministic; no network, no download).

Writes

* ``torchtune_prefopt/data/assets/synthetic/{train,heldout}.jsonl``: a small, learnable
  synthetic preference set (prompt / chosen / rejected strings);
* ``torchtune_prefopt/models/assets/tiny/{vocab.json,merges.txt,tokenizer.json}``: a
  byte-level BPE tokenizer trained with the ``tokenizers`` library on Qwen2's
  pre-tokenizer regex, with the Qwen2.5 special tokens appended right after the small vocab.

Usage::

    python scripts/make_tiny_assets.py            # (re)write the committed assets
    python scripts/make_tiny_assets.py --check    # exit 1 if the committed assets differ
    python scripts/make_tiny_assets.py --out DIR  # write under DIR instead of the repo

The synthetic rule. A user (greeting + question) asks what kind of thing an item is; items
come from 6 categories with a fixed item -> category mapping. The chosen answer names the
right category and ends with a courteous phrase. The rejected answer has one systematic
defect, alternating by row: rude (right category, rude closing phrase) or unhelpful (no
answer). Held-out rows use (question template, item) pairs never seen in training, so the
held-out prompts are disjoint from the training prompts while every item and every template
appears in training. (A "wrong category" defect was tried and dropped: a 2-layer 64-dim
model does not learn the item -> category mapping well enough in ~100 DPO steps to
generalise to held-out prompts; the two surface defects are learned to ~100% held-out
reward accuracy.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path("torchtune_prefopt/data/assets/synthetic")
TOKENIZER_DIR = Path("torchtune_prefopt/models/assets/tiny")

SEED = 20240601
N_TRAIN = 800
N_HELDOUT = 200
# Byte-level BPE size *before* the special tokens (includes the 256 byte symbols).
BPE_VOCAB_SIZE = 768

# Same pattern as torchtune.models.qwen2._tokenizer.PRETOKENIZE_REGEX (and Qwen2's
# tokenizer.json). Kept literal here so the script documents exactly what it trains on;
# a test checks it equals torchtune's.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names (and order) of torchtune's QWEN2_5_SPECIAL_TOKENS; appended after the BPE vocab.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

CATEGORIES: Dict[str, List[str]] = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "animal": ["cat", "dog", "horse", "rabbit", "tiger", "zebra", "mouse", "sheep"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tram"],
    "tool": ["hammer", "wrench", "saw", "drill", "shovel", "chisel", "screwdriver", "axe"],
    "instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello"],
    "bird": ["eagle", "owl", "parrot", "robin", "crow", "swan", "duck", "penguin"],
}

GREETINGS = [
    "Hi!",
    "Hello.",
    "Hey there.",
    "Good morning.",
    "Good evening.",
    "Quick question.",
    "Hi, I am Sam.",
    "Hi, I am Ana.",
    "Hello, I am Leo.",
    "Hello, I am Mia.",
    "Hey, I am Tom.",
    "Hey, I am Zoe.",
    "Sorry to bother you.",
    "I need some help.",
    "I am curious.",
    "Excuse me.",
]

QUESTIONS = [
    "What kind of thing is {a_item}?",
    "Can you tell me what {a_item} is?",
    "Which category does the word {item} belong to?",
    "I keep hearing about {a_item}. What is it?",
    "Please classify this word: {item}.",
]

POLITE = ["Happy to help!", "Hope this helps!", "Thanks for asking!"]
RUDE = ["Stop bothering me.", "Figure it out yourself.", "What a dumb question."]
UNHELPFUL = ["I do not know what {a_item} is.", "No idea, sorry.", "I cannot answer that."]

# A little generic text so that ordinary English (and the chat template) tokenizes compactly.
GENERIC_TEXT = """\
system
user
assistant
You are a helpful assistant.
You are a helpful and polite assistant. Answer briefly.
The quick brown fox jumps over the lazy dog.
Hello world! How are you today? I am fine, thank you.
What is the capital of France? The capital of France is Paris.
Please write a short answer. Here is the answer: yes, no, maybe.
0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 1,000
Preference optimization compares a chosen response with a rejected response.
The model should prefer the better answer and avoid the worse one.
This is a test of the tokenizer. It should round-trip any text, including emoji and accents.
"""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{_article(word)} {word}"


def _answer(item: str, category: str, closing: str) -> str:
    first = _a(item)
    return f"{first[0].upper()}{first[1:]} is {_a(category)}. {closing}"


def item_category() -> Dict[str, str]:
    return {item: cat for cat, items in CATEGORIES.items() for item in items}


def split_pairs(rng: random.Random) -> Tuple[List[Tuple[int, str]], List[Tuple[int, str]]]:
    """(template index, item) pairs: exactly one held-out template per item."""
    train, heldout = [], []
    for items in CATEGORIES.values():
        for item in items:
            held = rng.randrange(len(QUESTIONS))
            for t in range(len(QUESTIONS)):
                (heldout if t == held else train).append((t, item))
    return train, heldout


def _rows(pairs: Sequence[Tuple[int, str]], n: int, rng: random.Random) -> List[Dict[str, str]]:
    cats = item_category()
    all_prompts = [(g, t, item) for t, item in pairs for g in range(len(GREETINGS))]
    if n > len(all_prompts):
        raise ValueError(f"asked for {n} rows but only {len(all_prompts)} distinct prompts")
    chosen_prompts = rng.sample(all_prompts, n)
    rows = []
    for k, (g, t, item) in enumerate(chosen_prompts):
        category = cats[item]
        prompt = f"{GREETINGS[g]} " + QUESTIONS[t].format(item=item, a_item=_a(item))
        chosen = _answer(item, category, rng.choice(POLITE))
        if k % 2 == 0:  # defect: rude (right category, rude closing)
            rejected = _answer(item, category, rng.choice(RUDE))
            defect = "rude"
        else:  # defect: unhelpful (no answer at all)
            rejected = rng.choice(UNHELPFUL).format(a_item=_a(item))
            defect = "unhelpful"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "defect": defect})
    return rows


def make_synthetic_rows() -> Dict[str, List[Dict[str, str]]]:
    rng = random.Random(SEED)
    train_pairs, heldout_pairs = split_pairs(rng)
    return {
        "train": _rows(train_pairs, N_TRAIN, rng),
        "heldout": _rows(heldout_pairs, N_HELDOUT, rng),
    }


def _jsonl(rows: List[Dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def tokenizer_training_text(splits: Dict[str, List[Dict[str, str]]]) -> List[str]:
    texts = GENERIC_TEXT.splitlines()
    for name in ("train", "heldout"):
        for row in splits[name]:
            texts.extend([row["prompt"], row["chosen"], row["rejected"]])
    return texts


def train_tokenizer(texts: List[str]):
    """Byte-level BPE on the Qwen2 split regex; special tokens appended after the vocab."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(base, base + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens did not land right after the vocab: {ids}")
    return tok


def write_assets(out_root: Path) -> Dict[str, int]:
    out_root = Path(out_root)
    splits = make_synthetic_rows()
    data_dir = out_root / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (data_dir / f"{name}.jsonl").write_text(_jsonl(rows), encoding="utf-8")

    tok = train_tokenizer(tokenizer_training_text(splits))
    tok_dir = out_root / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"), pretty=True)
    # vocab.json / merges.txt in the layout torchtune's Qwen2Tokenizer reads.
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text(encoding="utf-8"))
        merges = (Path(tmp) / "merges.txt").read_text(encoding="utf-8")
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (tok_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    (tok_dir / "merges.txt").write_text(merges, encoding="utf-8")
    return {
        "bpe_vocab": len(vocab),
        "total_vocab": tok.get_vocab_size(with_added_tokens=True),
        "train_rows": len(splits["train"]),
        "heldout_rows": len(splits["heldout"]),
    }


ASSET_FILES = [
    DATA_DIR / "train.jsonl",
    DATA_DIR / "heldout.jsonl",
    TOKENIZER_DIR / "vocab.json",
    TOKENIZER_DIR / "merges.txt",
    TOKENIZER_DIR / "tokenizer.json",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO, help="root to write under")
    p.add_argument("--check", action="store_true", help="compare with the committed assets")
    args = p.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            info = write_assets(Path(tmp))
            bad = [
                str(f)
                for f in ASSET_FILES
                if (Path(tmp) / f).read_bytes() != (REPO / f).read_bytes()
            ]
        if bad:
            print("assets differ from a fresh generation: " + ", ".join(bad), file=sys.stderr)
            return 1
        print(f"assets up to date: {info}")
        return 0
    info = write_assets(args.out)
    print(f"wrote assets under {args.out}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
