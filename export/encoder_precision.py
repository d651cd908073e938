"""Encoder precision: fp16 / int8 versions of the ONNX stages, and what they cost in accuracy.

    convert_stages(bundle_dir, ["vision.onnx", "qformer.onnx"], "int8", projector, log)

int8: onnxruntime's dynamic quantization of the MatMul/Gemm weights (per-tensor int8
weights, activations quantized per call to uint8); everything else, LayerNorm included,
stays fp32. fp16: every float weight and op in fp16 except LayerNormalization (kept
fp32 against overflow), graph inputs/outputs kept fp32 so the runtime is unchanged.
The cost is measured where it matters: cosine similarity of the projected rows (what the
LLM sees) against the fp32 stages, on real photos (scikit-image's samples).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")
# Accuracy bar of a default precision: every projected row keeps cos >= 0.99 vs fp32.
MIN_COSINE = 0.99
# Graphs above this size keep their weights in a side file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30
# Ops left in fp32 by the fp16 conversion: the norms (fp16 variance overflows).
FP16_KEEP_FP32 = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"]


def stage_name(file: str, precision: str) -> str:
    """vision.onnx -> vision.int8.onnx (fp32 keeps its name)."""
    return file if precision == "fp32" else file.replace(".onnx", f".{precision}.onnx")


def _size(path: Path) -> int:
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.exists() else 0)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()                 # the quantizer's "consider pre-processing" advice
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, per_channel=False,
                         use_external_data_format=_size(src) // 4 > EXTERNAL_DATA_BYTES,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))


def open_stage(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sample_photos() -> tuple[str, list[np.ndarray]]:
    """A few real photos (RGB uint8); synthetic gradients when scikit-image is absent."""
    try:
        from skimage import data
        return "skimage:chelsea,astronaut,coffee", [data.chelsea(), data.astronaut(), data.coffee()]
    except ImportError:
        ramp = np.linspace(0, 255, 224, dtype=np.float32)
        img = np.stack([ramp[None, :].repeat(224, 0), ramp[:, None].repeat(224, 1),
                        255 - ramp[None, :].repeat(224, 0)], -1).astype(np.uint8)
        return "synthetic-gradient (scikit-image not installed)", [img]


def run_chain(paths: list[Path], pixels: np.ndarray) -> np.ndarray:
    """pixels [B,3,224,224] through the stages in order, one image at a time -> bridge rows [B,Q,Dq]."""
    sessions = [open_stage(p) for p in paths]
    out = []
    for i in range(len(pixels)):
        x = pixels[i:i + 1]
        for sess in sessions:
            x = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        out.append(x)
    del sessions
    return np.concatenate(out)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows: [..., D] x [..., D] -> [...]."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def measure_accuracy(ref: list[Path], new: list[Path], projector: dict, preprocess: dict,
                     post: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> dict:
    """Cosine of projected rows (new vs ref stages) over the sample photos; `post` is what
    the manifest does between the last graph and the projector (e.g. group_tokens)."""
    from scops.runtime.preprocess import preprocess_image

    source, photos = sample_photos()
    pixels = np.stack([preprocess_image(p, preprocess) for p in photos])      # [n, 3, 224, 224]
    w, b = projector["fc1.weight"], projector["fc1.bias"]                     # [D, Dq], [D]
    rows_ref = post(run_chain(ref, pixels)) @ w.T + b                         # [n, Q, Dq] -> [n, Q, D]
    rows_new = post(run_chain(new, pixels)) @ w.T + b
    cos = row_cosines(rows_ref, rows_new).ravel()                             # [n * Q]
    return {"photos": source, "rows": int(cos.size), "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean()), "passes": bool(cos.min() >= MIN_COSINE), "threshold": MIN_COSINE}


def convert_stages(out_dir: Path, files: list[str], precision: str, projector: dict, preprocess: dict,
                   log: Callable[[str], None] = print, post: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> dict:
    """Write the `precision` version of each stage beside the fp32 one and measure it.

    Returns {"precision", "files": {fp32 name: new name}, "accuracy": {...}, "bytes": {...}}.
    The fp32 files stay; the caller decides which the manifest points at.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision must be one of {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    if precision == "fp32":
        return {"precision": "fp32", "files": {f: f for f in files}}
    convert = quantize_int8 if precision == "int8" else convert_fp16
    mapping, sizes = {}, {}
    for f in files:
        t0 = time.perf_counter()
        dst = out_dir / stage_name(f, precision)
        convert(out_dir / f, dst)
        mapping[f] = dst.name
        sizes[f] = {"fp32": _size(out_dir / f), precision: _size(dst)}
        log(f"  {f} -> {dst.name}: {sizes[f]['fp32'] / 2**20:.1f} -> {sizes[f][precision] / 2**20:.1f} MiB "
            f"in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    acc = measure_accuracy([out_dir / f for f in files], [out_dir / mapping[f] for f in files],
                           projector, preprocess, post)
    log(f"  {precision} vs fp32, projected rows on {acc['photos']}: cos min {acc['cos_min']:.5f}, "
        f"mean {acc['cos_mean']:.5f} ({'passes' if acc['passes'] else 'FAILS'} >= {MIN_COSINE}; "
        f"{time.perf_counter() - t0:.1f}s)")
    return {"precision": precision, "files": mapping, "accuracy": acc, "bytes": sizes}


def remove_stage(path: Path) -> None:
    """Delete an ONNX file and its external-data side file."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)



def save_optimized(src: Path, dst: Path, level: str = "extended") -> Path:
    """Save onnxruntime's CPU-optimised graph of `src` (fusions done once, at export).

    "extended" fusions (Attention, SkipLayerNorm, BiasGelu, ...) use com.microsoft ops
    that only onnxruntime runs, and "all" adds CPU-specific layouts (NCHWc): the result
    is for onnxruntime's CPU provider only, so the portable graph stays the default stage
    file and this one is recorded beside it (a CPU runtime may open it instead).
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if _size(Path(src)) > EXTERNAL_DATA_BYTES:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", Path(dst).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Path(dst)
