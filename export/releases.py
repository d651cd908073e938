"""The published files several families share, read as their authors wrote them.

- `eva_vit_g.pth` (LAVIS): a flat EVA ViT-g state dict, fp16, 40 blocks stored; BLIP-2
  models build 39 (`create_eva_vit_g(depth=39)` + `load_state_dict(strict=False)` ignores
  the last). Attention has `q_bias`/`v_bias` and no key bias: the fused qkv bias is
  cat(q_bias, 0, v_bias), as EVA's Attention builds it.
- `blip2_pretrained_flant5xxl.pth` (LAVIS): `{'model': sd}` with `query_tokens`,
  `ln_vision.*`, `Qformer.bert.*` (plus parts the query path never reads: the text
  embeddings, the text FFN, `Qformer.cls`, `t5_proj`, the T5 itself).
- a MiniGPT-4 stage-2 checkpoint: `{'model': {'llama_proj.weight', 'llama_proj.bias'}, ...}`.

Their sizes are read off the tensors, with the head widths the originals fix (EVA-g:
1408 / 16 = 88 per head; BERT-base: 768 / 12 = 64), so the same code reads the release
and the tiny fixtures written in its layout. Everything comes out under HF module keys
(`Blip2VisionModel`, `Blip2QFormerModel`), the modules the exporters trace.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from scops.runtime.errors import ExportError

from .checkpoints import read_state_dict

EVA_HEAD_DIM = 88            # create_eva_vit_g: num_heads = 1408 // 88
EVA_EPS = 1e-6               # norm_layer=partial(nn.LayerNorm, eps=1e-6)
EVA_DROPPED_BLOCKS = 1       # the file stores 40 blocks, BLIP-2's ViT-g builds 39
LN_VISION_EPS = 1e-5         # ln_vision = LayerNorm(1408): torch's default eps
BERT_HEAD_DIM = 64           # bert-base-uncased: 768 / 12
BERT_EPS = 1e-12
CROSS_ATTENTION_FREQ = 2     # cross_attention_freq=2: layers 0, 2, 4, ...
BLIP2_QFORMER_NAMES = ("blip2_pretrained_flant5xxl.pth",)

# LAVIS Qformer.bert keys the query-only path never reads: the text embeddings, the text FFN of
# every layer (intermediate / output; the queries use intermediate_query / output_query) and the
# LM head. MiniGPT-4 drops them (init_Qformer sets them to None); BuboGPT's audio Q-Former keeps them.
_TEXT_ONLY = re.compile(r"(cls\..*|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids).*"
                        r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\..*)")


def _need(state: dict, keys, path, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ExportError(f"{path}: not {what}: missing {', '.join(missing[:4])}"
                          f"{f' (+{len(missing) - 4} more)' if len(missing) > 4 else ''}")


def eva_config(eva: dict, path, dropped: int = EVA_DROPPED_BLOCKS) -> dict:
    """HF Blip2VisionConfig words for the EVA weights in `eva` (flat EVA keys)."""
    _need(eva, ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"), path,
          "an EVA ViT state dict")
    width = int(eva["cls_token"].shape[-1])
    patch = int(eva["patch_embed.proj.weight"].shape[-1])
    side = round((eva["pos_embed"].shape[1] - 1) ** 0.5)                 # 257 tokens -> 16 x 16 patches
    stored = len({k.split(".")[1] for k in eva if k.startswith("blocks.")})
    if width % EVA_HEAD_DIM or stored <= dropped or side * side + 1 != eva["pos_embed"].shape[1]:
        raise ExportError(f"{path}: EVA ViT of width {width}, {stored} blocks, {eva['pos_embed'].shape[1]} "
                          f"positions: not the ViT-g layout (width a multiple of {EVA_HEAD_DIM}, CLS + square grid)")
    return {"hidden_size": width, "intermediate_size": int(eva["blocks.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": stored - dropped, "num_attention_heads": width // EVA_HEAD_DIM,
            "image_size": side * patch, "patch_size": patch, "layer_norm_eps": EVA_EPS, "qkv_bias": True}


def eva_to_hf(eva: dict, ln: dict, layers: int) -> dict:
    """EVA ViT keys (first `layers` blocks) + ln_vision -> HF Blip2VisionModel keys."""
    import torch

    out = {"embeddings.class_embedding": eva["cls_token"], "embeddings.position_embedding": eva["pos_embed"],
           "embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"],
           "post_layernorm.weight": ln["weight"], "post_layernorm.bias": ln["bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in eva.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and int(m.group(1)) >= layers:
            continue
        if m and m.group(2) in names:
            out[f"encoder.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"] = v
        elif (m := re.fullmatch(r"blocks\.(\d+)\.attn\.q_bias", k)) and int(m.group(1)) < layers:
            v_bias = eva[f"blocks.{m.group(1)}.attn.v_bias"]
            out[f"encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat([v, torch.zeros_like(v_bias), v_bias])
    return out


def qformer_config(state: dict, path) -> dict:
    """HF Blip2QFormerConfig words for LAVIS Q-Former keys (`Qformer.bert.*`, `query_tokens`)."""
    _need(state, ("query_tokens", "Qformer.bert.embeddings.LayerNorm.weight",
                  "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
                  "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"), path, "a BLIP-2 Q-Former")
    p = "Qformer.bert.encoder.layer."
    hidden = int(state["query_tokens"].shape[-1])
    layers = len({k[len(p):].split(".")[0] for k in state if k.startswith(p)})
    if hidden % BERT_HEAD_DIM:
        raise ExportError(f"{path}: Q-Former width {hidden} is not a multiple of {BERT_HEAD_DIM} (BERT-base heads)")
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // BERT_HEAD_DIM,
            "intermediate_size": int(state[p + "0.intermediate_query.dense.weight"].shape[0]),
            "cross_attention_frequency": CROSS_ATTENTION_FREQ, "layer_norm_eps": BERT_EPS,
            "encoder_hidden_size": int(state[p + "0.crossattention.self.key.weight"].shape[1])}


def lavis_qformer_to_hf(state: dict) -> tuple[dict, object]:
    """SequenceGenericQFormer / Blip2Base keys (Qformer.bert.*, query_tokens) -> (HF
    Blip2QFormerModel state, query_tokens [1, Q, D]). Same math: LayerNorm(query_embeds),
    BERT layers with cross-attention every 2nd layer, the query FFN."""
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


def read_eva_vit_g(path: Path) -> dict:
    """eva_vit_g.pth -> its flat EVA state dict (fp32)."""
    return read_state_dict(path, "EVA ViT-g weights (LAVIS eva_vit_g.pth)")


def read_blip2(path: Path) -> dict:
    """blip2_pretrained_flant5xxl.pth -> {query_tokens, Qformer.bert.*, ln_vision.*} (fp32)."""
    sd = read_state_dict(path, "BLIP-2 Q-Former (LAVIS blip2_pretrained_flant5xxl.pth)")
    _need(sd, ("ln_vision.weight", "ln_vision.bias", "query_tokens"), path, "a BLIP-2 checkpoint")
    return {k: v for k, v in sd.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}


def read_llama_proj(path: Path) -> dict:
    """A MiniGPT-4 stage-2 checkpoint -> {'weight', 'bias'} of llama_proj."""
    sd = read_state_dict(path, "MiniGPT-4 stage-2 checkpoint")
    _need(sd, ("llama_proj.weight", "llama_proj.bias"), path, "a MiniGPT-4 stage-2 checkpoint")
    return {"weight": sd["llama_proj.weight"], "bias": sd["llama_proj.bias"]}


# ---- where the files are --------------------------------------------------------------
def find_release_file(folder: Path, names: tuple[str, ...], required: bool = True) -> Path | None:
    """The first of `names` present in `folder` (published names, exactly)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if required:
        raise ExportError(f"{folder}: none of {', '.join(names)} found (see `scops families` for the files "
                          "each family's export reads)")
    return None


def find_llm_folder(folder: Path, explicit: str | None = None) -> Path:
    """The LLaMA folder: --llm, else the one sub-folder of `folder` holding an HF LLaMA config."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: no config.json (--llm takes an HF LLaMA folder)")
        return path
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            cfg = json.loads((sub / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if cfg.get("model_type") == "llama":
            found.append(sub)
    if len(found) != 1:
        what = "no sub-folder" if not found else f"{len(found)} sub-folders ({', '.join(p.name for p in found)})"
        raise ExportError(f"{folder}: {what} holding an HF LLaMA model (config.json with model_type llama); "
                          "put the Vicuna / LLaMA-2 folder there or pass --llm DIR")
    return found[0]


def llama_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder}/config.json: unreadable ({e})") from None
    if cfg.get("model_type") != "llama":
        raise ExportError(f"{folder}: model_type {cfg.get('model_type')!r}; scops serves LLaMA/Vicuna")
    if not (folder / "tokenizer.model").is_file():
        raise ExportError(f"{folder}: tokenizer.model (sentencepiece) not found")
    return cfg


# The files a hub snapshot never needs: weights of other frameworks.
HUB_IGNORE = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite"]


def resolve_source(src: str, family=None) -> Path:
    """--from: a local folder, or a hub id resolved through huggingface_hub's cache (and
    downloaded when the hub is reachable). Offline and not cached: one error that lists
    the files the family's export reads and where to put them."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"{src}: a file; --from takes the folder that holds the release files (or a hub id)")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", src):
        raise ExportError(f"{src}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(src, ignore_patterns=HUB_IGNORE))
    except (LocalEntryNotFoundError, OSError) as e:
        reason = "not in the local Hugging Face cache and the hub cannot be reached"
        if not isinstance(e, LocalEntryNotFoundError):
            reason = f"the download failed ({str(e).splitlines()[0][:120]})"
    except (RepositoryNotFoundError, HFValidationError) as e:
        reason = f"the hub has no such repository ({str(e).splitlines()[0][:120]})"
    files = ""
    if family is not None:
        files = " Download the release and pass its folder instead: --from FOLDER, where FOLDER holds:\n" + \
                "\n".join(f"  - {r.describe()}" for r in family.release)
    raise ExportError(f"{src}: {reason}.{files}")
