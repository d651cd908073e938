"""Which encoders are in memory: built at open or on first use, dropped after idle time.

    encoders = Encoders(build, ["image"], lazy=True, idle_s=30)
    with encoders.use("image") as enc:       # builds it if needed; never dropped while in use
        rows = enc.encode_rows(enc.encode_base(batch))

The low-memory profile builds an encoder (its ONNX sessions) only when a turn brings its
modality, and drops it again once it has been idle for `idle_s` seconds, handing the
freed heap back to the system (glibc malloc_trim), so a board's RAM is free for the LLM
and for other programs between pictures. `encoders[m]` is the same as a short `use(m)`;
`items()` / `values()` list only the encoders built now.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterable

log = logging.getLogger("scops")


def release_heap() -> None:
    """Return free heap pages to the system (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Encoders:
    """A mapping modality -> encoder whose entries are built on demand and dropped when idle."""

    def __init__(self, build: Callable[[str], object], modalities: Iterable[str], lazy: bool = False,
                 idle_s: float = 0.0):
        self._build = build
        self._names = list(modalities)
        self._loaded: dict = {}
        self._facts: dict = {}
        self._busy: dict = {m: 0 for m in self._names}
        self._last: dict = {m: 0.0 for m in self._names}
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.idle_s = float(idle_s)
        self.loads = 0                 # encoders built so far (first use, or again after a drop)
        self.drops = 0
        if not lazy:
            for m in self._names:
                self._loaded[m] = build(m)
                self.loads += 1
            release_heap()

    def __contains__(self, modality) -> bool:
        return modality in self._busy

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def items(self):
        """(modality, encoder) of the encoders built now: all of them unless lazy or dropped."""
        with self._lock:
            return list(self._loaded.items())

    def values(self):
        return [enc for _, enc in self.items()]

    def fact(self, modality: str, name: str):
        """An attribute of the encoder that does not change between builds (e.g. whether it
        reads the instruction), answered without building it again after a drop."""
        key = (modality, name)
        if key not in self._facts:
            self._facts[key] = getattr(self[modality], name)
        return self._facts[key]

    def __getitem__(self, modality):
        with self.use(modality) as enc:
            return enc

    @contextmanager
    def use(self, modality: str):
        with self._lock:
            enc = self._loaded.get(modality)
            if enc is None:
                t0 = time.perf_counter()
                enc = self._loaded[modality] = self._build(modality)
                self.loads += 1
                release_heap()           # what onnxruntime read the graphs into, before their tensors
                log.debug("%s encoder loaded in %.0f ms", modality, (time.perf_counter() - t0) * 1e3)
            self._busy[modality] += 1
        try:
            yield enc
        finally:
            with self._lock:
                self._busy[modality] -= 1
                self._last[modality] = time.monotonic()
            self._schedule()

    def _schedule(self) -> None:
        if self.idle_s <= 0:
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.idle_s, self.drop_idle)
            self._timer.daemon = True
            self._timer.start()

    def drop_idle(self, older_than: float | None = None) -> list[str]:
        """Drop every encoder not in use and idle for `older_than` seconds (default idle_s)."""
        limit = self.idle_s if older_than is None else older_than
        now = time.monotonic()
        with self._lock:
            gone = [m for m in list(self._loaded)
                    if self._busy[m] == 0 and now - self._last[m] >= limit]
            for m in gone:
                del self._loaded[m]
            self.drops += len(gone)
            pending = any(self._busy[m] == 0 for m in self._loaded)
        if gone:
            release_heap()
            log.debug("dropped idle encoder(s): %s", ", ".join(gone))
        elif pending:
            self._schedule()             # woke early (a later use): look again after idle_s
        return gone

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._loaded.clear()
