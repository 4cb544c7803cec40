"""The int8 peers of the ternary encoder: what a user would pick instead of it.

  ort-int8    the standard peer: `torch.onnx.export` of the base model, then
              `onnxruntime.quantization.quantize_dynamic(..., weight_type=QInt8)` (int8 weights,
              activations quantized per call), run by ONNX Runtime on 2 intra-op threads
  torch-int8  `torch.ao.quantization.quantize_dynamic` of the base model's Linear layers (qint8)

Each is an encoder like every other (`encode(texts, batch_size) -> (n, dim)` L2-normalized float32,
`.dim`, `.name`), mean-pooled over real tokens, texts truncated at the base model's 256 tokens, plus
`.cache_key` (content-derived, for encoder/embedding_cache.py). Quality (`python -m bench.quality`)
and speed (`python -m bench.speed`, which also times the float32 graph and the ORT-fused variants)
use these same objects. The ONNX files are built once under `$TERNREC_CACHE/onnx/<base model
fingerprint>/` (not in git).
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


GRAPHS = {"ort-fp32": "raw", "ort-int8": "int8", "ort-int8-fused": "fused-int8"}  # runtime -> onnx_paths key


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


def onnx_paths(base: str) -> dict[str, Path]:
    """The ONNX graphs of `base`, built once: "raw" (float32), "int8" (the standard peer), and the
    variant through ORT's transformer optimizer first ("fused", "fused-int8"). Each file is written
    under a temporary name and renamed, so a crash never leaves a half-written graph behind."""
    d = _cache() / f"{Path(base).name}-{model_fingerprint(base)}"
    paths = {"raw": d / "model.onnx", "int8": d / "model-int8.onnx", "fused": d / "model-fused.onnx",
             "fused-int8": d / "model-fused-int8.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    def build(name: str, write) -> None:
        if not paths[name].is_file():
            tmp = paths[name].with_suffix(f".{os.getpid()}.tmp.onnx")
            write(tmp)
            os.replace(tmp, paths[name])

    build("raw", lambda tmp: export_onnx(base, tmp))
    build("int8", lambda tmp: quantize_dynamic(str(paths["raw"]), str(tmp), weight_type=QuantType.QInt8))
    cfg = AutoConfig.from_pretrained(base)
    build("fused", lambda tmp: optimize_model(str(paths["raw"]), model_type="bert", num_heads=cfg.num_attention_heads,
                                              hidden_size=cfg.hidden_size, opt_level=1).save_model_to_file(str(tmp)))
    build("fused-int8", lambda tmp: quantize_dynamic(
        str(paths["fused"]), str(tmp), weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}))  # fused ops lack type info
    return paths


def onnx_linear_weight_bytes(path: Path) -> int:
    """Bytes of the initializers used as MatMul weights (float32 or int8)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    used = {n.input[1] for n in m.graph.node
            if n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inits}
    return int(sum(numpy_helper.to_array(inits[k]).nbytes for k in used))


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


class OrtEncoder:
    """One ONNX graph of the base model run by ONNX Runtime behind the encoder interface:
    length-sorted padded batches, mean pooling over real tokens, texts truncated at `max_len`."""

    def __init__(self, path: Path, tokenizer_file: Path, threads: int = THREADS, max_len: int = MAX_LEN,
                 name: str = "", cache_key: str = ""):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)
        self.dim = int(self.session.get_outputs()[0].shape[-1] or 384)
        self.name = name or self.path.stem
        self.cache_key = cache_key

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for chunk, ids, mask in length_sorted_batches(self.tokenizer, texts, batch_size):
            h = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            m = mask[..., None].astype(np.float32)
            pooled = (h * m).sum(1) / m.sum(1)
            out[chunk] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def ort_int8(base: str, threads: int = THREADS) -> OrtEncoder:
    """The standard peer: the dynamically quantized int8 graph of `base`."""
    return OrtEncoder(onnx_paths(base)["int8"], Path(base) / "tokenizer.json", threads, MAX_LEN, name="ort-int8",
                      cache_key=f"ort-int8:{EXPORT_RECIPE}:{MAX_LEN}:" + model_fingerprint(base))


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
    from encoder.base_model import default_base_model

    base = base or default_base_model()
    if name == "ort-int8":
        return ort_int8(base)
    if name == "torch-int8":
        return torch_int8(base)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
