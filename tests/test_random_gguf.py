"""The benchmarks' directly written random Q4_K_M GGUF (bench/random_gguf.py), at a tiny shape.

Its tensor types, shapes and byte sizes must be what llama.cpp's own quantizer makes of the
same LLaMA (Q4_K_M from an f16 GGUF), its blocks what gguf's GGML_QUANT_SIZES say, its
weights spread as planned; llama.cpp loads it and generates with finite logits, and the
memory benchmark's bundle is built with it, without keeping a checkpoint.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from llama_helpers import LlamaRunner, init_backend
from scops.bench.random_gguf import (Q4_K_STD_PER_D, Q6_K_STD_PER_D, plan_q4_k_m, use_more_bits,
                                     write_random_q4_k_m)
from scops.export.llm_gguf import list_gguf_tensors, quantize_gguf, write_llama_gguf
from scops.export.spm import train_tokenizer

# 8 layers: use_more_bits picks layers 0, 3, 6 and 7 (first / last eighth, every third between);
# GQA (2 KV heads) so attn_k / attn_v are narrower than attn_q; widths multiples of QK_K = 256.
CFG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=600, max_position_embeddings=512, rms_norm_eps=1e-6,
           rope_theta=10000.0, tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"],
           bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """The random Q4_K_M file, and llama.cpp's Q4_K_M of a random f16 LLaMA of the same config."""
    from safetensors.numpy import save_file

    from scops.bench.shapes import plan_llama
    from scops.export.fixtures import TinyShape

    init_backend()
    root = tmp_path_factory.mktemp("random_gguf")
    tok = train_tokenizer(root / "tok")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(CFG))
    shape = TinyShape(llm_width=256, llm_layers=8, llm_heads=4, llm_kv_heads=2, llm_ffn=512, vocab=600)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shp, scale in plan_llama(shape):            # HF names under "language_model."
        x = rng.standard_normal(shp).astype(np.float32)
        tensors[name.replace("language_model.", "")] = (1 + 0.1 * x if scale == 0 else x * scale).astype(np.float16)
    save_file(tensors, str(hf / "model.safetensors"))
    write_llama_gguf(hf, tok, root / "f16.gguf", dtype="f16")
    quantize_gguf(root / "f16.gguf", root / "llama-q4km.gguf", "Q4_K_M")
    facts = write_random_q4_k_m(CFG, tok, root / "random-q4km.gguf", seed=3)
    return root, facts


def test_types_shapes_and_bytes_are_llama_cpps_q4_k_m(art):
    root, facts = art
    ours, theirs = list_gguf_tensors(root / "random-q4km.gguf"), list_gguf_tensors(root / "llama-q4km.gguf")
    assert ours == theirs                             # names, ggml types and shapes, in the same order
    kinds = {n: t for n, t, _ in ours}
    assert kinds["output.weight"] == "Q6_K" and kinds["token_embd.weight"] == "Q4_K"
    assert [i for i in range(8) if kinds[f"blk.{i}.attn_v.weight"] == "Q6_K"] == [0, 3, 6, 7]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert facts["types"] == {"Q4_K": 49, "Q6_K": 9, "F32": 17}

    import gguf
    from gguf import GGML_QUANT_SIZES

    def sizes(path):
        return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    mine = gguf.GGUFReader(str(root / "random-q4km.gguf"))
    for t in mine.tensors:
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        assert int(t.n_bytes) == int(t.n_elements) // block * size, t.name
    assert GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K] == (256, 144)
    assert GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K] == (256, 210)
    assert sizes(root / "random-q4km.gguf") == sizes(root / "llama-q4km.gguf")
    assert facts["tensor_bytes"] == sum(sizes(root / "llama-q4km.gguf").values())
    assert int(mine.fields["general.file_type"].parts[-1][0]) == 15            # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_blocks_decode_to_the_planned_spread(art):
    """gguf's own dequantizer reads every block; the spread is the plan's (the Q6_K scales here
    are fp16 subnormals, as in real files), means near 0, norms 1 + 0.1 N."""
    import gguf
    from gguf.quants import dequantize

    root, _ = art
    plan = {name: (qtype, std) for name, _, qtype, std in plan_q4_k_m(CFG)}
    for t in gguf.GGUFReader(str(root / "random-q4km.gguf")).tensors:
        w = dequantize(t.data, t.tensor_type)
        qtype, std = plan[t.name]
        assert np.isfinite(w).all()
        if qtype == "F32":
            assert abs(w.mean() - 1) < 0.05 and 0.05 < w.std() < 0.15
            continue
        per_d = Q4_K_STD_PER_D if qtype == "Q4_K" else Q6_K_STD_PER_D
        want = float(np.float16(std / per_d)) * per_d
        assert abs(w.std() / want - 1) < 0.1, (t.name, w.std(), want)
        assert abs(w.mean()) < 0.1 * want


def test_llama_cpp_loads_it_and_generates_finite_tokens(art):
    root, _ = art
    with LlamaRunner(root / "random-q4km.gguf", n_ctx=256) as r:
        ids = r.tokenize("What is in the picture? A cat on a sofa.")
        logits = r.forward(ids)
        assert np.isfinite(logits).all() and logits.std() > 0.1
        assert np.abs(logits[0] - logits[-1]).max() > 0.1              # the input moves the output
        out = r.greedy(ids, 32)
        assert len(out) == 32 and all(0 <= t < 600 for t in out)


def test_widths_off_the_super_block_are_refused(tmp_path):
    tok = train_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="multiples of 256"):
        write_random_q4_k_m(dict(CFG, hidden_size=320), tok, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_direct_bench_bundle_runs_and_keeps_no_checkpoint(tmp_path, monkeypatch):
    """The memory benchmark's bundle at the tiny shape: encoders exported as usual (int8
    variant beside fp32), the LLM written directly; the encoder checkpoint is deleted."""
    from scops.bench.shapes import SHAPES, ensure_bundle
    from scops.runtime.session import Session

    monkeypatch.setenv("SCOPS_CACHE", str(tmp_path))
    ckpt, bundle = ensure_bundle(SHAPES["tiny"], "fp32,int8", lambda m: None, direct_llm=True)
    assert ckpt is None and bundle.name == "bundle-Q4_K_M-direct-fp32+int8"
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]       # no checkpoint left
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["llm"]["quant"] == "Q4_K_M" and manifest["encoder_precision"]["variants"]["int8"]
    assert ("output.weight", "Q6_K", (256, 512)) in list_gguf_tensors(bundle / manifest["llm"]["file"])
    from scops.bench.memory_report import describe_llm
    llm = describe_llm(bundle, True)               # what the memory report says of the GGUF
    assert llm["types"] == {"Q4_K": 13, "Q6_K": 3, "F32": 5} and "bench/random_gguf.py" in llm["how"]
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    with Session.open(bundle, low_memory=True, threads=2) as s:
        reply = s.chat().send("What is in the picture?", images=[img], temperature=0, max_tokens=8,
                              ignore_stop=True).result()
    assert len(reply.token_ids) == 8
    assert ensure_bundle(SHAPES["tiny"], "fp32,int8", lambda m: None, direct_llm=True)[1] == bundle   # cached
