"""One preference-optimization step: torchtune 0.6.1's ``full_dpo_distributed`` vs ours.

Not a test. In one invocation, on the same machine, one after the other (same model, same
rows, same batch, same optimizer, same number of steps), each configuration runs as its own
``python -m torch.distributed.run --nproc_per_node 1 --standalone <recipe.py> --config <yaml>``
(torchrun, what ``tune run --nproc_per_node 1 <recipe>`` launches; 1 process, gloo, FSDP2):

  torchtune DPO   torchtune's own recipe (``tune cp full_dpo_distributed``), three CPU
                  patches applied to the copy by string replacement (printed as a diff)
  ours DPO        recipes/prefopt_distributed.py, DPO, live reference model
  ours DPO int8   ... reference.quantization=int8
  ours DPO cached ... reference.precompute=true
  ours SimPO      reference-free
  ours KTO        unpaired rows (each pair -> desirable + undesirable row), same padded tokens
  SFT floor       ours with benchmarks/_floor_loss.SFTFloorLoss: one policy forward+backward
                  through the same lean log-prob path, no reference (plain SFT on the tokens)

Model: torchtune ``llama3`` component builder (Llama 3 vocabulary, 128256) with a small body,
saved first as a real Hugging Face checkpoint (``transformers`` ``LlamaForCausalLM``, random
weights, safetensors) that both recipes load with ``FullModelHFCheckpointer``. Data: random
token-id rows (``benchmarks/_bench_components.py``), every row exactly ``--seq-len`` tokens,
first half prompt.

Time: a metric logger shared by both recipes (``StepClockLogger``) stamps every optimizer
step; step time = difference of consecutive stamps (data, forward, backward, optimizer step,
logging); the first ``--warmup`` steps are dropped, the median of the rest is reported.
tokens/s = padded policy input tokens per step (chosen + rejected rows, or the KTO rows; KL
and reference rows not counted) / median step time.

Memory: ``VmHWM`` (peak resident set) of the training process (torchrun's worker), read from
``/proc/<pid>/status`` by this script while the run is held right after its last measured step
(setup and all steps included; the end-of-training checkpoint, which torchtune's recipe
writes with a full optimizer gather, is not): the same outside measurement for every recipe.

CPU s/step: the same stamps on the training process's CPU time (``time.process_time()``), a
cross-check that other jobs on a shared machine disturb much less than wall time.

Usage (one round is about 11 minutes on 2 quiet cores, 15 under load; --rounds 2 runs the
configurations again in reverse order and pools the steps):
  python benchmarks/bench_vs_torchtune.py                      # print the Markdown table
  python benchmarks/bench_vs_torchtune.py --rounds 2 --write BENCHMARKS.md   # + its section
  python benchmarks/bench_vs_torchtune.py --configs tt_dpo,dpo --seq-len 1024 --steps 1
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _markdown import write_section  # benchmarks/ is the script's directory  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Preference step vs torchtune's full_dpo_distributed"
NOTES_MARKER = "<!-- bench_vs_torchtune: hand-written notes below are kept on --write -->"
BIN = Path(sys.executable).parent
OUR_RECIPE = REPO / "recipes" / "prefopt_distributed.py"

# ---------------------------------------------------------------------------------- patches
# torchtune 0.6.1 full_dpo_distributed.py on CPU. Each entry: (what fails, old, new, count).
PATCHES: List[Tuple[str, str, str, int]] = [
    (
        '(1) `init_process_group("cuda:nccl,cpu:gloo")` -> `RuntimeError: Distributed package '
        "doesn't have NCCL built in` (CPU build of torch): backend -> `gloo`",
        'init_process_group("cuda:nccl,cpu:gloo")',
        'init_process_group("gloo")',
        1,
    ),
    (
        "(2) `training.get_memory_stats(device=cpu)` after policy and reference setup -> "
        "`ValueError: Logging memory stats is not supported on CPU devices`: skipped on CPU "
        "(both calls; the per-step call is already guarded by `log_peak_memory_stats`)",
        "        if self._is_rank_zero:\n"
        "            memory_stats = training.get_memory_stats(device=self._device)\n"
        "            training.log_memory_stats(memory_stats)\n",
        '        if self._is_rank_zero and self._device.type != "cpu":\n'
        "            memory_stats = training.get_memory_stats(device=self._device)\n"
        "            training.log_memory_stats(memory_stats)\n",
        2,
    ),
    (
        "(3) `training.cleanup_before_training()` at the start of `train()` -> "
        "`AttributeError: module 'torch.cpu' has no attribute 'empty_cache'`: on CPU only its "
        "`gc.collect()` is kept",
        "        training.cleanup_before_training()\n",
        '        if self._device.type != "cpu":\n'
        "            training.cleanup_before_training()\n"
        "        else:\n"
        "            import gc\n"
        "\n"
        "            gc.collect()\n",
        1,
    ),
]


def torchtune_recipe_file(name: str) -> Path:
    """The file of one of torchtune's own recipes, as installed by its wheel (a top-level
    ``recipes`` package; found without importing it, and without the ``tune`` script, which a
    ``pip install --target`` does not put on PATH)."""
    import importlib.util

    spec = importlib.util.find_spec("recipes")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / f"{name}.py"
        if f.is_file():
            return f
    raise FileNotFoundError(f"torchtune's recipe {name}.py not found (is torchtune installed?)")


def prepare_torchtune_recipe(workdir: Path, patch: bool = True) -> Tuple[Path, str]:
    """Copy torchtune's ``full_dpo_distributed`` into workdir, apply PATCHES (CPU only: on a GPU
    torchtune's recipe runs unpatched); return (path, diff)."""
    dst = workdir / "full_dpo_distributed.py"
    orig = workdir / "full_dpo_distributed.orig.py"
    for p in (dst, orig):
        if p.exists():
            p.unlink()
    shutil.copyfile(torchtune_recipe_file("full_dpo_distributed"), orig)  # what `tune cp` copies
    text = orig.read_text()
    new = text
    for what, old, rep, count in PATCHES if patch else []:
        n = new.count(old)
        if n != count:
            raise RuntimeError(f"patch {what!r}: expected {count} occurrence(s), found {n}")
        new = new.replace(old, rep)
    dst.write_text(new)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(True), new.splitlines(True),
            fromfile="a/full_dpo_distributed.py (tune cp, torchtune 0.6.1)",
            tofile="b/full_dpo_distributed.py (patched copy)", n=1,
        )
    )  # fmt: skip
    return dst, diff


# ---------------------------------------------------------------------------------- model


def model_kwargs(a: argparse.Namespace) -> Dict:
    return dict(
        vocab_size=a.vocab, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
        embed_dim=a.embed_dim, intermediate_dim=a.intermediate, max_seq_len=max(a.seq_len, 1024),
        rope_base=500000, norm_eps=1e-5,
    )  # fmt: skip


def make_checkpoint(a: argparse.Namespace, ckpt_dir: Path) -> List[str]:
    """Random-weight HF Llama checkpoint (config.json + safetensors); cached by its dims."""
    mk = model_kwargs(a)
    marker = ckpt_dir / "bench_marker.json"
    want = json.dumps({**mk, "dtype": getattr(a, "ckpt_dtype", "fp32")}, sort_keys=True)
    if marker.is_file() and marker.read_text() == want:
        return sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    import inspect

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=mk["vocab_size"], hidden_size=mk["embed_dim"],
        intermediate_size=mk["intermediate_dim"], num_hidden_layers=mk["num_layers"],
        num_attention_heads=mk["num_heads"], num_key_value_heads=mk["num_kv_heads"],
        max_position_embeddings=mk["max_seq_len"], rms_norm_eps=mk["norm_eps"],
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(mk["rope_base"])}
    else:
        kw["rope_theta"] = float(mk["rope_base"])
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[getattr(a, "ckpt_dtype", "fp32")]
    model = LlamaForCausalLM(LlamaConfig(**kw)).to(dtype)
    model.save_pretrained(str(ckpt_dir))
    files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    if not files:
        raise RuntimeError("save_pretrained wrote no safetensors")
    marker.write_text(want)
    return files


# ---------------------------------------------------------------------------------- configs


def _yaml(d: Dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))


def common_cfg(
    a: argparse.Namespace, ckpt_dir: Path, files: List[str], out: Path, unpaired=False
) -> Dict:
    total = a.warmup + a.steps
    hf = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(ckpt_dir),
        "checkpoint_files": files,
        "recipe_checkpoint": None,
        "output_dir": str(out / "ckpt"),
        "model_type": "LLAMA3",
    }
    return {
        "output_dir": str(out),
        "model": {
            "_component_": "torchtune.models.llama3._component_builders.llama3",
            **model_kwargs(a),
        },
        "tokenizer": {
            "_component_": "_bench_components.PadOnlyTokenizer",
            "pad_id": 0,
            "max_seq_len": a.seq_len,
        },
        "checkpointer": hf,
        "ref_checkpointer": dict(hf),
        "resume_from_checkpoint": False,
        "dataset": {
            "_component_": "_bench_components.synthetic_token_pairs",
            "num_pairs": total * a.batch,  # exactly the rows the steps use
            "seq_len": a.seq_len,
            "vocab_size": a.vocab,
            "unpaired": unpaired,
        },
        "seed": 0,
        "shuffle": True,
        "batch_size": a.batch * (2 if unpaired else 1),  # KTO: 2 rows per pair, same tokens
        "gradient_accumulation_steps": 1,
        "epochs": 1,
        "max_steps_per_epoch": total,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-6, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 1,
        },
        "clip_grad_norm": None,
        "compile": False,
        "enable_activation_checkpointing": False,
        "device": a.device,
        "dtype": a.dtype,
        "metric_logger": {
            "_component_": "_bench_components.StepClockLogger",
            "log_dir": str(out / "logs"),
            "clock_file": str(out / "step_clock.jsonl"),
            "hold_after_step": total,
            "hold_s": 120,
        },
        "log_every_n_steps": 1,
    }


CONFIGS = ["tt_dpo", "dpo", "dpo_int8", "dpo_cached", "simpo", "kto", "floor"]
# Run order: the rows each target compares run back to back (similar machine load).
RUN_ORDER = ["tt_dpo", "dpo", "floor", "dpo_cached", "simpo", "dpo_int8", "kto"]
LABELS = {
    "tt_dpo": "torchtune DPO (full_dpo_distributed, patched for CPU)",
    "dpo": "ours DPO, live reference",
    "dpo_int8": "ours DPO, int8 reference (`reference.quantization=int8`)",
    "dpo_cached": "ours DPO, cached reference (`reference.precompute=true`)",
    "simpo": "ours SimPO (reference-free)",
    "kto": "ours KTO (4 unpaired rows + 4 KL rows)",
    "floor": "SFT floor (ours, `_floor_loss.SFTFloorLoss`)",
}


#: our recipe's ``loss`` node of each benchmark loss (``bench_packing.py``'s variants too)
LOSSES = {
    "dpo": {"_component_": "torchtune_prefopt.losses.DPOLoss", "beta": 0.1},
    "simpo": {"_component_": "torchtune_prefopt.losses.SimPOLoss", "beta": 2.0, "gamma": 1.0},
    "kto": {"_component_": "torchtune_prefopt.losses.KTOLoss", "beta": 0.1},
    "floor": {"_component_": "_floor_loss.SFTFloorLoss"},
}
#: reference-free: the recipe loads no reference (their configs drop ``ref_checkpointer``)
REFERENCE_FREE = ("simpo", "floor")


def as_torchtune_dpo(c: Dict) -> Dict:
    """``c`` for torchtune's ``full_dpo_distributed``: its own DPO loss, and no peak-memory
    logging (CUDA only there)."""
    c["loss"] = {
        "_component_": "torchtune.rlhf.loss.DPOLoss",
        "beta": 0.1,
        "label_smoothing": 0.0,
    }
    c["log_peak_memory_stats"] = False
    return c


def as_ours(c: Dict, a: argparse.Namespace) -> Dict:
    """``c`` for our recipe, as every benchmark row runs it: no held-out eval, no mid-run
    checkpoints, a live unquantized reference, stop on a non-finite loss."""
    c.update(
        eval_dataset=None, logprobs_chunk_size=a.chunk_size, nonfinite="stop",
        save_every_n_steps=None, keep_last_n_checkpoints=None,
        reference={"quantization": None, "precompute": False},
    )  # fmt: skip
    return c


def config_for(
    name: str, a: argparse.Namespace, ckpt_dir: Path, files: List[str], out: Path
) -> Dict:
    c = common_cfg(a, ckpt_dir, files, out, unpaired=(name == "kto"))
    if name == "tt_dpo":
        return as_torchtune_dpo(c)
    as_ours(c, a)
    loss = "dpo" if name in ("dpo", "dpo_int8", "dpo_cached") else name
    if loss not in LOSSES:
        raise ValueError(name)
    c["loss"] = dict(LOSSES[loss])
    if name == "dpo_int8":
        c["reference"]["quantization"] = "int8"
    if name == "dpo_cached":
        c["reference"]["precompute"] = True
    if loss in REFERENCE_FREE:
        c.pop("ref_checkpointer")  # reference-free: nothing to load
    return c


def option_available(name: str) -> Optional[str]:
    """None if usable, else why not: int8 / precompute are being wired into the recipe."""
    need = {
        "dpo_int8": (
            "quantize_reference",
            "reference.quantization (recipe does not call quantize_reference yet)",
        ),
        "dpo_cached": (
            "precompute_reference_logps",
            "reference.precompute (recipe does not call precompute_reference_logps yet)",
        ),
    }
    if name not in need:
        return None
    token, why = need[name]
    if token not in OUR_RECIPE.read_text():
        return why
    return None


# ---------------------------------------------------------------------------------- running


def _status(pid: int) -> Dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int, seen: Dict[int, object]) -> List[int]:
    """Live descendants of ``pid``; remembers their psutil handles in ``seen`` (to kill them
    later: torchrun starts its worker in a session of its own, out of our process group)."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for k in kids:
        seen.setdefault(k.pid, k)
    return [k.pid for k in kids]


def _kill_all(proc: subprocess.Popen, seen: Dict[int, object]) -> None:
    import psutil

    for pid, handle in list(seen.items()) + [(proc.pid, None)]:
        try:
            (handle or psutil.Process(pid)).kill()  # psutil checks the pid was not reused
        except psutil.Error:
            pass


def watch_until_hold(
    proc: subprocess.Popen, clock: Path, t_start: float, timeout: float
) -> Tuple[bool, str, Dict[int, int]]:
    """Follow a training process (and torchrun's worker) until its step clock says it holds
    after its last measured step, it exits, or ``timeout`` passes; then kill it. Returns
    ``(held, status, {pid: VmHWM bytes})`` (peak RSS read from outside, final while it holds)."""
    hwm: Dict[int, int] = {}
    seen: Dict[int, object] = {}

    def sample() -> None:
        for pid in [proc.pid] + _descendants(proc.pid, seen):
            s = _status(pid)
            if "VmHWM" in s:
                hwm[pid] = max(hwm.get(pid, 0), s["VmHWM"])

    held, status = False, "ok"
    try:
        while True:
            sample()
            if clock.exists() and '"hold"' in clock.read_text():
                time.sleep(0.2)  # the worker is sleeping inside log_dict: its HWM is final
                sample()
                held = True
                break
            if proc.poll() is not None:
                status = f"exited rc={proc.returncode} before the last step"
                break
            if time.monotonic() - t_start > timeout:
                status = f"timeout after {timeout}s"
                break
            time.sleep(0.05)
    finally:
        _kill_all(proc, seen)
        proc.wait()
    return held, status, hwm


def run_one(name: str, a: argparse.Namespace, workdir: Path, tt_recipe: Path, ckpt_dir: Path,
            files: List[str], rnd: int) -> Dict:  # fmt: skip
    out = workdir / "runs" / f"{name}.r{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = config_for(name, a, ckpt_dir, files, out)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(_yaml(cfg))
    recipe = tt_recipe if name == "tt_dpo" else OUR_RECIPE
    # torchrun directly (what `tune run --nproc_per_node 1 <file.py>` does, minus importing
    # torchtune into the launcher process): the same launcher for every row.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
           str(recipe), "--config", str(cfg_path)]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TORCHTUNE_PREFOPT_QUIET", "1")
    clock = out / "step_clock.jsonl"
    log_path = out / "stdout.log"
    load0 = os.getloadavg()[0]
    t_start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    held, status, hwm = watch_until_hold(proc, clock, t_start, a.timeout)
    worker = None
    wall = time.monotonic() - t_start
    load1 = os.getloadavg()[0]
    recs = [json.loads(ln) for ln in clock.read_text().splitlines()] if clock.exists() else []
    stamps = {r["step"]: r["t"] for r in recs if "step" in r}
    durations = [
        stamps[s] - stamps[s - 1] for s in sorted(stamps) if s - 1 in stamps and s > a.warmup
    ]
    cpu = {r["step"]: r["cpu"] for r in recs if "step" in r and "cpu" in r}
    cpu_durations = [cpu[s] - cpu[s - 1] for s in sorted(cpu) if s - 1 in cpu and s > a.warmup]
    agent = proc.pid
    others = {p: v for p, v in hwm.items() if p != agent}
    if others:
        worker = max(others, key=others.get)
    res = {
        "name": name, "round": rnd, "status": status if not held else "ok", "wall_s": wall,
        "step_s": durations, "cpu_step_s": cpu_durations, "losses": [r.get("loss") for r in recs if "step" in r],
        "rss_at_step": [r.get("rss") for r in recs if "step" in r],
        "cuda_peak": max((r.get("cuda_peak") or 0 for r in recs if "step" in r), default=0) or None,
        "worker_hwm": hwm.get(worker) if worker else None, "agent_hwm": hwm.get(agent),
        "load": (load0, load1), "log": str(log_path),
    }  # fmt: skip
    if not held:
        tail = log_path.read_text()[-3000:]
        res["error_tail"] = tail
    return res


# ---------------------------------------------------------------------------------- report


def _gib(b: Optional[float]) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def summarize(results: List[Dict], a: argparse.Namespace) -> Dict[str, Dict]:
    tokens = 2 * a.batch * a.seq_len
    summary = {}
    for name in CONFIGS:
        rs = [r for r in results if r["name"] == name]
        if not rs:
            continue
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            summary[name] = {"error": rs[0].get("skip") or rs[0]["status"]}
            continue
        steps = [d for r in ok for d in r["step_s"]]
        cpus = [d for r in ok for d in r.get("cpu_step_s", [])]
        med = statistics.median(steps)
        summary[name] = {
            "step_s": med, "steps": steps, "tokens_per_s": tokens / med,
            "cpu_s": statistics.median(cpus) if cpus else None, "cpus": cpus,
            "hwm": max(r["worker_hwm"] for r in ok), "load": [r["load"] for r in ok],
            "cuda_peak": max((r.get("cuda_peak") or 0 for r in ok), default=0) or None,
        }  # fmt: skip
    return summary


def render(summary: Dict[str, Dict], a: argparse.Namespace) -> Tuple[str, List[str]]:
    tt = summary.get("tt_dpo", {})
    fl = summary.get("floor", {})
    rows = [
        "| configuration | step s (median) | tokens/s | tokens/s vs torchtune | CPU s/step "
        "(median) | CPU time vs torchtune | peak RSS GiB | memory vs torchtune | memory vs SFT "
        "floor | step time vs SFT floor | CPU time vs SFT floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = ["tt_dpo", "dpo", "dpo_int8", "dpo_cached", "simpo", "kto", "floor"]
    for name in order:
        s = summary.get(name)
        if s is None:
            continue
        if "error" in s:
            rows.append(f"| {LABELS[name]} | not available: {s['error']} | | | | | | | | | |")
            continue

        def ratio(x, ref_s, key, inv=False):
            if not ref_s or "error" in ref_s or x is None or ref_s.get(key) is None:
                return "—"
            v = (ref_s[key] / x) if inv else (x / ref_s[key])
            return f"{v:.2f}x"

        rows.append(
            f"| {LABELS[name]} | {s['step_s']:.2f} | {s['tokens_per_s']:.0f} | "
            f"{ratio(s['tokens_per_s'], tt, 'tokens_per_s')} | "
            f"{'—' if s['cpu_s'] is None else format(s['cpu_s'], '.2f')} | {ratio(s['cpu_s'], tt, 'cpu_s')} | "
            f"{_gib(s['hwm'])} | {ratio(s['hwm'], tt, 'hwm')} | {ratio(s['hwm'], fl, 'hwm')} | "
            f"{ratio(s['step_s'], fl, 'step_s')} | {ratio(s['cpu_s'], fl, 'cpu_s')} |"
        )

    def ok(*names):
        return all(n in summary and "error" not in summary[n] for n in names)

    targets = []

    def target(label, names, value_fn, limit, op, cpu_fn=None):
        if not ok(*names):
            targets.append(
                f"- ? {label}: not measured ({', '.join(n for n in names if not ok(n))} not available)"
            )
            return
        v = value_fn()
        met = v <= limit if op == "<=" else v >= limit
        line = f"- {'✓' if met else '✗'} {label}: {v:.2f}x (target {op} {limit}x)"
        if cpu_fn is not None:
            try:
                c = cpu_fn()
                cmet = c <= limit if op == "<=" else c >= limit
                line += f"; on CPU time: {c:.2f}x ({'✓' if cmet else '✗'})"
            except (TypeError, ZeroDivisionError, KeyError):
                pass
        targets.append(line)

    S = summary
    target("peak memory, ours DPO (live reference) / torchtune DPO", ["dpo", "tt_dpo"],
           lambda: S["dpo"]["hwm"] / S["tt_dpo"]["hwm"], 0.4, "<=")  # fmt: skip
    target("peak memory, ours DPO cached reference / SFT floor", ["dpo_cached", "floor"],
           lambda: S["dpo_cached"]["hwm"] / S["floor"]["hwm"], 1.15, "<=")  # fmt: skip
    target("peak memory, ours SimPO / SFT floor", ["simpo", "floor"],
           lambda: S["simpo"]["hwm"] / S["floor"]["hwm"], 1.15, "<=")  # fmt: skip
    target("throughput, ours DPO (live reference) / torchtune DPO", ["dpo", "tt_dpo"],
           lambda: S["dpo"]["tokens_per_s"] / S["tt_dpo"]["tokens_per_s"], 1.3, ">=",
           lambda: S["tt_dpo"]["cpu_s"] / S["dpo"]["cpu_s"])  # fmt: skip
    target("step time, ours DPO cached reference / SFT floor", ["dpo_cached", "floor"],
           lambda: S["dpo_cached"]["step_s"] / S["floor"]["step_s"], 1.2, "<=",
           lambda: S["dpo_cached"]["cpu_s"] / S["floor"]["cpu_s"])  # fmt: skip
    return "\n".join(rows) + "\n", targets


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import importlib.metadata as md

    return (
        f"{cpu}, {os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}), "
        f"{mem:.0f} GiB RAM, shared with other users; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchtune {md.version('torchtune')}, transformers {md.version('transformers')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="/tmp/prefopt_bench_vs_torchtune")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="pairs per step (KTO: 2x rows)")
    p.add_argument("--chunk-size", type=int, default=1024, help="ours: logprobs_chunk_size")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped from the timing")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run")
    p.add_argument("--rounds", type=int, default=1, help="repeat all configurations (ABBA order)")
    p.add_argument("--configs", default=",".join(RUN_ORDER), help="comma list, run in this order")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: both recipes on the GPU, torchtune's unpatched")  # fmt: skip
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the recipes' dtype")
    p.add_argument("--ckpt-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the random-weight checkpoint (bf16: half the bytes to write/read)")  # fmt: skip
    p.add_argument(
        "--json", metavar="FILE", help="also write the per-configuration summary as JSON"
    )
    p.add_argument("--write", metavar="MARKDOWN", help=f"update the '{SECTION}' section")
    p.add_argument("--render-only", action="store_true",
                   help="no runs: re-render the table from <workdir>/results.json")  # fmt: skip
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step has no previous stamp)")

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ckpt_dir = workdir / "hf_llama_tiny"
    files = make_checkpoint(a, ckpt_dir)
    tt_recipe, diff = prepare_torchtune_recipe(workdir, patch=a.device == "cpu")
    print("torchtune recipe patches (applied to the `tune cp` copy):\n" + diff, file=sys.stderr)

    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"unknown config(s) {bad}; valid: {CONFIGS}")
    results = []
    if a.render_only:
        results = json.loads((workdir / "results.json").read_text())
    for rnd in range(0 if a.render_only else a.rounds):
        for name in names if rnd % 2 == 0 else list(reversed(names)):
            why = option_available(name)
            if why:
                print(f"[{name}] not available: {why}", file=sys.stderr)
                results.append({"name": name, "status": "skipped", "skip": why})
                continue
            r = run_one(name, a, workdir, tt_recipe, ckpt_dir, files, rnd)
            results.append(r)
            if r["status"] != "ok":
                print(f"[{name}] FAILED: {r['status']}\n{r.get('error_tail', '')}", file=sys.stderr)
            else:
                st = ", ".join(f"{d:.2f}" for d in r["step_s"])
                print(f"[{name} r{rnd}] steps {st} s; peak RSS {_gib(r['worker_hwm'])} GiB; "
                      f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}; wall {r['wall_s']:.0f}s", file=sys.stderr)  # fmt: skip
    if not a.render_only:
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
    summary = summarize(results, a)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    table, targets = render(summary, a)
    total_min = (time.monotonic() - t0) / 60

    cmd = "python " + " ".join(["benchmarks/bench_vs_torchtune.py", *sys.argv[1:]])
    params = 2 * a.vocab * a.embed_dim + a.layers * (
        a.embed_dim * a.embed_dim * 2 + 2 * a.embed_dim * (a.embed_dim // a.heads) * a.kv_heads
        + 3 * a.embed_dim * a.intermediate + 2 * a.embed_dim
    ) + a.embed_dim  # fmt: skip
    loads = [f"{r['load'][0]:.1f}" for r in results if "load" in r]
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%h", "--", "recipes/prefopt_distributed.py"],
                             cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "recipes/prefopt_distributed.py"],
                               cwd=REPO).returncode != 0  # fmt: skip
        recipe_rev = f"`recipes/prefopt_distributed.py` at {rev}" + (
            " plus uncommitted changes" if dirty else ""
        )
    except OSError:
        recipe_rev = "`recipes/prefopt_distributed.py`"
    head = (
        f"Machine: {machine()}. Command: `{cmd}` (run from the repository root; "
        f"{total_min:.1f} min in all). 1-minute load average at the start of each run: "
        f"{', '.join(loads)}. Ours: {recipe_rev}.\n\n"
        f"Model: torchtune `llama3` builder, vocab {a.vocab}, {a.layers} layers, dim "
        f"{a.embed_dim}, {a.heads} heads / {a.kv_heads} KV heads, MLP {a.intermediate} "
        f"({params / 1e6:.1f}M parameters, untied output; fp32), loaded by both recipes from the "
        f"same random-weight HF checkpoint (`LlamaForCausalLM.save_pretrained`) with "
        f"`FullModelHFCheckpointer`. Batch: {a.batch} pairs per step = {2 * a.batch} rows x "
        f"{a.seq_len} tokens (random token ids, first half prompt with label -100, no padding; "
        f"KTO: {2 * a.batch} unpaired rows + {2 * a.batch} KL rows). AdamW, fp32, no activation "
        f"checkpointing, no compile, 1 process (`torchrun --nproc_per_node 1 --standalone <recipe.py>`, gloo, FSDP2). "
        f"{a.warmup} warm-up + {a.steps} measured steps per run; {a.rounds} round(s), "
        f"configurations run one after another in one invocation (rounds in ABBA order).\n\n"
        f"Step time: shared metric logger (`benchmarks/_bench_components.StepClockLogger`) stamps "
        f"each optimizer step; step = difference of consecutive stamps, median of the measured "
        f"steps; CPU s/step: the same from the training process's CPU time "
        f"(`time.process_time()`, all threads) at the stamps, less sensitive to other processes "
        f"on a shared machine. tokens/s = padded policy input tokens per step ({2 * a.batch * a.seq_len}: "
        f"chosen + rejected rows; reference and KL rows not counted) / median step time. Peak "
        f"RSS: `VmHWM` of the training process (torchrun worker) read from `/proc/<pid>/status` "
        f"by the benchmark while the run is held right after its last measured step (model "
        f"loading and all steps included; the end-of-training checkpoint save excluded), the "
        f"same outside measurement for every row.\n\n"
    )
    body = (
        head
        + table
        + "\nTargets:\n\n"
        + "\n".join(targets)
        + "\n\n"
        + (
            "torchtune's recipe on CPU needs exactly these patches (applied to the `tune cp` "
            "copy by string replacement):\n\n"
            + "\n".join(f"- {w}" for w, *_ in PATCHES)
            + "\n\n```diff\n"
            + diff
            + "```\n"
        )
    )
    print(body)
    if a.write:
        write_section(a.write, SECTION, body, NOTES_MARKER)


if __name__ == "__main__":
    main()
