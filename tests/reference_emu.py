"""PyTorch reference of Emu, written from the original (Emu1/models/*.py, inference.py,
pipeline.py), not from scops' runtime or exporter:

  - EVA-CLIP-g as eva_vit_model.py runs it (forward_features: every block, no final norm,
    qkv bias = cat(q_bias, 0, v_bias)) and ln_visual (eps 1e-6);
  - the Causal Transformer on HF's own T5 decoder stack (T5Stack, is_decoder) with the
    cross-attention K/V widened to the ViT width as Emu's modeling_t5.py does (encoder_width);
  - LLaMA by HF's LlamaForCausalLM; Emu-I's LoRA applied at run time as peft does
    (x W^T + (alpha/r) x A^T B^T), not merged;
  - the prompt tokenized as transformers 4.29-4.33's slow LlamaTokenizer did with Emu's added
    special tokens (split at them, whitespace stripped on both sides, each chunk encoded by
    sentencepiece on its own, BOS first);
  - Emu.generate with min_length=1 (greedy here), Emu.generate_image's loop (the batch of
    [prompt, ""], right-padded, re-run from scratch at every one of the 32 steps, hidden
    states of [IMG] and the <image> slots through stu_regress_head) and
    EmuGenerationPipeline.forward's sampling (diffusers' UNet, VAE and PNDMScheduler).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

IMAGE_SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the image "
                "after I provide it to you. Please answer my questions based on the given image.")
N_CAUSAL = 32
PLACEHOLDER = "[IMG]" + "<image>" * N_CAUSAL + "[/IMG]"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def process_img(rgb: np.ndarray) -> torch.Tensor:
    """Emu1/utils.py process_img: PIL resize to 224 (default filter), /255, mean/std, CHW."""
    from PIL import Image
    img = np.array(Image.fromarray(rgb).convert("RGB").resize((224, 224))) / 255.0
    img = (img - MEAN) / STD
    return torch.tensor(img).to(torch.float).permute(2, 0, 1).unsqueeze(0)


VIDEO_SYSTEM = ("You are a helpful assistant and you will be presented with a video consisting of multiple "
                "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I provide "
                "it to you. Please answer my questions based on the given video.")


def get_index(num_frames: int, num_segments: int) -> np.ndarray:
    """Emu1/utils.py get_index, as written there."""
    seg_size = float(num_frames - 1) / num_segments
    start = int(seg_size / 2)
    return np.array([start + int(np.round(seg_size * idx)) for idx in range(num_segments)])


def process_video(path) -> tuple[torch.Tensor, str, np.ndarray]:
    """Emu1/utils.py process_video with decord's VideoReader replaced by decoding every frame
    with PyAV in order (vr[k] = the k-th decoded frame): -> pixels [8, 3, 224, 224], the
    prompt's 8 placeholders, the full-size RGB frames picked."""
    import av
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picked = [frames[k] for k in get_index(len(frames), 8)]
    return torch.cat([process_img(f) for f in picked], dim=0), PLACEHOLDER * len(picked), np.stack(picked)


class EvaAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, mlp)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVisual(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        w, p = cfg["width"], cfg["patch_size"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, w, p, p)
        n = (cfg["image_size"] // p) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, w))
        self.blocks = nn.ModuleList([EvaBlock(w, w // cfg["head_width"], int(w * cfg["mlp_ratio"]))
                                     for _ in range(cfg["layers"])])

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


def t5_cformer(sd: dict):
    """HF's T5 decoder with Emu's cross-attention widths, holding cformer.cformer.* weights."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Stack

    p = "cformer.cformer."
    buckets, heads = sd[p + "block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner, d_model = sd[p + "block.0.layer.0.SelfAttention.q.weight"].shape
    enc = sd[p + "block.0.layer.1.EncDecAttention.k.weight"].shape[1]
    layers = len({k.split(".")[3] for k in sd if k.startswith(p + "block.")})
    cfg = T5Config(d_model=d_model, d_kv=inner // heads, num_heads=heads, num_layers=layers, num_decoder_layers=layers,
                   d_ff=sd[p + "block.0.layer.2.DenseReluDense.wi.weight"].shape[0], relative_attention_num_buckets=buckets,
                   relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="relu", is_decoder=True,
                   use_cache=False, vocab_size=sd[p + "embed_tokens.weight"].shape[0], layer_norm_epsilon=1e-6)
    cfg._attn_implementation = "eager"
    stack = T5Stack(cfg, nn.Embedding(cfg.vocab_size, d_model))
    for block in stack.block:
        att = block.layer[1].EncDecAttention
        att.k = nn.Linear(enc, inner, bias=False)
        att.v = nn.Linear(enc, inner, bias=False)
    stack.load_state_dict({k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)})
    return stack.eval()


def legacy_tokenize(sp, text: str, specials: dict) -> list[int]:
    """transformers 4.29 PreTrainedTokenizer.tokenize + LlamaTokenizer (slow, legacy): split at the
    special tokens, strip the text on both sides of each, drop empty chunks, sp-encode each chunk;
    BOS first."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    chunks = re.split(pattern, text)
    for i, c in enumerate(chunks):
        if c in specials:
            if i > 0:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if i + 1 < len(chunks):
                chunks[i + 1] = chunks[i + 1].lstrip()
    ids = [sp.bos_id()]
    for c in chunks:
        if not c:
            continue
        ids += [specials[c]] if c in specials else sp.encode(c)
    return ids


class EmuReference:
    def __init__(self, src: Path, kind: str):
        import sentencepiece as spm
        from transformers import LlamaConfig, LlamaForCausalLM

        path = src / ("Emu-instruct.pt" if kind == "instruct" else "pretrain/multimodal_encoder/pytorch_model.bin")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("module", sd)
        cfg = json.loads((src / "Emu-14B.json").read_text())
        self.visual = EvaVisual(cfg["vision_cfg"])
        self.visual.load_state_dict({k[7:]: v.float() for k, v in sd.items()
                                     if k.startswith("visual.") and not k.startswith(("visual.norm", "visual.head"))})
        self.ln_visual = nn.LayerNorm(cfg["vision_cfg"]["width"], eps=1e-6)
        self.ln_visual.load_state_dict({"weight": sd["ln_visual.weight"].float(), "bias": sd["ln_visual.bias"].float()})
        self.cformer = t5_cformer(sd)
        self.causal_tokens = sd["cformer.causal_tokens"].float()
        self.projection = nn.Linear(*sd["cformer.projection.weight"].shape[::-1])
        self.projection.load_state_dict({"weight": sd["cformer.projection.weight"].float(),
                                         "bias": sd["cformer.projection.bias"].float()})
        lm = {}
        for k, v in sd.items():
            for pre in ("decoder.lm.base_model.model.", "decoder.lm."):
                if k.startswith(pre):
                    lm[k[len(pre):]] = v.float()
                    break
        conf = json.loads((src / "llama_config" / "config.json").read_text())
        conf["vocab_size"] = lm["model.embed_tokens.weight"].shape[0]
        self.llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in conf.items() if k != "architectures"},
                                                  attn_implementation="eager")).eval()
        self.llama.load_state_dict({k: v for k, v in lm.items() if "lora_" not in k and "stu_regress" not in k})
        self.regress_head = nn.Linear(*lm["stu_regress_head.weight"].shape[::-1], bias=False)
        self.regress_head.weight.data.copy_(lm["stu_regress_head.weight"])
        for k, a in lm.items():                      # peft LoRA, alpha 16 (inference.py)
            if ".lora_A." in k:
                b = lm[k.replace(".lora_A.", ".lora_B.")]
                module = self.llama.get_submodule(k.split(".lora_A.")[0])
                module.register_forward_hook(lambda m, i, o, a=a, b=b: o + (16 / a.shape[0]) * (i[0] @ a.T @ b.T))
        self.sp = spm.SentencePieceProcessor(model_file=str(src / "llama_config" / "tokenizer.model"))
        n = self.sp.get_piece_size()
        names = ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"][:conf["vocab_size"] - n]
        self.specials = {t: n + i for i, t in enumerate(names)}
        self.specials.update({"<s>": self.sp.bos_id(), "</s>": self.sp.eos_id(), "<unk>": self.sp.unk_id()})
        self.eos = self.sp.eos_id()

    # ---- vision -----------------------------------------------------------------
    @torch.no_grad()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_visual(self.visual.forward_features(pixels))

    @torch.no_grad()
    def causal(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CausalFormer.forward before the projection: [B, 257, W] -> [B, 32, 768]."""
        q = self.causal_tokens.expand(image_embeds.shape[0], -1, -1)
        ones = torch.ones(q.shape[:-1], dtype=torch.long)
        return self.cformer(inputs_embeds=q, attention_mask=ones, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                            use_cache=False).last_hidden_state

    @torch.no_grad()
    def image_rows(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.causal(self.image_embeds(pixels)))

    # ---- chat -------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return legacy_tokenize(self.sp, text, self.specials)

    @torch.no_grad()
    def embed(self, ids: list[int], rows: torch.Tensor | None) -> torch.Tensor:
        ids_t = torch.tensor([ids])
        x = self.llama.get_input_embeddings()(ids_t)
        mask = ids_t == self.specials["<image>"]
        if rows is not None:
            x[mask] = rows.reshape(-1, rows.shape[-1])
        return x

    @torch.no_grad()
    def generate(self, prompt: str, rows: torch.Tensor | None, n: int) -> list[int]:
        """Greedy Emu.generate(min_length=1): EOS banned at the first new token, stop at EOS."""
        x = self.embed(self.tokenize(prompt), rows)
        out, past = [], None
        for i in range(n):
            res = self.llama(inputs_embeds=x, past_key_values=past, use_cache=True)
            past, logits = res.past_key_values, res.logits[0, -1]
            if i == 0:
                logits[self.eos] = -float("inf")
            tok = int(torch.argmax(logits))
            if tok == self.eos:
                break
            out.append(tok)
            x = self.llama.get_input_embeddings()(torch.tensor([[tok]]))
        return out

    # ---- generation -------------------------------------------------------------
    @torch.no_grad()
    def generate_image_embeds(self, texts: list[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Emu.generate_image: -> [len(texts), 32, D]; `rows` are the prompt pictures' rows, whose
        placeholders are already in the text."""
        image, boi, pad = self.specials["<image>"], self.specials["[IMG]"], self.specials["[PAD]"]
        target = None
        for k in range(N_CAUSAL):
            texts = [t + ("[IMG]" if k == 0 else "<image>") for t in texts]
            ids = [self.tokenize(t) for t in texts]
            width = max(map(len, ids))                          # padding="longest", right side
            attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
            x = self.llama.get_input_embeddings()(ids)
            is_img = ids == image
            from_right = torch.flip(torch.cumsum(torch.flip(is_img, dims=[1]), dim=1), dims=[1])
            if rows is not None:
                x[is_img & (from_right > k)] = rows.reshape(-1, rows.shape[-1])
            if target is not None:
                x[is_img & (from_right > 0) & (from_right <= k)] = target
            hidden = self.llama.model(inputs_embeds=x, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
            is_out = is_img | (ids == boi)
            from_right = torch.flip(torch.cumsum(torch.flip(is_out, dims=[1]), dim=1), dims=[1])
            target = self.regress_head(hidden[is_out & (from_right > 0) & (from_right <= k + 1)])
        return target.view(len(texts), -1, target.shape[-1])


@torch.no_grad()
def reference_picture(pretrain: Path, embeds: torch.Tensor, latents: np.ndarray, steps: int,
                      guidance: float) -> np.ndarray:
    """EmuGenerationPipeline.forward from the diffusion loop on: embeds [2, 32, D] (cond, uncond)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pretrain / "unet", low_cpu_mem_usage=False, use_safetensors=False).eval()
    vae = AutoencoderKL.from_pretrained(pretrain / "vae", low_cpu_mem_usage=False, use_safetensors=False).eval()
    scheduler = PNDMScheduler.from_pretrained(pretrain / "scheduler")
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents)
    for t in scheduler.timesteps:
        noise = unet(torch.cat([x] * 2), t, encoder_hidden_states=embeds).sample
        cond, uncond = noise.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    image = vae.decode(x / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (image[0] * 255).round().astype(np.uint8)
