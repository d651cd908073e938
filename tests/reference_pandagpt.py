"""PyTorch reference of PandaGPT, from code/model/openllama.py and web_demo.py: the delta
loaded as web_demo.py loads it (torch.load, then load_state_dict(strict=False) onto the PEFT
model: here the LoRA pairs are taken by name), ImageBind embeddings (clips averaged),
llama_proj per modality, the turn's modalities summed into one row, LoRA applied as PEFT
does at run time (x W^T + s x A^T B^T, NOT merged, s = lora_alpha 32 / r), HF generate on
inputs_embeds, and the chat history as web_demo.py builds it (the answer is
decode(output_ids[:-2]): the stop "\n##" dropped, or, when the answer ends otherwise, its
last two tokens)."""
from __future__ import annotations

import re

import numpy as np
import torch

from scops.export.imagebind import embed_clips
from scops.export.pandagpt import load_imagebind

USES = {"image": "vision", "audio": "audio", "video": "video", "thermal": "thermal", "depth": "depth", "imu": "imu"}


class PandaGPTReference:
    def __init__(self, src):
        import sentencepiece as spm
        from transformers import LlamaForCausalLM

        self.imagebind = load_imagebind(src)
        delta = {k: v.detach().float() for k, v in torch.load(src / "pytorch_model.pt", weights_only=True).items()}
        self.proj = torch.nn.Linear(delta["llama_proj.weight"].shape[1], delta["llama_proj.weight"].shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(delta["llama_proj.weight"])
            self.proj.bias.copy_(delta["llama_proj.bias"])
        self.llama = LlamaForCausalLM.from_pretrained(src / "vicuna", torch_dtype=torch.float32,
                                                      attn_implementation="eager").eval()
        pairs: dict = {}
        for k, v in delta.items():              # peft names: ...self_attn.q_proj.lora_A[.default].weight
            m = re.fullmatch(r"llama_model\.base_model\.model\.(.+)\.lora_([AB])(\.default)?\.weight", k)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = v
        for name, ab in pairs.items():
            module = self.llama.get_submodule(name)
            a, b, s = ab["A"], ab["B"], 32 / ab["A"].shape[0]
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


    def history_answer(self, output_ids: list[int]) -> str:
        """openllama.py generate: decode(outputs[0][:-2], skip_special_tokens=True)."""
        return self.sp.decode([t for t in output_ids[:-2] if t not in (0, 1, 2)])


def as_numpy(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
