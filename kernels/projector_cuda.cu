// projector_cuda.cu -- CUDA backend of the fused projector:
//   y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )
// Weights (fp32 or fp16, kept as uploaded) live on the device from create on, each row
// padded to a multiple of 8 elements so every row starts 16-byte aligned.
//   rows <= kSmallRows: bandwidth-bound on weights -- each warp owns output columns,
//     streams its weight rows once with 16-byte loads and multiplies every x row held
//     in shared memory (linear_small_rows).
//   more rows: a shared-memory tiled GEMM (64x64 tile, 4x4 per thread) with the bias /
//     GELU epilogue fused (linear_tiled).  cuBLAS(Lt) is not in this toolchain; a
//     cuBLASLt path would be the next step for large batches.
// LayerNorm and L2-normalise are one block per row.  forward() takes host pointers and
// copies in/out on the projector's stream (into pinned memory from scops_host_alloc -- the
// runtime's llama_batch.embd on CUDA -- the copy out is one DMA); forward_device() takes
// device pointers.
// Build: libscops_kernels_cuda.so (kernels/CMakeLists.txt; SASS 80/86/89/90 + PTX 90).
// Twins: kernels/reference.py (numpy), projector_cpu.cpp (CPU).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "projector_internal.h"

#define SCOPS_CK(call)                                 \
    do {                                               \
        if ((call) != cudaSuccess) return SCOPS_E_CUDA; \
    } while (0)

namespace scops {
namespace {

// At most this many rows take the weight-streaming kernel: beyond ~64 rows the weight
// bytes per row are small enough that a tiled GEMM wins.
constexpr int64_t kSmallRows = 64;
// Rows a warp accumulates at once in linear_small_rows (8 registers per lane).
constexpr int kRowGroup = 8;
// Shared memory for x in linear_small_rows: 96 KiB fits every target arch (sm_86/89
// allow 99 KiB per block); 96 KiB / (768 * 4 B) = 32 rows of a 768-wide input.
constexpr int kSmemBytes = 96 * 1024;
constexpr int kThreads = 256;
// Output columns per block in linear_small_rows: 8 warps x 4 columns.  Each block fills
// shared memory with x once, so wider slices amortise that; 32 still gives 128 blocks
// for 4096 outputs (about one wave on 108-132 SMs).
constexpr int kColsPerBlock = 32;
// Tiled GEMM: 64x64 output tile, k step 16, 256 threads each computing 4x4.
constexpr int kTile = 64, kTileK = 16;
// Partial sums are folded into the total every 16 k steps (256 k), as the CPU path does, so
// rounding error grows with sqrt(256) + sqrt(k / 256) rather than sqrt(k).
constexpr int kFlushTiles = 16;
// Grid y limit of a CUDA launch.
constexpr int64_t kMaxGridY = 65535;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

__device__ __forceinline__ float apply_gelu(float v, int gelu) {
    if (gelu == SCOPS_GELU_ERF) return 0.5f * v * (1.0f + erff(v * 0.70710678f));
    if (gelu == SCOPS_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
    return v;
}

// 8 weights from a 16-byte load: fp16 x8 or (two loads of) fp32 x4.
__device__ __forceinline__ void load8(const __half* w, float* o) {
    uint4 u = *reinterpret_cast<const uint4*>(w);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
    for (int i = 0; i < 4; ++i) {
        float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const float* w, float* o) {
    float4 a = *reinterpret_cast<const float4*>(w), b = *reinterpret_cast<const float4*>(w + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

// y[r, n] = gelu(sum_k x[r, k] w[n, k] + bias[n]) for rows [row0, row0 + nrows).
// x [rows, ldx] (ldx = kp), w [n_out, kp] zero-padded, y [rows, ldy].
// grid: (ceil(n_out / kColsPerBlock), row chunks); dynamic smem: chunk rows * kp floats.
template <typename WT>
__global__ void linear_small_rows(const float* __restrict__ x, int64_t rows, int64_t kp,
                                  const WT* __restrict__ w, const float* __restrict__ bias,
                                  int64_t n_out, int gelu, float* __restrict__ y, int64_t ldy,
                                  int64_t rows_per_chunk) {
    extern __shared__ float4 xs_vec[];  // 16-byte aligned dynamic shared memory
    float* xs = reinterpret_cast<float*>(xs_vec);  // [chunk rows][kp]
    const int64_t row0 = int64_t(blockIdx.y) * rows_per_chunk;
    const int64_t nrows = min(rows_per_chunk, rows - row0);
    for (int64_t i = threadIdx.x; i < nrows * kp; i += blockDim.x) xs[i] = x[row0 * kp + i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x / 32;
    const int64_t n_end = min(n_out, int64_t(blockIdx.x + 1) * kColsPerBlock);
    for (int64_t n = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x / 32; n < n_end; n += warps) {
    const WT* wr = w + n * kp;
    for (int64_t g = 0; g < nrows; g += kRowGroup) {
        float acc[kRowGroup] = {0};
        for (int64_t k = int64_t(lane) * 8; k < kp; k += 32 * 8) {
            float wv[8];
            load8(wr + k, wv);
            for (int r = 0; r < kRowGroup; ++r) {
                if (g + r >= nrows) break;
                // 32-byte aligned: kp and k are multiples of 8.
                const float4* xr = reinterpret_cast<const float4*>(xs + (g + r) * kp + k);
                const float4 x0 = xr[0], x1 = xr[1];
                acc[r] = fmaf(wv[0], x0.x, acc[r]);
                acc[r] = fmaf(wv[1], x0.y, acc[r]);
                acc[r] = fmaf(wv[2], x0.z, acc[r]);
                acc[r] = fmaf(wv[3], x0.w, acc[r]);
                acc[r] = fmaf(wv[4], x1.x, acc[r]);
                acc[r] = fmaf(wv[5], x1.y, acc[r]);
                acc[r] = fmaf(wv[6], x1.z, acc[r]);
                acc[r] = fmaf(wv[7], x1.w, acc[r]);
            }
        }
        for (int r = 0; r < kRowGroup; ++r) {
            float v = acc[r];
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == 0 && g + r < nrows) {
                if (bias) v += bias[n];
                y[(row0 + g + r) * ldy + n] = apply_gelu(v, gelu);
            }
        }
    }
    }
}

// Tiled GEMM: y[m, n] = gelu(sum_k x[m, k] w[n, k] + bias[n]); x [rows, kp], w [n_out, kp].
template <typename WT>
__global__ void linear_tiled(const float* __restrict__ x, int64_t rows, int64_t kp,
                             const WT* __restrict__ w, const float* __restrict__ bias,
                             int64_t n_out, int gelu, float* __restrict__ y, int64_t ldy) {
    __shared__ float xs[kTileK][kTile + 4], ws[kTileK][kTile + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4x4 each
    const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
    float acc[4][4] = {{0}}, part[4][4] = {{0}};  // two-level sum: part over 256 k, then acc
    for (int64_t k0 = 0; k0 < kp; k0 += kTileK) {
        // 64 x 16 elements per operand, 4 per thread: row = t / 4, k = (t % 4) * 4.
        const int lr = threadIdx.x / 4, lk = (threadIdx.x % 4) * 4;
        for (int i = 0; i < 4; ++i) {
            const int64_t k = k0 + lk + i;
            const int64_t m = m0 + lr, n = n0 + lr;
            xs[lk + i][lr] = (m < rows && k < kp) ? x[m * kp + k] : 0.0f;
            ws[lk + i][lr] = (n < n_out && k < kp) ? float(w[n * kp + k]) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < kTileK; ++kk) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty * 4 + i];
            for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) part[i][j] = fmaf(a[i], b[j], part[i][j]);
        }
        __syncthreads();
        if ((k0 / kTileK) % kFlushTiles == kFlushTiles - 1 || k0 + kTileK >= kp) {
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] += part[i][j];
                    part[i][j] = 0.0f;
                }
        }
    }
    for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty * 4 + i;
        if (m >= rows) continue;
        for (int j = 0; j < 4; ++j) {
            const int64_t n = n0 + tx * 4 + j;
            if (n >= n_out) continue;
            float v = acc[i][j] + (bias ? bias[n] : 0.0f);
            y[m * ldy + n] = apply_gelu(v, gelu);
        }
    }
}

// Block-wide sum of one value per thread (blockDim.x == kThreads).
__device__ float block_sum(float v, float* red) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float s = 0;
    for (int i = 0; i < kThreads / 32; ++i) s += red[i];
    __syncthreads();
    return s;
}

// One block per row: o[r, :n] = (x - mean) / sqrt(var + eps) * g + b; o has pitch ldo (pad zero).
__global__ void layernorm_rows(const float* x, int64_t n, const float* g, const float* b, float eps,
                               float* o, int64_t ldo) {
    __shared__ float red[kThreads / 32];
    const float* xr = x + int64_t(blockIdx.x) * n;
    float s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, red) / float(n);
    float v = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    const float inv = rsqrtf(block_sum(v, red) / float(n) + eps);
    float* orow = o + int64_t(blockIdx.x) * ldo;
    for (int64_t i = threadIdx.x; i < ldo; i += blockDim.x)
        orow[i] = i < n ? (xr[i] - mean) * inv * g[i] + b[i] : 0.0f;
}

// Copy x [rows, n] into pitch ldo with zero padding (so vector loads see zeros past n).
__global__ void pad_rows(const float* x, int64_t n, float* o, int64_t ldo) {
    const float* xr = x + int64_t(blockIdx.x) * n;
    float* orow = o + int64_t(blockIdx.x) * ldo;
    for (int64_t i = threadIdx.x; i < ldo; i += blockDim.x) orow[i] = i < n ? xr[i] : 0.0f;
}

// One block per row: y <- y * scale / max(||y||, 1e-12).
__global__ void l2norm_rows(float* y, int64_t n, float scale) {
    __shared__ float red[kThreads / 32];
    float* yr = y + int64_t(blockIdx.x) * n;
    float s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += yr[i] * yr[i];
    const float f = scale / fmaxf(sqrtf(block_sum(s, red)), 1e-12f);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] *= f;
}

template <typename T>
struct DevBuf {
    T* p = nullptr;
    size_t n = 0;
    ~DevBuf() { if (p) cudaFree(p); }
    cudaError_t reserve(size_t count) {
        if (count <= n) return cudaSuccess;
        if (p) cudaFree(p);
        p = nullptr;
        n = 0;
        cudaError_t e = cudaMalloc(&p, count * sizeof(T));
        if (e == cudaSuccess) n = count;
        return e;
    }
};

class CudaProjector final : public scops_projector {
   public:
    explicit CudaProjector(const Spec& s) : s_(s) { out_dim = s.out; }
    ~CudaProjector() override { if (stream_) cudaStreamDestroy(stream_); }
    const char* name() const override { return "cuda"; }

    scops_status init() {
        int dev = 0, major = 0;
        SCOPS_CK(cudaGetDevice(&dev));
        SCOPS_CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        if (major < 8) return SCOPS_E_UNSUPPORTED;  // built for sm_80 and newer only
        SCOPS_CK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        const size_t elem = s_.dtype == SCOPS_DTYPE_F16 ? 2 : 4;
        kp1_ = round_up(s_.in, 8);
        scops_status st = upload_weight(w1_, s_.w1, s_.fc1_out(), s_.in, kp1_, elem);
        if (st != SCOPS_OK) return st;
        if (s_.hidden > 0) {
            kp2_ = round_up(s_.hidden, 8);
            if ((st = upload_weight(w2_, s_.w2, s_.out, s_.hidden, kp2_, elem)) != SCOPS_OK) return st;
        }
        if ((st = upload(b1_, s_.b1, s_.fc1_out())) != SCOPS_OK) return st;
        if ((st = upload(b2_, s_.b2, s_.out)) != SCOPS_OK) return st;
        if ((st = upload(lnw_, s_.ln_w, s_.in)) != SCOPS_OK) return st;
        if ((st = upload(lnb_, s_.ln_b, s_.in)) != SCOPS_OK) return st;
        SCOPS_CK(cudaFuncSetAttribute(linear_small_rows<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
        SCOPS_CK(cudaFuncSetAttribute(linear_small_rows<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
        SCOPS_CK(cudaStreamSynchronize(stream_));
        s_.ln_w = s_.ln_b = s_.b1 = s_.b2 = nullptr;
        s_.w1 = s_.w2 = nullptr;
        return SCOPS_OK;
    }

    scops_status forward(const float* x, int64_t rows, float* y) override {
        SCOPS_CK(x_.reserve(size_t(rows * s_.in)));
        SCOPS_CK(y_.reserve(size_t(rows * s_.out)));
        SCOPS_CK(cudaMemcpyAsync(x_.p, x, size_t(rows * s_.in) * 4, cudaMemcpyHostToDevice, stream_));
        scops_status st = run(x_.p, rows, y_.p);
        if (st != SCOPS_OK) return st;
        SCOPS_CK(cudaMemcpyAsync(y, y_.p, size_t(rows * s_.out) * 4, cudaMemcpyDeviceToHost, stream_));
        SCOPS_CK(cudaStreamSynchronize(stream_));
        return SCOPS_OK;
    }
    scops_status forward_device(const float* x, int64_t rows, float* y) override {
        scops_status st = run(x, rows, y);
        if (st != SCOPS_OK) return st;
        SCOPS_CK(cudaStreamSynchronize(stream_));
        return SCOPS_OK;
    }

   private:
    scops_status upload_weight(DevBuf<uint8_t>& d, const void* w, int64_t n, int64_t k, int64_t kp, size_t elem) {
        SCOPS_CK(d.reserve(size_t(n * kp) * elem));
        SCOPS_CK(cudaMemsetAsync(d.p, 0, size_t(n * kp) * elem, stream_));
        SCOPS_CK(cudaMemcpy2DAsync(d.p, kp * elem, w, k * elem, k * elem, size_t(n), cudaMemcpyHostToDevice, stream_));
        return SCOPS_OK;
    }
    scops_status upload(DevBuf<float>& d, const float* h, int64_t n) {
        if (!h) return SCOPS_OK;
        SCOPS_CK(d.reserve(size_t(n)));
        SCOPS_CK(cudaMemcpyAsync(d.p, h, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
        return SCOPS_OK;
    }
    template <typename WT>
    scops_status linear(const float* a, int64_t rows, int64_t kp, const WT* w, const float* bias,
                        int64_t n_out, int gelu, float* y, int64_t ldy) {
        if ((rows + kTile - 1) / kTile > kMaxGridY) return SCOPS_E_UNSUPPORTED;
        // Weight streaming needs at least one x row in shared memory (kp <= 24576).
        if (rows <= kSmallRows && kp * 4 <= kSmemBytes) {
            const int64_t chunk = std::min<int64_t>(rows, kSmemBytes / (kp * 4));
            dim3 grid(unsigned((n_out + kColsPerBlock - 1) / kColsPerBlock), unsigned((rows + chunk - 1) / chunk));
            linear_small_rows<WT><<<grid, kThreads, size_t(chunk * kp) * 4, stream_>>>(
                a, rows, kp, w, bias, n_out, gelu, y, ldy, chunk);
        } else {
            dim3 grid(unsigned((n_out + kTile - 1) / kTile), unsigned((rows + kTile - 1) / kTile));
            linear_tiled<WT><<<grid, kThreads, 0, stream_>>>(a, rows, kp, w, bias, n_out, gelu, y, ldy);
        }
        SCOPS_CK(cudaGetLastError());
        return SCOPS_OK;
    }
    template <typename WT>
    scops_status run_typed(const float* a, int64_t rows, float* y) {
        const WT* w1 = reinterpret_cast<const WT*>(w1_.p);
        const WT* w2 = reinterpret_cast<const WT*>(w2_.p);
        if (s_.hidden > 0) {
            SCOPS_CK(h_.reserve(size_t(rows * kp2_)));
            SCOPS_CK(cudaMemsetAsync(h_.p, 0, size_t(rows * kp2_) * 4, stream_));  // zero pad columns
            scops_status st = linear(a, rows, kp1_, w1, b1_.p, s_.hidden, s_.gelu, h_.p, kp2_);
            if (st != SCOPS_OK) return st;
            return linear(h_.p, rows, kp2_, w2, b2_.p, s_.out, SCOPS_GELU_NONE, y, s_.out);
        }
        return linear(a, rows, kp1_, w1, b1_.p, s_.out, SCOPS_GELU_NONE, y, s_.out);
    }
    scops_status run(const float* x, int64_t rows, float* y) {
        SCOPS_CK(xp_.reserve(size_t(rows * kp1_)));
        if (rows > INT32_MAX) return SCOPS_E_UNSUPPORTED;
        if (s_.layernorm)
            layernorm_rows<<<unsigned(rows), kThreads, 0, stream_>>>(x, s_.in, lnw_.p, lnb_.p, s_.ln_eps, xp_.p, kp1_);
        else
            pad_rows<<<unsigned(rows), kThreads, 0, stream_>>>(x, s_.in, xp_.p, kp1_);
        SCOPS_CK(cudaGetLastError());
        scops_status st = s_.dtype == SCOPS_DTYPE_F16 ? run_typed<__half>(xp_.p, rows, y)
                                                      : run_typed<float>(xp_.p, rows, y);
        if (st != SCOPS_OK) return st;
        if (s_.l2norm) {
            l2norm_rows<<<unsigned(rows), kThreads, 0, stream_>>>(y, s_.out, s_.scale);
            SCOPS_CK(cudaGetLastError());
        }
        return SCOPS_OK;
    }

    Spec s_;
    cudaStream_t stream_ = nullptr;
    int64_t kp1_ = 0, kp2_ = 0;
    DevBuf<uint8_t> w1_, w2_;
    DevBuf<float> b1_, b2_, lnw_, lnb_, x_, xp_, h_, y_;
};

}  // namespace

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device" error
        return 0;
    }
    return n;
}

// Pinned host memory: cudaMemcpyAsync into it is a direct DMA (pageable memory goes through
// the driver's staging buffer). Portable: pinned for every device and context.
scops_status cuda_host_alloc(size_t bytes, void** out) {
    *out = nullptr;
    if (cudaHostAlloc(out, bytes, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        *out = nullptr;
        return SCOPS_E_NO_MEMORY;
    }
    return SCOPS_OK;
}

void cuda_host_free(void* p) { cudaFreeHost(p); }

scops_status create_cuda_projector(const Spec& s, scops_projector** out) {
    *out = nullptr;
    if (cuda_device_count() <= 0) return SCOPS_E_UNSUPPORTED;
    auto* p = new CudaProjector(s);
    scops_status st = p->init();
    if (st != SCOPS_OK) {
        delete p;
        return st;
    }
    *out = p;
    return SCOPS_OK;
}

}  // namespace scops
