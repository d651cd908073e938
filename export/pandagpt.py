"""PandaGPT exporter: ImageBind-huge (six modalities) + llama_proj + Vicuna v0 with LoRA.

Source folder (the original release's pieces side by side):
  imagebind_huge.pth      ImageBind-huge state dict, original key names
  imagebind_sizes.json    optional: trunk widths/depths/heads (default: huge)
  vicuna/                 Vicuna v0 as an HF LLaMA folder (safetensors + tokenizer.model)
  pytorch_model.pt        PandaGPT delta: llama_proj.{weight,bias} and the LoRA A/B of
                          q,k,v,o (llama_model.base_model.model.model.layers.N.self_attn...)
  pandagpt_config.json    optional: {"lora_r", "lora_alpha"} (default 32/32, openllama_peft.yaml)

The LoRA delta is MERGED into the LLaMA weights while they stream into the GGUF
(W += alpha/r * B @ A): one set of weights to quantize and run at full llama.cpp speed;
a GGUF adapter would keep a second matmul per projection at every decode step and an
F16 side file, for nothing a chat needs (the adapter is never switched off).

Each modality is one ImageBind graph -> (mean over clips) -> llama_proj -> one row; the
inputs of one turn are summed into that row (the manifest's "combine").
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .assemble import FamilyExport, assemble_bundle, resolve_source

FAMILY = "pandagpt"
LORA_R = LORA_ALPHA = 32                 # code/config/openllama_peft.yaml
_LORA_KEY = re.compile(r"llama_model\.base_model\.model\.(model\.layers\.\d+\.self_attn\.[qkvo]_proj)"
                       r"\.lora_([AB])(?:\.default)?\.weight$")
# code/model/openllama.py: BOS + "### Human: <Img>" + row + "</Img> " + prompt + "\n### Assistant:";
# web_demo.py continues with " {answer}\n### Human: {q}\n### Assistant:"; stop at "##" (id 2277).
PANDAGPT_TEMPLATE = {
    "system": "",
    "user": "### Human: {content}",
    "assistant": "\n### Assistant:",
    "answer": " {answer}\n",
    "media": {m: "<Img><ImageHere></Img>" for m in ("mix", "image", "audio", "video", "thermal", "depth", "imu")},
    "media_sep": " ",
    "placeholder": "<ImageHere>",
    "bos": True,
    "stop": ["##"],
}
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
    import torch

    path = src / "pytorch_model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{src}: pytorch_model.pt (PandaGPT delta weights) not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    proj = {k[len("llama_proj."):]: v.float().numpy() for k, v in state.items() if k.startswith("llama_proj.")}
    lora: dict = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            lora.setdefault(m.group(1) + ".weight", {})[m.group(2)] = v.float().numpy()
    if set(proj) != {"weight", "bias"}:
        raise KeyError(f"{path}: llama_proj.weight/bias missing")
    return proj, {k: (ab["A"], ab["B"]) for k, ab in lora.items()}


def lora_merger(lora: dict, alpha: float) -> Callable[[str, np.ndarray], np.ndarray]:
    def adjust(name: str, w: np.ndarray) -> np.ndarray:
        if name not in lora:
            return w
        a, b = lora[name]                                       # [r, in], [out, r]
        return w + (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
    return adjust


def load_imagebind(src: Path):
    import torch

    from .imagebind import build_imagebind, load_imagebind_state
    from .imagebind_modules import ImageBindSizes, TrunkSize

    path = src / "imagebind_huge.pth"
    if not path.exists():
        raise FileNotFoundError(f"{src}: imagebind_huge.pth not found")
    sizes = ImageBindSizes.huge()
    cfg = src / "imagebind_sizes.json"
    if cfg.exists():
        raw = json.loads(cfg.read_text())
        sizes = ImageBindSizes(**{k: TrunkSize(**v) if isinstance(v, dict) else v for k, v in raw.items()})
    model = build_imagebind(sizes)
    load_imagebind_state(model, torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def export_pandagpt(src: str, out: Path, quant: str = "Q4_K_M",
                    log: Callable[[str], None] = print, encoder_precision: str = "fp32") -> Path:
    import torch

    from .imagebind import imagebind_stage_specs, make_encoder

    if encoder_precision != "fp32":
        raise ValueError("pandagpt: --encoder-precision other than fp32 is not supported yet")
    src_dir = resolve_source(src)
    vicuna = src_dir / "vicuna"
    if not (vicuna / "config.json").exists():
        raise FileNotFoundError(f"{src}: vicuna/ (HF LLaMA folder of Vicuna v0) not found")
    text_cfg = json.loads((vicuna / "config.json").read_text())
    if text_cfg.get("model_type") != "llama":
        raise ValueError(f"{vicuna}: not a LLaMA model")
    conf = json.loads((src_dir / "pandagpt_config.json").read_text()) if (src_dir / "pandagpt_config.json").exists() \
        else {}
    proj, lora = read_delta(src_dir)
    if not lora:
        raise KeyError(f"{src_dir}/pytorch_model.pt: no LoRA weights found")
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
        text_config=text_cfg, template=PANDAGPT_TEMPLATE, modalities=modalities,
        facts={"combine": {"op": "sum"},
               "lora": {"merged": True, "r": int(next(iter(lora.values()))[0].shape[0]),
                        "alpha": float(conf.get("lora_alpha", LORA_ALPHA)), "tensors": len(lora)}},
        llm_dir=vicuna, llm_adjust=lora_merger(lora, float(conf.get("lora_alpha", LORA_ALPHA))),
        load=lambda prefix: {k: torch.from_numpy(v) for k, v in proj.items()},
    )
    return assemble_bundle(fam, src_dir, out, quant, log)
