"""Reading published checkpoint files safely, as their authors wrote them.

Two kinds of input:
- a state-dict file (`.pth` / `.pt` / `.bin` torch pickles, or `.safetensors`), possibly
  wrapped (`{'model': sd, 'optimizer': ..., 'config': ...}`, `{'module': sd}`), holding
  tensors or `nn.Parameter`s (trainable parameters saved as they are), in any float dtype;
- an LLM folder in every form HF has saved: `model.safetensors`, sharded safetensors with
  `model.safetensors.index.json`, `pytorch_model.bin`, sharded `pytorch_model-0000N-of-0000M.bin`
  with `pytorch_model.bin.index.json`.

Pickles are read with `torch.load(weights_only=True)`: a file that needs any Python object
beyond tensors and plain containers is refused, never executed. LLM tensors are read one
at a time (safetensors headers; zip-format `.bin` memory-mapped and re-opened per tensor),
so a 13B model never sits in RAM whole. Every failure is one `ExportError` naming the file.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scops.runtime.errors import ExportError

# Keys under which training code nests the weights: LAVIS/MiniGPT-4/BuboGPT save
# {'model': sd, 'optimizer': ..., 'config': ..., 'epoch': ...}; DeepSpeed and DDP
# wrappers use 'module'; Lightning-style code 'state_dict'.
WRAPPER_KEYS = ("model", "module", "state_dict")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _torch_load(path: Path, mmap: bool):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_pickle(path: Path, what: str):
    """torch.load(weights_only=True) with one clear error per way a file can be bad."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: not found ({what})")
    if path.stat().st_size == 0:
        raise ExportError(f"{path}: empty file ({what})")
    try:
        # zip-format pickles (torch >= 1.6) are memory-mapped: tensors are read on touch
        return _torch_load(path, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "global" in str(e).lower():
            raise ExportError(f"{path}: holds Python objects other than tensors; scops loads checkpoints with "
                              f"weights_only=True and never executes a pickle ({first[:160]})") from None
        raise ExportError(f"{path}: not a readable torch checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            IndexError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path}: truncated or not a torch checkpoint ({first[:160]})") from None


def unwrap(obj, path: Path, what: str) -> dict:
    """The state dict inside a (possibly wrapped) checkpoint: {name: tensor} only."""
    import torch

    for _ in range(3):                          # {'model': {'module': sd}} at most
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values() if v is not inner):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: holds a {type(obj).__name__}, not a state dict ({what})")
    state = {k: v.detach() for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ExportError(f"{path}: no tensors in it ({what})")
    return state


def read_state_dict(path: Path, what: str) -> dict:
    """A state-dict file (.pth/.pt/.bin pickle or .safetensors) -> {name: fp32 tensor}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return {k: v.float() for k, v in _read_safetensors(path, what).items()}
    return {k: v.float() for k, v in unwrap(load_pickle(path, what), path, what).items()}


def _read_safetensors(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: not found ({what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable safetensors ({str(e)[:160]})") from None


@dataclass
class TensorIndex:
    """Every tensor of an LLM folder: name -> (file, shape), loaded one at a time."""
    folder: Path
    entries: dict = field(default_factory=dict)      # name -> (file, shape)

    @classmethod
    def open(cls, folder: Path) -> "TensorIndex":
        folder = Path(folder)
        files = weight_files(folder)
        index = cls(folder)
        for f in files:
            if f.suffix == ".safetensors":
                index.entries.update({k: (f, shape) for k, shape in _safetensors_shapes(f).items()})
            else:
                sd = unwrap(load_pickle(f, "LLM weights"), f, "LLM weights")
                index.entries.update({k: (f, tuple(v.shape)) for k, v in sd.items()})
                del sd
        return index

    def names(self) -> set:
        return set(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy; the file is mapped only for this call (bounded RSS)."""
        f, _ = self.entries[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
        else:
            t = unwrap(load_pickle(f, "LLM weights"), f, "LLM weights")[name]
        return t.float().numpy()                      # bf16/f16 -> f32 via torch (numpy lacks bf16)

    def load_prefix(self, prefix: str) -> dict:
        """{name without prefix: fp32 torch tensor} for every tensor under `prefix`."""
        import torch
        out = {k[len(prefix):]: torch.from_numpy(self.load(k)) for k in self.entries if k.startswith(prefix)}
        if not out:
            raise ExportError(f"{self.folder}: no tensors under '{prefix}'")
        return out


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, in every form it may have been saved."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ExportError(f"{index}: malformed index ({e})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ExportError(f"{folder}: shards listed in {index_name} are missing: {', '.join(missing[:4])}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ExportError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or their shards)")
    return files


def _safetensors_shapes(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable safetensors ({str(e)[:160]})") from None


def read_added_tokens(folder: Path) -> dict[str, int]:
    """Tokens an HF tokenizer adds beyond its sentencepiece model: {text: id}, from
    added_tokens.json (older transformers) or tokenizer_config.json's added_tokens_decoder."""
    folder = Path(folder)
    added: dict[str, int] = {}
    path = folder / "added_tokens.json"
    if path.is_file():
        added.update({str(k): int(v) for k, v in _json(path).items()})
    path = folder / "tokenizer_config.json"
    if path.is_file():
        for i, spec in (_json(path).get("added_tokens_decoder") or {}).items():
            if isinstance(spec, dict) and "content" in spec:
                added.setdefault(str(spec["content"]), int(i))
    return added


def _json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(out, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return out
