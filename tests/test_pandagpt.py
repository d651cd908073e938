"""PandaGPT: six ImageBind modalities, one summed row per turn, LoRA merged at export;
greedy tokens of the F32 GGUF equal the PyTorch reference (LoRA applied at run time)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_png
from reference_pandagpt import PandaGPTReference

Q1, Q2 = "What do you perceive?", "Tell me more."
N = 16


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from scops.export.fixtures import build_pandagpt_tiny
    return build_pandagpt_tiny(tmp_path_factory.mktemp("pg") / "pandagpt-tiny")


@pytest.fixture(scope="module")
def ref(src):
    return PandaGPTReference(src)


@pytest.fixture(scope="module")
def session(src, tmp_path_factory):
    from scops.export.pandagpt import export_pandagpt
    from scops.runtime.session import Session
    b = export_pandagpt(str(src), tmp_path_factory.mktemp("pgb") / "b", "F32", log=lambda s: None)
    s = Session.open(b, kv_type="f32", flash_attn="off", n_ctx=512)
    yield s
    s.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos):
    import soundfile as sf
    from PIL import Image
    d = tmp_path_factory.mktemp("pgm")
    sr = 22050                                   # not 16 kHz, stereo: exercises resampling + channel pick
    t = np.arange(int(sr * 3.3)) / sr
    sf.write(d / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 97 * t)], 1) * 0.3, sr)
    Image.fromarray((np.random.default_rng(0).random((180, 260)) * 255).astype(np.uint8)).save(d / "thermal.png")
    np.save(d / "imu.npy", np.random.default_rng(2).standard_normal((6, 2000)).astype(np.float32))
    Image.fromarray((np.random.default_rng(3).random((200, 300)) * 65535).astype(np.uint16)).save(d / "depth.png")
    write_video(d / "clip.mp4", photos["coffee"])
    return {"image": write_png(d / "cat.png", photos["cat"]), "audio": d / "tone.wav",
            "thermal": d / "thermal.png", "imu": d / "imu.npy", "depth": d / "depth.png", "video": d / "clip.mp4"}


def write_video(path, rgb, seconds=12, fps=10):
    """A 12 s clip panning across a photo (5 clips x 2 s need >= 10 s to spread out)."""
    import av
    h, w = 120, 160
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            x = (i * 3) % (rgb.shape[1] - w)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, x:x + w]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


ARG = {"image": "images", "audio": "audios", "thermal": "thermals", "imu": "imus", "depth": "depths",
       "video": "videos"}


def prepared(session, modality, path):
    from scops.runtime.modalities import KINDS
    spec = session.bundle.modalities[modality]["preprocess"]
    kind = KINDS[modality]
    return kind.prepare(kind.decode(path, spec), spec)


def test_lora_is_merged_and_recorded(session):
    lora = session.bundle.manifest["lora"]
    assert lora["merged"] and lora["tensors"] == 8 and lora["r"] == 8


@pytest.mark.parametrize("modalities", [("image",), ("audio",), ("video",), ("thermal",), ("depth",), ("imu",),
                                        ("image", "audio"), ("video", "audio", "thermal")])
def test_greedy_tokens_equal_reference(session, ref, media, modalities):
    reply = session.chat().send(Q1, temperature=0, max_tokens=N, ignore_stop=True,
                                **{ARG[m]: [media[m]] for m in modalities}).result()
    feature = ref.feature({m: prepared(session, m, media[m]) for m in modalities})
    assert reply.token_ids == ref.generate([(Q1, None)], feature, N)
    n_rows = sum(isinstance(c, tuple) for c in session.llm.cells)
    assert n_rows == 1                                     # the turn's inputs became one row


def test_second_turn_history_as_web_demo_builds_it(session, ref, media):
    """Turn 1 ends by length (random weights): web_demo.py's history keeps decode(ids[:-2]),
    two tokens fewer than the answer; turn 2's tokens follow the original's whole prompt
    (history="text": the original's history; the default keeps the generated ids)."""
    conv = session.chat(history="text")
    r1 = conv.send(Q1, audios=[media["audio"]], temperature=0, max_tokens=8, ignore_stop=True).result()
    feature = ref.feature({"audio": prepared(session, "audio", media["audio"])})
    out1 = ref.generate([(Q1, None)], feature, 8)
    assert r1.token_ids == out1
    a1 = ref.history_answer(out1)
    assert conv.messages[-1].text == a1 and len(a1) < len(r1.text)
    r2 = conv.send(Q2, temperature=0, max_tokens=N, ignore_stop=True).result()
    assert r2.timings["reused_cells"] >= r1.timings["reused_cells"] + r1.timings["decoded_cells"]
    assert r2.token_ids == ref.generate([(Q1, a1), (Q2, None)], feature, N)


def test_onnx_audio_mean_over_clips_matches_reference(session, ref, media):
    from scops.export.imagebind import embed_clips
    clips = prepared(session, "audio", media["audio"])
    assert clips.shape == (3, 1, 128, 204)                 # 3 clips x 2 s, 128 mel x 204 frames
    enc = session.encoders["audio"]
    got = enc.encode_rows(enc.encode_base(clips))[0, 0]
    want = embed_clips(ref.imagebind, "audio", torch.from_numpy(clips), "pandagpt").numpy()
    assert np.max(np.abs(got - want)) <= 1e-4


def test_a_modality_the_bundle_lacks_is_a_clear_error(bundle):
    from scops.runtime.errors import UnsupportedModality
    from scops.runtime.session import Session
    with Session.open(bundle("Q4_K_M")) as s:
        with pytest.raises(UnsupportedModality, match="takes no audio input"):
            s.chat().send("hi", audios=["x.wav"])


def test_cli_fixture_export_and_run_with_audio_json(tmp_path, media):
    import json
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300)
    r = cli("scops.export.fixtures", "pandagpt-tiny", tmp_path / "src")
    assert r.returncode == 0, r.stderr
    r = cli("scops.runtime.cli", "export", "--from", tmp_path / "src", "--family", "pandagpt", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    r = cli("scops.runtime.cli", "run", tmp_path / "b", "--image", media["image"], "--audio", media["audio"],
            "--prompt", Q1, "--max-tokens", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    timings = json.loads(r.stdout)["timings"]
    assert timings["encode_image_ms"] > 0 and timings["encode_audio_ms"] > 0
    r = cli("scops.runtime.cli", "run", tmp_path / "b", "--audio", media["thermal"], "--prompt", Q1)
    assert r.returncode == 2 and "not an audio file" in r.stderr
