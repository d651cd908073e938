"""The PyTorch reference pipeline for MiniGPT-4-shaped checkpoints (HF Blip2 + LLaMA).

Written from the original's description, not from scops' runtime: pixels by PIL + torch,
image rows by HF modules, the prompt by MiniGPT-4's literal conversation string, text by
the sentencepiece model, generation by HF `generate` on `inputs_embeds`.
"""
from __future__ import annotations

import numpy as np
import torch

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def minigpt4_prompt(turns: list[tuple[str, str | None]], image_first: bool = True) -> str:
    """turns: [(question, answer or None)]; the image goes with the first question.

    conversation.py CONV_VISION_Vicuna0 (roles "Human: " / "Assistant: ", sep "###") and
    Conversation.get_prompt: system + sep, then role + message + sep per message, the open
    turn as its bare role ("Assistant: ", trailing space included)."""
    messages = []
    for i, (q, a) in enumerate(turns):
        messages.append(("Human: ", ("<Img><ImageHere></Img> " if i == 0 and image_first else "") + q))
        messages.append(("Assistant: ", a))
    text = SYSTEM + "###"
    for role, message in messages:
        text += role + message + "###" if message else role
    return text


class MiniGPT4Reference:
    def __init__(self, ckpt):
        import sentencepiece as spm
        from transformers import Blip2ForConditionalGeneration

        self.model = Blip2ForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))

    @staticmethod
    def pixels(rgb: np.ndarray) -> torch.Tensor:
        """BLIP-2 eval transform: Resize((224, 224), bicubic) -> ToTensor -> Normalize."""
        from PIL import Image
        img = Image.fromarray(rgb).resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0   # [224,224,3] -> [3,224,224]
        return ((x - CLIP_MEAN) / CLIP_STD).unsqueeze(0)

    @torch.no_grad()
    def bridge(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """-> Q-Former output [B, 32, Dq] (before the projection)."""
        m = self.model
        embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
        query = m.query_tokens.expand(embeds.shape[0], -1, -1)
        return m.qformer(query_embeds=query, encoder_hidden_states=embeds).last_hidden_state

    @torch.no_grad()
    def image_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.language_projection(self.bridge(pixel_values))

    def token_ids(self, prompt: str) -> list[list[int]]:
        segs = prompt.split("<ImageHere>")
        return [([1] if i == 0 else []) + self.sp.encode(s) for i, s in enumerate(segs)]

    def generate(self, prompt: str, rgb: np.ndarray | None, max_new_tokens: int) -> list[int]:
        return self.generate_ids(self.token_ids(prompt), rgb, max_new_tokens)

    @torch.no_grad()
    def generate_ids(self, segments: list[list[int]], rgb: np.ndarray | None, max_new_tokens: int) -> list[int]:
        """Greedy continuation of token id segments with the picture's rows between them."""
        lm = self.model.language_model
        embed = lm.get_input_embeddings()
        parts = []
        rows = self.image_rows(self.pixels(rgb)) if rgb is not None else None
        for i, ids in enumerate(segments):
            if i > 0:
                parts.append(rows)
            parts.append(embed(torch.tensor([ids])))
        inputs = torch.cat(parts, dim=1)
        out = lm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()


class InstructBlipReference:
    """HF InstructBLIP: the Q-Former reads the instruction (BERT ids, truncated on the left to
    128); the LLM sees [32 image rows][BOS][prompt]."""

    def __init__(self, ckpt):
        import sentencepiece as spm
        from transformers import BertTokenizerFast, InstructBlipForConditionalGeneration

        self.model = InstructBlipForConditionalGeneration.from_pretrained(
            ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        self.bert = BertTokenizerFast.from_pretrained(ckpt / "qformer_tokenizer", truncation_side="left")

    def instruction(self, text: str) -> dict:
        return self.bert(text, truncation=True, max_length=128, return_tensors="pt")

    @torch.no_grad()
    def image_rows(self, pixel_values: torch.Tensor, text: str) -> torch.Tensor:
        q = self.instruction(text)
        n = pixel_values.shape[0]
        return self.model.get_image_features(pixel_values, q["input_ids"].expand(n, -1),
                                             q["attention_mask"].expand(n, -1))

    @torch.no_grad()
    def generate(self, prompt: str, rgb: np.ndarray, max_new_tokens: int, instruction: str | None = None) -> list[int]:
        lm = self.model.language_model
        rows = self.image_rows(MiniGPT4Reference.pixels(rgb), instruction or prompt)
        text = lm.get_input_embeddings()(torch.tensor([[1] + self.sp.encode(prompt)]))
        inputs = torch.cat([rows, text], dim=1)                       # [1, 32 + 1 + T, D]
        out = lm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                          num_beams=1, pad_token_id=0, eos_token_id=None)
        return out[0].tolist()
