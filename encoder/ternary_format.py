"""The packed ternary model directory: layout, config checks, tensors, token-embedding codecs (numpy only).

Layout of a model directory (DESIGN.md seam, e.g. `models/ternary-minilm/`):

    config.json        "format": "ternrec-ternary", "format_version": 1, the BERT shape, pooling, and how each
                       tensor is stored
    model.safetensors  every transformer Linear as 2-bit packed codes + one float32 scale per output row
                       + float32 bias; LayerNorms, position and token-type embeddings in float32; the
                       token-embedding table per `config["token_embedding"]["storage"]`:
                         "base"     not stored: read from the base model's safetensors at load time
                                    (only when it is bit-identical; its sha256 is in config.json)
                         "float32"  stored as is
                         "int8"     int8 codes + one float32 scale per row (symmetric, absmax / 127)
                         "int4"     two 4-bit codes per byte (low nibble = even column) + one float32
                                    scale per row (symmetric, absmax / 7, code + 8 stored)
                         "int4g32"  the same 4-bit codes with one float16 scale per group of 32 columns
                                    ("int4g16": per 16), so a row's outliers cost precision only in their group
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt
                       copied from the base model (small), so tokenization never needs the base model.

Linear tensors, for each `<name>` (e.g. `encoder.layer.0.attention.self.query`): `<name>.packed` uint8 in
`encoder.packing`'s layout ("tq2k", the native kernel's own: `config["linear"]["packing"] == "kernel"`),
`<name>.scale` float32 (out,), `<name>.bias` float32 (out,). The weight is `scale[:, None] * codes`, codes in
{-1, 0, +1}. Only safetensors and JSON are read: no pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from encoder import packing

FORMAT = "ternrec-ternary"
FORMAT_VERSION = 1
LINEAR_PACKING = "kernel"  # config["linear"]["packing"]: encoder.packing's layout
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WORD_EMB = "embeddings.word_embeddings.weight"
EMB_STORAGES = ("auto", "base", "float32", "int8", "int4", "int4g32", "int4g16")
QUANTIZED = {"int8": (8, None), "int4": (4, None), "int4g32": (4, 32), "int4g16": (4, 16)}  # storage -> (bits, group)
# The per-layer Linears of a BERT layer, in forward order.
LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")
ACTIVATIONS = ("gelu", "gelu_new", "relu")
POOLINGS = ("mean", "cls")
HOW_TO_EXPORT = "re-export it with encoder.ternary_export.save_ternary_model"


def require(path: Path, fname: str) -> Path:
    f = Path(path) / fname
    if not f.is_file():
        raise FileNotFoundError(f"ternary model {path}: missing {fname} ({f})")
    return f


def is_ternary_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json says it is a packed ternary model (of any version)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model directory this code can load; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"ternary model directory {path} does not exist")
    f = require(path, CONFIG_FILE)
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f} is not valid JSON: {exc}") from exc
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{f}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    version = int(cfg.get("format_version", 0))
    if version != FORMAT_VERSION:
        raise ValueError(f"{f}: format_version {version} is not supported (this code reads version {FORMAT_VERSION}); "
                         f"{HOW_TO_EXPORT} from the model it was trained from")
    layout = cfg.get("linear", {}).get("packing")
    layout_version = cfg.get("linear", {}).get("packing_version", packing.FORMAT_VERSION)
    if layout != LINEAR_PACKING or layout_version != packing.FORMAT_VERSION:
        raise ValueError(f"{f}: linear packing {layout!r} (version {layout_version}) is not "
                         f"supported, only {LINEAR_PACKING!r} version {packing.FORMAT_VERSION} (encoder/packing.py); "
                         f"{HOW_TO_EXPORT}")
    for key, allowed in (("hidden_act", ACTIVATIONS), ("pooling", POOLINGS)):
        if cfg.get(key, "mean") not in allowed:
            raise ValueError(f"{f}: {key} {cfg.get(key)!r} is not supported (one of {allowed})")
    storage = cfg.get("token_embedding", {}).get("storage")
    if storage not in EMB_STORAGES[1:]:
        raise ValueError(f"{f}: token_embedding storage {storage!r} is not one of {EMB_STORAGES[1:]}")
    return cfg


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(require(Path(path), WEIGHTS_FILE)))


def tensor(tensors: dict[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    if name not in tensors:
        raise KeyError(f"{Path(path) / WEIGHTS_FILE}: missing tensor {name}")
    return tensors[name]


def in_features(cfg: dict, name: str) -> int:
    """Inputs of a layer Linear: the FFN down projection reads the intermediate size, the rest the hidden size."""
    return int(cfg["intermediate_size"]) if name.endswith("output.dense") and ".attention." not in name \
        else int(cfg["hidden_size"])


def unpack_codes(tensors: dict[str, np.ndarray], name: str, cfg: dict) -> np.ndarray:
    """int8 codes (out, in) of a stored Linear."""
    out_f = tensors[f"{name}.scale"].shape[0]
    return packing.unpack_ternary(tensors[f"{name}.packed"], out_f, in_features(cfg, name))


def sha256_float32(table: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()


def base_token_embeddings(cfg: dict, path: Path) -> np.ndarray:
    """The float32 table of a "base"-stored model, checked against the sha256 it was saved with."""
    from encoder.base_model import read_base_tensor, resolve_base

    table = read_base_tensor(resolve_base(cfg["base_model"]), WORD_EMB)
    expected = cfg["token_embedding"].get("sha256_float32")
    if expected and sha256_float32(table) != expected:
        raise ValueError(f"{path}: the base model's token embeddings ({cfg['base_model']}) are not the ones this "
                         "model was saved with (sha256 mismatch)")
    return table


# ----------------------------------------------------------------------------- token-embedding codecs

def quantize_rows(table: np.ndarray, bits: int, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization: (codes, scales). One float32 scale per row, or with `group` one float16
    scale per `group` columns (rows, ceil(dim / group)). int8 codes for 8 bits; for 4 bits two codes
    per uint8 (low nibble = even column, value + 8)."""
    qmax = 127 if bits == 8 else 7
    rows, dim = table.shape
    if group:
        g = -(-dim // group)
        padded = np.zeros((rows, g * group), np.float32)
        padded[:, :dim] = table
        absmax = np.abs(padded.reshape(rows, g, group)).max(axis=2)
        scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float16)
        full = np.repeat(scale.astype(np.float32), group, axis=1)[:, :dim]
    else:
        absmax = np.abs(table).max(axis=1)
        scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        full = scale[:, None]
    q = np.clip(np.rint(table / full), -qmax, qmax).astype(np.int8)
    if bits == 8:
        return q, scale
    u = (q + 8).astype(np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.full((u.shape[0], 1), 8, np.uint8)], axis=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8), scale


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, bits: int, dim: int, group: int | None = None) -> np.ndarray:
    """Inverse of `quantize_rows` (up to rounding) for the given rows: -> float32 (rows, dim)."""
    if bits == 4:
        q = np.stack([(codes & 15).astype(np.int8) - 8, (codes >> 4).astype(np.int8) - 8], axis=-1)
        q = q.reshape(codes.shape[0], -1)[:, :dim]
    else:
        q = codes
    if group:
        return q.astype(np.float32) * np.repeat(scale.astype(np.float32), group, axis=1)[:, :dim]
    return q.astype(np.float32) * scale[:, None]


def model_file_bytes(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    return {"model.safetensors": files.get(WEIGHTS_FILE, 0), "all_files": sum(files.values())}
