"""LEGO's encoder stages as PyTorch modules over the release's own tensors (lzw-lzw/GroundingGPT
lego/LEGO.py), each one ONNX graph:

  clip_patches    pixel_values [B,3,336,336] -> [B,576,Dc]   CLIP ViT-L/14-336, hidden_states[-2][:, 1:]
  video_frames    frames [T,3,224,224]       -> [T,32,Dq]    EVA ViT-g + ln_vision + BLIP-2 Q-Former
  video_qformer   [T,32,Dq]                  -> [1,64,Dq]    + frame position, video Q-Former (64 queries)
  audio_embed     fbank [S,1,128,204]        -> [S,Da]       ImageBind audio + head, L2 norm x20
  audio_qformer   [S,Da]                     -> [1,8,Dq]     + clip position, audio Q-Former (8 queries)

Sizes are read from the tensors where they are there (widths, depths, which Q-Former layers
cross-attend) and from the published architectures where they are not: head widths 88
(EVA ViT-g: 1408 / 16), 64 (BERT-base Q-Formers, ImageBind's audio trunk).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

IMAGEBIND_HEAD_DIM = 64      # imagebind_huge audio trunk: 768 / 12


def _blocks(state: dict, pattern: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def build_eva(eva: dict, ln_vision: dict, from_release: bool, where):
    """EVA ViT-g + ln_vision as HF Blip2VisionModel: [B,3,224,224] -> [B,257,D]. A release's
    visual_encoder holds exactly the blocks it runs; eva_vit_g.pth one more (40 for 39)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from .releases import EVA_DROPPED_BLOCKS, LN_VISION_EPS, eva_config, eva_to_hf

    cfg = eva_config(eva, where, dropped=0 if from_release else EVA_DROPPED_BLOCKS)
    conf = Blip2VisionConfig(**cfg)
    conf._attn_implementation = "eager"
    model = Blip2VisionModel(conf)
    model.post_layernorm.eps = LN_VISION_EPS
    model.load_state_dict(eva_to_hf(eva, ln_vision, cfg["num_hidden_layers"]))
    return model.eval()


def build_qformer(state: dict, where):
    """A LAVIS Q-Former (`Qformer.bert.*` + `query_tokens`, text parts absent or ignored) as
    HF Blip2QFormerModel, and its query tokens [1, Q, D]. Which layers cross-attend is read
    off the keys (BLIP-2's: every 2nd; LEGO's video / audio Q-Formers: every layer)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    from scops.runtime.errors import ExportError

    from .releases import lavis_qformer_to_hf, qformer_config

    cfg = qformer_config(state, where)
    hf, query = lavis_qformer_to_hf(state)
    layers = cfg["num_hidden_layers"]
    cross = sorted({int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))})
    freq = cross[1] - cross[0] if len(cross) > 1 else layers
    if cross != list(range(0, layers, freq)):
        raise ExportError(f"{where}: Q-Former cross-attention layers {cross} are not every {freq}-th of {layers}")
    conf = Blip2QFormerConfig(**dict(cfg, cross_attention_frequency=freq), hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    conf._attn_implementation = "eager"
    model = Blip2QFormerModel(conf)
    model.load_state_dict(hf)
    return model.eval(), query


def _attend(qformer, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(context.shape[:-1], dtype=torch.long)
    return qformer(query_embeds=queries.expand(context.shape[0], -1, -1), encoder_hidden_states=context,
                   encoder_attention_mask=mask).last_hidden_state


class ClipPatches(nn.Module):
    """CLIPVisionModel(..., output_hidden_states=True).hidden_states[select][:, 1:]: the layers
    after the selected one are dropped (hidden_states[i] is the output of i layers)."""

    def __init__(self, vision, select_layer: int):
        super().__init__()
        tower = vision.vision_model
        n = len(tower.encoder.layers)
        keep = n + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= keep <= n:
            raise ValueError(f"mm_vision_select_layer {select_layer} is outside a {n}-layer CLIP")
        tower.encoder.layers = tower.encoder.layers[:keep]
        self.tower = tower

    def forward(self, pixel_values):
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        x = self.tower.encoder(inputs_embeds=x).last_hidden_state
        return x[:, 1:]                                          # [B, 1 + P, D] -> [B, P, D] (no CLS)


class VideoFrames(nn.Module):
    """encode_videoQformer_visual, per frame: ln_vision(EVA(frames)) -> Q-Former -> [T, 32, D]."""

    def __init__(self, eva, qformer, query_tokens):
        super().__init__()
        self.eva, self.qformer = eva, qformer
        self.query_tokens = nn.Parameter(query_tokens.clone(), requires_grad=False)

    def forward(self, frames):
        return _attend(self.qformer, self.query_tokens, self.eva(pixel_values=frames).last_hidden_state)


class TemporalQFormer(nn.Module):
    """The video / audio Q-Former over one input's frames or clips, each given its position:
    video [T, 32, D] + frame_pos[:T] (per frame, broadcast over its 32 rows) -> [1, T*32, D];
    audio [S, Da] + audio_pos[:S] -> [1, S, Da]; then Q queries attend -> [1, Q, D]."""

    def __init__(self, qformer, query_tokens, position: torch.Tensor):
        super().__init__()
        self.qformer = qformer
        self.query_tokens = nn.Parameter(query_tokens.clone(), requires_grad=False)
        self.position = nn.Parameter(position.clone(), requires_grad=False)       # [max, D]

    def forward(self, x):
        pos = self.position[: x.shape[0]]                                          # [T, D]
        if x.dim() == 3:
            x = (x + pos[:, None, :]).reshape(1, -1, x.shape[-1])                   # [T,32,D] -> [1,T*32,D]
        else:
            x = (x + pos)[None]                                                    # [S,D] -> [1,S,D]
        return _attend(self.qformer, self.query_tokens, x)


def audio_sizes(state: dict):
    """ImageBindSizes of the audio part of an ImageBind state dict (huge's, or a scaled-down one)."""
    import dataclasses

    from .imagebind_modules import ImageBindSizes, TrunkSize

    p = "modality_trunks.audio."
    width = state[p + "blocks.0.attn.in_proj_weight"].shape[1]
    depth = _blocks(state, re.escape(p) + r"blocks\.(\d+)\.")
    out_dim = state["modality_heads.audio.2.weight"].shape[0]
    conv = state["modality_preprocessors.audio.rgbt_stem.proj.weight"]
    return dataclasses.replace(ImageBindSizes.huge(), audio=TrunkSize(width, depth, width // IMAGEBIND_HEAD_DIM),
                               out_dim=out_dim, audio_kernel=conv.shape[-1])


def build_audio_embed(state: dict):
    """ImageBind's audio encoder with head and postprocessor (Normalize, x20): [S,1,128,204] -> [S, Da]."""
    from .imagebind import load_imagebind_state, make_encoder
    from .imagebind_modules import ImageBind

    model = ImageBind(audio_sizes(state), modalities=("audio",))
    load_imagebind_state(model, state)
    return make_encoder(model.eval(), "audio", family="imagebind").eval()
