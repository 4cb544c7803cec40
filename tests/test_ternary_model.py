"""The packed ternary model directory: save -> load round trip, backends, footprint codecs, errors.

Runs on a tiny random BERT (odd shapes, the real MiniLM tokenizer) so the whole file takes seconds.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.loading import default_base_model, load_encoder
from encoder.ternary import ternarize_model
from encoder.ternary_model import (
    TOKENIZER_FILES,
    WORD_EMB,
    load_ternary_encoder,
    pack_rowmajor2,
    quantize_rows,
    save_ternary_model,
    unpack_rowmajor2,
)

TEXTS = ["Harry Potter and the Philosopher's Stone by J.K. Rowling", "a",
         "The Hunger Games by Suzanne Collins. young adult, dystopia, fiction",
         "Éclair recipes for the impatient baker", "x " * 400]  # the last one is truncated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random BERT saved as a base model dir, and its ternarized copy (bare HF model)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("base")
    cfg = BertConfig(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=70, max_position_embeddings=300)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.save_pretrained(base)  # safetensors
    for f in TOKENIZER_FILES:
        shutil.copyfile(Path(default_base_model()) / f, base / f)
    student = ternarize_model(BertModel.from_pretrained(base).eval(), "row_opt")
    return base, student


def hf_embed(model, tokenizer_dir: Path, texts: list[str], max_len: int = 256) -> np.ndarray:
    """Ground truth: the HF module tree's forward + mean pooling + L2 normalisation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_round_trip_matches_hf_forward(tiny, tmp_path):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "ternrec-ternary"
    assert cfg["token_embedding"]["storage"] == "base"  # unchanged table: not stored again
    enc = load_ternary_encoder(out, backend="reference")
    emb = enc.encode(TEXTS, batch_size=2)
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), 36) and enc.dim == 36
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    ref = hf_embed(student, base, TEXTS)
    assert np.min(np.sum(emb * ref, axis=1)) > 0.9999
    # Batch size and order do not change an embedding (length-sorted batches are unsorted back).
    one = np.stack([enc.encode([t], batch_size=1)[0] for t in TEXTS])
    assert np.min(np.sum(emb * one, axis=1)) > 0.9999


def test_codes_are_stored_exactly(tiny, tmp_path):
    from safetensors.numpy import load_file

    from encoder.ternary_model import unpack_codes

    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    cfg = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert WORD_EMB not in tensors
    for name in cfg["linear"]["names"]:
        layer = student.get_submodule(name)
        codes, scale = layer.ternary_codes_and_scale()
        got = unpack_codes(tensors[f"{name}.packed"], cfg["linear"]["packing"], *codes.shape)
        np.testing.assert_array_equal(got, codes.numpy())
        np.testing.assert_array_equal(tensors[f"{name}.scale"], scale.numpy())
        # 2 bits per weight, rows and columns padded to the kernel's 16 at most.
        out_f, in_f = codes.shape
        assert tensors[f"{name}.packed"].nbytes <= (out_f + 15) // 16 * 16 * ((in_f + 15) // 16 * 16) // 4


def test_load_encoder_seam_routes_to_ternary(tiny, tmp_path):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kernel may not be built
        enc = load_encoder(out)
    assert enc.encode(TEXTS[:2]).shape == (2, 36)


def test_packed_matches_reference(tiny, tmp_path):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        packed = load_ternary_encoder(out, backend="packed")
    if packed.backend != "packed":
        pytest.skip("native kernel not built: packed backend fell back to reference")
    ref = load_ternary_encoder(out, backend="reference")
    threads = torch.get_num_threads()
    a, b = packed.encode(TEXTS, batch_size=3), ref.encode(TEXTS, batch_size=3)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    assert torch.get_num_threads() == threads  # encode runs torch at 1 thread, then restores
    # Weights stay packed: every linear holds its 2-bit bytes, a scale and a bias, no float weight.
    from encoder.packed_linear import PackedTernaryLinear
    from encoder.packing import packed_nbytes

    n_weights = sum(student.get_submodule(n).weight.numel() for n in packed.config["linear"]["names"])
    n_rows = sum(student.get_submodule(n).out_features for n in packed.config["linear"]["names"])
    assert ref.nbytes()["linear"] == 4 * n_weights + 4 * n_rows
    total = 0
    for layer in packed.layers:
        for lin in layer["qkv"] + [layer["attn_out"], layer["up"], layer["down"]]:
            assert isinstance(lin, PackedTernaryLinear)
            assert lin.packed.dtype == torch.uint8
            assert lin.packed.nbytes == packed_nbytes(lin.out_features, lin.in_features)
            total += lin.packed.nbytes + 8 * lin.out_features
    assert packed.nbytes()["linear"] == total


@pytest.mark.parametrize("storage,bits,scale_bytes,min_cos",
                         [("int8", 8, 4, 0.9999), ("int4", 4, 4, 0.99), ("int4g32", 4, 2 * 2, 0.99)])
def test_token_embedding_compression(tiny, tmp_path, storage, bits, scale_bytes, min_cos):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / storage, base_model=str(base), token_embedding=storage)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["token_embedding"]["storage"] == storage
    full = load_ternary_encoder(save_ternary_model(student, tmp_path / "f", base_model=str(base),
                                                   token_embedding="float32"), backend="reference")
    comp = load_ternary_encoder(out, backend="reference")
    rows, dim = 30522, 36
    assert full.nbytes()["token_embedding"] == rows * dim * 4
    # codes + one float32 scale per row (or one float16 per group of 32: 2 groups for 36 columns)
    assert comp.nbytes()["token_embedding"] == rows * (-(-dim * bits // 8) + scale_bytes)
    cos = np.sum(comp.encode(TEXTS) * full.encode(TEXTS), axis=1)
    assert np.min(cos) > min_cos


def test_quantize_rows_error_bound():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, 37)).astype(np.float32)
    from encoder.ternary_model import QuantizedEmbedding

    for bits, qmax in ((8, 127), (4, 7)):
        q, scale = quantize_rows(table, bits)
        emb = QuantizedEmbedding(torch.from_numpy(q), torch.from_numpy(scale), bits, 37)
        deq = emb(torch.arange(50)).numpy()
        # Rounding error is at most half a step of each row's scale.
        assert np.all(np.abs(deq - table) <= scale[:, None] / 2 + 1e-6)
        assert np.allclose(np.abs(table).max(1), scale * qmax)
    # Groups of 16 columns (3 groups for 37): each group's error bound is its own, smaller step.
    q, scale = quantize_rows(table, 4, group=16)
    assert scale.shape == (50, 3) and scale.dtype == np.float16
    deq = QuantizedEmbedding(torch.from_numpy(q), torch.from_numpy(scale), 4, 37, 16)(torch.arange(50)).numpy()
    step = np.repeat(scale.astype(np.float32), 16, axis=1)[:, :37]
    assert np.all(np.abs(deq - table) <= step / 2 + 1e-3)


def test_changed_embeddings_are_stored_and_base_mismatch_is_refused(tiny, tmp_path):
    base, student = tiny
    with torch.no_grad():
        student.embeddings.word_embeddings.weight[5] += 1.0
    try:
        out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
        assert json.loads((out / "config.json").read_text())["token_embedding"]["storage"] == "float32"
        with pytest.raises(ValueError, match="differ"):
            save_ternary_model(student, tmp_path / "b", base_model=str(base), token_embedding="base")
    finally:
        with torch.no_grad():
            student.embeddings.word_embeddings.weight[5] -= 1.0


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tiny, tmp_path, missing):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    (out / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_ternary_encoder(out, backend="reference")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ternary_encoder(tmp_path / "nope")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 64), (17, 130)])
def test_rowmajor2_round_trip(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    codes = rng.integers(-1, 2, size=shape).astype(np.int8)
    packed = pack_rowmajor2(codes)
    assert packed.dtype == np.uint8 and packed.shape == (shape[0], -(-shape[1] // 4))
    np.testing.assert_array_equal(unpack_rowmajor2(packed, *shape), codes)
