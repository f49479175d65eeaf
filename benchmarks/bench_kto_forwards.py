"""KTO's reference forward in the padded layout: rows and KL rows in two forwards (``[B, S]``
each, what ``UnpairedBatch.logps`` does) or stacked into one (``[2B, S]``).

Not a test. In this process, under ``torch.no_grad`` (the reference), the body-heavy random
model of the real-shape benchmarks (llama3 builder, vocab 16384, 16 layers, dim 256, 4/2
heads, MLP 1024), ``B`` rows of prompt ``P`` + completion ``C`` tokens and ``B`` KL rows of the
same shape, scored by the library's own log-prob path (``decoder_sequence_logprobs``). The two
variants alternate (ABBA) over ``--rounds``; wall and CPU seconds, medians.

  python benchmarks/bench_kto_forwards.py [--rows 4 --prompt 256 --completion 256 --rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--completion", type=int, default=256)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    from torchtune.models.llama3._component_builders import llama3

    from torchtune_prefopt.modules import decoder_sequence_logprobs

    torch.manual_seed(0)
    model = llama3(
        vocab_size=16384, num_layers=16, num_heads=4, num_kv_heads=2, embed_dim=256,
        intermediate_dim=1024, max_seq_len=2048,
    ).eval()  # fmt: skip
    seq = a.prompt + a.completion

    def rows():
        ids = torch.randint(0, 16384, (a.rows, seq))
        labels = ids.clone()
        labels[:, : a.prompt] = -100
        return ids, labels

    (ids, labels), (kl_ids, kl_labels) = rows(), rows()

    def two():
        decoder_sequence_logprobs(model, ids, labels)
        decoder_sequence_logprobs(model, kl_ids, kl_labels)

    def one():
        decoder_sequence_logprobs(model, torch.cat([ids, kl_ids]), torch.cat([labels, kl_labels]))

    seen = {"two forwards [B, S]": [], "one forward [2B, S]": []}
    variants = list(zip(seen, (two, one)))
    with torch.no_grad():
        two(), one()  # warm-up
        for r in range(a.rounds):
            for name, fn in variants if r % 2 == 0 else variants[::-1]:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                seen[name].append((time.perf_counter() - t0, time.process_time() - c0))
    print(f"B={a.rows} rows + {a.rows} KL rows of {a.prompt} + {a.completion} tokens, no grad")
    print("| reference forward | wall s | CPU s |")
    print("|---|---:|---:|")
    for name, times in seen.items():
        wall = statistics.median(t for t, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
