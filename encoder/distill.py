"""Self-taught distillation of a ternary student: `python -m encoder.distill`.

The teacher is a frozen full-precision copy of the base model; the student is the same model with
every transformer Linear replaced by a TernaryLinear (encoder/ternary.py), trained through the
straight-through estimator. One file, read top to bottom: config -> data -> models -> loop -> export.

Losses (weights are flags; 0 switches one off):
  hid   token hidden-state MSE (padding masked), per layer relative to the teacher's mean square,
        on the last layer or on every layer (--layers all)
  cos   1 - cosine of the mean-pooled sentence embeddings
  sim   in-batch similarity structure: KL(teacher || student) of each row's softmax(cos / tau) over
        the other sentences of the batch; batches are built from catalog items and their teacher
        nearest neighbours so the loss sees (and fixes) the neighbourhoods a recommender serves
  att   attention-map KL on every layer (needs eager attention: slower)
Training text: catalog item texts, "title by authors" strings, STS-B train sentences (no scores)
and SciFact titles + abstracts. Never STS-B dev scores or any test data.

Examples:
  python -m encoder.distill                                  # the default run (<= 60 min here)
  python -m encoder.distill --max-minutes 8 --run runs/a1 --eval stsb,catalog,rec --no-export
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
from tqdm import tqdm

from encoder.ternary import calibrate_ternary, ternarize_model, ternary_layers

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()

# ----------------------------------------------------------------------------- config
# Defaults = the committed model's run. Every key is a --flag (underscores -> dashes).
config = dict(
    base_model="",               # "" = the bundled all-MiniLM-L6-v2
    scheme="row_opt+learn",      # see encoder/ternary.py
    run="runs/distill",          # checkpoints + logs (git-ignored)
    out_dir="models/ternary-minilm",
    max_steps=3000,
    max_minutes=45.0,            # wall-clock budget; the lr schedule ends at whichever comes first
    batch_size=32,
    catalog_groups=6,            # per batch: groups of (catalog anchor + its teacher neighbours)
    group_size=4,
    neighbour_batches=True,      # False: the catalog part of a batch is random items instead
    max_len=64,
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
    w_att=0.0,
    calibrate=256,               # >0: activation-aware scale/threshold/bias fit on this many texts
                                 # before training (needs a "+learn" scheme)
    freeze_ln=False,             # LayerNorm (float) frozen too; embeddings are always frozen
    seed=1337,
    threads=2,
    ckpt_every_minutes=5.0,
    resume=False,
    eval="",                     # e.g. "stsb,catalog,rec": evaluate the student at the end
    export=True,
    notes="",
)


def parse_config() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return vars(parser.parse_args())


# ----------------------------------------------------------------------------- data

def training_texts() -> tuple[list[str], list[str]]:
    """(catalog item texts in catalog order, general texts). Unlabeled text only."""
    from encoder.evaluate import catalog_texts, read_stsb

    _, items, short = catalog_texts()
    s1, s2, _ = read_stsb(DATA / "stsbenchmark", "train")  # sentences only; scores are dropped
    general = sorted(set(s1) | set(s2))
    with open(DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            general += [doc["title"], doc["text"]]
    return list(items), general + list(short)


def teacher_neighbours(teacher, base: str, items: list[str], k: int = 10) -> np.ndarray:
    """Each catalog item's k nearest items under the teacher (shares the evaluation's cache)."""
    from encoder.evaluate import ModelEncoder, encode_cached, top_k

    emb = encode_cached(ModelEncoder(teacher, "full-precision:" + Path(base).name), items, "catalog", True)
    return top_k(emb, emb, k, exclude_self=True)


def get_batch(rng: random.Random, items, general, neighbours, cfg) -> list[str]:
    """catalog_groups x (anchor + group_size-1 of its 10 teacher neighbours), rest general text."""
    batch = []
    for _ in range(cfg["catalog_groups"]):
        a = rng.randrange(len(items))
        if cfg["neighbour_batches"]:
            group = [a] + rng.sample(list(neighbours[a]), cfg["group_size"] - 1)
        else:
            group = [a] + [rng.randrange(len(items)) for _ in range(cfg["group_size"] - 1)]
        batch += [items[j] for j in group]
    batch += rng.sample(general, max(0, cfg["batch_size"] - len(batch)))
    return batch[: cfg["batch_size"]]


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """n texts, 3/4 catalog items and 1/4 general text, fixed by the seed."""
    items, general = training_texts()
    rng = random.Random(seed)
    return rng.sample(items, n - n // 4) + rng.sample(general, n // 4)


def calibrate_student(student_st, texts: list[str], max_len: int = 64) -> dict[str, float]:
    """Runs calibrate_ternary on a SentenceTransformer student over length-sorted batches."""
    hf, tokenizer = student_st[0].auto_model, student_st.tokenizer
    texts = sorted(texts, key=len)  # similar lengths per batch: little padding in the statistics

    def run_batch():
        for i in range(0, len(texts), 32):
            tok = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            hf(**tok)

    hf.eval()
    return calibrate_ternary(hf, run_batch, hf.config.num_hidden_layers)


# ----------------------------------------------------------------------------- losses

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


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


def attention_kl(att_s, att_t, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of KL(teacher || student) of attention rows of real query tokens."""
    q = mask[:, None, :, None].to(att_s[0].dtype)
    total = 0.0
    for a_s, a_t in zip(att_s, att_t, strict=True):
        kl = (a_t * (torch.log(a_t + 1e-9) - torch.log(a_s + 1e-9))) * q
        total = total + kl.sum() / (q.sum() * a_s.shape[1])
    return total / len(att_s)


def compute_losses(student, teacher, toks, cfg) -> dict[str, torch.Tensor]:
    """All losses for one batch. `toks` is one tokenized batch or a list of parts (each padded to
    its own longest text: short catalog texts are not padded to the length of an abstract); the
    pooled-embedding losses see the whole batch."""
    toks = [toks] if isinstance(toks, dict) else toks
    kw = dict(output_hidden_states=True, output_attentions=cfg["w_att"] > 0)
    hid, att, n_tok, pooled_s, pooled_t = 0.0, 0.0, 0, [], []
    for tok in toks:
        with torch.no_grad():
            out_t = teacher(**tok, **kw)
        out_s = student(**tok, **kw)
        mask = tok["attention_mask"]
        layers = [-1] if cfg["layers"] == "last" else range(1, len(out_t.hidden_states))
        part = sum(hidden_mse(out_s.hidden_states[i], out_t.hidden_states[i], mask) for i in layers)
        weight = int(mask.sum())  # parts weigh by their number of real tokens
        hid, n_tok = hid + part / len(layers) * weight, n_tok + weight
        if cfg["w_att"] > 0:
            att = att + attention_kl(out_s.attentions, out_t.attentions, mask) * weight
        pooled_s.append(mean_pool(out_s.last_hidden_state, mask))
        pooled_t.append(mean_pool(out_t.last_hidden_state, mask))
    ps, pt = torch.cat(pooled_s), torch.cat(pooled_t)
    losses = {"hid": hid / n_tok,
              "cos": (1 - F.cosine_similarity(ps, pt, dim=-1)).mean(),
              "sim": similarity_kl(ps, pt, cfg["sim_tau"])}
    if cfg["w_att"] > 0:
        losses["att"] = att / n_tok
    losses["total"] = sum(cfg[f"w_{k}"] * v for k, v in losses.items())
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
    params = dict(student.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("model."):
                params[key[len("model."):]].copy_(value)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = value.reshape(()) if k == "step" else value
    opt.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


# ----------------------------------------------------------------------------- main

def main() -> None:
    cfg = parse_config()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log at once
    from sentence_transformers import SentenceTransformer

    from encoder.loading import default_base_model

    base = cfg["base_model"] or default_base_model()
    run = Path(cfg["run"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    rng = random.Random(cfg["seed"])

    # models: frozen teacher, ternary student (embeddings frozen so the table stays the base's)
    model_kw = {"attn_implementation": "eager"} if cfg["w_att"] > 0 else {}
    teacher_st = SentenceTransformer(base, device="cpu", model_kwargs=model_kw).eval()
    student_st = SentenceTransformer(base, device="cpu", model_kwargs=model_kw)
    ternarize_model(student_st, cfg["scheme"])
    teacher, student = teacher_st[0].auto_model, student_st[0].auto_model
    tokenizer = teacher_st.tokenizer
    for p in teacher.parameters():
        p.requires_grad_(False)
    for name, p in student.named_parameters():
        frozen = name.startswith("embeddings.word") or name.startswith("embeddings.position") \
            or name.startswith("embeddings.token_type") or (cfg["freeze_ln"] and "LayerNorm" in name)
        p.requires_grad_(not frozen)
    if cfg["calibrate"] and not cfg["resume"]:
        errs = calibrate_student(student_st, calibration_texts(cfg["calibrate"], cfg["seed"]), cfg["max_len"])
        print(f"calibrated on {cfg['calibrate']} texts: mean relative output error "
              f"{sum(errs.values()) / len(errs):.4f}")
    n_tern = len(ternary_layers(student))
    trainable = [p for p in student.parameters() if p.requires_grad]
    print(f"student: {n_tern} ternary linears ({cfg['scheme']}), "
          f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters")
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    # data
    items, general = training_texts()
    neighbours = teacher_neighbours(teacher_st, base, items)
    print(f"data: {len(items)} catalog items, {len(general)} general texts")

    # state (or resume)
    step, elapsed, history = 0, 0.0, []
    if cfg["resume"] and (run / "ckpt.json").is_file():
        meta = load_checkpoint(run, student, opt)
        step, elapsed, history = meta["step"], meta["elapsed"], meta["history"]
        rng.setstate((meta["rng_py"][0], tuple(meta["rng_py"][1]), meta["rng_py"][2]))
        print(f"resumed from {run} at step {step} ({elapsed / 60:.1f} min)")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=1))

    # loop
    budget_s = cfg["max_minutes"] * 60
    student.train()
    t_start, t_ckpt = time.perf_counter() - elapsed, time.perf_counter()
    bar = tqdm(total=cfg["max_steps"], initial=step, dynamic_ncols=True)
    ema = None
    while step < cfg["max_steps"] and elapsed < budget_s:
        progress = max(step / cfg["max_steps"], elapsed / budget_s)
        lr = lr_at(step, progress, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        texts = get_batch(rng, items, general, neighbours, cfg)
        n_cat = cfg["catalog_groups"] * cfg["group_size"]
        toks = [dict(tokenizer(part, padding=True, truncation=True, max_length=cfg["max_len"],
                               return_tensors="pt")) for part in (texts[:n_cat], texts[n_cat:]) if part]
        losses = compute_losses(student, teacher, toks, cfg)
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
        left_steps = (cfg["max_steps"] - step) * elapsed / max(step, 1)
        bar.set_postfix(loss=f"{ema:.4f}", hid=vals["hid"], sim=vals["sim"], lr=f"{lr:.1e}",
                        eta=f"{min(left_steps, budget_s - elapsed) / 60:.1f}m")
        bar.update(1)
        if time.perf_counter() - t_ckpt > cfg["ckpt_every_minutes"] * 60:
            save_checkpoint(run, student, opt, {"step": step, "elapsed": elapsed, "history": history,
                                                "rng_py": rng.getstate()})
            t_ckpt = time.perf_counter()
    bar.close()
    save_checkpoint(run, student, opt, {"step": step, "elapsed": elapsed, "history": history,
                                        "rng_py": rng.getstate()})
    print(f"trained {step} steps in {elapsed / 60:.1f} min; last losses {history[-1] if history else {}}")

    # evaluate (optional) and export
    student_st.eval()
    if cfg["eval"]:
        from encoder.evaluate import ModelEncoder, evaluate_encoder
        from encoder.loading import load_encoder

        fp = load_encoder(base)
        fp.name = "full-precision:" + Path(base).name
        result = evaluate_encoder(ModelEncoder(student_st, f"student:{run}"), reference=fp,
                                  tasks=tuple(cfg["eval"].split(",")))
        result.update(run=str(run), scheme=cfg["scheme"], steps=step, minutes=round(elapsed / 60, 1),
                      notes=cfg["notes"], config=cfg)
        (run / "eval.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if cfg["export"]:
        from encoder.ternary_export import save_ternary_model

        info = {k: v for k, v in cfg.items() if k not in ("resume", "eval", "export", "out_dir", "run")}
        save_ternary_model(student_st, cfg["out_dir"], base_model=base,
                           extra={"distillation": {**info, "steps": step, "minutes": round(elapsed / 60, 1)}})
        print(f"exported the ternary model to {cfg['out_dir']}")


if __name__ == "__main__":
    main()
