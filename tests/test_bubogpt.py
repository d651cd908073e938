"""BuboGPT (image + audio): every ONNX stage vs the PyTorch reference on real inputs, and F32
GGUF greedy tokens identical to HF `generate` for image turns, audio turns and conversations
that mix them in either order."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from reference_bubogpt import BuboGPTReference, bubogpt_prompt, pixels

Q1, Q2, Q3 = "What is happening here?", "What sound is this?", "Tell me more please."
N_NEW = 12
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from scops.export.fixtures_bubogpt import build_bubogpt_tiny
    return build_bubogpt_tiny(tmp_path_factory.mktemp("bubo") / "bubogpt-tiny")


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    from scops.export.bubogpt import export_bubogpt
    return export_bubogpt(str(ckpt), tmp_path_factory.mktemp("bubob") / "b", "F32", log=lambda s: None)


@pytest.fixture(scope="module")
def ref(ckpt):
    return BuboGPTReference(ckpt)


@pytest.fixture(scope="module")
def session(bundle):
    from scops.runtime.session import Session
    s = Session.open(bundle, kv_type="f32", flash_attn="off", n_ctx=1024)
    yield s
    s.close()


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """A spoken phrase (espeak-ng, 22.05 kHz, under 5 s: tiled) when the tool exists, else a
    tone; and a 7.3 s chirp with noise at 16 kHz (six 5 s clips at different offsets)."""
    import soundfile as sf
    root = tmp_path_factory.mktemp("sounds")
    t = np.arange(int(16000 * 7.3)) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * (220 + 80 * t) * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    sf.write(root / "chirp.wav", chirp.astype(np.float32), 16000)
    speech = root / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(speech), "the cat sat on the mat"], check=True, capture_output=True)
    else:
        sf.write(speech, (0.3 * np.sin(2 * np.pi * 440 * t[:24000])).astype(np.float32), 16000)
    return {"speech": speech, "chirp": root / "chirp.wav"}


def fbank_of(session, path) -> np.ndarray:
    """The runtime's fbank clips of a file (tests/test_audio.py: equal to BuboGPT's own loader)."""
    from scops.runtime.modalities import KINDS
    spec = session.bundle.modalities["audio"]["preprocess"]
    return KINDS["audio"].prepare(KINDS["audio"].decode(path, spec), spec)


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_manifest_records_both_modalities(session):
    m = session.bundle.manifest
    assert m["family"] == "bubogpt" and m["template"]["placeholder"] == "<ModalityHere>"
    assert [st["op"] for st in m["modalities"]["image"]["stages"]] == ["onnx", "onnx", "projector"]
    audio = m["modalities"]["audio"]
    assert [st["op"] for st in audio["stages"]] == ["onnx", "l2norm", "mean_over_clips", "onnx", "projector"]
    assert audio["stages"][1]["scale"] == pytest.approx(20.0, rel=1e-6)
    assert audio["preprocess"]["recipe"] == "bubogpt" and audio["rows"] == 32
    assert {st["file"] for st in audio["stages"] if "file" in st} <= set(m["files"])
    for f in ("vision.onnx", "qformer.onnx", "audio_trunk.onnx", "audio_qformer.onnx"):
        assert m["validation"][f]["max_abs_diff"] <= ATOL and m["validation"][f]["batch"] > 1


def test_checkpoint_uses_the_original_key_names(ckpt):
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for k in ("multimodal_encoder.modality_trunks.vision.blocks.0.attn.q_bias",      # EVA ViT-g
              "multimodal_encoder.modality_postprocessors.vision.weight",              # ln_vision
              "multimodal_encoder.modality_preprocessors.audio.rgbt_stem.proj.weight",
              "multimodal_encoder.modality_postprocessors.audio.1.log_logit_scale",
              "multimodal_joiner.modality_qformers.audio.Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
              "multimodal_joiner.modality_qformers.audio.Qformer.bert.embeddings.word_embeddings.weight",
              "multimodal_joiner.modality_post_projectors.audio.fc.bias", "llama_model.lm_head.weight"):
        assert k in keys, k


def test_exporter_refuses_what_it_cannot_serve(ckpt, tmp_path):
    import json

    from scops.export.bubogpt import export_bubogpt
    from scops.runtime.errors import ExportError
    with pytest.raises(ExportError, match="encoder-precision"):
        export_bubogpt(str(ckpt), tmp_path / "b", "F32", log=lambda s: None, encoder_precision="fp16")
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    (other / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ExportError, match="not 'bubogpt'"):
        export_bubogpt(str(other), tmp_path / "b", "F32", log=lambda s: None)
    assert not (tmp_path / "b").exists()


def test_image_stages_match_reference(session, ref, photos):
    from scops.runtime.preprocess import preprocess_image
    spec = session.bundle.modalities["image"]["preprocess"]
    px = torch.cat([pixels(rgb) for rgb in photos.values()])                     # [3, 3, 224, 224]
    got_px = np.stack([preprocess_image(rgb, spec) for rgb in photos.values()])
    assert maxdiff(got_px, px) < 1e-5                                            # short side + centre crop
    enc = session.encoders["image"]
    base = enc.encode_base(got_px)
    assert maxdiff(base["image_embeds"], ref.image_embeds(px)) <= ATOL           # batch 3, traced at 1
    bridge = enc.encode_rows(base)
    want = ref.image_bridge(px)
    assert bridge.shape == (3, 32, 64) and maxdiff(bridge, want) <= ATOL
    rows = np.stack([session.projectors["image"].forward(b) for b in bridge])
    assert maxdiff(rows, ref.project(want, "image")) <= ATOL


@pytest.mark.parametrize("name", ["speech", "chirp"])
def test_audio_stages_match_reference(session, ref, sounds, name):
    fbank = fbank_of(session, sounds[name])                                      # [clips, 1, 128, 204]
    assert fbank.shape[1:] == (1, 128, 204) and fbank.shape[0] >= 6
    enc = session.encoders["audio"]
    base = enc.encode_base(fbank)
    assert base["audio_tokens"].shape == (fbank.shape[0], 229, 32)               # CLS + 12 x 19 patches
    assert maxdiff(base["audio_tokens"], ref.audio_trunk(torch.from_numpy(fbank))) <= ATOL
    assert base["audio_embeds"].shape == (1, 229, 32)                            # clips averaged token-wise
    bridge = enc.encode_rows(base)
    want = ref.audio_bridge(torch.from_numpy(fbank))
    assert bridge.shape == (1, 32, 64) and maxdiff(bridge, want) <= ATOL
    assert maxdiff(session.projectors["audio"].forward(bridge[0]), ref.project(want, "audio")[0]) <= ATOL


def test_runtime_audio_recipe_is_the_original_eval_processor(session, sounds):
    assert fbank_of(session, sounds["chirp"]).shape[0] == session.bundle.modalities["audio"]["preprocess"]["clips"]


def test_image_turn_equals_reference(session, ref, photos):
    reply = session.chat().send(Q1, images=[photos["cat"]], temperature=0, max_tokens=N_NEW,
                                ignore_stop=True).result()
    want = ref.generate(bubogpt_prompt([(["image"], Q1, None)]), [ref.rows("image", photos["cat"])], N_NEW)
    assert reply.token_ids == want


def test_audio_turn_equals_reference(session, ref, sounds):
    reply = session.chat().send(Q2, audios=[sounds["speech"]], temperature=0, max_tokens=N_NEW,
                                ignore_stop=True).result()
    rows = ref.rows("audio", fbank_of(session, sounds["speech"]))
    assert reply.token_ids == ref.generate(bubogpt_prompt([(["audio"], Q2, None)]), [rows], N_NEW)


@pytest.mark.parametrize("order", [("image", "audio"), ("audio", "image")])
def test_mixed_conversation_over_turns_equals_reference(session, ref, photos, sounds, order):
    """Turn 1 with one medium, turn 2 with the other, turn 3 text only: each turn's greedy
    tokens equal HF on the full original prompt (earlier answers as text, as the original
    keeps them: history="text")."""
    inputs = {"image": photos["astronaut"], "audio": sounds["chirp"]}
    rows = {"image": ref.rows("image", inputs["image"]), "audio": ref.rows("audio", fbank_of(session, sounds["chirp"]))}
    conv = session.chat(history="text")
    turns, media_rows = [], []
    for media, q in (([order[0]], Q1), ([order[1]], Q2), ([], Q3)):
        kw = {f"{m}s": [inputs[m]] for m in media}
        reply = conv.send(q, temperature=0, max_tokens=N_NEW, ignore_stop=True, **kw).result()
        media_rows += [rows[m] for m in media]
        want = ref.generate(bubogpt_prompt(turns + [(media, q, None)]), media_rows, N_NEW)
        assert reply.token_ids == want, f"turn {len(turns) + 1} of {order}"
        turns.append((media, q, conv.messages[-1].text))
    assert reply.timings["reused_cells"] > 0                                     # the history came from the KV


def test_image_and_audio_in_one_turn_equal_reference(session, ref, photos, sounds):
    """app.py uploads the image, then the audio: two Human messages, the question on the second."""
    reply = session.chat().send(Q1, images=[photos["coffee"]], audios=[sounds["speech"]], temperature=0,
                                max_tokens=N_NEW, ignore_stop=True).result()
    rows = [ref.rows("image", photos["coffee"]), ref.rows("audio", fbank_of(session, sounds["speech"]))]
    assert reply.token_ids == ref.generate(bubogpt_prompt([(["image", "audio"], Q1, None)]), rows, N_NEW)

