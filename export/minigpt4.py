"""MiniGPT-4-shaped exporter: HF `Blip2ForConditionalGeneration` (LLaMA text model) -> bundle.

Stages of the image modality (manifest order):
  vision.onnx     pixel_values [B,3,224,224] -> image_embeds [B,257,Dv]  (ViT + ln_vision)
  qformer.onnx    image_embeds [B,257,Dv]    -> query_output [B,32,Dq]   (32 learned queries)
  projector       query_output [B,32,Dq]     -> rows [B,32,n_embd]       (Linear with bias)
The LLM goes to GGUF (streamed tensor by tensor), then to the requested quantization.
Only the parts each step needs are loaded: a 7B checkpoint never sits in RAM whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .assemble import FamilyExport, assemble_bundle, load_state, resolve_source
from .onnx_stages import OnnxStageSpec, TensorSpec

FAMILY = "minigpt4"

# MiniGPT-4's conversation (CONV_VISION, sep "###", roles Human/Assistant): the prompt is
# system + "###Human: <Img><ImageHere></Img> {q}###Assistant:"; the 32 rows replace
# <ImageHere>; BOS only before the first segment; generation stops at "###".
MINIGPT4_TEMPLATE = {
    "system": "Give the following image: <Img>ImageContent</Img>. You will be able to see the "
              "image once I provide it to you. Please answer my questions.",
    "user": "###Human: {content}",
    "assistant": "###Assistant:",
    "answer": " {answer}",
    "media": {"image": "<Img><ImageHere></Img>"},
    "media_sep": " ",                 # "<Img><ImageHere></Img> {question}"
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["###"],
}
# BLIP-2 preprocessing: squash-resize to 224x224 (bicubic), CLIP mean/std.
BLIP2_IMAGE = {
    "kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}


def build_vision(vision_cls, config, src: Path):
    """ViT + post_layernorm (= ln_vision): pixel_values -> image_embeds."""
    import torch

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config.vision_config._attn_implementation = "eager"
            self.vision_model = vision_cls(config.vision_config)

        def forward(self, pixel_values):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state

    m = Vision()
    m.vision_model.load_state_dict(load_state(src, "vision_model."))
    return m.eval()


def build_qformer(config, src: Path, with_text: bool = False):
    """32 learned queries cross-attending to image_embeds -> query_output [B,32,Dq].

    with_text (InstructBLIP): the instruction's tokens join the queries in self-attention
    (forward(image_embeds, input_ids, attention_mask)); only the 32 query rows come out.
    """
    import torch
    from transformers import Blip2QFormerModel, InstructBlipQFormerModel

    class QFormer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config.qformer_config._attn_implementation = "eager"
            cls = InstructBlipQFormerModel if with_text else Blip2QFormerModel
            self.qformer = cls(config.qformer_config)
            self.query_tokens = torch.nn.Parameter(
                torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))

        def forward(self, image_embeds, input_ids=None, attention_mask=None):
            n_q = self.query_tokens.shape[1]
            query = self.query_tokens.expand(image_embeds.shape[0], -1, -1)   # [1,Q,D] -> [B,Q,D]
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
            text = {}
            if with_text:
                ones = torch.ones(query.shape[:-1], dtype=attention_mask.dtype)
                text = {"input_ids": input_ids, "attention_mask": torch.cat([ones, attention_mask], dim=1)}
            out = self.qformer(query_embeds=query, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=image_mask, **text).last_hidden_state
            return out[:, :n_q, :]                                            # [B,Q(+T),D] -> [B,Q,D]

    m = QFormer()
    m.qformer.load_state_dict(load_state(src, "qformer."))
    m.query_tokens.data.copy_(load_state(src, "query_tokens")[""])
    return m.eval()


def vision_spec(config) -> OnnxStageSpec:
    vc = config.vision_config
    n_tok = (vc.image_size // vc.patch_size) ** 2 + 1            # 256 patches + CLS = 257
    return OnnxStageSpec(
        name="vision", file="vision.onnx",
        inputs=(TensorSpec("pixel_values", ("batch", 3, vc.image_size, vc.image_size)),),
        outputs=(TensorSpec("image_embeds", ("batch", n_tok, vc.hidden_size)),))


def projector_record(config, text_config: dict) -> dict:
    return {"op": "projector", "file": "projector.safetensors", "in_dim": int(config.qformer_config.hidden_size),
            "out_dim": int(text_config["hidden_size"]), "bias": True}


def load_config(config_cls, src: str, model_type: str) -> tuple[Path, object]:
    """The source folder and its HF config, which must be `model_type` with a LLaMA text model."""
    src_dir = resolve_source(src)
    config = config_cls.from_pretrained(src_dir)
    if config.model_type != model_type:
        raise ValueError(f"{src}: a {config.model_type} checkpoint, not {model_type}")
    if config.text_config.model_type != "llama":
        raise ValueError(f"{src}: text model is {config.text_config.model_type}; scops serves LLaMA/Vicuna")
    return src_dir, config


def export_minigpt4(src: str, out: Path, quant: str = "Q4_K_M",
                    log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    from transformers import Blip2Config, Blip2VisionModel

    src_dir, config = load_config(Blip2Config, src, "blip-2")
    text_cfg = config.text_config.to_dict()
    vspec = vision_spec(config)
    qspec = OnnxStageSpec(
        name="qformer", file="qformer.onnx",
        inputs=(TensorSpec("image_embeds", vspec.outputs[0].shape),),
        outputs=(TensorSpec("query_output", ("batch", config.num_query_tokens, config.qformer_config.hidden_size)),))
    fam = FamilyExport(
        family=FAMILY,
        stages=((lambda: build_vision(Blip2VisionModel, config, src_dir), vspec),
                (lambda: build_qformer(config, src_dir), qspec)),
        projection_prefix="language_projection.", llm_prefix="language_model.", text_config=text_cfg,
        template=MINIGPT4_TEMPLATE,
        modalities={"image": {
            "preprocess": BLIP2_IMAGE,
            "rows": config.num_query_tokens,
            "stages": [
                {"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
                 "output": "image_embeds"},
                {"op": "onnx", "file": "qformer.onnx", "inputs": {"image_embeds": "image_embeds"},
                 "output": "query_output"},
                projector_record(config, text_cfg),
            ],
        }},
    )
    return assemble_bundle(fam, src_dir, out, quant, log, encoder_precision)
