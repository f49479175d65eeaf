"""Per-document attention on CPU: SDPA on 3-D ``[H, d, hd]`` document slices (the packed
layout's call before 2026-12-04) against 4-D ``[1, H, d, hd]`` ones (today's).

Not a test. ``torch.nn.functional.scaled_dot_product_attention`` takes its fused CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``) only for 4-D inputs; 3-D ones go to the math
path, which materialises ``[H, d, d]`` scores and keeps their softmax for backward. Forward +
backward of one layer's attention over the documents of a full-length UltraFeedback-shaped
packed step (``bench_packing.py``'s body-heavy model: 4 heads of 64), causal documents and
tree-masked (shared-prompt) ones, ABBA over ``--rounds``; wall and CPU time, and the kernel
each call dispatched to (``torch.profiler``).

  python benchmarks/bench_packed_attention.py [--rounds 3] [--docs 1963,903,1798,1505]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile


def run(docs, heads: int, head_dim: int, masked: bool, four_d: bool) -> None:
    for d in docs:
        shape = (1, heads, d, head_dim) if four_d else (heads, d, head_dim)
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        if masked:
            mask = torch.ones(d, d, dtype=torch.bool).tril()  # a tree mask's shape and kernel
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()


def kernel(masked: bool, four_d: bool) -> str:
    with profile() as prof:
        run([64], 2, 8, masked, four_d)
    names = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot")]
    return min(names, key=len) if names else "?"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--docs", default="1963,903,1798,1505")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args()
    docs = [int(x) for x in a.docs.split(",")]
    torch.manual_seed(0)
    print(f"documents {docs}, {a.heads} heads of {a.head_dim}, threads {torch.get_num_threads()}")
    print("| documents | slices | kernel | wall s | CPU s | 3-D / 4-D (wall) |")
    print("|---|---|---|---:|---:|---:|")
    for masked in (False, True):
        times = {False: [], True: []}
        run(docs[:1], a.heads, a.head_dim, masked, True)  # warm-up
        for r in range(a.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)  # ABBA
            for four_d in order:
                t, c = time.perf_counter(), time.process_time()
                run(docs, a.heads, a.head_dim, masked, four_d)
                times[four_d].append((time.perf_counter() - t, time.process_time() - c))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        for four_d in (False, True):
            w, c = med[four_d]
            ratio = f"{med[False][0] / med[True][0]:.2f}x" if four_d else ""
            print(
                f"| {'tree-masked' if masked else 'causal'} | {'4-D' if four_d else '3-D'} | "
                f"`{kernel(masked, four_d)}` | {w:.2f} | {c:.2f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
