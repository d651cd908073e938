// projector_cpu_kernels.h -- what projector_cpu.cpp (orchestration, scalar path) and the
// SIMD paths (projector_cpu_avx2.cpp on x86-64, projector_cpu_neon.cpp on aarch64) share.
// Plain declarations only: no inline code here, so no function compiled with -mavx2 can
// leak into the scalar library code.
#pragma once
#include <cstdint>

namespace scops {
namespace cpu {

// Packed weight panel width: 16 output columns = two AVX2 vectors of 8 floats = four NEON
// vectors of 4.
constexpr int kPanel = 16;
// K block: a 16-column fp32 panel chunk of 256 k is 16 KiB, half of a 32 KiB L1d.
constexpr int64_t kKc = 256;
// Row block: 96 rows x 256 k x 4 B = 96 KiB of activations, well inside a 1 MiB L2;
// 96 = 16 register tiles of 6 rows.
constexpr int64_t kMc = 96;
// Rows at or below this take the "few rows" path: several panels are processed together
// so the FMA chains stay independent.  (Both paths convert fp16 weights in registers.)
constexpr int64_t kFewRows = 3;

// One linear layer over a range of weight panels:
//   c[r, n] = gelu( sum_k a[r, k] * W[n, k] + bias[n] )   for r < rows, n < n_valid
// The packed weights hold panel p (columns 16p .. 16p+15) at b + p * k * 16 elements,
// laid out [k][16] (k-major, zero-padded past n_valid).  Every c element is reduced in
// the same order (k ascending, one accumulator) whatever the panel range or thread count.
struct GemmJob {
    const float* a;  // [rows, lda]
    int64_t lda;
    int64_t rows;
    int64_t k;
    const void* b;  // packed panels, float or uint16 (fp16 bits)
    bool b_f16;
    const float* bias;  // [panels * 16] zero-padded, or nullptr
    int gelu;           // scops_gelu
    float* c;           // [rows, ldc]
    int64_t ldc;
    int64_t n_valid;
};

void gemm_panels_scalar(const GemmJob& job, int64_t p0, int64_t p1);
void gemm_panels_avx2(const GemmJob& job, int64_t p0, int64_t p1);  // x86-64 builds only
void gemm_panels_neon(const GemmJob& job, int64_t p0, int64_t p1);  // aarch64 builds only

}  // namespace cpu
}  // namespace scops
