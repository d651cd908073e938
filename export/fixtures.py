"""Tiny random-weight checkpoints of the real architectures, for tests and the demo.

    python -m scops.export.fixtures minigpt4-tiny OUT_DIR

writes an HF folder of `Blip2ForConditionalGeneration` with a LLaMA text model (the
shape MiniGPT-4 has: EVA-style ViT + ln_vision + Q-Former + Linear + LLaMA), with a
LLaMA-style sentencepiece tokenizer trained on the spot; `instructblip-tiny` writes
`InstructBlipForConditionalGeneration` plus the Q-Former's BERT WordPiece tokenizer. Every width is shrunk; the
structure (224x224 input, patch 14 -> 257 tokens, 32 queries, cross-attention every
2nd Q-Former layer, bias on the projection) is the real one.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .bundle import atomic_dir


@dataclass(frozen=True)
class TinyShape:
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    qformer_width: int = 64
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_ffn: int = 128
    queries: int = 32            # MiniGPT-4 / BLIP-2: 32 learned query tokens
    llm_width: int = 256         # multiple of 256 so Q4_K blocks (QK_K = 256) fit
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 4
    llm_ffn: int = 512
    llm_ctx: int = 1024
    vocab: int = 512
    seed: int = 0


def _randomize(model, seed: int) -> None:
    """Re-draw every parameter so outputs depend on the input and greedy picks are decisive.

    HF's own init leaves the ViT at std 1e-10 (images would all look alike) and the LLM
    at std 0.02 (near-uniform logits, where fp32 rounding could flip argmax ties).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):      # every 1-D weight here is a norm's
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:                                  # biases
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim == 4 else p.shape[-1]   # conv: C*kh*kw
                p.copy_(_gain(name) * torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def _gain(name: str) -> float:
    """Scale over 1/sqrt(fan_in). The LLM's embeddings and head are hot (x3: logits spread
    out, greedy picks are decisive) and its blocks cool (x0.5): the residual stream is not
    dominated by random layers, so, as with a trained model, 4-bit weights mostly keep
    the top-1 token (measured: Q4_K_M agrees with F32 on 71-92% of positions, vs 25-33%
    with every LLM weight at x2)."""
    if not name.startswith("language_model"):
        return 1.0
    return 3.0 if ("embed_tokens" in name or "lm_head" in name) else 0.5


def _configs(shape: TinyShape, n_vocab: int, qformer_vocab: int | None = None) -> dict:
    qformer = dict(
        hidden_size=shape.qformer_width, num_hidden_layers=shape.qformer_layers,
        num_attention_heads=shape.qformer_heads, intermediate_size=shape.qformer_ffn,
        cross_attention_frequency=2, encoder_hidden_size=shape.vision_width,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if qformer_vocab is not None:
        qformer.update(vocab_size=qformer_vocab, max_position_embeddings=512)
    return dict(
        vision_config=dict(
            hidden_size=shape.vision_width, intermediate_size=shape.vision_mlp,
            num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
            image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer_config=qformer,
        text_config=dict(
            model_type="llama", hidden_size=shape.llm_width, num_hidden_layers=shape.llm_layers,
            num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
            intermediate_size=shape.llm_ffn, vocab_size=n_vocab,
            max_position_embeddings=shape.llm_ctx, rms_norm_eps=1e-6, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        ),
        num_query_tokens=shape.queries,
    )


def train_wordpiece(out_dir: Path, vocab_size: int = 400) -> Path:
    """A BERT-style (uncased WordPiece) tokenizer for the Q-Former's instruction input."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from .spm import generate_corpus

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(list(generate_corpus()), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    from tokenizers.processors import BertProcessing
    tok.post_processor = BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    BertTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), truncation_side="left").save_pretrained(out_dir)
    return out_dir / "tokenizer.json"


def _build(out: Path, family: str, shape: TinyShape) -> Path:
    """Write the tiny HF checkpoint of `family` into `out` (atomically) and return it."""
    import sentencepiece as spm
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration)

    from .spm import train_tokenizer

    with atomic_dir(out) as tmp:
        train_tokenizer(tmp, vocab_size=shape.vocab)
        n_vocab = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).get_piece_size()
        if family == "instructblip":
            wp = train_wordpiece(tmp / "qformer_tokenizer")
            from tokenizers import Tokenizer
            config = InstructBlipConfig(**_configs(shape, n_vocab, Tokenizer.from_file(str(wp)).get_vocab_size()))
            model_cls = InstructBlipForConditionalGeneration
        else:
            config, model_cls = Blip2Config(**_configs(shape, n_vocab)), Blip2ForConditionalGeneration
        torch.manual_seed(shape.seed)
        model = model_cls(config).eval()
        _randomize(model, shape.seed)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": family, "shape": shape.__dict__}, indent=1))
    return Path(out)


def build_minigpt4_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    return _build(out, "minigpt4", shape)


def build_instructblip_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    return _build(out, "instructblip", shape)


def build_pandagpt_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    from .fixtures_pandagpt import build_pandagpt_tiny as build
    return build(out, shape)


def build_bubogpt_tiny(out: Path, shape: TinyShape = TinyShape()) -> Path:
    from .fixtures_bubogpt import build_bubogpt_tiny as build
    return build(out, shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scops.export.fixtures", description=__doc__.split("\n")[0])
    from scops.runtime.families import FIXTURES, fixture_builder

    ap.add_argument("name", choices=sorted(FIXTURES))
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    path = fixture_builder(args.name)(args.out)
    print(f"wrote {args.name} checkpoint to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
