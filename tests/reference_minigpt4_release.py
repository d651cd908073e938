"""The PyTorch reference of MiniGPT-4 as its release runs (Vision-CAIR/MiniGPT-4 HEAD), read
from the published files, not through scops' exporter.

models/minigpt4.py + minigpt_base.py: create_eva_vit_g (39 blocks, i.e. all stored blocks
but the last) -> ln_vision (from blip2_pretrained_flant5xxl.pth; with has_qformer=False a
fresh LayerNorm: weight 1, bias 0) -> Q-Former (load_from_pretrained) -> llama_proj; LLaMA-2:
no Q-Former, image_embeds[:, 1:, :].view(bs, pn / 4, hs * 4). conversation.py
CONV_VISION_Vicuna0 / CONV_VISION_LLama2 and Conversation.get_prompt; get_context_emb splits
the prompt at <ImageHere>, adds BOS to the first segment only; the slow LlamaTokenizer splits
"<s>" out of the text as the BOS token and encodes each remaining chunk on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference import MiniGPT4Reference
from reference_bubogpt import eva_vit, lavis_qformer

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")
ROLES = {"vicuna0": ("Human: ", "Assistant: ", "###"), "llama2": ("<s>[INST] ", " [/INST] ", "")}


def prompt(turns: list[tuple[str, str | None]], style: str) -> str:
    """get_prompt: system + sep, then role + message + sep, the open turn as its bare role;
    Chat.ask joins the question to the image message with a space."""
    user, assistant, sep = ROLES[style]
    text = SYSTEM + sep
    for i, (q, a) in enumerate(turns):
        text += user + ("<Img><ImageHere></Img> " + q if i == 0 else q) + sep
        text += assistant + a + sep if a is not None else assistant
    return text


class MiniGPT4ReleaseReference:
    def __init__(self, folder, llm_dir: str, style: str):
        import sentencepiece as spm
        from transformers import LlamaForCausalLM

        self.style = style
        load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=True)  # noqa: E731
        self.eva = {k: v.float() for k, v in load("eva_vit_g.pth").items()}
        stored = len({k.split(".")[1] for k in self.eva if k.startswith("blocks.")})
        self.depth = stored - 1                                           # the last block is never read
        self.width = self.eva["cls_token"].shape[-1]
        if style == "vicuna0":
            blip2 = {k: v.float() for k, v in load("blip2_pretrained_flant5xxl.pth")["model"].items()}
            self.eva.update({"ln_vision.weight": blip2["ln_vision.weight"], "ln_vision.bias": blip2["ln_vision.bias"]})
            self.qformer = blip2
            stage2 = load("prerained_minigpt4_7b.pth")["model"]
        else:
            self.eva.update({"ln_vision.weight": torch.ones(self.width), "ln_vision.bias": torch.zeros(self.width)})
            stage2 = load("pretrained_minigpt4_llama2_7b.pth")["model"]
        self.proj = {k: v.float() for k, v in stage2.items()}
        self.lm = LlamaForCausalLM.from_pretrained(folder / llm_dir, torch_dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / llm_dir / "tokenizer.model"))

    @torch.no_grad()
    def image_rows(self, rgb) -> torch.Tensor:
        embeds = eva_vit(self.eva, MiniGPT4Reference.pixels(rgb), self.width // 88, depth=self.depth)   # [1, 257, W]
        if self.style == "vicuna0":
            bridge = lavis_qformer(self.qformer, embeds, self.qformer["query_tokens"].shape[-1] // 64)
        else:
            embeds = embeds[:, 1:, :]
            bs, pn, hs = embeds.shape
            bridge = embeds.reshape(bs, pn // 4, hs * 4)                  # [1, 256, W] -> [1, 64, 4W]
        return F.linear(bridge, self.proj["llama_proj.weight"], self.proj["llama_proj.bias"])

    def encode(self, segment: str) -> list[int]:
        ids = []
        for i, chunk in enumerate(segment.split("<s>")):
            if i:
                ids.append(1)
            if chunk:
                ids += self.sp.encode(chunk)
        return ids

    @torch.no_grad()
    def generate(self, turns, rgb, max_new_tokens: int) -> list[int]:
        segs = prompt(turns, self.style).split("<ImageHere>")
        embed = self.lm.get_input_embeddings()
        parts = []
        for i, seg in enumerate(segs):
            if i:
                parts.append(self.image_rows(rgb))
            parts.append(embed(torch.tensor([([1] if i == 0 else []) + self.encode(seg)])))
        inputs = torch.cat(parts, dim=1)
        out = self.lm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               num_beams=1, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()
