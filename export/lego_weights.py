"""Minimal readers of the weight files a LEGO release holds (HF folders with `.bin` shards or
safetensors, flat `.pth` state dicts), until the shared readers of issue 9 land: then this
module goes, its callers switch to export/checkpoints.py.

Pickles are read with torch.load(weights_only=True, mmap=True): never executed, and a
shard's tensors are only paged in when used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .lego_release import ReleaseError


def _torch_load(path: Path, what: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ReleaseError(f"{path}: not a readable torch checkpoint ({what}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ReleaseError(f"{path}: holds a {type(obj).__name__}, not a state dict ({what})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ReleaseError(f"{folder}: no weights (pytorch_model*.bin or *.safetensors)")
    return files


def _read_file(path: Path, what: str) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return _torch_load(path, what)


def read_state_dict(path: Path, what: str, prefix: str = "", keep=None) -> dict:
    """A state-dict file, or every weight file of an HF folder -> {name: fp32 tensor}
    (only names under `prefix`, prefix stripped, and for which keep(name) holds; the others
    are never converted, so a 4.8 GB ImageBind file costs only its audio part)."""
    path = Path(path)
    files = weight_files(path) if path.is_dir() else [path]
    out = {}
    for f in files:
        for k, v in _read_file(f, what).items():
            if k.startswith(prefix) and (keep is None or keep(k[len(prefix):])):
                out[k[len(prefix):]] = v.float()
    if not out:
        raise ReleaseError(f"{path}: no tensors{' under ' + repr(prefix) if prefix else ''} ({what})")
    return out


@dataclass
class WeightIndex:
    folder: Path
    shards: dict = field(default_factory=dict)       # file -> {name: tensor} (memory-mapped)

    @classmethod
    def open(cls, folder: Path) -> "WeightIndex":
        if not folder.is_dir():
            raise ReleaseError(f"{folder}: not a folder (expected the zwli/GroundingGPT folder)")
        idx = cls(folder)
        for f in weight_files(folder):
            idx.shards[f] = _read_file(f, "LEGO weights")
        return idx

    def names(self) -> set:
        return {k for sd in self.shards.values() for k in sd}

    def shape(self, name: str) -> tuple:
        for sd in self.shards.values():
            if name in sd:
                return tuple(sd[name].shape)
        raise ReleaseError(f"{self.folder}: the release lacks {name}")

    def load_prefix(self, prefix: str, keep=None) -> dict:
        out = {k[len(prefix):]: v.float() for sd in self.shards.values() for k, v in sd.items()
               if k.startswith(prefix) and (keep is None or keep(k[len(prefix):]))}
        if not out:
            raise ReleaseError(f"{self.folder}: the release holds no tensors under '{prefix}'")
        return out
