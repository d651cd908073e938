"""Conversations: multi-turn equals a fresh run and the PyTorch reference, KV reuse,
the media cache, streaming, sampling options and cancellation."""
from __future__ import annotations

import pytest

from conftest import write_png
from reference import MiniGPT4Reference, minigpt4_prompt

Q1, Q2 = "What is in this picture?", "Describe it in more detail please."


def greedy(n, **kw):
    return dict(temperature=0, max_tokens=n, **kw)


def test_text_history_turn_two_equals_fresh_run_and_reference(exact_session, bundle, photos, tiny_ckpt):
    """history="text" (the originals' way): turn 2 re-reads the answer as text and equals a
    fresh run of the whole conversation and HF on the full prompt string."""
    from scops.runtime.session import Session
    conv = exact_session.chat(history="text")
    r1 = conv.send(Q1, images=[photos["cat"]], **greedy(12)).result()
    a1 = conv.messages[-1].text
    assert r1.text.strip() == a1 and conv.messages[-1].token_ids is None
    r2 = conv.send(Q2, **greedy(16, ignore_stop=True)).result()
    # everything up to turn 1's prompt came from the KV
    assert r2.timings["reused_cells"] >= r1.timings["reused_cells"] + r1.timings["decoded_cells"]
    with Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=1024) as fresh:
        c = fresh.chat(history="text")
        c.add("user", Q1, images=[photos["cat"]])
        c.add("assistant", a1)
        again = c.send(Q2, **greedy(16, ignore_stop=True)).result()
        assert again.timings["reused_cells"] < 80        # this one really decoded the history
    assert again.token_ids == r2.token_ids
    ref = MiniGPT4Reference(tiny_ckpt)
    want = ref.generate(minigpt4_prompt([(Q1, a1), (Q2, None)]), photos["cat"], 16)
    assert r2.token_ids == want


def test_ids_history_turn_two_decodes_only_the_question(exact_session, bundle, photos, tiny_ckpt):
    """history="ids" (the default): the answer stays in the prompt as the ids it was generated
    as; turn 2 decodes only its own text, and equals a fresh session given the same ids and
    HF on the same token sequence (built here from sentencepiece)."""
    from scops.runtime.session import Session
    conv = exact_session.chat()
    r1 = conv.send(Q1, images=[photos["cat"]], **greedy(12, ignore_stop=True)).result()
    ids = conv.messages[-1].token_ids
    assert ids == tuple(r1.token_ids) and len(ids) == 12
    r2 = conv.send(Q2, **greedy(16, ignore_stop=True)).result()
    ref = MiniGPT4Reference(tiny_ckpt)
    question = ref.sp.encode(f"###Human: {Q2}###Assistant: ")         # the original's open turn
    # nothing of turn 1 again but its last token (sampled at the length limit, never decoded)
    assert r1.finish_reason == "length" and r2.timings["decoded_cells"] == 1 + len(question)
    assert r2.cells[-len(question) - len(ids):] == list(ids) + question
    with Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=1024) as fresh:
        c = fresh.chat()
        c.add("user", Q1, images=[photos["cat"]])
        c.add("assistant", r1.text, token_ids=ids)
        again = c.send(Q2, **greedy(16, ignore_stop=True)).result()
        assert again.timings["reused_cells"] < 80
    assert again.token_ids == r2.token_ids
    head, tail = minigpt4_prompt([(Q1, None)]).split("<ImageHere>")
    segments = [[1] + ref.sp.encode(head), ref.sp.encode(tail) + list(ids) + question]
    assert r2.token_ids == ref.generate_ids(segments, photos["cat"], 16)


def test_ids_history_cut_at_a_stop_string(exact_session, photos):
    """An answer cut at a stop string keeps the ids that spell it (a stop string starting
    inside a token leaves the text instead); a replayed chat of this session (what a
    server sees: text only) finds the ids again by text and position."""
    conv = exact_session.chat()
    full = conv.send(Q1, images=[photos["cat"]], **greedy(16, ignore_stop=True)).result()
    ends = full.offsets
    k = next(i for i in range(len(ends) // 2, len(ends) - 1) if full.text[ends[i]:ends[i + 1]].strip())
    text = full.text
    for at in (ends[k], ends[k + 1] - 1):                # where a token starts, inside one
        stop = next(text[at:e] for e in range(at + 1, len(text) + 1) if text.find(text[at:e]) == at)
        aligned = at in ends
        conv.reset()
        cut = conv.send(Q1, images=[photos["cat"]], stop=[stop], **greedy(16, ignore_stop=True)).result()
        kept = conv.messages[-1].token_ids
        assert cut.finish_reason == "stop" and cut.text == full.text[:at]
        if not aligned:
            assert kept is None                  # the history keeps the text
            continue
        assert kept == tuple(full.token_ids[:ends.index(at) + 1])
        spelled = b"".join(exact_session.llm.piece(t) for t in kept).decode("utf-8", errors="replace")
        assert spelled.strip() == cut.text.strip()
        replay = exact_session.chat()
        replay.add("user", Q1, images=[photos["cat"]])
        replay.add("assistant", cut.text)
        assert replay.messages[-1].token_ids == kept
        edited = exact_session.chat()
        edited.add("user", Q1, images=[photos["cat"]])
        edited.add("assistant", cut.text + " (edited)")
        assert edited.messages[-1].token_ids is None              # not what was generated: text


def test_repeated_image_runs_no_encoder(exact_session, photos, tmp_path):
    conv = exact_session.chat()
    conv.send(Q1, images=[photos["astronaut"]], **greedy(2)).result()
    runs = exact_session.stats.encoder_runs
    # the same picture again, this time as a PNG file: same decoded pixels, same key
    png = write_png(tmp_path / "astronaut.png", photos["astronaut"])
    hits = exact_session.stats.media_cache_hits
    reply = exact_session.chat().send(Q1, images=[png], **greedy(2)).result()
    assert exact_session.stats.encoder_runs == runs
    assert exact_session.stats.media_cache_hits == hits + 1
    assert reply.timings["encode_ms"] == 0          # no encoder, no projection: nothing was timed
    exact_session.chat().send(Q1, images=[photos["coffee"]], **greedy(2)).result()
    assert exact_session.stats.encoder_runs == runs + 1


def test_system_prompt_kv_is_reused_across_chats(exact_session, photos):
    n_system = len(exact_session.llm.tokenize(exact_session.bundle.template["system"], True))
    for _ in range(2):
        reply = exact_session.chat().send(Q1, images=[photos["cat"]], **greedy(2)).result()
        assert reply.timings["reused_cells"] >= n_system - 1


def test_stream_pieces_make_the_text(exact_session, photos):
    runs = exact_session.stats.encoder_runs
    rgb = photos["cat"].copy()
    rgb[0, 0] ^= 1                                   # a picture this session has not seen
    reply = exact_session.chat().send(Q1, images=[rgb], **greedy(20, ignore_stop=True))
    pieces = list(reply)
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    assert reply.finish_reason == "length" and len(reply.token_ids) == 20
    assert exact_session.stats.encoder_runs == runs + 1
    t = reply.timings
    # every stage ran, so each was timed; the first token comes after the prefill it needs
    assert t["preprocess_ms"] > 0 and t["encode_ms"] > 0 and t["prefill_ms"] > 0
    assert t["ttft_ms"] > t["prefill_ms"]
    assert t["n_tokens"] == 20 and t["decode_tok_s"] > 0
    assert t["decoded_cells"] > 0 and t["reused_cells"] + t["decoded_cells"] == len(reply.cells)


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


def _penalise(logits, window, penalty):
    """llama.cpp's repeat penalty (llama-sampler.cpp penalties_apply), applied here in numpy."""
    out = logits.copy()
    for t in set(window):
        out[t] = out[t] * penalty if out[t] <= 0 else out[t] / penalty
    return out


def test_repeat_penalty_follows_llama_cpps_rule(exact_session, photos):
    """Penalised greedy decoding through the API equals a step-by-step loop that applies
    the penalty here, to the logits llama.cpp computed, over the last n tokens."""
    import numpy as np

    from scops.runtime.chat import _fill_from
    llm, conv = exact_session.llm, exact_session.chat()
    kw = dict(images=[photos["cat"]], temperature=0, max_tokens=16, ignore_stop=True)
    plain = conv.send(Q1, **kw).result()
    conv.reset()
    pen = conv.send(Q1, repeat_penalty=1.5, repeat_last_n=8, **kw).result()
    assert pen.token_ids != plain.token_ids              # the penalty changed the answer: it ran
    llm.sync(pen.cells, _fill_from(exact_session, conv._media))     # back to the prompt
    history, got = [c for c in pen.cells if isinstance(c, int)], []
    for _ in range(16):
        tok = int(np.argmax(_penalise(llm.logits(), (history + got)[-8:], 1.5)))
        got.append(tok)
        llm.decode_tokens([tok], True)
    assert got == pen.token_ids


@pytest.mark.parametrize("n_args", [5, 4], ids=["n_vocab-first", "upstream-4-args"])
def test_penalty_sampler_equals_llama_cpps_own(exact_session, photos, monkeypatch, n_args):
    """Llm.make_sampler's penalty stage against llama.cpp's penalties sampler built directly
    and applied to the same logits; both argument layouts of llama_sampler_init_penalties
    (n_vocab first, as this llama-cpp-python declares it; 4 arguments, as upstream) go
    through the shim."""
    import ctypes

    import numpy as np

    from scops.runtime.llm import Sampling
    llm = exact_session.llm
    L = llm.L
    conv = exact_session.chat()
    conv.send(Q1, images=[photos["cat"]], temperature=0, max_tokens=1).result()
    logits = llm.logits()
    history = [5, 7] + [int(t) for t in np.argsort(logits)[::-1][:3]]     # the window holds the top 3
    real, calls = L.llama_sampler_init_penalties, []
    if n_args == 4:
        def four(last_n, repeat, freq, present):
            calls.append((last_n, repeat, freq, present))
            return real(llm.n_vocab, last_n, repeat, freq, present)
        four.argtypes = real.argtypes[1:]
        monkeypatch.setattr(L, "llama_sampler_init_penalties", four)
    else:
        assert len(real.argtypes) == 5
    ours = llm.make_sampler(Sampling(temperature=0, repeat_penalty=50.0, repeat_last_n=4), history)
    try:
        got = llm.sample(ours)
    finally:
        llm.free_sampler(ours)
    if n_args == 4:
        assert calls == [(4, 50.0, 0.0, 0.0)]

    # llama.cpp's own sampler on a token-data array of the same logits
    monkeypatch.undo()
    data = (L.llama_token_data * llm.n_vocab)(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    arr = L.llama_token_data_array(data, llm.n_vocab, -1, False)
    direct = real(llm.n_vocab, 4, 50.0, 0.0, 0.0)
    for t in history:
        L.llama_sampler_accept(direct, t)
    L.llama_sampler_apply(direct, ctypes.byref(arr))
    L.llama_sampler_free(direct)
    applied = np.array([data[i].logit for i in range(llm.n_vocab)], np.float32)
    assert np.array_equal(applied, _penalise(logits, history[-4:], 50.0))
    assert got == int(np.argmax(applied)) != int(np.argmax(logits))


def test_trimmed_history_releases_its_media(exact_session, photos):
    conv = exact_session.chat()
    for name in ("cat", "astronaut", "coffee"):
        conv.send(Q1, images=[photos[name]], **greedy(2)).result()
        del conv.messages[:-2]                           # a client's window: the last turn only
        assert len(conv._media) <= 2                     # the window's picture (+ the one it replaced)
    reply = conv.send(Q2, **greedy(2)).result()          # the kept turn still renders and runs
    assert reply.finish_reason in ("stop", "length")
    assert len(conv._media) == 1                         # the coffee rows; cat and astronaut let go
