"""Fused projector kernels (kernels/) against the float64 numpy reference.

Run: pytest -q tests/test_kernels.py   (CUDA cases carry @pytest.mark.gpu, skipped without a GPU)
"""
from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scops.kernels import KernelError, Projector, ProjectorSpec, load_library, native_info
from scops.kernels import reference as R

CPU_LIB, CPU_WHERE = load_library(cuda=False)
CUDA_LIB, CUDA_WHERE = load_library(cuda=True)
HAVE_AVX2 = CPU_LIB is not None and CPU_LIB.scops_cpu_features() == b"avx2+fma+f16c"
# The library's SIMD path on this machine: AVX2 on x86-64, NEON on aarch64 (None: scalar only).
SIMD = {b"avx2+fma+f16c": "cpu-avx2", b"neon": "cpu-neon"}.get(CPU_LIB.scops_cpu_features()) if CPU_LIB else None
HAVE_GPU = CUDA_LIB is not None and CUDA_LIB.scops_cuda_available() > 0
CPU_BACKENDS = ["cpu-scalar"] + ([SIMD] if SIMD else [])
FP32_TOL = 1e-5
# Tiny problems (a 37-wide dot product) have errors of one or two roundings, where the 2x
# ratio is luck; below 2 fp32 ulps (2 * 2^-23) both are "exact" and the ratio is not checked.
ULP_FLOOR = 2 * 2.0**-23

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device (scops_cuda_available() == 0)")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def test_native_libraries_are_built():
    """`make setup` builds the kernels: a failed build is a red suite, not skipped tests."""
    assert CPU_LIB is not None, f"libscops_kernels.so: {CPU_WHERE}"
    # the CPU's own flags, not the library's answer alone, say whether the AVX2 path must run
    want_avx2 = {"avx2", "fma", "f16c"} <= _cpu_flags()
    assert HAVE_AVX2 == want_avx2, f"library reports {CPU_LIB.scops_cpu_features()!r}, /proc/cpuinfo differs"
    if _nvcc():     # CMake builds the CUDA library wherever a CUDA compiler is found
        assert CUDA_LIB is not None, f"nvcc at {_nvcc()} but libscops_kernels_cuda.so: {CUDA_WHERE}"


def make_weights(spec: ProjectorSpec, dtype, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    n1 = spec.hidden_dim or spec.out_dim
    w = {"fc1.weight": (rng.standard_normal((n1, spec.in_dim), dtype=np.float32) / np.sqrt(spec.in_dim)).astype(dtype)}
    if spec.bias:
        w["fc1.bias"] = rng.standard_normal(n1, dtype=np.float32) * 0.5
    if spec.hidden_dim:
        w["fc2.weight"] = (rng.standard_normal((spec.out_dim, n1), dtype=np.float32) / np.sqrt(n1)).astype(dtype)
        if spec.bias:
            w["fc2.bias"] = rng.standard_normal(spec.out_dim, dtype=np.float32) * 0.5
    if spec.layernorm:
        w["ln.weight"] = 1.0 + 0.1 * rng.standard_normal(spec.in_dim, dtype=np.float32)
        w["ln.bias"] = 0.1 * rng.standard_normal(spec.in_dim, dtype=np.float32)
    return w


def make_x(rows, in_dim, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, in_dim), dtype=np.float32) * 2.0 + 0.5


def rel_err(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def run_poisoned(proj, x, out_dim):
    out = np.full((x.shape[0], out_dim), np.nan, dtype=np.float32)
    y = proj.forward(x, out=out)
    assert y is out
    assert np.isfinite(out).all(), "some output element was not written"
    return out


def check(spec, backend, rows, dtype, threads=0):
    w = make_weights(spec, dtype)
    x = make_x(rows, spec.in_dim)
    ref = R.project_reference(spec, w, x)
    with Projector.create(spec, w, backend=backend, threads=threads) as proj:
        y = run_poisoned(proj, x, spec.out_dim)
    err = rel_err(y, ref)
    if dtype == np.float32:
        assert err <= FP32_TOL, f"{spec} rows={rows}: rel err {err:.2e}"
    else:  # fp16 weights: no worse than 2x numpy's own fp32 compute with the same weights
        np_err = rel_err(R.project_numpy_fp32(spec, R.prepare_fp32(spec, w), x), ref)
        assert err <= max(2 * np_err, ULP_FLOOR), f"{spec} rows={rows}: {err:.2e} vs numpy {np_err:.2e}"
    return y


# -- every combination of the optional steps, small awkward sizes ----------------------------
CHAINS = [
    dict(layernorm=ln, bias=b, l2norm=l2, hidden_dim=h, gelu=g, scale=2.5 if l2 else 1.0)
    for ln, b, l2 in itertools.product([False, True], repeat=3)
    for h, g in [(0, "none"), (19, "none"), (19, "erf"), (19, "tanh")]
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_chain_combinations(chain, dtype):
    spec = ProjectorSpec(in_dim=37, out_dim=45, **chain)
    for backend in CPU_BACKENDS:
        for rows in (1, 2, 3, 7):
            check(spec, backend, rows, dtype)


def test_flag_test_reads_the_word_it_is_given():
    """scops_flag_test, llama.cpp's abort callback for the scheduler (runtime/llm.py)."""
    from scops.kernels import flag_test_address
    lib, where = load_library()
    assert lib is not None, where
    word = ctypes.c_int32(0)
    assert lib.scops_flag_test(ctypes.addressof(word)) is False
    word.value = 7
    assert lib.scops_flag_test(ctypes.addressof(word)) is True
    assert lib.scops_flag_test(None) is False
    as_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)(flag_test_address())
    assert as_callback(ctypes.addressof(word)) is True       # called as llama.cpp will call it
    word.value = 0
    assert as_callback(ctypes.addressof(word)) is False


def test_chain_combinations_numpy_backend():
    for chain in CHAINS:
        spec = ProjectorSpec(in_dim=37, out_dim=45, **chain)
        check(spec, "numpy", 5, np.float32)


# -- real-sized shapes; every listed rows / in / out value appears ----------------------------
SHAPES = [  # rows, in, out, hidden
    (1, 1024, 5120, 0),
    (7, 767, 4095, 0),
    (32, 768, 4096, 0),
    (33, 1025, 4095, 0),
    (257, 767, 1024, 0),
    (576, 1024, 4096, 0),
]


@pytest.mark.skipif(SIMD is None, reason="no SIMD path (AVX2 / NEON) on this CPU")
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,in_dim,out_dim,hidden", SHAPES, ids=lambda v: str(v))
def test_real_shapes_simd(rows, in_dim, out_dim, hidden, dtype):
    check(ProjectorSpec(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden), SIMD, rows, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_two_linear_gelu_lego_like(dtype):
    # LEGO's chain at reduced hidden width: Linear 1024->512 -> GELU(erf) -> Linear 512->4096.
    spec = ProjectorSpec(in_dim=1024, hidden_dim=512, out_dim=4096, gelu="erf")
    check(spec, CPU_BACKENDS[-1], 33, dtype)


@pytest.mark.skipif(SIMD is None, reason="no SIMD path (AVX2 / NEON) on this CPU")
def test_lego_full_size_fp16():
    spec = ProjectorSpec(in_dim=1024, hidden_dim=4096, out_dim=4096, gelu="erf")
    check(spec, SIMD, 576, np.float16)


def test_create_destroy_many():
    spec = ProjectorSpec(in_dim=64, out_dim=48)
    w = make_weights(spec, np.float32)
    x = make_x(4, 64)
    for i in range(50):
        proj = Projector.create(spec, w, backend=CPU_BACKENDS[-1], threads=1 + i % 3)
        if i % 2:
            proj.forward(x)
        proj.close()
        proj.close()  # idempotent


def test_missing_library_falls_back_to_numpy(tmp_path):
    code = (
        "import logging, numpy as np\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
        "from scops.kernels import Projector, ProjectorSpec\n"
        "w = {'fc1.weight': np.ones((3, 4), np.float16), 'fc1.bias': np.zeros(3, np.float32)}\n"
        "p = Projector.create(ProjectorSpec(in_dim=4, out_dim=3), w)\n"
        "q = Projector.create(ProjectorSpec(in_dim=4, out_dim=3), w)\n"
        "print(p.backend, p.forward(np.ones((2, 4), np.float32)).sum())\n"
    )
    env = {**os.environ, "SCOPS_KERNELS_LIB": str(tmp_path / "missing.so")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["numpy", "24.0"]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("scops ")]
    assert len(lines) == 1 and "numpy" in lines[0] and "missing.so" in lines[0], res.stderr


def test_imagebind_head():
    spec = ProjectorSpec(in_dim=768, out_dim=1024, layernorm=True, bias=False, l2norm=True, scale=20.0)
    for backend in CPU_BACKENDS:
        y = check(spec, backend, 1, np.float32)
        assert abs(np.linalg.norm(y) - 20.0) < 1e-4


def test_scalar_path_medium():
    check(ProjectorSpec(in_dim=1025, out_dim=300, hidden_dim=70, gelu="tanh", layernorm=True), "cpu-scalar", 9, np.float16)


# -- determinism across thread counts ------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_bit_identical_across_threads(backend, rows):
    spec = ProjectorSpec(in_dim=300 if backend == "cpu-scalar" else 767, hidden_dim=200, out_dim=333, gelu="erf",
                         layernorm=True, l2norm=True, scale=3.0)
    for dtype in (np.float32, np.float16):
        w = make_weights(spec, dtype)
        x = make_x(rows, spec.in_dim)
        outs = []
        for t in (1, 2, 3):
            with Projector.create(spec, w, backend=backend, threads=t) as proj:
                outs.append(run_poisoned(proj, x, spec.out_dim))
        assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
        assert np.array_equal(outs[0].view(np.uint32), outs[2].view(np.uint32))


@pytest.mark.skipif(SIMD is None, reason="no SIMD path (AVX2 / NEON) on this CPU")
def test_large_rows_threads_identical():
    spec = ProjectorSpec(in_dim=1024, out_dim=4096)
    w = make_weights(spec, np.float16)
    x = make_x(257, 1024)
    outs = []
    for t in (1, 2, 3):
        with Projector.create(spec, w, backend=SIMD, threads=t) as proj:
            outs.append(proj.forward(x))
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


# -- output buffers ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy"] + CPU_BACKENDS)
def test_foreign_and_strided_out(backend):
    spec = ProjectorSpec(in_dim=40, out_dim=24)
    w = make_weights(spec, np.float32)
    x = make_x(5, 40)
    ref = R.project_reference(spec, w, x)
    proj = Projector.create(spec, w, backend=backend)
    # a row slice of a larger foreign (ctypes) buffer, like llama.cpp batch memory
    raw = (ctypes.c_float * (9 * 24))()
    big = np.ctypeslib.as_array(raw).reshape(9, 24)
    big[:] = -7.0
    view = big[2:7]
    proj.forward(x, out=view)
    assert rel_err(view, ref) < FP32_TOL
    assert (big[:2] == -7.0).all() and (big[7:] == -7.0).all()
    # a strided (non-contiguous) view
    wide = np.full((5, 48), -7.0, dtype=np.float32)
    proj.forward(x, out=wide[:, ::2])
    assert rel_err(wide[:, ::2], ref) < FP32_TOL and (wide[:, 1::2] == -7.0).all()
    # a non-contiguous x
    xs = np.repeat(x, 2, axis=1)[:, ::2]
    assert rel_err(proj.forward(xs), ref) < FP32_TOL
    assert proj.forward(np.zeros((0, 40), np.float32)).shape == (0, 24)
    proj.close()


# -- bad arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy"] + CPU_BACKENDS)
def test_bad_arguments_raise(backend):
    spec = ProjectorSpec(in_dim=16, out_dim=8)
    w = make_weights(spec, np.float32)
    proj = Projector.create(spec, w, backend=backend)
    x = make_x(3, 16)
    bad_calls = [
        lambda: proj.forward(x.astype(np.float64)),
        lambda: proj.forward(x[:, :15]),
        lambda: proj.forward(x[0]),
        lambda: proj.forward([[1.0] * 16]),
        lambda: proj.forward(x, out=np.empty((3, 7), np.float32)),
        lambda: proj.forward(x, out=np.empty((3, 8), np.float64)),
        lambda: proj.forward(x, out=np.empty((2, 8), np.float32)),
    ]
    ro = np.empty((3, 8), np.float32)
    ro.flags.writeable = False
    bad_calls.append(lambda: proj.forward(x, out=ro))
    for call in bad_calls:
        with pytest.raises(KernelError):
            call()
    proj.close()
    with pytest.raises(KernelError):
        proj.forward(x)


@pytest.mark.parametrize("backend", ["numpy"] + ["cpu"])
def test_bad_create_raises(backend):
    spec = ProjectorSpec(in_dim=16, out_dim=8)
    w = make_weights(spec, np.float32)
    bad = [
        (spec, {k: v for k, v in w.items() if k != "fc1.weight"}),
        (spec, {**w, "fc1.weight": w["fc1.weight"][:, :15]}),
        (spec, {**w, "fc1.weight": w["fc1.weight"].astype(np.int32)}),
        (spec, {**w, "fc1.bias": w["fc1.bias"][:4]}),
        (ProjectorSpec(in_dim=0, out_dim=8), w),
        (ProjectorSpec(in_dim=16, out_dim=-1), w),
        (ProjectorSpec(in_dim=16, out_dim=8, gelu="erf"), w),
        (ProjectorSpec(in_dim=16, out_dim=8, gelu="relu", hidden_dim=4), w),
        (ProjectorSpec(in_dim=16, out_dim=8, l2norm=True, scale=float("nan")), w),
        (ProjectorSpec(in_dim=16, out_dim=8, l2norm=True, scale="big"), w),
        (ProjectorSpec(in_dim=1 << 25, out_dim=8), {**w, "fc1.weight": np.ones((8, 1), np.float32)}),
        (ProjectorSpec(in_dim=16, out_dim=8, layernorm=True), w),  # ln weights missing
        (ProjectorSpec(in_dim=16, out_dim=8, layernorm=True, ln_eps=0.0), w),
    ]
    for s, ww in bad:
        with pytest.raises(KernelError):
            Projector.create(s, ww, backend=backend)
    for kwargs in (dict(backend="tpu"), dict(threads=-1), dict(threads=100000)):
        with pytest.raises(KernelError):
            Projector.create(spec, w, **kwargs)
    if not HAVE_GPU and CUDA_LIB is not None:
        with pytest.raises(KernelError):
            Projector.create(spec, w, backend="cuda")


def test_c_api_rejects_bad_pointers_and_dims():
    from scops.kernels import _Params

    lib = CPU_LIB
    w = np.ones((8, 16), np.float32)
    p = _Params()
    assert lib.scops_projector_params_init(ctypes.byref(p)) == 0
    assert lib.scops_projector_params_init(None) != 0
    h = ctypes.c_void_p()
    assert lib.scops_projector_create(None, ctypes.byref(h)) != 0
    assert lib.scops_projector_create(ctypes.byref(p), None) != 0
    assert lib.scops_projector_create(ctypes.byref(p), ctypes.byref(h)) != 0  # zero dims, no weights
    p.in_dim, p.out_dim = 16, 8
    assert lib.scops_projector_create(ctypes.byref(p), ctypes.byref(h)) != 0  # fc1_weight NULL
    p.fc1_weight = w.ctypes.data
    for field, value in [("in_dim", -3), ("out_dim", 0), ("hidden_dim", -1), ("n_threads", -2), ("gelu", 7),
                         ("weight_dtype", 9), ("backend", 11), ("abi_version", 99), ("max_rows", -1)]:
        old = getattr(p, field)
        setattr(p, field, value)
        assert lib.scops_projector_create(ctypes.byref(p), ctypes.byref(h)) != 0, field
        assert not h.value
        setattr(p, field, old)
    p.l2norm, p.scale = 1, float("inf")
    assert lib.scops_projector_create(ctypes.byref(p), ctypes.byref(h)) != 0
    p.l2norm, p.scale = 0, 1.0
    assert lib.scops_projector_create(ctypes.byref(p), ctypes.byref(h)) == 0 and h.value
    x = np.ones((2, 16), np.float32)
    y = np.empty((2, 8), np.float32)
    fwd = lib.scops_projector_forward
    assert fwd(None, x.ctypes.data, 2, y.ctypes.data, 16) != 0
    assert fwd(h, None, 2, y.ctypes.data, 16) != 0
    assert fwd(h, x.ctypes.data, 2, None, 16) != 0
    assert fwd(h, x.ctypes.data, 0, y.ctypes.data, 16) != 0
    assert fwd(h, x.ctypes.data, -1, y.ctypes.data, 16) != 0
    assert fwd(h, x.ctypes.data, 2, y.ctypes.data, 15) != 0  # capacity too small
    assert lib.scops_projector_forward_device(h, x.ctypes.data, 2, y.ctypes.data, 16) != 0  # CPU handle
    assert fwd(h, x.ctypes.data, 2, y.ctypes.data, 16) == 0
    assert np.allclose(y, 16.0)
    assert lib.scops_projector_backend_name(None) == b"invalid"
    assert lib.scops_status_string(12345) == b"unknown status"
    lib.scops_projector_destroy(h)
    lib.scops_projector_destroy(None)


C_SMOKE = r"""
#include "projector.h"
int main(void) {
    scops_projector_params p;
    float w[6] = {1, 2, 3, 4, 5, 6}, x[2] = {1, 1}, y[3];
    scops_projector* h = 0;
    scops_projector_params_init(&p);
    p.in_dim = 2; p.out_dim = 3; p.fc1_weight = w; p.n_threads = 1;
    if (scops_projector_create(&p, &h) != SCOPS_OK) return 1;
    if (scops_projector_forward(h, x, 1, y, 3) != SCOPS_OK) return 2;
    scops_projector_destroy(h);
    return (y[0] == 3 && y[1] == 7 && y[2] == 11) ? 0 : 3;
}
"""


def test_header_is_plain_c(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    libdir = str(Path(load_library(cuda=False)[1]).parent)
    src = tmp_path / "smoke.c"
    src.write_text(C_SMOKE)
    include = str(Path(R.__file__).resolve().parent)
    build = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-pedantic", f"-I{include}", str(src), f"-L{libdir}",
                            "-lscops_kernels", f"-Wl,-rpath,{libdir}", "-o", str(tmp_path / "smoke")],
                           capture_output=True, text=True)
    if build.returncode != 0 and "projector.h" in build.stderr and "No such file" in build.stderr:
        pytest.skip("projector.h not next to the package (non-editable install)")
    assert build.returncode == 0, build.stderr
    assert subprocess.run([str(tmp_path / "smoke")]).returncode == 0


def test_native_info_and_cuda_available():
    from scops.kernels import cuda_available

    info = native_info()
    assert set(info) == {"cpu_lib", "cpu_features", "cuda_lib", "cuda_devices"}
    assert cuda_available() == info["cuda_devices"] == int(HAVE_GPU and CUDA_LIB.scops_cuda_available())
    if CUDA_LIB is not None:
        # no NVIDIA device node, no device: the library must answer 0, not fail or guess
        devices = CUDA_LIB.scops_cuda_available()
        assert devices == 0 if not list(Path("/dev").glob("nvidia[0-9]*")) else devices > 0


# -- CUDA ------------------------------------------------------------------------------------------
@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,in_dim,out_dim,hidden", SHAPES + [(33, 1024, 4096, 512), (576, 1024, 4095, 300)],
                         ids=lambda v: str(v))
def test_cuda_shapes(rows, in_dim, out_dim, hidden, dtype):
    spec = ProjectorSpec(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden, gelu="erf" if hidden else "none")
    check(spec, "cuda", rows, dtype)


@gpu
@needs_gpu
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_chain_combinations(chain):
    spec = ProjectorSpec(in_dim=37, out_dim=45, **chain)
    for rows in (1, 7, 65):
        for dtype in (np.float32, np.float16):
            check(spec, "cuda", rows, dtype)


# -- aarch64: the NEON path, cross-built and run under qemu-user ----------------------------------
def test_aarch64_neon_under_qemu(tmp_path):
    """Quick version of `make test-arm64`: kernels/check_arm64.sh --quick cross-builds the
    library and kernels/test_projector.c for aarch64 and runs it under qemu-aarch64 (NEON and
    scalar vs a double reference, bit-identity across threads, --expect neon).  Skipped, with
    the script's message, only when the cross tools are not installed (`make system-deps`)."""
    script = Path(__file__).resolve().parents[1] / "kernels" / "check_arm64.sh"
    res = subprocess.run(["bash", str(script), "--quick", str(tmp_path / "arm64")], capture_output=True, text=True,
                         timeout=1200)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "CPU path neon (backend cpu-neon)" in res.stdout, res.stdout
    assert ", 0 failed;" in res.stdout, res.stdout
