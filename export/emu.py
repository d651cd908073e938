"""Emu exporter: Emu-I (image chat) or the pretrained Emu (image chat + image generation).

    export_emu("BAAI-Emu/Emu-instruct.pt", out)   # chat bundle (LoRA merged into the LLM)
    export_emu("BAAI-Emu/pretrain", out)          # generation bundle (+ regression head, UNet, VAE)

Stages of the image modality (manifest order):
  vision.onnx    pixel_values [B,3,224,224] -> image_embeds [B,257,1408]  (EVA-CLIP-g, all 40
                 blocks, no final norm, then ln_visual eps 1e-6)
  cformer.onnx   image_embeds [B,257,1408]  -> causal_output [B,32,768]   (T5 decoder, 32 queries)
  projector      cformer.projection Linear(768 -> 5120, bias)             -> 32 LLM rows
The LLM (LLaMA-13B + [PAD] [IMG] [/IMG] <image> (+ [USER] [ASSISTANT])) goes to GGUF with the
added tokens as control tokens; Emu-I's LoRA (r16, alpha 16, q,k,v,o) is merged while streaming.
Generation bundles add regress_head.safetensors (stu_regress_head, Linear 5120 -> 5120, no bias,
run by the projector kernel), unet.onnx and vae_decoder.onnx (export/emu_diffusion.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .assemble import FamilyExport, assemble_bundle
from scops.runtime import templates
from scops.runtime.errors import ExportError

from .emu_release import (LN_VISUAL_EPS, LORA_ALPHA, LlmTensors, Release, added_tokens, find_release,
                          load_state, lora_pairs, sub_state, text_config)
from .onnx_stages import OnnxStageSpec, TensorSpec

FAMILY = "emu"
# Emu1/utils.py process_img: PIL resize to 224x224 (Pillow's default bicubic), /255, CLIP mean/std.
EMU_IMAGE = {
    "kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}


def vision_config(release: Release):
    from transformers import Blip2VisionConfig

    v = release.emu_config["vision_cfg"]
    width = int(v["width"])
    conf = Blip2VisionConfig(hidden_size=width, intermediate_size=int(width * float(v["mlp_ratio"])),
                             num_hidden_layers=int(v["layers"]), num_attention_heads=width // int(v["head_width"]),
                             image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                             layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    conf._attn_implementation = "eager"
    return conf


def build_vision(release: Release, sd: dict):
    """EVA-CLIP-g (every block, as forward_features) + ln_visual: pixels -> [B, 257, 1408]."""
    import torch
    from transformers import Blip2VisionModel

    from .releases import eva_to_hf

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = Blip2VisionModel(vision_config(release))
            self.vision_model.post_layernorm.eps = LN_VISUAL_EPS

        def forward(self, pixel_values):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state

    m = Vision()
    layers = int(release.emu_config["vision_cfg"]["layers"])                 # every block (Emu: all 40)
    m.vision_model.load_state_dict(eva_to_hf(sub_state(sd, "visual."), sub_state(sd, "ln_visual."), layers))
    return m.eval()


def build_cformer(sd: dict):
    from .emu_modules import CausalFormer, CFormerConfig

    m = CausalFormer(CFormerConfig.from_state(sd))
    m.load_state_dict(sub_state(sd, "cformer."))
    return m.eval()


def stage_specs(release: Release, sd: dict) -> tuple[OnnxStageSpec, OnnxStageSpec]:
    from .emu_modules import CFormerConfig

    v = release.emu_config["vision_cfg"]
    c = CFormerConfig.from_state(sd)
    n_tok = (int(v["image_size"]) // int(v["patch_size"])) ** 2 + 1          # 16 x 16 patches + CLS = 257
    embeds = TensorSpec("image_embeds", ("batch", n_tok, int(v["width"])))
    vision = OnnxStageSpec("vision", "vision.onnx",
                           (TensorSpec("pixel_values", ("batch", 3, v["image_size"], v["image_size"])),), (embeds,))
    cformer = OnnxStageSpec("cformer", "cformer.onnx", (embeds,),
                            (TensorSpec("causal_output", ("batch", c.n_causal, c.d_model)),))
    return vision, cformer


def image_modality(sd: dict) -> dict:
    from .emu_modules import CFormerConfig

    c = CFormerConfig.from_state(sd)
    return {"preprocess": EMU_IMAGE, "rows": c.n_causal, "stages": [
        {"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"}, "output": "image_embeds"},
        {"op": "onnx", "file": "cformer.onnx", "inputs": {"image_embeds": "image_embeds"}, "output": "causal_output"},
        {"op": "projector", "file": "projector.safetensors", "in_dim": c.d_model, "out_dim": c.output_dim,
         "bias": True}]}


# Emu1/utils.py process_video: 8 frames at get_index(len(vr), 8), each through process_img;
# the prompt holds one image placeholder per frame (runtime/video.py segment_indices).
EMU_VIDEO_FRAMES = 8
EMU_VIDEO = {**EMU_IMAGE, "kind": "video", "recipe": "emu", "frames": EMU_VIDEO_FRAMES}


def video_modality(sd: dict) -> dict:
    """The image chain run on every frame; each frame is its own [IMG] 32 rows [/IMG] slot."""
    return {**image_modality(sd), "preprocess": EMU_VIDEO, "per_frame": True}


def regress_head_step(sd: dict):
    """stu_regress_head -> regress_head.safetensors (the fused projector runs it, no bias)."""
    def run(b, log) -> dict:
        from safetensors.numpy import save_file

        w = sub_state(sd, "decoder.lm.stu_regress_head.")["weight"].numpy()
        save_file({"fc1.weight": w}, str(b.dir / "regress_head.safetensors"))
        b.add_file("regress_head.safetensors", "safetensors", tensors={"fc1.weight": list(w.shape)})
        return {}                      # the "generation" record (emu_diffusion) names the file
    return run


def export_emu(src: str, out: Path, quant: str = "Q4_K_M",
               log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    import sentencepiece as spm

    release = find_release(src)
    log(f"emu: {release.kind} checkpoint {release.checkpoint}")
    sd = load_state(release.checkpoint)
    text_cfg = text_config(release, sd)
    sp = spm.SentencePieceProcessor(model_file=str(release.llama_dir / "tokenizer.model"))
    n_pieces = sp.get_piece_size()
    added = added_tokens(n_pieces, text_cfg["vocab_size"])
    instruct = "[USER]" in added
    lora = lora_pairs(sd)
    if instruct and not lora:
        raise ExportError(f"{release.checkpoint}: Emu-I checkpoint without LoRA tensors")
    vspec, cspec = stage_specs(release, sd)
    facts: dict = {"emu": {"variant": "instruct" if instruct else "pretrain",
                           "added_tokens": added}}
    adjust = None
    if lora:
        from .pandagpt import lora_merger
        r = int(next(iter(lora.values()))[0].shape[0])
        facts["lora"] = {"merged": True, "r": r, "alpha": LORA_ALPHA, "tensors": len(lora)}
        adjust = lora_merger(lora, LORA_ALPHA)
    steps = []
    if not instruct:
        if release.pretrain_dir is not None and (release.pretrain_dir / "unet").is_dir():
            from .emu_diffusion import image_decoder_step
            steps = [("regression head: stu_regress_head -> regress_head.safetensors", regress_head_step(sd)),
                     ("image decoder: UNet + VAE decoder to ONNX",
                      image_decoder_step(release.pretrain_dir, int(text_cfg["hidden_size"]), added))]
        else:
            log("emu: no unet/ beside the checkpoint: the bundle will chat but not generate pictures")
    template = dict(templates.EMU_I if instruct else templates.EMU)
    ids = {**added, "</s>": sp.eos_id()}
    template["special"] = {t: ids[t] for t in template["special"]}
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: build_vision(release, sd), vspec), (lambda: build_cformer(sd), cspec)),
        projection_prefix="cformer.projection.", llm_prefix="", text_config=text_cfg,
        template=template,
        modalities={"image": image_modality(sd), "video": video_modality(sd)}, facts=facts, llm_dir=release.llama_dir,
        llm_adjust=adjust, load=lambda prefix: sub_state(sd, prefix), llm_tensors=LlmTensors(sd),
        added_tokens=added, extra_steps=tuple(steps))
    return assemble_bundle(fam, release.checkpoint.parent, out, quant, log, encoder_precision)
