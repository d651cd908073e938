"""`POST /v1/images/generations` (OpenAI's images API, b64_json) on the emu-tiny generation
bundle: the OpenAI client gets the same picture as `Session.generate_image` with the same
seed (with and without a reference picture); every bad request is one 400 naming its field
and the server goes on serving; a chat-only Emu-I bundle refuses with a clear error."""
from __future__ import annotations

import base64
import http.client
import io
import json

import numpy as np
import openai
import pytest
from test_server import post as post_raw
from test_server import data_url, running

WAIT_S = 120


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def gen(emu_bundles):
    from scops.runtime.session import Session
    s = Session.open(emu_bundles("gen"), n_ctx=512)
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(gen):
    with running(gen, max_image_side=128, max_image_steps=20, max_image_pixels=300_000) as s:
        yield s


def post(server, body, path="/v1/images/generations"):
    """Raw HTTP: (status, parsed JSON body), to the images route by default."""
    return post_raw(server, body, path=path)


def get(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.request("GET", path)
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return data


def test_openai_client_gets_the_sessions_picture(server, gen, photos):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    r = client.images.generate(model="emu", prompt="a red boat on the river", size="64x64", n=1,
                               response_format="b64_json", extra_body={"steps": 3, "seed": 5, "guidance": 7.5})
    got = decode_png(r.data[0].b64_json)
    want = gen.generate_image("a red boat on the river", steps=3, seed=5, guidance=7.5, height=64, width=64)
    assert got.shape == (64, 64, 3) and got.std() > 1
    assert np.abs(got.astype(int) - want.pixels).max() <= 1       # see below
    info = r.model_extra["scops"]
    assert (info["seed"], info["steps"], info["guidance"], info["size"]) == (5, 3, 7.5, "64x64")
    assert info["safety_checked"] is False and info["timings"]["s_per_step"] > 0

    # a reference picture ("in the style of this picture") as a data: URL
    r = client.images.generate(prompt="in this style, a boat", size="64x48", response_format="b64_json",
                               extra_body={"steps": 2, "seed": 9, "image": data_url(photos["cat"])})
    got = decode_png(r.data[0].b64_json)
    want = gen.generate_image("in this style, a boat", images=[photos["cat"]], steps=2, seed=9, height=48, width=64)
    # the prompt's prefix is in the KV cache the second time (prefilled in other batch splits):
    # float rounding may move a pixel by one level, never more
    assert got.shape == (48, 64, 3) and np.abs(got.astype(int) - want.pixels).max() <= 1


BAD = [
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "   ", "steps": 2}, "prompt", "prompt is empty"),
    ({"size": "64x64"}, "prompt", "Field required"),
    ({"prompt": "x", "size": "100x100"}, "size", "multiple of 16"),
    ({"prompt": "x", "size": "4096x4096"}, "size", "128 pixels"),
    ({"prompt": "x", "size": "0x64"}, "size", "multiple of 16"),
    ({"prompt": "x", "size": "huge"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
    ({"prompt": "x", "steps": 1000000}, "steps", "cap of 20"),
    ({"prompt": "x", "steps": "5"}, "steps", "integer"),
    ({"prompt": "x", "guidance": 0}, "guidance", "greater than 0"),
    ({"prompt": "x", "guidance": -2.5}, "guidance", "greater than 0"),
    ({"prompt": "x", "guidance": 1000}, "guidance", "less than or equal to 30"),
    ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "n": 4}, "n", "1"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
    ({"prompt": "x", "output_format": "webp"}, "output_format", "png"),
    ({"prompt": "x", "image": "http://example.com/cat.png"}, "image", "data:image"),
    ({"prompt": "x", "image": "data:image/png;base64,@@@"}, "image", "base64"),
    ({"prompt": "x" * 5000}, "prompt", "at most 4000"),
]


def test_bad_requests_are_one_400_each_and_the_server_goes_on(server):
    for body, param, words in BAD:
        status, err = post(server, body)
        assert status == 400, (body, err)
        assert err["error"]["param"] == param and words in err["error"]["message"], (body, err)
        assert "\n" not in err["error"]["message"]
    status, err = post(server, b"{not json")
    assert status == 400 and "malformed JSON" in err["error"]["message"]
    bad_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
    status, err = post(server, {"prompt": "x", "image": bad_png, "steps": 1})
    assert status == 400 and err["error"]["code"] == "invalid_media", err
    big = np.zeros((600, 600, 3), np.uint8)                     # 360 000 px: over this server's 300 000
    status, err = post(server, {"prompt": "x", "image": data_url(big), "steps": 1})
    assert status == 400 and "0.3 MP limit" in err["error"]["message"] and err["error"]["param"] == "image", err
    status, ok = post(server, {"prompt": "still drawing", "steps": 1, "size": "64x64"})
    assert status == 200 and decode_png(ok["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert get(server, "/health")["generates_images"] is True


def test_chat_bundle_refuses_to_draw(emu_bundles):
    from scops.runtime.session import Session
    with Session.open(emu_bundles("chat"), n_ctx=512) as chat, running(chat) as server:
        status, err = post(server, {"prompt": "a cat", "steps": 1})
        assert status == 400 and "cannot generate pictures" in err["error"]["message"], err
        assert err["error"]["code"] == "model_cannot_generate"
        assert get(server, "/health")["generates_images"] is False
        status, _ = post(server, {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                         path="/v1/chat/completions")
        assert status == 200                                    # the chat side serves on
