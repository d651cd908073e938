"""Shared fixtures: one tiny MiniGPT-4-shaped checkpoint per test run, bundles exported
from it on demand (one per quantization), and sample photos shipped with scikit-image."""
from __future__ import annotations

import numpy as np
import pytest


def _has_gpu() -> bool:
    try:
        from scops.kernels import cuda_available
        return bool(cuda_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:   # not item.keywords: a folder named gpu is one
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from scops.export.fixtures import build_minigpt4_tiny
    return build_minigpt4_tiny(tmp_path_factory.mktemp("ckpt") / "minigpt4-tiny")


@pytest.fixture(scope="session")
def bundle(tiny_ckpt, tmp_path_factory):
    """bundle("F32") -> path of the tiny checkpoint exported at that quantization (cached)."""
    from scops.export.minigpt4 import export_minigpt4
    root = tmp_path_factory.mktemp("bundles")
    made = {}

    def get(quant: str = "Q4_K_M"):
        if quant not in made:
            made[quant] = export_minigpt4(str(tiny_ckpt), root / f"tiny-{quant}", quant, log=lambda s: None)
        return made[quant]
    return get


@pytest.fixture(scope="session")
def emu_src(tmp_path_factory):
    """The emu-tiny release (Emu-instruct.pt, pretrain/ with unet/ vae/ scheduler/, llama_config/)."""
    from scops.export.fixtures_emu import build_emu_tiny
    return build_emu_tiny(tmp_path_factory.mktemp("emu") / "emu-tiny")


@pytest.fixture(scope="session")
def emu_bundles(emu_src, tmp_path_factory):
    """emu_bundles("chat" | "gen") -> the Emu-I chat bundle / the generation bundle, F32 (cached)."""
    from scops.export.emu import export_emu
    root = tmp_path_factory.mktemp("emub")
    made = {}

    def get(kind: str):
        if kind not in made:
            src = emu_src / ("Emu-instruct.pt" if kind == "chat" else "pretrain")
            made[kind] = export_emu(str(src), root / kind, "F32", log=lambda s: None)
        return made[kind]
    return get


@pytest.fixture(scope="session")
def photos():
    """Real photos (RGB uint8) shipped with scikit-image."""
    from skimage import data
    return {"cat": data.chelsea(), "astronaut": data.astronaut(), "coffee": data.coffee()}


@pytest.fixture(scope="session")
def exact_session(bundle):
    """A session on the F32 GGUF with an f32 KV cache: the parity configuration."""
    from scops.runtime.session import Session
    s = Session.open(bundle("F32"), kv_type="f32", flash_attn="off", n_ctx=1024)
    yield s
    s.close()


def write_png(path, rgb: np.ndarray):
    from PIL import Image
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="session")
def grounding_ckpt(tmp_path_factory):
    """BuboGPT's grounding checkpoints folder (tiny RAM, GroundingDINO + BERT vocab, SAM)."""
    from scops.export.fixtures_grounding import build_grounding_tiny
    return build_grounding_tiny(tmp_path_factory.mktemp("grounding") / "checkpoints")


@pytest.fixture(scope="session")
def grounding_bundle(grounding_ckpt, tmp_path_factory):
    """A tiny BuboGPT bundle exported with its grounding stages (F32 LLM)."""
    from scops.export.bubogpt import export_bubogpt
    from scops.export.fixtures_bubogpt import build_bubogpt_tiny
    src = build_bubogpt_tiny(tmp_path_factory.mktemp("bubo-g") / "bubogpt-tiny")
    return export_bubogpt(str(src), tmp_path_factory.mktemp("bubo-gb") / "b", "F32", log=lambda s: None,
                          grounding=str(grounding_ckpt))


@pytest.fixture(scope="session")
def lego_release(tmp_path_factory):
    """The tiny LEGO release in the original layout (GroundingGPT/ + encoder files beside)."""
    from scops.export.fixtures_lego import build_lego_tiny
    return build_lego_tiny(tmp_path_factory.mktemp("lego") / "lego-tiny")


@pytest.fixture(scope="session")
def lego_bundle(lego_release, tmp_path_factory):
    """The tiny LEGO release exported with an F32 LLM."""
    from scops.export.lego import export_lego
    return export_lego(str(lego_release), tmp_path_factory.mktemp("legob") / "b", "F32", log=lambda s: None)
