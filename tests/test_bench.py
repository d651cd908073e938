"""`scops bench` end to end on the tiny shape, and the encoder precision conversions."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

RATIO_KEYS = ("ttft_vs_hf", "decode_vs_hf", "decode_vs_llama_cpp", "decode_vs_roofline", "turn2_vs_turn1",
              "rss_vs_hf")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One cache (the tiny shape's checkpoint and bundle) for the bench tests of this module."""
    return tmp_path_factory.mktemp("bench-cache")


def test_bench_tiny_end_to_end(tmp_path, monkeypatch, capsys, bench_cache):
    from scops.runtime.cli import main

    monkeypatch.setenv("SCOPS_CACHE", str(bench_cache))
    out = tmp_path / "report"
    rc = main(["bench", "--shape", "tiny", "--vs", "hf,llama-cpp", "--reps", "1", "--tokens", "4",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| stage | shape | backend | p50 ms | p90 ms | tokens/s ± std |" in printed
    assert "reproduce: scops bench --shape tiny --vs hf,llama-cpp --reps 1 --tokens 4" in printed

    report = json.loads((out / "report.json").read_text())
    assert set(RATIO_KEYS) <= set(report["ratios"])
    for key in RATIO_KEYS:
        v = report["ratios"][key]
        assert v is not None and math.isfinite(v) and v > 0, (key, v)
    assert set(report["stats"]) == {"scops", "hf", "llama-cpp"}
    for system, stats in report["stats"].items():
        assert stats["ttft"]["p50"] > 0 and stats["decode_tok_s"]["mean"] > 0, system
        assert report["peak_rss_bytes"][system] > 0
    assert report["samples"]["scops"][0]["n_tokens"] == 4
    assert report["encoder_precision"]["precision"] == "int8"
    assert {t["key"] for t in report["targets"]} == set(RATIO_KEYS)
    assert all(t["status"] in ("pass", "miss") for t in report["targets"])

    md = (out / "report.md").read_text()
    assert "|---|---|---|---:|---:|---:|" in md and "| decode |" in md and "scops bench --shape tiny" in md
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_serve_tiny(tmp_path, monkeypatch, capsys, bench_cache):
    """`scops bench --serve` end to end: a real `scops serve` process under 0, 1 and 4
    streams, turn 1 vs turn 2, a burst of pictures with the server's RSS sampled."""
    from scops.runtime.cli import main

    monkeypatch.setenv("SCOPS_CACHE", str(bench_cache))
    out = tmp_path / "serve"
    rc = main(["bench", "--serve", "--shape", "tiny", "--concurrency", "1,4", "--reps", "2", "--tokens", "6",
               "--burst", "2x2x800", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| streams | decode tok/s (all) | per stream | text-turn TTFT p50 ms | p90 ms | server: from arrival" in printed
    assert "| 1 token of 4 sequence(s) |" in printed                   # the raw llama_decode ceiling
    assert "batching 4 streams gains at most" in printed               # and the bound from its widest chunk
    assert "reproduce: scops bench --serve --shape tiny --concurrency 1,4 --reps 2 --tokens 6" in printed
    report = json.loads((out / "report.json").read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [0, 1, 4] and report["parallel"] == 5
    for lv in report["levels"]:
        assert len(lv["ttft_ms"]) == 2 and lv["ttft_p50"] > 0
        assert (lv["decode_tok_s"] > 0) == (lv["concurrency"] > 0)
        # the server's own account of each probe: a short text turn, decoded past the system prompt
        assert 0 < lv["server_p50"]["decoded_cells"] < 40 and lv["server_p50"]["ttft_ms"] > 0
        assert lv["server_p50"]["arrival_ttft_ms"] >= lv["server_p50"]["ttft_ms"]
        assert 0 <= lv["steps_cut_short"] <= lv["steps"] and lv["steps"] > 0
    ceiling = report["ceiling"]
    assert set(ceiling["tok_s"]) == {"1", "4"} and ceiling["n_seq"] == 5 and ceiling["threads"] >= 1
    assert all(len(v) == ceiling["reps"] for v in ceiling["step_ms"].values())
    # k tokens cost at least k cells at the wide chunk's rate and at least one token's step
    t1, cell = ceiling["step_ms_p50"]["1"], ceiling["step_ms_p50"]["wide"] / ceiling["wide_cells"]
    assert ceiling["decode_bound"]["4"] == pytest.approx(4 * t1 / max(t1, 4 * cell))
    turns = report["turns"]
    assert turns["turn2_server_p50"]["decoded_cells"] < turns["turn1_server_p50"]["decoded_cells"]
    for key in ("decode_4_vs_1", "ttft_loaded_vs_idle", "turn2_vs_turn1"):
        v = report["ratios"][key]
        assert v is not None and math.isfinite(v) and v > 0, (key, v)
    assert {t["key"]: t["status"] in ("pass", "miss") for t in report["targets"]} == {
        "decode_4_vs_1": True, "ttft_loaded_vs_idle": True, "turn2_vs_turn1": True}
    burst = report["burst"]
    assert burst["statuses"] == ["200", "200"] and burst["peak_rss"] >= burst["idle_rss"] > 0
    assert (out / "serve.png").read_bytes()[:8] == PNG_MAGIC and (out / "serve.log").exists()


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_encoder_precision_converts_and_measures(bundle, tmp_path, precision):
    """The tiny bundle's stages in int8 / fp16: they run, and the cosine vs fp32 is recorded."""
    from safetensors.numpy import load_file

    from scops.export.encoder_precision import convert_stages
    from scops.export.minigpt4 import BLIP2_IMAGE

    src = bundle("Q4_K_M")
    for f in ("vision.onnx", "qformer.onnx", "projector.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    result = convert_stages(tmp_path, ["vision.onnx", "qformer.onnx"], precision,
                            load_file(str(tmp_path / "projector.safetensors")), BLIP2_IMAGE, log=lambda s: None)
    assert result["files"] == {"vision.onnx": f"vision.{precision}.onnx", "qformer.onnx": f"qformer.{precision}.onnx"}
    acc = result["accuracy"]
    assert acc["rows"] == 3 * 32 and 0.99 <= acc["cos_min"] <= acc["cos_mean"] <= 1.0 + 1e-9
    assert acc["passes"]
    for name in result["files"].values():
        assert (tmp_path / name).is_file()


def test_export_records_precision_in_manifest(tiny_ckpt, tmp_path, photos):
    """--encoder-precision int8 at export: the manifest points at the int8 graphs, records the
    measured cosine, and a session serves the bundle."""
    from scops.export.minigpt4 import export_minigpt4
    from scops.runtime.session import Session

    path = export_minigpt4(str(tiny_ckpt), tmp_path / "int8", "Q4_K_M", log=lambda s: None,
                           encoder_precision="int8")
    m = json.loads((path / "manifest.json").read_text())
    files = [st["file"] for st in m["modalities"]["image"]["stages"] if st["op"] == "onnx"]
    assert files == ["vision.int8.onnx", "qformer.int8.onnx"]
    assert not (path / "vision.onnx").exists()
    ep = m["encoder_precision"]
    assert ep["precision"] == "int8" and ep["accuracy"]["cos_min"] >= 0.99
    with Session.open(path, n_ctx=512) as s:
        reply = s.chat().send("What is it?", images=[photos["cat"]], temperature=0, max_tokens=4,
                              ignore_stop=True).result()
    assert len(reply.token_ids) == 4 and np.isfinite(reply.timings["ttft_ms"])


def test_grounding_bench_times_every_stage(grounding_bundle, tmp_path, monkeypatch):
    """`scops bench --shape bubogpt-grounding` measuring and reporting, on the tiny bundle's four
    graphs standing in for both SAM variants (building the published shapes is the long part)."""
    from scops.bench import grounding as bg

    record = json.loads((grounding_bundle / "manifest.json").read_text())["grounding"]
    graphs = tmp_path / "graphs"
    for variant in ("b", "h"):
        (graphs / variant).mkdir(parents=True)
        for name in ("ram.onnx", "groundingdino.onnx", "groundingdino_tokenizer.json", "sam_encoder.onnx",
                     "sam_decoder.onnx"):
            (graphs / variant / name).symlink_to(grounding_bundle / name)
        (graphs / variant / "record.json").write_text(json.dumps({"grounding": record}))
    monkeypatch.setattr(bg, "build", lambda log: graphs)
    out = tmp_path / "out"
    md = bg.run_grounding_bench(2, 1, out, "scops bench --shape bubogpt-grounding", lambda s: None)
    report = json.loads((out / "report.json").read_text())
    stages = [r["stage"] for r in report["rows"]]
    assert stages == ["RAM Swin-L tagger", "GroundingDINO Swin-T", "SAM ViT-B image encoder", "SAM ViT-B box decoder",
                      "SAM ViT-H image encoder", "SAM ViT-H box decoder", "masks: upsample, fill holes, RLE"]
    for r in report["rows"]:
        assert len(r["ms"]) == 2 and 0 < r["p50"] <= r["p90"] and f"| {r['stage']} |" in md
    assert "| masks: upsample, fill holes, RLE | 10 x 800x1066 | numpy+scipy |" in md
    assert "picture total, SAM ViT-H" in md and report["picture"] == [800, 1066]
    assert (out / "report.md").read_text().endswith("reproduce: scops bench --shape bubogpt-grounding\n")
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    """bench/report.py save_report, which every bench's report goes through: a result that cannot
    be written leaves the previous report.md / report.json as they were, and no temporary file."""
    from scops.bench.report import save_report
    plotted = []
    save_report(tmp_path, "# one\n", {"a": 1}, lambda result, path: plotted.append((result, path.name)), "p.png")
    assert (tmp_path / "report.md").read_text() == "# one\n"
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1} and plotted == [({"a": 1}, "p.png")]
    with pytest.raises(TypeError):
        save_report(tmp_path, "# two\n", {"a": object()})
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1}
    assert (tmp_path / "report.md").read_text() == "# one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
