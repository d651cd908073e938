// projector_api.cpp -- the C API boundary of the fused projector (see projector.h).
// Every argument check lives here; the backends (projector_cpu.cpp, projector_cuda.cu)
// trust what they receive.  Compiled into both libscops_kernels.so and
// libscops_kernels_cuda.so; the latter defines SCOPS_WITH_CUDA.
#include "projector_internal.h"

#include <cmath>
#include <new>
#include <thread>

namespace {

// Largest dimension accepted: 2^24 columns keeps every index product (rows * dim)
// comfortably inside int64 and every per-row buffer below 64 MiB of fp32.
constexpr int64_t kMaxDim = int64_t(1) << 24;
// Largest row count per call: 2^24 rows (a batch far beyond any projector use).
constexpr int64_t kMaxRows = int64_t(1) << 24;
// Thread cap: more workers than this never helps a projector-sized problem.
constexpr int32_t kMaxThreads = 256;

bool dim_ok(int64_t d) { return d > 0 && d <= kMaxDim; }

scops_status validate(const scops_projector_params* p, scops::Spec* s) {
    if (!p) return SCOPS_E_INVALID_ARG;
    if (p->abi_version != SCOPS_PROJECTOR_ABI) return SCOPS_E_ABI;
    if (!dim_ok(p->in_dim) || !dim_ok(p->out_dim)) return SCOPS_E_INVALID_ARG;
    if (p->hidden_dim != 0 && !dim_ok(p->hidden_dim)) return SCOPS_E_INVALID_ARG;
    if (p->layernorm != 0 && p->layernorm != 1) return SCOPS_E_INVALID_ARG;
    if (p->l2norm != 0 && p->l2norm != 1) return SCOPS_E_INVALID_ARG;
    if (p->gelu < SCOPS_GELU_NONE || p->gelu > SCOPS_GELU_TANH) return SCOPS_E_INVALID_ARG;
    if (p->gelu != SCOPS_GELU_NONE && p->hidden_dim == 0) return SCOPS_E_INVALID_ARG;
    if (!std::isfinite(p->scale)) return SCOPS_E_INVALID_ARG;
    if (p->layernorm && !(std::isfinite(p->ln_eps) && p->ln_eps > 0.0f)) return SCOPS_E_INVALID_ARG;
    if (p->weight_dtype != SCOPS_DTYPE_F32 && p->weight_dtype != SCOPS_DTYPE_F16)
        return SCOPS_E_UNSUPPORTED;
    if (p->n_threads < 0 || p->n_threads > kMaxThreads) return SCOPS_E_INVALID_ARG;
    if (p->backend < SCOPS_BACKEND_AUTO || p->backend > SCOPS_BACKEND_CPU_SCALAR)
        return SCOPS_E_INVALID_ARG;
    if (p->max_rows < 0 || p->max_rows > kMaxRows) return SCOPS_E_INVALID_ARG;
    if (!p->fc1_weight) return SCOPS_E_INVALID_ARG;
    if (p->hidden_dim > 0 && !p->fc2_weight) return SCOPS_E_INVALID_ARG;
    if (p->hidden_dim == 0 && (p->fc2_weight || p->fc2_bias)) return SCOPS_E_INVALID_ARG;
    if (p->layernorm && (!p->ln_weight || !p->ln_bias)) return SCOPS_E_INVALID_ARG;

    s->in = p->in_dim;
    s->hidden = p->hidden_dim;
    s->out = p->out_dim;
    s->layernorm = p->layernorm != 0;
    s->l2norm = p->l2norm != 0;
    s->ln_eps = p->ln_eps;
    s->scale = p->scale;
    s->gelu = p->gelu;
    s->dtype = p->weight_dtype;
    int hw = (int)std::thread::hardware_concurrency();
    s->threads = p->n_threads > 0 ? p->n_threads : (hw > 0 ? hw : 1);
    s->max_rows = p->max_rows > 0 ? p->max_rows : 64;
    s->ln_w = p->ln_weight;
    s->ln_b = p->ln_bias;
    s->w1 = p->fc1_weight;
    s->b1 = p->fc1_bias;
    s->w2 = p->fc2_weight;
    s->b2 = p->fc2_bias;
    return SCOPS_OK;
}

scops_status check_forward(scops_projector* h, const void* x, int64_t rows, const void* y,
                           int64_t y_capacity) {
    if (!h || !x || !y) return SCOPS_E_INVALID_ARG;
    if (rows <= 0 || rows > kMaxRows) return SCOPS_E_INVALID_ARG;
    if (y_capacity < 0 || y_capacity / rows < h->out_dim) return SCOPS_E_CAPACITY;
    return SCOPS_OK;
}

}  // namespace

extern "C" {

scops_status scops_projector_params_init(scops_projector_params* p) {
    if (!p) return SCOPS_E_INVALID_ARG;
    *p = scops_projector_params{};
    p->abi_version = SCOPS_PROJECTOR_ABI;
    p->ln_eps = 1e-5f;
    p->scale = 1.0f;
    return SCOPS_OK;
}

scops_status scops_projector_create(const scops_projector_params* p, scops_projector** out) {
    if (!out) return SCOPS_E_INVALID_ARG;
    *out = nullptr;
    scops::Spec s;
    scops_status st = validate(p, &s);
    if (st != SCOPS_OK) return st;
    try {
        switch (p->backend) {
            case SCOPS_BACKEND_CUDA: return scops::create_cuda_projector(s, out);
            case SCOPS_BACKEND_CPU: return scops::create_cpu_projector(s, false, out);
            case SCOPS_BACKEND_CPU_SCALAR: return scops::create_cpu_projector(s, true, out);
            default:
                if (scops::cuda_device_count() > 0 && scops::create_cuda_projector(s, out) == SCOPS_OK)
                    return SCOPS_OK;
                return scops::create_cpu_projector(s, false, out);
        }
    } catch (const std::bad_alloc&) {
        return SCOPS_E_NO_MEMORY;
    } catch (...) {
        return SCOPS_E_INTERNAL;
    }
}

scops_status scops_projector_forward(scops_projector* h, const float* x, int64_t rows, float* y,
                                     int64_t y_capacity) {
    scops_status st = check_forward(h, x, rows, y, y_capacity);
    if (st != SCOPS_OK) return st;
    try {
        return h->forward(x, rows, y);
    } catch (const std::bad_alloc&) {
        return SCOPS_E_NO_MEMORY;
    } catch (...) {
        return SCOPS_E_INTERNAL;
    }
}

scops_status scops_projector_forward_device(scops_projector* h, const float* x_dev, int64_t rows,
                                            float* y_dev, int64_t y_capacity) {
    scops_status st = check_forward(h, x_dev, rows, y_dev, y_capacity);
    if (st != SCOPS_OK) return st;
    try {
        return h->forward_device(x_dev, rows, y_dev);
    } catch (...) {
        return SCOPS_E_INTERNAL;
    }
}

void scops_projector_destroy(scops_projector* h) { delete h; }

scops_status scops_host_alloc(int64_t bytes, void** out) {
    if (!out) return SCOPS_E_INVALID_ARG;
    *out = nullptr;
    if (bytes <= 0 || bytes > (int64_t(1) << 40)) return SCOPS_E_INVALID_ARG;
    if (scops::cuda_device_count() <= 0) return SCOPS_E_UNSUPPORTED;
    return scops::cuda_host_alloc(size_t(bytes), out);
}

void scops_host_free(void* p) {
    if (p) scops::cuda_host_free(p);
}

const char* scops_status_string(int32_t status) {
    switch (status) {
        case SCOPS_OK: return "ok";
        case SCOPS_E_INVALID_ARG: return "invalid argument";
        case SCOPS_E_NO_MEMORY: return "out of memory";
        case SCOPS_E_UNSUPPORTED: return "unsupported (backend or dtype not available)";
        case SCOPS_E_CUDA: return "CUDA runtime error";
        case SCOPS_E_CAPACITY: return "output buffer too small for rows * out_dim";
        case SCOPS_E_ABI: return "params ABI version mismatch";
        case SCOPS_E_INTERNAL: return "internal error";
        default: return "unknown status";
    }
}

const char* scops_projector_backend_name(const scops_projector* h) {
    return h ? h->name() : "invalid";
}

const char* scops_cpu_features(void) { return scops::cpu_path_features(scops::best_cpu_path()); }

int32_t scops_cuda_available(void) { return scops::cuda_device_count(); }

bool scops_flag_test(void* flag) {
    if (flag == nullptr) return false;
#if defined(_MSC_VER)
    return *static_cast<volatile const int32_t*>(flag) != 0;  // aligned 32-bit reads are atomic there
#else
    return __atomic_load_n(static_cast<const int32_t*>(flag), __ATOMIC_RELAXED) != 0;
#endif
}

}  // extern "C"

#ifndef SCOPS_WITH_CUDA
// CPU-only library: the CUDA backend is not compiled in.
namespace scops {
scops_status create_cuda_projector(const Spec&, scops_projector** out) {
    *out = nullptr;
    return SCOPS_E_UNSUPPORTED;
}
int cuda_device_count() { return 0; }
scops_status cuda_host_alloc(size_t, void** out) {
    *out = nullptr;
    return SCOPS_E_UNSUPPORTED;
}
void cuda_host_free(void*) {}
}  // namespace scops
#endif
