"""A tiny random-weight BuboGPT checkpoint in the source layout export/bubogpt.py reads.

    python -m scops.export.fixtures bubogpt-tiny OUT_DIR

Real structure, toy widths: EVA-style ViT (224x224, patch 14 -> 257 tokens, q/v biases
only) + ln_vision, a BLIP-2 Q-Former per modality (32 queries, cross-attention every 2nd
layer), the ImageBind audio modality (128x204 fbank -> 229 tokens, bias_kv attention, the
x20 postprocessor buffer), a Linear per modality and a LLaMA. Every tensor is saved under
the original BuboGPT state-dict name, text-only Q-Former tensors of the audio Q-Former
included (the original keeps them; the exporter must skip them).
"""
from __future__ import annotations

import json
from pathlib import Path

from .bundle import atomic_dir
from scops.runtime.templates import BUBOGPT, BUBOGPT_SYSTEM

from .bubogpt import ENC, JOIN, LLM_PREFIX, LN_VISION_PREFIX, VISION_PREFIX
from .fixtures import TinyShape, _configs, _randomize

# Width of the tiny audio trunk: ImageBindSizes.tiny().audio (32 wide, 2 blocks, 2 heads).
AUDIO_TRUNK = {"width": 32, "depth": 2, "heads": 2, "mel_bins": 128, "target_frames": 204, "kernel": 16, "stride": 10}
# Text the tokenizer should know: the system prompt and the media markup.
EXTRA_TEXT = (BUBOGPT_SYSTEM, *BUBOGPT["media"].values(), "###Human: ###Assistant:")
TEXT_VOCAB = 64               # rows of the (unused) text embedding kept in the audio Q-Former
TEXT_POSITIONS = 512          # BERT max_position_embeddings (LAVIS registers position_ids [1, 512])


def bubogpt_config(shape: TinyShape, n_vocab: int) -> dict:
    base = _configs(shape, n_vocab)
    audio_q = dict(base["qformer_config"], encoder_hidden_size=AUDIO_TRUNK["width"])
    return {"model_type": "bubogpt", "num_query_token": shape.queries, "vision_config": base["vision_config"],
            "ln_vision_eps": 1e-5, "qformer_config": base["qformer_config"], "audio_config": AUDIO_TRUNK,
            "audio_qformer_config": audio_q, "text_config": base["text_config"]}


def hf_to_eva(state: dict) -> tuple[dict, dict]:
    """HF Blip2VisionModel keys -> (EVA ViT keys, ln_vision keys); the fused qkv bias
    splits into q_bias and v_bias (EVA has no key bias)."""
    eva = {"cls_token": state["embeddings.class_embedding"], "pos_embed": state["embeddings.position_embedding"],
           "patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embedding.bias"]}
    names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in state.items():
        if not k.startswith("encoder.layers."):
            continue
        i, rest = k[len("encoder.layers."):].split(".", 1)
        sub, kind = rest.rsplit(".", 1)
        if sub == "self_attn.qkv" and kind == "bias":
            d = v.shape[0] // 3                                      # [3D] -> q [D], k [D], v [D]
            eva[f"blocks.{i}.attn.q_bias"], eva[f"blocks.{i}.attn.v_bias"] = v[:d], v[2 * d:]
        else:
            eva[f"blocks.{i}.{names[sub]}.{kind}"] = v
    return eva, {"weight": state["post_layernorm.weight"], "bias": state["post_layernorm.bias"]}


def hf_to_lavis_qformer(state: dict, query_tokens, text_path: bool, seed: int) -> dict:
    """HF Blip2QFormerModel keys -> SequenceGenericQFormer keys; text_path adds the tensors
    the query-only forward never reads (word/position embeddings, text FFN, LM head bias)."""
    import torch

    out = {"query_tokens": query_tokens,
           "Qformer.bert.embeddings.position_ids": torch.arange(TEXT_POSITIONS).expand(1, -1).contiguous()}
    for k, v in state.items():
        k = k.replace("layernorm.", "embeddings.LayerNorm.", 1) if k.startswith("layernorm.") else k
        k = k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                           ".crossattention.self.")
        out["Qformer.bert." + k] = v
    if text_path:
        gen = torch.Generator().manual_seed(seed)
        d = query_tokens.shape[-1]
        ffn = state["encoder.layer.0.intermediate_query.dense.weight"].shape[0]
        out["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(TEXT_VOCAB, d, generator=gen)
        out["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(TEXT_POSITIONS, d, generator=gen)
        out["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(ffn, d, generator=gen)
        out["Qformer.bert.encoder.layer.0.output.dense.weight"] = torch.randn(d, ffn, generator=gen)
        out["Qformer.bert.encoder.layer.0.output.LayerNorm.weight"] = torch.ones(d)
        out["Qformer.cls.predictions.bias"] = torch.zeros(TEXT_VOCAB)
    return out


def make_state(cfg: dict, seed: int) -> dict:
    """Every tensor of the tiny model under its original BuboGPT name."""
    import torch
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              LlamaConfig, LlamaForCausalLM)

    from .bubogpt import imagebind_sizes
    from .imagebind import build_imagebind

    torch.manual_seed(seed)
    d_q, n_embd = cfg["qformer_config"]["hidden_size"], cfg["text_config"]["hidden_size"]
    parts = torch.nn.ModuleDict({
        "vision": Blip2VisionModel(Blip2VisionConfig(**cfg["vision_config"])),
        "qformer": Blip2QFormerModel(Blip2QFormerConfig(**cfg["qformer_config"])),
        "audio_qformer": Blip2QFormerModel(Blip2QFormerConfig(**cfg["audio_qformer_config"])),
        "proj_vision": torch.nn.Linear(d_q, n_embd), "proj_audio": torch.nn.Linear(d_q, n_embd),
        "language_model": LlamaForCausalLM(LlamaConfig(**cfg["text_config"])),
    })
    queries = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(1, cfg["num_query_token"], d_q))
                                      for k in ("vision", "audio")})
    parts["queries"] = queries
    _randomize(parts, seed)
    audio = build_imagebind(imagebind_sizes(cfg), seed=seed + 1, modalities=("audio",))

    sd = {k: v.detach() for k, v in parts.state_dict().items()}
    sub = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
    eva, ln = hf_to_eva(sub("vision."))
    state = {VISION_PREFIX + k: v for k, v in eva.items()}
    state.update({LN_VISION_PREFIX + k: v for k, v in ln.items()})
    state.update({ENC + k: v.detach() for k, v in audio.state_dict().items()})
    for key, text_path in (("vision", False), ("audio", True)):
        q = hf_to_lavis_qformer(sub("qformer." if key == "vision" else "audio_qformer."),
                                sd[f"queries.{key}"], text_path, seed)
        state.update({f"{JOIN}modality_qformers.{key}.{k}": v for k, v in q.items()})
        for kind in ("weight", "bias"):
            state[f"{JOIN}modality_post_projectors.{key}.fc.{kind}"] = sd[f"proj_{key}.{kind}"]
    state.update({LLM_PREFIX + k: v for k, v in sub("language_model.").items()})
    return {k: v.contiguous().clone() for k, v in state.items()}


def build_bubogpt_tiny(out: Path, shape: TinyShape | None = None) -> Path:
    """Write the tiny checkpoint into `out` (atomically) and return it."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    from .spm import train_tokenizer

    shape = shape or TinyShape()
    with atomic_dir(out) as tmp:
        train_tokenizer(tmp, vocab_size=shape.vocab, extra_text=EXTRA_TEXT)
        n_vocab = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).get_piece_size()
        cfg = bubogpt_config(shape, n_vocab)
        save_file(make_state(cfg, shape.seed), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": "bubogpt", "shape": shape.__dict__}, indent=1))
    return Path(out)


def release_config(shape: TinyShape, n_vocab: int) -> dict:
    """Toy widths that keep the originals' head widths (EVA 88, BERT 64, ImageBind audio 64),
    one EVA block more than used (the 40-block file read by a 39-block ViT)."""
    from .fixtures_minigpt4 import EVA, QFORMER

    base = _configs(shape, n_vocab)
    audio = {"width": 128, "depth": 2, "heads": 2, "mel_bins": 128, "target_frames": 204, "kernel": 16, "stride": 10}
    return {"model_type": "bubogpt", "num_query_token": shape.queries, "vision_config": EVA, "ln_vision_eps": 1e-5,
            "qformer_config": QFORMER, "audio_config": audio,
            "audio_qformer_config": dict(QFORMER, encoder_hidden_size=audio["width"]),
            "text_config": base["text_config"]}


def build_bubogpt_release_tiny(out: Path, shape: TinyShape | None = None) -> Path:
    """The BuboGPT release as published: bubogpt_7b.pth ({'model': audio Q-Former + both
    post-projectors}), imagebind_huge.pth (flat, extra modalities' keys too), eva_vit_g.pth
    (fp16), blip2_pretrained_flant5xxl.pth ({'model': ...}), prerained_minigpt4_7b.pth (a
    llama_proj that bubogpt_7b.pth's vision projector overrides), vicuna/ (fp16 .bin shards)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .spm import train_tokenizer

    shape = shape or TinyShape()
    with atomic_dir(out) as tmp:
        vicuna = tmp / "vicuna"
        train_tokenizer(vicuna, vocab_size=shape.vocab, extra_text=EXTRA_TEXT)
        n_vocab = spm.SentencePieceProcessor(model_file=str(vicuna / "tokenizer.model")).get_piece_size()
        cfg = release_config(shape, n_vocab)
        state = make_state(cfg, shape.seed)
        take = lambda p: {k[len(p):]: v for k, v in state.items() if k.startswith(p)}  # noqa: E731

        imagebind = take(ENC)
        imagebind = {k: v for k, v in imagebind.items() if ".audio." in f".{k}"}
        imagebind["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.randn(24, 8)   # unread modalities
        torch.save(imagebind, tmp / "imagebind_huge.pth")
        torch.save({k: v.half() for k, v in take(VISION_PREFIX).items()}, tmp / "eva_vit_g.pth")
        blip2 = take(f"{JOIN}modality_qformers.vision.")
        blip2.update({"ln_vision." + k: v for k, v in take(LN_VISION_PREFIX).items()})
        blip2.update({"t5_proj.weight": torch.randn(64, cfg["qformer_config"]["hidden_size"]),
                      "t5_proj.bias": torch.zeros(64)})
        torch.save({"model": blip2}, tmp / "blip2_pretrained_flant5xxl.pth")
        proj = state[f"{JOIN}modality_post_projectors.vision.fc.weight"]
        torch.save({"model": {"llama_proj.weight": torch.randn_like(proj), "llama_proj.bias": torch.zeros(len(proj))}},
                   tmp / "prerained_minigpt4_7b.pth")
        bubo = {k: v for k, v in state.items()
                if k.startswith((f"{JOIN}modality_qformers.audio.", f"{JOIN}modality_post_projectors."))}
        torch.save({"model": bubo, "epoch": 1}, tmp / "bubogpt_7b.pth")
        llama = LlamaForCausalLM(LlamaConfig(**cfg["text_config"]))
        llama.load_state_dict(take(LLM_PREFIX))
        llama.half().save_pretrained(vicuna, safe_serialization=False, max_shard_size="300KB")
    return Path(out)
