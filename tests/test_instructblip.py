"""InstructBLIP: text-conditioned Q-Former parity, [rows][BOS][prompt] greedy parity with HF,
and the cache split (ViT output per picture, Q-Former per instruction)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import InstructBlipReference, MiniGPT4Reference

Q1, Q2 = "What is unusual about this image?", "Which colours stand out?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from scops.export.fixtures import build_instructblip_tiny
    return build_instructblip_tiny(tmp_path_factory.mktemp("ib") / "instructblip-tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    return InstructBlipReference(ckpt)


@pytest.fixture(scope="module")
def session(ckpt, tmp_path_factory):
    from scops.export.instructblip import export_instructblip
    from scops.runtime.session import Session
    b = export_instructblip(str(ckpt), tmp_path_factory.mktemp("ibb") / "b", "F32", log=lambda s: None)
    s = Session.open(b, kv_type="f32", flash_attn="off", n_ctx=512)
    yield s
    s.close()


def test_instruction_ids_match_hf_bert_tokenizer(session, ref):
    long = "please describe " + "the small red car near the old house " * 30 + Q1
    for text in (Q1, "", long):
        got = session.instruction_tok.encode(text)["instruction_ids"]
        want = ref.instruction(text)["input_ids"].numpy()
        assert got.tolist() == want.tolist()
    assert session.instruction_tok.encode(long)["instruction_ids"].shape[1] == 128


def test_onnx_qformer_with_instruction_matches_pytorch(session, ref, photos):
    enc = session.encoders["image"]
    assert enc.uses_instruction
    pixels = torch.cat([MiniGPT4Reference.pixels(p) for p in photos.values()])     # [3, 3, 224, 224]
    base = enc.encode_base(pixels.numpy())
    instr = {k: np.repeat(v, 3, axis=0) for k, v in session.instruction_tok.encode(Q1).items()}
    bridge = enc.encode_rows(base, instr)
    with torch.no_grad():
        want_rows = ref.image_rows(pixels, Q1).numpy()
    assert bridge.shape == (3, 32, 64)
    rows = np.stack([session.projectors["image"].forward(b) for b in bridge])
    assert np.max(np.abs(rows - want_rows)) <= 1e-4


def test_greedy_tokens_equal_hf_and_layout_is_rows_then_bos(session, ref, photos):
    conv = session.chat()
    reply = conv.send(Q1, images=[photos["cat"]], temperature=0, max_tokens=20, ignore_stop=True).result()
    cells = session.llm.cells
    assert all(isinstance(c, tuple) for c in cells[:32]) and cells[32] == 1       # [32 rows][BOS]...
    assert reply.token_ids == ref.generate(Q1, photos["cat"], 20)


def test_vit_cached_per_picture_qformer_per_instruction(session, photos):
    runs = session.stats.encoder_runs
    a = session.chat().send(Q1, images=[photos["coffee"]], temperature=0, max_tokens=4).result()
    b = session.chat().send(Q2, images=[photos["coffee"]], temperature=0, max_tokens=4).result()
    assert session.stats.encoder_runs == runs + 1            # the ViT ran once for both questions
    keys = [c[0] for c in session.llm.cells if isinstance(c, tuple)]
    assert len(set(keys)) == 1 and "|q:" in keys[0]          # rows keyed by picture + instruction
    hits = session.stats.media_cache_hits
    session.chat().send(Q2, images=[photos["coffee"]], temperature=0, max_tokens=4).result()
    assert session.stats.media_cache_hits == hits + 1        # same picture, same question: no Q-Former
    assert a.timings["encode_ms"] > 0 and b.timings["encode_ms"] > 0


def test_second_turn_reuses_the_first(session, photos):
    conv = session.chat()
    r1 = conv.send(Q1, images=[photos["cat"]], temperature=0, max_tokens=6).result()
    r2 = conv.send(Q2, temperature=0, max_tokens=6).result()
    assert r2.timings["reused_cells"] >= r1.timings["reused_cells"] + r1.timings["decoded_cells"]
