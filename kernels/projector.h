/* projector.h -- plain C API of the scops fused projector.
 *
 * Computes, for each row of x [rows, in_dim] (fp32):
 *     y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )
 * Every bracketed step is optional.  Weights use the PyTorch nn.Linear layout (out x in):
 *     fc1_weight [hidden_dim, in_dim]  (or [out_dim, in_dim] when hidden_dim == 0)
 *     fc2_weight [out_dim, hidden_dim] (only when hidden_dim > 0)
 * Weights are fp32 or fp16 (IEEE half, raw uint16 bits); biases and LayerNorm params fp32.
 * The output rows are written straight into the caller's buffer y [rows, out_dim].
 *
 * Two shared libraries implement this header:
 *   libscops_kernels.so       CPU only (x86-64: AVX2/FMA/F16C dispatched at run time; aarch64:
 *                             NEON; scalar fallback everywhere)
 *   libscops_kernels_cuda.so  the same CPU code plus the CUDA backend (built when nvcc is found)
 * Build: `pip install --no-build-isolation --no-deps -e .` (CMake via scikit-build-core).
 * Twins: kernels/reference.py (numpy reference), projector_cpu.cpp (+ _avx2, _neon), projector_cuda.cu.
 *
 * All argument checks happen in the entry points below; bad arguments give an error
 * status, never a crash.  A projector handle may be used by one thread at a time.
 * CPU results are bit-identical for every n_threads (no reduction order depends on it).
 * Scratch memory is allocated at create for max_rows rows; a forward with more rows grows
 * it once (the only allocation a forward can make).
 */
#ifndef SCOPS_PROJECTOR_H
#define SCOPS_PROJECTOR_H

#include <stdbool.h>
#include <stdint.h>

#if defined(_WIN32)
#define SCOPS_API __declspec(dllexport)
#else
#define SCOPS_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever scops_projector_params changes layout. */
#define SCOPS_PROJECTOR_ABI 1

typedef enum scops_status {
    SCOPS_OK = 0,
    SCOPS_E_INVALID_ARG = 1,  /* NULL pointer, bad dimension, non-finite scale, ... */
    SCOPS_E_NO_MEMORY = 2,    /* host or device allocation failed */
    SCOPS_E_UNSUPPORTED = 3,  /* backend / dtype not compiled in or not present */
    SCOPS_E_CUDA = 4,         /* a CUDA runtime call failed */
    SCOPS_E_CAPACITY = 5,     /* output buffer smaller than rows * out_dim */
    SCOPS_E_ABI = 6,          /* params.abi_version does not match this library */
    SCOPS_E_INTERNAL = 7
} scops_status;

typedef enum scops_gelu { SCOPS_GELU_NONE = 0, SCOPS_GELU_ERF = 1, SCOPS_GELU_TANH = 2 } scops_gelu;
typedef enum scops_dtype { SCOPS_DTYPE_F32 = 0, SCOPS_DTYPE_F16 = 1 } scops_dtype;
typedef enum scops_backend {
    SCOPS_BACKEND_AUTO = 0,       /* CUDA if compiled in and a device exists, else best CPU */
    SCOPS_BACKEND_CPU = 1,        /* best CPU path (AVX2 or NEON where the CPU has it, else scalar) */
    SCOPS_BACKEND_CUDA = 2,
    SCOPS_BACKEND_CPU_SCALAR = 3  /* portable path, for testing */
} scops_backend;

typedef struct scops_projector_params {
    int32_t abi_version;  /* SCOPS_PROJECTOR_ABI (set by scops_projector_params_init) */
    int64_t in_dim;       /* > 0 */
    int64_t hidden_dim;   /* 0 = single Linear (fc1 maps in_dim -> out_dim) */
    int64_t out_dim;      /* > 0 */
    int32_t layernorm;    /* 0/1: LayerNorm over in_dim before fc1 */
    float ln_eps;         /* > 0, finite */
    int32_t gelu;         /* scops_gelu; only with hidden_dim > 0 */
    int32_t l2norm;       /* 0/1: y <- y / ||y||_2 * scale */
    float scale;          /* finite; multiplies y only when l2norm is on */
    int32_t weight_dtype; /* scops_dtype of fc1_weight and fc2_weight */
    int32_t n_threads;    /* CPU worker threads, 0 = hardware concurrency, <0 invalid */
    int32_t backend;      /* scops_backend */
    int64_t max_rows;     /* scratch is sized for this many rows at create (0 = 64); grows if exceeded */
    const float* ln_weight; /* [in_dim], required when layernorm */
    const float* ln_bias;   /* [in_dim], required when layernorm */
    const void* fc1_weight; /* [hidden_dim or out_dim, in_dim], required */
    const float* fc1_bias;  /* [hidden_dim or out_dim] or NULL (no bias) */
    const void* fc2_weight; /* [out_dim, hidden_dim], required when hidden_dim > 0 */
    const float* fc2_bias;  /* [out_dim] or NULL */
} scops_projector_params;

typedef struct scops_projector scops_projector; /* opaque */

/* Fills defaults: abi_version, ln_eps 1e-5, scale 1, everything else zero / NULL. */
SCOPS_API scops_status scops_projector_params_init(scops_projector_params* p);

/* Validates p, copies / packs the weights (the caller may free them afterwards). */
SCOPS_API scops_status scops_projector_create(const scops_projector_params* p, scops_projector** out);

/* x [rows, in_dim] fp32 row-major; y [rows, out_dim] fp32 row-major.
 * y_capacity is the number of floats available at y; must be >= rows * out_dim.
 * rows >= 1.  Host pointers for every backend (the CUDA backend copies in and out). */
SCOPS_API scops_status scops_projector_forward(scops_projector* h, const float* x, int64_t rows,
                                               float* y, int64_t y_capacity);

/* Same as forward, with x and y in device memory (CUDA backend only). */
SCOPS_API scops_status scops_projector_forward_device(scops_projector* h, const float* x_dev,
                                                      int64_t rows, float* y_dev, int64_t y_capacity);

SCOPS_API void scops_projector_destroy(scops_projector* h); /* NULL is a no-op */

/* Page-locked (pinned) host memory, for the buffer llama.cpp reads image rows from
 * (llama_batch.embd): the CUDA backend's forward copies its result there by one DMA
 * instead of staging it through the driver's bounce buffer.  bytes > 0.
 * SCOPS_E_UNSUPPORTED in the CPU-only library or without a CUDA device. */
SCOPS_API scops_status scops_host_alloc(int64_t bytes, void** out);
SCOPS_API void scops_host_free(void* p); /* NULL is a no-op */

SCOPS_API const char* scops_status_string(int32_t status); /* never NULL */
/* "cpu-avx2" | "cpu-neon" | "cpu-scalar" | "cuda"; "invalid" for NULL. */
SCOPS_API const char* scops_projector_backend_name(const scops_projector* h);
/* SIMD path the CPU backend picks on this machine: "avx2+fma+f16c" (x86-64), "neon"
 * (aarch64) or "scalar". */
SCOPS_API const char* scops_cpu_features(void);
/* Number of usable CUDA devices; 0 in the CPU-only library or without a GPU. */
SCOPS_API int32_t scops_cuda_available(void);

/* llama.cpp's abort callback (ggml_abort_callback: bool (*)(void*)) for the runtime's
 * scheduler: true once the int32 that `flag` points at is non-zero (a relaxed atomic load;
 * NULL reads as 0).  ggml's CPU backend calls it after every graph node from its compute
 * thread, with Python's GIL released: a ctypes callback would take the GIL there each time;
 * this reads a word.  Twin: none (one load; tests/test_kernels.py checks it through ctypes). */
SCOPS_API bool scops_flag_test(void* flag);

#ifdef __cplusplus
}
#endif
#endif /* SCOPS_PROJECTOR_H */
