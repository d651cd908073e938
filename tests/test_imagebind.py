"""ImageBind-huge: reference modules, ONNX stages and torch-free media preprocessing
(audio: tests/test_audio.py)."""
from __future__ import annotations

import io
import math
import subprocess

import numpy as np
import pytest
import torch

from scops.export.imagebind import (ENCODER_USES, build_imagebind, embed_clips, export_imagebind,
                                    imagebind_stage_specs, load_imagebind_state, make_encoder)
from scops.export.imagebind_modules import Attention, ImageBind, ImageBindSizes
from scops.runtime import audio, media
from scops.runtime.errors import InputError

# Keys and shapes of the released checkpoint, read from facebookresearch/ImageBind
# imagebind/models/imagebind_model.py (imagebind_huge) by instantiating that code at the
# real sizes: 1016 non-text tensors.
REAL_KEYS = {
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
    "modality_trunks.vision.blocks.31.mlp.fc1.weight": (5120, 1280),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
    "modality_trunks.audio.blocks.11.attn.bias_k": (1, 1, 768),
    "modality_trunks.audio.blocks.11.attn.out_proj.weight": (768, 768),
    "modality_trunks.audio.blocks.0.norm_2.bias": (768,),
    "modality_heads.audio.0.weight": (768,),
    "modality_heads.audio.2.weight": (1024, 768),
    "modality_postprocessors.audio.1.log_logit_scale": (),
    "modality_preprocessors.depth.depth_stem.proj.weight": (384, 1, 16, 16),
    "modality_preprocessors.depth.pos_embedding_helper.pos_embed": (1, 197, 384),
    "modality_trunks.depth.blocks.11.mlp.fc2.weight": (384, 1536),
    "modality_preprocessors.thermal.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_postprocessors.thermal.1.log_logit_scale": (),
    "modality_preprocessors.imu.imu_stem.proj.weight": (512, 48),
    "modality_preprocessors.imu.pos_embed": (1, 251, 512),
    "modality_trunks.imu.blocks.5.attn.bias_v": (1, 1, 512),
    "modality_heads.imu.3.weight": (1024, 512),
}


@pytest.fixture(scope="module")
def tiny():
    return build_imagebind(ImageBindSizes.tiny(), seed=0)


# ---------------------------------------------------------------- model and ONNX

def test_real_state_dict_keys_and_shapes():
    with torch.device("meta"):
        model = ImageBind(ImageBindSizes.huge())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(state) == 1016
    for key, shape in REAL_KEYS.items():
        assert state.get(key) == shape, key
    assert sum(math.prod(s) for s in state.values()) == pytest.approx(846.7e6, rel=1e-3)
    assert not [k for k in state if ".text" in k]


def test_load_state_drops_text_and_requires_the_rest(tiny):
    state = dict(tiny.state_dict())
    state["modality_trunks.text.blocks.0.norm_1.weight"] = torch.ones(4)
    fresh = ImageBind(ImageBindSizes.tiny())
    load_imagebind_state(fresh, state)
    assert torch.equal(fresh.modality_heads["imu"][3].weight, tiny.modality_heads["imu"][3].weight)
    del state["modality_heads.vision.2.weight"]
    with pytest.raises(KeyError):
        load_imagebind_state(fresh, state)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, bias=True, add_bias_kv=True).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    mine = Attention(32, 4, add_bias_kv=True)
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        want = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0]
        assert torch.allclose(mine(x), want.transpose(0, 1), atol=1e-5)


def test_postprocessor_scales(tiny):
    x = torch.randn(2, 1, 128, 204)
    with torch.no_grad():
        assert torch.allclose(make_encoder(tiny, "audio")(x).norm(dim=-1), torch.full((2,), 20.0))
        assert torch.allclose(make_encoder(tiny, "audio", "pandagpt")(x).norm(dim=-1), torch.ones(2))
        tokens = make_encoder(tiny, "audio_tokens")(x)
        assert tokens.shape == (2, 229, tiny.sizes.audio.width)
        assert torch.allclose(tokens.norm(dim=-1), torch.full((2, 229), 20.0), atol=1e-4)
        assert torch.allclose(make_encoder(tiny, "thermal")(torch.randn(2, 1, 224, 224)).norm(dim=-1),
                              torch.full((2,), 10.0))


def test_every_stage_exports_and_matches_at_another_batch(tiny, tmp_path):
    lines = []
    records = export_imagebind(tiny, ENCODER_USES, tmp_path, log=lines.append)
    assert set(records) == set(ENCODER_USES) and len(lines) == len(ENCODER_USES)
    for use, rec in records.items():
        assert rec["batch"] == 3 and rec["max_abs_diff"] <= 1e-4, use
        assert (tmp_path / rec["file"]).is_file()
    specs = imagebind_stage_specs(ImageBindSizes.huge())
    assert specs["audio_tokens"].outputs[0].shape == ("batch", 229, 768)
    assert specs["video"].inputs[0].shape == ("batch", 3, 2, 224, 224)
    assert specs["imu"].inputs[0].shape == ("batch", 6, 2000)


def test_runtime_audio_through_onnx_equals_reference(tiny, tmp_path):
    import onnxruntime as ort
    export_imagebind(tiny, ["audio_tokens"], tmp_path, log=lambda s: None)
    t = np.arange(16000 * 7) / 16000
    wave = audio.Waveform.of(np.sin(2 * np.pi * 330 * t), 16000)
    clips = audio.audio_clips(wave, audio.BUBOGPT_AUDIO)
    sess = ort.InferenceSession(str(tmp_path / "imagebind_audio_tokens.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"fbank": clips})[0].mean(axis=0)                      # mean_over_clips
    want = embed_clips(tiny, "audio_tokens", torch.from_numpy(clips)).numpy()
    assert got.shape == (229, tiny.sizes.audio.width) and np.abs(got - want).max() <= 1e-4


# ---------------------------------------------------------------- video and images

def _write_video(path, frames: int, fps: int, w: int, h: int):
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 40_000_000                                # near-lossless colours
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = int(255 * i / max(frames - 1, 1))       # red encodes the frame index
            img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # green: x position
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def test_video_clips_frames_and_crops(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, frames=60, fps=10, w=320, h=240)       # 6 s
    x = media.preprocess_video(path)
    assert x.shape == (15, 3, 2, 224, 224) and x.dtype == np.float32
    red = x[:, 0].mean(axis=(2, 3)) * media.CLIP_STD[0] + media.CLIP_MEAN[0]  # [15, 2] in 0..1
    # clip k starts at k * 4/5 s: frames ceil(8k) and ceil(8k) + 19 of 60
    for k in range(5):
        first = math.ceil(10 * k * 0.8 - 1e-9)
        assert red[3 * k, 0] == pytest.approx(first / 59, abs=0.03)
        assert red[3 * k, 1] == pytest.approx((first + 19) / 59, abs=0.03)
    green = x[:3, 1, 0].mean(axis=(1,)) * media.CLIP_STD[1] + media.CLIP_MEAN[1]   # [3 crops, 224]
    assert green[0, 0] < green[1, 0] < green[2, 0]            # left, centre, right crops


def test_corrupt_video_is_an_input_error(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, frames=20, fps=10, w=160, h=120)
    data = path.read_bytes()
    for bad in (data[: len(data) // 3], b"\x00" * 4096, b"hello"):
        with pytest.raises(InputError):
            media.preprocess_video(bad)


def test_image_thermal_depth_imu(tmp_path):
    from PIL import Image
    rgb = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert media.preprocess_imagebind_image(buf.getvalue()).shape == (3, 224, 224)
    thermal = media.preprocess_thermal(buf.getvalue())
    assert thermal.shape == (1, 224, 224) and 0 <= thermal.min() and thermal.max() <= 1
    depth16 = io.BytesIO()
    Image.fromarray(np.full((240, 320), 30000, np.uint16)).save(depth16, format="PNG")
    depth = media.preprocess_depth(depth16.getvalue())
    assert depth.shape == (1, 224, 224) and np.allclose(depth, 30000 / 65535, atol=1e-4)
    imu = tmp_path / "imu.npy"
    np.save(imu, np.random.default_rng(4).standard_normal((2000, 6)))
    assert media.preprocess_imu(imu).shape == (6, 2000)
    np.save(imu, np.zeros((6, 100)))
    with pytest.raises(InputError, match="6x2000"):
        media.preprocess_imu(imu)
    with pytest.raises(InputError):
        media.preprocess_thermal(b"not an image")


@pytest.mark.parametrize("n_in,n_out,antialias", [(498, 204, False), (498, 204, True),
                                                   (240, 224, False), (1080, 224, False), (100, 224, False)])
def test_linear_resize_matches_torch_interpolate(n_in, n_out, antialias):
    x = np.random.default_rng(n_in).standard_normal((3, n_in)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None, :, None, :], size=(1, n_out),
                                           mode="bilinear", align_corners=False, antialias=antialias)
    got = x @ media._linear_resize_weights(n_in, n_out, antialias).T
    assert np.abs(got - want[0, :, 0].numpy()).max() < 3e-4   # torch computes coordinates in float32


def test_media_runs_without_torch(tmp_path):
    import sys
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        "import io, numpy as np, soundfile as sf\n"
        "from scops.runtime import audio, media, modalities\n"
        "buf = io.BytesIO(); sf.write(buf, np.zeros((44100, 2), np.float32), 44100, format='WAV')\n"
        "print(audio.preprocess_audio(buf.getvalue(), audio.BUBOGPT_AUDIO).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "(6, 1, 128, 204)" in r.stdout, r.stdout + r.stderr
