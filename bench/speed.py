"""Encoder speed and footprint: `python -m bench.speed` -> reports/speed.json + "## Speed" in BENCHMARKS.md.

Runtimes, all on the same texts in the same run, 2 threads each:
  torch-fp32       sentence-transformers, float32 (the base model)
  torch-int8       torch dynamic quantization (qint8 Linear) of that model
  ort-fp32         ONNX export of the same base model, ORT transformer fusions, ORT_ENABLE_ALL
  ort-int8         onnxruntime dynamic quantization (int8 weights, uint8 activations) of ort-fp32
  ternary-packed   the packed ternary model (encoder.ternary_model, native 2-bit kernel)
  ternary-packed-int4emb  the same, token-embedding table stored and kept in 4 bits ("int4g32": one
                   float16 scale per 32 columns)
  ternary-ref      the same ternary model through float matmuls of the unpacked weights (isolates the
                   kernel's share from the lean forward's share)
Each runtime lives in its own worker subprocess (honest peak RSS: VmHWM of that process), driven
over stdin/stdout. Timing rounds interleave the runtimes, so the machine's background load (2 cores
shared with other jobs) hits them alike; the figure is the median over rounds of sentences/s.
Texts: "short" = catalog "title by authors", "long" = SciFact title + abstract (truncated at 256
tokens by every runtime). ONNX exports are cached under ~/.cache/ternrec/onnx (not in git).
Without a trained model (models/ternary-minilm), a randomly ternarized base model is saved through
encoder.ternary_model and used: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import update_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCIFACT = (REPO_ROOT / ".." / "shared" / "data" / "scifact").resolve()
CACHE = Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec"))
DEFAULT_TERNARY = REPO_ROOT / "models" / "ternary-minilm"
RUNTIMES = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ternary-packed", "ternary-packed-int4emb",
            "ternary-ref")
THREADS = 2
MAX_LEN = 256


# ----------------------------------------------------------------------------- texts

def short_texts(n: int) -> list[str]:
    from ingest.catalog import load_items

    return [f"{i.title} by {i.authors}" for i in load_items()[:n]]


def long_texts(n: int) -> list[str]:
    out = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append((d.get("title", "") + " " + d.get("text", "")).strip())
            if len(out) == n:
                break
    return out


# ----------------------------------------------------------------------------- ONNX export (cached)

def onnx_paths(base: str) -> dict[str, Path]:
    """Exports the base model once: raw graph, ORT-fused float32, dynamically quantized int8."""
    st = Path(base) / "model.safetensors"
    key = f"{Path(base).name}-{st.stat().st_size}-{int(st.stat().st_mtime)}"
    d = CACHE / "onnx" / key
    paths = {"raw": d / "model.onnx", "fp32": d / "model-fused.onnx", "int8": d / "model-fused-int8.onnx"}
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
    cfg = model.config
    fused = optimize_model(str(paths["raw"]), model_type="bert", num_heads=cfg.num_attention_heads,
                           hidden_size=cfg.hidden_size, opt_level=1)
    fused.save_model_to_file(str(paths["fp32"]))
    quantize_dynamic(str(paths["fp32"]), str(paths["int8"]), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return paths


def onnx_linear_weight_bytes(path: Path) -> int:
    """Bytes of the initializers used as MatMul weights (float32 or int8)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    used = set()
    for n in m.graph.node:
        if n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm") and len(n.input) > 1:
            if n.input[1] in inits:
                used.add(n.input[1])
    return int(sum(numpy_helper.to_array(inits[k]).nbytes for k in used))


# ----------------------------------------------------------------------------- worker encoders

def token_batches(tokenizer, texts: list[str], batch_size: int):
    """Length-sorted padded batches: (original indices, ids (B, L) int64, mask (B, L) int64)."""
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        seq = max(len(ids[i]) for i in chunk)
        arr = np.zeros((len(chunk), seq), dtype=np.int64)
        mask = np.zeros((len(chunk), seq), dtype=np.int64)
        for r, i in enumerate(chunk):
            arr[r, : len(ids[i])] = ids[i]
            mask[r, : len(ids[i])] = 1
        yield chunk, arr, mask


class OrtEncoder:
    def __init__(self, path: Path, base: str):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(Path(base) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_LEN)
        self.dim = 384
        self.name = path.name

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for chunk, ids, mask in token_batches(self.tokenizer, list(texts), batch_size):
            h = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            m = mask[..., None].astype(np.float32)
            pooled = (h * m).sum(1) / m.sum(1)
            out[chunk] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


def build_runtime(runtime: str, base: str, ternary: str) -> tuple[object, dict]:
    """(encoder, footprint info) for one runtime; runs inside the worker process."""
    import torch

    torch.set_num_threads(THREADS)
    from encoder.loading import SentenceTransformerEncoder

    info: dict = {}
    if runtime in ("torch-fp32", "torch-int8"):
        enc = SentenceTransformerEncoder(base)
        enc.model.eval()
        hf = enc.model[0].auto_model
        # The encoder's Linears only: HF adds an untrained pooler that mean pooling never uses.
        linears = [m for m in hf.encoder.modules() if isinstance(m, torch.nn.Linear)]
        params = sum(p.nbytes for n, p in hf.named_parameters() if not n.startswith("pooler."))
        lin_bytes = sum(m.weight.nbytes for m in linears)
        info["file_bytes"] = (Path(base) / "model.safetensors").stat().st_size
        if runtime == "torch-fp32":
            info.update(linear_weight_bytes=lin_bytes, model_bytes_in_memory=params)
        else:
            from torch.ao.quantization import quantize_dynamic

            enc.model[0].auto_model = quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8)
            int8 = sum(m.weight.numel() for m in linears)  # one byte per weight (+ a scale per tensor)
            info.update(linear_weight_bytes=int8, model_bytes_in_memory=params - lin_bytes + int8,
                        file_bytes_note="quantized at load time from the float32 file")
        return enc, info
    if runtime in ("ort-fp32", "ort-int8"):
        paths = onnx_paths(base)
        path = paths["fp32" if runtime == "ort-fp32" else "int8"]
        info["file_bytes"] = path.stat().st_size
        return OrtEncoder(path, base), info
    from encoder.ternary_model import load_ternary_encoder, model_file_bytes

    if runtime == "ternary-packed-int4emb":
        ternary = str(int4_variant(Path(ternary)))
    enc = load_ternary_encoder(ternary, backend="reference" if runtime == "ternary-ref" else "packed")
    nb = enc.nbytes()
    info.update(linear_weight_bytes=nb["linear"], model_bytes_in_memory=nb["total"],
                memory_breakdown=nb, backend=enc.backend,
                file_bytes=model_file_bytes(ternary)["model.safetensors"],
                token_embedding_storage=enc.config["token_embedding"]["storage"])
    if info["token_embedding_storage"] == "base":
        # Not in the file but part of the model: count it, or the file ratio would flatter us.
        info["file_bytes_with_base_embedding"] = info["file_bytes"] + nb["token_embedding"]
    return enc, info


def peak_rss_kb() -> int:
    """VmHWM of this process. (ru_maxrss survives execve on Linux, so a worker would report its
    parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(runtime: str, base: str, ternary: str, texts_file: str) -> None:
    """Line protocol: reply to each JSON command on stdout; stderr is left for warnings."""
    rss0 = peak_rss_kb()
    texts = json.loads(Path(texts_file).read_text())
    t0 = time.perf_counter()
    enc, info = build_runtime(runtime, base, ternary)
    info["load_seconds"] = round(time.perf_counter() - t0, 2)
    enc.encode(texts["short"][:8], batch_size=8)  # warm-up: lazy init, allocator
    enc.encode(texts["long"][:2], batch_size=2)
    info["rss_before_load_kb"] = rss0
    info["rss_after_load_kb"] = peak_rss_kb()
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            batch = texts[cmd["set"]][: cmd.get("limit")]
            t = time.perf_counter()
            enc.encode(batch, batch_size=cmd["batch"])
            reply = {"seconds": time.perf_counter() - t, "n": len(batch)}
        elif cmd["op"] == "embed":
            np.save(cmd["out"], enc.encode(texts[cmd["set"]], batch_size=32), allow_pickle=False)
            reply = {"ok": True}
        else:
            print(json.dumps({"peak_rss_kb": peak_rss_kb()}), flush=True)
            return
        print(json.dumps(reply), flush=True)


class Worker:
    def __init__(self, runtime: str, base: str, ternary: str, texts_file: Path):
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
                   PYTHONWARNINGS="ignore")
        self.runtime = runtime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.speed", "--worker", runtime, "--base", base,
             "--ternary", ternary, "--texts-file", str(texts_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.runtime} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        reply = self.ask(op="quit")
        self.proc.wait(timeout=60)
        return reply


# ----------------------------------------------------------------------------- forward ablation (item 5)

class HFTreePackedEncoder:
    """Baseline for the lean forward: sentence-transformers' module tree (HF BertModel, its masks,
    three Q/K/V calls, ST's tokenizer and pooling) with every Linear swapped for PackedTernaryLinear."""

    def __init__(self, ternary: str, base: str, torch_threads: int = THREADS):
        import torch
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        from encoder.packed_linear import PackedTernaryLinear
        from encoder.ternary_model import unpack_codes

        cfg = json.loads((Path(ternary) / "config.json").read_text())
        tensors = load_file(str(Path(ternary) / "model.safetensors"))
        self.model = SentenceTransformer(base, device="cpu").eval()
        hf = self.model[0].auto_model
        # The float tensors the distillation may have changed (LayerNorms, position embeddings).
        floats = {k: v for k, v in tensors.items() if k.endswith((".weight", ".bias"))
                  and not any(k.startswith(n + ".") for n in cfg["linear"]["names"])}
        missing = set(floats) - set(hf.state_dict())
        assert not missing, missing
        hf.load_state_dict(floats, strict=False)
        for name in cfg["linear"]["names"]:
            old = hf.get_submodule(name)
            codes = unpack_codes(tensors[f"{name}.packed"].numpy(), cfg["linear"]["packing"],
                                 old.out_features, old.in_features)
            new = PackedTernaryLinear.from_codes(torch.from_numpy(codes), tensors[f"{name}.scale"],
                                                 tensors[f"{name}.bias"])
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, new)
        self._torch = torch
        self.torch_threads = torch_threads

    def encode(self, texts, batch_size=32):
        torch = self._torch
        prev = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            with torch.inference_mode():
                return self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                         normalize_embeddings=True, show_progress_bar=False)
        finally:
            torch.set_num_threads(prev)


def forward_ablation(ternary: str, base: str, texts: dict, rounds: int) -> dict:
    """Same packed kernel, forward variants interleaved in one process: what each change buys."""
    import torch

    from encoder.ternary_model import TernaryEncoder

    torch.set_num_threads(THREADS)
    # A subset: the slowest variants run at a few sentences/s on a loaded machine.
    texts = {"short": texts["short"][:64], "long": texts["long"][:16]}
    # Kernel: 2 OpenMP threads throughout; "torch N" = torch's intra-op threads for everything else.
    variants = {
        "HF module tree (sentence-transformers), torch 2": HFTreePackedEncoder(ternary, base, 2),
        "HF module tree, torch 1": HFTreePackedEncoder(ternary, base, 1),
        "lean forward, separate Q/K/V, always masked, torch 1": TernaryEncoder(
            ternary, "packed", fuse_qkv=False, mask_free_when_unpadded=False, torch_threads=1),
        "lean, fused QKV, always masked, torch 1": TernaryEncoder(
            ternary, "packed", mask_free_when_unpadded=False, torch_threads=1),
        "lean, fused QKV, no mask when unpadded, torch 1, no token cap": TernaryEncoder(
            ternary, "packed", max_tokens_per_forward=1 << 30),
        "lean, + at most 4096 tokens per forward (default)": TernaryEncoder(ternary, "packed"),
        "lean, fused QKV, no mask when unpadded, torch 2": TernaryEncoder(ternary, "packed", torch_threads=2),
    }
    ref = None
    for enc in variants.values():
        e = enc.encode(texts["short"][:32], batch_size=8)
        ref = e if ref is None else ref
        assert float(np.min(np.sum(e * ref, axis=1))) > 0.999, "variants must compute the same embeddings"
    times: dict = {v: {} for v in variants}
    configs = [("short", 1), ("short", 32), ("long", 1), ("long", 32)]
    for rnd in range(rounds):
        for s, b in configs:
            names = list(variants)
            names = names[rnd % len(names):] + names[: rnd % len(names)]
            for v in names:
                t = time.perf_counter()
                variants[v].encode(texts[s], batch_size=b)
                times[v].setdefault(f"{s}_b{b}", []).append(len(texts[s]) / (time.perf_counter() - t))
                print(f"ablation round {rnd + 1} {s} b{b} {v}: {times[v][f'{s}_b{b}'][-1]:.1f}", flush=True)
    base_name = next(iter(variants))
    return {v: {k: {"sentences_per_s": float(np.median(x)),
                    "speedup_vs_hf_tree": float(np.median(np.array(x) / np.array(times[base_name][k])))}
                for k, x in t.items()} for v, t in times.items()}


# ----------------------------------------------------------------------------- report

def int4_variant(ternary: Path) -> Path:
    """The model with its token-embedding table in 4 bits, int4g32 (cached copy; the model is unchanged)."""
    from encoder.ternary_model import convert_token_embedding

    cfg = json.loads((ternary / "config.json").read_text())
    if cfg["token_embedding"]["storage"] in ("int4", "int4g32", "int4g16"):
        return ternary
    key = (ternary / "model.safetensors").stat()
    out = CACHE / "bench" / f"{ternary.name}-{key.st_size}-{int(key.st_mtime)}-int4g32emb"
    if not (out / "config.json").is_file():
        convert_token_embedding(ternary, out, "int4g32")
    return out


def random_ternary_model(base: str) -> Path:
    """A randomly ternarized base model (row_opt codes of the float weights), saved through our format."""
    from sentence_transformers import SentenceTransformer

    from encoder.ternary import ternarize_model
    from encoder.ternary_model import save_ternary_model

    out = CACHE / "bench" / "random-ternary-minilm"
    if not (out / "config.json").is_file():
        save_ternary_model(ternarize_model(SentenceTransformer(base, device="cpu"), "row_opt"), out, base)
    return out


def markdown(report: dict) -> str:
    rs = report["runtimes"]
    names = list(rs)
    cols = [("short", 1), ("short", 32), ("long", 1), ("long", 32)]
    lines = ["## Speed", "",
             f"Generated by `python -m bench.speed` ({report['date']}; {THREADS} threads; "
             f"{report['n_short']} short texts = catalog \"title by authors\", {report['n_long']} long texts = "
             f"SciFact title + abstract truncated at {MAX_LEN} tokens; at batch 1 the first "
             f"{report['n_b1']['short']} / {report['n_b1']['long']} of them; median of {report['rounds']} interleaved "
             f"rounds; machine shared with other jobs, load average at start {report['loadavg_start']}). "
             f"Ternary model: `{report['ternary_model']}`"
             + (" (randomly ternarized: speed only)." if report["ternary_random"] else "."),
             "", "| runtime | " + " | ".join(f"{s} b{b} sent/s" for s, b in cols)
             + " | linear weights MB | model in memory MB | model file MB | RSS after load MB | peak RSS MB "
             "| cos to fp32 |",
             "|---|" + "---|" * (len(cols) + 6)]

    def mb(v):
        return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else "–"

    for n in names:
        r = rs[n]
        sps = r["sentences_per_s"]
        cells = [f"{sps[f'{s}_b{b}']:.1f}" if f"{s}_b{b}" in sps else "–" for s, b in cols]
        cells += [mb(r.get("linear_weight_bytes")), mb(r.get("model_bytes_in_memory")),
                  mb(r.get("file_bytes")), f"{r['rss_after_load_kb'] / 1024:.0f}", f"{r['peak_rss_kb'] / 1024:.0f}",
                  f"{r.get('mean_cos_to_fp32_short', float('nan')):.3f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    ratio = report.get("ternary_vs_ort_int8")
    if ratio:
        lines += ["", "Packed ternary vs ONNX Runtime int8 (same-run ratio of sentences/s): "
                  + ", ".join(f"{k} {v:.2f}×" for k, v in ratio.items()) + "."]
    for name, fp in (report.get("footprint_vs_fp32") or {}).items():
        lines += ["", f"Footprint of {name} against torch-fp32 (float32): "
                  + ", ".join(f"{k} {v:.4f}× (1/{1 / v:.1f})" for k, v in fp.items()) + "."]
    lines += ["", "Linear weights = the 36 encoder Linears (weights; for ternary also the per-row scales and "
              "biases). Model in memory = the tensors the runtime holds for inference (torch-int8: int8 "
              "Linear weights + float rest; ORT: not measured, see file and RSS). Model file for ternary with "
              "`token_embedding: base` counts the float32 table it reads from the base model."]
    lines += ["", "RSS (VmHWM) includes the Python interpreter, torch/onnxruntime libraries and the tokenizer "
              "(each runtime in its own process); \"after load\" = after loading and a short warm-up, \"peak\" = "
              "at the end, after the timed runs (untimed runtimes never held long-text activations). "
              "`cos to fp32` = mean cosine of the short-text embeddings to torch-fp32 (sanity check; the "
              "ternary model's quality is in the Quality section)."]
    abl = report.get("forward_ablation")
    if abl:
        lines += ["", "### The rest of the forward pass (packed ternary, same kernel)", "",
                  "Each change measured in one process, variants interleaved, on the first 64 short and 16 long "
                  "texts; sentences/s (median) and the same-round speed-up over the first row"
                  + (f" (measured {report['forward_ablation_from']})." if report.get("forward_ablation_from")
                     else "."), "",
                  "| forward | " + " | ".join(f"{s} b{b}" for s, b in cols) + " |", "|---|" + "---|" * len(cols)]
        for v, r in abl.items():
            lines.append(f"| {v} | " + " | ".join(
                f"{r[f'{s}_b{b}']['sentences_per_s']:.1f} ({r[f'{s}_b{b}']['speedup_vs_hf_tree']:.2f}×)"
                for s, b in cols) + " |")
    if report.get("profile"):
        lines += ["", report["profile"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--base", default="")
    p.add_argument("--ternary", default=str(DEFAULT_TERNARY))
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--timed", default="torch-fp32,torch-int8,ort-fp32,ort-int8,ternary-packed,"
                   "ternary-packed-int4emb",
                   help="runtimes timed (the others: footprint, RSS and embeddings only)")
    p.add_argument("--n-b1", type=int, default=64, help="texts per set at batch 1 (slow runtimes)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ablation-rounds", type=int, default=2, help="0 keeps the last measured ablation")
    p.add_argument("--n-short", type=int, default=256)
    p.add_argument("--n-long", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "speed.json")
    p.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    if args.worker == "ablation":
        texts = json.loads(Path(args.texts_file).read_text())
        args.out.write_text(json.dumps(forward_ablation(args.ternary, args.base, texts, args.rounds)))
        return
    if args.worker:
        worker(args.worker, args.base, args.ternary, args.texts_file)
        return

    from encoder.loading import default_base_model

    base = args.base or default_base_model()
    ternary = Path(args.ternary)
    is_random = not (ternary / "config.json").is_file()
    if is_random:
        ternary = random_ternary_model(base)
    if any(r.startswith("ort") for r in args.runtimes.split(",")):
        onnx_paths(base)  # export once, outside the timed workers
    if "ternary-packed-int4emb" in args.runtimes:
        int4_variant(ternary)  # convert once, before the workers start
    texts = {"short": short_texts(args.n_short), "long": long_texts(args.n_long)}
    texts_file = CACHE / "bench" / "speed-texts.json"
    texts_file.parent.mkdir(parents=True, exist_ok=True)
    texts_file.write_text(json.dumps(texts))

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": THREADS,
                    "rounds": args.rounds, "n_short": len(texts["short"]), "n_long": len(texts["long"]),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "cpu": platform.processor() or platform.machine(),
                    "ternary_model": str(ternary.relative_to(REPO_ROOT) if ternary.is_relative_to(REPO_ROOT)
                                         else ternary), "ternary_random": is_random, "runtimes": {}}
    runtimes = [r for r in args.runtimes.split(",") if r]
    workers = {}
    for r in runtimes:
        print(f"starting {r} ...", flush=True)
        workers[r] = Worker(r, base, str(ternary), texts_file)
    times: dict = {r: {} for r in runtimes}
    configs = [("short", 1), ("short", 32), ("long", 1), ("long", 32)]
    timed = [r for r in runtimes if r in args.timed.split(",")]
    report["timed"] = timed
    report["n_b1"] = {"short": min(args.n_b1, len(texts["short"])), "long": min(args.n_b1 // 4, len(texts["long"]))}
    for rnd in range(args.rounds):
        for s, b in configs:
            order = timed[rnd % len(timed):] + timed[: rnd % len(timed)]  # rotate
            for r in order:
                limit = report["n_b1"][s] if b == 1 else None
                reply = workers[r].ask(op="time", set=s, batch=b, limit=limit)
                times[r].setdefault(f"{s}_b{b}", []).append(reply["n"] / reply["seconds"])
                print(f"round {rnd + 1}/{args.rounds} {s} b{b} {r}: {reply['n'] / reply['seconds']:.1f} sent/s",
                      flush=True)
    emb = {}
    tmp = CACHE / "bench"
    for r in runtimes:
        workers[r].ask(op="embed", set="short", out=str(tmp / f"emb-{r}.npy"))
        emb[r] = np.load(tmp / f"emb-{r}.npy")
    for r in runtimes:
        info = workers[r].info
        info.pop("ready", None)
        info.update(workers[r].close())
        if r.startswith("ort"):
            info["linear_weight_bytes"] = onnx_linear_weight_bytes(onnx_paths(base)["fp32" if r == "ort-fp32"
                                                                                     else "int8"])
        info["sentences_per_s"] = {k: float(np.median(v)) for k, v in times[r].items()}
        info["sentences_per_s_all_rounds"] = {k: [round(x, 2) for x in v] for k, v in times[r].items()}
        if "torch-fp32" in emb:
            info["mean_cos_to_fp32_short"] = float(np.mean(np.sum(emb[r] * emb["torch-fp32"], axis=1)))
        report["runtimes"][r] = info
    rs = report["runtimes"]
    if "ternary-packed" in rs and "ort-int8" in rs:
        # Ratio per round, then median: both measured back to back under the same load.
        report["ternary_vs_ort_int8"] = {
            k: float(np.median(np.array(times["ternary-packed"][k]) / np.array(times["ort-int8"][k])))
            for k in times["ternary-packed"]}
    for name in ("ternary-packed", "ternary-packed-int4emb"):
        if name in rs and "torch-fp32" in rs:
            t, f = rs[name], rs["torch-fp32"]
            report.setdefault("footprint_vs_fp32", {})[name] = {
                "linear weights in memory": t["linear_weight_bytes"] / f["linear_weight_bytes"],
                "whole model in memory": t["model_bytes_in_memory"] / f["model_bytes_in_memory"],
                "model file": t.get("file_bytes_with_base_embedding", t["file_bytes"]) / f["file_bytes"]}
    if args.ablation_rounds:
        # In a child process: keeps this process's memory and threads out of the way.
        out = CACHE / "bench" / "ablation.json"
        subprocess.run([sys.executable, "-m", "bench.speed", "--worker", "ablation", "--base", base,
                        "--ternary", str(ternary), "--texts-file", str(texts_file),
                        "--rounds", str(args.ablation_rounds), "--out", str(out)], check=True, cwd=REPO_ROOT)
        report["forward_ablation"] = json.loads(out.read_text())
    elif args.out.is_file():  # keep the last measured ablation (and say when it was measured)
        prev = json.loads(args.out.read_text())
        if prev.get("forward_ablation"):
            report["forward_ablation"] = prev["forward_ablation"]
            report["forward_ablation_from"] = prev.get("forward_ablation_from", prev["date"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    update_section("Speed", markdown(report), args.markdown)
    print(markdown(report))
    print(f"wrote {args.out} and the Speed section of {args.markdown}")


if __name__ == "__main__":
    main()
