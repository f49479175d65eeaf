"""Sampling speed of the real-model frontier: our generation (``compare.generation``'s decode
loop on our model with a KV cache) vs transformers' ``generate`` on the same prompts.

Not a test. The prompts are the frontier task's own ("Write a short positive review of
<product>.", rendered with the folder's chat template by the training pipeline), repeated to
``--samples``; every variant samples at temperature 1 (all tokens, no top-k / top-p), up to
``--max-new-tokens``, stopping a row at the tokenizer's stop tokens, ``--batch-size`` rows at a
time, fp32 on the CPU, in this process one after the other (weights loaded once per variant,
before the clock). Tokens/s counts generated tokens up to and including the stop token;
CPU seconds are this process's (``time.process_time``, all threads).

Variants
  ours         compare.generation.generate_completions, KV cache (what the task and the
               evaluation run)
  ours-nocache the same without the cache (every step re-reads the whole prefix)
  transformers AutoModelForCausalLM.generate(do_sample=True, temperature=1, top_k=0),
               left-padded with an attention mask, its own (dynamic) KV cache

Usage:
  python benchmarks/bench_sampling.py --model-dir /tmp/SmolLM2-135M-Instruct
  python benchmarks/bench_sampling.py --model-dir ... --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Dict, List

import torch
from _markdown import write_section  # benchmarks/ is the script's directory  # noqa: E402

SECTION = "## Sampling (the real-model frontier)"


def _prompts(model_dir: str, samples: int) -> List[List[int]]:
    from torchtune_prefopt.compare.controlled import ControlledSentimentTask, chat_prompt_ids
    from torchtune_prefopt.models.hf import hf_tokenizer

    task = ControlledSentimentTask(model_dir)
    texts = task.prompts("train")
    ids = chat_prompt_ids(hf_tokenizer(model_dir), texts)
    return [ids[i % len(ids)] for i in range(samples)]


def _count(completions: List[List[int]]) -> int:
    return sum(len(c) for c in completions)


def _clock(fn) -> Dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "wall": wall, "cpu": cpu}


def run_ours(model_dir: str, prompts, args, kv_cache: bool) -> Dict[str, float]:
    from torchtune_prefopt.compare.evaluation import hf_folder_eval_model
    from torchtune_prefopt.compare.generation import generate_completions
    from torchtune_prefopt.models.hf import hf_tokenizer

    tok = hf_tokenizer(model_dir)
    model = hf_folder_eval_model(model_dir, torch.device("cpu"), torch.float32)
    return _clock(
        lambda: _count(
            generate_completions(
                model,
                prompts,
                max_new_tokens=args.max_new_tokens,
                stop_tokens=list(tok.stop_tokens),
                pad_id=int(tok.pad_id),
                device=torch.device("cpu"),
                dtype=torch.float32,
                temperature=1.0,
                seed=0,
                batch_size=args.batch_size,
                kv_cache=kv_cache,
            )
        )
    )


def run_transformers(model_dir: str, prompts, args) -> Dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchtune_prefopt.models.hf import hf_tokenizer

    stop = list(hf_tokenizer(model_dir).stop_tokens)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else stop[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)

    def go() -> int:
        n = 0
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=stop,
                    pad_token_id=pad,
                )
            for row in out[:, width:].tolist():
                for j, t in enumerate(row):
                    if t in stop:
                        row = row[: j + 1]
                        break
                n += len(row)
        return n

    return _clock(go)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="ours,transformers", help="also: ours-nocache (slow)")
    ap.add_argument("--write", default=None, help="update this markdown file's section")
    args = ap.parse_args()
    prompts = _prompts(args.model_dir, args.samples)
    rows = {}
    for name in args.variants.split(","):
        if name == "transformers":
            rows[name] = run_transformers(args.model_dir, prompts, args)
        else:
            rows[name] = run_ours(args.model_dir, prompts, args, kv_cache=name == "ours")
        r = rows[name]
        print(
            f"{name}: {r['tokens']} tokens, {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU-s, "
            f"{r['tokens'] / r['wall']:.1f} tokens/s",
            flush=True,
        )
    best_peer = rows.get("transformers")
    lines = [
        f"`python benchmarks/bench_sampling.py --model-dir <SmolLM2-135M-Instruct> --samples "
        f"{args.samples} --batch-size {args.batch_size} --max-new-tokens {args.max_new_tokens}`"
        f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, fp32, temperature 1, the frontier task's prompts; "
        f"{len(prompts)} samples, mean prompt {sum(map(len, prompts)) / len(prompts):.0f} tokens)",
        "",
        "| variant | generated tokens | wall s | CPU s | tokens/s | vs transformers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ratio = (
            f"{(r['tokens'] / r['wall']) / (best_peer['tokens'] / best_peer['wall']):.2f}x"
            if best_peer
            else "-"
        )
        lines.append(
            f"| {name} | {r['tokens']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{r['tokens'] / r['wall']:.1f} | {ratio} |"
        )
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, SECTION, body, notes_marker="Reading:")


if __name__ == "__main__":
    main()
