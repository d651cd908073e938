"""Convert a HF LLaMA/Vicuna checkpoint to GGUF (llama.cpp ``llama`` arch), and quantize it.

The conversion streams: tensor shapes are read from the checkpoint's headers (any HF
form: safetensors or `.bin`, sharded or not; export/checkpoints.py), the GGUF header /
metadata / tensor table are written first, then each tensor is loaded, converted and
written on its own, so peak memory is one tensor (a 7B model converts on a small
machine). Tokens the HF tokenizer adds beyond its sentencepiece model are written at
their ids as CONTROL tokens: only a template's own markup produces them. The output
appears atomically.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .bundle import atomic_file, disk_nearly_full
from .checkpoints import TensorIndex, read_added_tokens

# Defaults of transformers' LlamaConfig, used when a (nested) text config
# omits them, as BLIP-2 / InstructBLIP configs often do.
_LLAMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
}

# llama.cpp ``llama_ftype`` values (LLAMA_FTYPE_MOSTLY_*), also GGUF general.file_type.
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15}
QUANT_TYPES = ("Q4_K_M", "Q8_0", "F16")  # targets accepted by quantize_gguf
F16_MAX = 65504.0  # largest finite IEEE half: (2 - 2^-10) * 2^15

# Per-layer HF sub-names -> llama.cpp tensor names (suffix ".weight" on both).
_LAYER_TENSORS = (
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)

ProgressFn = Callable[[int, int, str], None]


def load_text_config(src: Path, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the LLaMA text config: `config` if given, else src/config.json
    (its ``text_config`` when the checkpoint is a multimodal wrapper)."""
    if config is None:
        raw = json.loads((Path(src) / "config.json").read_text())
        config = raw.get("text_config", raw)
    cfg = dict(_LLAMA_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if v is not None})
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                           "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"LLaMA config lacks {missing}")
    return cfg


def read_sentencepiece_vocab(tokenizer_model: Path) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """Pieces, scores and GGUF token types (plus special ids) of a sentencepiece model."""
    import sentencepiece as spm
    from gguf import TokenType

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    n = sp.vocab_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(Path(tokenizer_model).read_bytes())
        # sentencepiece's piece-type enum uses the same numbers as gguf.TokenType.
        types = [int(TokenType(p.type)) for p in proto.pieces]
    except ImportError:  # no protobuf: user-defined pieces cannot be told apart
        types = [int(_classify_piece(sp, i)) for i in range(n)]
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return tokens, scores, types, specials


def _classify_piece(sp: Any, i: int) -> int:
    from gguf import TokenType

    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_unused(i):
        return TokenType.UNUSED
    if sp.is_byte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's half-split rotary layout to the
    interleaved-pair layout llama.cpp's llama arch rotates."""
    out_dim, in_dim = w.shape
    half = out_dim // n_head // 2
    # (out, in) -> (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in) -> (out, in)
    return w.reshape(n_head, 2, half, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def plan_tensors(cfg: Mapping[str, Any], prefix: str, available: set[str]) -> list[tuple[str, str, str | None]]:
    """List (hf_name, gguf_name, rotary) in write order; rotary is "q", "k" or None."""
    p = prefix + "model."
    plan: list[tuple[str, str, str | None]] = [(p + "embed_tokens.weight", "token_embd.weight", None)]
    for layer in range(cfg["num_hidden_layers"]):
        for hf_sub, gg_sub in _LAYER_TENSORS:
            rotary = {"attn_q": "q", "attn_k": "k"}.get(gg_sub)
            plan.append((f"{p}layers.{layer}.{hf_sub}.weight", f"blk.{layer}.{gg_sub}.weight", rotary))
    plan.append((p + "norm.weight", "output_norm.weight", None))
    lm_head = prefix + "lm_head.weight"
    if lm_head in available:
        plan.append((lm_head, "output.weight", None))
    elif not cfg.get("tie_word_embeddings", False):
        raise KeyError(f"{lm_head} missing and tie_word_embeddings is not set")
    # Tied embeddings: llama.cpp reuses token_embd when "output" is absent.
    missing = [hf for hf, _, _ in plan if hf not in available]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]} (prefix={prefix!r})")
    return plan


def convert_tensor(w: np.ndarray, rotary: str | None, cfg: Mapping[str, Any], out_dtype: np.dtype) -> np.ndarray:
    """Apply the rotary permutation and the storage dtype (1-D norms stay f32)."""
    w = w.astype(np.float32, copy=False)
    if rotary == "q":
        w = permute_rotary(w, cfg["num_attention_heads"])
    elif rotary == "k":
        w = permute_rotary(w, cfg["num_key_value_heads"])
    target = out_dtype if w.ndim == 2 else np.dtype(np.float32)
    if target == np.float16 and w.size and float(np.abs(w).max()) > F16_MAX:
        raise ValueError(f"a weight exceeds fp16's range ({float(np.abs(w).max()):.3g} > {F16_MAX:g}); "
                         "export with --quant F32")
    return np.ascontiguousarray(w.astype(target, copy=False))


def _pad_vocab(tokens: list[str], scores: list[float], types: list[int], n_vocab: int,
               added: Mapping[str, int] | None = None) -> None:
    """Extend the token table to the model's vocab: added tokens (LEGO's <im_patch>, Emu's
    [IMG], ...) at their ids as CONTROL, any other extra row (Vicuna's pad) as UNUSED."""
    from gguf import TokenType

    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    for text, i in (added or {}).items():
        if i < 0 or i >= n_vocab:
            raise ValueError(f"added token {text!r} has id {i}, outside the model's {n_vocab} embedding rows")
        if types[i] not in (int(TokenType.UNUSED), int(TokenType.CONTROL)) and tokens[i] != text:
            raise ValueError(f"added token {text!r} has id {i}, which the sentencepiece model uses for {tokens[i]!r}")
        tokens[i], scores[i], types[i] = text, -1000.0, int(TokenType.CONTROL)


def check_shapes(cfg: Mapping[str, Any], plan: list[tuple[str, str, str | None]], index: TensorIndex) -> None:
    """Fail early (not inside llama.cpp's loader) when weights and config disagree."""
    hidden, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // n_head
    expected = {
        "token_embd": (cfg["vocab_size"], hidden),
        "attn_q": (n_head * head_dim, hidden),
        "attn_k": (cfg["num_key_value_heads"] * head_dim, hidden),
        "ffn_up": (cfg["intermediate_size"], hidden),
    }
    for hf_name, gg_name, _ in plan:
        kind = gg_name.split(".")[-2]
        if kind in expected and index.shape(hf_name) != tuple(expected[kind]):
            raise ValueError(f"{hf_name}: shape {index.shape(hf_name)} but config implies {expected[kind]}")


def add_metadata(writer: Any, cfg: Mapping[str, Any], name: str, file_type: int,
                 vocab: tuple[list[str], list[float], list[int], dict[str, int]]) -> None:
    """Write hyper-parameters and the SPM tokenizer as GGUF key/values."""
    tokens, scores, types, specials = vocab
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg["num_key_value_heads"]))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_rope_freq_base(float(cfg["rope_theta"]))
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION of current llama.cpp
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(specials["bos"])
    writer.add_eos_token_id(specials["eos"])
    writer.add_unk_token_id(specials["unk"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)


def write_llama_gguf(
    src: Path | str,
    tokenizer_model: Path | str,
    out_path: Path | str,
    dtype: str = "f32",
    progress: ProgressFn | None = None,
    name: str = "scops-llm",
    prefix: str = "",
    config: Mapping[str, Any] | None = None,
    adjust: Callable[[str, np.ndarray], np.ndarray] | None = None,
    tensors: TensorIndex | None = None,
    added_tokens: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Stream a HF LLaMA checkpoint folder into a GGUF file; return facts about it.

    `prefix` selects a nested text model (e.g. "language_model." inside a
    BLIP-2 checkpoint); `config` overrides the text config from config.json.
    `progress(i, n, gguf_name)` is called after tensor i (0-based) of n is written.
    `adjust(hf_name, w)` may change a tensor as it streams by (e.g. merge a LoRA delta).
    `tensors` is the checkpoint's index (default: `TensorIndex.open(src)`); `added_tokens`
    {text: id} (default: the folder's added_tokens.json / tokenizer_config.json).
    """
    import gguf

    dtype = dtype.lower()
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    out_dtype = np.dtype(np.float32 if dtype == "f32" else np.float16)
    src, out_path = Path(src), Path(out_path)
    cfg = load_text_config(src, config)
    tokens, scores, types, specials = read_sentencepiece_vocab(Path(tokenizer_model))
    n_vocab = int(cfg["vocab_size"])
    if len(tokens) > n_vocab:
        raise ValueError(f"tokenizer has {len(tokens)} pieces but the model only {n_vocab} rows")
    added = read_added_tokens(src) if added_tokens is None else added_tokens
    _pad_vocab(tokens, scores, types, n_vocab, added)

    index = tensors if tensors is not None else TensorIndex.open(src)
    plan = plan_tensors(cfg, prefix, index.names())
    check_shapes(cfg, plan, index)

    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        try:
            n_bytes = _write_all(writer, cfg, name, dtype, out_dtype, plan, index,
                                 (tokens, scores, types, specials), progress, adjust)
        finally:
            writer.close()
    return {
        "n_vocab": n_vocab,
        "n_embd": int(cfg["hidden_size"]),
        "n_layer": int(cfg["num_hidden_layers"]),
        "n_tensors": len(plan),
        "dtype": dtype,
        "bytes": out_path.stat().st_size,
        "tensor_bytes": n_bytes,
    }


def _write_all(writer: Any, cfg: Mapping[str, Any], name: str, dtype: str, out_dtype: np.dtype,
               plan: list[tuple[str, str, str | None]], index: TensorIndex,
               vocab: tuple, progress: ProgressFn | None,
               adjust: Callable[[str, np.ndarray], np.ndarray] | None = None) -> int:
    """Declare all tensors, write header/metadata/table, then stream tensor data."""
    total = 0
    for hf_name, gg_name, _ in plan:
        shape = index.shape(hf_name)
        target = out_dtype if len(shape) == 2 else np.dtype(np.float32)
        nbytes = int(np.prod(shape)) * target.itemsize
        writer.add_tensor_info(gg_name, shape, target, nbytes)
        total += nbytes
    add_metadata(writer, cfg, name, FILE_TYPES[dtype.upper()], vocab)

    def make(i: int) -> np.ndarray:
        hf_name, _, rotary = plan[i]
        w = index.load(hf_name)
        if adjust is not None:
            w = adjust(hf_name, w)
        return convert_tensor(w, rotary, cfg, out_dtype)
    write_streamed(writer, [gg_name for _, gg_name, _ in plan], make, progress)
    return total


def write_streamed(writer: Any, names: list[str], make: Callable[[int], np.ndarray],
                   progress: ProgressFn | None = None) -> None:
    """Header, metadata and tensor table (all declared), then tensor i's data from make(i), one
    tensor in memory at a time; flushed and fsynced. The twin writers of llm_gguf and
    bench/random_gguf share it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, gg_name in enumerate(names):
        data = make(i)
        writer.write_tensor_data(data)
        del data
        if progress is not None:
            progress(i, len(names), gg_name)
    writer.flush()
    for f in writer.fout or ():
        os.fsync(f.fileno())


def quantize_gguf(in_path: Path | str, out_path: Path | str, qtype: str = "Q4_K_M", threads: int = 0) -> None:
    """Quantize a GGUF with llama.cpp (via llama-cpp-python), atomically."""
    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {', '.join(QUANT_TYPES)}")
    import ctypes

    import llama_cpp

    from scops.runtime.llm import init_backend

    init_backend()          # llama.cpp's per-tensor chatter goes to the debug log; errors still raise
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(in_path)
    with atomic_file(out_path) as tmp:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[key]
        params.nthread = int(threads)  # 0 = llama.cpp picks hardware concurrency
        rc = llama_cpp.llama_model_quantize(str(in_path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            if disk_nearly_full(tmp.parent):     # llama.cpp reports a failed write as rc 1 only
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            raise RuntimeError(f"llama_model_quantize({in_path} -> {qtype}) failed with return code {rc}")


def list_gguf_tensors(path: Path | str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, ggml type, shape in ggml order: ne0 first) of every tensor in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in reader.tensors]
