"""A bounded walk over a GGUF file's header, before llama.cpp (or gguf-py) reads it.

Local model runners have shipped loader bugs that read out of bounds on crafted files,
and gguf-py's reader loops over an array's declared length without checking it against
the file (a 2^60-element array hangs it). This walk never trusts a count: every string,
array and tensor must fit in the bytes that remain, counts are capped, every tensor's
data must lie inside the file. The format (magic, version, tensor and KV counts, typed
KV pairs, tensor infos, aligned data) is GGUF v2/v3 as gguf-py documents it.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import BundleError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# LLaMA-65B has 723 tensors, a 405B model about 1.1k; a GGUF's KV count is a few dozen.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIMS = 4                               # GGML_MAX_DIMS
MAX_NAME = 256                             # GGML_MAX_NAME is 64; keys are short too
MAX_ELEMENTS = 1 << 40
DEFAULT_ALIGNMENT = 32                     # GGUF_DEFAULT_ALIGNMENT
# ggml type id -> (elements per block, bytes per block): ggml.h's type traits, as gguf-py's
# GGML_QUANT_SIZES lists them (a test keeps the two equal; the runtime does not import gguf-py,
# which pulls in sentencepiece and yaml).
GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
# GGUFValueType -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise BundleError(f"{self.path.name}: not a valid GGUF ({what} at byte {self.pos})")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            self.fail("truncated header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, limit: int | None = None) -> bytes:
        n = self.take("<Q")
        if n > len(self.buf) - self.pos or (limit is not None and n > limit):
            self.fail(f"string of {n} bytes")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9 or depth > 2:
            self.fail(f"value type {vtype}")
        itype, count = self.take("<I"), self.take("<Q")
        smallest = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8   # a string is >= its 8-byte length
        if count * smallest > len(self.buf) - self.pos:
            self.fail(f"array of {count} items")
        items = [self.value(itype, depth + 1) for _ in range(count)]
        return items if itype != 8 else len(items)        # string arrays: only their length is kept


def check_gguf(path: Path) -> dict:
    """Walk the header; return {"version", "n_tensors", "kv": {key: scalar or list length}}.
    Raises BundleError on anything a loader could be fooled by."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise BundleError(f"{path.name}: not a valid GGUF (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, path)
        if buf[:4] != MAGIC:
            raise BundleError(f"{path.name}: not a GGUF file (magic {bytes(buf[:4])!r})")
        r.pos = 4
        version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
        if version not in VERSIONS:
            r.fail(f"version {version}")
        if not 0 < n_tensors <= MAX_TENSORS or n_kv > MAX_KV:
            r.fail(f"{n_tensors} tensors, {n_kv} metadata keys")
        kv = {}
        for _ in range(n_kv):
            key = r.string(MAX_NAME).decode("utf-8", "replace")
            value = r.value(r.take("<I"))
            kv[key] = len(value) if isinstance(value, list) else value
        infos = []
        for _ in range(n_tensors):
            name = r.string(MAX_NAME)
            n_dims = r.take("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                r.fail(f"tensor {name!r} with {n_dims} dims")
            dims = [r.take("<Q") for _ in range(n_dims)]
            ttype, offset = r.take("<I"), r.take("<Q")
            infos.append((name, dims, ttype, offset))
        alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            r.fail(f"alignment {alignment!r}")
        data_start = -(-r.pos // alignment) * alignment
        for name, dims, ttype, offset in infos:
            if ttype not in GGML_TYPE_SIZES:
                r.fail(f"tensor {name!r} of unknown type {ttype}")
            block, type_size = GGML_TYPE_SIZES[ttype]
            n = 1
            for d in dims:
                n *= d
            if not 0 < n <= MAX_ELEMENTS or dims[0] % block:
                r.fail(f"tensor {name!r} of shape {dims}")
            nbytes = n // block * type_size
            if offset % alignment or data_start + offset + nbytes > size:
                raise BundleError(f"{path.name}: tensor {name.decode('utf-8', 'replace')!r} lies outside the file "
                                  f"(offset {offset} + {nbytes} bytes > {size - data_start}); truncated or crafted")
    return {"version": version, "n_tensors": n_tensors, "kv": kv}
