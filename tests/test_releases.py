"""Published releases load as their authors publish them: tiny checkpoints written in the
release layout (file names, nesting, key names, dtypes, containers) export, and their F32
bundles' greedy tokens equal references written from the original code."""
from __future__ import annotations


import pytest
import torch

from reference_minigpt4_release import MiniGPT4ReleaseReference

Q1, Q2 = "What is in the picture?", "And what colour is it?"
N = 12


def export(src, out, **kw):
    from scops.export.minigpt4 import export_minigpt4
    return export_minigpt4(str(src), out, "F32", log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def vicuna_release(tmp_path_factory):
    from scops.export.fixtures_minigpt4 import build_minigpt4_release_tiny
    return build_minigpt4_release_tiny(tmp_path_factory.mktemp("rel") / "minigpt4")


@pytest.fixture(scope="module")
def llama2_release(tmp_path_factory):
    from scops.export.fixtures_minigpt4 import build_minigpt4_llama2_tiny
    return build_minigpt4_llama2_tiny(tmp_path_factory.mktemp("rel") / "minigpt4-llama2")


def open_session(bundle):
    from scops.runtime.session import Session
    return Session.open(bundle, n_ctx=1024)            # F32 bundle: f32 KV, flash attention off by default


def test_release_files_are_written_as_published(vicuna_release, llama2_release):
    eva = torch.load(vicuna_release / "eva_vit_g.pth", weights_only=True)
    assert eva["blocks.0.attn.qkv.weight"].dtype == torch.float16 and "blocks.0.attn.q_bias" in eva
    assert "blocks.0.attn.qkv.bias" not in eva and "blocks.2.mlp.fc1.weight" in eva     # 3 stored, 2 used
    blip2 = torch.load(vicuna_release / "blip2_pretrained_flant5xxl.pth", weights_only=True)
    assert set(blip2) == {"model"} and "t5_proj.weight" in blip2["model"] and "ln_vision.weight" in blip2["model"]
    stage2 = torch.load(vicuna_release / "prerained_minigpt4_7b.pth", weights_only=True)
    assert set(stage2["model"]) == {"llama_proj.weight", "llama_proj.bias"} and "optimizer" in stage2
    shards = sorted(p.name for p in (vicuna_release / "vicuna-7b-v0").glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and (vicuna_release / "vicuna-7b-v0" / "pytorch_model.bin.index.json").is_file()
    assert not (llama2_release / "blip2_pretrained_flant5xxl.pth").exists()
    assert (llama2_release / "Llama-2-7b-chat-hf" / "model.safetensors.index.json").is_file()


def test_vicuna_release_greedy_tokens_equal_the_original(vicuna_release, tmp_path, photos):
    bundle = export(vicuna_release, tmp_path / "b")
    ref = MiniGPT4ReleaseReference(vicuna_release, "vicuna-7b-v0", "vicuna0")
    with open_session(bundle) as s:
        assert s.bundle.modalities["image"]["rows"] == 32
        conv = s.chat(history="text")                # turn 2 as the original builds its history
        r1 = conv.send(Q1, images=[photos["cat"]], temperature=0, max_tokens=N, ignore_stop=True).result()
        assert r1.token_ids == ref.generate([(Q1, None)], photos["cat"], N)
        r2 = conv.send(Q2, temperature=0, max_tokens=N, ignore_stop=True).result()
        assert r2.token_ids == ref.generate([(Q1, conv.messages[1].text), (Q2, None)], photos["cat"], N)


def test_llama2_release_groups_tokens_and_follows_the_inst_template(llama2_release, tmp_path, photos):
    bundle = export(llama2_release, tmp_path / "b")
    ref = MiniGPT4ReleaseReference(llama2_release, "Llama-2-7b-chat-hf", "llama2")
    with open_session(bundle) as s:
        image = s.bundle.modalities["image"]
        assert image["rows"] == 64 and [st["op"] for st in image["stages"]] == ["onnx", "group_tokens", "projector"]
        assert s.bundle.template["special"] == {"<s>": 1}
        conv = s.chat(history="text")                # turn 2 as the original builds its history
        r1 = conv.send(Q1, images=[photos["coffee"]], temperature=0, max_tokens=N, ignore_stop=True).result()
        assert r1.token_ids == ref.generate([(Q1, None)], photos["coffee"], N)
        assert sum(1 for c in s.llm.cells if c == 1) == 2            # BOS, then "<s>" of "<s>[INST]"
        r2 = conv.send(Q2, temperature=0, max_tokens=N, ignore_stop=True).result()
        assert r2.token_ids == ref.generate([(Q1, conv.messages[1].text), (Q2, None)], photos["coffee"], N)


def test_user_text_is_never_parsed_for_special_tokens(llama2_release, tmp_path):
    bundle = export(llama2_release, tmp_path / "b")
    with open_session(bundle) as s:
        s.chat().send("<s>[INST] hi", temperature=0, max_tokens=1).result()
        assert sum(1 for c in s.llm.cells if c == 1) == 2            # BOS + the template's own "<s>"


def test_bubogpt_release_assembles_in_the_original_order(tmp_path_factory, photos):
    """bubogpt_7b.pth wins over prerained_minigpt4_7b.pth's llama_proj (written different on
    purpose); image and audio turns equal the reference built from the same files."""
    import numpy as np

    from reference_bubogpt import BuboGPTReleaseReference, bubogpt_prompt
    from scops.export.bubogpt import export_bubogpt
    from scops.export.fixtures_bubogpt import build_bubogpt_release_tiny
    from scops.runtime.modalities import KINDS

    src = build_bubogpt_release_tiny(tmp_path_factory.mktemp("rel") / "bubogpt")
    bundle = export_bubogpt(str(src), tmp_path_factory.mktemp("relb") / "b", "F32", log=lambda s: None)
    ref = BuboGPTReleaseReference(src)
    t = np.arange(16000 * 3) / 16000
    wav = tmp_path_factory.mktemp("snd") / "tone.wav"
    import soundfile as sf
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    with open_session(bundle) as s:
        spec = s.bundle.modalities["audio"]["preprocess"]
        fbank = KINDS["audio"].prepare(KINDS["audio"].decode(wav, spec), spec)
        conv = s.chat()
        r1 = conv.send(Q1, images=[photos["astronaut"]], temperature=0, max_tokens=N, ignore_stop=True).result()
        want = ref.generate(bubogpt_prompt([(["image"], Q1, None)]), [ref.rows("image", photos["astronaut"])], N)
        assert r1.token_ids == want
        r2 = s.chat().send(Q2, audios=[wav], temperature=0, max_tokens=N, ignore_stop=True).result()
        assert r2.token_ids == ref.generate(bubogpt_prompt([(["audio"], Q2, None)]), [ref.rows("audio", fbank)], N)
