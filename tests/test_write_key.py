"""The optional write key (TERNREC_API_KEY): POST /events needs it when set, reads never do.

The production runtime in embedded mode with the model-free hashing encoder, over HTTP (FastAPI's
TestClient, and a real uvicorn server for the UI's client).
"""

import threading

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from ingest.services import free_port
from ingest.settings import Settings
from recommender.service import create_app
from tests.waiting import wait_for
from ui.client import ServiceClient, ServiceError

KEY = "s3cret-write-key"
BOOK = {"type": "item_upsert", "item_id": "k1", "title": "Keys and Locks", "text": "a book about keys"}


def test_writes_need_the_key_when_one_is_set(embedded_runtime):
    client = TestClient(create_app(embedded_runtime.recommender, write_key=KEY))
    missing = client.post("/events", json=BOOK)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "TERNREC_API_KEY" in missing.json()["detail"]
    for header in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer "):
        assert client.post("/events", json=BOOK, headers={"Authorization": header}).status_code == 401, header
    assert len(embedded_runtime.index) == 0  # nothing refused got in
    accepted = client.post("/events", json=BOOK, headers={"Authorization": f"Bearer {KEY}"})
    assert accepted.status_code == 202, accepted.text
    wait_for(lambda: "k1" in embedded_runtime.index, what="the keyed write indexed")
    # Reads stay open.
    assert client.get("/health").status_code == 200
    assert client.get("/items/k1/similar").status_code == 200
    assert client.get("/users/u1/recommendations").status_code == 200
    assert "401" in client.get("/openapi.json").json()["paths"]["/events"]["post"]["responses"]


def test_writes_are_open_without_a_key(embedded_runtime):
    client = TestClient(create_app(embedded_runtime.recommender))
    assert client.post("/events", json={**BOOK, "item_id": "k2"}).status_code == 202
    assert "401" not in client.get("/openapi.json").json()["paths"]["/events"]["post"]["responses"]


def test_the_key_is_a_secret_in_the_settings(monkeypatch):
    monkeypatch.setenv("TERNREC_API_KEY", KEY)
    settings = Settings()
    assert settings.api_key.get_secret_value() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


@pytest.fixture
def keyed_service(embedded_runtime):
    port = free_port()
    app = create_app(embedded_runtime.recommender, write_key=KEY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="HTTP server")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_ui_client_sends_the_key(keyed_service, embedded_runtime, monkeypatch):
    # This test's own book (the runtime is per test): the read below needs a searchable item.
    httpx.post(f"{keyed_service}/events", json=BOOK, headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()
    wait_for(lambda: "k1" in embedded_runtime.index, what="the keyed write indexed")
    with pytest.raises(ServiceError) as refused:
        ServiceClient(keyed_service).interaction("u1", "k1")
    assert refused.value.status == 401
    assert ServiceClient(keyed_service, api_key=KEY).interaction("u1", "k1")["type"] == "interaction"
    # The UI's pages build their client from the settings: TERNREC_API_KEY reaches it.
    from ui.common import client

    monkeypatch.setenv("TERNREC_SERVICE_URL", keyed_service)
    monkeypatch.setenv("TERNREC_API_KEY", KEY)
    assert client().interaction("u2", "k1")["type"] == "interaction"
    assert client().similar("k1")["items"] is not None  # reads as before
