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
  plus CPU time (``cpu_workers``: summed over torchrun's workers), RSS and, on a GPU, the CUDA peak) per training-step ``log_dict`` to a JSONL file, and after ``hold_after_step`` writes
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


def pair_items(
    prompt: List[int], chosen: List[int], rejected: List[int], index: int, unpaired: bool
) -> List[Dict]:
    """One pair as dataset items from ``index`` on: a paired row, or (``unpaired``) KTO's
    desirable row (prompt + chosen) then its undesirable one (prompt + rejected)."""
    if not unpaired:
        return [paired_row(prompt, chosen, rejected, index)]
    return [
        {"prompt_ids": prompt, "completion_ids": completion, "label": label, "index": index + k}
        for k, (completion, label) in enumerate(((chosen, True), (rejected, False)))
    ]


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
        items.extend(pair_items(prompt, chosen, rejected, len(items), unpaired))
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


def _workers_cpu() -> Optional[float]:
    """CPU seconds (user + system, all threads) of this process and its sibling workers under
    torchrun (the launcher's children), or None with one process: a step's CPU cost on N
    processes is the sum over them, which rank 0's own ``time.process_time()`` is not."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a worker that has exited
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


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
        # processes on a shared machine; cpu_workers: every torchrun worker's (N processes);
        # rss/hwm: diagnostics only
        rec = {
            "step": int(step),
            "t": t,
            "cpu": time.process_time(),
            "rss": _vm("VmRSS"),
            "hwm": _vm("VmHWM"),
            "cpu_workers": _workers_cpu(),
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
    chat_model_dir: Optional[str] = None,
    unpaired: bool = False,
) -> Dataset:
    """Preference pairs whose prompt / chosen / rejected lengths follow :data:`WORKLOADS`
    ``[workload]`` (chosen and rejected lengths drawn independently; every length times
    ``scale``); keys as :func:`synthetic_token_pairs`. ``stats["real_tokens"]``: tokens of
    every chosen + rejected sequence.

    Without ``chat_model_dir`` the tokens are random ids below ``vocab_size``. With it, the
    rows are conversations rendered with that Hugging Face folder's own chat template
    (``transformers``' ``apply_chat_template``): each message's content is English text (the
    bundled synthetic data's sentences, drawn at random) of at least the drawn number of
    tokens; the prompt is the template up to the assistant's turn (``add_generation_prompt``;
    SmolLM2's adds its default system prompt), a completion is the rest of the conversation
    (its end-of-turn tokens included). ``hh`` prompts are multi-turn (user, assistant, user:
    the drawn prompt length split in three), as hh-rlhf's are.

    ``unpaired=True``: KTO rows of the same conversations (keys as :func:`synthetic_token_pairs`
    gives them): each pair a desirable row (prompt + chosen) and an undesirable one (prompt +
    rejected), in that order."""
    spec = scaled_workload(workload, scale)
    rng = random.Random(seed)
    render = _chat_renderer(chat_model_dir, workload, rng) if chat_model_dir else None
    pad = int(getattr(tokenizer, "pad_id", 0))

    def draw(n: int) -> List[int]:
        out = []
        while len(out) < n:
            t = rng.randrange(1, vocab_size)
            if t != pad:
                out.append(t)
        return out

    items: List[Dict[str, Any]] = []
    for _ in range(num_pairs):
        if render is None:  # each length drawn just before its ids (the published rows)
            prompt, chosen, rejected = (
                draw(_draw_length(rng, spec[k])) for k in ("prompt", "completion", "completion")
            )
        else:
            lengths = [_draw_length(rng, spec[k]) for k in ("prompt", "completion", "completion")]
            prompt, chosen, rejected = render(*lengths)
        items.extend(pair_items(prompt, chosen, rejected, len(items), unpaired))
    if unpaired:
        real = sum(len(it["prompt_ids"]) + len(it["completion_ids"]) for it in items)
    else:
        real = sum(len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in items)
    stats = {"rows": len(items), "workload": workload, "real_tokens": real}
    if unpaired:
        stats.update(n_desirable=num_pairs, n_undesirable=num_pairs)
    if chat_model_dir:
        stats["chat_template"] = str(chat_model_dir)
    return _Rows(items, stats)


def _chat_renderer(model_dir: str, workload: str, rng: random.Random):
    """``render(prompt_len, chosen_len, rejected_len) -> (prompt, chosen, rejected)`` token ids
    of one conversation in ``model_dir``'s chat template (see :func:`workload_pairs`)."""
    from importlib import resources

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = resources.files("torchtune_prefopt.data") / "assets" / "synthetic" / "train.jsonl"
    sentences = sorted(
        {text for line in data.read_text().splitlines() for text in json.loads(line).values()
         if isinstance(text, str) and " " in text}
    )  # fmt: skip

    def text(n_tokens: int) -> str:
        words: List[str] = []
        while len(tok(" ".join(words), add_special_tokens=False).input_ids) < n_tokens:
            words.append(rng.choice(sentences))
        return " ".join(words)

    def ids(messages, generation_prompt: bool) -> List[int]:
        rendered = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return list(tok(rendered, add_special_tokens=False).input_ids)

    def render(prompt_len: int, chosen_len: int, rejected_len: int):
        if workload == "hh":
            third = max(1, prompt_len // 3)
            turns = [("user", third), ("assistant", third), ("user", prompt_len - 2 * third)]
        else:
            turns = [("user", prompt_len)]
        messages = [{"role": role, "content": text(n)} for role, n in turns]
        prompt = ids(messages, True)
        completions = []
        for n in (chosen_len, rejected_len):
            full = ids(messages + [{"role": "assistant", "content": text(n)}], False)
            if full[: len(prompt)] != prompt:
                raise ValueError(f"{model_dir}: the chat template's prompt is not a prefix")
            completions.append(full[len(prompt) :])
        return prompt, completions[0], completions[1]

    return render


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
        chat_model_dir=cfg.get("chat_model_dir"),
    )


def peer_clock(cfg: Mapping[str, Any]) -> "StepClockLogger":
    """The step clock of a peer script's run: the clock file and hold of its JSON config."""
    return StepClockLogger(
        log_dir=os.path.dirname(cfg["clock_file"]),
        clock_file=cfg["clock_file"],
        hold_after_step=cfg["hold_after_step"],
        hold_s=cfg.get("hold_s", 120),
    )
