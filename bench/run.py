"""One benchmark run: build (or reuse) the shape's bundle, measure the machine's memory
bandwidth, run scops and each peer in its own process, and reduce to stats and ratios."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .shapes import SHAPES, ensure_bundle

Log = Callable[[str], None]
PEERS = ("hf", "llama-cpp")
# On a GPU, "hf" is two peers: fp16 eager and bitsandbytes NF4 (the 4-bit PyTorch baseline).
GPU_PEERS = {"hf": ("hf-fp16", "hf-nf4"), "llama-cpp": ("llama-cpp",)}
# GPU runs: the answer the targets speak of is 128 tokens long.
GPU_TOKENS = 128
GPU_REPS = 5
# Stages shown per system, in pipeline order; "ttft" spans preprocess .. first token.
STAGES = ("preprocess", "encoder", "qformer", "projection", "prefill")
# Bandwidth probe: 512 MiB source (well past any CPU cache), copied 5 times, best kept.
BW_BYTES = 512 << 20
BW_REPEATS = 5


@dataclass(frozen=True)
class BenchOptions:
    shape: str
    vs: tuple = PEERS
    reps: int = 0                  # 0: the shape's default
    tokens: int = 0                # 0: the shape's default
    threads: int = 0               # 0: one per core
    encoder_precision: str = ""    # "": int8 on the CPU (onnxruntime's fast path there), fp16 on a GPU
    out: Path = Path("bench-out")
    device: str = "cpu"            # cpu | cuda
    rehearse: bool = False         # the cuda plan (its peers, keys and report) run on the CPU

    @property
    def gpu_plan(self) -> bool:
        return self.device == "cuda" or self.rehearse

    def resolved(self) -> "BenchOptions":
        s = SHAPES[self.shape]
        gpu = self.device == "cuda" or self.rehearse
        reps = self.reps or (GPU_REPS if gpu else s.reps)
        tokens = self.tokens or (GPU_TOKENS if gpu else s.tokens)
        precision = self.encoder_precision or ("fp16" if gpu else "int8")
        return BenchOptions(self.shape, tuple(self.vs), reps, tokens, self.threads or os.cpu_count() or 1,
                            precision, Path(self.out), self.device, self.rehearse)

    def systems(self) -> list[str]:
        """scops first, then the peers as run (GPU plan: hf -> hf-fp16, hf-nf4)."""
        names = []
        for p in self.vs:
            names += GPU_PEERS[p] if self.gpu_plan else (p,)
        return ["scops"] + names


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def measure_bandwidth(threads: int) -> float:
    """Bytes/s of a large numpy copy (read + write counted), split over `threads` threads."""
    src = np.ones(BW_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])       # numpy drops the GIL for plain copies

    best = float("inf")
    for _ in range(BW_REPEATS):
        workers = [threading.Thread(target=copy, args=b) for b in bounds]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bytes_per_token(gguf_path: Path) -> dict:
    """Weight bytes one decode step reads: every tensor except token_embd, of which one row."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    total, embd_row = 0, 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            embd_row = int(t.n_bytes) // int(t.shape[-1])          # ggml shape [n_embd, n_vocab]
        else:
            total += int(t.n_bytes)
    return {"bytes": total + embd_row, "file_bytes": gguf_path.stat().st_size}


def stage_io(manifest: dict) -> dict:
    """'in -> out' tensor shapes of the image stages, batch 1, from the manifest's file records."""
    def dims(t: dict) -> str:
        return "x".join(str(1 if d == "batch" else d) for d in t["shape"])

    stages = manifest["modalities"]["image"]["stages"]
    out = {}
    for key, st in zip(("encoder", "qformer"), [st for st in stages if st["op"] == "onnx"]):
        rec = manifest["files"][st["file"]]
        out[key] = f"{dims(next(iter(rec['inputs'].values())))} -> {dims(next(iter(rec['outputs'].values())))}"
    proj = next(st for st in stages if st["op"] == "projector")
    rows = manifest["modalities"]["image"]["rows"]
    out["projection"] = f"1x{rows}x{proj['in_dim']} -> 1x{rows}x{proj['out_dim']}"
    return out


def run_worker(cmd: list, name: str, log: Log) -> None:
    """Run a bench worker process; its progress lines ("  [...") go to the log as they come,
    the rest (llama.cpp's loader chatter) only into the error raised if it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = deque(maxlen=15)
    for line in proc.stderr:
        tail.append(line.rstrip())
        if line.startswith("  ["):
            log(line.strip())
    if proc.wait() != 0:
        raise RuntimeError(f"bench worker {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def run_system(system: str, bundle: Path, ckpt: Path, o: BenchOptions, log: Log) -> dict:
    """python -m scops.bench.peers SYSTEM ... in a fresh process (its own peak RSS and VRAM)."""
    from .vram import VramSampler

    with tempfile.TemporaryDirectory(prefix="scops-bench-") as tmp:
        out = Path(tmp) / f"{system}.json"
        cmd = [sys.executable, "-m", "scops.bench.peers", system, "--bundle", str(bundle), "--ckpt", str(ckpt),
               "--reps", str(o.reps), "--tokens", str(o.tokens), "--threads", str(o.threads),
               "--device", o.device, "--out", str(out)]
        log(f"{system}: 1 warm-up + {o.reps} repetitions, {o.tokens} tokens, {o.threads} threads, {o.device}")
        t0 = time.perf_counter()
        with VramSampler() as vram:
            run_worker(cmd, system, log)
        result = json.loads(out.read_text())
    result["peak_vram_bytes"] = vram.peak_bytes if o.device == "cuda" else None
    v = "" if result["peak_vram_bytes"] is None else f", peak VRAM {result['peak_vram_bytes'] / 1e9:.2f} GB"
    log(f"{system}: done in {time.perf_counter() - t0:.0f}s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB{v}")
    return result


def summarize(samples: list[dict]) -> dict:
    """p50 / p90 of each timed key (ms) and mean +- std of decode tokens/s."""
    out = {}
    for k in [k for k in STAGES + ("ttft", "turn2_ttft", "answer") if k in samples[0]]:
        v = np.array([s[k] for s in samples], np.float64)
        out[k] = {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
    tok = np.array([s["decode_tok_s"] for s in samples], np.float64)
    out["decode_tok_s"] = {"mean": float(tok.mean()), "std": float(tok.std(ddof=1)) if tok.size > 1 else 0.0,
                           "p50": float(np.percentile(tok, 50))}
    return out


def compute_ratios(stats: dict, rss: dict, bound_tok_s: float) -> dict:
    """'times better' of scops over each peer (None where the peer was not run)."""
    sc = stats["scops"]
    hf, lc = stats.get("hf"), stats.get("llama-cpp")

    def ratio(a, b):
        return float(a / b) if a is not None and b else None
    return {
        "ttft_vs_hf": ratio(hf and hf["ttft"]["p50"], sc["ttft"]["p50"]),
        "decode_vs_hf": ratio(sc["decode_tok_s"]["mean"], hf and hf["decode_tok_s"]["mean"]),
        "decode_vs_llama_cpp": ratio(sc["decode_tok_s"]["mean"], lc and lc["decode_tok_s"]["mean"]),
        "decode_vs_roofline": ratio(sc["decode_tok_s"]["mean"], bound_tok_s),
        "turn2_vs_turn1": ratio(sc["turn2_ttft"]["p50"], sc["ttft"]["p50"]),
        "rss_vs_hf": ratio(rss.get("hf"), rss["scops"]),
    }


def compute_gpu_ratios(stats: dict, vram: dict) -> dict:
    """The GPU targets' figures: scops' own TTFT, decode rate and VRAM, and 'times better'."""
    sc = stats["scops"]

    def ratio(a, b):
        return float(a / b) if a is not None and b else None

    def answer(system):
        return stats[system]["answer"]["p50"] if system in stats else None
    lc = stats.get("llama-cpp")
    peak = vram.get("scops")
    return {
        "ttft_ms": sc["ttft"]["p50"],
        "decode_tok_s": sc["decode_tok_s"]["mean"],
        "decode_vs_llama_cpp": ratio(sc["decode_tok_s"]["mean"], lc and lc["decode_tok_s"]["mean"]),
        "vs_hf_fp16": ratio(answer("hf-fp16"), sc["answer"]["p50"]),
        "vs_hf_nf4": ratio(answer("hf-nf4"), sc["answer"]["p50"]),
        "vram_peak_gb": peak / 1e9 if peak is not None else None,
    }


def run_bench(o: BenchOptions, log: Log) -> dict:
    o = o.resolved()
    shape = SHAPES[o.shape]
    if o.gpu_plan:
        return run_gpu_bench(o, log)
    vs = [p for p in o.vs if p in PEERS]
    if "hf" in vs and not shape.hf_fits:
        log(f"hf: skipped ({o.shape} in fp32 does not fit this machine's RAM)")
        vs.remove("hf")
    t0 = time.perf_counter()
    ckpt, bundle = ensure_bundle(shape, o.encoder_precision, log)
    build_s = time.perf_counter() - t0
    manifest = json.loads((bundle / "manifest.json").read_text())
    machine = describe_machine()
    log("memory bandwidth: numpy copy of 512 MiB")
    bw = measure_bandwidth(o.threads)
    per_tok = bytes_per_token(bundle / manifest["llm"]["file"])
    bound = bw / per_tok["bytes"]
    log(f"memory bandwidth {bw / 1e9:.1f} GB/s; {per_tok['bytes'] / 2**20:.0f} MiB of weights per token "
        f"-> decode bound {bound:.1f} tok/s")
    raw = {s: run_system(s, bundle, ckpt, o, log) for s in ["scops"] + vs}
    stats = {s: summarize(r["samples"]) for s, r in raw.items()}
    rss = {s: r["peak_rss_bytes"] for s, r in raw.items()}
    return {
        "shape": o.shape, "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
        "machine": machine, "bundle": str(bundle), "checkpoint": str(ckpt), "build_or_reuse_s": build_s,
        "encoder_precision": manifest.get("encoder_precision", {"precision": "fp32"}),
        "llm": manifest["llm"], "stage_io": stage_io(manifest), "bandwidth_bytes_s": bw,
        "weights_bytes_per_token": per_tok,
        "decode_bound_tok_s": bound, "stats": stats, "peak_rss_bytes": rss,
        "prompt_cells": {s: r["samples"][0].get("prompt_cells") for s, r in raw.items()},
        "samples": {s: r["samples"] for s, r in raw.items()},
        "ratios": compute_ratios(stats, rss, bound), "wall_s": time.perf_counter() - t0,
    }


def run_gpu_bench(o: BenchOptions, log: Log) -> dict:
    """The GPU plan: scops on CUDA beside HF fp16 eager, HF NF4 and raw llama-cpp-python CUDA.

    With o.rehearse (o.device == "cpu") the same systems, keys and report run on the CPU: a
    dry run of the GPU session's call, whose figures are CPU figures and say so.
    """
    from scops.runtime import gpu

    from .vram import gpu_info

    if o.device == "cuda" and not gpu.cuda_devices():
        from scops.runtime.errors import OptionError
        raise OptionError("--device cuda: no NVIDIA GPU is visible to the driver (--rehearse runs the GPU plan "
                          "on the CPU)")
    t0 = time.perf_counter()
    ckpt, bundle = ensure_bundle(SHAPES[o.shape], o.encoder_precision, log)
    build_s = time.perf_counter() - t0
    manifest = json.loads((bundle / "manifest.json").read_text())
    machine = describe_machine()
    info = gpu_info() if o.device == "cuda" else None
    machine.update(info or {"gpu": None})
    raw, skipped = {}, {}
    for system in o.systems():
        try:
            raw[system] = run_system(system, bundle, ckpt, o, log)
        except RuntimeError as e:
            if system == "scops":
                raise
            skipped[system] = str(e).splitlines()[-1][:300]
            log(f"{system}: not measured ({skipped[system]})")
    stats = {s: summarize(r["samples"]) for s, r in raw.items()}
    rss = {s: r["peak_rss_bytes"] for s, r in raw.items()}
    vram = {s: r["peak_vram_bytes"] for s, r in raw.items()}
    name = gpu.slug(machine["gpu"]) if machine.get("gpu") else "cpu-rehearsal"
    return {
        "shape": o.shape, "device": o.device, "rehearsal": o.device != "cuda",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
        "machine": machine, "bundle": str(bundle), "checkpoint": str(ckpt), "build_or_reuse_s": build_s,
        "encoder_precision": manifest.get("encoder_precision", {"precision": "fp32"}),
        "llm": manifest["llm"], "stage_io": stage_io(manifest), "stats": stats, "peak_rss_bytes": rss,
        "peak_vram_bytes": vram, "not_measured": skipped,
        "prompt_cells": {s: r["samples"][0].get("prompt_cells") for s, r in raw.items()},
        "samples": {s: r["samples"] for s, r in raw.items()},
        "ratios": compute_gpu_ratios(stats, vram), "wall_s": time.perf_counter() - t0,
        "results_dir": f"bench/results/{name}_{o.shape}",
    }
