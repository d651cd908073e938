"""What this machine offers on the GPU side, found without torch and without a CUDA context.

    cuda_devices()        -> ["NVIDIA H200"]   (driver API via libcuda.so.1; [] without a driver)
    tensorrt_available()  -> True when TensorRT's runtime library loads (the TensorRT EP needs it)
    preload_cuda_libraries()  the CUDA runtime / cuBLAS / cuDNN of pip's nvidia-* packages, loaded
                          globally so llama.cpp's and onnxruntime's CUDA libraries resolve them
    llama_devices()       -> [("CUDA0", "NVIDIA H200")]  ggml's GPU devices in the loaded llama.cpp

Everything here answers "no" rather than raising: a CPU machine is the normal case.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("scops")

# Sonames tried for TensorRT's runtime (TensorRT 10 and 11 ship libnvinfer.so.10 / .so.11).
TENSORRT_SONAMES = ("libnvinfer.so.11", "libnvinfer.so.10")
# pip's nvidia-* packages, in load order (a library's dependencies first). CUDA 13 wheels put
# them under nvidia/cu13/lib, CUDA 12 ones under nvidia/<name>/lib.
CUDA_PIP_LIBS = ("libcudart.so", "libcublasLt.so", "libcublas.so", "libcufft.so", "libcurand.so",
                 "libnvrtc.so", "libcudnn.so")
CU_SUCCESS = 0


@functools.lru_cache(maxsize=1)
def cuda_devices() -> tuple[str, ...]:
    """Names of the NVIDIA GPUs the driver sees (cuInit + cuDeviceGetName), () when none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return ()
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    try:
        if cu.cuInit(0) != CU_SUCCESS:
            return ()
        n = ctypes.c_int(0)
        if cu.cuDeviceGetCount(ctypes.byref(n)) != CU_SUCCESS:
            return ()
        names = []
        for i in range(n.value):
            dev = ctypes.c_int(0)
            buf = ctypes.create_string_buffer(256)
            if cu.cuDeviceGet(ctypes.byref(dev), i) == CU_SUCCESS and \
                    cu.cuDeviceGetName(buf, len(buf), dev) == CU_SUCCESS:
                names.append(buf.value.decode(errors="replace"))
        return tuple(names)
    except (AttributeError, OSError):
        return ()


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file and folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _pip_lib_dirs() -> list[Path]:
    """lib folders of pip's nvidia-* packages on sys.path (nvidia/cu13/lib, nvidia/cublas/lib, ...)."""
    dirs = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            dirs += sorted(p for p in root.glob("*/lib") if p.is_dir())
    return dirs


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> tuple[str, ...]:
    """Load pip's CUDA libraries with RTLD_GLOBAL; returns what was loaded (nothing on a CPU box).

    llama.cpp's libggml-cuda.so and onnxruntime's CUDA provider look for libcudart.so.N,
    libcublas.so.N and cuDNN by soname; when those come from pip packages rather than a
    system CUDA, nothing is on the loader's path until they are loaded here.
    """
    if not cuda_devices():
        return ()
    loaded = []
    try:                                        # onnxruntime-gpu >= 1.21 knows its own needs
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()               # the nvidia-* packages it was built against
    except Exception as e:                      # noqa: BLE001 - best effort, reported below
        log.debug("onnxruntime.preload_dlls: %s", e)
    for d in _pip_lib_dirs():
        for stem in CUDA_PIP_LIBS:
            for path in sorted(glob.glob(str(d / (stem + ".*")))):
                if not re.search(r"\.so\.\d+$", path):
                    continue
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    loaded.append(path)
                except OSError as e:
                    log.debug("preload %s: %s", path, e)
    return tuple(loaded)


@functools.lru_cache(maxsize=1)
def tensorrt_available() -> bool:
    """True when TensorRT's runtime library can be loaded (by soname, or from the tensorrt_libs wheel)."""
    names = list(TENSORRT_SONAMES)
    try:
        import tensorrt_libs  # noqa: F401 - pip's TensorRT wheels put the libraries in this package
        names = [str(p) for p in Path(tensorrt_libs.__path__[0]).glob("libnvinfer.so.*")] + names
    except ImportError:
        pass
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def llama_devices() -> list[tuple[str, str]]:
    """(name, description) of ggml's GPU devices in the llama.cpp that llama_cpp loaded."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    try:
        ggml = ctypes.CDLL(str(libdir / "libggml.so"))
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    except OSError:
        return []
    out = []
    try:
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for lib in (ggml, base):                  # the getters live in ggml-base in recent builds
            if hasattr(lib, "ggml_backend_dev_name"):
                getters = lib
                break
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(getters, fn).restype = ctypes.c_char_p
            getattr(getters, fn).argtypes = [ctypes.c_void_p]
        getters.ggml_backend_dev_type.restype = ctypes.c_int
        getters.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            if getters.ggml_backend_dev_type(dev) in (1, 2):     # GGML_BACKEND_DEVICE_TYPE_GPU / IGPU
                out.append((getters.ggml_backend_dev_name(dev).decode(),
                            getters.ggml_backend_dev_description(dev).decode()))
    except (AttributeError, OSError, UnboundLocalError):
        return []
    return out
