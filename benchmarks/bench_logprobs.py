"""Peak memory and time: full-logits log-probs vs torchtune_prefopt's chunked sequence_logprobs.

Not a test. Each (variant, scenario) runs forward + backward in a *fresh subprocess*; peak
memory is that process's ``ru_maxrss`` high-water mark after the run minus the mark taken just
before it (inputs, weight and imports already resident), so it is the extra memory the
log-prob computation needs, including the [V, D] weight gradient that both variants produce.

Variants
  full     logits = F.linear(h, W) -> .float() -> rlhf.get_batch_log_probs (torchtune), sum
  fused    sequence_logprobs(h, W, labels, chunk_size=C): the path nn.Linear / TiedLinear /
           weight tensors take (one autograd.Function, weight grad accumulated in place)
  generic  sequence_logprobs(h, lambda x: F.linear(x, W), ...): the path any other callable
           takes (LoRA output, FSDP-wrapped output): per-chunk checkpoint

Scenarios (labels unshifted, -100 = not scored)
  completion  the last half of each row is the completion (a DPO-style prompt + answer)
  all         every position is labelled (isolates the chunking; no prompt skipping)

Usage:
  python benchmarks/bench_logprobs.py                  # print the Markdown table
  python benchmarks/bench_logprobs.py --write BENCHMARKS.md   # also update that file's section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from _markdown import write_section  # benchmarks/ is the script's directory  # noqa: E402

SECTION = "## Sequence log-probs"

NOTES = """\
Reading the table:

- *full* keeps several `[B, S, V]` fp32 tensors (logits, log-softmax, their gradients) whatever
  the labels; *ours* projects only the scored tokens, `chunk_size` at a time, and recomputes
  the logits in backward, so its peak is the `[V, D]` weight gradient plus about one fp32
  `[C, V]` buffer (fused) -- independent of batch and sequence length.
- The *generic* path lets autograd sum the per-chunk weight gradients, which briefly needs a
  second `[V, D]` buffer once there is more than one chunk and the output weight is trainable
  (hence ~2x the weight gradient);
  the *fused* path accumulates in place. `nn.Linear`, `TiedLinear` and weight tensors use the
  fused path; LoRA-on-output and an FSDP-wrapped output module use the generic one.
- Time: *ours* does one extra `[N, D] x [D, V]` matmul (the backward recompute) but skips
  prompt/padding positions; with half the tokens scored it is about 2x cheaper, with every
  token scored it costs about the same to 1.4x (smaller chunks cost more). The differences
  in the sums are fp32 summation order over 256-511 tokens per row (sums ~ -3e3 to -6e3).
"""


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, a.dtype)

    def make_inputs(batch, seq, dim, vocab):
        # filled in place: no temporaries that would raise the high-water mark early
        torch.manual_seed(0)
        hidden = torch.empty(batch, seq, dim, dtype=dtype).normal_().requires_grad_()
        weight = torch.empty(vocab, dim, dtype=dtype).normal_(std=dim**-0.5).requires_grad_()
        labels = torch.randint(0, vocab, (batch, seq))
        if a.scenario == "completion":
            labels[:, : seq // 2] = -100
        return hidden, weight, labels

    if a.variant == "full":
        from torchtune import rlhf

        def step(hidden, weight, labels):
            logits = F.linear(hidden, weight).float()  # [B, S, V], as TransformerDecoder.unembed
            out = rlhf.get_batch_log_probs(logits, labels)
            out.sum().backward()
            return out.detach()

    else:
        from torchtune_prefopt.modules import sequence_logprobs

        def step(hidden, weight, labels):
            proj = weight if a.variant == "fused" else (lambda x: F.linear(x, weight))
            out = sequence_logprobs(hidden, proj, labels, chunk_size=a.chunk_size).sum
            out.sum().backward()
            return out.detach()

    # warm-up on a tiny problem: lazy imports, thread pools, autograd engine threads are
    # resident before the baseline mark is taken
    step(*make_inputs(1, 16, 8, 32))
    hidden, weight, labels = make_inputs(a.batch, a.seq, a.dim, a.vocab)

    times, cpu_times = [], []
    before = _maxrss_mib()
    slack = before - _rss_mib()
    if slack > 32:
        print(
            f"warning: high-water mark already {slack:.0f} MiB above current RSS", file=sys.stderr
        )
    for _ in range(a.iters):
        hidden.grad = None
        weight.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        result = step(hidden, weight, labels)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _maxrss_mib() - before
    print(
        "RESULT "
        + json.dumps(
            {
                "peak_mib": peak,
                "time_s": min(times[1:] or times),
                "cpu_s": min(cpu_times[1:] or cpu_times),
                "sums": result.double().tolist(),
                "tokens": int((labels[:, 1:] != -100).sum()),
            }
        ),
        flush=True,
    )


def run_child(a: argparse.Namespace, variant: str, scenario: str, chunk: int) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child",
        "--variant", variant, "--scenario", scenario, "--chunk-size", str(chunk),
        "--batch", str(a.batch), "--seq", str(a.seq), "--dim", str(a.dim),
        "--vocab", str(a.vocab), "--dtype", a.dtype, "--iters", str(a.iters),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}/{scenario} failed:\n{proc.stdout}\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)  # Llama 3
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunk-sizes", default="1024,256", help="fused path: chunk sizes to run")
    p.add_argument("--generic-chunk-sizes", default="256", help="generic path: chunk sizes")
    p.add_argument("--scenarios", default="completion,all")
    p.add_argument(
        "--iters", type=int, default=1,
        help="full-size steps per process; time = min over steps after the first (if > 1)",
    )  # fmt: skip
    p.add_argument("--write", metavar="MARKDOWN", help="update the '## Sequence log-probs' section")
    # child-only
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    runs = [("fused", int(c)) for c in a.chunk_sizes.split(",") if c] + [
        ("generic", int(c)) for c in a.generic_chunk_sizes.split(",") if c
    ]
    rows = []
    for scenario in a.scenarios.split(","):
        full = run_child(a, "full", scenario, 0)
        print(
            f"[{scenario}] full: {full['peak_mib']:.0f} MiB, {full['cpu_s']:.2f} cpu-s",
            file=sys.stderr,
        )
        for variant, c in runs:
            ours = run_child(a, variant, scenario, c)
            diff = max(abs(x - y) for x, y in zip(ours["sums"], full["sums"]))
            print(f"[{scenario}] {variant} c={c}: {ours['peak_mib']:.0f} MiB, {ours['cpu_s']:.2f} cpu-s, "
                  f"max |sum diff| {diff:.2e}", file=sys.stderr)  # fmt: skip
            rows.append((scenario, full, variant, c, ours, diff))

    import torch

    cmd = "python " + " ".join(["benchmarks/bench_logprobs.py", *sys.argv[1:]])
    head = (
        f"Forward + backward of per-sequence log-probs, B={a.batch}, S={a.seq}, D={a.dim}, "
        f"V={a.vocab}, {a.dtype}; `{platform.processor() or platform.machine()}`, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `{cmd}`.\n\n"
        "Peak = extra resident memory of the step (`ru_maxrss` high-water mark in a fresh "
        "subprocess per row, minus the mark before the step; includes the [V, D] fp32 "
        "weight gradient, "
        f"{a.vocab * a.dim * 4 / 2**20:.0f} MiB, in both columns). Time = one full-size "
        f"forward+backward (min over {max(a.iters - 1, 1)} step(s)"
        f"{' after a full-size warm-up' if a.iters > 1 else ''}; each process first runs a "
        "tiny warm-up step) as process CPU seconds (all threads; `time.process_time`), the "
        "fairer number on a machine shared with other jobs, and as wall-clock seconds. *full* = `F.linear -> .float() -> rlhf.get_batch_log_probs`; "
        "*ours* = `sequence_logprobs(chunk_size=C)`, *fused* path (what `nn.Linear`, "
        "`TiedLinear` and weight tensors take) or *generic* path (any other callable: LoRA or "
        "FSDP-wrapped output; per-chunk checkpoint). *completion*: last half of each row "
        "labelled; *all*: every position labelled.\n\n"
    )
    table = [
        "| labels | scored tokens | ours path | chunk C | full peak MiB | ours peak MiB | memory full/ours | "
        "full CPU s | ours CPU s | CPU time ours/full | full wall s | ours wall s | "
        "max abs diff of sums |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, full, variant, c, ours, diff in rows:
        table.append(
            f"| {scenario} | {ours['tokens']} | {variant} | {c} | {full['peak_mib']:.0f} | {ours['peak_mib']:.0f} | "
            f"{full['peak_mib'] / max(ours['peak_mib'], 1e-9):.1f}x | {full['cpu_s']:.1f} | "
            f"{ours['cpu_s']:.1f} | {ours['cpu_s'] / full['cpu_s']:.2f} | {full['time_s']:.1f} | "
            f"{ours['time_s']:.1f} | {diff:.1e} |"
        )
    body = head + "\n".join(table) + "\n\n" + NOTES
    print(body)
    if a.write:
        write_section(a.write, SECTION, body)


if __name__ == "__main__":
    main()
