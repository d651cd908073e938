"""`scops bench --shape lego-small`: LEGO's image turn at real encoder shapes.

    flock /tmp/scops-heavy.lock scops bench --shape lego-small --reps 5 --out bench-lego

The release is random weights in the published layout (export/fixtures_lego.py): CLIP
ViT-L/14-336 at its real shape (24 x 1024, 16 heads, 336 px -> 576 patches; 23 layers
run), the Linear-GELU-Linear projector 1024 -> n_embd -> n_embd, and a LLaMA-1.1B-shaped
LLM (TinyLlama: 2048 wide, 22 layers, 32 / 4 heads, vocab 32009) in Q4_K_M. The video and
audio parts are toy-sized: this benchmark measures the image turn only.

Per repetition (a new picture each, so the encoder really runs): preprocess, encode
(clip_patches.onnx), projector (576 rows), prefill (the spliced turn, projector excluded),
TTFT and decode tokens/s. Then the splice itself against raw llama-cpp-python: the same 576
embedding rows decoded at positions 0..575 of an empty KV, by scops' Llm.decode_media
(batch memory filled by a copy, as the projector fills it) and by llama-cpp-python's own
llama_batch + llama_decode in one call, alternating, same model, threads and KV type.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .report import save_report
from .shapes import cache_root, draw_tensor, plan_llama

ROWS = 576
QUESTION = "Please describe the image and include the object positions in [x0, y0, x1, y1] format."
# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336 config.json vision_config)
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}
SHARD_BYTES = 1 << 30
SPLIT_BATCH = 512        # llama.cpp's default n_batch: the 576 rows go as 512 + 64


def _model_shape():
    from scops.export.fixtures import TinyShape
    # LLaMA-1.1B (TinyLlama) with LEGO's 32000 + 9 rows
    return TinyShape(llm_width=2048, llm_layers=22, llm_heads=32, llm_kv_heads=4, llm_ffn=5632, llm_ctx=2048,
                     vocab=32009)


def write_release(root: Path, log) -> Path:
    """The lego-small release under root (atomically); returns its HF folder."""
    import torch

    from scops.export.bundle import atomic_dir
    from scops.export.fixtures_lego import (ADDED_TOKENS, CLIP_DIR, RELEASE_DIR, _modules, lego_config,
                                            release_state, write_clip, write_imagebind, write_tokenizer)

    shape = _model_shape()
    with atomic_dir(root) as tmp:
        rel = tmp / RELEASE_DIR
        first = write_tokenizer(rel, 512)
        cfg = lego_config(shape, shape.vocab, first, clip_width=CLIP_L_336["hidden_size"])
        log("  drawing the projector and the (toy) video/audio parts")
        state, eva = release_state(_modules(cfg, shape, shape.seed, llm=False), cfg, shape.seed)
        shards = [{k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}]
        rng = np.random.default_rng(shape.seed + 1)
        cur, size = {}, 0
        plan = plan_llama(shape)
        for i, (name, shp, scale) in enumerate(plan):
            name = name.replace("language_model.", "")                # model.* and lm_head.weight
            cur[name] = torch.from_numpy(draw_tensor(rng, shp, scale))
            size += cur[name].numel() * 2
            if size >= SHARD_BYTES or i + 1 == len(plan):
                shards.append(cur)
                cur, size = {}, 0
        log(f"  writing {len(shards)} .bin shards")
        weight_map, total = {}, 0
        for i, sd in enumerate(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            torch.save(sd, rel / file)
            weight_map.update({k: file for k in sd})
            total += sum(v.numel() * v.element_size() for v in sd.values())
        shards.clear()
        (rel / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
        (rel / "config.json").write_text(json.dumps(cfg, indent=2))
        log("  CLIP ViT-L/14-336 (random, real shape)")
        write_clip(tmp / CLIP_DIR, shape.seed + 1, CLIP_L_336)
        torch.save(eva, tmp / "eva_vit_g.pth")
        write_imagebind(tmp / "imagebind" / "imagebind_huge.pth", shape.seed + 2)
        assert len(ADDED_TOKENS) == 9
    return root / RELEASE_DIR


def ensure_bundle(log, quant: str = "Q4_K_M") -> Path:
    from scops.export.lego import export_lego

    root = cache_root() / "lego-small"
    release = root / "release" / "GroundingGPT"
    if not (release / "config.json").exists():
        log(f"building the lego-small release (random weights) in {release.parent}")
        write_release(release.parent, log)
    bundle = root / f"bundle-{quant}"
    if not (bundle / "manifest.json").exists():
        log(f"exporting the lego-small bundle ({quant}) to {bundle}")
        export_lego(str(release), bundle, quant, log=lambda s: log("  " + s))
    return bundle


class RawEmbd:
    """llama-cpp-python's low-level API, nothing of scops: one context, one batch of rows."""

    def __init__(self, model_path: str, n_ctx: int, n_batch: int, threads: int, flash: str):
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                             "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash]
        self.ctx = L.llama_init_from_model(self.model, p)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.batch = L.llama_batch_init(n_batch, self.n_embd, 1)

    def decode(self, rows: np.ndarray) -> float:
        """Seconds of one llama_decode of rows [n, n_embd] at positions 0..n-1 (KV cleared first)."""
        L, b, n = self.L, self.batch, rows.shape[0]
        L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), 0, 0, -1)
        ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        for i in range(n):
            b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = i, 1, 0, 0
        b.logits[n - 1] = 1
        b.n_tokens = n
        t0 = time.perf_counter()
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t0

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def worker(bundle: Path, reps: int, tokens: int, threads: int) -> dict:
    """Everything measured in this one process (see the module docstring)."""
    from scops.bench.peers import StageTimer, bench_images, peak_rss
    from scops.runtime.session import Session, resolve_kv

    s = Session.open(bundle, n_ctx=2048, threads=threads)
    timer = StageTimer()
    enc = s.encoders["image"]
    enc.base[0].run = timer.wrap("encode", enc.base[0].run)
    proj = s.projectors["image"]
    proj.forward = timer.wrap("projector", proj.forward)
    turns = []
    for i, img in enumerate(bench_images(reps + 1)):
        timer.ms.clear()
        r = s.chat().send(QUESTION, images=[img], temperature=0, max_tokens=tokens, ignore_stop=True).result()
        t = r.timings
        turns.append({"preprocess": t["preprocess_ms"], "encode": timer.ms["encode"],
                      "projector": timer.ms["projector"], "prefill": t["prefill_ms"] - timer.ms["projector"],
                      "ttft": t["ttft_ms"], "decode_tok_s": t.get("decode_tok_s", 0.0), "cells": len(r.cells)})
        print(f"  [lego-small] turn {i}: encode {timer.ms['encode']:.0f} ms, projector "
              f"{timer.ms['projector']:.1f} ms, prefill {turns[-1]['prefill']:.0f} ms", file=sys.stderr, flush=True)
    # the splice against raw llama-cpp-python: the same projected rows, both at positions 0..575
    feats = np.random.default_rng(0).standard_normal((ROWS, proj.spec.in_dim), dtype=np.float32)
    rows = np.ascontiguousarray(proj.forward(feats))
    llm = s.llm
    quant = s.bundle.manifest["llm"]["quant"]
    raw = RawEmbd(str(s.bundle.llm_path), 2048, max(llm.n_batch, ROWS), llm.threads, s.opts.flash_attn)
    cells = [("bench", i) for i in range(ROWS)]

    def fill(out, key, start):
        out[:] = rows[start:start + len(out)]

    # the same splice at llama.cpp's usual n_batch 512 (576 rows = 512 + 64): what the
    # session's media-sized batch (session.media_batch) is measured against
    from scops.runtime.llm import Llm, LlmOptions
    split = Llm(str(s.bundle.llm_path), LlmOptions(2048, SPLIT_BATCH, llm.threads, 0, *resolve_kv(s.opts, quant)))

    def spliced(model) -> float:
        model.truncate(0)
        t0 = time.perf_counter()
        model.decode_media(cells, fill, True)
        return time.perf_counter() - t0

    splice = {"scops": [], "raw": [], "split": []}
    for i in range(reps + 1):
        t = {"scops": spliced(llm), "raw": raw.decode(rows), "split": spliced(split)}
        if i:                                              # the first round is the warm-up
            for k, v in t.items():
                splice[k].append(v * 1e3)
        print(f"  [lego-small] splice {i}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()),
              file=sys.stderr, flush=True)
    raw.close()
    split.close()
    out = {"turns": turns[1:], "warmup": turns[0], "splice": splice, "n_batch": llm.n_batch,
           "raw_n_batch": max(llm.n_batch, ROWS), "threads": llm.threads, "manifest": s.bundle.manifest,
           "peak_rss_bytes": peak_rss()}
    s.close()
    return out


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarize(raw: dict, tokens: int) -> dict:
    turns = raw["turns"]
    stages = {k: _stats([t[k] for t in turns]) for k in ("preprocess", "encode", "projector", "prefill", "ttft",
                                                         "decode_tok_s")}
    splice = {k: _stats(v) for k, v in raw["splice"].items()}
    ratio = splice["raw"]["p50"] / splice["scops"]["p50"]
    extra = {"split_vs_raw": splice["raw"]["p50"] / splice["split"]["p50"]} if "split" in splice else {}
    return {**extra, "stages": stages, "splice": splice, "splice_vs_raw": ratio, "cells": turns[0]["cells"],
            "tokens": tokens, "n_batch": raw["n_batch"], "raw_n_batch": raw["raw_n_batch"],
            "threads": raw["threads"], "peak_rss_bytes": raw["peak_rss_bytes"]}


def render(result: dict, command: str, machine: dict) -> str:
    st, sp = result["stages"], result["splice"]
    m = result["manifest_llm"]
    rows = [("preprocess", "image -> pad square -> 1x3x336x336", "numpy/PIL", st["preprocess"]),
            ("encode", "1x3x336x336 -> 1x576x1024 (CLIP-L/14-336, 23 layers)", "onnxruntime fp32", st["encode"]),
            ("projector", f"576x1024 -> 576x{m['n_embd']} (Linear-GELU-Linear)", "scops.kernels", st["projector"]),
            ("prefill", f"{result['cells']} cells (576 rows + text)", f"llama.cpp {m['quant']}", st["prefill"]),
            ("ttft", "image + question -> token 1", "scops", st["ttft"]),
            ("splice 576 rows", "576 rows at pos 0..575, empty KV",
             f"scops Llm.decode_media (n_batch {result['n_batch']})", sp["scops"]),
            ("raw 576 rows", "same rows, one llama_decode",
             f"llama-cpp-python (n_batch {result['raw_n_batch']})", sp["raw"])]
    if "split" in sp:
        rows.append(("splice at n_batch 512", "same rows as 512 + 64", "scops Llm.decode_media (n_batch 512)",
                     sp["split"]))
    lines = [f"# scops bench: lego-small", "", f"Command: `{command}`", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores (1-min load at start {machine['load_avg_1m']}); "
             f"{result['threads']} threads; {result['reps']} repetitions after 1 warm-up.", "",
             "| stage | shape | backend | p50 ms | p90 ms | tokens/s ± std |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {s['p50']:.1f} | {s['p90']:.1f} | |" for a, b, c, s in rows]
    d = st["decode_tok_s"]
    lines.append(f"| decode | {result['tokens']} tokens | llama.cpp {m['quant']} | | | {d['mean']:.2f} ± {d['std']:.2f} |")
    ok = result["splice_vs_raw"] >= 0.97
    lines += ["", f"Spliced prefill of 576 rows vs raw llama-cpp-python: {result['splice_vs_raw']:.3f}x "
              f"(target >= 0.97x: {'pass' if ok else 'miss'}). Peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB."]
    if "split_vs_raw" in result:
        lines.append(f"At n_batch 512 (two llama_decode calls, 512 + 64 rows) the splice is "
                     f"{result['split_vs_raw']:.3f}x raw.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, sp = result["stages"], result["splice"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    names = ["preprocess", "encode", "projector", "prefill"]
    ax.bar(names, [st[n]["p50"] for n in names], yerr=[st[n]["p90"] - st[n]["p50"] for n in names],
           color=["#9ecae1", "#3182bd", "#fd8d3c", "#d62728"])
    ax.set_ylabel("ms (p50, bar to p90)")
    ax.set_title("LEGO image turn (lego-small)")
    bx.bar(["scops splice", "raw llama-cpp"], [sp["scops"]["p50"], sp["raw"]["p50"]], color=["#d62728", "#7f7f7f"])
    bx.set_title(f"576 rows: {result['splice_vs_raw']:.3f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lego_bench(args, log) -> int:
    """scops bench --shape lego-small: build/reuse, measure in a fresh process, report."""
    import subprocess
    import tempfile

    from .run import describe_machine

    reps, tokens = args.reps or 5, args.tokens or 32
    threads = args.threads or os.cpu_count() or 1
    command = f"scops bench --shape lego-small --reps {reps} --tokens {tokens} --threads {threads} --out {args.out}"
    log(command)
    machine = describe_machine()
    bundle = ensure_bundle(log)
    with tempfile.TemporaryDirectory(prefix="scops-bench-") as tmp:
        out = Path(tmp) / "lego.json"
        cmd = [sys.executable, "-m", "scops.bench.lego", "--bundle", str(bundle), "--reps", str(reps),
               "--tokens", str(tokens), "--threads", str(threads), "--out", str(out)]
        subprocess.run(cmd, check=True)
        raw = json.loads(out.read_text())
    result = dict(summarize(raw, tokens), reps=reps, manifest_llm=raw["manifest"]["llm"], machine=machine,
                  command=command, bundle=str(bundle), samples={"turns": raw["turns"], "splice": raw["splice"]})
    md = render(result, command, machine)
    outdir = Path(args.out)
    save_report(outdir, md, result, plot, "latency.png")
    print(md)
    print(f"wrote {outdir / 'report.md'}, report.json, latency.png")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.bench.lego")
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    args.out.write_text(json.dumps(worker(args.bundle, args.reps, args.tokens, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
