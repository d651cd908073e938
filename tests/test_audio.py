"""Audio preprocessing (runtime/audio.py): the fbank, resampling and clip sampling on their
own, then every recipe against the originals' loaders run step for step in PyTorch
(tests/reference_audio.py) on files whose clips overlap, do not overlap, or coincide."""
from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

import reference_audio as ref
from scops.runtime import audio, media
from scops.runtime.errors import BundleError, InputError


def _wav_bytes(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# ---------------------------------------------------------------- parts

def test_fbank_matches_reference_and_kaldi_native_fbank():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    got = audio.kaldi_fbank(x, 16000, 128)
    assert got.shape == (98, 128)                     # 1 + (16000 - 400) // 160
    assert np.abs(got - ref.reference_fbank(x, 16000, 128)).max() < 1e-3
    assert np.all(got[:, 3] == np.float32(np.log(np.finfo(np.float32).eps)))  # empty triangle
    import kaldi_native_fbank as knf          # a test dependency: missing is an error, not a skip
    opts = knf.FbankOptions()
    opts.frame_opts.dither, opts.frame_opts.window_type = 0.0, "hanning"
    opts.mel_opts.num_bins, opts.mel_opts.is_librosa, opts.htk_compat = 80, False, True
    fb = knf.OnlineFbank(opts)            # kaldi-native-fbank refuses 128 bins (empty triangle)
    fb.accept_waveform(16000, x)
    fb.input_finished()
    theirs = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    assert np.abs(audio.kaldi_fbank(x, 16000, 80) - theirs).max() < 1e-3
    assert np.abs(ref.reference_fbank(x, 16000, 80) - theirs).max() < 1e-3


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resample_matches_torchaudio(rate, dtype):
    """torchaudio builds its kernel in the waveform's dtype: float32 from torchaudio.load,
    float64 in BuboGPT's app; the two kernels differ by up to 7e-5 per sample at 22.05 kHz."""
    x = np.random.default_rng(rate).standard_normal(rate // 2).astype(np.float32)
    want = ref.resample(torch.from_numpy(x.astype(dtype))[None], rate, 16000)[0].numpy()
    got = audio.resample_audio(x, rate, 16000, dtype)
    assert got.shape == want.shape and np.abs(got - want).max() < 2e-6


@pytest.mark.parametrize("seconds", [0.01, 1.5, 2.0, 3.0, 7.99, 8.0, 10.0, 34.9, 40.0, 599.3])
def test_clip_starts_as_pytorchvideo(seconds):
    for c, n in ((2, 3), (5, 6)):
        assert [s for s, _ in ref.constant_clip_timepoints(seconds, c, n)] == media.clip_starts(seconds, c, n)


def test_audio_normalisation_and_padding():
    clips = audio.audio_clips(audio.Waveform.of(np.zeros(16000 * 4), 16000))   # silence
    assert clips.shape == (3, 1, 128, 204) and clips.dtype == np.float32
    floor = (np.log(np.finfo(np.float32).eps) + 4.268) / 9.138
    assert np.allclose(clips[..., :198], floor, atol=1e-5)    # 2 s -> 198 frames, then padding
    assert np.allclose(clips[..., 198:], 4.268 / 9.138, atol=1e-6)


def test_recipes_by_name():
    assert audio.audio_recipe("imagebind") is audio.IMAGEBIND_AUDIO          # PandaGPT, LEGO
    assert audio.audio_recipe("bubogpt") is audio.BUBOGPT_AUDIO
    with pytest.raises(BundleError, match="unknown audio recipe 'whisper'"):
        audio.audio_recipe("whisper")


# ---------------------------------------------------------------- against the originals

# ImageBind: 3 clips x 2 s, BuboGPT: 6 clips x 5 s (start k * max(D - c, 0) / n). Durations
# per recipe: ImageBind 1.5 s coincide, 3 / 7.5 s overlap, 9 / 40 s apart; BuboGPT 1.5 / 3 s
# tiled to 5 s and coincide, 7.5 / 9 s overlap, 40 s apart.
FILES = [(1.5, 1, 16000), (1.5, 2, 44100), (3.0, 1, 16000), (3.0, 2, 22050), (7.5, 1, 16000),
         (7.5, 2, 48000), (9.0, 2, 16000), (40.0, 1, 16000), (40.0, 2, 44100)]
RECIPES = {"imagebind": audio.IMAGEBIND_AUDIO, "bubogpt": audio.BUBOGPT_AUDIO,
           "bubogpt-global": dataclasses.replace(audio.BUBOGPT_AUDIO, global_clip=True)}


def _signal(seconds: float, channels: int, rate: int) -> np.ndarray:
    """[N, C]: a gliding tone and noise per channel on a DC offset that differs between the
    channels and steps up a third of the way in (so each clip has its own mean)."""
    rng = np.random.default_rng(int(seconds * 10) + channels)
    t = np.arange(int(seconds * rate)) / rate
    cols = []
    for c in range(channels):
        dc = (0.2, -0.15)[c] + 0.1 * (t > seconds / 3)
        tone = 0.25 * np.sin(2 * np.pi * (330 * (c + 1) + 40 * t) * t)
        cols.append(dc + tone + 0.03 * rng.standard_normal(t.size))
    return np.stack(cols, axis=1)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    paths = {}
    for seconds, channels, rate in FILES:
        paths[seconds, channels, rate] = d / f"{seconds}s_{channels}ch_{rate}.wav"
        sf.write(paths[seconds, channels, rate], _signal(seconds, channels, rate), rate, subtype="PCM_16")
    return paths


def original(recipe: str, path) -> np.ndarray:
    """What the family's own code gives for the file: PandaGPT / LEGO read it with
    torchaudio.load (float32, every channel); BuboGPT's app with gr.Audio (int samples)."""
    if recipe == "imagebind":
        data, rate = sf.read(path, dtype="float32", always_2d=True)            # = torchaudio.load
        return ref.imagebind_audio(torch.from_numpy(data.T.copy()), rate).numpy()
    data, rate = sf.read(path, dtype="int16")                                # [N] or [N, C]
    return ref.bubogpt_app_audio(rate, data, use_global=recipe == "bubogpt-global").float().numpy()


# BuboGPT's global clip (off in its released eval config) on one file per regime
CASES = [(r, *f) for r in ("imagebind", "bubogpt") for f in FILES] + \
        [("bubogpt-global", *f) for f in [(3.0, 2, 22050), (9.0, 2, 16000), (40.0, 1, 16000)]]


@pytest.mark.parametrize("recipe,seconds,channels,rate", CASES)
def test_every_clip_equals_the_original_loader(sounds, recipe, seconds, channels, rate):
    opts = RECIPES[recipe]
    got = audio.preprocess_audio(sounds[seconds, channels, rate], opts)
    want = original(recipe, sounds[seconds, channels, rate])
    assert got.shape == want.shape == (opts.clips + opts.global_clip, 1, 128, 204)
    per_clip = np.abs(got - want).reshape(len(got), -1).max(axis=1)
    print(f"{recipe} {seconds} s {channels} ch {rate} Hz: max |diff| per clip", " ".join(f"{d:.1e}" for d in per_clip))
    assert per_clip.max() <= 1e-4, per_clip


@pytest.mark.parametrize("seconds,channels,rate", [f for f in FILES if 2 < f[0] < 8])
def test_overlapping_clips_are_not_clips_cut_alone(sounds, seconds, channels, rate):
    """On these files each clip computed from an untouched copy (scops before issue 17) is
    far from the original, so the test above tells the two apart."""
    data, _ = sf.read(sounds[seconds, channels, rate], dtype="float32", always_2d=True)
    wave = ref.resample(torch.from_numpy(data.T.copy()), rate, 16000)
    spans = [(int(a * 16000), int(b * 16000)) for a, b in ref.constant_clip_timepoints(wave.shape[1] / 16000, 2, 3)]
    alone = torch.stack([ref.waveform2melspec(wave[:, a:b].clone(), 16000, 128, 204) for a, b in spans])
    shared = ref.imagebind_audio(wave, 16000)
    gap = ((alone + 4.268) / 9.138 - shared).abs().flatten(1).max(dim=1).values
    assert gap[0] < 1e-6 and gap[1:].min() > 0.05, gap


def test_stereo_keeps_channel_zero_and_the_channel_mean(sounds):
    wave = audio.decode_audio(sounds[7.5, 2, 48000])
    data, _ = sf.read(sounds[7.5, 2, 48000], dtype="float32")
    assert not wave.mono and np.array_equal(wave.first, data[:, 0])
    assert np.abs(wave.mix - data.mean(axis=1)).max() < 1e-7
    mono = audio.decode_audio(sounds[7.5, 1, 16000])
    assert mono.mono and mono.mix is mono.first


def test_channel_one_changes_the_cache_key(tmp_path):
    """Channel 1 moves the clip means, so it is part of the input's identity."""
    from scops.runtime.modalities import KINDS
    x = _signal(3.0, 2, 16000)
    y = x.copy()
    y[:, 1] += 0.1
    keys = [KINDS["audio"].key(KINDS["audio"].decode(_wav_bytes(s, 16000, subtype="PCM_16"), {})) for s in (x, y)]
    assert keys[0] != keys[1]
    a, b = (audio.preprocess_audio(_wav_bytes(s, 16000, subtype="PCM_16")) for s in (x, y))
    assert np.abs(a - b).max() > 0.05


def test_clips_leave_the_decoded_waveform_intact(sounds):
    wave = audio.decode_audio(sounds[3.0, 2, 22050])
    first, mix = wave.first.copy(), wave.mix.copy()
    for opts in RECIPES.values():
        once = audio.audio_clips(wave, opts)
        assert np.array_equal(once, audio.audio_clips(wave, opts))
    assert np.array_equal(wave.first, first) and np.array_equal(wave.mix, mix)


# ---------------------------------------------------------------- real files and bad input

def test_speech_stereo_22k_through_preprocessing(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "the quick brown fox jumps over the lazy dog"], check=True)
    mono, rate = sf.read(wav, dtype="float32")
    assert rate == 22050
    stereo = tmp_path / "stereo.flac"
    sf.write(stereo, np.stack([mono, 0.5 * mono], axis=1), rate)
    clips = audio.preprocess_audio(stereo)
    assert clips.shape == (3, 1, 128, 204) and np.all(np.isfinite(clips))
    assert clips[..., :198].std() > 0.3                        # speech, not padding
    bubo = audio.preprocess_audio(str(stereo), audio.BUBOGPT_AUDIO)
    assert bubo.shape == (6, 1, 128, 204) and np.all(np.isfinite(bubo))


def test_short_long_and_over_limit_audio():
    tiny_clip = audio.preprocess_audio(_wav_bytes(np.zeros(1600, np.float32), 16000))     # 0.1 s
    assert tiny_clip.shape == (3, 1, 128, 204) and np.all(np.isfinite(tiny_clip))
    blip = audio.preprocess_audio(_wav_bytes(np.ones(100, np.float32) * 0.1, 44100))      # < 1 frame
    assert blip.shape == (3, 1, 128, 204) and np.all(np.isfinite(blip))
    rng = np.random.default_rng(2)
    ten_min = (0.05 * rng.standard_normal((16000 * 600, 2))).astype(np.float32)
    data = _wav_bytes(ten_min, 16000, subtype="PCM_16")
    assert audio.preprocess_audio(data).shape == (3, 1, 128, 204)
    assert audio.preprocess_audio(data, audio.BUBOGPT_AUDIO).shape == (6, 1, 128, 204)
    with pytest.raises(InputError, match="over the 600 s audio limit"):
        audio.preprocess_audio(_wav_bytes(np.zeros(8000 * 601, np.int16), 8000))


@pytest.mark.parametrize("payload", [b"", b"not audio at all" * 64, b"RIFF\x10\x00\x00\x00WAVEfmt "])
def test_non_audio_is_an_input_error(payload, tmp_path):
    with pytest.raises(InputError):
        audio.preprocess_audio(payload)
    path = tmp_path / "x.wav"
    path.write_bytes(payload)
    with pytest.raises(InputError):
        audio.preprocess_audio(path)
