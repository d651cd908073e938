"""Audio for the ImageBind-family encoders, without torch: decoding, resampling, Kaldi
fbank, clip sampling, and the originals' recipes (facebookresearch/ImageBind
imagebind/data.py; PandaGPT code/model/ImageBind/data.py; BuboGPT
bubogpt/processors/imagebind_audio_processor.py and imagebind/data/data_utils.py).

Returns float32 arrays laid out as the ONNX stages of export/imagebind.py take them,
one row per clip. Every failure is one `InputError` line naming the input.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import BundleError, InputError
from .media import _linear_resize_weights, clip_starts
from .preprocess import _read_bytes

# 10 minutes: far above the 3 x 2 s (ImageBind) or 6 x 5 s (BuboGPT) the models read;
# longer inputs are refused from the header, before any sample is decoded.
MAX_AUDIO_SECONDS = 600.0
# 10 min of 8-channel 48 kHz 24-bit PCM is 414 MB; 512 MiB bounds any sane upload.
MAX_AUDIO_BYTES = 512 << 20
# Decoded samples per channel: 10 min at 96 kHz (230 MB of float32); higher rates get less time.
MAX_AUDIO_SAMPLES = 600 * 96_000
MAX_AUDIO_CHANNELS = 64               # 7.1.4 is 12; Ambisonics order 7 is 64
# |sample| above this is no recording (PCM decodes to -1..1, float files stay near it):
# corrupt compressed streams decode to garbage such as 1e38, which would overflow the fbank.
MAX_AUDIO_PEAK = 1e4
# Containers tried, by their magic bytes: what recorders and browsers write. libsndfile
# parses ~25 formats; the rarely-used ones are not handed untrusted bytes.
AUDIO_CONTAINERS = ("WAV", "FLAC", "OGG", "MP3", "AIFF")
# Sample-rate reductions whose sinc kernel exceeds this many taps go to soxr instead
# (e.g. 44101 Hz: 16000 phases x 88k taps); every common rate stays on the exact path.
MAX_RESAMPLE_TAPS = 4_000_000


@dataclass(frozen=True)
class AudioOptions:
    """One family's audio recipe; the defaults are ImageBind's load_and_transform_audio_data."""
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
    # "first": torchaudio.load keeps every channel, the clip means are taken over all of them
    # and the kaldi fbank reads channel 0; "mix": the channels are averaged before anything
    # else (BuboGPT's app: gr.Audio's (rate, samples) through eval_utils.load_audio).
    channels: str = "first"
    # the waveform's dtype in the original, which torchaudio computes its resampling kernel
    # in: torchaudio.load gives float32; BuboGPT's app divides int samples by iinfo.max (float64)
    dtype: str = "float32"

    def __post_init__(self):
        if self.fit not in ("pad_crop", "pad_resize") or self.channels not in ("first", "mix") \
                or self.dtype not in ("float32", "float64"):
            raise ValueError(f"bad AudioOptions: fit={self.fit!r} channels={self.channels!r} dtype={self.dtype!r}")


# PandaGPT (code/model/ImageBind/data.py) and LEGO (GroundingGPT's
# video_llama/models/ImageBind/data.py) call ImageBind's loader unchanged: 3 clips x 2 s.
IMAGEBIND_AUDIO = AudioOptions()
# eval_configs/mmgpt4_eval.yaml: imagebind_audio_eval, clip_duration 5, clips_per_video 6. The yaml
# also says use_global: True, but ImageBindAudioEvalProcessor.from_config never passes it on,
# so the released eval path runs 6 clips, no global one. app.py's gr.Audio hands the processor
# int samples / iinfo.max (32767 for int16, where soundfile divides by 32768: +6.7e-6 after
# normalisation, ignored), channels averaged.
BUBOGPT_AUDIO = AudioOptions(clip_seconds=5, clips=6, repeat_short=True, global_clip=False, fit="pad_resize",
                             channels="mix", dtype="float64")
# A bundle names its recipe (manifest: modalities.audio.preprocess.recipe).
RECIPES = {"imagebind": IMAGEBIND_AUDIO, "bubogpt": BUBOGPT_AUDIO}


def audio_recipe(name: str) -> AudioOptions:
    if name not in RECIPES:
        raise BundleError(f"unknown audio recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


@dataclass(frozen=True, eq=False)
class Waveform:
    """A decoded file at its own rate, as much of it as any recipe reads: channel 0 and the
    average of all channels (the same array when mono). Never modified in place."""
    first: np.ndarray            # [N] float32
    mix: np.ndarray              # [N] float32
    rate: int
    name: str = "<audio>"

    @property
    def mono(self) -> bool:
        return self.mix is self.first

    @classmethod
    def of(cls, samples: np.ndarray, rate: int, name: str = "<audio>") -> "Waveform":
        """[N] or channels-first [C, N] (torchaudio.load's layout) samples."""
        x = np.asarray(samples, np.float32)
        x = x[None] if x.ndim == 1 else x                       # [N] -> [1, N]
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise InputError(f"{name}: audio samples must be [N] or [channels, N], got {list(np.shape(samples))}")
        first = np.ascontiguousarray(x[0])
        return cls(first, first if x.shape[0] == 1 else x.mean(axis=0), rate, name)


def decode_audio(src) -> Waveform:
    """wav / flac / ogg / mp3 (libsndfile) -> Waveform (channel 0 and the channel average)."""
    import soundfile as sf

    data, name = _read_bytes(src, "audio", MAX_AUDIO_BYTES)
    container = audio_container(data)
    if container is None:
        raise InputError(f"{name}: not an audio file (reads {', '.join(AUDIO_CONTAINERS)})")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception:
        raise InputError(f"{name}: not a readable {container} file") from None
    with f:
        rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if rate < 1000 or rate > 768_000:
            raise InputError(f"{name}: sample rate {rate} Hz is out of range (1 kHz - 768 kHz)")
        if not 1 <= channels <= MAX_AUDIO_CHANNELS:
            raise InputError(f"{name}: {channels} channels (reads 1 to {MAX_AUDIO_CHANNELS})")
        if frames <= 0:
            raise InputError(f"{name}: audio has no samples")
        if frames / rate > MAX_AUDIO_SECONDS:
            raise InputError(f"{name}: {frames / rate:.1f} s is over the {MAX_AUDIO_SECONDS:.0f} s audio limit")
        if frames > MAX_AUDIO_SAMPLES:
            raise InputError(f"{name}: {frames} samples at {rate} Hz are over the {MAX_AUDIO_SAMPLES} sample "
                             "audio limit (10 min at 96 kHz)")
        first, mix, total = [], [], 0
        block = max(1, (1 << 22) // channels)          # 16 MiB of float32 per block, any channel count
        try:
            for b in f.blocks(blocksize=block, dtype="float32", always_2d=True):   # [n, C] per block
                first.append(b[:, 0].copy())
                if channels > 1:
                    mix.append(b.mean(axis=1))
                total += len(b)
                if total > MAX_AUDIO_SAMPLES:       # a header that under-states its length
                    raise InputError(f"{name}: over the {MAX_AUDIO_SAMPLES} sample audio limit")
        except InputError:
            raise
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"{name}: corrupt audio ({reason})") from None
    first = np.concatenate(first) if first else np.empty(0, np.float32)
    if first.size == 0:
        raise InputError(f"{name}: audio has no samples")
    mix = np.concatenate(mix) if channels > 1 else first
    if not (np.all(np.isfinite(first)) and np.all(np.isfinite(mix))):
        raise InputError(f"{name}: audio has NaN or infinite samples")
    peak = max(float(np.abs(first).max()), float(np.abs(mix).max()))
    if peak > MAX_AUDIO_PEAK:
        raise InputError(f"{name}: sample values up to {peak:.3g} (audio is -1..1; a corrupt stream?)")
    return Waveform(first, mix, rate, name)


def audio_container(data: bytes) -> str | None:
    """The container of `data` from its first bytes, if it is one of AUDIO_CONTAINERS."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE" or head[:4] == b"riff":
        return "WAV"                                         # RIFF/RIFX/RF64 WAVE, Sony Wave64
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"                                         # an ID3 tag, or an MPEG frame sync
    return None


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, dtype: str, zeros: int = 6, rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """torchaudio.functional.resample's kernel (sinc_interp_hann, lowpass_filter_width 6,
    rolloff 0.99) for the reduced rates orig -> new: [new, 2*width + orig], computed as it
    computes it, in the waveform's dtype (float32 rounding of t moves taps by up to 1e-4)."""
    f = np.dtype(dtype).type
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    idx = np.arange(-width, width + orig, dtype=f)[None, :] / f(orig)
    t = np.arange(0, -new, -1, dtype=f)[:, None] / f(new) + idx          # [new, taps]
    t = np.clip(t * f(base), f(-zeros), f(zeros))
    window = np.cos(t * f(math.pi) / f(zeros) / f(2)) ** 2
    t = t * f(math.pi)
    safe = np.where(t == 0, f(1), t)
    kernel = np.where(t == 0, f(1), np.sin(safe) / safe)
    return kernel * (window * f(base / orig)), width


def resample_audio(x: np.ndarray, orig: int, new: int, dtype: str = "float32") -> np.ndarray:
    """Polyphase windowed-sinc resampling, numerically torchaudio.functional.resample on a
    `dtype` waveform (what ImageBind/PandaGPT/BuboGPT call) -> float32; soxr "VHQ" for
    rates whose exact kernel is huge."""
    if orig == new:
        return x.astype(np.float32, copy=False)
    o, n = orig // math.gcd(orig, new), new // math.gcd(orig, new)
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    if n * (2 * width + o) > MAX_RESAMPLE_TAPS:
        import soxr
        return soxr.resample(x, orig, new, quality="VHQ").astype(np.float32)
    kernel, width = _sinc_kernel(o, n, dtype)
    padded = np.pad(x.astype(np.float32), (width, width + o))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::o]  # [J, taps] view
    out = np.empty((windows.shape[0], n), np.float32)
    step = max(1, (1 << 22) // kernel.shape[1])
    for i in range(0, windows.shape[0], step):                  # bounded temporary memory
        out[i:i + step] = windows[i:i + step].astype(kernel.dtype) @ kernel.T   # [rows, taps] @ [taps, n]
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


def _fresh(x: np.ndarray, rate: int, opts: AudioOptions) -> np.ndarray:
    """Resampled samples in an array of their own (audio_clips writes into it)."""
    y = resample_audio(x, rate, opts.sample_rate, opts.dtype)
    return y.copy() if np.shares_memory(x, y) else y


def audio_clips(wave: Waveform, opts: AudioOptions = IMAGEBIND_AUDIO) -> np.ndarray:
    """A decoded file -> float32 [clips, 1, mel_bins, target_frames], as the originals compute it."""
    sr, c = opts.sample_rate, opts.clip_seconds
    # mix: what the clip means are taken over (all channels); sig: what the fbank reads
    mix = _fresh(wave.mix, wave.rate, opts)
    sig = mix if wave.mono or opts.channels == "mix" else _fresh(wave.first, wave.rate, opts)
    if opts.repeat_short and c / (len(mix) / sr) >= 1:
        # waveform_resample: tile int(c / D) + 1 times, keep exactly c seconds (a new array)
        reps = int(c / (len(mix) / sr)) + 1
        same = sig is mix
        mix = np.tile(mix, reps)[:c * sr]
        sig = mix if same else np.tile(sig, reps)[:c * sr]
    spans = [(int(s * sr), int((s + c) * sr)) for s in clip_starts(len(sig) / sr, c, opts.clips)]
    if opts.global_clip:
        spans.append((0, len(sig)))                             # global_stretching: the waveform itself, last
    out = np.empty((len(spans), 1, opts.mel_bins, opts.target_frames), np.float32)
    for k, (a, b) in enumerate(spans):
        # Not a bug to fix: the originals cut each clip as a view of one waveform and waveform2melspec runs
        # `waveform -= waveform.mean()` in place, so a clip overlapping earlier ones sees their means subtracted.
        m = np.float32(mix[a:b].mean(dtype=np.float64))
        sig[a:b] -= m
        if mix is not sig:
            mix[a:b] -= m
        out[k, 0] = fit_frames(kaldi_fbank(sig[a:b], sr, opts.mel_bins), opts.target_frames, opts.fit, opts.antialias)
    return (out - np.float32(opts.mean)) / np.float32(opts.std)


def preprocess_audio(src, opts: AudioOptions = IMAGEBIND_AUDIO) -> np.ndarray:
    """An audio file (path or bytes) -> float32 [clips, 1, 128, 204]."""
    return audio_clips(decode_audio(src), opts)
