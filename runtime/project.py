"""The projector stage: bridge rows -> LLM embedding rows, written in place.

Runs the fused projector of scops.kernels (CUDA -> C++ -> numpy reference, chosen and
logged there). chat.py's fill callback calls it on the llama batch's embd memory.
"""
from __future__ import annotations

from .bundle import Bundle
from .errors import BundleError


def projector_stage(bundle: Bundle, modality: str) -> dict:
    stages = [s for s in bundle.modalities[modality]["stages"] if s["op"] == "projector"]
    if len(stages) != 1:
        raise BundleError(f"{bundle.path}: modality {modality} needs exactly one projector stage")
    return stages[0]


def load_projector(bundle: Bundle, stage: dict, backend: str = "auto", threads: int = 0):
    from safetensors.numpy import load_file

    from scops.kernels import Projector, ProjectorSpec

    try:
        weights = load_file(str(bundle.file(stage["file"])))
    except Exception as e:
        raise BundleError(f"{stage['file']}: unreadable safetensors ({e})") from None
    spec = ProjectorSpec(
        in_dim=int(stage["in_dim"]), out_dim=int(stage["out_dim"]), hidden_dim=int(stage.get("hidden_dim", 0)),
        layernorm=bool(stage.get("layernorm", False)), ln_eps=float(stage.get("ln_eps", 1e-5)),
        gelu=stage.get("gelu", "none"), bias=bool(stage.get("bias", True)),
        l2norm=bool(stage.get("l2norm", False)), scale=float(stage.get("scale", 1.0)))
    w1 = weights.get("fc1.weight")
    want = (spec.hidden_dim or spec.out_dim, spec.in_dim)
    if w1 is None or tuple(w1.shape) != want:
        raise BundleError(f"{stage['file']}: fc1.weight is {None if w1 is None else list(w1.shape)}, "
                          f"manifest says {list(want)}")
    try:
        return Projector.create(spec, weights, backend=backend, threads=threads)
    except ValueError as e:
        raise BundleError(f"{stage['file']}: {e}") from None

