"""ImageBind-family media preprocessing without torch: video, image, depth, thermal, IMU
(audio: runtime/audio.py), and the clip sampler and bilinear weights both share.

Each function reproduces a transform of the originals (facebookresearch/ImageBind
imagebind/data.py; PandaGPT code/model/ImageBind/data.py) and returns float32 arrays
laid out as the ONNX stages of export/imagebind.py take them, one row per clip (x crop).
Every failure is one `InputError` line naming the input.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, _read_bytes, decode_image, open_image,
                         preprocess_image, short_side_crop)

MAX_VIDEO_SECONDS = 600.0
MAX_VIDEO_FRAMES = 600 * 120          # 10 min at 120 fps
MAX_VIDEO_BYTES = 2 << 30
MAX_VIDEO_PIXELS = 8192 * 4320        # 8K frame
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# load_and_transform_vision_data: Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std
IMAGEBIND_IMAGE_SPEC = {"size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
                        "mean": CLIP_MEAN, "std": CLIP_STD}


@dataclass(frozen=True)
class VideoOptions:
    """load_and_transform_video_data: 5 clips x 2 s, 2 frames each, short side 224, 3 crops."""
    clips: int = 5
    clip_seconds: int = 2
    frames_per_clip: int = 2
    size: int = 224
    crops: int = 3


def clip_starts(duration: float, clip_seconds: int, clips: int) -> list[Fraction]:
    """pytorchvideo ConstantClipsPerVideoSampler: starts k * max(D - c, 0) / n, k < n
    (exact Fractions, as the original; clips of audio shorter than c all start at 0)."""
    step = Fraction(max(duration - clip_seconds, 0)) / clips
    return [step * k for k in range(clips)]


def _linear_resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_out, n_in] weights of torch bilinear (align_corners=False) along one axis;
    antialias=True widens the triangle by the downscale factor as torch/PIL do."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    if antialias and scale > 1:
        centers = (np.arange(n_out) + 0.5) * scale
        lo = np.maximum(0, np.floor(centers - scale + 0.5)).astype(int)
        hi = np.minimum(n_in, np.floor(centers + scale + 0.5)).astype(int)
        for j in range(n_out):
            i = np.arange(lo[j], hi[j])
            tri = np.maximum(0.0, 1.0 - np.abs((i + 0.5 - centers[j]) / scale))
            w[j, i] = tri / tri.sum()
        return w
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def _open_video(src):
    import av

    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = _read_bytes(src, "video", MAX_VIDEO_BYTES)
        target = io.BytesIO(data)
    else:
        name, target = str(src), str(src)
        try:
            size = Path(src).stat().st_size
        except OSError as e:
            raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
        if not 0 < size <= MAX_VIDEO_BYTES:
            raise InputError(f"{name}: empty file" if size == 0 else
                             f"{name}: {size / 2**20:.0f} MiB is over the {MAX_VIDEO_BYTES >> 20} MiB video limit")
    try:
        container = av.open(target)
    except Exception as e:
        raise InputError(f"{name}: not a readable video ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{name}: has no video stream")
    return container, name


def _frame_count(container, stream) -> int:
    if stream.frames > 0:
        return int(stream.frames)
    count = sum(1 for p in container.demux(stream) if p.size)   # no header count: packets
    container.seek(0)
    return count


def _bilinear_taps(n_in: int, n_out: int, first: int, count: int):
    """Output positions [first, first + count) of torch bilinear (align_corners=False) from
    n_in to n_out: source indices i0, i1 and weight lam of i1 (two taps: no dense matrix)."""
    src = np.maximum((np.arange(first, first + count) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def _short_side_crops(x: np.ndarray, size: int, crops) -> list[np.ndarray]:
    """pytorchvideo ShortSideScale (short side to `size`, long side floor(long/short*size),
    bilinear) then uniform_crop, computed for the crop windows only: [3, H, W] -> [3, S, S]
    per crop. The long axis is gathered first, so a 1 x 30M frame costs what its crops do."""
    _, h, w = x.shape
    nh, nw = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    out = []
    for idx in crops:
        y, x0 = _crop_offsets(nh, nw, size, idx)
        ty, tx = _bilinear_taps(h, nh, y, size), _bilinear_taps(w, nw, x0, size)
        axes = [(1, ty), (2, tx)] if h >= w else [(2, tx), (1, ty)]
        v = x
        for axis, (i0, i1, lam) in axes:
            shape = (1, -1, 1) if axis == 1 else (1, 1, -1)
            a, b = np.take(v, i0, axis=axis), np.take(v, i1, axis=axis)
            v = a + (b - a) * lam.reshape(shape)                  # [3, .., ..] -> size along `axis`
        out.append(v)
    return out


def _crop_offsets(h: int, w: int, size: int, idx: int) -> tuple[int, int]:
    """uniform_crop: centre at ceil((n - size) / 2); crop 0 / 2 at the start / end of
    the long side (width when w >= h)."""
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        y = {0: 0, 1: y, 2: h - size}[idx]
    else:
        x = {0: 0, 1: x, 2: w - size}[idx]
    return y, x


def video_frame_plan(total: int, fps: float, opts: VideoOptions) -> list[list[int]]:
    """Frame indices per clip: EncodedVideoDecord.get_clip takes range(ceil(fps*start),
    min(ceil(fps*end), n)) (duration n / fps), UniformTemporalSubsample keeps
    linspace(0, t-1, k) of them, truncated to ints. [] marks a clip with no frame."""
    plan = []
    for s in clip_starts(total / fps, opts.clip_seconds, opts.clips):
        first, stop = math.ceil(fps * s), min(math.ceil(fps * (s + opts.clip_seconds)), total)
        picks = np.linspace(0, stop - first - 1, opts.frames_per_clip).astype(np.int64)
        plan.append([first + int(p) for p in picks] if stop > first else [])
    return plan


def preprocess_video(src, opts: VideoOptions = VideoOptions()) -> np.ndarray:
    """A video file -> float32 [clips * crops, 3, frames_per_clip, size, size] (clip-major,
    crops 0, 1, 2 within a clip), decoded with PyAV, sampled as decord + pytorchvideo do."""
    container, name = _open_video(src)
    mean, std = np.asarray(CLIP_MEAN, np.float32)[:, None, None], np.asarray(CLIP_STD, np.float32)[:, None, None]
    frames = {}
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0)
        h, w = stream.codec_context.height, stream.codec_context.width
        if fps <= 0 or h <= 0 or w <= 0:
            raise InputError(f"{name}: video stream has no frame rate or size")
        if h * w > MAX_VIDEO_PIXELS:
            raise InputError(f"{name}: {w}x{h} frames are over the {MAX_VIDEO_PIXELS} pixel limit")
        total = _frame_count(container, stream)
        if total == 0:
            raise InputError(f"{name}: video has no frames")
        if total > MAX_VIDEO_FRAMES or total / fps > MAX_VIDEO_SECONDS:
            raise InputError(f"{name}: {total / fps:.0f} s / {total} frames is over the video limit "
                             f"({MAX_VIDEO_SECONDS:.0f} s, {MAX_VIDEO_FRAMES} frames)")
        plan = video_frame_plan(total, fps, opts)
        if not all(plan):
            raise InputError(f"{name}: a clip of the video holds no frame")
        need = set(i for clip in plan for i in clip)
        crops = range(3) if opts.crops == 3 else (1,)
        for i, frame in enumerate(container.decode(stream)):   # only the needed frames are kept
            if i in need:
                x = frame.to_ndarray(format="rgb24").astype(np.float32).transpose(2, 0, 1) / 255.0  # -> [3, H, W]
                frames[i] = [(c - mean) / std for c in _short_side_crops(x, opts.size, crops)]
            if len(frames) == len(need):
                break
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: corrupt video ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not frames:
        raise InputError(f"{name}: corrupt video (no frame could be decoded)")
    # fewer decodable frames than the header said: later picks take the last decoded one
    frames.update({i: frames[max(frames)] for i in need - frames.keys()})
    out = [np.stack([frames[i][k] for i in clip], axis=1)          # T x [3, S, S] -> [3, T, S, S]
           for clip in plan for k in range(len(crops))]
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)  # -> [clips*crops, 3, T, S, S]


def preprocess_imagebind_image(src) -> np.ndarray:
    """An image -> float32 [3, 224, 224] (load_and_transform_vision_data)."""
    return preprocess_image(decode_image(src), IMAGEBIND_IMAGE_SPEC)


def _decode_single_channel(src, kind: str):
    data, name = _read_bytes(src, kind, MAX_IMAGE_BYTES)
    try:
        img = open_image(data)
        if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: {img.size[0]}x{img.size[1]} is over the {MAX_IMAGE_PIXELS / 1e6:g} MP limit")
        img.load()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: not a readable {kind} image ({type(e).__name__})") from None
    return img, name


def preprocess_thermal(src, size: int = 224) -> np.ndarray:
    """PandaGPT load_and_transform_thermal_data: convert("L"), Resize(224, bicubic),
    CenterCrop(224), ToTensor (0..1, no mean/std) -> float32 [1, 224, 224]."""
    img, _ = _decode_single_channel(src, "thermal")
    x = np.asarray(short_side_crop(img.convert("L"), size), np.float32) / 255.0
    return x[None]                                             # [S, S] -> [1, S, S]


def preprocess_depth(src, size: int = 224) -> np.ndarray:
    """A single-channel depth image (8- or 16-bit PNG) -> float32 [1, 224, 224] in 0..1
    (value / dtype max), short side 224 bicubic + centre crop. No original loader exists
    (ImageBind's data.py has none): the scale the depth trunk expects is unverified."""
    img, name = _decode_single_channel(src, "depth")
    top = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}.get(img.mode)
    img, top = (img, top) if top else (img.convert("L"), 255.0)
    x = np.asarray(short_side_crop(img.convert("F"), size), np.float32) / np.float32(top)
    if not np.all(np.isfinite(x)):       # a float TIFF may hold NaN / inf (or overflow the resize)
        raise InputError(f"{name}: depth has NaN or infinite values")
    return x[None]


def preprocess_imu(src, channels: int = 6, length: int = 2000) -> np.ndarray:
    """A .npy IMU window -> float32 [6, 2000] ([2000, 6] is transposed): exactly the
    original IMUPreprocessor's img_size [6, 2000]; other lengths are refused."""
    data, name = _read_bytes(src, "IMU", 64 << 20)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        raise InputError(f"{name}: not a .npy array") from None
    if arr.ndim == 2 and arr.shape == (length, channels):
        arr = arr.T
    if arr.shape != (channels, length) or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name}: IMU must be a numeric {channels}x{length} array, got {arr.dtype} {list(arr.shape)}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: IMU has NaN or infinite values")
    return arr
