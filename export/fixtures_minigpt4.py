"""Tiny MiniGPT-4 releases in the published layout and form (see export/minigpt4.py).

    python -m scops.export.fixtures minigpt4-release-tiny OUT_DIR
    python -m scops.export.fixtures minigpt4-llama2-tiny OUT_DIR

Written as the originals write them:
- eva_vit_g.pth: a flat EVA state dict in fp16 (q_bias / v_bias, no key bias), one block more
  than the model uses, as the 40-block LAVIS file is read by a 39-block ViT;
- blip2_pretrained_flant5xxl.pth: LAVIS' {'model': sd} (fp32) with the query path, ln_vision
  and the parts MiniGPT-4 discards (text embeddings, text FFN, cls head, t5_proj);
- the stage-2 checkpoint: LAVIS' runner save, {'model': {llama_proj.*}, 'optimizer': ...,
  'config': ..., 'scaler': ..., 'epoch': ...};
- the LLM folder: Vicuna v0 as fp16 `.bin` shards with their index (llama2: Llama-2-7b-chat-hf
  style fp16 safetensors shards), a sentencepiece tokenizer trained on the spot.
Toy widths that keep the originals' head widths (EVA: 88 per head; BERT: 64), so sizes are
read off the files exactly as off the release.
"""
from __future__ import annotations

from pathlib import Path

from .bundle import atomic_dir
from .fixtures import TinyShape, _configs, _randomize

EVA = dict(hidden_size=176, intermediate_size=int(176 * 4.3637), num_attention_heads=2, num_hidden_layers=3,
           image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)    # 3 stored, 2 used
QFORMER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
               cross_attention_frequency=2, encoder_hidden_size=176, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
SHARD = "300KB"                 # the tiny LLaMA spans several shards, as a 7B does
VICUNA_DIR, LLAMA2_DIR = "vicuna-7b-v0", "Llama-2-7b-chat-hf"
PROMPT_TEXT = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
               "provide it to you. Please answer my questions.", "###Human: <Img><ImageHere></Img> ###Assistant: ",
               "<s>[INST] <Img><ImageHere></Img> [/INST] ")


def _parts(shape: TinyShape, n_vocab: int, seed: int, llama2: bool):
    import torch
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(seed)
    text = {k: v for k, v in _configs(shape, n_vocab)["text_config"].items() if k != "model_type"}
    in_dim = 4 * EVA["hidden_size"] if llama2 else QFORMER["hidden_size"]
    parts = torch.nn.ModuleDict({
        "vision": Blip2VisionModel(Blip2VisionConfig(**EVA)),
        "qformer": Blip2QFormerModel(Blip2QFormerConfig(**QFORMER)),
        "llama_proj": torch.nn.Linear(in_dim, shape.llm_width),
        "language_model": LlamaForCausalLM(LlamaConfig(**text)),
    })
    parts["queries"] = torch.nn.ParameterDict({"q": torch.nn.Parameter(torch.zeros(1, shape.queries,
                                                                                    QFORMER["hidden_size"]))})
    _randomize(parts, seed)
    return parts


def _write(out: Path, shape: TinyShape, llama2: bool) -> Path:
    import sentencepiece as spm
    import torch

    from .fixtures_bubogpt import hf_to_eva, hf_to_lavis_qformer
    from .spm import train_tokenizer

    with atomic_dir(out) as tmp:
        llm_dir = tmp / (LLAMA2_DIR if llama2 else VICUNA_DIR)
        train_tokenizer(llm_dir, vocab_size=shape.vocab, extra_text=PROMPT_TEXT)
        n_vocab = spm.SentencePieceProcessor(model_file=str(llm_dir / "tokenizer.model")).get_piece_size()
        parts = _parts(shape, n_vocab, shape.seed, llama2)
        sd = {k: v.detach().clone() for k, v in parts.state_dict().items()}
        sub = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731

        eva, ln = hf_to_eva(sub("vision."))
        torch.save({k: v.half() for k, v in eva.items()}, tmp / "eva_vit_g.pth")
        proj = {"llama_proj.weight": sd["llama_proj.weight"], "llama_proj.bias": sd["llama_proj.bias"]}
        stage2 = {"model": proj, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
                  "config": {"model": {"arch": "minigpt4", "has_qformer": not llama2}}, "scaler": {"scale": 65536.0},
                  "epoch": 4}
        torch.save(stage2, tmp / ("pretrained_minigpt4_llama2_7b.pth" if llama2 else "prerained_minigpt4_7b.pth"))
        if not llama2:
            blip2 = hf_to_lavis_qformer(sub("qformer."), sd["queries.q"], text_path=True, seed=shape.seed)
            blip2.update({"ln_vision.weight": ln["weight"], "ln_vision.bias": ln["bias"],
                          "t5_proj.weight": torch.randn(64, QFORMER["hidden_size"]), "t5_proj.bias": torch.zeros(64)})
            torch.save({"model": blip2}, tmp / "blip2_pretrained_flant5xxl.pth")
        llama = parts["language_model"].half()
        llama.save_pretrained(llm_dir, safe_serialization=llama2, max_shard_size=SHARD)
    return Path(out)


def build_minigpt4_release_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    """MiniGPT-4 with Vicuna v0: eva_vit_g.pth, blip2_pretrained_flant5xxl.pth,
    prerained_minigpt4_7b.pth, vicuna-7b-v0/."""
    return _write(Path(out), shape, llama2=False)


def build_minigpt4_llama2_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    """MiniGPT-4 with LLaMA-2-chat: eva_vit_g.pth, pretrained_minigpt4_llama2_7b.pth,
    Llama-2-7b-chat-hf/ (no Q-Former)."""
    return _write(Path(out), shape, llama2=True)
