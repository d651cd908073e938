"""Thin test helpers over llama-cpp-python's low-level (ctypes) API.

Used by the GGUF tests to tokenize, run a forward pass and decode greedily
without the high-level ``llama_cpp.Llama`` wrapper, so the tests exercise the
same calls the runtime makes.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

import llama_cpp

_BACKEND_READY = False


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):  # noqa: ARG001 - ctypes callback signature
    """Drop llama.cpp's log lines (model-load chatter) from test output."""
    return None


def init_backend(quiet: bool = True) -> None:
    """Call ``llama_backend_init`` once per process."""
    global _BACKEND_READY
    if _BACKEND_READY:
        return
    if quiet:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _BACKEND_READY = True


class LlamaRunner:
    """A loaded GGUF model with one context, for tokenizing and decoding."""

    def __init__(self, path: Path | str, n_ctx: int = 512, n_batch: int = 512, n_threads: int = 2,
                 exact: bool = False):
        init_backend()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama_model_load_from_file failed for {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        if exact:
            # Defaults (flash attention "auto" = on for CPU, f16 KV cache) round
            # K/V/Q to f16: ~3e-3 relative logit error. Off + f32 cache gives ~1e-6.
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("llama_init_from_model failed")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> "LlamaRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's tokenization of `text` (BOS prepended when add_bos)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_bos, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} slots")
        return list(buf[:n])

    def reset(self) -> None:
        """Forget the KV cache (sequence positions restart at 0)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, ids: Sequence[int], start_pos: int, all_logits: bool) -> np.ndarray:
        """Feed `ids` at positions start_pos..; return logits, shape (n_out, n_vocab)
        with n_out = len(ids) if all_logits else 1 (the last position)."""
        if not 0 < len(ids) <= self.n_batch:
            raise ValueError(f"batch of {len(ids)} tokens (max {self.n_batch})")
        b = self.batch
        b.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            b.token[i] = int(tok)
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == len(ids) - 1) else 0
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = range(len(ids)) if all_logits else [len(ids) - 1]
        return np.stack([self.read_logits(i) for i in rows])

    def read_logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of `ids` from a fresh cache, shape (len(ids), n_vocab)."""
        self.reset()
        return self.decode(ids, 0, all_logits=True)

    def greedy(self, ids: Sequence[int], n_new: int) -> list[int]:
        """Greedy continuation of `ids`: the n_new argmax tokens (no EOS stop)."""
        self.reset()
        logits = self.decode(ids, 0, all_logits=False)[-1]
        out: list[int] = []
        pos = len(ids)
        for _ in range(n_new):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = self.decode([tok], pos, all_logits=False)[-1]
            pos += 1
        return out
