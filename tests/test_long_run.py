"""Long runs: a 1000-turn conversation through the Python API keeps its memory flat.

The chat keeps its last two turns (a client's sliding window: no context holds 1000 turns),
a picture comes with every third question, and every tenth one is a picture never seen
before (so the session's media cache fills and evicts). RSS is read after a 100-turn
warm-up and then along the way; it may not grow by 5% or more.
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

TURNS, WARMUP = 1000, 100


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_thousand_turn_conversation_keeps_rss_flat(bundle, photos):
    from scops.runtime.session import Session
    rng = np.random.default_rng(0)
    pics = [photos["cat"], photos["astronaut"], photos["coffee"]]
    samples = {}
    # one thread: a shared CI core does not spin llama.cpp's pool; memory is what is measured
    with Session.open(bundle("Q4_K_M"), n_ctx=512, threads=1) as session:
        conv = session.chat()
        for turn in range(1, TURNS + 1):
            media = {}
            if turn % 10 == 0:
                media["images"] = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)]     # new every time
            elif turn % 3 == 0:
                media["images"] = [pics[turn % len(pics)]]
            reply = conv.send(f"Question {turn}: what do you see?", temperature=0.8, seed=turn, max_tokens=6,
                              **media).result()
            assert reply.finish_reason in ("stop", "length")
            del conv.messages[:-4]                      # keep the last two turns
            if turn in (WARMUP, 250, 500, 750, TURNS):
                gc.collect()
                samples[turn] = rss_bytes()
        stats = session.stats
        assert len(conv._media) <= 2                     # only the window's pictures are held
    base = samples[WARMUP]
    growth = {t: (v - base) / base for t, v in samples.items()}
    print("RSS MB by turn:", {t: round(v / 2**20, 1) for t, v in samples.items()},
          f"growth after warm-up: {100 * growth[TURNS]:.2f}%", f"encoder runs {stats.encoder_runs},",
          f"cache hits {stats.media_cache_hits}")
    assert stats.encoder_runs >= TURNS // 10                 # the new pictures really were encoded
    assert growth[TURNS] < 0.05, growth
