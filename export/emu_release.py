"""Emu's published files, read as the original loaders read them (Emu1/inference.py,
Emu1/models/pipeline.py), and the facts the exporter needs from them.

Sources (HF `BAAI/Emu` plus two files of the code repository):
  Emu-instruct.pt                          Emu-I: the whole `Emu` state dict, optionally under
                                           'module'; the LLM under peft's LoRA names
                                           (decoder.lm.base_model.model.model.layers.N.self_attn.
                                           q_proj.{weight,lora_A[.default].weight,lora_B...})
  pretrain/multimodal_encoder/pytorch_model.bin   Emu (pretrained): the flat `Emu` state dict
  pretrain/{unet,vae,scheduler}/           diffusers folders of the image decoder
  Emu-14B.json, llama_config/              Emu1/models/ of the code repository: the model config
                                           and LLaMA's tokenizer.model + config.json (the release
                                           itself holds no tokenizer); looked up beside the
                                           checkpoint, in models/ there, or one folder up.
The state dict is memory-mapped: a 27 GB checkpoint is read tensor by tensor.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scops.runtime.errors import ExportError

from .checkpoints import load_pickle, unwrap

INSTRUCT_FILE = "Emu-instruct.pt"
ENCODER_FILE = Path("multimodal_encoder") / "pytorch_model.bin"
# Emu1/models/Emu-14B.json (vision_cfg / vladapter_cfg): EVA-CLIP-g, 40 blocks, 1408 wide,
# 1408 // 88 = 16 heads, int(1408 * 4.3637) = 6144 MLP, patch 14 at 224; 32 causal queries.
EMU_14B = {"vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88, "mlp_ratio": 4.3637,
                          "patch_size": 14}, "vladapter_cfg": {"n_causal": 32}}
# Emu1/models/llama_config/config.json: LLaMA-13B (vocab before the added tokens).
LLAMA_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "vocab_size": 32000, "model_type": "llama",
             "tie_word_embeddings": False}
# modeling_llama.py: add_special_tokens(pad_token="[PAD]", additional_special_tokens=[...]) appends, in
# this order, after LLaMA's 32000 pieces; Emu-I (args.instruct) adds the two role tokens.
ADDED_PRETRAIN = ("[PAD]", "[IMG]", "[/IMG]", "<image>")
ADDED_INSTRUCT = ADDED_PRETRAIN + ("[USER]", "[ASSISTANT]")
LN_VISUAL_EPS = 1e-6                     # modeling_emu.py: partial(LayerNorm, eps=1e-6)
LORA_ALPHA = 16                          # inference.py: LoraConfig(r=16, lora_alpha=16, q,k,v,o)
_PEFT = re.compile(r"^decoder\.lm\.base_model\.model\.")
_LORA = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class Release:
    kind: str                # "instruct" (Emu-I, chat) | "pretrain" (Emu, generation)
    checkpoint: Path         # the state-dict file
    pretrain_dir: Path | None
    emu_config: dict
    llama_dir: Path          # tokenizer.model (+ config.json)


def find_release(src: str) -> Release:
    """`src`: Emu-instruct.pt (or a folder holding it) -> chat; the pretrain/ folder -> generation."""
    path = Path(src).expanduser()
    if path.is_file():
        ckpt, kind, pre = path, ("instruct" if path.suffix == ".pt" else "pretrain"), None
        if path.parent.name == ENCODER_FILE.parent.name:
            pre = path.parent.parent
    elif (path / ENCODER_FILE).is_file():
        ckpt, kind, pre = path / ENCODER_FILE, "pretrain", path
    elif (path / INSTRUCT_FILE).is_file():
        if (path / "pretrain" / ENCODER_FILE).is_file():
            raise ExportError(f"{src} holds both Emu-I and the pretrained Emu: pass {path / INSTRUCT_FILE} "
                             f"(chat) or {path / 'pretrain'} (image generation)")
        ckpt, kind, pre = path / INSTRUCT_FILE, "instruct", None
    else:
        raise ExportError(f"{src}: neither {INSTRUCT_FILE} nor {ENCODER_FILE} found")
    places = [ckpt.parent, ckpt.parent / "models", ckpt.parent.parent, ckpt.parent.parent / "models"]
    if pre is not None:
        places += [pre, pre / "models", pre.parent, pre.parent / "models"]
    llama = next((p / "llama_config" for p in places if (p / "llama_config" / "tokenizer.model").is_file()), None)
    if llama is None:
        raise ExportError(f"{src}: llama_config/tokenizer.model not found (copy Emu1/models/llama_config "
                                "of the Emu repository beside the checkpoint)")
    cfg_file = next((p / "Emu-14B.json" for p in places if (p / "Emu-14B.json").is_file()), None)
    emu_config = json.loads(cfg_file.read_text()) if cfg_file else EMU_14B
    return Release(kind, ckpt, pre, emu_config, llama)


def load_state(path: Path) -> dict:
    """The checkpoint's flat state dict (memory-mapped), 'module' unwrapped, peft prefix removed."""
    sd = unwrap(load_pickle(path, "Emu checkpoint"), path, "Emu checkpoint")
    out = {}
    for k, v in sd.items():
        k = _PEFT.sub("decoder.lm.", k).replace(".base_layer.", ".")
        out[k] = v
    return out


def sub_state(sd: dict, prefix: str) -> dict:
    """Tensors under `prefix` (stripped), as fp32."""
    import torch
    got = {k[len(prefix):]: v.to(torch.float32) for k, v in sd.items() if k.startswith(prefix)}
    if not got:
        raise ExportError(f"the checkpoint has no tensors under '{prefix}'")
    return got


class LlmTensors:
    """decoder.lm.* of an Emu state dict as an HF LLaMA checkpoint (model.*, lm_head) for the
    GGUF writer (checkpoints.TensorIndex's interface); LoRA tensors are merged while streaming."""

    def __init__(self, sd: dict):
        self.keys = {}
        for k in sd:
            if k.startswith("decoder.lm.") and ".lora_" not in k and "stu_regress_head" not in k:
                self.keys[k[len("decoder.lm."):]] = k
        self.sd = sd

    def names(self) -> set:
        return set(self.keys)

    def shape(self, name: str) -> tuple:
        return tuple(self.sd[self.keys[name]].shape)

    def load(self, name: str) -> np.ndarray:
        return self.sd[self.keys[name]].float().numpy()


def lora_pairs(sd: dict) -> dict:
    """{HF weight name: (A [r, in], B [out, r])} of peft's LoRA tensors under decoder.lm."""
    pairs: dict = {}
    for k, v in sd.items():
        m = _LORA.match(k[len("decoder.lm."):]) if k.startswith("decoder.lm.") else None
        if m:
            pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = v.float().numpy()
    bad = [k for k, ab in pairs.items() if set(ab) != {"A", "B"}]
    if bad:
        raise ExportError(f"LoRA pair incomplete for {bad[:3]}")
    return {k: (ab["A"], ab["B"]) for k, ab in pairs.items()}


def text_config(release: Release, sd: dict) -> dict:
    """LLaMA config: llama_config/config.json (or LLaMA-13B's), vocab from the checkpoint's rows."""
    path = release.llama_dir / "config.json"
    cfg = dict(json.loads(path.read_text()) if path.is_file() else LLAMA_13B)
    cfg["vocab_size"] = int(sd["decoder.lm.model.embed_tokens.weight"].shape[0])
    return cfg


def added_tokens(n_pieces: int, n_vocab: int) -> dict[str, int]:
    """{text: id} of the tokens Emu added after the sentencepiece vocabulary."""
    names = {len(ADDED_PRETRAIN): ADDED_PRETRAIN, len(ADDED_INSTRUCT): ADDED_INSTRUCT}.get(n_vocab - n_pieces)
    if names is None:
        raise ExportError(f"the LLM has {n_vocab} rows for {n_pieces} tokenizer pieces: Emu adds "
                         f"{len(ADDED_PRETRAIN)} (pretrained) or {len(ADDED_INSTRUCT)} (Emu-I)")
    return {t: n_pieces + i for i, t in enumerate(names)}
