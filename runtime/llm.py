"""llama.cpp through llama-cpp-python's low-level API: the splice protocol.

A turn is a list of cells: token ids (int) and media rows (a (key, row) tuple). The KV
cache of sequence 0 mirrors `self.cells`; `sync` keeps the longest common prefix of what
is cached and what the turn needs, removes the rest and decodes only the difference:
text as token batches, media as `embd` batches (never mixed, never over n_batch), with
logits requested for the last position only. Media rows are written by a callback
straight into the batch's `embd` memory (the projector's output buffer).
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import BundleError, PromptTooLong

log = logging.getLogger("scops")

# fill(out, key, start_row): write rows [start_row, start_row + len(out)) of media `key`
# into out [n, n_embd] float32 (a view of the llama batch's embd buffer).
FillFn = Callable[[np.ndarray, str, int], None]

_BACKEND_READY = False
_LOG_CALLBACK = None


def init_backend() -> None:
    """llama_backend_init once per process; llama.cpp's own chatter goes to our debug log."""
    global _BACKEND_READY, _LOG_CALLBACK
    if _BACKEND_READY:
        return
    import llama_cpp as L

    def forward(level, text, _user):
        if level >= 4:                     # GGML_LOG_LEVEL_ERROR
            log.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())
    _LOG_CALLBACK = L.llama_log_callback(forward)
    L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    L.llama_backend_init()
    _BACKEND_READY = True


@dataclass(frozen=True)
class LlmOptions:
    n_ctx: int = 2048           # the most positions the context holds
    n_batch: int = 512
    n_threads: int = 0          # 0: one per core
    n_gpu_layers: int = 0       # -1: all (when llama.cpp was built with a GPU backend)
    # KV cache precision. "f16" halves its memory; "f32" (with flash attention off, whose
    # CPU path rounds Q/K/V to f16) makes an F32 GGUF match PyTorch fp32 to ~1e-6; "q8_0"
    # (34 bytes per 32 values: 0.53x of f16) needs flash attention for V, else f16 is used.
    kv_type: str = "f16"        # "f16" | "f32" | "q8_0"
    flash_attn: str = "auto"    # "auto" | "on" | "off"
    # 0: the KV cache holds n_ctx positions from the start. > 0: it starts with this many
    # and grows (up to n_ctx) when a conversation needs more: sized to the conversation.
    n_ctx_start: int = 0


# A growing context is resized in steps of this many positions (at least 1.5x each time,
# so a long chat pays for few resizes).
CTX_STEP = 256


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's own sampler chain: penalties -> top_k -> top_p -> temp -> dist (or greedy)."""
    temperature: float = 0.8    # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


@dataclass(frozen=True)
class LlmState:
    """A copy of sequence 0's KV (llama.cpp's own serialisation) and the cells it holds."""
    cells: tuple
    data: bytes


class Llm:
    def __init__(self, path: str, opts: LlmOptions = LlmOptions()):
        import llama_cpp as L
        self.L = L
        self.opts = opts
        self.path = str(path)
        init_backend()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BundleError(f"{path}: llama.cpp could not load this GGUF")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.threads = opts.n_threads or os.cpu_count() or 1
        self.n_ctx_max = opts.n_ctx
        self.kv_type = opts.kv_type
        self.ctx = None
        self._new_context(min(opts.n_ctx_start, opts.n_ctx) if opts.n_ctx_start > 0 else opts.n_ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_embd = L.llama_model_n_embd_inp(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(self.n_batch, self.n_embd, 1)
        # [n_batch * n_embd] float32 view of the embd batch: the projector writes here
        self._embd = np.ctypeslib.as_array(self._emb_batch.embd, shape=(self.n_batch * self.n_embd,))
        self._embd_own = self._emb_batch.embd          # llama_batch_free frees this one
        self.cells: list = []
        self._piece_buf = ctypes.create_string_buffer(256)

    def set_embd_buffer(self, buf: np.ndarray) -> None:
        """Read media rows from `buf` (float32, n_batch * n_embd, caller-owned, alive until
        close()): the CUDA projector's pinned memory, which it fills by one DMA. llama.cpp
        copies llama_batch.embd on the host before uploading it (llama_batch.embd is host
        memory in the C API), so this is as close to the GPU as the rows can be handed over."""
        if buf.dtype != np.float32 or buf.shape != (self.n_batch * self.n_embd,) or not buf.flags.c_contiguous:
            raise ValueError(f"embd buffer must be float32 [{self.n_batch * self.n_embd}], got {buf.dtype} {buf.shape}")
        self._emb_batch.embd = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self._embd = buf

    def _new_context(self, n_ctx: int) -> None:
        """Create the llama context (KV cache of n_ctx positions); q8_0 KV falls back to f16
        where llama.cpp refuses it (a quantized V cache needs flash attention)."""
        L, opts = self.L, self.opts
        types = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32, "q8_0": L.GGML_TYPE_Q8_0}
        for kv in dict.fromkeys((self.kv_type, "f16")):
            cparams = L.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = opts.n_batch
            cparams.n_threads = cparams.n_threads_batch = self.threads
            cparams.type_k = cparams.type_v = types[kv]
            cparams.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                       "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[opts.flash_attn]
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if self.ctx:
                if kv != self.kv_type:
                    log.info("KV cache %s refused by llama.cpp here (flash attention %s); using f16",
                             self.kv_type, opts.flash_attn)
                self.kv_type = kv
                break
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None
            raise BundleError(f"{self.path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_ctx = L.llama_n_ctx(self.ctx)

    def reserve(self, n: int) -> bool:
        """Room for n positions: grows a context made with n_ctx_start (its state moves over
        whole, every sequence's cells included). False when n exceeds n_ctx_max."""
        if n <= self.n_ctx:
            return True
        if n > self.n_ctx_max:
            return False
        L = self.L
        size = L.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * size)()
        written = L.llama_state_get_data(self.ctx, buf, size)
        step = max(n, self.n_ctx * 3 // 2)
        target = min(self.n_ctx_max, -(-step // CTX_STEP) * CTX_STEP)
        L.llama_free(self.ctx)
        self.ctx = None
        self._new_context(target)
        if L.llama_state_set_data(self.ctx, buf, written) != written:
            self.truncate(0)
            raise RuntimeError(f"growing the context to {target} positions lost its state")
        log.debug("context grown to %d positions (%d needed)", self.n_ctx, n)
        return True

    # ---- vocabulary -------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, False)
        if n < 0:
            raise RuntimeError(f"tokenize: needs {-n} tokens > {cap}")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    # ---- decoding ---------------------------------------------------------------
    def _fill_common(self, batch, n: int, last_logits: bool) -> None:
        pos0 = len(self.cells)
        for i in range(n):
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        batch.logits[n - 1] = 1 if last_logits else 0
        batch.n_tokens = n

    def _decode(self, batch, cells: Sequence) -> None:
        rc = self.L.llama_decode(self.ctx, batch)
        if rc != 0:
            # llama.cpp leaves the KV as it was before this batch on failure
            self.truncate(len(self.cells))
            raise RuntimeError(f"llama_decode failed with status {rc}")
        self.cells.extend(cells)

    def decode_tokens(self, tokens: Sequence[int], logits_at_end: bool) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            b = self._tok_batch
            for i, t in enumerate(chunk):
                b.token[i] = t
            self._fill_common(b, len(chunk), logits_at_end and start + len(chunk) == len(tokens))
            self._decode(b, chunk)

    def decode_media(self, cells: Sequence[tuple], fill: FillFn, logits_at_end: bool) -> None:
        """cells: consecutive rows (key, row) of one or more media items, in order."""
        for start in range(0, len(cells), self.n_batch):
            chunk = cells[start:start + self.n_batch]
            out = self._embd[:len(chunk) * self.n_embd].reshape(len(chunk), self.n_embd)
            i = 0
            while i < len(chunk):                  # one fill call per run of the same key
                key, row = chunk[i]
                j = i
                while j < len(chunk) and chunk[j][0] == key:
                    j += 1
                fill(out[i:j], key, row)
                i = j
            self._fill_common(self._emb_batch, len(chunk), logits_at_end and start + len(chunk) == len(cells))
            self._decode(self._emb_batch, chunk)

    def truncate(self, n: int) -> None:
        """Forget every cached position >= n."""
        self.L.llama_memory_seq_rm(self.mem, 0, n, -1)
        del self.cells[n:]

    def sync(self, cells: list, fill: FillFn) -> tuple[int, int]:
        """Make the KV hold exactly `cells`, decoding only past the common prefix.

        Returns (reused, decoded). The last cell is always decoded so logits exist.
        """
        if not self.reserve(len(cells) + 1):
            raise PromptTooLong(f"the conversation needs {len(cells)} positions but the context "
                                f"holds {self.n_ctx_max}; shorten the prompt or start a new chat")
        common = 0
        for a, b in zip(self.cells, cells):
            if a != b:
                break
            common += 1
        common = min(common, len(cells) - 1)
        self.truncate(common)
        runs = _split_runs(cells[common:])
        for k, (is_media, run) in enumerate(runs):
            last = k == len(runs) - 1
            if is_media:
                self.decode_media(run, fill, last)
            else:
                self.decode_tokens(run, last)
        return common, len(cells) - common

    # ---- state snapshots --------------------------------------------------------
    def save_state(self) -> LlmState:
        """Copy sequence 0's KV out of llama.cpp (bytes, size grows with len(cells))."""
        L = self.L
        size = L.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = L.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if written == 0 and self.cells:
            raise RuntimeError("llama_state_seq_get_data wrote nothing")
        return LlmState(tuple(self.cells), ctypes.string_at(buf, written))

    def load_state(self, state: LlmState) -> None:
        """Replace sequence 0's KV with a saved one; `self.cells` follows it."""
        L = self.L
        self.truncate(0)
        if state.data:
            buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
            if L.llama_state_seq_set_data(self.ctx, buf, len(state.data), 0) == 0:
                raise RuntimeError("llama_state_seq_set_data refused the saved state")
        self.cells = list(state.cells)

    # ---- sampling ---------------------------------------------------------------
    def make_sampler(self, s: Sampling, history: Sequence[int] = ()):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0:
            args = (s.repeat_last_n, s.repeat_penalty, 0.0, 0.0)
            if len(L.llama_sampler_init_penalties.argtypes) == 5:     # builds that take n_vocab first
                args = (self.n_vocab,) + args
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(*args))
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for t in history[-s.repeat_last_n:] if s.repeat_penalty != 1.0 else ():
            L.llama_sampler_accept(chain, t)
        return chain

    def sample(self, sampler) -> int:
        return int(self.L.llama_sampler_sample(sampler, self.ctx, -1))

    def free_sampler(self, sampler) -> None:
        self.L.llama_sampler_free(sampler)

    def suppress_eog(self) -> None:
        """Ban EOS (and EOT) in the logits of the last output before it is sampled."""
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        for t in (self.L.llama_vocab_eos(self.vocab), self.L.llama_vocab_eot(self.vocab)):
            if 0 <= t < self.n_vocab:
                ptr[t] = -np.inf

    # ---- embeddings output (Emu's regression loop) ---------------------------------
    def set_embeddings(self, on: bool) -> None:
        """With embeddings on, each decode also keeps the output rows of the final norm (llama
        arch: `result_norm`, the input of the LM head) for the positions that ask for logits."""
        self.L.llama_set_embeddings(self.ctx, bool(on))

    def output_embedding(self) -> np.ndarray:
        """The last decoded position's final-norm output [n_embd] (a copy; embeddings on)."""
        ptr = self.L.llama_get_embeddings_ith(self.ctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp returned no embeddings (set_embeddings(True) before decoding)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def logits(self) -> np.ndarray:
        """Logits of the last decoded position that asked for them (a copy)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._emb_batch.embd = self._embd_own
            self.L.llama_batch_free(self._tok_batch)
            self.L.llama_batch_free(self._emb_batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _split_runs(cells: Sequence) -> list[tuple[bool, list]]:
    """[1, 2, (k,0), (k,1), 3] -> [(False, [1, 2]), (True, [(k,0), (k,1)]), (False, [3])]."""
    runs: list[tuple[bool, list]] = []
    for c in cells:
        is_media = isinstance(c, tuple)
        if runs and runs[-1][0] == is_media:
            runs[-1][1].append(c)
        else:
            runs.append((is_media, [c]))
    return runs
