"""The packed ternary model directory: save -> load round trip through the native runtime and the torch
reference, token-embedding codecs, format checks and their messages.

Runs on tiny random BERTs (odd shapes, the real MiniLM tokenizer) so the whole file takes seconds: one whose
head size (12) and hidden size (36) the AVX2 operations do not cover (they use the reference), one they do
(hidden 48, head size 16) with an odd FFN width.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import kernel, packing
from encoder.base_model import default_base_model
from encoder.loading import load_encoder
from encoder.ternary import ternarize_model
from encoder.ternary_export import convert_token_embedding, save_ternary_model
from encoder.ternary_format import TOKENIZER_FILES, WORD_EMB, dequantize_rows, quantize_rows, read_config
from encoder.ternary_runtime import NativeTernaryEncoder
from encoder.ternary_torch import TorchTernaryEncoder

TEXTS = ["Harry Potter and the Philosopher's Stone by J.K. Rowling", "a",
         "The Hunger Games by Suzanne Collins. young adult, dystopia, fiction",
         "Éclair recipes for the impatient baker", "x " * 400]  # the last one is truncated


def make_tiny(root: Path, hidden: int, heads: int, inter: int, act: str = "gelu") -> tuple[Path, torch.nn.Module]:
    """A tiny random BERT saved as a base model dir, and its ternarized copy (bare HF model)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(hidden)
    base = root / f"base-{hidden}-{act}"
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=300, hidden_act=act)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(base)  # safetensors
    for f in TOKENIZER_FILES:
        shutil.copyfile(Path(default_base_model()) / f, base / f)
    return base, ternarize_model(BertModel.from_pretrained(base).eval(), "row_opt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return make_tiny(tmp_path_factory.mktemp("tiny"), 36, 3, 70)


@pytest.fixture(scope="module")
def tiny_vector(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return make_tiny(tmp_path_factory.mktemp("tinyv"), 48, 3, 70)


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


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.mark.parametrize("model", ["tiny", "tiny_vector"])
def test_round_trip_matches_hf_forward(model, request, tmp_path):
    base, student = request.getfixturevalue(model)
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "ternrec-ternary"
    assert cfg["token_embedding"]["storage"] == "base"  # unchanged table: not stored again
    ref = hf_embed(student, base, TEXTS)
    # float activations: the weights are exactly the student's
    assert min_cos(TorchTernaryEncoder(out, backend="reference").encode(TEXTS, batch_size=2), ref) > 0.9999
    for kernel_path in ("reference", None):  # None: the best this CPU runs
        enc = NativeTernaryEncoder(out, kernel_path=kernel_path)
        emb = enc.encode(TEXTS, batch_size=2)
        assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), student.config.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        # int8 activations per 64 inputs: close to float, not equal
        assert min_cos(emb, ref) > 0.999
        # Batch size and order do not change an embedding (each sequence is computed at its own length).
        one = np.stack([enc.encode([t], batch_size=1)[0] for t in TEXTS])
        np.testing.assert_allclose(emb, one, atol=2e-6)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations(act, tmp_path):
    base, student = make_tiny(tmp_path, 48, 3, 70, act)
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    ref = hf_embed(student, base, TEXTS)
    assert min_cos(NativeTernaryEncoder(out, kernel_path="reference").encode(TEXTS), ref) > 0.999
    assert min_cos(NativeTernaryEncoder(out).encode(TEXTS), ref) > 0.999


def test_native_matches_torch_packed_backend(tiny_vector, tmp_path):
    base, student = tiny_vector
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    native = NativeTernaryEncoder(out).encode(TEXTS, batch_size=3)
    threads = torch.get_num_threads()
    packed = TorchTernaryEncoder(out, backend="packed").encode(TEXTS, batch_size=3)
    assert torch.get_num_threads() == threads  # encode runs torch at 1 thread, then restores
    assert min_cos(native, packed) > 0.9995


def test_codes_are_stored_exactly_and_stay_packed(tiny, tmp_path):
    from safetensors.numpy import load_file

    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    cfg = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert WORD_EMB not in tensors
    n_rows = 0
    for name in cfg["linear"]["names"]:
        codes, scale = student.get_submodule(name).ternary_codes_and_scale()
        got = packing.unpack_ternary(tensors[f"{name}.packed"], *codes.shape)
        np.testing.assert_array_equal(got, codes.numpy())
        np.testing.assert_array_equal(tensors[f"{name}.scale"], scale.numpy())
        assert tensors[f"{name}.packed"].nbytes == packing.packed_nbytes(*codes.shape)  # 2 bits per weight
        n_rows += codes.shape[0]
    # The native encoder holds the packed bytes, a scale and a bias per row: no float weight.
    linear = NativeTernaryEncoder(out).nbytes()["linear"]
    layers = cfg["num_hidden_layers"]
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    assert linear == layers * (packing.packed_nbytes(3 * h, h) + packing.packed_nbytes(h, h)
                               + packing.packed_nbytes(i, h) + packing.packed_nbytes(h, i)) + 8 * n_rows


def test_load_encoder_seam_routes_to_native(tiny, tmp_path):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    enc = load_encoder(out, threads=1, kernel_path="reference")
    assert isinstance(enc, NativeTernaryEncoder) and enc.threads == 1 and enc.kernel_path == "reference"
    assert enc.encode(TEXTS[:2]).shape == (2, 36)
    with pytest.raises(ValueError, match="unknown kernel path"):
        load_encoder(out, kernel_path="sse9")
    if "avx512f32" in kernel.available_paths():  # float activations: GEMM only
        with pytest.raises(ValueError, match="GEMM"):
            NativeTernaryEncoder(out, kernel_path="avx512f32")


@pytest.mark.parametrize("storage,bits,scale_bytes,min_cos_",
                         [("int8", 8, 4, 0.9999), ("int4", 4, 4, 0.99), ("int4g32", 4, 2 * 2, 0.99),
                          ("int4g16", 4, 3 * 2, 0.99)])
def test_token_embedding_compression(tiny_vector, tmp_path, storage, bits, scale_bytes, min_cos_):
    base, student = tiny_vector
    full_dir = save_ternary_model(student, tmp_path / "f", base_model=str(base), token_embedding="float32")
    out = save_ternary_model(student, tmp_path / storage, base_model=str(base), token_embedding=storage)
    assert json.loads((out / "config.json").read_text())["token_embedding"]["storage"] == storage
    converted = convert_token_embedding(full_dir, tmp_path / f"c-{storage}", storage)
    rows, dim = 30522, 48
    full, comp = NativeTernaryEncoder(full_dir), NativeTernaryEncoder(out)
    assert full.nbytes()["token_embedding"] == rows * dim * 4
    # codes + one float32 scale per row (or one float16 per group of 32 / 16 columns)
    assert comp.nbytes()["token_embedding"] == rows * (-(-dim * bits // 8) + scale_bytes)
    e = comp.encode(TEXTS)
    assert min_cos(e, full.encode(TEXTS)) > min_cos_
    np.testing.assert_array_equal(NativeTernaryEncoder(converted).encode(TEXTS), e)  # same codes either way
    # and back: a quantized copy of the base model's table is re-stored from that float original
    back = convert_token_embedding(out, tmp_path / f"back-{storage}", "float32")
    np.testing.assert_array_equal(NativeTernaryEncoder(back).encode(TEXTS), full.encode(TEXTS))
    # never quantized twice: re-storing it as the same storage quantizes the original again, to the same codes
    again = convert_token_embedding(out, tmp_path / f"again-{storage}", storage)
    np.testing.assert_array_equal(NativeTernaryEncoder(again).encode(TEXTS), e)
    # the torch reference dequantizes the same table the same way
    ref = NativeTernaryEncoder(out, kernel_path="reference").encode(TEXTS)
    assert min_cos(TorchTernaryEncoder(out, backend="packed").encode(TEXTS), ref) > 0.9995


def test_quantize_rows_error_bound():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, 37)).astype(np.float32)
    for bits, qmax in ((8, 127), (4, 7)):
        q, scale = quantize_rows(table, bits)
        deq = dequantize_rows(q, scale, bits, 37)
        # Rounding error is at most half a step of each row's scale.
        assert np.all(np.abs(deq - table) <= scale[:, None] / 2 + 1e-6)
        assert np.allclose(np.abs(table).max(1), scale * qmax)
    # Groups of 16 columns (3 groups for 37): each group's error bound is its own, smaller step.
    q, scale = quantize_rows(table, 4, group=16)
    assert scale.shape == (50, 3) and scale.dtype == np.float16
    deq = dequantize_rows(q, scale, 4, 37, 16)
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
        # its quantized copy has no float original to come back to
        quantized = save_ternary_model(student, tmp_path / "q", base_model=str(base), token_embedding="int8")
        with pytest.raises(ValueError, match="not the base model's table"):
            convert_token_embedding(quantized, tmp_path / "f", "float32")
    finally:
        with torch.no_grad():
            student.embeddings.word_embeddings.weight[5] -= 1.0


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tiny, tmp_path, missing):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    (out / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        NativeTernaryEncoder(out)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NativeTernaryEncoder(tmp_path / "nope")


@pytest.mark.parametrize("change,message", [
    ({"format_version": 2}, "format_version 2 is not supported.*save_ternary_model"),
    ({"linear": {"packing": "rowmajor2"}}, "packing 'rowmajor2'.*not supported.*save_ternary_model"),
    ({"hidden_act": "swish"}, "hidden_act 'swish'"),
    ({"token_embedding": {"storage": "int2"}}, "storage 'int2'"),
])
def test_unsupported_directories_say_how_to_convert(tiny, tmp_path, change, message):
    base, student = tiny
    out = save_ternary_model(student, tmp_path / "m", base_model=str(base))
    cfg = json.loads((out / "config.json").read_text())
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        read_config(out)
    with pytest.raises(ValueError, match=message):
        load_encoder(out)  # still recognised as a ternary directory, so the message is the format's
