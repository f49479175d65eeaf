"""The gold-reward frontier: gold reward and labelling, estimators against exact enumeration,
the sweep, the controlled task's preparation, user gold rewards, the reading, and one small
end-to-end frontier through `tune run prefopt_compare`."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_prefopt.compare.controlled import ControlledListTask, chat_prompt_ids
from torchtune_prefopt.compare.evaluation import HeldoutEvaluator
from torchtune_prefopt.compare.frontier import frontier_reading
from torchtune_prefopt.compare.generation import completion_logps
from torchtune_prefopt.compare.gold import (
    ListTask,
    RewardModel,
    bradley_terry_label,
    build_gold_reward,
    list_task_reward,
)
from torchtune_prefopt.compare.metrics import kl_estimate
from torchtune_prefopt.compare.runs import SweepPoint, _cpu_threads, expand_sweep
from torchtune_prefopt.compare.settings import default_eval_settings
from torchtune_prefopt.data import CROSS_ENTROPY_IGNORE_IDX, preference_dataset, sft_dataset
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint, tiny_tokenizer
from tune_harness import run_recipe

IGNORE = CROSS_ENTROPY_IGNORE_IDX

# torchtune's RMSNorm always normalises in fp32 and then scales by the (here float64)
# weight, which torch reports for the float64 enumeration models below; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

# ----------------------------------------------------------------------------- gold reward


def test_list_task_reward_hand_values():
    t = ListTask()  # target 4, bonus 0.5, overlong 1.5, empty 2
    p = "Name some birds."
    # 4 distinct on-topic words: 4 + 0.5 * 4 = 6, the maximum
    assert t.reward(p, "eagle owl parrot robin") == 6.0 == t.max_reward()
    # repeat: distinct 1, repeats 1, n 2 -> 1 - 1 + 1.0
    assert t.reward(p, "eagle eagle") == 1.0
    # 6 on-topic: 6 + 2 - 1.5 * 2 = 5 (past the target length costs)
    assert t.reward(p, "eagle owl parrot robin crow swan") == 5.0
    # off-topic: -1 + 0.5; punctuation and case are ignored
    assert t.reward(p, "Car.") == -0.5
    assert t.reward(p, "") == -2.0 and t.reward(p, "   ") == -2.0
    # mixed: distinct 2 (eagle, owl), off 1 (car), repeat 1 (owl), n 4 -> 2 - 1 - 1 + 2
    assert t.reward(p, "eagle owl car owl") == 2.0
    # repeating one token never reaches the maximum
    assert max(t.reward(p, " ".join(["eagle"] * k)) for k in range(1, 12)) < t.max_reward()
    assert list_task_reward(p, "eagle owl") == t.reward(p, "eagle owl")
    with pytest.raises(ValueError, match="2 task categories"):
        t.category("Name some birds and tools.")


def test_base_samples_and_labels_deterministic_in_seed():
    t = ListTask()
    p = t.prompts("train")[0]
    a = [t.sample_base(p, random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert t.sample_base(p, random.Random(5)) != t.sample_base(p, random.Random(6))
    la = [bradley_terry_label(1.0, 0.0, 1.0, r) for r in [random.Random(9)] * 50]
    lb = [bradley_terry_label(1.0, 0.0, 1.0, r) for r in [random.Random(9)] * 50]
    assert la == lb


def test_bradley_terry_frequencies():
    """P(a > b) = sigmoid(scale * (r_a - r_b)); deterministic without a scale; ties are a coin."""
    rng = random.Random(0)
    n = 20000
    for scale, diff in ((1.0, 1.0), (0.5, -2.0), (3.0, 0.25)):
        p = 1.0 / (1.0 + math.exp(-scale * diff))
        freq = sum(bradley_terry_label(diff, 0.0, scale, rng) for _ in range(n)) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (scale, diff, freq, p)
    assert all(bradley_terry_label(0.1, 0.0, None, rng) for _ in range(100))
    assert not any(bradley_terry_label(0.0, 0.1, None, rng) for _ in range(100))
    ties = sum(bradley_terry_label(1.0, 1.0, None, rng) for _ in range(n)) / n
    assert abs(ties - 0.5) < 4 * math.sqrt(0.25 / n)


# ----------------------------------------------------------------------------- exact enumeration

V, STOP, T = 4, 3, 3  # tokens 0..3, 3 is the stop token, at most 3 new tokens


class DigitTokenizer:
    """The smallest tokenizer the evaluator needs: token k is the character str(k)."""

    pad_id = 0
    stop_tokens = [STOP]
    eos_id = STOP

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(int(i)) for i in ids)


def _digit_model(seed: int):
    from torchtune import training
    from torchtune.models.qwen2._component_builders import qwen2

    torch.manual_seed(seed)
    with training.set_default_dtype(torch.float64):  # rope buffers too
        m = qwen2(
            vocab_size=V,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            embed_dim=16,
            intermediate_dim=32,
            max_seq_len=32,
        )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _exact_distribution(model, prompt):
    """Every completion y (stop-terminated, or T tokens without a stop) and log p(y|x), from
    full logits (no KV cache, no sampler)."""
    seqs = []
    for n in range(1, T + 1):
        for body in itertools.product(range(V), repeat=n):
            if STOP in body[:-1]:
                continue
            if n < T and body[-1] != STOP:
                continue  # shorter than T only when it ends with the stop token
            seqs.append(list(body))
    logps = []
    with torch.no_grad():
        for y in seqs:
            x = torch.tensor([prompt + y])
            lp = torch.log_softmax(model(x)[0].double(), -1)
            logps.append(sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(y)))
    return seqs, torch.tensor(logps, dtype=torch.float64)


def _digit_reward(prompt: str, response: str) -> float:
    """Any function of the text works; this one rewards 1s, punishes 2s and length."""
    return response.count("1") - 2.0 * response.count("2") - 0.3 * len(response)


@pytest.fixture(scope="module")
def digit_setup():
    prompts = [[1, 2], [2, 1]]  # no 0: the pad id (torchtune treats it as left padding)
    items = [
        {
            "chosen_input_ids": p + [1, STOP],
            "chosen_labels": [IGNORE] * len(p) + [1, STOP],
            "rejected_input_ids": p + [2, STOP],
            "rejected_labels": [IGNORE] * len(p) + [2, STOP],
            "index": i,
        }
        for i, p in enumerate(prompts)
    ]
    ref, pol = _digit_model(0), _digit_model(1)
    settings = dataclasses.replace(
        default_eval_settings(),
        max_rows=None,
        batch_size=256,
        max_new_tokens=T,
        generation_batch_size=4096,
        kv_cache=False,
        kl_samples_per_prompt=4000,
        kl_max_new_tokens=T,
        kl_seed=11,
    )
    ev = HeldoutEvaluator(
        DigitTokenizer(),
        items,
        ref,
        settings,
        torch.device("cpu"),
        torch.float64,
        gold_reward=_digit_reward,
    )
    return prompts, ref, pol, ev


def test_kl_and_gold_reward_match_exact_enumeration(digit_setup):
    """The evaluator's Monte-Carlo KL(pi || pi_ref) and E_pi[r*] (samples from torchtune's
    generate, log-probs from the lean path) agree with the exact sums over every completion."""
    prompts, ref, pol, ev = digit_setup
    out = ev.kl(pol)
    kl_exact, gold_exact = [], []
    for p in prompts:
        seqs, lp = _exact_distribution(pol, p)
        _, lq = _exact_distribution(ref, p)
        assert abs(float(lp.exp().sum()) - 1.0) < 1e-12  # the enumeration is the whole space
        # the lean log-prob path gives the same log-probs as the full logits
        lean = completion_logps(pol, [p] * len(seqs), seqs, pad_id=0, device=torch.device("cpu"))
        assert torch.allclose(lean, lp, atol=1e-10)
        probs = lp.exp()
        kl_exact.append(float((probs * (lp - lq)).sum()))
        text = ["".join(str(t) for t in y if t != STOP) for y in seqs]
        r = torch.tensor([_digit_reward("", s) for s in text], dtype=torch.float64)
        gold_exact.append(float((probs * r).sum()))
    kl_true = sum(kl_exact) / len(kl_exact)  # equal samples per prompt
    gold_true = sum(gold_exact) / len(gold_exact)
    # The reported stderr is over prompts (prompt-sampling spread, large with 2 prompts);
    # against the exact value on these 2 prompts the error is the within-prompt MC error.
    rows = out["rows"]

    def mc_se(values):
        se2 = 0.0
        for k in range(len(prompts)):
            v = torch.tensor([x for r, x in zip(rows, values) if r["prompt"] == k])
            se2 += float(v.var(unbiased=True)) / v.numel() / len(prompts) ** 2
        return math.sqrt(se2)

    kl_se = mc_se([r["logp"] - r["logp_ref"] for r in rows])
    gold_se = mc_se([r["gold"] for r in rows])
    assert kl_true > 0.05 and kl_se < 0.05 * kl_true
    assert abs(out["kl"] - kl_true) < 4 * kl_se, (out["kl"], kl_true, kl_se)
    assert abs(out["gold_reward"] - gold_true) < 4 * gold_se, (out["gold_reward"], gold_true)
    # a wrong estimator is caught: the reverse KL differs from the forward one here
    kl_reverse = 0.0
    for p in prompts:
        _, lp = _exact_distribution(pol, p)
        _, lq = _exact_distribution(ref, p)
        kl_reverse += float((lq.exp() * (lq - lp)).sum()) / len(prompts)
    assert abs(kl_reverse - kl_true) > 5 * kl_se


def test_untrained_policy_sits_at_kl_zero_and_the_reference_reward(digit_setup):
    """A run that did not train (its weights equal the reference's, a separate model object)
    has KL exactly 0 and the reference's gold reward and length (common random numbers)."""
    _, ref, _, ev = digit_setup
    untrained = copy.deepcopy(ref)
    ref_result = ev.evaluate(None)
    result = ev.evaluate(untrained)
    assert result["kl"]["kl"] == 0.0 and ref_result["kl"]["kl"] == 0.0
    assert result["kl"]["gold_reward"] == ref_result["kl"]["gold_reward"]
    assert result["kl"]["sample_length"] == ref_result["kl"]["sample_length"]
    rows = result["rows"]["kl_samples"]
    assert rows == ref_result["rows"]["kl_samples"]


def test_frontier_point_recomputed_from_saved_samples(digit_setup):
    """The per-sample rows the evaluator saves reproduce its point: log-probs re-scored from
    the saved ids, gold reward re-scored from the saved text, then the same estimators."""
    prompts, ref, pol, ev = digit_setup
    out = ev.kl(pol)
    rows = out["rows"]
    ids = [r["ids"] for r in rows]
    ps = [prompts[r["prompt"]] for r in rows]
    kw = dict(pad_id=0, device=torch.device("cpu"), batch_size=512)
    a, b = completion_logps(pol, ps, ids, **kw), completion_logps(ref, ps, ids, **kw)
    index = torch.tensor([r["prompt"] for r in rows])
    again = kl_estimate(a, b, index)
    assert again["kl"] == pytest.approx(out["kl"], abs=1e-12)
    assert again["kl_stderr"] == pytest.approx(out["kl_stderr"], abs=1e-12)
    gold = torch.tensor([_digit_reward("", r["sample"]) for r in rows], dtype=torch.float64)
    assert [r["gold"] for r in rows] == gold.tolist()
    assert float(gold.mean()) == pytest.approx(out["gold_reward"], abs=1e-12)


# ----------------------------------------------------------------------------- sweep / config


def test_expand_sweep_names_and_configs():
    configs = {
        "dpo": {"_component_": "torchtune_prefopt.losses.DPOLoss", "beta": 0.1},
        "simpo": {"_component_": "torchtune_prefopt.losses.SimPOLoss", "beta": 2.0, "gamma": 0.5},
        "kto": "kto",
    }
    names, cfgs, points = expand_sweep(
        ["dpo", "simpo", "kto"], configs, {"dpo": {"beta": [0.03, 0.3]}, "simpo": {"beta": [1, 4]}}
    )
    assert names == ["dpo-beta0.03", "dpo-beta0.3", "simpo-beta1", "simpo-beta4", "kto"]
    assert cfgs["dpo-beta0.3"] == {"_component_": "torchtune_prefopt.losses.DPOLoss", "beta": 0.3}
    assert cfgs["simpo-beta4"]["gamma"] == 0.5 and cfgs["simpo-beta4"]["beta"] == 4.0
    assert cfgs["kto"] == "kto" and points["kto"] == SweepPoint("kto")
    assert points["dpo-beta0.03"] == SweepPoint("dpo", ("beta", 0.03), None)
    # no sweep: one run per loss, as before; the sweep of a configured loss left out of
    # compare.losses is ignored
    assert expand_sweep(["dpo"], configs, None)[0] == ["dpo"]
    assert expand_sweep(["kto"], configs, {"dpo": {"beta": [0.3]}})[0] == ["kto"]


def test_expand_sweep_registered_losses_run_with_their_defaults():
    """A registered loss name without a compare.loss_configs entry is that loss with its own
    defaults, swept or not; its sweep is ignored when compare.losses leaves it out; a name
    that is neither configured nor registered is one line."""
    names, cfgs, points = expand_sweep(
        ["dpo_norm", "orpo"], {}, {"orpo": {"lambda_": [0.1, 0.3]}, "apo_zero": {"beta": [1]}}
    )
    assert names == ["dpo_norm", "orpo-lambda_0.1", "orpo-lambda_0.3"]
    assert cfgs["dpo_norm"] == {"_component_": "torchtune_prefopt.losses.dpo.DPONormLoss"}
    assert cfgs["orpo-lambda_0.3"] == {
        "_component_": "torchtune_prefopt.losses.orpo.ORPOLoss",
        "lambda_": 0.3,
    }
    assert points["orpo-lambda_0.1"] == SweepPoint("orpo", ("lambda_", 0.1), None)
    with pytest.raises(PrefOptUserError, match="'dpo_nrom' is not a registered loss"):
        expand_sweep(["dpo_nrom"], {}, {"dpo_nrom": {"beta": [1]}})


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"ipo2": {"tau": [0.1]}}, "compare.sweep.ipo2: not a loss of compare.losses"),
        ({"dpo": {"beta": []}}, "non-empty list"),
        ({"dpo": {"beta": [0.1, -1]}}, "-1 is not a positive number"),
        ({"dpo": {"beta": [0.1, 0.1]}}, "listed twice"),
        ({"dpo": {"beta": [0.1], "gamma": [1]}}, "exactly one loss argument"),
        ({"dpo": [0.1]}, "exactly one loss argument"),
    ],
)
def test_expand_sweep_errors(sweep, message):
    with pytest.raises(PrefOptUserError, match=message):
        expand_sweep(["dpo"], {"dpo": {"_component_": "x", "beta": 0.1}}, sweep)


def test_cpu_threads_split_between_concurrent_runs(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert _cpu_threads(2, 1, on_cuda=False) == "4"
    assert _cpu_threads(4, 2, on_cuda=False) == "1"
    assert _cpu_threads(16, 1, on_cuda=False) == "1"
    assert _cpu_threads(1, 1, on_cuda=False) is None  # one run at a time: torch's default
    assert _cpu_threads(2, 1, on_cuda=True) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _cpu_threads(2, 1, on_cuda=False) is None  # the user's choice wins


# ----------------------------------------------------------------------------- user rewards


def test_gold_reward_dotted_path_and_errors():
    assert build_gold_reward(None) is None
    fn = build_gold_reward("torchtune_prefopt.compare.gold.list_task_reward")
    assert fn("Name some birds.", "eagle") == list_task_reward("Name some birds.", "eagle")
    with pytest.raises(ValueError, match="cannot import"):
        build_gold_reward("torchtune_prefopt.compare.gold.no_such_fn")
    with pytest.raises(ValueError, match="not a dotted path"):
        build_gold_reward("fn")
    with pytest.raises(ValueError, match="needs a _component_"):
        build_gold_reward(OmegaConf.create({"path": "/x"}))


def test_reward_model_scores_like_the_hf_model(tmp_path):
    """RewardModel (local HF sequence classifier, no remote code) = the model's own logit on
    the chat-template text."""
    from transformers import AutoTokenizer, Qwen2ForSequenceClassification

    from torchtune_prefopt.models.tiny import tiny_hf_config

    ckpt = make_tiny_hf_checkpoint(tmp_path / "base", seed=1)
    cfg = tiny_hf_config()
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "rm" / f).write_bytes((ckpt / f).read_bytes())
    gold = build_gold_reward(
        OmegaConf.create(
            {
                "_component_": "torchtune_prefopt.compare.gold.RewardModel",
                "path": str(tmp_path / "rm"),
                "batch_size": 2,
            }
        )
    )
    assert isinstance(gold, RewardModel)
    prompts = ["Name some birds.", "List a few tools.", "Hi"]
    responses = ["eagle owl", "saw", "hello there friend"]
    scores = gold.score(prompts, responses)
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    for p, r, s in zip(prompts, responses, scores):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        assert "<|im_start|>assistant" in text
        with torch.no_grad():
            direct = rm(**tok(text, return_tensors="pt")).logits[0, 0].item()
        assert s == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
    assert gold(prompts[0], responses[0]) == pytest.approx(scores[0], abs=1e-6)


# ----------------------------------------------------------------------------- SFT data


def test_sft_dataset_matches_preference_tokenization_and_labels_eos(tmp_path):
    """Each SFT row = the preference pipeline's chosen row for the same prompt and answer;
    the chat template's end token (<|im_end|>) is labelled, so the SFT model learns to stop."""
    tok = tiny_tokenizer(max_seq_len=64)
    rows = [("Name some birds.", "eagle owl"), ("List a few tools.", "saw")]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": p, "chosen": r, "rejected": "x"}) + "\n" for p, r in rows)
    )
    a = sft_dataset(tok, source="json", data_files=str(sft))
    b = preference_dataset(tok, source="json", data_files=str(pairs))
    im_end = tok.special_tokens["<|im_end|>"]
    for i in range(len(rows)):
        assert a[i]["tokens"] == b[i]["chosen_input_ids"]
        assert a[i]["labels"] == b[i]["chosen_labels"]
        assert a[i]["labels"][-1] == im_end and a[i]["tokens"][-1] == im_end
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(PrefOptUserError, match="response"):
        sft_dataset(tok, source="json", data_files=str(bad))


# ----------------------------------------------------------------------------- controlled task


def yaml_seed(path: Path):
    return OmegaConf.load(path).seed


def _fake_sft(task_dir: Path, seed: int) -> None:
    """Skip the SFT subprocess: a seeded tiny checkpoint stands in for its output."""
    make_tiny_hf_checkpoint(task_dir / "sft" / "epoch_0", seed=seed)
    (task_dir / "sft" / "DONE").write_text("ok\n")


def test_controlled_task_pairs_deterministic_and_never_overwritten(tmp_path):
    kw = dict(train_pairs=24, heldout_pairs=8, max_new_tokens=8, seed=3)
    outs = []
    for name in ("a", "b"):
        d = tmp_path / name
        _fake_sft(d, seed=4)
        prepared = ControlledListTask(**kw).prepare(d)
        outs.append((d / "pairs_train.jsonl").read_text())
        rows = [json.loads(x) for x in outs[-1].splitlines()]
        assert len(rows) == 24
        t = ListTask()
        for r in rows:  # the saved gold rewards are r* of the saved text
            assert r["chosen_gold"] == t.reward(r["prompt"], r["chosen"])
            assert r["rejected_gold"] == t.reward(r["prompt"], r["rejected"])
            assert r["chosen"] != r["rejected"] and r["chosen"].strip() and r["rejected"].strip()
        ov = prepared["overrides"]
        assert ov["checkpointer"]["checkpoint_dir"] == str(d / "sft" / "epoch_0")
        assert ov["dataset"]["data_files"] == str(d / "pairs_train.jsonl")
    assert outs[0] == outs[1]  # same seed, same pairs
    # reused as is with the same settings; other settings: one-line error, nothing touched
    before = (tmp_path / "a" / "manifest.json").read_text()
    ControlledListTask(**kw).prepare(tmp_path / "a")
    with pytest.raises(PrefOptUserError, match="other compare.task settings"):
        ControlledListTask(**{**kw, "bt_scale": 2.0}).prepare(tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_text() == before
    # another seed labels other pairs
    d = tmp_path / "c"
    _fake_sft(d, seed=4)
    ControlledListTask(**{**kw, "seed": 4}).prepare(d)
    assert (d / "pairs_train.jsonl").read_text() != outs[0]


def test_chat_prompt_ids_are_the_training_prompt_tokens():
    tok = tiny_tokenizer()
    ids = chat_prompt_ids(tok, ["Name some birds."])[0]
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nName some birds.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- reading


def _pt(loss, value, kl, gold, se=0.05, length=3.0):
    return {
        "name": f"{loss}-{value}",
        "loss": loss,
        "argument": "beta",
        "strength": value,
        "kl": kl,
        "kl_stderr": 0.1,
        "gold": gold,
        "gold_stderr": se,
        "length": length,
        "length_stderr": 0.1,
        "samples": 10,
    }


def test_frontier_reading_hand_built():
    ref = {**_pt("reference", None, 0.0, 0.0), "name": "reference", "argument": None}
    pts = [
        ref,
        _pt("dpo", 0.3, 1.0, 1.0),
        _pt("dpo", 0.1, 2.0, 2.0),
        _pt("dpo", 0.03, 4.0, 1.5, length=6.0),  # over-optimised: reward falls at the most KL
        _pt("ipo", 0.3, 1.0, 0.5),
        _pt("ipo", 0.1, 2.0, 1.96),
        _pt("ipo", 0.03, 4.0, 2.5),
    ]
    r = frontier_reading(pts)
    assert r["monotone"] == {"dpo": False, "ipo": True}
    budgets = {b["kl_budget"]: b for b in r["budgets"]}
    # KL <= 1: dpo 1.0 vs ipo 0.5, diff 0.5 > 2 * sqrt(2) * 0.05 -> separated
    assert budgets[1.0]["best_loss"] == "dpo" and budgets[1.0]["beyond_error_bars_over"] == ["ipo"]
    # KL <= 2: dpo 2.0 vs ipo 1.96: within error bars
    assert budgets[2.0]["best_loss"] == "dpo" and budgets[2.0]["within_error_bars_of"] == ["ipo"]
    assert budgets[4.0]["best_loss"] == "ipo"
    assert r["length"]["longest"] == "dpo-0.03"
    assert r["separated"] == [["dpo", "ipo"]]  # best points 2.0 vs 2.5
    dpo_line = next(line for line in r["lines"] if line.startswith("dpo:"))
    assert "does NOT rise" in dpo_line and "reward peaks at dpo beta=0.1" in dpo_line
    assert "end" not in dpo_line  # the peak is inside the sweep
    assert r["peaks"] == {"dpo": "dpo-0.1"}
    # a peak at the end of the sweep: the reading says which way to extend it
    edge = frontier_reading([ref, _pt("kto", 1.0, 1.0, 2.0), _pt("kto", 0.3, 2.0, 1.0)])
    assert "strongest end: try a larger beta" in " ".join(edge["lines"])
    edge = frontier_reading([ref, _pt("kto", 1.0, 1.0, 1.0), _pt("kto", 0.3, 0.8, 2.0)])
    text = " ".join(edge["lines"])
    assert "KL is not monotone" in text and "reward rises at every step" in text
    assert "weakest end: try a smaller beta" in text
    # neighbours within error bars in gold (0.03 < 2 * sqrt(2) * 0.05) and KL (0.1 < 0.28):
    # the order is noise, not a finding
    flat = frontier_reading([ref, _pt("kto", 1.0, 1.0, 1.03), _pt("kto", 0.3, 1.1, 1.0)])
    kto_line = next(line for line in flat["lines"] if line.startswith("kto:"))
    assert flat["unresolved"] == ["kto"] and "does not resolve a shape" in kto_line
    assert "does NOT rise" not in kto_line and not flat["monotone"]["kto"]
    # the reference (gold 0.0 +- 0.05): dpo-0.3 at 1.0 is above it; a point at 0.1 is not
    assert r["above_reference"] == [p["name"] for p in pts[1:]]
    near = frontier_reading([ref, _pt("kto", 1.0, 1.0, 0.1), _pt("kto", 0.3, 2.0, 1.0)])
    assert near["above_reference"] == ["kto-0.3"]
    assert any(
        line.endswith("beyond error bars: 1 of 2 points (kto beta=0.3); not: kto beta=1.")
        for line in near["lines"]
    ), near["lines"]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_e2e_small_frontier(tmp_path):
    """`tune run prefopt_compare --config tiny/frontier`, shrunk: 2 losses x 2 strengths x 2
    seeds. Each run's point equals a recomputation from its saved samples, and each frontier
    point is the mean of its seeds' points."""
    out = tmp_path / "out"
    args = [
        f"output_dir={out}",
        "compare.task.sft_steps=150",
        "compare.task.sft_examples=2400",
        "compare.task.train_pairs=64",
        "compare.task.heldout_pairs=16",
        # the registered losses without a compare.loss_configs entry: their own defaults
        "compare.losses=[dpo,simpo,dpo_norm,orpo,apo_zero,dpop]",
        "compare.sweep.dpo.beta=[0.1,0.5]",
        "compare.sweep.simpo.beta=[2.0,4.0]",
        "compare.sweep.dpo_norm.beta=[5.0]",
        "compare.sweep.orpo.lambda_=[0.1]",
        "compare.sweep.apo_zero.beta=[0.1]",
        "compare.sweep.dpop.beta=[0.1]",
        "compare.seeds=[0,1]",
        "compare.train_overrides.max_steps_per_epoch=6",
        "compare.kl.samples_per_prompt=4",
        "compare.heldout.max_rows=16",
    ]
    proc = run_recipe("tiny/frontier", *args, cwd=tmp_path, recipe="prefopt_compare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Gold-reward frontier" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["matched"]["ok"], report["matched"]  # seeds differ on purpose only
    frontier = report["frontier"]
    points = {p["name"]: p for p in frontier["points"]}
    new = {"dpo_norm-beta5", "orpo-lambda_0.1", "apo_zero-beta0.1", "dpop-beta0.1"}
    assert set(points) == {
        "reference",
        "dpo-beta0.1",
        "dpo-beta0.5",
        "simpo-beta2",
        "simpo-beta4",
        *new,
    }
    assert points["reference"]["kl"] == 0.0
    runs = {p["name"]: p for p in frontier["runs"]}
    assert len(runs) == 1 + 8 + 2 * len(new) and runs["dpo-beta0.5-seed1"]["seed"] == 1
    report_md = (out / "report.md").read_text()
    assert all(name in report_md for name in new), report_md[:3000]
    saved = yaml_seed(out / "dpo-beta0.5-seed1" / "torchtune_config.yaml")
    assert saved == 1
    task = ListTask()
    heldout = (out / "task" / "pairs_heldout.jsonl").read_text().splitlines()
    prompts = list(dict.fromkeys(json.loads(x)["prompt"] for x in heldout))
    for name, p in runs.items():
        rows = [
            json.loads(x)
            for x in (out / "eval" / name / "kl_samples.jsonl").read_text().splitlines()
        ]
        assert p["files"]["kl_samples"] == str(out / "eval" / name / "kl_samples.jsonl")
        index = torch.tensor([r["prompt"] for r in rows])
        est = kl_estimate(
            torch.tensor([r["logp"] for r in rows], dtype=torch.float64),
            torch.tensor([r["logp_ref"] for r in rows], dtype=torch.float64),
            index,
        )
        assert est["kl"] == pytest.approx(p["kl"], abs=1e-9)
        gold = [task.reward(prompts[r["prompt"]], r["sample"]) for r in rows]
        assert gold == [r["gold"] for r in rows]
        assert sum(gold) / len(gold) == pytest.approx(p["gold"], abs=1e-9)
    for name in ("dpo-beta0.1", "simpo-beta4"):
        members = [runs[f"{name}-seed{s}"] for s in (0, 1)]
        assert points[name]["seeds"] == [0, 1]
        assert points[name]["gold"] == pytest.approx(sum(m["gold"] for m in members) / 2)
        assert points[name]["kl"] == pytest.approx(sum(m["kl"] for m in members) / 2)
    reading = report["frontier"]["reading"]
    assert reading["lines"] and set(reading["monotone"]) == {"dpo", "simpo"}
    assert (out / "plots" / "frontier.png").is_file()
    md = (out / "report.md").read_text()
    assert "## Gold-reward frontier" in md and "| dpo-beta0.5 |" in md


@pytest.mark.parametrize(
    "override, message",
    [
        ("compare.sweep.dpo.beta=[0.1,-1]", "compare.sweep.dpo.beta: -1 is not a positive number"),
        ("compare.sweep.dop.beta=[0.1]", "compare.sweep.dop: not a loss"),
        ("compare.task.bt_scale=-1", "compare.task.bt_scale must be > 0"),
        ("compare.task.train_pairs=0", "compare.task.train_pairs must be an integer >= 1"),
        ("compare.task.no_such=1", "compare.task: "),
        ("compare.gold_reward=pkg.nope.fn", "compare.gold_reward: cannot import 'pkg.nope.fn'"),
    ],
)
def test_frontier_config_errors_before_any_compute(tmp_path, override, message):
    """Bad frontier settings: one PrefOptUserError naming the key, before the task's SFT."""
    from torchtune_prefopt import _config
    from tune_harness import load_recipe_module

    recipe = load_recipe_module("prefopt_compare")
    cfg = _config.load_config(
        [
            "--config",
            str(_config.resolve_config("tiny/frontier")),
            f"output_dir={tmp_path}/o",
            override,
        ]
    )
    with pytest.raises(PrefOptUserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        recipe.CompareRecipe(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PREFOPT_LONG_TESTS") != "1",
    reason="a 5-minute job (the whole bundled frontier): PREFOPT_LONG_TESTS=1 runs it; CI runs "
    "test_e2e_small_frontier, the same path on a smaller sweep",
)
def test_bundled_frontier_is_not_degenerate(tmp_path):
    """The README's `tune run prefopt_compare --config tiny/frontier` (only output_dir moved;
    4 losses x 4 strengths x 3 seeds): every loss's best point beats the SFT reference beyond
    its seed-to-seed error bars, and points of different losses differ beyond error bars.
    A long job (``PREFOPT_LONG_TESTS=1``; about 5 minutes of both cores)."""
    out = tmp_path / "out"
    proc = run_recipe("tiny/frontier", f"output_dir={out}", cwd=tmp_path, recipe="prefopt_compare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["matched"]["ok"], report["matched"]  # KTO: the same completions per step
    points = report["frontier"]["points"]
    ref = points[0]
    assert ref["name"] == "reference" and ref["kl"] == 0.0
    losses = {"dpo", "ipo", "kto", "simpo"}
    assert {p["loss"] for p in points[1:]} == losses and len(points) == 1 + 4 * 4
    for loss in losses:
        best = max((p for p in points if p["loss"] == loss), key=lambda p: p["gold"])
        se = math.sqrt(best["gold_stderr"] ** 2 + ref["gold_stderr"] ** 2)
        assert best["gold"] - ref["gold"] > 2 * se, (loss, best, ref)
        assert best["kl"] > 0.1
    assert all(p["seeds"] == [0, 1, 2] for p in points[1:])
    reading = report["frontier"]["reading"]
    assert reading["point_pairs"]["separated"] > 0, reading["lines"]
    assert set(reading["monotone"]) == losses


def test_gold_reward_that_misbehaves_is_one_line():
    from torchtune_prefopt.compare.gold import score_responses

    with pytest.raises(PrefOptUserError, match="returned nan for prompt 'p', response 'b'"):
        score_responses(lambda p, r: float("nan") if r == "b" else 1.0, ["p", "p"], ["a", "b"])

    class Short:
        def score(self, prompts, responses):
            return [1.0]

    with pytest.raises(PrefOptUserError, match="returned 1 values for 2 responses"):
        score_responses(Short(), ["p", "p"], ["a", "b"])


def test_seeds_axis_and_aggregation():
    configs = {"dpo": {"_component_": "torchtune_prefopt.losses.DPOLoss", "beta": 0.1}}
    names, cfgs, points = expand_sweep(["dpo"], configs, {"dpo": {"beta": [0.1, 0.3]}}, [0, 7])
    assert names == [
        "dpo-beta0.1-seed0",
        "dpo-beta0.1-seed7",
        "dpo-beta0.3-seed0",
        "dpo-beta0.3-seed7",
    ]
    assert points["dpo-beta0.3-seed7"].seed == 7 and points["dpo-beta0.3-seed7"].family == "dpo"
    assert cfgs["dpo-beta0.3-seed7"]["beta"] == 0.3
    for bad in ([], [1, 1], [-1], ["a"]):
        with pytest.raises(PrefOptUserError, match="compare.seeds"):
            expand_sweep(["dpo"], configs, None, bad)

    from torchtune_prefopt.compare.frontier import aggregate_seeds

    def run(seed, kl, gold, se):
        p = _pt("dpo", 0.1, kl, gold, se=se)
        return {
            **p,
            "name": f"dpo-beta0.1-seed{seed}",
            "seed": seed,
            "files": {"kl_samples": f"f{seed}"},
        }

    ref = {**_pt("reference", None, 0.0, 0.0), "name": "reference", "argument": None, "seed": None}
    agg = aggregate_seeds([ref, run(0, 1.0, 2.0, 0.01), run(1, 3.0, 4.0, 0.01)])
    assert agg[0] is ref and len(agg) == 2
    a = agg[1]
    assert a["name"] == "dpo-beta0.1" and a["seeds"] == [0, 1] and a["samples"] == 20
    assert a["kl"] == 2.0 and a["gold"] == 3.0
    # seed spread: sd = sqrt(2), se = sd / sqrt(2) = 1; pooled sampling error is smaller
    assert a["gold_stderr"] == pytest.approx(1.0) and a["kl_stderr"] == pytest.approx(1.0)
    # identical seeds: the pooled sampling error sqrt(0.01^2 + 0.01^2) / 2 is the floor
    same = aggregate_seeds([run(0, 1.0, 2.0, 0.01), run(1, 1.0, 2.0, 0.01)])[0]
    assert same["gold_stderr"] == pytest.approx(math.sqrt(2) * 0.01 / 2)
    assert a["files"] == {"dpo-beta0.1-seed0": "f0", "dpo-beta0.1-seed1": "f1"}


def test_bad_run_config_fails_before_the_task_is_prepared(tmp_path):
    """A run config error (here an unknown training key for one loss) is one line, exit 2,
    before the task's SFT: no task directory is written."""
    out = tmp_path / "out"
    proc = run_recipe(
        "tiny/frontier",
        f"output_dir={out}",
        "compare.loss_overrides.kto.no_such_key=1",
        cwd=tmp_path,
        recipe="prefopt_compare",
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no_such_key" in err[0] and "Traceback" not in proc.stderr
    assert not (out / "task").exists()


def test_sentiment_gold_reward_is_vader_with_a_length_trade_off():
    """compare.gold.SentimentReward against VADER's own scores and the length rule by hand."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from torchtune_prefopt.compare.gold import SentimentReward, build_gold_reward

    vader = SentimentIntensityAnalyzer()
    gold = SentimentReward(target_words=4, overlong_penalty=0.5, empty_penalty=1.0)
    short = "A great, lovely phone."  # 4 words: no penalty
    assert gold("p", short) == pytest.approx(vader.polarity_scores(short)["compound"], abs=0)
    long = "A great, lovely phone. I love it, truly wonderful."  # 9 words: 5 over, 5/4 x 0.5
    want = vader.polarity_scores(long)["compound"] - 0.5 * (9 - 4) / 4
    assert gold("p", long) == pytest.approx(want, abs=1e-12)
    assert vader.polarity_scores(long)["compound"] > vader.polarity_scores(short)["compound"]
    assert gold("p", long) < gold("p", short)  # the trade-off: more praise, too long
    assert gold("p", "   ") == -1.0
    assert gold("p", "Terrible, awful battery.") < 0 < gold("p", short)
    assert gold.score(["a", "b"], [short, long]) == [gold("a", short), gold("b", long)]
    from omegaconf import OmegaConf

    built = build_gold_reward(
        OmegaConf.create(
            {"_component_": "torchtune_prefopt.compare.gold.SentimentReward", "target_words": 4}
        )
    )
    assert built("p", long) == gold("p", long)
    with pytest.raises(ValueError, match="target_words must be an integer >= 1"):
        SentimentReward(target_words=0)


def test_sentiment_task_samples_and_labels_pairs_from_an_hf_folder(tmp_path):
    """compare.controlled.ControlledSentimentTask on a tiny HF folder: two completions per
    drawn prompt sampled from the folder's own model, scored by SentimentReward, labelled
    (bt_scale null: the higher gold reward is chosen), written as pairs the recipe reads; the
    directory is reused with the same settings and refused with others."""
    from hf_families import make_family_folder

    from torchtune_prefopt.compare.controlled import REVIEW_PRODUCTS, ControlledSentimentTask
    from torchtune_prefopt.compare.gold import SentimentReward

    folder = make_family_folder("smollm2", tmp_path / "model")
    kw = dict(train_pairs=6, heldout_pairs=3, bt_scale=None, max_new_tokens=8, seed=3)
    task = ControlledSentimentTask(str(folder), **kw)
    out = task.prepare(tmp_path / "task")
    gold = SentimentReward()
    heldout_prompts = {f"Write a short positive review of {p}." for p in REVIEW_PRODUCTS["heldout"]}
    for split, n in (("train", 6), ("heldout", 3)):
        rows = [
            json.loads(x)
            for x in (tmp_path / "task" / f"pairs_{split}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == n and out["manifest"]["stats"][split]["pairs"] == n
        for r in rows:
            assert r["chosen"].strip() and r["chosen"] != r["rejected"]
            assert r["chosen_gold"] == gold(r["prompt"], r["chosen"])
            assert r["rejected_gold"] == gold(r["prompt"], r["rejected"])
            assert r["chosen_gold"] >= r["rejected_gold"]
            assert (r["prompt"] in heldout_prompts) == (split == "heldout")
    assert out["overrides"]["dataset"]["data_files"] == str(tmp_path / "task" / "pairs_train.jsonl")
    again = ControlledSentimentTask(str(folder), **kw).prepare(tmp_path / "task")
    assert again["manifest"] == out["manifest"]
    with pytest.raises(PrefOptUserError, match="prepared with other compare.task settings"):
        ControlledSentimentTask(str(folder), **{**kw, "seed": 4}).prepare(tmp_path / "task")


# the real-model frontier's config, shrunk to a CI-sized run on a tiny SmolLM2-style folder
SMOLLM2_FRONTIER_SMOKE = (
    "compare.task.train_pairs=8",
    "compare.task.heldout_pairs=4",
    "compare.task.max_new_tokens=8",
    "compare.task.batch_size=8",
    "compare.sweep.dpo.beta=[0.1]",
    "compare.sweep.ipo.tau=[0.1]",
    "compare.sweep.kto.beta=[0.1]",
    "compare.sweep.simpo.beta=[1.0,4.0]",
    "compare.train_overrides.batch_size=4",
    "compare.heldout.max_rows=4",
    "compare.generation.max_new_tokens=8",
    "compare.kl.samples_per_prompt=2",
    "compare.kl.max_new_tokens=8",
)


def test_smollm2_frontier_smoke(tmp_path):
    """`tune run prefopt_compare --config smollm2/frontier model_dir=<folder>` on a tiny
    SmolLM2-style folder, shrunk: pairs sampled from the folder's model and labelled by the
    gold reward, one LoRA run per loss (two SimPO strengths), every run evaluated from its
    final/ and placed on the frontier. Each point's gold reward and KL equal a recomputation
    from its saved samples (SentimentReward with the config's gold settings)."""
    from hf_families import make_family_folder

    from torchtune_prefopt.compare.gold import SentimentReward

    folder = make_family_folder("smollm2", tmp_path / "model")
    out = tmp_path / "out"
    proc = run_recipe(
        "smollm2/frontier",
        f"model_dir={folder}",
        f"output_dir={out}",
        *SMOLLM2_FRONTIER_SMOKE,
        cwd=tmp_path,
        recipe="prefopt_compare",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["matched"]["ok"], report["matched"]
    points = {p["name"]: p for p in report["frontier"]["points"]}
    assert set(points) == {
        "reference",
        "dpo-beta0.1",
        "ipo-tau0.1",
        "kto-beta0.1",
        "simpo-beta1",
        "simpo-beta4",
    }
    assert points["reference"]["kl"] == 0.0
    assert report["settings"]["base_checkpoint"] == str(folder)
    gold = SentimentReward(target_words=32, overlong_penalty=0.5)
    manifest = json.loads((out / "task" / "manifest.json").read_text())
    assert manifest["settings"]["model_config"] == json.loads((folder / "config.json").read_text())
    heldout = (out / "task" / "pairs_heldout.jsonl").read_text().splitlines()
    for row in map(json.loads, (out / "task" / "pairs_train.jsonl").read_text().splitlines()):
        assert row["chosen_gold"] == gold(row["prompt"], row["chosen"])
    prompts = list(dict.fromkeys(json.loads(x)["prompt"] for x in heldout))
    for name, p in points.items():  # one seed: a point is a run (the reference included)
        rows = [
            json.loads(x)
            for x in (out / "eval" / name / "kl_samples.jsonl").read_text().splitlines()
        ]
        est = kl_estimate(
            torch.tensor([r["logp"] for r in rows], dtype=torch.float64),
            torch.tensor([r["logp_ref"] for r in rows], dtype=torch.float64),
            torch.tensor([r["prompt"] for r in rows]),
        )
        assert est["kl"] == pytest.approx(p["kl"], abs=1e-9)
        scores = [gold(prompts[r["prompt"]], r["sample"]) for r in rows]
        assert scores == [r["gold"] for r in rows]
        assert sum(scores) / len(scores) == pytest.approx(p["gold"], abs=1e-9)
    for name in ("dpo-beta0.1", "kto-beta0.1"):
        saved = OmegaConf.load(out / name / "torchtune_config.yaml")
        assert saved.model_dir == str(folder) and saved.model.lora_rank == 16
        assert (out / name / "final" / "adapter_model.safetensors").is_file()
    assert (out / "plots" / "frontier.png").is_file()
    assert "## Gold-reward frontier" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model_dir={tmp}/missing", "model_dir: {tmp}/missing is not a folder"),
        (
            "compare.base_config=tiny/dpo",
            "model_dir: the base config tiny/dpo has no model_dir key",
        ),
        (
            "compare.train_overrides.eval_dataset=null",
            "compare.heldout.dataset: none given and the base config has no eval_dataset "
            "(compare.train_overrides.eval_dataset is null)",
        ),
    ],
)
def test_smollm2_frontier_refuses_a_model_it_would_not_train(tmp_path, override, message):
    """A compare model_dir that is no HF folder, or a base config that would not read it: one
    line naming model_dir, before any sampling or training."""
    from hf_families import make_family_folder

    folder = make_family_folder("smollm2", tmp_path / "model")
    proc = run_recipe(
        "smollm2/frontier",
        f"model_dir={folder}",
        f"output_dir={tmp_path}/o",
        override.format(tmp=tmp_path),
        cwd=tmp_path,
        recipe="prefopt_compare",
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    errors = [x for x in proc.stderr.splitlines() if re.match(r"^(\S+: )?error: ", x)]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_smollm2_frontier_gpu_variant_plans_48_matched_runs(tmp_path):
    """The GPU-sized variant, exactly as docs/compare.md gives it (the override set between
    its markers): 4 losses x 4 strengths x 3 seeds = 48 runs, each config valid and on CUDA,
    the task sampling on CUDA with 2048 training pairs; planned without a GPU (no run)."""
    import shlex

    from hf_families import make_family_folder

    from torchtune_prefopt import _config
    from tune_harness import load_recipe_module

    text = (Path(__file__).resolve().parents[1] / "docs" / "compare.md").read_text()
    block = text.split("<!-- frontier-gpu:begin -->\n", 1)[1].split("<!-- frontier-gpu:end -->")[0]
    command = shlex.split(block.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " "))
    assert command[:5] == ["tune", "run", "prefopt_compare", "--config", "smollm2/frontier"]
    folder = make_family_folder("smollm2", tmp_path / "model")
    overrides = [a for a in command[5:] if not a.startswith(("model_dir=", "output_dir="))] + [
        f"model_dir={folder}",
        f"output_dir={tmp_path}/o",
    ]
    recipe = load_recipe_module("prefopt_compare")
    cfg = _config.load_config(
        ["--config", str(_config.resolve_config("smollm2/frontier")), *overrides]
    )
    compare = recipe.CompareRecipe(cfg)
    assert compare.task.params["train_pairs"] == 2048 and compare.task.device == "cuda"
    runs = compare.plan(local=False)
    assert len(runs) == 48
    assert {r.family for r in runs} == {"dpo", "ipo", "kto", "simpo"}
    assert {r.seed for r in runs} == {0, 1, 2}
    for run in runs:
        merged = _config.load_config(["--config", str(compare.base_path), *run.overrides])
        assert merged.device == "cuda" and merged.model_dir == str(folder)
    assert not (tmp_path / "o").exists()
    from torchtune_prefopt.compare.controlled import ControlledSentimentTask

    with pytest.raises(ValueError, match="compare.task.device must be cpu or cuda"):
        ControlledSentimentTask(str(folder), device="mps")
