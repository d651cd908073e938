"""A tiny LEGO / GroundingGPT release, written as the originals write theirs:

    out/GroundingGPT/                  LEGOLlamaForCausalLM.save_pretrained (transformers 4.34, no
      config.json                      safetensors): model_type "LEGO", LlamaConfig + mm_* fields
      pytorch_model-0000N-of-00002.bin + pytorch_model.bin.index.json   (bf16: trained with --bf16)
      tokenizer.model, tokenizer_config.json, added_tokens.json, special_tokens_map.json
    out/clip-vit-large-patch14-336/    CLIPModel.save_pretrained (pytorch_model.bin, fp32) + preprocessor
    out/eva_vit_g.pth                  flat LAVIS EVA ViT-g state dict (fp16), one block more than used
    out/imagebind/imagebind_huge.pth   flat ImageBind state dict (fp32), as /ckpt/imagebind/ of the original

    python -m scops.export.fixtures lego-tiny OUT_DIR

Real structure, toy widths: CLIP at 336 px / patch 14 (576 patches) with its second-to-last
layer selected, the Linear-GELU-Linear projector, EVA (224 px -> 257 tokens, q/v biases),
the BLIP-2 Q-Former (32 queries, cross-attention every 2nd layer), the 2-layer video
(64 queries) and audio (8 queries) Q-Formers with cross-attention in every layer, the frame
(64) and clip (8) position tables, ImageBind's audio trunk with head and x20, a LLaMA with
the 9 added tokens after its sentencepiece pieces. The release holds the Q-Formers,
ln_vision and projections; the EVA and ImageBind encoders come from their own files.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .bundle import atomic_dir
from .fixtures import TinyShape, _configs, _randomize
from scops.runtime.templates import LEGO, LEGO_SYSTEM

from .lego import ADDED_TOKENS

RELEASE_DIR = "GroundingGPT"
CLIP_DIR = "clip-vit-large-patch14-336"
EXTRA_TEXT = (LEGO_SYSTEM, "###Human: ###Assistant:", LEGO["ground_prompt"],
              "A dog [0.12, 0.4, 0.55, 0.93] is on a sofa {0.09,0.15}.")
# Toy widths with the real head widths (the exporter derives head counts from them).
EVA = {"width": 176, "blocks_used": 2, "mlp": int(176 * 4.3637)}          # 2 heads of 88
QFORMER = {"width": 128, "ffn": 256, "layers": 2}                          # 2 heads of 64
CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
        "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 32}
AUDIO = {"width": 128, "depth": 2, "out_dim": 64}                          # 2 heads of 64
COUNTS = {"num_query_token": 32, "max_frame": 64, "video_token_len": 64, "sound_token_len": 8,
          "image_token_len": 576}


def _bert(width: int, encoder: int, layers: int, freq: int) -> dict:
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                intermediate_size=QFORMER["ffn"], cross_attention_frequency=freq, encoder_hidden_size=encoder,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)


def lego_config(shape: TinyShape, n_vocab: int, first_added: int, clip_width: int = CLIP["hidden_size"]) -> dict:
    """config.json as LEGOConfig.save_pretrained writes it (LlamaConfig fields + LEGO's)."""
    text = dict(_configs(shape, n_vocab)["text_config"], rms_norm_eps=1e-5)     # Vicuna v1.5's eps
    ids = {name: first_added + i for i, name in enumerate(ADDED_TOKENS)}
    return {
        "_name_or_path": "/ckpt/LEGO-7B", "architectures": ["LEGOLlamaForCausalLM"], "model_type": "LEGO",
        **{k: v for k, v in text.items() if k != "model_type"}, "hidden_act": "silu", "initializer_range": 0.02,
        "pretraining_tp": 1, "rope_scaling": None, "use_cache": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0", "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_hidden_size": clip_width,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": True,
        "mm_use_im_patch_token": True, "use_mm_vision_proj": True, "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None, **COUNTS,
        "video_patch_token": ids["<vi_patch>"], "video_start_token": ids["<vi_start>"],
        "video_end_token": ids["<vi_end>"], "sound_patch_token": ids["<so_patch>"],
        "sound_start_token": ids["<so_start>"], "sound_end_token": ids["<so_end>"],
    }


def _modules(cfg: dict, shape: TinyShape, seed: int, llm: bool = True):
    """Every trainable part under a scratch name (the LLM only when `llm`); widths from `cfg`."""
    import torch
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    llama = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                 "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
    q = QFORMER["width"]
    n_embd, d_clip = cfg["hidden_size"], cfg["mm_vision_hidden_size"]
    parts = torch.nn.ModuleDict({
        "eva": Blip2VisionModel(Blip2VisionConfig(
            hidden_size=EVA["width"], intermediate_size=EVA["mlp"], num_hidden_layers=EVA["blocks_used"] + 1,
            num_attention_heads=EVA["width"] // 88, image_size=224, patch_size=14, layer_norm_eps=1e-6,
            qkv_bias=True)),
        "qformer": Blip2QFormerModel(Blip2QFormerConfig(**_bert(q, EVA["width"], QFORMER["layers"], 2))),
        "video_qformer": Blip2QFormerModel(Blip2QFormerConfig(**_bert(q, q, 2, 1))),
        "audio_qformer": Blip2QFormerModel(Blip2QFormerConfig(**_bert(q, AUDIO["out_dim"], 2, 1))),
        "mm_vision_projector": torch.nn.Sequential(torch.nn.Linear(d_clip, n_embd), torch.nn.GELU(),
                                                   torch.nn.Linear(n_embd, n_embd)),
        "llama_proj": torch.nn.Linear(q, n_embd), "audio_llama_proj": torch.nn.Linear(q, n_embd),
    })
    tables = torch.nn.ParameterDict({
        "query_tokens": torch.nn.Parameter(torch.zeros(1, cfg["num_query_token"], q)),
        "video_query_tokens": torch.nn.Parameter(torch.zeros(1, cfg["video_token_len"], q)),
        "audio_query_tokens": torch.nn.Parameter(torch.zeros(1, cfg["sound_token_len"], q)),
        "video_frame_position_embedding": torch.nn.Parameter(torch.zeros(cfg["max_frame"], q)),
        "audio_position_embedding": torch.nn.Parameter(torch.zeros(cfg["sound_token_len"], AUDIO["out_dim"])),
    })
    parts["tables"] = tables
    if llm:
        parts["language_model"] = LlamaForCausalLM(LlamaConfig(**llama))
    _randomize(parts, seed)
    return parts


def release_state(parts, cfg: dict, seed: int) -> tuple[dict, dict]:
    """(the HF folder's state dict under LEGO's names, eva_vit_g.pth's flat dict)."""
    import torch

    from .fixtures_bubogpt import hf_to_eva, hf_to_lavis_qformer

    sd = {k: v.detach() for k, v in parts.state_dict().items()}
    sub = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
    state = {k: v for k, v in sub("language_model.").items()}          # model.* and lm_head.weight
    eva, ln = hf_to_eva(sub("eva."))
    state.update({f"model.ln_vision.{k}": v for k, v in ln.items()})
    for name, query, prefix in (("qformer", "query_tokens", "Qformer"),
                                ("video_qformer", "video_query_tokens", "video_Qformer"),
                                ("audio_qformer", "audio_query_tokens", "audio_Qformer")):
        lavis = hf_to_lavis_qformer(sub(name + "."), sd[f"tables.{query}"], False, seed)
        state[f"model.{query}"] = lavis.pop("query_tokens")
        state.update({f"model.{prefix}.{k[len('Qformer.'):]}": v for k, v in lavis.items()})
    for name in ("mm_vision_projector", "llama_proj", "audio_llama_proj"):
        state.update({f"model.{name}.{k}": v for k, v in sub(name + ".").items()})
    for name in ("video_frame_position_embedding", "audio_position_embedding"):
        state[f"model.{name}.weight"] = sd[f"tables.{name}"]
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    return state, {k: v.to(torch.float16).contiguous().clone() for k, v in eva.items()}


def save_bin_shards(state: dict, folder: Path, shards: int = 2) -> None:
    """What PreTrainedModel.save_pretrained(safe_serialization=False) writes for a sharded model."""
    import torch

    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, folder / file)
        weight_map.update({k: file for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_tokenizer(folder: Path, vocab: int) -> int:
    """Vicuna-style sentencepiece + the added tokens in LEGO's order -> the first added id
    (= the number of sentencepiece pieces)."""
    from transformers import LlamaTokenizer

    from .spm import train_tokenizer

    train_tokenizer(folder, vocab_size=vocab, extra_text=EXTRA_TEXT)
    tok = LlamaTokenizer.from_pretrained(str(folder), legacy=True)
    n = len(tok)
    for group in (ADDED_TOKENS[0:1], ADDED_TOKENS[1:3], ADDED_TOKENS[3:4], ADDED_TOKENS[4:6], ADDED_TOKENS[6:7],
                  ADDED_TOKENS[7:9]):
        tok.add_tokens(list(group), special_tokens=True)
    tok.pad_token = tok.unk_token                    # train.py
    tok.save_pretrained(str(folder))
    return n


def write_clip(folder: Path, seed: int, vision: dict | None = None) -> None:
    """A CLIPModel folder (vision tower `vision`, default the toy one; a toy text tower)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    vision = vision or CLIP
    conf = CLIPConfig(vision_config=vision, text_config={"hidden_size": 32, "intermediate_size": 64,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2,
                                                       "vocab_size": 99, "max_position_embeddings": 77},
                      projection_dim=vision["projection_dim"])
    model = CLIPModel(conf).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():                             # HF's init is near-constant; spread it out
        for name, p in model.vision_model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    model.save_pretrained(str(folder), safe_serialization=False)
    CLIPImageProcessor(size={"shortest_edge": vision["image_size"]},
                       crop_size={"height": vision["image_size"], "width": vision["image_size"]}).save_pretrained(str(folder))


def write_imagebind(path: Path, seed: int) -> None:
    import torch

    from .imagebind import build_imagebind
    from .imagebind_modules import ImageBindSizes, TrunkSize

    sizes = dataclasses.replace(ImageBindSizes.tiny(), audio=TrunkSize(AUDIO["width"], AUDIO["depth"],
                                                                      AUDIO["width"] // 64), out_dim=AUDIO["out_dim"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_imagebind(sizes, seed=seed, modalities=("vision", "audio")).state_dict(), path)


def build_lego_tiny(out: Path, shape: TinyShape | None = None) -> Path:
    """Write the tiny release into `out` (atomically); returns the HF folder (the export's --from)."""
    import torch

    shape = shape or dataclasses.replace(TinyShape(), llm_ctx=2048)
    with atomic_dir(out) as tmp:
        release = tmp / RELEASE_DIR
        first = write_tokenizer(release, shape.vocab)
        cfg = lego_config(shape, first + len(ADDED_TOKENS), first)
        state, eva = release_state(_modules(cfg, shape, shape.seed), cfg, shape.seed)
        save_bin_shards(state, release)
        (release / "config.json").write_text(json.dumps(cfg, indent=2))
        (release / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.34.0"}, indent=2))
        write_clip(tmp / CLIP_DIR, shape.seed + 1)
        torch.save(eva, tmp / "eva_vit_g.pth")
        write_imagebind(tmp / "imagebind" / "imagebind_huge.pth", shape.seed + 2)
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": "lego", "shape": shape.__dict__}, indent=1))
    return Path(out) / RELEASE_DIR
