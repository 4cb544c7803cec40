"""The torch forward of a packed ternary model directory: the reference the native runtime is tested and
benchmarked against (needs the `train` extra; serving uses encoder/ternary_runtime.py).

Backends:
  "reference"  float32 matmul of the unpacked weights (float activations: the ground truth of the weights);
  "packed"     `PackedTernaryLinear` (the native kernel's GEMM, int8 activations per 64 inputs, exactly the
               arithmetic of the native forward's linears; everything else in torch).
Both run a lean BERT forward (no HF module tree): fused Q/K/V projection, torch SDPA attention (no mask when
nothing is padded), torch.inference_mode, length-sorted batches split to at most 4096 tokens per forward
pass, torch ops at 1 thread beside the kernel's own pool (two pools spinning on 2 cores starve each other),
mean pooling, L2 normalisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def _float_linear(weight: torch.Tensor, bias: torch.Tensor):
    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)
    linear.nbytes = weight.nbytes + bias.nbytes  # type: ignore[attr-defined]
    return linear


class TorchTernaryEncoder:
    """`.encode(texts, batch_size) -> (n, dim) L2-normalized float32` through torch (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, backend: str = "packed", max_tokens_per_forward: int = 4096):
        from tokenizers import Tokenizer

        if backend not in ("packed", "reference"):
            raise ValueError("backend must be 'packed' or 'reference'")
        path = Path(path)
        self.config = cfg = read_config(path)
        arrays = load_tensors(path)
        self.tokenizer = Tokenizer.from_file(str(require(path, "tokenizer.json")))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(cfg["max_seq_length"]))
        self.name = str(path)
        self.backend = backend
        self.dim = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])
        self.pooling = cfg.get("pooling", "mean")
        self.act = {"gelu": F.gelu, "relu": F.relu,
                    "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[cfg["hidden_act"]]
        self.max_tokens_per_forward = max_tokens_per_forward

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(tensor(arrays, name, path), dtype=np.float32))

        def make_linear(names: list[str]):
            scale = torch.cat([t(f"{n}.scale") for n in names]).contiguous()
            bias = torch.cat([t(f"{n}.bias") for n in names]).contiguous()
            codes = torch.from_numpy(np.concatenate([unpack_codes(arrays, n, cfg) for n in names]))
            if backend == "reference":
                return _float_linear((codes.float() * scale[:, None]).contiguous(), bias)
            from encoder.packed_linear import PackedTernaryLinear

            return PackedTernaryLinear.from_codes(codes, scale, bias)

        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            self.layers.append({
                "qkv": make_linear([p + n for n in LAYER_LINEARS[:3]]),  # one (3h, h) projection
                "attn_out": make_linear([p + "attention.output.dense"]),
                "ln1": (t(p + "attention.output.LayerNorm.weight"), t(p + "attention.output.LayerNorm.bias")),
                "up": make_linear([p + "intermediate.dense"]),
                "down": make_linear([p + "output.dense"]),
                "ln2": (t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias")),
            })
        self.pos_emb = t("embeddings.position_embeddings.weight")
        self.type0 = t("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
        storage = cfg["token_embedding"]["storage"]
        if storage == "base":
            self.word_emb = FloatEmbedding(torch.from_numpy(base_token_embeddings(cfg, path)))
        elif storage == "float32":
            self.word_emb = FloatEmbedding(t(WORD_EMB))
        else:
            bits, group = QUANTIZED[storage]
            codes = np.array(tensor(arrays, f"{WORD_EMB}.{storage}", path))
            scale = np.array(tensor(arrays, f"{WORD_EMB}.row_scale", path))
            self.word_emb = QuantizedEmbedding(torch.from_numpy(codes), torch.from_numpy(scale), bits,
                                               int(cfg["token_embedding"]["shape"][1]), group)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the tensors this encoder holds, by kind."""
        linear = sum(lin.nbytes for layer in self.layers
                     for lin in (layer["qkv"], layer["attn_out"], layer["up"], layer["down"]))
        other = self.pos_emb.nbytes + self.type0.nbytes + sum(x.nbytes for x in self.emb_ln)
        other += sum(x.nbytes for layer in self.layers for x in layer["ln1"] + layer["ln2"])
        word = self.word_emb.nbytes()
        return {"linear": linear, "token_embedding": word, "other": other, "total": linear + word + other}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids (B, L) int64, mask (B, L) bool or None when no padding -> pooled (B, hidden)."""
        b, seq = ids.shape
        h, nh = self.dim, self.heads
        x = self.word_emb(ids) + self.pos_emb[:seq] + self.type0
        x = F.layer_norm(x, (h,), *self.emb_ln, self.eps).reshape(b * seq, h)
        attn_mask = None if mask is None else mask[:, None, None, :]
        for layer in self.layers:
            qkv = layer["qkv"](x).view(b, seq, 3, nh, h // nh).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            a = a.transpose(1, 2).reshape(b * seq, h)
            x = F.layer_norm(layer["attn_out"](a) + x, (h,), *layer["ln1"], self.eps)
            x = F.layer_norm(layer["down"](self.act(layer["up"](x))) + x, (h,), *layer["ln2"], self.eps)
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
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding in each batch
        prev = torch.get_num_threads()
        if self.backend == "packed":
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    batch = order[start:start + batch_size]
                    rows = max(1, self.max_tokens_per_forward // len(ids[batch[-1]]))
                    for chunk in (batch[i:i + rows] for i in range(0, len(batch), rows)):
                        lengths = np.array([len(ids[i]) for i in chunk])
                        arr = np.zeros((len(chunk), lengths.max()), dtype=np.int64)
                        for row, i in enumerate(chunk):
                            arr[row, : lengths[row]] = ids[i]
                        mask = None if (lengths == lengths.max()).all() else \
                            torch.from_numpy(np.arange(lengths.max())[None, :] < lengths[:, None])
                        out[chunk] = F.normalize(self.forward(torch.from_numpy(arr), mask), dim=-1).numpy()
        finally:
            torch.set_num_threads(prev)
        return out
