"""ImageBind-family media preprocessing without torch: audio, video, depth, thermal, IMU.

Each function reproduces a transform of the originals (facebookresearch/ImageBind
imagebind/data.py; PandaGPT code/model/ImageBind/data.py; BuboGPT
bubogpt/processors/imagebind_audio_processor.py and imagebind/data/data_utils.py) and
returns float32 arrays laid out as the ONNX stages of export/imagebind.py take them,
one row per clip (x crop). Every failure is one `InputError` line naming the input.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, _read_bytes, decode_image, preprocess_image

# 10 minutes: far above the 3 x 2 s (ImageBind) or 6 x 5 s (BuboGPT) the models read;
# longer inputs are refused from the header, before any sample is decoded.
MAX_AUDIO_SECONDS = 600.0
# 10 min of 8-channel 48 kHz 24-bit PCM is 414 MB; 512 MiB bounds any sane upload.
MAX_AUDIO_BYTES = 512 << 20
MAX_VIDEO_SECONDS = 600.0
MAX_VIDEO_FRAMES = 600 * 120          # 10 min at 120 fps
MAX_VIDEO_BYTES = 2 << 30
MAX_VIDEO_PIXELS = 8192 * 4320        # 8K frame
# Sample-rate reductions whose sinc kernel exceeds this many taps go to soxr instead
# (e.g. 44101 Hz: 16000 phases x 88k taps); every common rate stays on the exact path.
MAX_RESAMPLE_TAPS = 4_000_000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# load_and_transform_vision_data: Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std
IMAGEBIND_IMAGE_SPEC = {"size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
                        "mean": CLIP_MEAN, "std": CLIP_STD}


@dataclass(frozen=True)
class AudioOptions:
    """ImageBind / PandaGPT defaults (load_and_transform_audio_data)."""
    sample_rate: int = 16000
    clip_seconds: int = 2
    clips: int = 3
    mel_bins: int = 128
    target_frames: int = 204
    mean: float = -4.268
    std: float = 9.138
    repeat_short: bool = False   # BuboGPT waveform_resample: tile audio shorter than a clip
    global_clip: bool = False    # BuboGPT use_global: the whole waveform as one more clip
    fit: str = "pad_crop"        # "pad_crop" (ImageBind) | "pad_resize" (BuboGPT)
    antialias: bool = False      # torchvision Resize on tensors before 0.17 (BuboGPT's era)


IMAGEBIND_AUDIO = AudioOptions()
# eval_configs/mmgpt4_eval.yaml: imagebind_audio_eval, clip_duration 5, clips_per_video 6. The yaml
# also says use_global: True, but ImageBindAudioEvalProcessor.from_config never passes it on,
# so the released eval path runs 6 clips, no global one.
BUBOGPT_AUDIO = AudioOptions(clip_seconds=5, clips=6, repeat_short=True, global_clip=False, fit="pad_resize")


@dataclass(frozen=True)
class VideoOptions:
    """load_and_transform_video_data: 5 clips x 2 s, 2 frames each, short side 224, 3 crops."""
    clips: int = 5
    clip_seconds: int = 2
    frames_per_clip: int = 2
    size: int = 224
    crops: int = 3


def decode_audio(src) -> tuple[np.ndarray, int, str]:
    """wav / flac / ogg / mp3 (libsndfile) -> (first channel float32 [N], rate, name).
    The first channel: torchaudio's kaldi fbank reads channel 0 of what the original loads."""
    import soundfile as sf

    data, name = _read_bytes(src, "audio", MAX_AUDIO_BYTES)
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception:
        raise InputError(f"{name}: not an audio file (unrecognised format)") from None
    with f:
        rate, frames = int(f.samplerate), int(f.frames)
        if rate < 1000 or rate > 768_000:
            raise InputError(f"{name}: sample rate {rate} Hz is out of range (1 kHz - 768 kHz)")
        if frames <= 0:
            raise InputError(f"{name}: audio has no samples")
        if frames / rate > MAX_AUDIO_SECONDS:
            raise InputError(f"{name}: {frames / rate:.1f} s is over the {MAX_AUDIO_SECONDS:.0f} s audio limit")
        try:
            out = np.concatenate([b[:, 0] for b in f.blocks(blocksize=1 << 18, dtype="float32", always_2d=True)])
        except Exception as e:
            raise InputError(f"{name}: corrupt audio ({e})") from None
    if out.size == 0:
        raise InputError(f"{name}: audio has no samples")
    if not np.all(np.isfinite(out)):
        raise InputError(f"{name}: audio has NaN or infinite samples")
    return out, rate, name


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """torchaudio.functional.resample's kernel (sinc_interp_hann, lowpass_filter_width 6,
    rolloff 0.99) for the reduced rates orig -> new: [new, 2*width + orig] float32."""
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base   # [new, taps]
    t = np.clip(t, -zeros, zeros)
    window = np.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    safe = np.where(t == 0, 1.0, t)
    kernel = np.where(t == 0, 1.0, np.sin(safe) / safe) * window * (base / orig)
    return kernel.astype(np.float32), width


def resample_audio(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling, numerically torchaudio.functional.resample
    (what ImageBind/PandaGPT/BuboGPT call); soxr "VHQ" for rates whose exact kernel is huge."""
    if orig == new:
        return x.astype(np.float32, copy=False)
    o, n = orig // math.gcd(orig, new), new // math.gcd(orig, new)
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    if n * (2 * width + o) > MAX_RESAMPLE_TAPS:
        import soxr
        return soxr.resample(x, orig, new, quality="VHQ").astype(np.float32)
    kernel, width = _sinc_kernel(o, n)
    padded = np.pad(x.astype(np.float32), (width, width + o))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::o]  # [J, taps] view
    out = np.empty((windows.shape[0], n), np.float32)
    step = max(1, (1 << 22) // kernel.shape[1])
    for i in range(0, windows.shape[0], step):                  # bounded temporary memory
        out[i:i + step] = windows[i:i + step] @ kernel.T        # [rows, taps] @ [taps, n]
    target = math.ceil(n * x.shape[0] / o)
    return out.reshape(-1)[:target]                             # [J, n] -> [J * n] -> [target]


@lru_cache(maxsize=8)
def _mel_banks(mel_bins: int, fft: int, rate: int, low: float = 20.0) -> np.ndarray:
    """torchaudio.compliance.kaldi.get_mel_banks (high_freq 0 -> Nyquist, no VTLN):
    [mel_bins, fft // 2 + 1], the Nyquist column zero. A triangle that holds no FFT bin
    stays all-zero (128 bins at 16 kHz: bin 3), which kaldi-native-fbank refuses."""
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(rate / 2)
    delta = (hi - lo) / (mel_bins + 1)
    left = lo + np.arange(mel_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    freqs = mel(np.arange(fft // 2) * rate / fft)[None, :]
    up, down = (freqs - left) / (center - left), (right - freqs) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))                      # [bins, fft/2] -> [bins, fft/2 + 1]


def kaldi_fbank(x: np.ndarray, rate: int, mel_bins: int = 128) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank as ImageBind calls it: 25 ms / 10 ms frames,
    snip_edges, dither 0, DC removal, pre-emphasis 0.97, symmetric Hann ("hanning"),
    FFT 512 (power of two), power spectrum, mel banks from 20 Hz, log (floor: float32
    eps), htk_compat with use_energy False (no energy column) -> [frames, mel_bins]."""
    size, shift = int(rate * 0.025), int(rate * 0.010)         # 400 / 160 samples at 16 kHz
    fft = 1 << (size - 1).bit_length()                          # 512
    count = 1 + (len(x) - size) // shift if len(x) >= size else 0
    out = np.empty((count, mel_bins), np.float32)
    if count == 0:
        return out
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))
    banks = _mel_banks(mel_bins, fft, rate).T                   # [fft/2 + 1, bins]
    frames_all = np.lib.stride_tricks.sliding_window_view(x, size)[::shift]  # [count, size] view
    eps = float(np.finfo(np.float32).eps)
    for i in range(0, count, 4096):
        fr = frames_all[i:i + 4096].astype(np.float64)
        fr = fr - fr.mean(axis=1, keepdims=True)
        fr = fr - 0.97 * np.concatenate([fr[:, :1], fr[:, :-1]], axis=1)     # x[i] - 0.97 x[i-1]
        power = np.abs(np.fft.rfft(fr * window, n=fft)) ** 2   # [rows, fft/2 + 1]
        out[i:i + 4096] = np.log(np.maximum(power @ banks, eps))
    return out


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


def fit_frames(fbank: np.ndarray, target: int, fit: str, antialias: bool = False) -> np.ndarray:
    """[frames, mel] -> [mel, target]: zero-pad short spectrograms on the right; longer
    ones cropped (ImageBind waveform2melspec) or resized bilinearly (BuboGPT)."""
    spec = fbank.T                                              # [frames, mel] -> [mel, frames]
    n = spec.shape[1]
    if n < target:
        return np.pad(spec, ((0, 0), (0, target - n)))
    if n == target or fit == "pad_crop":
        return np.ascontiguousarray(spec[:, :target])
    return (spec @ _linear_resize_weights(n, target, antialias).T).astype(np.float32)  # [mel, n] @ [n, target]


def audio_clips(x: np.ndarray, rate: int, opts: AudioOptions = IMAGEBIND_AUDIO) -> np.ndarray:
    """Decoded first-channel samples -> float32 [clips, 1, mel_bins, target_frames]."""
    sr = opts.sample_rate
    wave = resample_audio(x, rate, sr)
    if opts.repeat_short and len(wave) <= opts.clip_seconds * sr:
        # waveform_resample: tile int(c / D) + 1 times, keep exactly c seconds
        reps = int(opts.clip_seconds / (len(wave) / sr)) + 1
        wave = np.tile(wave, reps)[:opts.clip_seconds * sr]
    starts = clip_starts(len(wave) / sr, opts.clip_seconds, opts.clips)
    pieces = [wave[int(s * sr):int((s + opts.clip_seconds) * sr)] for s in starts]
    if opts.global_clip:
        pieces.append(wave)
    out = np.empty((len(pieces), 1, opts.mel_bins, opts.target_frames), np.float32)
    for k, piece in enumerate(pieces):
        spec = kaldi_fbank(piece - piece.mean() if len(piece) else piece, sr, opts.mel_bins)
        out[k, 0] = fit_frames(spec, opts.target_frames, opts.fit, opts.antialias)
    return (out - np.float32(opts.mean)) / np.float32(opts.std)


def preprocess_audio(src, opts: AudioOptions = IMAGEBIND_AUDIO) -> np.ndarray:
    """An audio file (path or bytes) -> float32 [clips, 1, 128, 204]."""
    x, rate, _ = decode_audio(src)
    return audio_clips(x, rate, opts)


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


def _short_side_weights(h: int, w: int, size: int):
    """pytorchvideo ShortSideScale: short side to `size`, long side floor(long/short*size)."""
    nh, nw = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    return (_linear_resize_weights(h, nh, False).astype(np.float32),
            _linear_resize_weights(w, nw, False).astype(np.float32))


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
        ry, rx = _short_side_weights(h, w, opts.size)
        for i, frame in enumerate(container.decode(stream)):   # only the needed frames are kept
            if i in need:
                rgb = frame.to_ndarray(format="rgb24")
                if rgb.shape[:2] != (h, w):
                    ry, rx = _short_side_weights(*rgb.shape[:2], opts.size)
                x = rgb.astype(np.float32).transpose(2, 0, 1) / 255.0            # [H, W, 3] -> [3, H, W]
                x = np.einsum("yh,chw,xw->cyx", ry, x, rx, optimize=True)       # -> [3, h', w']
                frames[i] = (x - mean) / std
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
    out = []
    for clip in plan:
        video = np.stack([frames[i] for i in clip], axis=1)        # T x [3, h', w'] -> [3, T, h', w']
        for idx in (range(3) if opts.crops == 3 else (1,)):
            y, x = _crop_offsets(video.shape[2], video.shape[3], opts.size, idx)
            out.append(video[:, :, y:y + opts.size, x:x + opts.size])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)  # -> [clips*crops, 3, T, S, S]


def preprocess_imagebind_image(src) -> np.ndarray:
    """An image -> float32 [3, 224, 224] (load_and_transform_vision_data)."""
    return preprocess_image(decode_image(src), IMAGEBIND_IMAGE_SPEC)


def _decode_single_channel(src, kind: str):
    from PIL import Image

    data, name = _read_bytes(src, kind, MAX_IMAGE_BYTES)
    try:
        img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: {img.size[0]}x{img.size[1]} is over the {MAX_IMAGE_PIXELS / 1e6:g} MP limit")
        img.load()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: not a readable {kind} image ({type(e).__name__})") from None
    return img, name


def _short_side_crop(img, size: int):
    from PIL import Image

    w, h = img.size          # torchvision Resize(size) on PIL + CenterCrop(size)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), resample=Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_thermal(src, size: int = 224) -> np.ndarray:
    """PandaGPT load_and_transform_thermal_data: convert("L"), Resize(224, bicubic),
    CenterCrop(224), ToTensor (0..1, no mean/std) -> float32 [1, 224, 224]."""
    img, _ = _decode_single_channel(src, "thermal")
    x = np.asarray(_short_side_crop(img.convert("L"), size), np.float32) / 255.0
    return x[None]                                             # [S, S] -> [1, S, S]


def preprocess_depth(src, size: int = 224) -> np.ndarray:
    """A single-channel depth image (8- or 16-bit PNG) -> float32 [1, 224, 224] in 0..1
    (value / dtype max), short side 224 bicubic + centre crop. No original loader exists
    (ImageBind's data.py has none): the scale the depth trunk expects is unverified."""
    img, name = _decode_single_channel(src, "depth")
    top = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}.get(img.mode)
    img, top = (img, top) if top else (img.convert("L"), 255.0)
    x = np.asarray(_short_side_crop(img.convert("F"), size), np.float32) / np.float32(top)
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
