"""Tiny PandaGPT source folder in the original release's layout (see export/pandagpt.py):
ImageBind (all six encoders, toy widths, real input shapes), a Vicuna-shaped LLaMA with a
sentencepiece tokenizer trained on the spot, and the delta (llama_proj + LoRA on q,k,v,o)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .bundle import atomic_dir
from .fixtures import TinyShape, _configs, _randomize

LORA_R = 8               # tiny rank (the release uses 32); alpha stays 32 as in the release
LORA_ALPHA = 32


def build_pandagpt_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .imagebind import build_imagebind
    from .imagebind_modules import ImageBindSizes
    from .spm import train_tokenizer

    with atomic_dir(out) as tmp:
        sizes = ImageBindSizes.tiny()
        torch.save(build_imagebind(sizes, seed=shape.seed).state_dict(), tmp / "imagebind_huge.pth")
        (tmp / "imagebind_sizes.json").write_text(json.dumps(asdict(sizes), indent=1))

        vicuna = tmp / "vicuna"
        train_tokenizer(vicuna, vocab_size=shape.vocab)
        n_vocab = spm.SentencePieceProcessor(model_file=str(vicuna / "tokenizer.model")).get_piece_size()
        text = _configs(shape, n_vocab)["text_config"]
        llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"})).eval()

        class Wrapped(torch.nn.Module):          # so _randomize sees "language_model.*" names
            def __init__(self):
                super().__init__()
                self.language_model = llama
        _randomize(Wrapped(), shape.seed)
        llama.save_pretrained(vicuna, safe_serialization=True)

        gen = torch.Generator().manual_seed(shape.seed + 1)
        width = shape.llm_width
        delta = {"llama_proj.weight": torch.randn(width, sizes.out_dim, generator=gen) / sizes.out_dim ** 0.5,
                 "llama_proj.bias": 0.02 * torch.randn(width, generator=gen)}
        for i in range(shape.llm_layers):
            for p in "qkvo":
                base = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj"
                delta[f"{base}.lora_A.weight"] = torch.randn(LORA_R, width, generator=gen) / width ** 0.5
                delta[f"{base}.lora_B.weight"] = 0.05 * torch.randn(width, LORA_R, generator=gen)
        torch.save(delta, tmp / "pytorch_model.pt")
        (tmp / "pandagpt_config.json").write_text(json.dumps({"lora_r": LORA_R, "lora_alpha": LORA_ALPHA}))
    return Path(out)
