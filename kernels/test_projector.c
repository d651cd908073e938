/* test_projector.c -- C tests of the fused projector (projector.h), for any target.
 *
 * Checks every CPU path of the library it links (the target's SIMD path -- NEON on aarch64,
 * AVX2 on x86-64 -- and the scalar floor) against a plain double-precision reference of
 *     y = [L2-normalise * scale]( [Linear2(+bias) o GELU]( Linear1(+bias)( [LayerNorm](x) ) ) )
 * written below (the C twin of kernels/reference.py's project_reference), on awkward sizes,
 * fp32 and fp16 weights; that results are bit-identical across thread counts; that no byte
 * outside the output rows is written; and the C API's argument checks.
 *
 * Build and run (native):   cmake -S . -B build/ctest -DSCOPS_BUILD_TESTS=ON -DSCOPS_ENABLE_CUDA=OFF
 *                           cmake --build build/ctest && build/ctest/kernels/scops_projector_test
 * aarch64 under qemu-user:  make test-arm64        (kernels/check_arm64.sh)
 * Options: --quick (small shapes only), --expect PATH (fail unless the library's CPU path is
 * PATH, e.g. "neon": a build that silently fell back to scalar must not pass).
 * Exit status 0 when every check passed; each failure prints one line.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "projector.h"

static int g_checks, g_failures;
static double g_worst_f32, g_worst_f16;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        ++g_checks;                                        \
        if (!(cond)) {                                     \
            ++g_failures;                                  \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                  \
            fputc('\n', stderr);                           \
        }                                                  \
    } while (0)

/* -- numbers ---------------------------------------------------------------------------- */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static double uniform(void) { /* splitmix64 -> [-1, 1) */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 4503599627370496.0 - 1.0; /* 2^52 */
}

/* fp32 -> IEEE half bits, round to nearest even (subnormals kept; no NaN inputs here). */
static uint16_t float_to_half(float f) {
    uint32_t x, sign, man, h, rem, halfway;
    int32_t exp;
    int shift;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    exp = (int32_t)((x >> 23) & 0xffu) - 127 + 15;
    man = x & 0x7fffffu;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) { /* half subnormal: value = h * 2^-24 */
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        shift = 14 - exp;
        h = man >> shift;
        rem = man & ((1u << shift) - 1);
        halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
        return (uint16_t)(sign | h);
    }
    h = ((uint32_t)exp << 10) | (man >> 13);
    rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static double half_to_double(uint16_t h) {
    int exp = (h >> 10) & 0x1f;
    double man = h & 0x3ff, v;
    if (exp == 0) v = ldexp(man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = ldexp(man + 1024.0, exp - 25);
    return (h & 0x8000u) ? -v : v;
}

/* -- a problem: spec, weights, input ------------------------------------------------------ */
typedef struct {
    int64_t rows, in, hidden, out;
    int layernorm, bias, l2norm, gelu, f16;
    float scale;
} Case;

typedef struct {
    float *ln_w, *ln_b, *b1, *b2, *x;
    void *w1, *w2;      /* float or uint16_t */
    double *w1d, *w2d;  /* the weights as the kernel sees them, in double */
} Data;

static void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void fill_weight(int64_t n, int64_t k, int f16, void** w, double** wd) {
    const double s = sqrt(3.0 / (double)k); /* uniform with variance 1/k */
    int64_t i;
    *wd = xmalloc(sizeof(double) * (size_t)(n * k));
    if (f16) {
        uint16_t* h = xmalloc(2 * (size_t)(n * k));
        for (i = 0; i < n * k; ++i) {
            h[i] = float_to_half((float)(uniform() * s));
            (*wd)[i] = half_to_double(h[i]);
        }
        *w = h;
    } else {
        float* f = xmalloc(4 * (size_t)(n * k));
        for (i = 0; i < n * k; ++i) {
            f[i] = (float)(uniform() * s);
            (*wd)[i] = f[i];
        }
        *w = f;
    }
}

static float* fill_vec(int64_t n, double center, double spread) {
    float* v = xmalloc(4 * (size_t)n);
    int64_t i;
    for (i = 0; i < n; ++i) v[i] = (float)(center + spread * uniform());
    return v;
}

static void make_data(const Case* c, Data* d) {
    const int64_t n1 = c->hidden ? c->hidden : c->out;
    memset(d, 0, sizeof *d);
    fill_weight(n1, c->in, c->f16, &d->w1, &d->w1d);
    if (c->bias) d->b1 = fill_vec(n1, 0.0, 0.8);
    if (c->hidden) {
        fill_weight(c->out, c->hidden, c->f16, &d->w2, &d->w2d);
        if (c->bias) d->b2 = fill_vec(c->out, 0.0, 0.8);
    }
    if (c->layernorm) {
        d->ln_w = fill_vec(c->in, 1.0, 0.2);
        d->ln_b = fill_vec(c->in, 0.0, 0.2);
    }
    d->x = fill_vec(c->rows * c->in, 0.5, 3.0);
}

static void free_data(Data* d) {
    free(d->ln_w); free(d->ln_b); free(d->b1); free(d->b2); free(d->x);
    free(d->w1); free(d->w2); free(d->w1d); free(d->w2d);
}

/* The plain reference, in double: one step at a time, exactly as projector.h describes. */
static double gelu_ref(double v, int kind) {
    if (kind == SCOPS_GELU_ERF) return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    if (kind == SCOPS_GELU_TANH) return 0.5 * v * (1.0 + tanh(0.79788456080286536 /* sqrt(2/pi) */ * (v + 0.044715 * v * v * v)));
    return v;
}

static void linear_ref(const double* a, int64_t k, const double* w, const float* b, int64_t n, double* y) {
    int64_t i, j;
    for (i = 0; i < n; ++i) { /* y[i] = sum_j a[j] w[i, j] + b[i]   (w: [n, k]) */
        double s = b ? b[i] : 0.0;
        for (j = 0; j < k; ++j) s += a[j] * w[i * k + j];
        y[i] = s;
    }
}

static void reference(const Case* c, const Data* d, double* y) {
    const int64_t n1 = c->hidden ? c->hidden : c->out;
    double* a = xmalloc(sizeof(double) * (size_t)c->in);
    double* h = xmalloc(sizeof(double) * (size_t)n1);
    int64_t r, i;
    for (r = 0; r < c->rows; ++r) {
        const float* x = d->x + r * c->in;
        double* yr = y + r * c->out;
        for (i = 0; i < c->in; ++i) a[i] = x[i];
        if (c->layernorm) {
            double mean = 0, var = 0;
            for (i = 0; i < c->in; ++i) mean += a[i];
            mean /= (double)c->in;
            for (i = 0; i < c->in; ++i) var += (a[i] - mean) * (a[i] - mean);
            var /= (double)c->in;
            for (i = 0; i < c->in; ++i) a[i] = (a[i] - mean) / sqrt(var + 1e-5) * d->ln_w[i] + d->ln_b[i];
        }
        if (c->hidden) {
            linear_ref(a, c->in, d->w1d, d->b1, n1, h);
            for (i = 0; i < n1; ++i) h[i] = gelu_ref(h[i], c->gelu);
            linear_ref(h, c->hidden, d->w2d, d->b2, c->out, yr);
        } else {
            linear_ref(a, c->in, d->w1d, d->b1, c->out, yr);
        }
        if (c->l2norm) {
            double ss = 0;
            for (i = 0; i < c->out; ++i) ss += yr[i] * yr[i];
            ss = sqrt(ss);
            if (ss < 1e-12) ss = 1e-12; /* torch F.normalize's eps */
            for (i = 0; i < c->out; ++i) yr[i] = yr[i] / ss * c->scale;
        }
    }
    free(a);
    free(h);
}

/* -- running the library -------------------------------------------------------------------- */
enum { kGuard = 67 }; /* floats past the output that must stay untouched */

static scops_status create(const Case* c, const Data* d, int backend, int threads, int64_t max_rows,
                           scops_projector** h) {
    scops_projector_params p;
    scops_projector_params_init(&p);
    p.in_dim = c->in;
    p.hidden_dim = c->hidden;
    p.out_dim = c->out;
    p.layernorm = c->layernorm;
    p.gelu = c->gelu;
    p.l2norm = c->l2norm;
    p.scale = c->scale;
    p.weight_dtype = c->f16 ? SCOPS_DTYPE_F16 : SCOPS_DTYPE_F32;
    p.n_threads = threads;
    p.backend = backend;
    p.max_rows = max_rows;
    p.ln_weight = d->ln_w;
    p.ln_bias = d->ln_b;
    p.fc1_weight = d->w1;
    p.fc1_bias = d->b1;
    p.fc2_weight = d->w2;
    p.fc2_bias = d->b2;
    return scops_projector_create(&p, h);
}

/* Runs the projector into a poisoned buffer; returns it (rows*out + kGuard floats) or NULL. */
static float* run(const Case* c, const Data* d, int backend, int threads, int64_t max_rows, const char* what) {
    const size_t n = (size_t)(c->rows * c->out);
    float* y = xmalloc(sizeof(float) * (n + kGuard));
    scops_projector* h = NULL;
    scops_status st;
    size_t i;
    int untouched = 1, finite = 1;
    for (i = 0; i < n + kGuard; ++i) y[i] = i < n ? NAN : -7.25f;
    st = create(c, d, backend, threads, max_rows, &h);
    CHECK(st == SCOPS_OK && h, "%s: create: %s", what, scops_status_string(st));
    if (st != SCOPS_OK) {
        free(y);
        return NULL;
    }
    st = scops_projector_forward(h, d->x, c->rows, y, (int64_t)n);
    CHECK(st == SCOPS_OK, "%s: forward: %s", what, scops_status_string(st));
    scops_projector_destroy(h);
    for (i = 0; i < n; ++i) finite &= isfinite(y[i]) != 0;
    for (i = n; i < n + kGuard; ++i) untouched &= y[i] == -7.25f;
    CHECK(finite, "%s: some output element was not written (or is not finite)", what);
    CHECK(untouched, "%s: wrote past the output rows", what);
    return y;
}

static double rel_err(const float* y, const double* ref, size_t n) {
    double num = 0, den = 0;
    size_t i;
    for (i = 0; i < n; ++i) {
        num += (y[i] - ref[i]) * (y[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static void describe(const Case* c, int backend, char* buf, size_t size) {
    snprintf(buf, size, "%s %s rows=%lld in=%lld hidden=%lld out=%lld ln=%d bias=%d gelu=%d l2=%d",
             backend == SCOPS_BACKEND_CPU_SCALAR ? "scalar" : "simd", c->f16 ? "f16" : "f32", (long long)c->rows,
             (long long)c->in, (long long)c->hidden, (long long)c->out, c->layernorm, c->bias, c->gelu, c->l2norm);
}

/* Relative L2 error of the whole output vs the double reference: 1e-5, the projector's bar
 * (DESIGN.md).  Both dtypes: the reference reads the very fp16 values the kernel widens. */
static const double kTol = 1e-5;

static void check_case(const Case* c, int max_rows) {
    static const int backends[2] = {SCOPS_BACKEND_CPU, SCOPS_BACKEND_CPU_SCALAR};
    Data d;
    double* ref;
    char what[256];
    int b;
    make_data(c, &d);
    ref = xmalloc(sizeof(double) * (size_t)(c->rows * c->out));
    reference(c, &d, ref);
    for (b = 0; b < 2; ++b) {
        float* y;
        describe(c, backends[b], what, sizeof what);
        y = run(c, &d, backends[b], 2, max_rows, what);
        if (y) {
            const double e = rel_err(y, ref, (size_t)(c->rows * c->out));
            double* worst = c->f16 ? &g_worst_f16 : &g_worst_f32;
            if (e > *worst) *worst = e;
            CHECK(e <= kTol, "%s: relative error %.3g > %.0e", what, e, kTol);
            free(y);
        }
    }
    free(ref);
    free_data(&d);
}

/* Every combination of the optional steps at small awkward sizes (37 -> [19 ->] 45). */
static void test_chains(void) {
    static const int64_t rows[4] = {1, 2, 3, 7};
    int ln, bias, l2, mode, f16, r;
    for (f16 = 0; f16 < 2; ++f16)
        for (ln = 0; ln < 2; ++ln)
            for (bias = 0; bias < 2; ++bias)
                for (l2 = 0; l2 < 2; ++l2)
                    for (mode = 0; mode < 4; ++mode) /* single linear; hidden with no/erf/tanh GELU */
                        for (r = 0; r < 4; ++r) {
                            Case c = {rows[r], 37, mode ? 19 : 0, 45, ln, bias, l2, mode ? mode - 1 : 0, f16,
                                      l2 ? 2.5f : 1.0f};
                            check_case(&c, 0);
                        }
}

/* Shapes that cross every blocking edge: k > 256 (two-level sums), row tails of the 4-row
 * tile, the 96-row block, panel tails (out % 16 != 0), 1-row GEMVs over 4-panel groups. */
static void test_shapes(int quick) {
    static const Case small[] = {
        {5, 300, 0, 77, 0, 1, 0, 0, 0, 1.0f},
        {4, 129, 33, 70, 1, 1, 1, SCOPS_GELU_ERF, 0, 3.0f},
        {1, 513, 0, 260, 0, 1, 0, 0, 0, 1.0f},
        {2, 257, 0, 100, 0, 0, 0, 0, 0, 1.0f},
        {3, 64, 48, 17, 1, 1, 0, SCOPS_GELU_TANH, 0, 1.0f},
        {9, 31, 0, 16, 0, 1, 0, 0, 0, 1.0f},
    };
    static const Case big[] = {
        {1, 1024, 0, 5120, 0, 1, 0, 0, 0, 1.0f},
        {7, 767, 0, 4095, 0, 1, 0, 0, 0, 1.0f},
        {33, 1025, 0, 1000, 0, 1, 0, 0, 0, 1.0f},
        {97, 640, 300, 1040, 1, 1, 1, SCOPS_GELU_TANH, 0, 20.0f},
        {257, 767, 0, 1024, 0, 1, 0, 0, 0, 1.0f},
        {32, 768, 0, 4096, 0, 1, 0, 0, 0, 1.0f},
    };
    size_t i;
    int f16;
    for (f16 = 0; f16 < 2; ++f16) {
        for (i = 0; i < sizeof small / sizeof small[0]; ++i) {
            Case c = small[i];
            c.f16 = f16;
            check_case(&c, 0);
        }
        for (i = 0; !quick && i < sizeof big / sizeof big[0]; ++i) {
            Case c = big[i];
            c.f16 = f16;
            check_case(&c, 0);
        }
    }
}

/* The SIMD path gives the same bits for every thread count.  The shapes are above the
 * library's threading threshold (2^21 multiply-adds per linear), so the work really splits. */
static void test_threads(int quick) {
    static const Case cases[] = {
        {1, 1024, 0, 2304, 0, 1, 0, 0, 0, 1.0f},          /* 2.4M MACs, few-rows path */
        {33, 767, 200, 333, 1, 1, 1, SCOPS_GELU_ERF, 0, 3.0f},
        {3, 1100, 0, 700, 0, 1, 0, 0, 0, 1.0f},           /* few rows, k tail */
        {130, 300, 0, 530, 1, 0, 0, 0, 0, 1.0f},           /* two 96-row blocks */
    };
    static const int threads[] = {1, 2, 3, 5, 8};
    const int n_threads = quick ? 4 : 5;
    size_t i;
    int f16, t;
    for (f16 = 0; f16 < 2; ++f16)
        for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
            Case c = cases[i];
            Data d;
            float* y0;
            char what[256];
            c.f16 = f16;
            make_data(&c, &d);
            describe(&c, SCOPS_BACKEND_CPU, what, sizeof what);
            y0 = run(&c, &d, SCOPS_BACKEND_CPU, threads[0], 0, what);
            for (t = 1; y0 && t < n_threads; ++t) {
                float* y = run(&c, &d, SCOPS_BACKEND_CPU, threads[t], 0, what);
                if (y) {
                    CHECK(memcmp(y, y0, sizeof(float) * (size_t)(c.rows * c.out)) == 0,
                          "%s: %d threads differ from 1 thread", what, threads[t]);
                    free(y);
                }
            }
            free(y0);
            free_data(&d);
        }
}

/* Scratch sized for 2 rows at create, then 9 rows (it grows), then 1 row again. */
static void test_growth(void) {
    Case c = {9, 70, 40, 50, 1, 1, 1, SCOPS_GELU_ERF, 0, 1.0f};
    check_case(&c, 2);
    c.rows = 1;
    check_case(&c, 2);
}

static void test_bad_arguments(void) {
    float w[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, x[8] = {1, 1, 1, 1, 1, 1, 1, 1}, y[6];
    scops_projector_params p;
    scops_projector* h = NULL;
    CHECK(scops_projector_params_init(NULL) != SCOPS_OK, "params_init(NULL) accepted");
    CHECK(scops_projector_create(NULL, &h) != SCOPS_OK && !h, "create(NULL params) accepted");
    scops_projector_params_init(&p);
    CHECK(scops_projector_create(&p, &h) != SCOPS_OK && !h, "zero dims accepted");
    p.in_dim = 4;
    p.out_dim = 3;
    CHECK(scops_projector_create(&p, &h) != SCOPS_OK && !h, "NULL fc1_weight accepted");
    p.fc1_weight = w;
    p.gelu = SCOPS_GELU_ERF;
    CHECK(scops_projector_create(&p, &h) != SCOPS_OK && !h, "GELU without a second linear accepted");
    p.gelu = SCOPS_GELU_NONE;
    p.abi_version = 99;
    CHECK(scops_projector_create(&p, &h) == SCOPS_E_ABI && !h, "wrong ABI accepted");
    p.abi_version = SCOPS_PROJECTOR_ABI;
    p.l2norm = 1;
    p.scale = INFINITY;
    CHECK(scops_projector_create(&p, &h) != SCOPS_OK && !h, "infinite scale accepted");
    p.l2norm = 0;
    p.scale = 1.0f;
    p.n_threads = -1;
    CHECK(scops_projector_create(&p, &h) != SCOPS_OK && !h, "negative threads accepted");
    p.n_threads = 1;
    CHECK(scops_projector_create(&p, NULL) != SCOPS_OK, "create(out NULL) accepted");
    CHECK(scops_projector_create(&p, &h) == SCOPS_OK && h, "a valid create failed");
    CHECK(scops_projector_forward(h, x, 2, y, 5) == SCOPS_E_CAPACITY, "too small an output accepted");
    CHECK(scops_projector_forward(h, x, 0, y, 6) != SCOPS_OK, "rows 0 accepted");
    CHECK(scops_projector_forward(h, NULL, 2, y, 6) != SCOPS_OK, "x NULL accepted");
    CHECK(scops_projector_forward(NULL, x, 2, y, 6) != SCOPS_OK, "handle NULL accepted");
    CHECK(scops_projector_forward_device(h, x, 2, y, 6) == SCOPS_E_UNSUPPORTED, "device forward on a CPU handle");
    CHECK(scops_projector_forward(h, x, 2, y, 6) == SCOPS_OK, "a valid forward failed");
    CHECK(y[0] == 10 && y[1] == 26 && y[2] == 42 && y[3] == 10, "4 -> 3 ones: got %g %g %g %g", y[0], y[1], y[2], y[3]);
    scops_projector_destroy(h);
    scops_projector_destroy(NULL);
    CHECK(strcmp(scops_projector_backend_name(NULL), "invalid") == 0, "backend_name(NULL)");
    CHECK(strcmp(scops_status_string(12345), "unknown status") == 0, "status_string(12345)");
}

int main(int argc, char** argv) {
    const char* expect = NULL;
    int quick = 0, i;
    scops_projector* h = NULL;
    Case c = {1, 8, 0, 8, 0, 0, 0, 0, 0, 1.0f};
    Data d;
    char backend[32] = "?";
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else if (strcmp(argv[i], "--expect") == 0 && i + 1 < argc) expect = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--quick] [--expect neon|avx2+fma+f16c|scalar]\n", argv[0]);
            return 2;
        }
    }
    make_data(&c, &d);
    if (create(&c, &d, SCOPS_BACKEND_CPU, 1, 0, &h) == SCOPS_OK) {
        snprintf(backend, sizeof backend, "%s", scops_projector_backend_name(h));
        scops_projector_destroy(h);
    }
    free_data(&d);
    printf("scops_projector_test: CPU path %s (backend %s), %s run\n", scops_cpu_features(), backend,
           quick ? "quick" : "full");
    if (expect) CHECK(strcmp(scops_cpu_features(), expect) == 0, "CPU path is %s, expected %s",
                      scops_cpu_features(), expect);
    test_bad_arguments();
    test_chains();
    test_shapes(quick);
    test_growth();
    test_threads(quick);
    printf("%d checks, %d failed; worst relative error vs the double reference: fp32 weights %.2e, "
           "fp16 weights %.2e (bar %.0e)\n", g_checks, g_failures, g_worst_f32, g_worst_f16, kTol);
    return g_failures ? 1 : 0;
}
