"""Benchmark shapes: random-weight MiniGPT-4 checkpoints at real widths, and their bundles.

    ensure_bundle(SHAPES["minigpt4-small"], "int8", log) -> (checkpoint dir, bundle dir)

Both are built once and cached under $SCOPS_CACHE/bench (default ~/.cache/scops/bench),
each appearing atomically (built in a temp dir beside it, then renamed). The encoders
and the projection are drawn as whole modules (EVA-ViT-g is ~1.0 B params, 4 GB fp32);
the LLaMA weights are drawn and written one shard at a time, so a 7B text model never
sits in RAM (peak: one shard, SHARD_BYTES).

    ensure_bundle(SHAPES["minigpt4-7b"], "fp32,int8", log, direct_llm=True) -> (None, bundle)

is what `scops bench --memory` uses for shapes marked `direct_llm` (minigpt4-7b): no LLaMA
weights are drawn; bench/random_gguf.py writes the GGUF's Q4_K / Q6_K blocks directly with
random bytes, in llama.cpp's Q4_K_M types and file order (~1 min instead of ~50, no 14.6 GB
checkpoint, no 13.5 GB f16 intermediate). The encoders are drawn and exported as above from
a checkpoint holding only them, deleted once the bundle exists.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from scops.export.fixtures import TinyShape, _randomize

Log = Callable[[str], None]

# Shard size of the LLaMA weights as written (fp16): 1 GiB keeps the peak RSS of the
# writer at about 1 GiB fp16 + one fp32 tensor being drawn (LLaMA-7B's largest: 500 MiB).
SHARD_BYTES = 1 << 30
# Pieces of the sentencepiece tokenizer: a tiny corpus cannot yield LLaMA's 32000, so the
# model keeps 32000 rows and the GGUF writer pads the token table with [PAD<i>] entries.
TOKENIZER_PIECES = 512

# EVA-ViT-g/14 (MiniGPT-4's vision tower): 39 layers, 1408 wide, 16 heads, MLP 6144;
# BLIP-2's Q-Former: BERT-base (12 x 768, 12 heads, FFN 3072), 32 queries.
_EVA_QFORMER = dict(vision_width=1408, vision_layers=39, vision_heads=16, vision_mlp=6144,
                    qformer_width=768, qformer_layers=12, qformer_heads=12, qformer_ffn=3072, queries=32)


@dataclass(frozen=True)
class BenchShape:
    name: str
    model: TinyShape
    reps: int                    # default timed repetitions (after one warm-up)
    tokens: int                  # default decode length (EOS ignored)
    hf_fits: bool = True         # HF fp32 of this shape fits a 24 GB machine
    # The memory benchmark writes this shape's LLM GGUF directly in Q4_K_M types with random
    # blocks (bench/random_gguf.py) instead of checkpoint -> f16 GGUF -> llama.cpp quantize:
    # LLaMA-7B's way there took ~50 min and ~39 GB of disk on the 2-core machine.
    direct_llm: bool = False


SHAPES = {
    "tiny": BenchShape("tiny", TinyShape(), reps=5, tokens=16),
    # LLaMA-1.1B (TinyLlama): 2048 wide, 22 layers, 32 heads / 4 KV heads, FFN 5632, vocab 32000.
    "minigpt4-small": BenchShape("minigpt4-small", TinyShape(
        **_EVA_QFORMER, llm_width=2048, llm_layers=22, llm_heads=32, llm_kv_heads=4, llm_ffn=5632,
        llm_ctx=2048, vocab=32000), reps=5, tokens=32),
    # LLaMA-7B (Vicuna-7B): 4096 wide, 32 layers, 32 heads, FFN 11008, vocab 32000.
    # HF fp32 needs 7e9 x 4 B = 28 GB plus the ViT: it cannot run on a 24 GB machine.
    "minigpt4-7b": BenchShape("minigpt4-7b", TinyShape(
        **_EVA_QFORMER, llm_width=4096, llm_layers=32, llm_heads=32, llm_kv_heads=32, llm_ffn=11008,
        llm_ctx=2048, vocab=32000), reps=3, tokens=32, hf_fits=False, direct_llm=True),
}


def cache_root() -> Path:
    base = os.environ.get("SCOPS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "scops") / "bench"


def blip2_config(shape: TinyShape, n_vocab: int):
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(hidden_size=shape.vision_width, intermediate_size=shape.vision_mlp,
                           num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                           image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=shape.qformer_width, num_hidden_layers=shape.qformer_layers,
                            num_attention_heads=shape.qformer_heads, intermediate_size=shape.qformer_ffn,
                            cross_attention_frequency=2, encoder_hidden_size=shape.vision_width,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="llama", hidden_size=shape.llm_width, num_hidden_layers=shape.llm_layers,
                         num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads,
                         intermediate_size=shape.llm_ffn, vocab_size=n_vocab,
                         max_position_embeddings=shape.llm_ctx, rms_norm_eps=1e-6, rope_theta=10000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
        num_query_tokens=shape.queries)


def draw_encoders(config, seed: int) -> dict:
    """Vision tower, Q-Former, queries and projection, drawn as in the test fixture -> fp16 tensors."""
    import torch
    from transformers import Blip2QFormerModel, Blip2VisionModel

    class Parts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = Blip2VisionModel(config.vision_config)
            self.qformer = Blip2QFormerModel(config.qformer_config)
            self.query_tokens = torch.nn.Parameter(
                torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
            self.language_projection = torch.nn.Linear(config.qformer_config.hidden_size,
                                                       config.text_config.hidden_size)

    torch.manual_seed(seed)
    parts = Parts().eval()
    _randomize(parts, seed)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in parts.state_dict().items()}


def plan_llama(shape: TinyShape) -> list[tuple[str, tuple[int, ...], float]]:
    """(HF name, shape [out, in], scale) of every LLaMA tensor; scale 0 marks a norm (1 + 0.1 N)."""
    head = shape.llm_width // shape.llm_heads
    kv = shape.llm_kv_heads * head
    d, f = shape.llm_width, shape.llm_ffn
    # The fixture's gains over 1/sqrt(fan_in): embeddings and head x3, blocks x0.5.
    hot, cool = 3.0 / d ** 0.5, 0.5 / d ** 0.5
    p = "language_model.model."
    plan = [(p + "embed_tokens.weight", (shape.vocab, d), hot)]
    for i in range(shape.llm_layers):
        b = f"{p}layers.{i}."
        plan += [(b + "input_layernorm.weight", (d,), 0.0),
                 (b + "self_attn.q_proj.weight", (d, d), cool),
                 (b + "self_attn.k_proj.weight", (kv, d), cool),
                 (b + "self_attn.v_proj.weight", (kv, d), cool),
                 (b + "self_attn.o_proj.weight", (d, d), cool),
                 (b + "post_attention_layernorm.weight", (d,), 0.0),
                 (b + "mlp.gate_proj.weight", (f, d), cool),
                 (b + "mlp.up_proj.weight", (f, d), cool),
                 (b + "mlp.down_proj.weight", (d, f), 0.5 / f ** 0.5)]
    plan += [(p + "norm.weight", (d,), 0.0), ("language_model.lm_head.weight", (shape.vocab, d), hot)]
    return plan


def draw_tensor(rng, shape: tuple[int, ...], scale: float) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x = 1.0 + 0.1 * x if scale == 0.0 else x * np.float32(scale)
    return x.astype(np.float16)


def write_checkpoint(shape: TinyShape, out: Path, log: Log, llm: bool = True) -> Path:
    """Random Blip2ForConditionalGeneration folder at `shape`, sharded safetensors (fp16);
    llm=False leaves the LLaMA weights out (config, tokenizer and encoders only)."""
    from safetensors.torch import save_file as save_torch
    from safetensors.numpy import save_file as save_numpy

    from scops.export.spm import train_tokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        train_tokenizer(tmp, vocab_size=min(shape.vocab, TOKENIZER_PIECES))
        config = blip2_config(shape, shape.vocab)
        config.save_pretrained(tmp)
        weight_map, total = {}, 0
        t0 = time.perf_counter()
        log(f"  drawing vision tower + Q-Former + projection ({shape.vision_layers}+{shape.qformer_layers} layers)")
        enc = draw_encoders(config, shape.seed)
        shards = [("model-enc.safetensors", enc)]
        save_torch(enc, str(tmp / shards[0][0]))
        total += sum(v.numel() * 2 for v in enc.values())
        weight_map.update({k: shards[0][0] for k in enc})
        del enc
        log(f"  encoders written ({total / 2**30:.2f} GiB fp16, {time.perf_counter() - t0:.0f}s)")
        rng = np.random.default_rng(shape.seed + 1)
        plan = plan_llama(shape) if llm else []
        shard, size, n_shard = {}, 0, 0
        for i, (name, shp, scale) in enumerate(plan):
            shard[name] = draw_tensor(rng, shp, scale)
            size += shard[name].nbytes
            if size >= SHARD_BYTES or i + 1 == len(plan):
                n_shard += 1
                fname = f"model-llm-{n_shard:03d}.safetensors"
                save_numpy(shard, str(tmp / fname))
                weight_map.update({k: fname for k in shard})
                total += size
                log(f"  LLaMA shard {n_shard}: tensors up to {i + 1}/{len(plan)}, "
                    f"{total / 2**30:.2f} GiB so far ({time.perf_counter() - t0:.0f}s)")
                shard, size = {}, 0
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "scops_fixture.json").write_text(json.dumps({"family": "minigpt4", "shape": shape.__dict__}))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_bundle(shape: BenchShape, precision: str, log: Log, quant: str = "Q4_K_M",
                  direct_llm: bool = False) -> tuple[Path | None, Path]:
    """(checkpoint, bundle) of `shape`, built on first use; `precision` is the encoders' precision.
    direct_llm: the LLM GGUF is written straight in Q4_K_M with random blocks and no checkpoint
    is kept (checkpoint None): ensure_direct_bundle."""
    from scops.export.minigpt4 import export_minigpt4

    if direct_llm:
        return None, ensure_direct_bundle(shape, precision, log, quant)
    root = cache_root() / shape.name
    ckpt = root / "checkpoint"
    if not (ckpt / "model.safetensors.index.json").exists():
        log(f"building the {shape.name} checkpoint (random weights) in {ckpt}")
        write_checkpoint(shape.model, ckpt, log)
    bundle = root / f"bundle-{quant}-{precision.replace(',', '+')}"
    if not (bundle / "manifest.json").exists():
        log(f"exporting the {shape.name} bundle ({quant}, encoders {precision}) to {bundle}")
        export_minigpt4(str(ckpt), bundle, quant, log=lambda s: log("  " + s), encoder_precision=precision)
    return ckpt, bundle


def ensure_direct_bundle(shape: BenchShape, precision: str, log: Log, quant: str = "Q4_K_M") -> Path:
    """The bundle of `shape` with its LLM written by bench/random_gguf.py (random Q4_K_M blocks,
    llama.cpp's Q4_K_M types) and its encoders exported as usual from a random checkpoint that
    holds only them (fp16, deleted once the bundle is built). Cached as
    <cache>/<shape>/bundle-Q4_K_M-direct-<precision>; the 7B one is 9.0 GiB with fp32,int8
    encoders (ViT-g + Q-Former fp32 4.1 GiB, their int8 variants 1.0 GiB, GGUF 3.8 GiB), built
    in ~6 min on 2 cores (peak disk 11 GiB while the 2 GiB encoder checkpoint exists)."""
    from scops.export.llm_gguf import load_text_config
    from scops.export.minigpt4 import export_hf_blip2

    from .random_gguf import write_random_q4_k_m

    if quant != "Q4_K_M":
        raise ValueError(f"a directly written LLM is Q4_K_M only, not {quant}")
    root = cache_root() / shape.name
    bundle = root / f"bundle-{quant}-direct-{precision.replace(',', '+')}"
    if (bundle / "manifest.json").exists():
        return bundle
    enc = root / "encoders-checkpoint"          # an intermediate: kept only until the bundle exists
    if not (enc / "model.safetensors.index.json").exists():
        log(f"building the {shape.name} encoder checkpoint (random weights, no LLM weights) in {enc}")
        write_checkpoint(shape.model, enc, log, llm=False)
    cfg = load_text_config(enc, None)
    last = [0.0]

    def random_q4_k_m_llm(path: Path, log: Log) -> dict:
        def progress(i, n, name):
            if i + 1 == n or time.perf_counter() - last[0] > 5.0:
                last[0] = time.perf_counter()
                log(f"  random {quant} tensor {i + 1}/{n} {name}")
        return write_random_q4_k_m(cfg, enc / "tokenizer.model", path, seed=shape.model.seed + 1,
                                   name=f"scops-bench-{shape.name}-random", progress=progress)

    log(f"exporting the {shape.name} bundle (encoders {precision}; LLM: random {quant} blocks) to {bundle}")
    export_hf_blip2(str(enc), bundle, quant, log=lambda s: log("  " + s), encoder_precision=precision,
                    llm_writer=random_q4_k_m_llm)
    shutil.rmtree(enc)
    log(f"deleted the encoder checkpoint {enc}")
    return bundle
