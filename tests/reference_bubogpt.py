"""The PyTorch reference pipeline of BuboGPT (magic-research/bubogpt), on the original key names.

Written from the original code, not from scops' exporter: the EVA ViT (bubogpt/models/
eva_vit.py) and the LAVIS Q-Former (bubogpt/models/Qformer.py, query-only path) are
functional forwards over the checkpoint's own tensors, so the exporter's key mapping onto
HF modules is checked, not shared. The audio trunk is the project's ImageBind reference
module; the prompt is eval_scripts/conversation.py's string; generation is HF `generate`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

SYSTEM = ("Give the following image: <Vision>ImageContent</Vision> or audio: <Audio>AudioContent</Audio>. "
          "You will be able to see the image/audio once I provide it to you. Please answer my questions.")
WRAP = {"image": "<Vision><ModalityHere></Vision>", "audio": "<Audio><ModalityHere></Audio>"}
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
EVA_EPS = 1e-6          # eva_vit.py: norm_layer=partial(nn.LayerNorm, eps=1e-6)
LN_VISION_EPS = 1e-5    # image_bind.py: LayerNorm(visual_encoder.num_features), torch default eps
BERT_EPS = 1e-12        # bert-base-uncased layer_norm_eps


def bubogpt_prompt(turns: list[tuple[list[str], str, str | None]]) -> str:
    """turns: [(media of the turn in upload order, question, answer or None)].

    Chat.upload_img / upload_aud append a Human message per medium; Chat.ask joins the
    question to the last one with a space (just_uploaded) or appends a new Human message;
    Conversation.get_prompt: system + "###" + "Role: content###" ..., the open turn "Assistant:".
    """
    messages = []
    for media, question, answer in turns:
        messages += [["Human", WRAP[m]] for m in media]
        if media:
            messages[-1][1] = " ".join([messages[-1][1], question])
        else:
            messages.append(["Human", question])
        messages.append(["Assistant", answer])
    text = SYSTEM + "###"
    for role, content in messages:
        text += f"{role}: {content}###" if content else f"{role}:"
    return text


def pixels(rgb: np.ndarray) -> torch.Tensor:
    """imagebind_vision_eval: Resize(224, bicubic) on PIL, CenterCrop(224), ToTensor, Normalize."""
    from PIL import Image
    img = Image.fromarray(rgb)
    w, h = img.size
    nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0      # [224,224,3] -> [3,224,224]
    return ((x - CLIP_MEAN) / CLIP_STD).unsqueeze(0)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, h, d // h).transpose(1, 2)                          # [B,N,D] -> [B,h,N,D/h]


def eva_vit(sd: dict, x: torch.Tensor, heads: int, patch: int = 14, depth: int | None = None) -> torch.Tensor:
    """VisionTransformer.forward_features (no final norm) then ln_vision: [B,3,224,224] -> [B,257,D].
    depth: the blocks the model builds (create_eva_vit_g: 39; load_state_dict(strict=False)
    leaves any further stored block unread); default: every stored block."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)                                            # [B,D,16,16] -> [B,256,D]
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, d = x.shape
    depth = depth or len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], EVA_EPS)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], bias).chunk(3, dim=-1)
        q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        a = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, d)                            # [B,h,N,D/h] -> [B,N,D]
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], EVA_EPS)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (d,), sd["ln_vision.weight"], sd["ln_vision.bias"], LN_VISION_EPS)


def _bert_attention(sd: dict, p: str, x: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """BertAttention: self (query/key/value) + output (dense, residual, LayerNorm)."""
    lin = lambda t, n: F.linear(t, sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
    q = _heads(lin(x, "self.query"), heads)
    k, v = _heads(lin(kv, "self.key"), heads), _heads(lin(kv, "self.value"), heads)   # kv: self or encoder
    a = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    ctx = (a @ v).transpose(1, 2).reshape(x.shape)
    return F.layer_norm(lin(ctx, "output.dense") + x, (x.shape[-1],), sd[p + "output.LayerNorm.weight"],
                        sd[p + "output.LayerNorm.bias"], BERT_EPS)


def lavis_qformer(sd: dict, enc: torch.Tensor, heads: int, cross_freq: int = 2) -> torch.Tensor:
    """SequenceGenericQFormer.forward: Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=enc)."""
    p = "Qformer.bert."
    x = sd["query_tokens"].expand(enc.shape[0], -1, -1)
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"], BERT_EPS)
    layers = len({k.split(".")[4] for k in sd if k.startswith(p + "encoder.layer.")})   # Qformer.bert.encoder.layer.<i>
    for i in range(layers):
        lp = f"{p}encoder.layer.{i}."
        x = _bert_attention(sd, lp + "attention.", x, x, heads)
        if i % cross_freq == 0:                                                 # cross-attention every 2nd layer
            x = _bert_attention(sd, lp + "crossattention.", x, enc, heads)
        h = F.gelu(F.linear(x, sd[lp + "intermediate_query.dense.weight"], sd[lp + "intermediate_query.dense.bias"]))
        x = F.layer_norm(F.linear(h, sd[lp + "output_query.dense.weight"], sd[lp + "output_query.dense.bias"]) + x,
                         (d,), sd[lp + "output_query.LayerNorm.weight"], sd[lp + "output_query.LayerNorm.bias"],
                         BERT_EPS)
    return x


class BuboGPTReference:
    def __init__(self, ckpt):
        import sentencepiece as spm
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        from scops.export.bubogpt import imagebind_sizes
        from scops.export.imagebind_modules import ImageBind

        self.cfg = json.loads((ckpt / "config.json").read_text())
        sd = load_file(str(ckpt / "model.safetensors"))
        part = lambda p: {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)}  # noqa: E731
        self.eva = part("multimodal_encoder.modality_trunks.vision.")
        ln = part("multimodal_encoder.modality_postprocessors.vision.")
        self.eva.update({"ln_vision." + k: v for k, v in ln.items()})
        self.qformers = {m: part(f"multimodal_joiner.modality_qformers.{m}.") for m in ("vision", "audio")}
        self.proj = {m: part(f"multimodal_joiner.modality_post_projectors.{m}.fc.") for m in ("vision", "audio")}
        self.imagebind = ImageBind(imagebind_sizes(self.cfg), modalities=("audio",)).eval()
        self.imagebind.load_state_dict({k: v for k, v in part("multimodal_encoder.").items()
                                        if k.split(".")[1] == "audio"})
        self.lm = LlamaForCausalLM(LlamaConfig(**self.cfg["text_config"])).eval()
        self.lm.load_state_dict(part("llama_model."))
        self.sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))

    @torch.no_grad()
    def image_embeds(self, px: torch.Tensor) -> torch.Tensor:
        return eva_vit(self.eva, px, self.cfg["vision_config"]["num_attention_heads"])

    @torch.no_grad()
    def image_bridge(self, px: torch.Tensor) -> torch.Tensor:
        return lavis_qformer(self.qformers["vision"], self.image_embeds(px),
                             self.cfg["qformer_config"]["num_attention_heads"])

    @torch.no_grad()
    def audio_trunk(self, fbank: torch.Tensor) -> torch.Tensor:
        """with_head=False: the trunk's tokens, per clip: [S,1,128,204] -> [S,229,Da]."""
        return self.imagebind.tokens("audio", fbank)

    @torch.no_grad()
    def audio_bridge(self, fbank: torch.Tensor) -> torch.Tensor:
        """ImageBindModel.forward (postprocessor Normalize + x20 per token, mean over the S clips)
        then the audio Q-Former: [S,1,128,204] -> [1,32,Dq]."""
        tokens = self.imagebind.modality_postprocessors["audio"](self.audio_trunk(fbank))
        pooled = tokens.mean(dim=0, keepdim=True)                               # [S,229,Da] -> [1,229,Da]
        return lavis_qformer(self.qformers["audio"], pooled, self.cfg["audio_qformer_config"]["num_attention_heads"])

    def project(self, bridge: torch.Tensor, modality: str) -> torch.Tensor:
        p = self.proj["vision" if modality == "image" else modality]
        return F.linear(bridge, p["weight"], p["bias"])

    def rows(self, modality: str, x) -> torch.Tensor:
        """image: RGB uint8 array; audio: fbank [S,1,128,204] (runtime/media.py) -> [1,32,n_embd]."""
        if modality == "image":
            return self.project(self.image_bridge(pixels(x)), "image")
        return self.project(self.audio_bridge(torch.as_tensor(x)), "audio")

    def token_ids(self, prompt: str) -> list[list[int]]:
        """get_context_emb: split on <ModalityHere>, BOS only on the first segment."""
        return [([1] if i == 0 else []) + self.sp.encode(s) for i, s in enumerate(prompt.split("<ModalityHere>"))]

    @torch.no_grad()
    def generate(self, prompt: str, media_rows: list[torch.Tensor], max_new_tokens: int) -> list[int]:
        embed = self.lm.get_input_embeddings()
        segs = self.token_ids(prompt)
        assert len(segs) == len(media_rows) + 1, "placeholders and media differ"
        parts = []
        for i, ids in enumerate(segs):
            if i > 0:
                parts.append(media_rows[i - 1])
            parts.append(embed(torch.tensor([ids])))
        inputs = torch.cat(parts, dim=1)
        out = self.lm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               num_beams=1, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()


class BuboGPTReleaseReference(BuboGPTReference):
    """The same pipeline over the published files, assembled as MMGPT4.from_config loads
    them (mmgpt4_eval.yaml): imagebind_huge.pth (strict load of ImageBindModel), then the
    vision trunk replaced by create_eva_vit_g (eva_vit_g.pth, 39 blocks: all stored but the
    last) with ln_vision from blip2_pretrained_flant5xxl.pth (load_ln_params), the vision
    Q-Former from the same file (load_Qformer), the vision post-projector from
    prerained_minigpt4_7b.pth's llama_proj (replace_joiner_vision), and finally bubogpt_7b.pth's
    'model' over everything (load_state_dict(strict=False))."""

    def __init__(self, folder):
        import sentencepiece as spm
        from transformers import LlamaForCausalLM

        from scops.export.bubogpt import imagebind_sizes
        from scops.export.imagebind_modules import ImageBind

        load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
        f32 = lambda d: {k: v.float() for k, v in d.items()}                                   # noqa: E731
        blip2 = f32(load("blip2_pretrained_flant5xxl.pth")["model"])
        self.eva = f32(load("eva_vit_g.pth"))
        self.depth = len({k.split(".")[1] for k in self.eva if k.startswith("blocks.")}) - 1
        self.eva.update({"ln_vision.weight": blip2["ln_vision.weight"], "ln_vision.bias": blip2["ln_vision.bias"]})
        joiner = {"modality_qformers.vision." + k: v for k, v in blip2.items() if k.startswith(("Qformer.", "query"))}
        proj = f32(load("prerained_minigpt4_7b.pth")["model"])
        joiner.update({"modality_post_projectors.vision.fc.weight": proj["llama_proj.weight"],
                       "modality_post_projectors.vision.fc.bias": proj["llama_proj.bias"]})
        model_keys = {"multimodal_joiner." + k: v for k, v in joiner.items()}
        model_keys.update(f32(load("bubogpt_7b.pth")["model"]))                   # later files win
        part = lambda p: {k[len(p):]: v for k, v in model_keys.items() if k.startswith(p)}  # noqa: E731
        self.qformers = {m: part(f"multimodal_joiner.modality_qformers.{m}.") for m in ("vision", "audio")}
        self.proj = {m: part(f"multimodal_joiner.modality_post_projectors.{m}.fc.") for m in ("vision", "audio")}
        ib = f32(load("imagebind_huge.pth"))
        width = ib["modality_trunks.audio.blocks.0.attn.in_proj_weight"].shape[1]
        depth = len({k.split(".")[3] for k in ib if k.startswith("modality_trunks.audio.blocks.")})
        q_heads = self.qformers["vision"]["query_tokens"].shape[-1] // 64
        self.cfg = {"vision_config": {"num_attention_heads": self.eva["cls_token"].shape[-1] // 88},
                    "qformer_config": {"num_attention_heads": q_heads},
                    "audio_qformer_config": {"num_attention_heads": q_heads},
                    "audio_config": {"width": width, "depth": depth, "heads": width // 64}}
        self.imagebind = ImageBind(imagebind_sizes(self.cfg), modalities=("audio",)).eval()
        missing, _ = self.imagebind.load_state_dict({k: v for k, v in ib.items() if k.split(".")[1] == "audio"},
                                                    strict=False)
        assert all(k.startswith("modality_heads.") for k in missing), missing    # with_bind_head=False
        self.lm = LlamaForCausalLM.from_pretrained(folder / "vicuna", torch_dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "vicuna" / "tokenizer.model"))

    @torch.no_grad()
    def image_embeds(self, px: torch.Tensor) -> torch.Tensor:
        return eva_vit(self.eva, px, self.cfg["vision_config"]["num_attention_heads"], depth=self.depth)
