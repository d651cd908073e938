"""The HF transformers peers: MiniGPT-4's pipeline in eager PyTorch, stage by stage.

Modes: "fp32" (CPU), "fp16" (GPU: fp16 weights, eager attention) and "nf4" (GPU: the LLM's
linear layers in bitsandbytes 4-bit NF4 with fp16 compute, the ViT / Q-Former / projection
in fp16 -- what a user with a small card would pick). On a GPU every stage boundary waits
for the device (torch.cuda.synchronize), so each stage's time is its own.

Same logic as tests/reference.py (BLIP-2 eval transform, vision -> Q-Former -> projection,
MiniGPT-4's literal prompt with the rows spliced at <ImageHere>, `generate` on
inputs_embeds with the KV cache on), with a timer around each stage and a streamer
that stamps every generated token.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def minigpt4_prompt(question: str) -> str:
    return SYSTEM + "###Human: <Img><ImageHere></Img> " + question + "###Assistant: "


class TokenClock:
    """A `generate` streamer recording when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


MODES = ("fp32", "fp16", "nf4")
# Modules bitsandbytes leaves in fp16 in "nf4" mode: everything but the LLM's blocks.
NF4_SKIP = ["vision_model", "qformer", "language_projection", "lm_head"]


class HfPipeline:
    def __init__(self, ckpt: Path, mode: str = "fp32", device: str = "cpu"):
        import sentencepiece as spm
        import torch
        from transformers import Blip2ForConditionalGeneration

        if mode not in MODES:
            raise ValueError(f"HF mode must be one of {MODES}, got {mode!r}")
        self.torch, self.device = torch, torch.device(device)
        dtype = torch.float32 if mode == "fp32" else torch.float16
        kw = dict(torch_dtype=dtype, attn_implementation="eager")
        if mode == "nf4":
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                llm_int8_skip_modules=NF4_SKIP)
            kw["device_map"] = {"": self.device.index or 0} if self.device.type == "cuda" else {"": "cpu"}
        self.model = Blip2ForConditionalGeneration.from_pretrained(ckpt, **kw).eval()
        if mode != "nf4":
            self.model.to(self.device)
        self.dtype = dtype
        self.sp = spm.SentencePieceProcessor(model_file=str(Path(ckpt) / "tokenizer.model"))
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def _now(self) -> float:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def pixels(self, rgb: np.ndarray):
        """BLIP-2 eval transform: Resize((224, 224), bicubic) -> ToTensor -> Normalize -> [1,3,224,224]."""
        from PIL import Image
        img = Image.fromarray(rgb).resize((224, 224), Image.BICUBIC)
        x = self.torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0   # [224,224,3] -> [3,224,224]
        return ((x - self.mean) / self.std).unsqueeze(0).to(self.device, self.dtype)

    def token_ids(self, prompt: str) -> list[list[int]]:
        segs = prompt.split("<ImageHere>")
        return [([1] if i == 0 else []) + self.sp.encode(s) for i, s in enumerate(segs)]

    def run(self, rgb: np.ndarray, question: str, tokens: int) -> dict:
        """One turn: image + question -> `tokens` greedy tokens; stage times in ms."""
        torch, m = self.torch, self.model
        lm = m.language_model
        with torch.no_grad():
            t0 = self._now()
            px = self.pixels(rgb)
            t1 = self._now()
            embeds = m.vision_model(pixel_values=px).last_hidden_state             # [1, 257, Dv]
            t2 = self._now()
            qdtype = next(m.qformer.parameters()).dtype         # HF keeps the Q-Former in fp32
            query = m.query_tokens.expand(embeds.shape[0], -1, -1).to(qdtype)
            bridge = m.qformer(query_embeds=query, encoder_hidden_states=embeds.to(qdtype)).last_hidden_state  # [1, 32, Dq]
            t3 = self._now()
            rows = m.language_projection(bridge.to(m.language_projection.weight.dtype))   # [1, 32, D]
            t4 = self._now()
            embed = lm.get_input_embeddings()
            parts = []
            for i, ids in enumerate(self.token_ids(minigpt4_prompt(question))):
                if i > 0:
                    parts.append(rows.to(embed.weight.dtype))
                parts.append(embed(torch.tensor([ids], device=self.device)))
            inputs = torch.cat(parts, dim=1)                                       # [1, n_prompt, D]
            clock = TokenClock()
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=self.device)
            lm.generate(inputs_embeds=inputs, attention_mask=mask,
                        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                        pad_token_id=0, eos_token_id=None, streamer=clock)
        first, last, n = clock.times[0], clock.times[-1], len(clock.times)
        return {"preprocess": (t1 - t0) * 1e3, "encoder": (t2 - t1) * 1e3, "qformer": (t3 - t2) * 1e3,
                "projection": (t4 - t3) * 1e3, "prefill": (first - t4) * 1e3, "ttft": (first - t0) * 1e3,
                "decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0, "n_tokens": n,
                "answer": (last - t0) * 1e3,
                "prompt_cells": int(inputs.shape[1])}
