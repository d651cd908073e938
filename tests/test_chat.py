"""Conversations: multi-turn equals a fresh run and the PyTorch reference, KV reuse,
the media cache, streaming, sampling options and cancellation."""
from __future__ import annotations

import pytest

from conftest import write_png
from reference import MiniGPT4Reference, minigpt4_prompt

Q1, Q2 = "What is in this picture?", "Describe it in more detail please."


def greedy(n, **kw):
    return dict(temperature=0, max_tokens=n, **kw)


def test_turn_two_equals_fresh_run_and_reference(exact_session, bundle, photos, tiny_ckpt):
    from scops.runtime.session import Session
    conv = exact_session.chat()
    r1 = conv.send(Q1, images=[photos["cat"]], **greedy(12)).result()
    a1 = conv.messages[-1].text
    assert r1.text.strip() == a1
    r2 = conv.send(Q2, **greedy(16, ignore_stop=True)).result()
    # the new turn decoded only what is new: everything up to turn 1's prompt came from the KV
    assert r2.timings["reused_cells"] >= r1.timings["reused_cells"] + r1.timings["decoded_cells"]
    with Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=1024) as fresh:
        c = fresh.chat()
        c.add("user", Q1, images=[photos["cat"]])
        c.add("assistant", a1)
        again = c.send(Q2, **greedy(16, ignore_stop=True)).result()
        assert again.timings["reused_cells"] < 80        # this one really decoded the history
    assert again.token_ids == r2.token_ids
    ref = MiniGPT4Reference(tiny_ckpt)
    want = ref.generate(minigpt4_prompt([(Q1, a1), (Q2, None)]), photos["cat"], 16)
    assert r2.token_ids == want


def test_repeated_image_runs_no_encoder(exact_session, photos, tmp_path):
    conv = exact_session.chat()
    conv.send(Q1, images=[photos["astronaut"]], **greedy(2)).result()
    runs = exact_session.stats.encoder_runs
    # the same picture again, this time as a PNG file: same decoded pixels, same key
    png = write_png(tmp_path / "astronaut.png", photos["astronaut"])
    reply = exact_session.chat().send(Q1, images=[png], **greedy(2)).result()
    assert exact_session.stats.encoder_runs == runs
    assert reply.timings["encode_ms"] < 5
    exact_session.chat().send(Q1, images=[photos["coffee"]], **greedy(2)).result()
    assert exact_session.stats.encoder_runs == runs + 1


def test_system_prompt_kv_is_reused_across_chats(exact_session, photos):
    n_system = len(exact_session.llm.tokenize(exact_session.bundle.template["system"], True))
    for _ in range(2):
        reply = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(2)).result()
        assert reply.timings["reused_cells"] >= n_system - 1


def test_stream_pieces_make_the_text(exact_session, photos):
    reply = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(20, ignore_stop=True))
    pieces = list(reply)
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    assert reply.finish_reason == "length" and len(reply.token_ids) == 20
    for key in ("preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s"):
        assert reply.timings[key] >= 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(exact_session, photos):
    conv = exact_session.chat()
    kw = dict(images=[photos["cat"]], max_tokens=12, ignore_stop=True)
    a = conv.send(Q1, temperature=1.0, seed=7, **kw).result().token_ids
    conv.reset()
    b = conv.send(Q1, temperature=1.0, seed=7, **kw).result().token_ids
    conv.reset()
    g = conv.send(Q1, temperature=0, **kw).result().token_ids
    conv.reset()
    k1 = conv.send(Q1, temperature=0.7, top_k=1, seed=3, **kw).result().token_ids
    assert a == b
    assert k1 == g


def test_custom_stop_string_cuts_the_answer(exact_session, photos):
    full = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(16, ignore_stop=True)).result()
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip()
    cut = exact_session.chat().send(Q1, images=[photos["cat"]], stop=[stop],
                                    **greedy(16, ignore_stop=True)).result()
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]


def test_cancel_stops_and_the_next_turn_is_normal(exact_session, photos):
    conv = exact_session.chat()
    reply = conv.send(Q1, images=[photos["cat"]], **greedy(50, ignore_stop=True))
    next(reply)
    reply.cancel()
    rest = list(reply)
    assert reply.finish_reason == "cancelled" and len(reply.token_ids) <= 2 + len(rest)
    ok = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(8, ignore_stop=True)).result()
    fresh = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(8, ignore_stop=True)).result()
    assert ok.finish_reason == "length" and ok.token_ids == fresh.token_ids


def test_unknown_or_bad_options_are_clear_errors(exact_session):
    from scops.runtime.errors import OptionError
    conv = exact_session.chat()
    with pytest.raises(OptionError, match="unknown sampling option"):
        conv.send("hi", temprature=0.5)
    with pytest.raises(OptionError, match="top_p"):
        conv.send("hi", top_p=0)
    with pytest.raises(OptionError, match="max_tokens"):
        conv.send("hi", max_tokens=-3)
    assert conv.messages == []


def test_token_offsets_address_the_answer_text(exact_session, photos):
    reply = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(12, ignore_stop=True)).result()
    assert len(reply.offsets) == len(reply.token_ids)
    assert reply.offsets == sorted(reply.offsets) and reply.offsets[-1] == len(reply.text)
    llm = exact_session.llm
    pieces = b"".join(llm.piece(t) for t in reply.token_ids).decode("utf-8", errors="replace").lstrip()
    assert pieces == reply.text
