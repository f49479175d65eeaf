"""Padding-free, prompt-shared preference batches on realistic lengths: ours padded / packed /
packed + shared prompt vs TRL's ``DPOTrainer`` and torchtune's ``full_dpo_distributed``.

Not a test. One invocation runs, per workload, every configuration one after the other on the
same machine, model, rows (in the same order: no shuffling, so step ``k`` trains on the same
pairs everywhere), optimizer and number of steps:

  padded      ours, today's layout (chosen and rejected rows right-padded to the longest)
  packed      ours, ``packed=true``: the micro-batch's sequences side by side, no padding
  shared      ours, ``packed=true share_prompt=true``: each prompt computed once for both
  trl         TRL 1.16 ``DPOTrainer`` (``benchmarks/_trl_dpo.py``: its defaults, gradient
              checkpointing off, no truncation), installed into its own directory
  torchtune   torchtune 0.6.1 ``full_dpo_distributed`` (``tune cp`` copy; on CPU the three
              patches of ``bench_vs_torchtune.py``, on a GPU unpatched)
  plain       a plain transformers loop (``benchmarks/_plain_dpo.py``: HF model, full logits,
              fp32 log-softmax, AdamW): the floor a user writes by hand

``<layout>-<variant>`` (layout padded / packed / shared) runs ours with another loss or setting
on the same pairs: ``kto`` (each pair a desirable and an undesirable row, with their KL rows),
``simpo``, ``cached`` (``reference.precompute=true``), ``floor`` (``_floor_loss.SFTFloorLoss``:
one policy forward + backward, the least any preference step costs) and ``compiled``
(``compile=true``); a second table sets each against its layout's DPO row and SFT floor.

Workloads (``_bench_components.WORKLOADS``): ``fixed`` (2 pairs, prompt 256 + 256 per
completion: the earlier benchmark's rows), ``ultrafeedback`` (8 pairs, lognormal prompt median
150 and completions median 250) and ``hh`` (8 pairs, prompts 200-400, completions 60-100).
Model: the earlier benchmark's random-weight Llama-3-vocabulary model (``--vocab 128256``,
2 layers, dim 256, MLP 1024, loaded from one HF checkpoint by every recipe), DPO beta 0.1,
AdamW lr 1e-6, fp32, 1 process. ``--model smollm2``: the real SmolLM2-135M-Instruct
(``torchtune_prefopt.models.smollm2``), with ``--rows chat`` conversations rendered with its
own chat template (``_bench_components.workload_pairs``). ``--nproc 2``: every configuration
on 2 processes (torchrun; ours and torchtune FSDP2, TRL through accelerate, the plain loop
DDP), the step's pairs split between them.

Ratios: to ours padded and to the best peer (TRL, torchtune, plain loop: the most tokens/s,
the least CPU per step, the least memory of the three, each column on its own).

Real tokens/s: tokens of the step's chosen + rejected sequences (no padding; a shared prompt
counted twice, as every layout must compute the same log-probs) / the step's wall time,
median over the measured steps; CPU s/step from the training process's CPU time; peak RSS:
``VmHWM`` of the training process, read from outside while it holds after its last measured
step (as ``bench_vs_torchtune.py``).

Usage:
  python benchmarks/bench_packing.py                                # all, print the tables
  python benchmarks/bench_packing.py --write BENCHMARKS.md          # + update its section
  python benchmarks/bench_packing.py --workloads hh --configs padded,shared --steps 1
  python benchmarks/bench_packing.py --profile ultrafeedback     # where a step's time goes
  python benchmarks/bench_packing.py --model smollm2 --rows chat --pairs 2 \
      --configs padded,shared,shared-kto,shared-cached,shared-floor,trl,plain
  python benchmarks/bench_packing.py --nproc 2 --pairs 4 --configs padded,shared,trl,plain
  python benchmarks/bench_packing.py --model qwen3_moe --vocab 16384 --layers 4 \
      --intermediate 256 --experts 8 --top-k 2 --workloads hh --pairs 4 \
      --configs padded,shared,trl,plain     # Mixture of Experts (BENCHMARKS.md, its own table)
  python benchmarks/bench_packing.py --device cuda --dtype bf16 --layers 16 --embed-dim 2048 \\
      --heads 32 --kv-heads 8 --intermediate 8192 --scale-lengths 4   # GPU: Llama-3.2-1B shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_vs_torchtune as bvt  # noqa: E402
from _bench_components import WORKLOADS, workload_pairs  # noqa: E402
from _markdown import write_section  # noqa: E402

SECTION = "## Packed and prompt-shared batches on realistic lengths"
CONFIGS = ["padded", "packed", "shared", "trl", "torchtune", "plain"]
LABELS = {
    "padded": "ours, padded",
    "packed": "ours, packed",
    "shared": "ours, packed + shared prompt",
    "trl": "TRL 1.16 DPOTrainer",
    "torchtune": "torchtune 0.6.1 full_dpo_distributed",
    "plain": "plain transformers loop",
}
PEERS = ("trl", "torchtune", "plain")
LAYOUTS = ("padded", "packed", "shared")
#: ``<layout>-<variant>`` runs ours with another loss or setting on the same rows (e.g.
#: ``shared-kto``): compared with the layout's DPO row and its SFT floor (``<layout>-floor``)
VARIANTS = {
    "kto": "KTO",  # each pair a desirable and an undesirable row (+ their KL rows)
    "simpo": "SimPO",
    "cached": "DPO, cached reference",  # reference.precompute=true
    "floor": "SFT floor",  # _floor_loss.SFTFloorLoss: one policy forward + backward
    "compiled": "DPO, compile=true",
}


def split_config(name: str):
    """``(base, variant)`` of a configuration name: ``shared-kto`` -> ``("shared", "kto")``."""
    base, _, variant = name.partition("-")
    if base not in CONFIGS or (variant and (base not in LAYOUTS or variant not in VARIANTS)):
        raise SystemExit(
            f"--configs: unknown configuration {name!r} (one of {', '.join(CONFIGS)}, or "
            f"<{'|'.join(LAYOUTS)}>-<{'|'.join(VARIANTS)}>)"
        )
    return base, variant or None


def label(name: str) -> str:
    base, variant = split_config(name)
    return LABELS[base] + (f", {VARIANTS[variant]}" if variant else "")


TRL_PACKAGES = ["trl==1.16.0", "accelerate"]


def rows_for(a, workload: str):
    """``(label, pairs per step, rows)`` of a workload at ``--scale-lengths``."""
    name = workload if a.scale_lengths == 1 else f"{workload} (lengths x{a.scale_lengths:g})"
    pairs = a.pairs or WORKLOADS[workload]["pairs"]
    total = a.warmup + a.steps
    rows = workload_pairs(
        None, workload, total * pairs, a.vocab, seed=0, scale=a.scale_lengths,
        chat_model_dir=a.chat_model_dir,
    )  # fmt: skip
    return name, pairs, rows


def our_config(name: str, a, workload: str, pairs: int, ckpt: Path, files, out: Path) -> Dict:
    a.seq_len = a.max_seq_len  # model max_seq_len / tokenizer limit in bench_vs_torchtune
    a.batch = pairs
    base, variant = split_config(name)
    c = bvt.common_cfg(a, ckpt, files, out)
    total = a.warmup + a.steps
    c["dataset"] = {
        "_component_": "_bench_components.workload_pairs",
        "workload": workload,
        "num_pairs": total * pairs,
        "vocab_size": a.vocab,
        "scale": a.scale_lengths,
        "chat_model_dir": a.chat_model_dir,
        "unpaired": variant == "kto",
    }
    # KTO: the pairs' 2 rows each, the same tokens per step
    rows = pairs * (2 if variant == "kto" else 1)
    c.update(shuffle=False, batch_size=rows // a.nproc, max_steps_per_epoch=total)
    c["metric_logger"]["hold_after_step"] = total
    if a.model in ("smollm2", "qwen3_moe"):
        # an HF folder through the HF-family builder (tied embeddings, RoPE, experts from
        # config.json); the reference defaults to the checkpointer's weights
        c["model"] = {
            "_component_": "torchtune_prefopt.models.hf.hf_decoder",
            "model_dir": str(ckpt),
        }
        c["checkpointer"] = {
            "_component_": "torchtune_prefopt.models.hf.hf_checkpointer",
            "model_dir": str(ckpt),
            "output_dir": str(out / "ckpt"),
        }
        c.pop("ref_checkpointer", None)
    if name == "torchtune":
        return bvt.as_torchtune_dpo(c)
    bvt.as_ours(c, a)
    loss = variant if variant in bvt.LOSSES else "dpo"
    c.update(
        loss=dict(bvt.LOSSES[loss]),
        packed=base in ("packed", "shared"),
        share_prompt=base == "shared",
    )
    if variant == "cached":
        c["reference"]["precompute"] = True
    elif variant == "compiled":
        c["compile"] = True
    if loss in bvt.REFERENCE_FREE:
        c.pop("ref_checkpointer", None)  # reference-free: nothing to load
    return c


def ensure_trl(a) -> Optional[str]:
    """Install TRL into ``workdir/trl_site`` (its own directory, not this environment); return
    the directory, or None (with the reason printed) if it cannot be installed."""
    probe = subprocess.run([sys.executable, "-c", "import trl, accelerate"], capture_output=True)
    if probe.returncode == 0:
        return ""  # importable already (e.g. from scripts/gpu_wheels.sh's wheels)
    site = Path(a.workdir) / "trl_site"
    marker = site / ".installed"
    if not marker.exists():
        shutil.rmtree(site, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
             *TRL_PACKAGES],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"TRL not available: {proc.stderr.strip()[-300:]}")
            return None
        marker.write_text(" ".join(TRL_PACKAGES))
    return str(site)


def run(name: str, a, workload: str, pairs: int, ckpt: Path, files, tt_recipe: Path) -> Dict:
    if name == "torchtune" and a.model == "smollm2":
        # torchtune 0.6.1's Llama builders: llama3 unties the head, llama3_2 scales RoPE
        return {
            "name": name,
            "status": "no torchtune builder for SmolLM2 (tied head, unscaled RoPE)",
        }
    out = Path(a.workdir) / "runs" / f"{a.model}.{workload}.{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    clock = out / "step_clock.jsonl"
    total = a.warmup + a.steps
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    if name in ("trl", "plain"):
        site = ensure_trl(a) if name == "trl" else ""
        if site is None:
            return {"name": name, "status": "TRL could not be installed"}
        if site:
            env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
        cfg = {
            "workload": workload, "num_pairs": total * pairs, "vocab": a.vocab, "seed": 0,
            "scale": a.scale_lengths, "chat_model_dir": a.chat_model_dir,
            "checkpoint_dir": str(ckpt), "output_dir": str(out / "trl"),
            "batch": pairs // a.nproc,  # per process
            "steps": total, "clock_file": str(clock), "hold_after_step": total,
            "device": a.device, "dtype": a.dtype,
        }  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, str(HERE / f"_{name}_dpo.py"), str(out / f"{name}.json")]
        if a.nproc > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
                        "--standalone"]  # fmt: skip
    else:
        cfg = our_config(name, a, workload, pairs, ckpt, files, out)
        (out / "config.yaml").write_text(bvt._yaml(cfg))
        recipe = tt_recipe if name == "torchtune" else bvt.OUR_RECIPE
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
               "--standalone", str(recipe), "--config", str(out / "config.yaml")]  # fmt: skip
    env.setdefault("TORCHTUNE_PREFOPT_QUIET", "1")
    t0 = time.monotonic()
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(out), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _, status, hwm = bvt.watch_until_hold(proc, clock, t0, a.timeout)
    recs = [json.loads(x) for x in clock.read_text().splitlines()] if clock.exists() else []
    steps = {r["step"]: r for r in recs if "step" in r}
    res = {"name": name, "status": status, "wall_s": time.monotonic() - t0}
    if status != "ok":
        res["tail"] = (out / "stdout.log").read_text()[-2000:]
        return res
    # TRL's first callback is step 1; the clock of step 0 is its train start: use consecutive
    res["step_s"] = {s: steps[s]["t"] - steps[s - 1]["t"] for s in steps if s - 1 in steps}
    # CPU: summed over the workers on several processes (rank 0's clock reads them all)
    cpu = "cpu_workers" if all(r.get("cpu_workers") is not None for r in steps.values()) else "cpu"
    res["cpu_s"] = {s: steps[s][cpu] - steps[s - 1][cpu] for s in steps if s - 1 in steps}
    res["hwm"] = max(hwm.values()) if hwm else None  # the largest process's peak RSS
    res["cuda_peak"] = max((r.get("cuda_peak") or 0 for r in steps.values()), default=0) or None
    return res


def summarize(res: Dict, rows, pairs: int, a) -> Dict:
    if res.get("status") != "ok":
        return {"error": res.get("status")}

    # step s (1-based) trains rows [(s-1)*pairs, s*pairs)
    def real(s):
        its = [rows[i] for i in range((s - 1) * pairs, s * pairs)]
        return sum(len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in its)

    measured = [s for s in res["step_s"] if s > a.warmup]
    if not measured:
        return {"error": "no measured step"}
    return {
        "tokens_per_s": statistics.median(real(s) / res["step_s"][s] for s in measured),
        "cpu_s": statistics.median(res["cpu_s"][s] for s in measured),
        "step_s": statistics.median(res["step_s"][s] for s in measured),
        "hwm": res["hwm"],
        "cuda_peak": res["cuda_peak"],
        # the memory compared: CUDA peak on a GPU, the process's peak RSS on CPU
        "mem": res["cuda_peak"] if a.device == "cuda" else res["hwm"],
        "real_tokens": statistics.mean(real(s) for s in measured),
    }


def layout_stats(rows, pairs: int, a) -> Dict[str, float]:
    """Positions each of our layouts computes per step (mean over the measured steps)."""
    import torch  # noqa: F401

    from torchtune_prefopt.data import PackingLayout, PreferenceCollator

    out = {}
    for name, packing in (
        ("padded", None),
        ("packed", PackingLayout(False, a.max_seq_len, 8)),
        ("shared", PackingLayout(True, a.max_seq_len, 8)),
    ):
        col = PreferenceCollator(paired=True, pad_id=0, packing=packing)
        n = []
        for s in range(a.warmup + 1, a.warmup + a.steps + 1):
            its = [rows[i] for i in range((s - 1) * pairs, s * pairs)]
            n.append(col(its).computed_tokens())
        out[name] = statistics.mean(n)
    return out


def render(all_results: Dict[str, Dict], a) -> str:
    lines = []
    for workload, (summ, positions) in all_results.items():
        pad = summ.get("padded", {})
        peers = [summ[p] for p in PEERS if p in summ and "error" not in summ[p]]
        # the best peer: the most real tokens/s, the least CPU per step, the least memory
        best = {
            "tokens_per_s": max((p["tokens_per_s"] for p in peers), default=None),
            "cpu_s": min((p["cpu_s"] for p in peers), default=None),
            "mem": min((p["mem"] for p in peers if p.get("mem")), default=None),
        }
        lines += [
            f"**{workload}** ({summ.get('_pairs')} pairs per step; real tokens per step "
            f"{positions['real']:.0f}; positions computed per step: padded {positions['padded']:.0f}, "
            f"packed {positions['packed']:.0f}, packed + shared {positions['shared']:.0f})",
            "",
            "| configuration | real tokens/s | vs ours padded | vs best peer | CPU s/step | CPU vs "
            f"ours padded | CPU vs best peer | {'CUDA peak' if a.device == 'cuda' else 'peak RSS'} "
            "GiB | memory vs ours padded | memory vs best peer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in [k for k in summ if not k.startswith("_")]:
            s = summ[name]
            if "error" in s:
                lines.append(f"| {label(name)} | not measured: {s['error']} | | | | | | | | |")
                continue

            def ratio(key, ref, s=s, inverse=False):
                if not ref or "error" in ref or ref.get(key) in (None, 0) or s.get(key) is None:
                    return "—"
                return f"{(ref[key] / s[key]) if inverse else (s[key] / ref[key]):.2f}x"

            mem = s["mem"]
            lines.append(
                f"| {label(name)} | {s['tokens_per_s']:.0f} | {ratio('tokens_per_s', pad)} | "
                f"{ratio('tokens_per_s', best)} | {s['cpu_s']:.2f} | {ratio('cpu_s', pad)} | "
                f"{ratio('cpu_s', best)} | {bvt._gib(mem)} | {ratio('mem', pad)} | "
                f"{ratio('mem', best)} |"
            )
        lines.append("")
        lines += variant_table(summ)
    return "\n".join(lines)


def variant_table(summ: Dict) -> List[str]:
    """Each ``<layout>-<variant>`` row's step against its layout's DPO row and SFT floor."""
    rows = []
    for name, s in summ.items():
        if name.startswith("_") or "error" in s:
            continue
        base, variant = split_config(name)
        if variant is None:
            continue
        cells = []
        for ref_name in (base, f"{base}-floor"):
            ref = summ.get(ref_name)
            if ref_name == name or not ref or "error" in ref:
                cells += ["—", "—"]
            else:
                cells += [
                    f"{s['step_s'] / ref['step_s']:.2f}x",
                    f"{s['cpu_s'] / ref['cpu_s']:.2f}x",
                ]
        rows.append(
            f"| {label(name)} | {s['step_s']:.2f} | {s['cpu_s']:.2f} | " + " | ".join(cells) + " |"
        )
    if not rows:
        return []
    return [
        "| configuration | step s | CPU s/step | step vs the layout's DPO | CPU vs the layout's "
        "DPO | step vs the layout's SFT floor | CPU vs the layout's SFT floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def profile_step(a, workload: str) -> str:
    """Where one step's time goes, per layout: policy forward + backward and the reference
    forward of one micro-batch, in this process under ``torch.profiler``; the share of the
    vocabulary projection (the lean log-prob path's fused ``[N, D] x [D, V]`` kernels, which
    every layout runs on the same ``N`` scored tokens) vs everything else."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torchtune.models.llama3._component_builders import llama3

    from torchtune_prefopt.data import PackingLayout, PreferenceCollator

    name, pairs, rows = rows_for(a, workload)
    torch.manual_seed(0)
    model = llama3(**bvt.model_kwargs(a))
    items = [rows[i] for i in range(pairs)]
    lines = [
        f"**profile, {name}** (one micro-batch of {pairs} pairs: policy forward + backward and "
        "a no-grad reference forward, the same weights; self CPU time, `torch.profiler`)",
        "",
        "| layout | positions | total CPU s | vocabulary projection CPU s | share | matrix "
        "products + attention kernels (self CPU) | everything else (what compile can fuse) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, packing in (
        ("padded", None),
        ("packed", PackingLayout(False, a.max_seq_len, 8)),
        ("packed + shared", PackingLayout(True, a.max_seq_len, 8)),
    ):
        batch = PreferenceCollator(paired=True, pad_id=0, packing=packing)(items)

        def step(batch=batch):
            lp = batch.logps(model)
            lp.sum.sum().backward()
            with torch.no_grad():
                batch.logps(model)

        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        head = sum(
            e.cpu_time_total for e in events if e.key in (
                "_FusedLinearTargetLogProb", "_FusedLinearTargetLogProbBackward")
        ) / 1e6  # fmt: skip
        # GEMMs and attention kernels: what torch.compile on CPU leaves to the same
        # mkldnn/BLAS kernels; the rest (norms, RoPE, activations, copies, the optimizer-free
        # step's autograd glue) is the most compile can remove
        kernels = sum(e.self_cpu_time_total for e in events if _is_kernel(e.key)) / 1e6
        lines.append(
            f"| {label} | {batch.computed_tokens()} | {total:.2f} | {head:.2f} | {head / total:.0%} "
            f"| {kernels / total:.0%} | {1 - kernels / total:.0%} |"
        )
    return "\n".join(lines) + "\n"


def processes(a) -> str:
    if a.nproc == 1:
        return "1 process"
    return (
        f"{a.nproc} processes (torchrun, gloo; each the step's pairs / {a.nproc}; CPU s/step "
        "summed over the workers; peak RSS of the largest process)"
    )


def _is_kernel(op: str) -> bool:
    """A matrix product or attention kernel in a ``torch.profiler`` op name."""
    return op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or (
        "scaled_dot_product" in op or "flash_attention" in op
    )


def make_moe_checkpoint(a, ckpt_dir: Path) -> List[str]:
    """A random-weight Qwen3-MoE folder (``save_pretrained``: the Hub's per-expert layout) of
    the shape flags: ``--experts`` experts of width ``--intermediate``, ``--top-k`` per token."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    want = json.dumps(
        [a.vocab, a.embed_dim, a.layers, a.heads, a.kv_heads, a.intermediate, a.experts, a.top_k]
    )
    marker = ckpt_dir / "bench_marker.json"
    if not (marker.is_file() and marker.read_text() == want):
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
        config = Qwen3MoeConfig(
            vocab_size=a.vocab, hidden_size=a.embed_dim, num_hidden_layers=a.layers,
            num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            head_dim=a.embed_dim // a.heads, intermediate_size=a.intermediate,
            moe_intermediate_size=a.intermediate, num_experts=a.experts,
            num_experts_per_tok=a.top_k, norm_topk_prob=True,
            max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(config).save_pretrained(str(ckpt_dir))
        marker.write_text(want)
    return sorted(p.name for p in ckpt_dir.glob("*.safetensors"))


def model_text(a) -> str:
    if a.model == "qwen3_moe":
        return (
            f"random weights, Qwen3-MoE (`Qwen3MoeForCausalLM`), vocab {a.vocab}, {a.layers} "
            f"layers, dim {a.embed_dim}, {a.heads} heads / {a.kv_heads} KV heads, {a.experts} "
            f"experts of width {a.intermediate}, top-{a.top_k}"
        )
    if a.model == "smollm2":
        return (
            "SmolLM2-135M-Instruct (`torchtune_prefopt.models.smollm2`: 30 layers, dim 576, 9/3 "
            "heads, MLP 1536, vocab 49152, tied head)"
        )
    return (
        f"random weights, llama3 builder, vocab {a.vocab}, {a.layers} layers, dim {a.embed_dim}, "
        f"{a.heads} heads / {a.kv_heads} KV heads, MLP {a.intermediate}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="/tmp/prefopt_bench_packing")
    p.add_argument("--workloads", default="fixed,ultrafeedback,hh")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument(
        "--model",
        choices=("random", "smollm2", "qwen3_moe"),
        default="random",
        help="random: a random-weight Llama of the --vocab/--layers/... shape; smollm2: the real "
        "SmolLM2-135M-Instruct (offline, from the package index; the shape flags are ignored); "
        "qwen3_moe: a random-weight Qwen3-MoE of the shape flags and --experts/--top-k "
        "(torchtune 0.6.1 builds no MoE: no torchtune column)",
    )
    p.add_argument("--experts", type=int, default=8, help="--model qwen3_moe: experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="--model qwen3_moe: experts per token")
    p.add_argument(
        "--rows",
        choices=("random", "chat"),
        default="random",
        help="random: random token ids of the workload's lengths; chat: conversations rendered "
        "with the model's own chat template (--model smollm2)",
    )
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=4096, help="model context (packing capacity)")
    p.add_argument(
        "--scale-lengths", type=float, default=1.0, help="multiply every workload length"
    )
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument(
        "--pairs", type=int, default=None, help="pairs per step (default: the workload's)"
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="processes per run (torchrun; pairs split between)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--ckpt-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--profile", metavar="WORKLOAD", help="only profile one step per layout")
    p.add_argument("--write", metavar="MARKDOWN", help=f"update the '{SECTION}' section")
    a = p.parse_args()
    a.seq_len = a.max_seq_len
    a.chat_model_dir = None
    for name in a.configs.split(","):
        split_config(name)
    for workload in a.workloads.split(","):
        pairs = a.pairs or WORKLOADS[workload]["pairs"]
        if pairs % a.nproc:
            raise SystemExit(
                f"{workload}: {pairs} pairs per step not divisible by --nproc {a.nproc}"
            )
    if a.profile:
        print(profile_step(a, a.profile))
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.model == "smollm2":
        from torchtune_prefopt.models.smollm2 import smollm2_135m_instruct

        ckpt = smollm2_135m_instruct()  # cached once per machine
        files = sorted(p.name for p in ckpt.glob("*.safetensors"))
        a.vocab = 49152
        a.chat_model_dir = str(ckpt) if a.rows == "chat" else None
    elif a.model == "qwen3_moe":
        if a.rows == "chat" or "torchtune" in a.configs.split(","):
            raise SystemExit("--model qwen3_moe: random token rows, no torchtune column")
        ckpt = work / "ckpt_qwen3_moe"
        files = make_moe_checkpoint(a, ckpt)
    else:
        if a.rows == "chat":
            raise SystemExit("--rows chat: a random model has no chat template (--model smollm2)")
        ckpt = work / "ckpt"
        files = bvt.make_checkpoint(a, ckpt)
    tt_recipe, _ = bvt.prepare_torchtune_recipe(work, patch=a.device == "cpu")
    started = time.time()
    all_results: Dict[str, tuple] = {}
    raw: Dict[str, List[Dict]] = {}
    for workload in a.workloads.split(","):
        name, pairs, rows = rows_for(a, workload)
        positions = layout_stats(rows, pairs, a)
        positions["real"] = statistics.mean(
            sum(len(rows[i]["chosen_input_ids"]) + len(rows[i]["rejected_input_ids"])
                for i in range((s - 1) * pairs, s * pairs))
            for s in range(a.warmup + 1, a.warmup + a.steps + 1)
        )  # fmt: skip
        summ: Dict = {"_pairs": pairs}
        for cfg in a.configs.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {cfg} ...", flush=True)
            res = run(cfg, a, workload, pairs, ckpt, files, tt_recipe)
            raw.setdefault(name, []).append(res)
            summ[cfg] = summarize(res, rows, pairs, a)
            print(f"    {summ[cfg]}", flush=True)
            if "tail" in res:
                print(res["tail"][-1200:])
        all_results[name] = (summ, positions)
    body = render(all_results, a)
    minutes = (time.time() - started) / 60
    header = (
        f"Machine: {bvt.machine()}. Command: `python benchmarks/{Path(__file__).name} "
        f"{' '.join(sys.argv[1:])}` ({minutes:.1f} min). Model: {model_text(a)}, "
        f"{a.dtype} on {a.device}; DPO beta 0.1, AdamW lr 1e-6, {processes(a)}; rows: "
        f"{'the model chat template' if a.chat_model_dir else 'random token ids'}; "
        f"{a.warmup} warm-up + {a.steps} measured steps per configuration, rows in the same "
        "order everywhere."
    )
    print(header + "\n\n" + body)
    if a.json:
        Path(a.json).write_text(json.dumps({"results": {k: v[0] for k, v in all_results.items()},
                                            "positions": {k: v[1] for k, v in all_results.items()},
                                            "raw": raw}, default=str, indent=1))  # fmt: skip
    if a.write:
        write_section(
            a.write, SECTION, header + "\n\n" + body, "<!-- bench_packing: notes below are kept -->"
        )


if __name__ == "__main__":
    main()
