"""The encoder stages of a modality, run by onnxruntime (TensorRT -> CUDA -> CPU).

A modality's manifest stages run in order up to the projector; the projector itself
runs at splice time, straight into llama.cpp's batch memory (see project.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import BundleError

log = logging.getLogger("scops")

_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def pick_providers(requested=None, cache_dir: Path | None = None) -> list:
    """The providers to use, best first, with a TensorRT engine cache on disk."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = [p for p in (requested or _PREFERRED) if p in available] or ["CPUExecutionProvider"]
    out = []
    for name in names:
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                               "trt_fp16_enable": True}))
        else:
            out.append(name)
    return out


def _session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OnnxStage:
    def __init__(self, path: Path, declared: dict, providers: list, threads: int):
        import onnxruntime as ort

        try:
            self.sess = ort.InferenceSession(str(path), _session_options(threads), providers=providers)
        except Exception as e:
            raise BundleError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.name = path.name
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        want_in = list(declared.get("inputs", {}))
        want_out = list(declared.get("outputs", {}))
        if want_in and want_in != self.inputs or want_out and want_out != self.outputs:
            raise BundleError(f"{path.name}: graph I/O {self.inputs}->{self.outputs} differs from the manifest "
                              f"{want_in}->{want_out}")
        for i in self.sess.get_inputs():
            decl = declared.get("inputs", {}).get(i.name, {}).get("shape")
            if decl and [d if isinstance(d, int) else None for d in decl] != \
                    [d if isinstance(d, int) else None for d in i.shape]:
                raise BundleError(f"{path.name}: input {i.name} shape {i.shape} differs from the manifest {decl}")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.inputs[0]: x})[0]


class ModalityEncoder:
    """Runs one modality's pre-projector stages: preprocessed batch -> bridge rows [B, Q, D]."""

    def __init__(self, bundle: Bundle, modality: str, providers: list, threads: int):
        spec = bundle.modalities[modality]
        self.modality = modality
        self.rows = int(spec["rows"])
        self.stages = []
        for st in spec["stages"]:
            if st["op"] == "projector":
                break
            if st["op"] != "onnx":
                raise BundleError(f"{bundle.path}: stage op {st['op']!r} is not served by this scops version")
            declared = bundle.manifest["files"][st["file"]]
            self.stages.append(OnnxStage(bundle.file(st["file"]), declared, providers, threads))

    def encode(self, batch: np.ndarray) -> np.ndarray:
        x = batch
        for stage in self.stages:
            x = stage.run(x)
        if x.ndim != 3 or x.shape[1] != self.rows:
            raise BundleError(f"{self.modality}: encoder produced {list(x.shape)}, expected [B, {self.rows}, D]")
        return x
