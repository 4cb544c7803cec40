"""Ternarization: codes in {-1,0,1} times one scale per row, the scale formulas, STE gradients,
and that every Linear of a BERT-family model is replaced (embeddings/LayerNorm stay float)."""

import pytest
import torch
from torch import nn

from encoder.ternary import (
    SCHEMES,
    TernaryLinear,
    optimal_row_threshold_ratio,
    ternarize_model,
    ternarize_weight,
    ternary_layers,
)


def _linear(out_f=37, in_f=53, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[3] *= 10  # one row with a much larger range: per-row scales must follow it
    return lin


@pytest.mark.parametrize("scheme", [*SCHEMES, "row_opt+learn", "paper+learn"])
def test_effective_weight_is_codes_times_row_scale(scheme):
    lin = _linear()
    layer = TernaryLinear.from_linear(lin, scheme)
    codes, scale = layer.ternary_codes_and_scale()
    assert codes.dtype == torch.int8 and codes.shape == (37, 53)
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert (codes != 0).any(dim=1).all()
    w_hat = layer.quantized_weight().detach()
    torch.testing.assert_close(w_hat, scale[:, None] * codes.float())
    x = torch.randn(5, 53)
    expected = x @ (scale[:, None] * codes.float()).T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # codes never flip a weight's sign
    assert ((codes.float() * lin.weight.sign()) >= 0).all()


def test_paper_scheme_formula():
    lin = _linear()
    codes, scale = TernaryLinear.from_linear(lin, "paper").ternary_codes_and_scale()
    m = 2 * lin.weight.abs().mean()
    torch.testing.assert_close(scale, m.expand(37).detach())
    expected = torch.clamp(torch.round(lin.weight / m), -1, 1).to(torch.int8)
    assert torch.equal(codes, expected)
    # the zero threshold of round(W/m) is m/2 = mean|W|
    a = lin.weight.abs()
    assert torch.equal(codes != 0, a > a.mean())


def test_fitted_scales_are_least_squares_and_beat_paper():
    lin = _linear()
    w = lin.weight.detach()
    errors = {}
    for scheme in SCHEMES:
        codes, scale = TernaryLinear.from_linear(lin, scheme).ternary_codes_and_scale()
        q = codes.float()
        if scheme != "paper":
            # least-squares scale for fixed codes: <w, q> / <q, q> (per row or per tensor)
            if scheme == "tensor_fit":
                expected = (w * q).sum() / (q * q).sum()
                torch.testing.assert_close(scale, expected.expand(37))
            else:
                torch.testing.assert_close(scale, (w * q).sum(1) / (q * q).sum(1))
        errors[scheme] = ((w - scale[:, None] * q) ** 2).sum().item()
    assert errors["tensor_fit"] < errors["paper"]
    assert errors["row_fit"] < errors["tensor_fit"]
    assert errors["row_opt"] <= errors["row_fit"] + 1e-9


def test_row_opt_is_the_exact_optimum_per_row():
    torch.manual_seed(1)
    w = torch.randn(4, 9)
    codes, scale = ternarize_weight(w, "row_opt")
    best = ((w - scale[:, None] * codes) ** 2).sum(1)
    # brute force over every threshold (keep the k largest |w|, best scale = their mean)
    a = w.abs().sort(dim=1, descending=True).values
    for r in range(4):
        errs = [((a[r, :k] - a[r, :k].mean()) ** 2).sum() + (a[r, k:] ** 2).sum() for k in range(1, 10)]
        assert best[r].item() == pytest.approx(min(errs).item(), rel=1e-5, abs=1e-6)
    ratio = optimal_row_threshold_ratio(w)
    assert ratio.shape == (4,) and (ratio > 0).all()


def test_ste_gradient_passes_straight_through():
    lin = _linear()
    layer = TernaryLinear.from_linear(lin, "row_opt")
    x = torch.randn(6, 53)
    g = torch.randn(6, 37)
    (layer(x) * g).sum().backward()
    # d/dW_hat of sum(g * x W_hat^T) = g^T x, passed to the latent weight unchanged
    torch.testing.assert_close(layer.weight.grad, g.T @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum(0), atol=1e-5, rtol=1e-5)


def test_learnable_scale_gets_its_exact_gradient():
    layer = TernaryLinear.from_linear(_linear(), "row_opt+learn")
    codes, _ = layer.ternary_codes_and_scale()
    x, g = torch.randn(6, 53), torch.randn(6, 37)
    (layer(x) * g).sum().backward()
    expected = ((g.T @ x) * codes.float()).sum(1)  # dL/ds_r = sum_j dL/dW_hat[r, j] * q[r, j]
    torch.testing.assert_close(layer.scale.grad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, g.T @ x, atol=1e-5, rtol=1e-5)


def test_training_moves_codes():
    layer = TernaryLinear.from_linear(_linear(), "row_opt")
    before, _ = layer.ternary_codes_and_scale()
    with torch.no_grad():
        layer.weight[0] = -layer.weight[0]
    after, _ = layer.ternary_codes_and_scale()
    assert torch.equal(after[0], -before[0])


def test_unknown_scheme_rejected():
    with pytest.raises(ValueError):
        TernaryLinear(3, 2, scheme="nope")


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=True)


def test_every_linear_replaced_and_float_parts_kept():
    model = _tiny_bert()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linear_names) == 2 * 6 + 1  # Q, K, V, attn-out, FFN up, FFN down per layer + pooler
    emb_before = model.embeddings.word_embeddings.weight.clone()
    ids = torch.randint(0, 50, (2, 7))
    ternarize_model(model, "row_opt")
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(n for n, _ in ternary_layers(model)) == sorted(linear_names)
    assert isinstance(model.encoder.layer[0].attention.output.LayerNorm, nn.LayerNorm)
    assert torch.equal(model.embeddings.word_embeddings.weight, emb_before)
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 7, 16) and torch.isfinite(out).all()


def test_sentence_transformer_is_ternarized():
    from sentence_transformers import SentenceTransformer

    from encoder.base_model import default_base_model

    st = SentenceTransformer(default_base_model(), device="cpu")
    ternarize_model(st, "paper")
    names = [n for n, _ in ternary_layers(st[0].auto_model)]
    assert len(names) == 6 * 6 + (1 if st[0].auto_model.pooler is not None else 0)
    emb = st.encode(["a small test"], convert_to_numpy=True)
    assert emb.shape == (1, 384)


def test_group_scales_one_per_group_of_inputs():
    lin = _linear(out_f=6, in_f=64)
    with torch.no_grad():
        lin.weight[:, 32:] *= 8  # the second half of every row much larger: one row scale cannot fit both
    row = TernaryLinear.from_linear(lin, "row_opt+learn")
    grouped = TernaryLinear.from_linear(lin, "row_opt+learn", group_size=32)
    assert grouped.scale.shape == (6, 2) and grouped.row_ratio.shape == (6, 2)
    w_hat = grouped.quantized_weight().detach()
    codes, scale = grouped.codes_and_scale()
    torch.testing.assert_close(w_hat, scale.detach().repeat_interleave(32, dim=1) * codes)
    # the small half: a row scale sized for the large half zeroes or overshoots it, its own scale fits
    err_row = (lin.weight - row.quantized_weight())[:, :32].pow(2).sum().item()
    err_group = (lin.weight - w_hat)[:, :32].pow(2).sum().item()
    assert err_group < 0.8 * err_row
    # each group is the exact row_opt fit of its own 32 weights
    for g in range(2):
        part = lin.weight[:, 32 * g:32 * (g + 1)]
        c, s = ternarize_weight(part, "row_opt")
        assert torch.equal(codes[:, 32 * g:32 * (g + 1)], c)
        torch.testing.assert_close(scale[:, g].detach(), s)
    with pytest.raises(ValueError, match="one scale per row"):
        grouped.ternary_codes_and_scale()  # the packed format has no group scales
    with pytest.raises(ValueError):
        TernaryLinear(60, 4, scheme="row_opt", group_size=32)
