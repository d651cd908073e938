"""Media decoding and preprocessing: bytes in, normalised arrays out (numpy + Pillow only).

Every failure is an InputError with one line naming the input and the reason. Limits
are checked from the header, before any pixel is decoded (a decompression bomb never
allocates its pixels).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np

from .errors import InputError

# 64 MiB of encoded image is far above any photo a chat needs (a 50 MP JPEG is ~25 MB).
MAX_IMAGE_BYTES = 64 << 20
# 50 MP: a full-frame camera photo. Pillow's own bomb guard (89 MP warning, 179 MP
# error) is above this; we refuse earlier and before decoding.
MAX_IMAGE_PIXELS = 50_000_000

# Containers a photo arrives in. Pillow opens ~40 formats, some through external programs
# (EPS runs Ghostscript) or rarely-exercised parsers; only these are attempted.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF")

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, "PIL.Image.Image"]


def _read_bytes(src, kind: str, limit: int) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), f"<{kind} bytes>"
    else:
        path = Path(src)
        name = str(path)
        try:
            size = path.stat().st_size
            if size > limit:
                raise InputError(f"{name}: {size / 2**20:.1f} MiB is over the {limit >> 20} MiB {kind} limit")
            data = path.read_bytes()
        except InputError:
            raise
        except IsADirectoryError:
            raise InputError(f"{name}: is a directory, not an {kind} file") from None
        except OSError as e:
            raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
    if not data:
        raise InputError(f"{name}: empty file")
    if len(data) > limit:
        raise InputError(f"{name}: {len(data) / 2**20:.1f} MiB is over the {limit >> 20} MiB {kind} limit")
    return data, name


def image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build has a reader for."""
    from PIL import Image
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def open_image(data: bytes):
    """Pillow's lazy open (header only) of an image in one of IMAGE_FORMATS."""
    from PIL import Image
    return Image.open(io.BytesIO(data), formats=image_formats())


def decode_image(src: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any Pillow-readable image -> RGB uint8 [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            raise InputError(f"image array must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise InputError(f"image array of {arr.shape[1]}x{arr.shape[0]} is over the {max_pixels} pixel limit")
        return np.ascontiguousarray(arr)
    if isinstance(src, Image.Image):
        img, name = src, "<PIL image>"
    else:
        data, name = _read_bytes(src, "image", MAX_IMAGE_BYTES)
        try:
            img = open_image(data)
        except UnidentifiedImageError:
            raise InputError(f"{name}: not an image (unrecognised format; "
                             f"reads {', '.join(image_formats())})") from None
        except Exception as e:
            raise InputError(f"{name}: not a readable image ({e})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(f"{name}: {w}x{h} is over the {max_pixels / 1e6:g} MP limit (decompression bomb?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            rgb = img if img.mode == "RGB" else img.convert("RGB")     # no 4 B/pixel copy when RGB already
            rgb.load()
    except Exception as e:
        reason = str(e) or type(e).__name__
        raise InputError(f"{name}: corrupt or truncated image ({reason})") from None
    return np.asarray(rgb, dtype=np.uint8)


def content_hash(arr: np.ndarray, salt: str = "") -> str:
    """Key of a decoded input: shape, dtype and bytes (same picture, any container -> same key)."""
    h = hashlib.sha256(salt.encode())
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()[:32]


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}   # PIL.Image.Resampling values


# Above this many crops' worth of pixels (aspect ratio 16:1) the short-side resize is not
# materialised before the crop: 65535 x 16 -> 917490 x 224 would cost ~600 MB and seconds.
MAX_RESIZE_CROPS = 16


def short_side_crop(img, size: int, resample: int = 3):
    """torchvision Resize(S) + CenterCrop(S) on a PIL image: short side to S, long side
    int(S * long / short) (truncated); crop offsets int(round((n - S) / 2)).

    Pillow maps each output pixel to its centre in the source, so resizing only the source
    box that lands in the crop computes the same mapping (pixels agree up to Pillow's
    rounding of the box, a level or two on natural images). That path is taken only when
    the full resize would be huge (aspect ratio over 16:1); the plain one, bit-exact with
    torchvision, otherwise.
    """
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    if nw * nh <= MAX_RESIZE_CROPS * size * size:
        img = img.resize((nw, nh), resample=resample)
        return img.crop((left, top, left + size, top + size))
    sx, sy = w / nw, h / nh                                   # source pixels per resized pixel
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), resample=resample, box=box)


def preprocess_image(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, S, S] as the family's original transforms do.

    resize "squash": straight to S x S (BLIP-2 / MiniGPT-4);
    resize "short_side_crop": short side to S, then centre crop S x S (BuboGPT, ImageBind);
    resize "pad_square": centred on a max(W, H) square of `pad_color`, then S x S (LEGO:
    LLaVA's expand2square, then CLIPImageProcessor, whose short-side resize and centre
    crop of a square are one resize).
    Pillow's resize is what torchvision's Resize and HF's image processors run on PIL
    images, so pixels match.
    """
    from PIL import Image

    size = int(spec["size"])
    resample = _RESAMPLE[spec.get("interpolation", "bicubic")]
    img = Image.fromarray(rgb)
    mode = spec.get("resize", "squash")
    if mode == "pad_square":
        img = pad_square_resize(img, tuple(spec["pad_color"]), size, resample)
    elif mode == "squash":
        img = img.resize((size, size), resample=resample)
    else:
        img = short_side_crop(img, size, resample)
    x = np.asarray(img, dtype=np.float32) / 255.0                    # [S, S, 3]
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))                # [S, S, 3] -> [3, S, S]


# Above this the max(W, H) square of pad_square is not materialised (a 65535 x 16 picture
# would make a 65535^2 canvas: 12.9 GB): every photo up to ~8000 px long stays exact.
MAX_SQUARE_PIXELS = 64_000_000


def pad_square_resize(img, color: tuple, size: int, resample: int = 3):
    """pad_square, then S x S. A square over MAX_SQUARE_PIXELS (an extreme aspect ratio) is
    drawn at S x S directly: the picture resized by S / max(W, H) and pasted at its scaled
    offset (the pixels at the picture's edge differ from the padded resize's blend)."""
    from PIL import Image

    w, h = img.size
    side = max(w, h)
    if side * side <= MAX_SQUARE_PIXELS:
        return pad_square(img, color).resize((size, size), resample=resample)
    scale = size / side
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = Image.new(img.mode, (size, size), color)
    out.paste(img.resize((nw, nh), resample=resample), ((size - nw) // 2, (size - nh) // 2))
    return out


def pad_square(img, color: tuple):
    """expand2square: the picture centred on a max(W, H) square; offsets (max - min) // 2."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out
