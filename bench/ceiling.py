"""The batched-decode ceiling of this machine: what one `llama_decode` of k sequences costs.

    python -m scops.bench.ceiling BUNDLE/llm.Q4_K_M.gguf --threads 2 --n-seq 5 --n-ctx 1024

`scops bench --serve` runs this in its own process before it starts the server, on the same
GGUF with the server's context (n_seq sequences of n_ctx positions in one unified KV, the
same threads): each of k sequences holds a short prompt, then steps of one token for each of
k = 1, 2, 4, ... sequences are timed, interleaved so that drifting machine load hits all k
alike, plus a text chunk (a new prompt's cells) alone and with the k-token step. The server
cannot do better than `k / step_ms(k)` tokens/s at k streams, so `tok_s(4) / tok_s(1)` here
bounds its `decode_4_vs_1`. A wide chunk (WIDE cells) gives the lowest cost per cell llama.cpp
reaches here: k tokens cannot cost less than k of those, nor less than one token's step, so
`decode_bound` = k * t(1) / max(t(1), k * t_cell) bounds what any batching gains on this CPU.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

PROMPT_CELLS = 60            # what a served conversation holds: system prompt + a question
CHUNK = 20                   # a short text turn's new cells (the bench's probe is ~15-20)
WIDE = 64                    # cells of a batch wide enough that matmuls run at their best rate per cell
WARMUP = 2


def measure_ceiling(gguf: str, threads: int, n_seq: int, n_ctx: int, ks=(1, 2, 4), reps: int = 10) -> dict:
    from scops.runtime.llm import Llm, LlmOptions
    ks = tuple(k for k in ks if k < n_seq)                 # the last sequence reads the chunk
    llm = Llm(gguf, LlmOptions(n_ctx=n_ctx, n_threads=threads, n_seq=n_seq))
    try:
        v = llm.n_vocab

        def tok(i: int) -> int:                           # arbitrary ordinary ids of this vocabulary
            return 3 + (i * 37) % (v - 3)
        prompt = [1] + [tok(100 + i) for i in range(PROMPT_CELLS - 1)]
        for s in range(n_seq):
            llm.decode_step([(s, prompt, True)])
        chunk_seq = n_seq - 1
        chunk = [(chunk_seq, [tok(700 + i) for i in range(CHUNK)], True)]
        plan = {f"{k}": [(s, [tok(500 + s)], True) for s in range(k)] for k in ks}
        plan["chunk"] = chunk
        plan["wide"] = [(chunk_seq, [tok(900 + i) for i in range(WIDE)], True)]
        plan[f"{max(ks)}+chunk"] = plan[f"{max(ks)}"] + chunk
        times: dict = {name: [] for name in plan}
        for r in range(WARMUP + reps):
            for name, runs in plan.items():
                t0 = time.perf_counter()
                llm.decode_step(runs)
                dt = time.perf_counter() - t0
                for s in range(n_seq):                    # back to the prompt: every rep alike
                    llm.truncate(PROMPT_CELLS, s)
                if r >= WARMUP:
                    times[name].append(dt * 1e3)
    finally:
        llm.close()
    p50 = {name: float(np.percentile(v, 50)) for name, v in times.items()}
    tok_s = {k: k / p50[f"{k}"] * 1e3 for k in ks}
    cell_ms = p50["wide"] / WIDE
    bound = {str(k): k * p50["1"] / max(p50["1"], k * cell_ms) for k in ks}
    return {"gguf": gguf, "threads": threads, "n_seq": n_seq, "n_ctx": n_ctx, "reps": reps, "chunk_cells": CHUNK,
            "wide_cells": WIDE, "cell_ms": cell_ms, "decode_bound": bound,
            "step_ms_p50": p50, "step_ms": times, "tok_s": {str(k): v for k, v in tok_s.items()},
            "decode_max_vs_1": tok_s[max(ks)] / tok_s[1],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-seq", type=int, default=5)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--ks", default="1,2,4")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    print(json.dumps(measure_ceiling(a.gguf, a.threads, a.n_seq, a.n_ctx, tuple(int(k) for k in a.ks.split(",")),
                                     a.reps)))


if __name__ == "__main__":
    main()
