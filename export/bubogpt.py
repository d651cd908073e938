"""BuboGPT exporter (image + audio): an original-key checkpoint folder -> bundle.

Source folder (scops' own layout, documented so a converted release loads):
  config.json        {"model_type": "bubogpt", "num_query_token": 32, "vision_config": {...},
                      "ln_vision_eps": 1e-5, "qformer_config": {...}, "audio_config": {...},
                      "audio_qformer_config": {...}, "text_config": {...}}
                      (vision/qformer configs in HF Blip2VisionConfig / Blip2QFormerConfig words;
                      audio_config: ImageBind audio trunk width/depth/heads + fbank geometry)
  *.safetensors      the ORIGINAL `MMGPT4.state_dict()` key names (bubogpt/models/mm_gpt4.py):
                      multimodal_encoder.modality_trunks.vision.*        EVA ViT-g (eva_vit.py)
                      multimodal_encoder.modality_postprocessors.vision.* ln_vision (image_bind.py)
                      multimodal_encoder.modality_{preprocessors,trunks,postprocessors}.audio.*
                      multimodal_joiner.modality_qformers.{vision,audio}.{Qformer.bert.*,query_tokens}
                      multimodal_joiner.modality_post_projectors.{vision,audio}.fc.{weight,bias}
                      llama_model.model.*, llama_model.lm_head.weight
  tokenizer.model    the LLaMA sentencepiece model

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
import re
from pathlib import Path
from typing import Callable

from scops.runtime.audio import audio_recipe

from .assemble import FamilyExport, assemble_bundle, load_state, resolve_source
from .onnx_stages import OnnxStageSpec, TensorSpec

FAMILY = "bubogpt"
ENC = "multimodal_encoder."
JOIN = "multimodal_joiner."
VISION_PREFIX = ENC + "modality_trunks.vision."
LN_VISION_PREFIX = ENC + "modality_postprocessors.vision."
AUDIO_PARTS = ("modality_preprocessors.audio.", "modality_trunks.audio.", "modality_postprocessors.audio.")
PROJECTORS = ((JOIN + "modality_post_projectors.vision.fc.", "projector.safetensors"),
              (JOIN + "modality_post_projectors.audio.fc.", "audio_projector.safetensors"))
LLM_PREFIX = "llama_model."
# imagebind/models/image_bind.py: ln_vision is `LayerNorm(1408)` with torch's default eps.
LN_VISION_EPS = 1e-5

# eval_scripts/conversation.py CONV_X + Conversation.get_prompt (sep "###"): system + "###Human: "
# + content + "###Assistant:"; an uploaded medium is its own Human message and the question is
# joined to the LAST one with a space (Chat.ask, just_uploaded); app.py uploads image, then audio.
SYSTEM = ("Give the following image: <Vision>ImageContent</Vision> or audio: <Audio>AudioContent</Audio>. "
          "You will be able to see the image/audio once I provide it to you. Please answer my questions.")
BUBOGPT_TEMPLATE = {
    "system": SYSTEM,
    "user": "###Human: {content}",
    "assistant": "###Assistant:",
    "answer": " {answer}",
    "media": {"image": "<Vision><ModalityHere></Vision>", "audio": "<Audio><ModalityHere></Audio>"},
    "media_sep": " ",
    "media_join": "###Human: ",       # between two media of one turn (each was its own message)
    "placeholder": "<ModalityHere>",
    "bos": True,                      # get_context_emb: add_special_tokens only on the first segment
    "stop": ["###"],                  # stop ids [835] / [2277, 29937]
}
# imagebind_vision_eval: Resize(224, bicubic) (short side) + CenterCrop(224) + CLIP mean/std.
BUBOGPT_IMAGE = {
    "kind": "image", "size": 224, "resize": "short_side_crop", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}
# The runtime computes audio by the recipe's name; the values are written beside it for readers
# (runtime/audio.py BUBOGPT_AUDIO: imagebind_audio_eval as app.py feeds it).
BUBOGPT_AUDIO = {"kind": "audio", "recipe": "bubogpt", **dataclasses.asdict(audio_recipe("bubogpt"))}
_BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "cross_attention_frequency": 2, "layer_norm_eps": 1e-12}
# config.json of a converted release (text_config: Vicuna-7B's). EVA ViT-g (create_eva_vit_g):
# 1408 wide, 39 blocks, 1408 // 88 = 16 heads, int(1408 * 4.3637) = 6144 MLP, eps 1e-6. Both
# Q-Formers: bert-base-uncased, encoder_width = joiner_cfg feat_dim (vision 1408, audio 768).
# ImageBind-huge audio trunk (imagebind_huge defaults): 768 wide, 12 blocks, 12 heads.
RELEASE_CONFIG = {
    "model_type": FAMILY, "num_query_token": 32, "ln_vision_eps": LN_VISION_EPS,
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6,
                      "qkv_bias": True},
    "qformer_config": dict(_BERT_BASE, encoder_hidden_size=1408),
    "audio_qformer_config": dict(_BERT_BASE, encoder_hidden_size=768),
    "audio_config": {"width": 768, "depth": 12, "heads": 12, "mel_bins": 128, "target_frames": 204,
                     "kernel": 16, "stride": 10},
}


def read_config(src: Path) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != FAMILY:
        raise ValueError(f"{src}: config.json model_type is {cfg.get('model_type')!r}, not 'bubogpt'")
    return cfg


def eva_to_hf(eva: dict, ln: dict) -> dict:
    """EVA ViT-g keys (eva_vit.py VisionTransformer) + ln_vision -> HF Blip2VisionModel keys.
    EVA has q_bias and v_bias only; HF's fused qkv bias is cat(q_bias, 0, v_bias), as EVA builds it."""
    import torch

    out = {"embeddings.class_embedding": eva["cls_token"], "embeddings.position_embedding": eva["pos_embed"],
           "embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"],
           "post_layernorm.weight": ln["weight"], "post_layernorm.bias": ln["bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in eva.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in names:
            out[f"encoder.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"] = v
        elif (m := re.fullmatch(r"blocks\.(\d+)\.attn\.q_bias", k)):
            v_bias = eva[f"blocks.{m.group(1)}.attn.v_bias"]
            out[f"encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat([v, torch.zeros_like(v_bias), v_bias])
    return out


# LAVIS Qformer.bert keys the query-only path never reads: the text embeddings, the text FFN of
# every layer (intermediate / output; the queries use intermediate_query / output_query) and the
# LM head. BuboGPT keeps them in the audio Q-Former (only the vision one drops them: load_Qformer).
_TEXT_ONLY = re.compile(r"(cls\..*|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids).*"
                        r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\..*)")


def lavis_qformer_to_hf(state: dict) -> tuple[dict, object]:
    """SequenceGenericQFormer keys (Qformer.bert.*, query_tokens) -> (HF Blip2QFormerModel
    state, query_tokens [1, Q, D]). Same math: LayerNorm(query_embeds), BERT layers with
    cross-attention every 2nd layer, the query FFN."""
    out = {}
    for k, v in state.items():
        if not k.startswith("Qformer.") or _TEXT_ONLY.fullmatch(k[len("Qformer."):]):
            continue
        k = k[len("Qformer.bert."):]
        k = k.replace("embeddings.LayerNorm.", "layernorm.")
        k = k.replace(".attention.self.", ".attention.attention.").replace(".crossattention.self.",
                                                                           ".crossattention.attention.")
        out[k] = v
    return out, state["query_tokens"]


def build_vision(cfg: dict, src: Path):
    """EVA ViT-g + ln_vision: pixel_values -> image_embeds [B, 257, Dv]."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conf = Blip2VisionConfig(**cfg["vision_config"])
            conf._attn_implementation = "eager"
            self.vision_model = Blip2VisionModel(conf)
            self.vision_model.post_layernorm.eps = float(cfg.get("ln_vision_eps", LN_VISION_EPS))

        def forward(self, pixel_values):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state

    m = Vision()
    m.vision_model.load_state_dict(eva_to_hf(load_state(src, VISION_PREFIX), load_state(src, LN_VISION_PREFIX)))
    return m.eval()


def build_qformer(cfg: dict, key: str, src: Path):
    """modality_qformers.<key>: 32 queries cross-attending to [B, N, De] -> [B, 32, Dq]."""
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    class QFormer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conf = Blip2QFormerConfig(**cfg["qformer_config" if key == "vision" else "audio_qformer_config"])
            conf._attn_implementation = "eager"
            self.qformer = Blip2QFormerModel(conf)
            self.query_tokens = torch.nn.Parameter(torch.zeros(1, cfg["num_query_token"], conf.hidden_size))

        def forward(self, embeds):
            query = self.query_tokens.expand(embeds.shape[0], -1, -1)          # [1,Q,D] -> [B,Q,D]
            mask = torch.ones(embeds.shape[:-1], dtype=torch.long)
            return self.qformer(query_embeds=query, encoder_hidden_states=embeds,
                                encoder_attention_mask=mask).last_hidden_state

    m = QFormer()
    state, query = lavis_qformer_to_hf(load_state(src, f"{JOIN}modality_qformers.{key}."))
    m.qformer.load_state_dict(state)
    m.query_tokens.data.copy_(query)
    return m.eval()


def imagebind_sizes(cfg: dict):
    """ImageBindSizes whose audio part is the checkpoint's (the other trunks are not built)."""
    from .imagebind_modules import ImageBindSizes, TrunkSize

    a = cfg["audio_config"]
    return dataclasses.replace(ImageBindSizes.huge(), audio=TrunkSize(a["width"], a["depth"], a["heads"]),
                               mel_bins=a.get("mel_bins", 128), audio_frames=a.get("target_frames", 204),
                               audio_kernel=a.get("kernel", 16), audio_stride=a.get("stride", 10))


def load_audio_imagebind(cfg: dict, src: Path):
    """The ImageBind audio modality with the checkpoint's weights. The head is unused
    (with_bind_head False) and may be absent; the postprocessor's log_logit_scale is a
    fixed buffer (learnable=False) that defaults to log(20) when absent."""
    from .imagebind_modules import ImageBind

    model = ImageBind(imagebind_sizes(cfg), modalities=("audio",))
    state = {}
    for part in AUDIO_PARTS:
        try:
            state.update({part + k: v for k, v in load_state(src, ENC + part).items()})
        except KeyError:
            if "postprocessors" not in part:
                raise
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("modality_heads.") and not k.endswith("log_logit_scale")]
    if missing or unexpected:
        raise KeyError(f"audio ImageBind weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def audio_scale(model) -> float:
    """LearnableLogitScaling.forward: clip(exp(log_logit_scale), max=100) -> 20 for audio."""
    import torch
    post = model.modality_postprocessors["audio"][1]
    return float(torch.clamp(post.log_logit_scale.exp(), max=post.max_scale))


def build_audio_trunk(cfg: dict, src: Path):
    """One clip per batch row: fbank [B, 1, 128, 204] -> trunk tokens [B, 229, Da] (no head, no norm)."""
    import torch

    class AudioTrunk(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, fbank):
            return self.model.tokens("audio", fbank)

    return AudioTrunk(load_audio_imagebind(cfg, src)).eval()


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


def export_bubogpt(src: str, out: Path, quant: str = "Q4_K_M",
                   log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    if encoder_precision != "fp32":
        raise ValueError("bubogpt: --encoder-precision other than fp32 is not supported yet")
    src_dir = resolve_source(src)
    cfg = read_config(src_dir)
    text_cfg = dict(cfg["text_config"])
    specs = stage_specs(cfg)
    scale = audio_scale(load_audio_imagebind(cfg, src_dir))
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: build_vision(cfg, src_dir), specs["vision"]),
                (lambda: build_qformer(cfg, "vision", src_dir), specs["qformer"]),
                (lambda: build_audio_trunk(cfg, src_dir), specs["audio_trunk"]),
                (lambda: build_qformer(cfg, "audio", src_dir), specs["audio_qformer"])),
        projection_prefix=PROJECTORS[0][0], projectors=PROJECTORS,
        llm_prefix=LLM_PREFIX, text_config=text_cfg, template=BUBOGPT_TEMPLATE,
        modalities=modality_records(cfg, scale),
    )
    return assemble_bundle(fam, src_dir, out, quant, log, encoder_precision)
