"""The ternrec UI: `streamlit run ui/app.py` (started by `make demo` on TERNREC_UI_PORT).

Talks to the recommender over HTTP only (ui/client.py), at TERNREC_SERVICE_URL (or the URL made of
TERNREC_HTTP_HOST and TERNREC_HTTP_PORT): the same page works against `make demo`, `make stack`
and docker compose.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run ui/app.py` puts ui/ on sys.path, not the repository: make `ui.*` and `ingest.*` importable
# from this checkout (ingest.settings.REPO_ROOT, the app's one, cannot be imported before this).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from ui import add_book, live, model, recommend  # noqa: E402
from ui.client import ServiceError  # noqa: E402
from ui.common import client, service_url  # noqa: E402


def header() -> None:
    title, status = st.columns([2, 3], vertical_alignment="bottom")
    title.markdown("## ternrec")
    title.caption("Real-time book recommendations from a ternary-weight embedding model on a packed 2-bit "
                  "CPU kernel.")
    with status:
        try:
            health = client().health()
        except ServiceError as exc:
            st.error(exc.message)
            return
        ok = health.get("status") == "ok"
        st.markdown(f":{'green' if ok else 'orange'}-badge[{health.get('status', '?')}] "
                    f"**{health.get('index_size', 0):,}** books searchable · service `{service_url()}` · "
                    f"[API docs]({service_url()}/docs) · [metrics]({service_url()}/metrics)")


def main() -> None:
    st.set_page_config(page_title="ternrec", page_icon=":material/menu_book:", layout="wide",
                       initial_sidebar_state="collapsed")
    header()
    # Only the open tab runs: a hidden Live page must not poll the service (nor compete with a click).
    pages = {"Recommend": recommend.render, "Live": live.render, "Model": model.render, "Add a book": add_book.render}
    for tab, render in zip(st.tabs(list(pages), key="tab", on_change="rerun"), pages.values(), strict=True):
        if tab.open:
            with tab:
                render()


main()
