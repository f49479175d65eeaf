"""GPU readiness check: the CUDA path of torchtune-prefopt, in one prepared run.

Not a test. ``scripts/gpu_check.sh`` runs it on a lent GPU machine (wheels installed into a
private directory first); ``--dry-run`` runs the very same parts on CPU with tiny sizes (CUDA-only
rows reported as skipped), which is what the test suite does so that a broken script is caught
without a GPU.

Each part runs as its own child process (``--part NAME``) under its own timeout; the driver
rewrites ``<out>/gpu_check.md`` and ``<out>/gpu_check.json`` after every part, so whatever
finished is kept when a later part fails or the machine is taken back.

Parts:

=================  ==========================================================================
``env``            GPU name, capability, count, memory; torch/CUDA/NCCL versions; a measured
                   bf16 matmul rate (8192^3, the yardstick next to the card's spec peak)
``recipe_fp32``    the recipe on the tiny config, ``device=cuda``, fp32, one process (process
                   group ``cuda:nccl,cpu:gloo``: NCCL with 1 process): losses, time to first
                   step, steady step time, CUDA peak memory
``recipe_bf16``    the same in bf16: log-probs and loss are fp32 tensors; step-1 log-probs
                   within ``BF16_LOGP_RTOL`` of fp32's
``packed``         ``packed=true share_prompt=true`` (flex_attention with a BlockMask on CUDA)
                   against ``recipe_fp32``'s padded run, step by step (fp32), then the same in
                   bf16 compiled with inductor (flex fused): steps, recompiles
``nccl_2proc``     ``tune run --nproc_per_node 2`` (needs 2 GPUs) equals 1 process per step
``quant_ref``      ``reference.quantization`` int8 / fp8 / fp8_dynamic (capability >= 8.9): the
                   reference log-prob error against the bf16 reference, weight bytes, and a
                   recipe run with ``fp8_dynamic``
``compile``        ``compile: true`` with inductor (bf16): time to first step, steady step time
                   against eager (``recipe_bf16``), recompiles (``TORCH_LOGS=recompiles``)
``realistic``      realistic steps, Llama-3.2-1B shapes (random weights, bf16), the
                   UltraFeedback- and hh-shaped workloads with lengths x3 (rows up to ~3k
                   tokens): ours padded / packed + shared vs torchtune 0.6.1's own
                   ``full_dpo_distributed`` (unpatched on GPU) and TRL's ``DPOTrainer``, via
                   ``bench_packing.py``: real tokens/s, CUDA peak memory, model-FLOPs
                   utilisation against the card's bf16 peak
=================  ==========================================================================

Usage::

    python benchmarks/gpu_check.py --out /tmp/gpu_check              # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu_check --dry-run    # CPU, tiny, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: bf16 vs fp32 step-1 policy log-probs (summed over the completion, mean over the batch):
#: relative tolerance. bf16 rounds each weight to 8 mantissa bits (relative error <= 2^-9);
#: the resulting log-prob shift is first order in that, over a 2-layer model and ~10 tokens.
BF16_LOGP_RTOL = 2e-2

# (name, timeout on a GPU in s, timeout in a dry run in s)
# Order: the headline numbers first, so a tight budget cuts the least informative parts.
PARTS = [
    ("env", 60, 60),
    ("recipe_fp32", 150, 150),
    ("recipe_bf16", 150, 150),
    ("quant_ref", 120, 120),
    ("packed", 150, 200),
    ("realistic", 330, 330),
    ("compile", 240, 240),
    ("nccl_2proc", 150, 180),
]

#: dense bf16 peak of the card (vendor spec, without sparsity), for MFU
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1,
                    "L4": 121.0, "A10G": 70.0, "B200": 2250.0}  # fmt: skip


# ================================================================================ helpers


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _tiny_overrides(work: Path, name: str, dry: bool, steps: int, extra=()) -> List[str]:
    device = "cpu" if dry else "cuda"
    return [
        f"output_dir={work / name}",
        "overwrite_output_dir=true",  # the check's runs are scratch: a rerun replaces them
        f"checkpointer.checkpoint_dir={work / 'tiny_base'}",
        f"max_steps_per_epoch={steps}",
        "epochs=1",
        "eval_dataset=null",
        "save_every_n_steps=null",
        "log_every_n_steps=1",
        "lr_scheduler.num_warmup_steps=0",
        f"device={device}",
        *extra,
    ]


def _run_recipe_in_process(overrides: List[str]) -> Dict[str, Any]:
    """Set up and train the recipe in this process; time every optimizer step."""
    import importlib.util

    import torch

    import torchtune_prefopt
    from torchtune_prefopt._config import load_config
    from torchtune_prefopt.compare.metrics import iter_disk_log

    path = Path(torchtune_prefopt.__file__).parent / "recipes" / "prefopt_distributed.py"
    spec = importlib.util.spec_from_file_location("_gpu_check_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from torchtune_prefopt.training.distributed import LAUNCHER_ENV

    cfg = load_config(["--config", "tiny/dpo", *overrides])
    # a one-process run sets RANK/WORLD_SIZE...: a second run in this process must not take
    # them for a torchrun launch
    for key in LAUNCHER_ENV:
        os.environ.pop(key, None)
    t0 = time.perf_counter()
    recipe = module.PrefOptRecipe(cfg)
    out: Dict[str, Any] = {}
    try:
        recipe.setup()
        _sync()
        t_setup = time.perf_counter()
        stamps: List[float] = []
        step = recipe._optimizer.step

        def timed_step(*a, **k):
            r = step(*a, **k)
            _sync()
            stamps.append(time.perf_counter())
            return r

        recipe._optimizer.step = timed_step
        if recipe._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        recipe.train()
        peak = (
            (torch.cuda.max_memory_allocated() / 2**30) if recipe._device.type == "cuda" else None
        )
        # after training (a probe before it would compile the model outside the timed steps)
        recipe._sampler.set_epoch(0)
        batch = next(iter(recipe._dataloader)).to(recipe._device)
        step_fn = recipe._paired_step if recipe._traits.paired else recipe._kto_step
        losses = step_fn(batch)[0]
        pol, ref = batch.logps(recipe._model), recipe._reference.logps(batch)
        out["dtypes"] = {
            "weights": str(next(recipe._model.parameters()).dtype),
            "policy_logps": str(pol.sum.dtype),
            "reference_logps": None if ref is None else str(ref.sum.dtype),
            "loss": str(losses.dtype),
        }
        del pol, ref, losses
        log_file = Path(str(cfg.output_dir)) / "logs"
        rows = []
        for f in sorted(log_file.glob("*.txt")):
            rows += [{**m, "step": s} for s, m in iter_disk_log(f) if "loss" in m]
        diffs = [b - a for a, b in zip(stamps, stamps[1:])]
        out.update(
            setup_s=t_setup - t0,
            time_to_first_step_s=(stamps[0] - t_setup) if stamps else None,
            steady_step_s=statistics.median(diffs[1:] or diffs) if diffs else None,
            steps=len(stamps),
            metrics=rows,
            backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            cuda_peak_gib=peak,
        )
    finally:
        recipe.cleanup()
    return out


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ================================================================================ parts


def part_env(a) -> Dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {
            p: _version(md, p)
            for p in ("torchtune", "torchao", "transformers", "torchtune-prefopt")
        },
    }
    if not _cuda():
        out["gpu"] = None
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(
        gpu=torch.cuda.get_device_name(0),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        gpus=torch.cuda.device_count(),
        memory_gib=props.total_memory / 2**30,
        nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
    )
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    out["measured_bf16_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12
    out["spec_bf16_tflops"] = next(
        (v for k, v in SPEC_BF16_TFLOPS.items() if k in out["gpu"]), None
    )
    return out


def _version(md, name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def part_recipe(a, dtype: str) -> Dict[str, Any]:
    steps = 3 if a.dry_run else 8
    res = _run_recipe_in_process(
        _tiny_overrides(a.work, f"recipe_{dtype}", a.dry_run, steps, [f"dtype={dtype}"])
    )
    res["dtype"] = dtype
    want_fp32 = {"policy_logps", "reference_logps", "loss"}
    res["fp32_where_required"] = all(res["dtypes"][k] == "torch.float32" for k in want_fp32)
    if dtype == "bf16":
        fp32 = _read_json(a.work / "recipe_fp32.json")
        if fp32 and fp32.get("status") == "ok" and fp32["result"]["metrics"] and res["metrics"]:
            m32, m16 = fp32["result"]["metrics"][0], res["metrics"][0]
            rel = {
                k: abs(m16[k] - m32[k]) / max(abs(m32[k]), 1e-12)
                for k in ("logps/chosen", "logps/rejected")
            }
            res["vs_fp32_step1"] = {
                "loss_fp32": m32["loss"], "loss_bf16": m16["loss"],
                "logps_rel_diff": rel, "tolerance": BF16_LOGP_RTOL,
                "ok": all(v <= BF16_LOGP_RTOL for v in rel.values()) and abs(m16["loss"] - m32["loss"]) < 1e-6,
            }  # fmt: skip
    return res


def part_packed(a) -> Dict[str, Any]:
    """The packed, prompt-shared layout on the device: fp32 against ``recipe_fp32``'s padded
    run step by step, then bf16 + inductor (flex_attention compiled into the layers)."""
    padded = _read_json(a.work / "recipe_fp32.json")
    if not padded or padded.get("status") != "ok":
        return {"skipped": "needs recipe_fp32's padded run to compare with"}
    steps = len(padded["result"]["metrics"])
    shared = ["packed=true", "share_prompt=true"]
    fp32 = _run_recipe_in_process(
        _tiny_overrides(a.work, "packed_fp32", a.dry_run, steps, ["dtype=fp32", *shared])
    )
    worst = {}
    for m0, m1 in zip(padded["result"]["metrics"], fp32["metrics"]):
        for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            rel = abs(m1[k] - m0[k]) / max(abs(m0[k]), 1e-12)
            worst[k] = max(worst.get(k, 0.0), rel)
    out: Dict[str, Any] = {
        "attention": "per-document SDPA (CPU)" if a.dry_run else "flex_attention + BlockMask",
        "fp32_vs_padded_max_rel": worst,
        # TF32 is off by default for matmuls in torch; flex vs SDPA kernels differ in rounding
        "ok": max(worst.values()) < 1e-4,
        "fp32_steady_step_s": fp32["steady_step_s"],
        "padded_fp32_steady_step_s": padded["result"]["steady_step_s"],
    }
    comp = _run_recipe_in_process(
        _tiny_overrides(a.work, "packed_bf16_compile", a.dry_run, 3 if a.dry_run else 8,
                        ["dtype=bf16", "compile=true", *shared])
    )  # fmt: skip
    out["bf16_compiled"] = {
        k: comp[k] for k in ("time_to_first_step_s", "steady_step_s", "cuda_peak_gib", "steps")
    }
    out["bf16_compiled"]["losses"] = [m["loss"] for m in comp["metrics"]]
    return out


def part_nccl_2proc(a) -> Dict[str, Any]:
    """2 processes (torchrun, NCCL on GPUs) against ``recipe_fp32``'s 1-process run: the same
    config, global batch and data order, so the same losses per step."""
    import torch

    if not a.dry_run and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"}
    one = _read_json(a.work / "recipe_fp32.json")
    if not one or one.get("status") != "ok":
        return {"skipped": "needs recipe_fp32's losses to compare with"}
    import torchtune_prefopt
    from torchtune_prefopt.compare.metrics import parse_disk_log

    # torchrun on the installed recipe file: what `tune run --nproc_per_node 2` launches (a
    # wheel installed with --target has no .pth, so `tune` would not know the recipe's name)
    recipe = Path(torchtune_prefopt.__file__).parent / "recipes" / "prefopt_distributed.py"
    losses_1p = [m["loss"] for m in one["result"]["metrics"]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(recipe), "--config", "tiny/dpo",
           *_tiny_overrides(a.work, "nccl_2p", a.dry_run, len(losses_1p), ["dtype=fp32", "batch_size=4"])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=a.work, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=170)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"2 processes exited {proc.returncode}: {proc.stderr[-2000:]}")
    (log,) = sorted((a.work / "nccl_2p" / "logs").glob("*.txt"))
    losses_2p = [v for _, v in parse_disk_log(log)["loss"]]
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(losses_1p, losses_2p))
    return {"backend": "gloo (dry run)" if a.dry_run else "nccl", "losses_1p": losses_1p, "losses_2p": losses_2p,
            "max_rel_diff": worst, "ok": worst < 1e-4 and len(losses_2p) == len(losses_1p)}  # fmt: skip


def part_quant_ref(a) -> Dict[str, Any]:
    import torch
    from torchtune import training

    from torchtune_prefopt.data import PairedBatch, synthetic_preference_dataset
    from torchtune_prefopt.models.tiny import tiny_hf_checkpointer, tiny_qwen2, tiny_tokenizer
    from torchtune_prefopt.reference import quantize_reference, weight_bytes

    device = torch.device("cpu" if a.dry_run else "cuda")
    cap = torch.cuda.get_device_capability() if device.type == "cuda" else None
    ckpt = tiny_hf_checkpointer(a.work / "tiny_base", a.work / "quant_scratch")
    sd = ckpt.load_checkpoint()[training.MODEL_KEY]
    tok = tiny_tokenizer(max_seq_len=64)
    ds = synthetic_preference_dataset(tok, split="heldout")
    batch = PairedBatch.collate([ds[i] for i in range(16)], pad_id=tok.pad_id).to(device)

    def model(dtype):
        with training.set_default_dtype(dtype), torch.device("meta"):
            m = tiny_qwen2()
        m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        with training.set_default_dtype(dtype), torch.device(device):
            for mod in m.modules():
                if hasattr(mod, "rope_init"):
                    mod.rope_init()
        return m.to(device).eval()

    def h(lp):
        chosen, rejected = lp.halves()
        return chosen.sum - rejected.sum

    with torch.no_grad():
        ref = batch.logps(model(torch.bfloat16))
        out: Dict[str, Any] = {"baseline": "bf16 reference, unquantized", "pairs": len(batch)}
        for mode in ("int8", "fp8", "fp8_dynamic"):
            if mode == "fp8_dynamic" and (cap is None or cap < (8, 9)):
                out[mode] = {
                    "skipped": "needs CUDA capability >= 8.9"
                    + (" (dry run: CPU)" if a.dry_run else "")
                }
                continue
            m = model(torch.bfloat16)
            before = weight_bytes(m)
            quantize_reference(m, mode, device=device)
            lp = batch.logps(m)
            err = (lp.sum - ref.sum).abs()
            out[mode] = {
                "seq_logp_abs_err_mean": err.mean().item(), "seq_logp_abs_err_max": err.max().item(),
                "h_abs_err_max": (h(lp) - h(ref)).abs().max().item(),
                "weight_mib": weight_bytes(m) / 2**20, "weight_mib_bf16": before / 2**20,
            }  # fmt: skip
    if cap is not None and cap >= (8, 9):
        run = _run_recipe_in_process(_tiny_overrides(a.work, "quant_fp8_dynamic", a.dry_run, 4,
                                                     ["dtype=bf16", "reference.quantization=fp8_dynamic"]))  # fmt: skip
        out["fp8_dynamic_recipe"] = {k: run[k] for k in ("steady_step_s", "cuda_peak_gib", "steps")}
        out["fp8_dynamic_recipe"]["losses"] = [m["loss"] for m in run["metrics"]]
    return out


def part_compile(a) -> Dict[str, Any]:
    res = _run_recipe_in_process(
        _tiny_overrides(
            a.work, "compile", a.dry_run, 3 if a.dry_run else 8, ["dtype=bf16", "compile=true"]
        )
    )
    eager = _read_json(a.work / "recipe_bf16.json")
    if eager and eager.get("status") == "ok":
        e = eager["result"]
        res["eager_time_to_first_step_s"] = e["time_to_first_step_s"]
        res["eager_steady_step_s"] = e["steady_step_s"]
        if e["steady_step_s"] and res["steady_step_s"]:
            res["steady_speedup_vs_eager"] = e["steady_step_s"] / res["steady_step_s"]
        l_e, l_c = [m["loss"] for m in e["metrics"]], [m["loss"] for m in res["metrics"]]
        n = min(len(l_e), len(l_c))
        res["max_rel_loss_diff_vs_eager"] = max(
            abs(x - y) / max(abs(x), 1e-12) for x, y in zip(l_e[:n], l_c[:n])
        )
    res["backend"] = os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
    return res


# Llama-3.2-1B shapes (untied output here: the benchmark model builder)
LLAMA_1B = dict(vocab=128256, layers=16, embed_dim=2048, heads=32, kv_heads=8, intermediate=8192)
TINY_BENCH = dict(vocab=1024, layers=2, embed_dim=64, heads=4, kv_heads=2, intermediate=128)


def model_flops_per_step(shape: Dict[str, int], seq_len: int, rows: int) -> float:
    """PaLM-style model FLOPs of one DPO step: policy training ``6N + 12·L·d·S`` per token,
    reference forward a third of that; N = parameters without the input embedding (the output
    projection counted). The same number for every implementation of the step."""
    d, L, V = shape["embed_dim"], shape["layers"], shape["vocab"]
    kv = d // shape["heads"] * shape["kv_heads"]
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * shape["intermediate"]
    n = L * per_layer + V * d
    per_token_train = 6 * n + 12 * L * d * seq_len
    return rows * seq_len * per_token_train * (1 + 1 / 3)


def part_realistic(a) -> Dict[str, Any]:
    shape = TINY_BENCH if a.dry_run else LLAMA_1B
    scale, steps, warmup = (0.25, 1, 1) if a.dry_run else (3, 2, 1)
    # a dry run checks the plumbing on one workload, without installing TRL
    configs = "padded,shared,torchtune" if a.dry_run else "padded,shared,torchtune,trl"
    workloads = "hh" if a.dry_run else "ultrafeedback,hh"
    out_json = a.work / "realistic_bench.json"
    cmd = [sys.executable, str(HERE / "bench_packing.py"), "--workdir", str(a.work / "bench"),
           "--workloads", workloads, "--configs", configs, "--scale-lengths", str(scale),
           "--steps", str(steps), "--warmup", str(warmup), "--vocab", str(shape["vocab"]),
           "--layers", str(shape["layers"]), "--embed-dim", str(shape["embed_dim"]),
           "--heads", str(shape["heads"]), "--kv-heads", str(shape["kv_heads"]),
           "--intermediate", str(shape["intermediate"]), "--json", str(out_json),
           # a dry run checks the plumbing on a shared CPU: no run may fail for being slow
           "--timeout", "480" if a.dry_run else "150",
           "--device", "cpu" if a.dry_run else "cuda", "--dtype", "bf16", "--ckpt-dtype", "bf16"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=1500 if a.dry_run else 320
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_packing exited {proc.returncode}: {proc.stderr[-3000:]}")
    bench = json.loads(out_json.read_text())
    env = _read_json(a.work / "env.json") or {}
    peak = ((env.get("result") or {}).get("spec_bf16_tflops") or 0) * 1e12
    measured = ((env.get("result") or {}).get("measured_bf16_tflops") or 0) * 1e12
    workloads = {}
    for workload, summ in bench["results"].items():
        pos = bench["positions"][workload]
        pairs = summ["_pairs"]
        mean_len = pos["real"] / (2 * pairs)
        # model FLOPs of the real tokens (the same number for every implementation)
        flops = model_flops_per_step(shape, int(mean_len), 2 * pairs)
        rows = {}
        for name, s in summ.items():
            if name.startswith("_"):
                continue
            if "error" in s:
                rows[name] = {"error": s["error"]}
                continue
            achieved = flops / s["step_s"]
            rows[name] = {
                "step_s": s["step_s"], "tokens_per_s": s["tokens_per_s"],
                "cuda_peak_gib": (s.get("cuda_peak") or 0) / 2**30 if s.get("cuda_peak") else None,
                "peak_rss_gib": (s.get("hwm") or 0) / 2**30,
                "model_tflops": achieved / 1e12,
                "mfu_vs_spec": achieved / peak if peak else None,
                "mfu_vs_measured_matmul": achieved / measured if measured else None,
            }  # fmt: skip
        workloads[workload] = {"positions": pos, "pairs": pairs, "runs": rows}
    return {"shape": shape, "scale_lengths": scale, "workloads": workloads}


PART_FUNCS = {
    "env": part_env,
    "recipe_fp32": lambda a: part_recipe(a, "fp32"),
    "recipe_bf16": lambda a: part_recipe(a, "bf16"),
    "nccl_2proc": part_nccl_2proc,
    "quant_ref": part_quant_ref,
    "compile": part_compile,
    "packed": part_packed,
    "realistic": part_realistic,
}


# ================================================================================ report


def _fmt(v: Any, digits: int = 3) -> str:
    """3 significant digits (whole numbers from 100 up), scientific below 1e-3."""
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def summary_line(name: str, rec: Dict[str, Any]) -> str:
    """One table row's 'what it showed' for a finished part."""
    r = rec.get("result") or {}
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if name == "env":
        if not r.get("gpu"):
            return f"no GPU (torch {r['torch']}, Python {r['python']})"
        return (f"{r['gpu']} (capability {r['capability']}, {r['gpus']} GPU(s), {_fmt(r['memory_gib'])} GiB), torch "
                f"{r['torch']}, CUDA {r['cuda']}, NCCL {r.get('nccl')}; bf16 matmul {_fmt(r['measured_bf16_tflops'])} "
                f"TFLOP/s measured (spec {r.get('spec_bf16_tflops')})")  # fmt: skip
    if name.startswith("recipe_"):
        losses = [m["loss"] for m in r.get("metrics", [])]
        s = (f"{r['steps']} steps, backend {r.get('backend')}, losses {_fmt(losses[0]) if losses else '—'} -> "
             f"{_fmt(losses[-1]) if losses else '—'}; setup {_fmt(r['setup_s'])} s, first step "
             f"{_fmt(r['time_to_first_step_s'])} s, steady step {_fmt(r['steady_step_s'])} s; CUDA peak "
             f"{_fmt(r.get('cuda_peak_gib'))} GiB; log-probs/loss fp32: {r['fp32_where_required']}")  # fmt: skip
        v = r.get("vs_fp32_step1")
        if v:
            s += (f"; step-1 log-probs vs fp32: rel. diff {_fmt(max(v['logps_rel_diff'].values()))} "
                  f"(tolerance {v['tolerance']}) {'ok' if v['ok'] else 'OUT OF TOLERANCE'}")  # fmt: skip
        return s
    if name == "packed":
        c = r["bf16_compiled"]
        return (f"{r['attention']}: fp32 packed + shared vs padded, max rel. diff per step "
                f"{_fmt(max(r['fp32_vs_padded_max_rel'].values()))} ({'ok' if r['ok'] else 'MISMATCH'}); steady step "
                f"{_fmt(r['fp32_steady_step_s'])} s (padded {_fmt(r['padded_fp32_steady_step_s'])} s); bf16 + compile: "
                f"{c['steps']} steps, first {_fmt(c['time_to_first_step_s'])} s, steady {_fmt(c['steady_step_s'])} s, "
                f"recompiles {rec.get('recompiles')}, losses {_fmt(c['losses'][0])} -> {_fmt(c['losses'][-1])}")  # fmt: skip
    if name == "nccl_2proc":
        return f"{r['backend']}: 2 vs 1 process, max rel. loss diff {_fmt(r['max_rel_diff'])} ({'ok' if r['ok'] else 'MISMATCH'})"
    if name == "quant_ref":
        parts = []
        for mode in ("int8", "fp8", "fp8_dynamic"):
            m = r.get(mode, {})
            if "skipped" in m:
                parts.append(f"{mode}: skipped ({m['skipped']})")
            elif m:
                parts.append(f"{mode}: seq. log-prob abs. error mean {_fmt(m['seq_logp_abs_err_mean'])} max {_fmt(m['seq_logp_abs_err_max'])}, "
                             f"DPO h abs. error max {_fmt(m['h_abs_err_max'])}, weights {_fmt(m['weight_mib'])} MiB")  # fmt: skip
        if "fp8_dynamic_recipe" in r:
            f = r["fp8_dynamic_recipe"]
            parts.append(
                f"recipe with fp8_dynamic: losses {[round(x, 4) for x in f['losses']]}, step {_fmt(f['steady_step_s'])} s"
            )
        return "; ".join(parts)
    if name == "compile":
        return (f"{r['backend']}: first step {_fmt(r['time_to_first_step_s'])} s (eager {_fmt(r.get('eager_time_to_first_step_s'))} s), "
                f"steady step {_fmt(r['steady_step_s'])} s (eager {_fmt(r.get('eager_steady_step_s'))} s, "
                f"{_fmt(r.get('steady_speedup_vs_eager'))}x), recompiles {rec.get('recompiles')}, "
                f"max rel. loss diff vs eager {_fmt(r.get('max_rel_loss_diff_vs_eager'))}, CUDA peak {_fmt(r.get('cuda_peak_gib'))} GiB")  # fmt: skip
    if name == "realistic":
        parts = []
        for workload, w in r["workloads"].items():
            bits = []
            for k, v in w["runs"].items():
                if "error" in v:
                    bits.append(f"{k}: {v['error']}")
                    continue
                bits.append(f"{k} {_fmt(v['tokens_per_s'], 4)} tok/s, CUDA peak {_fmt(v['cuda_peak_gib'])} GiB, "
                            f"MFU {_fmt(v['mfu_vs_spec'])}")  # fmt: skip
            base = w["runs"].get("padded", {})
            for k in ("shared", "torchtune", "trl"):
                v = w["runs"].get(k, {})
                if base.get("tokens_per_s") and v.get("tokens_per_s"):
                    bits.append(f"{k}/padded {_fmt(v['tokens_per_s'] / base['tokens_per_s'])}x")
            parts.append(
                f"{workload} ({w['pairs']} pairs, {_fmt(w['positions']['real'])} real tokens/step): "
                + ", ".join(bits)
            )
        shape = r["shape"]
        return (
            f"{shape['layers']} layers x {shape['embed_dim']}, vocab {shape['vocab']}: "
            + "; ".join(parts)
        )
    return json.dumps(r)[:300]


def write_report(out: Path, records: Dict[str, Dict[str, Any]], dry: bool, started: float) -> None:
    lines = [
        "# GPU check" + (" (dry run: CPU, tiny sizes)" if dry else ""),
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {time.perf_counter() - started:.0f} s so far; "
        "`python benchmarks/gpu_check.py` (scripts/gpu_check.sh).",
        "",
        "| part | status | seconds | what it showed |",
        "|---|---|---:|---|",
    ]
    for name, _, _ in PARTS:
        rec = records.get(name)
        if rec is None:
            lines.append(f"| {name} | not run | | |")
            continue
        what = summary_line(name, rec) if rec["status"] == "ok" else rec.get("error", "")
        what = " ".join(str(what).split()).replace("|", "/")
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', 0):.0f} | {what} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(records, indent=1, default=str))


# ================================================================================ main


def child(a) -> None:
    a.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        result = PART_FUNCS[a.part](a)
        rec = {"status": "skipped" if "skipped" in result else "ok", "result": result}
    except Exception as err:  # noqa: BLE001 - reported in the table
        import traceback

        traceback.print_exc()
        rec = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    rec["seconds"] = time.perf_counter() - t
    (a.work / f"{a.part}.json").write_text(json.dumps(rec, default=str))
    sys.exit(0 if rec["status"] != "failed" else 1)


def driver(a) -> int:
    out = Path(a.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    wanted = [p.strip() for p in a.parts.split(",")] if a.parts else [p for p, _, _ in PARTS]
    records: Dict[str, Dict[str, Any]] = {}
    for name, gpu_timeout, dry_timeout in PARTS:
        if name not in wanted:
            continue
        timeout = dry_timeout if a.dry_run else gpu_timeout
        left = a.budget_s - (time.perf_counter() - started)
        if left < min(timeout, 30):
            records[name] = {"status": "skipped", "error": f"out of the {a.budget_s:.0f} s budget"}
            write_report(out, records, a.dry_run, started)
            continue
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if name in ("compile", "packed"):
            env["TORCH_LOGS"] = "recompiles"
            if a.dry_run:
                env.setdefault(
                    "TORCH_COMPILE_BACKEND", "aot_eager"
                )  # inductor's C++ build is minutes on CPU
        cmd = [sys.executable, __file__, "--part", name, "--work", str(work)] + (
            ["--dry-run"] if a.dry_run else []
        )
        log_path = out / f"{name}.log"
        t = time.perf_counter()
        print(f"[gpu_check] {name} (timeout {min(timeout, left):.0f} s) ...", flush=True)
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      timeout=min(timeout, left), cwd=REPO)  # fmt: skip
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        rec = _read_json(work / f"{name}.json")
        if rec is None:
            tail = " ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
            why = f"timed out after {min(timeout, left):.0f} s" if rc is None else f"exit {rc}"
            rec = {"status": "failed", "error": f"{why}: {tail}"}
        rec["seconds"] = time.perf_counter() - t
        if name in ("compile", "packed"):
            rec["recompiles"] = len(
                re.findall(r"Recompiling function", log_path.read_text(errors="replace"))
            )
        records[name] = rec
        write_report(out, records, a.dry_run, started)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']:.0f} s", flush=True)
    print((out / "gpu_check.md").read_text())
    return 1 if any(r["status"] == "failed" for r in records.values()) else 0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="/tmp/prefopt_gpu_check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only rows skipped")
    p.add_argument("--parts", default="", help="comma list (default: all)")
    p.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all parts")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.part:
        child(a)
    sys.exit(driver(a))


if __name__ == "__main__":
    main()
