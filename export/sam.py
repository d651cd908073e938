"""SAM (segment-anything) as BuboGPT's segmenter: an image encoder and a box-prompted decoder.

Published checkpoints (`sam_vit_h_4b8939.pth`, `sam_vit_l_0b3195.pth`, `sam_vit_b_01ec64.pth`)
are flat state dicts, `torch.save(sam.state_dict())`, under segment_anything's names:
  image_encoder.{pos_embed [1, S/16, S/16, D], patch_embed.proj, blocks.N.{norm1, attn.qkv,
      attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2}, neck.{0,1,2,3}}
  prompt_encoder.{pe_layer.positional_encoding_gaussian_matrix, point_embeddings.N,
      not_a_point_embed, mask_downscaling.{0,1,3,4,6}, no_mask_embed}
  mask_decoder.{transformer.layers.N.*, transformer.final_attn_token_to_image.*,
      transformer.norm_final_attn, iou_token, mask_tokens, output_upscaling.{0,1,3},
      output_hypernetworks_mlps.N.layers.{0,1,2}, iou_prediction_head.layers.{0,1,2}}
They are mapped onto HF `SamModel` (same math; its conversion renames these keys).

Every size is read off the tensors: width and patch from patch_embed, the input size from
pos_embed, the head width from rel_pos_h ([2 * window - 1, head_dim]), the global-attention
blocks from the blocks whose rel_pos_h spans the whole grid ([2 * S/16 - 1, head_dim]).
So ViT-B (12 blocks, globals 2,5,8,11), ViT-L and ViT-H (32 blocks, globals 7,15,23,31) all load.

Stages:
  sam_encoder.onnx  pixel_values [1, 3, S, S] (normalised, padded) -> image_embeddings [1, 256, S/16, S/16]
  sam_decoder.onnx  image_embeddings + boxes [N, 4] (xyxy in the S-frame) -> mask logits
                    [N, S/4, S/4] and iou [N]: one box per mask, multimask_output=False
"""
from __future__ import annotations

import re
from pathlib import Path

from .onnx_stages import OnnxStageSpec, TensorSpec

# build_sam.py: prompt_embed_dim 256, vit_patch_size 16, window 14, TwoWayTransformer(depth 2,
# mlp_dim 2048, num_heads 8), iou_head_depth 3; Sam pixel_mean / pixel_std (0-255 RGB).
DECODER_HEADS = 8
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# predictor.py: ResizeLongestSide(image_encoder.img_size); amg.remove_small_regions(mask, 400, "holes")
HOLE_AREA = 400
# build_sam.py's registry: which published variant a depth/width pair is.
VARIANTS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
# sam.py: mask_threshold = 0.0 (logits above it are foreground)
MASK_THRESHOLD = 0.0

# segment_anything name -> HF SamModel name (facts of HF's convert_sam_to_hf.py); applied in order.
_RENAMES = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)
_HYPER = re.compile(r"(.*output_hypernetworks_mlps\.\d+\.)layers\.(\d)(\..*)")
_HYPER_NAMES = {"0": "proj_in", "1": "layers.0", "2": "proj_out"}


def load_sam_checkpoint(path: Path) -> dict:
    """The published .pth (a flat state dict) -> {name: fp32 tensor}."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or "image_encoder.patch_embed.proj.weight" not in state:
        raise ValueError(f"{path}: not a segment-anything checkpoint (no image_encoder.patch_embed.proj.weight)")
    return {k: v.float() for k, v in state.items()}


def sam_config(state: dict) -> dict:
    """Architecture sizes read off the checkpoint's tensors (see the module doc)."""
    pe = state["image_encoder.patch_embed.proj.weight"]                 # [D, 3, P, P]
    width, patch = int(pe.shape[0]), int(pe.shape[-1])
    grid = int(state["image_encoder.pos_embed"].shape[1])               # [1, S/P, S/P, D]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]   # [2w - 1, head_dim]
    head_dim = int(rel[0].shape[1])
    globals_ = [i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1]
    windows = {int(r.shape[0] + 1) // 2 for i, r in enumerate(rel) if i not in globals_}
    dec_layers = 1 + max(int(m.group(1)) for k in state
                         if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k)))
    embed = int(state["prompt_encoder.no_mask_embed.weight"].shape[1])
    return {
        "variant": VARIANTS.get((width, depth), "custom"),
        "vision": {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": width // head_dim,
                   "image_size": grid * patch, "patch_size": patch, "global_attn_indexes": globals_,
                   "window_size": windows.pop() if windows else 14,
                   "mlp_dim": int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]),
                   "output_channels": int(state["image_encoder.neck.0.weight"].shape[0]),
                   "num_pos_feats": embed // 2},
        "prompt": {"hidden_size": embed, "image_size": grid * patch, "patch_size": patch,
                   "mask_input_channels": int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0])},
        "decoder": {"hidden_size": embed, "num_hidden_layers": dec_layers, "num_attention_heads": DECODER_HEADS,
                    "mlp_dim": int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
                    "num_multimask_outputs": int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
                    "iou_head_hidden_dim": int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])},
    }


def sam_to_hf(state: dict) -> dict:
    """segment_anything names -> HF SamModel names (the shared positional embedding twice)."""
    out = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):             # fixed constants, not weights
            continue
        for old, new in _RENAMES:
            if old in key:
                key = key.replace(old, new)
        if (m := _HYPER.fullmatch(key)):
            key = m.group(1) + _HYPER_NAMES[m.group(2)] + m.group(3)
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def build_sam(path: Path):
    """The checkpoint as an HF SamModel (strict load: every published tensor used, none missing)."""
    from transformers import SamConfig, SamModel

    state = load_sam_checkpoint(path)
    cfg = sam_config(state)
    config = SamConfig(vision_config=cfg["vision"], prompt_encoder_config=cfg["prompt"],
                       mask_decoder_config=cfg["decoder"])
    config._attn_implementation = "eager"
    model = SamModel(config)
    model.load_state_dict(sam_to_hf(state), strict=True)
    return model.eval(), cfg


def _modules():
    import torch

    class SamEncoder(torch.nn.Module):
        """Normalised, padded S x S picture -> image embeddings (SamPredictor.set_torch_image)."""

        def __init__(self, sam):
            super().__init__()
            self.vision_encoder = sam.vision_encoder

        def forward(self, pixel_values):
            return self.vision_encoder(pixel_values)[0]          # [1, 3, S, S] -> [1, 256, S/16, S/16]

    class SamBoxDecoder(torch.nn.Module):
        """Image embeddings + N boxes -> N low-res mask logits (predict_torch, multimask_output=False)."""

        def __init__(self, sam):
            super().__init__()
            self.sam = sam

        def forward(self, image_embeddings, boxes):
            out = self.sam(image_embeddings=image_embeddings, input_boxes=boxes[None], multimask_output=False)
            masks = out.pred_masks[0, :, 0]                     # [1, N, 1, S/4, S/4] -> [N, S/4, S/4]
            return masks, out.iou_scores[0, :, 0]               # [1, N, 1] -> [N]

    return SamEncoder, SamBoxDecoder


def build_encoder(path: Path):
    encoder, _ = _modules()
    return encoder(build_sam(path)[0]).eval()


def build_decoder(path: Path):
    _, decoder = _modules()
    return decoder(build_sam(path)[0]).eval()


def stage_specs(cfg: dict) -> dict[str, OnnxStageSpec]:
    size = cfg["vision"]["image_size"]
    grid = size // cfg["vision"]["patch_size"]
    ch = cfg["vision"]["output_channels"]
    emb = TensorSpec("image_embeddings", (1, ch, grid, grid))
    low = 4 * grid                                              # two 2x transposed convs: S/16 -> S/4
    return {
        "sam_encoder": OnnxStageSpec("sam_encoder", "sam_encoder.onnx",
                                     (TensorSpec("pixel_values", (1, 3, size, size)),), (emb,), check_batch=1),
        # "batch" here is the number of boxes: traced with 1, checked with 3
        "sam_decoder": OnnxStageSpec("sam_decoder", "sam_decoder.onnx",
                                     (emb, TensorSpec("boxes", ("batch", 4))),
                                     (TensorSpec("masks", ("batch", low, low)), TensorSpec("iou", ("batch",))),
                                     check_batch=3),
    }


def manifest_record(cfg: dict) -> dict:
    """The segmenter's entry in the manifest's grounding record."""
    return {"op": "sam", "encoder": "sam_encoder.onnx", "decoder": "sam_decoder.onnx", "variant": cfg["variant"],
            "size": cfg["vision"]["image_size"], "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD),
            "mask_threshold": MASK_THRESHOLD, "hole_area": HOLE_AREA}
