"""`scops serve` returns what a grounding family's answer points at: the assistant message's
`grounding` (and the finish chunk's `delta.grounding` when streamed), with `scops.media`
saying what each region's `media` index is; for LEGO (boxes, time spans) and BuboGPT
(boxes and SAM masks of the detector's labels). Other families' answers carry no field.

The tiny bundles have random weights, so the family's last step is planted on the real
answer (grounding_helpers.py); the server, the pipeline before it and the JSON are real."""
from __future__ import annotations

import base64
import contextlib

import pytest

import openai
from grounding_helpers import BOX, SPAN, plant_lego
from test_server import _wav, data_url

WAIT_S = 120


def wav_part(seconds: float, rate: int = 16000) -> dict:
    wav = _wav(seconds, rate)
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


@contextlib.contextmanager
def serving(bundle, **options):
    from scops.runtime.server import Server, ServerOptions
    from scops.runtime.session import Session
    with Session.open(bundle, n_ctx=2048, warmup=False, **options) as session:
        server = Server(session, ServerOptions(port=0, max_tokens_cap=16)).start()
        try:
            yield server
        finally:
            server.close()


def ask(server, messages: list) -> tuple[dict, list[dict]]:
    """The same greedy request plain and streamed -> (completion JSON, stream chunk JSONs)."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
    opts = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**opts).model_dump()
    chunks = [ch.model_dump() for ch in c.chat.completions.create(**opts, stream=True)]
    return whole, chunks


def streamed_grounding(chunks: list[dict]):
    """The grounding of a stream: only on the finish chunk's delta, never on a content chunk."""
    with_choices = [ch for ch in chunks if ch["choices"]]
    assert all("grounding" not in ch["choices"][0]["delta"] for ch in with_choices[:-1])
    last = with_choices[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    return last["choices"][0]["delta"].get("grounding"), last["scops"]


def test_lego_boxes_and_spans_in_the_message_and_the_last_chunk(lego_bundle, photos, monkeypatch):
    plant_lego(monkeypatch)
    rgb = photos["cat"]
    h, w = rgb.shape[:2]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(rgb)}},
                                             wav_part(2.0), {"type": "text", "text": "Where is the cat?"}]}]
    with serving(lego_bundle) as server:
        whole, chunks = ask(server, messages)
    message = whole["choices"][0]["message"]
    text, grounding = message["content"], message["grounding"]
    # LEGO's prompt order: the clip, then the picture
    assert whole["scops"]["media"] == [{"modality": "audio", "duration": 2.0},
                                       {"modality": "image", "width": w, "height": h}]
    assert [e["phrase"] for e in grounding] == [text[slice(*e["span"])] for e in grounding]
    box, span = grounding[0]["regions"], grounding[1]["regions"]
    assert box == [{"media": 1, "box": pytest.approx([BOX[0] * w, BOX[1] * h, BOX[2] * w, BOX[3] * h], abs=0.01)}]
    assert span == [{"media": 0, "time": list(SPAN)}]
    assert [(e["color"], e["rgb"], e["rgb_light"]) for e in grounding] == [("red", "#dc2626", "#fee2e2"),
                                                                           ("pink", "#ec407a", "#f8bbd0")]
    streamed, info = streamed_grounding(chunks)
    assert "".join(ch["choices"][0]["delta"]["content"] or "" for ch in chunks if ch["choices"]) == text
    assert streamed == grounding and info["media"] == whole["scops"]["media"]


def test_families_without_grounding_send_no_field(bundle, photos):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(photos["cat"])}},
                                             {"type": "text", "text": "What is this?"}]}]
    with serving(bundle("Q4_K_M")) as server:
        whole, chunks = ask(server, messages)
    assert "grounding" not in whole["choices"][0]["message"] and "media" not in whole["scops"]
    assert streamed_grounding(chunks)[0] is None


def test_bubogpt_boxes_and_masks_in_the_message_and_the_last_chunk(grounding_bundle, photos, monkeypatch):
    """A clip in the first turn, the picture in the second: the entities point at the picture
    (media 1), with the detector label's boxes and SAM masks at the picture's size."""
    from grounding_helpers import plant_bubo
    from scops.runtime.grounding import rle_decode
    plant_bubo(monkeypatch)
    rgb = photos["cat"]
    h, w = rgb.shape[:2]
    messages = [{"role": "user", "content": [wav_part(1.0), {"type": "text", "text": "What is this sound?"}]},
                {"role": "assistant", "content": "A hum."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(rgb)}},
                                             {"type": "text", "text": "And in this picture?"}]}]
    with serving(grounding_bundle, kv_type="f32", flash_attn="off") as server:
        whole, chunks = ask(server, messages)
    message, info = whole["choices"][0]["message"], whole["scops"]
    assert info["media"] == [{"modality": "audio", "duration": 1.0}, {"modality": "image", "width": w, "height": h}]
    facts = info["grounding"]
    assert facts["tags"] and facts["labels"] and facts["matcher"] == "planted"
    (entity,) = message["grounding"]
    assert entity["tag"] in facts["labels"] and entity["phrase"] == message["content"][slice(*entity["span"])]
    assert entity["regions"] and all(r["media"] == 1 for r in entity["regions"])
    for r in entity["regions"]:
        x0, y0, x1, y1 = r["box"]
        assert x0 < x1 and y0 < y1 and x1 > 0 and y1 > 0 and x0 < w and y0 < h and r["score"] > 0.25   # on the picture
        assert rle_decode(r["mask"]).shape == (h, w)
    streamed, last_info = streamed_grounding(chunks)
    assert streamed == message["grounding"] and last_info["grounding"]["labels"] == facts["labels"]
