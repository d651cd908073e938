"""Media kinds: how each modality's input is decoded (the cache key is the hash of what
decoding gives) and prepared into the first encoder stage's batch (clips, crops, ...).

All numpy + Pillow + soundfile/av (runtime/audio.py, runtime/media.py): no torch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .preprocess import _read_bytes, content_hash, decode_image, preprocess_image

# What `send(...)` calls each modality's list of inputs.
SEND_ARGS = {"images": "image", "audios": "audio", "videos": "video", "thermals": "thermal",
             "depths": "depth", "imus": "imu"}
# Encoded files above this are refused before decoding (a 10-minute 1080p video is ~1 GB).
MAX_MEDIA_BYTES = 2 << 30


@dataclass(frozen=True)
class Kind:
    decode: Callable[[Any, dict], Any]          # source -> decoded value (cheap, hashable)
    key: Callable[[Any], str]                   # decoded -> content hash
    prepare: Callable[[Any, dict], np.ndarray]  # decoded -> first stage's batch [N, ...]
    facts: Callable[[Any], dict] = lambda decoded: {}   # decoded -> geometry (size, duration)


def _bytes(src, spec) -> bytes:
    if isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        return _read_bytes(src, spec.get("kind", "media"), MAX_MEDIA_BYTES)[0]
    from .errors import InputError
    raise InputError(f"{spec.get('kind', 'media')} input must be a path or bytes, not {type(src).__name__}")


def _hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _decode_audio(src, spec):
    from .audio import decode_audio
    return decode_audio(src)


def _audio_key(wave) -> str:
    """Channel 0 and, for several channels, their average: all any recipe reads."""
    mix = "" if wave.mono else "|mix:" + content_hash(wave.mix)
    return content_hash(wave.first, salt=f"{wave.rate}Hz{mix}")


def _prepare_audio(wave, spec):
    from .audio import audio_clips, audio_recipe
    return audio_clips(wave, audio_recipe(spec.get("recipe", "imagebind")))   # [clips, 1, 128, 204]


def _decode_video(src, spec):
    """ImageBind recipe: the encoded bytes (clips are cut at prepare time); LEGO: the sampled
    frames themselves, found by seeking (a path is never read whole); Emu: its 8 segment
    frames, each resized as Emu's pictures are (Pillow, S x S)."""
    if spec.get("recipe") not in ("lego", "emu"):
        return _bytes(src, spec)
    if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        from .errors import InputError
        raise InputError(f"video input must be a path or bytes, not {type(src).__name__}")
    if spec["recipe"] == "emu":
        return _decode_emu_video(src, spec)
    from .video import sample_uniform
    return sample_uniform(src, int(spec["frames"]), int(spec["size"]))   # ([T, S, S, 3] uint8, VideoInfo)


def _decode_emu_video(src, spec):
    """Emu1/utils.py process_video: frames at get_index(len, 8), each Image.fromarray(frame)
    .resize((224, 224)) (Pillow's bicubic) -> ([T, S, S, 3] uint8, VideoInfo)."""
    from PIL import Image

    from .preprocess import _RESAMPLE
    from .video import sample_segments

    size, resample = int(spec["size"]), _RESAMPLE[spec.get("interpolation", "bicubic")]
    frames, info = sample_segments(src, int(spec["frames"]))
    small = [np.asarray(Image.fromarray(f).resize((size, size), resample=resample)) for f in frames]
    return np.stack(small), info                                 # T x [S, S, 3] -> [T, S, S, 3]


def _video_key(decoded) -> str:
    return _hash_bytes(decoded) if isinstance(decoded, bytes) else content_hash(decoded[0])


def _prepare_video(data, spec):
    if spec.get("recipe") == "lego":
        from .video import frames_to_batch
        return frames_to_batch(data[0], spec)                   # [T, 3, 224, 224]
    if spec.get("recipe") == "emu":                             # already S x S: only mean / std
        return np.stack([preprocess_image(f, spec) for f in data[0]])   # -> [T, 3, S, S]
    from .media import preprocess_video
    return preprocess_video(data)                               # [clips * crops, 3, 2, 224, 224]


def _video_facts(decoded) -> dict:
    if isinstance(decoded, bytes):
        return {}
    info = decoded[1]
    return {"duration": info.duration, "frames": info.frames, "fps": info.fps, "width": info.width,
            "height": info.height, "sampled": int(decoded[0].shape[0])}


def _prepare_single(fn_name: str):
    def prepare(data, spec):
        from . import media
        return getattr(media, fn_name)(data)[None]              # [...] -> [1, ...]
    return prepare


KINDS = {
    "image": Kind(lambda src, spec: decode_image(src), content_hash,
                  lambda rgb, spec: preprocess_image(rgb, spec)[None],           # [1, 3, S, S]
                  lambda rgb: {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])}),
    "audio": Kind(_decode_audio, _audio_key, _prepare_audio, lambda w: {"duration": len(w.first) / w.rate}),
    "video": Kind(_decode_video, _video_key, _prepare_video, _video_facts),
    "thermal": Kind(_bytes, _hash_bytes, _prepare_single("preprocess_thermal")),
    "depth": Kind(_bytes, _hash_bytes, _prepare_single("preprocess_depth")),
    "imu": Kind(_bytes, _hash_bytes, _prepare_single("preprocess_imu")),
}
