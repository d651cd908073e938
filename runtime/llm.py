"""llama.cpp through llama-cpp-python's low-level API: the splice protocol.

A turn is a list of cells: token ids (int) and media rows (a (key, row) tuple). The
context holds `n_seq` sequences (one per parallel conversation) in one unified KV cache;
`self.seqs[s]` mirrors what sequence s holds. `sync` keeps the longest common prefix of
what is cached and what a turn needs, removes the rest and decodes only the difference:
text as token batches, media as `embd` batches (never mixed, never over n_batch), with
logits requested for the last position only. Media rows are written by a callback
straight into the batch's `embd` memory (the projector's output buffer).

`decode_step` puts token runs of several sequences into one `llama_decode` (continuous
batching: one new token of every streaming reply plus a chunk of a new prompt); the
KV is unified because llama.cpp splits a batch over per-sequence streams into equal
parts, which turns a mixed batch into one ubatch per token.

A step asked to be `abortable` ends early, raising `DecodeAborted` with the KV as before
it, once another thread calls `request_abort` (the scheduler cuts a step of the streams'
tokens short for a new prompt). llama.cpp's CPU backend polls its abort callback after
every graph node; the callback is scops_flag_test from the kernels library, which reads
`abort_flag` without Python's GIL. Without that library steps are never cut short.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
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

# llama.cpp's CPU backend (built with OpenMP) runs a graph on an OpenMP team of the thread
# that calls llama_decode, and libgomp keeps one team per calling thread. Once it manages more
# threads than there are CPUs (a second calling thread: `scops serve` warms up on the main
# thread, then steps on its engine thread), it spins ~100 times instead of ~300k at a graph's
# barriers before sleeping on a futex: hundreds of context switches per decode. Measured on
# 2 cores at minigpt4-small: one token 34 -> 57 ms, 20 cells 346 -> 437 ms, ~500 context
# switches per decode instead of 1-13 (one caller). So every decode of the process runs on
# one thread, whoever asks for it.
GRAPH_THREAD_NAME = "scops-llama"
_graph_pool: ThreadPoolExecutor | None = None
_graph_lock = threading.Lock()


def run_graph(fn, *args):
    """fn(*args) (llama_decode) on the process's one llama.cpp graph thread; -> its result."""
    global _graph_pool
    if threading.current_thread().name.startswith(GRAPH_THREAD_NAME):
        return fn(*args)
    with _graph_lock:
        if _graph_pool is None:
            _graph_pool = ThreadPoolExecutor(1, thread_name_prefix=GRAPH_THREAD_NAME)
    future = _graph_pool.submit(fn, *args)
    try:
        return future.result()
    except BaseException:
        wait([future])                   # interrupted (Ctrl-C): the decode still ends before we go on
        raise


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


class DecodeAborted(RuntimeError):
    """An abortable llama_decode was cut short by `request_abort`: nothing of it stayed."""


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
    # Sequences (parallel conversations). Each may hold n_ctx positions: the unified cache
    # has n_ctx * n_seq cells, so its memory grows with n_seq (cells of a shared prefix,
    # such as the system prompt, are stored once).
    n_seq: int = 1
    # llama.cpp's CPU weight repacking (ggml-cpu/repack.cpp: Q4_0 / Q4_K / IQ4_NL rows interleaved
    # 8x8 for AVX2, more types on ARM with dotprod / i8mm) copies those tensors into anonymous
    # memory at load, while the GGUF pages it read them from stay mapped: a 7B Q4_K_M then holds
    # 7.0 GiB resident instead of 4.1 GiB (measured, README "A 7B model in 8 GB"). False: the
    # weights are used from the mapped file as they are.
    repack: bool = True


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
    """A copy of one sequence's KV (llama.cpp's own serialisation) and the cells it holds."""
    cells: tuple
    data: bytes


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two cell lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Llm:
    def __init__(self, path: str, opts: LlmOptions = LlmOptions()):
        import llama_cpp as L
        self.L = L
        self.opts = opts
        self.path = str(path)
        init_backend()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        mparams.use_extra_bufts = opts.repack
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise BundleError(f"{path}: llama.cpp could not load this GGUF")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.threads = opts.n_threads or os.cpu_count() or 1
        if opts.n_seq < 1:
            raise ValueError("n_seq must be >= 1")
        self.n_seq = opts.n_seq
        self.n_ctx_max = opts.n_ctx
        self.kv_type = opts.kv_type
        self.ctx = None
        # the abort callback's word: `request_abort` sets it; a step that is not abortable
        # points the callback at `_never` instead
        self.abort_flag, self._never = ctypes.c_int32(0), ctypes.c_int32(0)
        self._abort_cb = _abort_callback(L)
        self.can_abort = self._abort_cb is not None
        self._new_context(min(opts.n_ctx_start, opts.n_ctx) if opts.n_ctx_start > 0 else opts.n_ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_embd = L.llama_model_n_embd_inp(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = L.llama_batch_init(self.n_batch, self.n_embd, 1)
        # [n_batch * n_embd] float32 view of the embd batch: the projector writes here
        self._embd = np.ctypeslib.as_array(self._emb_batch.embd, shape=(self.n_batch * self.n_embd,))
        self._embd_own = self._emb_batch.embd          # llama_batch_free frees this one
        self.seqs: list[list] = [[] for _ in range(opts.n_seq)]
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
        """Create the llama context (one unified KV cache of n_ctx positions per sequence);
        q8_0 KV falls back to f16 where llama.cpp refuses it (a quantized V cache needs flash
        attention)."""
        L, opts = self.L, self.opts
        types = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32, "q8_0": L.GGML_TYPE_Q8_0}
        for kv in dict.fromkeys((self.kv_type, "f16")):
            cparams = L.llama_context_default_params()
            cparams.n_ctx = n_ctx * self.n_seq
            cparams.n_seq_max = self.n_seq
            cparams.kv_unified = True
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
        self.n_ctx = L.llama_n_ctx(self.ctx) // self.n_seq      # positions per sequence
        self._armed = None                                       # what the abort callback reads
        self._arm(False)

    def reserve(self, n: int) -> bool:
        """Room for n positions in each sequence: grows a context made with n_ctx_start (its
        state moves over whole, every sequence's cells included). False when n exceeds n_ctx_max."""
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
            for seq in range(self.n_seq):
                self.truncate(0, seq)
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

    @property
    def cells(self) -> list:
        """What sequence 0 holds (the only one when n_seq is 1)."""
        return self.seqs[0]

    # ---- decoding ---------------------------------------------------------------
    def _arm(self, abortable: bool) -> None:
        """Point llama.cpp's abort callback at `abort_flag` (abortable) or at a word that stays 0."""
        if self._abort_cb is None or self._armed == abortable:
            return
        word = self.abort_flag if abortable else self._never
        self.L.llama_set_abort_callback(self.ctx, self._abort_cb, ctypes.addressof(word))
        self._armed = abortable

    def request_abort(self) -> None:
        """Cut the abortable step in progress short (any thread; no effect on other steps)."""
        self.abort_flag.value = 1

    def _decode(self, batch, added: dict, abortable: bool = False) -> None:
        """llama_decode; then each sequence's mirror grows by its cells in `added`."""
        self._arm(abortable)
        rc = run_graph(self.L.llama_decode, self.ctx, batch)
        if rc != 0:
            for seq in added:            # forget whatever part of this batch may have landed
                self.L.llama_memory_seq_rm(self.mem, seq, len(self.seqs[seq]), -1)
            if rc == 2 and abortable:
                raise DecodeAborted("llama_decode was aborted for a new prompt")
            raise RuntimeError(f"llama_decode failed with status {rc}")
        for seq, cells in added.items():
            self.seqs[seq].extend(cells)

    def decode_step(self, runs: Sequence[tuple[int, Sequence[int], bool]], abortable: bool = False) -> list:
        """One llama_decode of token runs of several sequences: runs = [(seq, tokens, logits
        at the run's end)], at most one run per sequence, n_batch tokens in all. Returns the
        batch index of each run's logits (for `sample`/`logits`), or None where not asked.
        abortable: `request_abort` may end it early (DecodeAborted, nothing of it kept)."""
        b = self._tok_batch
        n, where, added = 0, [], {}
        for seq, tokens, want in runs:
            if seq in added or not tokens:
                raise ValueError("decode_step: one non-empty run per sequence")
            if n + len(tokens) > self.n_batch:
                raise ValueError(f"decode_step: {n + len(tokens)} tokens > n_batch {self.n_batch}")
            pos0 = len(self.seqs[seq])
            for i, t in enumerate(tokens):
                b.token[n] = t
                b.pos[n] = pos0 + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = 0
                n += 1
            b.logits[n - 1] = 1 if want else 0
            where.append(n - 1 if want else None)
            added[seq] = tokens
        b.n_tokens = n
        self._decode(b, added, abortable)
        return where

    def decode_tokens(self, tokens: Sequence[int], logits_at_end: bool, seq: int = 0) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            self.decode_step([(seq, chunk, logits_at_end and start + len(chunk) == len(tokens))])

    def decode_media(self, cells: Sequence[tuple], fill: FillFn, logits_at_end: bool, seq: int = 0) -> None:
        """cells: consecutive rows (key, row) of one or more media items, in order."""
        b = self._emb_batch
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
            pos0 = len(self.seqs[seq])
            for i in range(len(chunk)):
                b.pos[i] = pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 0
            b.logits[len(chunk) - 1] = 1 if logits_at_end and start + len(chunk) == len(cells) else 0
            b.n_tokens = len(chunk)
            self._decode(b, {seq: chunk})

    def decode_cells(self, cells: Sequence, fill: FillFn | None, logits_at_end: bool, seq: int = 0) -> None:
        """Text runs as token batches, media runs as embd batches, in order."""
        runs = split_runs(cells)
        for k, (is_media, run) in enumerate(runs):
            last = logits_at_end and k == len(runs) - 1
            if is_media:
                self.decode_media(run, fill, last, seq)
            else:
                self.decode_tokens(run, last, seq)

    def truncate(self, n: int, seq: int = 0) -> None:
        """Forget every position >= n of a sequence."""
        self.L.llama_memory_seq_rm(self.mem, seq, n, -1)
        del self.seqs[seq][n:]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make sequence dst hold the first n cells of sequence src (shared, not recomputed)."""
        self.truncate(0, dst)
        if n:
            self.L.llama_memory_seq_cp(self.mem, src, dst, 0, n)
        self.seqs[dst] = list(self.seqs[src][:n])

    def check_fits(self, n_cells: int) -> None:
        if n_cells >= self.n_ctx_max:
            raise PromptTooLong(f"the conversation needs {n_cells} positions but the context "
                                f"holds {self.n_ctx_max}; shorten the prompt or start a new chat")

    def sync(self, cells: list, fill: FillFn | None, seq: int = 0) -> tuple[int, int]:
        """Make a sequence hold exactly `cells`, decoding only past the common prefix.

        Returns (reused, decoded). The last cell is always decoded so logits exist.
        """
        if not self.reserve(len(cells) + 1):
            raise PromptTooLong(f"the conversation needs {len(cells)} positions but the context "
                                f"holds {self.n_ctx_max}; shorten the prompt or start a new chat")
        common = min(common_prefix(self.seqs[seq], cells), len(cells) - 1)
        self.truncate(common, seq)
        self.decode_cells(cells[common:], fill, True, seq)
        return common, len(cells) - common

    # ---- state snapshots --------------------------------------------------------
    def save_state(self, seq: int = 0) -> LlmState:
        """Copy a sequence's KV out of llama.cpp (bytes, size grows with its cells)."""
        L = self.L
        size = L.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = L.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if written == 0 and self.seqs[seq]:
            raise RuntimeError("llama_state_seq_get_data wrote nothing")
        return LlmState(tuple(self.seqs[seq]), ctypes.string_at(buf, written))

    def load_state(self, state: LlmState, seq: int = 0) -> None:
        """Replace a sequence's KV with a saved one (of any sequence); its mirror follows."""
        L = self.L
        self.truncate(0, seq)
        if state.data:
            buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
            if L.llama_state_seq_set_data(self.ctx, buf, len(state.data), seq) == 0:
                raise RuntimeError("llama_state_seq_set_data refused the saved state")
        self.seqs[seq] = list(state.cells)

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

    def sample(self, sampler, idx: int = -1) -> int:
        """Sample (and accept) a token from the logits at batch index idx of the last decode."""
        return int(self.L.llama_sampler_sample(sampler, self.ctx, idx))

    def free_sampler(self, sampler) -> None:
        self.L.llama_sampler_free(sampler)

    def suppress_eog(self, idx: int = -1) -> None:
        """Ban EOS (and EOT) in the logits at batch index idx of the last decode, before sampling."""
        ptr = self.L.llama_get_logits_ith(self.ctx, idx)
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

    def logits(self, idx: int = -1) -> np.ndarray:
        """Logits at batch index idx of the last decode (-1: the last that asked; a copy)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, idx)
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


def _abort_callback(L):
    """scops_flag_test as llama.cpp's ggml_abort_callback (a C function: no GIL per graph node),
    or None when the kernels library does not load."""
    from scops.kernels import flag_test_address
    address = flag_test_address()
    return None if address is None else L.ggml_abort_callback(address)


def split_runs(cells: Sequence) -> list[tuple[bool, list]]:
    """[1, 2, (k,0), (k,1), 3] -> [(False, [1, 2]), (True, [(k,0), (k,1)]), (False, [3])]."""
    runs: list[tuple[bool, list]] = []
    for c in cells:
        is_media = isinstance(c, tuple)
        if runs and runs[-1][0] == is_media:
            runs[-1][1].append(c)
        else:
            runs.append((is_media, [c]))
    return runs
