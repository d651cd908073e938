"""PyTorch reference of PandaGPT, from code/model/openllama.py: ImageBind embeddings (clips
averaged), llama_proj per modality, the turn's modalities summed into one row, LoRA applied
as PEFT does at run time (x W^T + s x A^T B^T, NOT merged), HF generate on inputs_embeds."""
from __future__ import annotations

import json

import numpy as np
import torch

from scops.export.imagebind import embed_clips
from scops.export.pandagpt import load_imagebind, read_delta

USES = {"image": "vision", "audio": "audio", "video": "video", "thermal": "thermal", "depth": "depth", "imu": "imu"}


class PandaGPTReference:
    def __init__(self, src):
        import sentencepiece as spm
        from transformers import LlamaForCausalLM

        self.imagebind = load_imagebind(src)
        proj, lora = read_delta(src)
        self.proj = torch.nn.Linear(proj["weight"].shape[1], proj["weight"].shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(proj["weight"]))
            self.proj.bias.copy_(torch.from_numpy(proj["bias"]))
        self.llama = LlamaForCausalLM.from_pretrained(src / "vicuna", torch_dtype=torch.float32,
                                                      attn_implementation="eager").eval()
        alpha = json.loads((src / "pandagpt_config.json").read_text())["lora_alpha"]
        for name, (a, b) in lora.items():
            module = self.llama.get_submodule(name[: -len(".weight")])
            a, b, s = torch.from_numpy(a), torch.from_numpy(b), alpha / a.shape[0]
            module.register_forward_hook(lambda m, inp, out, a=a, b=b, s=s: out + s * (inp[0] @ a.T @ b.T))
        self.sp = spm.SentencePieceProcessor(model_file=str(src / "vicuna" / "tokenizer.model"))

    @torch.no_grad()
    def feature(self, prepared: dict) -> torch.Tensor:
        """{modality: prepared clips [N, ...] (numpy)} -> the turn's one row [1, 1, D]."""
        rows = [self.proj(embed_clips(self.imagebind, USES[m], torch.from_numpy(x), "pandagpt"))
                for m, x in prepared.items()]
        return torch.stack(rows).sum(dim=0).view(1, 1, -1)

    @torch.no_grad()
    def generate(self, turns: list[tuple[str, str | None]], feature: torch.Tensor, n: int) -> list[int]:
        """turns: [(question, answer or None)]; the modality row comes with the first question."""
        prompt = ""
        for i, (q, a) in enumerate(turns):            # web_demo.py's prompt_text
            prompt += (q if i == 0 else f" Human: {q}") + ("" if a is None else f"\n### Assistant: {a}\n###")
        embed = self.llama.get_input_embeddings()
        before = embed(torch.tensor([[1] + self.sp.encode("### Human: <Img>")]))
        after = embed(torch.tensor([self.sp.encode("</Img> " + prompt + "\n### Assistant:")]))
        inputs = torch.cat([before, feature, after], dim=1)
        out = self.llama.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                  pad_token_id=0, eos_token_id=None)
        return out[0].tolist()


def as_numpy(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
