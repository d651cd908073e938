"""Small media files made on the spot for tests: videos whose frames say their own number."""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def frame_pattern(i: int, h: int, w: int) -> np.ndarray:
    """An RGB frame that identifies frame i (< 4096): 4 bits in each of three 16x16 blocks
    (levels 15 apart, robust to compression) over a smooth gradient; 48 px wide at least."""
    img = np.zeros((h, w, 3), np.uint8)
    img[16:, :, 2] = (np.arange(w)[None, :] * 255 // max(w - 1, 1)).astype(np.uint8)
    img[16:, :, 0] = (i * 37) % 256
    for b in range(3):                                  # digits base 16, three grey 16-px blocks
        digit = (i >> (4 * b)) & 15
        img[:16, 16 * b:16 * (b + 1), :] = 8 + 15 * digit
    return img


def frame_number(rgb: np.ndarray, scale_w: float = 1.0, scale_h: float = 1.0) -> int:
    """Read frame_pattern's number back from a (possibly rescaled) frame."""
    n = 0
    for b in range(3):
        y, x = int(8 * scale_h), int((16 * b + 8) * scale_w)
        patch = rgb[y - 2:y + 3, x - 2:x + 3].astype(float)
        digit = int(round((patch.mean() - 8) / 15))
        n |= max(0, min(15, digit)) << (4 * b)
    return n


def make_video(path, frames: int, fps, w: int = 64, h: int = 48, codec: str = "mpeg4", gop: int = 12,
               pattern=frame_pattern) -> str:
    """Encode `frames` frames at `fps` (a number or Fraction) with a key frame every `gop`."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "mpeg4":
            s.codec_context.options = {"qscale": "2"}
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)
