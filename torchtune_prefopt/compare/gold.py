"""Gold rewards for the frontier: a bundled controlled task, Bradley-Terry labelling, and
user-supplied gold rewards (a Python callable or a local HF reward model).

A *gold reward* is any ``r*(prompt: str, response: str) -> float`` (bundled: the list task's
below, and :class:`SentimentReward` for sentiment-controlled generation on a real model) (the prompt is the user
message, the response the decoded completion without stop tokens). Objects with a batched
``score(prompts, responses) -> list[float]`` method are called through it
(:func:`score_responses`).

**The bundled task** (:class:`ListTask`, no download): the user asks for things of one
category ("Name some birds."), the answer is a space-separated list of items. The gold
reward of an answer ``y = w_1 ... w_n`` to a prompt about category ``c`` is::

    r*(x, y) = sum_{distinct w in c} 1  -  #{w_i not in c}  -  #{repeats of a word in c}
               + length_bonus * min(n, target_words)  -  overlong_penalty * max(0, n - target_words)
    r*(x, "") = -empty_penalty   (no word at all: refusing to answer is not free)

So on-topic, distinct words pay; off-topic words and repeats cost (repeating one token
cannot max it); and length itself is rewarded up to ``target_words`` and punished beyond,
the trade-off a length-exploiting policy (DPO's known length drift) runs into, and one
SimPO's length normalisation changes. The maximum is ``target_words * (1 + length_bonus)``:
exactly ``target_words`` distinct on-topic words.

The *base distribution* the SFT model learns (:meth:`ListTask.sample_base`): ``n`` uniform
in ``1..base_max_words``, each word on-topic with probability ``base_on_topic`` (uniform over
the category, with replacement) and otherwise uniform over the other categories' items.

**Labelling** (:func:`bradley_terry_label`): the pair ``(a, b)`` is ordered with
``P(a > b) = sigmoid(bt_scale * (r*(a) - r*(b)))``; ``bt_scale = None`` labels
deterministically (the higher reward wins, ties by a coin), small ``bt_scale`` is noisy.
"""

from __future__ import annotations

import importlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "LIST_CATEGORIES",
    "ListTask",
    "RewardModel",
    "SentimentReward",
    "bradley_terry_label",
    "build_gold_reward",
    "list_task_reward",
    "score_responses",
]

#: category (as asked in the prompt, plural) -> items; every item is one token of the tiny
#: tokenizer when it follows a space
LIST_CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"),
    "animals": ("cat", "dog", "horse", "rabbit", "tiger", "zebra", "mouse", "sheep"),
    "vehicles": ("car", "bus", "truck", "bicycle", "train", "boat", "plane", "tram"),
    "tools": ("hammer", "wrench", "saw", "drill", "shovel", "chisel", "screwdriver", "axe"),
    "instruments": ("piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello"),
    "birds": ("eagle", "owl", "parrot", "robin", "crow", "swan", "duck", "penguin"),
}

TRAIN_TEMPLATES = (
    "Name some {c}.",
    "List a few {c}.",
    "Give me some {c}.",
    "Which {c} do you know?",
    "Tell me some {c}, please.",
    "Can you list {c}?",
)
HELDOUT_TEMPLATES = ("Please name a few {c}.", "What {c} can you think of?")


@dataclass(frozen=True)
class ListTask:
    """The bundled controlled task (see the module docstring for the reward and the base
    distribution). Every number that defines it is a field, recorded in the task manifest."""

    target_words: int = 4
    length_bonus: float = 0.5
    overlong_penalty: float = 1.5
    empty_penalty: float = 2.0
    base_max_words: int = 7
    base_on_topic: float = 0.5
    categories: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(LIST_CATEGORIES))

    def __post_init__(self):
        if self.target_words < 1 or self.base_max_words < 1:
            raise ValueError("target_words and base_max_words must be >= 1")
        if not 0.0 <= self.base_on_topic <= 1.0:
            raise ValueError(f"base_on_topic must be in [0, 1], got {self.base_on_topic}")

    def settings(self) -> Dict[str, Any]:
        d = asdict(self)
        d["categories"] = {k: list(v) for k, v in self.categories.items()}
        return d

    # ------------------------------------------------------------------ prompts
    def prompts(self, split: str = "train") -> List[str]:
        """Every prompt of a split: each template x each category (held-out templates are
        never seen in training)."""
        templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}[split]
        return [t.format(c=c) for t in templates for c in self.categories]

    def category(self, prompt: str) -> str:
        """The category a prompt asks for (the one category word it contains)."""
        found = [c for c in self.categories if c in prompt.lower()]
        if len(found) != 1:
            raise ValueError(f"prompt names {len(found)} task categories: {prompt!r}")
        return found[0]

    # ------------------------------------------------------------------ reward
    def reward(self, prompt: str, response: str) -> float:
        """``r*(prompt, response)`` (module docstring)."""
        on_topic = set(self.categories[self.category(prompt)])
        words = [w.strip(".,;:!?").lower() for w in response.split()]
        words = [w for w in words if w]
        n = len(words)
        if n == 0:
            return -float(self.empty_penalty)
        hits = [w for w in words if w in on_topic]
        distinct = len(set(hits))
        off = n - len(hits)
        repeats = len(hits) - distinct
        return float(
            distinct
            - off
            - repeats
            + self.length_bonus * min(n, self.target_words)
            - self.overlong_penalty * max(0, n - self.target_words)
        )

    __call__ = reward

    def max_reward(self) -> float:
        return self.target_words * (1.0 + self.length_bonus)

    # ------------------------------------------------------------------ base distribution
    def sample_base(self, prompt: str, rng: random.Random) -> str:
        """One answer from the base distribution the SFT model is trained on."""
        cat = self.category(prompt)
        others = [w for c, items in self.categories.items() if c != cat for w in items]
        words = []
        for _ in range(rng.randint(1, self.base_max_words)):
            pool = self.categories[cat] if rng.random() < self.base_on_topic else others
            words.append(rng.choice(pool))
        return " ".join(words)


_DEFAULT_TASK = ListTask()


def list_task_reward(prompt: str, response: str) -> float:
    """The default :class:`ListTask`'s gold reward, as a plain function (dotted-path usable)."""
    return _DEFAULT_TASK.reward(prompt, response)


def bradley_terry_label(
    reward_a: float, reward_b: float, bt_scale: Optional[float], rng: random.Random
) -> bool:
    """True when ``a`` is preferred: with probability ``sigmoid(bt_scale * (r_a - r_b))``;
    ``bt_scale=None``: deterministic (a tie is a fair coin). One ``rng.random()`` draw per
    call either way, so the stream of draws does not depend on the noise level."""
    u = rng.random()
    diff = float(reward_a) - float(reward_b)
    if bt_scale is None:
        return diff > 0 or (diff == 0 and u < 0.5)
    z = float(bt_scale) * diff
    p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return u < p


# --------------------------------------------------------------------------- user rewards


class RewardModel:
    """A local Hugging Face sequence-classification reward model as a gold reward.

    ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` from ``path`` (a local
    directory; ``local_files_only``, never ``trust_remote_code``). The text scored is the
    tokenizer's chat template applied to ``[user: prompt, assistant: response]`` when it has
    one, else ``prompt + separator + response``. Score = logit ``label_index`` (default 0).
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 1024,
        label_index: int = 0,
        separator: str = "\n",
        dtype: str = "fp32",
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"RewardModel dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, local_files_only=True, trust_remote_code=False
        )
        # transformers >= 4.56 names it dtype, older versions torch_dtype
        import transformers
        from packaging.version import Version

        new = Version(transformers.__version__).release >= (4, 56)
        dtype_kw = "dtype" if new else "torch_dtype"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True, trust_remote_code=False, **{dtype_kw: dtypes[dtype]}
        ).to(device)
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.label_index = int(label_index)
        self.separator = separator

    def text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
        return prompt + self.separator + response

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        import torch

        out: List[float] = []
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits
            out += logits[:, self.label_index].float().cpu().tolist()
        return out

    def __call__(self, prompt: str, response: str) -> float:
        return self.score([prompt], [response])[0]


def score_responses(
    gold: Callable, prompts: Sequence[str], responses: Sequence[str]
) -> List[float]:
    """``[r*(p, r) for p, r in zip(prompts, responses)]``, batched when ``gold`` has ``score``."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if hasattr(gold, "score"):
        values = [float(v) for v in gold.score(list(prompts), list(responses))]
    else:
        values = [float(gold(p, r)) for p, r in zip(prompts, responses)]
    if len(values) != len(responses):
        raise PrefOptUserError(
            f"compare.gold_reward: score() returned {len(values)} values for {len(responses)} responses"
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise PrefOptUserError(
            f"compare.gold_reward returned {values[bad[0]]} for prompt {prompts[bad[0]]!r}, "
            f"response {responses[bad[0]]!r}"
        )
    return values


class SentimentReward:
    """A gold reward for sentiment-controlled generation that no loss sees and that ships
    offline: VADER's compound sentiment score of the response (Hutto & Gilbert 2014; the
    ``vaderSentiment`` package, its lexicon inside the wheel; ``pip install
    "torchtune-prefopt[frontier]"``) with a real trade-off against length::

        r*(x, y) = compound(y) - overlong_penalty * max(0, n_words(y) - target_words) / target_words
        r*(x, "") = -empty_penalty

    ``compound`` lies in [-1, 1] and grows with the number of positive words (it saturates
    towards 1), so a policy can buy reward by writing longer; beyond ``target_words`` every
    extra ``target_words`` words cost ``overlong_penalty``. The prompt is not read (the task's
    prompts all ask for a positive text). Objects with ``score(prompts, responses)`` are
    scored in one batch (:func:`score_responses`).
    """

    def __init__(
        self, target_words: int = 48, overlong_penalty: float = 0.5, empty_penalty: float = 1.0
    ):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ValueError(
                "SentimentReward needs the vaderSentiment package: pip install "
                '"torchtune-prefopt[frontier]" (or vaderSentiment==3.3.2)'
            ) from None
        if not (isinstance(target_words, int) and target_words >= 1):
            raise ValueError(f"target_words must be an integer >= 1, got {target_words!r}")
        if overlong_penalty < 0 or empty_penalty < 0:
            raise ValueError("overlong_penalty and empty_penalty must be >= 0")
        self.analyzer = SentimentIntensityAnalyzer()
        self.target_words = target_words
        self.overlong_penalty = float(overlong_penalty)
        self.empty_penalty = float(empty_penalty)

    def __call__(self, prompt: str, response: str) -> float:
        words = response.split()
        if not words:
            return -self.empty_penalty
        compound = self.analyzer.polarity_scores(response)["compound"]
        over = max(0, len(words) - self.target_words) / self.target_words
        return float(compound - self.overlong_penalty * over)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        return [self(p, r) for p, r in zip(prompts, responses)]


def build_gold_reward(spec: Any) -> Optional[Callable]:
    """``compare.gold_reward``: ``None``; a dotted path to a callable (``"pkg.mod.fn"``); or
    a component config (``{_component_: ..., **kwargs}``) instantiated by torchtune (e.g.
    ``torchtune_prefopt.compare.gold.RewardModel`` with ``path``). Raises ``ValueError``
    with the reason when it cannot be built."""
    if spec is None:
        return None
    if isinstance(spec, str):
        module, _, name = spec.rpartition(".")
        if not module:
            raise ValueError(f"compare.gold_reward: {spec!r} is not a dotted path (pkg.module.fn)")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"compare.gold_reward: cannot import {spec!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"compare.gold_reward: {spec!r} is not callable")
        return fn
    from torchtune import config

    if not spec.get("_component_"):
        raise ValueError("compare.gold_reward needs a _component_ (or a dotted path string)")
    try:
        gold = config.instantiate(spec)
    except (OSError, ImportError, ValueError, TypeError) as e:
        raise ValueError(f"compare.gold_reward: cannot build {spec._component_}: {e}") from e
    if not callable(gold) and not hasattr(gold, "score"):
        raise ValueError(f"compare.gold_reward: {spec._component_} did not give a callable")
    return gold
