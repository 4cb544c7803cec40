"""recommender/blend.py on small hand-made data: every expected score follows from the inputs.

The co-read scores themselves are computed by the Store (tests/test_coread_store.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from recommender.blend import (
    COREAD_ONLY,
    DEFAULT_PARAMS,
    BlendParams,
    Candidates,
    blend,
    blend_scores,
    candidates,
    rank,
)

# Co-read scores cf(j) (and the recent book each came from) of a user's recent books "a" and "b".
COREAD = {"x": (0.316, "a"), "y": (0.7, "b"), "z": (0.316, "b")}
SUPPORT = {"a": 40.0, "b": 10.0, "x": 100.0, "y": 10.0, "z": 1.0}


def test_blend_scores_normalize_each_signal_and_shrink_coread_for_thin_support():
    params = BlendParams(coread_weight=0.8, support_half=10.0)
    cf, ct, n = np.array([0.5, 0.25, 0.0]), np.array([0.2, 0.4, 0.8]), np.array([90.0, 10.0, 0.0])
    score, cf_part, ct_part = blend_scores(cf, ct, n, params)
    a = 0.8 * n / (n + 10.0)  # 0.72, 0.4, 0
    assert cf_part == pytest.approx(a * cf / 0.5)
    assert ct_part == pytest.approx((1 - a) * np.array([0.0, 1 / 3, 1.0]))  # min-max over the candidates
    assert score == pytest.approx(cf_part + ct_part)
    assert score[2] == pytest.approx(1.0)  # no interactions: pure content, at its best


def _candidates(coread: dict, content: dict) -> Candidates:
    order = sorted(content, key=lambda j: -content[j])
    return Candidates(coread, content, {j: r for r, j in enumerate(order)})


def test_blend_orders_by_score_and_says_which_signal_carries_each_pick():
    found = _candidates({"x": (0.5, "a"), "y": (0.45, "b")}, {"x": 0.1, "y": 0.7, "t": 0.8})
    picks = blend(found, {"x": 100.0, "y": 100.0, "t": 100.0}, BlendParams(0.5, 0.0), k=3)
    by_id = {p.item_id: p for p in picks}
    # y: 0.5 * 0.9 + 0.5 * 6/7; t: 0.5 * 1 and x: 0.5 * 1 tie, by id.
    assert [p.item_id for p in picks] == ["y", "t", "x"]
    assert by_id["y"].score == pytest.approx(0.45 + 0.5 * 6 / 7)
    assert by_id["y"].signal == "both" and by_id["y"].because == "b"
    assert by_id["t"].signal == "similar text" and by_id["t"].because is None
    assert by_id["x"].signal == "co-read" and by_id["x"].because == "a"
    assert by_id["x"].coread == 0.5 and by_id["x"].content == 0.1


def test_equal_scores_are_ordered_by_item_id():
    picks = blend(_candidates({}, {"b": 0.5, "a": 0.5, "c": 0.5}), {"a": 1.0, "b": 1.0, "c": 1.0}, BlendParams(), k=3)
    assert [p.item_id for p in picks] == ["a", "b", "c"]


@pytest.mark.parametrize(("cold_content", "expected"), [
    (0.85, ["warm-strong", "cold", "warm-weak"]),  # second by text: second in the list
    (0.95, ["cold", "warm-strong", "warm-weak"]),  # first by text: first, whatever the co-read scores
])
def test_a_book_nobody_read_keeps_its_place_in_the_content_list(cold_content, expected):
    found = _candidates({"warm-strong": (1.0, "a"), "warm-weak": (0.05, "a")},
                        {"warm-strong": 0.3, "warm-weak": 0.9, "cold": cold_content})
    picks = blend(found, {"warm-strong": 50.0, "warm-weak": 50.0}, BlendParams(coread_weight=0.9, support_half=5.0),
                  k=3)
    assert [p.item_id for p in picks] == expected
    assert {p.item_id: p.signal for p in picks}["cold"] == "similar text"
    short = blend(found, {"warm-strong": 50.0, "warm-weak": 50.0}, BlendParams(), k=1)
    assert [p.item_id for p in short] == expected[:1]


def test_candidates_come_from_both_signals_and_content_is_filled_in_for_coread_ones():
    asked = []

    def content_of(ids):
        asked.append(sorted(ids))
        return {j: 0.1 for j in ids}

    params = BlendParams(coread_candidates=2, content_candidates=2)
    found = candidates(COREAD, [("t", 0.9), ("x", 0.5), ("u", 0.4)], content_of, params)
    assert set(found.coread) == {"y", "x"}  # the two best by co-read (z ties x and loses by id)
    assert found.content == {"t": 0.9, "x": 0.5, "y": 0.1}  # u is past the content candidates
    assert found.content_rank == {"t": 0, "x": 1}
    assert asked == [["y"]]  # only what the content hits lack


def test_coread_only_ignores_text():
    picks = rank(COREAD, SUPPORT, [("t", 0.99)], lambda ids: {j: 0.9 for j in ids}, COREAD_ONLY, k=10)
    assert [p.item_id for p in picks] == ["y", "x", "z"]
    assert all(p.signal == "co-read" for p in picks)


def test_nothing_to_go_on_gives_nothing():
    assert rank({}, {}, [], lambda ids: {}, BlendParams(), k=5) == []


def test_the_service_blends_with_the_weights_chosen_on_validation_users():
    # bench.recommendation tunes the weights on validation users and records them; the service's
    # defaults must be what was chosen, or the measured HitRate is not what the service gives.
    chosen = json.loads((Path(__file__).parents[1] / "reports" / "recommendation.json").read_text())["chosen"]
    assert asdict(DEFAULT_PARAMS) == chosen
