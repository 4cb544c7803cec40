"""The int8 peers of the ternary encoder: what a user would pick instead of it.

  ort-int8    the standard peer: `torch.onnx.export` of the base model, then
              `onnxruntime.quantization.quantize_dynamic(..., weight_type=QInt8)` (int8 weights,
              activations quantized per call), run by ONNX Runtime on 2 intra-op threads
  torch-int8  `torch.ao.quantization.quantize_dynamic` of the base model's Linear layers (qint8)

Each is an encoder like every other (`encode(texts, batch_size) -> (n, dim)` L2-normalized float32,
`.dim`, `.name`), mean-pooled over real tokens, texts truncated at the base model's 256 tokens, plus
`.cache_key` (content-derived, for encoder/embedding_cache.py). Quality (`python -m bench.quality`)
and speed benchmarks use these same objects. The ONNX files are built once under
`$TERNREC_CACHE/onnx/<base model fingerprint>/` (not in git).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from encoder.embedding_cache import model_fingerprint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEERS = ("ort-int8", "torch-int8")
THREADS = 2
MAX_LEN = 256
EXPORT_RECIPE = "export-v1:opset17:additive-mask:quantize_dynamic-QInt8"  # part of every cache key


def _cache() -> Path:
    return Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec")) / "onnx"


def export_onnx(base: str, path: Path) -> Path:
    """`torch.onnx.export` of the base model's transformer (input_ids, attention_mask ->
    last_hidden_state), dynamic batch and length, opset 17."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(base, attn_implementation="eager").eval()

    class Bert(torch.nn.Module):
        """Embeddings + layers with an explicit additive mask: HF's mask builder does not trace."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
            ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for layer in self.m.encoder.layer:
                h = layer(h, attention_mask=ext)
                h = h[0] if isinstance(h, tuple) else h
            return h

    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
            "last_hidden_state": {0: "b", 1: "s"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Bert(model), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def onnx_int8(base: str) -> Path:
    """The dynamically quantized ONNX graph of `base` (built once, then reused)."""
    d = _cache() / f"{Path(base).name}-{model_fingerprint(base)}"
    raw, int8 = d / "model.onnx", d / "model-int8.onnx"
    if int8.is_file():
        return int8
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not raw.is_file():
        os.replace(export_onnx(base, d / f"model.{os.getpid()}.tmp.onnx"), raw)
    tmp = d / f"model-int8.{os.getpid()}.tmp.onnx"
    quantize_dynamic(str(raw), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, int8)
    return int8


def length_sorted_batches(tokenizer, texts: list[str], batch_size: int):
    """(original positions, ids (B, L) int64, mask (B, L) int64), batches of similar length."""
    ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seq = max(len(ids[i]) for i in chunk)
        arr = np.zeros((len(chunk), seq), dtype=np.int64)
        mask = np.zeros((len(chunk), seq), dtype=np.int64)
        for r, i in enumerate(chunk):
            arr[r, :len(ids[i])] = ids[i]
            mask[r, :len(ids[i])] = 1
        yield chunk, arr, mask


class OrtInt8Encoder:
    """ONNX Runtime, dynamically quantized int8 graph of the base model (see the module docstring)."""

    def __init__(self, base: str, threads: int = THREADS):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path = onnx_int8(base)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(Path(base) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_LEN)
        self.dim = int(self.session.get_outputs()[0].shape[-1] or 384)
        self.name = "ort-int8"
        self.cache_key = f"ort-int8:{EXPORT_RECIPE}:{MAX_LEN}:" + model_fingerprint(base)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for chunk, ids, mask in length_sorted_batches(self.tokenizer, texts, batch_size):
            h = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            m = mask[..., None].astype(np.float32)
            pooled = (h * m).sum(1) / m.sum(1)
            out[chunk] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def torch_int8(base: str, threads: int = THREADS):
    """sentence-transformers with every Linear of the transformer dynamically quantized to qint8."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    from encoder.loading import SentenceTransformerEncoder

    torch.set_num_threads(threads)
    enc = SentenceTransformerEncoder(base)
    enc.model.eval()
    # In place: `auto_model` is a read-only property of the sentence-transformers module, and assigning
    # it registers a new submodule the forward never calls (the float model would keep running).
    quantize_dynamic(enc.model[0].auto_model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    enc.name = "torch-int8"
    enc.cache_key = f"torch-int8:qint8-dynamic:torch-{torch.__version__}:" + model_fingerprint(base)
    return enc


def load_peer(name: str, base: str = ""):
    """One of PEERS, built from `base` (default: the bundled MiniLM)."""
    from encoder.loading import default_base_model

    base = base or default_base_model()
    if name == "ort-int8":
        return OrtInt8Encoder(base)
    if name == "torch-int8":
        return torch_int8(base)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
