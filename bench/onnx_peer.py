"""The ONNX Runtime peers of bench.speed: `torch.onnx.export` of the base model, its standard int8 version
(`onnxruntime.quantization.quantize_dynamic(..., weight_type=QInt8)`), and the variant through ORT's transformer
optimizer first; exported once and cached under ~/.cache/ternrec/onnx (not in git). `OrtEncoder` runs one of
them behind the encoder interface on the same tokenizer and truncation as the ternary model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec"))
GRAPHS = {"ort-fp32": "raw", "ort-int8": "int8", "ort-int8-fused": "fused-int8"}  # runtime -> onnx_paths key


def onnx_paths(base: str) -> dict[str, Path]:
    """Exports the base model once: the raw graph, its int8 quantization, and the ORT-fused variants."""
    st = Path(base) / "model.safetensors"
    key = f"{Path(base).name}-{st.stat().st_size}-{int(st.stat().st_mtime)}"
    d = CACHE / "onnx" / key
    paths = {"raw": d / "model.onnx", "int8": d / "model-int8.onnx", "fused": d / "model-fused.onnx",
             "fused-int8": d / "model-fused-int8.onnx"}
    if all(p.is_file() for p in paths.values()):
        return paths
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    d.mkdir(parents=True, exist_ok=True)
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
    with torch.no_grad():
        torch.onnx.export(Bert(model), (ids, mask), str(paths["raw"]), input_names=list(axes)[:2],
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    quantize_dynamic(str(paths["raw"]), str(paths["int8"]), weight_type=QuantType.QInt8)
    cfg = model.config
    fused = optimize_model(str(paths["raw"]), model_type="bert", num_heads=cfg.num_attention_heads,
                           hidden_size=cfg.hidden_size, opt_level=1)
    fused.save_model_to_file(str(paths["fused"]))
    quantize_dynamic(str(paths["fused"]), str(paths["fused-int8"]), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops lack type info
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


class OrtEncoder:
    """An exported graph behind the encoder interface: length-sorted padded batches, mean pooling."""

    def __init__(self, path: Path, tokenizer_file: Path, threads: int, max_len: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)
        self.dim = 384

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            seq = max(len(ids[i]) for i in chunk)
            arr = np.zeros((len(chunk), seq), dtype=np.int64)
            mask = np.zeros((len(chunk), seq), dtype=np.int64)
            for r, i in enumerate(chunk):
                arr[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            h = self.session.run(None, {"input_ids": arr, "attention_mask": mask})[0]
            m = mask[..., None].astype(np.float32)
            pooled = (h * m).sum(1) / m.sum(1)
            out[chunk] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out
