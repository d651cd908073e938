"""The chat page of `scops serve` in headless Chromium: attach a picture, send, watch the
answer stream in with its timings, go on with the chat (KV reuse), start a new one; a
grounding family's answer has its phrases highlighted in their colours and a click on one
draws its box (and mask) over the picture, or its time span on the clip, checked by pixels."""
from __future__ import annotations

import base64
import io
import os
import re
import wave

import numpy as np
import pytest

from conftest import write_png
from grounding_helpers import BOX, SPAN, check_drawn, plant_lego

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000
SCREENSHOT = "/tmp/scops_web.png"
SCREENSHOT_IMAGE = "/tmp/scops_web_image.png"
GROUNDING_SHOT = "/tmp/scops_web_grounding_{}.png"
GROUNDING_WAIT_MS = 240_000

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
from playwright import sync_api  # noqa: E402  (a test dependency)


@pytest.fixture(scope="module")
def server(bundle):
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session
    session = Session.open(bundle("Q4_K_M"))
    srv = Server(session, ServerOptions(port=0, max_tokens_cap=48)).start()
    yield srv
    srv.close()
    session.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 900, "height": 700})
        yield pg
        browser.close()


COUNT_TEXT_UPDATES = """() => {
  window.textUpdates = 0;
  new MutationObserver((records) => {
    window.textUpdates += records.filter((r) => r.type === "characterData").length;
  }).observe(document.getElementById("log"), { subtree: true, characterData: true });
}"""


def write_wav(path, seconds: float, rate: int = 16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(2 * int(rate * seconds)))
    return path


def send(page, text, timeout=WAIT_MS):
    before = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").nth(before)
    answer.locator(".timings").wait_for(timeout=timeout)
    return answer


def test_chat_page_streams_an_answer_about_a_picture(server, page, photos, tmp_path):
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.locator("#model", has_text="image").wait_for(timeout=WAIT_MS)     # /health answered
    page.evaluate(COUNT_TEXT_UPDATES)
    page.set_input_files("#file", str(write_png(tmp_path / "cat.png", photos["cat"])))
    page.locator("#pending img").wait_for(timeout=WAIT_MS)
    answer = send(page, "What is in this picture?")
    assert page.locator(".msg.user img").count() == 1
    assert page.locator("#pending img").count() == 0          # the attachment went with the message
    timings = answer.locator(".timings").inner_text()
    assert re.search(r"prefill [\d.]+ ms", timings) and "first token" in timings and "tok/s" in timings, timings
    assert "error" not in (answer.get_attribute("class") or "")
    text = answer.inner_text().replace(timings, "").strip()
    assert text, "no answer text"
    assert page.evaluate("window.textUpdates") >= 2, "the answer did not arrive in pieces"
    page.screenshot(path=SCREENSHOT, full_page=True)

    # the second turn re-sends the whole chat: the server reuses the first turn's KV
    second = send(page, "Tell me more.")
    reused = int(re.search(r"KV reused (\d+)", second.locator(".timings").inner_text()).group(1))
    assert reused > 32                                         # at least the picture's rows
    page.screenshot(path=SCREENSHOT, full_page=True)

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    third = send(page, "Hello again")
    assert "error" not in (third.get_attribute("class") or "")
    assert errors == []


def test_chat_page_shows_a_server_error(server, page):
    page.goto(server.url + "/")
    page.evaluate("""() => { const f = window.fetch; window.fetch = (url, opts) => {
        if (opts && opts.body) {
          const b = JSON.parse(opts.body); b.max_tokens = 10 ** 6; opts.body = JSON.stringify(b);
        }
        return f(url, opts); }; }""")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    bubble = page.locator(".msg.assistant.error")
    bubble.wait_for(timeout=WAIT_MS)
    assert "cap" in bubble.inner_text()


def test_chat_page_sends_an_audio_clip(page, tmp_path_factory):
    """With a bundle that hears (a tiny BuboGPT), the page takes a WAV clip as well."""
    import wave
    from scops.export import fixtures_bubogpt as fixtures
    from scops.export.bubogpt import export_bubogpt
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session
    root = tmp_path_factory.mktemp("bubo")
    bundle = export_bubogpt(str(fixtures.build_bubogpt_tiny(root / "ckpt")), root / "bundle", "Q4_K_M",
                            log=lambda s: None)
    wav = write_wav(root / "tone.wav", 1.0)
    with Session.open(bundle) as session:
        server = Server(session, ServerOptions(port=0, max_tokens_cap=16)).start()
        try:
            page.goto(server.url + "/")
            page.locator("#model", has_text="audio").wait_for(timeout=WAIT_MS)
            page.set_input_files("#file", str(wav))
            page.locator("#pending .chip", has_text="audio clip").wait_for(timeout=WAIT_MS)
            answer = send(page, "What sound is this?")
            assert page.locator(".msg.user audio").count() == 1
            assert "error" not in (answer.get_attribute("class") or ""), answer.inner_text()
            assert "encode" in answer.locator(".timings").inner_text()
        finally:
            server.close()


READ_PIXELS = """(img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  return { w: c.width, h: c.height, rgba: Array.from(g.getImageData(0, 0, c.width, c.height).data) };
}"""


def test_image_mode_draws_the_picture(page, emu_bundles, server):
    """With a bundle that draws (emu-tiny's pretrained Emu), the page's image mode posts the
    prompt to /v1/images/generations and shows the picture: the pixels the browser decoded
    are the session's own picture for that seed. A chat-only bundle offers no image mode."""
    import numpy as np
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session

    page.goto(server.url + "/")                                   # the chat-only tiny MiniGPT-4
    page.locator("#model", has_text="image").wait_for(timeout=WAIT_MS)
    assert page.locator("#modes").is_hidden()
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    with Session.open(emu_bundles("gen"), n_ctx=512) as session:
        srv = Server(session, ServerOptions(port=0)).start()
        try:
            page.goto(srv.url + "/")
            page.locator("#modes").wait_for(state="visible", timeout=WAIT_MS)
            assert page.locator("#image-opts").is_hidden()
            page.click("#mode-image")
            assert page.locator("#image-opts").is_visible()
            page.fill("#steps", "3")
            page.fill("#seed", "7")
            page.fill("#input", "a red boat on the river")
            page.press("#input", "Enter")
            answer = page.locator(".msg.assistant").last
            picture = answer.locator("img.generated")
            picture.wait_for(timeout=WAIT_MS)
            shown = picture.evaluate(READ_PIXELS)
            want = session.generate_image("a red boat on the river", steps=3, seed=7).pixels
            got = np.asarray(shown["rgba"], np.uint8).reshape(shown["h"], shown["w"], 4)
            assert got.shape[:2] == want.shape[:2] and (got[..., 3] == 255).all()
            # the same picture (the prompt's KV prefix is reused the second time: a level at most)
            assert np.abs(got[..., :3].astype(int) - want).max() <= 1 and want.std() > 1
            page.screenshot(path=SCREENSHOT_IMAGE, full_page=True)
            timings = answer.locator(".timings").inner_text()
            assert "seed 7" in timings and "3 steps" in timings and "s/step" in timings, timings
            assert "error" not in (answer.get_attribute("class") or "")
            assert page.locator(".msg.user", has_text="a red boat").count() == 1

            page.fill("#steps", "100000")                          # over the server's cap: its message
            page.fill("#input", "another boat")
            page.press("#input", "Enter")
            bad = page.locator(".msg.assistant.error")
            bad.wait_for(timeout=WAIT_MS)
            assert "cap" in bad.inner_text()
            page.click("#mode-chat")
            assert page.locator("#image-opts").is_hidden()
            assert errors == []
        finally:
            srv.close()


# ---- grounding ----------------------------------------------------------------------------
# Random weights point at nothing: the family's last step is planted on the real answer
# (grounding_helpers.py); the server, the JSON and everything the page does are real.
LONGER_ANSWERS = """() => { const f = window.fetch; window.fetch = (url, opts) => {
    if (opts && opts.body) {
      const b = JSON.parse(opts.body); b.ignore_eos = true; b.max_tokens = 12; opts.body = JSON.stringify(b);
    }
    return f(url, opts); }; }"""
# the picture the page sent, decoded by the page's own browser: PNG as a data URL
SENT_PICTURE = """async (url) => { const img = new Image(); img.src = url; await img.decode();
    const c = document.createElement("canvas"); c.width = img.naturalWidth; c.height = img.naturalHeight;
    c.getContext("2d").drawImage(img, 0, 0); return c.toDataURL("image/png"); }"""


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sent_picture(page, answer_index: int = -1) -> np.ndarray:
    url = page.locator(".msg.user img").nth(answer_index).get_attribute("src")
    return png_array(base64.b64decode(page.evaluate(SENT_PICTURE, url).split(",", 1)[1]))


def rgb_css(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)))


def check_marks(answer, entities: list) -> None:
    """Each entity's phrase is one mark in the answer, in its colours."""
    marks = answer.locator("mark.ground")
    assert marks.count() == len(entities)
    for i, e in enumerate(entities):
        m = answer.locator(f'mark.ground[data-entity="{i}"]')
        assert m.text_content() == e["phrase"]
        style = m.evaluate("m => { const s = getComputedStyle(m); return [s.backgroundColor, s.borderBottomColor]; }")
        assert style == [rgb_css(e["rgb_light"]), rgb_css(e["rgb"])], style


def drawn_region(page, answer, index: int, entity: dict, name: str) -> dict:
    """Click the index-th phrase, screenshot its drawing, check it by pixels; -> pixels checked."""
    from scops.runtime.draw import font_px
    answer.locator(f'mark.ground[data-entity="{index}"]').click()
    canvas = answer.locator(".ground-view[data-ready] canvas")
    canvas.wait_for(timeout=WAIT_MS)
    picture = sent_picture(page)
    h, w = picture.shape[:2]
    size = canvas.evaluate("c => [c.width, c.height, c.getBoundingClientRect().width, c.getBoundingClientRect().height]")
    assert size == [w, h, w, h], f"the drawing is not shown at the picture's own size: {size}"
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()                   # layout may put it at a fractional y: the paint snaps
    shot = png_array(page.screenshot(clip={"x": round(box["x"]), "y": round(box["y"]), "width": w, "height": h}))
    page.screenshot(path=GROUNDING_SHOT.format(name), full_page=True)
    return check_drawn(shot, picture, entity, font_px(w, h))


@pytest.fixture(scope="module")
def lego_server(lego_bundle):
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session
    session = Session.open(lego_bundle, n_ctx=2048)
    srv = Server(session, ServerOptions(port=0, max_tokens_cap=16)).start()
    yield srv
    srv.close()
    session.close()


def test_lego_phrases_are_highlighted_and_point_at_box_and_span(lego_server, page, photos, tmp_path, monkeypatch):
    plant_lego(monkeypatch)
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(lego_server.url + "/")
    page.locator("#model", has_text="audio").wait_for(timeout=WAIT_MS)
    page.evaluate(LONGER_ANSWERS)
    page.set_input_files("#file", str(write_png(tmp_path / "cat.png", photos["cat"])))
    page.locator("#pending img").wait_for(timeout=WAIT_MS)
    page.set_input_files("#file", str(write_wav(tmp_path / "tone.wav", 2.0)))
    page.locator("#pending .chip", has_text="audio clip").wait_for(timeout=WAIT_MS)
    answer = send(page, "Where is the cat? When does it purr?")
    assert "error" not in (answer.get_attribute("class") or ""), answer.inner_text()
    g = answer.evaluate("b => b.grounding")
    entities = g["entities"]
    # LEGO's prompt puts the clip before the picture; the page sent the picture first
    assert [m["modality"] for m in g["media"]] == ["audio", "image"]
    assert [r["media"] for e in entities for r in e["regions"]] == [1, 0]
    check_marks(answer, entities)
    assert "2 grounded phrases" in answer.locator(".timings").inner_text()

    picture = sent_picture(page)
    h, w = picture.shape[:2]
    assert entities[0]["regions"][0]["box"] == pytest.approx([BOX[0] * w, BOX[1] * h, BOX[2] * w, BOX[3] * h], abs=0.01)
    checked = drawn_region(page, answer, 0, entities[0], "lego")
    assert checked["outline"] > 300 and checked["label"] == 1 and checked["plain"] > 0.5 * w * h
    assert checked["mask"] == 0

    answer.locator('mark.ground[data-entity="1"]').click()              # the time span, on a bar of the clip
    assert answer.locator(".ground-view canvas").count() == 0
    span = answer.locator(".ground-view .span")
    span.wait_for(timeout=WAIT_MS)
    assert f"{SPAN[0]:.2f} s – {SPAN[1]:.2f} s of 2.0 s" in span.inner_text()
    track, bar = span.locator(".track").bounding_box(), span.locator(".track div").bounding_box()
    assert bar["x"] - track["x"] == pytest.approx(SPAN[0] / 2.0 * track["width"], abs=1.0)
    assert bar["width"] == pytest.approx((SPAN[1] - SPAN[0]) / 2.0 * track["width"], abs=1.0)
    shot = png_array(page.screenshot(clip=track)).astype(int)
    x_in, x_out = int(bar["x"] - track["x"] + bar["width"] / 2), int(bar["x"] - track["x"] + bar["width"] + 8)
    dark = [int(entities[1]["rgb"][i:i + 2], 16) for i in (1, 3, 5)]
    mid = shot.shape[0] // 2
    assert np.abs(shot[mid, x_in] - dark).max() <= 3                   # the span in the entity's colour
    assert np.abs(shot[mid, x_out] - dark).max() > 40                   # and not past its end
    answer.locator('mark.ground[data-entity="1"]').click()              # a second click hides it
    assert answer.locator(".ground-view").count() == 0
    # spans count code points (Python's str), not UTF-16 units: an emoji before a phrase
    text = "A \U0001F600 cat and a 🐶 dog"
    spans = [(text.index("cat"), text.index("cat") + 3), (text.index("dog"), text.index("dog") + 3)]
    marked = page.evaluate("""([text, spans]) => { const d = document.createElement("div");
        d.append(highlight(text, spans.map((s) => ({ span: s, rgb: "#dc2626" })), () => {}));
        return [...d.querySelectorAll("mark")].map((m) => m.textContent); }""", [text, spans])
    assert marked == ["cat", "dog"]
    assert errors == []


@pytest.fixture(scope="module")
def bubo_server(grounding_bundle):
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session
    session = Session.open(grounding_bundle, n_ctx=1024, warmup=False)
    srv = Server(session, ServerOptions(port=0, max_tokens_cap=16)).start()
    yield srv
    srv.close()
    session.close()


def test_bubogpt_phrase_shows_its_boxes_and_masks(bubo_server, page, photos, tmp_path, monkeypatch):
    """The tagger, detector and SAM run on the picture the page sent; the answer's phrase,
    linked to the detector's first label, is drawn with that label's boxes and masks."""
    from grounding_helpers import plant_bubo
    plant_bubo(monkeypatch)
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(bubo_server.url + "/")
    page.locator("#model", has_text="image").wait_for(timeout=WAIT_MS)
    page.evaluate(LONGER_ANSWERS)
    page.set_input_files("#file", str(write_png(tmp_path / "cat.png", photos["cat"])))
    page.locator("#pending img").wait_for(timeout=WAIT_MS)
    # the finish chunk waits for the tagger, detector and SAM (slow on a loaded 2-core machine)
    answer = send(page, "What is in the picture?", timeout=GROUNDING_WAIT_MS)
    assert "error" not in (answer.get_attribute("class") or ""), answer.inner_text()
    g = answer.evaluate("b => b.grounding")
    (entity,) = g["entities"]
    picture = sent_picture(page)
    h, w = picture.shape[:2]
    assert entity["tag"] and entity["regions"] and g["media"] == [{"modality": "image", "width": w, "height": h}]
    assert all(r["media"] == 0 and r["box"] and r["mask"]["size"] == [h, w] for r in entity["regions"])
    check_marks(answer, [entity])
    checked = drawn_region(page, answer, 0, entity, "bubogpt")
    # random weights: the detector's boxes are a few pixels wide (the label hides them), SAM's
    # masks large; the least-covering label is planted
    assert checked["mask"] > 1000 and checked["plain"] > 0.1 * w * h and checked["outline"] + checked["label"] > 0
    assert np.array_equal(picture, photos["cat"])               # a small PNG goes as it is
    assert errors == []
