"""The int8 peers (bench/peers.py): real quantized runtimes of the base model, encoders like any other."""

import numpy as np
import pytest

TEXTS = ["The Hunger Games by Suzanne Collins. young adult, dystopia", "A man is playing a guitar.",
         "Vitamin D deficiency is associated with higher mortality in older adults.", "Pride and Prejudice"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ort-int8", "torch-int8"])
def test_peer_encodes_like_the_full_precision_model(name):
    from bench.peers import load_peer
    from encoder.evaluate import full_precision

    fp, fp_key = full_precision()
    peer = load_peer(name)
    emb = peer.encode(TEXTS, batch_size=3)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = np.sum(emb * fp.encode(TEXTS), axis=1)
    assert (cos > 0.95).all() and (cos < 0.99999).all()  # close to float32, but really quantized
    assert peer.cache_key != fp_key and name in peer.cache_key
    # batch composition does not change a text's embedding beyond float noise
    np.testing.assert_allclose(peer.encode(TEXTS[:1], batch_size=1)[0], emb[0], atol=2e-3)
