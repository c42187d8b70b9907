// Decode attention straight over the engine's paged KV pools: one query per sequence, its keys and values
// read from their slots in the pool's own dtype (fp32 or bf16), in fp32 arithmetic, nothing gathered, padded
// or cast on the way. Plain C that gcc vectorises for any x86-64 or arm64 CPU (no AVX-512 needed); OpenMP
// splits the (sequence, KV head) pairs among the threads.
//
// q      (B, H, D)             queries, the pools' dtype
// k_pool (num_slots, Hkv, D)   v_pool (num_slots, Hkv, Dv)
// slots  (B, S) int64          sequence b's context is slots[b, 0 .. lens[b] - 1], in position order
// lens   (B,) int64            1 <= lens[b] <= S
// out    (B, H, Dv)            the pools' dtype; query head h reads KV head h / (H / Hkv)
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (isnan(f)) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// row `index` (n values) of a fp32 or bf16 table as fp32: a pointer into the table, or `tmp` filled by conversion
static inline const float *row_f32(const void *base, int64_t index, int n, int bf16, float *tmp) {
    if (!bf16) return (const float *)base + index * n;
    const uint16_t *src = (const uint16_t *)base + index * n;
    for (int i = 0; i < n; i++) tmp[i] = bf16_to_f32(src[i]);
    return tmp;
}

static inline float dot(const float *a, const float *b, int n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

// one (sequence b, KV head kh): its G = H / Hkv query heads over its lens[b] context slots.
// work: G * D + G * S + G * Dv + max(D, Dv) floats of scratch
static void attend_one(const void *q, const void *k_pool, const void *v_pool, const int64_t *slots,
                       int64_t len, void *out, int b, int kh, int H, int Hkv, int D, int Dv, float scale,
                       int bf16, float *work, int S) {
    const int G = H / Hkv;
    float *qf = work, *scores = qf + G * D, *acc = scores + (int64_t)G * S, *tmp = acc + G * Dv;
    for (int g = 0; g < G; g++) {  // the queries in fp32, scaled once
        const float *src = row_f32(q, (int64_t)b * H + kh * G + g, D, bf16, tmp);
        for (int i = 0; i < D; i++) qf[g * D + i] = src[i] * scale;
    }
    for (int64_t t = 0; t < len; t++) {  // scores[g, t] = q_g . k_t
        const float *k = row_f32(k_pool, slots[t] * Hkv + kh, D, bf16, tmp);
        for (int g = 0; g < G; g++) scores[g * len + t] = dot(qf + g * D, k, D);
    }
    for (int g = 0; g < G; g++) {  // softmax over t, unnormalised (the sum divides the output)
        float *s = scores + g * len, m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        qf[g] = 1.f / sum;  // qf is free now: it holds each head's normaliser
    }
    memset(acc, 0, sizeof(float) * G * Dv);
    for (int64_t t = 0; t < len; t++) {  // acc[g] = sum_t p[g, t] v_t
        const float *v = row_f32(v_pool, slots[t] * Hkv + kh, Dv, bf16, tmp);
        for (int g = 0; g < G; g++) {
            const float p = scores[g * len + t];
            float *a = acc + g * Dv;
#pragma omp simd
            for (int i = 0; i < Dv; i++) a[i] += p * v[i];
        }
    }
    for (int g = 0; g < G; g++) {
        int64_t row = ((int64_t)b * H + kh * G + g) * Dv;
        for (int i = 0; i < Dv; i++) {
            float y = acc[g * Dv + i] * qf[g];
            if (bf16) ((uint16_t *)out)[row + i] = f32_to_bf16(y);
            else ((float *)out)[row + i] = y;
        }
    }
}

// returns 0; 1 when the scratch memory could not be allocated; 2 when a length is outside 1..S; 3 when a
// context slot is outside 0..num_slots - 1 (nothing is computed then)
int paged_decode_attention(const void *q, const void *k_pool, const void *v_pool, const int64_t *slots,
                           const int64_t *lens, void *out, int B, int S, int H, int Hkv, int D, int Dv,
                           float scale, int bf16, int nthreads, int64_t num_slots) {
    for (int b = 0; b < B; b++) {
        if (lens[b] < 1 || lens[b] > S) return 2;
        for (int64_t t = 0; t < lens[b]; t++)
            if (slots[(int64_t)b * S + t] < 0 || slots[(int64_t)b * S + t] >= num_slots) return 3;
    }
    const int G = H / Hkv, wide = D > Dv ? D : Dv;
    const int64_t work = (int64_t)G * D + (int64_t)G * S + (int64_t)G * Dv + wide;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && B * Hkv > 1)
    {
        float *scratch = malloc(sizeof(float) * work);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic)
        for (int b = 0; b < B; b++)
            for (int kh = 0; kh < Hkv; kh++)
                if (scratch)
                    attend_one(q, k_pool, v_pool, slots + (int64_t)b * S, lens[b], out, b, kh, H, Hkv, D, Dv,
                               scale, bf16, scratch, S);
        free(scratch);
    }
    return failed;
}
