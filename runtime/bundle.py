"""Open and verify a bundle: the manifest is data; every file is checked (size, sha256)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError

MANIFEST = "manifest.json"
SUPPORTED_SCHEMA = 1
HASH_CHUNK = 4 << 20
# Stage ops this runtime serves (encode.py); LayerNorm before a projection is a projector flag,
# and summing several inputs into one row is the bundle-level "combine".
STAGE_OPS = ("onnx", "select", "l2norm", "mean_over_clips", "projector")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def template(self) -> dict:
        return self.manifest["template"]

    @property
    def modalities(self) -> dict:
        return self.manifest["modalities"]

    @property
    def llm_path(self) -> Path:
        return self.path / self.manifest["llm"]["file"]

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(msg)


def open_bundle(path, verify: bool = True) -> Bundle:
    """Read manifest.json, check its structure, and (verify=True) every file's sha256."""
    root = Path(path)
    _require(root.is_dir(), f"{root}: not a bundle directory")
    mpath = root / MANIFEST
    _require(mpath.is_file(), f"{root}: no {MANIFEST} (not a scops bundle, or an unfinished export)")
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: malformed JSON ({e})") from None
    _require(isinstance(m, dict), f"{mpath}: manifest is not an object")
    _require(m.get("schema") == SUPPORTED_SCHEMA,
             f"{mpath}: schema {m.get('schema')!r} not supported (this scops reads {SUPPORTED_SCHEMA})")
    for key in ("family", "llm", "template", "modalities", "files"):
        _require(key in m, f"{mpath}: missing '{key}'")
    files = m["files"]
    _require(isinstance(files, dict) and files, f"{mpath}: 'files' must list the bundle's files")
    referenced = {m["llm"].get("file")}
    for mod, spec in m["modalities"].items():
        _require(isinstance(spec.get("stages"), list) and spec["stages"], f"{mpath}: modality {mod} has no stages")
        for st in spec["stages"]:
            _require(st.get("op") in STAGE_OPS, f"{mpath}: modality {mod}: unknown stage op {st.get('op')!r}")
            if "file" in st:
                referenced.add(st["file"])
    for name in referenced:
        _require(name in files, f"{mpath}: {name} is used but not listed in 'files'")
    for name, entry in files.items():
        p = root / name
        _require(Path(name).name == name, f"{mpath}: file name {name!r} must not contain a path")
        _require(p.is_file(), f"{root}: missing file {name}")
        size = p.stat().st_size
        _require(size == entry.get("bytes"), f"{root}: {name} is {size} bytes, manifest says {entry.get('bytes')}"
                 " (tampered or truncated)")
        if verify:
            _require(sha256_file(p) == entry.get("sha256"), f"{root}: {name} fails its sha256 check (tampered or corrupt)")
    return Bundle(root, m)
