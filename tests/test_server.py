"""`scops serve`: the OpenAI client against an in-process server on the tiny bundle:
answers (plain and streamed, with a picture), KV reuse across requests and across
interleaved chats, every limit and malformed request as a 4xx (and the server still
serving), a bounded queue under 20 clients, a client that leaves mid-stream, API keys,
remote media only when allowed, and loopback by default."""
from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

import openai

QUESTION = "What is in this picture?"
WAIT_S = 60          # no single step of these tests may take longer (a hang fails, never blocks)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def data_url(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode()


def user_with_image(rgb, text=QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(rgb)}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def session(bundle):
    from scops.runtime.session import Session
    s = Session.open(bundle("Q4_K_M"))
    yield s
    s.close()


@contextlib.contextmanager
def running(session, **options):
    from scops.runtime.server import Server, ServerOptions
    server = Server(session, ServerOptions(port=0, **options)).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(session):
    # small limits so that tests can cross them cheaply
    with running(session, max_body_mb=1, max_image_pixels=300_000, max_tokens_cap=64) as s:
        yield s


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=WAIT_S, **kw)


def post(server, body, headers=None, method="POST", path="/v1/chat/completions"):
    """Raw HTTP: (status, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


def test_answer_and_stream_with_an_image(server, photos):
    c = client(server)
    messages = [user_with_image(photos["cat"])]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 32                    # 32 image rows + the text
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.scops["timings"]
    assert {"prefill_ms", "ttft_ms", "queue_ms", "arrival_ttft_ms"} <= set(t)
    # from the request's arrival: reading and parsing it came before the conversation's send
    assert t["arrival_ttft_ms"] >= t["ttft_ms"]
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content          # greedy: the same answer either way
    last = [ch for ch in chunks if ch.choices][-1]
    assert last.choices[0].finish_reason == r.choices[0].finish_reason
    assert last.scops["reused_cells"] >= r.usage.prompt_tokens - 1    # the same prompt: all from the KV
    assert last.scops["timings"]["arrival_ttft_ms"] > 0
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_extending_a_chat_reuses_its_kv(server, photos):
    c = client(server)
    first = [{"role": "system", "content": "You look at pictures."}, user_with_image(photos["coffee"])]
    r1 = c.chat.completions.create(model="tiny", messages=first, max_tokens=6, temperature=0)
    saved = server.session.scheduler.snapshots.saved
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And what colour is it?"}]
    r2 = c.chat.completions.create(model="tiny", messages=second, max_tokens=6, temperature=0)
    # everything of the first prompt (system, picture, question) came from the KV
    assert r2.scops["reused_cells"] >= r1.usage.prompt_tokens - 2
    assert r2.scops["decoded_cells"] < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 12
    assert server.session.scheduler.snapshots.saved == saved              # a chat going on costs no snapshot


def test_turn_two_does_not_decode_the_picture_sent_again(server, photos, monkeypatch):
    """A client sends the picture again with every turn: the server keeps its encoder input by
    the bytes sent, so turn 2 decodes no picture; another picture (one pixel off) is decoded."""
    import scops.runtime.openai_api as api
    decoded = []
    real = api.decode_image
    monkeypatch.setattr(api, "decode_image", lambda data, **kw: decoded.append(len(data)) or real(data, **kw))
    c = client(server)
    before = post(server, b"", method="GET", path="/health")[1]["media_cache"]
    rgb = photos["cat"].copy()
    rgb[1, 2] = (rgb[1, 2].astype(int) + 7) % 256          # new to this server
    first = [user_with_image(rgb, "Turn one?")]
    r1 = c.chat.completions.create(model="tiny", messages=first, max_tokens=4, temperature=0)
    assert len(decoded) == 1
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "Turn two?"}]
    r2 = c.chat.completions.create(model="tiny", messages=second, max_tokens=4, temperature=0)
    assert len(decoded) == 1                                # not decoded again
    assert r2.scops["reused_cells"] >= r1.usage.prompt_tokens - 2
    after = post(server, b"", method="GET", path="/health")[1]["media_cache"]
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)
    rgb[1, 3] = (rgb[1, 3].astype(int) + 7) % 256
    c.chat.completions.create(model="tiny", messages=[user_with_image(rgb, "Turn one?")], max_tokens=2)
    assert len(decoded) == 2


def test_interleaved_chats_restore_their_snapshot(server, photos):
    c = client(server)
    a = [user_with_image(photos["cat"], "Chat A: what is this?")]
    ra = c.chat.completions.create(model="tiny", messages=a, max_tokens=4, temperature=0)
    c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Other chat."},
                                                      user_with_image(photos["coffee"])], max_tokens=4)
    a += [{"role": "assistant", "content": ra.choices[0].message.content}, {"role": "user", "content": "More?"}]
    r = c.chat.completions.create(model="tiny", messages=a, max_tokens=4, temperature=0)
    assert r.scops["snapshot_restored"]
    assert r.scops["reused_cells"] >= ra.usage.prompt_tokens - 2


def _big_png_url() -> str:
    return data_url(np.zeros((600, 600, 3), np.uint8))          # 360k pixels > the 300k limit


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, None),
    "not an object": ([1, 2], 400, None),
    "no messages": ({"model": "m"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "bad role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "ends with assistant": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    "content not text": ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, None),
    "temperature": ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    "top_p": ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    "max_tokens zero": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens cap": ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}, 400,
                       "max_completion_tokens"),
    "stop": ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "n": ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    "seed": ({"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400, "seed"),
    "audio": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]}, 400, None),
    "video": ({"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, 400, None),
    "local path": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, None),
    "file URL": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, None),
    "remote off": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, 400, None),
    "not an image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, None),
    "bad base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, None),
    "too many pixels": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _big_png_url()}}]}]}, 400, None),
    "body too large": (b'{"messages": "' + b"x" * (1 << 20) + b'"}', 413, None),
    "prompt too long": ({"messages": [{"role": "user", "content": "hello " * 3000}]}, 400, "messages"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_its_4xx_and_the_server_goes_on(server, name):
    body, status, param = BAD_REQUESTS[name]
    got, err = post(server, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert "Traceback" not in err["error"]["message"]
    if param:
        assert err["error"]["param"] == param
    if name in ("audio", "video"):
        assert "unsupported modality" in err["error"]["message"]
    ok, body = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "some_future_field": {"x": 1}})        # unknown fields are ignored
    assert ok == 200 and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("DELETE", "/v1/chat/completions", 405),
                                                ("GET", "/v1/chat/completions", 405), ("POST", "/health", 405)])
def test_wrong_method_or_path(server, method, path, status):
    got, err = post(server, b"", method=method, path=path)
    assert got == status and err["error"]["code"] in ("not_found", "method_not_allowed")


def test_wrong_content_type_and_host(server):
    assert post(server, b"hi", headers={"Content-Type": "text/plain"})[0] == 415
    assert post(server, b"", method="GET", path="/health", headers={"Host": "evil.example:80"})[0] == 403
    status, models = post(server, b"", method="GET", path="/v1/models")
    assert status == 200 and models["data"][0]["id"] == server.model_id


def test_twenty_clients_get_answers_or_429(session):
    """queue=4 and one slot: 5 requests are admitted, the other 15 are refused at once (429),
    even while nothing generates (the scheduler is held), and the 5 are answered after."""
    with running(session, queue=4) as server:
        engine = server.engine
        results: list = []

        def ask(i):
            try:
                r = client(server).chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=3)
                results.append(200 if r.choices[0].message.role == "assistant" else "bad")
            except openai.RateLimitError as e:
                results.append(429 if e.body["code"] == "queue_full" else "bad")
            except Exception as e:       # anything else is a failure of this test
                results.append(repr(e))
        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(20)]
        with session.scheduler.lock:     # nothing generates until every client is admitted or refused
            for t in threads:
                t.start()
            deadline = time.monotonic() + WAIT_S
            while results.count(429) + engine.admitted < 20:
                assert time.monotonic() < deadline, f"clients neither admitted nor refused: {results}"
                time.sleep(0.02)
            assert engine.admitted == 5 and results.count(429) == 15
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert results.count(200) == 5 and results.count(429) == 15, results
        assert post(server, {"messages": [{"role": "user", "content": "after"}], "max_tokens": 2})[0] == 200


def test_client_leaving_mid_stream_cancels_and_the_next_is_served(session):
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
                       "max_tokens": 1500, "ignore_eos": True}).encode()
    with running(session, max_tokens_cap=1500) as server:
        counts = server.engine.counts
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while seen.count(b"data: ") < 2:           # the role chunk and a first piece of text
            seen += sock.recv(4096)
        assert seen.startswith(b"HTTP/1.1 200")
        sock.close()
        deadline = time.monotonic() + WAIT_S
        while counts["cancelled"] == 0:
            assert counts["served"] == 0, "the generation ran to its end: the client's leaving went unnoticed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, reply = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1


def _serve_png(payload: bytes):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_api_key_and_remote_media(session, photos):
    images = _serve_png(png_bytes(photos["coffee"]))
    try:
        with running(session, api_key="s3cret", allow_remote_media=True) as server:
            msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": f"http://127.0.0.1:{images.server_address[1]}/coffee.png"}}, {"type": "text", "text": "?"}]}]
            with pytest.raises(openai.AuthenticationError):
                client(server, api_key="wrong").chat.completions.create(model="m", messages=msg, max_tokens=2)
            assert post(server, {"messages": msg})[0] == 401
            assert post(server, b"", method="GET", path="/v1/models")[0] == 401
            assert post(server, b"", method="GET", path="/health")[0] == 200      # no secrets there
            r = client(server, api_key="s3cret").chat.completions.create(model="m", messages=msg, max_tokens=2)
            assert r.usage.prompt_tokens > 32                                      # the picture arrived
            gone = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/"}}]}]
            status, err = post(server, {"messages": gone}, headers={"Authorization": "Bearer s3cret"})
            assert status == 400 and "could not fetch the remote image from 127.0.0.1" in err["error"]["message"]
    finally:
        images.shutdown()
        images.server_close()


def test_remote_fetch_errors_name_what_was_fetched():
    from scops.runtime.engine import fetch_remote
    from scops.runtime.openai_api import ApiError
    with pytest.raises(ApiError, match="could not fetch the remote video from 127.0.0.1") as e:
        fetch_remote("http://127.0.0.1:9/clip.mp4", what="remote video")
    assert e.value.status == 400


def test_binds_loopback_by_default(server):
    from scops.runtime.cli import build_parser
    from scops.runtime.server import ServerOptions
    args = build_parser().parse_args(["serve", "some-bundle"])
    assert args.host == "127.0.0.1" and args.fn.__name__ == "run_serve"
    assert ServerOptions().host == "127.0.0.1"
    assert server.sock.getsockname()[0] == "127.0.0.1"
    page = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    page.request("GET", "/")
    r = page.getresponse()
    assert r.status == 200 and b"New chat" in r.read() and "script-src" in r.getheader("Content-Security-Policy")


def test_serve_opens_the_session_as_run_and_chat_do(monkeypatch):
    """--device, --n-gpu-layers, --low-memory (and the serve-only --parallel, --history, --overflow) reach
    Session.open; a bad one is one clear error (exit 2) before anything listens."""
    from scops.runtime.cli import main
    from scops.runtime.errors import OptionError
    from scops.runtime.session import Session
    seen: dict = {}

    def fake_open(cls, path, **kw):
        seen.update(kw)
        raise OptionError("stopped before loading")
    monkeypatch.setattr(Session, "open", classmethod(fake_open))
    assert main(["serve", "some-bundle", "--device", "cpu", "--n-gpu-layers", "0", "--parallel", "3",
                 "--history", "text", "--overflow", "error", "--kv-type", "f32", "--low-memory"]) == 2
    assert seen["device"] == "cpu" and seen["n_gpu_layers"] == 0 and seen["parallel"] == 3
    assert seen["low_memory"] is True
    assert seen["history"] == "text" and seen["overflow"] == "error" and seen["kv_type"] == "f32"


def _wav(seconds: float, rate: int = 16000) -> bytes:
    import wave
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


def test_audio_parts_for_a_bundle_with_audio():
    """The tiny bundle has no audio: this checks the request side against an audio-capable one."""
    from scops.runtime.openai_api import ApiError, Limits, decode_media, parse_chat_request
    limits = Limits(max_tokens_cap=16, max_image_pixels=10_000, max_audio_seconds=2, allow_remote_media=False)

    def parse(wav: bytes):
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
        body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is this sound?"}]}]}
        req = parse_chat_request(json.dumps(body).encode(), limits, {"image": {}, "audio": {}})
        assert req.last.text == "what is this sound?" and [m.modality for m in req.media()] == ["audio"]
        return decode_media(req.media()[0], limits, fetch=None)
    clip = _wav(1.5)
    assert parse(clip) == clip
    for bad, code in ((_wav(2.5), "audio_too_long"), (b"RIFF....WAVEjunk", "invalid_media"),
                      (png_bytes(np.zeros((4, 4, 3), np.uint8)), "invalid_media")):
        with pytest.raises(ApiError) as e:
            parse(bad)
        assert e.value.status == 400 and e.value.code == code


@pytest.fixture(scope="module")
def audio_bundle(tmp_path_factory):
    """A tiny BuboGPT bundle (image + audio), when this checkout can build one."""
    from scops.export import fixtures_bubogpt as fixtures
    from scops.export.bubogpt import export_bubogpt
    ckpt = fixtures.build_bubogpt_tiny(tmp_path_factory.mktemp("bubo") / "ckpt")
    return export_bubogpt(str(ckpt), tmp_path_factory.mktemp("bubo") / "bundle", "Q4_K_M", log=lambda s: None)


def test_audio_end_to_end_with_an_audio_bundle(audio_bundle):
    from scops.runtime.session import Session
    with Session.open(audio_bundle) as s, running(s, max_audio_seconds=3) as server:
        def clip(seconds):
            return {"type": "input_audio", "input_audio": {"data": base64.b64encode(_wav(seconds)).decode(),
                                                           "format": "wav"}}
        text = [{"role": "user", "content": "What sound is this?"}]
        sound = [{"role": "user", "content": [clip(1.0), {"type": "text", "text": "What sound is this?"}]}]
        c = client(server)
        plain = c.chat.completions.create(model="bubo", messages=text, max_tokens=2, temperature=0)
        r = c.chat.completions.create(model="bubo", messages=sound, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 8          # the clip's rows are in
        assert r.scops["timings"]["encode_ms"] > 0
        status, err = post(server, {"messages": [{"role": "user", "content": [clip(4.0)]}]})
        assert status == 400 and err["error"]["code"] == "audio_too_long"
