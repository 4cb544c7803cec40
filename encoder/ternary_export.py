"""Writing packed ternary model directories (the format is in encoder/ternary_format.py):

    save_ternary_model(student, out_dir, base_model)   a trained student (torch) -> a model directory
    convert_token_embedding(src, dst, storage)         re-store the token-embedding table (numpy only)

CLI: `python -m encoder.ternary_export convert SRC DST --token-embedding int4g32` and
`python -m encoder.ternary_export info PATH` (bytes on disk and in memory).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from encoder import packing
from encoder.base_model import portable_name, read_base_tensor, resolve_base
from encoder.ternary_format import (
    CONFIG_FILE,
    EMB_STORAGES,
    FORMAT,
    FORMAT_VERSION,
    LAYER_LINEARS,
    LINEAR_PACKING,
    QUANTIZED,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    WORD_EMB,
    load_tensors,
    quantize_rows,
    require,
    sha256_float32,
)


def _transformer_parts(student) -> tuple[object, int, str, bool]:
    """(HF BertModel, max_seq_length, pooling, normalize) of a SentenceTransformer or a bare HF model."""
    modules = list(getattr(student, "_modules", {}).values())
    hf = next((m.auto_model for m in modules if hasattr(m, "auto_model")), None)
    if hf is None:
        return student, 256, "mean", True
    max_len = int(getattr(student, "max_seq_length", None) or 256)
    pooling, normalize = "mean", False
    for m in modules:
        kind = type(m).__name__
        if kind == "Pooling":
            mode = getattr(m, "pooling_mode", None) or ("cls" if getattr(m, "pooling_mode_cls_token", False)
                                                        else "mean")
            pooling = {"mean": "mean", "cls": "cls"}.get(str(mode).replace("_tokens", "").replace("_token", ""))
            if pooling is None:
                raise ValueError(f"unsupported pooling {mode!r}: only mean and cls")
        elif kind == "Normalize":
            normalize = True
    return hf, max_len, pooling, normalize


def _store_token_embedding(word: np.ndarray, storage: str, tensors: dict[str, np.ndarray]) -> str:
    """Adds the table to `tensors` as `storage` ("float32" or a QUANTIZED one); returns the config note."""
    if storage == "float32":
        tensors[WORD_EMB] = word
        return "float32"
    q, scale = quantize_rows(word, *QUANTIZED[storage])
    tensors[f"{WORD_EMB}.{storage}"] = q
    tensors[f"{WORD_EMB}.row_scale"] = scale
    return f"{storage} codes, symmetric scales (see encoder/ternary_format.py); dequantized per lookup"


def _copy_tokenizer(base_dir: Path, out: Path) -> list[str]:
    copied = []
    for fname in TOKENIZER_FILES:
        if (base_dir / fname).is_file():
            shutil.copyfile(base_dir / fname, out / fname)
            copied.append(fname)
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{base_dir / 'tokenizer.json'} is missing: a fast tokenizer is required")
    return copied


def save_ternary_model(student, out_dir: str | os.PathLike, base_model: str,
                       codes: dict[str, tuple] | None = None, token_embedding: str = "auto",
                       extra: dict | None = None) -> Path:
    """Writes the packed ternary model directory.

    `student`: a SentenceTransformer (or HF BertModel) whose transformer Linears are `TernaryLinear`s,
    or a plain one plus `codes` = {linear name: (int8 codes (out, in), float32 scale (out,))} (names
    relative to the BERT model, e.g. "encoder.layer.0.output.dense"); biases are taken from the model.
    `token_embedding`: "auto" (= "base" when bit-identical to the base model's table, else "float32"),
    "base", "float32", "int8", "int4", "int4g32" or "int4g16". `extra` is merged into config.json.
    """
    import torch
    from safetensors.numpy import save_file

    from encoder.ternary import TernaryLinear

    if token_embedding not in EMB_STORAGES:
        raise ValueError(f"token_embedding must be one of {EMB_STORAGES}")
    hf, max_len, pooling, normalize = _transformer_parts(student)
    cfg = hf.config
    if getattr(cfg, "model_type", "bert") != "bert" or \
            getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT models with absolute position embeddings are supported")
    if getattr(cfg, "hidden_act", "gelu") not in ("gelu", "gelu_new", "relu"):
        raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
    codes = dict(codes or {})
    base_name = portable_name(base_model)
    base_dir = resolve_base(base_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def f32(t) -> np.ndarray:
        return np.ascontiguousarray(torch.as_tensor(t).detach().float().cpu().numpy())

    tensors: dict[str, np.ndarray] = {}
    linear_names = [f"encoder.layer.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LAYER_LINEARS]
    with torch.no_grad():
        for name in linear_names:
            mod = hf.get_submodule(name)
            if name in codes:
                c, s = (torch.as_tensor(v) for v in codes[name])
            elif isinstance(mod, TernaryLinear):
                c, s = mod.ternary_codes_and_scale()
            else:
                raise ValueError(f"{name} is a {type(mod).__name__}, not a TernaryLinear, and no codes given")
            c = c.to(torch.int8).cpu().numpy()
            if c.shape != (mod.out_features, mod.in_features) or not np.isin(c, (-1, 0, 1)).all():
                raise ValueError(f"{name}: codes must be int8 {(mod.out_features, mod.in_features)} in {{-1,0,1}}")
            tensors[f"{name}.packed"] = packing.pack_ternary(c)
            tensors[f"{name}.scale"] = f32(s).reshape(-1)
            tensors[f"{name}.bias"] = f32(mod.bias if mod.bias is not None else torch.zeros(mod.out_features))
        # Float tensors: embeddings (but the word table) and every LayerNorm.
        float_names = ["embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
                       "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
        for i in range(cfg.num_hidden_layers):
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                float_names += [f"encoder.layer.{i}.{ln}.weight", f"encoder.layer.{i}.{ln}.bias"]
        state = hf.state_dict()
        for name in float_names:
            tensors[name] = f32(state[name])
        word = f32(state[WORD_EMB])

    storage = token_embedding
    if storage in ("auto", "base"):
        try:
            same = np.array_equal(word, read_base_tensor(base_dir, WORD_EMB))
        except (FileNotFoundError, KeyError):
            same = False
        if storage == "base" and not same:
            raise ValueError("token_embedding='base' but the model's token embeddings differ from the base model")
        storage = "base" if same else "float32"
    emb_info = {"shape": list(word.shape), "storage": storage, "sha256_float32": sha256_float32(word)}
    if storage == "base":
        emb_info["note"] = ("identical to the base model's table: not stored, read from the base "
                            "model's model.safetensors at load time")
    elif storage == "float32":
        _store_token_embedding(word, storage, tensors)
    else:
        emb_info["note"] = _store_token_embedding(word, storage, tensors)

    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    copied = _copy_tokenizer(base_dir, out)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_name,
        "architecture": "bert",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_seq_length": max_len,
        "pooling": pooling,
        "normalize": True,  # the encoder seam always returns L2-normalized rows
        "base_normalizes": normalize,
        "tokenizer": {"files": copied, "source": "copied from the base model"},
        "token_embedding": emb_info,
        "linear": {
            "names": linear_names,
            "packing": LINEAR_PACKING,
            "packing_version": packing.FORMAT_VERSION,
            "weight": "scale[:, None] * codes, codes in {-1, 0, +1}, 2 bits each, one float32 scale per row",
            "scheme": getattr(next((m for m in hf.modules() if isinstance(m, TernaryLinear)), None),
                              "scheme", None),
        },
    }
    config.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def convert_token_embedding(src: str | os.PathLike, dst: str | os.PathLike, storage: str) -> Path:
    """Copies a model directory, re-storing its token-embedding table as `storage` ("base", "float32" or a
    quantized one); everything else is copied bit for bit. A table is never quantized twice: a quantized one
    is re-stored from its float original, which only the base model can provide (the sha256 it was saved
    with must match the base model's table); otherwise conversion is refused."""
    from safetensors.numpy import save_file

    from encoder.ternary_format import base_token_embeddings, read_config

    src, dst = Path(src), Path(dst)
    cfg = read_config(src)
    tensors = load_tensors(src)
    info = cfg["token_embedding"]
    if info["storage"] in QUANTIZED:
        try:
            word = base_token_embeddings(cfg, src)
        except ValueError:
            raise ValueError(f"{src}: token embeddings are already {info['storage']} and their float original is "
                             "not the base model's table; convert from the float model") from None
        for name in (f"{WORD_EMB}.{info['storage']}", f"{WORD_EMB}.row_scale"):
            tensors.pop(name)
    elif info["storage"] == "base":
        word = base_token_embeddings(cfg, src)
    else:
        word = np.ascontiguousarray(tensors.pop(WORD_EMB), dtype=np.float32)
    if storage == "base":
        if sha256_float32(word) != info["sha256_float32"] or info["storage"] != "base" and \
                sha256_float32(read_base_tensor(resolve_base(cfg["base_model"]), WORD_EMB)) != sha256_float32(word):
            raise ValueError("token embeddings differ from the base model's: cannot store them as 'base'")
        note = "identical to the base model's table: not stored, read from the base model at load time"
    elif storage == "float32" or storage in QUANTIZED:
        note = _store_token_embedding(word, storage, tensors)
    else:
        raise ValueError(f"storage must be one of {EMB_STORAGES[1:]}")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / WEIGHTS_FILE), metadata={"format": FORMAT})
    for f in src.iterdir():
        if f.is_file() and f.name not in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(f, dst / f.name)
    cfg["token_embedding"] = {**info, "storage": storage, "note": note}
    (dst / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
    return dst


def main() -> None:
    import argparse

    from encoder.ternary_format import model_file_bytes
    from encoder.ternary_runtime import NativeTernaryEncoder

    p = argparse.ArgumentParser(description="Packed ternary model directory tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="re-store the token-embedding table (e.g. int4g32)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--token-embedding", required=True, choices=EMB_STORAGES[1:])
    i = sub.add_parser("info", help="bytes on disk and in memory")
    i.add_argument("path")
    args = p.parse_args()
    if args.cmd == "convert":
        print(convert_token_embedding(args.src, args.dst, args.token_embedding))
    else:
        require(Path(args.path), CONFIG_FILE)
        enc = NativeTernaryEncoder(args.path)
        print(json.dumps({"kernel_path": enc.kernel_path, "in_memory": enc.nbytes(),
                          "files": model_file_bytes(args.path),
                          "token_embedding": enc.config["token_embedding"]["storage"]}, indent=1))


if __name__ == "__main__":
    main()
