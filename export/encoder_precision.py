"""Encoder precision: fp16 / int8 versions of the ONNX stages, and what they cost in accuracy.

    convert_stages(bundle_dir, ["vision.onnx", "qformer.onnx"], "int8", projector, log)

int8: onnxruntime's dynamic quantization of the MatMul/Gemm weights (per-tensor int8
weights, activations quantized per call to uint8); everything else, LayerNorm included,
stays fp32. fp16 (the GPU precision): every float weight and op in fp16 except
LayerNormalization and Softmax (always fp32: variance and exp overflow fp16) and the nodes
that touch a value beyond fp16's safe range on the sample photos (measured on the fp32
graph, see fp16_overflow_nodes); graph inputs/outputs stay fp32 so the runtime is unchanged.
The cost is measured where it matters: cosine similarity of the projected rows (what the
LLM sees) against the fp32 stages, on real photos (scikit-image's samples); an fp16 export
whose worst row falls under MIN_COSINE["fp16"] is refused.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .onnx_stages import EXTERNAL_DATA_BYTES

PRECISIONS = ("fp32", "fp16", "int8")
# Accuracy bar per precision: every projected row keeps at least this cosine vs fp32.
# fp16 must be near-lossless (0.999, refused below); int8 trades more for CPU speed (recorded).
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
# Ops left in fp32 by the fp16 conversion: the norms (fp16 variance overflows) and softmax
# (exp of large logits overflows).
FP16_KEEP_FP32 = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "Softmax"]
# A tensor whose magnitude on the sample photos exceeds fp16's largest finite value (65504)
# divided by this headroom keeps its producer and consumers in fp32: 8x leaves room for
# inputs brighter than the samples.
FP16_HEADROOM = 8.0
FP16_MAX = 65504.0
# Sentinels, not activations: attention masks multiply by float32's lowest (-3.4e38); the
# converter clamps such constants to fp16's range, which keeps their meaning (a huge negative
# bias), so magnitudes from here up do not pin a node to fp32.
FP16_SENTINEL = 1e30


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
                         use_external_data_format=_size(src) // 4 > EXTERNAL_DATA_BYTES,   # int8: 1/4 of fp32
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def fp16_overflow_nodes(src: Path, feeds: list[dict]) -> list[str]:
    """Names of the nodes that produce or consume a float tensor whose magnitude on `feeds`
    (the fp32 graph run on the sample inputs) exceeds FP16_MAX / FP16_HEADROOM (sentinels apart)."""
    import onnx

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    known = {o.name for o in model.graph.output}
    for name in sorted(floats - known):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = src.with_name(f".{src.stem}.probe.onnx")        # beside src: its external data resolves
    onnx.save(model, str(probe))
    try:
        sess = open_stage(probe)
        names = [o.name for o in sess.get_outputs()]
        peak = dict.fromkeys(names, 0.0)
        for feed in feeds:
            for name, value in zip(names, sess.run(None, feed)):
                if value.size and np.issubdtype(value.dtype, np.floating):
                    peak[name] = max(peak[name], float(np.nanmax(np.abs(value))))
        del sess
    finally:
        probe.unlink(missing_ok=True)
    hot = {n for n, v in peak.items() if FP16_MAX / FP16_HEADROOM < v < FP16_SENTINEL}
    return [node.name for node in model.graph.node if hot & (set(node.output) | set(node.input))]


def _skip_fp16_round_trips(model) -> int:
    """Turn fp32 -> fp16 -> fp32 cast pairs into fp32 -> fp32 (no-ops onnxruntime removes).

    The converter keeps a blocked node's arithmetic in fp32 but still stores the tensor
    between two blocked nodes as fp16 (Cast down, Cast up): a value beyond 65504 overflows
    there all the same. Where every consumer of an fp16 cast casts straight back to fp32,
    the tensor stays fp32. Returns the number of round trips removed.
    """
    import onnx

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input)}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
    fixed = 0
    for n in g.node:
        mid = n.output[0] if n.output else None
        if cast_to(n) != onnx.TensorProto.FLOAT16 or types.get(n.input[0]) != onnx.TensorProto.FLOAT \
                or mid in outputs or not consumers.get(mid):
            continue
        if all(cast_to(c) == onnx.TensorProto.FLOAT for c in consumers[mid]):
            next(a for a in n.attribute if a.name == "to").i = onnx.TensorProto.FLOAT
            for v in g.value_info:
                if v.name == mid:
                    v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            fixed += 1
    return fixed


def convert_fp16(src: Path, dst: Path, keep_nodes: list[str] | None = None) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32,
                                     node_block_list=keep_nodes or [])
    _skip_fp16_round_trips(model)
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
    return {"photos": source, "rows": int(cos.size), "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


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
    mapping, sizes, kept = {}, {}, {}
    feeds = stage_feeds([out_dir / f for f in files], preprocess) if precision == "fp16" else None
    for i, f in enumerate(files):
        t0 = time.perf_counter()
        dst = out_dir / stage_name(f, precision)
        if precision == "fp16":
            kept[f] = fp16_overflow_nodes(out_dir / f, feeds[i])
            if kept[f]:
                log(f"  {f}: {len(kept[f])} nodes touch values beyond fp16's safe range: kept in fp32")
            convert_fp16(out_dir / f, dst, kept[f])
        else:
            quantize_int8(out_dir / f, dst)
        mapping[f] = dst.name
        sizes[f] = {"fp32": _size(out_dir / f), precision: _size(dst)}
        log(f"  {f} -> {dst.name}: {sizes[f]['fp32'] / 2**20:.1f} -> {sizes[f][precision] / 2**20:.1f} MiB "
            f"in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    acc = measure_accuracy([out_dir / f for f in files], [out_dir / mapping[f] for f in files],
                           projector, preprocess, post)
    bar = MIN_COSINE[precision]
    acc.update(threshold=bar, passes=bool(acc["cos_min"] >= bar))
    log(f"  {precision} vs fp32, projected rows on {acc['photos']}: cos min {acc['cos_min']:.5f}, "
        f"mean {acc['cos_mean']:.5f} ({'passes' if acc['passes'] else 'FAILS'} >= {bar}; "
        f"{time.perf_counter() - t0:.1f}s)")
    result = {"precision": precision, "files": mapping, "accuracy": acc, "bytes": sizes}
    if precision == "fp16":
        result["fp32_ops"] = FP16_KEEP_FP32
        result["fp32_nodes"] = {f: len(v) for f, v in kept.items()}
        if not acc["passes"]:
            for f in files:
                remove_stage(out_dir / mapping[f])
            raise ValueError(f"fp16 encoders fall short: projected rows cos min {acc['cos_min']:.5f} < {bar} "
                             "against fp32; export with --encoder-precision fp32")
    return result


def stage_feeds(paths: list[Path], preprocess: dict) -> list[list[dict]]:
    """Each stage's input feeds on the sample photos, from the fp32 chain: [stage][photo] -> {name: array}."""
    from scops.runtime.preprocess import preprocess_image

    _, photos = sample_photos()
    sessions = [open_stage(p) for p in paths]
    feeds: list[list[dict]] = [[] for _ in paths]
    for photo in photos:
        x = preprocess_image(photo, preprocess)[None]                          # [1, 3, H, W]
        for i, sess in enumerate(sessions):
            feed = {sess.get_inputs()[0].name: x}
            feeds[i].append(feed)
            x = sess.run(None, feed)[0]
    del sessions
    return feeds


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
