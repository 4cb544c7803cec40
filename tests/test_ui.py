"""The Streamlit UI against a real recommender (embedded mode, served over HTTP in this process).

Streamlit's AppTest runs the page script without a browser; the recommender is the production
runtime with the model-free hashing encoder (the encoder is not what these tests are about).
"""

import json
import threading

import pytest
import uvicorn
from streamlit.testing.v1 import AppTest

from encoder.hashing import HashingEncoder
from ingest.replay import Selection, replay, selected_events
from ingest.services import free_port
from ingest.settings import REPO_ROOT, Settings
from recommender.runtime import Runtime
from recommender.service import create_app
from tests.waiting import wait_for

APP = str(REPO_ROOT / "ui" / "app.py")
ITEMS, USERS = 300, 40
TIMEOUT = 30




@pytest.fixture(scope="module")
def service():
    runtime = Runtime(Settings(kafka_bootstrap="", redis_url="", max_wait_ms=2), with_workers=True,
                      encoder=HashingEncoder(64))
    runtime.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime.recommender), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="HTTP server")
    events = selected_events(Selection(limit=ITEMS, users=USERS, interleave=True))
    replay(runtime.event_log, runtime.settings, events, progress=False)
    wait_for(lambda: len(runtime.index) == ITEMS, what=f"{ITEMS} items indexed")
    user1 = {e.item_id for e in events if e.type == "interaction" and e.user_id == "1"}
    assert user1, "user 1 has books among the replayed items"
    wait_for(lambda: runtime.store.user_profile("1").seen >= user1, what="user 1's profile")
    yield runtime, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    runtime.stop()


@pytest.fixture
def app(service, monkeypatch):
    monkeypatch.setenv("TERNREC_SERVICE_URL", service[1])
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def card_titles(at: AppTest) -> list[list[str]]:
    """Titles of the result cards ('**1. Title** · score …'), one list per panel (numbering restarts)."""
    panels: list[list[str]] = []
    for m in at.markdown:
        head = m.value.split("**")[1] if m.value.startswith("**") else ""
        rank, _, title = head.partition(". ")
        if rank.isdigit() and title:
            if rank == "1":
                panels.append([])
            panels[-1].append(title)
    return panels


def rec_titles(at: AppTest) -> list[str]:
    return card_titles(at)[0]


def test_recommend_opens_on_the_default_user_with_why_and_latency(app):
    at = app.run()
    assert not at.exception
    assert not at.error, texts(at.error)
    assert any("Recommended for user 1" in s.value for s in at.subheader)
    want = [b for b in at.button if b.key and b.key.startswith("want-")]
    assert len(want) == 10
    assert len(set(rec_titles(at))) >= 10
    latency = next(m for m in at.metric if m.label == "Latency (server)")
    assert latency.value.endswith("ms")
    stages = next(m.value for m in at.markdown if "total" in m.value and "search" in m.value)
    assert "profile" in stages and "hydrate" in stages
    assert sum("because you read" in m.value for m in at.markdown) >= 5  # the why of each pick
    assert any("books read" in c.value for c in at.caption)  # a real profile, not the cold-start list


def test_want_to_read_removes_the_book_from_the_list(app, service):
    at = app.run()
    before = rec_titles(at)
    at.button(key="want-0").click().run()
    assert not at.exception
    after = rec_titles(at)
    assert before[0] not in after and len(after) == 10
    assert any("Marked" in s.value and before[0] in s.value for s in at.success)
    store = service[0].store
    seen = store.items_metadata(sorted(store.user_profile("1").seen))
    assert before[0] in {m["title"] for m in seen if m}  # the click reached the user's profile


def test_unknown_user_gets_a_labelled_cold_start_list(app):
    at = app.run()
    at.text_input(key="user_id").set_value("nobody-at-all").run()
    assert not at.exception and not at.error
    assert any("cold start" in i.value for i in at.info)
    assert len([b for b in at.button if b.key and b.key.startswith("want-")]) == 10


def test_search_a_book_by_title_and_see_similar_books(app):
    at = app.run()
    at.text_input(key="book_query").set_value("hunger games").run()
    assert "Hunger Games" in at.selectbox(key="book_pick").format_func(at.selectbox(key="book_pick").value)
    at.button(key="show-similar").click().run()
    assert not at.exception and not at.error
    assert any(m.value.startswith("Books similar to **The Hunger Games") for m in at.markdown)
    assert len([b for b in at.button if b.key and b.key.startswith("similar-sim-")]) == 10
    # "Similar" on a recommendation switches the panel to that book.
    first = rec_titles(at)[0]
    at.button(key="similar-rec-0").click().run()
    assert any(m.value == f"Books similar to **{first}**" for m in at.markdown)


def test_unknown_book_and_unmatched_search_are_messages(app):
    at = app.run()
    at.session_state["similar_book"] = "no-such-book"
    at.text_input(key="book_query").set_value("zzqx no such title").run()
    assert not at.exception
    warnings = texts(at.warning)
    assert any("No book matches" in w for w in warnings)
    assert any("not in the index" in w for w in warnings)


def open_tab(at: AppTest, name: str) -> AppTest:
    at.session_state["tab"] = name  # what a click on the tab does; only the open tab runs
    return at.run()


def test_only_the_open_tab_runs(app):
    at = app.run()
    assert any("Recommended for user 1" in s.value for s in at.subheader)
    assert not any(m.label == "Searchable items" for m in at.metric)  # Live is not polling in the background
    open_tab(at, "Live")
    assert not any("Recommended" in s.value for s in at.subheader)
    assert any(m.label == "Searchable items" for m in at.metric)


def test_live_page_shows_throughput_freshness_and_latency_per_stage(app):
    at = open_tab(app.run(), "Live")
    at.run()  # a second sample for the events/s chart
    assert not at.exception and not at.error
    labels = {m.label: m.value for m in at.metric}
    assert labels["Searchable items"] == f"{ITEMS}"
    assert labels["Freshness p50"].endswith(("ms", "s")) and labels["Freshness p99"] != "–"
    frames = [d.value for d in at.dataframe]
    latency = [f for f in frames if list(f.columns) == ["p50", "p95", "p99"]]
    assert latency and "total" in latency[0].index and "search" in {s for f in latency for s in f.index}
    (lanes,) = [f for f in frames if "backlog" in f.columns]  # each lane's backlog and freshness
    assert list(lanes.index) == ["live", "bulk"] and lanes.loc["bulk", "updates"] == ITEMS


def test_add_a_book_appears_as_a_neighbour(app):
    at = open_tab(app.run(), "Add a book")
    # The same text as the catalog's book 1, so it must be that book's nearest neighbour.
    at.text_input(key="new_title").set_value("The Hunger Games (The Hunger Games, #1)")
    at.text_input(key="new_authors").set_value("Suzanne Collins")
    at.text_area(key="new_description").set_value("young adult, fiction, dystopian, dystopia, fantasy")
    next(b for b in at.button if b.label == "Add the book").click().run()
    assert not at.exception and not at.error
    assert any(s.value.startswith("Searchable") for s in at.success)
    neighbours = [m.value for m in at.markdown if "as #" in m.value]
    assert any("The Hunger Games (The Hunger Games, #1)" in n and "as #1 of 10" in n for n in neighbours)


def test_model_page_reads_whatever_reports_exist(tmp_path):
    report = {
        "command": "python -m encoder.evaluate --out reports/quality.json",
        "dataset": "goodbooks",
        "retained": 0.97,
        "models": {"full_precision": {"ndcg@10": 0.41, "size_mb": 87.0},
                   "ternary": {"ndcg@10": 0.40, "size_mb": 9.5}},
        "batches": [{"batch": 1, "latency_ms": {"p50": 2.0, "p99": 3.1}}, {"batch": 32, "latency_ms": {"p50": 9.0}}],
    }
    (tmp_path / "quality.json").write_text(json.dumps(report))
    (tmp_path / "speed.json").write_text("{not json")

    def page(reports_dir):
        from ui import model

        model.render(reports_dir)

    at = AppTest.from_function(page, kwargs={"reports_dir": str(tmp_path)}, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any(c.value == report["command"] for c in at.code)
    assert {m.label: m.value for m in at.metric}["retained"] == "0.97"
    frames = [d.value for d in at.dataframe]
    variants = next(f for f in frames if "size_mb" in f.columns)
    assert set(variants.index) == {"full_precision", "ternary"} and variants.loc["ternary", "size_mb"] == 9.5
    batches = next(f for f in frames if "batch" in f.columns)
    assert list(batches["latency_ms.p50"]) == [2.0, 9.0]  # nested figures flattened into columns
    assert any("speed.json is unreadable" in w.value for w in at.warning)
    assert any("reports/kernel.json" in i.value for i in at.info)  # missing files are listed, not errors


def test_the_comparison_shows_the_working_trees_model_not_an_older_commits():
    from ui.model import _shipped_ternary

    models = {"ternary (old)": {"spec": "git:b440857:models/ternary-minilm", "run": "old"},
              "ternary (2 h)": {"spec": "models/ternary-minilm", "run": "shipped"},
              "ternary (57 min)": {"spec": "git:773e516:models/ternary-minilm", "run": "earlier"}}
    assert _shipped_ternary(models)["run"] == "shipped"
    assert _shipped_ternary({k: v for k, v in models.items() if k != "ternary (2 h)"})["run"] == "earlier"


def test_every_page_shows_a_message_when_the_service_is_down(monkeypatch):
    monkeypatch.setenv("TERNREC_SERVICE_URL", f"http://127.0.0.1:{free_port()}")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    errors = texts(at.error)
    assert len(errors) == 2 and all("not reachable" in e for e in errors)  # header, Recommend
    open_tab(at, "Live")
    assert not at.exception and len(at.error) == 2 and "not reachable" in at.error[1].value
    open_tab(at, "Model")
    assert not at.exception and any("Full precision vs ternary" in m.value for m in at.markdown)
    open_tab(at, "Add a book")
    at.text_input(key="new_title").set_value("A book")
    next(b for b in at.button if b.label == "Add the book").click().run()
    assert not at.exception
    assert any("Could not send the book" in e.value for e in at.error)
