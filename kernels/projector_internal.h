// projector_internal.h -- the contract between the C API boundary (projector_api.cpp)
// and the backends (projector_cpu.cpp, projector_cuda.cu).  Backends receive parameters
// that were already validated; they do no argument checking of their own.
#pragma once
#include "projector.h"

#include <cstddef>
#include <cstdint>

struct scops_projector {
    virtual ~scops_projector() = default;
    // x [rows, in_dim] host, y [rows, out_dim] host; rows >= 1, capacity already checked.
    virtual scops_status forward(const float* x, int64_t rows, float* y) = 0;
    virtual scops_status forward_device(const float* x, int64_t rows, float* y) {
        (void)x; (void)rows; (void)y;
        return SCOPS_E_UNSUPPORTED;
    }
    virtual const char* name() const = 0;
    int64_t out_dim = 0;
};

namespace scops {

// Validated creation parameters (copied from the C struct).
struct Spec {
    int64_t in = 0, hidden = 0, out = 0;  // hidden == 0: single linear in -> out
    bool layernorm = false, l2norm = false;
    float ln_eps = 1e-5f, scale = 1.0f;
    int gelu = SCOPS_GELU_NONE;
    int dtype = SCOPS_DTYPE_F32;
    int threads = 1;  // resolved, >= 1
    int64_t max_rows = 64;
    const float *ln_w = nullptr, *ln_b = nullptr;
    const void* w1 = nullptr;
    const float* b1 = nullptr;
    const void* w2 = nullptr;
    const float* b2 = nullptr;
    int64_t fc1_out() const { return hidden > 0 ? hidden : out; }
};

scops_status create_cpu_projector(const Spec& s, bool force_scalar, scops_projector** out);
scops_status create_cuda_projector(const Spec& s, scops_projector** out);
int cuda_device_count();
scops_status cuda_host_alloc(size_t bytes, void** out);
void cuda_host_free(void* p);
// The SIMD path the CPU backend uses on this machine: compiled in (CMake picks AVX2 on
// x86-64, NEON on aarch64) and offered by the CPU; the scalar path is the floor everywhere.
enum class CpuPath { kScalar, kAvx2, kNeon };
CpuPath best_cpu_path();
const char* cpu_path_features(CpuPath p);  // "avx2+fma+f16c" | "neon" | "scalar"
const char* cpu_path_backend(CpuPath p);   // "cpu-avx2" | "cpu-neon" | "cpu-scalar"

}  // namespace scops
