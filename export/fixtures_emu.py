"""Tiny Emu release (`emu-tiny`) in the published layout (see export/emu_release.py):

  emu-tiny/Emu-14B.json, emu-tiny/llama_config/{config.json, tokenizer.model}   (code repo files)
  emu-tiny/Emu-instruct.pt                          {'module': state dict} of Emu-I, bf16, LoRA under
                                                    peft's names (lora_A.default / lora_B.default)
  emu-tiny/pretrain/multimodal_encoder/pytorch_model.bin   flat state dict of the pretrained Emu, bf16
  emu-tiny/pretrain/{unet,vae,scheduler}/           diffusers folders (UNet cross-attention width =
                                                    LLM width), SD 1.x's PNDM scheduler config

Every width is shrunk; the structure is the real one: EVA ViT at 224 with patch 14 (257 tokens,
every block, q_bias/v_bias, the unused `norm`/`head`), the T5 decoder with 32 causal queries,
32 relative-position buckets and cross-attention K/V from the ViT width, LLaMA with Emu's added
tokens after the sentencepiece pieces, `stu_regress_head`, and an 8x-downsampling VAE.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .bundle import atomic_dir
from .emu_release import ADDED_INSTRUCT, ADDED_PRETRAIN


@dataclass(frozen=True)
class EmuTinyShape:
    vision_width: int = 64
    vision_layers: int = 2
    head_width: int = 16          # 4 heads
    mlp_ratio: float = 2.0
    t5_width: int = 64
    t5_heads: int = 4
    t5_kv: int = 16
    t5_ff: int = 128
    t5_layers: int = 2
    t5_vocab: int = 100           # the unused embed_tokens
    queries: int = 32
    llm_width: int = 256          # Q4_K blocks (256) fit
    llm_layers: int = 2
    llm_heads: int = 4
    llm_ffn: int = 512
    llm_ctx: int = 1024
    vocab: int = 512
    lora_r: int = 16              # inference.py: r=16, alpha=16
    image_px: int = 64            # generation size of the decoder (latents image_px / 8)
    # UNet: block widths (the last without cross-attention), ResNet layers per block, head dim;
    # VAE decoder: block widths (4 blocks: 8x upsampling). Stable Diffusion 1.x: (320, 640, 1280,
    # 1280), 2, 8 heads (attention_head_dim 8), 32 groups; VAE (128, 256, 512, 512), 2, 32.
    unet_channels: tuple = (32, 64)
    unet_layers: int = 1
    vae_channels: tuple = (8, 16, 16, 16)
    vae_layers: int = 1
    norm_groups: int = 8
    instruct: bool = True         # also write Emu-instruct.pt
    seed: int = 0


# Stable Diffusion 1.x scheduler_config.json (the PNDM configuration diffusers pipelines ship).
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}


def _tensor(name: str, shape: tuple, gen, llm: bool):
    import torch

    if name.endswith("causal_tokens"):
        return 0.5 * torch.randn(shape, generator=gen)
    if len(shape) == 1:
        is_norm = any(k in name for k in ("norm", "layer_norm", "ln_visual")) and name.endswith("weight")
        return 1.0 + 0.1 * torch.randn(shape, generator=gen) if is_norm else 0.02 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    gain = 1.0
    if llm:             # as fixtures._gain: hot embeddings/head, cool blocks (decisive greedy picks)
        gain = 3.0 if ("embed_tokens" in name or "lm_head" in name) else 0.5
    if "relative_attention_bias" in name or "embed_tokens" in name and not llm:
        fan_in = 1
    return gain * torch.randn(shape, generator=gen) / fan_in ** 0.5


def _eva_shapes(s: EmuTinyShape) -> dict:
    w, mlp, n = s.vision_width, int(s.vision_width * s.mlp_ratio), (224 // 14) ** 2 + 1
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, n, w), "patch_embed.proj.weight": (w, 3, 14, 14),
              "patch_embed.proj.bias": (w,), "norm.weight": (w,), "norm.bias": (w,),
              "head.weight": (1024, w), "head.bias": (1024,)}
    for i in range(s.vision_layers):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                       b + "attn.q_bias": (w,), b + "attn.v_bias": (w,), b + "attn.proj.weight": (w, w),
                       b + "attn.proj.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                       b + "mlp.fc1.weight": (mlp, w), b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (w, mlp),
                       b + "mlp.fc2.bias": (w,)})
    return shapes


def _cformer_shapes(s: EmuTinyShape) -> dict:
    d, inner = s.t5_width, s.t5_heads * s.t5_kv
    shapes = {"cformer.embed_tokens.weight": (s.t5_vocab, d), "cformer.final_layer_norm.weight": (d,),
              "causal_tokens": (1, s.queries, d), "projection.weight": (s.llm_width, d),
              "projection.bias": (s.llm_width,),
              "cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, s.t5_heads)}
    for i in range(s.t5_layers):
        b = f"cformer.block.{i}.layer."
        for p in "qkvo":
            shapes[f"{b}0.SelfAttention.{p}.weight"] = (d, inner) if p == "o" else (inner, d)
        shapes[f"{b}1.EncDecAttention.q.weight"] = (inner, d)
        shapes[f"{b}1.EncDecAttention.k.weight"] = (inner, s.vision_width)
        shapes[f"{b}1.EncDecAttention.v.weight"] = (inner, s.vision_width)
        shapes[f"{b}1.EncDecAttention.o.weight"] = (d, inner)
        shapes.update({f"{b}0.layer_norm.weight": (d,), f"{b}1.layer_norm.weight": (d,),
                       f"{b}2.layer_norm.weight": (d,), f"{b}2.DenseReluDense.wi.weight": (s.t5_ff, d),
                       f"{b}2.DenseReluDense.wo.weight": (d, s.t5_ff)})
    return shapes


def _llama_shapes(s: EmuTinyShape, n_vocab: int) -> dict:
    w = s.llm_width
    shapes = {"model.embed_tokens.weight": (n_vocab, w), "model.norm.weight": (w,), "lm_head.weight": (n_vocab, w),
              "stu_regress_head.weight": (w, w)}
    for i in range(s.llm_layers):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (w,), b + "post_attention_layernorm.weight": (w,),
                       b + "self_attn.q_proj.weight": (w, w), b + "self_attn.k_proj.weight": (w, w),
                       b + "self_attn.v_proj.weight": (w, w), b + "self_attn.o_proj.weight": (w, w),
                       b + "mlp.gate_proj.weight": (s.llm_ffn, w), b + "mlp.up_proj.weight": (s.llm_ffn, w),
                       b + "mlp.down_proj.weight": (w, s.llm_ffn)})
    return shapes


def _state(s: EmuTinyShape, n_vocab: int, seed: int) -> dict:
    """A random `Emu` state dict with the original key names (bf16, as the release stores it)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, shapes, llm in (("visual.", _eva_shapes(s), False),
                                ("ln_visual.", {"weight": (s.vision_width,), "bias": (s.vision_width,)}, False),
                                ("cformer.", _cformer_shapes(s), False),
                                ("decoder.lm.", _llama_shapes(s, n_vocab), True)):
        for k, shape in shapes.items():
            sd[prefix + k] = _tensor(prefix + k, shape, gen, llm and "stu_regress_head" not in k).to(torch.bfloat16)
    return sd


def _instruct_state(pre: dict, s: EmuTinyShape, n_pieces: int, seed: int) -> dict:
    """Emu-I: the pretrained weights, two more token rows, the LLM wrapped by peft with LoRA."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    for k, v in pre.items():
        if k in ("decoder.lm.model.embed_tokens.weight", "decoder.lm.lm_head.weight"):
            v = torch.cat([v, (3.0 * torch.randn(2, v.shape[1], generator=gen) / v.shape[1] ** 0.5).to(v.dtype)])
        if k.startswith("decoder.lm."):
            k = "decoder.lm.base_model.model." + k[len("decoder.lm."):]
        out[k] = v
    w, r = s.llm_width, s.lora_r
    for i in range(s.llm_layers):
        for p in "qkvo":
            base = f"decoder.lm.base_model.model.model.layers.{i}.self_attn.{p}_proj"
            out[f"{base}.lora_A.default.weight"] = (torch.randn(r, w, generator=gen) / w ** 0.5).to(torch.bfloat16)
            out[f"{base}.lora_B.default.weight"] = (0.1 * torch.randn(w, r, generator=gen)).to(torch.bfloat16)
    assert out["decoder.lm.base_model.model.model.embed_tokens.weight"].shape[0] == n_pieces + len(ADDED_INSTRUCT)
    return out


def _diffusers(root: Path, s: EmuTinyShape, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    latent = s.image_px // 8
    n = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=s.unet_layers,
        block_out_channels=s.unet_channels, norm_num_groups=s.norm_groups, cross_attention_dim=s.llm_width,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=s.image_px, norm_num_groups=s.norm_groups,
        block_out_channels=s.vae_channels, down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels), layers_per_block=s.vae_layers,
        scaling_factor=0.18215)
    unet.save_pretrained(root / "unet", safe_serialization=False)
    vae.save_pretrained(root / "vae", safe_serialization=False)
    (root / "scheduler").mkdir()            # written as SD ships it (clip_sample is DDIM's, ignored by PNDM)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER, indent=1))


def build_emu_tiny(out: Path, shape: EmuTinyShape = EmuTinyShape()) -> Path:
    import sentencepiece as spm
    import torch

    from .spm import train_tokenizer

    s = shape
    with atomic_dir(out) as tmp:
        llama = tmp / "llama_config"
        train_tokenizer(llama, vocab_size=s.vocab)
        n_pieces = spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model")).get_piece_size()
        (llama / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.llm_width,
            "intermediate_size": s.llm_ffn, "num_attention_heads": s.llm_heads, "num_hidden_layers": s.llm_layers,
            "max_position_embeddings": s.llm_ctx, "rms_norm_eps": 1e-6, "vocab_size": n_pieces,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}, indent=1))
        (tmp / "Emu-14B.json").write_text(json.dumps({
            "embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": s.vision_layers, "width": s.vision_width,
                           "head_width": s.head_width, "mlp_ratio": s.mlp_ratio, "patch_size": 14,
                           "eva_model_name": "eva-clip-g-14-x"},
            "multimodal_cfg": {"name": "llama-13B", "n_causal": s.queries},
            "vladapter_cfg": {"name": "cformer", "n_causal": s.queries}}, indent=1))
        pre = _state(s, n_pieces + len(ADDED_PRETRAIN), s.seed)
        enc = tmp / "pretrain" / "multimodal_encoder"
        enc.mkdir(parents=True)
        torch.save(pre, enc / "pytorch_model.bin")
        if s.instruct:
            torch.save({"module": _instruct_state(pre, s, n_pieces, s.seed)}, tmp / "Emu-instruct.pt")
        del pre
        _diffusers(tmp / "pretrain", s, s.seed)
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": "emu", "shape": s.__dict__}, indent=1))
    return Path(out)
