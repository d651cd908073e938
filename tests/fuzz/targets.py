"""Fuzz targets: bytes from anywhere -> the runtime's own decoding path.

Each target takes one input (the bytes of a file or a request body) and runs it through
what the runtime does with such an input: `modalities.KINDS[kind]` decode -> key ->
prepare with the preprocess record a real bundle carries. The contract under test:
bad input raises the runtime's one clear error (`EXPECTED`, one line) and nothing else;
no crash, no hang, no unbounded memory (run.py gives libFuzzer the time and RSS limits).

Used by run.py (atheris, coverage-guided) and by tests/test_fuzz_corpus.py (a replay of
the committed corpus in `make test`).
"""
from __future__ import annotations

from typing import Callable

# The preprocess records of shipped bundles (export/minigpt4.py BLIP2_IMAGE,
# export/bubogpt.py BUBOGPT_IMAGE / BUBOGPT_AUDIO, export/pandagpt.py MODALITIES).
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SPECS = {
    "image": [{"kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
               "mean": CLIP_MEAN, "std": CLIP_STD},
              {"kind": "image", "size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
               "mean": CLIP_MEAN, "std": CLIP_STD}],
    "audio": [{"kind": "audio", "recipe": "imagebind"}, {"kind": "audio", "recipe": "bubogpt"}],
    "video": [{"kind": "video"}],
    "thermal": [{"kind": "thermal"}],
    "depth": [{"kind": "depth"}],
    "imu": [{"kind": "imu"}],
}


def _expected():
    from scops.runtime.errors import InputError
    return (InputError,)


def _check_message(e: Exception) -> None:
    msg = str(e)
    if not msg or "\n" in msg:
        raise AssertionError(f"{type(e).__name__} is not one clear line: {msg!r}")


def media_target(kind: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        import numpy as np

        from scops.runtime.modalities import KINDS
        k = KINDS[kind]
        expected = _expected()
        for spec in SPECS[kind]:
            try:
                decoded = k.decode(data, spec)
                k.key(decoded)
                batch = k.prepare(decoded, spec)
            except expected as e:
                _check_message(e)
                return                      # decoding failed: the same for every spec
            if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim < 2:
                raise AssertionError(f"{kind}: prepare gave {type(batch).__name__} "
                                     f"{getattr(batch, 'dtype', '')} {getattr(batch, 'shape', '')}")
            if not np.all(np.isfinite(batch)):
                raise AssertionError(f"{kind}: prepared batch holds NaN or inf")
    run.__name__ = f"fuzz_{kind}"
    return run


TARGETS: dict[str, Callable[[bytes], None]] = {k: media_target(k) for k in SPECS}
# Largest input libFuzzer makes per target (bytes): room for a real small file of the kind.
MAX_LEN = {"image": 65536, "audio": 65536, "video": 131072, "thermal": 32768, "depth": 32768, "imu": 65536}
