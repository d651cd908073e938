"""BuboGPT's grounding end to end: a bundle exported with it, a picture grounded beside the
chat, a planted answer linked to the detections and drawn where the detector and SAM put
them; the CLI's --json / --draw; bad input; a bundle without grounding still chats."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scops.runtime.grounding import DARKER, LIGHTER, rle_decode


@pytest.fixture(scope="module")
def session(grounding_bundle):
    from scops.runtime.session import Session
    s = Session.open(grounding_bundle, kv_type="f32", flash_attn="off", n_ctx=1024, warmup=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def picture(session, photos):
    """The cat photo grounded once (cached by content) and the detector's reference output."""
    rgb = photos["cat"]
    return rgb, session.grounder.ground(rgb)


def test_picture_is_grounded_by_all_three_stages(picture, grounding_ckpt):
    from scops.export.fixtures_grounding import ALWAYS, TAGS

    rgb, g = picture
    assert g.tags == list(TAGS[:ALWAYS])
    assert g.detections and len(g.masks) == len(g.detections) <= 50
    h, w = rgb.shape[:2]
    for d, m in zip(g.detections, g.masks):
        assert d.score > 0.25 and m["size"] == [h, w]
    assert set(g.timings) == {"tag_ms", "detect_ms", "segment_ms"}


def test_detections_are_where_pytorch_puts_them(picture, session, grounding_ckpt):
    """Runtime boxes = GroundingDINO (PyTorch) boxes on the runtime's own preprocessing, to 1e-3 px."""
    from scops.export import groundingdino as gd
    from scops.export.fixtures_grounding import BERT_DIR, GD_FILE
    from scops.runtime import detector as det

    rgb, g = picture
    _, detector, _ = session.grounder.stages()
    model, _ = gd.build_groundingdino(grounding_ckpt / GD_FILE, grounding_ckpt / BERT_DIR)
    ids = detector.tokens(det.caption_of(g.tags))
    feeds = det.text_inputs(ids, detector.spec["special_ids"], 256)
    x = torch.from_numpy(det.prepare_image(rgb, detector.spec))
    with torch.no_grad():
        probs, boxes, _ = model(x, *(torch.from_numpy(feeds[k]) for k in gd.TEXT_INPUTS))
    ref = det.select(probs[0].numpy(), boxes[0].numpy(), ids, detector.decode, 0.25, 0.2, rgb.shape[:2])
    ref.sort(key=lambda d: -d.score)
    assert [d.phrase for d in g.detections] == [d.phrase for d in ref[:50]]
    assert np.abs(np.array([d.box for d in g.detections]) - np.array([d.box for d in ref[:50]])).max() < 1e-3


def test_planted_answer_is_linked_and_drawn(picture, session):
    from PIL import Image, ImageDraw

    from scops.runtime.draw import _font, draw_picture, font_px, label_of

    rgb, g = picture
    labels = g.labels()
    word = "dog"
    assert any(word in lab for lab in labels), labels
    answer = "There is a Dog sitting here. Nothing else; no hotdogs."
    entities, facts = session.grounder.entities(g, answer)
    assert facts["matcher"] in ("llm", "fallback") and facts["labels"] == labels
    dog = [e for e in entities if e.phrase.lower() == "dog"]
    assert dog and dog[0].span == (11, 14) and answer[11:14] == "Dog"
    e = dog[0]
    owned = [(d, m) for d, m in zip(g.detections, g.masks) if d.phrase == e.tag]
    assert [r.box for r in e.regions] == [d.box for d, _ in owned] and [r.mask for r in e.regions] == \
        [m for _, m in owned]
    assert e.color == ["red", "pink", "orange", "yellow", "blue", "teal", "indigo", "green", "purple",
                       "deep_purple", "brown"][labels.index(e.tag) % 11]
    # drawn (one region at a time, so no other label covers it): the box's bottom or right
    # edge in the darker shade (blended with the lighter one where the mask covers it), the
    # mask's inside, away from the outline and the label, blended 50% with the lighter shade
    dark, light = np.array(DARKER[e.color]), np.array(LIGHTER[e.color])
    h, w = rgb.shape[:2]
    checked = 0
    for region in e.regions:
        x0, y0, x1, y1 = (int(round(v)) for v in region.box)      # draw.py: [x0, x1) -> last pixel x1 - 1
        img = draw_picture(rgb, [dataclasses.replace(e, regions=(region,))]).astype(int)
        mask = rle_decode(region.mask)
        # the label's rectangle, placed as draw.py places it (kept inside the picture)
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (8, 8))).textbbox(
            (0, 0), label_of(1, e), font=_font(font_px(w, h)))
        lw, lh = right - left + 4, bottom - top + 4
        lx, ly = max(0, min(x0, w - lw)), max(0, min(y0, h - lh))

        def free(y, x):                                          # not under the label
            return not (ly - 1 <= y <= ly + lh and lx - 1 <= x <= lx + lw)
        edge = []
        if 0 <= y1 - 1 < h:
            edge += [(y1 - 1, x) for x in range(max(x0, 0), min(x1 - 1, w)) if free(y1 - 1, x)]
        if 0 <= x1 - 1 < w:
            edge += [(y, x1 - 1) for y in range(max(y0, 0), min(y1 - 1, h)) if free(y, x1 - 1)]
        if edge:
            want = np.array([dark if not mask[y, x] else (dark + light) / 2 for y, x in edge])
            assert np.abs(np.array([img[y, x] for y, x in edge]) - want).max() <= 1
            checked += len(edge)
        away = mask.copy()
        yy, xx = np.mgrid[0:h, 0:w]
        near = ((np.abs(yy - y0) < 12) | (np.abs(yy - (y1 - 1)) < 12) | (np.abs(xx - x0) < 12)
                | (np.abs(xx - (x1 - 1)) < 12)) & (yy > y0 - 12) & (yy < y1 + 12) & (xx > x0 - 12) & (xx < x1 + 12)
        away &= ~near & ~((yy >= ly - 1) & (yy <= ly + lh) & (xx >= lx - 1) & (xx <= lx + lw))
        if away.any():
            assert np.abs(img[away] - (rgb[away].astype(int) + light) / 2).max() <= 1
            checked += int(away.sum())
        outside = ~mask & ~near & ~((yy >= ly - 1) & (yy <= ly + lh) & (xx >= lx - 1) & (xx <= lx + lw))
        assert np.array_equal(img[outside], rgb[outside].astype(int))      # untouched elsewhere
    assert checked > 100, "nothing of the entity's boxes and masks was visible to check"


def test_no_tags_no_boxes_is_no_entities(session, picture):
    from scops.runtime.grounding_pipeline import PictureGrounding

    empty = PictureGrounding((10, 10), [], [], [])
    entities, facts = session.grounder.entities(empty, "A dog on the grass.")
    assert entities == [] and facts["matcher"] == "none" and facts["labels"] == [] and facts["tags"] == []
    _, g = picture
    assert session.grounder.entities(g, "")[0] == []


def test_detections_are_capped_and_counted(session, photos, monkeypatch):
    from scops.runtime import grounding_pipeline as gp

    monkeypatch.setattr(gp, "MAX_DETECTIONS", 2)
    g = session.grounder.ground(photos["astronaut"])
    assert len(g.detections) == 2 == len(g.masks) and g.dropped > 0
    assert g.detections[0].score >= g.detections[1].score


def test_no_tags_or_no_boxes_answer_with_no_entities(session, photos, monkeypatch):
    """End to end through a chat: a picture in which RAM passes no tag, then one in which
    GroundingDINO keeps no box: the answer streams and its grounding is empty, not an error."""
    tagger, detector, _ = session.grounder.stages()
    monkeypatch.setattr(tagger, "thresholds", np.full_like(tagger.thresholds, 2.0))    # a sigmoid never passes
    pictures = [photos["coffee"][::3, ::3].copy(), photos["coffee"][1::3, ::3].copy()]   # not cached yet
    replies = []
    for pic in pictures:
        if replies:                                                                     # tags again, no box
            monkeypatch.setattr(tagger, "thresholds", np.zeros_like(tagger.thresholds))
            monkeypatch.setattr(detector, "spec", dict(detector.spec, box_threshold=1.0))
        reply = session.chat().send("What is in the picture?", images=[pic], max_tokens=3, temperature=0)
        assert "".join(reply) == reply.text and reply.finish_reason in ("stop", "length")
        assert reply.grounding == [] and "error" not in reply.grounding_facts
        replies.append(reply.grounding_facts)
    (no_tags, no_boxes) = replies
    assert no_tags["tags"] == [] and no_tags["labels"] == [] and no_tags["matcher"] == "none"
    assert no_boxes["tags"] and no_boxes["labels"] == [] and no_boxes["matcher"] == "none"


def test_pictures_are_grounded_once(session, photos, monkeypatch):
    """Tags, boxes and masks are computed once per picture (by content): the same pixels sent
    again, in another turn or another chat, reuse them; follow-up turns point into them."""
    calls = []
    real = session.grounder.ground
    monkeypatch.setattr(session.grounder, "ground", lambda rgb: calls.append(rgb.shape) or real(rgb))
    pic = photos["astronaut"][1::2, 1::2].copy()                    # not cached yet
    chat = session.chat()
    replies = [chat.send("What is it?", images=[pic], max_tokens=2, temperature=0).result(),
               chat.send("And this?", images=[pic.copy()], max_tokens=2, temperature=0).result(),
               chat.send("More?", max_tokens=2, temperature=0).result(),
               session.chat().send("Here?", images=[pic], max_tokens=2, temperature=0).result()]
    labels = [r.grounding_facts["labels"] for r in replies]
    assert len(calls) == 1 and labels[0] and all(lab == labels[0] for lab in labels)
    session.chat().send("Mirrored?", images=[pic[:, ::-1].copy()], max_tokens=2, temperature=0).result().grounding
    assert len(calls) == 2


def test_pictures_waiting_for_the_worker_are_bounded(session, monkeypatch):
    """Over PICTURES_CACHED pictures queued behind a busy worker: the oldest waiting one is
    cancelled and its pixels are let go at once (a 50 MP picture is 150 MB); a chat that
    pointed at it gets no entities and says why."""
    import threading
    import weakref

    from scops.runtime import grounding_pipeline as gp

    gate, started = threading.Event(), threading.Event()

    def blocked(rgb):
        started.set()
        gate.wait(timeout=600)
        return gp.PictureGrounding(rgb.shape[:2], [], [], [])
    monkeypatch.setattr(gp, "PICTURES_CACHED", 2)
    monkeypatch.setattr(session.grounder, "ground", blocked)
    pictures = [np.full((64, 48, 3), i, np.uint8) for i in range(5)]
    alive = [weakref.ref(p) for p in pictures]
    futures = {0: session.grounder.submit("test-queue-0", pictures[0])}
    try:
        assert started.wait(timeout=600)                         # the worker is busy with picture 0
        reply = session.chat().send("What is it?", images=[pictures[1]], max_tokens=2, temperature=0).result()
        futures[1] = reply.picture                               # queued behind 0
        futures.update({i: session.grounder.submit(f"test-queue-{i}", pictures[i]) for i in (2, 3, 4)})
        del pictures
        # two kept: picture 3 pushed the chat's picture out, picture 4 pushed 2 out
        assert futures[1].cancelled() and futures[2].cancelled() and alive[2]() is None
        assert not any(futures[i].cancelled() for i in (0, 3, 4)) and alive[3]() is not None
        assert session.grounder.future("test-queue-2") is None
        assert reply.grounding == [] and "skipped" in reply.grounding_facts["error"]
    finally:
        gate.set()
    assert [futures[i].result(timeout=60).size for i in (0, 3, 4)] == [(64, 48)] * 3


def test_huge_picture_memory_does_not_grow_with_detections(session, photos, monkeypatch):
    """A 12 MP picture: one mask is made at a time (upsampled in stripes, RLE-encoded, let go),
    so the peak of numpy's allocations (tracemalloc) stays under ~12 bytes a pixel and does
    not grow with the number of detections."""
    import tracemalloc

    from PIL import Image

    from scops.runtime import grounding_pipeline as gp

    big = np.asarray(Image.fromarray(photos["astronaut"]).resize((4000, 3000), Image.BILINEAR))
    pixels = big.shape[0] * big.shape[1]
    session.grounder.stages()                                   # graphs loaded before measuring
    peaks = {}
    for cap in (1, 6):
        monkeypatch.setattr(gp, "MAX_DETECTIONS", cap)
        tracemalloc.start()
        try:
            g = session.grounder.ground(big)
            peaks[cap] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(g.masks) == len(g.detections) == cap and g.masks[0]["size"] == [3000, 4000]
    assert peaks[6] < 12 * pixels and peaks[6] < peaks[1] + 2 * pixels, peaks


def test_chat_reply_carries_grounding_and_keeps_its_kv(session, grounding_bundle, photos):
    """The matcher's LLM run (its own llama.cpp context) leaves the chat's cache as it was:
    the follow-up turn decodes the same tokens as a session that never grounded."""
    from scops.runtime.session import Session

    chat = session.chat()
    reply = chat.send("What is in the picture?", images=[photos["cat"]], max_tokens=4, temperature=0).result()
    assert isinstance(reply.grounding, list)
    facts = reply.grounding_facts
    assert facts["tags"] and facts["matcher"] in ("llm", "fallback") and facts["labels"]
    again = chat.send("And now?", max_tokens=6, temperature=0).result()      # same picture, no new upload
    assert again.grounding_facts["labels"] == facts["labels"]
    assert again.timings["reused_cells"] > 0
    with Session.open(grounding_bundle, kv_type="f32", flash_attn="off", n_ctx=1024, warmup=False,
                      grounding=False) as plain:
        assert plain.grounder is None
        c = plain.chat()
        first = c.send("What is in the picture?", images=[photos["cat"]], max_tokens=4, temperature=0).result()
        second = c.send("And now?", max_tokens=6, temperature=0).result()
        assert first.grounding == [] and (first.token_ids, second.token_ids) == (reply.token_ids, again.token_ids)


def test_grounding_never_holds_up_the_answer(session, photos, monkeypatch):
    """With the grounding worker blocked, the answer still streams to the end; its entities
    come once the worker finishes."""
    import threading

    gate = threading.Event()
    real = session.grounder.ground

    def slow(rgb):
        gate.wait(timeout=600)
        return real(rgb)
    monkeypatch.setattr(session.grounder, "ground", slow)
    picture = photos["astronaut"][::2, ::2].copy()                 # not cached yet
    reply = session.chat().send("Describe it.", images=[picture], max_tokens=5, temperature=0)
    text = "".join(reply)
    assert reply.finish_reason in ("stop", "length") and text == reply.text
    assert not reply.picture.done()                               # grounding still waiting
    gate.set()
    assert isinstance(reply.grounding, list) and reply.picture.done()


def test_cli_json_and_draw(grounding_bundle, photos, tmp_path):
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.fromarray(photos["cat"]).save(img)
    out = tmp_path / "drawn.png"
    r = subprocess.run([sys.executable, "-m", "scops.runtime.cli", "run", str(grounding_bundle), "--image", str(img),
                        "--prompt", "What is this?", "--json", "--max-tokens", "4", "--temperature", "0",
                        "--draw", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data["grounding"], list) and data["grounding_facts"]["tags"]
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == photos["cat"].shape


def test_missing_grounding_files_are_named(grounding_ckpt, tmp_path):
    import shutil

    from scops.export.grounding import find_sources

    partial = tmp_path / "ckpt"
    shutil.copytree(grounding_ckpt, partial)
    (partial / "groundingdino_swint_ogc.pth").unlink()
    (partial / "sam_vit_h_4b8939.pth").unlink()
    with pytest.raises(FileNotFoundError) as e:
        find_sources(partial)
    assert "groundingdino_swint_ogc.pth" in str(e.value) and "SAM" in str(e.value)
    assert find_sources(grounding_ckpt).sam.name == "sam_vit_h_4b8939.pth"


def test_manifest_without_a_grounding_file_is_refused(grounding_bundle, tmp_path):
    import shutil

    from scops.runtime.bundle import open_bundle
    from scops.runtime.errors import BundleError

    b = tmp_path / "b"
    shutil.copytree(grounding_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["grounding"]["stages"][2]["op"] = "segment-anything"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="grounding"):
        open_bundle(b, verify=False)


def test_regions_point_at_the_chats_latest_picture(session, photos, monkeypatch):
    """A clip in the first turn, the picture in the next: the entities' regions index the
    picture in Conversation.media() (1), not the chat's first input."""
    import io
    import wave

    from grounding_helpers import plant_bubo

    plant_bubo(monkeypatch)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * 16000))
    chat = session.chat()
    chat.add("user", "What is this sound?", audios=[buf.getvalue()])
    chat.add("assistant", "A hum.")
    reply = chat.send("And in this picture?", images=[photos["cat"]], max_tokens=8, temperature=0,
                      ignore_stop=True).result()
    assert [m["modality"] for m in chat.media()] == ["audio", "image"]
    assert reply.grounding and all(r.media == 1 for e in reply.grounding for r in e.regions)
