"""The service's HitRate agrees with the offline evaluation on the same data (embedded mode).

The embedded service (in-process log, fakeredis, hashing encoder: the agreement does not depend
on the model) gets the catalog and the interactions of the first N users by replay, then each
test user's books but one through `POST /events`, and is asked over HTTP. The offline side builds
the same Store from the same interactions and ranks with the same blend (bench/recommendation.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.recommendation import K, hybrid_ranks, item_store, make_split
from bench.recommendation_service import service_hits
from encoder.hashing import HashingEncoder
from ingest.catalog import load_items
from recommender.blend import DEFAULT_PARAMS

BULK_USERS, TEST_USERS = 300, 80


@pytest.mark.slow
def test_service_hitrate_matches_offline_on_the_same_data():
    split = make_split(n_test=0, n_valid=0)
    users = list(split.histories)
    bulk_users, candidates = users[:BULK_USERS], [u for u in users[BULK_USERS:] if len(set(split.histories[u])) >= 5]
    rng = np.random.default_rng(0)
    test_users = [candidates[i] for i in sorted(rng.choice(len(candidates), TEST_USERS, replace=False))]
    held = {u: split.histories[u][rng.integers(len(split.histories[u]))] for u in test_users}
    histories = {u: [b for b in split.histories[u] if b != held[u]] for u in test_users}
    bulk = [(u, b) for u in bulk_users for b in split.histories[u]]

    items = load_items()
    encoder = HashingEncoder(64)
    run = service_hits(items, bulk, histories, held, encoder, timeout=300)
    assert run["strategies"] == {"hybrid": TEST_USERS}

    emb = encoder.encode([i.text for i in items])
    store = item_store("", "offline:", split.item_ids, emb)
    store.apply_interactions(
        [_event(u, b) for u, b in bulk + [(u, b) for u in test_users for b in histories[u]]],
        dict(zip(split.item_ids, emb, strict=True)))
    offline = hybrid_ranks(store, emb, split, held, [DEFAULT_PARAMS])[DEFAULT_PARAMS]

    service = np.array([run["ranks"][u] for u in held])
    assert (service < K).sum() >= 5, "too few hits for the comparison to mean anything"
    # Same model state and the same scoring: the same hits, up to a rare tie or rounding flip.
    agree = np.mean((service < K) == (offline < K))
    assert agree >= 0.95, (service.tolist(), offline.tolist())
    assert abs(np.mean(service < K) - np.mean(offline < K)) <= 2 / TEST_USERS


def _event(user: str, book: str):
    from ingest.schema import Interaction

    return Interaction(type="interaction", user_id=user, item_id=book, kind="to_read", ts=1.0)
