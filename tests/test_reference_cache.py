"""Cached reference log-probs: fingerprint, safetensors cache, precompute (1 and 2 processes).

The 2-process test launches this file as a worker script (two plain subprocesses joined by a
gloo file store); rank 0 writes the results, which must equal the 1-process results bitwise.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

N_PAIRS = 10
PAIRED_BS = 3
KTO_BS = 4
KTO_GLOBAL_BATCH = 4
KTO_EPOCHS = 2
SEED = 3


# --------------------------------------------------------------------------- shared builders


def _build(data_dir: Path):
    """Tiny model (seeded random init), tokenizer, paired and KTO datasets from a jsonl."""
    from torchtune_prefopt.data import preference_dataset, synthetic_data_file, unpaired_from_paired
    from torchtune_prefopt.models.tiny import tiny_qwen2, tiny_tokenizer

    src = data_dir / "pairs.jsonl"
    if not src.exists():
        lines = synthetic_data_file("train").read_text().splitlines()[:N_PAIRS]
        tmp = data_dir / f".pairs.{os.getpid()}"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, src)
    tok = tiny_tokenizer(max_seq_len=64)
    paired = preference_dataset(tok, source="json", data_files=str(src))
    kto = unpaired_from_paired(tok, source="json", data_files=str(src))
    torch.manual_seed(0)
    model = tiny_qwen2().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, paired, kto


def _collates(tok):
    from torchtune_prefopt.data import PreferenceCollator

    return (
        PreferenceCollator(paired=True, pad_id=tok.pad_id),
        PreferenceCollator(paired=False, pad_id=tok.pad_id, max_seq_len=tok.max_seq_len),
    )


def _kl_pairs(n_rows: int):
    from torchtune_prefopt.reference.precompute import kto_kl_pairs
    from torchtune_prefopt.training.data_order import GlobalBatchSampler

    sampler = GlobalBatchSampler(n_rows, KTO_GLOBAL_BATCH, seed=SEED, shuffle=True)
    return sampler, kto_kl_pairs(sampler, KTO_EPOCHS)


def _precompute_all(model, tok, paired, kto, world_size=1, rank=0):
    from torchtune_prefopt.reference.precompute import PrecomputeJob, precompute_reference_logps

    pc, kc = _collates(tok)
    _, pairs = _kl_pairs(len(kto))
    out_p = precompute_reference_logps(
        model, PrecomputeJob(paired, pc, PAIRED_BS, world_size, rank, "cpu"), chunk_size=16
    )
    out_k = precompute_reference_logps(
        model,
        PrecomputeJob(kto, kc, KTO_BS, world_size, rank, "cpu", kl_pairs=pairs),
        chunk_size=16,
    )
    return out_p, out_k


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("refcache")
    model, tok, paired, kto = _build(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the 1-thread workers of the 2-process test
    try:
        out_p, out_k = _precompute_all(model, tok, paired, kto)
    finally:
        torch.set_num_threads(threads)
    return dict(dir=d, model=model, tok=tok, paired=paired, kto=kto, out_p=out_p, out_k=out_k)


@pytest.fixture
def weight_files(tmp_path, env):
    from safetensors.torch import save_file

    sd = env["model"].state_dict()
    keys = sorted(sd)
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(
        {k: sd[k].contiguous() for k in keys[: len(keys) // 2]},
        str(d / "model-00001-of-00002.safetensors"),
    )
    save_file(
        {k: sd[k].contiguous() for k in keys[len(keys) // 2 :]},
        str(d / "model-00002-of-00002.safetensors"),
    )
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    return d


def _flip_data_byte(path: Path, keep_mtime: bool = True) -> None:
    """Change one byte of tensor data (same size; the safetensors header is untouched)."""
    st = path.stat()
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        off = 8 + n + 17
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_changes_with_every_input(env, weight_files, tmp_path):
    from torchtune_prefopt.reference.fingerprint import reference_fingerprint

    paired, tok = env["paired"], env["tok"]
    rows = [paired[i] for i in range(len(paired))]
    fp = partial(reference_fingerprint, weights_hash="content")
    base = fp(weight_files, rows, tok, 64, {"dtype": "fp32"}, quantization=None)
    assert base == fp(
        weight_files, [dict(r) for r in rows], tok, 64, {"dtype": "fp32"}, quantization=None
    )
    assert len(base) == 64 and int(base, 16) >= 0

    # one token of one row
    rows2 = [dict(r) for r in rows]
    rows2[5]["rejected_input_ids"] = list(rows2[5]["rejected_input_ids"])
    rows2[5]["rejected_input_ids"][-2] += 1
    assert fp(weight_files, rows2, tok, 64, {"dtype": "fp32"}) != base
    # the labels (which tokens are scored) too
    rows3 = [dict(r) for r in rows]
    labels = list(rows3[0]["chosen_labels"])
    labels[next(i for i, x in enumerate(labels) if x != -100)] = -100
    rows3[0]["chosen_labels"] = labels
    assert fp(weight_files, rows3, tok, 64, {"dtype": "fp32"}) != base
    # row order
    assert fp(weight_files, rows[::-1], tok, 64, {"dtype": "fp32"}) != base
    # tokenizer
    tok2 = copy.copy(tok)
    tok2.pad_id = tok.pad_id + 1
    assert fp(weight_files, rows, tok2, 64, {"dtype": "fp32"}) != base
    # max_seq_len, quantization, extra
    assert fp(weight_files, rows, tok, 128, {"dtype": "fp32"}) != base
    assert fp(weight_files, rows, tok, 64, {"dtype": "fp32"}, quantization="int8") != base
    assert fp(weight_files, rows, tok, 64, {"dtype": "bf16"}) != base
    # weights: one byte of tensor data, same size and mtime
    _flip_data_byte(weight_files / "model-00002-of-00002.safetensors")
    assert fp(weight_files, rows, tok, 64, {"dtype": "fp32"}) != base


def test_weights_hash_modes_and_memo(env, weight_files, tmp_path):
    from torchtune_prefopt.reference.fingerprint import hash_weights

    f = weight_files / "model-00001-of-00002.safetensors"
    memo = tmp_path / "memo.json"
    c0 = hash_weights(weight_files)
    h0 = hash_weights(weight_files, mode="header")
    assert hash_weights(weight_files, digest_memo=memo) == c0 and memo.is_file()
    assert hash_weights(weight_files, digest_memo=memo) == c0  # from the memo
    # a moved copy hashes the same (names + content, not directories)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for p in weight_files.iterdir():
        (copy_dir / p.name).write_bytes(p.read_bytes())
    assert hash_weights(copy_dir) == c0
    # the trade-off: a same-size content change with the mtime restored fools "header"
    time.sleep(0.01)
    _flip_data_byte(f, keep_mtime=True)
    assert hash_weights(weight_files, mode="header") == h0
    c1 = hash_weights(weight_files)
    assert c1 != c0
    # ... but not the memo: the write changed the file's ctime
    assert hash_weights(weight_files, digest_memo=memo) == c1
    # a state dict input: content-exact too
    sd = {k: v.clone() for k, v in env["model"].state_dict().items()}
    s0 = hash_weights(sd)
    sd["output.weight"][3, 4] += 1e-3
    assert hash_weights(sd) != s0


def test_tokenizer_files_hash(tmp_path):
    from torchtune_prefopt.models.tiny import ASSETS_DIR, TOKENIZER_FILES
    from torchtune_prefopt.reference.fingerprint import hash_tokenizer

    files = []
    for name in TOKENIZER_FILES:
        (tmp_path / name).write_bytes((ASSETS_DIR / name).read_bytes())
        files.append(tmp_path / name)
    h0 = hash_tokenizer(files)
    with open(files[1], "ab") as fh:
        fh.write(b"\n")
    assert hash_tokenizer(files) != h0


# --------------------------------------------------------------------------- cache file


def _parts(**changes):
    parts = {
        "format": "1",
        "weights": "content:aa",
        "dataset": "bb",
        "tokenizer": "cc",
        "max_seq_len": "64",
        "quantization": "None",
    }
    parts.update(changes)
    return parts


def test_cache_round_trip_exact(env, tmp_path):
    from torchtune_prefopt.reference.store import ReferenceCacheFile

    for tensors in (env["out_p"], env["out_k"]):
        cache = ReferenceCacheFile(tmp_path / "c", parts=_parts())
        cache.save(tensors)
        assert cache.exists()
        assert [p.name for p in (tmp_path / "c").iterdir()] == [
            "reference_logps.safetensors"
        ]  # no temp left
        back = ReferenceCacheFile(tmp_path / "c", parts=_parts()).load(strict=True)
        assert set(back) == set(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_stale_cache_is_rejected(env, tmp_path, caplog):
    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.reference.store import ReferenceCacheFile

    ReferenceCacheFile(tmp_path, parts=_parts()).save(env["out_p"])
    stale = ReferenceCacheFile(tmp_path, parts=_parts(dataset="zz", max_seq_len="128"))
    with caplog.at_level(logging.WARNING):
        assert stale.load() is None
    assert "is stale (changed since it was written: dataset, max_seq_len)" in stale.last_reason
    assert str(stale.path) in caplog.text and "recomputing" in caplog.text
    with pytest.raises(PrefOptUserError, match="stale"):
        stale.load(strict=True)
    # a bare fingerprint (no parts) still refuses, with the fingerprints in the message
    other = ReferenceCacheFile(tmp_path, fingerprint="f" * 64)
    assert other.load() is None and "written for other inputs" in other.last_reason
    # recompute path: load_or_compute calls compute and overwrites the stale file
    calls = []
    got = stale.load_or_compute(lambda: calls.append(1) or env["out_p"])
    assert calls == [1] and got is env["out_p"]
    assert stale.load(strict=True) is not None


def test_corrupted_cache(env, tmp_path):
    from torchtune_prefopt.errors import PrefOptUserError
    from torchtune_prefopt.reference.store import ReferenceCacheFile

    cache = ReferenceCacheFile(tmp_path, parts=_parts())
    path = cache.save(env["out_k"])
    data = path.read_bytes()
    # 1) truncated: unparseable
    path.write_bytes(data[: len(data) - 40])
    assert (
        cache.load() is None
        and "is damaged" in cache.last_reason
        and str(path) in cache.last_reason
    )
    with pytest.raises(PrefOptUserError, match=f"{path}.*damaged"):
        cache.load(strict=True)
    # 2) one flipped bit in the tensor data: parses, but the content hash catches it
    path.write_bytes(data)
    _flip_data_byte(path)
    assert cache.load() is None and "do not match the content hash" in cache.last_reason
    # 3) garbage
    path.write_bytes(b"\x00" * 7)
    assert cache.load() is None and "is damaged" in cache.last_reason
    # missing: not an error, None
    path.unlink()
    assert cache.load(strict=True) is None


# --------------------------------------------------------------------------- precompute


def test_precompute_equals_live_paired(env):
    """The recipe's live path (GlobalBatchSampler -> paired_collate -> decoder_sequence_logprobs)
    gives exactly the cached numbers when the batch is the same; in other batches (other
    padding widths) within float rounding."""
    from torchtune_prefopt.data import paired_collate
    from torchtune_prefopt.modules import decoder_sequence_logprobs
    from torchtune_prefopt.reference.precompute import ReferenceLogpsTable
    from torchtune_prefopt.training.data_order import GlobalBatchSampler

    model, tok, ds = env["model"], env["tok"], env["paired"]
    cached = ReferenceLogpsTable(env["out_p"])
    assert len(cached) == len(ds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # same batches as the precompute: bitwise equal
        for lo in range(0, len(ds), PAIRED_BS):
            idx = list(range(lo, min(lo + PAIRED_BS, len(ds))))
            b = paired_collate([ds[i] for i in idx], padding_idx=tok.pad_id)
            with torch.no_grad():
                live = decoder_sequence_logprobs(model, b["input_ids"], b["labels"], chunk_size=16)
            got = cached.pairs(b["index"])
            assert torch.equal(got.sum, live.sum) and torch.equal(got.mean, live.mean)
            assert torch.equal(got.num_tokens, live.num_tokens)
        # the recipe's shuffled global batches
        sampler = GlobalBatchSampler(len(ds), 4, seed=SEED, shuffle=True)
        worst = 0.0
        for rows in sampler:
            b = paired_collate([ds[i] for i in rows], padding_idx=tok.pad_id)
            with torch.no_grad():
                live = decoder_sequence_logprobs(
                    model, b["input_ids"], b["labels"], chunk_size=1024
                )
            got = cached.pairs(b["index"])
            assert torch.equal(got.num_tokens, live.num_tokens)
            worst = max(worst, (got.sum - live.sum).abs().max().item())
            torch.testing.assert_close(got.sum, live.sum, rtol=1e-5, atol=1e-4)
        print(f"\nmax |cached - live| over shuffled batches: {worst:.1e}")
    finally:
        torch.set_num_threads(threads)


def test_precompute_equals_live_kto(env):
    """KTO rows and the KL rows of every global micro-batch of every epoch are in the cache."""
    from torchtune_prefopt.data import kto_collate
    from torchtune_prefopt.modules import decoder_sequence_logprobs
    from torchtune_prefopt.reference.precompute import ReferenceLogpsTable

    model, tok, ds = env["model"], env["tok"], env["kto"]
    cached = ReferenceLogpsTable(env["out_k"])
    sampler, pairs = _kl_pairs(len(ds))
    assert len(pairs) == len(set(pairs)) and env["out_k"]["kl_pairs"].shape == (len(pairs), 2)
    checked = 0
    for epoch in range(KTO_EPOCHS):
        sampler.set_epoch(epoch)
        for rows in sampler:
            items = [ds[i] for i in rows]
            b = kto_collate(
                items, padding_idx=tok.pad_id, ignore_idx=-100, max_seq_len=tok.max_seq_len
            )
            nxt = torch.roll(b["index"], -1)  # KL row k: prompt k + completion k+1 (mod B)
            with torch.no_grad():
                live = decoder_sequence_logprobs(model, b["input_ids"], b["labels"], chunk_size=16)
                live_kl = decoder_sequence_logprobs(
                    model, b["kl_input_ids"], b["kl_labels"], chunk_size=16
                )
            torch.testing.assert_close(cached.rows(b["index"]).sum, live.sum, rtol=1e-5, atol=1e-4)
            got_kl = cached.kl(b["index"], nxt)
            assert torch.equal(got_kl.num_tokens, live_kl.num_tokens)
            torch.testing.assert_close(got_kl.sum, live_kl.sum, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got_kl.mean, live_kl.mean, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == KTO_EPOCHS * (len(ds) // KTO_GLOBAL_BATCH)
    with pytest.raises(KeyError, match="not in the reference cache"):
        missing = next(
            (i, j) for i in range(len(ds)) for j in range(len(ds)) if (i, j) not in set(pairs)
        )
        cached.kl(torch.tensor([missing[0]]), torch.tensor([missing[1]]))


def test_kto_kl_pairs_replays_sampler():
    from torchtune_prefopt.reference.precompute import kto_kl_pairs
    from torchtune_prefopt.training.data_order import GlobalBatchSampler

    s = GlobalBatchSampler(10, 4, seed=1, shuffle=True)
    s.set_epoch(5, 1)
    pairs = kto_kl_pairs(s, 2)
    assert (s.epoch, s.start_batch) == (5, 1)  # restored
    expect = []
    for e in range(2):
        s.set_epoch(e)
        for rows in s:
            expect += [(rows[k], rows[(k + 1) % 4]) for k in range(4)]
    assert pairs == list(dict.fromkeys(expect))
    assert kto_kl_pairs(s, 2, max_batches_per_epoch=1) == list(
        dict.fromkeys(expect[:4] + expect[8:12])
    )
    unshuffled = GlobalBatchSampler(8, 4, seed=0, shuffle=False)
    assert kto_kl_pairs(unshuffled, 3) == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 0),
        (4, 5),
        (5, 6),
        (6, 7),
        (7, 4),
    ]


def test_position_indexed_concat():
    from torchtune.datasets import ConcatDataset

    from torchtune_prefopt.data import PositionIndexed

    class _DS(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"prompt_ids": [1, 2], "completion_ids": [3], "label": True, "index": i}

    cat = ConcatDataset([_DS(3), _DS(2)])
    assert [cat[i]["index"] for i in range(5)] == [0, 1, 2, 0, 1]
    wrapped = PositionIndexed(cat)
    assert [wrapped[i]["index"] for i in range(5)] == [0, 1, 2, 3, 4] and len(wrapped) == 5


# --------------------------------------------------------------------------- 2 processes


def _worker(data_dir: str, out_dir: str, rank: int, world: int) -> None:
    import json
    from types import SimpleNamespace

    import torch.distributed as dist
    from safetensors.torch import save_file

    from torchtune_prefopt.models.tiny import tiny_qwen2
    from torchtune_prefopt.reference.store import ReferenceCacheFile, load_or_compute

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world
    )
    # the parent's tokenized rows (no tokenizer or dataset build here) and the same seeded model
    rows = json.loads((Path(out_dir) / "rows.json").read_text())
    tok = SimpleNamespace(pad_id=rows["pad_id"], max_seq_len=rows["max_seq_len"])
    paired, kto = rows["paired"], rows["kto"]
    torch.manual_seed(0)
    model = tiny_qwen2().eval()
    out_p, out_k = _precompute_all(model, tok, paired, kto, world_size=world, rank=rank)
    # cache: only rank 0 has one (and a fingerprint) and writes; the second load_or_compute
    # reads the file on rank 0 and broadcasts its tensors to rank 1 (no recompute anywhere)
    cache = ReferenceCacheFile(Path(out_dir) / "cache", fingerprint="0" * 64) if rank == 0 else None
    first = load_or_compute(cache, lambda: out_p, rank=rank, world_size=world)

    def _no_recompute():
        raise AssertionError("recomputed although the cache is valid")

    again = load_or_compute(cache, _no_recompute, rank=rank, world_size=world)
    assert all(torch.equal(first[k], again[k]) for k in out_p)
    save_file(
        {f"p.{k}": v for k, v in again.items()} | {f"k.{k}": v for k, v in out_k.items()},
        f"{out_dir}/rank{rank}.safetensors",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_precompute_equals_one_process(env, tmp_path):
    import json

    from safetensors.torch import load_file

    tok = env["tok"]
    (tmp_path / "rows.json").write_text(
        json.dumps(
            {
                "pad_id": tok.pad_id,
                "max_seq_len": tok.max_seq_len,
                "paired": [env["paired"][i] for i in range(len(env["paired"]))],
                "kto": [env["kto"][i] for i in range(len(env["kto"]))],
            }
        )
    )

    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(env["dir"]), str(tmp_path), str(r), "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out.decode(errors="replace"))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for k, v in env["out_p"].items():
            assert torch.equal(got[f"p.{k}"], v), (r, k)
        for k, v in env["out_k"].items():
            assert torch.equal(got[f"k.{k}"], v), (r, k)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))


def test_a_dataset_and_a_tokenizer_are_hashed_once_per_object():
    """A run's identity and its reference cache's fingerprint hash the same dataset and
    tokenizer objects: the rows are read once; an equal copy gives the same digest."""
    from torchtune_prefopt.models.tiny import tiny_tokenizer
    from torchtune_prefopt.reference.fingerprint import hash_dataset, hash_tokenizer

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n, self.reads = n, 0

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            self.reads += 1
            return {"chosen_input_ids": [i, i + 1], "index": i}

    rows = Rows(5)
    first = hash_dataset(rows)
    assert rows.reads == 5 and hash_dataset(rows) == first and rows.reads == 5
    copy_ = Rows(5)
    assert hash_dataset(copy_) == first and copy_.reads == 5  # content, not the object
    other = Rows(6)
    assert hash_dataset(other) != first
    tok = tiny_tokenizer()
    assert hash_tokenizer(tok) == hash_tokenizer(tok) == hash_tokenizer(tiny_tokenizer())
