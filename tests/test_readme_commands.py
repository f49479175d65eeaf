"""The README's commands work as shown.

Each command below must appear verbatim in README.md (so the README cannot drift from what
is tested). Those that can run here (CPU, no download) run through the real CLI, in a fresh
directory, with one addition for the training runs: ``output_dir=<that directory>``, so tests
never touch the configs' shared ``/tmp`` output folders. Those that need weights or GPUs are
checked as far as this machine allows: the command line parses, the config validates, the loss
is what the command says, and running it fails with the one-line "download first" error.
(``scripts/demo.sh`` and ``scripts/test.sh`` are what CI itself runs; ``gpu_check.sh
--dry-run`` is tests/test_gpu_check.py; ``prefopt_compare --config tiny/compare`` is
tests/test_compare.py's end-to-end test.)
"""

from __future__ import annotations

import re

import pytest

from torchtune_prefopt._config import load_config
from torchtune_prefopt.losses import build_loss
from torchtune_prefopt.training import recipe_config
from tune_harness import REPO, TUNE, run_process, tune

README = (REPO / "README.md").read_text()

MAIN_JOB = "tune run prefopt_distributed --config tiny/dpo"
SWAP = "tune run prefopt_distributed --config llama3_2/1B_dpo loss=ipo loss.tau=0.05"
MULTI_GPU = "tune run --nproc_per_node 8 prefopt_distributed --config llama3_1/8B_simpo_lora"
# run on a tiny SmolLM2-shaped folder by tests/test_frontier.py::test_smollm2_frontier_smoke
REAL_FRONTIER = (
    "tune run prefopt_compare --config smollm2/frontier model_dir=/tmp/SmolLM2-135M-Instruct"
)
HACK = [
    "tune ls | awk '/^[^ ]/ {on = ($1 ~ /^prefopt/)} on'",
    "tune cp prefopt_distributed ./my_recipe.py",
    "tune cp tiny/dpo ./my_config.yaml",
    "tune run my_recipe.py --config my_config.yaml output_dir=/tmp/my_run",
]


def test_commands_are_in_the_readme():
    for cmd in [MAIN_JOB, SWAP, MULTI_GPU, REAL_FRONTIER, *HACK]:
        assert re.search(rf"^{re.escape(cmd)}(\s|$)", README, re.M), f"not in README.md: {cmd}"


@pytest.mark.slow
def test_main_job(tmp_path):
    """The embedded default, the full run: held-out reward accuracy climbs from 0.5 to 1.0."""
    proc = tune([*MAIN_JOB.split()[1:], f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== prefopt_distributed: DPOLoss | 1 process(es) | 100 steps" in proc.stdout
    m = re.search(
        r"held-out reward accuracy: ([\d.]+) \(step 0\) -> ([\d.]+) \(step 100\) on 200 rows",
        proc.stdout,
    )
    assert m and float(m.group(1)) == 0.5 and float(m.group(2)) == 1.0, proc.stdout[-2000:]
    # next to it, what it rests on: the margin and the reference's own ranking of the pairs
    assert re.search(
        r"\(mean reward margin [-\d.e+]+; the reference alone ranks [\d.]+ of the pairs by "
        r"log-prob; a margin within float rounding is a tie, 1/2\)",
        proc.stdout,
    ), proc.stdout[-2000:]
    assert (tmp_path / "out" / "final" / "config.json").is_file()


@pytest.mark.slow
def test_hack_the_recipe_flow(tmp_path):
    """`tune ls` filtered to our recipes, `tune cp` of the recipe and of a config, then `tune run` of the copies."""
    listing = run_process(["bash", "-c", HACK[0].replace("tune", str(TUNE), 1)], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "prefopt_distributed" in listing.stdout and "prefopt_compare" in listing.stdout
    # every packaged config is listed under our recipes, nothing of torchtune's own
    from torchtune_prefopt._config import available_configs

    listed = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert listed == set(available_configs()), sorted(listed ^ set(available_configs()))
    for cmd in HACK[1:3]:
        proc = tune(cmd.split()[1:], tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "my_recipe.py").is_file() and (tmp_path / "my_config.yaml").is_file()
    proc = tune(
        [*HACK[3].split()[1:], f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=3"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 steps" in proc.stdout
    # the same command twice: the second one finds its finished run and does nothing
    again = tune(
        [*HACK[3].split()[1:], f"output_dir={tmp_path / 'out'}", "max_steps_per_epoch=3"], tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds this run, finished" in again.stdout and "nothing to do" in again.stdout


def test_swap_the_loss_on_the_command_line():
    """`loss=ipo loss.tau=0.05` on a DPO config: IPO with tau 0.05, nothing of DPO's loss
    arguments carried over; the config validates (its weights are not here)."""
    cfg = load_config(["--config", *SWAP.split()[4:]])
    assert dict(cfg.loss) == {"_component_": "ipo", "tau": 0.05}
    loss = build_loss(cfg.loss)
    assert type(loss).__name__ == "IPOLoss" and loss.tau == 0.05
    recipe_config.validate_config(cfg, local=False)


@pytest.mark.slow
def test_swap_without_gpu_or_weights_is_one_line(tmp_path):
    """Here (no GPU, no download) the command as shown stops at its first problem, the
    device; on CPU it stops at the missing weights and says how to get them."""
    for extra, expect in (
        ([], "device is 'cuda' but no CUDA device"),
        (["device=cpu"], "tune download"),
    ):
        proc = tune([*SWAP.split()[1:], *extra], tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and expect in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_multi_gpu_command_parses_and_validates():
    cfg = load_config(["--config", MULTI_GPU.split()[-1]])
    assert type(build_loss(cfg.loss)).__name__ == "SimPOLoss"
    recipe_config.validate_config(cfg, local=False)


BYOM = "tune run prefopt_distributed --config hf/dpo model_dir=/path/to/hf-folder"
SMOL_HELPER = "python -m torchtune_prefopt.models.smollm2 /tmp/SmolLM2-135M-Instruct"
SMOL_RUN = "tune run prefopt_distributed --config smollm2/135M_dpo device=cpu dtype=fp32"


def test_bring_your_own_model_commands_are_in_the_readme():
    """The 'bring your own model' commands, verbatim. Their runs are tests/test_hf_models.py
    (hf/dpo on a folder of every family) and tests/test_smollm2.py (the helper's folder
    trained with smollm2/135M_dpo's settings); the SmolLM2 config needs UltraFeedback from
    the Hub here, so only its config is checked: it validates on CPU with the folder."""
    for cmd in (BYOM, SMOL_HELPER, SMOL_RUN):
        assert re.search(rf"^{re.escape(cmd)}(\s|$)", README, re.M) or f"`{cmd}`" in README.replace(
            "\n", " "
        ), cmd
    cfg = load_config(["--config", *SMOL_RUN.split()[4:]])
    assert cfg.model_dir == SMOL_HELPER.split()[-1] and cfg.device == "cpu"
    recipe_config.validate_config(cfg, local=False)
    cfg = load_config(["--config", *BYOM.split()[4:]])
    assert cfg.model_dir == "/path/to/hf-folder"
    recipe_config.validate_config(cfg, local=False)


OWN_DATA = (
    "tune run prefopt_distributed --config hf/dpo model_dir=<folder> dataset.source=json "
    "dataset.data_files=my_pairs.jsonl dataset.split=train eval_dataset.source=json "
    "eval_dataset.data_files=my_heldout.jsonl eval_dataset.split=train"
)


@pytest.mark.slow
def test_your_own_data_offline_command(tmp_path):
    """The README's own-data command, verbatim (the folder filled in; CPU, fp32 and one step
    added as the CUDA config needs on this machine): it trains on the local files, offline."""
    from hf_families import make_family_folder

    from tune_harness import CPU_FP32, synthetic_rows, write_jsonl

    assert re.search(rf"^{re.escape(OWN_DATA)}$", README, re.M), "not in README.md"
    folder = make_family_folder("smollm2", tmp_path / "model")
    write_jsonl(tmp_path / "my_pairs.jsonl", synthetic_rows(4))
    write_jsonl(tmp_path / "my_heldout.jsonl", synthetic_rows(2, "heldout"))
    args = OWN_DATA.replace("<folder>", str(folder)).split()[1:]
    proc = tune(
        [*args, *CPU_FP32, "optimizer.fused=false", "batch_size=2", "gradient_accumulation_steps=1",
         "max_steps_per_epoch=1", "eval_every_n_steps=1", f"output_dir={tmp_path / 'out'}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 steps" in proc.stdout and "held-out reward accuracy" in proc.stdout, proc.stdout
