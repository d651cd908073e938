"""GPU memory of a benchmark worker, measured by NVML from the parent process.

    with VramSampler() as v:          # baseline: what the GPU holds before the worker starts
        run the worker process
    v.peak_bytes                      # max(used - baseline) over the worker's life, or None

NVML is read through ctypes (libnvidia-ml.so.1 ships with the driver; no Python package,
no CUDA context in the parent). The figure is the device's memory in use minus what was
in use before, sampled every SAMPLE_S: it includes the worker's CUDA context and every
allocator's reserve (onnxruntime's arena, llama.cpp's buffers, torch's cache), which is
what a card must have free. Workers run one at a time, so nothing else moves the number.
"""
from __future__ import annotations

import ctypes
import threading
import time

# 5 ms between samples: far shorter than any stage whose peak could be missed (a 7B
# model's weights take seconds to load; a decode step's scratch lives a few ms at least).
SAMPLE_S = 0.005
NVML_SUCCESS = 0


class _Memory(ctypes.Structure):          # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """The first GPU's name, driver version and memory in use; raises OSError without NVML."""

    def __init__(self, index: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != NVML_SUCCESS:
            raise OSError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != NVML_SUCCESS:
            raise OSError(f"no GPU {index}")

    def used(self) -> int:
        m = _Memory()
        if self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(m)) != NVML_SUCCESS:
            raise OSError("nvmlDeviceGetMemoryInfo failed")
        return int(m.used)

    def describe(self) -> dict:
        name, drv = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96)
        self.lib.nvmlDeviceGetName(self.handle, name, 96)
        self.lib.nvmlSystemGetDriverVersion(drv, 96)
        m = _Memory()
        self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(m))
        return {"gpu": name.value.decode(), "driver": drv.value.decode(), "gpu_mem_gib": round(m.total / 2**30, 1)}


def gpu_info() -> dict | None:
    try:
        return Nvml().describe()
    except (OSError, AttributeError):
        return None


class VramSampler:
    """Peak of (device memory used - baseline) while the `with` block runs; None without NVML."""

    def __init__(self, period: float = SAMPLE_S):
        self.period = period
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = None
        try:
            self._nvml = Nvml()
        except (OSError, AttributeError):
            self._nvml = None

    def __enter__(self) -> "VramSampler":
        if self._nvml is None:
            return self
        self.baseline = self._nvml.used()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._nvml.used() - self.baseline)
            time.sleep(self.period)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
