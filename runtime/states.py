"""Bounded KV snapshots of conversations that lost their sequence to another one.

The scheduler places each reply in a free sequence; when that sequence held another
conversation whose prompt would be cut, a copy of it is kept here (LRU, up to
`capacity`). A later request that shares more with a snapshot than with any sequence
gets it put back instead of decoding again. A conversation going on in its own sequence
never costs a copy (its new turn extends what the sequence holds).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from .llm import common_prefix

# Four snapshots: one per recently active conversation is enough for a handful of local
# clients; each costs (cells x per-cell KV bytes) of RAM (~0.5 MiB per cell for 7B f16).
DEFAULT_SNAPSHOTS = 4
# Restoring or copying a prefix moves the whole state; below this many extra cells
# decoding them is as cheap.
MIN_GAIN_CELLS = 8


class SnapshotStore:
    """Saved sequences of `llm` (an Llm with save_state/load_state), keyed by their cells."""

    def __init__(self, llm, capacity: int = 0):
        self.llm = llm
        self.capacity = capacity
        self._states: OrderedDict = OrderedDict()    # tuple(cells) -> LlmState
        self.saved = 0
        self.restored = 0

    def __len__(self) -> int:
        return len(self._states)

    def save(self, seq: int) -> None:
        """Keep a copy of what sequence `seq` holds (no-op when disabled or already kept)."""
        key = tuple(self.llm.seqs[seq])
        if self.capacity <= 0 or not key:
            return
        if key in self._states:
            self._states.move_to_end(key)
            return
        # a snapshot that is a prefix of this one can never share more with a request
        for old in [k for k in self._states if len(k) <= len(key) and key[:len(k)] == k]:
            del self._states[old]
        self._states[key] = self.llm.save_state(seq)
        self.saved += 1
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def best(self, cells: Sequence) -> tuple[tuple | None, int]:
        """The snapshot sharing the longest prefix with `cells`, and that length."""
        best_key, best = None, 0
        for key in self._states:
            n = common_prefix(key, cells)
            if n > best:
                best_key, best = key, n
        return best_key, best

    def restore(self, key: tuple, seq: int) -> None:
        """Load a snapshot into sequence `seq` (it stays stored: another chat may fork it)."""
        self._states.move_to_end(key)
        self.llm.load_state(self._states[key], seq)
        self.restored += 1
