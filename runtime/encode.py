"""The encoder stages of a modality, run by onnxruntime (TensorRT -> CUDA -> CPU).

Providers are chosen once per session (pick_providers); each graph gets its own options
(provider_config: the TensorRT engine cache is keyed by the graph's sha256 and the GPU).

A modality's manifest stages run in order up to the projector; the projector itself
runs at splice time, straight into llama.cpp's batch memory (see project.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import BundleError

log = logging.getLogger("scops")

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PREFERRED = (TRT, CUDA, CPU)
GPU_PROVIDERS = (TRT, CUDA)
# onnxruntime's errors about the input itself: they fail on every provider alike
INPUT_ERRORS = ("InvalidArgument", "InvalidGraph", "NoSuchFile")


def pick_providers(requested=None) -> tuple[str, ...]:
    """The onnxruntime providers to ask for, best first; CPU is always the last resort.

    TensorRT only when onnxruntime was built with it and TensorRT's libraries load; CUDA and
    TensorRT only when the driver sees a GPU (an onnxruntime-gpu install on a CPU machine
    quietly stays on the CPU).
    """
    import onnxruntime as ort

    from . import gpu

    available = set(ort.get_available_providers())
    names = []
    for name in requested or PREFERRED:
        if name not in available or name in names:
            continue
        if name in GPU_PROVIDERS and not gpu.cuda_devices():
            continue
        if name == TRT and not gpu.tensorrt_available():
            continue
        names.append(name)
    if CPU not in names:
        names.append(CPU)
    if CUDA in names or TRT in names:
        gpu.preload_cuda_libraries()
    return tuple(names)


def provider_config(names, sha256: str, cache_root: Path | None) -> list:
    """onnxruntime's providers argument for one graph: TensorRT engines cached on disk under a
    key of the graph's content hash and the GPU's name (an engine is built for one GPU model)."""
    from . import gpu

    out = []
    for name in names:
        if name == TRT:
            gpus = gpu.cuda_devices()
            key = f"{sha256[:16]}-{gpu.slug(gpus[0] if gpus else 'none')}"
            cache = Path(cache_root or Path.home() / ".cache" / "scops") / "trt" / key
            cache.mkdir(parents=True, exist_ok=True)
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}))
        elif name == CUDA:
            # kSameAsRequested: the arena grows by what a run needs, not to the next power of
            # two (peak VRAM is a target of its own on 8 GB cards)
            out.append((name, {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}))
        else:
            out.append(name)
    return out


def short(provider: str) -> str:
    return provider.replace("ExecutionProvider", "")


def _session_options(threads: int, arena: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not arena:       # low memory: a run's buffers go back to the system when it ends
        so.enable_cpu_mem_arena = False
    return so


class OnnxStage:
    """One ONNX graph. On a GPU provider, a failure (at load or at run) falls back to the CPU
    provider for this graph, with a warning that says why."""

    def __init__(self, path: Path, record: dict, declared: dict, providers, threads: int,
                 sha256: str = "", cache_root: Path | None = None, arena: bool = True):
        self.path, self.name, self.threads, self.arena = path, path.name, threads, arena
        self.sess = self._open(tuple(providers), sha256, cache_root)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.shape = self.sess.get_inputs()[0].shape          # first input, symbolic dims as str
        self.output = record["output"]
        # run at most this many rows of the first axis at once (bounded activation memory:
        # 64 video frames through EVA ViT-g in one call hold ~1.5 GB); 0: all at once
        self.max_batch = int(record.get("max_batch", 0))
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

    def _open(self, providers: tuple, sha256: str, cache_root):
        import onnxruntime as ort

        config = provider_config(providers, sha256, cache_root)
        try:
            sess = ort.InferenceSession(str(self.path), _session_options(self.threads, self.arena), providers=config)
        except Exception as e:
            if providers == (CPU,):
                raise BundleError(f"{self.name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
            log.warning("%s: %s failed to load it (%s); using the CPU instead", self.name,
                        "/".join(short(p) for p in providers if p != CPU), str(e).splitlines()[0])
            return self._open((CPU,), sha256, cache_root)
        used = sess.get_providers()
        wanted = [p for p in providers if p != CPU]
        if wanted and used[0] == CPU:       # onnxruntime's own silent fallback (missing CUDA libraries)
            log.warning("%s: onnxruntime could not start %s (missing CUDA/cuDNN libraries?); "
                        "running on the CPU", self.name, "/".join(short(p) for p in wanted))
        self.backend = used[0]
        return sess

    def needs(self) -> set:
        return set(self.feeds.values())

    def run(self, ctx: dict) -> np.ndarray:
        feeds = {name: ctx[key] for name, key in self.feeds.items()}
        n = next(iter(feeds.values())).shape[0]
        if not self.max_batch or n <= self.max_batch or len(feeds) != 1:
            return self._run(feeds)
        (name, x), = feeds.items()
        parts = [self._run({name: x[i:i + self.max_batch]}) for i in range(0, n, self.max_batch)]
        return np.concatenate(parts, axis=0)

    def _run(self, feed: dict) -> np.ndarray:
        try:
            return self.sess.run(None, feed)[0]
        except Exception as e:
            if self.backend == CPU or type(e).__name__ in INPUT_ERRORS:    # bad input: not the GPU's fault
                raise
            log.warning("%s: %s failed while running (%s); falling back to the CPU for this graph",
                        self.name, short(self.backend), str(e).splitlines()[0])
            self.sess = self._open((CPU,), "", None)
            return self.sess.run(None, feed)[0]


INSTRUCTION_KEYS = {"instruction_ids", "instruction_mask"}
L2_EPS = 1e-12            # torch.nn.functional.normalize's default eps


class ArrayOp:
    """The small numpy stages between graphs (contract.STAGE_OPS): l2norm (x scale),
    mean_over_clips, select, group_tokens."""

    def __init__(self, record: dict):
        self.op, self.input, self.output = record["op"], record["input"], record["output"]
        self.scale = float(record.get("scale", 1.0))
        self.index, self.axis = int(record.get("index", 0)), int(record.get("axis", 1))
        self.skip, self.group = int(record.get("skip", 0)), int(record.get("group", 1))

    def needs(self) -> set:
        return {self.input}

    def run(self, ctx: dict) -> np.ndarray:
        x = ctx[self.input]
        if self.op == "l2norm":
            norm = np.sqrt(np.sum(np.square(x, dtype=np.float32), axis=-1, keepdims=True))
            return (x / np.maximum(norm, L2_EPS) * np.float32(self.scale)).astype(np.float32)
        if self.op == "mean_over_clips":
            return x.mean(axis=0, keepdims=True, dtype=np.float32)          # [clips, ...] -> [1, ...]
        if self.op == "group_tokens":
            b, n, d = x.shape
            if (n - self.skip) % self.group:
                raise BundleError(f"group_tokens: {n - self.skip} tokens do not split into groups of {self.group}")
            x = x[:, self.skip:, :]                                         # [B, 257, D] -> [B, 256, D]
            return np.ascontiguousarray(x).reshape(b, (n - self.skip) // self.group, d * self.group)  # -> [B, 64, 4D]
        return np.take(x, [self.index], axis=self.axis).squeeze(self.axis)  # "select"


def stage_file(record: dict, precision: str | None = None) -> str:
    """The graph an onnx stage runs: its precision variant when asked for and present."""
    return (record.get("variants") or {}).get(precision, record["file"]) if precision else record["file"]


def make_stage(bundle: Bundle, record: dict, providers, threads: int, cache_root: Path | None = None,
               arena: bool = True, precision: str | None = None, shared: dict | None = None):
    """`shared`: stage records already opened -> their stage (Emu's image and video modalities
    run the same graphs: one onnxruntime session each, not two copies of EVA-CLIP-g); a
    WeakValueDictionary, so that a stage goes with the last encoder that uses it."""
    if shared is not None:
        key = json.dumps(record, sort_keys=True)
        stage = shared.get(key)
        if stage is None:
            stage = shared[key] = make_stage(bundle, record, providers, threads, cache_root, arena, precision)
        return stage
    if record["op"] == "onnx":
        file = stage_file(record, precision)
        declared = bundle.manifest["files"][file]
        return OnnxStage(bundle.file(file), record, declared, providers, threads,
                         declared.get("sha256", ""), cache_root, arena)
    if record["op"] in ("l2norm", "mean_over_clips", "select", "group_tokens"):
        return ArrayOp(record)
    raise BundleError(f"{bundle.path}: stage op {record['op']!r} is not served by this scops version")


class ModalityEncoder:
    """Runs one modality's pre-projector stages: prepared batch -> bridge rows [1, Q, D].

    Stages before the first one that reads the instruction form the cacheable base (the
    ViT output of InstructBLIP); the rest reruns per instruction.
    """

    def __init__(self, bundle: Bundle, modality: str, providers, threads: int, cache_root: Path | None = None,
                 arena: bool = True, precision: str | None = None, shared: dict | None = None):
        spec = bundle.modalities[modality]
        self.modality = modality
        self.rows = int(spec["rows"])
        stages = []
        for st in spec["stages"]:
            if st["op"] == "projector":
                break
            stages.append(make_stage(bundle, st, providers, threads, cache_root, arena, precision, shared))
        if not stages or not isinstance(stages[0], OnnxStage):
            raise BundleError(f"{bundle.path}: modality {modality} must start with an onnx stage")
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
        if x.ndim == 2:
            x = x[:, None, :]                                   # [B, D] -> [B, 1, D]: one row
        if x.ndim != 3 or x.shape[1] != self.rows:
            raise BundleError(f"{self.modality}: encoder produced {list(x.shape)}, expected [B, {self.rows}, D]")
        return x
