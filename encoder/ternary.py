"""Ternary weights: quantization math and the straight-through-estimator layer.

Every ternarized linear layer computes `y = x @ W_hat.T + b` with `W_hat = scale[:, None] * codes`,
`codes` in {-1, 0, +1} (int8) and ONE float scale per output row: that is exactly what the packed
kernel (encoder/packing.py) stores, so every exported scheme ends up in that form. A per-tensor
scale is simply stored as a constant row vector. `group_size=g` (float training only, for the
scale-granularity ablation of issue 11; the packed format refuses it) gives each row one scale per
g consecutive inputs instead, with the row rules below applied per group.

Schemes (`scheme=` of `TernaryLinear` / `ternarize_model`):
- ``paper``      per tensor, m = 2 * mean|W|, codes = clamp(round(W / m), -1, 1), scale = m
                 (arXiv 2411.15438's public code; the zero threshold is mean|W|).
- ``tensor_fit`` paper's codes, but the scale is the least-squares fit for those codes:
                 s = mean(|W| over nonzero codes). m = 2*mean|W| overshoots that by ~40%.
- ``row_fit``    per output row: threshold mean|w_row|, least-squares row scale.
- ``row_opt``    per output row, the exact minimiser of ||w_row - s * q||^2 over all ternary q and s:
                 keep the k largest |w| (k chosen by scanning all k), s = their mean |w|.
                 The chosen threshold is remembered as a ratio of mean|w_row| so that training keeps
                 the same rule while the latent weights move.
Suffix ``+learn`` (e.g. ``row_opt+learn``): the row scales become trainable parameters
(initialised from the scheme) instead of being recomputed from the latent weights every step.

Training uses a straight-through estimator: the forward pass uses W_hat, the gradient w.r.t.
W_hat is passed unchanged to the latent float weight (and, with +learn, to the scale).
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("paper", "tensor_fit", "row_fit", "row_opt")


def parse_scheme(scheme: str) -> tuple[str, bool]:
    base, _, suffix = scheme.partition("+")
    if base not in SCHEMES or suffix not in ("", "learn"):
        raise ValueError(f"unknown ternary scheme {scheme!r}; expected one of {SCHEMES}, optional '+learn'")
    return base, suffix == "learn"


def optimal_row_threshold_ratio(weight: torch.Tensor) -> torch.Tensor:
    """Per row, the threshold (as a multiple of mean|w_row|) of the exact least-squares ternary fit.

    For a fixed set of k kept weights the best scale is their mean |w| and the squared error is
    sum w^2 - (sum of the k largest |w|)^2 / k, so the best k maximises cumsum_k^2 / k.
    The threshold is placed halfway between the k-th and (k+1)-th largest |w|.
    """
    a = weight.detach().float().abs()
    sorted_a, _ = torch.sort(a, dim=1, descending=True)
    k = torch.arange(1, a.shape[1] + 1, dtype=a.dtype, device=a.device)
    gain = torch.cumsum(sorted_a, dim=1) ** 2 / k
    best = gain.argmax(dim=1)  # index of the last kept weight (k-1)
    kept = sorted_a.gather(1, best[:, None]).squeeze(1)
    nxt_idx = torch.clamp(best + 1, max=a.shape[1] - 1)
    nxt = torch.where(best + 1 < a.shape[1], sorted_a.gather(1, nxt_idx[:, None]).squeeze(1), kept * 0)
    threshold = 0.5 * (kept + nxt)
    return threshold / a.mean(dim=1).clamp_min(1e-12)


def ternarize_weight(
    weight: torch.Tensor, scheme: str, row_ratio: torch.Tensor | None = None, group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (same dtype as weight, values in {-1,0,1}, no grad) and a per-row scale (float, no grad);
    with `group_size`, the row rules per group of inputs and scales of shape (out, in // group_size)."""
    base, _ = parse_scheme(scheme)
    w = weight.detach()
    if group_size:
        if base in ("paper", "tensor_fit") or w.shape[1] % group_size:
            raise ValueError(f"group scales need a row scheme and in_features divisible by {group_size}")
        out_f, in_f = w.shape
        ratio = None if row_ratio is None else row_ratio.reshape(-1)
        codes, s = ternarize_weight(w.reshape(-1, group_size), scheme, ratio)
        return codes.reshape(out_f, in_f), s.reshape(out_f, in_f // group_size)
    a = w.abs()
    if base == "paper":
        m = 2.0 * a.mean()
        codes = torch.clamp(torch.round(w / m), -1, 1)
        return codes, m.expand(w.shape[0])
    if base == "tensor_fit":
        mask = a > a.mean()
        codes = torch.sign(w) * mask
        s = (a * mask).sum() / mask.sum().clamp_min(1)
        return codes, s.expand(w.shape[0])
    row_mean = a.mean(dim=1, keepdim=True)
    if base == "row_fit":
        threshold = row_mean
    else:  # row_opt
        if row_ratio is None:
            row_ratio = optimal_row_threshold_ratio(w)
        threshold = row_ratio.to(w.dtype)[:, None] * row_mean
    mask = a > threshold
    codes = torch.sign(w) * mask
    s = (a * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return codes, s


class TernaryLinear(nn.Module):
    """A linear layer whose effective weight is scale[:, None] * codes, trained with an STE.

    `weight` is the latent float weight the optimizer updates; the forward pass never uses it
    directly. `bias` stays float. `group_size` > 0: one scale (and threshold ratio) per row and group
    of `group_size` inputs (float only: `ternary_codes_and_scale` refuses it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "row_opt",
                 group_size: int = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.base_scheme, self.learn_scale = parse_scheme(scheme)
        if group_size and (in_features % group_size or self.base_scheme in ("paper", "tensor_fit")):
            raise ValueError(f"group_size {group_size} needs a row scheme and in_features ({in_features}) "
                             "divisible by it")
        self.group_size = group_size
        self.groups = in_features // group_size if group_size else 0
        shape = (out_features, self.groups) if group_size else (out_features,)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # Threshold ratio per row (row_opt), fixed at conversion time so codes follow the latent weights.
        self.register_buffer("row_ratio", torch.ones(shape))
        self.scale = nn.Parameter(torch.ones(shape)) if self.learn_scale else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "row_opt", group_size: int = 0) -> TernaryLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if layer.base_scheme == "row_opt":
                w = linear.weight.reshape(-1, group_size) if group_size else linear.weight
                layer.row_ratio.copy_(optimal_row_threshold_ratio(w).reshape(layer.row_ratio.shape))
            if layer.scale is not None:
                _, s = ternarize_weight(linear.weight, layer.base_scheme, layer.row_ratio, group_size)
                layer.scale.copy_(s)
        return layer

    def codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current codes (from the latent weights) and the scale in use (learnable or fitted)."""
        codes, s = ternarize_weight(self.weight, self.base_scheme, self.row_ratio, self.group_size)
        return codes, (self.scale if self.scale is not None else s)

    def quantized_weight(self) -> torch.Tensor:
        """W_hat with straight-through gradients (identity to `weight`, exact to a learnable scale)."""
        codes, s = self.codes_and_scale()
        per_weight = s.repeat_interleave(self.group_size, dim=1) if self.group_size else s[:, None]
        w_hat = per_weight * codes
        if self.scale is not None:
            # value = s*codes; d/dW = identity (STE); d/ds flows through s*codes.
            return w_hat + (self.weight - self.weight.detach())
        return self.weight + (w_hat - self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def ternary_codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed-kernel contract: int8 codes (out, in) in {-1,0,1} and float32 scale (out,)."""
        if self.group_size:
            raise ValueError(f"{self}: the packed format stores one scale per row; group scales "
                             f"(group_size={self.group_size}) are a float-training ablation only")
        codes, s = self.codes_and_scale()
        return codes.to(torch.int8).contiguous(), s.detach().float().contiguous().clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}"
                + (f", group_size={self.group_size}" if self.group_size else ""))


def transformer_roots(model: nn.Module) -> list[nn.Module]:
    """The transformer(s) to ternarize: the HF model inside a SentenceTransformer, else the model."""
    roots = [m.auto_model for m in getattr(model, "_modules", {}).values() if hasattr(m, "auto_model")]
    return roots or [model]


def ternarize_model(model: nn.Module, scheme: str = "row_opt", group_size: int = 0) -> nn.Module:
    """Replaces every nn.Linear inside the transformer (Q/K/V, attention output, FFN up/down, pooler)
    by a TernaryLinear, in place; embeddings, LayerNorm and biases stay float. Returns the model.

    For a SentenceTransformer only its transformer module(s) are touched (not e.g. a Dense head).
    """
    parse_scheme(scheme)
    for root in transformer_roots(model):
        targets = [(name, mod) for name, mod in root.named_modules() if type(mod) is nn.Linear]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, TernaryLinear.from_linear(linear, scheme, group_size))
    return model


def ternary_layers(model: nn.Module) -> list[tuple[str, TernaryLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]

