"""Crash-safe writes: a bundle (or any output folder or file) appears whole or not at all.

Files go into a temp folder beside the target (`.<name>.partial-*`, same filesystem), the
manifest is written last, everything is fsynced, and the folder takes the target's place
in one rename: RENAME_EXCHANGE swaps it with a previous bundle atomically, so a kill at
any moment leaves either the previous bundle or the new one at the target, never half of
one and never nothing where something was.

A temp folder or file is flock()ed by the process writing it. One left by a killed run
has no lock holder: the next export to the same target removes it and says so. A full
disk gives one clear error (`DiskFull`) after the temp files are removed.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from scops.runtime.bundle import sha256_file
from scops.runtime.contract import MANIFEST, SCHEMA_VERSION, check_manifest
# errno values that mean "the disk is full" (quota and per-file limits read the same to a user)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(OSError):
    """The filesystem of the target ran out of space (or quota) during a write."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- locks and stale leftovers ---------------------------------------------------------------
def _lock(path: Path, blocking: bool) -> int | None:
    """An flock()ed descriptor on `path` (a folder or a file); None if another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _stale_prefix(out: Path) -> str:
    return glob.escape(str(out.parent / f".{out.name}.partial-"))


def clean_stale(out: Path, log: Callable[[str], None] = _stderr) -> list[Path]:
    """Remove the temp folders/files of earlier writes to `out` that were killed (no lock held)."""
    removed = []
    for p in sorted(Path(x) for x in glob.glob(_stale_prefix(out) + "*")):
        try:
            fd = _lock(p, blocking=False)
        except OSError:
            continue                      # gone already, or not ours to open
        if fd is None:
            continue                      # a running export holds it
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            log(f"could not remove {p} (left by an interrupted export): {e}")
            continue
        finally:
            os.close(fd)
        removed.append(p)
        log(f"removed {p.name}: left beside {out.name} by an interrupted export")
    return removed


def _new_partial(out: Path, is_dir: bool) -> tuple[Path, int]:
    """A fresh locked temp folder/file beside `out` (retried if a cleaner raced us)."""
    while True:
        if is_dir:
            p = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", suffix=".tmp", dir=out.parent)
            os.close(fd)
            p = Path(name)
        fd = _lock(p, blocking=True)
        if _same_file(fd, p):
            return p, fd
        os.close(fd)                      # removed by a cleaner between create and lock


def _is_full(e: BaseException | None) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def disk_nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Under `margin` bytes left for this user (root may use the reserved blocks)."""
    st = os.statvfs(folder)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize < margin


_FULL_REASON = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file size limit was reached"}


def _disk_full(out: Path, e: OSError) -> DiskFull:
    err = DiskFull(f"{out}: writing stopped, {_FULL_REASON[e.errno]} of {out.parent}; "
                   "the partial output was removed, nothing else changed")
    err.errno = e.errno
    return err


# ---- atomic publish -------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE): swap two paths in one step. False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """Data and names on disk before the rename publishes them (power loss, not just kill -9)."""
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path) -> None:
    """Put the finished temp folder/file `tmp` at `out` in one atomic step.

    An existing `out` is swapped out (RENAME_EXCHANGE) and then removed from under the
    temp name (still locked: a kill there leaves only a stale temp for the next run). A
    plain file target, or a filesystem without RENAME_EXCHANGE, takes os.replace, atomic
    for files; a folder there is moved aside first (the one non-atomic fallback).
    """
    _make_readable(tmp)
    _fsync_tree(tmp)
    if out.is_dir() and not out.is_symlink():
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)          # the previous bundle, now at tmp's name
        else:
            aside = tmp.with_name(tmp.name + "-previous")
            os.replace(out, aside)
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def _make_readable(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; a bundle gets the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    if root.is_dir():
        os.chmod(root, 0o777 & ~umask)
        for p in root.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    else:
        os.chmod(root, 0o666 & ~umask)


@contextmanager
def _partial(out: Path, is_dir: bool, log: Callable[[str], None]):
    """Yield a locked temp folder/file beside `out`; publish on success, remove on error."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out, log)
    tmp, fd = _new_partial(out, is_dir)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException as e:
        if _is_full(e):
            raise _disk_full(out, e) from None
        if isinstance(e, Exception) and disk_nearly_full(out.parent):
            # a library that wraps the failed write in its own error (protobuf, safetensors)
            raise _disk_full(out, OSError(errno.ENOSPC, str(e))) from e
        raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_dir(out: Path, log: Callable[[str], None] = _stderr):
    """with atomic_dir(out) as tmp: fill tmp; on success it replaces `out`, on error it is removed."""
    with _partial(out, True, log) as tmp:
        yield tmp


@contextmanager
def atomic_file(out: Path, log: Callable[[str], None] = _stderr):
    """with atomic_file(out) as tmp: write the file tmp; on success it replaces `out`."""
    with _partial(out, False, log) as tmp:
        yield tmp


class _Discard(Exception):
    pass


class BundleBuilder:
    """with BundleBuilder(out) as b: write into b.dir, b.add_file(...), b.commit(manifest)."""

    def __init__(self, out: Path, overwrite: bool = True, log: Callable[[str], None] = _stderr):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.log = log
        self.files: dict[str, dict] = {}
        self.dir: Path | None = None
        self._ctx = None

    def __enter__(self) -> "BundleBuilder":
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists")
        self._ctx = atomic_dir(self.out, self.log)
        self.dir = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        ctx, self._ctx = self._ctx, None
        if ctx is None:                          # committed
            return False
        if exc is None:                          # left without commit(): discard, publish nothing
            try:
                ctx.__exit__(_Discard, _Discard(), None)
            except _Discard:
                pass
            return False
        return ctx.__exit__(exc_type, exc, tb)   # removes the partial folder; a full disk -> DiskFull

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
        """Write the manifest (last) and publish the folder at `out`."""
        manifest = {"schema": SCHEMA_VERSION, **manifest, "files": self.files}
        check_manifest(manifest, f"{self.out.name}/{MANIFEST}")       # the runtime's own contract
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)           # publish
        self.dir = None
        return self.out
