"""Turn a run's result into report.md (table + targets), report.json and latency.png."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .run import STAGES


@dataclass(frozen=True)
class Target:
    key: str            # a key of result["ratios"]
    text: str
    bound: float
    higher_is_better: bool


# The CPU targets, on minigpt4-small on the 2-core CPU.
TARGETS = (
    Target("ttft_vs_hf", "TTFT >= 3x faster than HF fp32", 3.0, True),
    Target("decode_vs_hf", "decode >= 5x HF fp32", 5.0, True),
    Target("decode_vs_llama_cpp", "decode >= 0.97x raw llama-cpp-python", 0.97, True),
    Target("decode_vs_roofline", "decode >= 70% of the bandwidth bound", 0.70, True),
    Target("turn2_vs_turn1", "turn-2 TTFT <= 0.1x turn-1", 0.10, False),
    Target("rss_vs_hf", "peak RSS <= 0.35x HF's (HF/scops >= 2.86)", 1 / 0.35, True),
)
# The GPU targets (H200, minigpt4-7b, Q4_K_M, one run side by side); an answer is 128 tokens.
GPU_TARGETS = (
    Target("ttft_ms", "first-turn TTFT (image + question) <= 40 ms", 40.0, False),
    Target("decode_tok_s", "decode >= 200 tok/s", 200.0, True),
    Target("decode_vs_llama_cpp", "decode >= 0.97x raw llama-cpp-python CUDA", 0.97, True),
    Target("vs_hf_fp16", "128-token answer with its image >= 6x faster than HF fp16 eager", 6.0, True),
    Target("vs_hf_nf4", "... >= 10x faster than HF bitsandbytes NF4", 10.0, True),
    Target("vram_peak_gb", "peak VRAM <= 8 GB (10^9 bytes, measured by NVML)", 8.0, False),
)
COLORS = {"preprocess": "#9ecae1", "encoder": "#3182bd", "qformer": "#31a354", "projection": "#fd8d3c",
          "prefill": "#d62728"}


def stage_shapes(result: dict) -> dict:
    """What each stage maps: tensor shapes from the manifest, cells and tokens from the run."""
    return {"preprocess": "image -> 1x3x224x224", **result["stage_io"], "prefill": "{cells} cells",
            "ttft": "image + question -> token 1", "turn2_ttft": "follow-up -> token 1",
            "answer": "image + question -> token {tokens}", "decode": "{tokens} tokens"}


def backend(system: str, stage: str, result: dict) -> str:
    quant = result["llm"]["quant"]
    dev = " CUDA" if result.get("device") == "cuda" else ""
    hf = {"hf": "torch fp32 eager", "hf-fp16": "torch fp16 eager", "hf-nf4": "torch + bitsandbytes NF4"}
    if system in hf:
        return hf[system] + dev
    if system == "llama-cpp":
        return f"llama-cpp-python {quant}{dev}"
    precision = result["encoder_precision"]["precision"]
    return {"preprocess": "numpy/PIL", "encoder": f"onnxruntime{dev} {precision}",
            "qformer": f"onnxruntime{dev} {precision}", "projection": f"scops.kernels{dev}"}.get(
        stage, f"llama.cpp {quant}{dev}")


def table_rows(result: dict) -> list[list[str]]:
    shapes = stage_shapes(result)
    tokens = result["options"]["tokens"]
    rows = []
    for system, st in result["stats"].items():
        cells = result["prompt_cells"].get(system)
        for stage in STAGES + ("ttft", "turn2_ttft", "answer"):
            if stage in st:
                s = st[stage]
                rows.append([stage, shapes[stage].format(cells=cells, tokens=tokens), backend(system, stage, result),
                             f"{s['p50']:.1f}", f"{s['p90']:.1f}", ""])
        d = st["decode_tok_s"]
        rows.append(["decode", shapes["decode"].format(tokens=tokens), backend(system, "decode", result),
                     "", "", f"{d['mean']:.2f} ± {d['std']:.2f}"])
    return rows


def is_gpu_plan(result: dict) -> bool:
    return "results_dir" in result


def check_targets(ratios: dict, targets=TARGETS) -> list[dict]:
    out = []
    for t in targets:
        v = ratios.get(t.key)
        if v is None or not math.isfinite(v):
            out.append({"key": t.key, "target": t.text, "value": None, "status": "not measured"})
            continue
        ok = v >= t.bound if t.higher_is_better else v <= t.bound
        # by how much: the factor still needed (miss) or the margin (pass), >1 either way
        factor = (t.bound / v if not ok else v / t.bound) if t.higher_is_better else \
            (v / t.bound if not ok else t.bound / v)
        out.append({"key": t.key, "target": t.text, "value": v, "status": "pass" if ok else "miss",
                    "factor": factor})
    return out


def render_gpu_header(result: dict, command: str) -> list[str]:
    m = result["machine"]
    lines = [f"# scops bench: {result['shape']} on {m.get('gpu') or 'the CPU'}", ""]
    if result["rehearsal"]:
        lines += ["**CPU REHEARSAL of the GPU run: every figure below was measured on the CPU; "
                  "none is a GPU figure.**", ""]
    lines += [f"Command: `{command}`", ""]
    gpu = f"{m['gpu']} ({m['gpu_mem_gib']} GiB, driver {m['driver']}); " if m.get("gpu") else ""
    lines += [f"Machine: {gpu}{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM "
              f"(1-min load average at start: {m['load_avg_1m']})", ""]
    return lines


def render_markdown(result: dict, command: str) -> str:
    if is_gpu_plan(result):
        return render_gpu_markdown(result, command)
    m = result["machine"]
    lines = [f"# scops bench: {result['shape']}", "",
             f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM "
             f"(1-min load average at start: {m['load_avg_1m']})", "",
             "| stage | shape | backend | p50 ms | p90 ms | tokens/s ± std |",
             "|---|---|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    ep = result["encoder_precision"]
    acc = ep.get("accuracy")
    lines += ["", f"Encoders: {ep['precision']}" + (
        f" (projected rows vs fp32 on {acc['photos']}: cos min {acc['cos_min']:.4f}, mean {acc['cos_mean']:.4f})"
        if acc else "")]
    rss = ", ".join(f"{s} {b / 2**30:.2f} GiB" for s, b in result["peak_rss_bytes"].items())
    lines += [f"Peak RSS (each system in its own process): {rss}",
              f"Memory bandwidth (numpy copy, read + write): {result['bandwidth_bytes_s'] / 1e9:.1f} GB/s; "
              f"weights read per token {result['weights_bytes_per_token']['bytes'] / 2**20:.0f} MiB "
              f"-> decode bound {result['decode_bound_tok_s']:.1f} tok/s",
              f"{result['options']['reps']} repetitions after 1 warm-up, {result['options']['tokens']} decode "
              f"tokens (EOS ignored, greedy), {result['options']['threads']} threads; "
              "turn 2 = a text follow-up in the same conversation (KV reused).",
              _prefix_note(result), ""]
    lines += target_table(result["targets"], "ratio")
    return "\n".join(lines) + "\n"


def save_report(out: Path, md: str, result: dict, plot=None, png: str = "", stem: str = "report") -> None:
    """out/{stem}.md and out/{stem}.json, then plot(result, out / png): the files every bench
    leaves. Each is written whole or not at all (a temporary file, then a rename), and neither
    is touched when the result cannot be serialised."""
    files = ((f"{stem}.md", md), (f"{stem}.json", json.dumps(result, indent=1)))   # both, before writing
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if plot is not None:
        plot(result, out / png)


def target_table(targets: list[dict], value_header: str = "value") -> list[str]:
    """The report's targets as markdown rows: value, pass/miss and by what factor."""
    lines = [f"| target | {value_header} | status |", "|---|---:|---|"]
    for t in targets:
        v = "—" if t["value"] is None else f"{t['value']:.3g}"
        status = t["status"] if t["value"] is None else \
            f"{t['status']} ({'margin' if t['status'] == 'pass' else 'short by'} {t['factor']:.2f}x)"
        lines.append(f"| {t['target']} | {v} | {status} |")
    return lines


def render_gpu_markdown(result: dict, command: str) -> str:
    lines = render_gpu_header(result, command)
    lines += ["| stage | shape | backend | p50 ms | p90 ms | tokens/s ± std |", "|---|---|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    ep = result["encoder_precision"]
    acc = ep.get("accuracy")
    lines += ["", f"Encoders: {ep['precision']}" + (
        f" (projected rows vs fp32 on {acc['photos']}: cos min {acc['cos_min']:.5f}, mean {acc['cos_mean']:.5f})"
        if acc else "")]
    vram = ", ".join(f"{s} {b / 1e9:.2f} GB" for s, b in result["peak_vram_bytes"].items() if b is not None)
    rss = ", ".join(f"{s} {b / 2**30:.2f} GiB" for s, b in result["peak_rss_bytes"].items())
    lines += [f"Peak VRAM (NVML: device memory in use minus before the process, every 5 ms): {vram or 'not measured'}",
              f"Peak RSS (each system in its own process): {rss}",
              f"{result['options']['reps']} repetitions after 1 warm-up, {result['options']['tokens']} decode tokens "
              "(EOS ignored, greedy); answer = image in -> last token out.", _prefix_note(result)]
    for system, why in result.get("not_measured", {}).items():
        lines.append(f"Not measured: {system} ({why})")
    lines += [""] + target_table(result["targets"])
    return "\n".join(lines) + "\n"


def _prefix_note(result: dict) -> str:
    sc = result["samples"]["scops"][0]
    if "reused_cells" not in sc:
        return ""
    return (f"scops' turn 1 reuses the session's cached prefix (system prompt: {sc['reused_cells']} of "
            f"{sc['prompt_cells']} cells) and decodes {sc['decoded_cells']}; the peers compute the whole prompt. "
            f"Turn 2 decodes {sc.get('turn2_decoded_cells')} cells.")


def plot_latency(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["stats"])                     # scops first, then the peers as run
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, system in enumerate(systems):
        bottom = 0.0
        for stage in STAGES:
            v = result["stats"][system].get(stage, {}).get("p50")
            if v is None:
                continue
            ax.bar(i, v, bottom=bottom, color=COLORS[stage], label=stage if i == 0 else None)
            bottom += v
    ax.set_xticks(range(len(systems)), systems)
    ax.set_ylabel("ms (p50) to first token")
    ax.set_title(f"{result['shape']}: time to first token by stage")
    ax.legend(fontsize=8)
    tok = [result["stats"][s]["decode_tok_s"] for s in systems]
    bx.bar(range(len(systems)), [t["mean"] for t in tok], yerr=[t["std"] for t in tok], color="#756bb1")
    if result.get("decode_bound_tok_s"):
        bx.axhline(result["decode_bound_tok_s"], color="k", ls="--", lw=1, label="bandwidth bound")
        bx.legend(fontsize=8)
    bx.set_xticks(range(len(systems)), systems)
    bx.set_ylabel("decode tokens/s")
    if result.get("rehearsal"):
        fig.suptitle("CPU rehearsal: not GPU figures", color="#b00")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: Path, command: str) -> str:
    result["targets"] = check_targets(result["ratios"], GPU_TARGETS if is_gpu_plan(result) else TARGETS)
    result["command"] = command
    md = render_markdown(result, command)
    save_report(out, md, result, plot_latency, "latency.png")
    return md
