"""Write the seed inputs of every fuzz target into tests/fuzz/corpus/<target>/seed-*.

    python tests/fuzz/seeds.py [TARGET ...]   # rewrites the seed-* files (deterministic)

Small valid files of every container and codec the decoders meet in practice, so the
fuzzer starts from deep inside each parser instead of rediscovering magic numbers. Each
is a few KB: the committed corpus stays small.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parent / "corpus"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return (base + rng.integers(0, 16, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _pil(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def images() -> dict[str, bytes]:
    from PIL import Image
    rgb = Image.fromarray(_rgb(24, 32))
    frames = [Image.fromarray(_rgb(16, 16, s)) for s in range(3)]
    out = {
        "rgb.png": _pil(rgb, "PNG"),
        "rgba.png": _pil(rgb.convert("RGBA"), "PNG"),
        "palette.png": _pil(rgb.convert("P"), "PNG"),
        "gray16.png": _pil(Image.fromarray((_rgb(16, 16)[..., 0].astype(np.uint16) * 257)), "PNG"),
        "bilevel.png": _pil(rgb.convert("1"), "PNG"),
        "baseline.jpg": _pil(rgb, "JPEG", quality=80),
        "progressive.jpg": _pil(rgb, "JPEG", quality=60, progressive=True),
        "cmyk.jpg": _pil(rgb.convert("CMYK"), "JPEG"),
        "gray.jpg": _pil(rgb.convert("L"), "JPEG"),
        "anim.gif": _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "rgb.bmp": _pil(rgb, "BMP"),
        "rle.bmp": _pil(rgb.convert("P"), "BMP"),
        "lzw.tif": _pil(rgb, "TIFF", compression="tiff_lzw"),
        "deflate.tif": _pil(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "raw.tif": _pil(rgb, "TIFF"),
        "lossy.webp": _pil(rgb, "WEBP", quality=50),
        "lossless.webp": _pil(rgb, "WEBP", lossless=True),
        "rgb.ppm": _pil(rgb, "PPM"),
    }
    return out


def audios() -> dict[str, bytes]:
    import soundfile as sf
    t = np.arange(1600) / 8000.0
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([tone, tone[::-1]], 1)

    def write(x, rate, fmt, subtype=None):
        buf = io.BytesIO()
        sf.write(buf, x, rate, format=fmt, subtype=subtype)
        return buf.getvalue()
    return {
        "pcm16.wav": write(tone, 8000, "WAV", "PCM_16"),
        "pcm24-stereo.wav": write(stereo[:400], 16000, "WAV", "PCM_24"),
        "float.wav": write(tone[:400], 44100, "WAV", "FLOAT"),
        "u8.wav": write(tone[:800], 11025, "WAV", "PCM_U8"),
        "ulaw.wav": write(tone[:800], 8000, "WAV", "ULAW"),
        "msadpcm.wav": write(tone[:800], 8000, "WAV", "MS_ADPCM"),
        "mono.flac": write(tone, 8000, "FLAC", "PCM_16"),
        "stereo24.flac": write(stereo[:800], 48000, "FLAC", "PCM_24"),
        "vorbis.ogg": write(tone, 8000, "OGG", "VORBIS"),
        "opus.ogg": write(np.tile(tone, 2), 16000, "OGG", "OPUS"),
        "pcm16.aiff": write(tone[:400], 22050, "AIFF", "PCM_16"),
    }


def videos() -> dict[str, bytes]:
    import av
    out = {}
    for name, fmt, codec, pix in [("h264.mp4", "mp4", "libx264", "yuv420p"), ("mpeg4.mp4", "mp4", "mpeg4", "yuv420p"),
                                  ("vp8.webm", "webm", "libvpx", "yuv420p"), ("mjpeg.avi", "avi", "mjpeg", "yuvj420p"),
                                  ("mpeg4.mkv", "matroska", "mpeg4", "yuv420p"), ("anim.gif", "gif", "gif", "rgb8")]:
        buf = io.BytesIO()
        try:
            with av.open(buf, "w", format=fmt) as c:
                s = c.add_stream(codec, rate=4)
                s.width, s.height, s.pix_fmt = 32, 24, pix
                for i in range(6):
                    frame = av.VideoFrame.from_ndarray(_rgb(24, 32, i), format="rgb24")
                    for p in s.encode(frame):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
        except Exception as e:            # a codec this PyAV build lacks
            print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        out[name] = buf.getvalue()
    return out


def single_channel(kind: str) -> dict[str, bytes]:
    from PIL import Image
    g = _rgb(20, 28)[..., 0]
    out = {"gray.png": _pil(Image.fromarray(g), "PNG"), "gray.jpg": _pil(Image.fromarray(g), "JPEG")}
    if kind == "depth":
        d16 = (g.astype(np.uint16) * 200)
        out["depth16.png"] = _pil(Image.fromarray(d16), "PNG")
        out["float.tif"] = _pil(Image.fromarray(g.astype(np.float32) / 7.0), "TIFF")
    else:
        out["rgb.png"] = _pil(Image.fromarray(_rgb(20, 28)), "PNG")
    return out


def imus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    return {"c6xt2000-f16.npy": npy(rng.standard_normal((6, 2000)).astype(np.float16)),
            "t2000xc6-i16.npy": npy(rng.integers(-500, 500, (2000, 6)).astype(np.int16)),
            "wrong-shape.npy": npy(np.zeros((6, 10), np.float32))}


def manifests() -> dict[str, bytes]:
    import json
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from targets import mini_bundle
    _, m = mini_bundle()
    combined = {**m, "combine": {"op": "sum"}, "validation": {"vision.onnx": {"max_abs_diff": 1e-6}}}
    return {"valid.json": json.dumps(m, indent=1).encode(), "compact.json": json.dumps(m).encode(),
            "combine.json": json.dumps(combined, indent=1).encode()}


def requests() -> dict[str, bytes]:
    """Valid bodies of every shape the server takes (text, picture, clip, history, stream,
    options), then malformed ones generated by hypothesis (request_bodies.py)."""
    import base64
    import json
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from request_bodies import VALID, examples
    png = "data:image/png;base64," + base64.b64encode(images()["rgb.png"]).decode()
    wav = base64.b64encode(audios()["u8.wav"]).decode()
    picture = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png, "detail": "auto"}},
                                           {"type": "text", "text": "What is in it?"}]}
    valid = {
        "text": {"messages": [{"role": "user", "content": "Hello!"}]},
        "image": {"model": "m", "messages": [picture], "max_tokens": 8},
        "audio": {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": wav, "format": "wav"}}, {"type": "text", "text": "What is this sound?"}]}]},
        "history": {"messages": [{"role": "developer", "content": "Be brief."}, picture,
                                 {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}],
                    "stream": True, "stream_options": {"include_usage": True}},
        "options": {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "top_p": 0.9, "top_k": 40,
                    "repeat_penalty": 1.1, "seed": 2**40, "stop": ["###", "\n"], "max_completion_tokens": 16,
                    "ignore_eos": True, "n": 1},
        "mutable": VALID,
    }
    out = {f"{k}.json": json.dumps(v).encode() for k, v in valid.items()}
    for i, raw in enumerate(examples(40)):
        out[f"gen{i:02d}.json"] = raw
    return out


def main() -> None:
    makers = {"request": requests, "manifest": manifests, "image": images, "audio": audios, "video": videos, "thermal": lambda: single_channel("thermal"),
              "depth": lambda: single_channel("depth"), "imu": imus}
    chosen = sys.argv[1:] or list(makers)
    for target in chosen:
        make = makers[target]
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        files = make()
        for name, data in files.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values())) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
