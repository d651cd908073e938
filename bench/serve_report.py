"""`scops bench --serve`'s report: report.md (markdown tables), report.json and serve.png."""
from __future__ import annotations

from pathlib import Path

from .report import save_report, target_table


def render_markdown(result: dict, command: str) -> str:
    m, b = result["machine"], result["burst"]
    lines = [f"# scops bench --serve: {result['shape']}", "", f"Command: `{command}`", "",
             f"Server: `{result['server_command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM "
             f"(1-min load average at start: {m['load_avg_1m']})", "",
             "| streams | decode tok/s (all) | per stream | text-turn TTFT p50 ms | p90 ms "
             "| server: from arrival | from submit | queued | prefill | cells decoded | steps cut short |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in result["levels"]:
        sv = lv.get("server_p50", {})
        lines.append(f"| {lv['concurrency']} | {lv['decode_tok_s']:.1f} | {lv['per_stream_tok_s']:.1f} | "
                     f"{lv['ttft_p50']:.1f} | {lv['ttft_p90']:.1f} | " + " | ".join(
                         _num(sv.get(k)) for k in ("arrival_ttft_ms", "ttft_ms", "queue_ms", "prefill_ms",
                                                   "decoded_cells")) + f" | {_cut(lv)} |")
    lines += ["", "Server columns: what the server reports in the finish chunk's `scops.timings` (p50 over the "
                  "probes), in ms: TTFT from the request's arrival (headers read) to its first token sampled; "
                  "TTFT from its submission to the scheduler (parsed, media prepared, conversation built); time "
                  "queued (waiting for the step in progress and for a slot); prefill. The client's TTFT adds "
                  "HTTP, JSON and the client's own threads. Steps cut short: steps of the streams' tokens "
                  "that a new prompt aborted, of all the server's steps during the level."]
    c = result.get("ceiling")
    if c:
        ks = list(c["tok_s"])
        lines += ["", f"Raw batched `llama_decode` on the same GGUF and context ({c['n_seq']} sequences x "
                      f"{c['n_ctx']} positions, unified KV, {c['threads']} threads; p50 of {c['reps']}, load "
                      f"{c['load_avg_1m']}): the ceiling of the server's decode.", "",
                  "| one llama_decode of | p50 ms | tokens/s | vs 1 sequence |", "|---|---:|---:|---:|"]
        for k in ks:
            lines.append(f"| 1 token of {k} sequence(s) | {c['step_ms_p50'][k]:.1f} | {c['tok_s'][k]:.1f} | "
                         f"{c['tok_s'][k] / c['tok_s'][ks[0]]:.2f}x |")
        lines.append(f"| a {c['chunk_cells']}-cell text chunk alone | {c['step_ms_p50']['chunk']:.1f} | | |")
        last = f"{ks[-1]}+chunk"
        if last in c["step_ms_p50"]:
            lines.append(f"| 1 token of {ks[-1]} sequences + the chunk | {c['step_ms_p50'][last]:.1f} | | |")
        if "wide" in c["step_ms_p50"]:
            lines.append(f"| a {c['wide_cells']}-cell chunk alone | {c['step_ms_p50']['wide']:.1f} | "
                         f"{1e3 / c['cell_ms']:.1f} | |")
            k = ks[-1]
            lines += ["", f"The wide chunk is llama.cpp's lowest cost per cell here ({c['cell_ms']:.1f} ms). "
                          f"{k} tokens cannot cost less than {k} such cells, nor less than one token's step, so "
                          f"batching {k} streams gains at most {k} x {c['step_ms_p50']['1']:.1f} / "
                          f"max({c['step_ms_p50']['1']:.1f}, {k} x {c['cell_ms']:.1f}) = "
                          f"**{c['decode_bound'][k]:.2f}x** on this CPU, whatever the server does."]
    t = result["turns"]
    lines += ["", f"Turn 1 (picture + question) TTFT p50 {t['turn1_p50']:.1f} ms; turn 2 (text follow-up, same "
                  f"conversation) {t['turn2_p50']:.1f} ms." + _turn_server(t),
              f"Burst: {b['requests']} concurrent requests x {b['pictures']} PNGs of {b['side']}x{b['side']} "
              f"({b['wire_bytes_per_request'] / 1024:.0f} KiB per request on the wire): server RSS idle "
              f"{b['idle_rss'] / 2**20:.0f} MiB, peak {b['peak_rss'] / 2**20:.0f} MiB "
              f"(+{b['peak_over_idle'] / 2**20:.0f} MiB), after {b['after_rss'] / 2**20:.0f} MiB "
              f"(+{b['after_over_idle'] / 2**20:.0f} MiB); answers: "
              + ", ".join(f"{s} x{b['statuses'].count(s)}" for s in sorted(set(b["statuses"]))), ""]
    lines += target_table(result["targets"], "ratio")
    return "\n".join(lines) + "\n"


def _cut(lv: dict) -> str:
    return f"{lv['steps_cut_short']} of {lv['steps']}" if "steps" in lv else "—"


def _num(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _turn_server(t: dict) -> str:
    one, two = t.get("turn1_server_p50", {}), t.get("turn2_server_p50", {})
    if "ttft_ms" not in one or "ttft_ms" not in two:
        return ""
    key = "arrival_ttft_ms" if "arrival_ttft_ms" in one and "arrival_ttft_ms" in two else "ttft_ms"
    return (f" Server side (p50, from arrival): turn 1 {one[key]:.1f} ms ({_num(one.get('decoded_cells'))} cells "
            f"decoded, encode {_num(one.get('encode_ms'))} ms), turn 2 {two[key]:.1f} ms "
            f"({_num(two.get('decoded_cells'))} cells decoded, preprocess {_num(two.get('preprocess_ms'))} ms, "
            f"encode {_num(two.get('encode_ms'))} ms).")


def plot_serve(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    busy = [lv for lv in levels if lv["concurrency"]]
    ax.plot([lv["concurrency"] for lv in busy], [lv["decode_tok_s"] for lv in busy], "o-", label="all streams")
    ax.plot([lv["concurrency"] for lv in busy], [lv["per_stream_tok_s"] for lv in busy], "s--", label="per stream")
    c = result.get("ceiling")
    if c:                                  # what llama_decode alone does with k sequences a step
        ax.plot([int(k) for k in c["tok_s"]], list(c["tok_s"].values()), "^:", color="gray",
                label="raw llama_decode (ceiling)")
    ax.set_xticks(sorted({lv["concurrency"] for lv in busy}))
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['shape']}: decode throughput")
    ax.legend(fontsize=8)
    bx.errorbar([lv["concurrency"] for lv in levels], [lv["ttft_p50"] for lv in levels],
                yerr=[[0] * len(levels), [lv["ttft_p90"] - lv["ttft_p50"] for lv in levels]], fmt="o-", capsize=3)
    bx.set_xticks([lv["concurrency"] for lv in levels])
    bx.set_xlabel("streams decoding meanwhile")
    bx.set_ylabel("text-turn TTFT ms (p50, bar to p90)")
    bx.set_title("time to first token under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_serve_report(result: dict, out: Path, command: str) -> str:
    result["command"] = command
    md = render_markdown(result, command)
    save_report(out, md, result, plot_serve, "serve.png")
    return md
