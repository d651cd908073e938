"""ONNX exports declared as data, and validated against PyTorch right after export.

Each stage is an `OnnxStageSpec`: inputs with symbolic dims, outputs, dynamic axes,
opset and tolerance. `export_stage` traces at `trace_batch` (`trace_stage`, then `save_stage`);
`validate_stage` then runs
onnxruntime at `check_batch` (a batch size other than the traced one) on fresh random
inputs and compares with the PyTorch module. Nothing here knows about families.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# Opset 17 is the first with a native LayerNormalization op: norms stay one fp32 node
# (the fp16-overflow pitfall of decomposed LayerNorm in fp16 engines).
DEFAULT_OPSET = 17
# Parity bar of the project: an ONNX stage matches PyTorch to 1e-4 (max abs diff).
DEFAULT_ATOL = 1e-4
# Graphs with more weight bytes than this keep them in a side file: needed past protobuf's
# 2 GiB limit, and it lowers what onnxruntime needs to build a session, since it reads an
# inline graph whole before making its tensors (measured: the 0.99 GB int8 ViT-g peaks at
# +1.6 GiB while its session is built inline, +0.98 GiB with a side file).
EXTERNAL_DATA_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple            # ints and symbolic names, e.g. ("batch", 3, 224, 224)
    dtype: str = "float32"  # "float32" | "int64"
    high: int = 0           # exclusive upper bound for random integer inputs


@dataclass(frozen=True)
class OnnxStageSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = DEFAULT_OPSET
    atol: float = DEFAULT_ATOL
    trace_batch: int = 1
    check_batch: int = 2
    sizes: dict = field(default_factory=dict)   # values for symbolic dims other than "batch"
    # sizes at validation (default: `sizes`): graphs whose dynamic dims are not the batch
    # (a picture's height/width, a caption's length) are checked at other values of those
    check_sizes: dict = field(default_factory=dict)
    # inputs whose values must be valid (masks, ids): (spec, batch, seed, sizes) -> arrays
    make: Callable | None = None
    # a stage whose outputs are not continuous in its inputs (a top-k selection) names its own
    # check: (module, spec, path, inputs, PyTorch outputs, log) -> (max abs diff, facts for the
    # manifest's validation record); it gets the module
    compare: Callable | None = None

    def dynamic_axes(self) -> dict:
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def concrete(self, t: TensorSpec, batch: int, sizes: dict | None = None) -> tuple[int, ...]:
        sizes = self.sizes if sizes is None else sizes
        return tuple(batch if d == "batch" else sizes[d] if isinstance(d, str) else d for d in t.shape)

    def describe(self) -> dict:
        """The manifest's record of this graph: I/O names, shapes (symbolic kept), dtypes."""
        return {
            "inputs": {t.name: {"shape": list(t.shape), "dtype": t.dtype} for t in self.inputs},
            "outputs": {t.name: {"shape": list(t.shape), "dtype": t.dtype} for t in self.outputs},
            "opset": self.opset,
        }


def make_inputs(spec: OnnxStageSpec, batch: int, seed: int, sizes: dict | None = None) -> list[np.ndarray]:
    sizes = spec.sizes if sizes is None else sizes
    if spec.make is not None:
        return spec.make(spec, batch, seed, sizes)
    rng = np.random.default_rng(seed)
    arrays = []
    for t in spec.inputs:
        shape = spec.concrete(t, batch, sizes)
        if t.dtype == "int64":
            arrays.append(rng.integers(0, max(t.high, 2), size=shape, dtype=np.int64))
        else:
            arrays.append(rng.standard_normal(shape, dtype=np.float32))
    return arrays


def trace_stage(module, spec: OnnxStageSpec, scratch: Path) -> Path:
    """torch.onnx.export at spec.trace_batch into `scratch` (over protobuf's 2 GiB limit torch
    writes one loose file per tensor there)."""
    import torch

    raw = Path(scratch) / spec.file
    args = tuple(torch.from_numpy(a) for a in make_inputs(spec, spec.trace_batch, seed=0))
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # HF code branches on shapes fixed by the spec (e.g. the 32 queries): not data-dependent
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, args, str(raw), dynamo=False,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), opset_version=spec.opset,
            do_constant_folding=True,
        )
    return raw


def save_stage(raw: Path, spec: OnnxStageSpec, out_dir: Path) -> Path:
    """Re-save a traced graph as spec.file in out_dir (+ one spec.file.data when large), checked."""
    import onnx

    path = Path(out_dir) / spec.file
    model = onnx.load(str(raw))                    # pulls in loose tensor files if any
    weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=spec.file + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    del model
    onnx.checker.check_model(str(path))
    return path


def export_stage(module, spec: OnnxStageSpec, out_dir: Path) -> Path:
    """Trace `module` at spec.trace_batch and write spec.file into out_dir (via a scratch dir)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-export-") as scratch:
        return save_stage(trace_stage(module, spec, Path(scratch)), spec, out_dir)


def reference_outputs(module, spec: OnnxStageSpec, seed: int = 1) -> tuple[list, list]:
    """(inputs, PyTorch outputs) at spec.check_batch: the PyTorch side of the check."""
    import torch

    inputs = make_inputs(spec, spec.check_batch, seed=seed, sizes={**spec.sizes, **spec.check_sizes})
    with torch.no_grad():
        ref = module(*(torch.from_numpy(a) for a in inputs))
    return inputs, [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]


def max_abs_diff(spec: OnnxStageSpec, ref: list, got: list) -> float:
    """Max abs diff over the outputs (zip order); infinities must sit at the same places with the
    same signs (e.g. GroundingDINO's -inf past the caption) and the finite rest is compared."""
    diff = 0.0
    for r, g, t in zip(ref, got, spec.outputs):
        if r.shape != g.shape:
            raise RuntimeError(f"{spec.file}: output {t.name} shape {g.shape} != PyTorch {r.shape}")
        r, g = r.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(r)
        if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(r[~finite], g[~finite]):
            raise RuntimeError(f"{spec.file}: output {t.name}: infinities differ from PyTorch's")
        if finite.any():
            diff = max(diff, float(np.max(np.abs(r[finite] - g[finite]))))
    return diff


def compare_stage(spec: OnnxStageSpec, path: Path, inputs: list, ref: list) -> float:
    """Max abs diff between onnxruntime on `inputs` and the PyTorch outputs; raises above atol."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {t.name: a for t, a in zip(spec.inputs, inputs)})
    diff = max_abs_diff(spec, ref, got)
    if not np.isfinite(diff) or diff > spec.atol:
        raise RuntimeError(f"{spec.file}: ONNX vs PyTorch max abs diff {diff:.3g} > {spec.atol:g} "
                           f"at batch {spec.check_batch}")
    return diff


def validate_stage(module, spec: OnnxStageSpec, path: Path, seed: int = 1) -> float:
    """Max abs diff between onnxruntime and PyTorch at spec.check_batch; raises above atol."""
    return compare_stage(spec, path, *reference_outputs(module, spec, seed))


def export_and_validate(module, spec: OnnxStageSpec, out_dir: Path,
                        log: Callable[[str], None] = print) -> dict:
    """Export, then check against PyTorch.  The PyTorch outputs are computed first, so the
    module (this function holds the last reference when called as f(build(), ...)) is freed
    right after tracing: re-saving the graph and the onnxruntime check run without it (a
    1 B-parameter ViT-g is 4 GiB in fp32; it is no longer held twice in those steps)."""
    import gc

    import tempfile

    t0 = time.perf_counter()
    inputs, ref = reference_outputs(module, spec)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-export-") as scratch:
        raw = trace_stage(module, spec, Path(scratch))
        if spec.compare is None:
            del module                           # the graph is loaded again below without it
            gc.collect()
        path = save_stage(raw, spec, out_dir)
    t1 = time.perf_counter()
    facts = {}
    if spec.compare is None:
        diff = compare_stage(spec, path, inputs, ref)
    else:
        diff, facts = spec.compare(module, spec, path, inputs, ref, log)
    at = f"batch {spec.check_batch}" + "".join(f", {k} {v}" for k, v in spec.check_sizes.items())
    bar = f"<= {spec.atol:g}" if diff <= spec.atol else "within float32's own error, see above"
    log(f"  {spec.file}: exported in {t1 - t0:.1f}s; onnxruntime vs PyTorch at {at}: "
        f"max abs diff {diff:.2e} ({bar})")
    out = {"max_abs_diff": diff, "batch": spec.check_batch, "atol": spec.atol, **facts}
    if spec.check_sizes:
        out["sizes"] = dict(spec.check_sizes)
    return out
