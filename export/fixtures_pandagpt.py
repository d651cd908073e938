"""Tiny PandaGPT release in the layout and form its authors write it (see export/pandagpt.py):
- imagebind_huge.pth: ImageBind's flat state dict (all six encoders at toy widths, the real
  input shapes and head widths), saved with torch.save;
- vicuna/: a Vicuna-shaped LLaMA saved as transformers of that time saved Vicuna v0:
  fp16 `pytorch_model-0000N-of-0000M.bin` shards with their index, plus a sentencepiece
  tokenizer trained on the spot;
- pytorch_model.pt: the delta as DeepSpeedAgent.save_model writes it: every trainable
  nn.Parameter (requires_grad=True, fp16 as the DeepSpeed fp16 engine holds them) under
  its name in the model, peft >= 0.3's `.default` adapter names included."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .bundle import atomic_dir
from .fixtures import TinyShape, _configs, _randomize

LORA_R = 8               # tiny rank (the release uses 32); alpha is the release's 32
SHARD = "300KB"          # small enough that the tiny LLaMA spans several .bin shards


def build_pandagpt_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .imagebind import build_imagebind
    from .imagebind_modules import ImageBindSizes
    from .spm import train_tokenizer

    with atomic_dir(out) as tmp:
        torch.save(build_imagebind(ImageBindSizes.tiny(), seed=shape.seed).state_dict(), tmp / "imagebind_huge.pth")

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
        llama.half().save_pretrained(vicuna, safe_serialization=False, max_shard_size=SHARD)

        gen = torch.Generator().manual_seed(shape.seed + 1)
        width, out_dim = shape.llm_width, ImageBindSizes.tiny().out_dim
        draws = {"llama_proj.weight": torch.randn(width, out_dim, generator=gen) / out_dim ** 0.5,
                 "llama_proj.bias": 0.02 * torch.randn(width, generator=gen)}
        for i in range(shape.llm_layers):
            for p in "qkvo":
                base = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj"
                draws[f"{base}.lora_A.default.weight"] = torch.randn(LORA_R, width, generator=gen) / width ** 0.5
                draws[f"{base}.lora_B.default.weight"] = 0.05 * torch.randn(width, LORA_R, generator=gen)
        delta = OrderedDict((k, torch.nn.Parameter(v.half(), requires_grad=True)) for k, v in draws.items())
        torch.save(delta, tmp / "pytorch_model.pt")
    return Path(out)
