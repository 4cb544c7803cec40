"""The native ternary encoder: `NativeTernaryEncoder(path).encode(texts)`, what `load_encoder` returns for a
packed ternary model directory (encoder/ternary_format.py).

Python tokenizes (the `tokenizers` fast tokenizer, truncation at the model's max_seq_length, no padding) and
packs a batch's token ids back to back with per-sequence offsets; the whole BERT forward then runs in one
native call with the GIL released (encoder/kernel/tq2k_forward.c): embeddings dequantized on the fly,
LayerNorm, fused QKV GEMM, attention per sequence at its own length (no padding work), output projection,
residual + LayerNorm, FFN up with GELU fused into the GEMM epilogue, FFN down, mean pooling, L2 normalisation,
every stage on the kernel's own thread pool. The model's tensors are read with `safetensors.numpy` and
handed to the kernel once, at load; the linear weights stay 2-bit packed. No torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from encoder import kernel, packing
from encoder.ternary_format import (
    LAYER_LINEARS,
    QUANTIZED,
    WORD_EMB,
    base_token_embeddings,
    load_tensors,
    read_config,
    require,
    tensor,
    unpack_codes,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ACT_FN = {"gelu": 0, "gelu_new": 1, "relu": 2}  # enum tq2k_act_fn
POOLING = {"mean": 0, "cls": 1}  # enum tq2k_pooling
EMB_KIND = {"float32": 0, "int8": 1, "int4": 2, "int4g32": 3, "int4g16": 3}  # enum tq2k_emb_kind
MAX_TOKENS_PER_CALL = 4096  # tokens per forward chunk inside the kernel: bounds the activations (~35 MB)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def fused_qkv(tensors: dict[str, np.ndarray], prefix: str, cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query, key and value stacked into one (3 hidden, hidden) packed Linear: (packed, scale, bias)."""
    names = [prefix + n for n in LAYER_LINEARS[:3]]
    if int(cfg["hidden_size"]) % packing.BLOCK_OUT == 0:  # whole 16-row tiles: the packed bytes simply stack
        packed = np.concatenate([tensors[f"{n}.packed"] for n in names])
    else:
        packed = packing.pack_ternary(np.concatenate([unpack_codes(tensors, n, cfg) for n in names]))
    return (np.ascontiguousarray(packed), _f32(np.concatenate([tensors[f"{n}.scale"] for n in names])),
            _f32(np.concatenate([tensors[f"{n}.bias"] for n in names])))


class NativeTernaryEncoder:
    """A ternary BERT sentence encoder: `.encode(texts, batch_size) -> (n, dim) L2-normalized float32`."""

    backend = "native"  # beside TorchTernaryEncoder's "packed" / "reference": part of embedding cache keys

    def __init__(self, path: str | os.PathLike, threads: int = 2, kernel_path: str | None = None,
                 max_tokens_per_call: int = MAX_TOKENS_PER_CALL):
        """`threads`: the kernel's threads for this encoder (the caller included); `kernel_path`: force a
        kernel path ("reference" runs on any CPU), default the best this CPU runs."""
        from tokenizers import Tokenizer

        path = Path(path)
        self.config = cfg = read_config(path)
        tensors = load_tensors(path)
        for name in [f"encoder.layer.{i}.{n}" for i in range(int(cfg["num_hidden_layers"])) for n in LAYER_LINEARS]:
            for part in ("packed", "scale", "bias"):
                tensor(tensors, f"{name}.{part}", path)
        self.tokenizer = Tokenizer.from_file(str(require(path, "tokenizer.json")))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(cfg["max_seq_length"]))
        self.name = str(path)
        self.dim = int(cfg["hidden_size"])
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.kernel_path = kernel.checked_path(kernel_path)
        self._path_id = kernel.path_id(self.kernel_path)
        self.max_tokens_per_call = int(max_tokens_per_call)

        emb_kind, emb_codes, emb_scale, emb_group = self._token_embedding(path, cfg, tensors)
        ordered: list[np.ndarray | None] = []  # the order tq2k_module.c's model_new reads
        self._bytes = {"linear": 0, "token_embedding": 0, "other": 0}

        def add(kind: str, *arrays: np.ndarray | None) -> None:
            ordered.extend(arrays)
            self._bytes[kind] += sum(a.nbytes for a in arrays if a is not None)

        add("token_embedding", emb_codes, emb_scale)
        add("other", _f32(tensor(tensors, "embeddings.position_embeddings.weight", path)),
            _f32(tensor(tensors, "embeddings.token_type_embeddings.weight", path)[0]),
            _f32(tensor(tensors, "embeddings.LayerNorm.weight", path)),
            _f32(tensor(tensors, "embeddings.LayerNorm.bias", path)))
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            add("linear", *fused_qkv(tensors, p, cfg))
            for name in ("attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                         "output.dense", "output.LayerNorm"):
                if name.endswith("LayerNorm"):
                    add("other", _f32(tensor(tensors, f"{p}{name}.weight", path)),
                        _f32(tensor(tensors, f"{p}{name}.bias", path)))
                else:
                    add("linear", np.ascontiguousarray(tensors[f"{p}{name}.packed"]),
                        _f32(tensors[f"{p}{name}.scale"]), _f32(tensors[f"{p}{name}.bias"]))
        dims = (int(cfg["num_hidden_layers"]), self.dim, int(cfg["num_attention_heads"]),
                int(cfg["intermediate_size"]), int(cfg["vocab_size"]), int(cfg["max_position_embeddings"]),
                ACT_FN[cfg["hidden_act"]], POOLING[cfg.get("pooling", "mean")], float(cfg["layer_norm_eps"]),
                emb_kind, emb_group)
        self._model = kernel._lib().model_new(dims, ordered)  # holds views of the arrays for its lifetime

    @staticmethod
    def _token_embedding(path: Path, cfg: dict, tensors: dict) -> tuple[int, np.ndarray, np.ndarray | None, int]:
        """(kind, codes, scale, group) of the token-embedding table as the kernel reads it."""
        storage = cfg["token_embedding"]["storage"]
        if storage == "base":
            return EMB_KIND["float32"], base_token_embeddings(cfg, path), None, 0
        if storage == "float32":
            return EMB_KIND["float32"], _f32(tensor(tensors, WORD_EMB, path)), None, 0
        bits, group = QUANTIZED[storage]
        codes = np.ascontiguousarray(tensor(tensors, f"{WORD_EMB}.{storage}", path))
        scale = np.ascontiguousarray(tensor(tensors, f"{WORD_EMB}.row_scale", path))
        want = np.int8 if bits == 8 else np.uint8
        if codes.dtype != want or scale.dtype != (np.float16 if group else np.float32):
            raise ValueError(f"{path}: token embedding {storage} tensors have dtypes {codes.dtype}/{scale.dtype}")
        return EMB_KIND[storage], codes, scale, group or 0

    def nbytes(self) -> dict[str, int]:
        """Bytes of the tensors the kernel reads, by kind (what stays resident for inference)."""
        return {**self._bytes, "total": sum(self._bytes.values())}

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lib = kernel._lib()
        for start in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[start:start + batch_size])
            offsets = np.zeros(len(ids) + 1, np.int32)
            np.cumsum([len(i) for i in ids], out=offsets[1:])
            flat = np.fromiter((t for seq in ids for t in seq), np.int32, count=int(offsets[-1]))
            lib.encode(self._model, flat, offsets, out[start:start + len(ids)], self._path_id, self.threads,
                       self.max_tokens_per_call)
        return out
