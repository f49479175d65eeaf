"""Components shared by torchtune's ``full_dpo_distributed`` and our recipe in
``benchmarks/bench_vs_torchtune.py``: both recipes instantiate them from their configs
(``benchmarks/`` is put on ``PYTHONPATH``), so both see the same rows, the same padding and
the same step clock.

* :class:`PadOnlyTokenizer`: both recipes only read ``tokenizer.pad_id`` (ours also
  ``max_seq_len`` for KTO's KL rows, and ``encode`` to fingerprint the reference log-prob
  cache); the data below is already token ids.
* :func:`synthetic_token_pairs`: deterministic random token-id rows, every row exactly
  ``seq_len`` tokens (so padded tokens = real tokens, identical for every recipe), the first
  ``prompt_len`` positions are the prompt (label -100). Paired rows carry torchtune's keys
  (``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``) plus
  ``index`` (ours); ``unpaired=True`` gives KTO rows (``prompt_ids``, ``completion_ids``,
  ``label``, ``index``): each pair becomes a desirable and an undesirable row.
* :class:`StepClockLogger`: a metric logger that appends ``{"step", "t"}`` (monotonic clock,
  plus CPU time, RSS and, on a GPU, the CUDA peak) per training-step ``log_dict`` to a JSONL file, and after ``hold_after_step`` writes
  ``{"hold": true}`` and sleeps so the harness can read the process's memory high-water mark
  from outside and stop it before the end-of-training checkpoint (which neither step needs).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Dict, List, Mapping, Optional

from torch.utils.data import Dataset


class PadOnlyTokenizer:
    """Stand-in tokenizer: the rows are token ids already; recipes need ``pad_id``."""

    def __init__(self, pad_id: int = 0, max_seq_len: Optional[int] = None) -> None:
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """UTF-8 bytes as ids (only used to fingerprint the tokenizer, e.g. by the reference
        log-prob cache; the benchmark rows are token ids already)."""
        return list(text.encode("utf-8"))


class _Rows(Dataset):
    def __init__(self, items: List[Dict[str, Any]], stats: Dict[str, int]) -> None:
        self._items = items
        self.stats = stats

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self._items[i]


def paired_row(prompt: List[int], chosen: List[int], rejected: List[int], index: int) -> Dict:
    """A paired row in the keys both recipes read (labels -100 on the prompt)."""
    ignore = [-100] * len(prompt)
    return {
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": ignore + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": ignore + rejected,
        "index": index,
    }


def synthetic_token_pairs(
    tokenizer: Any,
    num_pairs: int = 64,
    seq_len: int = 512,
    prompt_len: Optional[int] = None,
    vocab_size: int = 128256,
    seed: int = 0,
    unpaired: bool = False,
) -> Dataset:
    """Random token-id preference rows of exactly ``seq_len`` tokens (see module docstring)."""
    if prompt_len is None:
        prompt_len = seq_len // 2
    if not 0 < prompt_len < seq_len:
        raise ValueError(
            f"prompt_len must be in (0, seq_len), got {prompt_len} (seq_len {seq_len})"
        )
    pad = int(getattr(tokenizer, "pad_id", 0))
    rng = random.Random(seed)
    lo = 1 if pad == 0 else 0

    def draw(n: int) -> List[int]:
        out = []
        while len(out) < n:
            t = rng.randrange(lo, vocab_size)
            if t != pad:
                out.append(t)
        return out

    comp_len = seq_len - prompt_len
    items: List[Dict[str, Any]] = []
    for _ in range(num_pairs):
        prompt, chosen, rejected = draw(prompt_len), draw(comp_len), draw(comp_len)
        if unpaired:
            for completion, label in ((chosen, True), (rejected, False)):
                items.append(
                    {
                        "prompt_ids": prompt,
                        "completion_ids": completion,
                        "label": label,
                        "index": len(items),
                    }
                )
        else:
            items.append(paired_row(prompt, chosen, rejected, len(items)))
    stats = {"rows": len(items), "seq_len": seq_len, "prompt_len": prompt_len}
    if unpaired:
        stats.update(n_desirable=num_pairs, n_undesirable=num_pairs)
    return _Rows(items, stats)


def _vm(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cuda_peak() -> Optional[int]:
    """Peak CUDA memory allocated by this process so far (bytes), if it uses CUDA."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


class StepClockLogger:
    """Metric logger (torchtune ``MetricLoggerInterface`` duck type) that timestamps steps."""

    def __init__(
        self,
        log_dir: str,
        clock_file: Optional[str] = None,
        hold_after_step: Optional[int] = None,
        hold_s: float = 0.0,
        **kwargs: Any,
    ) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self._path = clock_file or os.path.join(log_dir, "step_clock.jsonl")
        self._file = open(self._path, "a")
        self._hold_after = hold_after_step
        self._hold_s = float(hold_s)

    def _write(self, obj: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def log_config(self, config: Any) -> None:
        pass

    def log(self, name: str, data: Any, step: int) -> None:
        pass

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        t = time.monotonic()
        if "loss" not in payload:  # eval dicts etc.: not a training step
            return
        # t: wall clock; cpu: this process's CPU time (all threads), less sensitive to other
        # processes on a shared machine; rss/hwm: diagnostics only
        rec = {
            "step": int(step),
            "t": t,
            "cpu": time.process_time(),
            "rss": _vm("VmRSS"),
            "hwm": _vm("VmHWM"),
        }
        try:
            rec["loss"] = float(payload["loss"])
        except (TypeError, ValueError):
            pass
        rec["cuda_peak"] = _cuda_peak()
        self._write(rec)
        if self._hold_after is not None and step >= self._hold_after:
            self._write({"hold": True, "t": time.monotonic()})
            deadline = time.monotonic() + self._hold_s
            while time.monotonic() < deadline:
                time.sleep(0.05)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


#: Length distributions of the packing benchmark (tokens): ``(prompt, completion)`` samplers.
#: ``fixed``: today's benchmark rows; ``ultrafeedback``: UltraFeedback-binarized-shaped
#: (lognormal, prompt median 150, each completion median 250); ``hh``: hh-rlhf-shaped
#: multi-turn (long prompts 200-400, short completions 60-100).
WORKLOADS = {
    "fixed": {"pairs": 2, "prompt": ("const", 256), "completion": ("const", 256)},
    "ultrafeedback": {
        "pairs": 8,
        "prompt": ("lognormal", 150, 0.7, 16, 1024),
        "completion": ("lognormal", 250, 0.7, 8, 1024),
    },
    "hh": {"pairs": 8, "prompt": ("uniform", 200, 400), "completion": ("uniform", 60, 100)},
}


def _draw_length(rng: random.Random, spec) -> int:
    kind = spec[0]
    if kind == "const":
        return int(spec[1])
    if kind == "uniform":
        return rng.randint(int(spec[1]), int(spec[2]))
    if kind == "lognormal":
        median, sigma, lo, hi = spec[1:]
        return int(min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))))
    raise ValueError(f"unknown length distribution {spec!r}")


def scaled_workload(workload: str, scale: float = 1.0) -> Dict[str, Any]:
    """``WORKLOADS[workload]`` with every length multiplied by ``scale`` (GPU-sized rows)."""
    spec = dict(WORKLOADS[workload])
    if scale == 1:
        return spec
    for key in ("prompt", "completion"):
        kind, *vals = spec[key]
        if kind == "lognormal":
            vals = [vals[0] * scale, vals[1], max(1, int(vals[2] * scale)), int(vals[3] * scale)]
        else:
            vals = [max(1, int(v * scale)) for v in vals]
        spec[key] = (kind, *vals)
    return spec


def workload_pairs(
    tokenizer: Any,
    workload: str = "ultrafeedback",
    num_pairs: int = 64,
    vocab_size: int = 128256,
    seed: int = 0,
    scale: float = 1.0,
) -> Dataset:
    """Random token-id preference pairs whose prompt / chosen / rejected lengths follow
    :data:`WORKLOADS` ``[workload]`` (chosen and rejected lengths drawn independently; every
    length times ``scale``); keys as :func:`synthetic_token_pairs`. ``stats["real_tokens"]``:
    tokens of every chosen + rejected sequence."""
    spec = scaled_workload(workload, scale)
    pad = int(getattr(tokenizer, "pad_id", 0))
    rng = random.Random(seed)

    def draw(n: int) -> List[int]:
        out = []
        while len(out) < n:
            t = rng.randrange(1, vocab_size)
            if t != pad:
                out.append(t)
        return out

    items: List[Dict[str, Any]] = []
    for _ in range(num_pairs):
        prompt = draw(_draw_length(rng, spec["prompt"]))
        chosen = draw(_draw_length(rng, spec["completion"]))
        rejected = draw(_draw_length(rng, spec["completion"]))
        items.append(paired_row(prompt, chosen, rejected, len(items)))
    real = sum(len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in items)
    return _Rows(items, {"rows": len(items), "workload": workload, "real_tokens": real})


# --------------------------------------------------------------------------- peer scripts
def peer_rows(cfg: Mapping[str, Any]):
    """The rows of a peer script's run (``_trl_dpo.py``, ``_plain_dpo.py``): its JSON config's
    workload, as :func:`workload_pairs` gives them to our recipe."""
    return workload_pairs(
        None,
        cfg["workload"],
        cfg["num_pairs"],
        vocab_size=cfg["vocab"],
        seed=cfg["seed"],
        scale=cfg.get("scale", 1.0),
    )


def peer_clock(cfg: Mapping[str, Any]) -> "StepClockLogger":
    """The step clock of a peer script's run: the clock file and hold of its JSON config."""
    return StepClockLogger(
        log_dir=os.path.dirname(cfg["clock_file"]),
        clock_file=cfg["clock_file"],
        hold_after_step=cfg["hold_after_step"],
        hold_s=cfg.get("hold_s", 120),
    )
