"""Activation-aware initialisation: WLS scales are the least-squares optimum, GPTQ beats the grid on
skewed inputs, the student reproduces the fitted codes exactly, and whole models get closer to the
float model (per row and with group scales)."""

import pytest
import torch
from torch import nn

from encoder.calibration import (
    expand_scale,
    fit_ternary,
    gptq_fit,
    granularity_errors,
    grid_fit,
    output_error,
    stages_of,
    wls_scales,
)
from encoder.ternary import TernaryLinear, ternarize_model


def _skewed(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, :4] *= 15  # a few dominant channels, as in transformer activations
    return x, x.T @ x / n


@pytest.mark.parametrize("groups", [0, 4])
def test_wls_scales_are_the_least_squares_optimum(groups):
    x, gram = _skewed()
    torch.manual_seed(1)
    w = torch.randn(5, 64, dtype=torch.float64)
    codes = torch.sign(w) * (w.abs() > 0.7)
    s = wls_scales(w, codes, gram, groups)
    err = output_error(w, codes * expand_scale(s, 64), gram)
    for _ in range(20):  # any other scales are worse
        other = s * (1 + 0.05 * torch.randn_like(s))
        assert (output_error(w, codes * expand_scale(other, 64), gram) >= err - 1e-12).all()


@pytest.mark.parametrize("groups", [0, 4])
def test_gptq_beats_the_grid_and_its_latent_reproduces_the_codes(groups):
    x, gram = _skewed()
    torch.manual_seed(2)
    w = 0.05 * torch.randn(24, 64, dtype=torch.float64)
    q0, s0, _ = grid_fit(w, gram, groups)
    q, s, latent, threshold = gptq_fit(w, gram, s0, groups)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    grid_err = output_error(w, q0 * expand_scale(s0, 64), gram).sum()
    gptq_err = output_error(w, q * expand_scale(s, 64), gram).sum()
    assert gptq_err < 0.95 * grid_err
    # code != 0 exactly where |latent| > threshold, with the latent's sign
    t = expand_scale(threshold, 64)
    assert torch.equal(q != 0, latent.abs() > t)
    assert torch.equal(q[q != 0], torch.sign(latent[q != 0]))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))


@pytest.mark.parametrize("method,group_size", [("grid", 0), ("gptq", 0), ("gptq", 16)])
def test_fit_brings_the_student_closer_to_the_float_model(method, group_size):
    model = _mlp()
    x, _ = _skewed(1024, 32)
    x = x.float()
    ref = model(x).detach()
    ternarize_model(model, "row_opt+learn", group_size)
    before = (model(x) - ref).pow(2).mean().item()
    errors = fit_ternary(model, lambda b: model(b), [x[:512], x[512:]], method=method)
    after = (model(x) - ref).pow(2).mean().item()
    assert set(errors) == {"0", "2"} and all(0 <= e < 1 for e in errors.values())
    assert after < 0.6 * before
    layer = model[0]
    assert isinstance(layer, TernaryLinear)
    codes, scale = layer.codes_and_scale()
    assert set(codes.unique().tolist()) <= {-1, 0, 1} and (scale > 0).all()


def test_gptq_student_starts_at_the_fitted_codes():
    """After the fit the layer's own rule (|latent| > ratio * mean|latent|) gives GPTQ's codes, so the
    first training step starts from the fitted model, not from a re-rounded one."""
    model = _mlp(3)
    x, _ = _skewed(1024, 32)
    ternarize_model(model, "row_opt+learn")
    fit_ternary(model, lambda b: model(b), [x.float()], method="gptq")
    codes, _ = model[0].codes_and_scale()
    w = model[0].weight.detach()
    threshold = model[0].row_ratio[:, None] * w.abs().mean(1, keepdim=True)
    assert torch.equal(codes != 0, w.abs() > threshold)


def test_bert_blocks_are_fitted_in_four_stages():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32), add_pooling_layer=False)
    ternarize_model(model, "row_opt+learn")
    stages = stages_of(model)
    assert len(stages) == 8 and stages[0] == [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    assert stages[3] == ["encoder.layer.0.output.dense"] and stages[4][0].startswith("encoder.layer.1.")
    ids = torch.randint(1, 30, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    errors = fit_ternary(model.eval(), lambda b: model(**b), [{"input_ids": ids, "attention_mask": mask}])
    assert len(errors) == 12


def test_granularity_errors_compare_row_and_group_fits():
    model = _mlp()
    x, _ = _skewed(1024, 32)
    out = granularity_errors(model, lambda b: model(b), [x.float()], group_size=16)
    assert set(out) == {"0", "2"}
    for row in out.values():
        assert row["row_gptq"] <= row["row_grid_wls"] + 1e-9
        assert row["group16_gptq"] <= row["group16_grid_wls"] + 1e-9
        assert all(0 < v < 1.5 for v in row.values())
