"""The chat page of `scops serve` in headless Chromium: attach a picture, send, watch the
answer stream in with its timings, go on with the chat (KV reuse), start a new one."""
from __future__ import annotations

import os
import re

import pytest

from conftest import write_png

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000
SCREENSHOT = "/tmp/scops_web.png"
SCREENSHOT_IMAGE = "/tmp/scops_web_image.png"

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


def send(page, text):
    before = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").nth(before)
    answer.locator(".timings").wait_for(timeout=WAIT_MS)
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
    wav = root / "tone.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * 16000))
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
