"""The teacher's outputs for every training text, computed once and kept on disk (content-keyed).

Distillation compares the student with a frozen full-precision teacher on the same texts; the
teacher never changes, so its outputs are computed once per (teacher weights, texts, maximum
lengths) instead of once per step. Directory `$TERNREC_CACHE/teacher/<key>/`:

    tokens.npy   int32 (total tokens,)        every text's token ids, truncated, concatenated
    offsets.npy  int64 (texts + 1,)           text i = tokens[offsets[i]:offsets[i + 1]]
    pooled.npy   float32 (texts, dim)         mean-pooled last hidden state, L2-normalized
    hidden.npy   float16 (total tokens, layers, dim)   every layer's hidden states (when kept)
    meta.json    what the key covers

`key` = sha256 over the teacher's file fingerprint, the texts and their maximum lengths. The
directory is written under a temporary name and renamed when complete, so a killed build leaves
nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec")) / "teacher"


def targets_key(teacher_key: str, texts: list[str], max_lens: list[int], hidden: bool) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\x00{teacher_key}\x00{hidden}\x00".encode())
    for t, n in zip(texts, max_lens, strict=True):
        h.update(f"{n}\x01{t}\x00".encode())
    return h.hexdigest()[:24]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def pad_batch(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, T) int64, attention_mask (B, T) int64), right-padded with 0."""
    seq = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), seq), dtype=np.int64)
    mask = np.zeros((len(seqs), seq), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class TeacherTargets:
    """Read side of a built directory. The hidden states are read into memory once (~4.5 GB for the
    default pool in float16): memory-mapped, a step after the page cache was evicted waited seconds
    on scattered disk reads (measured: 0.1 steps/s for the first 3 minutes of a run)."""

    def __init__(self, directory: Path, in_memory: bool = True):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.tokens = np.load(self.directory / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(self.directory / "offsets.npy")
        self.pooled = np.load(self.directory / "pooled.npy")
        hidden = self.directory / "hidden.npy"
        self.hidden = np.load(hidden, mmap_mode=None if in_memory else "r") if hidden.is_file() else None
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def token_ids(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def batch(self, idx) -> dict:
        """Padded token ids and mask of texts `idx`, and, when stored, the teacher's hidden states
        as a list over layers of (B, T, dim) float32 (zeros at padding)."""
        ids, mask = pad_batch([self.token_ids(i) for i in idx])
        out = {"input_ids": ids, "attention_mask": mask}
        if self.hidden is not None:
            layers, dim = self.hidden.shape[1:]
            h = np.zeros((layers, len(idx), ids.shape[1], dim), dtype=np.float32)
            for r, i in enumerate(idx):
                block = self.hidden[self.offsets[i]:self.offsets[i + 1]]  # (len, layers, dim)
                h[:, r, :len(block)] = np.moveaxis(block, 0, 1)
            out["hidden"] = list(torch.from_numpy(h))
        return out


@torch.no_grad()
def build_teacher_targets(teacher, tokenizer, texts: list[str], max_lens: list[int], teacher_key: str,
                          hidden: bool = True, batch_tokens: int = 4096, root: Path | None = None,
                          log=print) -> TeacherTargets:
    """The targets of `texts` under `teacher` (an HF BERT model), each truncated at its own max length;
    reused when already built. `teacher_key` must come from the teacher's content (its files' hash)."""
    root = Path(root) if root else cache_root()
    key = targets_key(teacher_key, texts, max_lens, hidden)
    final = root / key
    if (final / "meta.json").is_file():
        return TeacherTargets(final)
    t0 = time.perf_counter()
    seqs: list[np.ndarray] = [np.empty(0, np.int32)] * len(texts)
    for n in sorted(set(max_lens)):  # one tokenizer call per maximum length
        which = [i for i, m in enumerate(max_lens) if m == n]
        enc = tokenizer([texts[i] for i in which], truncation=True, max_length=n, padding=False)["input_ids"]
        for i, e in zip(which, enc, strict=True):
            seqs[i] = np.asarray(e, dtype=np.int32)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    tmp = root / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", np.concatenate(seqs).astype(np.int32))
    np.save(tmp / "offsets.npy", offsets)
    cfg = teacher.config
    layers = cfg.num_hidden_layers
    hid = np.lib.format.open_memmap(tmp / "hidden.npy", mode="w+", dtype=np.float16,
                                    shape=(int(offsets[-1]), layers, cfg.hidden_size)) if hidden else None
    pooled = np.zeros((len(seqs), cfg.hidden_size), dtype=np.float32)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    teacher.eval()
    start, done = 0, 0
    while start < len(order):
        seq = len(seqs[order[min(start + 255, len(order) - 1)]])
        stop = min(len(order), start + max(1, batch_tokens // max(seq, 1)))
        chunk = order[start:stop]
        ids, mask = pad_batch([seqs[i] for i in chunk])
        out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        pooled[chunk] = torch.nn.functional.normalize(mean_pool(out.last_hidden_state, mask), dim=-1).numpy()
        if hidden:
            states = torch.stack(out.hidden_states[1:], dim=2).to(torch.float16).numpy()  # (B, T, layers, dim)
            for r, i in enumerate(chunk):
                hid[offsets[i]:offsets[i + 1]] = states[r, :len(seqs[i])]
        done += len(chunk)
        start = stop
        if done // 5000 != (done - len(chunk)) // 5000:
            log(f"teacher targets: {done}/{len(order)} texts ({time.perf_counter() - t0:.0f} s)")
    if hid is not None:
        hid.flush()
        del hid
    np.save(tmp / "pooled.npy", pooled)
    (tmp / "meta.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "teacher": teacher_key, "texts": len(seqs), "tokens": int(offsets[-1]),
        "hidden_layers": layers if hidden else 0, "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
    if final.exists():  # another process finished the same build first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    log(f"teacher targets: {len(seqs)} texts, {int(offsets[-1])} tokens in {time.perf_counter() - t0:.0f} s")
    return TeacherTargets(final)
