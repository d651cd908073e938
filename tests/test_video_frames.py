"""Video frames by seeking (runtime/video.py): the picks are decord's uniform ones, equal to a
full decode; a 10-hour video costs 64 seeks and a bounded number of decoded frames; short
and broken videos get the frames they have or one clear InputError."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from media_helpers import frame_number, make_video
from scops.runtime.errors import InputError
from scops.runtime.video import read_frames_at, sample_uniform, uniform_indices


def numbers(frames, w, h):
    return [frame_number(f, frames.shape[2] / w, frames.shape[1] / h) for f in frames]


def test_uniform_indices_are_decords():
    for vlen, n in ((96, 64), (64, 64), (1000, 64), (20, 64), (1, 64), (7919, 64)):
        want = np.arange(0, vlen, vlen / min(n, vlen)).astype(int).tolist()[:min(n, vlen)]
        assert uniform_indices(vlen, n) == want and len(want) == min(n, vlen)


def test_ten_hour_video_is_seeked_not_decoded(tmp_path):
    """2000 frames over 10 hours (one every 18 s), a key frame every 4: the 64 picks are exact
    and decoding stays near 64 x (key-frame distance), far from the whole file."""
    path = make_video(tmp_path / "10h.mp4", 2000, Fraction(1, 18), w=48, h=32, gop=4)
    stats: dict = {}
    frames, info = read_frames_at(path, lambda i: [k / i.fps for k in uniform_indices(i.frames, 64)], (224, 224),
                                  stats=stats)
    assert info.duration == pytest.approx(36000.0) and info.frames == 2000
    assert numbers(np.stack(frames), 48, 32) == uniform_indices(2000, 64)
    assert stats["seeks"] == 63 and stats["decoded"] <= 64 * 4 < 2000          # pick 0 needs no seek


def test_short_video_gives_every_frame(tmp_path):
    path = make_video(tmp_path / "short.mp4", 9, 3)
    frames, info = sample_uniform(path)
    assert frames.shape == (9, 224, 224, 3) and numbers(frames, 64, 48) == list(range(9))
    assert info.duration == pytest.approx(3.0)


def test_frames_at_times_for_drawing(tmp_path):
    path = make_video(tmp_path / "v.mp4", 50, 10)
    frames, info = read_frames_at(path, [0.0, 1.25, 4.9, 100.0])
    assert [f.shape for f in frames] == [(48, 64, 3)] * 4
    assert [frame_number(f) for f in frames] == [0, 12, 49, 49]         # past the end: the last frame


def test_file_cut_short_gives_the_frames_it_holds(tmp_path):
    """A stream cut off mid-file (its header still promises 120 frames): picks past the last
    decodable frame repeat it; no hang, no crash."""
    path = make_video(tmp_path / "v.mkv", 120, 24, gop=24)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[:len(data) // 2])
    frames, info = sample_uniform(cut)
    got = numbers(frames, 64, 48)
    assert frames.shape == (64, 224, 224, 3) and got == sorted(got) and 0 < max(got) < 119


@pytest.mark.parametrize("make", ["garbage", "empty", "truncated_header", "no_video_stream", "noise_packets"])
def test_undecodable_video_is_one_clear_error(tmp_path, make):
    import av
    path = tmp_path / "bad.mp4"
    if make == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "truncated_header":
        good = make_video(tmp_path / "good.mp4", 30, 10)
        path.write_bytes(open(good, "rb").read()[:200])
    elif make == "no_video_stream":
        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for p in list(s.encode(frame)) + list(s.encode()):
                c.mux(p)
    else:                                                                # a sound container, every packet noise
        rng = np.random.default_rng(1)
        path = tmp_path / "bad.mkv"
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            for i in range(30):
                p = av.Packet(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
                p.stream, p.pts, p.dts, p.time_base = s, i, i, Fraction(1, 10)
                c.mux(p)
    with pytest.raises(InputError) as err:
        sample_uniform(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
