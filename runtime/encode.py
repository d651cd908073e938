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
    def __init__(self, path: Path, record: dict, declared: dict, providers: list, threads: int):
        import onnxruntime as ort

        try:
            self.sess = ort.InferenceSession(str(path), _session_options(threads), providers=providers)
        except Exception as e:
            raise BundleError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self.name = path.name
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.output = record["output"]
        # graph input name -> context key it is fed from
        self.feeds = dict(record.get("inputs") or {n: n for n in self.inputs})
        want_in = list(declared.get("inputs", {}))
        if sorted(self.feeds) != sorted(self.inputs) or want_in and want_in != self.inputs:
            raise BundleError(f"{path.name}: graph inputs {self.inputs} differ from the manifest "
                              f"{want_in or list(self.feeds)}")
        for i in self.sess.get_inputs():
            decl = declared.get("inputs", {}).get(i.name, {}).get("shape")
            if decl and [d if isinstance(d, int) else None for d in decl] != \
                    [d if isinstance(d, int) else None for d in i.shape]:
                raise BundleError(f"{path.name}: input {i.name} shape {i.shape} differs from the manifest {decl}")

    def needs(self) -> set:
        return set(self.feeds.values())

    def run(self, ctx: dict) -> np.ndarray:
        return self.sess.run(None, {name: ctx[key] for name, key in self.feeds.items()})[0]


INSTRUCTION_KEYS = {"instruction_ids", "instruction_mask"}


class ModalityEncoder:
    """Runs one modality's pre-projector stages: preprocessed batch -> bridge rows [B, Q, D].

    Stages before the first one that reads the instruction form the cacheable base (the
    ViT output of InstructBLIP); the rest reruns per instruction.
    """

    def __init__(self, bundle: Bundle, modality: str, providers: list, threads: int):
        spec = bundle.modalities[modality]
        self.modality = modality
        self.rows = int(spec["rows"])
        self.input_key = None
        stages = []
        for st in spec["stages"]:
            if st["op"] == "projector":
                break
            if st["op"] != "onnx":
                raise BundleError(f"{bundle.path}: stage op {st['op']!r} is not served by this scops version")
            declared = bundle.manifest["files"][st["file"]]
            stages.append(OnnxStage(bundle.file(st["file"]), st, declared, providers, threads))
        if not stages:
            raise BundleError(f"{bundle.path}: modality {modality} has no encoder stage")
        self.input_key = next(iter(stages[0].feeds.values()))
        split = next((i for i, s in enumerate(stages) if s.needs() & INSTRUCTION_KEYS), len(stages))
        self.base, self.rest = stages[:split], stages[split:]

    @property
    def uses_instruction(self) -> bool:
        return bool(self.rest)

    def encode_base(self, batch: np.ndarray) -> dict:
        ctx = {self.input_key: batch}
        for stage in self.base:
            ctx[stage.output] = stage.run(ctx)
        return ctx

    def encode_rows(self, base: dict, instruction: dict | None = None) -> np.ndarray:
        ctx = dict(base, **(instruction or {}))
        for stage in self.rest:
            ctx[stage.output] = stage.run(ctx)
        x = ctx[(self.rest or self.base)[-1].output]
        if x.ndim != 3 or x.shape[1] != self.rows:
            raise BundleError(f"{self.modality}: encoder produced {list(x.shape)}, expected [B, {self.rows}, D]")
        return x
