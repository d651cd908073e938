"""Run the memory benchmark's profiles (bench/memory.py), each in its own process, and
write memory.md (tables), memory.json and memory.png (peak RSS by part, per profile)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .memory import GIB, PROFILES, TARGET_BYTES
from .report import save_report
from .run import describe_machine, run_worker

Log = Callable[[str], None]
PART_LABELS = {
    "gguf_mapped_resident": "GGUF mapped, resident",
    "llm_weights_anon": "LLM weights in anonymous memory (llama.cpp's repacked copy)",
    "kv_cache": "KV cache",
    "onnx_sessions": "ONNX sessions (built)",
    "onnx_arena_peak": "ONNX arena (peak of a run)",
    "onnx_arena_retained": "ONNX arena (kept after a run)",
    "media_cache": "media cache",
}


def run_profile(profile: str, bundle: Path, o, log: Log) -> dict:
    with tempfile.TemporaryDirectory(prefix="scops-mem-") as tmp:
        out = Path(tmp) / f"{profile}.json"
        cmd = [sys.executable, "-m", "scops.bench.memory", "--bundle", str(bundle), "--profile", profile,
               "--reps", str(o.reps), "--tokens", str(o.tokens), "--threads", str(o.threads), "--out", str(out)]
        log(f"{profile}: {o.reps} image turns of {o.tokens} tokens, {o.threads} threads")
        t0 = time.perf_counter()
        run_worker(cmd, f"memory {profile}", log)
        result = json.loads(out.read_text())
    log(f"{profile}: peak RSS {result['peak_rss'] / GIB:.2f} GiB ({time.perf_counter() - t0:.0f}s)")
    return result


def ttft_summary(turns: list[dict]) -> dict:
    warm = [t["ttft_ms"] for t in turns[1:] if not t["after_drop"]]
    drop = [t["ttft_ms"] for t in turns if t["after_drop"]]
    return {"first": turns[0]["ttft_ms"], "later_p50": float(np.median(warm)) if warm else None,
            "after_drop": drop[0] if drop else None,
            "decode_tok_s": float(np.mean([t["decode_tok_s"] for t in turns]))}


def _g(b) -> str:
    return "—" if b is None else f"{b / GIB:.2f}"


def _ms(v) -> str:
    return "—" if v is None else f"{v:.0f}"


def render(result: dict) -> str:
    runs = result["profiles"]
    names = list(runs)
    lines = [f"# scops bench --memory: {result['shape']}", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"{result['machine']['ram_gib']} GiB RAM", ""]
    if result.get("llm"):
        llm = result["llm"]
        lines += [f"LLM: `{llm['file']}`, {llm['bytes'] / GIB:.2f} GiB ({llm['bytes'] / 1e9:.2f} GB), tensors "
                  + ", ".join(f"{n} {k}" for k, n in sorted(llm["types"].items())) + f"; {llm['how']}.", ""]
    lines += ["| profile | peak RSS GiB | peak GB | ≤ 6 GB | RSS at end GiB (anon / file) | TTFT first ms "
             "| TTFT later p50 ms | TTFT after idle drop ms | decode tok/s | estimate at open GiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        r, t = runs[n], ttft_summary(runs[n]["turns"])
        lines.append(f"| {n} | {r['peak_rss'] / GIB:.2f} | {r['peak_rss'] / 1e9:.2f} | "
                     f"{'yes' if r['peak_rss'] <= TARGET_BYTES else 'no'} | {_g(r['rss_end'])} "
                     f"({_g(r['anon_end'])} / {_g(r['file_end'])}) | {_ms(t['first'])} | {_ms(t['later_p50'])} | "
                     f"{_ms(t['after_drop'])} | {t['decode_tok_s']:.2f} | "
                     f"{_g((r.get('estimate') or {}).get('total'))} |")
    if "low-memory" in runs:
        low = ttft_summary(runs["low-memory"]["turns"])
        for n in [n for n in names if n != "low-memory"]:
            base = ttft_summary(runs[n]["turns"])
            cost = [f"{k.replace('_', ' ')} {low[k] / base[k]:.2f}x" for k in ("first", "later_p50")
                    if base.get(k) and low.get(k)]
            lines += ["", f"TTFT of low-memory against {n}: " + ", ".join(cost)]
    lines += ["", "Resident memory by part (GiB):", "",
              "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in PART_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_g(runs[n]["parts"].get(key)) for n in names) + " |")
    lines.append("| KV cache type, positions at the end (of at most) | " + " | ".join(
        f"{runs[n]['kv_type']}, {runs[n]['n_ctx_final']} ({runs[n]['n_ctx_max']})" for n in names) + " |")
    for n in names:
        lines += ["", f"Stages, {n} profile (GiB; peak = VmHWM reset before the stage):", "",
                  "| stage | RSS before | RSS after | peak during |", "|---|---:|---:|---:|"]
        for s in runs[n]["stages"]:
            lines.append(f"| {'  ' * s['depth']}{s['stage']} | {_g(s['rss_before'])} | {_g(s['rss_after'])} "
                         f"| {_g(s['peak'])} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["profiles"]
    names = list(runs)
    keys = ("gguf_mapped_resident", "llm_weights_anon", "kv_cache", "onnx_sessions", "onnx_arena_peak", "media_cache")
    colors = ("#3182bd", "#9ecae1", "#e6550d", "#31a354", "#a1d99b", "#fdae6b")
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.6 * len(names)))
    for i, n in enumerate(names):
        left = 0.0
        for k, c in zip(keys, colors):
            v = runs[n]["parts"].get(k, 0) / GIB
            ax.barh(i, v, left=left, color=c, label=PART_LABELS[k] if i == 0 else None)
            left += v
        other = max(runs[n]["peak_rss"] / GIB - left, 0.0)
        ax.barh(i, other, left=left, color="#bdbdbd", label="rest (runtime, buffers)" if i == 0 else None)
        ax.text(left + other + 0.05, i, f"peak {runs[n]['peak_rss'] / GIB:.2f} GiB", va="center", fontsize=8)
    ax.axvline(TARGET_BYTES / GIB, color="k", ls="--", lw=1, label="6 GB target")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("GiB")
    ax.set_title(f"{result['shape']}: peak RSS of an image turn, by part")
    ax.set_xlim(0, max(runs[n]["peak_rss"] for n in names) / GIB * 1.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_llm(bundle: Path, direct: bool) -> dict:
    """The bundle's GGUF: file, bytes, tensors per ggml type, and how its random weights were made."""
    from scops.export.llm_gguf import list_gguf_tensors

    manifest = json.loads((bundle / "manifest.json").read_text())
    path = bundle / manifest["llm"]["file"]
    types: dict = {}
    for _, kind, _ in list_gguf_tensors(path):
        types[kind] = types.get(kind, 0) + 1
    how = ("random Q4_K_M blocks written directly in llama.cpp's Q4_K_M types (bench/random_gguf.py)" if direct
           else "random fp16 checkpoint -> f16 GGUF -> llama.cpp quantizer")
    return {"file": manifest["llm"]["file"], "bytes": path.stat().st_size, "types": types, "how": how,
            "encoders": manifest.get("encoder_precision", {})}


def run_memory_bench(o, log: Log, command: str) -> str:
    """o: BenchOptions (resolved); returns the markdown written to o.out / memory.md."""
    from .shapes import SHAPES, ensure_bundle

    shape = SHAPES[o.shape]
    _, bundle = ensure_bundle(shape, o.encoder_precision, log, direct_llm=shape.direct_llm)
    machine = describe_machine()
    result = {"shape": o.shape, "command": command, "machine": machine, "bundle": str(bundle),
              "llm": describe_llm(bundle, shape.direct_llm),
              "profiles": {p: run_profile(p, bundle, o, log) for p in PROFILES}}
    md = render(result)
    save_report(o.out, md, result, plot, "memory.png", stem="memory")
    return md
