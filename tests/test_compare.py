"""prefopt_compare: matched runs, held-out metrics, generation, judges, report.

Unit tests run in-process on the tiny model. The end-to-end test runs the real
``tune run prefopt_compare --config tiny/compare`` (four 8-step runs on CPU, two at a time,
16 held-out pairs, 12 new tokens), then re-evaluates the same runs in-process with
``compare.skip_training=true``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import torchtune_prefopt
from torchtune_prefopt import _config
from torchtune_prefopt.compare import (
    DEFAULT_LOSSES,
    CourtesyJudge,
    HeldoutLogps,
    build_judge,
    courtesy_reward,
    heldout_metrics,
    kto_dataset_overrides,
    loss_rewards,
    parse_disk_log,
    plan_runs,
    read_run_logs,
    write_report,
)
from torchtune_prefopt.compare.evaluation import build_eval_model
from torchtune_prefopt.compare.generation import completion_logps, generate_completions
from torchtune_prefopt.compare.judges import judge_win_rate
from torchtune_prefopt.compare.metrics import kl_estimate
from torchtune_prefopt.compare.report import matplotlib_available
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.losses import DPOLoss, IPOLoss, KTOLoss, SimPOLoss, build_loss
from torchtune_prefopt.models.hf_checkpoint import TorchtuneCheckpoint
from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint, tiny_tokenizer
from tune_harness import run_recipe

RECIPES = Path(torchtune_prefopt.__file__).parent / "recipes"
SYNTHETIC_HELDOUT = (
    Path(torchtune_prefopt.__file__).parent / "data" / "assets" / "synthetic" / "heldout.jsonl"
)
TINY_MODEL = {"_component_": "torchtune_prefopt.models.tiny.tiny_qwen2"}


# ----------------------------------------------------------------------------- logs


def test_parse_disk_log_written_by_torchtune(tmp_path):
    from torchtune.training.metric_logging import DiskLogger

    lg = DiskLogger(log_dir=str(tmp_path), filename="log_1.txt")
    lg.log_dict({"loss": 0.69, "rewards/accuracies": 0.5, "eval/rewards/margins": -1e-05}, step=1)
    lg.log("loss", 0.5, step=2)
    lg.log_dict({"loss": float("nan"), "kl": 3}, step=3)
    lg.close()
    m = parse_disk_log(tmp_path / "log_1.txt")
    assert m["loss"][:2] == [(1, 0.69), (2, 0.5)] and math.isnan(m["loss"][2][1])
    assert m["rewards/accuracies"] == [(1, 0.5)] and m["eval/rewards/margins"] == [(1, -1e-05)]
    assert m["kl"] == [(3, 3.0)]
    # a resumed run appends a second file: merged, the later file wins on the same step
    lg2 = DiskLogger(log_dir=str(tmp_path), filename="log_2.txt")
    lg2.log_dict({"loss": 0.25}, step=3)
    lg2.log_dict({"loss": 0.2}, step=4)
    lg2.close()
    merged, files = read_run_logs(tmp_path)
    assert [f.name for f in files] == ["log_1.txt", "log_2.txt"]
    assert merged["loss"] == [(1, 0.69), (2, 0.5), (3, 0.25), (4, 0.2)]


# ----------------------------------------------------------------------------- metrics


def _logps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = lambda: -10 - 20 * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    tc = torch.randint(3, 9, (n,), generator=g).double()
    tr = torch.randint(3, 9, (n,), generator=g).double()
    cs, rs = s(), s()
    return HeldoutLogps.of_columns(cs, rs, cs / tc, rs / tr, tc, tr)


def test_loss_rewards_are_each_losses_own_implicit_reward():
    pol, ref = _logps(seed=1), _logps(seed=2)
    c, r = loss_rewards(DPOLoss(beta=0.2), pol, ref)
    assert torch.allclose(c, 0.2 * (pol.chosen_sum - ref.chosen_sum))
    assert torch.allclose(r, 0.2 * (pol.rejected_sum - ref.rejected_sum))
    c, r = loss_rewards(IPOLoss(tau=0.25, average_logps=True), pol, ref)
    assert torch.allclose(c, 0.25 * (pol.chosen_mean - ref.chosen_mean))
    c, _ = loss_rewards(IPOLoss(tau=0.25, average_logps=False), pol, ref)
    assert torch.allclose(c, 0.25 * (pol.chosen_sum - ref.chosen_sum))
    c, r = loss_rewards(SimPOLoss(beta=2.0, gamma=1.0), pol, None)  # reference-free
    assert torch.allclose(c, 2.0 * pol.chosen_mean) and torch.allclose(r, 2.0 * pol.rejected_mean)
    c, r = loss_rewards(
        KTOLoss(beta=0.1), pol, ref
    )  # unpaired: chosen rows desirable, rejected not
    assert torch.allclose(c, 0.1 * (pol.chosen_sum - ref.chosen_sum))
    assert torch.allclose(r, 0.1 * (pol.rejected_sum - ref.rejected_sum))


def test_heldout_metrics_definitions():
    ref = HeldoutLogps.of_columns(
        *(
            torch.tensor(v, dtype=torch.float64)
            for v in (
                [-10.0, -10.0, -10.0, -10.0],
                [-12.0, -8.0, -10.0, -9.0],
                [-2.0] * 4,
                [-2.0] * 4,
                [5.0] * 4,
                [5.0] * 4,
            )
        )
    )
    pol = HeldoutLogps.of_columns(
        *(
            torch.tensor(v, dtype=torch.float64)
            for v in (
                [-11.0, -9.0, -10.0, -10.0],
                [-14.0, -9.0, -10.0, -8.0],
                [-2.2, -1.8, -2.0, -2.0],
                [-2.8, -1.8, -2.0, -1.6],
                [5.0] * 4,
                [5.0] * 4,
            )
        )
    )
    m = heldout_metrics(DPOLoss(beta=0.1), pol, ref)
    # D = (S_w - S_l) - (S_ref_w - S_ref_l): [3-2, -0 - (-2), 0-0, -2-(-1)] = [1, 2, 0, -1]
    assert m["margin_improved"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)  # a tie counts 0.5
    assert m["margin_gain"] == pytest.approx(0.5)
    assert m["rewards/accuracies"] == pytest.approx(m["margin_improved"])  # DPO's reward is D-based
    assert m["logps/accuracies"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert m["logps/accuracies_per_token"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert m["chosen_logp_drift"] == pytest.approx(0.0)  # [-1, 1, 0, 0]
    assert m["chosen_logp_fell"] == pytest.approx(0.25)
    assert m["rejected_logp_drift"] == pytest.approx(-0.5)
    ref_row = heldout_metrics(None, ref, None)
    assert "rewards/accuracies" not in ref_row and ref_row["logps/accuracies"] == pytest.approx(
        (1 + 0 + 0.5 + 0) / 4
    )


def test_kl_estimate_stderr_over_prompts():
    out = kl_estimate(
        torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.zeros(4), torch.tensor([0, 0, 1, 1])
    )
    assert out["kl"] == pytest.approx(2.0) and out["kl_stderr"] == pytest.approx(0.0)
    assert out["kl_prompts"] == 2 and out["kl_samples"] == 4


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def tiny_dpo_cfg():
    return _config.load_config(["--config", "tiny/dpo"])


def test_plan_runs_matched_commands(tiny_dpo_cfg, tmp_path):
    losses = OmegaConf.load(_config.resolve_config("tiny/compare")).compare.loss_configs
    runs = plan_runs(
        base_config="tiny/dpo",
        base_cfg=tiny_dpo_cfg,
        output_dir=tmp_path,
        losses=["dpo", "ipo", "kto", "simpo"],
        loss_configs=losses,
        overrides=["max_steps_per_epoch=8"],
        loss_overrides={"simpo": ["optimizer.lr=0.001"]},
        nproc_per_node=2,
        build_loss=build_loss,
    )
    by = {r.name: r for r in runs}
    assert by["dpo"].command[:5] == ["tune", "run", "--nproc_per_node", "2", "prefopt_distributed"]
    assert f"output_dir={tmp_path / 'ipo'}" in by["ipo"].overrides
    # IPO replaces DPO's loss: the base's `beta` is removed, tau/average_logps set
    assert "~loss.beta" in by["ipo"].overrides and "loss.tau=0.25" in by["ipo"].overrides
    assert "~loss.beta" not in by["dpo"].overrides
    # KTO: the same data as unpaired rows (the builder's unpaired switch), twice the rows per
    # batch (same completions per step)
    assert "dataset.unpaired=true" in by["kto"].overrides
    assert "batch_size=16" in by["kto"].overrides
    assert not any(
        o.startswith("dataset") or o.startswith("batch_size") for o in by["dpo"].overrides
    )
    assert by["simpo"].overrides[-1] == "optimizer.lr=0.001"
    assert all("max_steps_per_epoch=8" in r.overrides for r in runs)
    # every planned command parses into a valid config with the intended loss and data
    for r in runs:
        merged = _config.load_config(["--config", "tiny/dpo", *r.overrides])
        loss = build_loss(merged.loss)
        assert type(loss).__name__.lower().startswith(r.name)
        assert merged.seed == tiny_dpo_cfg.seed and merged.optimizer.lr == (
            0.001 if r.name == "simpo" else tiny_dpo_cfg.optimizer.lr
        )
    assert "'~loss.beta'" in by["ipo"].shell  # shell-quoted in commands.sh


def test_kto_dataset_overrides():
    pd = {
        "_component_": "torchtune_prefopt.data.preference_dataset",
        "source": "json",
        "data_files": "d.jsonl",
        "train_on_input": False,
    }
    # every paired builder of the package has the unpaired switch (the same rows as KTO rows)
    assert kto_dataset_overrides(pd) == ["dataset.unpaired=true"]
    assert kto_dataset_overrides({**pd, "unpaired": True}) == []
    assert kto_dataset_overrides({"_component_": "torchtune_prefopt.data.hh_rlhf_dataset"}) == [
        "dataset.unpaired=true"
    ]
    assert (
        kto_dataset_overrides(
            {"_component_": "torchtune_prefopt.data.unpaired_from_paired", "source": "x"}
        )
        == []
    )
    explicit = kto_dataset_overrides(
        pd, {"_component_": "torchtune_prefopt.data.thumbs_dataset", "source": "json"}
    )
    assert (
        "~dataset.data_files" in explicit
        and "dataset._component_=torchtune_prefopt.data.thumbs_dataset" in explicit
    )
    with pytest.raises(PrefOptUserError, match="compare.kto_dataset"):
        kto_dataset_overrides({"_component_": "my.own_dataset"})


# ----------------------------------------------------------------------------- judges


def test_courtesy_judge_and_win_rates():
    j = CourtesyJudge()
    assert (
        j("q", "A cat is an animal. Hope this helps!", "A cat is an animal. Stop bothering me.")
        == 1.0
    )
    assert j("q", "No idea, sorry.", "A cat is an animal.") == 0.0
    assert j("q", "x", "y") == 0.5
    assert courtesy_reward("q", "Thanks for asking!") == 1.0
    wr = judge_win_rate(
        j, "pairwise", ["q"] * 3, ["Happy to help!", "x", "no idea"], ["x", "x", "x"]
    )
    assert wr["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3) and (
        wr["wins"],
        wr["ties"],
        wr["losses"],
    ) == (1, 1, 1)

    # a position-biased judge (always prefers the first answer) gets 0.5 from the two orders
    assert judge_win_rate(lambda x, a, b: 1.0, "pairwise", ["q"], ["a"], ["b"])["win_rate"] == 0.5


def test_build_judge_kinds():
    judge, kind = build_judge(
        {"_component_": "torchtune_prefopt.compare.judges.CourtesyJudge", "tie": 0.4}
    )
    assert kind == "pairwise" and judge("q", "a", "b") == 0.4
    judge, kind = build_judge({"_component_": "torchtune_prefopt.compare.judges.courtesy_reward"})
    assert kind == "reward" and judge("q", "Hope this helps!") == 1.0
    judge, kind = build_judge(
        OmegaConf.create({"_component_": "torchtune_prefopt.compare.judges.CourtesyJudge"}),
        "reward",
    )
    assert kind == "reward"  # explicit kind wins
    with pytest.raises(ValueError, match="cannot be imported"):
        build_judge({"_component_": "no.such.judge"})
    with pytest.raises(ValueError, match="neither a judge"):
        build_judge(
            {"_component_": "torchtune_prefopt.compare.judges.courtesy_score"}
        )  # 1 argument
    with pytest.raises(ValueError, match="judge_kind"):
        build_judge(lambda *args: 0.5)  # arity unknown


# ----------------------------------------------------------------------------- generation / KL


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(tokenizer, reference, perturbed policy) on CPU, fp32."""
    d = tmp_path_factory.mktemp("cmp_models")
    ckpt = make_tiny_hf_checkpoint(d / "base", seed=3)
    sd = TorchtuneCheckpoint.over(ckpt, "QWEN2", d / "scratch").load()
    ref = build_eval_model(OmegaConf.create(TINY_MODEL), sd, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    pert = {
        k: (v + 0.05 * torch.randn(v.shape, generator=g) if k == "output.weight" else v)
        for k, v in sd.items()
    }
    pol = build_eval_model(OmegaConf.create(TINY_MODEL), pert, torch.device("cpu"), torch.float32)
    return tiny_tokenizer(), ref, pol


def _prompt(tok, text):
    from torchtune.data import Message

    ids, _ = tok.tokenize_messages(
        [Message("user", text, masked=True), Message("assistant", "", eot=False)], add_eos=False
    )
    return ids


def test_batched_greedy_generation_matches_one_by_one(tiny_models):
    tok, ref, _ = tiny_models
    prompts = [
        _prompt(tok, t) for t in ("What is an owl?", "Hi! Please classify this word: harp.", "Hey")
    ]
    kw = dict(
        max_new_tokens=6,
        stop_tokens=tok.stop_tokens,
        pad_id=tok.pad_id,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    batched = generate_completions(
        ref, prompts, batch_size=3, kv_cache=True, **kw
    )  # left-padded, KV cache
    single = [
        generate_completions(ref, [p], batch_size=1, kv_cache=False, **kw)[0] for p in prompts
    ]
    assert batched == single and all(1 <= len(c) <= 6 for c in batched)
    # sampling with a seed is reproducible
    s1 = generate_completions(ref, prompts, temperature=1.0, seed=7, **kw)
    assert s1 == generate_completions(ref, prompts, temperature=1.0, seed=7, **kw)


def test_monte_carlo_kl_matches_exact_one_token_kl(tiny_models):
    """max_new_tokens=1: KL(pi||pi_ref) of the first token is computable exactly from the logits."""
    tok, ref, pol = tiny_models
    prompt = _prompt(tok, "What is an owl?")
    x = torch.tensor([prompt])
    with torch.no_grad():
        lp = torch.log_softmax(pol(x)[0, -1].double(), -1)
        lq = torch.log_softmax(ref(x)[0, -1].double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum())
    n = 512
    samples = generate_completions(
        pol,
        [prompt] * n,
        max_new_tokens=1,
        stop_tokens=[],
        pad_id=tok.pad_id,
        device=torch.device("cpu"),
        dtype=torch.float32,
        temperature=1.0,
        seed=0,
        batch_size=n,
    )
    a = completion_logps(
        pol, [prompt] * n, samples, pad_id=tok.pad_id, device=torch.device("cpu"), batch_size=n
    )
    b = completion_logps(
        ref, [prompt] * n, samples, pad_id=tok.pad_id, device=torch.device("cpu"), batch_size=n
    )
    diff = a - b
    se = float(diff.std() / math.sqrt(n))
    assert exact > 0.01
    assert abs(float(diff.mean()) - exact) < 4 * se + 1e-3, (float(diff.mean()), exact, se)
    # the reference against itself: exactly 0
    assert torch.equal(
        completion_logps(
            ref, [prompt] * 4, samples[:4], pad_id=tok.pad_id, device=torch.device("cpu")
        ),
        b[:4],
    )


# ----------------------------------------------------------------------------- report


def test_write_report_minimal(tmp_path):
    res = {
        "heldout": {"logps/accuracies": 0.5, "rewards/accuracies": float("nan")},
        "generation": {"response_length": 3.0},
        "kl": {"kl": 0.1, "kl_stderr": 0.01},
        "rows": {},
    }
    report = {
        "settings": {
            "base_config": "tiny/dpo",
            "base_config_file": "x.yaml",
            "heldout_rows": 2,
            "heldout_prompts": 2,
            "heldout_dataset": "d",
            "generation": "greedy",
            "kl": "1 sample",
        },
        "matched": {"ok": False, "differences": ["seed differs: a=1, b=2"]},
        "reference": {
            "name": "reference",
            "result": {"heldout": {"logps/accuracies": 0.5}, "generation": {}},
            "files": {},
        },
        "runs": [
            {
                "name": "dpo",
                "loss_label": "DPOLoss(beta=0.1)",
                "result": res,
                "files": {"metrics": "m.txt"},
                "training": {"steps": 2, "final_loss": 0.6, "eval_accuracy": [[0, 0.5], [2, 1.0]]},
                "log_files": ["log.txt"],
                "command": "tune run x",
            }
        ],
        "curves": {"dpo": {"loss": [[1, 0.7], [2, 0.6]], "not_a_recipe_metric": [[1, 1.0]]}},
    }
    paths = write_report(report, tmp_path)
    md = paths["md"].read_text()
    assert "| dpo | DPOLoss(beta=0.1) |" in md and "0.100 ± 0.010" in md and "seed differs" in md
    assert "0.500 (step 0) → 1.000 (step 2)" in md and "`log.txt`" in md
    data = json.loads(
        paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")
    )
    assert data["runs"][0]["result"]["heldout"]["rewards/accuracies"] is None
    html = paths["html"].read_text()
    assert "<table>" in html and ("<svg" in html or "<img" in html)
    assert matplotlib_available()  # a test dependency (pyproject's `test` extra)
    assert (tmp_path / "plots" / "loss.png").is_file()


# ----------------------------------------------------------------------------- end to end

E2E_STEPS = 8
E2E_ROWS = 16
E2E_NEW_TOKENS = 12


def _tiny_compare_args(out: Path, base: Path, heldout: Path):
    return [
        f"output_dir={out}",
        f"compare.train_overrides.max_steps_per_epoch={E2E_STEPS}",
        "compare.train_overrides.eval_every_n_steps=4",
        f"compare.train_overrides.checkpointer.checkpoint_dir={base}",
        # a 16-pair held-out file: in-training evals and the comparison use the same pairs
        "compare.train_overrides.eval_dataset._component_=torchtune_prefopt.data.preference_dataset",
        "compare.train_overrides.eval_dataset.source=json",
        f"compare.train_overrides.eval_dataset.data_files.heldout={heldout}",
        f"compare.heldout.max_rows={E2E_ROWS}",
        f"compare.generation.max_new_tokens={E2E_NEW_TOKENS}",
        f"compare.kl.max_new_tokens={E2E_NEW_TOKENS}",
        "compare.kl.samples_per_prompt=2",
    ]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Run `tune run prefopt_compare --config tiny/compare ...` once for the module."""
    root = tmp_path_factory.mktemp("compare_e2e")
    heldout = root / "heldout16.jsonl"
    heldout.write_text("".join(SYNTHETIC_HELDOUT.read_text().splitlines(keepends=True)[:E2E_ROWS]))
    out = root / "out"
    args = _tiny_compare_args(out, root / "base", heldout) + ["compare.max_parallel=2"]
    proc = run_recipe("tiny/compare", *args, cwd=root, recipe="prefopt_compare")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "out": out, "heldout": heldout, "stdout": proc.stdout, "args": args}


@pytest.mark.slow
def test_e2e_report(e2e):
    out = e2e["out"]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert (out / "report.html").is_file() and (out / "commands.sh").is_file()
    assert [r["name"] for r in report["runs"]] == ["dpo", "ipo", "kto", "simpo"]
    assert report["matched"]["ok"], report["matched"]["differences"]
    assert report["settings"]["steps_per_run"] == [E2E_STEPS]
    assert report["settings"]["completions_per_step"] == [16]  # 8 pairs = 16 KTO rows
    assert report["settings"]["heldout_rows"] == E2E_ROWS
    assert "CourtesyJudge (pairwise)" in report["settings"]["judge"]
    ref = report["reference"]["result"]
    assert 0 <= ref["heldout"]["logps/accuracies"] <= 1
    for run in report["runs"]:
        h, g, k = run["result"]["heldout"], run["result"]["generation"], run["result"]["kl"]
        for key in (
            "rewards/accuracies",
            "margin_improved",
            "logps/accuracies",
            "chosen_logp_fell",
        ):
            assert 0.0 <= h[key] <= 1.0, (run["name"], key, h[key])
        for key in ("rewards/margins", "margin_gain", "chosen_logp_drift", "rejected_logp_drift"):
            assert math.isfinite(h[key])
        assert h["rows"] == E2E_ROWS
        assert 0 < g["response_length"] <= E2E_NEW_TOKENS and 0 <= g["win_rate"] <= 1
        assert math.isfinite(k["kl"]) and k["kl_samples"] == 2 * g["prompts"]
        assert run["training"]["steps"] == E2E_STEPS and run["recipe_state"]["world_size"] == 1
        # the training improved the held-out margin over the reference (8 steps, lr 3e-3)
        assert h["margin_gain"] > 0, (run["name"], h)
        # every number traceable: the eval DiskLogger file holds the same numbers ...
        ev = parse_disk_log(Path(run["files"]["metrics"]))
        assert ev["heldout/rewards/accuracies"] == [
            (E2E_STEPS, pytest.approx(h["rewards/accuracies"]))
        ]
        assert ev["kl/kl"] == [(E2E_STEPS, pytest.approx(k["kl"]))]
        # ... and the training numbers are the run's own DiskLogger log
        logs, files = read_run_logs(Path(run["run_dir"]) / "logs")
        assert [str(f) for f in files] == run["log_files"] and all(
            f in md for f in run["log_files"]
        )
        step, value = logs["loss"][-1]
        assert step == E2E_STEPS and value == pytest.approx(run["training"]["final_loss"])
        assert run["command"] in (out / "commands.sh").read_text()
        gens = [
            json.loads(line)
            for line in (Path(run["files"]["generations"])).read_text().splitlines()
        ]
        assert len(gens) == E2E_ROWS and all(
            "judge_p" in r and "reference_response" in r for r in gens
        )
        assert gens[0]["prompt"].startswith("user\n") and gens[0]["prompt"].endswith("assistant\n")
    # each loss's own reward: SimPO's is beta * (per-token mean logp), from the per-row file
    by = {r["name"]: r for r in report["runs"]}
    rows = [
        json.loads(line) for line in Path(by["simpo"]["files"]["heldout"]).read_text().splitlines()
    ]
    beta = by["simpo"]["loss_config"]["beta"]
    assert by["simpo"]["result"]["heldout"]["rewards/chosen"] == pytest.approx(
        sum(beta * r["chosen_mean"] for r in rows) / len(rows)
    )
    assert "kl" in report["curves"]["kto"] and "rewards/desirable" in report["curves"]["kto"]
    assert set(report["curves"]["dpo"]) >= {"loss", "rewards/accuracies", "eval/rewards/accuracies"}
    assert "## Held-out preference metrics" in md and "| kto |" in md and "Definitions" in md
    # the PNG plots are the only thing that needs matplotlib (a test dependency)
    assert matplotlib_available()
    assert (out / "plots" / "loss.png").is_file() and "plots/loss.png" in md


def _run_compare_in_process(monkeypatch, args):
    spec = importlib.util.spec_from_file_location(
        "_prefopt_compare_test", RECIPES / "prefopt_compare.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["prefopt_compare", "--config", "tiny/compare", *args])
    with pytest.raises(SystemExit) as exc:
        mod.recipe_main()
    return exc.value.code


@pytest.mark.slow
def test_e2e_skip_training_reevaluates_existing_runs(e2e, monkeypatch, capsys):
    out = e2e["out"]
    before = {
        p: p.stat().st_mtime_ns for p in (out / "dpo" / "checkpoints").rglob("*") if p.is_file()
    }
    args = [a for a in e2e["args"]] + [
        "compare.skip_training=true",
        "compare.losses=[dpo,kto]",
        "compare.kl.samples_per_prompt=0",
        "compare.judge._component_=torchtune_prefopt.compare.judges.courtesy_reward",
    ]
    assert _run_compare_in_process(monkeypatch, args) in (None, 0)
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["dpo", "kto"]
    assert "(reward)" in report["settings"]["judge"]
    assert "judge_mean_score" in report["runs"][0]["result"]["generation"]
    assert "judge mean score" in (out / "report.md").read_text()
    assert "rows" not in report["runs"][0]["result"]  # per-row details: eval/<run>/*.jsonl only
    assert report["runs"][0]["result"]["kl"] == {}
    after = {
        p: p.stat().st_mtime_ns for p in (out / "dpo" / "checkpoints").rglob("*") if p.is_file()
    }
    assert before == after  # nothing retrained
    assert "Held-out preference metrics" in capsys.readouterr().out


def test_dry_run_and_unfinished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fresh"
    assert _run_compare_in_process(monkeypatch, [f"output_dir={out}", "compare.dry_run=true"]) in (
        None,
        0,
    )
    lines = [
        ln for ln in (out / "commands.sh").read_text().splitlines() if ln.startswith("tune run")
    ]
    assert len(lines) == 4 and all(f"output_dir={out}/" in ln for ln in lines)
    assert not (out / "dpo").exists()
    # evaluating runs that were never trained: one line, naming the command to train them
    code = _run_compare_in_process(monkeypatch, [f"output_dir={out}", "compare.skip_training=true"])
    err = capsys.readouterr().err
    assert code == 2 and "has no finished training" in err and "tune run prefopt_distributed" in err
    # config mistakes are one line too
    assert _run_compare_in_process(monkeypatch, [f"output_dir={out}", "compare.lossses=[dpo]"]) == 2
    assert "did you mean 'losses'" in capsys.readouterr().err
    assert (
        _run_compare_in_process(monkeypatch, [f"output_dir={out}", "compare.losses=[dpo,orpoo]"])
        == 2
    )
    # a registered name (orpo) would run with its own defaults; a typo is one line
    assert "'orpoo' is not a registered loss and has no compare.loss_configs.orpoo" in (
        capsys.readouterr().err
    )


def test_real_model_compare_config_plans_matched_runs(tmp_path, monkeypatch, capsys):
    """qwen2_5/0.5B_compare (no download needed for planning): dry run -> commands.sh."""
    _config.resolve_config("qwen2_5/0.5B_dpo")  # packaged (test_packaged_configs checks the set)
    out = tmp_path / "q"
    spec = importlib.util.spec_from_file_location(
        "_prefopt_compare_test_q", RECIPES / "prefopt_compare.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "prefopt_compare",
            "--config",
            "qwen2_5/0.5B_compare",
            f"output_dir={out}",
            "compare.dry_run=true",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        mod.recipe_main()
    assert exc.value.code in (None, 0), capsys.readouterr().err
    lines = [
        ln for ln in (out / "commands.sh").read_text().splitlines() if ln.startswith("tune run")
    ]
    assert len(lines) == 4 and all(
        ln.startswith("tune run --nproc_per_node 8 prefopt_distributed --config qwen2_5/0.5B_dpo")
        for ln in lines
    )
    kto = next(ln for ln in lines if "/kto" in ln)
    assert "dataset.unpaired=true" in kto and "batch_size=8" in kto
    assert "loss.gamma=1.375" in next(ln for ln in lines if "/simpo" in ln)


def test_kto_gets_twice_the_rows_also_when_train_overrides_set_the_batch(tmp_path):
    """tiny/frontier sets batch_size in compare.train_overrides: each run's config, merged as
    its own `tune run` merges it, gives KTO kto_rows_per_pair x the paired runs' batch (the
    same completions per step), not the common override's value."""
    from tune_harness import load_recipe_module

    recipe = load_recipe_module("prefopt_compare")
    base = _config.resolve_config("tiny/frontier")
    cfg = _config.load_config(["--config", str(base), f"output_dir={tmp_path}/o"])
    compare = recipe.CompareRecipe(cfg)
    batches = {}
    for run in compare.plan(local=False):
        merged = _config.load_config(["--config", str(compare.base_path), *run.overrides])
        batches[run.name.split("-")[0]] = (merged.batch_size, merged.dataset.get("unpaired"))
    assert cfg.compare.train_overrides.batch_size == 8
    assert batches == {"dpo": (8, None), "ipo": (8, None), "simpo": (8, None), "kto": (16, True)}


# ----------------------------------------------------------------------------- key table
def test_compare_key_table_is_generated_from_the_table():
    from torchtune_prefopt.compare import settings

    text = (Path(__file__).resolve().parents[1] / "docs" / "compare.md").read_text()
    table = text.split("<!-- compare-keys:begin -->\n", 1)[1].split("\n<!-- compare-keys:end -->")[
        0
    ]
    assert table == settings.compare_key_table_markdown()
    assert len(table.splitlines()) == 2 + len(settings.COMPARE_KEYS)
    # every key the packaged compare configs use is a row of the table (no undocumented key)
    for name in ("tiny/compare", "tiny/frontier", "qwen2_5/0.5B_compare"):
        cfg = _config.load_config(["--config", name, "output_dir=/tmp/x"])
        settings.check_known_keys(cfg, settings.COMPARE_KEYS)


def test_compare_settings_defaults_come_from_the_table():
    from torchtune_prefopt.compare import settings

    base = OmegaConf.create({"logprobs_chunk_size": 256})
    s = settings.read_compare_settings(OmegaConf.create({"compare": {"kl": {"seed": 7}}}))
    ev = settings.eval_settings(s, base)
    assert (ev.max_rows, ev.batch_size, ev.chunk_size, ev.kl_seed) == (64, 8, 256, 7)
    assert ev.kl_max_new_tokens == ev.max_new_tokens == 32 and s.losses == list(DEFAULT_LOSSES)
    # explicit null: all held-out rows (nullable), the base's chunk size
    s = settings.read_compare_settings(
        OmegaConf.create({"compare": {"heldout": {"max_rows": None}}})
    )
    assert settings.eval_settings(s, OmegaConf.create({})).max_rows is None
    assert settings.eval_settings(s, OmegaConf.create({})).chunk_size == 1024
    for bad, message in (
        (
            {"compare": {"base_config": "tiny/dpo", "generation": {"kv_cach": True}}},
            "did you mean 'kv_cache'",
        ),
        (
            {"compare": {"base_config": "tiny/dpo", "max_parallel": 0}},
            "compare.max_parallel must be an integer >= 1",
        ),
        (
            {"compare": {"base_config": "tiny/dpo", "dry_run": "yes"}},
            "compare.dry_run must be true or false",
        ),
        (
            {"compare": {"base_config": "tiny/dpo", "heldout": 3}},
            "compare.heldout must be a mapping",
        ),
        ({"compare": {"losses": ["dpo"]}}, "config key 'compare.base_config' is required"),
    ):
        with pytest.raises(PrefOptUserError, match=message):
            settings.validate_compare_config(OmegaConf.create({"output_dir": "/tmp/x", **bad}))


# ----------------------------------------------------------------------------- HF folders
@pytest.mark.slow
@pytest.mark.parametrize("base_config", ["hf/dpo", "hf/dpo_lora"])
def test_compare_evaluates_runs_that_train_an_hf_folder(base_config, tmp_path):
    """``prefopt_compare`` over an ``hf/*`` base config (full and LoRA): every run's ``final/``
    and the reference are read through the base's own checkpointer kind, so the held-out
    log-probs of each model equal transformers' on that model's folder."""
    from hf_families import completion_logps_by_transformers, make_family_folder

    from tune_harness import synthetic_rows, write_jsonl

    folder = make_family_folder("qwen3", tmp_path / "model")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows(4))
    heldout_rows = synthetic_rows(3, "heldout")
    heldout = write_jsonl(tmp_path / "heldout.jsonl", heldout_rows)
    lora = {"model": {"lora_rank": 4, "lora_alpha": 8}} if base_config.endswith("lora") else {}
    cfg = {
        "output_dir": str(tmp_path / "cmp"),
        "compare": {
            "base_config": base_config,
            "losses": ["dpo"],
            "train_overrides": {
                "model_dir": str(folder),
                "device": "cpu",
                "dtype": "fp32",
                "optimizer": {"fused": False, "lr": 1e-2},
                "dataset": {"source": "json", "data_files": str(pairs), "split": "train"},
                "eval_dataset": {"source": "json", "data_files": str(heldout), "split": "train"},
                "eval_every_n_steps": None,
                "shuffle": False,
                "batch_size": 2,
                "gradient_accumulation_steps": 1,
                "lr_scheduler": None,
                "save_every_n_steps": None,
                "max_steps_per_epoch": 2,
                **lora,
            },
            "heldout": {"max_rows": 3, "batch_size": 2},
            "generation": {"max_new_tokens": 4},
            "kl": {"samples_per_prompt": 0},
        },
    }
    config = tmp_path / "compare.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    proc = run_recipe(config, cwd=tmp_path, recipe="prefopt_compare")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "cmp"
    report = json.loads((out / "report.json").read_text())
    final = Path(report["runs"][0]["checkpoint"])
    for name, model_folder in (("reference", folder), ("dpo", final)):
        rows = [
            json.loads(x) for x in (out / "eval" / name / "heldout.jsonl").read_text().splitlines()
        ]
        expected = completion_logps_by_transformers(model_folder, heldout_rows)
        got = [r["chosen_sum"] for r in rows]
        assert got == pytest.approx(expected, rel=1e-4), name
    ref_rows = (out / "eval" / "reference" / "heldout.jsonl").read_text()
    assert ref_rows != (out / "eval" / "dpo" / "heldout.jsonl").read_text()  # it trained
