"""Activation-aware initialisation of a ternary student, before any training step.

Weight-space fits (encoder/ternary.py) treat every input dimension alike, but transformer activations
are dominated by a few large channels. Here every TernaryLinear is fitted to minimise its output error
on calibration inputs, E||x W^T - x W_hat^T||^2 = tr((W - W_hat) G (W - W_hat)^T) with G = E[x x^T].
Inputs are collected stage by stage (Q/K/V, attention output, FFN up, FFN down of each BERT block),
each from the student whose earlier stages are already fitted, so a stage sees and absorbs the errors
before it; a forward pass stops at the stage it collects for.

Fits (`method=`):
  grid   per row (or group of inputs): the zero threshold from a grid of ratios of mean|w|, each with
         its weighted least-squares scale s = wGq / qGq; the best kept.
  gptq   GPTQ (Frantar et al., 2022) for ternary codes: columns are rounded to {-s, 0, +s} one at a
         time in decreasing order of activation energy, and the error of each is pushed onto the
         columns not yet rounded through the inverse of G (the least-squares compensation); then the
         scales are refitted by weighted least squares for the codes, and the pass repeated.
Both fold the mean output error into the bias. After `gptq` the latent float weight is set to the
compensated values that were rounded, and the row threshold to s/2, so the straight-through training
that follows starts exactly at the fitted codes.
"""

from __future__ import annotations

import torch
from torch import nn

from encoder.ternary import TernaryLinear, ternary_layers

GRID_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
BERT_STAGES = (("attention.self.query", "attention.self.key", "attention.self.value"),
               ("attention.output.dense",), ("intermediate.dense",), ("output.dense",))


class _StageDone(Exception):
    """Raised by a hook once a stage's inputs are collected: the rest of the forward is not needed."""


def stages_of(model: nn.Module, block_prefix: str = "encoder.layer", per: str = "stage") -> list[list[str]]:
    """The fitting order: BERT blocks split into their four stages (per="block": one stage per block,
    every Linear of it fitted on inputs collected before any of them is); any other model, one stage
    per direct child holding TernaryLinears (in module order)."""
    names = [n for n, _ in ternary_layers(model)]
    stages: list[list[str]] = []
    blocks = sorted({int(n[len(block_prefix) + 1:].split(".")[0]) for n in names
                     if n.startswith(block_prefix + ".")})
    for b in blocks:
        for stage in BERT_STAGES:
            found = [f"{block_prefix}.{b}.{s}" for s in stage if f"{block_prefix}.{b}.{s}" in names]
            if found and per == "block" and stages and stages[-1][0].startswith(f"{block_prefix}.{b}."):
                stages[-1] += found
            elif found:
                stages.append(found)
    covered = {n for s in stages for n in s}
    rest = [n for n in names if n not in covered and not n.startswith("pooler")]
    for top in dict.fromkeys(n.split(".")[0] for n in rest):
        stages.append([n for n in rest if n.split(".")[0] == top])
    return stages


@torch.no_grad()
def input_statistics(model: nn.Module, names: list[str], forward, batches) -> dict[str, tuple]:
    """Per named TernaryLinear: (G = E[x x^T], E[x]) of its inputs (float64) over every real token.

    `forward(batch)` runs the model on one batch; a batch may carry "attention_mask" (padding is left
    out of the statistics)."""
    layers = dict(model.named_modules())
    stats: dict[str, list] = {}
    mask_now: list = [None]
    last = names[-1]

    def pre_hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            if mask_now[0] is not None and x.dim() == 3:
                x = x[mask_now[0].bool()]
            x = x.reshape(-1, x.shape[-1]).float()  # float32 products per batch, float64 sums across
            g, s, n = stats.get(name, (0.0, 0.0, 0))
            stats[name] = [g + (x.T @ x).double(), s + x.sum(0).double(), n + x.shape[0]]
        return fn

    def stop(_mod, _args, _out):
        raise _StageDone

    handles = [layers[n].register_forward_pre_hook(pre_hook(n)) for n in names]
    handles.append(layers[last].register_forward_hook(stop))
    try:
        for batch in batches:
            mask_now[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            try:
                forward(batch)
            except _StageDone:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: (g / cnt, s / cnt) for n, (g, s, cnt) in stats.items()}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row: (w - w_hat) G (w - w_hat)^T."""
    d = (w - w_hat).double()
    return ((d @ gram) * d).sum(1)


def expand_scale(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out,) or (out, groups) scales -> (out, in) per weight."""
    if scale.dim() == 1:
        return scale[:, None].expand(-1, in_features)
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


def wls_scales(w: torch.Tensor, codes: torch.Tensor, gram: torch.Tensor, groups: int) -> torch.Tensor:
    """Weighted least-squares scales for fixed codes: argmin_s (w - s.q) G (w - s.q)^T per row, one
    scale per row (groups=0) or per group of inputs (a small linear system per row)."""
    w, q = w.double(), codes.double()
    if groups == 0:
        qg = q @ gram
        return (w @ gram * q).sum(1) / (qg * q).sum(1).clamp_min(1e-30)
    out_f, in_f = q.shape
    gs = in_f // groups
    qb = q.reshape(out_f, groups, gs)
    # A[r, g, h] = q_rg G_gh q_rh ; b[r, g] = q_rg (G w_r)_g
    g4 = gram.reshape(groups, gs, groups, gs)
    a = torch.einsum("rgi,gihj,rhj->rgh", qb, g4, qb)
    b = (qb * (w @ gram).reshape(out_f, groups, gs)).sum(2)
    a = a + torch.eye(groups, dtype=a.dtype) * 1e-12 * a.diagonal(dim1=1, dim2=2).mean(1, keepdim=True)[..., None]
    return torch.linalg.solve(a, b[..., None]).squeeze(-1)


def grid_fit(w: torch.Tensor, gram: torch.Tensor, groups: int, ratio: torch.Tensor | None = None,
             ratios=GRID_RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, threshold ratio): per row (groups=0) the ratio of the grid (plus `ratio`, the
    current one) with the lowest output error, each with its WLS scale. With groups, one ratio per row
    applied within each group (thresholds from the group's own mean|w|)."""
    w = w.double()
    out_f, in_f = w.shape
    gs = in_f // groups if groups else in_f
    a = w.abs().reshape(out_f, -1, gs)
    group_mean = a.mean(2, keepdim=True)
    best_err = torch.full((out_f,), float("inf"), dtype=torch.float64)
    best_q, best_s, best_r = None, None, None
    candidates = ([] if ratio is None else [ratio.double().reshape(out_f, -1)]) + \
        [torch.full((out_f, 1), r, dtype=torch.float64) for r in ratios]
    for r in candidates:
        q = (torch.sign(w).reshape(out_f, -1, gs) * (a > r[..., None] * group_mean)).reshape(out_f, in_f)
        s = wls_scales(w, q, gram, groups)
        err = output_error(w, q * expand_scale(s, in_f), gram)
        better = err < best_err
        if best_q is None:
            best_q, best_s, best_r = q, s, r.expand(out_f, a.shape[1]).clone()
        else:
            best_q = torch.where(better[:, None], q, best_q)
            best_s = torch.where(better.reshape(-1, *[1] * (s.dim() - 1)), s, best_s)
            best_r = torch.where(better[:, None], r.expand(out_f, a.shape[1]), best_r)
        best_err = torch.minimum(err, best_err)
    return best_q, best_s, best_r if groups else best_r[:, 0]


def gptq_fit(w: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, groups: int, passes: int = 2,
             damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, ...]:
    """(codes, scale, latent, threshold): GPTQ ternary rounding from starting `scale`, `passes` rounds
    of (GPTQ codes, WLS scale refit); the best by output error is kept. `latent` holds the compensated
    value each weight had when it was rounded: code != 0 exactly where |latent| > threshold (half the
    scale that round used, which the refit may have changed since)."""
    w = w.double()
    out_f, in_f = w.shape
    h = gram.clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h += torch.eye(in_f, dtype=h.dtype) * damp * h.diagonal().mean()
    perm = torch.argsort(h.diagonal(), descending=True)  # "act order": the loudest inputs first
    inv_perm = torch.argsort(perm)
    hp = h[perm][:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    best = None
    s = scale.double().clone()
    for _ in range(passes):
        s_cols = expand_scale(s, in_f)[:, perm]  # the scale each (permuted) column rounds with
        work = w[:, perm].clone()
        codes = torch.zeros_like(work)
        latent = torch.zeros_like(work)
        for b0 in range(0, in_f, block):
            b1 = min(b0 + block, in_f)
            wb = work[:, b0:b1].clone()
            err_b = torch.zeros_like(wb)
            ub = u[b0:b1, b0:b1]
            for j in range(b1 - b0):
                x = wb[:, j]
                sc = s_cols[:, b0 + j]
                q = torch.clamp(torch.round(x / sc), -1, 1)
                latent[:, b0 + j] = x
                codes[:, b0 + j] = q
                e = (x - q * sc) / ub[j, j]
                wb[:, j:] -= e[:, None] * ub[j, j:][None, :]
                err_b[:, j] = e
            work[:, b1:] -= err_b @ u[b0:b1, b1:]
        codes, latent = codes[:, inv_perm], latent[:, inv_perm]
        rounded_with = s.clone()
        err = output_error(w, codes * expand_scale(s, in_f), gram).sum()
        if best is None or err < best[0]:
            best = (err, codes, s.clone(), latent, rounded_with / 2)
        s = wls_scales(w, codes, gram, groups).clamp_min(1e-8)
        err = output_error(w, codes * expand_scale(s, in_f), gram).sum()
        if err < best[0]:
            best = (err, codes, s.clone(), latent, rounded_with / 2)
    return best[1:]


@torch.no_grad()
def _apply(layer: TernaryLinear, w: torch.Tensor, codes, scale, ratio, latent, threshold, mean,
           bias_correction: bool):
    if latent is not None:
        # Codes follow |latent| > ratio * mean|latent| (per row or group): put that at GPTQ's threshold.
        lat = latent.reshape(w.shape[0], max(layer.groups, 1), -1)
        ratio = threshold.reshape(w.shape[0], -1) / lat.abs().mean(2).clamp_min(1e-12)
        layer.weight.copy_(latent.to(layer.weight.dtype))
    layer.row_ratio.copy_(ratio.reshape(layer.row_ratio.shape).to(layer.row_ratio.dtype))
    layer.scale.copy_(scale.reshape(layer.scale.shape).to(layer.scale.dtype))
    got, _ = layer.codes_and_scale()
    if not torch.equal(got.double(), codes.double()):  # ties at the threshold only
        mismatch = float((got.double() != codes.double()).float().mean())
        if mismatch > 1e-3:
            raise RuntimeError(f"fitted codes not reproduced by the layer ({mismatch:.2%} differ)")
    if bias_correction and layer.bias is not None:
        w_hat = got.double() * expand_scale(scale, w.shape[1])
        layer.bias.add_(((w - w_hat) @ mean).to(layer.bias.dtype))


@torch.no_grad()
def fit_ternary(model: nn.Module, forward, batches, method: str = "gptq", bias_correction: bool = True,
                stages: list[list[str]] | None = None) -> dict[str, float]:
    """Fits every TernaryLinear of `model` (learnable-scale schemes) on the calibration batches, stage by
    stage (see the module docstring). Returns each layer's relative output error
    tr((W - W_hat) G (W - W_hat)^T) / tr(W G W^T) after the fit, W the float weight it started from."""
    if method not in ("grid", "gptq"):
        raise ValueError(f"unknown fit {method!r}; expected 'grid' or 'gptq'")
    layers = dict(ternary_layers(model))
    errors: dict[str, float] = {}
    for stage in stages or stages_of(model):
        stats = input_statistics(model, stage, forward, batches)
        for name in stage:
            layer = layers[name]
            if layer.scale is None:
                raise ValueError("calibration needs a learnable-scale scheme (e.g. 'row_opt+learn')")
            gram, mean = stats[name]
            w = layer.weight.double().clone()
            codes, scale, ratio = grid_fit(w, gram, layer.groups, layer.row_ratio)
            latent = threshold = None
            if method == "gptq":
                codes, scale, latent, threshold = gptq_fit(w, gram, scale, layer.groups)
            _apply(layer, w, codes, scale, ratio, latent, threshold, mean, bias_correction)
            w_hat = codes * expand_scale(scale, w.shape[1])
            errors[name] = float(output_error(w, w_hat, gram).sum() / ((w @ gram) * w).sum().clamp_min(1e-30))
    return errors


@torch.no_grad()
def granularity_errors(model: nn.Module, forward, batches, group_size: int = 64) -> dict[str, dict[str, float]]:
    """Item 2 of issue 11, measured before changing any format: for every Linear of a *float* model,
    the relative output error on calibration inputs of ternary fits with one scale per row vs one per
    `group_size` inputs — weight-space row_opt, grid+WLS, GPTQ — all on the float model's own inputs."""
    from encoder.ternary import optimal_row_threshold_ratio, ternarize_weight

    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and not n.startswith("pooler")}
    out: dict[str, dict[str, float]] = {}
    stats: dict[str, tuple] = {}
    for top in dict.fromkeys(".".join(n.split(".")[:3]) for n in linears):  # one pass per block
        block = [n for n in linears if n.startswith(top + ".") or n == top]
        stats.update(input_statistics(model, block, forward, batches))
    for name in linears:
        gram, _ = stats[name]
        w = linears[name].weight.double()
        norm = float(((w @ gram) * w).sum())
        row = {}
        for label, groups in (("row", 0), (f"group{group_size}", w.shape[1] // group_size)):
            if groups:
                wg = w.reshape(-1, group_size)
                q, s = ternarize_weight(wg, "row_opt", optimal_row_threshold_ratio(wg))
                q, s = q.reshape(w.shape), s.reshape(w.shape[0], groups)
            else:
                q, s = ternarize_weight(w, "row_opt", optimal_row_threshold_ratio(w))
            row[f"{label}_row_opt"] = float(output_error(w, q * expand_scale(s, w.shape[1]), gram).sum()) / norm
            q, s, _ = grid_fit(w, gram, groups)
            row[f"{label}_grid_wls"] = float(output_error(w, q * expand_scale(s, w.shape[1]), gram).sum()) / norm
            q, s, _, _ = gptq_fit(w, gram, s, groups)
            row[f"{label}_gptq"] = float(output_error(w, q * expand_scale(s, w.shape[1]), gram).sum()) / norm
        out[name] = row
    return out

