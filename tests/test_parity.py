"""Parity with the PyTorch reference: ONNX stages <= 1e-4, projector <= 1e-5, and greedy
tokens of an F32 / F16 GGUF identical to HF `generate` on the same inputs_embeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MiniGPT4Reference, minigpt4_prompt

QUESTION = "What is in this picture?"
N_NEW = 24


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return MiniGPT4Reference(tiny_ckpt)


def test_preprocessing_matches_reference(photos, exact_session, ref):
    from scops.runtime.preprocess import preprocess_image
    spec = exact_session.bundle.modalities["image"]["preprocess"]
    for rgb in photos.values():
        got = preprocess_image(rgb, spec)
        want = ref.pixels(rgb)[0].numpy()
        assert got.shape == (3, 224, 224)
        assert np.max(np.abs(got - want)) < 1e-5


def test_onnx_stages_match_pytorch_at_other_batch(photos, exact_session, ref):
    """Real photos at batch 3 (the export traced batch 1): vision+Q-Former <= 1e-4."""
    enc = exact_session.encoders["image"]
    pixels = torch.cat([ref.pixels(rgb) for rgb in photos.values()])          # [3, 3, 224, 224]
    base = enc.encode_base(pixels.numpy())
    vision_ort = base["image_embeds"]
    with torch.no_grad():
        vision_pt = ref.model.vision_model(pixel_values=pixels).last_hidden_state.numpy()
    assert vision_ort.shape == vision_pt.shape == (3, 257, 64)
    assert np.max(np.abs(vision_ort - vision_pt)) <= 1e-4
    bridge_ort = enc.encode_rows(base)
    bridge_pt = ref.bridge(pixels).numpy()
    assert bridge_ort.shape == (3, 32, 64)
    assert np.max(np.abs(bridge_ort - bridge_pt)) <= 1e-4


def test_projector_matches_pytorch(exact_session, ref):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 64), dtype=np.float32)
    got = exact_session.projectors["image"].forward(x)
    with torch.no_grad():
        want = ref.model.language_projection(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5


def test_llama_cpp_tokenizes_like_sentencepiece(exact_session, ref):
    prompt = minigpt4_prompt([(QUESTION, None)])
    segs = ref.token_ids(prompt)
    llm = exact_session.llm
    assert llm.tokenize(prompt.split("<ImageHere>")[0], True) == segs[0]
    assert llm.tokenize(prompt.split("<ImageHere>")[1], False) == segs[1]


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_greedy_tokens_equal_hf_generate(quant, bundle, photos, ref):
    from scops.runtime.session import Session
    want = ref.generate(minigpt4_prompt([(QUESTION, None)]), photos["cat"], N_NEW)
    with Session.open(bundle(quant), kv_type="f32", flash_attn="off", n_ctx=512) as s:
        reply = s.chat().send(QUESTION, images=[photos["cat"]], temperature=0, max_tokens=N_NEW,
                              ignore_stop=True).result()
    assert len(reply.token_ids) == N_NEW
    assert reply.token_ids == want, f"{quant}: scops {reply.token_ids} != HF {want}"
