"""Self-taught distillation of a ternary student: `python -m encoder.distill`.

The teacher is the frozen full-precision base model; the student is the same model with every
transformer Linear replaced by a TernaryLinear (encoder/ternary.py), trained through the
straight-through estimator. One file, read top to bottom: config -> data -> losses -> main
(models, teacher targets, initialisation, loop, export).

Cheap steps: the teacher's hidden states and pooled embeddings of every training text are computed
once and read from disk (encoder/teacher_targets.py), so a step is the student's forward and
backward only; each batch is split into up to `chunks` length buckets, each padded to its own longest
text; catalog texts are truncated short (item text 48 tokens, "title by authors" 32; 99% of them fit).

Losses (weights are flags; 0 switches one off):
  hid   token hidden-state MSE (padding masked) relative to the teacher's mean square, on every
        layer (--layers all) or the last
  cos   1 - cosine of the mean-pooled sentence embeddings
  sim   in-batch similarity structure: KL(teacher || student) of each row's softmax(cos / tau) over
        the other sentences of the batch
  list  listwise neighbourhood loss: KL(teacher || student) of each sentence's softmax(cos / tau)
        over a bank of teacher embeddings of every training text (the catalog items among them), its
        own entry left out; its weight ramps from list_start x w_list to w_list over the run
Batches: catalog_groups x (a catalog text + group_members - 1 of its 10 teacher neighbours, item
texts or "title by authors" alike), the rest general text. Training text: the catalog's training
items (encoder/data.py holds 20% out), their "title by authors", STS-B train sentences (no scores),
SciFact titles and abstracts. Never STS-B dev scores, any test labels or a held-out item.
Initialisation before the loop: `init` = gptq / grid (encoder/calibration.py) or none.

Examples:
  python -m encoder.distill                                  # the default run (<= 60 min here)
  python -m encoder.distill --budget-minutes 10 --run runs/abl/x --no-export
  python -m encoder.distill --resume --run runs/distill      # continue from the last checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from encoder.data import default_data_dir, training_texts
from encoder.neighbours import top_k
from encoder.teacher_targets import build_teacher_targets, mean_pool, pad_batch
from encoder.ternary import ternarize_model, ternary_layers

# ----------------------------------------------------------------------------- config
# Defaults = the committed model's run. Every key is a --flag (underscores -> dashes).
config = dict(
    base_model="",               # "" = the bundled all-MiniLM-L6-v2
    data="",                     # shared data directory ("" = $TERNREC_DATA or ../shared/data)
    scheme="row_opt+learn",      # see encoder/ternary.py
    scale_group=0,               # >0: one scale per this many inputs (float ablation; cannot export)
    init="gptq",                 # gptq | grid | none: activation-aware fit before training
    init_stages="stage",         # stage: Q/K/V, attn out, FFN up, FFN down in turn; block: whole blocks
    calib_texts=512,
    run="runs/distill",          # checkpoints + logs (git-ignored)
    out_dir="models/ternary-minilm",
    token_embedding="int4g32",   # storage of the exported token table (encoder/ternary_format.py)
    budget_minutes=58.0,         # wall clock of the whole run (setup, init, loop); lr schedule follows it
    max_steps=1_000_000,
    batch_size=32,
    catalog_groups=6,            # per batch: groups of (catalog text + its teacher neighbours)
    group_members=4,
    max_len_item=48,
    max_len_title_authors=32,
    max_len_general=64,
    teacher="cache",             # cache: precomputed hidden states; live: teacher forward every step
    chunks=3,                    # length buckets per batch; 0 = catalog part / general part
    lr=2e-4,
    warmup_steps=30,
    min_lr_frac=0.05,
    weight_decay=0.0,
    grad_clip=1.0,
    w_hid=1.0,
    layers="all",                # "last" or "all": which hidden states the hid loss matches
    w_cos=1.0,
    w_sim=1.0,
    sim_tau=0.05,
    w_list=1.0,
    list_tau=0.05,
    list_start=0.25,             # the list weight's multiplier at step 0 (1 at the end)
    freeze_ln=False,             # LayerNorm (float) frozen too; embeddings are always frozen
    seed=1337,
    threads=2,
    ckpt_every_minutes=5.0,
    resume=False,
    eval="stsb,catalog,catalog_ta",  # tasks of encoder.evaluate run on the student at the end ("" = none)
    export=True,
    limit_texts=0,               # >0: only the first this many texts of each kind (smoke runs, tests)
    notes="",
)
KINDS = ("item", "title_authors", "general")


def parse_config(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return vars(parser.parse_args(argv))


# ----------------------------------------------------------------------------- data

class Pool:
    """Every training text once, in kind order (items, "title by authors", general), with its kind,
    maximum length, and (once the teacher targets exist) the teacher neighbours of catalog texts."""

    def __init__(self, by_kind: dict[str, list[str]], cfg: dict):
        self.texts, self.kind, self.max_len = [], [], []
        for k, kind in enumerate(KINDS):
            self.texts += by_kind[kind]
            self.kind += [k] * len(by_kind[kind])
            self.max_len += [cfg[f"max_len_{kind}"]] * len(by_kind[kind])
        self.kind = np.asarray(self.kind)
        self.of_kind = [np.flatnonzero(self.kind == k) for k in range(len(KINDS))]
        self.neighbours: dict[int, np.ndarray] = {}

    def find_neighbours(self, pooled: np.ndarray, k: int = 10) -> None:
        """Teacher top-k within each catalog kind (pool indices)."""
        for kind in (0, 1):
            members = self.of_kind[kind]
            self.neighbours[kind] = members[top_k(pooled[members], pooled[members], k, exclude_self=True)]

    def batch(self, rng: random.Random, cfg: dict) -> list[int]:
        """catalog_groups x (anchor + group_members-1 of its teacher neighbours), the rest general."""
        out: list[int] = []
        for _ in range(cfg["catalog_groups"]):
            kind = rng.randrange(2)
            row = rng.randrange(len(self.of_kind[kind]))
            out += [int(self.of_kind[kind][row])]
            out += [int(j) for j in rng.sample(list(self.neighbours[kind][row]), cfg["group_members"] - 1)]
        general = self.of_kind[2]
        out += [int(general[rng.randrange(len(general))]) for _ in range(max(0, cfg["batch_size"] - len(out)))]
        return out[: cfg["batch_size"]]


def split_by_length(idx: list[int], lengths: np.ndarray, chunks: int, min_size: int = 4) -> list[list[int]]:
    """Length-sorted contiguous chunks (at most `chunks`, each >= min_size texts) with the fewest padded
    tokens: sum over chunks of size x longest. Exhaustive over split points (a batch is small)."""
    order = sorted(idx, key=lambda i: lengths[i])
    n = len(order)
    lens = [int(lengths[i]) for i in order]
    best = (n * lens[-1], [order])
    if chunks >= 2:
        for a in range(min_size, n - min_size + 1):
            cost = a * lens[a - 1] + (n - a) * lens[-1]
            if cost < best[0]:
                best = (cost, [order[:a], order[a:]])
            if chunks >= 3:
                for b in range(a + min_size, n - min_size + 1):
                    cost = a * lens[a - 1] + (b - a) * lens[b - 1] + (n - b) * lens[-1]
                    if cost < best[0]:
                        best = (cost, [order[:a], order[a:b], order[b:]])
    return best[1]


def calibration_batches(pool: Pool, targets, n: int, seed: int, batch_size: int = 32) -> list[dict]:
    """n training texts, 3/4 catalog (both kinds) and 1/4 general, as padded length-sorted batches."""
    rng = random.Random(seed)
    catalog = np.concatenate(pool.of_kind[:2])
    idx = rng.sample(list(catalog), n - n // 4) + rng.sample(list(pool.of_kind[2]), n // 4)
    idx = sorted(idx, key=lambda i: targets.lengths[i])
    out = []
    for s in range(0, len(idx), batch_size):
        ids, mask = pad_batch([targets.token_ids(i) for i in idx[s:s + batch_size]])
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ----------------------------------------------------------------------------- losses

def hidden_mse(hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over real tokens, relative to the teacher's mean square so every layer weighs the same."""
    m = mask.unsqueeze(-1).to(hs.dtype)
    err = ((hs - ht) ** 2 * m).sum()
    return err / ((ht ** 2) * m).sum().clamp_min(1e-9)


def similarity_kl(ps: torch.Tensor, pt: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) of each sentence's softmax over its in-batch cosine similarities."""
    ps, pt = F.normalize(ps, dim=-1), F.normalize(pt, dim=-1)
    eye = torch.eye(len(ps), dtype=torch.bool)
    ss = (ps @ ps.T / tau).masked_fill(eye, -1e4)
    st = (pt @ pt.T / tau).masked_fill(eye, -1e4)
    return F.kl_div(F.log_softmax(ss, -1), F.log_softmax(st, -1), log_target=True, reduction="batchmean")


def listwise_kl(ps: torch.Tensor, pt: torch.Tensor, bank: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) of each sentence's softmax(cos / tau) over the teacher embeddings in
    `bank` (L2-normalized rows), the sentence's own row `own[i]` (-1: none) left out: the student is
    taught which bank texts the teacher puts nearest, and in what order."""
    ps, pt = F.normalize(ps, dim=-1), F.normalize(pt, dim=-1)
    ls, lt = ps @ bank.T / tau, pt @ bank.T / tau
    rows = torch.nonzero(own >= 0).flatten()
    ls = ls.index_put((rows, own[rows]), torch.tensor(-1e4))
    lt = lt.index_put((rows, own[rows]), torch.tensor(-1e4))
    return F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")


def compute_losses(student, parts: list[dict], pooled_t: torch.Tensor, cfg: dict, bank=None, own=None,
                   list_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """All losses for one batch. `parts`: the batch's length buckets, each with input_ids,
    attention_mask and the teacher's "hidden" states (a list over layers); `pooled_t`: the teacher's
    pooled embeddings in the order of the parts' rows. The pooled-embedding losses see the whole batch."""
    hid, n_tok, pooled_s = 0.0, 0, []
    for part in parts:
        mask = part["attention_mask"]
        out = student(input_ids=part["input_ids"], attention_mask=mask, output_hidden_states=cfg["w_hid"] > 0)
        if cfg["w_hid"] > 0:
            layers = [-1] if cfg["layers"] == "last" else range(len(part["hidden"]))
            err = sum(hidden_mse(out.hidden_states[1 + i if i >= 0 else i], part["hidden"][i], mask)
                      for i in layers)
            weight = int(mask.sum())  # parts weigh by their number of real tokens
            hid, n_tok = hid + err / len(layers) * weight, n_tok + weight
        pooled_s.append(mean_pool(out.last_hidden_state, mask))
    ps = torch.cat(pooled_s)
    losses = {"hid": hid / max(n_tok, 1) if cfg["w_hid"] > 0 else torch.zeros(()),
              "cos": (1 - F.cosine_similarity(ps, pooled_t, dim=-1)).mean(),
              "sim": similarity_kl(ps, pooled_t, cfg["sim_tau"])}
    weights = {"hid": cfg["w_hid"], "cos": cfg["w_cos"], "sim": cfg["w_sim"]}
    if bank is not None and cfg["w_list"] > 0:
        losses["list"] = listwise_kl(ps, pooled_t, bank, own, cfg["list_tau"])
        weights["list"] = cfg["w_list"] * list_weight
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def lr_at(step: int, progress: float, cfg) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac over the budget (steps or minutes)."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg["lr"] * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * cos)


# ----------------------------------------------------------------------------- checkpoints
# safetensors for tensors (student trainables, Adam moments, torch RNG) + JSON for the rest.

def save_checkpoint(run: Path, student, opt, state: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in student.named_parameters()
               if p.requires_grad}
    tensors.update({f"buffer.{n}": b.detach().contiguous() for n, b in student.named_buffers()
                    if n.endswith("row_ratio")})
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(-1).contiguous() if v.dim() == 0 else v.contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(run / "ckpt.safetensors.tmp"))
    groups = [{k: v for k, v in g.items()} for g in opt.state_dict()["param_groups"]]
    (run / "ckpt.json.tmp").write_text(json.dumps({**state, "param_groups": groups}))
    os.replace(run / "ckpt.safetensors.tmp", run / "ckpt.safetensors")  # atomic: never half-written
    os.replace(run / "ckpt.json.tmp", run / "ckpt.json")


def load_checkpoint(run: Path, student, opt) -> dict:
    tensors = load_file(str(run / "ckpt.safetensors"))
    meta = json.loads((run / "ckpt.json").read_text())
    params, buffers = dict(student.named_parameters()), dict(student.named_buffers())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                params[key[len("model."):]].copy_(value)
            elif key.startswith("buffer."):
                buffers[key[len("buffer."):]].copy_(value)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = value.reshape(()) if k == "step" else value
    opt.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    cfg = parse_config(argv)
    t_run, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log at once
    from sentence_transformers import SentenceTransformer

    from encoder.base_model import default_base_model
    from encoder.calibration import fit_ternary, stages_of
    from encoder.embedding_cache import model_fingerprint

    base = cfg["base_model"] or default_base_model()
    data = Path(cfg["data"]) if cfg["data"] else default_data_dir()
    run = Path(cfg["run"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    rng = random.Random(cfg["seed"])

    # models: frozen teacher, ternary student (embeddings frozen so the table stays the base's)
    teacher_st = SentenceTransformer(base, device="cpu").eval()
    teacher, tokenizer = teacher_st[0].auto_model, teacher_st.tokenizer
    for p in teacher.parameters():
        p.requires_grad_(False)
    student_st = ternarize_model(SentenceTransformer(base, device="cpu"), cfg["scheme"], cfg["scale_group"])
    student = student_st[0].auto_model

    # teacher targets (built once per teacher and texts, then read from disk)
    texts = training_texts(data)
    pool = Pool({k: v[:cfg["limit_texts"]] for k, v in texts.items()} if cfg["limit_texts"] else texts, cfg)
    targets = build_teacher_targets(teacher, tokenizer, pool.texts, pool.max_len,
                                    "sentence-transformers:" + model_fingerprint(base),
                                    hidden=cfg["w_hid"] > 0)  # kept even for --teacher live: one build
    pool.find_neighbours(targets.pooled)
    bank = torch.from_numpy(targets.pooled)
    print(f"data: {', '.join(f'{len(m)} {k}' for k, m in zip(KINDS, pool.of_kind, strict=True))} texts; "
          f"teacher targets {targets.directory} ({targets.meta['tokens']} tokens); "
          f"setup {time.perf_counter() - t_run:.0f} s")

    for name, p in student.named_parameters():
        frozen = name.startswith("embeddings.word") or name.startswith("embeddings.position") \
            or name.startswith("embeddings.token_type") or (cfg["freeze_ln"] and "LayerNorm" in name)
        p.requires_grad_(not frozen)
    if cfg["init"] != "none" and not cfg["resume"]:
        t0 = time.perf_counter()
        batches = calibration_batches(pool, targets, cfg["calib_texts"], cfg["seed"])
        student.eval()
        errs = fit_ternary(student, lambda b: student(**b), batches, method=cfg["init"],
                           stages=stages_of(student, per=cfg["init_stages"]))
        print(f"init {cfg['init']} on {cfg['calib_texts']} texts: mean relative output error "
              f"{sum(errs.values()) / len(errs):.4f} ({time.perf_counter() - t0:.0f} s)")
    trainable = [p for p in student.parameters() if p.requires_grad]
    print(f"student: {len(ternary_layers(student))} ternary linears ({cfg['scheme']}"
          f"{', scale group ' + str(cfg['scale_group']) if cfg['scale_group'] else ''}), "
          f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters")
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    # state (or resume)
    step, elapsed, history = 0, 0.0, []
    setup_s = time.perf_counter() - t_run
    if cfg["resume"] and (run / "ckpt.json").is_file():
        meta = load_checkpoint(run, student, opt)
        step, elapsed, history, setup_s = meta["step"], meta["elapsed"], meta["history"], meta["setup_seconds"]
        rng.setstate((meta["rng_py"][0], tuple(meta["rng_py"][1]), meta["rng_py"][2]))
        print(f"resumed from {run} at step {step} ({elapsed / 60:.1f} min)")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=1))

    def state():
        return {"step": step, "elapsed": elapsed, "history": history, "setup_seconds": setup_s,
                "rng_py": rng.getstate()}

    # loop: the budget covers setup + loop; 1 minute is kept for the export
    loop_s = max(60.0, cfg["budget_minutes"] * 60 - setup_s - (60 if cfg["export"] else 0))
    live = cfg["teacher"] == "live" and cfg["w_hid"] > 0
    student.train()
    t_start, t_ckpt, t_log, ema = time.perf_counter() - elapsed, time.perf_counter(), 0.0, None
    while step < cfg["max_steps"] and elapsed < loop_s:
        progress = max(step / cfg["max_steps"], elapsed / loop_s)
        lr = lr_at(step, progress, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = pool.batch(rng, cfg)
        if cfg["chunks"]:
            groups = split_by_length(idx, targets.lengths, cfg["chunks"])
        else:  # the catalog part and the general part, each padded on its own
            n_cat = cfg["catalog_groups"] * cfg["group_members"]
            groups = [g for g in (idx[:n_cat], idx[n_cat:]) if g]
        parts = [targets.batch(g) for g in groups]
        if live:
            with torch.no_grad():
                for part in parts:
                    out = teacher(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                                  output_hidden_states=True)
                    part["hidden"] = list(out.hidden_states[1:])
        order = [i for g in groups for i in g]
        own = torch.tensor(order, dtype=torch.long)
        losses = compute_losses(student, parts, bank[own], cfg, bank, own, cfg["list_start"] +
                                (1 - cfg["list_start"]) * min(progress, 1.0))
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_start
        vals = {k: round(v.item(), 5) for k, v in losses.items()}
        ema = vals["total"] if ema is None else 0.95 * ema + 0.05 * vals["total"]
        if step % 10 == 0 or step == 1:
            history.append({"step": step, "min": round(elapsed / 60, 2), "lr": lr, **vals})
        if time.perf_counter() - t_log > 30:
            t_log = time.perf_counter()
            print(f"step {step} {elapsed / 60:.1f}/{loop_s / 60:.1f} min ({step / elapsed:.2f} steps/s) "
                  f"loss {ema:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in vals.items() if k != "total")
                  + f" lr {lr:.1e}")
        if time.perf_counter() - t_ckpt > cfg["ckpt_every_minutes"] * 60:
            save_checkpoint(run, student, opt, state())
            t_ckpt = time.perf_counter()
    save_checkpoint(run, student, opt, state())
    summary = {"steps": step, "loop_minutes": round(elapsed / 60, 2),
               "steps_per_s": round(step / max(elapsed, 1e-9), 3),
               "setup_minutes": round(setup_s / 60, 2), "last": history[-1] if history else {}}
    print(f"trained {step} steps in {elapsed / 60:.1f} min ({summary['steps_per_s']} steps/s) after "
          f"{setup_s / 60:.1f} min of setup; last losses {summary['last']}")

    # evaluate (optional) and export
    result = {"run": str(run), **summary, "config": cfg}
    if cfg["eval"]:
        from encoder.evaluate import evaluate_encoder, full_precision
        from encoder.loading import SentenceTransformerEncoder

        fp, fp_key = full_precision(base)
        result.update(evaluate_encoder(SentenceTransformerEncoder.from_model(student_st, f"student:{run}"),
                                       fp, tuple(cfg["eval"].split(",")), data, reference_key=fp_key))
        student.train()
        print(json.dumps({k: v for k, v in result.items() if k not in ("config", "last")}, indent=1))
    if cfg["export"]:
        from encoder.ternary_export import save_ternary_model

        info = {k: v for k, v in cfg.items() if k not in ("resume", "eval", "export", "out_dir", "run", "data")}
        save_ternary_model(student_st, cfg["out_dir"], base_model=base, token_embedding=cfg["token_embedding"],
                           extra={"distillation": {**info, **{k: v for k, v in summary.items() if k != "last"}}})
        print(f"exported the ternary model to {cfg['out_dir']}")
    result["total_minutes"] = round((time.perf_counter() - t_run) / 60, 2)
    result["loadavg"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    (run / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
