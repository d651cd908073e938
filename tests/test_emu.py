"""Emu: image chat (Emu-I) and image generation (pretrained Emu) against a PyTorch reference
written from the original (tests/reference_emu.py), on the emu-tiny release fixture."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_png
from media_helpers import frame_number, make_video
from reference_emu import (IMAGE_SYSTEM, PLACEHOLDER, VIDEO_SYSTEM, EmuReference, get_index, process_img,
                           process_video, reference_picture)

Q1, Q2 = "What is in the image?", "Tell me more."
N = 16


@pytest.fixture(scope="module")
def src(emu_src):
    return emu_src


@pytest.fixture(scope="module")
def chat_bundle(emu_bundles):
    return emu_bundles("chat")


@pytest.fixture(scope="module")
def gen_bundle(emu_bundles):
    return emu_bundles("gen")


@pytest.fixture(scope="module")
def chat(chat_bundle):
    from scops.runtime.session import Session
    s = Session.open(chat_bundle, kv_type="f32", flash_attn="off", n_ctx=512)
    yield s
    s.close()


@pytest.fixture(scope="module")
def gen(gen_bundle):
    from scops.runtime.session import Session
    s = Session.open(gen_bundle, kv_type="f32", flash_attn="off", n_ctx=512)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref_i(src):
    return EmuReference(src, "instruct")


@pytest.fixture(scope="module")
def ref_p(src):
    return EmuReference(src, "pretrain")


@pytest.fixture(scope="module")
def cat(tmp_path_factory, photos):
    return write_png(tmp_path_factory.mktemp("emuimg") / "cat.png", photos["cat"])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the exported pieces ------------------------------------------------------------
def test_cformer_module_is_hf_t5_decoder_math(src):
    """emu_modules.CausalFormer (original key names) == HF's T5 decoder with Emu's K/V widths."""
    from scops.export.emu import build_cformer
    from scops.export.emu_release import load_state
    from reference_emu import t5_cformer

    sd = load_state(src / "Emu-instruct.pt")
    mine, hf = build_cformer(sd), t5_cformer(sd)
    x = torch.randn(2, 257, 64, generator=torch.Generator().manual_seed(0))
    q = mine.causal_tokens.expand(2, -1, -1)
    with torch.no_grad():
        want = hf(inputs_embeds=q, encoder_hidden_states=x, use_cache=False).last_hidden_state
        got = mine(x)
    assert float((got - want).abs().max()) <= 1e-5


def test_image_rows_match_reference(chat, ref_i, photos, cat):
    """pixels (PIL bicubic 224) -> vision.onnx -> cformer.onnx (ONNX, 1e-4) -> projector."""
    from scops.runtime.modalities import KINDS
    spec = chat.bundle.modalities["image"]["preprocess"]
    batch = KINDS["image"].prepare(KINDS["image"].decode(cat, spec), spec)
    px = process_img(photos["cat"])
    assert np.max(np.abs(batch - px.numpy())) <= 1e-5
    enc = chat.encoders["image"]
    base = enc.encode_base(batch)
    assert np.max(np.abs(base["image_embeds"] - ref_i.image_embeds(px).numpy())) <= 1e-4
    rows = enc.encode_rows(base)[0]
    assert np.max(np.abs(rows - ref_i.causal(ref_i.image_embeds(px))[0].numpy())) <= 1e-4
    projected = chat.projectors["image"].forward(np.ascontiguousarray(rows))
    assert np.max(np.abs(projected - ref_i.image_rows(px)[0].numpy())) <= 1e-4
    for file in ("vision.onnx", "cformer.onnx"):
        assert chat.bundle.manifest["validation"][file]["max_abs_diff"] <= 1e-4


def test_bundles_record_tokens_lora_and_generation(chat, gen):
    m = chat.bundle.manifest
    assert m["emu"]["variant"] == "instruct" and m["lora"]["merged"] and m["lora"]["r"] == 16
    assert list(m["emu"]["added_tokens"]) == ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"]
    assert "generation" not in m
    g = gen.bundle.manifest["generation"]
    assert g["n_embeds"] == 32 and g["scheduler"]["skip_prk_steps"] and g["scaling_factor"] == 0.18215
    assert g["unet"]["validation"]["max_abs_diff"] <= 1e-4 and g["vae_decoder"]["validation"]["max_abs_diff"] <= 1e-4
    assert g["unet"]["validation"]["latent"] != [8, 8]           # validated at another shape than traced


# ---- chat ------------------------------------------------------------------------------
def test_prompt_tokens_follow_the_original_tokenizer(chat, ref_i, cat):
    """Added tokens split the prompt, the whitespace around them is dropped (transformers 4.29)."""
    conv = chat.chat()
    r = conv.send(Q1, images=[cat], temperature=0, max_tokens=4)
    image = ref_i.specials["<image>"]
    got = [c if isinstance(c, int) else image for c in r.cells]
    assert got == ref_i.tokenize(f"{IMAGE_SYSTEM} [USER]: {PLACEHOLDER}{Q1} [ASSISTANT]:")
    r.close()


def test_chat_greedy_tokens_equal_reference(chat, ref_i, photos, cat):
    reply = chat.chat().send(Q1, images=[cat], temperature=0, max_tokens=N).result()
    prompt = f"{IMAGE_SYSTEM} [USER]: {PLACEHOLDER}{Q1} [ASSISTANT]:"
    assert reply.token_ids == ref_i.generate(prompt, ref_i.image_rows(process_img(photos["cat"])), N)


def test_second_turn_equals_reference(chat, ref_i, photos, cat):
    conv = chat.chat(history="text")             # turn 2 as the original builds its history
    conv.send(Q1, images=[cat], temperature=0, max_tokens=6).result()
    a1 = conv.messages[-1].text
    r2 = conv.send(Q2, temperature=0, max_tokens=N).result()
    prompt = f"{IMAGE_SYSTEM} [USER]: {PLACEHOLDER}{Q1} [ASSISTANT]: {a1}</s> [USER]: {Q2} [ASSISTANT]:"
    assert r2.token_ids == ref_i.generate(prompt, ref_i.image_rows(process_img(photos["cat"])), N)
    assert r2.timings["reused_cells"] > 100                      # the first turn stayed in the KV


# ---- video (Emu-I: 8 frames, one [IMG] 32 rows [/IMG] each, the video system message) ----------
QV = "What's the woman doing in the video?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """37 frames that say their own number (a length that makes get_index round both ways)."""
    return make_video(tmp_path_factory.mktemp("emuvid") / "clip.mp4", 37, 10, w=96, h=64, gop=5)


def test_segment_indices_are_get_index():
    from scops.runtime.video import segment_indices
    assert segment_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert segment_indices(5, 8) == [0, 0, 1, 2, 2, 2, 3, 4]       # shorter than 8: repeats
    for n in (1, 2, 7, 8, 9, 37, 120, 1001):
        assert segment_indices(n, 8) == get_index(n, 8).tolist()


def test_video_frames_are_the_originals_picks(chat, clip):
    from scops.runtime.modalities import KINDS
    spec = chat.bundle.modalities["video"]["preprocess"]
    frames, info = KINDS["video"].decode(clip, spec)
    want_px, _, picked = process_video(clip)
    assert info.frames == 37 and frames.shape == (8, 224, 224, 3)
    assert [frame_number(f) for f in picked] == get_index(37, 8).tolist()
    assert [frame_number(f, 224 / 96, 224 / 64) for f in frames] == get_index(37, 8).tolist()
    batch = KINDS["video"].prepare((frames, info), spec)
    assert batch.shape == (8, 3, 224, 224) and np.max(np.abs(batch - want_px.numpy())) <= 1e-5


def test_video_chat_equals_reference(chat, ref_i, clip):
    """Prompt ids and greedy tokens of a video question == the original's (process_video, video
    system message, Emu_inference's prompt); each frame is its own 32-row slot."""
    reply = chat.chat().send(QV, videos=[clip], temperature=0, max_tokens=N).result()
    px, placeholders, _ = process_video(clip)
    prompt = f"{VIDEO_SYSTEM} [USER]: {placeholders}{QV} [ASSISTANT]:"
    image = ref_i.specials["<image>"]
    assert [c if isinstance(c, int) else image for c in reply.cells] == ref_i.tokenize(prompt)
    slots = [c[0] for c in reply.cells if not isinstance(c, int)]
    assert len(slots) == 8 * 32 and len(set(slots)) == 8
    assert reply.token_ids == ref_i.generate(prompt, ref_i.image_rows(px), N)
    again = chat.chat().send(QV, videos=[clip], temperature=0, max_tokens=2).result()
    assert again.timings["encode_ms"] == 0 and chat.stats.media_cache_hits >= 1      # 8 frames cached


def test_video_url_parts_over_http(chat, clip):
    """`scops serve` takes a video_url part (a data: URL of the file): the same greedy answer as
    the Python API; the same clip again runs no encoder; a corrupt clip is one 400."""
    import base64
    from test_server import post, running
    url = "data:video/mp4;base64," + base64.b64encode(open(clip, "rb").read()).decode()
    want = chat.chat().send(QV, videos=[clip], temperature=0, max_tokens=N).result()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": QV}]}],
            "temperature": 0, "max_tokens": N}
    with running(chat) as server:
        status, got = post(server, body)
        assert status == 200, got
        assert got["choices"][0]["message"]["content"] == want.text
        assert got["scops"]["timings"].get("encode_ms", 0) == 0              # the 8 frames were cached
        body["messages"][0]["content"][0]["video_url"]["url"] = "data:video/mp4;base64,AAAAAAAA"
        status, err = post(server, body)
        assert status == 400 and err["error"]["code"] == "invalid_media", err


def test_video_shares_the_image_graphs(chat):
    assert chat.encoders["video"].base[0] is chat.encoders["image"].base[0]          # one EVA session
    assert chat.describe_backends().count("vision.onnx") == 1


def test_user_text_never_becomes_a_special_token(chat):
    r = chat.chat().send("[IMG] [USER] </s>", temperature=0, max_tokens=2)
    specials = set(chat.bundle.manifest["emu"]["added_tokens"].values()) | {2}
    n_markup = sum(1 for c in r.cells if isinstance(c, int) and c in specials)
    assert n_markup == 4                         # system [IMG] [/IMG], [USER], [ASSISTANT]: markup only
    r.close()


def test_eos_is_banned_at_the_first_new_token(chat):
    """Emu.generate(min_length=1): even when EOS is the best first token, another one comes."""
    llm = chat.llm
    llm.sync(llm.tokenize("hello", True), None)
    ptr = llm.L.llama_get_logits_ith(llm.ctx, -1)
    eos = llm.L.llama_vocab_eos(llm.vocab)
    ptr[eos] = 1e9                               # EOS would win by far
    llm.suppress_eog()
    assert chat.bundle.template["min_new_tokens"] == 1
    sampler = llm.make_sampler(__import__("scops.runtime.llm", fromlist=["Sampling"]).Sampling(temperature=0))
    try:
        assert llm.sample(sampler) != eos
    finally:
        llm.free_sampler(sampler)


# ---- generation ------------------------------------------------------------------------
def test_regressed_embeddings_match_the_original_loop(gen, ref_p, photos, cat):
    """KV-cached loop on llama.cpp's final-norm output vs the original's full re-run per step."""
    prompt = "An image of a dog wearing a pair of glasses."
    img = gen.generate_image(prompt, steps=2, seed=0)
    want = ref_p.generate_image_embeds([prompt, ""])
    assert img.embeddings.shape == (32, 256)
    assert rel(img.embeddings, want[0]) <= 1e-3
    assert rel(gen._imaginer.uncond, want[1]) <= 1e-3
    with_ref = gen.generate_image(prompt, images=[cat], steps=2, seed=0)
    want = ref_p.generate_image_embeds([PLACEHOLDER + prompt], ref_p.image_rows(process_img(photos["cat"])))
    assert rel(with_ref.embeddings, want[0]) <= 1e-3
    assert rel(with_ref.embeddings, img.embeddings) > 1e-2      # the reference picture matters


def test_picture_matches_reference_pipeline(gen, ref_p, src, tmp_path):
    prompt, steps, guidance = "a red boat on the river", 10, 7.5
    lat = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    img = gen.generate_image(prompt, steps=steps, guidance=guidance, latents=lat)
    want = reference_picture(src / "pretrain", ref_p.generate_image_embeds([prompt, ""]), lat, steps, guidance)
    mse = np.mean((img.pixels.astype(np.float64) - want) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
    assert img.pixels.shape == (64, 64, 3) and img.pixels.std() > 1
    assert psnr >= 40, psnr
    img.save(tmp_path / "boat.png")
    from PIL import Image
    assert np.array_equal(np.array(Image.open(tmp_path / "boat.png")), img.pixels)


def test_seed_reproduces_and_guidance_one_skips_uncond(gen):
    a = gen.generate_image("a tree", steps=3, seed=11)
    b = gen.generate_image("a tree", steps=3, seed=11)
    c = gen.generate_image("a tree", steps=3, seed=12)
    assert np.array_equal(a.pixels, b.pixels) and not np.array_equal(a.pixels, c.pixels)
    calls = []
    gen.generate_image("a tree", steps=3, seed=11, guidance=1.0, progress=lambda i, n: calls.append((i, n)))
    # 3 PLMS steps = 4 UNet calls (SD's skip_prk_steps repeats the first timestep)
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


BAD = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "x", "steps": 0}, "steps must be"),
    ({"prompt": "x", "steps": 100000}, "steps must be"),
    ({"prompt": "x", "guidance": 0}, "guidance must be"),
    ({"prompt": "x", "guidance": -3.0}, "guidance must be"),
    ({"prompt": "x", "guidance": float("nan")}, "guidance must be"),
    ({"prompt": "x", "height": 100000}, "height must be"),
    ({"prompt": "x", "width": 50}, "width must be"),
    ({"prompt": "x", "seed": -1}, "seed must be"),
    ({"prompt": "x", "sampler": "ddim"}, "unknown image option"),
]


def test_bad_generation_requests_are_clear_errors(gen):
    from scops.runtime.errors import OptionError
    for kwargs, match in BAD:
        kwargs = dict(kwargs)
        prompt = kwargs.pop("prompt")
        with pytest.raises(OptionError, match=match) as e:
            gen.generate_image(prompt, **kwargs)
        assert "\n" not in str(e.value)
    assert gen.generate_image("still fine", steps=1, seed=0).pixels.shape == (64, 64, 3)


def test_chat_bundle_cannot_generate(chat):
    from scops.runtime.errors import UnsupportedModality
    with pytest.raises(UnsupportedModality, match="cannot generate pictures"):
        chat.generate_image("a cat")
    assert chat.chat().send("hi", temperature=0, max_tokens=2).result().token_ids


def test_cli_imagine(gen_bundle, chat_bundle, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "scops.runtime.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=300)
    out = tmp_path / "pic.png"
    r = cli("imagine", gen_bundle, "--prompt", "a small bird", "--out", out, "--steps", "4", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "5/5" in r.stderr and "seed 3" in r.stderr and out.is_file()
    r = cli("info", gen_bundle)
    assert r.returncode == 0 and "imagine  [IMG] -> 32 regressed rows" in r.stdout and "unet.onnx" in r.stdout
    r = cli("imagine", chat_bundle, "--prompt", "a small bird", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "cannot generate pictures" in r.stderr and not (tmp_path / "x.png").exists()
    r = cli("imagine", gen_bundle, "--prompt", "a bird", "--out", tmp_path / "y.png", "--guidance", "0")
    assert r.returncode == 2 and "guidance must be" in r.stderr


def test_runtime_generates_without_torch(gen_bundle, tmp_path):
    code = ("import sys\nsys.modules['torch'] = None\n"
            "from scops.runtime.session import Session\n"
            f"s = Session.open({str(gen_bundle)!r})\n"
            "img = s.generate_image('a cat', steps=2, seed=1)\n"
            "heavy = [m for m in ('transformers', 'diffusers', 'optimum', 'gguf', 'sentencepiece') if m in sys.modules]\n"
            "print(heavy, img.pixels.shape); sys.exit(1 if heavy else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_manifest_generation_defaults_are_the_originals(gen):
    d = gen.bundle.manifest["generation"]["defaults"]
    assert (d["steps"], d["guidance"]) == (50, 7.5)
    assert json.loads(json.dumps(gen.bundle.manifest["generation"]["scheduler"]))["steps_offset"] == 1
