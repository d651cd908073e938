"""Traceable GroundingDINO: every shape comes from the tensors, so one ONNX graph serves any
picture size and caption length.

SwinDetection is GroundingDINO's backbone/swin_transformer.py (the detection variant: pads
each stage to the window, pads odd sizes before patch merging, builds the shifted-window mask
from the padded size) under its original key names. GroundingDinoTraceable re-states
GroundingDinoModel.forward + GroundingDinoForObjectDetection's last-layer head around HF's
layers (text backbone, fusion / text-enhancer / deformable encoder layers, decoder layers,
contrastive class head, box MLPs), with the picture-size-dependent parts (spatial shapes,
reference points, two-stage proposals) computed from tensor shapes, and GroundingDINO's own
inverse_sigmoid. No padding mask: one picture, unpadded, as BuboGPT runs it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .groundingdino import INVERSE_SIGMOID_EPS


def inverse_sigmoid(x, eps: float = INVERSE_SIGMOID_EPS):
    """util/misc.py inverse_sigmoid."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ---- Swin (detection variant), original names --------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)          # [w*w, w*w, 2]
        index = (rel[..., 0] + window - 1) * (2 * window - 1) + rel[..., 1] + window - 1
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]                            # [bW, h, n, hd]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1)[None]              # [w*w, w*w, h] -> [1, h, n, n]
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.heads, n, n) + mask[None, :, None]  # [B, nW, h, n, n]
            attn = attn.reshape(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


def window_partition(x, w: int):
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)                                               # [B * nW, w*w, C]


def window_reverse(windows, w: int, h, wd):
    c = windows.shape[-1]
    x = windows.reshape(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)                                               # [B, H, W, C]


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, h, w, mask):
        b, _, c = x.shape
        ws = self.window
        y = self.norm1(x).reshape(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))                                  # zeros, as the original
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask if self.shift else None), ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))            # odd sizes padded
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))               # [B, H/2 * W/2, 2C]


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList([SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                                     for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def shift_mask(self, h, w, device):
        """BasicLayer.forward's attn_mask for the padded size, from tensor ops only."""
        ws, s = self.window, self.shift
        hp, wp = (h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws

        def region(n):                                  # slice(0,-ws) -> 0, (-ws,-s) -> 1, (-s,None) -> 2
            i = torch.arange(n, device=device)
            return (i >= n - ws).long() + (i >= n - s).long()
        ids = (region(hp)[:, None] * 3 + region(wp)[None, :]).float()           # [Hp, Wp]
        win = window_partition(ids[None, :, :, None], ws)[..., 0]               # [nW, ws*ws]
        diff = win[:, None, :] - win[:, :, None]
        return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))

    def forward(self, x, h, w):
        mask = self.shift_mask(h, w, x.device)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        p = self.patch
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        hh, ww = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), hh, ww                 # [B, C, h, w] -> [B, h*w, C]


class SwinDetection(nn.Module):
    def __init__(self, dim: int, depths, heads, window: int, out_indices, patch: int = 4):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(dim, patch)
        self.layers = nn.ModuleList([BasicLayer(dim * 2 ** i, d, heads[i], window, i < len(depths) - 1)
                                     for i, d in enumerate(depths)])
        self.num_features = [dim * 2 ** i for i in range(len(depths))]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, pixel_values):
        x, h, w = self.patch_embed(pixel_values)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x, nh, nw = layer(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2))   # [B, h*w, C] -> [B, C, h, w]
            h, w = nh, nw
        return outs


# ---- the detector -------------------------------------------------------------------------------
class GroundingDinoTraceable(nn.Module):
    def __init__(self, hf, swin: SwinDetection):
        super().__init__()
        from transformers.models.grounding_dino.modeling_grounding_dino import get_sine_pos_embed

        self.sine = get_sine_pos_embed
        self.swin = swin
        m = hf.model
        self.position_embedding = m.backbone.position_embedding
        del m.backbone                                      # replaced by self.swin
        self.model = m
        self.class_embed, self.bbox_embed = hf.class_embed, hf.bbox_embed
        self.config = hf.config
        # export check only (groundingdino.check_stage), never set while tracing: decode from
        # these encoder cells instead of the top-k, and keep the scores the top-k ranks
        self.seed_cells: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None

    def _levels(self, pixel_values):
        m = self.model
        feats = self.swin(pixel_values)
        srcs = [m.input_proj_vision[i](f) for i, f in enumerate(feats)]
        for level in range(len(srcs), self.config.num_feature_levels):
            srcs.append(m.input_proj_vision[level](feats[-1] if level == len(feats) else srcs[-1]))
        return srcs

    def forward(self, pixel_values, input_ids, token_type_ids, attention_mask, text_self_attention_masks,
                position_ids):
        m, cfg = self.model, self.config
        text_mask = attention_mask.bool()
        self_mask = text_self_attention_masks.bool()
        text = m.text_backbone(input_ids, self_mask, token_type_ids, position_ids, return_dict=True)
        text = m.text_projection(text.last_hidden_state)                           # [1, T, 768] -> [1, T, d]

        srcs = self._levels(pixel_values)
        flat, pos_flat, shapes, shape_list = [], [], [], []
        for level, src in enumerate(srcs):
            b, _, h, w = src.shape
            valid = torch.ones((b, h, w), dtype=torch.long, device=src.device)      # no padding
            pos = self.position_embedding(src, valid).to(src.dtype)
            flat.append(src.flatten(2).transpose(1, 2))                             # [B, d, h, w] -> [B, h*w, d]
            pos_flat.append(pos.flatten(2).transpose(1, 2) + m.level_embed[level].view(1, 1, -1))
            shapes.append(torch.stack([torch.as_tensor(h), torch.as_tensor(w)]))
            shape_list.append((h, w))
        vision = torch.cat(flat, 1)
        vision_pos = torch.cat(pos_flat, 1)
        spatial_shapes = torch.stack(shapes).long()                                 # [L, 2]
        level_start = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        n_levels = len(srcs)
        valid_ratios = torch.ones((vision.shape[0], n_levels, 2), dtype=vision.dtype, device=vision.device)
        pad_mask = torch.zeros(vision.shape[:2], dtype=torch.bool, device=vision.device)

        ref = self._encoder_reference_points(shape_list, vision)                    # [1, N, 2]
        ref = ref[:, :, None].expand(-1, -1, n_levels, -1)                          # [1, N, L, 2]
        for layer in m.encoder.layers:
            (vision, text), _ = layer(
                vision_features=vision, vision_position_embedding=vision_pos, spatial_shapes=spatial_shapes,
                spatial_shapes_list=shape_list, level_start_index=level_start, key_padding_mask=pad_mask,
                reference_points=ref, text_features=text, text_attention_mask=~text_mask,
                text_position_embedding=None, text_self_attention_masks=~self_mask, text_position_ids=position_ids)

        # two-stage: every encoder pixel proposes a box; the top num_queries seed the decoder
        proposals, valid = self._proposals(shape_list, vision)                      # [1, N, 4] (logit space)
        query = m.enc_output_norm(m.enc_output(vision.masked_fill(~valid, 0.0)))   # invalid cells zeroed
        enc_class = m.encoder_output_class_embed(query, text, text_mask)
        enc_coords = m.encoder_output_bbox_embed(query) + proposals
        scores = enc_class.max(-1)[0]                                               # [1, N]
        topk = torch.topk(scores, cfg.num_queries, dim=1)[1] if self.seed_cells is None else self.seed_cells
        if not torch.jit.is_tracing():
            self.last_scores = scores
        reference = torch.gather(enc_coords, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).sigmoid()
        target = m.query_position_embeddings.weight.unsqueeze(0).repeat(vision.shape[0], 1, 1)

        hidden, ref_in = self._decode(target, reference, vision, pad_mask, text, text_mask, spatial_shapes,
                                      shape_list, level_start, valid_ratios)
        logits = self.class_embed[-1](vision_hidden_state=hidden, text_hidden_state=text,
                                      text_token_mask=text_mask)
        boxes = (self.bbox_embed[-1](hidden) + inverse_sigmoid(ref_in)).sigmoid()
        # predict(): outputs["pred_logits"].sigmoid(), 0 past the caption; and each query's seed cell
        return logits.sigmoid(), boxes, topk

    @staticmethod
    def _grid(h, w, like):
        """Cell centres of an h x w map, normalised to 0-1, row-major: [h*w, 2] as (x, y)."""
        ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
        xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)

    def _encoder_reference_points(self, shape_list, like):
        """GroundingDinoEncoder.get_reference_points with valid ratios of 1."""
        return torch.cat([self._grid(h, w, like) for h, w in shape_list], 0)[None]

    def _proposals(self, shape_list, like):
        """generate_encoder_output_proposals without padding: centres + 0.05 * 2^level sizes,
        inverse-sigmoided, inf where a coordinate is outside (0.01, 0.99); and that validity
        (the encoder memory is zeroed at invalid cells before enc_output)."""
        props = []
        for level, (h, w) in enumerate(shape_list):
            grid = self._grid(h, w, like)
            props.append(torch.cat([grid, torch.full_like(grid, 0.05 * (2.0 ** level))], -1))
        p = torch.cat(props, 0)[None]                                               # [1, N, 4]
        valid = ((p > 0.01) & (p < 0.99)).all(-1, keepdim=True)
        p = torch.log(p / (1 - p))
        return p.masked_fill(~valid, float("inf")), valid

    def _decode(self, hidden, reference, vision, pad_mask, text, text_mask, spatial_shapes, shape_list,
                level_start, valid_ratios):
        """GroundingDinoDecoder.forward (eval, no intermediates kept) with the original inverse_sigmoid.
        Returns the normed last hidden state and the reference points the last layer read."""
        dec, cfg = self.model.decoder, self.config
        dtype = text.dtype
        text_attn = (~text_mask)[:, None, None, :].repeat(1, cfg.decoder_attention_heads, cfg.num_queries, 1)
        text_attn = text_attn.to(dtype) * torch.finfo(dtype).min
        ref_in = reference
        for idx, layer in enumerate(dec.layers):
            ref_in = reference
            points = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = dec.reference_points_head(self.sine(points[:, :, 0, :], num_pos_feats=cfg.d_model // 2))
            hidden = layer(hidden_states=hidden, position_embeddings=query_pos, reference_points=points,
                           spatial_shapes=spatial_shapes, spatial_shapes_list=shape_list,
                           level_start_index=level_start, vision_encoder_hidden_states=vision,
                           vision_encoder_attention_mask=~pad_mask,          # True: a real pixel
                           text_encoder_hidden_states=text,
                           text_encoder_attention_mask=text_attn, self_attn_mask=None)[0]
            reference = (dec.bbox_embed[idx](hidden) + inverse_sigmoid(reference)).sigmoid().detach()
        return dec.layer_norm(hidden), ref_in
