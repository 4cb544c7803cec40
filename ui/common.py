"""What every page shares: the service client (from the settings), the catalog, small renderers."""

from __future__ import annotations

import streamlit as st

from ingest.settings import REPO_ROOT, Settings
from ui.client import ServiceClient

REPORTS_DIR = REPO_ROOT / "reports"
# The first user of the bundled interactions: `make demo` replays their books early, so the page
# opens on a real profile; while it is not there yet the service answers with its cold-start list.
DEFAULT_USER = "1"


def service_url() -> str:
    return Settings().resolved_service_url


@st.cache_resource(show_spinner=False)
def _client_for(url: str, api_key: str) -> ServiceClient:
    return ServiceClient(url, api_key=api_key)


def client() -> ServiceClient:
    settings = Settings()
    return _client_for(settings.resolved_service_url, settings.api_key.get_secret_value())


@st.cache_resource(show_spinner=False)
def catalog() -> list[dict]:
    """The bundled catalog, most-rated first: what the title search looks through."""
    from ingest.catalog import load_items

    items = sorted(load_items(), key=lambda i: -i.ratings_count)
    return [{"item_id": i.item_id, "title": i.title, "authors": i.authors, "year": i.year} for i in items]


def added_books() -> list[dict]:
    return st.session_state.setdefault("added_books", [])


def search_titles(query: str, limit: int = 20) -> list[dict]:
    query = query.strip().lower()
    if not query:
        return []
    books = added_books() + catalog()
    exact_id = [b for b in books if b["item_id"].lower() == query]
    matches = [b for b in books if query in b["title"].lower() or query in (b.get("authors") or "").lower()]
    return (exact_id + [m for m in matches if m not in exact_id])[:limit]


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def latency_line(latency: dict[str, float], round_trip_ms: float | None = None) -> str:
    """'profile 0.04 ms · search 0.31 ms · … = total 0.52 ms' in the order the stages ran."""
    stages = [f"{name} {fmt_ms(ms)}" for name, ms in latency.items() if name != "total"]
    line = " · ".join(stages) + f" = **total {fmt_ms(latency.get('total'))}**"
    if round_trip_ms is not None:
        line += f" (HTTP round trip from the UI {fmt_ms(round_trip_ms)})"
    return line


def book_line(item: dict) -> str:
    parts = [item.get("authors") or ""]
    if item.get("year"):
        parts.append(str(item["year"]))
    return " · ".join(p for p in parts if p)


def tags_line(item: dict, n: int = 4) -> str:
    tags = [t.replace("-", " ") for t in (item.get("tags") or [])[:n]]
    return " ".join(f"`{t}`" for t in tags)
