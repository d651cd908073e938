"""Bounded KV snapshots for a server that interleaves several conversations.

The session's KV holds one conversation at a time and `Llm.sync` keeps its longest
common prefix with the next request. When clients take turns, each request would throw
away the previous client's cache; this keeps up to `capacity` copies (LRU) and, before a
request is served, puts back the one that shares the longest prefix with it when that
beats what the KV holds now. A copy is taken only when the KV is about to lose part of
the previous request's prompt (the next request belongs to another chat), so a single
client extending its own chat never pays for one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

# Four snapshots: one per recently active conversation is enough for a handful of local
# clients; each costs (cells x per-cell KV bytes) of RAM (~0.5 MiB per cell for 7B f16).
DEFAULT_SNAPSHOTS = 4
# Restoring copies the whole state back; below this many extra cells decoding is as cheap.
MIN_GAIN_CELLS = 8


def count_common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two cell lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StateCache:
    """Snapshots of `llm` (an Llm with save_state/load_state), keyed by their cells."""

    def __init__(self, llm, capacity: int = DEFAULT_SNAPSHOTS):
        self.llm = llm
        self.capacity = capacity
        self._states: OrderedDict = OrderedDict()    # tuple(cells) -> LlmState
        self._prompt_len = 0                         # cells of the last request's prompt
        self.saved = 0
        self.restored = 0

    def __len__(self) -> int:
        return len(self._states)

    def prepare(self, cells: Sequence) -> int:
        """Make the KV the best starting point for `cells`; returns the usable prefix length."""
        if self.capacity <= 0:
            return count_common_prefix(self.llm.cells, cells)
        current = count_common_prefix(self.llm.cells, cells)
        # Worth a copy only if this request drops part of the previous *prompt* (another
        # chat); a chat going on drops at most the tail of its last answer, re-rendered.
        if current < min(len(self.llm.cells), self._prompt_len):
            self._save_current()
        self._prompt_len = len(cells)
        best_key, best = None, current
        for key in self._states:
            n = count_common_prefix(key, cells)
            if n > best:
                best_key, best = key, n
        if best_key is None or best - current < MIN_GAIN_CELLS:
            return current
        self._states.move_to_end(best_key)
        self.llm.load_state(self._states[best_key])
        self.restored += 1
        return best

    def _save_current(self) -> None:
        key = tuple(self.llm.cells)
        if not key:
            return
        if key in self._states:
            self._states.move_to_end(key)
            return
        # a snapshot that is a prefix of this one can never share more with a request
        for old in [k for k in self._states if len(k) <= len(key) and key[:len(k)] == k]:
            del self._states[old]
        self._states[key] = self.llm.save_state()
        self.saved += 1
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)
