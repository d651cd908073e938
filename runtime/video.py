"""Video frames by seeking (PyAV): a few frames of any length of video, in bounded time.

LEGO (GroundingGPT) reads a video as `video_llama/processors/video_processor.py
load_video(n_frms=64, height=224, width=224, sampling="uniform")` does with decord:

    vlen    = the stream's frame count (nb_frames; else avg fps x container duration)
    n       = min(64, vlen)
    indices = np.arange(0, vlen, vlen / n).astype(int)        (frame numbers)
    frames  = decord's frames at those numbers, scaled to 224 x 224 by FFmpeg (bicubic)

Here frame number k is the frame shown at time k / fps: the decoder seeks to the key frame
before it and decodes forward to it, and keeps decoding instead of seeking while the next
pick is near. A 10-hour video costs 64 seeks, never a decode of the whole file; a
broken index can cost at most MAX_DECODE_PER_PICK frames per pick. A video whose header
promises more frames than decode gives repeats its last frame for the missing picks.

Every failure is one `InputError` naming the file.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import _read_bytes

# 8K: the largest frame decoded (one frame of it is 100 MB as RGB).
MAX_VIDEO_PIXELS = 8192 * 4320
# Encoded bytes accepted from memory (a path is never read whole).
MAX_VIDEO_BYTES = 2 << 30
# Frames decoded on the way to one pick before giving up on reaching it exactly (a GOP of
# 20 s at 30 fps); bounds the time a broken seek index can cost.
MAX_DECODE_PER_PICK = 600
# Keep decoding (no seek) while the next pick is this close, in seconds; grows to the
# longest key-frame distance seen, so long GOPs are not decoded twice.
MIN_FORWARD_SECONDS = 2.0


@dataclass(frozen=True)
class VideoInfo:
    frames: int          # decord's len(VideoReader): header count, else fps x duration
    fps: float
    duration: float      # seconds (container duration, else frames / fps)
    width: int
    height: int


def _open(src):
    import av

    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = _read_bytes(src, "video", MAX_VIDEO_BYTES)
        target = io.BytesIO(data)
    else:
        name = str(src)
        try:
            size = Path(src).stat().st_size
        except OSError as e:
            raise InputError(f"{name}: cannot read ({e.strerror or e})") from None
        if size == 0:
            raise InputError(f"{name}: empty file")
        target = name
    try:
        container = av.open(target)
    except Exception as e:
        raise InputError(f"{name}: not a readable video ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{name}: has no video stream")
    return container, name


def probe(container, name: str) -> VideoInfo:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    w, h = stream.codec_context.width, stream.codec_context.height
    if fps <= 0 or w <= 0 or h <= 0:
        raise InputError(f"{name}: video stream has no frame rate or size")
    if w * h > MAX_VIDEO_PIXELS:
        raise InputError(f"{name}: {w}x{h} frames are over the {MAX_VIDEO_PIXELS} pixel limit")
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1e6                   # AV_TIME_BASE
    else:
        duration = 0.0
    frames = int(stream.frames or 0)
    if frames < 1:                                             # decord: fps x duration
        frames = int(fps * (container.duration / 1e6 if container.duration else duration))
    if frames < 1:
        raise InputError(f"{name}: video has no frames (no frame count or duration in its header)")
    return VideoInfo(frames, fps, duration if duration > 0 else frames / fps, w, h)


def uniform_indices(vlen: int, n: int) -> list[int]:
    """load_video(sampling="uniform"): np.arange(0, vlen, vlen / n).astype(int), n = min(n, vlen).
    Float steps can make arange one element longer; the original would then fail on its
    64-entry frame embedding, here the extra one is dropped."""
    n = min(n, vlen)
    return np.arange(0, vlen, vlen / n).astype(int)[:n].tolist()


def read_frames_at(src, times, size: tuple[int, int] | None = None, interpolation: str = "BICUBIC",
                   stats: dict | None = None) -> tuple[list[np.ndarray], VideoInfo]:
    """RGB uint8 frames [H, W, 3] shown at `times` (seconds, ascending; or a function of
    the VideoInfo giving them), scaled to `size` (w, h) by libswscale when given, and the
    video's facts. Picks past the last decodable frame get that frame. `stats`, when
    given, receives the counts of seeks and decoded frames."""
    container, name = _open(src)
    try:
        info = probe(container, name)
        reader = _Reader(container, info)
        out = [_rgb(f, size, interpolation) for f in reader.frames_at(list(times(info) if callable(times) else times))]
        if stats is not None:
            stats.update(seeks=reader.seeks, decoded=reader.decoded)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: corrupt video ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not out:
        why = f"; the decoder says: {reader.error}" if reader.error else ""
        raise InputError(f"{name}: corrupt video (no frame could be decoded{why})")
    return out, info


class _Reader:
    """Seek-and-decode over one open stream; frame k of the header is the frame at k / fps."""

    def __init__(self, container, info: VideoInfo):
        self.container, self.info = container, info
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"
        st = self.stream.start_time
        self.start = float(st * self.stream.time_base) if st is not None else 0.0
        self.seeks = self.decoded = 0
        self.error: str | None = None
        self.forward = MIN_FORWARD_SECONDS
        self.can_seek = True

    def _seek(self, t: float) -> bool:
        """Seek to the key frame before t; False when the file cannot seek (decode on instead)."""
        import av

        tb = self.stream.time_base
        pts = int(math.floor((t + self.start) / tb)) if tb else 0
        try:
            self.container.seek(max(pts, 0), stream=self.stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            self.can_seek = False
            return False
        self.seeks += 1
        return True

    def frames_at(self, times: list[float]) -> list:
        """The decoded frames shown at `times`; fewer (possibly none) when decoding fails."""
        half = 0.5 / self.info.fps
        out, it, last = [], None, None                 # it: decode iterator; last: (time, frame)
        for t in times:
            if last is not None and last[0] + half >= t:           # already there (repeated pick)
                out.append(last[1])
                continue
            landed = None
            fresh = it is None and last is None and t <= self.forward      # at the start: just decode
            if not fresh and (it is None or last is None or t - last[0] > self.forward) and self.can_seek:
                if self._seek(t):
                    it = None
            if it is None:
                it = self.container.decode(self.stream)
            else:
                landed = last[0] if last else None
            got, n = None, 0
            try:
                for frame in it:
                    ft = None if frame.pts is None else float(frame.pts * self.stream.time_base) - self.start
                    ft = ft if ft is not None else (last[0] + 1.0 / self.info.fps if last else 0.0)
                    landed = ft if landed is None else landed
                    last, n = (ft, frame), n + 1
                    self.decoded += 1
                    if ft + half >= t or n >= MAX_DECODE_PER_PICK:
                        got = frame
                        break
            except Exception as e:                              # undecodable data: stop here
                import av
                if not isinstance(e, av.error.FFmpegError):
                    raise
                self.error = self.error or str(e).splitlines()[0][:120]
            if landed is not None:
                self.forward = max(self.forward, t - landed)
            if got is None:                                     # end of stream or decode error
                it = None
                if last is None:
                    return out
                got = last[1]
            out.append(got)
        return out


def _rgb(frame, size, interpolation: str) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=size[0], height=size[1], format="rgb24",
                          interpolation=interpolation).to_ndarray()


def sample_uniform(src, n: int = 64, size: int = 224) -> tuple[np.ndarray, VideoInfo]:
    """LEGO's frames: uint8 [T, size, size, 3], T = min(n, frames), and the video's facts."""
    def times(info: VideoInfo) -> list[float]:
        return [i / info.fps for i in uniform_indices(info.frames, n)]
    frames, info = read_frames_at(src, times, (size, size))
    return np.stack(frames), info


def segment_indices(vlen: int, n: int) -> list[int]:
    """Emu1/utils.py get_index(num_frames, num_segments): the n segments of (vlen - 1) frames,
    seg = (vlen - 1) / n, frame int(seg / 2) + round(seg * i) of each (numpy's round, half to
    even). Always n picks: a video shorter than n frames repeats some."""
    seg = float(vlen - 1) / n
    start = int(seg / 2)
    return [start + int(np.round(seg * i)) for i in range(n)]


def sample_segments(src, n: int = 8) -> tuple[list[np.ndarray], VideoInfo]:
    """Emu's video frames: the n segment picks (segment_indices) at full size, RGB uint8
    [H, W, 3] each, and the video's facts (frame k is the frame shown at k / fps, as decord)."""
    def times(info: VideoInfo) -> list[float]:
        return [k / info.fps for k in segment_indices(info.frames, n)]
    return read_frames_at(src, times)


def _cubic_weights(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic interpolate (align_corners=False, no antialias):
    source x = (i + 0.5) * n_in / n_out - 0.5 (not clamped), taps floor(x) - 1 .. + 2 clamped
    to the edge, Keys' kernel with a = -0.75."""
    def k(d):
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    w = np.zeros((n_out, n_in), np.float64)
    for tap in range(-1, 3):
        idx = base + tap
        np.add.at(w, (np.arange(n_out), np.clip(idx, 0, n_in - 1)), k(src - idx))
    return w


def centre_crop_box(size: int, area: float) -> tuple[int, int]:
    """(offset, side) of the centred square holding `area` of a size x size frame."""
    side = min(size, max(1, int(round(size * math.sqrt(area)))))
    return (size - side) // 2, side


def frames_to_batch(frames: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [T, S, S, 3] -> float32 [T, 3, S, S]: the centre `crop_area` of each frame
    resized back to S (torch bicubic), as uint8 (clamped; torch's cast wraps), / 255,
    CLIP mean / std. Replaces the original's RandomResizedCropVideo(S, scale=(0.5, 1)) with
    its deterministic centre (area 1.0: the whole frame, no resampling)."""
    size = int(spec["size"])
    x = frames.astype(np.float32).transpose(0, 3, 1, 2)                 # [T,S,S,3] -> [T,3,S,S]
    off, side = centre_crop_box(frames.shape[1], float(spec.get("crop_area", 1.0)))
    if side != size or frames.shape[1] != size:
        x = x[:, :, off:off + side, off:off + side]
        wy = _cubic_weights(side, size).astype(np.float32)
        x = np.einsum("yh,tchw,xw->tcyx", wy, x, wy, optimize=True)     # -> [T,3,size,size]
        x = np.floor(np.clip(x, 0, 255))                                # ToUint8
    mean = np.asarray(spec["mean"], np.float32)[None, :, None, None]
    std = np.asarray(spec["std"], np.float32)[None, :, None, None]
    return np.ascontiguousarray((x / np.float32(255.0) - mean) / std, dtype=np.float32)
