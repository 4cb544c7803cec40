"""The HTTP API keeps its OpenAPI contract: schemathesis fuzzes the running embedded service, and
bad input the fuzzer may not reach gets a 4xx with a reason and stores nothing."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from ingest.services import free_port
from ingest.settings import REPO_ROOT
from recommender.service import create_app
from tests.waiting import wait_for

FIXED_SEED = 20261202
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def demo_url():
    """The embedded demo (hashing encoder: the contract does not depend on the model) on a free port."""
    port = free_port()
    env = {**os.environ, "TERNREC_ENCODER": "hashing:384", "TERNREC_HTTP_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "recommender.demo", "--no-ui", "--users", "20", "--limit", "300"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=1).json()["index_size"] == 300
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=60, what="the demo with 300 items", every=0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [FIXED_SEED, random.randrange(2**31)], ids=["fixed-seed", "random-seed"])
def test_schemathesis_finds_nothing(demo_url, seed, tmp_path):
    """All checks; examples, coverage, fuzzing and stateful phases; 150 examples per operation."""
    cmd = [str(SCHEMATHESIS), "--config-file", str(CONFIG),
           "run", f"{demo_url}/openapi.json", "--checks", "all", "--max-examples", "150",
           "--seed", str(seed), "--phases", "examples,coverage,fuzzing,stateful", "--generation-database",
           "none", "--no-color", "--request-timeout", "10"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache: not in the repo
    assert run.returncode == 0, f"schemathesis (seed {seed}) found problems:\n{run.stdout[-12000:]}{run.stderr}"
    assert "No issues found" in run.stdout, run.stdout[-3000:]


def produced(embedded_runtime) -> int:
    """How many events reached the item and user topics (a fresh group reads them all)."""
    s = embedded_runtime.settings
    consumer = embedded_runtime.event_log.consumer([s.topic_item_events, s.topic_user_events],
                                                   "audit-" + os.urandom(4).hex())
    n = 0
    while batch := consumer.poll(max_records=1000, timeout_ms=50):
        n += len(batch)
    consumer.close()
    return n


@pytest.mark.parametrize("path", [
    "/items/a/b/similar", "/items/a%2Fb/similar", "/items/../similar", "/items/%2E%2E/similar",
    "/items/%00/similar", "/items/" + "x" * 10_000 + "/similar", "/users/%00/recommendations",
    "/users/" + "u" * 10_000 + "/recommendations",
    "/items/1/similar?k=1.5", "/items/1/similar?k=1e3", "/items/1/similar?k=99999999999999999999999",
    "/items/1/similar?k=-1", "/users/u/recommendations?k=NaN", "/stats?window_s=inf",
])
def test_odd_paths_and_parameters_get_a_4xx_with_a_reason(embedded_runtime, path):
    client = TestClient(create_app(embedded_runtime.recommender))
    response = client.get(path)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
    assert response.json()["detail"], response.text


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe{\x00}\x00", "UTF-8"),
    (b'{"type": "item_upsert", "item_id": "\xc3\x28", "title": "x"}', "UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 50_000 + b"]" * 50_000, "over the limit"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    (b'{"type": "item_delete", "item_id": "1", "ts": 1e999}', "out of range"),
    (b'{"type": "item_delete", "item_id": "1", "ts": NaN}', "not valid JSON"),
    (b'{"type": "item_delete", "item_id": "\\ud800"}', "Unicode"),
    (b'{"type": "item_delete", "item_id": "a/b\\u0000"}', "control characters"),
    (b'{"type": "item_delete", "item_id": " padded"}', "start or end with a space"),
    (b'{"type": "item_delete", "item_id": "' + b"x" * 10_000 + b'"}', "at most 256 characters"),
    (b'{"type": "interaction", "user_id": "u", "item_id": "1", "kind": "read", "x": ' + b"9" * 5000 + b"}",
     "invalid JSON"),
    (b"", "invalid JSON"),
    (b"null", "must be a JSON object"),
])
def test_bad_event_bodies_get_a_4xx_with_a_reason_and_store_nothing(embedded_runtime, body, reason):
    client = TestClient(create_app(embedded_runtime.recommender))
    response = client.post("/events", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (413, 422), (response.status_code, response.text)
    assert reason in response.json()["detail"], response.text
    assert produced(embedded_runtime) == 0


def test_the_openapi_document_declares_what_the_routes_answer(embedded_runtime):
    doc = TestClient(create_app(embedded_runtime.recommender)).get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/items/{item_id}/similar"]["get"]["responses"]) >= {"200", "404", "422"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    body = paths["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Event"}
    event = doc["components"]["schemas"]["Event"]
    assert event["discriminator"]["propertyName"] == "type"
    upsert = doc["components"]["schemas"]["ItemUpsert"]["properties"]
    assert upsert["title"]["maxLength"] == embedded_runtime.settings.max_title_chars
    errors = [r for p in paths.values() for op in p.values() for code, r in op["responses"].items()
              if code.startswith(("4", "5")) and code != "503"]
    assert errors and all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
                          for r in errors)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
