"""End to end: `tune run prefopt_distributed` through the real `tune` CLI, on CPU.

What is checked (every run is a subprocess of the installed `tune`, cwd = its own tmp dir):

1. every loss (dpo, ipo, kto, simpo), full and LoRA, 1 process: it trains (the logged loss
   goes down), writes atomic step checkpoints (``CHECKPOINT.json`` manifest) and ``final``;
2. 2 processes (gloo, FSDP2) with the same global batch give the 1-process per-step
   losses and final weights (one of them with gradient_accumulation_steps=2);
3. SimPO holds no reference weights (the CLI run logs nothing that shows it, so the recipe
   is set up in a child process and inspected; LoRA's final merged save is checked there
   too: it must not change the live model);
4. resuming from a step checkpoint equals the uninterrupted run, bit for bit;
5. the final checkpoint loads in ``transformers`` and scores like torchtune's model;
6. a second team's installed package contributes a config and a loss, run by name.

Cost: every run is a fresh interpreter (~10 s CPU just to import torch/torchtune), so the
runs are tiny (4 steps, 4 rows, 64 tokens, no eval) and are started ahead of time in a
small pool (``tune_harness.RunPool``, ``PREFOPT_TEST_JOBS``, default 2 concurrent runs): the runs the *selected*
tests need are submitted when the module's first test starts, dependencies first. Tests then
only read their runs' outputs (``output_dir/logs/log_*.txt``, ``output_dir/checkpoints``);
none modifies another run's files (resume copies a checkpoint into a fresh directory). The
tiny base checkpoint is generated once per module inside the module's tmp dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import pytest

from torchtune_prefopt._config import available_configs
from tune_harness import (
    CPU_FP32,
    NO_EVAL,
    VOLATILE,
    RunPool,
    RunResult,
    RunSpec,
    assert_same_training,
    load_weights,
    uses_runs,
    wanted_runs,
)

pytestmark = pytest.mark.slow


LOSSES = ("dpo", "ipo", "kto", "simpo")
VARIANTS = ("full", "lora")
STEPS = 4  # optimizer steps per run
SAVE_EVERY = 2  # so every run also leaves a mid-run checkpoint to resume from
BATCH = 4  # global rows per optimizer step in every run
SEQ_LEN = 64

# Applied to every run: tiny, deterministic, no held-out eval, no lr warm-up (step 1 would
# otherwise use lr 0 and the loss could not move in 4 steps).
COMMON = (
    f"max_steps_per_epoch={STEPS}",
    "epochs=1",
    f"save_every_n_steps={SAVE_EVERY}",
    "keep_last_n_checkpoints=null",
    "log_every_n_steps=1",
    f"tokenizer.max_seq_len={SEQ_LEN}",
    "lr_scheduler.num_warmup_steps=0",
    *NO_EVAL,
    *CPU_FP32,
    "compile=false",
)


# Fallback when another team's tiny/<loss> config is not there: tiny/dpo + overrides.
_LOSS_FALLBACK = {
    "dpo": (),
    "ipo": (
        "loss._component_=torchtune_prefopt.losses.IPOLoss",
        "~loss.beta",
        "loss.tau=0.25",
        "loss.average_logps=true",
    ),
    "kto": (
        "loss._component_=torchtune_prefopt.losses.KTOLoss",
        "dataset._component_=torchtune_prefopt.data.synthetic_kto_dataset",
    ),
    "simpo": (
        "loss._component_=torchtune_prefopt.losses.SimPOLoss",
        "loss.beta=2.0",
        "loss.gamma=1.0",
    ),
}
_LORA_FALLBACK = (
    "model._component_=torchtune_prefopt.models.tiny.lora_tiny_qwen2",
    "model.lora_attn_modules=[q_proj,v_proj]",
    "model.lora_rank=8",
    "model.lora_alpha=16",
    "optimizer.lr=1e-2",
)


def loss_config(loss: str, variant: str) -> tuple:
    """``(config name, overrides)`` selecting ``loss`` with a full or LoRA tiny model."""
    name = f"tiny/{loss}" + ("_lora" if variant == "lora" else "")
    if name in available_configs():
        return name, ()
    return "tiny/dpo", _LOSS_FALLBACK[loss] + (_LORA_FALLBACK if variant == "lora" else ())


# --------------------------------------------------------------------------------------
# runs


def one_proc_key(loss: str, variant: str) -> str:
    return f"1p-{loss}-{variant}"


# 2-process runs: (loss, variant, per-rank batch_size, gradient_accumulation_steps). Same
# global rows per optimizer step (BATCH) as the 1-process baseline. simpo's run has
# batch 1 x 2 ranks x 2 micro-batches: accumulation *and* sharding must equal one batch of 4.
TWO_PROC = {
    "dpo": ("full", 2, 1),
    "ipo": ("lora", 2, 1),
    "kto": ("lora", 2, 1),
    "simpo": ("full", 1, 2),
}

RESUME_CASES = (("dpo", "full"), ("kto", "lora"))
HF_CASES = (("dpo", "full"), ("ipo", "lora"))

# A second team's package: config folder + loss, registered through entry points.
ACME_MARKER_ENV = "ACME_LOSS_MARKER"
ACME_OFFSET = 10.0
ACME_LOSS_PY = f'''
"""acme's preference loss: DPO's logistic loss plus a constant (distinctive values), and a
marker line per call (proof that *this* code ran)."""
import os

import torch

from torchtune_prefopt.losses import PreferenceLoss


class AcmeOffsetLoss(PreferenceLoss):
    reference_free = False
    average_logps = False
    paired = True

    def __init__(self, beta: float = 0.1, offset: float = {ACME_OFFSET!r}):
        super().__init__()
        self.beta = beta
        self.offset = offset

    def forward(self, policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps=None, reference_rejected_logps=None):
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
        losses = -torch.nn.functional.logsigmoid(self.beta * (chosen - rejected)) + self.offset
        marker = os.environ.get("{ACME_MARKER_ENV}")
        if marker:
            with open(marker, "a") as fh:
                fh.write(f"{{os.getpid()}} rows={{losses.shape[0]}}\\n")
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()
'''


def _acme_prepare(run_dir: Path) -> dict:
    """Install (into run_dir/site) the distribution acme-prefopt with a config and a loss."""
    from omegaconf import OmegaConf

    site = run_dir / "site"
    pkg = site / "acme_prefopt"
    (pkg / "configs" / "acme").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "__init__.py").write_text("")
    (pkg / "losses.py").write_text(ACME_LOSS_PY)
    # their config: our tiny DPO config, with their loss chosen by its short name
    cfg = OmegaConf.load(available_configs()["tiny/dpo"])
    cfg.pop("eval_dataset", None)
    cfg.pop("eval_every_n_steps", None)
    cfg.loss = "acme_offset"
    cfg.batch_size = BATCH
    (pkg / "configs" / "acme" / "tiny_offset.yaml").write_text(
        "# acme's tiny config\n" + OmegaConf.to_yaml(cfg)
    )
    info = site / "acme_prefopt-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-prefopt\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[torchtune_prefopt.configs]\nacme = acme_prefopt.configs\n\n"
        "[torchtune_prefopt.losses]\nacme_offset = acme_prefopt.losses:AcmeOffsetLoss\n"
    )
    return {"PYTHONPATH": str(site), ACME_MARKER_ENV: str(run_dir / "acme_marker.txt")}


# Sets up the recipe in-process (no training) for each config and reports what it holds.
INSPECT_SCRIPT = r'''
import gc, json, os, signal, sys
import torch
from torch import nn
from torchtune_prefopt._config import load_config
from torchtune_prefopt.recipes import prefopt_distributed as R

payload = json.loads(sys.argv[1])


def storage_key(t):
    if hasattr(t, "to_local"):  # DTensor (FSDP2 shard)
        t = t.to_local()
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def modules_reachable(obj, depth=0, seen=None):
    """nn.Modules reachable from obj's attributes (dicts, lists, plain objects), depth <= 4."""
    seen = set() if seen is None else seen
    found = []
    if id(obj) in seen or depth > 4:
        return found
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        found.append(obj)
        return found
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.split(".")[0] not in ("builtins",):
        children = list(vars(obj).values())
    else:
        return found
    for child in children:
        if isinstance(child, (str, bytes, int, float, bool, type(None), torch.Tensor)):
            continue
        found += modules_reachable(child, depth + 1, seen)
    return found


def live_tensor_bytes():
    live = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            try:
                k = storage_key(o)
            except Exception:
                continue
            if k[0]:
                live[k] = k[1]
    return live


results = {}
for name, overrides in payload["cases"].items():
    gc.collect()
    before = live_tensor_bytes()
    cfg = load_config(["--config", payload["configs"][name], *payload["overrides"], *overrides])
    recipe = R.PrefOptRecipe(cfg)
    recipe.setup()
    gc.collect()
    policy = {storage_key(p) for p in recipe._model.parameters()}
    reachable = {}
    for m in modules_reachable(recipe):
        for p in m.parameters():
            reachable[storage_key(p)] = True
    live = {k: b for k, b in live_tensor_bytes().items() if k not in before}
    results[name] = {
        "ref_model_is_none": recipe._reference.model is None,
        "reference_free": recipe._ref_plan.mode == "none",
        "lora": recipe._lora is not None,
        "policy_bytes": sum(b for _, b in policy),
        "reachable_param_bytes": sum(b for _, b in reachable),
        "live_tensor_bytes": sum(live.values()),
    }
    if name in payload.get("save_check", []):
        # A final (merged) LoRA save must leave the live model alone: give the adapters
        # non-zero B (B@A is 0 at init), save, compare every parameter.
        def snapshot():
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                    for n, p in recipe._model.named_parameters()}
        with torch.no_grad():
            for n, p in recipe._model.named_parameters():
                if "lora_b" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        before = snapshot()
        recipe.save_checkpoint(0, 0, reason="final")
        after = snapshot()
        results[name]["save_changed_params"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    recipe.cleanup()
    # setup() installed a SIGTERM handler bound to the recipe; drop it so the recipe (and its
    # models) can be freed before the next case is measured.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    del recipe, cfg
    gc.collect()
    # init_distributed's one-process path leaves RANK/WORLD_SIZE in os.environ; with them
    # the next recipe in this process would take the torchrun (env://) path.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
print("RESULT " + json.dumps(results))
'''


def _inspect_payload_spec() -> RunSpec:
    cases = {}
    configs = {}
    for name, (loss, variant) in {
        "simpo": ("simpo", "full"),
        "simpo_lora": ("simpo", "lora"),
        "dpo": ("dpo", "full"),
        "dpo_lora": ("dpo", "lora"),
    }.items():
        configs[name], cases[name] = loss_config(loss, variant)
        cases[name] = list(cases[name]) + [f"batch_size={BATCH}"]
    script = INSPECT_SCRIPT.replace(
        "payload = json.loads(sys.argv[1])",
        "payload = json.loads(sys.argv[1])\n"
        f"payload['cases'] = {json.dumps(cases)}\npayload['configs'] = {json.dumps(configs)}\n"
        "payload['save_check'] = ['dpo_lora']",
    )
    # output_dir etc. come from the payload's overrides (no training happens)
    return RunSpec(key="inspect-reference", script=script)


def build_specs() -> Dict[str, RunSpec]:
    specs: Dict[str, RunSpec] = {}
    for loss in LOSSES:
        for variant in VARIANTS:
            config, extra = loss_config(loss, variant)
            key = one_proc_key(loss, variant)
            specs[key] = RunSpec(
                key, config, (*extra, f"batch_size={BATCH}", "gradient_accumulation_steps=1")
            )
    for loss, (variant, bs, accum) in TWO_PROC.items():
        config, extra = loss_config(loss, variant)
        key = f"2p-{loss}-{variant}"
        specs[key] = RunSpec(
            key,
            config,
            (*extra, f"batch_size={bs}", f"gradient_accumulation_steps={accum}"),
            nproc=2,
        )
    for loss, variant in RESUME_CASES:
        base = specs[one_proc_key(loss, variant)]
        key = f"resume-{loss}-{variant}"
        specs[key] = RunSpec(
            key,
            base.config,
            (*base.overrides, "resume_from_checkpoint=true"),
            seed_from=base.key,
            seed_paths=(f"checkpoints/step_{SAVE_EVERY:06d}",),
        )
    specs["acme"] = RunSpec(
        "acme", "acme/tiny_offset", (f"batch_size={BATCH}",), prepare=_acme_prepare
    )
    specs["inspect-reference"] = _inspect_payload_spec()
    return specs


SPECS = build_specs()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The run pool, pre-loaded with the runs of every selected test in this module."""
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    base_dir = make_tiny_hf_checkpoint(root / "base", seed=0)

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        return [
            *COMMON,
            *spec.overrides,
            f"output_dir={out_dir}",
            f"checkpointer.checkpoint_dir={base_dir}",
        ]

    pool = RunPool(root, SPECS, overrides)
    pool.base_dir = base_dir  # the tests compare against the base weights
    # 2-process runs first among equals: they take longest; then the rest in test order
    for key in sorted(wanted_runs(request), key=lambda k: (not k.startswith("2p-"),)):
        pool.submit(key)
    yield pool
    pool.close()
    summary = pool.summary()
    print(f"\n[e2e run times] {summary}")


# --------------------------------------------------------------------------------------
# helpers on outputs


def assert_checkpoints(result: RunResult, lora: bool) -> None:
    """Step checkpoints at every SAVE_EVERY steps; ``final`` -> the last, with HF weights.

    LoRA: intermediate checkpoints hold the adapter only; the final one also the merged
    weights (a plain HF model)."""
    root = result.out_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    expected = [f"step_{s:06d}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    assert names == expected, (
        f"checkpoint dirs {names}, expected {expected} (no .tmp-/.old- leftovers)"
    )
    for name in expected:
        d = root / name
        manifest = json.loads((d / "CHECKPOINT.json").read_text())
        assert manifest["step"] == int(name.split("_")[1])
        for rel, entry in manifest["files"].items():
            assert (d / rel).stat().st_size == entry["size"], (
                f"{d / rel}: size differs from the manifest"
            )
        files = set(manifest["files"])
        assert "recipe_state.pt" in files, files
        has_model = any(f.endswith(".safetensors") and not f.startswith("adapter") for f in files)
        is_final = name == expected[-1]
        assert manifest.get("model_weights", True) == has_model, (name, manifest)
        if lora:
            assert any(f.startswith("adapter_model") for f in files), files
            assert "adapter_config.json" in files, files
            assert has_model == is_final, (
                f"{name}: LoRA model weights only in the final checkpoint: {files}"
            )
        else:
            assert has_model, f"{name}: no model weights: {files}"
        if has_model:
            assert "config.json" in files, files
    final = result.final
    assert final.is_symlink(), "output_dir/final must be a symlink"
    assert not os.path.isabs(os.readlink(final)), "final should be relative (movable output_dir)"
    assert final.resolve() == (root / expected[-1]).resolve()


# --------------------------------------------------------------------------------------
# 1. every loss, full and LoRA, one process


@uses_runs(lambda loss, variant: [one_proc_key(loss, variant)])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_single_process_trains_and_checkpoints(runs, loss, variant):
    r = runs.get(one_proc_key(loss, variant)).check()
    steps = r.steps()
    assert sorted(steps) == list(range(1, STEPS + 1)), f"logged steps {sorted(steps)}"
    losses = r.losses()
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses)), losses
    assert losses[-1] < losses[0], f"{loss}/{variant}: loss did not go down: {losses}"
    if loss in ("dpo", "ipo", "kto"):
        # step 1 runs the untouched policy (= reference): every log-ratio is exactly 0
        first = steps[1]
        if loss == "dpo":
            assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
        if loss == "ipo":
            assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for s in steps.values():
        assert s["grad_norm"] > 0 and s["lr"] >= 0
    assert_checkpoints(r, lora=variant == "lora")
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------
# 2. two processes == one process


@uses_runs(lambda loss: [one_proc_key(loss, TWO_PROC[loss][0]), f"2p-{loss}-{TWO_PROC[loss][0]}"])
@pytest.mark.parametrize("loss", LOSSES)
def test_two_processes_match_one(runs, loss):
    variant, bs, accum = TWO_PROC[loss]
    one = runs.get(one_proc_key(loss, variant)).check()
    two = runs.get(f"2p-{loss}-{variant}").check()
    s1, s2 = one.steps(), two.steps()
    assert sorted(s1) == sorted(s2) == list(range(1, STEPS + 1))
    for step in s1:
        for key in sorted(set(s1[step]) - VOLATILE):
            assert key in s2[step], f"step {step}: {key} missing in the 2-process log"
            if key == "rewards/accuracies" and step == 1 and loss != "simpo":
                continue  # policy == reference: every margin is 0 up to float noise
            assert s2[step][key] == pytest.approx(s1[step][key], rel=1e-4, abs=1e-5), (
                f"{loss} ({variant}, 2 procs x batch {bs} x accum {accum}) step {step} {key}: "
                f"{s2[step][key]} vs 1 process {s1[step][key]}"
            )
    base = load_weights(runs.base_dir)
    assert_same_training(
        load_weights(two.final),
        load_weights(one.final),
        base,
        what=f"{loss} final weights, 2 vs 1 process",
    )
    if variant == "lora":
        a1 = load_weights(one.final, adapter=True)
        zero = {k: (v * 0 if "lora_b" in k.lower() else v) for k, v in a1.items()}  # B starts at 0
        assert_same_training(
            load_weights(two.final, adapter=True),
            a1,
            zero,
            what=f"{loss} final adapter, 2 vs 1 process",
        )
    state = __import__("torch").load(two.final / "recipe_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["gradient_accumulation_steps"] == accum


# --------------------------------------------------------------------------------------
# 3. SimPO holds no reference weights


@uses_runs(lambda: ["inspect-reference"])
def test_simpo_holds_no_reference_weights(runs):
    r = runs.get("inspect-reference").check()
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.tail()
    res = json.loads(line[-1][len("RESULT ") :])
    for name in ("simpo", "simpo_lora", "dpo", "dpo_lora"):
        info = res[name]
        assert info["reachable_param_bytes"] >= info["policy_bytes"] > 0, (name, info)
    # SimPO (full and LoRA) and DPO-LoRA: no reference model object, and no module reachable
    # from the recipe holds parameters other than the policy's.
    for name in ("simpo", "simpo_lora", "dpo_lora"):
        info = res[name]
        assert info["ref_model_is_none"], (name, info)
        assert info["reachable_param_bytes"] == info["policy_bytes"], (name, info)
    assert res["simpo"]["reference_free"] and res["simpo_lora"]["reference_free"]
    # The check can see a reference copy: full DPO holds one (twice the policy's bytes).
    dpo = res["dpo"]
    assert not dpo["ref_model_is_none"]
    assert dpo["reachable_param_bytes"] == 2 * dpo["policy_bytes"], dpo
    # Nothing else in the process keeps a copy either (e.g. a stray base state dict): all
    # tensors that setup() left alive add up to ~1x the weights, ~2x for full DPO.
    for name in ("simpo", "simpo_lora", "dpo_lora"):
        info = res[name]
        assert info["live_tensor_bytes"] < 1.5 * info["policy_bytes"], (name, info)
    assert dpo["live_tensor_bytes"] > 1.9 * dpo["policy_bytes"], dpo


@uses_runs(lambda: ["inspect-reference"])
def test_lora_final_save_leaves_live_model_untouched(runs):
    """Regression: torchtune's get_merged_lora_ckpt adds B@A into the base weights in place,
    and on one CPU rank the gathered state dict aliases the live parameters, so saving the
    merged checkpoint used to change the model being trained (the reference too: it is the
    same weights with the adapters off)."""
    r = runs.get("inspect-reference").check()
    res = json.loads(
        [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT ") :]
    )
    assert res["dpo_lora"]["save_changed_params"] == []


# --------------------------------------------------------------------------------------
# 4. resume == uninterrupted


@uses_runs(lambda loss, variant: [one_proc_key(loss, variant), f"resume-{loss}-{variant}"])
@pytest.mark.parametrize("loss,variant", RESUME_CASES)
def test_resume_equals_uninterrupted(runs, loss, variant):
    full = runs.get(one_proc_key(loss, variant)).check()
    resumed = runs.get(f"resume-{loss}-{variant}").check()
    assert "Resuming from" in resumed.stdout + resumed.stderr, resumed.tail()
    s_full, s_res = full.steps(), resumed.steps()
    assert sorted(s_res) == list(range(SAVE_EVERY + 1, STEPS + 1)), (
        f"resumed run logged {sorted(s_res)}"
    )
    for step in s_res:
        a = {k: v for k, v in s_full[step].items() if k not in VOLATILE}
        b = {k: v for k, v in s_res[step].items() if k not in VOLATILE}
        assert a == b, f"step {step}: resumed {b} != uninterrupted {a}"  # exact, incl. lr
    for adapter in (False, True) if variant == "lora" else (False,):
        wa, wb = load_weights(full.final, adapter), load_weights(resumed.final, adapter)
        assert sorted(wa) == sorted(wb)
        diff = [k for k in wa if not __import__("torch").equal(wa[k], wb[k])]
        assert not diff, f"final {'adapter ' if adapter else ''}weights differ (bit-wise) in {diff}"
    assert resumed.final.resolve().name == f"step_{STEPS:06d}"


# --------------------------------------------------------------------------------------
# 5. the final checkpoint in transformers


def _rows(n_pairs: int = 3):
    from torchtune_prefopt.data import paired_collate, synthetic_preference_dataset
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer(max_seq_len=SEQ_LEN)
    ds = synthetic_preference_dataset(tok, split="heldout")
    batch = paired_collate([ds[i] for i in range(n_pairs)], padding_idx=tok.pad_id, ignore_idx=-100)
    return batch["input_ids"], batch["labels"]


def _hf_logps(model, ids, labels):
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logits, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    lp = (
        torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )
    return (lp * mask).sum(-1)


def _torchtune_logps(model, ids, labels):
    import torch

    from torchtune_prefopt.modules import decoder_sequence_logprobs

    with torch.no_grad():
        return decoder_sequence_logprobs(model.eval(), ids, labels).sum


@uses_runs(lambda loss, variant: [one_proc_key(loss, variant)])
@pytest.mark.parametrize("loss,variant", HF_CASES)
def test_final_checkpoint_loads_in_transformers(runs, tmp_path, loss, variant):
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM

    from torchtune_prefopt.models.tiny import tiny_qwen2
    from torchtune_prefopt.training.checkpoints import hf_weight_files

    r = runs.get(one_proc_key(loss, variant)).check()
    final = r.final.resolve()
    ids, labels = _rows()

    hf = AutoModelForCausalLM.from_pretrained(str(final)).float().eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    hf_lp = _hf_logps(hf, ids, labels)

    def torchtune_from(ckpt_dir: Path):
        ck = FullModelHFCheckpointer(
            checkpoint_dir=str(ckpt_dir),
            checkpoint_files=hf_weight_files(ckpt_dir),
            model_type="QWEN2",
            output_dir=str(tmp_path / "tt_out"),
        )
        return ck.load_checkpoint()["model"]

    # the recipe's (plain) torchtune model from the same files
    tt = tiny_qwen2()
    tt.load_state_dict(torchtune_from(final), strict=True)
    tt_lp = _torchtune_logps(tt, ids, labels)
    torch.testing.assert_close(hf_lp, tt_lp, rtol=1e-4, atol=1e-4)

    # it is the *trained* model: the base checkpoint scores the rows differently
    base = AutoModelForCausalLM.from_pretrained(str(runs.base_dir)).float().eval()
    assert (hf_lp - _hf_logps(base, ids, labels)).abs().max() > 1e-2

    if variant == "lora":
        # merged weights == base + adapters: the recipe's LoRA model (base weights + the saved
        # adapter, adapters on) scores exactly like the merged checkpoint in transformers.
        from torchtune_prefopt.training.checkpoints import load_adapter_weights

        cfg = OmegaConf.load(r.out_dir / "torchtune_config.yaml")
        lora = tt_config.instantiate(cfg.model)
        sd = torchtune_from(Path(runs.base_dir))
        sd.update(load_adapter_weights(final))
        lora.load_state_dict(sd, strict=True)
        torch.testing.assert_close(_torchtune_logps(lora, ids, labels), hf_lp, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# 6. a second team's config and loss, through entry points


@uses_runs(lambda: ["acme"])
def test_third_party_config_and_loss_by_name(runs):
    r = runs.get("acme").check()
    marker = r.run_dir / "acme_marker.txt"
    assert marker.is_file(), "acme's loss never ran (no marker)\n" + r.tail()
    calls = marker.read_text().splitlines()
    assert len(calls) == STEPS, calls  # one loss call per micro-batch
    assert all(c.endswith(f"rows={BATCH}") for c in calls), calls
    losses = r.losses()
    # DPO's logistic loss at log-ratio 0 is log 2; acme adds its offset
    assert losses[0] == pytest.approx(ACME_OFFSET + 0.6931471805599453, abs=1e-6)
    assert all(ACME_OFFSET < x < ACME_OFFSET + 1 for x in losses), losses
    assert losses[-1] < losses[0], losses
    cfg_text = (r.out_dir / "torchtune_config.yaml").read_text()
    assert "acme_offset" in cfg_text
    assert (r.final / "CHECKPOINT.json").is_file()
