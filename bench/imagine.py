"""`scops bench --shape emu-small`: Emu's image generation on this machine, measured.

    scops bench --shape emu-small --reps 5 --steps 20 --out bench-emu

Builds (once, cached under $SCOPS_CACHE/bench) a random-weight Emu release at the shape's
widths and its Q4_K_M bundle, then runs one worker process (its own peak RSS): a warm-up
generation, `reps` regressions of the 32 embeddings (the LLM loop), one generation of
`steps` denoising steps (every UNet call timed), `reps` VAE decodes. Prints a markdown
table (stage, shape, backend, p50, p90, mean +- std) and writes report.md, report.json and
steps.png (seconds per UNet call) into --out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scops.export.fixtures_emu import EmuTinyShape

from .report import save_report


@dataclass(frozen=True)
class EmuBenchShape:
    name: str
    model: EmuTinyShape
    note: str


# "emu-small": the LLM at TinyLlama's widths (LLaMA-1 layout, no GQA) in Q4_K_M; the UNet and
# VAE in Stable Diffusion 1.x's real structure and widths (cross-attention 2048 = the LLM's),
# drawing 256 x 256 (latents 4 x 32 x 32); the vision tower stays tiny (not timed here).
_SD = dict(unet_channels=(320, 640, 1280, 1280), unet_layers=2, vae_channels=(128, 256, 512, 512), vae_layers=2,
           norm_groups=32)
EMU_SHAPES = {
    "emu-tiny": EmuBenchShape("emu-tiny", EmuTinyShape(instruct=False), "the test fixture: every width shrunk"),
    "emu-small": EmuBenchShape("emu-small", EmuTinyShape(
        llm_width=2048, llm_layers=22, llm_heads=32, llm_ffn=5632, llm_ctx=2048, image_px=256, instruct=False,
        **_SD), "LLM 2048 x 22 (TinyLlama widths) Q4_K_M; SD 1.x UNet + VAE at 256 x 256"),
}
PROMPT = "An image of a dog wearing a pair of glasses."


def ensure_bundle(shape: EmuBenchShape, log) -> Path:
    from scops.export.emu import export_emu
    from scops.export.fixtures_emu import build_emu_tiny

    from .shapes import cache_root
    root = cache_root() / shape.name
    src = root / "release"
    if not (src / "scops_fixture.json").exists():
        log(f"building the {shape.name} release (random weights) in {src}")
        build_emu_tiny(src, shape.model)
    bundle = root / "bundle-Q4_K_M"
    if not (bundle / "manifest.json").exists():
        log(f"exporting the {shape.name} bundle (Q4_K_M) to {bundle}")
        export_emu(str(src / "pretrain"), bundle, "Q4_K_M", log=lambda s: log("  " + s))
    return bundle


def stats(ms: list[float]) -> dict:
    v = np.asarray(ms, np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def worker(bundle: Path, reps: int, steps: int, threads: int, out: Path) -> None:
    """Runs in its own process: every number of the report."""
    from scops.bench.peers import peak_rss
    from scops.runtime.session import Session

    t0 = time.perf_counter()
    s = Session.open(bundle, threads=threads, n_ctx=512)
    open_s = time.perf_counter() - t0
    gen = s.bundle.manifest["generation"]
    side = gen["defaults"]["height"]
    s.generate_image(PROMPT, steps=1, seed=0)                             # warm-up (and the empty prompt's rows)
    im = s._imaginer
    regress = []
    for i in range(reps):
        t = time.perf_counter()
        im.embed(f"{PROMPT} {i}", [], {})
        regress.append((time.perf_counter() - t) * 1e3)
    marks = []
    img = s.generate_image(PROMPT, steps=steps, seed=1, progress=lambda d, n: marks.append(time.perf_counter()))
    unet = list(np.diff(marks) * 1e3)
    latents = np.random.default_rng(0).standard_normal(im.decoder.latent_shape(side, side), dtype=np.float32)
    vae = []
    for _ in range(reps):
        t = time.perf_counter()
        im.decoder.decode(latents)
        vae.append((time.perf_counter() - t) * 1e3)
    result = {"open_s": open_s, "regress_ms": regress, "unet_call_ms": unet, "vae_ms": vae,
              "generation_ms": img.timings["total_ms"], "steps": steps, "unet_calls": len(unet), "side": side,
              "peak_rss_bytes": peak_rss(), "threads": s.llm.threads}
    s.close()
    out.write_text(json.dumps(result))


def run(shape_name: str, reps: int, steps: int, threads: int, out: Path, log) -> dict:
    from .run import describe_machine

    shape = EMU_SHAPES[shape_name]
    t0 = time.perf_counter()
    bundle = ensure_bundle(shape, log)
    build_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "worker.json"
    log(f"worker: warm-up, {reps} regressions, {steps} denoising steps, {reps} VAE decodes, {threads} threads")
    cmd = [sys.executable, "-m", "scops.bench.imagine", "--worker", str(bundle), str(reps), str(steps), str(threads),
           str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    w = json.loads(raw.read_text())
    raw.unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"shape": shape_name, "note": shape.note, "machine": describe_machine(), "bundle": str(bundle),
            "build_or_reuse_s": build_s, "llm": manifest["llm"], "worker": w,
            "stats": {"regress": stats(w["regress_ms"]), "unet_call": stats(w["unet_call_ms"]),
                      "vae": stats(w["vae_ms"])},
            "bundle_bytes": {k: v["bytes"] for k, v in manifest["files"].items()}}


def render(result: dict, command: str) -> str:
    w, st = result["worker"], result["stats"]
    n_embd, side = result["llm"]["n_embd"], w["side"]
    lat = f"2x4x{side // 8}x{side // 8}"
    rows = [("regress 32 embeddings (LLM)", f"prompt -> 32x{n_embd}", f"llama.cpp {result['llm']['quant']}",
             st["regress"]),
            ("UNet call (guided batch)", f"{lat} + 2x32x{n_embd}", "onnxruntime CPU fp32", st["unet_call"]),
            ("VAE decode", f"1x4x{side // 8}x{side // 8} -> 1x3x{side}x{side}", "onnxruntime CPU fp32", st["vae"])]
    lines = [f"## scops bench {result['shape']}: Emu image generation", "", result["note"], "",
             "| stage | shape | backend | p50 ms | p90 ms | mean ± std ms | n |", "|---|---|---|---|---|---|---|"]
    for name, shape, backend, s in rows:
        lines.append(f"| {name} | {shape} | {backend} | {s['p50']:.1f} | {s['p90']:.1f} | "
                     f"{s['mean']:.1f} ± {s['std']:.1f} | {s['n']} |")
    m = result["machine"]
    lines += ["", f"- seconds per denoising step (UNet call, p50): **{st['unet_call']['p50'] / 1e3:.2f} s**",
              f"- one {side}x{side} picture, {w['steps']} steps ({w['unet_calls']} UNet calls): "
              f"{w['generation_ms'] / 1e3:.1f} s end to end",
              f"- peak RSS of the worker process: **{w['peak_rss_bytes'] / 2**30:.2f} GiB**",
              f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, load {m['load_avg_1m']}; "
              f"{w['threads']} threads", f"- reproduce: `{command}`"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result["worker"]["unet_call_ms"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(range(1, len(ms) + 1), np.asarray(ms) / 1e3, marker="o")
    ax.set_xlabel("UNet call")
    ax.set_ylabel("seconds")
    ax.set_title(f"scops bench {result['shape']}: seconds per denoising step")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_bench_imagine(args, log) -> int:
    reps = args.reps or 5
    steps = args.steps or 20
    threads = args.threads or os.cpu_count() or 1
    command = (f"scops bench --shape {args.shape} --reps {reps} --steps {steps} --threads {threads} "
               f"--out {args.out}")
    log(command)
    result = run(args.shape, reps, steps, threads, Path(args.out), log)
    md = render(result, command)
    out = Path(args.out)
    save_report(out, md + "\n", result, plot, "steps.png")
    print(md)
    print(f"wrote {out / 'report.md'}, report.json, steps.png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
    else:
        sys.exit("usage: python -m scops.bench.imagine --worker BUNDLE REPS STEPS THREADS OUT")
