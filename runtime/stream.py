"""One reply in the making: its prompt, its sampler and the text its tokens spell.

A `Job` is driven by the scheduler (runtime/batch.py): it is given a sequence, its prompt
is decoded in chunks, and each time logits are ready the scheduler samples a token and
hands it to `accept`, which turns tokens into text pieces (UTF-8 across token borders,
stop strings held back until they can no longer match) and says whether to go on.
Pieces queue up in `pieces` for whoever reads the reply; `finish` closes the job.
"""
from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from typing import Callable


class Job:
    def __init__(self, llm, cells: list, opts, stops: list, fill, setup_s: float, timings: dict,
                 on_done: Callable[["Job"], None] | None = None, min_new: int = 0):
        self.llm, self.cells, self.opts, self.stops, self.fill = llm, cells, opts, stops, fill
        self.min_new = min_new               # end-of-generation is banned until this many tokens
        self.timings = dict(timings)
        self.on_done = on_done
        self.listener: Callable[[], None] | None = None     # called when pieces arrive or it ends
        self._setup_s = setup_s
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._full, self._emitted = "", 0
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.token_ids: list[int] = []
        self.raw_offsets: list[int] = []     # end of each token's text, before the stop cut
        self.finish_reason: str | None = None
        self.eog: int | None = None          # the end-of-generation token that ended it, if one did
        self.grounding: list = []            # set by the conversation when the job ends
        self.picture_at = 0                  # BuboGPT: the grounded picture's index in Conversation.media()
        self.error: BaseException | None = None
        self.pieces: deque = deque()
        self.finished = False
        self.cancel_requested = threading.Event()
        # scheduler state
        self.submitted = False
        self.seq: int | None = None
        self.todo: list = []                 # prompt cells still to decode
        self.read_started = False            # a chunk of the prompt went into a step
        self.prefilled = False
        self.next_token: int | None = None   # sampled, to be decoded in the next step
        self.sampler = None
        self.snapshot_restored = False
        self.t_submit = self.t_placed = self.t_first = self.t_last = None

    # ---- reading side ------------------------------------------------------------------
    def has_output(self) -> bool:
        return bool(self.pieces) or self.finished

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener()

    # ---- driven by the scheduler ------------------------------------------------------------
    def placed(self, seq: int, reused: int) -> None:
        self.seq, self.t_placed = seq, time.perf_counter()
        self.todo = self.cells[reused:]
        self.timings.update(reused_cells=reused, decoded_cells=len(self.todo),
                            queue_ms=(self.t_placed - self.t_submit) * 1e3)
        self.sampler = self.llm.make_sampler(self.opts.sampling, [c for c in self.cells if isinstance(c, int)])

    def accept(self, tok: int) -> bool:
        """A sampled token: extend the text, queue what can be shown; False when done."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            self.prefilled = True
            self.timings["prefill_ms"] = (now - self.t_placed) * 1e3
            self.timings["ttft_ms"] = (self._setup_s + now - self.t_submit) * 1e3
        self.t_last = now
        llm, opts = self.llm, self.opts
        if llm.is_eog(tok) and not opts.ignore_stop:
            self.finish_reason, self.eog = "stop", tok
            return False
        self.token_ids.append(tok)
        full = self._full
        seen = max(0, len(full) - self._holdback)       # text before this can hold no stop string
        full += self._decoder.decode(llm.piece(tok))
        if self._emitted == 0:
            full = full.lstrip()
        self.raw_offsets.append(len(full))
        cut = min((i for i in (full.find(s, seen) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            full = full[:cut]
            self.finish_reason = "stop"
        end = len(full) if cut >= 0 else max(self._emitted, len(full) - self._holdback)
        if end > self._emitted:
            self.text = full[:end]
            self.pieces.append(full[self._emitted:end])
            self._emitted = end
            self._notify()
        self._full = full
        if cut >= 0:
            return False
        if len(self.token_ids) >= opts.max_tokens or len(llm.seqs[self.seq]) + 1 >= llm.n_ctx:
            self.finish_reason = "length"
            return False
        return True

    def finish(self, reason: str | None = None, error: BaseException | None = None) -> None:
        """End the job (once): flush held-back text unless cancelled, settle the timings."""
        if self.finished:
            return
        if reason is not None and (self.finish_reason is None or reason == "cancelled"):
            self.finish_reason = reason
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self.error = error
        if self.sampler is not None:
            self.llm.free_sampler(self.sampler)
            self.sampler = None
        full = self._full
        if self._emitted < len(full) and self.finish_reason != "cancelled" and error is None:
            self.pieces.append(full[self._emitted:])
        self.text = full
        n = len(self.token_ids)
        self.timings["n_tokens"] = n
        if self.t_first is not None and n > 1 and self.t_last > self.t_first:
            self.timings["decode_tok_s"] = (n - 1) / (self.t_last - self.t_first)
        self.next_token = None
        if self.on_done is not None:
            self.on_done(self)
        self.finished = True
        self._notify()

    @property
    def offsets(self) -> list[int]:
        """End offset in .text of each generated token (clipped to the text)."""
        return [min(o, len(self.text)) for o in self.raw_offsets]

    def answer_ids(self) -> list[int] | None:
        """The generated ids that spell the answer as kept (.text, cut at a stop string), for
        the history of the next turn; None when a stop string began inside a token with text
        before it (those ids would not spell the answer)."""
        n = 0
        while n < len(self.raw_offsets) and self.raw_offsets[n] <= len(self.text):
            n += 1
        # tokens that added no text just before a cut begin the stop string (bytes of its
        # first character): they are not part of the answer
        while 0 < n < len(self.raw_offsets) and self.raw_offsets[n - 1] == (self.raw_offsets[n - 2] if n > 1 else 0):
            n -= 1
        spelled = self.raw_offsets[n - 1] if n else 0
        return self.token_ids[:n] if not self.text[spelled:].strip() else None
