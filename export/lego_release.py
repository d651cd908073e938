"""The files of a LEGO / GroundingGPT release, found and read as the original loader does.

What users download (lzw-lzw/GroundingGPT README, lego/model/builder.py, lego/LEGO.py):

  GroundingGPT/                    HF folder `zwli/GroundingGPT` (LEGOLlamaForCausalLM.save_pretrained,
    config.json                    transformers 4.34: model_type "LEGO", LlamaConfig + mm_* / *_token_len)
    pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json   (or any HF weight layout)
    tokenizer.model, tokenizer_config.json, added_tokens.json, special_tokens_map.json
  clip-vit-large-patch14-336/      HF `openai/clip-vit-large-patch14-336` (CLIPModel; vision_model.* used)
  eva_vit_g.pth                    LAVIS EVA ViT-g (40 blocks stored, 39 used)
  imagebind_huge.pth               ImageBind-huge (the original reads /ckpt/imagebind/imagebind_huge.pth)

The extra files are looked up beside the HF folder's files, in its parent and (ImageBind)
in an `imagebind/` folder of either; the CLIP folder also under the hub id's path.

Load order of the original: `LEGOLlamaModel.__init__` builds the EVA ViT from
eva_vit_g.pth and the audio encoder from imagebind_huge.pth, then `from_pretrained` loads
the HF folder over the whole model: every key the release holds wins (its Q-Former,
query tokens, ln_vision, projections, and the encoders when it holds them too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scops.runtime.errors import ExportError

CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"   # builder.py loads this id, whatever config says
EVA_FILE = "eva_vit_g.pth"
IMAGEBIND_FILE = "imagebind_huge.pth"
MODEL_TYPE = "LEGO"
PREFIX = "model."


def _candidates(src: Path, *names: str) -> list[Path]:
    roots = [src, src.parent]
    return [root / name for root in roots for name in names]


def find_file(src: Path, name: str, subdirs: tuple[str, ...] = ()) -> Path | None:
    for p in _candidates(src, name, *(f"{d}/{name}" for d in subdirs)):
        if p.is_file():
            return p
    return None


def find_clip(src: Path, tower: str) -> Path:
    """The CLIP folder: a local path in config.json, else beside / above the release, else the hub."""
    base = CLIP_HUB_ID.split("/")[-1]
    local = [Path(tower).expanduser()] if tower else []
    for p in local + _candidates(src, base, CLIP_HUB_ID):
        if (p / "config.json").is_file():
            return p
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(CLIP_HUB_ID, allow_patterns=["*.json", "*.bin", "*.safetensors"]))
    except Exception:
        raise ExportError(f"{src}: the CLIP tower {CLIP_HUB_ID} was not found; put its HF folder at "
                           f"{src.parent / base} (config.json + pytorch_model.bin)") from None


@dataclass(frozen=True)
class LegoRelease:
    folder: Path
    config: dict
    clip: Path
    eva: Path | None          # None when the release holds model.visual_encoder.*
    imagebind: Path | None    # None when the release holds model.audio_encoder.*

    def llm_config(self) -> dict:
        """The LLaMA part of config.json (LEGOConfig is a LlamaConfig)."""
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "rope_scaling")
        out = {k: self.config[k] for k in keys if k in self.config}
        out["model_type"] = "llama"
        return out


def open_release(src: str | Path, names: set) -> LegoRelease:
    """`names`: every tensor name of the HF folder (to see which encoders it holds)."""
    folder = Path(src).expanduser()
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{folder}: no config.json (expected the zwli/GroundingGPT folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ExportError(f"{cfg_path}: malformed JSON ({e})") from None
    if config.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{cfg_path}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    has_eva = any(n.startswith(PREFIX + "visual_encoder.") for n in names)
    has_ib = any(n.startswith(PREFIX + "audio_encoder.") for n in names)
    eva = None if has_eva else find_file(folder, EVA_FILE)
    imagebind = None if has_ib else find_file(folder, IMAGEBIND_FILE, ("imagebind",))
    missing = [n for n, have, path in ((EVA_FILE, has_eva, eva), (IMAGEBIND_FILE, has_ib, imagebind))
               if not have and path is None]
    if missing:
        raise ExportError(f"{folder}: {', '.join(missing)} not found; the release does not hold those encoders, "
                           f"so put the file(s) in {folder} or {folder.parent}")
    return LegoRelease(folder, config, find_clip(folder, str(config.get("mm_vision_tower", ""))), eva, imagebind)
