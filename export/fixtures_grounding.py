"""Tiny random-weight checkpoints of BuboGPT's grounding models, saved as their projects save them.

    python -m scops.export.fixtures grounding-tiny OUT_DIR

writes, under the published file names BuboGPT's app.py loads from checkpoints/:
  sam_vit_h_4b8939.pth        segment_anything's flat state dict (torch.save(sam.state_dict()))
  ram_swin_large_14m.pth      {'model': RAM state dict} (Swin buffers and Tag2Text parts included)
  ram_tag_list.txt, ram_tag_list_threshold.txt   RAM's tag list files (ram/data/)
  groundingdino_swint_ogc.pth {'model': state_dict} with DDP's 'module.' prefixes, shared box heads twice
  bert-base-uncased/          vocab.txt (bert-base-uncased's layout: [CLS] 101, [SEP] 102, '.' 1012,
                              '?' 1029) + config.json: the text encoder's tokenizer
Real structure at toy widths: SAM's windowed ViT with relative positions and global blocks,
its prompt encoder and two-way-transformer decoder; every tensor under its original name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .bundle import atomic_dir

SAM_FILE = "sam_vit_h_4b8939.pth"     # the file name app.py reads (tiny content)
RAM_FILE = "ram_swin_large_14m.pth"
GD_FILE = "groundingdino_swint_ogc.pth"
BERT_DIR = "bert-base-uncased"
# GroundingDINO at toy widths: Swin 16-32-64-128 (2 blocks a stage, window 7), d_model 32 with
# the real 8 heads and 4 levels x 4 points, 2 + 2 layers, 30 queries; a 2-layer BERT, 2 heads.
TINY_GD = {"swin": {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 7,
                    "out_indices": [1, 2, 3]},
           "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 512, "type_vocab_size": 2},
           "d_model": 32, "num_feature_levels": 4, "num_queries": 30, "encoder_layers": 2, "decoder_layers": 2,
           "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_n_points": 4, "decoder_n_points": 4}
# Words the tiny WordPiece vocabulary knows besides single letters (tags and planted answers).
WORDS = ("a", "an", "the", "on", "in", "of", "and", "is", "are", "with", "there", "two", "running", "runs",
         "sits", "next", "to", "near", "picture", "image", "shows", "brown", "white", "green", "big", "small",
         "dogs", "fields", "grassy", "bicycles", "men", "train", "passenger", "trains", "tracks", "coffee", "cup",
         "street", "scene", "people", "trees", "cats", "cars", "roads", "doghouse", "hotdog")
# A RAM at toy widths: Swin 8-16-32-64 wide, 2 blocks a stage (the second shifted), window 12 at
# 384 px as the real one; a 2-layer tagging head; a short tag list with real tag words.
TINY_RAM_SWIN = {"embed_dim": 8, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 12,
                 "image_size": 384, "patch_size": 4}
TINY_RAM_HEAD = {"label_width": 16, "hidden": 32, "layers": 2, "intermediate": 64}
TAGS = ("dog", "grass", "field", "bicycle", "man", "passenger train", "track", "red", "table", "coffee cup",
        "person", "street scene", "tree", "sky", "cat", "car", "road", "building", "water", "boat",
        "horse", "herd", "dust", "sandwich", "plate", "fork", "bacon", "bread", "fruit", "chair",
        "lamp", "window", "door", "flower", "bird", "mountain", "cloud", "beach", "sand", "wave")
# Thresholds: the first four tags always pass (> 0), the others never (> 1): the tiny model's
# random probabilities then give a fixed tag set, so end-to-end tests know their caption.
ALWAYS = 4
# A SAM at toy widths: 256 px input (16 x 16 grid), window 7 (the grid is padded to 21, as
# 64 pads to 70 at the real size), blocks 1 and 3 global, decoder with the real 8 heads.
TINY_SAM = {
    "vision": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": 256,
               "patch_size": 16, "global_attn_indexes": [1, 3], "window_size": 7, "mlp_dim": 64,
               "output_channels": 32, "num_pos_feats": 16},
    "prompt": {"hidden_size": 32, "image_size": 256, "patch_size": 16, "mask_input_channels": 16},
    "decoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 8, "mlp_dim": 64,
                "num_multimask_outputs": 3, "iou_head_hidden_dim": 32},
}

# HF SamModel name -> segment_anything name, in order (the inverse of export/sam.py's renames).
_HF_TO_SAM = (
    (r"^shared_image_embedding\..*", None),                                 # HF keeps a twin; SAM has one
    (r"(output_hypernetworks_mlps\.\d+)\.layers\.0\.", r"\1.layers.1."),
    (r"(output_hypernetworks_mlps\.\d+)\.proj_in\.", r"\1.layers.0."),
    (r"(output_hypernetworks_mlps\.\d+)\.proj_out\.", r"\1.layers.2."),
    (r"iou_prediction_head\.layers\.0\.", "iou_prediction_head.layers.1."),
    (r"iou_prediction_head\.proj_in\.", "iou_prediction_head.layers.0."),
    (r"iou_prediction_head\.proj_out\.", "iou_prediction_head.layers.2."),
    (r"mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"mask_embed\.conv1\.", "mask_downscaling.0."),
    (r"mask_embed\.layer_norm1\.", "mask_downscaling.1."),
    (r"mask_embed\.conv2\.", "mask_downscaling.3."),
    (r"mask_embed\.layer_norm2\.", "mask_downscaling.4."),
    (r"mask_embed\.conv3\.", "mask_downscaling.6."),
    (r"\.point_embed\.", ".point_embeddings."),
    (r"shared_embedding\.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"neck\.conv1\.", "neck.0."), (r"neck\.layer_norm1\.", "neck.1."),
    (r"neck\.conv2\.", "neck.2."), (r"neck\.layer_norm2\.", "neck.3."),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"^vision_encoder\.layers\.", "vision_encoder.blocks."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"\.layer_norm(\d|_final_attn)", r".norm\1"),
)


def hf_to_sam(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in _HF_TO_SAM:
            if re.search(pattern, key):
                if repl is None:
                    key = None
                    break
                key = re.sub(pattern, repl, key)
        if key is not None:
            out[key] = value
    return out


def make_sam_state(seed: int = 0, shape: dict = TINY_SAM) -> dict:
    """A random SAM (HF SamModel at the given sizes) under segment_anything's names."""
    import torch
    from transformers import SamConfig, SamModel

    from .fixtures import _randomize

    torch.manual_seed(seed)
    model = SamModel(SamConfig(vision_config=shape["vision"], prompt_encoder_config=shape["prompt"],
                               mask_decoder_config=shape["decoder"]))
    _randomize(model, seed)
    with torch.no_grad():       # SAM's Fourier features use a N(0, 1) matrix (scale 1.0): keep that
        gauss = torch.randn(model.shared_image_embedding.positional_embedding.shape,
                            generator=torch.Generator().manual_seed(seed))
        model.shared_image_embedding.positional_embedding.copy_(gauss)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(gauss)
    return {k: v.detach().clone().contiguous() for k, v in hf_to_sam(model.state_dict()).items()}


def write_sam(path: Path, seed: int = 0, shape: dict = TINY_SAM) -> Path:
    """As segment_anything's release: torch.save of the flat state dict."""
    import torch
    torch.save(make_sam_state(seed, shape), str(path))
    return path


# HF SwinModel name -> RAM's visual_encoder name (the inverse of export/ram.py's swin_to_hf)
_HF_TO_SWIN = (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^layernorm\.", "norm."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.", r"layers.\1.blocks.\2.attn."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.", r"layers.\1.blocks.\2.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.", r"layers.\1.blocks.\2.mlp.fc2."),
    (r"^encoder\.layers\.(\d+)\.downsample\.", r"layers.\1.downsample."),
)


def hf_to_swin(state: dict) -> dict:
    """HF SwinModel keys -> microsoft Swin keys (q, k, v fused back into qkv)."""
    import torch

    out = {}
    for key, value in state.items():
        if key.startswith("pooler"):
            continue
        for pattern, repl in _HF_TO_SWIN:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for key in [k for k in out if k.endswith(".attn.query.weight") or k.endswith(".attn.query.bias")]:
        base, kind = key.rsplit(".query.", 1)
        out[f"{base}.qkv.{kind}"] = torch.cat([out.pop(f"{base}.{p}.{kind}") for p in ("query", "key", "value")])
    return out


def make_ram_state(seed: int = 0, n_class: int = len(TAGS), swin_shape: dict = TINY_RAM_SWIN,
                   head_shape: dict = TINY_RAM_HEAD) -> dict:
    """A random RAM under ram.py's names, as its checkpoint holds it (buffers and Tag2Text parts too)."""
    import torch
    from transformers import SwinConfig, SwinModel

    from .fixtures import _randomize
    from .ram import HEAD_HEADS, _head_modules

    torch.manual_seed(seed)
    swin = SwinModel(SwinConfig(**swin_shape))
    head = _head_modules()(head_shape["layers"], hidden=head_shape["hidden"],
                           width=head_shape["label_width"], heads=HEAD_HEADS, inner=head_shape["intermediate"])
    width, label, hidden = swin.num_features, head_shape["label_width"], head_shape["hidden"]
    extra = torch.nn.ModuleDict({"image_proj": torch.nn.Linear(width, label),
                                 "wordvec_proj": torch.nn.Linear(label, hidden), "fc": torch.nn.Linear(hidden, 1)})
    parts = torch.nn.ModuleDict({"swin": swin, "head": head, "extra": extra})
    _randomize(parts, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {"visual_encoder." + k: v for k, v in hf_to_swin(swin.state_dict()).items()}
    for i, layer in enumerate(swin.encoder.layers):       # SwinTransformerBlock's attn_mask buffers
        for j, blk in enumerate(layer.blocks):
            ws = blk.window_size
            if blk.shift_size > 0:
                n_win = (blk.input_resolution[0] // ws) * (blk.input_resolution[1] // ws)
                state[f"visual_encoder.layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(n_win, ws * ws, ws * ws)
    state.update({"tagging_head." + k: v for k, v in head.state_dict().items()})
    state.update({k: v for k, v in extra.state_dict().items()})
    state["label_embed"] = torch.randn(n_class, label, generator=gen)
    # Tag2Text's captioning parts ride along in the release; generate_tag never reads them
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = torch.randn(hidden, hidden, generator=gen)
    state["text_decoder.cls.predictions.bias"] = torch.zeros(30524)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_ram(folder: Path, seed: int = 0, tags=TAGS, always: int = ALWAYS) -> Path:
    import torch
    torch.save({"model": make_ram_state(seed, len(tags))}, str(folder / RAM_FILE))
    (folder / "ram_tag_list.txt").write_text("\n".join(tags), encoding="utf-8")
    (folder / "ram_tag_list_threshold.txt").write_text(
        "\n".join("0.0" if i < always else "1.0" for i in range(len(tags))), encoding="utf-8")
    return folder / RAM_FILE


def bert_vocab(tags=TAGS, words=WORDS) -> list[str]:
    """A WordPiece vocabulary laid out as bert-base-uncased's: [PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, '.' 1012, '?' 1029; letters and ##letters so any word splits."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    known = {w for t in tags for w in t.lower().split()} | set(words)
    fill = [",", "!", "'", "-"] + [chr(c) for c in range(97, 123)] + [f"##{chr(c)}" for c in range(97, 123)]
    fill += sorted(known - set(fill))
    pinned = {1012: ".", 1029: "?"}
    while len(vocab) < 1030 or fill:
        i = len(vocab)
        vocab.append(pinned[i] if i in pinned else fill.pop(0) if fill else f"[unused{i}]")
    return vocab


def make_groundingdino_state(vocab_size: int, seed: int = 0, shape: dict = TINY_GD) -> dict:
    """A random GroundingDINO under the release's names, as groundingdino_swint_ogc.pth holds it."""
    import torch
    from transformers import GroundingDinoForObjectDetection

    from .fixtures import _randomize
    from .groundingdino import OUT_INDICES, hf_config, hf_to_groundingdino
    from .groundingdino_modules import SwinDetection

    torch.manual_seed(seed)
    cfg = dict(shape, text=dict(shape["text"], vocab_size=vocab_size))
    hf = GroundingDinoForObjectDetection(hf_config(cfg))
    sw = cfg["swin"]
    swin = SwinDetection(sw["embed_dim"], sw["depths"], sw["num_heads"], sw["window_size"], OUT_INDICES)
    parts = torch.nn.ModuleDict({"hf": hf, "swin": swin})
    _randomize(parts, seed)
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.backbone.")}
    state = hf_to_groundingdino(hf_state, swin.state_dict())
    gen = torch.Generator().manual_seed(seed + 2)
    d = cfg["text"]["hidden_size"]
    state["bert.pooler.dense.weight"] = torch.randn(d, d, generator=gen)     # BertModel's pooler rides along
    state["bert.pooler.dense.bias"] = torch.zeros(d)
    return {"module." + k: v.detach().clone().contiguous() for k, v in state.items()}


def write_groundingdino(folder: Path, seed: int = 0) -> Path:
    import torch

    bert = folder / BERT_DIR
    bert.mkdir(exist_ok=True)
    vocab = bert_vocab()
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (bert / "config.json").write_text(json.dumps(dict(TINY_GD["text"], model_type="bert", vocab_size=len(vocab))))
    torch.save({"model": make_groundingdino_state(len(vocab), seed)}, str(folder / GD_FILE))
    return folder / GD_FILE


def build_grounding_tiny(out: Path, seed: int = 0) -> Path:
    """A folder laid out like BuboGPT's checkpoints/ with tiny models (atomically)."""
    with atomic_dir(out) as tmp:
        write_sam(tmp / SAM_FILE, seed)
        write_ram(tmp, seed)
        write_groundingdino(tmp, seed)
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": "bubogpt-grounding", "seed": seed}))
    return Path(out)
