"""`scops serve` under load and against slow or odd clients: admission before any media is
decoded, parallel slots streaming at once, clients that never finish their headers or
body or never read their stream (dropped without keeping a place), and a conversation
that outgrows the context."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

from test_server import client, data_url, openai, post, running, user_with_image

WAIT_S = 60
TIMEOUT_S = 2.0          # the servers here give clients 2 s


@pytest.fixture(scope="module")
def session(bundle):
    from scops.runtime.session import Session
    s = Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=2)
    yield s
    s.close()


def raw_request(body: bytes, length: int | None = None) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body) if length is None else length).encode() + b"\r\n\r\n" + body)


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_no_media_is_decoded_before_the_request_is_admitted(session, photos, monkeypatch):
    """With every place taken, a request with a (corrupt) picture gets 429, not the 400 that
    decoding it would give, and no decode runs."""
    import scops.runtime.engine as engine_module
    decoded: list = []
    real = engine_module.decode_media
    monkeypatch.setattr(engine_module, "decode_media", lambda spec, *a: decoded.append(spec.modality) or real(spec, *a))
    with running(session, queue=1) as server:            # 2 slots + 1 waiting = 3 places
        out: list = []
        ask = [threading.Thread(target=lambda: out.append(post(server, {
            "messages": [{"role": "user", "content": "hold on"}], "max_tokens": 2})[0])) for _ in range(3)]
        with session.scheduler.lock:                     # nothing generates: the places stay taken
            for t in ask:
                t.start()
            wait_until(lambda: server.engine.admitted == 3, "three requests admitted")
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]
            status, err = post(server, {"messages": bad})
            assert status == 429 and err["error"]["code"] == "queue_full"
            assert decoded == []
        for t in ask:
            t.join(WAIT_S)
        assert out == [200, 200, 200]
        status, err = post(server, {"messages": bad})     # admitted now: decoded, and refused for it
        assert status == 400 and err["error"]["code"] == "invalid_media" and decoded == ["image"]


def test_two_slots_stream_at_once(session, photos):
    with running(session, max_tokens_cap=200) as server:
        seen_both = threading.Event()

        def stream(i):
            chunks = client(server).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"story {i}"}], max_tokens=120,
                temperature=0, stream=True, extra_body={"ignore_eos": True})
            n = 0
            for ch in chunks:
                n += bool(ch.choices and ch.choices[0].delta.content)
                if server.session.scheduler.active() == 2:
                    seen_both.set()
            results.append(n)
        results: list = []
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert seen_both.is_set() and len(results) == 2 and min(results) > 10


def test_a_body_that_never_ends_times_out_without_a_place(session):
    with running(session, client_timeout_s=TIMEOUT_S) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
        sock.sendall(raw_request(b'{"messages": [', length=5000))       # and nothing more
        t0 = time.monotonic()
        reply = b""
        while b"request_timeout" not in reply and (block := sock.recv(4096)):
            reply += block
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert TIMEOUT_S - 0.5 < time.monotonic() - t0 < TIMEOUT_S + 10
        assert server.engine.admitted == 0 and server.engine.counts == {
            "served": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0}
        sock.close()


def test_headers_that_never_end_are_dropped(session):
    with running(session, client_timeout_s=TIMEOUT_S) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # no end of headers
        t0 = time.monotonic()
        assert sock.recv(4096) == b""                                   # closed by the server
        assert time.monotonic() - t0 < TIMEOUT_S + 10
        sock.close()
        assert post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200


def test_a_stream_nobody_reads_gives_its_place_back(bundle):
    """A client that asks for a long stream and never reads: the server's writes stall, and
    after client_timeout_s the stream is dropped, its place and slot freed. (The kernel
    would buffer megabytes first: the server side of this one connection gets a 4 KiB send
    buffer, set while the scheduler is held, before anything is written.)"""
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=2048) as s, \
            running(s, client_timeout_s=TIMEOUT_S, max_tokens_cap=2000) as server:
        step = s.llm.decode_step

        def slow_step(runs, abortable=False):   # 2000 tokens take >= 10 s: the answer cannot end before the drop
            time.sleep(0.005)       # (a fast machine made the tiny model finish within the 2 s)
            return step(runs, abortable)
        s.llm.decode_step = slow_step
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)      # a small window, never drained
        sock.settimeout(WAIT_S)
        with s.scheduler.lock:
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(raw_request(json.dumps({"messages": [{"role": "user", "content": "Talk."}], "stream": True,
                                                 "max_tokens": 2000, "ignore_eos": True}).encode()))
            wait_until(lambda: server.engine.admitted == 1, "admitted")
            for conn in list(server.uvicorn.server_state.connections):
                conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        wait_until(lambda: server.engine.admitted == 0, "the stalled stream let go of its place")
        counts = server.engine.counts
        assert counts["cancelled"] == 1 and counts["served"] == 0, counts   # it never got to the end
        wait_until(lambda: s.scheduler.active() == 0, "its slot freed at the engine's next step")
        sock.close()
        assert post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200


def test_a_conversation_that_outgrows_the_context_drops_old_turns(session, photos):
    with running(session, max_tokens_cap=16) as server:
        messages = [user_with_image(photos["cat"])]
        dropped = []
        for i in range(14):
            r = client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                        temperature=0, extra_body={"ignore_eos": True})
            dropped.append(r.scops["dropped_turns"])
            assert r.usage.prompt_tokens + 16 <= 512
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": f"Question {i}: and what else is in it, in detail?"}]
        assert dropped[0] == 0 and dropped[-1] > 0 and dropped == sorted(dropped)
        status, err = post(server, {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def _png_of(size: int) -> str:
    from PIL import Image
    rng = np.random.default_rng(size)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.NEAREST).save(buf, "PNG")     # big, compresses well
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_burst_of_big_pictures_is_decoded_a_few_at_a_time(session, monkeypatch):
    """8 requests x 3 pictures of 2000x2000 (12 MB each decoded): with one decode worker at
    most one decoded original exists at a time."""
    import scops.runtime.session as session_module
    live, peak, lock = [0], [0], threading.Lock()
    real = session_module.Session.prepare_media

    def counting(self, modality, source):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            return real(self, modality, source)
        finally:
            with lock:
                live[0] -= 1
    monkeypatch.setattr(session_module.Session, "prepare_media", counting)
    url = _png_of(2000)
    with running(session, decode_workers=1, queue=8, max_image_pixels=5_000_000) as server:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3
                              + [{"type": "text", "text": "?"}]}], "max_tokens": 2}
        out: list = []
        threads = [threading.Thread(target=lambda: out.append(post(server, body)[0])) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert out == [200] * 8 and peak[0] == 1
