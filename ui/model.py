"""Model: full precision vs ternary, from the benchmark reports in `reports/*.json`.

The reports are written by the benchmarks (`make bench` and the encoder's evaluation); their exact
keys belong to them, so this page reads whatever is there: headline numbers, the command that
produced each file, tables where several variants share numeric fields (with bar charts), and the
raw JSON. A missing or unreadable file is a message, not an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from ui.common import REPORTS_DIR

KNOWN_REPORTS = {
    "quality.json": "Quality: retrieval and similarity scores",
    "speed.json": "Speed: encoder throughput and latency",
    "kernel.json": "Packed 2-bit kernel",
    "ann.json": "Vector index (ANN)",
    "pipeline.json": "Streaming pipeline",
}
COMMAND_KEYS = ("command", "cmd", "commands", "produced_by", "how")
MAX_CHARTS = 4
MAX_FIGURES = 12
CHART_FIRST = ("p50", "p99", "per_s", "ms", "ratio", "score", "ndcg", "recall", "spearman", "mb", "size", "speedup",
               "retained", "bytes", "accuracy")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if not _is_number(value):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _label(path: tuple[str, ...]) -> str:
    return " › ".join(path) if path else "summary"


def commands(report: Any, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every recorded command in the report, with where it sits."""
    found = []
    if isinstance(report, dict):
        for key, value in report.items():
            if key in COMMAND_KEYS and isinstance(value, str):
                found.append((_label(path), value))
            elif key in COMMAND_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
                found += [(_label(path), v) for v in value]
            else:
                found += commands(value, (*path, str(key)))
    elif isinstance(report, list):
        for n, value in enumerate(report):
            found += commands(value, (*path, str(n)))
    return found


def headline(report: dict) -> dict[str, Any]:
    """Top-level scalar figures (numbers and short strings)."""
    return {k: v for k, v in report.items()
            if k not in COMMAND_KEYS and (_is_number(v) or (isinstance(v, str) and len(v) <= 40))}


def _scalar_dict(value: dict) -> bool:
    return all(_is_number(v) or isinstance(v, str) or v is None for v in value.values())


def _flatten(record: dict, prefix: str = "") -> dict:
    """One row: scalars as they are, dicts of scalars as 'key.sub' columns (e.g. 'latency_ms.p99')."""
    row = {}
    for key, value in record.items():
        if _is_number(value) or isinstance(value, str):
            row[prefix + str(key)] = value
        elif isinstance(value, dict) and _scalar_dict(value):
            row.update(_flatten(value, f"{prefix}{key}."))
    return row


def _nested(value: dict) -> bool:
    """Holds something a table row cannot: lists, or dicts that are not plain figures."""
    return any(isinstance(x, list) or (isinstance(x, dict) and not _scalar_dict(x)) for x in value.values())


def tables(report: Any, path: tuple[str, ...] = ()) -> list[tuple[str, pd.DataFrame]]:
    """Tables found in the report: sibling records sharing numeric fields (one row each, e.g. full
    precision vs ternary), lists of records, and named groups of figures."""
    found: list[tuple[str, pd.DataFrame]] = []
    if isinstance(report, dict):
        records = {k: _flatten(v) for k, v in report.items() if isinstance(v, dict)}
        numeric = {k: {f for f, x in row.items() if _is_number(x)} for k, row in records.items()}
        shared = set.intersection(*numeric.values()) if len(numeric) >= 2 else set()
        rows = {k: row for k, row in records.items() if numeric[k] & shared}
        if rows:
            found.append((_label(path), pd.DataFrame.from_dict(rows, orient="index")))
        elif path and _scalar_dict(report) and sum(_is_number(v) for v in report.values()) >= 2:
            figures = {k: v for k, v in report.items() if _is_number(v)}
            found.append((_label(path), pd.DataFrame({path[-1]: figures})))
        for key, value in report.items():
            if key in rows:  # its plain figures are in the table: look only at what did not fit
                for sub, inner in value.items():
                    if isinstance(inner, list) or (isinstance(inner, dict) and not _scalar_dict(inner)):
                        found += tables(inner, (*path, str(key), str(sub)))
            elif isinstance(value, (dict, list)):
                found += tables(value, (*path, str(key)))
    elif isinstance(report, list) and report and all(isinstance(r, dict) for r in report):
        frame = pd.DataFrame([_flatten(r) for r in report])
        if any(pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns):
            found.append((_label(path), frame))
        for n, value in enumerate(report):
            for key, inner in value.items():
                if isinstance(inner, list) or (isinstance(inner, dict) and not _scalar_dict(inner)):
                    found += tables(inner, (*path, str(n), str(key)))
    return found


def _charts(frame: pd.DataFrame) -> None:
    """Bar charts, one per numeric column, when the table compares a handful of variants."""
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any()]
    if len(frame) < 2 or len(frame) > 12 or not numeric:
        return
    labels = frame.index.astype(str)
    text_cols = [c for c in frame.columns if c not in numeric]
    if isinstance(frame.index, pd.RangeIndex):  # rows of a list: label them by their first field
        key = text_cols[0] if text_cols else numeric[0]
        labels = frame[key].astype(str).map(lambda v, k=key: f"{k}={v}" if not text_cols else v)
        numeric = [c for c in numeric if c != key]
    # Figures people compare first (latency percentiles, throughput, quality, size) get the charts.
    charts = sorted(numeric, key=lambda c: not any(w in str(c).lower() for w in CHART_FIRST))[:MAX_CHARTS]
    if not charts:
        return
    for column, name in zip(st.columns(len(charts)), charts, strict=True):
        with column:
            st.caption(str(name))
            st.bar_chart(pd.Series(frame[name].to_numpy(), index=labels, name=str(name)), height=180)


def load_report(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {exc}"


def render_report(name: str, title: str, report: Any) -> None:
    st.subheader(title)
    st.caption(f"reports/{name}")
    if isinstance(report, dict):
        figures = list(headline(report).items())[:MAX_FIGURES]
        for row in range(0, len(figures), 4):
            for column, (key, value) in zip(st.columns(4), figures[row:row + 4], strict=False):
                column.metric(key, _fmt(value))
    for where, command in commands(report):
        st.markdown(f"Produced by ({where}):")
        st.code(command, language="bash")
    for where, frame in tables(report):
        st.markdown(f"**{where}**")
        st.dataframe(frame, width="stretch")
        _charts(frame)
    with st.expander("raw JSON"):
        st.json(report, expanded=False)


def render(reports_dir: Path | str = REPORTS_DIR) -> None:
    reports_dir = Path(reports_dir)
    st.markdown("Full precision vs ternary: size, speed and quality, as measured by the benchmarks "
                "(`make bench`) and recorded in `reports/*.json`.")
    names = list(KNOWN_REPORTS) + sorted(p.name for p in reports_dir.glob("*.json") if p.name not in KNOWN_REPORTS)
    missing = []
    for name in names:
        report, problem = load_report(reports_dir / name)
        if problem == "missing":
            missing.append(name)
        elif problem:
            st.warning(f"reports/{name} is {problem}")
        else:
            render_report(name, KNOWN_REPORTS.get(name, name.removesuffix(".json")), report)
            st.divider()
    if missing:
        st.info("Not measured yet: " + ", ".join(f"`reports/{n}`" for n in missing)
                + ". Run `make bench` to produce them.")
