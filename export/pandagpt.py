"""PandaGPT exporter: ImageBind-huge (six modalities) + llama_proj + Vicuna v0 with LoRA.

`--from FOLDER` holding the release's pieces as PandaGPT's authors publish them:
  imagebind_huge.pth      ImageBind-huge state dict, original key names (sizes read off it)
  <LLaMA folder>/         Vicuna v0 as an HF LLaMA folder (safetensors or .bin, sharded or
                          not; the one LLaMA sub-folder, e.g. vicuna/, or --llm)
  pytorch_model.pt        PandaGPT delta as DeepSpeedAgent.save_model writes it: the trainable
                          parameters (nn.Parameters, requires_grad) under their model names:
                          llama_proj.{weight,bias} and the LoRA A/B of q,k,v,o
                          (llama_model.base_model.model.model.layers.N.self_attn.*_proj.lora_{A,B}
                          [.default].weight), possibly wrapped in {'model': ...}

The LoRA delta is MERGED into the LLaMA weights while they stream into the GGUF
(W += alpha/r * B @ A; r from the tensors, alpha 32 from code/config/openllama_peft.yaml):
one set of weights to quantize and run at full llama.cpp speed; a GGUF adapter would keep a
second matmul per projection at every decode step and an F16 side file, for nothing a chat
needs (the adapter is never switched off).

Each modality is one ImageBind graph -> (mean over clips) -> llama_proj -> one row; the
inputs of one turn are summed into that row (the manifest's "combine").
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from scops.runtime.errors import ExportError
from scops.runtime.families import family

from .assemble import FamilyExport, assemble_bundle
from .checkpoints import read_state_dict
from .releases import find_llm_folder, find_release_file, llama_config, resolve_source

FAMILY = "pandagpt"
LORA_ALPHA = 32                          # code/config/openllama_peft.yaml (lora_r 32, lora_alpha 32)
_LORA_KEY = re.compile(r"llama_model\.base_model\.model\.(model\.layers\.\d+\.self_attn\.[qkvo]_proj)"
                       r"\.lora_([AB])(?:\.default)?\.weight$")
# modality -> (ImageBind ONNX use, input name, clips averaged?, preprocess record)
MODALITIES = {
    "image": ("vision", "pixel_values", False, {"kind": "image", "size": 224, "resize": "short_side_crop",
                                                "interpolation": "bicubic", "mean": [0.48145466, 0.4578275,
                                                0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}),
    "audio": ("audio", "fbank", True, {"kind": "audio", "recipe": "imagebind"}),
    "video": ("video", "frames", True, {"kind": "video"}),
    "thermal": ("thermal", "thermal", False, {"kind": "thermal"}),
    "depth": ("depth", "depth", False, {"kind": "depth"}),
    "imu": ("imu", "imu", False, {"kind": "imu"}),
}


def read_delta(src: Path) -> tuple[dict, dict]:
    """-> (llama_proj tensors, {hf weight name: (A [r, in], B [out, r])}) as numpy."""
    path = find_release_file(src, ("pytorch_model.pt",))
    state = read_state_dict(path, "PandaGPT delta weights")            # Parameters, wrappers, fp16: all fine
    proj = {k[len("llama_proj."):]: v.numpy() for k, v in state.items() if k.startswith("llama_proj.")}
    lora: dict = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            lora.setdefault(m.group(1) + ".weight", {})[m.group(2)] = v.numpy()
    if set(proj) != {"weight", "bias"}:
        raise ExportError(f"{path}: llama_proj.weight/bias missing")
    broken = [k for k, ab in lora.items() if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]]
    if broken or not lora:
        raise ExportError(f"{path}: {'no LoRA weights' if not lora else 'unpaired LoRA A/B for ' + broken[0]}")
    return proj, {k: (ab["A"], ab["B"]) for k, ab in lora.items()}


def lora_merger(lora: dict, alpha: float) -> Callable[[str, np.ndarray], np.ndarray]:
    def adjust(name: str, w: np.ndarray) -> np.ndarray:
        if name not in lora:
            return w
        a, b = lora[name]                                       # [r, in], [out, r]
        return w + (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
    return adjust


def load_imagebind(src: Path):
    from .imagebind import build_imagebind, load_imagebind_state
    from .imagebind_modules import ImageBindSizes

    path = find_release_file(src, ("imagebind_huge.pth",))
    state = read_state_dict(path, "ImageBind-huge weights")
    try:
        model = build_imagebind(ImageBindSizes.from_state(state, path))
        load_imagebind_state(model, state)
    except KeyError as e:
        raise ExportError(str(e).strip("'\"")) from None
    return model.eval()


def export_pandagpt(src: str, out: Path, quant: str = "Q4_K_M", log: Callable[[str], None] = print,
                    encoder_precision: str = "fp32", llm: str | None = None) -> Path:
    import torch

    from scops.runtime.templates import PANDAGPT

    from .imagebind import imagebind_stage_specs, make_encoder

    if encoder_precision != "fp32":
        raise ExportError("pandagpt: --encoder-precision other than fp32 is not supported yet")
    src_dir = resolve_source(src, family(FAMILY))
    vicuna = find_llm_folder(src_dir, llm)
    text_cfg = llama_config(vicuna)
    proj, lora = read_delta(src_dir)
    model = load_imagebind(src_dir)
    specs = imagebind_stage_specs(model.sizes)
    stages, modalities = [], {}
    record = {"op": "projector", "file": "projector.safetensors", "in_dim": int(proj["weight"].shape[1]),
              "out_dim": int(proj["weight"].shape[0]), "bias": True}
    for modality, (use, input_name, averaged, pre) in MODALITIES.items():
        spec = specs[use]
        stages.append((lambda use=use: make_encoder(model, use, FAMILY).eval(), spec))
        chain = [{"op": "onnx", "file": spec.file, "inputs": {input_name: input_name}, "output": "embedding"}]
        if averaged:
            chain.append({"op": "mean_over_clips", "input": "embedding", "output": "embedding_mean"})
        modalities[modality] = {"preprocess": pre, "rows": 1, "stages": chain + [record]}
    fam = FamilyExport(
        family=FAMILY, stages=tuple(stages), projection_prefix="llama_proj.", llm_prefix="",
        text_config=text_cfg, template=PANDAGPT, modalities=modalities,
        facts={"combine": {"op": "sum"},
               "lora": {"merged": True, "r": int(next(iter(lora.values()))[0].shape[0]),
                        "alpha": float(LORA_ALPHA), "tensors": len(lora)}},
        llm_dir=vicuna, llm_adjust=lora_merger(lora, float(LORA_ALPHA)),
        load=lambda prefix: {k: torch.from_numpy(v) for k, v in proj.items()},
    )
    return assemble_bundle(fam, src_dir, out, quant, log)
