"""BLIP-2's parts as the modules the exporters trace: EVA ViT + ln_vision, and the Q-Former.

HF `Blip2VisionModel` (its post-layernorm plays ln_vision) and `Blip2QFormerModel` /
`InstructBlipQFormerModel` compute what LAVIS' EVA ViT and Q-Former compute; the weights
come from an HF folder or, through export/releases.py, from the published LAVIS files.
"""
from __future__ import annotations

from .onnx_stages import OnnxStageSpec, TensorSpec

# BLIP-2 preprocessing (blip2_image_eval): squash-resize to 224x224 (bicubic), CLIP mean/std.
BLIP2_IMAGE = {
    "kind": "image", "size": 224, "resize": "squash", "interpolation": "bicubic",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
}


def vision_module(config, state: dict, ln_eps: float | None = None, vision_cls=None):
    """ViT + post_layernorm (= ln_vision): pixel_values [B,3,S,S] -> image_embeds [B,N,D].

    config: an HF vision config (or its dict); ln_eps overrides the post-layernorm's eps
    (LAVIS' ln_vision is torch's LayerNorm, eps 1e-5, while the ViT's own norms use 1e-6)."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel

    conf = Blip2VisionConfig(**config) if isinstance(config, dict) else config
    conf._attn_implementation = "eager"

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = (vision_cls or Blip2VisionModel)(conf)
            if ln_eps is not None:
                self.vision_model.post_layernorm.eps = float(ln_eps)

        def forward(self, pixel_values):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state

    m = Vision()
    m.vision_model.load_state_dict(state)
    return m.eval()


def qformer_module(config, state: dict, query_tokens, with_text: bool = False):
    """Learned queries cross-attending to image_embeds -> query_output [B,Q,Dq].

    with_text (InstructBLIP): the instruction's tokens join the queries in self-attention
    (forward(image_embeds, input_ids, attention_mask)); only the Q query rows come out."""
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, InstructBlipQFormerModel

    conf = Blip2QFormerConfig(**config) if isinstance(config, dict) else config
    conf._attn_implementation = "eager"

    class QFormer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qformer = (InstructBlipQFormerModel if with_text else Blip2QFormerModel)(conf)
            self.query_tokens = torch.nn.Parameter(torch.zeros(query_tokens.shape))

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
    m.qformer.load_state_dict(state)
    m.query_tokens.data.copy_(query_tokens)
    return m.eval()


def vision_spec(image_size: int, patch: int, width: int, file: str = "vision.onnx") -> OnnxStageSpec:
    n_tok = (image_size // patch) ** 2 + 1                       # 16 x 16 patches + CLS = 257
    return OnnxStageSpec(
        name=file.rsplit(".", 1)[0], file=file,
        inputs=(TensorSpec("pixel_values", ("batch", 3, image_size, image_size)),),
        outputs=(TensorSpec("image_embeds", ("batch", n_tok, width)),))


def qformer_spec(embeds: TensorSpec, queries: int, width: int, file: str = "qformer.onnx") -> OnnxStageSpec:
    return OnnxStageSpec(name=file.rsplit(".", 1)[0], file=file, inputs=(TensorSpec("image_embeds", embeds.shape),),
                         outputs=(TensorSpec("query_output", ("batch", queries, width)),))


def image_stages(queries: bool = True) -> list[dict]:
    """The manifest stages of a BLIP-2 image chain (the projector record is added by the caller)."""
    stages = [{"op": "onnx", "file": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
               "output": "image_embeds"}]
    if queries:
        stages.append({"op": "onnx", "file": "qformer.onnx", "inputs": {"image_embeds": "image_embeds"},
                       "output": "query_output"})
    return stages
