"""Continuous batching: the replies of many conversations over the sequences of one Llm.

Each submitted `Job` waits for a free sequence (a slot). When it gets one, the slot is
made to hold the longest prefix of its prompt that anything already holds: the slot
itself (a conversation going on in its own slot decodes only its new turn), another slot
(the prefix is shared by `llama_memory_seq_cp`, not recomputed) or a saved snapshot.
Then every `step` makes one `llama_decode` of token runs: the next token of every
streaming job plus a chunk of the oldest prompt still being read (media rows, which
llama.cpp cannot mix with tokens in one batch, go in their own call after it). While
other replies stream, a prompt advances by at most `prefill_chunk` cells a step, so a new
request does not stall them; alone, it takes whole batches. A prompt's first chunk goes
alone, ahead of the streams' tokens (see `_step`): a short text turn's first token then
costs one step of its own cells, not of its cells plus every stream's. A prompt submitted
while a step of only the streams' tokens runs cuts that step short (llama.cpp aborts it and
the KV stays as before): the prompt waits a graph node, not the rest of the step (~100 ms
for 4 streams of a 1B model on 2 cores), and its first chunk goes alone in the next step.

Whoever wants a job's next piece calls `pump` (the Python API from the reader's thread,
`scops serve` from its engine thread); one thread steps at a time, under `lock`, and
every job advances in that step.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .errors import ScopsError, SlotsBusy
from .llm import DecodeAborted, common_prefix, split_runs
from .states import MIN_GAIN_CELLS, SnapshotStore
from .stream import Job

log = logging.getLogger("scops")

# Prompt cells a step may add while other replies stream. A step with a 128-cell chunk
# costs about what 128 prompt tokens cost alone (on a CPU: compute bound, ~0.1-1 s for a
# 1-7B model), and every stream waits for it; smaller chunks make streams smoother and the
# new reply's first token later.
DEFAULT_PREFILL_CHUNK = 128


# How long `borrow` waits for a slot by default: an Emu picture's regression waits for a
# reply to finish (a few hundred tokens, ~10-60 s on a CPU) rather than cancel one.
BORROW_WAIT_S = 120.0
BORROW_POLL_S = 0.25         # how often a waiting borrower checks whether it was cancelled

# How long a thread that releases `lock` waits for the threads queued on it to take it.
# CPython's Lock is not fair: the engine thread released it between two steps and took it
# again before a woken waiter ran, so a request's `submit` waited out several steps
# (measured in `scops serve` with 4 streams on 2 cores: 0.3-1.6 s, against 5 ms idle).
# Bounded, so that a waiter that never gets the CPU cannot stall the steps.
HANDOFF_S = 0.05


class SessionClosed(ScopsError):
    """A reply was read after its session was closed."""


@dataclass
class Slot:
    seq: int
    job: Job | None = None
    prompt_len: int = 0          # cells of the last prompt placed here (the snapshot rule)
    last_used: int = 0           # step count when last released (least recently used goes first)


class Scheduler:
    def __init__(self, llm, snapshots: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 first_chunk_first: bool = True):
        self.llm = llm
        self.lock = threading.Lock()                     # held by a step; taken in turn (see `_turn`)
        self.wake = threading.Condition(self.lock)       # notified when work arrives
        self.freed = threading.Event()                   # set when a slot is given back
        self._queue = threading.Condition()              # who waits for `lock`, and who got it
        self._contenders = self._entered = 0
        self.borrowers = 0                               # waiting in `borrow`: they go before new replies
        self.slots = [Slot(s) for s in range(llm.n_seq)]
        self.waiting: deque[Job] = deque()
        self.snapshots = SnapshotStore(llm, snapshots)
        self.prefill_chunk = max(1, prefill_chunk)
        self.first_chunk_first = first_chunk_first     # a new prompt's first chunk before the streams' tokens
        self.preempt = True                            # a new prompt cuts a step of the streams' tokens short
        self._held = False                             # the last step held the streams back
        self._cut = False                              # the last step was cut short
        self._abortable = False                        # the step in progress may be cut short
        self.aborted = 0                               # steps cut short
        self.steps = 0
        self.copied = 0              # prefixes shared from another slot
        self.closed = False

    # ---- called from any thread -----------------------------------------------------------
    def submit(self, job: Job) -> None:
        now = time.perf_counter()                 # waiting for the step in progress counts as queued
        if self._abortable and not job.submitted and any(s.job is None for s in self.slots):
            self.llm.request_abort()              # the streams' step gives way (`_step`)
        with self._turn():
            if job.submitted:
                return
            job.submitted, job.t_submit = True, now
            if self.closed:
                job.finish("error", SessionClosed("the session is closed"))
                return
            self.waiting.append(job)
            self.wake.notify_all()

    def pump(self, job: Job | None = None) -> None:
        """One step, unless `job` already has something to read (another thread's step)."""
        with self._turn():
            if job is None or not job.has_output():
                self._step()

    def cancel(self, job: Job) -> None:
        """End a job now (its slot is free when this returns)."""
        with self._turn():
            if job in self.waiting:
                self.waiting.remove(job)
            self._finish(job, "cancelled")

    def close(self) -> None:
        """Cancel every job; nothing runs on the Llm after this returns."""
        with self._turn():
            for job in list(self.waiting) + [s.job for s in self.slots if s.job is not None]:
                if job in self.waiting:
                    self.waiting.remove(job)
                self._finish(job, "cancelled")
            self.closed = True

    @contextlib.contextmanager
    def borrow(self, timeout: float = BORROW_WAIT_S, cancelled=None):
        """Hold the Llm for work outside the scheduler (Emu's regression loop): -> a sequence
        to use; no step runs until the block ends. With every slot busy it waits (steps go on
        meanwhile, and replies still waiting are placed after it) until a reply ends; after
        `timeout` seconds it raises SlotsBusy, and it gives up with SessionClosed when the
        session closes or `cancelled()` turns true. A running reply is never cancelled for it."""
        deadline = time.monotonic() + timeout
        with self._turn():
            self.borrowers += 1
            try:
                while not self.closed and all(s.job is not None for s in self.slots):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SlotsBusy(f"all {len(self.slots)} sequences stayed busy with replies for "
                                        f"{timeout:g} s; retry later")
                    if cancelled is not None and cancelled():
                        raise SessionClosed("cancelled while waiting for a free sequence")
                    self.freed.clear()
                    self._release()               # steps go on meanwhile
                    try:
                        self.freed.wait(min(left, BORROW_POLL_S))
                    finally:
                        self._acquire()
            finally:
                self.borrowers -= 1
            if self.closed:
                raise SessionClosed("the session is closed")
            slot = min((s for s in self.slots if s.job is None), key=lambda s: s.last_used)
            slot.prompt_len = 0                   # what it held is not a prompt worth a snapshot
            yield slot.seq

    def busy(self) -> bool:
        return bool(self.waiting) or any(s.job is not None for s in self.slots)

    # ---- the lock, taken in turn ----------------------------------------------------------------
    def _acquire(self) -> None:
        with self._queue:
            self._contenders += 1
        self.lock.acquire()
        with self._queue:
            self._contenders -= 1
            self._entered += 1
            self._queue.notify_all()

    def _release(self) -> None:
        """Release `lock`; if others wait for it, let each of them take it before going on."""
        self.lock.release()
        with self._queue:
            if self._contenders:
                turn = self._entered + self._contenders
                self._queue.wait_for(lambda: self._entered >= turn, HANDOFF_S)

    @contextlib.contextmanager
    def _turn(self):
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def wait_for_work(self, timeout: float) -> bool:
        with self.wake:
            return self.wake.wait_for(self.busy, timeout)

    def active(self) -> int:
        return sum(s.job is not None for s in self.slots)

    # ---- one step (lock held) ---------------------------------------------------------------
    def _step(self) -> None:
        if self.closed:
            return
        self.steps += 1
        for job in [j for j in self.waiting if j.cancel_requested.is_set()]:
            self.waiting.remove(job)
            self._finish(job, "cancelled")
        for slot in self.slots:
            if slot.job is not None and slot.job.cancel_requested.is_set():
                self._finish(slot.job, "cancelled")
        while self.waiting and sum(s.job is None for s in self.slots) > self.borrowers:
            job = self.waiting.popleft()
            try:
                self._place(job)
            except Exception as e:            # a failed restore or copy: this job fails, not the step
                log.error("placing a reply failed: %s: %s", type(e).__name__, e)
                self._finish(job, "error", e)
        running = [s.job for s in self.slots if s.job is not None]
        streaming = [j for j in running if j.next_token is not None]
        reading = sorted((j for j in running if j.todo), key=lambda j: j.t_placed)
        # A prompt nothing of which is read yet goes first: its first chunk (prefill_chunk cells)
        # is this step's batch, and the streams' tokens wait for the next step (on a compute-bound CPU they would
        # have cost as much inside this step: their next token comes no later, and the new
        # reply's first token, for a prompt that fits in one chunk, comes a k-token step sooner).
        # Never two such steps in a row, so a flood of new requests cannot stall the streams.
        held, cut = self._held, self._cut              # why the streams' tokens missed the last step
        self._cut = False
        fresh = self.first_chunk_first and any(not j.read_started for j in reading) and not held
        if streaming and fresh:
            streaming = []
            self._held = True
            reading.sort(key=lambda j: j.read_started)     # the new prompts' chunks first (stable)
        else:
            self._held = False
        budget = self.llm.n_batch - len(streaming)
        chunk = min(budget, self.prefill_chunk) if streaming or self._held else budget
        runs, owners = [(j.seq, [j.next_token], True) for j in streaming], list(streaming)
        media: list[Job] = []
        for job in reading:
            if chunk <= 0:
                break
            is_media, run = split_runs(job.todo[:chunk])[0]
            if is_media:
                media.append(job)
                continue
            job.todo = job.todo[len(run):]
            job.read_started = True
            runs.append((job.seq, run, not job.todo))
            owners.append(job)
            chunk -= len(run)
        if runs:
            # Only a step of the streams' tokens alone, and not right after one that held them
            # back or was cut short, may be cut short (the new prompt's chunk then goes alone in
            # the next step, and the streams' tokens in the one after): however many prompts
            # arrive, the streams advance at least every third step.
            abortable = self.preempt and self.llm.can_abort and not reading and not held and not cut
            if abortable:
                self.llm.abort_flag.value = 0
                self._abortable = True
            try:
                where = self.llm.decode_step(runs, abortable)
            except DecodeAborted:
                self.aborted += 1
                self._cut = True
                return
            except Exception as e:
                for job in owners:
                    self._finish(job, "error", e)
                return
            finally:
                self._abortable = False
            for job, idx in zip(owners, where):
                job.next_token = None
                if idx is not None:
                    self._sample(job, idx)
        for job in media:
            if chunk <= 0:
                break
            run = split_runs(job.todo[:chunk])[0][1]
            job.todo = job.todo[len(run):]
            job.read_started = True
            chunk -= len(run)
            try:
                self.llm.decode_media(run, job.fill, not job.todo, job.seq)
            except Exception as e:
                self._finish(job, "error", e)
                continue
            if not job.todo:
                self._sample(job, -1)

    def _sample(self, job: Job, idx: int) -> None:
        if len(job.token_ids) < job.min_new:
            self.llm.suppress_eog(idx)
        tok = self.llm.sample(job.sampler, idx)
        if job.accept(tok):
            job.next_token = tok
        else:
            self._finish(job)

    def _place(self, job: Job) -> None:
        """Give a waiting job the free slot that serves it best and fill in its prefix."""
        llm, cells = self.llm, job.cells
        # a context made small (low memory) grows to hold the prompt and its longest answer
        llm.reserve(min(len(cells) + job.opts.max_tokens, llm.n_ctx_max))
        cap = len(cells) - 1                          # the last cell is always decoded (its logits)

        def shared(seq_cells) -> int:
            return min(common_prefix(seq_cells, cells), cap)
        free = [s for s in self.slots if s.job is None]

        def value(slot) -> tuple:            # cells kept minus cells lost (another chat's), then LRU
            held = llm.seqs[slot.seq]
            return 2 * shared(held) - len(held), -slot.last_used
        dst = max(free, key=value)
        have = shared(llm.seqs[dst.seq])
        if have < min(len(llm.seqs[dst.seq]), dst.prompt_len):
            self.snapshots.save(dst.seq)             # another conversation's prompt is about to go
        src = max(self.slots, key=lambda s: shared(llm.seqs[s.seq]))
        from_slot = shared(llm.seqs[src.seq])
        key, from_snapshot = self.snapshots.best(cells)
        from_snapshot = min(from_snapshot, cap)
        if from_snapshot >= max(have, from_slot) + MIN_GAIN_CELLS:
            self.snapshots.restore(key, dst.seq)
            job.snapshot_restored = True
            have = from_snapshot
        elif from_slot >= have + MIN_GAIN_CELLS:
            llm.copy_prefix(src.seq, dst.seq, from_slot)
            self.copied += 1
            have = from_slot
        llm.truncate(have, dst.seq)
        dst.job, dst.prompt_len = job, len(cells)
        job.placed(dst.seq, have)

    def _finish(self, job: Job, reason: str | None = None, error: BaseException | None = None) -> None:
        for slot in self.slots:
            if slot.job is job:
                slot.job, slot.last_used = None, self.steps
                self.freed.set()
        job.finish(reason, error)
