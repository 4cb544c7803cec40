"""Model: full precision vs ternary, from the benchmark reports in `reports/*.json`.

First the comparison a visitor came for: full precision, ONNX Runtime int8 (the usual way to shrink
a model, the reference) and the ternary model side by side — model size, encoder speed
(reports/speed.json) and quality retained (reports/quality.json) — in words and units. Below, every
report in detail: headline numbers, the command that produced it, tables where several variants share
numeric fields (with bar charts), and the raw JSON. The detailed part reads whatever keys a report
has (they belong to the benchmarks); a missing or unreadable file is a message, not an error.
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


# ----------------------------------------------------------------------------- the comparison

COLUMNS = ("Full precision (float32)", "ONNX Runtime int8 (reference)", "Ternary (ternrec)")
QUALITY_LABELS = ("full precision", "ONNX Runtime int8")  # reports/quality.json model labels
SPEED_RUNTIMES = (("torch-fp32",), ("ort-int8",), ("ternary-packed", "ternary-packed-int4emb"))
SPEED_ROWS = (("short_b1", "Encoder speed: book titles, one at a time"),
              ("short_b32", "Encoder speed: book titles, batches of 32"),
              ("long_b32", "Encoder speed: abstracts (256 tokens), batches of 32"))


def _shipped_ternary(models: dict) -> dict | None:
    """The committed ternary model's row: spec models/ternary-minilm (the working tree's, not an older
    commit's `git:REV:models/ternary-minilm`), else the last ternary row."""
    ternary = [m for k, m in models.items() if k.lower().startswith("ternary") and isinstance(m, dict)]
    shipped = [m for m in ternary if not str(m.get("spec", "")).startswith("git:")
               and str(m.get("spec", "")).rstrip("/").endswith("models/ternary-minilm")]
    return (shipped or ternary or [None])[-1]


def comparison(quality: dict, speed: dict) -> tuple[pd.DataFrame | None, dict]:
    """(rows of human-readable figures, one column per model; the raw figures the cards use)."""
    models = quality.get("models") if isinstance(quality.get("models"), dict) else {}
    cols = [models.get(QUALITY_LABELS[0]), models.get(QUALITY_LABELS[1]), _shipped_ternary(models)]
    cols = [c if isinstance(c, dict) else {} for c in cols]
    runtimes = speed.get("runtimes") if isinstance(speed.get("runtimes"), dict) else {}
    runs = [next((runtimes[r] for r in names if isinstance(runtimes.get(r), dict)), {}) for names in SPEED_RUNTIMES]
    fp = cols[0]
    rows: dict[str, list[str]] = {}
    raw: dict[str, list] = {}

    def add(label, values, fmt):
        if any(v is not None for v in values):
            rows[label] = [fmt(v, i) if v is not None else "–" for i, v in enumerate(values)]
            raw[label] = list(values)

    sizes = [c.get("file_bytes") or r.get("file_bytes") for c, r in zip(cols, runs, strict=True)]
    add("Model file", sizes, lambda v, i: f"{v / 1e6:.1f} MB" + (f" ({v / sizes[0]:.2f}× full precision)"
                                                                  if i and sizes[0] else ""))
    for key, label in SPEED_ROWS:
        values = [(r.get("sentences_per_s") or {}).get(key) for r in runs]
        add(label, values, lambda v, i: f"{v:,.0f} texts/s")

    def retained(key):
        return lambda v, i: f"{v:.3f}" + (f" ({100 * v / fp[key]:.1f}% of full precision)" if i and fp.get(key) else "")

    add("Similarity: STS-B dev Spearman", [c.get("stsb_dev_spearman") for c in cols], retained("stsb_dev_spearman"))
    for key, label in (("catalog_neighbour_recall@10", "Similar books: 10 nearest shared with full precision"),
                       ("catalog_neighbour_recall@10_heldout", "… for books never seen in training"),
                       ("catalog_title_authors_neighbour_recall@10", "… from \"title by authors\" only")):
        add(label, [c.get(key) for c in cols], lambda v, i: f"{100 * v:.0f}%")
    add("Search: SciFact nDCG@10", [c.get("scifact_ndcg@10") for c in cols], retained("scifact_ndcg@10"))
    errors = [c.get("rec_hitrate@10_se") for c in cols]
    add("Recommendations: to_read HitRate@10", [c.get("rec_hitrate@10") for c in cols],
        lambda v, i: f"{100 * v:.2f}%" + (f" ± {100 * errors[i]:.2f}" if errors[i] else ""))
    if not rows:
        return None, raw
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS)), raw


def render_comparison(quality: dict, speed: dict) -> None:
    frame, raw = comparison(quality, speed)
    if frame is None:
        st.info("No comparison yet: run `python -m bench.quality report` and `python -m bench.speed`.")
        return
    st.subheader("Full precision, int8 and ternary side by side")
    cards = [("Model file", "Ternary model file", lambda v: f"{v / 1e6:.1f} MB",
              lambda t, p: f"{t / p:.2f}× the int8 file", "off"),
             ("Encoder speed: book titles, batches of 32", "Ternary speed (titles, batch 32)",
              lambda v: f"{v:,.0f} texts/s", lambda t, p: f"{t / p:.2f}× int8", "normal"),
             ("Similarity: STS-B dev Spearman", "Ternary STS-B", lambda v: f"{v:.3f}",
              lambda t, p: f"{100 * (t - p) / p:+.1f}% vs int8", "normal"),
             ("Similar books: 10 nearest shared with full precision", "Ternary similar books",
              lambda v: f"{100 * v:.0f}% shared", lambda t, p: f"{100 * (t - p):+.0f} points vs int8", "normal")]
    shown = [c for c in cards if c[0] in raw and raw[c[0]][2] is not None]
    for column, (key, label, value, delta, color) in zip(st.columns(max(len(shown), 1)), shown, strict=False):
        t, p = raw[key][2], raw[key][1]
        column.metric(label, value(t), delta(t, p) if p else None, delta_color=color)
    st.dataframe(frame, width="stretch")
    st.caption("ONNX Runtime int8 (dynamic quantization of the same base model) is what one would use "
               "instead of ternary weights: the reference. Quality: `python -m bench.quality report` "
               "(reports/quality.json); speed: `python -m bench.speed` (reports/speed.json), 2 threads on "
               "this machine. Similar books: of a book's 10 nearest books under full precision, the share "
               "the model also puts in its 10 nearest (10,000 books).")


def render(reports_dir: Path | str = REPORTS_DIR) -> None:
    reports_dir = Path(reports_dir)
    st.markdown("Full precision vs ternary: size, speed and quality, as measured by the benchmarks "
                "(`make bench`) and recorded in `reports/*.json`.")
    quality, _ = load_report(reports_dir / "quality.json")
    speed, _ = load_report(reports_dir / "speed.json")
    render_comparison(quality if isinstance(quality, dict) else {}, speed if isinstance(speed, dict) else {})
    st.subheader("Every report in detail")
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
