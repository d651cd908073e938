// projector_cpu.cpp -- CPU backend of the fused projector:
//   y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )
// Weights are packed at create into 16-column panels (fp32, or fp16 kept as fp16 to halve
// the bytes streamed); each forward runs up to four phases on a persistent thread pool
// (work_pool.h): LayerNorm (chunks of rows), Linear1 and Linear2 (chunks of weight panels),
// L2 (chunks of rows).  Partitioning never changes the order of any reduction, so results
// are bit-identical for every thread count.  The linear layer has one SIMD path per
// architecture, compiled only there (kernels/CMakeLists.txt): AVX2/FMA/F16C on x86-64
// (projector_cpu_avx2.cpp, chosen at run time with __builtin_cpu_supports) and NEON on
// aarch64 (projector_cpu_neon.cpp; part of the base ISA, confirmed with HWCAP_ASIMD).
// The scalar one below is the floor everywhere and the plain reference of both.
// Allocation happens at create; forward allocates only when rows exceeds every earlier
// call and the create-time max_rows (the scratch then grows and stays).
// Build: part of libscops_kernels.so (`pip install --no-build-isolation --no-deps -e .`).
// Twins: kernels/reference.py (numpy), projector_cuda.cu (CUDA).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(SCOPS_HAVE_NEON) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "projector_cpu_kernels.h"
#include "projector_internal.h"
#include "work_pool.h"

namespace scops {

CpuPath best_cpu_path() {
#if defined(SCOPS_HAVE_AVX2)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return CpuPath::kAvx2;
#elif defined(SCOPS_HAVE_NEON)
#if defined(__linux__) && defined(HWCAP_ASIMD)
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMD)) return CpuPath::kScalar;
#endif
    return CpuPath::kNeon;
#endif
    return CpuPath::kScalar;
}

const char* cpu_path_features(CpuPath p) {
    return p == CpuPath::kAvx2 ? "avx2+fma+f16c" : p == CpuPath::kNeon ? "neon" : "scalar";
}

const char* cpu_path_backend(CpuPath p) {
    return p == CpuPath::kAvx2 ? "cpu-avx2" : p == CpuPath::kNeon ? "cpu-neon" : "cpu-scalar";
}

namespace cpu {
namespace {

// Work (multiply-adds) below which one more thread costs more in wake-up than it saves:
// ~1M MACs is ~50 us of one core, a few times a condition-variable wake-up.
constexpr int64_t kMacsPerThread = int64_t(1) << 20;
float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);  // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);  // 112 = 127 - 15
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal half: renormalise
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400u));
        bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

float gelu_scalar(float x, int kind) {
    if (kind == SCOPS_GELU_ERF) return 0.5f * x * (1.0f + std::erf(x * 0.70710678f));
    if (kind == SCOPS_GELU_TANH)
        return 0.5f * x * (1.0f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x)));
    return x;
}

// w [n, k] (elem bytes each) -> panels [ceil(n/16)][k][16], zero-padded.
std::vector<uint8_t> pack_panels(const void* w, int64_t n, int64_t k, size_t elem) {
    const int64_t panels = (n + kPanel - 1) / kPanel;
    std::vector<uint8_t> out(size_t(panels * k * kPanel) * elem, 0);
    const uint8_t* src = static_cast<const uint8_t*>(w);
    for (int64_t col = 0; col < n; ++col) {
        const int64_t p = col / kPanel, j = col % kPanel;
        for (int64_t kk = 0; kk < k; ++kk)
            std::memcpy(&out[size_t((p * k + kk) * kPanel + j) * elem], src + size_t(col * k + kk) * elem, elem);
    }
    return out;
}

std::vector<float> pad_bias(const float* b, int64_t n) {
    if (!b) return {};
    std::vector<float> out(size_t((n + kPanel - 1) / kPanel * kPanel), 0.0f);
    std::copy(b, b + n, out.begin());
    return out;
}

}  // namespace

void gemm_panels_scalar(const GemmJob& j, int64_t p0, int64_t p1) {
    const int64_t pstride = j.k * kPanel;
    for (int64_t p = p0; p < p1; ++p) {
        const int64_t col0 = p * kPanel, ncols = std::min<int64_t>(kPanel, j.n_valid - col0);
        for (int64_t r = 0; r < j.rows; ++r) {
            const float* a = j.a + r * j.lda;
            float acc[kPanel] = {0};
            for (int64_t kb = 0; kb < j.k; kb += kKc) {  // two-level sum, as the AVX2 path
                float blk[kPanel] = {0};
                for (int64_t kk = kb; kk < std::min(j.k, kb + kKc); ++kk) {
                    const int64_t off = p * pstride + kk * kPanel;
                    for (int c = 0; c < kPanel; ++c) {
                        float w = j.b_f16 ? half_to_float(static_cast<const uint16_t*>(j.b)[off + c])
                                          : static_cast<const float*>(j.b)[off + c];
                        blk[c] += a[kk] * w;
                    }
                }
                for (int c = 0; c < kPanel; ++c) acc[c] += blk[c];
            }
            for (int64_t c = 0; c < ncols; ++c) {
                float v = acc[c] + (j.bias ? j.bias[col0 + c] : 0.0f);
                j.c[r * j.ldc + col0 + c] = gelu_scalar(v, j.gelu);
            }
        }
    }
}

}  // namespace cpu

namespace {

using cpu::GemmJob;
using cpu::kPanel;

class CpuProjector final : public scops_projector {
   public:
    CpuProjector(const Spec& s, CpuPath path)
        : s_(s), path_(path), pool_(s.threads) {  // pool_ is declared last: it stops first
        out_dim = s.out;
        const size_t elem = s.dtype == SCOPS_DTYPE_F16 ? 2 : 4;
        n1_ = s.fc1_out();
        w1_ = cpu::pack_panels(s.w1, n1_, s.in, elem);
        b1_ = cpu::pad_bias(s.b1, n1_);
        if (s.hidden > 0) {
            w2_ = cpu::pack_panels(s.w2, s.out, s.hidden, elem);
            b2_ = cpu::pad_bias(s.b2, s.out);
        }
        if (s.layernorm) {
            lnw_.assign(s.ln_w, s.ln_w + s.in);
            lnb_.assign(s.ln_b, s.ln_b + s.in);
        }
        reserve_rows(s.max_rows);
        // Spec keeps no caller pointers past create.
        s_.ln_w = s_.ln_b = s_.b1 = s_.b2 = nullptr;
        s_.w1 = s_.w2 = nullptr;
    }
    const char* name() const override { return cpu_path_backend(path_); }

    scops_status forward(const float* x, int64_t rows, float* y) override {
        if (rows > cap_rows_) reserve_rows(rows);
        x_ = x;
        y_ = y;
        const float* a = x;
        if (s_.layernorm) {
            pool_.parallel_for(rows, row_chunk(rows), rows * s_.in * 4 >= cpu::kMacsPerThread,
                               &CpuProjector::layernorm_phase, this);
            a = ln_.data();
        }
        const bool f16 = s_.dtype == SCOPS_DTYPE_F16;
        if (s_.hidden > 0) {
            const int64_t ldh = (s_.hidden + kPanel - 1) / kPanel * kPanel;
            job_ = GemmJob{a, s_.in, rows, s_.in, w1_.data(), f16, bias(b1_), s_.gelu, h_.data(), ldh, s_.hidden};
            run_gemm();
            job_ = GemmJob{h_.data(), ldh, rows, s_.hidden, w2_.data(), f16, bias(b2_), SCOPS_GELU_NONE, y, s_.out, s_.out};
            run_gemm();
        } else {
            job_ = GemmJob{a, s_.in, rows, s_.in, w1_.data(), f16, bias(b1_), SCOPS_GELU_NONE, y, s_.out, s_.out};
            run_gemm();
        }
        if (s_.l2norm)
            pool_.parallel_for(rows, row_chunk(rows), rows * s_.out * 4 >= cpu::kMacsPerThread,
                               &CpuProjector::l2norm_phase, this);
        return SCOPS_OK;
    }

   private:
    static const float* bias(const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); }
    // ~4 chunks of rows per thread for the row-wise phases.
    int64_t row_chunk(int64_t rows) const { return std::max<int64_t>(1, rows / (4 * pool_.size())); }
    void reserve_rows(int64_t rows) {
        if (s_.layernorm) ln_.resize(size_t(rows * s_.in));
        if (s_.hidden > 0) h_.resize(size_t(rows * ((s_.hidden + kPanel - 1) / kPanel * kPanel)));
        cap_rows_ = rows;
    }
    // Panels are handed out in chunks from the pool's counter, so a thread that lost its
    // core to another process does not hold up the others.  Which thread computes a panel
    // never changes how it is computed, so results stay bit-identical.
    void run_gemm() {
        const int64_t panels = (job_.n_valid + kPanel - 1) / kPanel;
        const int nt = pool_.size();
        // ~4 chunks per thread, a multiple of 4 panels (the few-rows path takes 4 at a time).
        const int64_t chunk = std::max<int64_t>(4, (panels + 4 * nt - 1) / (4 * nt) + 3) / 4 * 4;
        const bool parallel = job_.rows * job_.k * job_.n_valid >= 2 * cpu::kMacsPerThread && panels > chunk;
        pool_.parallel_for(panels, chunk, parallel, &CpuProjector::gemm_phase, this);
    }
    static void gemm_phase(void* ctx, int /*tid*/, int64_t p0, int64_t p1) {
        auto* self = static_cast<CpuProjector*>(ctx);
        switch (self->path_) {
#if defined(SCOPS_HAVE_AVX2)
            case CpuPath::kAvx2: cpu::gemm_panels_avx2(self->job_, p0, p1); return;
#endif
#if defined(SCOPS_HAVE_NEON)
            case CpuPath::kNeon: cpu::gemm_panels_neon(self->job_, p0, p1); return;
#endif
            default: cpu::gemm_panels_scalar(self->job_, p0, p1); return;
        }
    }
    // LayerNorm over in_dim per row: two passes in double (mean, then variance).
    static void layernorm_phase(void* ctx, int /*tid*/, int64_t r0, int64_t r1) {
        auto* self = static_cast<CpuProjector*>(ctx);
        const int64_t n = self->s_.in;
        for (int64_t r = r0; r < r1; ++r) {
            const float* x = self->x_ + r * n;
            float* o = self->ln_.data() + r * n;
            double mean = 0, var = 0;
            for (int64_t i = 0; i < n; ++i) mean += x[i];
            mean /= double(n);
            for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
            const double inv = 1.0 / std::sqrt(var / double(n) + double(self->s_.ln_eps));
            for (int64_t i = 0; i < n; ++i)
                o[i] = float((x[i] - mean) * inv) * self->lnw_[i] + self->lnb_[i];
        }
    }
    // y_row <- y_row * scale / max(||y_row||_2, 1e-12)  (torch F.normalize's eps).
    static void l2norm_phase(void* ctx, int /*tid*/, int64_t r0, int64_t r1) {
        auto* self = static_cast<CpuProjector*>(ctx);
        const int64_t n = self->s_.out;
        for (int64_t r = r0; r < r1; ++r) {
            float* y = self->y_ + r * n;
            double ss = 0;
            for (int64_t i = 0; i < n; ++i) ss += double(y[i]) * y[i];
            const float f = float(double(self->s_.scale) / std::max(std::sqrt(ss), 1e-12));
            for (int64_t i = 0; i < n; ++i) y[i] *= f;
        }
    }

    Spec s_;
    CpuPath path_;
    int64_t n1_ = 0, cap_rows_ = 0;
    std::vector<uint8_t> w1_, w2_;  // packed panels
    std::vector<float> b1_, b2_, lnw_, lnb_;
    std::vector<float> ln_, h_;  // scratch: [rows, in], [rows, hidden padded]
    const float* x_ = nullptr;
    float* y_ = nullptr;
    GemmJob job_{};
    cpu::WorkPool pool_;
};

}  // namespace

scops_status create_cpu_projector(const Spec& s, bool force_scalar, scops_projector** out) {
    *out = new CpuProjector(s, force_scalar ? CpuPath::kScalar : best_cpu_path());
    return SCOPS_OK;
}

}  // namespace scops
