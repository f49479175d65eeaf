"""Judges for generation win rates, and the deterministic example judge of the tiny set.

A judge is configured as ``compare.judge`` with a ``_component_``; two kinds are accepted:

* **pairwise**: ``judge(prompt, response_a, response_b) -> float``, the probability that
  ``response_a`` is better (e.g. an LLM-as-a-judge wrapper);
* **reward**: ``judge(prompt, response) -> float``, a scalar score (e.g. a reward model).

``_component_`` may name a class (instantiated with the other keys), a factory function
(called with the other keys; it must return the judge) or the judge function itself (when
it takes two or three required positional arguments; other keys are bound as keyword
arguments). The kind is taken from ``compare.judge_kind`` (``pairwise``/``reward``) or else
from the number of required positional parameters of the judge (3: pairwise, 2: reward).

``prompt`` is the chat-formatted prompt decoded to text without special tokens (e.g.
``"user\\nWhat is an owl?\\nassistant\\n"`` for ChatML); responses are decoded without the
stop token.

:class:`CourtesyJudge` / :func:`courtesy_reward` are the example for the bundled synthetic
set, whose chosen answers end with a courteous phrase and whose rejected answers are rude or
unhelpful: they reward the courteous closings and penalise the rude and unhelpful ones.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune_prefopt.plain import to_plain

__all__ = [
    "COURTEOUS",
    "RUDE",
    "UNHELPFUL",
    "CourtesyJudge",
    "build_judge",
    "courtesy_reward",
    "courtesy_score",
    "judge_win_rate",
]

# The phrases of the bundled synthetic set (scripts/make_tiny_assets.py), lower case.
COURTEOUS = ("happy to help", "hope this helps", "thanks for asking")
RUDE = ("stop bothering me", "figure it out yourself", "what a dumb question")
UNHELPFUL = ("i do not know", "no idea", "i cannot answer")


def courtesy_score(response: str) -> float:
    """+1 per courteous closing, -1 per rude phrase, -0.5 per unhelpful phrase (case-insensitive)."""
    text = " ".join(str(response).lower().split())
    score = sum(1.0 for p in COURTEOUS if p in text)
    score -= sum(1.0 for p in RUDE if p in text)
    score -= sum(0.5 for p in UNHELPFUL if p in text)
    return score


def courtesy_reward(prompt: str, response: str) -> float:  # noqa: ARG001 - reward-model signature
    """Reward-model form of the example judge: ``courtesy_score(response)``."""
    return courtesy_score(response)


class CourtesyJudge:
    """Pairwise example judge: P(a better than b) = 1, 0.5 or 0 by :func:`courtesy_score`.

    Deterministic. ``tie`` is the probability returned on equal scores.
    """

    def __init__(self, tie: float = 0.5):
        self.tie = float(tie)

    def __call__(self, prompt: str, response_a: str, response_b: str) -> float:  # noqa: ARG002
        a, b = courtesy_score(response_a), courtesy_score(response_b)
        return 1.0 if a > b else 0.0 if a < b else self.tie


# --------------------------------------------------------------------------- building


def _required_positional(fn: Callable) -> Optional[int]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return sum(
        1
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )


def build_judge(spec: Any, kind: Optional[str] = None) -> Tuple[Callable, str]:
    """``(judge, kind)`` from a ``compare.judge`` config node (or a callable).

    Raises ``ValueError`` with a one-line message for unusable specs.
    """
    from torchtune.config._utils import _get_component_from_path

    if callable(spec) and not isinstance(spec, Mapping):
        obj = spec
    else:
        if hasattr(spec, "items"):
            spec = {k: v for k, v in spec.items()}
        else:
            raise ValueError(f"compare.judge must be a mapping with _component_, got {spec!r}")
        path = spec.pop("_component_", None)
        if not path:
            raise ValueError("compare.judge needs a _component_ (a class, factory or function)")
        try:
            target = _get_component_from_path(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"compare.judge._component_ {path!r} cannot be imported: {e}") from e
        kwargs = to_plain(spec)
        if inspect.isclass(target):
            obj = target(**kwargs)
        elif callable(target):
            n = _required_positional(target)
            if n in (2, 3):
                obj = functools.partial(target, **kwargs) if kwargs else target
            else:
                try:
                    obj = target(**kwargs)  # a factory
                except TypeError as e:
                    raise ValueError(
                        f"compare.judge._component_ {path!r} is neither a judge (prompt, a, b) / reward "
                        f"model (prompt, response) nor a factory taking the other keys: {e}"
                    ) from e
        else:
            raise ValueError(f"compare.judge._component_ {path!r} is not callable")
    if not callable(obj):
        raise ValueError(f"compare.judge built {obj!r}, which is not callable")
    if kind in (None, "auto"):
        n = _required_positional(obj)  # instances: their __call__ without self
        if n == 3:
            kind = "pairwise"
        elif n == 2:
            kind = "reward"
        else:
            raise ValueError(
                "compare.judge: cannot tell whether the judge is pairwise (prompt, a, b) or a reward "
                "model (prompt, response); set compare.judge_kind to 'pairwise' or 'reward'"
            )
    if kind not in ("pairwise", "reward"):
        raise ValueError(f"compare.judge_kind must be 'pairwise', 'reward' or 'auto', got {kind!r}")
    return obj, kind


def judge_win_rate(
    judge: Callable,
    kind: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    reference: Sequence[str],
) -> Dict[str, Any]:
    """Win rate of ``responses`` over ``reference`` (same prompts). Returns
    ``{"win_rate", "per_prompt": [p...], ...}``; see ``DEFINITIONS["win_rate"]``."""
    probs: List[float] = []
    extra: Dict[str, List[float]] = {"score": [], "reference_score": []}
    for x, a, b in zip(prompts, responses, reference):
        if kind == "pairwise":
            p = 0.5 * (float(judge(x, a, b)) + 1.0 - float(judge(x, b, a)))
        else:
            sa, sb = float(judge(x, a)), float(judge(x, b))
            extra["score"].append(sa)
            extra["reference_score"].append(sb)
            p = 1.0 if sa > sb else 0.0 if sa < sb else 0.5
        probs.append(p)
    out: Dict[str, Any] = {
        "win_rate": sum(probs) / len(probs) if probs else float("nan"),
        "per_prompt": probs,
        "wins": sum(1 for p in probs if p > 0.5),
        "ties": sum(1 for p in probs if p == 0.5),
        "losses": sum(1 for p in probs if p < 0.5),
    }
    if kind == "reward" and probs:
        out["mean_score"] = sum(extra["score"]) / len(probs)
        out["reference_mean_score"] = sum(extra["reference_score"]) / len(probs)
        out["scores"] = extra["score"]
    return out
