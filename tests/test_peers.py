"""The int8 peers (bench/peers.py): real quantized runtimes of the base model, encoders like any other."""

import numpy as np
import pytest

TEXTS = ["The Hunger Games by Suzanne Collins. young adult, dystopia", "A man is playing a guitar.",
         "Vitamin D deficiency is associated with higher mortality in older adults.", "Pride and Prejudice"]


# The least cosine to float32 on TEXTS, from the measured figures less a margin: ORT int8 gives
# 0.957-0.971 and torch int8 dynamic (per-tensor activation scales, computed per batch) 0.931-0.959.
# Their STS-B dev scores are within 0.5% of each other (BENCHMARKS.md, Quality).
LEAST_COSINE = {"ort-int8": 0.95, "torch-int8": 0.92}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEAST_COSINE))
def test_peer_encodes_like_the_full_precision_model(name):
    from bench.peers import load_peer
    from encoder.evaluate import full_precision

    fp, fp_key = full_precision()
    peer = load_peer(name)
    emb = peer.encode(TEXTS, batch_size=3)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = np.sum(emb * fp.encode(TEXTS), axis=1)
    assert (cos > LEAST_COSINE[name]).all() and (cos < 0.99999).all(), cos  # close to float32, but really quantized
    assert peer.cache_key != fp_key and name in peer.cache_key
    # Both quantize activations with one scale per batch tensor, so batch composition moves an
    # embedding a little (measured: cos 0.99-1.0 batched vs alone for ORT, 0.95-1.0 for torch);
    # alone, each text is as close to float32 as in a batch.
    alone = np.stack([peer.encode([text], batch_size=1)[0] for text in TEXTS])
    assert (np.sum(alone * fp.encode(TEXTS), axis=1) > LEAST_COSINE[name]).all()
