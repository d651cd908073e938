"""What fuzzing found, as plain tests: extreme aspect ratios cost what their crops do,
the bounded paths compute what the plain ones do, and only the listed containers are read."""
from __future__ import annotations

import io

import numpy as np
import pytest


def test_extreme_aspect_image_is_cropped_without_the_huge_resize(monkeypatch):
    from PIL import Image

    import scops.runtime.preprocess as P
    spec = {"size": 224, "resize": "short_side_crop", "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    resized = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: resized.append(size) or real(self, size, *a, **k))
    rgb = np.random.default_rng(0).integers(0, 256, (16, 65535, 3), dtype=np.uint8)
    x = P.preprocess_image(rgb, spec)
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    assert resized == [(224, 224)]                      # not (917490, 224)


@pytest.mark.parametrize("shape", [(300, 2000), (2000, 300), (37, 1000)])
def test_box_resize_matches_the_plain_short_side_crop(monkeypatch, photos, shape):
    from PIL import Image

    import scops.runtime.preprocess as P
    h, w = shape
    photo = np.asarray(Image.fromarray(photos["astronaut"]).resize((w, h), Image.BILINEAR))
    img = Image.fromarray(photo)
    plain = np.asarray(P.short_side_crop(img, 224), np.int16)
    monkeypatch.setattr(P, "MAX_RESIZE_CROPS", 0)       # force the box path
    boxed = np.asarray(P.short_side_crop(img, 224), np.int16)
    assert np.abs(plain - boxed).max() <= 2 and np.abs(plain - boxed).mean() < 0.05


def _dense_short_side_crops(x, size, crops):
    """The former implementation: dense resize weights, full resize, then the crops."""
    import scops.runtime.media as M
    _, h, w = x.shape
    nh, nw = (int(np.floor(h / w * size)), size) if w < h else (size, int(np.floor(w / h * size)))
    ry = M._linear_resize_weights(h, nh, False).astype(np.float32)
    rx = M._linear_resize_weights(w, nw, False).astype(np.float32)
    full = np.einsum("yh,chw,xw->cyx", ry, x, rx, optimize=True)
    out = []
    for idx in crops:
        y, x0 = M._crop_offsets(nh, nw, size, idx)
        out.append(full[:, y:y + size, x0:x0 + size])
    return out


@pytest.mark.parametrize("hw", [(240, 320), (320, 240), (224, 224), (50, 700), (700, 50)])
def test_video_crops_equal_the_dense_resize(hw):
    import scops.runtime.media as M
    x = np.random.default_rng(1).random((3, *hw), dtype=np.float32)
    for got, want in zip(M._short_side_crops(x, 224, range(3)), _dense_short_side_crops(x, 224, range(3))):
        assert got.shape == (3, 224, 224)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_extreme_aspect_video_costs_its_crops(tmp_path):
    import av

    import scops.runtime.media as M
    path = tmp_path / "strip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 4096, 16, "yuv420p"
        for i in range(8):
            frame = np.full((16, 4096, 3), 30 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = M.preprocess_video(path)                      # dense weights: [57344, 4096] float64 = 1.9 GB
    assert out.shape == (15, 3, 2, 224, 224) and np.isfinite(out).all()


def test_only_listed_audio_containers_are_read():
    import soundfile as sf

    from scops.runtime.errors import InputError
    from scops.runtime.audio import decode_audio
    tone = np.sin(np.arange(1600) / 5).astype(np.float32) * 0.3
    for fmt in ("AU", "VOC", "NIST"):
        buf = io.BytesIO()
        sf.write(buf, tone, 8000, format=fmt, subtype="PCM_16")
        with pytest.raises(InputError, match=r"not an audio file \(reads WAV, FLAC, OGG, MP3, AIFF\)"):
            decode_audio(buf.getvalue())
    buf = io.BytesIO()
    sf.write(buf, tone, 8000, format="WAV", subtype="PCM_16")
    wave = decode_audio(buf.getvalue())
    assert wave.rate == 8000 and np.allclose(wave.first, tone, atol=1e-4)


def test_garbage_sample_values_are_refused():
    import soundfile as sf

    from scops.runtime.errors import InputError
    from scops.runtime.audio import decode_audio
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, 3e30, -0.2] * 100, np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="sample values up to 3e"):
        decode_audio(buf.getvalue())
