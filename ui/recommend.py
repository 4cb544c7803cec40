"""Recommend: a user's picks (with why and per-stage latency), similar books, one-click interactions."""

from __future__ import annotations

import time

import streamlit as st

from ui.client import NotFound, ServiceError
from ui.common import DEFAULT_USER, book_line, client, fmt_ms, latency_line, search_titles, tags_line

K = 10
GROWING_WINDOW_S = 30.0
WAIT_FOR_UPDATE_S = 2.0  # how long a click waits for the profile updater before showing the list anyway
# What carried each pick (the `because.signal` of recommender/blend.py).
SIGNALS = {"co-read": ":material/group: readers of it also wanted this",
           "similar text": ":material/article: similar text",
           "both": ":material/join: co-read and similar text"}


def _timed(call, *args, **kwargs) -> tuple[dict, float]:
    began = time.perf_counter()
    answer = call(*args, **kwargs)
    return answer, (time.perf_counter() - began) * 1000


def _ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer.get("items", [])]


def _want_to_read(user_id: str, item_id: str, title: str) -> None:
    """Sends the interaction, then waits (bounded) until the book has left the user's list."""
    began = time.perf_counter()
    try:
        client().interaction(user_id, item_id)
    except ServiceError as exc:
        st.session_state.rec_flash = ("error", f"Could not send the interaction: {exc.message}")
        return
    gone = False
    while time.perf_counter() - began < WAIT_FOR_UPDATE_S:
        try:
            answer, round_trip = _timed(client().recommendations, user_id, K)
        except ServiceError:
            break
        if item_id not in _ids(answer):
            gone = True
            st.session_state.rec_fresh = (user_id, answer, round_trip)  # shown as is: no second request
            break
        time.sleep(0.02)
    ms = (time.perf_counter() - began) * 1000
    if gone:
        st.session_state.rec_flash = ("success", f"Marked *{title}* as want-to-read; the list was updated "
                                                 f"{fmt_ms(ms)} after the click.")
    else:
        st.session_state.rec_flash = ("warning", f"Sent *{title}*; the profile has not caught up after "
                                                 f"{fmt_ms(ms)}, the list may still show it.")


def _show_similar(item_id: str, from_fragment: bool = False) -> None:
    st.session_state.similar_book = item_id
    if from_fragment:  # a click inside a fragment reruns only that fragment: ask for a full rerun
        st.session_state.similar_changed = True


def _result_card(rank: int, item: dict, user_id: str | None, popular: bool = False) -> None:
    kind = "rec" if user_id is not None else "sim"
    with st.container(border=True, key=f"{kind}-{rank}"):
        text, actions = st.columns([5, 3] if user_id is not None else [5, 2], vertical_alignment="center")
        with text:
            details = [book_line(item), tags_line(item)]
            because = item.get("because")
            if because and because.get("title"):
                signal = SIGNALS.get(because.get("signal"), "")
                details.append(f"because you read *{because['title']}*" + (f" · {signal}" if signal else ""))
            # A cold-start list is ranked by popularity (a count), not by similarity.
            score = f"popularity {item['score']:,.0f}" if popular else f"score {item['score']:.3f}"
            st.markdown(f"**{rank + 1}. {item['title']}** · {score}  \n"
                        + "  \n".join(f":small[{d}]" for d in details if d))
        with actions:
            if user_id is not None:
                want, similar = st.columns(2)
                want.button("Read", key=f"want-{rank}", icon=":material/bookmark_add:", width="stretch",
                            on_click=_want_to_read, args=(user_id, item["item_id"], item["title"]),
                            help="want to read: sends an interaction event (POST /events); the book leaves the list")
            else:
                similar = st.container()
            similar.button("Similar", key=f"similar-{kind}-{rank}", icon=":material/hub:", width="stretch",
                           on_click=_show_similar, args=(item["item_id"], user_id is not None),
                           help="books similar to this one")


def _user_recommendations(user_id: str) -> bool:
    """Renders the list; returns True while it is still filling up (service down, index growing)."""
    flash = st.session_state.pop("rec_flash", None)
    if flash:
        getattr(st, flash[0])(flash[1])
    fresh = st.session_state.pop("rec_fresh", None)  # the answer a click just waited for
    try:
        if fresh and fresh[0] == user_id:
            answer, round_trip = fresh[1], fresh[2]
        else:
            answer, round_trip = _timed(client().recommendations, user_id, K)
    except ServiceError as exc:
        st.error(exc.message)
        return True
    items = answer.get("items", [])
    if answer.get("cold_start"):
        st.info(f"User **{user_id}** has no reading history yet: showing the most popular books "
                "(cold start). Mark a book as want-to-read to start a profile.")
    else:
        st.caption(f"Profile of user **{user_id}**: {answer.get('seen_count', 0)} books read. "
                   "Hybrid picks: what readers of their books also wanted, blended with books whose text "
                   "is close to theirs; each pick names the book it came from and the signal.")
    total = answer.get("latency_ms", {}).get("total")
    with st.container(key="latency-rec"):
        figure, stages = st.columns([1, 3], vertical_alignment="center")
        figure.metric("Latency (server)", fmt_ms(total))
        stages.markdown(latency_line(answer.get("latency_ms", {}), round_trip))
    if not items:
        st.warning("No books to recommend yet: the catalog is still being indexed. This list refreshes by itself.")
        return True
    for rank, item in enumerate(items):
        _result_card(rank, item, user_id, popular=bool(answer.get("cold_start")))
    if "similar_book" not in st.session_state:  # open the side panel on the top pick's neighbours
        st.session_state.similar_book = items[0]["item_id"]
    if len(items) < K:
        return True
    if answer.get("cold_start"):  # keep looking while the catalog is still arriving (the profile may follow)
        try:
            size = client().health().get("index_size")
        except ServiceError:
            return True
        now = time.monotonic()
        if size != st.session_state.get("rec_index_size"):
            st.session_state.rec_index_size, st.session_state.rec_index_changed = size, now
        # The index grows in micro-batches, seconds apart under load: "still growing" = changed lately.
        return now - st.session_state.rec_index_changed < GROWING_WINDOW_S
    return False


def _similar_books() -> None:
    query = st.text_input("Find a book by title or author", key="book_query", placeholder="e.g. dune")
    matches = search_titles(query) if query else []
    if query and not matches:
        st.warning(f"No book matches “{query}” in the catalog.")
    if matches:
        labels = {m["item_id"]: f"{m['title']} — {m.get('authors') or '?'}" for m in matches}
        picked = st.selectbox("Book", list(labels), format_func=labels.get, key="book_pick")
        st.button("Show similar books", key="show-similar", on_click=_show_similar, args=(picked,))
    item_id = st.session_state.get("similar_book")
    if not item_id:
        st.caption("Pick a book above, or press *Similar* on a recommendation.")
        return
    try:
        answer, round_trip = _timed(client().similar, item_id, K)
    except NotFound:
        st.warning(f"Book {item_id!r} is not in the index (unknown, deleted, or not encoded yet).")
        return
    except ServiceError as exc:
        st.error(exc.message)
        return
    title = next((b["title"] for b in search_titles(item_id, 1) if b["item_id"] == item_id), item_id)
    st.markdown(f"Books similar to **{title}**")
    st.caption(latency_line(answer.get("latency_ms", {}), round_trip))
    for rank, item in enumerate(answer.get("items", [])):
        _result_card(rank, item, None)


def render() -> None:
    user_id = st.columns([1, 3])[0].text_input("User id", value=DEFAULT_USER, key="user_id",
                                               help="any id; an unknown user gets the cold-start list").strip()
    picks, similar = st.columns([3, 2], gap="large")
    waiting = st.session_state.get("rec_waiting", True)

    # Refreshes by itself only while the list is filling up (e.g. `make demo` still replaying).
    @st.fragment(run_every=2.0 if waiting else None)
    def recommendations() -> None:
        st.subheader(f"Recommended for user {user_id}" if user_id else "Recommendations")
        if not user_id:
            st.warning("Enter a user id.")
            still_waiting = False
        else:
            still_waiting = _user_recommendations(user_id)
        changed = st.session_state.pop("similar_changed", False)
        if still_waiting != st.session_state.get("rec_waiting", True) or changed:
            st.session_state.rec_waiting = still_waiting
            st.rerun()

    with picks:
        recommendations()
    with similar:
        st.subheader("Similar books")
        _similar_books()
