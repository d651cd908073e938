"""The originals' audio loaders in PyTorch, step for step as their code runs them, for the
runtime (runtime/audio.py) to be compared with:

- ImageBind `imagebind/data.py` load_and_transform_audio_data (PandaGPT's
  code/model/ImageBind/data.py and LEGO's video_llama/models/ImageBind/data.py are the
  same code): torchaudio.load -> [C, N], resample, clips as views of that tensor,
  waveform2melspec (`waveform -= waveform.mean()` in place, kaldi fbank of channel 0,
  pad / crop to 204 frames), Normalize.
- BuboGPT `bubogpt/processors/imagebind_audio_processor.py` ImageBindAudioEvalProcessor
  (waveform_resample with tiling, clip_sample, optional global clip) over
  `imagebind/data/data_utils.py` waveform2melspec (bilinear Resize instead of the crop),
  fed as app.py feeds it: eval_utils.load_audio on gr.Audio's (rate, int samples).

torchaudio and torchvision are not installed: their three functions used here are written
below from their source (kaldi fbank, sinc resample, tensor Resize).
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch


# ------------------------------------------------------------ torchaudio / torchvision parts

@lru_cache(maxsize=4)
def _mel_filterbank(bins: int, rate: int, nfft: int = 512) -> np.ndarray:
    """kaldi get_mel_banks: triangles on the mel scale from 20 Hz to Nyquist, [bins, nfft/2 + 1]."""
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(rate / 2)
    d = (hi - lo) / (bins + 1)
    fb = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        l, c, r = lo + b * d, lo + (b + 1) * d, lo + (b + 2) * d
        for k in range(nfft // 2):
            m = mel(k * rate / nfft)
            fb[b, k] = max(0.0, min((m - l) / (c - l), (r - m) / (r - c)))
    return fb


def reference_fbank(x: np.ndarray, rate: int, bins: int) -> np.ndarray:
    """Straightforward Kaldi fbank, frame by frame, with the options of ImageBind's
    waveform2melspec (25 / 10 ms, snip_edges, dither 0, DC removal, pre-emphasis 0.97,
    hanning, power, htk_compat without energy) -> [frames, bins] float64."""
    n, hop, nfft = 400, 160, 512
    fb = _mel_filterbank(bins, rate, nfft)
    win = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1)) for i in range(n)])
    rows = []
    for s in range(0, len(x) - n + 1, hop):
        f = x[s:s + n].astype(np.float64)
        f = f - f.mean()
        f = np.append(f[0] - 0.97 * f[0], f[1:] - 0.97 * f[:-1])
        spec = np.abs(np.fft.rfft(np.append(f * win, np.zeros(nfft - n)))) ** 2
        rows.append(np.log(np.maximum(fb @ spec, np.finfo(np.float32).eps)))
    return np.array(rows).reshape(-1, bins)


def kaldi_fbank(waveform: torch.Tensor, sample_frequency: int, num_mel_bins: int) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank(waveform [C, N], ...): it reads channel 0 only
    (_get_waveform_and_window_properties: channel = max(channel, 0) with channel=-1)."""
    return torch.from_numpy(reference_fbank(waveform[0].numpy(), sample_frequency, num_mel_bins)).to(waveform.dtype)


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio.functional.resample (sinc_interp_hann, lowpass_filter_width 6, rolloff
    0.99): the kernel in the waveform's dtype, conv1d with stride orig / gcd."""
    if orig_freq == new_freq:
        return waveform                                          # the same tensor, as torchaudio
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    base = min(o, n) * 0.99
    width = math.ceil(6 * o / base)
    idx = torch.arange(-width, width + o, dtype=waveform.dtype)[None, None] / o
    t = torch.arange(0, -n, -1, dtype=waveform.dtype)[:, None, None] / n + idx
    t *= base
    t = t.clamp_(-6, 6)
    window = torch.cos(t * math.pi / 6 / 2) ** 2
    t *= math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t) * window * (base / o)
    shape = waveform.shape
    wave = waveform.reshape(-1, shape[-1])                        # [C, N]
    length = wave.shape[1]
    wave = torch.nn.functional.pad(wave, (width, width + o))
    out = torch.nn.functional.conv1d(wave[:, None], kernel, stride=o)   # [C, n, J]
    out = out.transpose(1, 2).reshape(wave.shape[0], -1)       # [C, J * n]
    return out[:, :math.ceil(n * length / o)].reshape(shape[:-1] + (-1,))


def tensor_resize(img: torch.Tensor, size: list[int]) -> torch.Tensor:
    """torchvision.transforms.Resize(size)(tensor [1, H, W]) in torchvision < 0.17:
    bilinear, align_corners False, antialias off for tensors."""
    return torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", align_corners=False,
                                           antialias=False)[0]


# ------------------------------------------------------------ pytorchvideo

def constant_clip_timepoints(duration: float, clip_duration: int, clips_per_video: int) -> list[tuple]:
    """get_clip_timepoints over ConstantClipsPerVideoSampler (pytorchvideo 0.1.5)."""
    clip_duration = Fraction(clip_duration)
    timepoints, index = [], 0
    while True:
        max_possible_clip_start = Fraction(max(duration - clip_duration, 0))
        uniform_clip = Fraction(max_possible_clip_start, clips_per_video)
        start = uniform_clip * index
        index += 1
        timepoints.append((start, start + clip_duration))
        if index >= clips_per_video or uniform_clip * index > max_possible_clip_start:
            return timepoints


# ------------------------------------------------------------ the originals

def waveform2melspec(waveform, sample_rate, num_mel_bins, target_length, resize=False):
    """ImageBind's (resize=False: crop) or BuboGPT's data_utils (resize=True) waveform2melspec."""
    waveform -= waveform.mean()
    fbank = kaldi_fbank(waveform, sample_rate, num_mel_bins)
    fbank = fbank.transpose(0, 1)
    p = target_length - fbank.size(1)
    if p > 0:
        fbank = torch.nn.functional.pad(fbank, (0, p), mode="constant", value=0)
    elif p < 0:
        if resize:
            return tensor_resize(fbank.unsqueeze(0), [num_mel_bins, target_length])
        fbank = fbank[:, 0:target_length]
    return fbank.unsqueeze(0)


def imagebind_audio(waveform: torch.Tensor, sr: int, num_mel_bins=128, target_length=204, sample_rate=16000,
                    clip_duration=2, clips_per_video=3, mean=-4.268, std=9.138) -> torch.Tensor:
    """load_and_transform_audio_data for one file, from torchaudio.load's (waveform [C, N], sr)."""
    if sample_rate != sr:
        waveform = resample(waveform, sr, sample_rate)
    all_clips_timepoints = constant_clip_timepoints(waveform.size(1) / sample_rate, clip_duration, clips_per_video)
    all_clips = []
    for clip_timepoints in all_clips_timepoints:
        waveform_clip = waveform[:, int(clip_timepoints[0] * sample_rate):int(clip_timepoints[1] * sample_rate)]
        all_clips.append(waveform2melspec(waveform_clip, sample_rate, num_mel_bins, target_length))
    return torch.stack([(ac - mean) / std for ac in all_clips], dim=0)


def bubogpt_eval_processor(waveform: torch.Tensor, origin_sr: int, clip_duration=5, clips_per_video=6,
                           use_global=False, num_mel_bins=128, target_length=204, target_sr=16000,
                           mean=-4.268, std=9.138) -> torch.Tensor:
    """ImageBindAudioEvalProcessor((waveform, origin_sr)) as eval_configs/mmgpt4_eval.yaml builds it."""
    waveform = resample(waveform, origin_sr, target_sr)          # waveform_resample
    all_duration = waveform.size(1) / target_sr
    num_repeat = clip_duration / all_duration
    if num_repeat >= 1:
        waveform = torch.tile(waveform, dims=[1, int(num_repeat) + 1])[:, :clip_duration * target_sr]
    waveform_clips = []                                          # clip_sample: views
    for t0, t1 in constant_clip_timepoints(waveform.size(1) / target_sr, clip_duration, clips_per_video):
        waveform_clips.append(waveform[:, int(t0 * target_sr):int(t1 * target_sr)])
    if use_global:
        waveform_clips.append(waveform)                         # global_stretching returns it as is
    melspec_clips = [waveform2melspec(w, target_sr, num_mel_bins, target_length, resize=True)
                     for w in waveform_clips]
    return torch.stack([(m - mean) / std for m in melspec_clips], dim=0)


def bubogpt_app_audio(sample_rate: int, raw_waveform: np.ndarray, **processor) -> torch.Tensor:
    """eval_scripts/eval_utils.load_audio on gr.Audio's (rate, int samples [N] or [N, C])."""
    waveform = raw_waveform / np.iinfo(raw_waveform.dtype).max
    if waveform.ndim == 1:
        waveform = torch.from_numpy(waveform[None, :])
    else:
        waveform = torch.from_numpy(waveform).mean(1).unsqueeze(0)
    return bubogpt_eval_processor(waveform, sample_rate, **processor)
