"""Evaluation metrics and the one embedding cache (keyed by model content, never reused when stale)."""

import numpy as np
import pytest

from encoder.embedding_cache import encode_cached, model_fingerprint
from encoder.evaluate import eval_neighbours, neighbour_overlap, recommend_loo


class CountingEncoder:
    name, dim = "counting", 4

    def __init__(self, offset=0.0):
        self.calls, self.offset = 0, offset

    def encode(self, texts, batch_size=32):
        self.calls += 1
        e = np.asarray([[len(t), t.count("a"), 1.0 + self.offset, 0.5] for t in texts], dtype=np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_cache_is_keyed_by_model_content_and_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNREC_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights v1")
    enc = CountingEncoder()
    key = "test:" + model_fingerprint(model_dir)
    first = encode_cached(enc, ["a", "bb"], key)
    again = encode_cached(enc, ["a", "bb"], key)
    assert enc.calls == 1 and np.array_equal(first, again)
    encode_cached(enc, ["a", "bbb"], key)  # other texts: encoded
    assert enc.calls == 2
    (model_dir / "model.safetensors").write_bytes(b"weights v2")  # retrained in place, same path
    new_key = "test:" + model_fingerprint(model_dir)
    assert new_key != key
    retrained = CountingEncoder(offset=1.0)
    assert not np.array_equal(encode_cached(retrained, ["a", "bb"], new_key), first)
    assert retrained.calls == 1
    encode_cached(enc, ["a", "bb"], None)  # no key: never cached
    encode_cached(enc, ["a", "bb"], None)
    assert enc.calls == 4


def test_neighbour_recall_overall_heldout_and_train():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 8)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.all(neighbour_overlap(ref, ref) == 1.0)
    noisy = ref + 0.3 * rng.normal(size=ref.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    held = np.zeros(60, dtype=bool)
    held[::3] = True
    out = eval_neighbours(noisy, ref, held, "catalog")
    overlap = neighbour_overlap(noisy, ref)
    assert 0 < out["catalog_neighbour_recall@10"] < 1
    assert out["catalog_neighbour_recall@10_heldout"] == pytest.approx(overlap[held].mean())
    assert out["catalog_neighbour_recall@10_train"] == pytest.approx(overlap[~held].mean())
    assert out["catalog_neighbour_recall@10"] == pytest.approx(overlap.mean())


def test_leave_one_out_hitrate_and_its_standard_error():
    # Four clusters of 10 books; each user reads 6 books of one: the held-out one ranks among the
    # cluster's 5 unread books, always in the top 10.
    emb = np.repeat(np.eye(4, dtype=np.float32), 10, axis=0)
    emb += np.random.default_rng(0).normal(scale=0.01, size=emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = [str(i) for i in range(40)]
    users = {f"u{u}": [str(b) for b in range(u % 4 * 10, u % 4 * 10 + 6)] for u in range(30)}
    out = recommend_loo(emb, items, users)
    assert out["rec_users"] == 30 and out["rec_hitrate@10"] == 1.0 and out["rec_hitrate@10_se"] == 0.0
    shuffled = emb[np.random.default_rng(1).permutation(40)]
    out = recommend_loo(shuffled, items, users)
    h = out["rec_hitrate@10"]
    assert out["rec_hitrate@10_se"] == pytest.approx(np.sqrt(h * (1 - h) / 30))
