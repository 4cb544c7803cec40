"""Add a book: send an item_upsert and watch it become a neighbour of similar books (freshness demo)."""

from __future__ import annotations

import time
import uuid

import streamlit as st

from ui.client import NotFound, ServiceError
from ui.common import added_books, client, fmt_ms

POLL_S = 0.05
FIRST_WAIT_S = 3.0  # the submit run itself waits this long for the book; then a timer takes over
GIVE_UP_S = 120.0  # the encoder may be busy with a replay; stop watching after this
NEIGHBOURS = 5


def _send(title: str, authors: str, description: str) -> None:
    item_id = f"new-{uuid.uuid4().hex[:10]}"
    text = f"{title} by {authors}. {description}" if authors else f"{title}. {description}"
    event = {"type": "item_upsert", "item_id": item_id, "title": title, "text": text.strip(". ") or title}
    if authors:
        event["authors"] = authors
    try:
        client().send_event(event)
    except ServiceError as exc:
        st.session_state.add_error = f"Could not send the book: {exc.message}"
        return
    book = {"item_id": item_id, "title": title, "authors": authors, "year": None,
            "sent_at": time.time(), "indexed_ms": None, "neighbours": None}
    added_books().insert(0, book)
    st.session_state.watching = book


def _check(book: dict, wait_s: float) -> None:
    """Polls until the book is searchable (bounded), then finds where it shows up as a neighbour."""
    deadline = time.monotonic() + wait_s
    while book["indexed_ms"] is None:
        try:
            answer = client().similar(book["item_id"], NEIGHBOURS)
            book["indexed_ms"] = (time.time() - book["sent_at"]) * 1000
            book["own_neighbours"] = answer.get("items", [])
        except NotFound:
            if time.monotonic() > deadline:
                return
            time.sleep(POLL_S)
    if book["neighbours"] is None:
        found = []
        for neighbour in book["own_neighbours"]:
            ranked = [i["item_id"] for i in client().similar(neighbour["item_id"], 10).get("items", [])]
            if book["item_id"] in ranked:
                found.append({**neighbour, "rank": ranked.index(book["item_id"]) + 1})
        book["neighbours"] = found
        book["checked_ms"] = (time.time() - book["sent_at"]) * 1000


def _watch_panel() -> None:
    book = st.session_state.get("watching")
    if not book:
        return
    st.markdown(f"#### {book['title']}  \n`{book['item_id']}`")
    was_pending = book["indexed_ms"] is None
    just_sent = time.time() - book["sent_at"] < 1.0
    try:
        _check(book, (FIRST_WAIT_S if just_sent else 0.9) if was_pending else 0)
    except NotFound:
        st.warning("A neighbour disappeared while checking (deleted meanwhile); try again.")
        return
    except ServiceError as exc:
        st.error(exc.message)
        return
    waited = time.time() - book["sent_at"]
    if book["indexed_ms"] is None:
        if waited > GIVE_UP_S:
            st.warning(f"Not searchable after {waited:.0f} s: the encoder may be busy (see the Live tab).")
        else:
            st.info(f"Sent {waited:.1f} s ago; waiting for the encoder worker and the index …")
        return
    if was_pending:
        st.rerun()  # a full run re-creates this panel without its timer
    st.success(f"Searchable {fmt_ms(book['indexed_ms'])} after it was sent (encoded, stored, indexed).")
    if book["neighbours"]:
        st.markdown("It now appears among the similar books of:")
        for n in book["neighbours"]:
            st.markdown(f"- **{n['title']}** — as #{n['rank']} of 10 (similarity {n['score']:.3f})")
    else:
        st.markdown("Its nearest books (it is not yet in their own top 10):")
        for n in book["own_neighbours"]:
            st.markdown(f"- **{n['title']}** (similarity {n['score']:.3f})")


def render() -> None:
    st.markdown("Type a book in; it goes through the same path as the catalog (event → encoder worker → "
                "Redis → FAISS) and shows up next to similar books within moments.")
    with st.form("add-book", clear_on_submit=True):
        title = st.text_input("Title", key="new_title", placeholder="The Left Hand of Darkness")
        authors = st.text_input("Author(s)", key="new_authors", placeholder="Ursula K. Le Guin")
        description = st.text_area("Description", key="new_description",
                                   placeholder="An envoy visits a planet whose people have no fixed sex; "
                                   "politics, friendship and a journey across the ice.")
        submitted = st.form_submit_button("Add the book", type="primary")
    if submitted:
        if not title.strip():
            st.warning("A title is needed.")
        else:
            _send(title.strip(), authors.strip(), description.strip())
    error = st.session_state.pop("add_error", None)
    if error:
        st.error(error)
    book = st.session_state.get("watching")
    pending = bool(book) and book["indexed_ms"] is None and time.time() - book["sent_at"] < GIVE_UP_S
    st.fragment(_watch_panel, run_every=1.0 if pending else None)()
