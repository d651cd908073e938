"""RAM (Recognize Anything, Swin-L) as BuboGPT's tagger: picture -> the probability of every tag.

BuboGPT's tagging_model.py builds `ram(pretrained='checkpoints/ram_swin_large_14m.pth',
image_size=384, vit='swin_l')` and calls generate_tag. The release is `{'model': state_dict}`
under ram/models/ram.py's names (load_checkpoint_swinlarge renames `vision_multi` ->
`tagging_head` and drops relative_position_index / attn_mask buffers):
  visual_encoder.*      Swin-L (embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12)
  image_proj            Linear(1536 -> 512)
  label_embed           [4585, 512] (one row per tag)
  wordvec_proj          Linear(512 -> 768)
  tagging_head.encoder.layer.{0,1}.{crossattention.{self,output}, intermediate, output}
                        the Query2Label head: BERT layers whose self-attention was deleted
                        (del_selfattention), 4 heads, K/V from the 512-wide image tokens
  fc                    Linear(768 -> 1)
  tag_encoder.*, text_decoder.*   Tag2Text's captioning parts: unused by generate_tag
generate_tag: image_embeds = image_proj(swin(x)) where swin returns [avgpool, tokens]
(1 + 144 rows); label queries relu(wordvec_proj(label_embed)); two tagging layers; fc ->
logits [B, 4585]. This graph ends in sigmoid; the per-class thresholds (ram_tag_list_threshold.txt)
are applied by the runtime (runtime/tagger.py).

The Swin is HF SwinModel (same math as RAM's swin_transformer.py; HF splits qkv); the
tagging head is written here with RAM's own key names (no HF class has a cross-only BERT layer).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .onnx_stages import OnnxStageSpec, TensorSpec

# tagging_model.py: image_size 384, Resize((384, 384)), ImageNet mean/std
IMAGE_SIZE = 384
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# ram/configs/q2l_config.json: num_attention_heads 4, layer_norm_eps 1e-12, hidden_act gelu
HEAD_HEADS = 4
HEAD_EPS = 1e-12
# ram.py: class_threshold defaults to `threshold` = 0.68 before the threshold file overrides it
DEFAULT_THRESHOLD = 0.68
TAG_LIST = "ram_tag_list.txt"
THRESHOLDS = "ram_tag_list_threshold.txt"


def load_ram_checkpoint(path: Path) -> dict:
    """{'model': state} -> fp32 state with RAM's loader renames applied (vision_multi -> tagging_head)."""
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "label_embed" not in state:
        raise ValueError(f"{path}: not a RAM checkpoint (no 'model' dict holding label_embed)")
    return {k.replace("vision_multi", "tagging_head"): v.float() for k, v in state.items()
            if "relative_position_index" not in k and "attn_mask" not in k}


def ram_config(state: dict) -> dict:
    """Sizes read off the tensors."""
    vis = "visual_encoder."
    blocks: dict[int, int] = {}
    for k in state:
        if (m := re.match(r"visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k)):
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    depths = [blocks[i] for i in range(len(blocks))]
    heads = [int(state[f"{vis}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
             for i in range(len(depths))]
    table = int(state[f"{vis}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"tagging_head\.encoder\.layer\.(\d+)\.", k)))
    return {
        "swin": {"embed_dim": int(state[f"{vis}patch_embed.proj.weight"].shape[0]), "depths": depths,
                 "num_heads": heads, "window_size": (math.isqrt(table) + 1) // 2, "image_size": IMAGE_SIZE,
                 "patch_size": int(state[f"{vis}patch_embed.proj.weight"].shape[-1]), "mlp_ratio": 4.0,
                 "qkv_bias": True, "layer_norm_eps": 1e-5},
        "num_class": int(state["label_embed"].shape[0]),
        "label_width": int(state["label_embed"].shape[1]),
        "hidden": int(state["wordvec_proj.weight"].shape[0]),
        "layers": layers,
        "intermediate": int(state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0]),
    }


def swin_to_hf(state: dict) -> dict:
    """RAM's visual_encoder.* (microsoft Swin names) -> HF SwinModel names; qkv split in three."""
    out = {}
    pre = "visual_encoder."
    simple = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "patch_embed.norm": "embeddings.norm",
              "norm": "layernorm"}
    block = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
             "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for k, v in state.items():
        if not k.startswith(pre):
            continue
        k = k[len(pre):]
        base, _, kind = k.rpartition(".")
        if (m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", k)):
            out[f"encoder.layers.{m.group(1)}.blocks.{m.group(2)}.attention.self.relative_position_bias_table"] = v
        elif base in simple:
            out[f"{simple[base]}.{kind}"] = v
        elif (m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", base)):
            i, j, name = m.groups()
            dst = f"encoder.layers.{i}.blocks.{j}."
            if name == "attn.qkv":
                q, kk, vv = v.chunk(3, dim=0)                       # [3D, ...] -> 3 x [D, ...]
                for part, t in zip(("query", "key", "value"), (q, kk, vv)):
                    out[f"{dst}attention.self.{part}.{kind}"] = t
            elif name in block:
                out[f"{dst}{block[name]}.{kind}"] = v
            else:
                raise KeyError(f"RAM Swin: unexpected tensor visual_encoder.{k}")
        elif (m := re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction|norm)", base)):
            out[f"encoder.layers.{m.group(1)}.downsample.{m.group(2)}.{kind}"] = v
        else:
            raise KeyError(f"RAM Swin: unexpected tensor visual_encoder.{k}")
    return out


def _head_modules():
    import torch
    from torch import nn

    class Attention(nn.Module):          # ram/models/bert.py BertSelfAttention (cross: K/V from the image)
        def __init__(self, hidden: int, width: int, heads: int):
            super().__init__()
            self.heads = heads
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(width, hidden)
            self.value = nn.Linear(width, hidden)

        def forward(self, x, image):
            b, n, d = x.shape
            m = image.shape[1]
            hd = d // self.heads
            q = self.query(x).view(b, n, self.heads, hd).transpose(1, 2)        # [B, n, D] -> [B, h, n, hd]
            k = self.key(image).view(b, m, self.heads, hd).transpose(1, 2)      # [B, m, E] -> [B, h, m, hd]
            v = self.value(image).view(b, m, self.heads, hd).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
            return (att @ v).transpose(1, 2).reshape(b, n, d)                   # [B, h, n, hd] -> [B, n, D]

    class Output(nn.Module):             # BertSelfOutput / BertOutput: dense, residual, LayerNorm
        def __init__(self, d_in: int, d_out: int):
            super().__init__()
            self.dense = nn.Linear(d_in, d_out)
            self.LayerNorm = nn.LayerNorm(d_out, eps=HEAD_EPS)

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class CrossAttention(nn.Module):     # BertAttention(is_cross_attention=True)
        def __init__(self, hidden: int, width: int, heads: int):
            super().__init__()
            self.add_module("self", Attention(hidden, width, heads))
            self.output = Output(hidden, hidden)

        def forward(self, x, image):
            return self.output(self._modules["self"](x, image), x)

    class Intermediate(nn.Module):
        def __init__(self, hidden: int, inner: int):
            super().__init__()
            self.dense = nn.Linear(hidden, inner)

        def forward(self, x):
            return nn.functional.gelu(self.dense(x))                            # BERT "gelu": erf form

    class Layer(nn.Module):              # BertLayer.forward(mode='tagging'): cross-attention, then FFN
        def __init__(self, hidden: int, width: int, heads: int, inner: int):
            super().__init__()
            self.crossattention = CrossAttention(hidden, width, heads)
            self.intermediate = Intermediate(hidden, inner)
            self.output = Output(inner, hidden)

        def forward(self, x, image):
            x = self.crossattention(x, image)
            return self.output(self.intermediate(x), x)

    class Encoder(nn.Module):
        def __init__(self, layers: int, **kw):
            super().__init__()
            self.layer = nn.ModuleList([Layer(**kw) for _ in range(layers)])

    class TaggingHead(nn.Module):
        def __init__(self, layers: int, **kw):
            super().__init__()
            self.encoder = Encoder(layers, **kw)

        def forward(self, queries, image):
            for layer in self.encoder.layer:
                queries = layer(queries, image)
            return queries

    return TaggingHead


def build_ram(path: Path):
    """The checkpoint as a torch module: pixel_values [B, 3, 384, 384] -> tag probabilities [B, C]."""
    import torch
    from torch import nn
    from transformers import SwinConfig, SwinModel

    state = load_ram_checkpoint(path)
    cfg = ram_config(state)
    TaggingHead = _head_modules()

    class Ram(nn.Module):
        def __init__(self):
            super().__init__()
            conf = SwinConfig(**cfg["swin"])
            conf._attn_implementation = "eager"
            self.visual_encoder = SwinModel(conf, add_pooling_layer=True)
            width = self.visual_encoder.num_features
            self.image_proj = nn.Linear(width, cfg["label_width"])
            self.label_embed = nn.Parameter(torch.zeros(cfg["num_class"], cfg["label_width"]))
            self.wordvec_proj = nn.Linear(cfg["label_width"], cfg["hidden"])
            self.tagging_head = TaggingHead(cfg["layers"], hidden=cfg["hidden"], width=cfg["label_width"],
                                            heads=HEAD_HEADS, inner=cfg["intermediate"])
            self.fc = nn.Linear(cfg["hidden"], 1)

        def forward(self, pixel_values):
            out = self.visual_encoder(pixel_values)
            # swin_transformer.py forward: cat([avgpool(norm(x)), norm(x)]) -> [B, 1 + 144, 1536]
            tokens = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)
            image = self.image_proj(tokens)                                        # [B, 145, 512]
            labels = torch.relu(self.wordvec_proj(self.label_embed))              # [C, 768]
            queries = labels[None].expand(pixel_values.shape[0], -1, -1)         # [C, 768] -> [B, C, 768]
            logits = self.fc(self.tagging_head(queries, image)).squeeze(-1)       # [B, C, 1] -> [B, C]
            return torch.sigmoid(logits)

    model = Ram()
    missing, unexpected = model.visual_encoder.load_state_dict(swin_to_hf(state), strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]   # recomputed, as RAM's loader
    if missing or unexpected:
        raise KeyError(f"RAM Swin weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    head = {k: v for k, v in state.items() if k.startswith(("image_proj.", "label_embed", "wordvec_proj.",
                                                            "tagging_head.", "fc."))}
    missing, unexpected = model.load_state_dict(dict(head), strict=False)
    missing = [k for k in missing if not k.startswith("visual_encoder.")]
    if missing or unexpected:
        raise KeyError(f"RAM head weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval(), cfg


def read_tag_files(folder: Path, n_class: int) -> dict:
    """ram_tag_list.txt (one tag a line, read with splitlines as ram.py does) and
    ram_tag_list_threshold.txt (one float a line) -> {"tags": [...], "thresholds": [...]}."""
    tag_file, thr_file = folder / TAG_LIST, folder / THRESHOLDS
    for f in (tag_file, thr_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (RAM's tag list files ship in its repository's ram/data/)")
    tags = tag_file.read_text(encoding="utf-8").splitlines()
    thresholds = [float(s.strip()) for s in thr_file.read_text(encoding="utf-8").splitlines() if s.strip()]
    if len(tags) != n_class:
        raise ValueError(f"{tag_file}: {len(tags)} tags, the checkpoint has {n_class} classes")
    full = [DEFAULT_THRESHOLD] * n_class                  # ram.py: thresholds override the 0.68 default
    for i, t in enumerate(thresholds[:n_class]):
        full[i] = t
    return {"tags": tags, "thresholds": full}


def stage_spec(cfg: dict) -> OnnxStageSpec:
    return OnnxStageSpec("ram", "ram.onnx", (TensorSpec("pixel_values", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),),
                         (TensorSpec("tag_probs", ("batch", cfg["num_class"])),), check_batch=2)


def manifest_record(tags_file: str) -> dict:
    return {"op": "ram", "file": "ram.onnx", "size": IMAGE_SIZE, "mean": list(MEAN), "std": list(STD),
            "interpolation": "bilinear", "tags": tags_file}
