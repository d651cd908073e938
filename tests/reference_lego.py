"""The PyTorch reference of LEGO / GroundingGPT (lzw-lzw/GroundingGPT), on the release's files.

Written from the original code, not from scops' exporter or runtime:
- image: mm_utils.load_image_square (expand2square with the processor's mean colour) and
  HF CLIPImageProcessor / CLIPVisionModel, as builder.py loads them from the CLIP folder;
  `hidden_states[mm_vision_select_layer][:, 1:]`, then mm_vision_projector (Sequential);
- video: every frame decoded in order (PyAV, no seeking; decord's index list), FFmpeg's
  bicubic 224 x 224 scale, the centre-crop scops uses in place of the random crop, then
  LEGO.encode_videoQformer_visual (EVA + ln_vision + Q-Former, frame positions, video
  Q-Former, llama_proj) with the functional EVA / LAVIS Q-Former of reference_bubogpt;
- audio: ImageBind's get_audio_feature (head, Normalize, x20) per clip, clip positions,
  the audio Q-Former, audio_llama_proj;
- prompt: conversation.py conv_lego + the blocks of gradio_web_server.py; token ids as
  transformers 4.34's fast Llama tokenizer makes them (added tokens split out, every text
  piece between them normalised on its own: "\u2581" prepended); the rows overwrite the
  <*_patch> positions; generation is HF greedy `generate` on inputs_embeds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reference_bubogpt import eva_vit, lavis_qformer

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
BLOCKS = {"image": ("<im_start>", "<im_patch>", "<im_end>"), "video": ("<vi_start>", "<vi_patch>", "<vi_end>"),
          "sound": ("<so_start>", "<so_patch>", "<so_end>")}
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def lego_prompt(turns: list[tuple[dict, str, str | None]]) -> str:
    """turns: [({modality: rows}, question, answer or None)]. gradio generate(): image block
    prepended first, then video, then sound (so sound ends up first), each + "\\n";
    conv_lego.get_prompt (SINGLE, sep "###")."""
    text = SYSTEM + "###"
    for media, q, a in turns:
        for m in ("image", "video", "sound"):
            if m in media:
                start, patch, end = BLOCKS[m]
                q = start + patch * media[m] + end + "\n" + q
        text += "Human: " + q + "###"
        text += "Assistant:" if a is None else "Assistant: " + a + "###"
    return text


def load_release(folder: Path) -> dict:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    sd = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(torch.load(folder / shard, map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def decode_all_frames(path, n: int = 64, size: int = 224) -> np.ndarray:
    """decord's load_video(n_frms=n, height=size, width=size, sampling="uniform"): every frame
    decoded in order, the uniform picks kept -> uint8 [T, size, size, 3]."""
    import av
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.reformat(width=size, height=size, format="rgb24", interpolation="BICUBIC").to_ndarray()
                  for f in c.decode(stream)]
        vlen = int(stream.frames) or len(frames)
    k = min(n, vlen)
    idx = np.arange(0, vlen, vlen / k).astype(int)[:k]
    return np.stack([frames[min(i, len(frames) - 1)] for i in idx])


def video_pixels(frames: np.ndarray, crop_area: float = 1.0) -> torch.Tensor:
    """[T,S,S,3] uint8 -> [T,3,S,S]: the centre crop of `crop_area` resized back (functional_video
    resized_crop: F.interpolate bicubic, align_corners=False), ToUint8, ToTensorVideo, Normalize."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()                # [T,S,S,3] -> [T,3,S,S]
    size = x.shape[-1]
    side = min(size, max(1, int(round(size * crop_area ** 0.5))))
    if side != size:
        off = (size - side) // 2
        x = F.interpolate(x[:, :, off:off + side, off:off + side], size=(size, size), mode="bicubic",
                          align_corners=False)
        x = x.clamp(0, 255).to(torch.uint8).float()
    return (x / 255.0 - CLIP_MEAN) / CLIP_STD


class LegoReference:
    def __init__(self, folder: Path):
        import sentencepiece as spm
        from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        from scops.export.imagebind_modules import ImageBind

        from scops.export.lego_modules import audio_sizes

        self.folder = Path(folder)
        self.cfg = json.loads((self.folder / "config.json").read_text())
        self.sd = load_release(self.folder)
        clip_dir = self.folder.parent / "clip-vit-large-patch14-336"
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir)
        self.clip = CLIPVisionModel.from_pretrained(clip_dir, attn_implementation="eager").eval()
        self.eva = torch.load(self.folder.parent / "eva_vit_g.pth", weights_only=True)
        n_blocks = len({k.split(".")[1] for k in self.eva if k.startswith("blocks.")})
        # create_eva_vit_g builds depth=39 of the 40 stored blocks: all but the last
        self.eva = {k: v.float() for k, v in self.eva.items()
                    if not k.startswith("blocks.") or int(k.split(".")[1]) < n_blocks - 1}
        self.eva.update({"ln_vision." + k: v for k, v in sub(self.sd, "model.ln_vision.").items()})
        ib = torch.load(self.folder.parent / "imagebind" / "imagebind_huge.pth", weights_only=True)
        ib = {k: v for k, v in ib.items() if k.split(".")[1] == "audio"}
        self.imagebind = ImageBind(audio_sizes(ib), modalities=("audio",)).eval()
        self.imagebind.load_state_dict(ib)
        llama = {k: self.cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size",
                                          "max_position_embeddings", "rms_norm_eps", "rope_theta")}
        self.lm = LlamaForCausalLM(LlamaConfig(**llama)).eval()
        self.lm.load_state_dict({k: v for k, v in self.sd.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                                   "model.norm", "lm_head"))})
        self.sp = spm.SentencePieceProcessor(model_file=str(self.folder / "tokenizer.model"))
        self.added = json.loads((self.folder / "added_tokens.json").read_text())

    # ---- image -------------------------------------------------------------------------
    def pixels(self, rgb: np.ndarray) -> torch.Tensor:
        """load_image_square + image_processor.preprocess -> [1, 3, 336, 336]."""
        from PIL import Image
        img = Image.fromarray(rgb)
        w, h = img.size
        color = tuple(int(x * 255) for x in self.processor.image_mean)
        if w != h:
            side = max(w, h)
            sq = Image.new(img.mode, (side, side), color)
            sq.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            img = sq
        return self.processor.preprocess(img, return_tensors="pt")["pixel_values"].float()

    @torch.no_grad()
    def image_features(self, px: torch.Tensor) -> torch.Tensor:
        out = self.clip(px, output_hidden_states=True)
        return out.hidden_states[self.cfg["mm_vision_select_layer"]][:, 1:]

    def project_image(self, feats: torch.Tensor) -> torch.Tensor:
        p = sub(self.sd, "model.mm_vision_projector.")
        return F.linear(F.gelu(F.linear(feats, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])

    # ---- video -------------------------------------------------------------------------
    def _qformer(self, name: str, query: str) -> dict:
        q = {"Qformer." + k: v for k, v in sub(self.sd, f"model.{name}.").items()}
        q["query_tokens"] = self.sd[f"model.{query}"]
        return q

    @torch.no_grad()
    def frame_queries(self, px: torch.Tensor) -> torch.Tensor:
        """[T,3,224,224] -> [T,32,D]: ln_vision(visual_encoder) then Qformer.bert."""
        heads_eva = self.eva["cls_token"].shape[-1] // 88
        embeds = eva_vit(self.eva, px, heads_eva)
        q = self._qformer("Qformer", "query_tokens")
        return lavis_qformer(q, embeds, q["query_tokens"].shape[-1] // 64, cross_freq=2)

    @torch.no_grad()
    def video_queries(self, frame_q: torch.Tensor) -> torch.Tensor:
        """[T,32,D] + video_frame_position_embedding(arange(T)) -> video_Qformer -> [1,64,D]."""
        t = frame_q.shape[0]
        pos = self.sd["model.video_frame_position_embedding.weight"][:t]
        x = (frame_q + pos.unsqueeze(-2)).reshape(1, -1, frame_q.shape[-1])    # b t q h -> b (t q) h
        q = self._qformer("video_Qformer", "video_query_tokens")
        return lavis_qformer(q, x, q["query_tokens"].shape[-1] // 64, cross_freq=1)

    def project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = sub(self.sd, f"model.{name}.")
        return F.linear(x, p["weight"], p["bias"])

    def video_rows(self, px: torch.Tensor) -> torch.Tensor:
        return self.project(self.video_queries(self.frame_queries(px)), "llama_proj")

    # ---- audio -------------------------------------------------------------------------
    @torch.no_grad()
    def audio_embeds(self, fbank: torch.Tensor) -> torch.Tensor:
        """get_audio_feature's modality_value: head, Normalize, x20 per clip -> [S, Da]."""
        return self.imagebind.embed("audio", fbank, scale=True)

    @torch.no_grad()
    def audio_queries(self, emb: torch.Tensor) -> torch.Tensor:
        pos = self.sd["model.audio_position_embedding.weight"][:emb.shape[0]]
        q = self._qformer("audio_Qformer", "audio_query_tokens")
        return lavis_qformer(q, (emb + pos)[None], q["query_tokens"].shape[-1] // 64, cross_freq=1)

    def audio_rows(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.project(self.audio_queries(self.audio_embeds(fbank)), "audio_llama_proj")

    # ---- LLM ---------------------------------------------------------------------------
    def token_ids(self, prompt: str) -> list[int]:
        """BOS + the prompt with added tokens split out, each text piece sentencepiece-encoded
        on its own (4.34's fast tokenizer: every piece gets the "\u2581" prefix)."""
        pattern = "(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")"
        ids = [self.sp.bos_id()]
        for piece in re.split(pattern, prompt):
            if piece in self.added:
                ids.append(self.added[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    @torch.no_grad()
    def generate(self, prompt: str, rows: dict, max_new_tokens: int) -> list[int]:
        """rows: {"<im_patch>": [[576, n_embd], ...], ...} in prompt order per patch token."""
        ids = torch.tensor([self.token_ids(prompt)])
        emb = self.lm.get_input_embeddings()(ids)[0].clone()
        for patch, blocks in rows.items():
            pos = (ids[0] == self.added[patch]).nonzero()[:, 0]
            feats = torch.cat([b.reshape(-1, emb.shape[-1]) for b in blocks])
            assert len(pos) == len(feats), f"{patch}: {len(pos)} positions, {len(feats)} rows"
            emb[pos] = feats
        out = self.lm.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               num_beams=1, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()
