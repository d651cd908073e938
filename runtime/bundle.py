"""Open and verify a bundle before anything is allocated or loaded.

The manifest is checked against the bundle contract (contract.py); every file must be a
plain file inside the bundle (no symlink, no path that leaves it) with the size and
sha256 the manifest gives; ONNX graphs may point at external data only inside the
bundle; the GGUF header is walked with bounds (gguf_check.py); projector weights must
have the shapes the manifest declares. Bundles are shared like GGUFs are: none of this
relies on onnxruntime or llama.cpp to refuse a crafted file.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .contract import MANIFEST, MAX_MANIFEST_BYTES, check_manifest
from .errors import BundleError

HASH_CHUNK = 4 << 20


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


def read_manifest(root: Path) -> dict:
    mpath = root / MANIFEST
    _require(mpath.exists() or mpath.is_symlink(), f"{root}: no {MANIFEST} (not a scops bundle, or an unfinished export)")
    st = os.lstat(mpath)
    _require(stat.S_ISREG(st.st_mode), f"{mpath}: not a regular file (symlinks are refused)")
    _require(st.st_size <= MAX_MANIFEST_BYTES, f"{mpath}: {st.st_size} bytes is not a manifest")
    try:
        m = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{mpath}: malformed JSON ({str(e)[:120]})") from None
    check_manifest(m, str(mpath))
    return m


def check_files(root: Path, m: dict, verify: bool) -> None:
    """Every entry of the bundle folder is a plain file; every listed file is there, whole."""
    for entry in os.scandir(root):
        _require(not entry.is_symlink(), f"{root}: {entry.name} is a symlink (refused: a bundle holds plain files)")
    for name, entry in m["files"].items():
        p = root / name
        _require(p.parent == root and name not in (".", ".."), f"{root}: file name {name!r} leaves the bundle")
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise BundleError(f"{root}: missing file {name}") from None
        _require(stat.S_ISREG(st.st_mode), f"{root}: {name} is not a regular file")
        _require(st.st_size == entry["bytes"],
                 f"{root}: {name} is {st.st_size} bytes, manifest says {entry['bytes']} (tampered or truncated)")
        if verify:
            _require(sha256_file(p) == entry["sha256"], f"{root}: {name} fails its sha256 check (tampered or corrupt)")


def check_onnx_external_data(root: Path, m: dict) -> None:
    """An ONNX graph may keep its weights in a side file, named in the graph itself: it
    must be a file of this bundle (listed as onnx-data) and every range must lie inside it."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    sizes = {n: e["bytes"] for n, e in m["files"].items() if e["kind"] == "onnx-data"}
    for name, entry in m["files"].items():
        if entry["kind"] != "onnx":
            continue
        try:
            model = onnx.load(str(root / name), load_external_data=False)
        except Exception as e:                   # protobuf's DecodeError and friends
            raise BundleError(f"{root}: {name} is not a readable ONNX graph ({str(e)[:120]})") from None
        for t in _get_all_tensors(model):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {kv.key: kv.value for kv in t.external_data}
            loc = info.get("location", "")
            _require(loc in sizes, f"{root}: {name}: tensor {t.name!r} points at external data {loc!r}, "
                                   "which is not a data file of this bundle")
            try:
                offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            except ValueError:
                raise BundleError(f"{root}: {name}: tensor {t.name!r} has a malformed external-data range") from None
            _require(0 <= offset and 0 <= length and offset + length <= sizes[loc],
                     f"{root}: {name}: tensor {t.name!r} reads bytes {offset}..{offset + length} of {loc} "
                     f"({sizes[loc]} bytes)")


def check_projectors(root: Path, m: dict) -> None:
    """The projector files hold exactly the shapes the manifest's stages declare."""
    from safetensors import SafetensorError, safe_open

    for mod, spec in m["modalities"].items():
        st = spec["stages"][-1]
        hidden, out, inp = st.get("hidden_dim", 0), st["out_dim"], st["in_dim"]
        want = {"fc1.weight": [hidden or out, inp]}
        if st.get("bias", True):
            want["fc1.bias"] = [hidden or out]
        if hidden:
            want["fc2.weight"] = [out, hidden]
            if st.get("bias", True):
                want["fc2.bias"] = [out]
        if st.get("layernorm"):
            want.update({"ln.weight": [inp], "ln.bias": [inp]})
        try:
            with safe_open(str(root / st["file"]), framework="numpy") as h:
                got = {k: list(h.get_slice(k).get_shape()) for k in h.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{root}: {st['file']}: unreadable safetensors ({str(e)[:120]})") from None
        for k, shape in want.items():
            _require(got.get(k) == shape, f"{root}: {st['file']}: {k} is {got.get(k)}, manifest says {shape} "
                                          f"(modality {mod})")


def open_bundle(path, verify: bool = True) -> Bundle:
    """Read and check everything the runtime will load; (verify=True) every file's sha256 too."""
    from .gguf_check import check_gguf

    root = Path(path)
    _require(root.is_dir(), f"{root}: not a bundle directory")
    root = root.resolve()
    m = read_manifest(root)
    check_files(root, m, verify)
    check_onnx_external_data(root, m)
    check_projectors(root, m)
    facts = check_gguf(root / m["llm"]["file"])
    n_embd = facts["kv"].get("llama.embedding_length")
    _require(n_embd in (None, m["llm"]["n_embd"]),
             f"{root}: {m['llm']['file']}: embedding length {n_embd}, manifest says {m['llm']['n_embd']}")
    return Bundle(root, m)
