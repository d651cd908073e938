"""How much memory a bundle needs under given options, and how much this machine has free.

    need = estimate(bundle, opts, "f16")   # {"llm": ..., "kv": ..., "encoders": ..., "runtime": ..., "total": ...}
    check_fits(bundle, opts, "f16")        # BundleError, one line, when it does not fit

Session.open calls check_fits before it loads anything, so a bundle that cannot fit is
refused with what it needs and what is free, instead of being killed later by the
OOM killer. "Free" is /proc/meminfo's MemAvailable (page cache counts as free: the
kernel drops it on demand), capped by the cgroup's memory.max when the process runs in
one (a container's limit, which MemAvailable does not show).
"""
from __future__ import annotations

from pathlib import Path

from .errors import BundleError

GIB = 2**30
# Bytes per KV element of each cache type: f16 2, f32 4, q8_0 34 per block of 32 values.
KV_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
# What a session holds beyond weights and KV cache. Measured on minigpt4-7b with
# `scops bench --shape minigpt4-7b --memory` (2 CPU threads; README "A 7B model in 8 GB"):
# Python with numpy, onnxruntime and llama.cpp loaded, plus the projector, 0.09 GiB;
# llama.cpp's context beyond its KV cache ~0.05 GiB after the warm-up; an int8 ViT-g +
# Q-Former run 0.20-0.26 GiB above its sessions with the ONNX arena off. The estimate rounds
# these up to keep the refusal on the safe side (a wrong "fits" ends in the OOM killer; a
# wrong "does not fit" only in a message): it was 5.94 GiB for a measured 5.39 GiB peak of the
# low-memory profile. With llama.cpp's weight repacking on (the default profile) RSS also
# counts the GGUF pages the repacked tensors were read from (2.9 GiB of a 7B Q4_K_M): clean
# file pages the kernel drops under pressure, left out here (default: 10.9 GiB estimated,
# 11.9 GiB peak RSS measured).
RUNTIME_BASE = int(0.45 * GIB)
COMPUTE_PER_BATCH_ROW = int(0.75 * 2**20)      # llama.cpp compute buffer per n_batch row
ARENA_FRACTION = {True: 0.30, False: 0.15}      # encoder activations, x encoder weight bytes


def _file_bytes(path: Path) -> int:
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def llm_shape(path: Path) -> dict:
    """n_layer, n_embd, n_head, n_head_kv of a GGUF from its metadata, read by llama.cpp
    (a vocab-only load: no weights are mapped)."""
    import ctypes

    import llama_cpp as L

    from .llm import init_backend

    init_backend()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BundleError(f"{path}: llama.cpp could not read this GGUF")
    buf = ctypes.create_string_buffer(128)

    def meta(key: str) -> str:
        n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else ""
    try:
        arch = meta("general.architecture")
        keys = {"n_layer": "block_count", "n_embd": "embedding_length", "n_head": "attention.head_count",
                "n_head_kv": "attention.head_count_kv"}
        shape = {k: meta(f"{arch}.{v}") for k, v in keys.items()}
    finally:
        L.llama_model_free(model)
    if not shape["n_head_kv"]:
        shape["n_head_kv"] = shape["n_head"]
    try:
        return {k: int(v) for k, v in shape.items()}
    except ValueError:
        raise BundleError(f"{path}: GGUF metadata lacks the {arch} layer/head counts ({shape})") from None


def kv_bytes(shape: dict, n_ctx: int, kv_type: str) -> int:
    """K and V of every layer for n_ctx positions: n_ctx x n_layer x 2 x (n_head_kv x head_dim)."""
    width = shape["n_head_kv"] * (shape["n_embd"] // shape["n_head"])
    return int(n_ctx * shape["n_layer"] * 2 * width * KV_BYTES.get(kv_type, 2.0))


def llm_in_ram(opts) -> bool:
    """Whether the LLM's weights and KV cache live in RAM: on CPU, and on a Jetson, whose GPU
    shares it; not when layers go to a discrete GPU (then VRAM is what they need)."""
    if opts.n_gpu_layers == 0 or getattr(opts, "device", "auto") == "cpu":
        return True
    import llama_cpp
    return not llama_cpp.llama_supports_gpu_offload() or Path("/etc/nv_tegra_release").exists()


def estimate(bundle, opts, kv_type: str) -> dict:
    """Bytes the session will hold at its peak (an image turn), by part; kv_type as resolved."""
    from .encode import stage_file
    from .session import media_batch

    shape = llm_shape(bundle.llm_path)
    n_ctx = min(opts.n_ctx_start, opts.n_ctx) if opts.n_ctx_start > 0 else opts.n_ctx
    files = {stage_file(st, opts.encoder_precision) for spec in bundle.modalities.values()
             for st in spec["stages"] if st["op"] == "onnx"}
    enc = sum(_file_bytes(bundle.file(f)) for f in files)
    in_ram = llm_in_ram(opts)
    parts = {
        "llm": bundle.llm_path.stat().st_size if in_ram else 0,
        "kv": kv_bytes(shape, n_ctx, kv_type) if in_ram else 0,
        "encoders": int(enc * (1 + ARENA_FRACTION[bool(opts.onnx_arena)])),
        "runtime": RUNTIME_BASE + COMPUTE_PER_BATCH_ROW * media_batch(opts.n_batch, bundle.manifest),
    }
    parts["total"] = sum(parts.values())
    return parts


def _cgroup_free() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), None when unlimited."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        root = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup limit; None if unknown."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = _cgroup_free()
    if cg is not None:
        free = cg if free is None else min(free, cg)
    return free


def check_fits(bundle, opts, kv_type: str) -> dict:
    """The estimate; BundleError (one line) when it exceeds the memory available."""
    need = estimate(bundle, opts, kv_type)
    free = available_bytes()
    if free is not None and need["total"] > free:
        parts = ", ".join(f"{k} {need[k] / GIB:.1f}" for k in ("llm", "kv", "encoders", "runtime"))
        hint = "" if opts.low_memory else "; the low-memory profile (--low-memory) needs less"
        raise BundleError(f"{bundle.path}: needs about {need['total'] / GIB:.1f} GiB of memory ({parts} GiB) "
                          f"but {free / GIB:.1f} GiB is available{hint}")
    return need


