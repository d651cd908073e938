"""LEGO / GroundingGPT: the tiny release in the original layout exports; every ONNX stage and
projector matches the PyTorch reference written from the original code on real inputs
(photos, a video, speech); an F32 bundle's greedy tokens equal HF `generate` for image,
video, audio and mixed turns and a follow-up turn."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from media_helpers import make_video
from reference_lego import LegoReference, decode_all_frames, lego_prompt, video_pixels

ATOL = 1e-4
N_NEW = 10
Q = "Where is the cat? Describe it."


@pytest.fixture(scope="module")
def release(lego_release):
    return lego_release


@pytest.fixture(scope="module")
def bundle(lego_bundle):
    return lego_bundle


@pytest.fixture(scope="module")
def ref(release):
    return LegoReference(release)


@pytest.fixture(scope="module")
def session(bundle):
    from scops.runtime.session import Session
    s = Session.open(bundle, kv_type="f32", flash_attn="off", n_ctx=2048)
    yield s
    s.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos):
    """A portrait and a landscape picture, a 96-frame video (key frame every 12), a 20-frame
    one (fewer than 64), and speech (espeak-ng when present, else a tone)."""
    import soundfile as sf
    from PIL import Image
    root = tmp_path_factory.mktemp("lego-media")
    Image.fromarray(np.ascontiguousarray(photos["cat"].transpose(1, 0, 2))).save(root / "portrait.png")
    Image.fromarray(photos["coffee"]).save(root / "landscape.png")
    speech = root / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(speech), "a dog barks twice"], check=True, capture_output=True)
    else:
        t = np.arange(int(16000 * 2.5)) / 16000
        sf.write(speech, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return {"portrait": root / "portrait.png", "landscape": root / "landscape.png", "speech": speech,
            "video": make_video(root / "v96.mp4", 96, 24), "short": make_video(root / "v20.mp4", 20, 10)}


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rgb_of(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def test_release_is_written_as_the_original_saves_it(release):
    files = sorted(p.name for p in release.iterdir())
    assert "pytorch_model.bin.index.json" in files and not any(f.endswith(".safetensors") for f in files)
    index = json.loads((release / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2
    for k in ("model.mm_vision_projector.0.weight", "model.mm_vision_projector.2.bias", "model.ln_vision.weight",
              "model.Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "model.query_tokens",
              "model.video_Qformer.bert.encoder.layer.1.crossattention.self.value.weight",
              "model.video_query_tokens", "model.video_frame_position_embedding.weight",
              "model.audio_Qformer.bert.embeddings.LayerNorm.weight", "model.audio_query_tokens",
              "model.audio_position_embedding.weight", "model.llama_proj.weight", "model.audio_llama_proj.bias",
              "model.embed_tokens.weight", "lm_head.weight", "model.Qformer.bert.embeddings.position_ids"):
        assert k in index, k
    shard = torch.load(release / index["model.mm_vision_projector.0.weight"], weights_only=True)
    assert shard["model.mm_vision_projector.0.weight"].dtype == torch.bfloat16
    eva = torch.load(release.parent / "eva_vit_g.pth", weights_only=True)
    assert "blocks.0.attn.q_bias" in eva and eva["blocks.0.attn.qkv.weight"].dtype == torch.float16
    assert (release.parent / "imagebind" / "imagebind_huge.pth").is_file()
    added = json.loads((release / "added_tokens.json").read_text())
    assert sorted(added, key=added.get) == ["<im_patch>", "<im_start>", "<im_end>", "<vi_patch>", "<vi_start>",
                                            "<vi_end>", "<so_patch>", "<so_start>", "<so_end>"]
    cfg = json.loads((release / "config.json").read_text())
    assert cfg["model_type"] == "LEGO" and cfg["vocab_size"] == max(added.values()) + 1
    assert cfg["mm_vision_select_layer"] == -2 and cfg["max_frame"] == 64 and cfg["sound_token_len"] == 8


def test_manifest(session):
    m = session.bundle.manifest
    assert m["family"] == "lego" and m["grounding"] == "answer_text"
    mods = m["modalities"]
    assert mods["image"]["rows"] == 576 and mods["video"]["rows"] == 64 and mods["audio"]["rows"] == 8
    proj = mods["image"]["stages"][-1]
    assert proj["gelu"] == "erf" and proj["hidden_dim"] == proj["out_dim"] == m["llm"]["n_embd"]
    assert mods["image"]["preprocess"]["resize"] == "pad_square"
    assert mods["image"]["preprocess"]["pad_color"] == [122, 116, 104]
    assert set(m["template"]["special"]) == {"<im_start>", "<im_end>", "<vi_start>", "<vi_end>", "<so_start>",
                                             "<so_end>"}
    for name, v in m["validation"].items():
        assert v["max_abs_diff"] <= ATOL and v["batch"] > 1, name
    assert session.llm.n_batch == 576              # a picture's rows are one llama_decode, not 512 + 64


def test_tokenization_is_the_fast_tokenizer_of_the_original(release, ref):
    """The reference's ids are what transformers' fast Llama tokenizer (legacy, as 4.34 built
    it from tokenizer.model) makes of the whole prompt."""
    from transformers import LlamaTokenizerFast
    fast = LlamaTokenizerFast.from_pretrained(str(release), from_slow=True, legacy=True)
    prompt = lego_prompt([({"image": 3, "sound": 2}, Q, "It is [0.1, 0.2, 0.3, 0.4]."), ({}, "And then?", None)])
    assert fast(prompt).input_ids == ref.token_ids(prompt)


@pytest.mark.parametrize("name", ["portrait", "landscape"])
def test_image_path_matches_reference(session, ref, media, name):
    from scops.runtime.preprocess import preprocess_image
    rgb = rgb_of(media[name])
    px = ref.pixels(rgb)                                                       # [1, 3, 336, 336]
    got = preprocess_image(rgb, session.bundle.modalities["image"]["preprocess"])
    assert maxdiff(got, px[0]) < 1e-5                                          # pad to square + CLIP processor
    batch = torch.cat([px, ref.pixels(np.ascontiguousarray(rgb[::-1]))])      # batch 2
    feats = session.encoders["image"].encode_rows(session.encoders["image"].encode_base(batch.numpy()))
    want = ref.image_features(batch)
    assert feats.shape == (2, 576, want.shape[-1]) and maxdiff(feats, want) <= ATOL
    rows = session.projectors["image"].forward(np.ascontiguousarray(want[0].numpy()))
    assert maxdiff(rows, ref.project_image(want[0])) <= 1e-5                  # Linear-GELU(erf)-Linear


@pytest.mark.parametrize("name, frames", [("video", 64), ("short", 20)])
def test_video_path_matches_reference(session, ref, media, name, frames):
    from scops.runtime.modalities import KINDS
    spec = session.bundle.modalities["video"]["preprocess"]
    decoded = KINDS["video"].decode(media[name], spec)
    assert np.array_equal(decoded[0], decode_all_frames(media[name]))         # seeking == decoding it all
    batch = KINDS["video"].prepare(decoded, spec)
    want_px = video_pixels(decoded[0])
    assert batch.shape == (frames, 3, 224, 224) and maxdiff(batch, want_px) < 1e-5
    enc = session.encoders["video"]
    base = enc.encode_base(batch)
    frame_q = ref.frame_queries(want_px)
    assert maxdiff(base["frame_queries"], frame_q) <= ATOL                    # EVA + ln_vision + Q-Former
    queries = enc.encode_rows(base)
    want_q = ref.video_queries(frame_q)
    assert queries.shape == (1, 64, want_q.shape[-1]) and maxdiff(queries, want_q) <= ATOL
    rows = session.projectors["video"].forward(np.ascontiguousarray(queries[0]))
    assert maxdiff(rows, ref.project(want_q, "llama_proj")[0]) <= ATOL


def test_centre_crop_matches_reference():
    """crop_area < 1: the centre crop resized back with torch's bicubic (a pixel may land one
    uint8 level apart where the two float paths straddle an integer)."""
    from scops.runtime.video import frames_to_batch
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    spec = {"size": 224, "crop_area": 0.75, "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711]}
    got, want = frames_to_batch(frames, spec), video_pixels(frames, 0.75).numpy()
    level = 1 / 255 / 0.26130258
    assert maxdiff(got, want) <= level + 1e-5 and np.mean(np.abs(got - want) > 1e-5) < 1e-3


def test_audio_path_matches_reference(session, ref, media):
    from scops.runtime.modalities import KINDS
    spec = session.bundle.modalities["audio"]["preprocess"]
    fbank = KINDS["audio"].prepare(KINDS["audio"].decode(media["speech"], spec), spec)
    assert fbank.shape == (3, 1, 128, 204)                                     # 3 clips x 2 s
    enc = session.encoders["audio"]
    base = enc.encode_base(fbank)
    emb = ref.audio_embeds(torch.from_numpy(fbank))
    assert maxdiff(base["audio_embeds"], emb) <= ATOL
    assert np.allclose(np.linalg.norm(base["audio_embeds"], axis=-1), 20.0, rtol=1e-5)   # L2 norm x 20
    queries = enc.encode_rows(base)
    want = ref.audio_queries(emb)
    assert queries.shape == (1, 8, want.shape[-1]) and maxdiff(queries, want) <= ATOL
    rows = session.projectors["audio"].forward(np.ascontiguousarray(queries[0]))
    assert maxdiff(rows, ref.project(want, "audio_llama_proj")[0]) <= ATOL


def _rows(ref, session, media, kinds):
    from scops.runtime.modalities import KINDS
    out = {}
    if "image" in kinds:
        out["<im_patch>"] = [ref.project_image(ref.image_features(ref.pixels(rgb_of(media["landscape"]))))]
    if "video" in kinds:
        frames = decode_all_frames(media["short"])
        out["<vi_patch>"] = [ref.video_rows(video_pixels(frames))]
    if "sound" in kinds:
        spec = session.bundle.modalities["audio"]["preprocess"]
        fbank = KINDS["audio"].prepare(KINDS["audio"].decode(media["speech"], spec), spec)
        out["<so_patch>"] = [ref.audio_rows(torch.from_numpy(fbank))]
    return out


SEND = {"image": ("images", "landscape"), "video": ("videos", "short"), "sound": ("audios", "speech")}


@pytest.mark.parametrize("kinds", [("image",), ("video",), ("sound",), ("image", "video", "sound")])
def test_turn_equals_reference(session, ref, media, kinds):
    kw = {SEND[k][0]: [media[SEND[k][1]]] for k in kinds}
    reply = session.chat().send(Q, temperature=0, max_tokens=N_NEW, ignore_stop=True, **kw).result()
    counts = {"image": 576, "video": 64, "sound": 8}
    prompt = lego_prompt([({k: counts[k] for k in kinds}, Q, None)])
    assert reply.token_ids == ref.generate(prompt, _rows(ref, session, media, kinds), N_NEW)


def test_follow_up_turn_equals_reference(session, ref, media):
    """Turn 2 asks about the turn-1 picture: the history (answer as kept) comes from the KV."""
    conv = session.chat()
    first = conv.send(Q, images=[media["landscape"]], temperature=0, max_tokens=N_NEW, ignore_stop=True).result()
    second = conv.send("And its colour?", temperature=0, max_tokens=N_NEW, ignore_stop=True).result()
    prompt = lego_prompt([({"image": 576}, Q, conv.messages[1].text), ({}, "And its colour?", None)])
    assert first.token_ids and second.timings["reused_cells"] > 576
    assert second.token_ids == ref.generate(prompt, _rows(ref, session, media, ("image",)), N_NEW)


def test_rows_depend_on_the_picture(session, media):
    """Guard for the parity tests above: another picture gives other next-token logits."""
    logits = []
    for k in ("landscape", "portrait"):
        session.chat().send(Q, images=[media[k]], temperature=0, max_tokens=1, ignore_stop=True).result()
        logits.append(session.llm.logits())                  # the prefill's last position
    assert np.max(np.abs(logits[0] - logits[1])) > 1e-2


def test_cli_run_json_and_draw(bundle, media, tmp_path, capsys):
    from PIL import Image

    from scops.runtime.cli import main
    out = tmp_path / "drawn.png"
    rc = main(["run", str(bundle), "--image", str(media["portrait"]), "--prompt", Q, "--json", "--temperature", "0",
               "--max-tokens", "4", "--draw", str(out)])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    h, w = rgb_of(media["portrait"]).shape[:2]
    assert isinstance(got["grounding"], list)
    assert got["media"] == [{"modality": "image", "width": w, "height": h, "source": str(media["portrait"])}]
    assert Image.open(out).size == (w, h)


def test_reply_grounding_drawn_on_its_inputs(session, media, tmp_path):
    """The answer's boxes land on the turn's picture, its span on the video's frames."""
    from PIL import Image

    from scops.runtime.cli import _write_drawing
    from scops.runtime.grounding import DARKER
    from scops.runtime.grounding_text import map_box
    conv = session.chat()
    reply = conv.send(Q, images=[media["portrait"]], temperature=0, max_tokens=2).result()
    h, w = rgb_of(media["portrait"]).shape[:2]
    reply.grounding = conv.ground("The cat [0.3, 0.1, 0.7, 0.6] sits there.")
    (ent,) = reply.grounding
    frac = map_box((0.3, 0.1, 0.7, 0.6), w, h)
    assert ent.phrase == "The cat" and ent.regions[0].box == pytest.approx((frac[0] * w, frac[1] * h, frac[2] * w,
                                                                          frac[3] * h))
    _write_drawing(tmp_path / "img.png", reply)
    drawn = np.asarray(Image.open(tmp_path / "img.png").convert("RGB"))
    x1, y1, x2, y2 = (int(round(v)) for v in ent.regions[0].box)
    mid = (y1 + y2) // 2
    assert (drawn[mid, x1 + 1] == DARKER["red"]).all() and (drawn[mid, x2 - 2] == DARKER["red"]).all()
    assert (drawn[mid, x1 - 3] == rgb_of(media["portrait"])[mid, x1 - 3]).all()

    conv = session.chat()
    reply = conv.send(Q, videos=[media["short"]], temperature=0, max_tokens=2).result()
    reply.grounding = conv.ground("The cat jumps {0.25,0.75}.")
    assert reply.grounding[0].regions[0].time == (0.5, 1.5)                   # 20 frames at 10 fps: 2 s
    _write_drawing(tmp_path / "video.png", reply)
    sheet = Image.open(tmp_path / "video.png")
    assert sheet.size[1] > 160 and sheet.size[0] >= 3 * 213


def test_ten_hour_video_turn_and_its_spans(session, tmp_path):
    """A 10-hour video (2000 frames, a key frame every 4) is answered from 64 seeked frames;
    a span in the answer maps to seconds of the whole video."""
    from fractions import Fraction
    path = make_video(tmp_path / "10h.mp4", 2000, Fraction(1, 18), w=48, h=32, gop=4)
    conv = session.chat()
    conv.send(Q, videos=[path], temperature=0, max_tokens=2).result()
    (m,) = conv.media()
    assert m["duration"] == pytest.approx(36000.0) and m["sampled"] == 64
    (ent,) = conv.ground("The cat sleeps {0.50,0.60}.")
    assert ent.regions[0].time == pytest.approx((18000.0, 21600.0))


def test_bad_video_is_refused_and_the_session_goes_on(session, media, tmp_path):
    from scops.runtime.errors import InputError
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    conv = session.chat()
    with pytest.raises(InputError, match="bad.mp4"):
        conv.send(Q, videos=[bad])
    assert conv.messages == []
    reply = conv.send(Q, videos=[media["short"]], temperature=0, max_tokens=3, ignore_stop=True).result()
    assert len(reply.token_ids) == 3


def test_export_names_what_is_missing(release, tmp_path, capsys):
    """The HF folder alone (no eva_vit_g.pth / imagebind_huge.pth beside it), then without its
    config.json: one line naming the files, exit 2, no bundle."""
    from scops.runtime.cli import main
    partial = tmp_path / "rel" / "GroundingGPT"
    shutil.copytree(release, partial)
    argv = ["export", "--from", str(partial), "--family", "lego", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "eva_vit_g.pth" in err and "imagebind_huge.pth" in err and err.count("\n") == 1
    (partial / "config.json").unlink()
    assert main(argv) == 2 and "config.json" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_from_takes_the_folder_holding_the_release(release, tmp_path):
    from scops.export.lego import find_release_folder
    from scops.runtime.errors import ExportError
    assert find_release_folder(release.parent) == release and find_release_folder(release) == release
    with pytest.raises(ExportError, match="GroundingGPT folder"):
        find_release_folder(tmp_path)
