// projector_cpu_neon.cpp -- AArch64 NEON (Advanced SIMD) linear-layer kernel of the fused projector.
//
// Computes one linear layer (+bias, +GELU) over a range of packed weight panels:
//   c[r, n] = gelu( sum_k a[r, k] * W[n, k] + bias[n] )
// (GemmJob in projector_cpu_kernels.h).  fp16 weights stay fp16 in memory and are widened
// to fp32 in registers (FCVTL/FCVTL2, exact).  Every output element is summed k-ascending
// with fused multiply-adds into one accumulator per k block of kKc, and the blocks are then
// added in order (two-level sum, as the AVX2 path): which thread or tile computes an
// element never changes how, so results are bit-identical for every thread count.
// NEON is part of the AArch64 base ISA, so this unit needs no extra compiler flags; CMake
// compiles it only for aarch64 targets and projector_cpu.cpp calls it there.
// Build: part of libscops_kernels.so (kernels/CMakeLists.txt).  Cross-build and run its C
// tests under qemu-user: `make test-arm64` (kernels/check_arm64.sh, kernels/test_projector.c).
// Twins: projector_cpu.cpp (gemm_panels_scalar, the plain reference beside it),
// projector_cpu_avx2.cpp (x86-64), kernels/reference.py (numpy), projector_cuda.cu.
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "projector.h"
#include "projector_cpu_kernels.h"

namespace scops {
namespace cpu {
namespace {

// A 16-column panel row is 4 float32x4 vectors.  Register budget (32 x 128-bit): rows x
// 4 x NP accumulators + rows broadcast sources + 4 weight vectors.  Many-rows tile: 4 rows
// x 1 panel = 16 accumulators + 4 + 4 = 24 registers, 16 independent FMA chains (enough
// for 2 FMA pipes x 4 cycles of latency on Cortex-A76/A78).
constexpr int kMr = 4;
constexpr int kVecs = kPanel / 4;

inline void load_panel_row(const float* p, float32x4_t v[kVecs]) {
    for (int q = 0; q < kVecs; ++q) v[q] = vld1q_f32(p + 4 * q);
}
inline void load_panel_row(const uint16_t* p, float32x4_t v[kVecs]) {
    for (int h = 0; h < kVecs / 2; ++h) {
        const float16x8_t w = vreinterpretq_f16_u16(vld1q_u16(p + 8 * h));
        v[2 * h] = vcvt_f32_f16(vget_low_f16(w));
        v[2 * h + 1] = vcvt_high_f32_f16(w);
    }
}

// exp(x) for x in [-88, 88] (clamped): x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor
// polynomial (truncation r^7/7! < 1e-7 relative), 2^n assembled in the exponent bits.
// Same constants as exp_ps in projector_cpu_avx2.cpp.
inline float32x4_t exp_ps(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-88.0f)), vdupq_n_f32(88.0f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693145752f));  // ln2 high part
    r = vfmsq_f32(r, n, vdupq_n_f32(1.42860677e-6f));             // ln2 low part
    float32x4_t p = vdupq_n_f32(1.0f / 720);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

// GELU(x) = 0.5 x (1 + erf(x / sqrt2)).  With z = |x|/sqrt2, erfc(z) ~ q = poly(t) e^{-z^2},
// t = 1/(1 + 0.3275911 z) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7); then
// 1 + erf(x/sqrt2) = q for x < 0 (no cancellation) and 2 - q for x >= 0.
inline float32x4_t gelu_erf_ps(float32x4_t x) {
    const float32x4_t z = vmulq_f32(vabsq_f32(x), vdupq_n_f32(0.70710678f));
    const float32x4_t t = vdivq_f32(vdupq_n_f32(1.0f), vfmaq_f32(vdupq_n_f32(1.0f), z, vdupq_n_f32(0.3275911f)));
    float32x4_t p = vdupq_n_f32(1.061405429f);
    p = vfmaq_f32(vdupq_n_f32(-1.453152027f), p, t);
    p = vfmaq_f32(vdupq_n_f32(1.421413741f), p, t);
    p = vfmaq_f32(vdupq_n_f32(-0.284496736f), p, t);
    p = vfmaq_f32(vdupq_n_f32(0.254829592f), p, t);
    p = vmulq_f32(p, t);
    const float32x4_t q = vmulq_f32(p, exp_ps(vnegq_f32(vmulq_f32(z, z))));
    const uint32x4_t neg = vcltq_f32(x, vdupq_n_f32(0.0f));
    const float32x4_t one_plus_erf = vbslq_f32(neg, q, vsubq_f32(vdupq_n_f32(2.0f), q));
    return vmulq_f32(vmulq_f32(vdupq_n_f32(0.5f), x), one_plus_erf);
}

// tanh GELU: 0.5 x (1 + tanh(u)) = x / (1 + e^{-2u}), u = sqrt(2/pi) (x + 0.044715 x^3).
inline float32x4_t gelu_tanh_ps(float32x4_t x) {
    const float32x4_t x3 = vmulq_f32(vmulq_f32(x, x), x);
    const float32x4_t u = vmulq_f32(vfmaq_f32(x, x3, vdupq_n_f32(0.044715f)), vdupq_n_f32(0.7978845608f));
    const float32x4_t e = exp_ps(vmulq_f32(u, vdupq_n_f32(-2.0f)));
    return vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0f), e));
}

// c[r, 0:16*np] = gelu(c + bias) over mr rows (all columns present in c).
void apply_epilogue(float* c, int64_t ldc, int mr, int np, const float* bias, int gelu) {
    for (int r = 0; r < mr; ++r) {
        for (int q = 0; q < kVecs * np; ++q) {
            float* p = c + r * ldc + q * 4;
            float32x4_t v = vld1q_f32(p);
            if (bias) v = vaddq_f32(v, vld1q_f32(bias + q * 4));
            if (gelu == SCOPS_GELU_ERF) v = gelu_erf_ps(v);
            else if (gelu == SCOPS_GELU_TANH) v = gelu_tanh_ps(v);
            vst1q_f32(p, v);
        }
    }
}

// One k step for lane L of the row vectors av (a[r, k0 .. k0+3]): the weight row k0 + L of
// each of the NP panels, multiplied by a[r, k0 + L] into the accumulators.  The lane index
// must be a compile-time constant for FMLA (by element), hence the template.
template <int L, int MR, int NV, typename BT>
inline void step_lane(float32x4_t (&acc)[MR][NV], const float32x4_t (&av)[MR], const BT* b, int64_t bstride,
                      int64_t k) {
    for (int j = 0; j < NV / kVecs; ++j) {  // NV = 4 vectors x NP panels
        float32x4_t bv[kVecs];
        load_panel_row(b + j * bstride + k * kPanel, bv);
        for (int r = 0; r < MR; ++r)
            for (int q = 0; q < kVecs; ++q) acc[r][j * kVecs + q] = vfmaq_laneq_f32(acc[r][j * kVecs + q], bv[q], av[r], L);
    }
}

// Register micro-kernel: acc[MR][4NP] = a[MR, kc] * b[kc, 16NP]; panel j of b at
// b + j * bstride.  The k block is summed in registers from zero, k ascending (four k per
// load of a, then one at a time); add_c then adds the sums of earlier k blocks already in c.
template <int MR, int NP, typename BT>
void micro(const float* a, int64_t lda, const BT* b, int64_t bstride, int64_t kc, float* c, int64_t ldc,
           bool add_c) {
    float32x4_t acc[MR][kVecs * NP];
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < kVecs * NP; ++q) acc[r][q] = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
        float32x4_t av[MR];
        for (int r = 0; r < MR; ++r) av[r] = vld1q_f32(a + r * lda + k);
        step_lane<0>(acc, av, b, bstride, k);
        step_lane<1>(acc, av, b, bstride, k + 1);
        step_lane<2>(acc, av, b, bstride, k + 2);
        step_lane<3>(acc, av, b, bstride, k + 3);
    }
    for (; k < kc; ++k) {
        for (int j = 0; j < NP; ++j) {
            float32x4_t bv[kVecs];
            load_panel_row(b + j * bstride + k * kPanel, bv);
            for (int r = 0; r < MR; ++r) {
                const float s = a[r * lda + k];
                for (int q = 0; q < kVecs; ++q) acc[r][j * kVecs + q] = vfmaq_n_f32(acc[r][j * kVecs + q], bv[q], s);
            }
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < kVecs * NP; ++q) {
            float* p = c + r * ldc + q * 4;
            vst1q_f32(p, add_c ? vaddq_f32(vld1q_f32(p), acc[r][q]) : acc[r][q]);
        }
}

template <int NP, typename BT>
void micro_rows(int mr, const float* a, int64_t lda, const BT* b, int64_t bstride, int64_t kc, float* c,
                int64_t ldc, bool add_c) {
    switch (mr) {
        case 1: micro<1, NP>(a, lda, b, bstride, kc, c, ldc, add_c); break;
        case 2: micro<2, NP>(a, lda, b, bstride, kc, c, ldc, add_c); break;
        case 3: micro<3, NP>(a, lda, b, bstride, kc, c, ldc, add_c); break;
        default: micro<kMr, NP>(a, lda, b, bstride, kc, c, ldc, add_c); break;
    }
}

// One tile: rows [r, r+mr) x panels [p, p+NP), k block [kb, kb+kc).  A tile that runs past
// n_valid works in a small buffer so only valid output columns are ever touched.
template <int NP, typename BT>
void run_tile(const GemmJob& j, const BT* b, int64_t bstride, int64_t r, int mr, int64_t p, int64_t kb,
              int64_t kc, bool first, bool last) {
    const float* a = j.a + r * j.lda + kb;
    const int64_t col0 = p * kPanel;
    const float* bias = j.bias ? j.bias + col0 : nullptr;
    const int64_t ncols = j.n_valid - col0;
    if (ncols >= NP * kPanel) {
        float* c = j.c + r * j.ldc + col0;
        micro_rows<NP>(mr, a, j.lda, b, bstride, kc, c, j.ldc, !first);
        if (last && (bias || j.gelu)) apply_epilogue(c, j.ldc, mr, NP, bias, j.gelu);
        return;
    }
    alignas(16) float tmp[kMr * NP * kPanel];
    const int64_t ldt = NP * kPanel;
    for (int i = 0; i < mr; ++i) {
        if (!first) std::memcpy(tmp + i * ldt, j.c + (r + i) * j.ldc + col0, size_t(ncols) * sizeof(float));
    }
    micro_rows<NP>(mr, a, j.lda, b, bstride, kc, tmp, ldt, !first);
    if (last && (bias || j.gelu)) apply_epilogue(tmp, ldt, mr, NP, bias, j.gelu);
    for (int i = 0; i < mr; ++i)
        std::memcpy(j.c + (r + i) * j.ldc + col0, tmp + i * ldt, size_t(ncols) * sizeof(float));
}

// Few rows (<= kFewRows): NP panels per tile so that a 1-row GEMV still has 16 independent
// FMA chains (1 row x 4 panels; 2 rows x 2 panels; 3 rows x 1 panel = 12).  Same k blocks,
// hence the same summation order per element, as gemm_many_rows.
template <typename BT>
void gemm_few_rows(const GemmJob& j, const BT* b, int64_t p0, int64_t p1) {
    const int mr = int(j.rows);
    const int64_t pstride = j.k * kPanel;
    const int np = mr == 1 ? 4 : (mr == 2 ? 2 : 1);
    for (int64_t p = p0; p < p1;) {
        const int take = p + np <= p1 ? np : 1;
        for (int64_t kb = 0; kb < j.k; kb += kKc) {
            const int64_t kc = j.k - kb < kKc ? j.k - kb : kKc;
            const bool first = kb == 0, last = kb + kc == j.k;
            const BT* bp = b + p * pstride + kb * kPanel;
            if (take == 4) run_tile<4>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
            else if (take == 2) run_tile<2>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
            else run_tile<1>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
        }
        p += take;
    }
}

// Many rows: blocked over k (kKc) and rows (kMc): a [kKc x 16] weight block (16 KiB fp32)
// stays in L1 while every row tile of the row block streams past it.
template <typename BT>
void gemm_many_rows(const GemmJob& j, const BT* b, int64_t p0, int64_t p1) {
    const int64_t pstride = j.k * kPanel;
    for (int64_t kb = 0; kb < j.k; kb += kKc) {
        const int64_t kc = j.k - kb < kKc ? j.k - kb : kKc;
        const bool first = kb == 0, last = kb + kc == j.k;
        for (int64_t rb = 0; rb < j.rows; rb += kMc) {
            const int64_t re = j.rows - rb < kMc ? j.rows : rb + kMc;
            for (int64_t p = p0; p < p1; ++p) {
                const BT* src = b + p * pstride + kb * kPanel;  // [kc][16]
                for (int64_t r = rb; r < re;) {
                    const int mr = re - r < kMr ? int(re - r) : kMr;
                    run_tile<1>(j, src, pstride, r, mr, p, kb, kc, first, last);
                    r += mr;
                }
            }
        }
    }
}

}  // namespace

void gemm_panels_neon(const GemmJob& job, int64_t p0, int64_t p1) {
    if (p0 >= p1) return;
    if (job.rows <= kFewRows) {
        if (job.b_f16) gemm_few_rows(job, static_cast<const uint16_t*>(job.b), p0, p1);
        else gemm_few_rows(job, static_cast<const float*>(job.b), p0, p1);
    } else {
        if (job.b_f16) gemm_many_rows(job, static_cast<const uint16_t*>(job.b), p0, p1);
        else gemm_many_rows(job, static_cast<const float*>(job.b), p0, p1);
    }
}

}  // namespace cpu
}  // namespace scops
