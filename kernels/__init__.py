"""scops.kernels -- the fused projector, bound through ctypes.

    y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )

Usage (the runtime)::

    proj = Projector.create(ProjectorSpec(in_dim=768, out_dim=4096), weights)   # backend "auto"
    proj.forward(x, out=embd_view)    # x [rows, 768] fp32; out [rows, 4096] fp32, written in place
    proj.close()

Backends: "cuda" (libscops_kernels_cuda.so, when it loads and a GPU exists), "cpu-avx2"
(x86-64) / "cpu-neon" (aarch64) / "cpu-scalar" (libscops_kernels.so; "cpu" picks the best of
them), "numpy" (kernels/reference.py; used when no native library loads).  The library is looked up in $SCOPS_KERNELS_LIB (full path), next to this
file, then in <platlib>/scops/kernels/ (where the editable install puts it).
C API: kernels/projector.h.  Twins: reference.py, projector_cpu.cpp, projector_cuda.cu.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import reference

__all__ = ["ProjectorSpec", "Projector", "KernelError", "PinnedBuffer", "load_library", "native_info",
           "cuda_available", "flag_test_address"]

_LOG = logging.getLogger("scops")
_ABI = 1  # SCOPS_PROJECTOR_ABI in projector.h
_GELU = {"none": 0, "erf": 1, "tanh": 2}
_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
_BACKEND_CODES = {"auto": 0, "cpu": 1, "cuda": 2, "cpu-scalar": 3, "cpu-avx2": 1, "cpu-neon": 1}
_SIMD_BACKENDS = ("cpu-avx2", "cpu-neon")    # "cpu" with a check that this path is the one in use
_MAX_THREADS = 256  # kMaxThreads in projector_api.cpp
_logged = False


class KernelError(ValueError):
    """Any projector error; the message carries the C status string where there is one."""


@dataclass(frozen=True)
class ProjectorSpec:
    in_dim: int
    out_dim: int
    hidden_dim: int = 0  # 0 = single Linear
    layernorm: bool = False
    ln_eps: float = 1e-5
    gelu: str = "none"  # "none" | "erf" | "tanh" (only with hidden_dim > 0)
    bias: bool = True
    l2norm: bool = False
    scale: float = 1.0


class _Params(ctypes.Structure):  # scops_projector_params, field for field
    _fields_ = [
        ("abi_version", ctypes.c_int32), ("in_dim", ctypes.c_int64), ("hidden_dim", ctypes.c_int64),
        ("out_dim", ctypes.c_int64), ("layernorm", ctypes.c_int32), ("ln_eps", ctypes.c_float),
        ("gelu", ctypes.c_int32), ("l2norm", ctypes.c_int32), ("scale", ctypes.c_float),
        ("weight_dtype", ctypes.c_int32), ("n_threads", ctypes.c_int32), ("backend", ctypes.c_int32),
        ("max_rows", ctypes.c_int64), ("ln_weight", ctypes.c_void_p), ("ln_bias", ctypes.c_void_p),
        ("fc1_weight", ctypes.c_void_p), ("fc1_bias", ctypes.c_void_p),
        ("fc2_weight", ctypes.c_void_p), ("fc2_bias", ctypes.c_void_p),
    ]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, VP, I64 = ctypes.POINTER(_Params), ctypes.c_void_p, ctypes.c_int64
    sigs = {
        "scops_projector_params_init": (ctypes.c_int32, [P]),
        "scops_projector_create": (ctypes.c_int32, [P, ctypes.POINTER(VP)]),
        "scops_projector_forward": (ctypes.c_int32, [VP, VP, I64, VP, I64]),
        "scops_projector_forward_device": (ctypes.c_int32, [VP, VP, I64, VP, I64]),
        "scops_projector_destroy": (None, [VP]),
        "scops_status_string": (ctypes.c_char_p, [ctypes.c_int32]),
        "scops_projector_backend_name": (ctypes.c_char_p, [VP]),
        "scops_cpu_features": (ctypes.c_char_p, []),
        "scops_cuda_available": (ctypes.c_int32, []),
        "scops_host_alloc": (ctypes.c_int32, [I64, ctypes.POINTER(VP)]),
        "scops_host_free": (None, [VP]),
        "scops_flag_test": (ctypes.c_bool, [VP]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _candidates(filename: str) -> list[Path]:
    dirs = [Path(__file__).resolve().parent, Path(sysconfig.get_paths()["platlib"]) / "scops" / "kernels"]
    return [d / filename for d in dirs]


_lib_cache: dict[str, tuple[ctypes.CDLL | None, str]] = {}


def load_library(cuda: bool = False) -> tuple[ctypes.CDLL | None, str]:
    """(library or None, where it came from / why not).  Cached per process."""
    key = "cuda" if cuda else "cpu"
    if key in _lib_cache:
        return _lib_cache[key]
    override = os.environ.get("SCOPS_KERNELS_LIB")
    if override:
        paths = [Path(override)]
    else:
        paths = _candidates("libscops_kernels_cuda.so" if cuda else "libscops_kernels.so")
    result: tuple[ctypes.CDLL | None, str] = (None, "not found (" + ", ".join(map(str, paths)) + ")")
    for path in paths:
        if not path.is_file():
            continue
        try:
            result = (_declare(ctypes.CDLL(str(path))), str(path))
            break
        except (OSError, AttributeError) as exc:
            result = (None, f"{path} failed to load: {exc}")
    _lib_cache[key] = result
    return result


def cuda_available() -> int:
    """Usable CUDA devices as the CUDA kernels library sees them; 0 when it does not load."""
    lib, _ = load_library(cuda=True)
    return int(lib.scops_cuda_available()) if lib is not None else 0


def flag_test_address() -> int | None:
    """Address of scops_flag_test (llama.cpp's abort callback for runtime/llm.py); None when
    the native library does not load."""
    lib, _ = load_library(False)
    return ctypes.cast(lib.scops_flag_test, ctypes.c_void_p).value if lib is not None else None


def native_info() -> dict:
    """What the native side offers on this machine (for logs and tests)."""
    cpu, cpu_where = load_library(False)
    cu, cu_where = load_library(True)
    return {
        "cpu_lib": cpu_where if cpu else None,
        "cpu_features": cpu.scops_cpu_features().decode() if cpu else None,
        "cuda_lib": cu_where if cu else None,
        "cuda_devices": int(cu.scops_cuda_available()) if cu else 0,
    }


_E_INVALID_ARG, _E_ABI = 1, 6  # scops_status codes that no other backend would fix


def _status_error(lib: ctypes.CDLL, status: int, what: str) -> KernelError:
    err = KernelError(f"{what}: {lib.scops_status_string(status).decode()} (status {status})")
    err.status = status
    return err


def _log_backend_once(message: str) -> None:
    global _logged
    if not _logged:
        _logged = True
        _LOG.info("scops kernels: %s", message)


def _check_weights(spec: ProjectorSpec, weights: dict) -> dict:
    """Validated, C-contiguous copies/views of the weights (KernelError on any mismatch)."""
    if not isinstance(spec, ProjectorSpec):
        raise KernelError("spec must be a ProjectorSpec")
    for name in ("in_dim", "out_dim", "hidden_dim"):
        v = getattr(spec, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0 or (v == 0 and name != "hidden_dim"):
            raise KernelError(f"spec.{name} must be a positive int (hidden_dim may be 0), got {v!r}")
    if spec.gelu not in _GELU:
        raise KernelError(f"spec.gelu must be one of {sorted(_GELU)}, got {spec.gelu!r}")
    if spec.gelu != "none" and not spec.hidden_dim:
        raise KernelError("spec.gelu needs a second linear (hidden_dim > 0)")
    try:
        scale, eps = float(spec.scale), float(spec.ln_eps)
    except (TypeError, ValueError):
        raise KernelError(f"spec.scale / spec.ln_eps must be numbers, got {spec.scale!r} / {spec.ln_eps!r}") from None
    if not math.isfinite(scale) or not (math.isfinite(eps) and eps > 0):
        raise KernelError("spec.scale must be finite and spec.ln_eps finite and > 0")
    n1 = spec.hidden_dim or spec.out_dim
    shapes = {"fc1.weight": (n1, spec.in_dim)}
    if spec.bias:
        shapes["fc1.bias"] = (n1,)
    if spec.hidden_dim:
        shapes["fc2.weight"] = (spec.out_dim, spec.hidden_dim)
        if spec.bias:
            shapes["fc2.bias"] = (spec.out_dim,)
    if spec.layernorm:
        shapes["ln.weight"] = shapes["ln.bias"] = (spec.in_dim,)
    out = {}
    for key, shape in shapes.items():
        arr = weights.get(key) if isinstance(weights, dict) else None
        if not isinstance(arr, np.ndarray):
            raise KernelError(f"weights[{key!r}] missing or not a numpy array")
        if arr.shape != shape:
            raise KernelError(f"weights[{key!r}] has shape {arr.shape}, expected {shape}")
        if key.endswith("weight") and key.startswith("fc"):
            if arr.dtype not in _DTYPES:
                raise KernelError(f"weights[{key!r}] dtype {arr.dtype} not supported (float32 or float16)")
            out[key] = np.ascontiguousarray(arr)
        else:
            if not np.issubdtype(arr.dtype, np.floating):
                raise KernelError(f"weights[{key!r}] must be floating point, got {arr.dtype}")
            out[key] = np.ascontiguousarray(arr, dtype=np.float32)
    if spec.hidden_dim and out["fc1.weight"].dtype != out["fc2.weight"].dtype:
        raise KernelError("fc1.weight and fc2.weight must share one dtype")
    return out


class PinnedBuffer:
    """float32 [n] in page-locked host memory (cudaHostAlloc via the CUDA kernels library).

    The runtime hands it to llama.cpp as llama_batch.embd when the projector runs on CUDA,
    so the projector's copy out of the GPU is one DMA. `array` is valid until close().
    """

    def __init__(self, lib: ctypes.CDLL, ptr: int, n: int):
        self._lib, self._ptr, self.n = lib, ptr, n
        self.array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n,))

    @property
    def address(self) -> int:
        return self._ptr

    @classmethod
    def allocate(cls, n: int) -> "PinnedBuffer":
        """KernelError when the CUDA library or a device is missing, or the allocation fails."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise KernelError(f"pinned buffer size must be a positive int, got {n!r}")
        lib, where = load_library(cuda=True)
        if lib is None:
            raise KernelError(f"pinned memory needs the CUDA kernels library: {where}")
        ptr = ctypes.c_void_p()
        status = lib.scops_host_alloc(int(n) * 4, ctypes.byref(ptr))
        if status != 0:
            raise _status_error(lib, status, "scops_host_alloc")
        return cls(lib, ptr.value, int(n))

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        self.array = None
        if ptr:
            self._lib.scops_host_free(ptr)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Projector:
    """A created projector; see the module docstring.  Use one instance per thread."""

    def __init__(self, spec: ProjectorSpec, backend: str, lib=None, handle=None, w32=None):
        self.spec, self.backend = spec, backend
        self._lib, self._handle, self._w32 = lib, handle, w32

    @classmethod
    def create(cls, spec: ProjectorSpec, weights: dict, backend: str = "auto", threads: int = 0) -> "Projector":
        if backend not in _BACKEND_CODES and backend != "numpy":
            raise KernelError(f"unknown backend {backend!r}")
        if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or not 0 <= threads <= _MAX_THREADS:
            raise KernelError(f"threads must be an int in [0, {_MAX_THREADS}], got {threads!r}")
        w = _check_weights(spec, weights)
        if backend == "numpy":
            return cls(spec, "numpy", w32=reference.prepare_fp32(spec, w))
        reasons = []
        tries = {"auto": ["cuda", "cpu"], "cuda": ["cuda"]}.get(backend, ["cpu"])
        for lib_kind in tries:
            lib, where = load_library(cuda=lib_kind == "cuda")
            if lib is None:
                reasons.append(f"{lib_kind} library {where}")
                continue
            if lib_kind == "cuda" and lib.scops_cuda_available() <= 0:
                reasons.append("no CUDA device")
                continue
            code = _BACKEND_CODES["cuda" if lib_kind == "cuda" else backend if backend != "auto" else "cpu"]
            proj = cls._create_native(spec, w, lib, code, threads)
            if isinstance(proj, KernelError):
                if backend != "auto" or proj.status in (_E_INVALID_ARG, _E_ABI):
                    raise proj
                reasons.append(str(proj))
                continue
            if backend in _SIMD_BACKENDS and proj.backend != backend:
                proj.close()
                raise KernelError(f"{backend} requested but this build/CPU offers {lib.scops_cpu_features().decode()}")
            skipped = f"; skipped: {'; '.join(reasons)}" if reasons else ""
            _log_backend_once(f"backend {proj.backend} ({where}, threads={threads or os.cpu_count()}{skipped})")
            return proj
        if backend != "auto":
            raise KernelError(f"backend {backend!r} unavailable: " + "; ".join(reasons))
        _log_backend_once("backend numpy (native library unavailable: " + "; ".join(reasons) + ")")
        return cls(spec, "numpy", w32=reference.prepare_fp32(spec, w))

    @classmethod
    def _create_native(cls, spec, w, lib, backend_code, threads):
        p = _Params()
        lib.scops_projector_params_init(ctypes.byref(p))
        p.in_dim, p.hidden_dim, p.out_dim = spec.in_dim, spec.hidden_dim, spec.out_dim
        p.layernorm, p.ln_eps, p.gelu = int(spec.layernorm), spec.ln_eps, _GELU[spec.gelu]
        p.l2norm, p.scale = int(spec.l2norm), spec.scale
        p.weight_dtype, p.n_threads, p.backend = _DTYPES[w["fc1.weight"].dtype], int(threads), backend_code
        ptr = lambda key: w[key].ctypes.data if key in w else None  # noqa: E731
        p.ln_weight, p.ln_bias = ptr("ln.weight"), ptr("ln.bias")
        p.fc1_weight, p.fc1_bias = ptr("fc1.weight"), ptr("fc1.bias")
        p.fc2_weight, p.fc2_bias = ptr("fc2.weight"), ptr("fc2.bias")
        handle = ctypes.c_void_p()
        status = lib.scops_projector_create(ctypes.byref(p), ctypes.byref(handle))
        if status != 0:
            return _status_error(lib, status, "scops_projector_create")
        name = lib.scops_projector_backend_name(handle).decode()
        return cls(spec, name, lib=lib, handle=handle)

    def forward(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.spec.in_dim:
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise KernelError(f"x must be float32 [rows, {self.spec.in_dim}], got {got}")
        rows = x.shape[0]
        if out is None:
            out = np.empty((rows, self.spec.out_dim), dtype=np.float32)
        elif (not isinstance(out, np.ndarray) or out.dtype != np.float32
              or out.shape != (rows, self.spec.out_dim) or not out.flags.writeable):
            got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise KernelError(f"out must be writable float32 [{rows}, {self.spec.out_dim}], got {got}")
        if rows == 0:
            return out
        if self.backend == "numpy":
            if self._w32 is None:
                raise KernelError("projector is closed")
            return reference.project_numpy_fp32(self.spec, self._w32, x, out)
        if self._handle is None:
            raise KernelError("projector is closed")
        xc = np.ascontiguousarray(x)
        target = out if out.flags.c_contiguous else np.empty(out.shape, dtype=np.float32)
        status = self._lib.scops_projector_forward(self._handle, xc.ctypes.data, rows,
                                                   target.ctypes.data, target.size)
        if status != 0:
            raise _status_error(self._lib, status, "scops_projector_forward")
        if target is not out:
            np.copyto(out, target)  # strided destination: one copy
        return out

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._lib is not None:
            self._lib.scops_projector_destroy(handle)
        self._w32 = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Projector({self.spec}, backend={self.backend!r})"
