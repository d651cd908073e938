"""A random-weight LLaMA GGUF written straight in llama.cpp's Q4_K_M tensor types (benchmarks only).

    write_random_q4_k_m(config, tokenizer_model, out, seed=0, progress=None) -> facts

What the memory and speed benchmarks need from a 7B LLM is the file llama.cpp maps and runs:
the same tensors, ggml types, shapes and bytes as a real Q4_K_M conversion, not any trained
value. The usual way there (a 14.6 GB random fp16 checkpoint -> a 13.5 GB f16 GGUF ->
llama.cpp's quantizer) takes ~50 min and ~39 GB of disk on a 2-core machine. This writes the
quantized blocks themselves, tensor by tensor (peak memory: the largest tensor's blocks,
107 MiB for LLaMA-7B's output.weight), with no f32/f16 intermediate and no checkpoint:

- Types follow llama.cpp's Q4_K_M choice (src/llama-quant.cpp, llama_tensor_get_type_impl,
  for the llama arch): Q4_K everywhere, token_embd.weight included; Q6_K for output.weight
  and for attn_v / ffn_down of the layers `use_more_bits` picks (the first and last eighth
  and every third one between); 1-D norms stay F32. tests/test_random_gguf.py checks the
  types, shapes and byte sizes against a file llama.cpp's own quantizer made.
- Every quant byte and every 6-bit (Q4_K) or 8-bit (Q6_K) sub-block scale is uniform random.
  The fp16 super-block scale `d` (and Q4_K's `dmin`) is one small finite value per tensor,
  chosen so the weights have the fixture's spread (export/fixtures.py: embeddings and head
  3/sqrt(width), blocks 0.5/sqrt(fan_in)); for LLaMA-7B's Q6_K tensors (and Q4_K ones below
  width ~16k) that `d` is an fp16 subnormal, as it is in real Q6_K files (a trained 7B's
  sub-block scales are ~1e-3, / 127). Norms are 1 + 0.1 N(0, 1) in f32. The logits are
  finite; the text is noise.
- Metadata and vocabulary are export/llm_gguf.py's (the same `add_metadata`), file type
  MOSTLY_Q4_K_M, so llama.cpp and scops open it like an exported bundle's GGUF.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from scops.export.bundle import atomic_file
from scops.export.llm_gguf import (FILE_TYPES, _LAYER_TENSORS, _pad_vocab, add_metadata, load_text_config,
                                   read_sentencepiece_vocab, write_streamed)

QK_K = 256                 # k-quant super-block: 256 weights
# Block layouts (ggml-common.h):
#   block_q4_K: fp16 d, fp16 dmin, scales[12] (8 x 6-bit scale + 8 x 6-bit min, packed), qs[128] (4-bit)
#   block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d (last)
Q4_K_BYTES, Q6_K_BYTES = 2 + 2 + 12 + QK_K // 2, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2     # 144, 210
# Spread of one weight per unit of d, with every quant and scale bit uniform:
#   Q4_K: w = d*sc*q - dmin*m; sc, m ~ U{0..63}, q ~ U{0..15}; dmin = 7.5 d makes E[w] = 0, and
#         Var = d^2 (E[sc^2] E[q^2] - (E[sc] E[q])^2) + dmin^2 Var(m)
#             = d^2 (1333.5 * 77.5 - (31.5 * 7.5)^2 + 56.25 * 341.25) = 66727.5 d^2 -> std 258.3 d
#   Q6_K: w = d*s*(q - 32); s ~ U{-128..127}, q ~ U{0..63}: E[w^2] = d^2 * 5461.5 * 341.5 -> rms 1365.7 d
Q4_K_STD_PER_D, Q6_K_STD_PER_D = 258.3, 1365.7
Q4_K_MIN_OVER_D = 7.5


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers whose attn_v / ffn_down get Q6_K under Q4_K_M."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def plan_q4_k_m(cfg: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(GGUF name, shape [rows, cols] (numpy order; ggml's ne reversed), ggml type, std) of every
    tensor, in the order llama.cpp's quantizer writes a Q4_K_M file (llama-model-loader.h's
    weight_name_comparer: the layer, -1 outside the blocks, then the name), so the file's
    layout is a real one's. std 0 marks a norm."""
    d, f, n_layer = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    kv = int(cfg["num_key_value_heads"]) * (d // int(cfg["num_attention_heads"]))
    vocab = int(cfg["vocab_size"])
    hot, cool = 3.0 / d ** 0.5, 0.5 / d ** 0.5
    shapes = {"attn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
              "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    plan = [("token_embd.weight", (vocab, d), "Q4_K", hot)]
    for i in range(n_layer):
        for _, sub in _LAYER_TENSORS:
            shape = shapes[sub]
            if len(shape) == 1:
                plan.append((f"blk.{i}.{sub}.weight", shape, "F32", 0.0))
                continue
            more = sub in ("attn_v", "ffn_down") and use_more_bits(i, n_layer)
            std = 0.5 / f ** 0.5 if sub == "ffn_down" else cool
            plan.append((f"blk.{i}.{sub}.weight", shape, "Q6_K" if more else "Q4_K", std))
    plan += [("output_norm.weight", (d,), "F32", 0.0), ("output.weight", (vocab, d), "Q6_K", hot)]
    return sorted(plan, key=lambda t: (int(t[0].split(".")[1]) if t[0].startswith("blk.") else -1, t[0]))


def random_blocks(rng: np.random.Generator, n_blocks: int, qtype: str, std: float) -> np.ndarray:
    """[n_blocks, block bytes] uint8: random quants and sub-block scales, `d` set for `std`."""
    size = Q4_K_BYTES if qtype == "Q4_K" else Q6_K_BYTES
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    per_d = Q4_K_STD_PER_D if qtype == "Q4_K" else Q6_K_STD_PER_D
    d = np.float16(std / per_d)
    if not 0 < d < np.inf:
        raise ValueError(f"a {qtype} scale for std {std:g} is not a positive finite fp16 ({d})")
    if qtype == "Q4_K":
        blocks[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8)                                   # d
        blocks[:, 2:4] = np.frombuffer(np.float16(Q4_K_MIN_OVER_D * d).tobytes(), np.uint8)    # dmin
    else:
        blocks[:, size - 2:] = np.frombuffer(d.tobytes(), np.uint8)                              # d (last)
    return blocks


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    n = int(np.prod(shape))
    return n * 4 if qtype == "F32" else n // QK_K * (Q4_K_BYTES if qtype == "Q4_K" else Q6_K_BYTES)


def write_random_q4_k_m(config: Mapping[str, Any], tokenizer_model: Path | str, out: Path | str, seed: int = 0,
                        name: str = "scops-random-q4_k_m",
                        progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Write a random LLaMA GGUF of `config` (an HF LLaMA config dict) in Q4_K_M types, atomically."""
    import gguf

    cfg = load_text_config(Path("."), config)
    bad = [k for k in ("hidden_size", "intermediate_size") if int(cfg[k]) % QK_K]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be multiples of {QK_K} for k-quant blocks "
                         f"(llama.cpp would fall back to other types): {[cfg[k] for k in bad]}")
    tokens, scores, types, specials = read_sentencepiece_vocab(Path(tokenizer_model))
    if len(tokens) > int(cfg["vocab_size"]):
        raise ValueError(f"tokenizer has {len(tokens)} pieces but the model only {cfg['vocab_size']} rows")
    _pad_vocab(tokens, scores, types, int(cfg["vocab_size"]))
    plan = plan_q4_k_m(cfg)
    rng = np.random.default_rng(seed)
    out = Path(out)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            for gg_name, shape, qtype, _ in plan:
                if qtype == "F32":
                    writer.add_tensor_info(gg_name, shape, np.dtype(np.float32), tensor_bytes(shape, qtype))
                else:      # byte shape [rows, row bytes]; gguf turns it back into [rows, cols] of `raw_dtype`
                    row = tensor_bytes((1, shape[1]), qtype)
                    writer.add_tensor_info(gg_name, (shape[0], row), np.dtype(np.uint8), shape[0] * row,
                                           raw_dtype=gguf.GGMLQuantizationType[qtype])
            add_metadata(writer, cfg, name, FILE_TYPES["Q4_K_M"], (tokens, scores, types, specials))

            def make(i: int) -> np.ndarray:
                _, shape, qtype, std = plan[i]
                if qtype == "F32":
                    return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
                # [rows, cols] -> [rows * cols / 256 blocks, block bytes] -> [rows, row bytes]
                return random_blocks(rng, int(np.prod(shape)) // QK_K, qtype, std).reshape(shape[0], -1)
            write_streamed(writer, [gg_name for gg_name, _, _, _ in plan], make, progress)
        finally:
            writer.close()
    counts: dict[str, int] = {}
    for _, _, qtype, _ in plan:
        counts[qtype] = counts.get(qtype, 0) + 1
    return {"n_vocab": int(cfg["vocab_size"]), "n_embd": int(cfg["hidden_size"]),
            "n_layer": int(cfg["num_hidden_layers"]), "n_tensors": len(plan), "types": counts,
            "tensor_bytes": sum(tensor_bytes(s, t) for _, s, t, _ in plan), "bytes": out.stat().st_size,
            "how": "random Q4_K_M blocks written directly (bench/random_gguf.py)"}
