"""ImageBind-huge as PyTorch modules, written from the original architecture.

Source of every fact: facebookresearch/ImageBind, imagebind/models/imagebind_model.py
(`ImageBindModel._create_modality_*`, `imagebind_huge`), multimodal_preprocessors.py
(`PatchEmbedGeneric`, `RGBDTPreprocessor`, `PadIm2Video`, `IMUPreprocessor`,
`SpatioTemporalPosEmbeddingHelper`), transformer.py (`SimpleTransformer`,
`BlockWithMasking`, `MultiheadAttention` = torch.nn.MultiheadAttention) and helpers.py
(`SelectElement`, `Normalize`, `LearnableLogitScaling`).

Module attribute names reproduce the original state-dict keys
(`modality_preprocessors.<m>...`, `modality_trunks.<m>...`, `modality_heads.<m>...`,
`modality_postprocessors.<m>...`), so the released `imagebind_huge.pth` loads into it
(text keys excepted: text is not built). The attention is written out batch-first with
nn.MultiheadAttention's parameter names and semantics (bias_k / bias_v appended to the
projected keys / values), which exports to plain ONNX MatMul / Softmax nodes.
Inputs have the fixed sizes of the release, so positional embeddings are never
interpolated (the original interpolates only when the token count differs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES = ("vision", "audio", "depth", "thermal", "imu")
# LayerNorm eps of the trunks' blocks, the vision pre-LN and every head (the stems'
# norm layers use nn.LayerNorm's default 1e-5).
LN_EPS = 1e-6
# Width of one attention head per trunk in imagebind_huge: vision 1280 / 16, audio 768 / 12,
# depth 384 / 8, thermal 768 / 12, imu 512 / 8.
HEAD_DIMS = {"vision": 80, "audio": 64, "depth": 48, "thermal": 64, "imu": 64}


@dataclass(frozen=True)
class TrunkSize:
    width: int
    depth: int
    heads: int


@dataclass(frozen=True)
class ImageBindSizes:
    """Widths and input geometry. `huge()` is the release; `tiny()` keeps the structure
    (and the real input shapes, hence the real token counts) at toy widths."""
    vision: TrunkSize
    audio: TrunkSize
    depth: TrunkSize
    thermal: TrunkSize
    imu: TrunkSize
    out_dim: int = 1024
    image_size: int = 224
    patch: int = 14              # vision Conv3d kernel (2, 14, 14)
    video_frames: int = 2        # PadIm2Video(ntimes=2); Conv3d time kernel 2
    mel_bins: int = 128
    audio_frames: int = 204      # audio_target_len
    audio_kernel: int = 16
    audio_stride: int = 10
    image_kernel: int = 16       # depth / thermal Conv2d kernel = stride
    imu_channels: int = 6
    imu_length: int = 2000
    imu_kernel: int = 8          # 6 channels x 8 samples = 48 features per token
    mlp_ratio: int = 4

    @staticmethod
    def huge() -> "ImageBindSizes":
        # imagebind_huge(): vision 1280 x 32 blocks, 16 heads; the others are
        # ImageBindModel.__init__ defaults (depth_num_heads=8, imu_num_heads=8).
        return ImageBindSizes(vision=TrunkSize(1280, 32, 16), audio=TrunkSize(768, 12, 12),
                              depth=TrunkSize(384, 12, 8), thermal=TrunkSize(768, 12, 12),
                              imu=TrunkSize(512, 6, 8))

    @staticmethod
    def tiny() -> "ImageBindSizes":
        """Two heads of the release's own head width per trunk (HEAD_DIMS), so the sizes
        read off a tiny checkpoint the same way as off imagebind_huge.pth."""
        two = {m: TrunkSize(2 * d, 2 if m in ("vision", "audio") else 1, 2) for m, d in HEAD_DIMS.items()}
        return ImageBindSizes(**two, out_dim=24)

    @staticmethod
    def from_state(state: dict, path="ImageBind checkpoint") -> "ImageBindSizes":
        """Trunk widths and depths read off an ImageBind state dict (original keys), heads
        from the release's head widths; the input geometry is the release's."""
        trunks = {}
        for m, head_dim in HEAD_DIMS.items():
            p = f"modality_trunks.{m}.blocks."
            if p + "0.attn.in_proj_weight" not in state:
                raise KeyError(f"{path}: no {m} trunk (modality_trunks.{m}.blocks.0.attn.in_proj_weight)")
            width = int(state[p + "0.attn.in_proj_weight"].shape[1])
            if width % head_dim:
                raise KeyError(f"{path}: {m} trunk width {width} is not a multiple of its head width {head_dim}")
            depth = len({k[len(p):].split(".")[0] for k in state if k.startswith(p)})
            trunks[m] = TrunkSize(width, depth, width // head_dim)
        return ImageBindSizes(**trunks, out_dim=int(state["modality_heads.vision.2.weight"].shape[0]))

    def trunk(self, modality: str) -> TrunkSize:
        return getattr(self, modality)

    def num_tokens(self, modality: str) -> int:
        """CLS + patches: vision 1 + 16*16 = 257; audio 1 + 12*19 = 229 (floor((128-16)/10)+1
        = 12 mel rows, floor((204-16)/10)+1 = 19 time columns); depth/thermal 1 + 14*14 = 197;
        imu 1 + 2000/8 = 251."""
        if modality == "vision":
            return 1 + (self.image_size // self.patch) ** 2
        if modality == "audio":
            rows = (self.mel_bins - self.audio_kernel) // self.audio_stride + 1
            cols = (self.audio_frames - self.audio_kernel) // self.audio_stride + 1
            return 1 + rows * cols
        if modality in ("depth", "thermal"):
            return 1 + (self.image_size // self.image_kernel) ** 2
        return 1 + self.imu_length // self.imu_kernel


class PadIm2Video(nn.Module):
    """[B, C, H, W] -> [B, C, T, H, W] by repeating the image T times; a 5-D input with
    T frames passes unchanged (original: pad_type="repeat", only when T == 1)."""

    def __init__(self, ntimes: int):
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x):
        if x.dim() == 4:
            x = x.unsqueeze(2).expand(-1, -1, self.ntimes, -1, -1)   # [B,C,H,W] -> [B,C,T,H,W]
        elif x.shape[2] == 1:
            x = x.expand(-1, -1, self.ntimes, -1, -1)
        return x


class PatchEmbed(nn.Module):
    """`PatchEmbedGeneric`: proj (a conv, or Sequential for vision), flatten, optional norm."""

    def __init__(self, proj: nn.Module, width: int | None):
        super().__init__()
        self.proj = proj
        self.norm_layer = nn.LayerNorm(width) if width else None

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)        # [B, D, (T), h, w] -> [B, (T)hw, D]
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbedding(nn.Module):
    """`SpatioTemporalPosEmbeddingHelper(learnable=True)`: one parameter `pos_embed`."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))


class PatchPreprocessor(nn.Module):
    """`RGBDTPreprocessor` / `AudioPreprocessor` / `ThermalPreprocessor`: stem, CLS, pos.
    The stem lives under `rgbt_stem` (vision, audio, thermal) or `depth_stem` (depth)."""

    def __init__(self, stem: PatchEmbed, tokens: int, width: int, stem_name: str = "rgbt_stem"):
        super().__init__()
        self.stem_name = stem_name
        setattr(self, stem_name, stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding_helper = PosEmbedding(tokens, width)

    def forward(self, x):
        tokens = getattr(self, self.stem_name)(x)                       # [B, N, D]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)            # [1, 1, D] -> [B, 1, D]
        tokens = torch.cat((cls, tokens), dim=1)                        # -> [B, 1 + N, D]
        return tokens + self.pos_embedding_helper.pos_embed


class IMUPreprocessor(nn.Module):
    """`IMUPreprocessor`: [B, 6, 2000] -> 250 tokens of 6 x 8 samples, Linear 48 -> D, LN."""

    def __init__(self, sizes: ImageBindSizes, width: int):
        super().__init__()
        self.kernel = sizes.imu_kernel
        self.imu_stem = PatchEmbed(nn.Linear(sizes.imu_channels * sizes.imu_kernel, width, bias=False), width)
        self.pos_embed = nn.Parameter(torch.zeros(1, sizes.num_tokens("imu"), width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))

    def forward(self, x):
        b, c, n = x.shape
        # original: unfold(-1, 8, 8).permute(0, 2, 1, 3) then reshape
        x = x.reshape(b, c, n // self.kernel, self.kernel)             # [B, 6, 2000] -> [B, 6, 250, 8]
        x = x.permute(0, 2, 1, 3).reshape(b, n // self.kernel, c * self.kernel)  # -> [B, 250, 48]
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(x))        # [B, 250, D]
        cls = self.cls_token.expand(b, -1, -1)
        return torch.cat((cls, tokens), dim=1) + self.pos_embed         # -> [B, 251, D]


class Attention(nn.Module):
    """nn.MultiheadAttention(embed_dim, num_heads, bias=True, add_bias_kv=...) as the
    original trunks use it (self-attention, no mask, no dropout at eval), batch-first."""

    def __init__(self, width: int, heads: int, add_bias_kv: bool):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, width))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, width))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x [B, N, D]
        if self.bias_k is not None:
            # torch appends bias_k / bias_v as one extra key / value position after in_proj
            k = torch.cat((k, self.bias_k.expand(b, 1, d)), dim=1)      # [B, N, D] -> [B, N+1, D]
            v = torch.cat((v, self.bias_v.expand(b, 1, d)), dim=1)
        q = q.reshape(b, n, h, d // h).transpose(1, 2)                  # [B, N, D] -> [B, h, N, D/h]
        k = k.reshape(b, -1, h, d // h).transpose(1, 2)                 # -> [B, h, M, D/h]
        v = v.reshape(b, -1, h, d // h).transpose(1, 2)
        attn = torch.softmax((q * (1.0 / math.sqrt(d // h))) @ k.transpose(-2, -1), dim=-1)  # [B, h, N, M]
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)               # [B, h, N, D/h] -> [B, N, D]
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """`BlockWithMasking`, layer_scale_type None: pre-norm attention and MLP residuals."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, add_bias_kv: bool):
        super().__init__()
        self.attn = Attention(width, heads, add_bias_kv)
        self.norm_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, mlp_ratio * width)
        self.norm_2 = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """`SimpleTransformer`: optional pre-LN (vision only), blocks; no final norm (the
    head's LayerNorm plays that role)."""

    def __init__(self, size: TrunkSize, mlp_ratio: int, pre_ln: bool, add_bias_kv: bool):
        super().__init__()
        # original: Sequential(LayerNorm | Identity, EinOpsRearrange) -> key index 0
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(size.width, eps=LN_EPS) if pre_ln else nn.Identity())
        self.blocks = nn.ModuleList(Block(size.width, size.heads, mlp_ratio, add_bias_kv) for _ in range(size.depth))

    def forward(self, tokens):
        x = self.pre_transformer_layer(tokens)
        for blk in self.blocks:
            x = blk(x)
        return x


class SelectElement(nn.Module):
    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[:, self.index, ...]                                   # [B, N, D] -> [B, D]


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """`LearnableLogitScaling(learnable=False)`: buffer log(scale), applied as
    min(exp(log_logit_scale), 100) * x."""

    def __init__(self, scale: float, max_scale: float = 100.0):
        super().__init__()
        self.max_scale = max_scale
        self.register_buffer("log_logit_scale", torch.ones([]) * math.log(scale))

    def forward(self, x):
        return torch.clamp(self.log_logit_scale.exp(), max=self.max_scale) * x


# Postprocessor scales (ImageBindModel._create_modality_postprocessors): vision none
# (Normalize only), audio 20, depth 5, thermal 10, imu 5.
LOGIT_SCALES = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}


def make_preprocessor(m: str, s: ImageBindSizes) -> nn.Module:
    w = s.trunk(m).width
    if m == "vision":
        t, p = s.video_frames, s.patch
        conv = nn.Conv3d(3, w, kernel_size=(t, p, p), stride=(t, p, p), bias=False)
        return PatchPreprocessor(PatchEmbed(nn.Sequential(PadIm2Video(t), conv), None), s.num_tokens(m), w)
    if m == "audio":
        conv = nn.Conv2d(1, w, kernel_size=s.audio_kernel, stride=s.audio_stride, bias=False)
        return PatchPreprocessor(PatchEmbed(conv, w), s.num_tokens(m), w)
    if m in ("depth", "thermal"):
        conv = nn.Conv2d(1, w, kernel_size=s.image_kernel, stride=s.image_kernel, bias=False)
        return PatchPreprocessor(PatchEmbed(conv, w), s.num_tokens(m), w,
                                 stem_name="depth_stem" if m == "depth" else "rgbt_stem")
    return IMUPreprocessor(s, w)


def make_head(m: str, s: ImageBindSizes) -> nn.Module:
    w = s.trunk(m).width
    layers = [nn.LayerNorm(w, eps=LN_EPS), SelectElement(0)]
    if m == "imu":
        layers.append(nn.Dropout(p=0.5))          # keeps the Linear at key index 3
    layers.append(nn.Linear(w, s.out_dim, bias=False))
    return nn.Sequential(*layers)


def make_postprocessor(m: str) -> nn.Module:
    if m not in LOGIT_SCALES:
        return Normalize()
    return nn.Sequential(Normalize(), LogitScale(LOGIT_SCALES[m]))


class ImageBind(nn.Module):
    """The non-text part of `ImageBindModel`, with its state-dict layout."""

    def __init__(self, sizes: ImageBindSizes, modalities: tuple[str, ...] = MODALITIES):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown ImageBind modalities {sorted(unknown)}; known: {MODALITIES}")
        self.sizes = sizes
        self.modality_preprocessors = nn.ModuleDict({m: make_preprocessor(m, sizes) for m in modalities})
        self.modality_trunks = nn.ModuleDict({
            # pre-LN only for vision; add_bias_kv for every trunk but vision
            m: Trunk(sizes.trunk(m), sizes.mlp_ratio, pre_ln=m == "vision", add_bias_kv=m != "vision")
            for m in modalities})
        self.modality_heads = nn.ModuleDict({m: make_head(m, sizes) for m in modalities})
        self.modality_postprocessors = nn.ModuleDict({m: make_postprocessor(m) for m in modalities})

    def tokens(self, modality: str, x):
        """Trunk output, no head: [B, N, D]."""
        return self.modality_trunks[modality](self.modality_preprocessors[modality](x))

    def embed(self, modality: str, x, scale: bool = True):
        """One clip -> [B, out_dim]: trunk, head, L2 norm, and (scale=True) the logit scale."""
        y = self.modality_heads[modality](self.tokens(modality, x))
        post = self.modality_postprocessors[modality]
        return post(y) if scale or not isinstance(post, nn.Sequential) else post[0](y)
