// projector_cpu_avx2.cpp -- AVX2/FMA/F16C linear-layer kernel of the fused projector.
//
// Computes one linear layer (+bias, +GELU) over a range of packed weight panels; see
// GemmJob in projector_cpu_kernels.h.  This translation unit alone is compiled with
// -mavx2 -mfma -mf16c; projector_cpu.cpp calls it only when __builtin_cpu_supports says
// the CPU has all three.  Everything here is in an anonymous namespace (no inline function
// compiled for AVX2 can be picked by the linker for the scalar code).
// Build: part of libscops_kernels.so (kernels/CMakeLists.txt).
// Twins: kernels/reference.py (numpy), projector_cpu.cpp (scalar), projector_cuda.cu.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "projector.h"
#include "projector_cpu_kernels.h"

namespace scops {
namespace cpu {
namespace {

// Register tile: 6 rows x 16 columns = 12 ymm accumulators + 2 weight vectors + 1
// broadcast = 15 of the 16 ymm registers.
constexpr int kMr = 6;

inline __m256 load_b(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_b(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// exp(x) for x in [-88, 88] (clamped): x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor
// polynomial (truncation r^7/7! < 1e-7 relative), 2^n assembled in the exponent bits.
inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 high part
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);       // ln2 low part
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// GELU(x) = 0.5 x (1 + erf(x / sqrt2)).  With z = |x|/sqrt2, erfc(z) ~ q = poly(t) e^{-z^2},
// t = 1/(1 + 0.3275911 z) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7); then
// 1 + erf(x/sqrt2) = q for x < 0 (no cancellation) and 2 - q for x >= 0.
inline __m256 gelu_erf_ps(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(0.70710678f));
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                             _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 q = _mm256_mul_ps(p, exp_ps(_mm256_mul_ps(_mm256_xor_ps(z, sign), z)));
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), q), q, neg);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), one_plus_erf);
}

// tanh GELU: 0.5 x (1 + tanh(u)) = x / (1 + e^{-2u}), u = sqrt(2/pi) (x + 0.044715 x^3).
inline __m256 gelu_tanh_ps(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x),
                             _mm256_set1_ps(0.7978845608f));
    __m256 e = exp_ps(_mm256_mul_ps(u, _mm256_set1_ps(-2.0f)));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// c[r, 0:16*np] = gelu(c + bias) over mr rows (all columns present in c).
void apply_epilogue(float* c, int64_t ldc, int mr, int np, const float* bias, int gelu) {
    for (int r = 0; r < mr; ++r) {
        for (int q = 0; q < 2 * np; ++q) {
            float* p = c + r * ldc + q * 8;
            __m256 v = _mm256_loadu_ps(p);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + q * 8));
            if (gelu == SCOPS_GELU_ERF) v = gelu_erf_ps(v);
            else if (gelu == SCOPS_GELU_TANH) v = gelu_tanh_ps(v);
            _mm256_storeu_ps(p, v);
        }
    }
}

// Prefetch done by the first row tile of a panel's k block in gemm_many_rows (kSide =
// true, NP = 1 only), inside its k loop so that it overlaps the FMAs: pf + k * pf_stride
// (elements of the weight type, for k < kc) goes into L1, i.e. the weight block that
// comes next, so that its first tile does not wait on L2/L3.  pf_stride is kPanel when
// that block has >= kc k rows, else 0 (it then touches only its first row; rare).  No
// comparison on k in the loop: one makes GCC split the loop and keep the accumulators in
// memory (measured 2.6x slower tile).
struct Side {
    const void* pf;
    int64_t pf_stride;
};

// Register micro-kernel: acc[MR][2NP] = a[MR, kc] * b[kc, 16NP]; panel j of b at
// b + j * bstride.  The k block is summed in registers from zero; add_c then adds the sums
// of earlier k blocks already in c (two-level summation: the rounding error grows with
// sqrt(kKc) + sqrt(k / kKc) instead of sqrt(k)).  With kSide, also does `side` (above).
// fp16 weights are converted in registers (F16C): the loop is bound by its 2 FMAs per
// broadcast, so the 2 conversions per k cost almost nothing.
template <int MR, int NP, bool kSide, typename BT>
void micro(const float* a, int64_t lda, const BT* b, int64_t bstride, int64_t kc, float* c,
           int64_t ldc, bool add_c, Side side) {
    static_assert(!kSide || NP == 1, "side work is for single-panel tiles");
    const BT* pf = static_cast<const BT*>(side.pf);
    __m256 acc[MR][2 * NP];
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < 2 * NP; ++q) acc[r][q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
        if constexpr (std::is_same<BT, uint16_t>::value && MR > 1 && NP > 1 && !kSide) {
            // fp16, several rows and panels: the converted weights must sit in registers
            // (no memory operand), and MR x 2NP accumulators + 2NP weight vectors + a
            // broadcast exceed 16 ymm (spills: 3x1024x5120 ran at half the fp32 speed).
            // So hold the MR broadcasts and convert one weight vector at a time: the same
            // FMAs into the same accumulators in the same k order (bit-identical).
            __m256 av[MR];
            for (int r = 0; r < MR; ++r) av[r] = _mm256_broadcast_ss(a + r * lda + k);
            for (int q = 0; q < 2 * NP; ++q) {
                const __m256 bq = load_b(b + (q / 2) * bstride + k * kPanel + (q % 2) * 8);
                for (int r = 0; r < MR; ++r) acc[r][q] = _mm256_fmadd_ps(av[r], bq, acc[r][q]);
            }
            continue;
        }
        __m256 bv[2 * NP];
        for (int j = 0; j < NP; ++j) {
            bv[2 * j] = load_b(b + j * bstride + k * kPanel);
            bv[2 * j + 1] = load_b(b + j * bstride + k * kPanel + 8);
        }
        if (kSide) {
            // One prefetch per k: a 64-byte line per k for fp32, per 2 k for fp16 (the
            // repeated line costs one load slot; the loop is bound by its FMAs).
            _mm_prefetch(reinterpret_cast<const char*>(pf + k * side.pf_stride), _MM_HINT_T0);
        }
        for (int r = 0; r < MR; ++r) {
            __m256 av = _mm256_broadcast_ss(a + r * lda + k);
            for (int q = 0; q < 2 * NP; ++q) acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int q = 0; q < 2 * NP; ++q) {
            float* p = c + r * ldc + q * 8;
            _mm256_storeu_ps(p, add_c ? _mm256_add_ps(_mm256_loadu_ps(p), acc[r][q]) : acc[r][q]);
        }
}

template <int NP, bool kSide, typename BT>
void micro_rows(int mr, const float* a, int64_t lda, const BT* b, int64_t bstride, int64_t kc,
                float* c, int64_t ldc, bool add_c, Side side) {
    // Multi-panel tiles only serve the few-rows path (mr <= kFewRows = 3).
    constexpr int kMaxMr = NP > 1 ? 3 : kMr;
    if (mr > kMaxMr) mr = kMaxMr;
    switch (mr) {
        case 1: micro<1, NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
        case 2: micro<2, NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
        case 3: micro<3, NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
        case 4: micro<(NP > 1 ? 3 : 4), NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
        case 5: micro<(NP > 1 ? 3 : 5), NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
        default: micro<(NP > 1 ? 3 : 6), NP, kSide>(a, lda, b, bstride, kc, c, ldc, add_c, side); break;
    }
}

// One tile: rows [r, r+mr) x panels [p, p+NP), k block [kb, kb+kc).  A tile that runs past
// n_valid works in a small buffer so only valid output columns are ever touched.
template <int NP, bool kSide = false, typename BT>
void run_tile(const GemmJob& j, const BT* b, int64_t bstride, int64_t r, int mr, int64_t p,
              int64_t kb, int64_t kc, bool first, bool last, Side side = Side{nullptr, 0}) {
    const float* a = j.a + r * j.lda + kb;
    const int64_t col0 = p * kPanel;
    const float* bias = j.bias ? j.bias + col0 : nullptr;
    int64_t ncols = j.n_valid - col0;
    if (ncols >= NP * kPanel) {
        float* c = j.c + r * j.ldc + col0;
        micro_rows<NP, kSide>(mr, a, j.lda, b, bstride, kc, c, j.ldc, !first, side);
        if (last && (bias || j.gelu)) apply_epilogue(c, j.ldc, mr, NP, bias, j.gelu);
        return;
    }
    alignas(32) float tmp[kMr * NP * kPanel];
    const int64_t ldt = NP * kPanel;
    for (int i = 0; i < mr; ++i) {
        if (!first) std::memcpy(tmp + i * ldt, j.c + (r + i) * j.ldc + col0, ncols * sizeof(float));
    }
    micro_rows<NP, kSide>(mr, a, j.lda, b, bstride, kc, tmp, ldt, !first, side);
    if (last && (bias || j.gelu)) apply_epilogue(tmp, ldt, mr, NP, bias, j.gelu);
    for (int i = 0; i < mr; ++i) std::memcpy(j.c + (r + i) * j.ldc + col0, tmp + i * ldt, ncols * sizeof(float));
}

// Few rows (<= kFewRows): weights read straight from the packed panels (fp16 converted in
// registers), NP panels at a time for independent FMA chains.  Same k blocks, hence the
// same summation order per element, as gemm_many_rows.
template <typename BT>
void gemm_few_rows(const GemmJob& j, const BT* b, int64_t p0, int64_t p1) {
    const int mr = int(j.rows);
    const int64_t pstride = j.k * kPanel;
    // NP panels per tile so that mr * 2NP accumulators stay <= 12 registers.
    const int np = mr == 1 ? 4 : (mr == 2 ? 3 : 2);
    for (int64_t p = p0; p < p1;) {
        const int take = p + np <= p1 ? np : 1;
        for (int64_t kb = 0; kb < j.k; kb += kKc) {
            const int64_t kc = j.k - kb < kKc ? j.k - kb : kKc;
            const bool first = kb == 0, last = kb + kc == j.k;
            const BT* bp = b + p * pstride + kb * kPanel;
            if (take == 4) run_tile<4>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
            else if (take == 3) run_tile<3>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
            else if (take == 2) run_tile<2>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
            else run_tile<1>(j, bp, pstride, 0, mr, p, kb, kc, first, last);
        }
        p += take;
    }
}

// Rows of the next register tile when `left` rows remain: 6, except that 8 -> 4 + 4 and
// 7 -> 4 + 3, because a 1- or 2-row tile has too few FMA chains to hide the FMA latency
// (4 cycles x 2 pipes needs >= 8 independent accumulators).
inline int tile_rows(int64_t left) {
    if (left == 7 || left == 8) return 4;
    return left < kMr ? int(left) : kMr;
}

// Many rows: blocked over k (kKc) and rows (kMc).  Every row tile reads the packed weights
// directly (fp16 converted in registers).  Converting each fp16 block once into a per-thread
// fp32 scratch for the later row tiles was measured slower: with 2 threads, 1.05-1.3 ms
// instead of ~0.95 ms for 32x768->4096, and 126 instead of 118 ms for 576x1024x4096x4096.
// The first row tile of each (panel, k block, row block) prefetches the weight block this
// thread needs next (the packed weights stream from L3; measured 1-4% faster with it).
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
                // The block after this one in loop order: next panel, else first panel of
                // the next row block, else first panel of the next k block, else none
                // (this block again, already in cache).
                Side side{src, kPanel};
                if (p + 1 < p1 || re < j.rows) {
                    side.pf = p + 1 < p1 ? src + pstride : b + p0 * pstride + kb * kPanel;
                } else if (!last) {
                    side.pf = b + p0 * pstride + (kb + kc) * kPanel;
                    if (j.k - kb - kc < kc) side.pf_stride = 0;  // shorter last k block
                }
                const int mr0 = tile_rows(re - rb);
                run_tile<1, true>(j, src, pstride, rb, mr0, p, kb, kc, first, last, side);
                for (int64_t r = rb + mr0; r < re;) {
                    const int mr = tile_rows(re - r);
                    run_tile<1>(j, src, pstride, r, mr, p, kb, kc, first, last);
                    r += mr;
                }
            }
        }
    }
}

}  // namespace

void gemm_panels_avx2(const GemmJob& job, int64_t p0, int64_t p1) {
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
