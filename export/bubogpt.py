"""BuboGPT exporter (image + audio): the published release, or a converted folder -> bundle.

The release (`--from FOLDER`), assembled as the original loads it (models/mm_gpt4.py
MMGPT4 with eval_configs/mmgpt4_eval.yaml: use_blip_vision, with_bind_head False), in this
order, later files winning, under MMGPT4's own state-dict names:
  1. imagebind_huge.pth                 -> multimodal_encoder.* (imagebind_huge(pretrained))
  2. eva_vit_g.pth                      -> the vision trunk (create_eva_vit_g: 39 of 40 blocks)
  3. blip2_pretrained_flant5xxl.pth     -> the vision postprocessor (load_ln_params: ln_vision)
                                           and the vision Q-Former (load_Qformer)
  4. prerained_minigpt4_7b.pth          -> the vision post-projector fc (replace_joiner_vision's
     (optional)                            proj_model: llama_proj)
  5. bubogpt_7b.pth                     -> {'model': ...}, loaded non-strictly over everything
                                           (at least the audio Q-Former and both post-projectors)
  <LLaMA folder>/                       -> the Vicuna LLM (llama_model.*)
Sizes are read off the tensors. A key the model needs and no file provides is named.

A converted folder (scops' earlier layout) also loads: config.json {"model_type": "bubogpt",
...} + *.safetensors holding the same MMGPT4 key names + tokenizer.model.

Stages (manifest order):
  image: vision.onnx [B,3,224,224] -> [B,257,Dv] (EVA + ln_vision) -> qformer.onnx -> [B,32,Dq]
         -> projector.safetensors
  audio: audio_trunk.onnx [clips,1,128,204] -> [clips,229,Da] (trunk, no head) -> l2norm x20
         -> mean_over_clips -> [1,229,Da] -> audio_qformer.onnx -> [1,32,Dq]
         -> audio_projector.safetensors
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from scops.runtime.audio import audio_recipe
from scops.runtime.errors import ExportError
from scops.runtime.families import family

from .assemble import FamilyExport, assemble_bundle, load_state
from .blip2 import qformer_module, vision_module
from .onnx_stages import OnnxStageSpec, TensorSpec
from .releases import (BLIP2_QFORMER_NAMES, LN_VISION_EPS, eva_config, eva_to_hf, find_llm_folder,
                       find_release_file, lavis_qformer_to_hf, llama_config, qformer_config, read_blip2,
                       read_eva_vit_g, resolve_source)

FAMILY = "bubogpt"
ENC = "multimodal_encoder."
JOIN = "multimodal_joiner."
VISION_PREFIX = ENC + "modality_trunks.vision."
LN_VISION_PREFIX = ENC + "modality_postprocessors.vision."
AUDIO_PARTS = ("modality_preprocessors.audio.", "modality_trunks.audio.", "modality_postprocessors.audio.")
PROJECTORS = ((JOIN + "modality_post_projectors.vision.fc.", "projector.safetensors"),
              (JOIN + "modality_post_projectors.audio.fc.", "audio_projector.safetensors"))
LLM_PREFIX = "llama_model."
# imagebind_vision_eval: Resize(224, bicubic) (short side) + CenterCrop(224) + CLIP mean/std.
BUBOGPT_IMAGE = {
    "kind": "image", "size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}
# The runtime computes audio by the recipe's name; the values are written beside it for readers
# (runtime/audio.py BUBOGPT_AUDIO: imagebind_audio_eval as app.py feeds it).
BUBOGPT_AUDIO = {"kind": "audio", "recipe": "bubogpt", **dataclasses.asdict(audio_recipe("bubogpt"))}
def read_config(src: Path) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != FAMILY:
        raise ExportError(f"{src}: config.json model_type is {cfg.get('model_type')!r}, not 'bubogpt'")
    return cfg


def build_vision(cfg: dict, load: Callable[[str], dict]):
    """EVA ViT-g + ln_vision: pixel_values -> image_embeds [B, 257, Dv]."""
    vc = cfg["vision_config"]
    state = eva_to_hf(load(VISION_PREFIX), load(LN_VISION_PREFIX), vc["num_hidden_layers"])
    return vision_module(vc, state, cfg.get("ln_vision_eps", LN_VISION_EPS))


def build_qformer(cfg: dict, key: str, load: Callable[[str], dict]):
    """modality_qformers.<key>: 32 queries cross-attending to [B, N, De] -> [B, 32, Dq]."""
    state, query = lavis_qformer_to_hf(load(f"{JOIN}modality_qformers.{key}."))
    return qformer_module(cfg["qformer_config" if key == "vision" else "audio_qformer_config"], state, query)


def imagebind_sizes(cfg: dict):
    """ImageBindSizes whose audio part is the checkpoint's (the other trunks are not built)."""
    from .imagebind_modules import ImageBindSizes, TrunkSize

    a = cfg["audio_config"]
    return dataclasses.replace(ImageBindSizes.huge(), audio=TrunkSize(a["width"], a["depth"], a["heads"]),
                               mel_bins=a.get("mel_bins", 128), audio_frames=a.get("target_frames", 204),
                               audio_kernel=a.get("kernel", 16), audio_stride=a.get("stride", 10))


def load_audio_imagebind(cfg: dict, load: Callable[[str], dict]):
    """The ImageBind audio modality with the checkpoint's weights. The head is unused
    (with_bind_head False) and may be absent; the postprocessor's log_logit_scale is a
    fixed buffer (learnable=False) that defaults to log(20) when absent."""
    from .imagebind_modules import ImageBind

    model = ImageBind(imagebind_sizes(cfg), modalities=("audio",))
    state = {}
    for part in AUDIO_PARTS:
        try:
            state.update({part + k: v for k, v in load(ENC + part).items()})
        except (KeyError, ExportError):
            if "postprocessors" not in part:
                raise
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("modality_heads.") and not k.endswith("log_logit_scale")]
    if missing or unexpected:
        raise ExportError(f"audio ImageBind weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def audio_scale(model) -> float:
    """LearnableLogitScaling.forward: clip(exp(log_logit_scale), max=100) -> 20 for audio."""
    import torch
    post = model.modality_postprocessors["audio"][1]
    return float(torch.clamp(post.log_logit_scale.exp(), max=post.max_scale))


def build_audio_trunk(cfg: dict, load: Callable[[str], dict]):
    """One clip per batch row: fbank [B, 1, 128, 204] -> trunk tokens [B, 229, Da] (no head, no norm)."""
    import torch

    class AudioTrunk(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, fbank):
            return self.model.tokens("audio", fbank)

    return AudioTrunk(load_audio_imagebind(cfg, load)).eval()


def stage_specs(cfg: dict) -> dict[str, OnnxStageSpec]:
    v, q, aq = cfg["vision_config"], cfg["qformer_config"], cfg["audio_qformer_config"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1            # 16 x 16 patches + CLS = 257
    sizes = imagebind_sizes(cfg)
    n_aud, d_aud = sizes.num_tokens("audio"), sizes.audio.width       # 1 + 12 x 19 = 229, 768
    queries = cfg["num_query_token"]
    img = TensorSpec("image_embeds", ("batch", n_img, v["hidden_size"]))
    aud = TensorSpec("audio_tokens", ("batch", n_aud, d_aud))
    return {
        "vision": OnnxStageSpec("vision", "vision.onnx", (TensorSpec("pixel_values", (
            "batch", 3, v["image_size"], v["image_size"])),), (img,)),
        "qformer": OnnxStageSpec("qformer", "qformer.onnx", (img,), (
            TensorSpec("query_output", ("batch", queries, q["hidden_size"])),)),
        "audio_trunk": OnnxStageSpec("audio_trunk", "audio_trunk.onnx", (TensorSpec("fbank", (
            "batch", 1, sizes.mel_bins, sizes.audio_frames)),), (aud,), check_batch=3),
        "audio_qformer": OnnxStageSpec("audio_qformer", "audio_qformer.onnx", (aud,), (
            TensorSpec("query_output", ("batch", queries, aq["hidden_size"])),)),
    }


def modality_records(cfg: dict, scale: float) -> dict:
    n_embd, queries = int(cfg["text_config"]["hidden_size"]), int(cfg["num_query_token"])

    def proj(file: str, conf: dict) -> dict:
        return {"op": "projector", "file": file, "in_dim": int(conf["hidden_size"]), "out_dim": n_embd, "bias": True}

    return {
        "image": {"preprocess": BUBOGPT_IMAGE, "rows": queries, "stages": [
            {"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"}, "output": "image_embeds"},
            {"op": "onnx", "file": "qformer.onnx", "inputs": {"image_embeds": "image_embeds"},
             "output": "query_output"},
            proj("projector.safetensors", cfg["qformer_config"])]},
        "audio": {"preprocess": BUBOGPT_AUDIO, "rows": queries, "stages": [
            {"op": "onnx", "file": "audio_trunk.onnx", "inputs": {"fbank": "fbank"}, "output": "audio_tokens"},
            # modality_postprocessors.audio: Normalize(dim=-1) then LearnableLogitScaling(20)
            {"op": "l2norm", "input": "audio_tokens", "output": "audio_normed", "scale": scale},
            # ImageBindModel.forward reduce_list: reshape(B, S, ...).mean(dim=1)
            {"op": "mean_over_clips", "input": "audio_normed", "output": "audio_embeds"},
            {"op": "onnx", "file": "audio_qformer.onnx", "inputs": {"audio_tokens": "audio_embeds"},
             "output": "audio_query_output"},
            proj("audio_projector.safetensors", cfg["audio_qformer_config"])]},
    }


# Published file -> (MMGPT4 prefix its keys go under, which keys): the original's load order.
IMAGEBIND_NAMES = ("imagebind_huge.pth",)
MINIGPT4_PROJ_NAMES = ("prerained_minigpt4_7b.pth",)
BUBOGPT_NAMES = ("bubogpt_7b.pth",)
IMAGEBIND_AUDIO_HEAD_DIM = 64        # imagebind_huge audio trunk: 768 / 12 heads


def assemble_release(src_dir: Path, log) -> dict:
    """The release files -> one MMGPT4-keyed state dict, later files winning (see the docstring)."""
    from .checkpoints import read_state_dict

    state: dict = {}
    path = find_release_file(src_dir, IMAGEBIND_NAMES)
    ib = read_state_dict(path, "ImageBind-huge weights")
    state.update({ENC + k: v for k, v in ib.items() if k.split(".")[1] == "audio"})     # the trunks served here
    path = find_release_file(src_dir, ("eva_vit_g.pth",))
    eva = read_eva_vit_g(path)
    state.update({VISION_PREFIX + k: v for k, v in eva.items()})
    path = find_release_file(src_dir, BLIP2_QFORMER_NAMES)
    blip2 = read_blip2(path)
    state[LN_VISION_PREFIX + "weight"], state[LN_VISION_PREFIX + "bias"] = blip2["ln_vision.weight"], blip2["ln_vision.bias"]
    state.update({f"{JOIN}modality_qformers.vision.{k}": v for k, v in blip2.items() if not k.startswith("ln_vision.")})
    proj_path = find_release_file(src_dir, MINIGPT4_PROJ_NAMES, required=False)
    if proj_path is not None:
        proj = read_state_dict(proj_path, "MiniGPT-4 stage-2 checkpoint")
        for kind in ("weight", "bias"):
            if f"llama_proj.{kind}" in proj:
                state[f"{JOIN}modality_post_projectors.vision.fc.{kind}"] = proj[f"llama_proj.{kind}"]
    path = find_release_file(src_dir, BUBOGPT_NAMES)
    bubo = read_state_dict(path, "BuboGPT checkpoint")
    state.update(bubo)                                              # load_state_dict(ckpt['model'], strict=False)
    log(f"release: {len(state)} tensors from {IMAGEBIND_NAMES[0]}, eva_vit_g.pth, {BLIP2_QFORMER_NAMES[0]}, "
        f"{proj_path.name + ', ' if proj_path else ''}{BUBOGPT_NAMES[0]}")
    needed = {f"{JOIN}modality_qformers.audio.query_tokens": BUBOGPT_NAMES[0],
              f"{JOIN}modality_post_projectors.audio.fc.weight": BUBOGPT_NAMES[0],
              f"{JOIN}modality_post_projectors.vision.fc.weight": f"{BUBOGPT_NAMES[0]} or {MINIGPT4_PROJ_NAMES[0]}",
              f"{ENC}modality_trunks.audio.blocks.0.attn.in_proj_weight": IMAGEBIND_NAMES[0]}
    missing = [f"{k} (from {where})" for k, where in needed.items() if k not in state]
    if missing:
        raise ExportError(f"{src_dir}: the release lacks {'; '.join(missing)}")
    return state


def release_config(state: dict, src_dir: Path, text_cfg: dict) -> dict:
    """config.json words for an assembled release, read off its tensors."""
    eva = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    sub = lambda p: {k[len(p):]: v for k, v in state.items() if k.startswith(p)}  # noqa: E731
    trunk = ENC + "modality_trunks.audio.blocks."
    width = int(state[trunk + "0.attn.in_proj_weight"].shape[1])
    depth = len({k[len(trunk):].split(".")[0] for k in state if k.startswith(trunk)})
    if width % IMAGEBIND_AUDIO_HEAD_DIM:
        raise ExportError(f"{src_dir}: ImageBind audio trunk of width {width} is not a multiple of "
                          f"{IMAGEBIND_AUDIO_HEAD_DIM} (its heads' width)")
    vision_q = qformer_config(sub(f"{JOIN}modality_qformers.vision."), BLIP2_QFORMER_NAMES[0])
    audio_q = qformer_config(sub(f"{JOIN}modality_qformers.audio."), BUBOGPT_NAMES[0])
    return {"model_type": FAMILY, "num_query_token": int(state[f"{JOIN}modality_qformers.vision.query_tokens"].shape[1]),
            "ln_vision_eps": LN_VISION_EPS, "vision_config": eva_config(eva, "eva_vit_g.pth"),
            "qformer_config": vision_q, "audio_qformer_config": audio_q,
            "audio_config": {"width": width, "depth": depth, "heads": width // IMAGEBIND_AUDIO_HEAD_DIM},
            "text_config": text_cfg}


def export_bubogpt(src: str, out: Path, quant: str = "Q4_K_M", log: Callable[[str], None] = print,
                   encoder_precision: str = "fp32", llm: str | None = None, grounding: str | None = None,
                   sam: str | None = None) -> Path:
    """grounding: a folder with RAM, GroundingDINO and SAM as released (export/grounding.py)
    adds BuboGPT's grounding stages; without it the bundle chats but does not ground."""
    from scops.runtime.templates import BUBOGPT

    if encoder_precision != "fp32":
        raise ExportError("bubogpt: --encoder-precision other than fp32 is not supported yet")
    extras = None
    if grounding is not None:
        from .grounding import export_grounding, find_sources
        sources = find_sources(grounding, sam)               # every missing file named before any work

        def extras(b, log):
            record, checks = export_grounding(sources, b, log)
            return {"grounding": record}, checks
    elif sam is not None:
        raise ExportError("--sam needs --grounding (the folder with RAM and GroundingDINO)")
    src_dir = resolve_source(src, family(FAMILY))
    if (src_dir / "config.json").is_file():                          # a converted folder
        cfg, llm_dir = read_config(src_dir), None

        def load(prefix: str) -> dict:
            return load_state(src_dir, prefix)
    else:                                                             # the published release
        llm_dir = find_llm_folder(src_dir, llm)
        state = assemble_release(src_dir, log)
        cfg = release_config(state, src_dir, llama_config(llm_dir))

        def load(prefix: str) -> dict:
            out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not out:
                raise ExportError(f"{src_dir}: the release has no tensors under '{prefix}'")
            return out
    text_cfg = dict(cfg["text_config"])
    specs = stage_specs(cfg)
    scale = audio_scale(load_audio_imagebind(cfg, load))
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: build_vision(cfg, load), specs["vision"]),
                (lambda: build_qformer(cfg, "vision", load), specs["qformer"]),
                (lambda: build_audio_trunk(cfg, load), specs["audio_trunk"]),
                (lambda: build_qformer(cfg, "audio", load), specs["audio_qformer"])),
        projection_prefix=PROJECTORS[0][0], projectors=PROJECTORS,
        llm_prefix=LLM_PREFIX if llm_dir is None else "", text_config=text_cfg, template=BUBOGPT,
        modalities=modality_records(cfg, scale), llm_dir=llm_dir, load=load, extras=extras,
    )
    return assemble_bundle(fam, src_dir, out, quant, log, encoder_precision)
