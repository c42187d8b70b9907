/* Batch-1..8 matrix-vector products for CPU decode: y (M, N) = x (M, K) @ W (N, K)^T (+ bias), W in bf16 or int8.
 *
 * Decode at batch 1 reads every weight once per token, so its speed is the speed at which the weights stream
 * from memory. Each thread takes a contiguous band of output rows and streams it once, keeping the M input rows
 * in cache. bf16 rows go through vdpbf16ps (32 bf16 products per instruction), accumulated in fp32 as in
 * PyTorch's own bf16 matmul. int8 rows (weight-only int8, per-channel scales) meet the activations rounded to
 * int16 with one scale per row, here (15 bits against bf16's 8: no precision that bf16 had is lost), through vpdpwssd
 * (32 int16 x int8 products per instruction, exact in int32, moved to fp32 every INT8_CHUNK inputs). The
 * result is rounded to bf16 once (round to nearest even).
 *
 * Built by r1kit/kernels/__init__.py with `gcc -O3 -march=native -fopenmp`; the plain PyTorch path is the
 * reference it is tested against (tests/test_kernels.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_M 8
#define INT8_CHUNK 1024 /* |int16 * int8| <= 2^22; a chunk puts 1024 / 16 = 64 products in each int32 lane: < 2^28 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* One output row n for M input rows; M is a compile-time constant in each instance (ROWS_FOR), so the M
 * accumulators stay in registers. */
#define ROWS_FOR(M)                                                                                             \
static void rows_bf16_##M(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,            \
                          int64_t N, int64_t K, int64_t n) {                                                  \
    const uint16_t *wr = w + n * K;                                                                            \
    __m512 acc[M];                                                                                             \
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                                                  \
    int64_t k = 0;                                                                                             \
    for (; k + 32 <= K; k += 32) {                                                                             \
        __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wr + k));                                    \
        for (int m = 0; m < M; m++)                                                                            \
            acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k)));\
    }                                                                                                          \
    for (int m = 0; m < M; m++) {                                                                              \
        float s = _mm512_reduce_add_ps(acc[m]);                                                                \
        for (int64_t j = k; j < K; j++) s += bf16_to_f32(wr[j]) * bf16_to_f32(x[m * K + j]);                  \
        if (bias) s += bf16_to_f32(bias[n]);                                                                   \
        y[m * N + n] = f32_to_bf16(s);                                                                         \
    }                                                                                                          \
}                                                                                                              \
static void rows_int8_##M(const int16_t *xq, const float *xs, const int8_t *w, const float *scale,           \
                          const uint16_t *bias, uint16_t *y, int64_t N, int64_t K, int64_t n) {               \
    const int8_t *wr = w + n * K;                                                                              \
    __m512 acc[M];                                                                                             \
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                                                  \
    int64_t k = 0;                                                                                             \
    while (k + 32 <= K) {                                                                                      \
        int64_t end = k + INT8_CHUNK < K ? k + INT8_CHUNK : K;                                                 \
        __m512i part[M];                                                                                       \
        for (int m = 0; m < M; m++) part[m] = _mm512_setzero_si512();                                          \
        for (; k + 32 <= end; k += 32) {                                                                       \
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k)));                   \
            for (int m = 0; m < M; m++)                                                                        \
                part[m] = _mm512_dpwssd_epi32(part[m], wv, _mm512_loadu_si512((const void *)(xq + m * K + k)));\
        }                                                                                                      \
        for (int m = 0; m < M; m++) acc[m] = _mm512_add_ps(acc[m], _mm512_cvtepi32_ps(part[m]));               \
    }                                                                                                          \
    for (int m = 0; m < M; m++) {                                                                              \
        float s = _mm512_reduce_add_ps(acc[m]);                                                                \
        for (int64_t j = k; j < K; j++) s += (float)wr[j] * (float)xq[m * K + j];                              \
        s *= xs[m] * scale[n];                                                                                 \
        if (bias) s += bf16_to_f32(bias[n]);                                                                   \
        y[m * N + n] = f32_to_bf16(s);                                                                         \
    }                                                                                                          \
}

ROWS_FOR(1) ROWS_FOR(2) ROWS_FOR(3) ROWS_FOR(4) ROWS_FOR(5) ROWS_FOR(6) ROWS_FOR(7) ROWS_FOR(8)

typedef void (*rows_bf16_fn)(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t,
                             int64_t);
typedef void (*rows_int8_fn)(const int16_t *, const float *, const int8_t *, const float *, const uint16_t *,
                             uint16_t *, int64_t, int64_t, int64_t);
static const rows_bf16_fn ROWS_BF16[MAX_M + 1] = {0, rows_bf16_1, rows_bf16_2, rows_bf16_3, rows_bf16_4,
                                                  rows_bf16_5, rows_bf16_6, rows_bf16_7, rows_bf16_8};
static const rows_int8_fn ROWS_INT8[MAX_M + 1] = {0, rows_int8_1, rows_int8_2, rows_int8_3, rows_int8_4,
                                                  rows_int8_5, rows_int8_6, rows_int8_7, rows_int8_8};

/* y (M, N) bf16 = x (M, K) bf16 @ w (N, K)^T bf16 + bias (N,) bf16 or NULL; 1 <= M <= MAX_M. */
void gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
               int M, int64_t N, int64_t K, int threads) {
    rows_bf16_fn rows = ROWS_BF16[M];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) rows(x, w, bias, y, N, K, n);
}

/* y (M, N) bf16 = (x (M, K) bf16 @ w (N, K)^T int8) * scale (N,) + bias (N,) bf16 or NULL. x is first rounded to
 * int16 with one scale per row (symmetric: max |x| -> 32767). Returns 0, or -1 when out of memory. */
int gemv_int8(const uint16_t *x, const int8_t *w, const float *scale, const uint16_t *bias, uint16_t *y,
              int M, int64_t N, int64_t K, int threads) {
    int16_t *xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    float xs[MAX_M];
    if (!xq) return -1;
    for (int m = 0; m < M; m++) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) {
            float v = fabsf(bf16_to_f32(x[m * K + k]));
            amax = v > amax ? v : amax;
        }
        xs[m] = amax > 0.f ? amax / 32767.f : 1.f;
        float inv = 1.f / xs[m];
        for (int64_t k = 0; k < K; k++) xq[m * K + k] = (int16_t)nearbyintf(bf16_to_f32(x[m * K + k]) * inv);
    }
    rows_int8_fn rows = ROWS_INT8[M];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) rows(xq, xs, w, scale, bias, y, N, K, n);
    free(xq);
    return 0;
}

/* ------------------------------------------------------------------------------------------ RMSNorm */

/* y (M, K) bf16 = w * bf16(x * rsqrt(mean(x^2) + eps)), in fp32, rounded to bf16 where
 * r1kit.model.attention.RMSNorm rounds (the normalized x, then the product with the bf16 weight). One call for
 * what is eight tensor ops in PyTorch; at decode sizes those ops' dispatch costs more than their arithmetic. */
void rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * K;
        uint16_t *yr = y + m * K;
        float ss = 0.f;
        for (int64_t k = 0; k < K; k++) {
            float v = bf16_to_f32(xr[k]);
            ss += v * v;
        }
        float r = 1.f / sqrtf(ss / (float)K + eps);
        for (int64_t k = 0; k < K; k++)
            yr[k] = f32_to_bf16(bf16_to_f32(w[k]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[k]) * r)));
    }
}
