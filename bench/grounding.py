"""`scops bench --shape bubogpt-grounding`: per-stage CPU latency of BuboGPT's grounding at the
published shapes, SAM ViT-B and ViT-H side by side.

    flock /tmp/scops-heavy.lock scops bench --shape bubogpt-grounding --reps 5 --out bench-grounding

Random weights at the released sizes (latency does not depend on the values), written in
each release's layout by the fixture writers and exported by the same code as a real
release (parity checked at export), cached under $SCOPS_CACHE/bench/grounding:
  RAM Swin-L (embed 192, depths 2-2-18-2, window 12, 384 px), 4585 tags, Q2L head 768 / 2 layers
  GroundingDINO Swin-T OGC: Swin-T 96 / 2-2-6-2, d_model 256, 6 + 6 layers, 900 queries, BERT-base
  SAM ViT-B (768 x 12) and ViT-H (1280 x 32): 1024 px encoder, box decoder
Timed with onnxruntime (CPU EP) after one warm-up: RAM on the 384 px picture; GroundingDINO
at 800 x 1066 (a 4:3 photo) with a 20-tag caption; SAM's encoder; SAM's decoder with 10
boxes; the 10 masks' upsampling to 1066 x 800, hole filling and RLE (numpy + scipy). Prints a
markdown table, writes report.json and latency.png beside it.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from .report import save_report

# build_sam.py's three variants at the published widths
SAM_B = {"vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 1024,
                    "patch_size": 16, "global_attn_indexes": [2, 5, 8, 11], "window_size": 14, "mlp_dim": 3072,
                    "output_channels": 256, "num_pos_feats": 128},
         "prompt": {"hidden_size": 256, "image_size": 1024, "patch_size": 16, "mask_input_channels": 16},
         "decoder": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "mlp_dim": 2048,
                     "num_multimask_outputs": 3, "iou_head_hidden_dim": 256}}
SAM_H = {**SAM_B, "vision": dict(SAM_B["vision"], hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                 global_attn_indexes=[7, 15, 23, 31], mlp_dim=5120)}
# ram/configs/swin/config_swinL_384.json + q2l_config.json; 4585 tags
RAM_SWIN_L = {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12,
              "image_size": 384, "patch_size": 4}
RAM_HEAD = {"label_width": 512, "hidden": 768, "layers": 2, "intermediate": 3072}
RAM_TAGS = 4585
# GroundingDINO_SwinT_OGC: swin_T_224_1k + the transformer of the yaml; bert-base-uncased
GD_SWIN_T = {"swin": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                      "out_indices": [1, 2, 3]},
             "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2},
             "d_model": 256, "num_feature_levels": 4, "num_queries": 900, "encoder_layers": 6, "decoder_layers": 6,
             "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "encoder_n_points": 4, "decoder_n_points": 4}
PICTURE = (800, 1066)          # H, W: a 4:3 photo at GroundingDINO's own input size
BOXES = 10
CAPTION_TAGS = 20


def cache_dir() -> Path:
    return Path(os.environ.get("SCOPS_CACHE", Path.home() / ".cache" / "scops")) / "bench" / "grounding"


class _Dir:
    """The slice of BundleBuilder the grounding exporter uses (a folder, file records)."""

    def __init__(self, path: Path):
        self.dir = path
        self.files = {}

    def add_file(self, name, kind, **facts):
        self.files[name] = {"kind": kind, **facts}


def _write_checkpoints(ck: Path, log) -> None:
    """Random RAM Swin-L, GroundingDINO Swin-T, SAM ViT-B and ViT-H in their release layouts."""
    import torch

    from scops.export import fixtures_grounding as fx

    log("writing random RAM Swin-L, GroundingDINO Swin-T, SAM ViT-B and ViT-H in their release layouts")
    tags = [f"tag{i}" for i in range(RAM_TAGS)]
    torch.save({"model": fx.make_ram_state(0, RAM_TAGS, RAM_SWIN_L, RAM_HEAD)}, str(ck / fx.RAM_FILE))
    (ck / "ram_tag_list.txt").write_text("\n".join(tags))
    (ck / "ram_tag_list_threshold.txt").write_text("\n".join(["0.65"] * RAM_TAGS))
    bert = ck / fx.BERT_DIR
    bert.mkdir()
    vocab = fx.bert_vocab(words=tuple(tags))
    vocab += [f"[unused{i}]" for i in range(len(vocab), 30522)]        # bert-base-uncased's size
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (bert / "config.json").write_text(json.dumps(dict(GD_SWIN_T["text"], model_type="bert",
                                                      vocab_size=len(vocab))))
    torch.save({"model": fx.make_groundingdino_state(len(vocab), 0, GD_SWIN_T)}, str(ck / fx.GD_FILE))
    for name, shape in (("sam_vit_b_01ec64.pth", SAM_B), ("sam_vit_h_4b8939.pth", SAM_H)):
        torch.save(fx.make_sam_state(0, shape), str(ck / name))


def build(log) -> Path:
    """Checkpoints in their release layouts -> exported graphs. Each step is published
    atomically and reused by later runs: checkpoints/ (5.1 GB), graphs/b (RAM, GroundingDINO,
    SAM ViT-B), graphs/h (SAM ViT-H), so an interrupted run resumes at the step it was in."""
    from scops.export import sam
    from scops.export.bundle import atomic_dir, clean_stale
    from scops.export.grounding import export_grounding, find_sources
    from scops.export.onnx_stages import export_and_validate

    ck, out = cache_dir() / "checkpoints", cache_dir() / "graphs"
    clean_stale(out, log)                  # a whole-graphs temp folder of an older, killed run
    if not ck.is_dir():
        with atomic_dir(ck) as tmp:
            _write_checkpoints(tmp, log)
    else:
        log(f"reusing the checkpoints in {ck}")
    if not (out / "b" / "record.json").is_file():
        with atomic_dir(out / "b") as d:
            log("exporting RAM, GroundingDINO and SAM ViT-B (parity checked)")
            record, checks = export_grounding(find_sources(ck, ck / "sam_vit_b_01ec64.pth"), _Dir(d), log)
            (d / "record.json").write_text(json.dumps({"grounding": record, "validation": checks}))
    if not (out / "h" / "record.json").is_file():
        record = json.loads((out / "b" / "record.json").read_text())["grounding"]
        with atomic_dir(out / "h") as d:
            log("exporting SAM ViT-H (parity checked)")
            path = ck / "sam_vit_h_4b8939.pth"
            _, cfg = sam.build_sam(path)
            specs = sam.stage_specs(cfg)
            checks = {specs[n].file: export_and_validate(make(path), specs[n], d, log)
                      for n, make in (("sam_encoder", sam.build_encoder), ("sam_decoder", sam.build_decoder))}
            record = dict(record, stages=record["stages"][:2] + [sam.manifest_record(cfg)])
            (d / "record.json").write_text(json.dumps({"grounding": record, "validation": checks}))
    return out


def _time(fn, reps: int) -> list[float]:
    fn()                                                                      # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(graphs: Path, reps: int, threads: int, log) -> list[dict]:
    import onnxruntime as ort

    from scops.runtime import detector as det
    from scops.runtime import segmenter as seg
    from scops.runtime.grounding import rle_encode
    from scops.runtime import tagger as tg
    from scops.runtime.encode import _session_options

    def session(path):
        return ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*PICTURE, 3), dtype=np.uint8)
    rows = []
    common = graphs / "b"
    rec = json.loads((common / "record.json").read_text())["grounding"]["stages"]
    log("timing RAM")
    ram = session(common / "ram.onnx")
    x = tg.prepare_image(rgb, rec[0])
    rows.append({"stage": "RAM Swin-L tagger", "shape": "x".join(map(str, x.shape)) + f" -> {RAM_TAGS} tags",
                 "ms": _time(lambda: ram.run(None, {"pixel_values": x}), reps)})
    del ram
    log("timing GroundingDINO")
    gd = session(common / "groundingdino.onnx")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(common / "groundingdino_tokenizer.json"))
    ids = tok.encode(det.caption_of([f"tag{i}" for i in range(CAPTION_TAGS)])).ids
    feeds = det.text_inputs(ids, rec[1]["special_ids"], 256)
    feeds["pixel_values"] = det.prepare_image(rgb, rec[1])
    rows.append({"stage": "GroundingDINO Swin-T", "shape": f"1x3x{PICTURE[0]}x{PICTURE[1]}, {len(ids)} tokens",
                 "ms": _time(lambda: gd.run(None, feeds), reps)})
    del gd
    boxes = np.array([[50 + 40 * i, 60 + 30 * i, 400 + 50 * i, 500 + 20 * i] for i in range(BOXES)], np.float32)
    for variant, label in (("b", "ViT-B"), ("h", "ViT-H")):
        log(f"timing SAM {label}")
        spec = json.loads((graphs / variant / "record.json").read_text())["grounding"]["stages"][2]
        enc, dec = session(graphs / variant / "sam_encoder.onnx"), session(graphs / variant / "sam_decoder.onnx")
        px, resized = seg.prepare_image(rgb, spec)
        rows.append({"stage": f"SAM {label} image encoder", "shape": "x".join(map(str, px.shape)),
                     "ms": _time(lambda: enc.run(None, {"pixel_values": px}), reps)})
        emb = enc.run(None, {"pixel_values": px})[0]
        frame = seg.boxes_to_frame(boxes, PICTURE, resized)
        rows.append({"stage": f"SAM {label} box decoder", "shape": f"{BOXES} boxes",
                     "ms": _time(lambda: dec.run(None, {"image_embeddings": emb, "boxes": frame}), reps)})
        del enc
    low = dec.run(None, {"image_embeddings": emb, "boxes": frame})[0]
    segmenter = seg.Segmenter(None, dec, spec)

    def masks():                          # what Grounder.ground does with the decoder's output
        for m in low:
            rle_encode(segmenter.finish(m, resized, PICTURE))
    rows.append({"stage": "masks: upsample, fill holes, RLE", "shape": f"{BOXES} x {PICTURE[0]}x{PICTURE[1]}",
                 "ms": _time(masks, reps)})
    for r in rows:
        r["p50"] = statistics.median(r["ms"])
        r["p90"] = float(np.percentile(r["ms"], 90))
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    lines = ["| stage | shape | backend | p50 ms | p90 ms |", "|---|---|---|---:|---:|"]
    for r in rows:
        backend = "numpy+scipy" if r["stage"].startswith("masks") else f"onnxruntime CPU, {threads} threads"
        lines.append(f"| {r['stage']} | {r['shape']} | {backend} | {r['p50']:.0f} | {r['p90']:.0f} |")
    for variant in ("ViT-B", "ViT-H"):
        total = sum(r["p50"] for r in rows if not r["stage"].startswith("SAM") or variant in r["stage"])
        lines.append(f"| **picture total, SAM {variant}** | | | **{total:.0f}** | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["stage"] for r in rows]
    ax.barh(names, [r["p50"] for r in rows], xerr=[[0] * len(rows), [r["p90"] - r["p50"] for r in rows]])
    ax.invert_yaxis()
    ax.set_xlabel("ms (p50, bar to p90)")
    ax.set_title("BuboGPT grounding per picture, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_grounding_bench(reps: int, threads: int, out: Path, command: str, log) -> str:
    threads = threads or (os.cpu_count() or 1)
    reps = reps or 5
    graphs = build(log)
    rows = measure(graphs, reps, threads, log)
    md = markdown(rows, threads)
    result = {"command": command, "threads": threads, "reps": reps, "picture": PICTURE, "rows": rows}
    save_report(out, f"{md}\n\nreproduce: {command}\n", result)
    plot(rows, out / "latency.png")
    return md
