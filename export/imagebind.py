"""ImageBind-huge: the project's PyTorch reference, its ONNX stages and their export.

One ONNX graph per use, each taking ONE CLIP per batch row (clips and crops are folded
into the batch by the runtime, which then averages rows with `mean_over_clips`, as the
original `ImageBindModel.forward` does with `reduce_list` inputs):

  vision        pixel_values [B, 3, 224, 224]     -> embedding [B, 1024]  (PandaGPT image)
  video         frames [B, 3, 2, 224, 224]        -> embedding [B, 1024]  (one clip x crop)
  audio         fbank [B, 1, 128, 204]            -> embedding [B, 1024]  (x20; PandaGPT: x1)
  audio_tokens  fbank [B, 1, 128, 204]            -> tokens [B, 229, 768] (BuboGPT)
  depth         depth [B, 1, 224, 224]            -> embedding [B, 1024]  (x5)
  thermal       thermal [B, 1, 224, 224]          -> embedding [B, 1024]  (x10)
  imu           imu [B, 6, 2000]                  -> embedding [B, 1024]  (x5)

Embeddings = trunk -> head (LayerNorm, CLS, Linear no bias) -> L2 norm -> logit scale.
PandaGPT (yxuansu/PandaGPT code/model/ImageBind/models/imagebind_model.py, forward)
skips the audio scale: export with `family="pandagpt"`. BuboGPT (magic-research/bubogpt
imagebind/models/image_bind.py, with_head=False in eval_configs/mmgpt4_eval.yaml) runs
the audio trunk with NO head, then the audio postprocessor on every token (L2 norm over
768, x20), then averages clips token by token: `audio_tokens` is that graph per clip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .imagebind_modules import MODALITIES, ImageBind, ImageBindSizes
from .onnx_stages import OnnxStageSpec, TensorSpec, export_and_validate

# ONNX uses -> (model modality, input name, input shape without batch as a function of sizes)
ENCODER_USES = ("vision", "video", "audio", "audio_tokens", "depth", "thermal", "imu")
_INPUTS = {
    "vision": ("vision", "pixel_values", lambda s: (3, s.image_size, s.image_size)),
    "video": ("vision", "frames", lambda s: (3, s.video_frames, s.image_size, s.image_size)),
    "audio": ("audio", "fbank", lambda s: (1, s.mel_bins, s.audio_frames)),
    "audio_tokens": ("audio", "fbank", lambda s: (1, s.mel_bins, s.audio_frames)),
    "depth": ("depth", "depth", lambda s: (1, s.image_size, s.image_size)),
    "thermal": ("thermal", "thermal", lambda s: (1, s.image_size, s.image_size)),
    "imu": ("imu", "imu", lambda s: (s.imu_channels, s.imu_length)),
}
# Modalities whose logit scale each family leaves out (PandaGPT: audio is L2-normalised only).
UNSCALED = {"imagebind": frozenset(), "pandagpt": frozenset({"audio"})}


def model_modality(use: str) -> str:
    return _INPUTS[use][0]


def build_imagebind(sizes: ImageBindSizes, seed: int = 0,
                    modalities: tuple[str, ...] = MODALITIES) -> ImageBind:
    """Random weights with non-trivial norms (LayerNorm gains around 1, biases non-zero)."""
    torch.manual_seed(seed)
    model = ImageBind(sizes, modalities)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):          # every 1-D weight is a LayerNorm gain
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() >= 2 and "pos_embed" not in name and "cls_token" not in name:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)                     # unit-variance activations
            else:
                p.copy_(0.02 * noise if p.dim() else noise.abs())
    return model.eval()


def load_imagebind_state(model: ImageBind, state: dict) -> None:
    """Load the original checkpoint (or a part): keys of modalities the model does not
    build (text, or any left out) are dropped; everything else must match exactly."""
    built = set(model.modality_trunks.keys())
    keep = {k: v for k, v in state.items() if k.split(".")[1] in built}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    if missing or unexpected:
        raise KeyError(f"ImageBind checkpoint does not match: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")


class ModalityEncoder(nn.Module):
    """One clip -> embedding [B, out_dim] (trunk + head + L2 norm (+ logit scale))."""

    def __init__(self, model: ImageBind, use: str, scale: bool = True):
        super().__init__()
        self.model, self.modality, self.scale = model, model_modality(use), scale

    def forward(self, x):
        return self.model.embed(self.modality, x, scale=self.scale)


class AudioTokens(nn.Module):
    """BuboGPT's audio path per clip: trunk without head, each token L2-normalised over
    its width and scaled by the audio postprocessor (x20): [B, 1, 128, 204] -> [B, 229, 768]."""

    def __init__(self, model: ImageBind):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.modality_postprocessors["audio"](self.model.tokens("audio", x))


def make_encoder(model: ImageBind, use: str, family: str = "imagebind") -> nn.Module:
    if use == "audio_tokens":
        return AudioTokens(model)
    return ModalityEncoder(model, use, scale=model_modality(use) not in UNSCALED[family])


def imagebind_stage_specs(sizes: ImageBindSizes) -> dict[str, OnnxStageSpec]:
    """The ONNX stages as data: one per use, batch = clips (x crops) of one input."""
    specs = {}
    for use in ENCODER_USES:
        modality, name, shape = _INPUTS[use]
        if use == "audio_tokens":
            out = TensorSpec("tokens", ("batch", sizes.num_tokens("audio"), sizes.audio.width))
        else:
            out = TensorSpec("embedding", ("batch", sizes.out_dim))
        specs[use] = OnnxStageSpec(
            name=f"imagebind_{use}", file=f"imagebind_{use}.onnx",
            inputs=(TensorSpec(name, ("batch",) + shape(sizes)),), outputs=(out,),
            trace_batch=1, check_batch=3)
    return specs


def export_imagebind(model: ImageBind, uses, out_dir: Path,
                     log: Callable[[str], None] = print, family: str = "imagebind") -> dict:
    """Export and validate (onnxruntime vs PyTorch, batch 3 vs traced batch 1, <= 1e-4)
    each requested use; returns {use: {"file", "describe", "max_abs_diff", ...}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = imagebind_stage_specs(model.sizes)
    records = {}
    for use in uses:
        if use not in specs:
            raise ValueError(f"unknown ImageBind stage {use!r}; known: {ENCODER_USES}")
        if model_modality(use) not in model.modality_trunks:
            raise ValueError(f"stage {use!r} needs the {model_modality(use)} trunk, which this model lacks")
        spec = specs[use]
        result = export_and_validate(make_encoder(model, use, family).eval(), spec, out_dir, log)
        records[use] = {"file": spec.file, **spec.describe(), **result}
    return records


def embed_clips(model: ImageBind, use: str, clips: torch.Tensor, family: str = "imagebind") -> torch.Tensor:
    """The original forward on one input's clips [S, ...] -> [out] (or [229, 768] for
    audio_tokens): each clip encoded, then the mean over clips (`reduce_list`)."""
    with torch.no_grad():
        return make_encoder(model, use, family)(clips).mean(dim=0)
