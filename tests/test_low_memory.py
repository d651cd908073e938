"""The low-memory profile: a KV cache that grows with the conversation, q8_0 KV, encoders
built on use and dropped when idle, int8 stage variants, the memory check at open, and
the memory benchmark's worker."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from scops.runtime.bundle import open_bundle
from scops.runtime.errors import BundleError
from scops.runtime.session import LOW_MEMORY, Session

Q = "What is in this picture?"


def greedy(n, **kw):
    return dict(temperature=0, max_tokens=n, **kw)


def test_growing_context_gives_the_same_tokens(bundle, photos):
    exact = dict(kv_type="f32", flash_attn="off", n_ctx=1024, warmup=False)
    long_q = " ".join(["Describe the colours, the shapes and the light of this picture."] * 12)  # ~250 tokens
    turns = [(long_q, dict(images=[photos["cat"]]), 12), (long_q, {}, 12)]
    with Session.open(bundle("F32"), **exact) as full:
        conv = full.chat()
        want = [conv.send(q, **m, **greedy(n, ignore_stop=True)).result().token_ids for q, m, n in turns]
    with Session.open(bundle("F32"), n_ctx_start=256, **exact) as grow:   # llama.cpp's smallest context
        assert grow.llm.n_ctx == 256 and grow.llm.n_ctx_max == 1024
        conv, got, sizes = grow.chat(), [], []
        for q, m, n in turns:
            got.append(conv.send(q, **m, **greedy(n, ignore_stop=True)).result().token_ids)
            sizes.append(grow.llm.n_ctx)
        assert 256 < sizes[0] < sizes[1] <= 1024, sizes          # grew for turn 1, again for turn 2
        assert len(grow.llm.cells) < grow.llm.n_ctx
    assert got == want


def test_q8_0_kv_cache_and_its_fallback(bundle, photos, caplog):
    with Session.open(bundle(), kv_type="q8_0", n_ctx=512, warmup=False) as s:
        assert s.llm.kv_type == "q8_0"                    # llama.cpp's CPU flash attention takes it
        reply = s.chat().send(Q, images=[photos["cat"]], **greedy(8, ignore_stop=True)).result()
        assert len(reply.token_ids) == 8
    with caplog.at_level("INFO", logger="scops"):
        with Session.open(bundle(), kv_type="q8_0", flash_attn="off", n_ctx=512, warmup=False) as s:
            assert s.llm.kv_type == "f16"                 # a quantized V cache needs flash attention
    assert any("q8_0 refused" in r.getMessage() for r in caplog.records)


def test_low_memory_profile_loads_on_use_and_drops(bundle, photos):
    with Session.open(bundle(), kv_type="f16", n_ctx=1024) as default:
        want = default.chat().send(Q, images=[photos["cat"]], **greedy(12, ignore_stop=True)).result().token_ids
    with Session.open(bundle(), low_memory=True, kv_type="f16", n_ctx=1024) as s:
        assert s.opts.low_memory and not s.opts.onnx_arena and s.opts.encoder_idle_s == LOW_MEMORY["encoder_idle_s"]
        assert s.encoders.loaded() == [] and s.encoders.loads == 0          # nothing built at open
        assert s.llm.n_ctx == LOW_MEMORY["n_ctx_start"]
        assert default.opts.weight_repack and not s.opts.weight_repack and not s.llm.opts.repack
        got = s.chat().send(Q, images=[photos["cat"]], **greedy(12, ignore_stop=True)).result().token_ids
        assert got == want                                                   # same answer, less memory
        assert s.encoders.loaded() == ["image"] and s.encoders.loads == 1
        assert s.encoders.drop_idle(0.0) == ["image"] and s.encoders.loaded() == []
        s.chat().send(Q, images=[photos["cat"]], **greedy(2)).result()       # cached rows: no rebuild
        assert s.encoders.loads == 1
        s.chat().send(Q, images=[photos["coffee"]], **greedy(2)).result()    # a new picture: rebuilt
        assert s.encoders.loads == 2


def test_idle_encoders_are_dropped_by_the_timer(bundle, photos):
    with Session.open(bundle(), low_memory=True, encoder_idle_s=0.2, warmup=False) as s:
        s.chat().send(Q, images=[photos["astronaut"]], **greedy(1)).result()
        deadline = time.monotonic() + 30
        while s.encoders.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.encoders.loaded() == [] and s.encoders.drops == 1


def test_export_with_an_int8_variant_serves_both_profiles(tiny_ckpt, tmp_path, photos):
    from scops.export.minigpt4 import export_minigpt4

    b = export_minigpt4(str(tiny_ckpt), tmp_path / "b", "Q4_K_M", log=lambda s: None, encoder_precision="fp32,int8")
    m = json.loads((b / "manifest.json").read_text())
    onnx = [st for st in m["modalities"]["image"]["stages"] if st["op"] == "onnx"]
    assert [(st["file"], st["variants"]) for st in onnx] == [
        ("vision.onnx", {"int8": "vision.int8.onnx"}), ("qformer.onnx", {"int8": "qformer.int8.onnx"})]
    assert {"vision.onnx", "vision.int8.onnx", "qformer.int8.onnx"} <= set(m["files"])
    acc = m["encoder_precision"]["variants"]["int8"]["accuracy"]
    assert m["encoder_precision"]["precision"] == "fp32" and acc["rows"] > 0 and acc["cos_min"] > 0.9
    with Session.open(b, low_memory=True, warmup=False) as s:
        enc = s.encoders["image"]
        assert [st.name for st in enc.base + enc.rest] == ["vision.int8.onnx", "qformer.int8.onnx"]
    with Session.open(b, warmup=False) as s:
        enc = s.encoders["image"]
        assert [st.name for st in enc.base + enc.rest] == ["vision.onnx", "qformer.onnx"]
    m["modalities"]["image"]["stages"][0]["variants"]["fp16"] = "ghost.onnx"      # not in "files"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not listed"):
        Session.open(b)


def test_bundle_too_big_for_free_memory_is_refused_at_open(bundle, monkeypatch, capsys):
    import scops.runtime.memory as memory
    from scops.runtime.cli import main

    loads = []
    monkeypatch.setattr("scops.runtime.session.Llm", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)
    with pytest.raises(BundleError) as e:
        Session.open(bundle())
    msg = str(e.value)
    assert "\n" not in msg and "needs about" in msg and "0.1 GiB is available" in msg and "--low-memory" in msg
    assert main(["run", str(bundle()), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0], err
    assert loads == []
    b = open_bundle(bundle(), verify=False)
    need = {lm: memory.estimate(b, _opts(lm), "q8_0" if lm else "f16") for lm in (False, True)}
    assert need[True]["kv"] < need[False]["kv"] and need[True]["total"] < need[False]["total"]


def _opts(low_memory):
    from scops.runtime.session import SessionOptions
    return SessionOptions(**{**(LOW_MEMORY if low_memory else {}), "low_memory": low_memory})


def test_memory_bench_worker_and_report(bundle, tmp_path):
    """`scops bench --memory`'s worker on the tiny bundle: stages in order, the lazy encoder
    built inside the first encode and again after the idle drop, parts, and the report."""
    from scops.bench.memory_report import plot, render

    out = tmp_path / "low.json"
    subprocess.run([sys.executable, "-m", "scops.bench.memory", "--bundle", str(bundle()), "--profile", "low-memory",
                    "--reps", "1", "--tokens", "4", "--threads", "2", "--out", str(out)], check=True, timeout=600)
    r = json.loads(out.read_text())
    names = [(s["depth"], s["stage"]) for s in r["stages"]]
    turn = [(1, "image encoder built (ONNX sessions)"), (0, "image encode (turn)"), (0, "prefill (turn)"),
            (0, "decode (turn)")]
    assert names[-9:] == turn + [(0, "encoders dropped as idle (image)")] + turn, names
    assert r["kv_type"] == "q8_0" and r["n_ctx_final"] == LOW_MEMORY["n_ctx_start"]
    assert [t["after_drop"] for t in r["turns"]] == [False, True] and all(t["n_tokens"] == 4 for t in r["turns"])
    assert all(r["peak_rss"] >= s["peak"] >= s["rss_after"] > 0 for s in r["stages"])
    assert r["parts"]["kv_cache"] > 0 and r["parts"]["media_cache"] == 2 * 32 * 64 * 4    # 2 pictures x [32, 64] fp32
    result = {"shape": "tiny", "command": "scops bench --shape tiny --memory", "profiles": {"low-memory": r},
              "machine": {"cpu": "test", "cores": 2, "ram_gib": 1}}
    md = render(result)
    assert "| low-memory | " in md and "encoders dropped as idle (image)" in md
    assert "| LLM weights in anonymous memory (llama.cpp's repacked copy) | " in md
    plot(result, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0
