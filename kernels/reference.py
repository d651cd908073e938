"""Plain numpy twins of the fused projector (kernels/projector_cpu.cpp, projector_cuda.cu).

    y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )

Two functions:
  * ``project_reference`` -- the reference the tests compare against; computes in any float
    dtype (float64 by default), weights upcast, exact erf (``math.erf``).
  * ``project_numpy_fp32`` -- the straightforward *unfused* fp32 numpy path: one temporary
    per step, weights as fp32.  It is the benchmark baseline (bench/kernels.py) and the
    "numpy" backend of ``scops.kernels.Projector`` when no native library loads.

Both take the spec duck-typed (any object with ProjectorSpec's fields) and the weights dict
of ``Projector.create`` ("ln.weight", "ln.bias", "fc1.weight" [out, in], "fc1.bias",
"fc2.weight", "fc2.bias").  Run the kernel tests with ``pytest -q tests/test_kernels.py``.
"""
from __future__ import annotations

import math

import numpy as np

# torch.nn.functional.normalize's eps: norms below it are clamped (no division by zero).
L2_EPS = 1e-12
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_erf64 = np.frompyfunc(math.erf, 1, 1)


def erf_exact(x: np.ndarray) -> np.ndarray:
    """erf via math.erf, element by element (slow; reference only)."""
    return _erf64(x.astype(np.float64)).astype(np.float64).astype(x.dtype, copy=False)


def erf_numpy(x: np.ndarray) -> np.ndarray:
    """erf from numpy ufuncs only: Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


def gelu(x: np.ndarray, kind: str, exact: bool = True) -> np.ndarray:
    if kind == "none":
        return x
    if kind == "erf":
        erf = erf_exact if exact else erf_numpy
        return 0.5 * x * (1.0 + erf(x / np.sqrt(x.dtype.type(2.0))))
    if kind == "tanh":
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    raise ValueError(f"unknown gelu kind {kind!r}")


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, dtype) -> np.ndarray:
    # x [rows, in] @ w[out, in]^T (+ b[out]) -> [rows, out]
    y = x @ w.astype(dtype, copy=False).T
    if b is not None:
        y += b.astype(dtype, copy=False)
    return y


def project_reference(spec, weights: dict, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The whole chain in ``dtype`` (float64 default); x [rows, in] -> [rows, out]."""
    h = np.asarray(x, dtype=dtype)
    if spec.layernorm:
        mean = h.mean(axis=1, keepdims=True)
        var = ((h - mean) ** 2).mean(axis=1, keepdims=True)
        h = (h - mean) / np.sqrt(var + dtype(spec.ln_eps))
        h = h * weights["ln.weight"].astype(dtype) + weights["ln.bias"].astype(dtype)
    h = _linear(h, weights["fc1.weight"], weights.get("fc1.bias") if spec.bias else None, dtype)
    if spec.hidden_dim:
        h = gelu(h, spec.gelu, exact=True)
        h = _linear(h, weights["fc2.weight"], weights.get("fc2.bias") if spec.bias else None, dtype)
    if spec.l2norm:
        norm = np.sqrt((h * h).sum(axis=1, keepdims=True))
        h = h / np.maximum(norm, L2_EPS) * dtype(spec.scale)
    return h


def prepare_fp32(spec, weights: dict) -> dict:
    """fp32 copies of the weights the unfused path uses (done once, like a model load)."""
    out = {}
    for key, val in weights.items():
        if key.startswith("fc") and key.endswith(".bias") and not spec.bias:
            continue
        out[key] = np.ascontiguousarray(val, dtype=np.float32)
    return out


def project_numpy_fp32(spec, w32: dict, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unfused fp32 numpy chain; ``w32`` from ``prepare_fp32``.  Writes ``out`` if given."""
    h = x
    if spec.layernorm:
        mean = h.mean(axis=1, keepdims=True)
        var = h.var(axis=1, keepdims=True)
        h = (h - mean) / np.sqrt(var + np.float32(spec.ln_eps)) * w32["ln.weight"] + w32["ln.bias"]
    h = h @ w32["fc1.weight"].T  # [rows, in] @ [in, out]
    if "fc1.bias" in w32:
        h = h + w32["fc1.bias"]
    if spec.hidden_dim:
        h = gelu(h, spec.gelu, exact=False)
        h = h @ w32["fc2.weight"].T
        if "fc2.bias" in w32:
            h = h + w32["fc2.bias"]
    if spec.l2norm:
        norm = np.sqrt((h * h).sum(axis=1, keepdims=True))
        h = h / np.maximum(norm, np.float32(L2_EPS)) * np.float32(spec.scale)
    if out is None:
        return np.ascontiguousarray(h, dtype=np.float32)
    np.copyto(out, h, casting="same_kind")
    return out
