"""Several conversations of one session at once: the same tokens as alone, decode steps
batched, a new prompt read in chunks between the streams' tokens, slots and snapshots
reused, threads, abandoned replies, and long conversations that drop their oldest turns."""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

Q = "What is in this picture?"


def greedy(n, **kw):
    return dict(temperature=0, max_tokens=n, ignore_stop=True, **kw)


@pytest.fixture(scope="module")
def exact3(bundle):
    """Three slots on the F32 GGUF with an f32 KV cache (the parity configuration)."""
    from scops.runtime.session import Session
    s = Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=512, parallel=3)
    yield s
    s.close()


def test_parallel_replies_equal_alone_and_share_steps(exact3, photos):
    prompts = [("Describe it.", [photos["cat"]]), ("Hello there, who are you?", []), (Q, [photos["coffee"]])]
    alone = [exact3.chat().send(t, images=m, **greedy(20)).result().token_ids for t, m in prompts]
    steps = exact3.scheduler.steps
    replies = [exact3.chat().send(t, images=m, **greedy(20)).start() for t, m in prompts]
    together = [r.result().token_ids for r in replies]
    assert together == alone
    # 3 x 20 tokens in about 20 steps (+ reading the prompts), not 60: the steps were shared
    assert exact3.scheduler.steps - steps <= 20 + 3
    assert all(r.timings["reused_cells"] > 0 for r in replies)        # the system prompt, in every slot


def test_readers_in_threads_and_interleaved(exact3):
    texts = ["One?", "Two, please.", "And three."]
    alone = [exact3.chat().send(t, **greedy(12)).result().token_ids for t in texts]
    got: dict = {}
    replies = [exact3.chat().send(t, **greedy(12)) for t in texts]

    def read(i):
        got[i] = replies[i].result().token_ids
    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(3)] == alone
    a, b = (exact3.chat().send(t, **greedy(12)) for t in texts[:2])
    pieces = {"a": [], "b": []}
    for _ in range(6):                                    # one thread, taking turns
        pieces["a"].append(next(a))
        pieces["b"].append(next(b))
    pieces["a"] += list(a)
    assert "".join(pieces["a"]) == a.text
    assert a.token_ids == alone[0] and b.result().token_ids == alone[1]


def test_a_new_prompt_is_read_in_chunks_between_stream_tokens(bundle, photos):
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=2, prefill_chunk=8) as s:
        first = s.chat().send("Tell me a story.", **greedy(60)).start()
        next(first)
        before = len(first.token_ids)
        second = s.chat().send(Q, images=[photos["cat"]], **greedy(4)).start()
        next(second)                                     # its first token: the prompt was read
        n = second.timings["decoded_cells"]
        assert n > 32                                    # the picture's rows and the question
        # every step read <= 8 of its cells and gave the story one more token
        assert len(first.token_ids) - before >= n // 8
        second.result()
        assert len(first.result().token_ids) == 60


def test_a_new_prompts_first_chunk_goes_in_the_next_step_alone(bundle):
    """A new prompt is placed and its first chunk read in the very next step, ahead of the
    streams' tokens (they wait one step, never two in a row); later chunks share steps."""
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=3, prefill_chunk=4) as s:
        a = s.chat().send("Tell me a story.", **greedy(40)).start()
        b = s.chat().send("Tell me another story.", **greedy(40)).start()
        next(a), next(b)
        while b._job.todo:
            s.scheduler.pump()
        s.scheduler.pump()
        tokens = lambda: (len(a.token_ids), len(b.token_ids))
        new = s.chat().send("A new question of some length, long enough for several chunks?", **greedy(3)).start()
        job = new._job
        n0, steps = tokens(), s.scheduler.steps
        s.scheduler.pump()
        assert s.scheduler.steps == steps + 1 and job.read_started
        assert len(job.todo) == job.timings["decoded_cells"] - 4      # its first chunk was read...
        assert tokens() == n0                                          # ...alone: the streams waited
        s.scheduler.pump()
        assert tokens() == (n0[0] + 1, n0[1] + 1)                      # and came next, with chunk 2
        assert len(job.todo) == job.timings["decoded_cells"] - 8
        assert new.result().finish_reason == "length" and len(a.result().token_ids) == 40
        # a prompt arriving while an older one is still being read: its first chunk still goes first
        b.result()
        d = s.chat().send("Tell me a story.", **greedy(30)).start()
        next(d)
        older = s.chat().send("An older question that is long enough to need many chunks of four?",
                              **greedy(2)).start()
        s.scheduler.pump()
        s.scheduler.pump()                                             # its first chunk, then a shared step
        left = len(older._job.todo)
        assert older._job.read_started and left > 4
        newer = s.chat().send("And a new one?", **greedy(2)).start()
        s.scheduler.pump()
        assert newer._job.read_started and len(older._job.todo) == left
        older.result(), newer.result(), d.result()
        s.scheduler.first_chunk_first = False                          # the other order, for contrast
        c = s.chat().send("Tell me a story.", **greedy(10)).start()
        next(c)
        other = s.chat().send("Another question?", **greedy(2)).start()
        n1 = len(c.token_ids)
        s.scheduler.pump()
        assert other._job.read_started and len(c.token_ids) == n1 + 1
        other.result(), c.result()


def test_turn_two_goes_back_to_its_slot_and_prefixes_are_shared(bundle, photos):
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=2) as s:
        a, b = s.chat(), s.chat()
        ra = a.send(Q, images=[photos["cat"]], **greedy(6)).result()
        rb = b.send("Something else entirely.", **greedy(6)).result()
        ra2 = a.send("More?", **greedy(4)).result()
        rb2 = b.send("Go on.", **greedy(4)).result()
        # each second turn found its conversation in a slot: only the new question decoded
        assert ra2.timings["reused_cells"] >= len(ra.cells) + 5
        assert rb2.timings["reused_cells"] >= len(rb.cells) + 5
        # a third chat about the same picture while `a` generates: the prefix is copied over
        long_a = a.send("And the colours?", **greedy(40)).start()
        next(long_a)
        copied = s.scheduler.copied
        c = s.chat()
        c.messages = list(a.messages[:2])
        c._media = dict(a._media)
        rc = c.send("Who took it?", **greedy(3)).result()
        assert s.scheduler.copied == copied + 1 and rc.timings["reused_cells"] >= len(ra.cells)
        long_a.close()


def test_snapshots_keep_a_chat_that_lost_its_slot(bundle, photos):
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=1, snapshots=2) as s:
        a, b = s.chat(), s.chat()
        ra = a.send(Q, images=[photos["cat"]], **greedy(4)).result()
        b.send("Another chat.", images=[photos["coffee"]], **greedy(4)).result()
        assert s.scheduler.snapshots.saved == 1          # a's cells were kept before b took the slot
        r = a.send("More?", **greedy(4)).result()
        assert r.snapshot_restored and r.timings["reused_cells"] >= len(ra.cells)


def test_an_abandoned_reply_frees_its_slot(bundle):
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=1) as s:
        r = s.chat().send("Tell me a story.", **greedy(200))
        next(r)
        del r
        gc.collect()
        after = s.chat().send("Hello.", **greedy(3)).result()
        assert after.finish_reason == "length" and s.scheduler.active() == 0


def test_borrowing_the_llm_waits_for_a_slot_and_never_cancels_a_reply(bundle):
    """Work outside the replies (Emu's regression) with every slot busy: it waits for a reply
    to end (steps go on meanwhile; a reply queued after it waits for it) or gives up with
    SlotsBusy, or when its caller goes away; the reply it waited on runs to its end."""
    from scops.runtime.errors import ScopsError, SlotsBusy
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=1) as s:
        story = s.chat().send("Tell me a story.", **greedy(12))
        next(story)                                      # placed: the only slot is busy
        with pytest.raises(SlotsBusy, match="busy"):
            with s.scheduler.borrow(timeout=0):
                pass
        seen, release = {}, threading.Event()

        def borrower():
            with s.scheduler.borrow(timeout=60) as seq:
                seen.update(seq=seq, story=(story.finish_reason, len(story.token_ids)), later=later._job.seq)
                release.wait(60)
        t = threading.Thread(target=borrower)
        t.start()
        for _ in range(6000):                            # until the borrower waits
            if s.scheduler.borrowers:
                break
            threading.Event().wait(0.01)
        later = s.chat().send("Hello.", **greedy(3)).start()
        assert story.result().finish_reason == "length"   # this thread steps the story to its end
        for _ in range(6000):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == {"seq": 0, "story": ("length", 12), "later": None}   # not cancelled; later waits
        release.set()
        t.join(60)
        assert later.result().finish_reason == "length"
        cancel = threading.Event()
        again = s.chat().send("Tell me a story.", **greedy(200))
        next(again)
        cancel.set()
        with pytest.raises(ScopsError, match="cancelled"):
            with s.scheduler.borrow(timeout=60, cancelled=cancel.is_set):
                pass
        assert not again.finished
        again.close()


def test_long_conversation_drops_oldest_turns(bundle, photos):
    from scops.runtime.errors import PromptTooLong
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=256) as s:
        conv = s.chat()
        system = s.llm.tokenize(s.bundle.template["system"], True)
        conv.send(Q, images=[photos["cat"]], **greedy(8)).result()
        dropped, reused = [], []
        for i in range(12):
            r = conv.send(f"Question number {i}, tell me more about it please?", **greedy(8)).result()
            dropped.append(r.dropped_turns)
            reused.append(r.timings["reused_cells"])
            assert len(r.cells) + 8 <= 256 and r.cells[:len(system) - 1] == system[:-1]   # the system prompt stays
            if r.dropped_turns:
                kept = [c for c in r.cells if isinstance(c, tuple)]
                assert len(kept) in (0, 32)              # the picture whole or not at all
        assert dropped == sorted(dropped) and dropped[-1] > 0 and dropped[0] == 0
        # the window moves in blocks: most turns after a drop still reuse their prefix
        after = [u for d, u in zip(dropped[1:], reused[1:]) if d] or [0]
        assert max(after) > len(system) + 20
        strict = s.chat(overflow="error")
        for m in conv.messages:
            strict.messages.append(m)
        strict._media = dict(conv._media)
        with pytest.raises(PromptTooLong, match="context holds 256"):
            strict.send("One more?", **greedy(8))


def test_replies_after_the_session_closed(bundle):
    from scops.runtime.batch import SessionClosed
    from scops.runtime.session import Session
    s = Session.open(bundle("Q4_K_M"), n_ctx=512)
    running = s.chat().send("Tell me a story.", **greedy(100))
    next(running)
    later = s.chat().send("Hello.", **greedy(3))
    s.close()
    list(running)
    assert running.finish_reason == "cancelled"
    with pytest.raises(SessionClosed, match="closed"):
        next(later)


def test_a_request_gets_the_lock_between_two_steps_of_a_busy_engine(bundle):
    """`scops serve`'s engine thread steps back to back while replies stream; a request
    submitted from another thread waits for the step in progress only, not for every step
    until the lock happens to come free (CPython's Lock is not fair: that took 0.3-1.6 s)."""
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M"), n_ctx=512, parallel=3) as s:
        sched, decode = s.scheduler, s.llm.decode_step

        def slow_step(runs, abortable=False):     # a step as long as a CPU's, GIL released meanwhile
            time.sleep(0.02)
            return decode(runs, abortable)
        s.llm.decode_step = slow_step
        sched.preempt = False                     # the lock alone (cutting steps short: the next test)
        stream = s.chat().send("Tell me a story.", **greedy(400)).start()
        stop = threading.Event()

        def engine():
            while not stop.is_set() and not stream.finished:
                sched.pump()
        t = threading.Thread(target=engine)
        t.start()
        try:
            waited = []
            for i in range(6):
                reply = s.chat().send(f"Question {i}?", **greedy(1))
                before = sched.steps
                reply.start()                     # takes the lock to queue the job
                waited.append(sched.steps - before)
                reply.result()
            assert not stream.finished            # every submit met a busy engine
        finally:
            stop.set()
            t.join(30)
        assert max(waited) <= 1, waited


def test_an_abortable_decode_is_cut_short_and_leaves_the_kv_as_it_was(exact3):
    """llama.cpp aborts a step when asked (scops_flag_test polled after each graph node): the
    sequence and its KV stay as before, and a non-abortable step ignores the request."""
    from scops.runtime.llm import DecodeAborted
    llm = exact3.llm
    assert llm.can_abort                         # the kernels library is built in the test env
    seq, prompt = 2, [1, 17, 23, 42, 99]
    llm.truncate(0, seq)
    llm.decode_step([(seq, prompt, True)])
    next_tok = int(llm.logits().argmax())
    llm.decode_step([(seq, [next_tok], True)])
    want = llm.logits()
    llm.truncate(len(prompt), seq)
    llm.request_abort()
    with pytest.raises(DecodeAborted):
        llm.decode_step([(seq, [next_tok], True)], abortable=True)
    assert len(llm.seqs[seq]) == len(prompt)
    llm.decode_step([(seq, [next_tok], True)])   # the request is still up: only abortable steps see it
    assert np.array_equal(llm.logits(), want)    # the KV held no trace of the aborted step
    llm.abort_flag.value = 0
    llm.truncate(0, seq)


def test_a_new_prompt_cuts_the_streams_step_short_and_the_streams_lose_nothing(exact3):
    """A step of the streams' tokens alone may be cut short (here: asked in every such step, as
    if requests kept coming); then a new prompt's first chunk goes alone, and the step after
    carries the streams' tokens: they advance every third step at worst. Greedy tokens are
    those of a run with no cut."""
    sched, llm = exact3.scheduler, exact3.llm
    texts = ["Tell me a story.", "Tell me another story."]
    alone = [exact3.chat().send(t, **greedy(12)).result().token_ids for t in texts]
    a, b = (exact3.chat().send(t, **greedy(12)).start() for t in texts)
    next(a), next(b)
    while a._job.todo or b._job.todo or a._job.next_token is None or b._job.next_token is None:
        sched.pump()
    decode, cuts = llm.decode_step, []

    def step(runs, abortable=False):             # a request comes in during every abortable step
        if abortable:
            cuts.append(len(runs))
            llm.request_abort()
        return decode(runs, abortable)
    llm.decode_step = step
    tokens = lambda: (len(a.token_ids), len(b.token_ids))
    try:
        aborted, n0 = sched.aborted, tokens()
        sched.pump()                             # the streams' step: cut short, nothing kept
        assert sched.aborted == aborted + 1 and cuts == [2] and tokens() == n0
        sched.pump()                             # right after a cut: not abortable, the streams advance
        assert sched.aborted == aborted + 1 and cuts == [2] and tokens() == (n0[0] + 1, n0[1] + 1)
        sched.pump()                             # abortable again
        assert sched.aborted == aborted + 2 and tokens() == (n0[0] + 1, n0[1] + 1)
        new = exact3.chat().send("And a question?", **greedy(2)).start()
        sched.pump()                             # the new prompt's first chunk, alone
        assert new._job.read_started and tokens() == (n0[0] + 1, n0[1] + 1)
        sched.pump()                             # then the streams' tokens, not abortable
        assert tokens() == (n0[0] + 2, n0[1] + 2) and sched.aborted == aborted + 2
    finally:
        llm.decode_step = decode
        llm.abort_flag.value = 0
    assert [a.result().token_ids, b.result().token_ids] == alone
    new.result()


def test_every_decode_runs_on_one_thread_whoever_asks(exact3, monkeypatch):
    """llama.cpp's OpenMP team belongs to the calling thread; a second calling thread made libgomp
    sleep at every graph barrier (measured: one token 34 -> 57 ms, ~500 context switches per
    decode). Readers in several threads, and the main thread, all decode on the graph thread."""
    from scops.runtime.llm import GRAPH_THREAD_NAME
    L, seen = exact3.llm.L, []
    decode = L.llama_decode

    def recording(ctx, batch):
        seen.append(threading.current_thread().name)
        return decode(ctx, batch)
    monkeypatch.setattr(L, "llama_decode", recording)
    replies = [exact3.chat().send(t, **greedy(6)) for t in ("One?", "Two?")]
    threads = [threading.Thread(target=r.result, name=f"reader-{i}") for i, r in enumerate(replies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    exact3.chat().send("Three?", **greedy(3)).result()      # and from this thread
    assert all(r.finished for r in replies) and len(seen) > 6
    assert {name.split("_")[0] for name in seen} == {GRAPH_THREAD_NAME}
