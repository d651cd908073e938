"""Build a bundle directory atomically: files go into a temp dir beside the target,
the manifest is written last, and the directory is renamed into place only when all of
it is there. An interrupted export leaves no half bundle (only the temp dir is removed).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from scops.runtime.bundle import sha256_file
from scops.runtime.contract import MANIFEST, SCHEMA_VERSION, check_manifest


class BundleBuilder:
    """with BundleBuilder(out) as b: write into b.dir, b.add_file(...), b.commit(manifest)."""

    def __init__(self, out: Path, overwrite: bool = True):
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        self.files: dict[str, dict] = {}
        self.dir: Path | None = None

    def __enter__(self) -> "BundleBuilder":
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def add_file(self, name: str, kind: str, **facts) -> dict:
        """Record a file already written into self.dir (plus its external-data side file)."""
        path = self.dir / name
        entry = {"kind": kind, "bytes": path.stat().st_size, "sha256": sha256_file(path), **facts}
        self.files[name] = entry
        side = path.with_name(path.name + ".data")
        if side.exists():
            self.files[side.name] = {"kind": "onnx-data", "bytes": side.stat().st_size,
                                     "sha256": sha256_file(side)}
        return entry

    def commit(self, manifest: dict) -> Path:
        manifest = {"schema": SCHEMA_VERSION, **manifest, "files": self.files}
        check_manifest(manifest, f"{self.out.name}/{MANIFEST}")       # the runtime's own contract
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.dir / MANIFEST)
        _make_readable(self.dir)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; a bundle gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.iterdir():
        os.chmod(p, 0o666 & ~umask)


@contextmanager
def atomic_dir(out: Path):
    """with atomic_dir(out) as tmp: fill tmp; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
