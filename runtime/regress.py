"""Emu's visual regression: the LLM writes the 32 embeddings that condition the image decoder.

    rows = regress(llm, prefix_cells, boi_id, head, n=32, fill=fill)    # [32, n_embd]

The prompt (text, reference-picture rows) is followed by `[IMG]`; the final-norm output of the
LLM at the last position (llama.cpp's embeddings output) goes through `stu_regress_head`
(Linear n_embd -> n_embd, no bias; the fused projector kernel) and is fed back as the next
input embedding, through the KV cache, until n rows exist. The original (Emu.generate_image)
re-runs the whole sequence at each step, with the regressed rows in place of `<image>`
tokens; causal attention makes the cached loop the same computation (tests/reference_emu.py).
"""
from __future__ import annotations

import numpy as np


def regress(llm, prefix: list, boi: int, head, n: int, fill=None, key: str = "regress",
            seq: int = 0) -> np.ndarray:
    """prefix: the prompt's cells (tokens and media rows) before `[IMG]`; head: a Projector
    (forward(x [rows, n_embd]) -> [rows, n_embd]); seq: the llama.cpp sequence to use.
    Returns the n regressed rows [n, n_embd]."""
    rows = np.empty((n, llm.n_embd), np.float32)

    def fill_cells(out, k, start):                       # regressed rows are fed back as media cells
        if k == key:
            out[:] = rows[start:start + len(out)]
        else:
            fill(out, k, start)

    if not llm.reserve(len(prefix) + n + 1):             # prompt, [IMG] and the fed-back rows
        from .errors import PromptTooLong
        raise PromptTooLong(f"the prompt needs {len(prefix) + n} positions with its {n} image embeddings "
                            f"but the context holds {llm.n_ctx_max}; shorten the prompt")
    if prefix:
        llm.sync(prefix, fill_cells, seq)
    else:
        llm.truncate(0, seq)
    llm.set_embeddings(True)
    try:
        llm.decode_tokens([boi], True, seq)
        for i in range(n):
            h = llm.output_embedding()                    # final norm at the last position [n_embd]
            head.forward(h[None, :], out=rows[i:i + 1])   # [1, n_embd] -> [1, n_embd]
            if i + 1 < n:
                llm.decode_media([(key, i)], fill_cells, True, seq)
    finally:
        llm.set_embeddings(False)
    return rows
