"""Encoder speed and footprint: `python -m bench.speed` -> reports/speed.json + "## Speed" in BENCHMARKS.md.

Runtimes, all on the same texts, tokenized the same way (the model's tokenizer.json, truncation at 256 tokens),
in the same run, 2 threads each:
  torch-fp32       sentence-transformers, float32 (the base model)
  torch-int8       torch dynamic quantization (qint8 Linear) of that model
  ort-fp32         `torch.onnx.export` of the base model, ONNX Runtime (ORT_ENABLE_ALL)
  ort-int8         the standard int8 peer: that export + `onnxruntime.quantization.quantize_dynamic(...,
                   weight_type=QInt8)`, 2 intra-op threads
  ort-int8-fused   the export through ORT's transformer optimizer (fused attention / LayerNorm / GELU) before
                   the same quantize_dynamic: a stronger variant of the peer, when it is faster
  ternary-packed   the packed ternary model on the native runtime (encoder/ternary_runtime.py: the whole
                   forward in the kernel, no torch)
  ternary-torch    the same model through the torch forward with the kernel's linears (encoder/ternary_torch.py,
                   "packed"): what the native runtime replaced
  ternary-ref      the torch forward with float matmuls of the unpacked weights (footprint and embeddings only)
Each runtime lives in its own worker subprocess (honest peak RSS: VmHWM of that process; cold load time),
driven over stdin/stdout. Timing rounds interleave the runtimes, so background load hits them alike; figures
are medians over rounds (best-of in reports/speed.json), ratios the median of same-round ratios.
Effective GMAC/s counts the useful multiply-adds of the real (unpadded) tokens: the 36 Linears (10.62 M per
token for MiniLM-L6) plus attention (2 L^2 hidden per layer for a text of L tokens); % of peak is against this
CPU's int8 multiply-add peak on 2 threads measured in the same run by the microbenchmark bench.kernel reports
(`encoder.kernel.peak_macs_per_second`: a vpmaddubsw loop on AVX2 machines).
Texts: "short" = catalog "title by authors", "long" = SciFact title + abstract. The ONNX peers are in
bench/peers.py. Without a trained model (models/ternary-minilm), a randomly ternarized base
model is saved through encoder.ternary_export and used: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.peers import GRAPHS, OrtEncoder, onnx_linear_weight_bytes, onnx_paths
from bench.report import machine, update_section
from ingest.settings import BUNDLED_TERNARY_MODEL, REPO_ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = Path(os.environ.get("TERNREC_CACHE", Path.home() / ".cache" / "ternrec"))
DEFAULT_TERNARY = BUNDLED_TERNARY_MODEL
RUNTIMES = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ort-int8-fused", "ternary-packed", "ternary-torch",
            "ternary-ref")
PEER = "ort-int8"
THREADS = 2
MAX_LEN = 256
CASES = [("short", 1), ("short", 32), ("long", 1), ("long", 32)]


# ----------------------------------------------------------------------------- texts and work

def short_texts(n: int) -> list[str]:
    from ingest.catalog import load_items

    return [f"{i.title} by {i.authors}" for i in load_items()[:n]]


def long_texts(n: int) -> list[str]:
    from encoder.data import default_data_dir, read_scifact_corpus

    _, titles, abstracts = read_scifact_corpus(default_data_dir())
    return [(t + " " + a).strip() for t, a in zip(titles[:n], abstracts[:n], strict=True)]


def effective_macs(lengths: list[int], cfg: dict) -> float:
    """Useful multiply-adds of encoding texts of these token counts (no padding, no pooler)."""
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    linear = n_layers * (4 * h * h + 2 * h * i)
    return float(sum(n * linear + n_layers * 2 * n * n * h for n in lengths))


# ----------------------------------------------------------------------------- worker encoders

def build_runtime(runtime: str, base: str, ternary: str) -> tuple[object, dict]:
    """(encoder, footprint info) for one runtime; runs inside the worker process."""
    info: dict = {}
    if runtime == "ternary-packed":  # first: no torch in this process
        from encoder.ternary_format import model_file_bytes
        from encoder.ternary_runtime import NativeTernaryEncoder

        enc = NativeTernaryEncoder(ternary, threads=THREADS)
        nb = enc.nbytes()
        info.update(linear_weight_bytes=nb["linear"], model_bytes_in_memory=nb["total"], memory_breakdown=nb,
                    kernel_path=enc.kernel_path, file_bytes=model_file_bytes(ternary)["model.safetensors"])
        return enc, info
    if runtime.startswith("ort"):
        paths = onnx_paths(base)
        path = paths[GRAPHS[runtime]]
        info["file_bytes"] = path.stat().st_size
        return OrtEncoder(path, Path(ternary) / "tokenizer.json", THREADS, MAX_LEN), info
    import torch

    torch.set_num_threads(THREADS)
    if runtime in ("ternary-torch", "ternary-ref"):
        from encoder.ternary_torch import TorchTernaryEncoder

        enc = TorchTernaryEncoder(ternary, backend="packed" if runtime == "ternary-torch" else "reference")
        nb = enc.nbytes()
        info.update(linear_weight_bytes=nb["linear"], model_bytes_in_memory=nb["total"], memory_breakdown=nb)
        return enc, info
    from encoder.loading import SentenceTransformerEncoder

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
        from bench.peers import torch_int8

        enc = torch_int8(base, THREADS)  # the quality table's peer (quantized in place, really called)
        int8 = sum(m.weight.numel() for m in linears)  # one byte per weight (+ a scale per tensor)
        info.update(linear_weight_bytes=int8, model_bytes_in_memory=params - lin_bytes + int8,
                    file_bytes_note="quantized at load time from the float32 file")
    return enc, info


def peak_rss_kb() -> int:
    """VmHWM of this process. (ru_maxrss survives execve on Linux, so a worker would report its
    parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(runtime: str, base: str, ternary: str, texts_file: str, launched: float) -> None:
    """Line protocol: reply to each JSON command on stdout; stderr is left for warnings."""
    texts = json.loads(Path(texts_file).read_text())
    enc, info = build_runtime(runtime, base, ternary)
    info["load_seconds_cold"] = round(time.time() - launched, 3)  # interpreter start, imports, model load
    info["rss_after_load_kb"] = peak_rss_kb()
    enc.encode(texts["long"][:32], batch_size=32)
    info["rss_after_32_long_kb"] = peak_rss_kb()
    enc.encode(texts["short"][:8], batch_size=8)  # warm-up of the short path
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
            [sys.executable, "-m", "bench.speed", "--worker", runtime, "--base", base, "--ternary", ternary,
             "--texts-file", str(texts_file), "--launched", repr(time.time())],
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


# ----------------------------------------------------------------------------- report

def random_ternary_model(base: str) -> Path:
    """A randomly ternarized base model (row_opt codes of the float weights), saved through our format."""
    from sentence_transformers import SentenceTransformer

    from encoder.ternary import ternarize_model
    from encoder.ternary_export import save_ternary_model

    out = CACHE / "bench" / "random-ternary-minilm"
    if not (out / "config.json").is_file():
        save_ternary_model(ternarize_model(SentenceTransformer(base, device="cpu"), "row_opt"), out, base,
                           token_embedding="int4g32")
    return out


def markdown(report: dict) -> str:
    rs = report["runtimes"]
    peak = report["int8_peak_gmacs_2_threads"]
    lines = ["## Speed", "",
             f"Generated by `python -m bench.speed` ({report['date']}; {report['cpu']}, kernel path "
             f"`{rs.get('ternary-packed', {}).get('kernel_path', '?')}`; {THREADS} threads; {report['n_short']} short "
             f"texts = catalog \"title by authors\", {report['n_long']} long texts = SciFact title + abstract "
             f"truncated at {MAX_LEN} tokens; at batch 1 the first {report['n_b1']['short']} / "
             f"{report['n_b1']['long']} of them; median of {report['rounds']} interleaved rounds; 1-minute load "
             f"average {report['loadavg_start'][0]:.2f} at the start, {report['loadavg_end'][0]:.2f} at the end). "
             f"Ternary model: `{report['ternary_model']}`"
             + (" (randomly ternarized: speed only)." if report["ternary_random"] else "."),
             "", "| runtime | " + " | ".join(f"{s} b{b} sent/s (GMAC/s, % peak)" for s, b in CASES)
             + " | linear weights MB | model in memory MB | model file MB | cold load s | RSS after load MiB "
             "| RSS after 32 long MiB | cos to fp32 |",
             "|---|" + "---|" * (len(CASES) + 7)]

    def mb(v):
        return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else "–"

    for n, r in rs.items():
        sps, gm = r.get("sentences_per_s", {}), r.get("gmacs", {})
        cells = [f"{sps[f'{s}_b{b}']:.1f} ({gm[f'{s}_b{b}']:.0f}, {100 * gm[f'{s}_b{b}'] / peak:.0f}%)"
                 if f"{s}_b{b}" in sps else "–" for s, b in CASES]
        cells += [mb(r.get("linear_weight_bytes")), mb(r.get("model_bytes_in_memory")), mb(r.get("file_bytes")),
                  f"{r['load_seconds_cold']:.2f}", f"{r['rss_after_load_kb'] / 1024:.0f}",
                  f"{r['rss_after_32_long_kb'] / 1024:.0f}", f"{r.get('mean_cos_to_fp32_short', float('nan')):.3f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for peer, ratio in report.get("ternary_vs", {}).items():
        lines += ["", f"**ternary-packed vs {peer}** (median of same-round ratios of sentences/s): "
                  + ", ".join(f"{k.replace('_', ' ')} **{v:.2f}×**" for k, v in ratio.items()) + "."]
    fp = report.get("footprint_vs_fp32")
    if fp:
        lines += ["", "Footprint of ternary-packed against torch-fp32 (float32): "
                  + ", ".join(f"{k} {v:.4f}× (1/{1 / v:.1f})" for k, v in fp.items()) + "."]
    lines += ["", f"Int8 peak: {peak:.0f} GMAC/s on {THREADS} threads ({report['int8_peak_gmacs_1_thread']:.0f} on "
              "one), measured in this run by `encoder.kernel.peak_macs_per_second` (tq2k_peak.c: a loop of "
              "independent `vpmaddubsw` + `vpaddw`, 32 multiply-adds each, no memory operands; the AVX2 "
              "instruction both the ternary kernel and ONNX Runtime's AVX2 int8 GEMM are built on; this CPU has "
              "no VNNI). GMAC/s = useful multiply-adds (real tokens only: the 36 Linears, 10.62 M per token, plus "
              "attention, 2·L²·384 per layer) / time, the same count for every runtime.",
              "", "Linear weights = the 36 encoder Linears (weights; for ternary also the per-row scales and "
              "biases). Model in memory = the tensors the runtime holds for inference (torch-int8: int8 Linear "
              "weights + float rest; ORT: not measured, see file and RSS). Cold load = from starting the worker "
              "process to the model being ready (interpreter, imports, model). RSS (VmHWM, MiB) of each "
              "runtime's own process: after loading, and after encoding a batch of 32 long texts. `cos to fp32` "
              "= mean cosine of the short-text embeddings to torch-fp32 (sanity check; quality is in the Quality "
              "section)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--base", default="")
    p.add_argument("--ternary", default=str(DEFAULT_TERNARY))
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--timed", default="torch-fp32,torch-int8,ort-fp32,ort-int8,ort-int8-fused,ternary-packed,"
                   "ternary-torch", help="runtimes timed (the others: footprint, RSS and embeddings only)")
    p.add_argument("--n-b1", type=int, default=64, help="texts per set at batch 1 (slow runtimes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-short", type=int, default=256)
    p.add_argument("--n-long", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "speed.json")
    p.add_argument("--markdown", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.base, args.ternary, args.texts_file, args.launched)
        return

    from encoder import kernel
    from encoder.base_model import default_base_model
    from encoder.ternary_format import read_config

    base = args.base or default_base_model()
    ternary = Path(args.ternary)
    is_random = not (ternary / "config.json").is_file()
    if is_random:
        ternary = random_ternary_model(base)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if any(r.startswith("ort") for r in runtimes):
        onnx_paths(base)  # export once, outside the timed workers
    texts = {"short": short_texts(args.n_short), "long": long_texts(args.n_long)}
    texts_file = CACHE / "bench" / "speed-texts.json"
    texts_file.parent.mkdir(parents=True, exist_ok=True)
    texts_file.write_text(json.dumps(texts))

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": THREADS,
                    "rounds": args.rounds, "n_short": len(texts["short"]), "n_long": len(texts["long"]),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpu": machine()["cpu"],
                    "ternary_model": str(ternary.relative_to(REPO_ROOT) if ternary.is_relative_to(REPO_ROOT)
                                         else ternary), "ternary_random": is_random, "runtimes": {}}
    report["int8_peak_gmacs_1_thread"] = kernel.peak_macs_per_second(1) / 1e9
    report["int8_peak_gmacs_2_threads"] = kernel.peak_macs_per_second(THREADS) / 1e9
    workers = {}
    for r in runtimes:
        print(f"starting {r} ...", flush=True)
        workers[r] = Worker(r, base, str(ternary), texts_file)
    timed = [r for r in runtimes if r in args.timed.split(",")]
    report["timed"] = timed
    report["n_b1"] = {"short": min(args.n_b1, len(texts["short"])), "long": min(args.n_b1 // 4, len(texts["long"]))}
    cfg = read_config(ternary)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ternary / "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    lengths = {s: [len(e.ids) for e in tok.encode_batch(texts[s])] for s in texts}
    macs = {f"{s}_b{b}": effective_macs(lengths[s][: report["n_b1"][s] if b == 1 else None], cfg) for s, b in CASES}
    times: dict = {r: {} for r in runtimes}
    for rnd in range(args.rounds):
        for s, b in CASES:
            order = timed[rnd % len(timed):] + timed[: rnd % len(timed)]  # rotate
            for r in order:
                reply = workers[r].ask(op="time", set=s, batch=b, limit=report["n_b1"][s] if b == 1 else None)
                times[r].setdefault(f"{s}_b{b}", []).append(reply["seconds"])
                print(f"round {rnd + 1}/{args.rounds} {s} b{b} {r}: {reply['n'] / reply['seconds']:.1f} sent/s",
                      flush=True)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    emb = {}
    for r in runtimes:
        workers[r].ask(op="embed", set="short", out=str(CACHE / "bench" / f"emb-{r}.npy"))
        emb[r] = np.load(CACHE / "bench" / f"emb-{r}.npy")
    n_texts = {f"{s}_b{b}": report["n_b1"][s] if b == 1 else len(texts[s]) for s, b in CASES}
    for r in runtimes:
        info = workers[r].info
        info.pop("ready", None)
        info.update(workers[r].close())
        if r.startswith("ort"):
            info["linear_weight_bytes"] = onnx_linear_weight_bytes(onnx_paths(base)[GRAPHS[r]])
        info["seconds_all_rounds"] = {k: [round(x, 4) for x in v] for k, v in times[r].items()}
        info["sentences_per_s"] = {k: n_texts[k] / float(np.median(v)) for k, v in times[r].items()}
        info["sentences_per_s_best"] = {k: n_texts[k] / float(np.min(v)) for k, v in times[r].items()}
        info["gmacs"] = {k: macs[k] / float(np.median(v)) / 1e9 for k, v in times[r].items()}
        if "torch-fp32" in emb:
            info["mean_cos_to_fp32_short"] = float(np.mean(np.sum(emb[r] * emb["torch-fp32"], axis=1)))
        report["runtimes"][r] = info
    for peer in (PEER, "ort-int8-fused"):
        if "ternary-packed" in times and peer in times and times[peer]:
            report.setdefault("ternary_vs", {})[peer] = {  # same-round ratios: both under the same load
                k: float(np.median(np.array(times[peer][k]) / np.array(times["ternary-packed"][k])))
                for k in times["ternary-packed"]}
    rs = report["runtimes"]
    if "ternary-packed" in rs and "torch-fp32" in rs:
        t, f = rs["ternary-packed"], rs["torch-fp32"]
        report["footprint_vs_fp32"] = {"linear weights in memory": t["linear_weight_bytes"] / f["linear_weight_bytes"],
                                       "whole model in memory": t["model_bytes_in_memory"] / f["model_bytes_in_memory"],
                                       "model file": t["file_bytes"] / f["file_bytes"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    update_section("Speed", markdown(report), args.markdown)
    print(markdown(report))
    print(f"wrote {args.out} and the Speed section of {args.markdown}")


if __name__ == "__main__":
    main()
