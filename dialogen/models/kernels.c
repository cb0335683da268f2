/* Decode kernels for the transformer: quantized matrix products and one-token attention.
 *
 * Built on the user's machine at first use (models/kernels/library.py), with -march=native, so the AVX2
 * paths are taken where the CPU has them; every function has a plain C path too. Threads come from
 * OpenMP, the same libgomp torch has loaded, and the caller passes the thread count.
 *
 * Weights are kept in GGUF's block layouts, 32 weights a block along the input dimension:
 *   Q4_0  {f16 d; u8 qs[16]}          w = d * (q - 8)
 *   Q4_1  {f16 d; f16 m; u8 qs[16]}   w = d * q + m
 *   Q8_0  {f16 d; i8 qs[32]}          w = d * q
 * where byte j of qs holds weight j in its low nibble and weight j + 16 in its high nibble.
 * Activations are quantized per row to blocks of 32 int8 with a float scale (as llama.cpp does), so
 * a block's dot product is integer work: sum_j w_j x_j = d * dx * sum_j q_j xq_j (+ m * sum_j x_j).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32

/* A decode step reads each weight once, straight from memory, with little work per byte: the
 * hardware prefetcher alone leaves the memory bus idle between a row's loads. Each loop asks for the
 * bytes PREFETCH_AHEAD beyond the ones it is about to read. */
#define PREFETCH_AHEAD 2048
static inline void prefetch_span(const void *p, size_t bytes) {
    for (size_t l = 0; l < bytes; l += 64) __builtin_prefetch((const uint8_t *)p + PREFETCH_AHEAD + l);
}
enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
       Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30 };  /* GGUF's type numbers */
enum { ACT_NONE = 0, ACT_SWIGLU = 1 };
enum { OK = 0, OUT_OF_MEMORY = 1 };  /* what the exported products return */

/* Inside a parallel region: a thread's scratch allocation failed. The region's threads still meet at
 * every work-shared loop (they skip its work), and the exported call returns OUT_OF_MEMORY. */
static void set_failed(int *failed) {
    #pragma omp atomic write
    *failed = 1;
}

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

/* bytes and values of one block of a type the kernels multiply (0: not one of them) */
int block_bytes(int type) {
    switch (type) {
        case F16: case BF16: return 2;
        case Q4_0: case IQ4_NL: return 18;
        case Q4_1: return 20;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q8_0: return 34;
        case Q2_K: return 84;
        case Q3_K: return 110;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        case IQ4_XS: return 136;
        default: return 0;
    }
}

int block_values(int type) {
    switch (type) {
        case F16: case BF16: return 1;
        case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: case IQ4_XS: return 256;
        default: return block_bytes(type) ? 32 : 0;
    }
}

/* ---- activations: one row of K floats -> K/32 blocks (scale d, d * sum q, 32 int8) ---------- */
typedef struct { float d, s; int8_t q[QK]; } xblock;

static void quantize_row(const float *x, xblock *out, int K) {
    for (int b = 0; b < K / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) { float a = fabsf(v[j]); amax = a > amax ? a : amax; }
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) { int q = (int)lrintf(v[j] * inv); out[b].q[j] = (int8_t)q; sum += q; }
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

/* the input row a kernel multiplies: RMS-normalised (norm != NULL) or SwiGLU of [gate | up] */
static void prepare_row(const float *x, int K, const float *norm, float eps, int act, float *tmp) {
    if (act == ACT_SWIGLU) {  /* x holds 2K values: gate then up */
        for (int j = 0; j < K; j++) { float g = x[j]; tmp[j] = g / (1.f + expf(-g)) * x[K + j]; }
        return;
    }
    if (norm) {
        double ss = 0.0;
        for (int j = 0; j < K; j++) ss += (double)x[j] * x[j];
        float r = 1.f / sqrtf((float)(ss / K) + eps);
        for (int j = 0; j < K; j++) tmp[j] = x[j] * r * norm[j];
        return;
    }
    memcpy(tmp, x, sizeof(float) * K);
}

/* ---- one weight block times one activation block ------------------------------------------ */
#ifdef __AVX2__
static inline __m256i nibbles(const uint8_t *qs) {  /* 16 bytes -> 32 values 0..15 in order */
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
static inline __m256 dot_u8_i8(__m256i u, __m256i s) {  /* 8 int32 partial sums as floats */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#elif defined(__AVXVNNI__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s));
#else
    __m256i p = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}
static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

/* out[r] = W[n] . x[r] for RN rows of activations (RN a compile-time constant after inlining):
 * each weight block is unpacked once and multiplied with every row, accumulators in registers */
#ifdef __AVX2__
static inline __attribute__((always_inline)) void rows_dot(int type, const uint8_t *w, const xblock *x, int nb,
                                                           int xstride, float *out, const int RN) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 acc2[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float extra[4] = {0.f, 0.f, 0.f, 0.f}, extra2[4] = {0.f, 0.f, 0.f, 0.f};
    if (type == Q8_0) {
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = w + (size_t)b * 34;
            float d = half_to_float(*(const uint16_t *)blk);
            __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
            __m256i aq = _mm256_sign_epi8(q, q);
            for (int r = 0; r < RN; r++) {
                const xblock *xb = x + (size_t)r * xstride + b;
                __m256i xv = _mm256_loadu_si256((const __m256i *)xb->q);
                __m256 p = dot_u8_i8(aq, _mm256_sign_epi8(xv, q));
                __m256 s = _mm256_set1_ps(d * xb->d);
                if (b & 1) acc2[r] = _mm256_fmadd_ps(s, p, acc2[r]);
                else acc[r] = _mm256_fmadd_ps(s, p, acc[r]);
            }
        }
    } else {
        const int q41 = type == Q4_1, bb = q41 ? 20 : 18;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = w + (size_t)b * bb;
            float d = half_to_float(*(const uint16_t *)blk);
            float m = q41 ? half_to_float(*(const uint16_t *)(blk + 2)) : -8.f * d;
            __m256i q = nibbles(blk + (q41 ? 4 : 2));
            for (int r = 0; r < RN; r++) {
                const xblock *xb = x + (size_t)r * xstride + b;
                __m256i xv = _mm256_loadu_si256((const __m256i *)xb->q);
                __m256 p = dot_u8_i8(q, xv);
                __m256 s = _mm256_set1_ps(d * xb->d);
                if (b & 1) { acc2[r] = _mm256_fmadd_ps(s, p, acc2[r]); extra2[r] += m * xb->s; }
                else { acc[r] = _mm256_fmadd_ps(s, p, acc[r]); extra[r] += m * xb->s; }
            }
        }
    }
    for (int r = 0; r < RN; r++) out[r] = hsum(_mm256_add_ps(acc[r], acc2[r])) + extra[r] + extra2[r];
}
#endif

#ifdef __AVX2__
/* four consecutive weight rows of Q4_0/Q4_1 blocks times one activation row: each activation block
 * is loaded once for the four, and the four sums are independent chains */
static void dot_q4_4rows(int q41, const uint8_t *w, size_t row_bytes, const xblock *x, int nb, float *out) {
    const int bb = q41 ? 20 : 18, off = q41 ? 4 : 2;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float sm[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].q);
        float xd = x[b].d, xs = x[b].s;
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = w + r * row_bytes + (size_t)b * bb;
            if (!(b & 3)) prefetch_span(blk, 4 * bb);
            uint32_t hm;
            memcpy(&hm, blk, 4);
            __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)hm));
            float d = _mm_cvtss_f32(dm), m = q41 ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : -8.f * d;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd), dot_u8_i8(nibbles(blk + off), xv), acc[r]);
            sm[r] += m * xs;
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]) + sm[r];
}

/* the same for Q8_0 */
static void dot_q8_4rows(const uint8_t *w, size_t row_bytes, const xblock *x, int nb, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].q);
        float xd = x[b].d;
        for (int r = 0; r < 4; r++) {
            const uint8_t *blk = w + r * row_bytes + (size_t)b * 34;
            if (!(b & 1)) prefetch_span(blk, 2 * 34);
            __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
            __m256 p = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(*(const uint16_t *)blk) * xd), p, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]);
}
#endif


/* out[r] = W[n] . x[r] for rows r < R of a weight row of nb blocks */
static void row_dot(int type, const uint8_t *w, const xblock *x, int nb, int R, int xstride, float *out) {
#ifdef __AVX2__
    int r = 0;
    for (; r + 4 <= R; r += 4) rows_dot(type, w, x + (size_t)r * xstride, nb, xstride, out + r, 4);
    switch (R - r) {
        case 3: rows_dot(type, w, x + (size_t)r * xstride, nb, xstride, out + r, 3); break;
        case 2: rows_dot(type, w, x + (size_t)r * xstride, nb, xstride, out + r, 2); break;
        case 1: rows_dot(type, w, x + (size_t)r * xstride, nb, xstride, out + r, 1); break;
    }
#else
    for (int r = 0; r < R; r++) {
        float sum = 0.f;
        for (int b = 0; b < nb; b++) {
            const xblock *xb = x + (size_t)r * xstride + b;
            int isum = 0;
            if (type == Q8_0) {
                const uint8_t *blk = w + (size_t)b * 34;
                const int8_t *q = (const int8_t *)(blk + 2);
                for (int j = 0; j < QK; j++) isum += q[j] * xb->q[j];
                sum += half_to_float(*(const uint16_t *)blk) * xb->d * isum;
            } else {
                int q41 = type == Q4_1;
                const uint8_t *blk = w + (size_t)b * (q41 ? 20 : 18);
                const uint8_t *qs = blk + (q41 ? 4 : 2);
                float d = half_to_float(*(const uint16_t *)blk);
                float m = q41 ? half_to_float(*(const uint16_t *)(blk + 2)) : -8.f * d;
                for (int j = 0; j < 16; j++) isum += (qs[j] & 15) * xb->q[j] + (qs[j] >> 4) * xb->q[j + 16];
                sum += d * xb->d * isum + m * xb->s;
            }
        }
        out[r] = sum;
    }
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* AVX-512: two blocks a step. Each activation row is laid out in pairs of blocks as
 * [x0[0:16], x1[0:16], x0[16:32], x1[16:32]] (64 int8), matching how two blocks' nibbles unpack,
 * with the blocks' scales (d) and scaled sums (s) in plain float arrays. */
#define PAIRS 1
typedef struct { int8_t *q; float *d, *s; } xpairs;

static void make_pairs(const xblock *x, int nb, xpairs p) {
    for (int b = 0; b + 2 <= nb; b += 2) {
        int8_t *o = p.q + (size_t)b * QK;
        memcpy(o, x[b].q, 16);
        memcpy(o + 16, x[b + 1].q, 16);
        memcpy(o + 32, x[b].q + 16, 16);
        memcpy(o + 48, x[b + 1].q + 16, 16);
    }
    for (int b = 0; b < nb; b++) { p.d[b] = x[b].d; p.s[b] = x[b].s; }
}

static inline __m512 pair_scales(__m128 s) {  /* [s0, s1, ..] -> s0 in lanes 0-3 and 8-11, s1 in 4-7, 12-15 */
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}

/* out[r] = W[n] . x[r] for RN (1..8) rows, two blocks a step; xb/xstride: the rows as xblocks (odd tail) */
static inline __attribute__((always_inline)) void pairs_dot(int type, const uint8_t *w, const xpairs *x,
                                                            const xblock *xb, int xstride, int nb, float *out,
                                                            const int RN) {
    const int q41 = type == Q4_1, bb = block_bytes(type), off = q41 ? 4 : 2;
    const __m256i mask = _mm256_set1_epi8(0x0f);
    __m512 acc[8];
    __m128 macc[8];
    for (int r = 0; r < RN; r++) { acc[r] = _mm512_setzero_ps(); macc[r] = _mm_setzero_ps(); }
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *b0 = w + (size_t)b * bb, *b1 = b0 + bb;
        __m512i q;
        __m128 d, m = _mm_setzero_ps();
        if (type == Q8_0) {
            __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                           _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
            q = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));  /* the pair order of x */
            d = _mm_set_ps(0.f, 0.f, half_to_float(*(const uint16_t *)b1), half_to_float(*(const uint16_t *)b0));
        } else {
            __m256i t = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(b1 + off)),
                                         _mm_loadu_si128((const __m128i *)(b0 + off)));
            __m256i lo = _mm256_and_si256(t, mask), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), mask);
            q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  /* [lo0, lo1, hi0, hi1] */
            uint32_t h0, h1;
            memcpy(&h0, b0, 4);
            memcpy(&h1, b1, 4);
            __m128 dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)h1, (int)h0));  /* [d0, m0, d1, m1] */
            d = _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(2, 0, 2, 0));
            m = q41 ? _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 1, 3, 1)) : _mm_mul_ps(d, _mm_set1_ps(-8.f));
        }
        __m512i uq = type == Q8_0 ? _mm512_abs_epi8(q) : q;
        __mmask64 neg = type == Q8_0 ? _mm512_movepi8_mask(q) : 0;
        for (int r = 0; r < RN; r++) {
            __m512i xv = _mm512_loadu_si512(x[r].q + (size_t)b * QK);
            if (type == Q8_0) xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);  /* x * sign(q) */
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uq, xv);
            __m128 xd = _mm_castpd_ps(_mm_load_sd((const double *)(x[r].d + b)));
            acc[r] = _mm512_fmadd_ps(pair_scales(_mm_mul_ps(d, xd)), _mm512_cvtepi32_ps(p), acc[r]);
            if (type != Q8_0) macc[r] = _mm_fmadd_ps(m, _mm_castpd_ps(_mm_load_sd((const double *)(x[r].s + b))), macc[r]);
        }
    }
    for (int r = 0; r < RN; r++) {
        float tail = 0.f;
        if (b < nb) rows_dot(type, w + (size_t)b * bb, xb + (size_t)r * xstride + b, 1, 1, &tail, 1);
        out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(macc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(macc[r])) + tail;
    }
}
#endif


/* ---- tiled weights, for many activation rows (AVX-512 VNNI) ---------------------------------
 * The GGUF layout keeps each output row's blocks together, so a product takes one weight row at
 * a time. Tiled, 16 output rows go together: for each group of 16 rows and each block, chunk j
 * (64 bytes) holds 4 bytes of every row: Q4_0/Q4_1 chunk j (0..3) the bytes qs[4j..4j+3] (weights
 * 4j..4j+3 in the low nibbles, 16+4j..16+4j+3 in the high), Q8_0 chunk j (0..7) the int8 weights
 * 4j..4j+3. Then the 16 scales d (f16), then (Q4_1) 16 minimums m (f16) or (Q8_0) 16 sums of the
 * weights (int16); Q4_0 has no more, so its tiles take exactly the blocks' bytes. One multiply-add
 * instruction then multiplies 4 weights of 16 rows by the same 4 activations, and the scales apply
 * to 16 rows at once. The values are the same as the blocks'; only their order differs, and a
 * tiled weight is the only copy a model keeps (`dequantize` reads it back). */
#define TILED 0x100  /* or-ed into a type: the weights are tiled */
#define TILE 16

static size_t tile_block_bytes(int type) { return type == Q8_0 ? 8 * 64 + 64 : type == Q4_1 ? 4 * 64 + 64 : 4 * 64 + 32; }

/* bytes of the tiled copy of (N, K) weights, or 0 when this build or shape has none */
size_t tiled_bytes(int type, int N, int K) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (N % TILE || K % QK || !(type == Q4_0 || type == Q4_1 || type == Q8_0)) return 0;
    return (size_t)(N / TILE) * (K / QK) * tile_block_bytes(type);
#else
    (void)type; (void)N; (void)K;
    return 0;
#endif
}

void tile_weights(int type, const uint8_t *w, int N, int K, uint8_t *out, int threads) {
    int nb = K / QK, bb = block_bytes(type), chunks = type == Q8_0 ? 8 : 4, off = type == Q4_1 ? 4 : 2;
    size_t tb = tile_block_bytes(type);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < N / TILE; g++)
        for (int b = 0; b < nb; b++) {
            uint8_t *o = out + ((size_t)g * nb + b) * tb;
            uint16_t *d = (uint16_t *)(o + chunks * 64), *m = d + TILE;
            for (int r = 0; r < TILE; r++) {
                const uint8_t *blk = w + ((size_t)(g * TILE + r) * nb + b) * bb;
                for (int j = 0; j < chunks; j++) memcpy(o + j * 64 + r * 4, blk + off + 4 * j, 4);
                memcpy(d + r, blk, 2);
                if (type == Q4_1) memcpy(m + r, blk + 2, 2);
                else if (type == Q8_0) {
                    int sum = 0;
                    for (int j = 0; j < QK; j++) sum += (int8_t)blk[2 + j];
                    int16_t s16 = (int16_t)sum;
                    memcpy(m + r, &s16, 2);
                }
            }
        }
}

/* block b of row r (0..15) of a tiled group `t` back in GGUF's block layout (into blk) */
static void untile_block(int type, const uint8_t *t, int b, int r, uint8_t *blk) {
    const uint8_t *o = t + (size_t)b * tile_block_bytes(type);
    int chunks = type == Q8_0 ? 8 : 4, off = type == Q4_1 ? 4 : 2;
    const uint16_t *d = (const uint16_t *)(o + chunks * 64);
    for (int j = 0; j < chunks; j++) memcpy(blk + off + 4 * j, o + j * 64 + r * 4, 4);
    memcpy(blk, d + r, 2);
    if (type == Q4_1) memcpy(blk + 2, d + TILE + r, 2);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* out[r * 16 + i] = W[16 g + i] . x[r] for RN (1..8) activation rows; wg: group g's tiled blocks.
 * xs: the rows as blocks (Q4), or (Q8_0) with their int8 values offset by 128 (unsigned), whose
 * extra 128 * sum(w) is taken off again. */
static inline __attribute__((always_inline)) void tile_dot(int type, const uint8_t *wg, const xblock *xs, int nb,
                                                           float *out, const int RN) {
    const size_t tb = tile_block_bytes(type);
    const int chunks = type == Q8_0 ? 8 : 4;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[8];
    for (int r = 0; r < RN; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *t = wg + (size_t)b * tb;
        prefetch_span(t, tb);
        __m512i wq[8];
        if (type == Q8_0) {
            for (int j = 0; j < 8; j++) wq[j] = _mm512_loadu_si512(t + 64 * j);
        } else {
            for (int j = 0; j < 4; j++) {
                __m512i v = _mm512_loadu_si512(t + 64 * j);
                wq[j] = _mm512_and_si512(v, low);
                wq[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        }
        const uint8_t *tail = t + chunks * 64;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tail));
        __m512 m = _mm512_setzero_ps();
        __m512i bias = _mm512_setzero_si512();
        if (type == Q4_1) m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tail + 32)));
        else if (type == Q4_0) m = _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
        else bias = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(tail + 32))), 7);
        for (int r = 0; r < RN; r++) {
            const xblock *xb = xs + (size_t)r * nb + b;
            const int32_t *xq = (const int32_t *)xb->q;
            __m512i s = _mm512_setzero_si512();
            if (type == Q8_0) {
                for (int j = 0; j < 8; j++) s = _mm512_dpbusd_epi32(s, _mm512_set1_epi32(xq[j]), wq[j]);
                s = _mm512_sub_epi32(s, bias);
            } else {
                for (int j = 0; j < 8; j++) s = _mm512_dpbusd_epi32(s, wq[j], _mm512_set1_epi32(xq[j]));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), d), _mm512_set1_ps(xb->d), acc[r]);
            if (type != Q8_0) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xb->s), acc[r]);
        }
    }
    for (int r = 0; r < RN; r++) _mm512_storeu_ps(out + r * TILE, acc[r]);
}

#endif

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
/* the same in plain C, for a build without AVX-512 VNNI handed tiled weights (the tests do) */
static void tile_dot_plain(int type, const uint8_t *wg, const xblock *xs, int nb, float *out, int RN) {
    const size_t tb = tile_block_bytes(type);
    const int chunks = type == Q8_0 ? 8 : 4;
    for (int r = 0; r < RN; r++)
        for (int i = 0; i < TILE; i++) {
            float sum = 0.f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *t = wg + (size_t)b * tb;
                const uint16_t *dm = (const uint16_t *)(t + chunks * 64);
                const xblock *xb = xs + (size_t)r * nb + b;
                int isum = 0;
                for (int j = 0; j < chunks; j++)
                    for (int k = 0; k < 4; k++) {
                        uint8_t v = t[j * 64 + i * 4 + k];
                        if (type == Q8_0) isum += ((uint8_t)xb->q[4 * j + k]) * (int8_t)v;
                        else isum += (v & 15) * xb->q[4 * j + k] + (v >> 4) * xb->q[16 + 4 * j + k];
                    }
                float d = half_to_float(dm[i]);
                if (type == Q8_0) {
                    int16_t ws;
                    memcpy(&ws, dm + TILE + i, 2);
                    sum += d * xb->d * (float)(isum - 128 * ws);
                } else {
                    float m = type == Q4_1 ? half_to_float(dm[TILE + i]) : -8.f * d;
                    sum += d * xb->d * (float)isum + m * xb->s;
                }
            }
            out[r * TILE + i] = sum;
        }
}
#endif

/* y (R, N) (+)= xq (R, K) @ W^T + bias, W tiled */
static void tiled_matmul(int type, const uint8_t *w, int N, int K, const xblock *xq, int R, float *y,
                         const float *bias, int accumulate, int *failed) {
    int nb = K / QK;
    size_t group_bytes = (size_t)nb * tile_block_bytes(type);
    const xblock *xs = xq;
    xblock *flipped = NULL;
    if (type == Q8_0) {  /* the activations as unsigned bytes: q + 128 */
        flipped = malloc(sizeof(xblock) * (size_t)R * nb);
        if (!flipped) set_failed(failed);
        for (size_t i = 0; flipped && i < (size_t)R * nb; i++) {
            flipped[i] = xq[i];
            for (int j = 0; j < QK; j++) flipped[i].q[j] = (int8_t)((uint8_t)xq[i].q[j] ^ 0x80);
        }
        xs = flipped;
    }
    float out[8 * TILE];
    #pragma omp for schedule(static)
    for (int g = 0; g < N / TILE; g++) {
        if (type == Q8_0 && !flipped) continue;
        const uint8_t *wg = w + (size_t)g * group_bytes;
        for (int r0 = 0; r0 < R; r0 += 8) {
            int rn = R - r0 < 8 ? R - r0 : 8;
            const xblock *xr = xs + (size_t)r0 * nb;
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
            tile_dot_plain(type, wg, xr, nb, out, rn);
#else
            switch (rn) {  /* a constant row count per case: the accumulators stay in registers */
                case 8: tile_dot(type, wg, xr, nb, out, 8); break;
                case 7: tile_dot(type, wg, xr, nb, out, 7); break;
                case 6: tile_dot(type, wg, xr, nb, out, 6); break;
                case 5: tile_dot(type, wg, xr, nb, out, 5); break;
                case 4: tile_dot(type, wg, xr, nb, out, 4); break;
                case 3: tile_dot(type, wg, xr, nb, out, 3); break;
                case 2: tile_dot(type, wg, xr, nb, out, 2); break;
                default: tile_dot(type, wg, xr, nb, out, 1); break;
            }
#endif
            for (int r = 0; r < rn; r++)
                for (int i = 0; i < TILE; i++) {
                    int n = g * TILE + i;
                    float v = out[r * TILE + i] + (bias ? bias[n] : 0.f);
                    float *dst = y + (size_t)(r0 + r) * N + n;
                    *dst = accumulate ? *dst + v : v;
                }
        }
    }
    free(flipped);
}

/* the other GGUF formats: one translation unit with the helpers above */
#include "kquants.c"
#include "kquants_dot.c"
#include "kquants_matmul.c"

/* The phases below are work-shared loops (orphaned `omp for`): called by every thread of a parallel
 * region, each does its share and waits for the others at the end. `qmatmul` runs two of them in a
 * region; `block_decode` runs a whole transformer block in one region. */

/* xq (R, K/32) = quantize(prepare(x)); x is (R, K), or (R, 2K) for SwiGLU; tmp is (R, K) scratch */
static void phase_quantize(const float *x, int R, int K, const float *norm, float eps, int act, float *tmp,
                           xblock *xq) {
    int xin = act == ACT_SWIGLU ? 2 * K : K;
    #pragma omp for schedule(static)
    for (int r = 0; r < R; r++) {
        prepare_row(x + (size_t)r * xin, K, norm, eps, act, tmp + (size_t)r * K);
        quantize_row(tmp + (size_t)r * K, xq + (size_t)r * (K / QK), K);
    }
}

/* y (R, N) (+)= xq (R, K) @ W (N, K)^T + bias; xf: the same rows in float (R, K), which F16/BF16 weights
 * take; *failed is set when a scratch allocation fails */
static void phase_matmul(int type, const uint8_t *w, int N, int K, const xblock *xq, const float *xf, int R,
                         float *y, const float *bias, int accumulate, int *failed) {
    if (type == F16 || type == BF16) {
        float_matmul(type, (const uint16_t *)w, N, K, xf, R, y, bias, accumulate);
        return;
    }
    if (unit_format(type)) {
        units_matmul(type, w, N, K, xq, R, y, bias, accumulate, failed);
        return;
    }
    if (type & TILED) {
        tiled_matmul(type & ~TILED, w, N, K, xq, R, y, bias, accumulate, failed);
        return;
    }
    int nb = K / QK, bb = block_bytes(type);
    float out[64];
#ifdef PAIRS
    {  /* two blocks a step, up to eight activation rows at a time */
        size_t row_bytes = (size_t)nb * bb, qbytes = (size_t)nb * QK;
        char *buf = malloc((size_t)R * (qbytes + 2 * sizeof(float) * nb));
        xpairs *px = malloc(sizeof(xpairs) * R);
        int ok = buf && px;
        if (!ok) set_failed(failed);
        for (int r = 0; ok && r < R; r++) {
            char *at = buf + (size_t)r * (qbytes + 2 * sizeof(float) * nb);
            px[r] = (xpairs){(int8_t *)at, (float *)(at + qbytes), (float *)(at + qbytes) + nb};
            make_pairs(xq + (size_t)r * nb, nb, px[r]);
        }
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!ok) continue;
            const uint8_t *wn = w + (size_t)n * row_bytes;
            for (int r0 = 0; r0 < R; r0 += 8) {
                int rn = R - r0 < 8 ? R - r0 : 8;
                const xpairs *xr = px + r0;
                const xblock *xbr = xq + (size_t)r0 * nb;
                switch (rn) {  /* a constant row count per case: the accumulators stay in registers */
                    case 8: pairs_dot(type, wn, xr, xbr, nb, nb, out, 8); break;
                    case 7: pairs_dot(type, wn, xr, xbr, nb, nb, out, 7); break;
                    case 6: pairs_dot(type, wn, xr, xbr, nb, nb, out, 6); break;
                    case 5: pairs_dot(type, wn, xr, xbr, nb, nb, out, 5); break;
                    case 4: pairs_dot(type, wn, xr, xbr, nb, nb, out, 4); break;
                    case 3: pairs_dot(type, wn, xr, xbr, nb, nb, out, 3); break;
                    case 2: pairs_dot(type, wn, xr, xbr, nb, nb, out, 2); break;
                    default: pairs_dot(type, wn, xr, xbr, nb, nb, out, 1); break;
                }
                for (int r = 0; r < rn; r++) {
                    float v = out[r] + (bias ? bias[n] : 0.f);
                    float *dst = y + (size_t)(r0 + r) * N + n;
                    *dst = accumulate ? *dst + v : v;
                }
            }
        }
        free(px);
        free(buf);
        return;
    }
#endif
#ifdef __AVX2__
    if (R == 1 && N % 4 == 0) {  /* a decode step of one row: four weight rows at a time */
        size_t row_bytes = (size_t)nb * bb;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n += 4) {
            const uint8_t *wn = w + (size_t)n * row_bytes;
            if (type == Q8_0) dot_q8_4rows(wn, row_bytes, xq, nb, out);
            else dot_q4_4rows(type == Q4_1, wn, row_bytes, xq, nb, out);
            for (int r = 0; r < 4; r++) {
                float v = out[r] + (bias ? bias[n + r] : 0.f);
                y[n + r] = accumulate ? y[n + r] + v : v;
            }
        }
        return;
    }
#endif
    #pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int r0 = 0; r0 < R; r0 += 64) {
            int rn = R - r0 < 64 ? R - r0 : 64;
            row_dot(type, w + (size_t)n * nb * bb, xq + (size_t)r0 * nb, nb, rn, nb, out);
            for (int r = 0; r < rn; r++) {
                float v = out[r] + (bias ? bias[n] : 0.f);
                float *dst = y + (size_t)(r0 + r) * N + n;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
}

/* y (R, N) = prepare(x) (R, K) @ W (N, K)^T + bias, added to what y holds when accumulate is set.
 * x is (R, K), or (R, 2K) for SwiGLU. */
int qmatmul(int type, const uint8_t *w, int N, int K, const float *x, int R, float *y,
            const float *bias, int accumulate, const float *norm, float eps, int act, int threads) {
    xblock *xq = malloc(sizeof(xblock) * (size_t)R * (K / QK));
    float *tmp = malloc(sizeof(float) * (size_t)R * K);
    int failed = !xq || !tmp;
    if (!failed) {
        #pragma omp parallel num_threads(threads)
        {
            phase_quantize(x, R, K, norm, eps, act, tmp, xq);
            phase_matmul(type, w, N, K, xq, tmp, R, y, bias, accumulate, &failed);
        }
    }
    free(xq);
    free(tmp);
    return failed ? OUT_OF_MEMORY : OK;
}

/* Row n of W (N, K) in blocks of `type` (tiled when `tiled`) -> float32 o (K) */
static void dequantize_one(int type, int tiled, const uint8_t *w, int n, int K, float *o) {
    if (type == F16 || type == BF16 || unit_format(type)) {
        dequantize_row(type, w + (size_t)n * (K / block_values(type)) * block_bytes(type), K, o);
        return;
    }
    int nb = K / QK, bb = block_bytes(type);
    uint8_t copy[34];
    for (int b = 0; b < nb; b++, o += QK) {
        const uint8_t *blk = w + ((size_t)n * nb + b) * bb;
        if (tiled) {  /* the block gathered from its group's tile */
            untile_block(type, w + (size_t)(n / TILE) * nb * tile_block_bytes(type), b, n % TILE, copy);
            blk = copy;
        }
        float d = half_to_float(*(const uint16_t *)blk);
        if (type == Q8_0) {
            const int8_t *q = (const int8_t *)(blk + 2);
            for (int j = 0; j < QK; j++) o[j] = d * q[j];
        } else {
            int q41 = type == Q4_1;
            float m = q41 ? half_to_float(*(const uint16_t *)(blk + 2)) : -8.f * d;
            const uint8_t *qs = blk + (q41 ? 4 : 2);
#ifdef __AVX2__
            const __m128i q = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(15);
            const __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);  /* d * q + m rounded twice, as below */
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]))), vm));
#else
            for (int j = 0; j < 16; j++) { o[j] = d * (qs[j] & 15) + m; o[j + 16] = d * (qs[j] >> 4) + m; }
#endif
        }
    }
}

/* W (N, K) in blocks (or tiled: TILED in type) -> float32 (N, K) */
void dequantize(int type, const uint8_t *w, int N, int K, float *out, int threads) {
    int tiled = type & TILED;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) dequantize_one(type & ~TILED, tiled, w, n, K, out + (size_t)n * K);
}

/* float32 -> bfloat16, rounded to nearest even (a NaN to 0x7fc0): torch's own conversion, bit for bit */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* W (N, K) as dequantize reads it -> bfloat16 (N, K), a row at a time through a float32 row that
 * stays in cache (the compute dtype of a LoRA run on a blocked base) */
int dequantize_bf16(int type, const uint8_t *w, int N, int K, uint16_t *out, int threads) {
    int tiled = type & TILED, failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *row = malloc(sizeof(float) * (size_t)K);
        if (!row) set_failed(&failed);
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!row) continue;
            dequantize_one(type & ~TILED, tiled, w, n, K, row);
            uint16_t *o = out + (size_t)n * K;
            for (int j = 0; j < K; j++) o[j] = to_bf16(row[j]);
        }
        free(row);
    }
    return failed ? OUT_OF_MEMORY : OK;
}

static inline float dot(const float *a, const float *b, int n) {
    int j = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    s = hsum(_mm256_add_ps(s0, s1));
#endif
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* ---- one new token per row against its own KV cache ---------------------------------------
 * qkv (B, (nh + 2 nkv) hd): this step's projections. Row b's cache of this layer starts at
 * kc[b] / vc[b], laid out (nkv, cap[b], hd); the new key and value go to slot[b], and the query
 * attends to slots 0..slot[b] whose key_mask byte is set (key_mask NULL: all of them). Rotary
 * embeddings (rotate-half convention) use cos/sin (B, hd/2) when cos is not NULL.
 * out (B, nh * hd). */
typedef struct {
    int B, nh, nkv, hd;
    const int64_t *kc, *vc, *cap, *slot;
    const uint8_t *key_mask;
    int64_t mask_stride;
    const float *cos, *sin;
    int *failed;  /* set when a thread's scratch allocation fails */
} attn_args;

static void phase_rope_store(const attn_args *a, float *qkv) {  /* rotary on q and k; k, v into the cache */
    int half = a->hd / 2, hd = a->hd, width = (a->nh + 2 * a->nkv) * hd;
    #pragma omp for schedule(static)
    for (int b = 0; b < a->B; b++) {
        float *row = qkv + (size_t)b * width;
        if (a->cos) {
            const float *c = a->cos + (size_t)b * half, *s = a->sin + (size_t)b * half;
            for (int h = 0; h < a->nh + a->nkv; h++) {
                float *v = row + h * hd;
                for (int j = 0; j < half; j++) {
                    float x1 = v[j], x2 = v[j + half];
                    v[j] = x1 * c[j] - x2 * s[j];
                    v[j + half] = x2 * c[j] + x1 * s[j];
                }
            }
        }
        for (int g = 0; g < a->nkv; g++) {
            size_t at = ((size_t)g * a->cap[b] + a->slot[b]) * hd;
            memcpy((float *)a->kc[b] + at, row + (a->nh + g) * hd, sizeof(float) * hd);
            memcpy((float *)a->vc[b] + at, row + (a->nh + a->nkv + g) * hd, sizeof(float) * hd);
        }
    }
}

#ifdef __AVX512F__
/* e^x for x <= 0 (scores less their maximum), 16 at a time: 2^(x log2 e) as 2^n 2^f, |f| <= 1/2,
 * 2^f by its Taylor polynomial of degree 7 (relative error under 1e-8, below float rounding) */
static inline __m512 exp_neg16(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(t, n);
    static const float c[8] = {1.f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                               0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f,
                               1.525273380405984e-05f};
    __m512 y = _mm512_set1_ps(c[7]);
    for (int k = 6; k >= 0; k--) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(c[k]));
    return _mm512_scalef_ps(y, n);
}

/* nq query heads of one row that share a key/value head (hd a multiple of 16 up to 128, nq * hd / 16 <= 16)
 * against its n keys and values: each key and value is loaded once for all nq heads (the cache is
 * read once per key/value head, not once per query head). Scores, then their exponentials 16 at
 * a time, then the weighted sums, kept in registers. p: nq rows of at least n + 16 floats. */
static void attend_heads16(const float *q, int nq, const float *K, const float *V, const uint8_t *m, int n, int hd,
                           float scale, float *p, size_t pstride, float *o) {
    const int nv = hd / 16;
    __m512 ov[16];
    float best[16];
    for (int r = 0; r < nq; r++) best[r] = -INFINITY;
    for (int i = 0; i < nq * nv; i++) ov[i] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        if (m && !m[t] && t != n - 1) {
            for (int r = 0; r < nq; r++) p[r * pstride + t] = -INFINITY;
            continue;
        }
        const float *k = K + (size_t)t * hd;
        __m512 kv[8];
        for (int i = 0; i < nv; i++) kv[i] = _mm512_loadu_ps(k + 16 * i);
        for (int r = 0; r < nq; r++) {
            const float *qr = q + (size_t)r * hd;
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qr), kv[0]);
            for (int i = 1; i < nv; i++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * i), kv[i], acc);
            float sc = _mm512_reduce_add_ps(acc) * scale;
            p[r * pstride + t] = sc;
            best[r] = sc > best[r] ? sc : best[r];
        }
    }
    float total[16];
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < nq; r++) {
        float *pr = p + r * pstride;
        __m512 vb = _mm512_set1_ps(best[r]), vsum = _mm512_setzero_ps();
        for (int t = 0; t < n; t += 16) {
            __mmask16 in = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
            __m512 x = _mm512_mask_loadu_ps(ninf, in, pr + t);
            __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);  /* masked keys weigh exactly 0 */
            __m512 e = _mm512_maskz_mov_ps(live, exp_neg16(_mm512_sub_ps(x, vb)));
            _mm512_mask_storeu_ps(pr + t, in, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        total[r] = _mm512_reduce_add_ps(vsum);
    }
    for (int t = 0; t < n; t++) {
        const float *v = V + (size_t)t * hd;
        __m512 vv[8];
        for (int i = 0; i < nv; i++) vv[i] = _mm512_loadu_ps(v + 16 * i);
        for (int r = 0; r < nq; r++) {
            __m512 w = _mm512_set1_ps(p[r * pstride + t]);
            for (int i = 0; i < nv; i++) ov[r * nv + i] = _mm512_fmadd_ps(w, vv[i], ov[r * nv + i]);
        }
    }
    for (int r = 0; r < nq; r++) {
        __m512 inv = _mm512_set1_ps(1.f / total[r]);
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(o + (size_t)r * hd + 16 * i, _mm512_mul_ps(ov[r * nv + i], inv));
    }
}
#endif

static void phase_attend(const attn_args *a, const float *qkv, float *out) {
    int hd = a->hd, nh = a->nh, group = a->nh / a->nkv, width = (a->nh + 2 * a->nkv) * hd;
    float scale = 1.f / sqrtf((float)hd), *p = NULL;
    int room = 0;
#ifdef __AVX512F__
    /* the query heads of a key/value head together, as many as fit the registers */
    int per = hd % 16 == 0 && hd <= 128 ? 16 / (hd / 16) : 0;  /* kv[8], vv[8]: hd <= 128 */
    per = per > group ? group : per;
    if (per > 0 && group % per == 0) {
        int parts = group / per;
        #pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < a->B * a->nkv * parts; item++) {
            int b = item / (a->nkv * parts), g = item / parts % a->nkv, h = g * group + item % parts * per;
            int n = (int)a->slot[b] + 1;
            if (n > room) { free(p); room = n > 2 * room ? n : 2 * room; p = malloc(sizeof(float) * (room + 16) * per); }
            if (!p) { room = 0; set_failed(a->failed); continue; }
            attend_heads16(qkv + (size_t)b * width + h * hd, per, (const float *)a->kc[b] + (size_t)g * a->cap[b] * hd,
                           (const float *)a->vc[b] + (size_t)g * a->cap[b] * hd,
                           a->key_mask ? a->key_mask + (size_t)b * a->mask_stride : NULL, n, hd, scale, p,
                           (size_t)room + 16, out + (size_t)b * nh * hd + h * hd);
        }
        free(p);
        return;
    }
#endif
    #pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < a->B * nh; bh++) {
        int b = bh / nh, h = bh % nh, g = h / group;
        int n = (int)a->slot[b] + 1;
        if (n > room) { free(p); room = n > 2 * room ? n : 2 * room; p = malloc(sizeof(float) * room); }
        if (!p) { room = 0; set_failed(a->failed); continue; }
        const float *q = qkv + (size_t)b * width + h * hd;
        const float *K = (const float *)a->kc[b] + (size_t)g * a->cap[b] * hd;
        const float *V = (const float *)a->vc[b] + (size_t)g * a->cap[b] * hd;
        const uint8_t *m = a->key_mask ? a->key_mask + (size_t)b * a->mask_stride : NULL;
        float best = -INFINITY;
        for (int t = 0; t < n; t++) {
            if (m && !m[t] && t != n - 1) { p[t] = -INFINITY; continue; }
            p[t] = dot(q, K + (size_t)t * hd, hd) * scale;
            best = p[t] > best ? p[t] : best;
        }
        float total = 0.f;
        for (int t = 0; t < n; t++) { p[t] = p[t] == -INFINITY ? 0.f : expf(p[t] - best); total += p[t]; }
        float *o = out + (size_t)b * nh * hd + h * hd, inv = 1.f / total;
        for (int j = 0; j < hd; j++) o[j] = 0.f;
        for (int t = 0; t < n; t++) {
            float w = p[t] * inv;
            if (w == 0.f) continue;
            const float *v = V + (size_t)t * hd;
            for (int j = 0; j < hd; j++) o[j] += w * v[j];
        }
    }
    free(p);
}

int attend_decode(int B, int nh, int nkv, int hd, float *qkv, const int64_t *kc, const int64_t *vc,
                  const int64_t *cap, const int64_t *slot, const uint8_t *key_mask, int64_t mask_stride,
                  const float *cos, const float *sin, float *out, int threads) {
    int failed = 0;
    attn_args a = {B, nh, nkv, hd, kc, vc, cap, slot, key_mask, mask_stride, cos, sin, &failed};
    #pragma omp parallel num_threads(threads)
    {
        phase_rope_store(&a, qkv);
        phase_attend(&a, qkv, out);
    }
    return failed ? OUT_OF_MEMORY : OK;
}

/* ---- a whole llama block for one new token per row, in one parallel region -------------------
 * x (B, d) is the residual stream, updated in place:
 *   x += o_proj(attention(rope(qkv(rmsnorm1(x)))));  x += down(swiglu(gate_up(rmsnorm2(x)))) */
typedef struct {
    int d, nh, nkv, hd, ff;
    float eps;
    const float *norm1, *norm2, *qkv_bias;
    int qkv_type, o_type, gate_up_type, down_type;
    const uint8_t *qkv, *o, *gate_up, *down;
} block_weights;

int block_decode(const block_weights *W, float *x, int B, const int64_t *kc, const int64_t *vc,
                 const int64_t *cap, const int64_t *slot, const uint8_t *key_mask, int64_t mask_stride,
                 const float *cos, const float *sin, int threads) {
    int d = W->d, width = (W->nh + 2 * W->nkv) * W->hd, att = W->nh * W->hd, ff = W->ff;
    int widest = ff > d ? (ff > att ? ff : att) : (d > att ? d : att);
    int failed = 0;
    attn_args a = {B, W->nh, W->nkv, W->hd, kc, vc, cap, slot, key_mask, mask_stride, cos, sin, &failed};
    float *qkv = malloc(sizeof(float) * (size_t)B * width), *y = malloc(sizeof(float) * (size_t)B * att);
    float *h = malloc(sizeof(float) * (size_t)B * 2 * ff), *tmp = malloc(sizeof(float) * (size_t)B * widest);
    xblock *xq = malloc(sizeof(xblock) * (size_t)B * (widest / QK));
    if (!qkv || !y || !h || !tmp || !xq) {
        free(qkv); free(y); free(h); free(tmp); free(xq);
        return OUT_OF_MEMORY;
    }
    #pragma omp parallel num_threads(threads)
    {
        phase_quantize(x, B, d, W->norm1, W->eps, ACT_NONE, tmp, xq);
        phase_matmul(W->qkv_type, W->qkv, width, d, xq, tmp, B, qkv, W->qkv_bias, 0, &failed);
        phase_rope_store(&a, qkv);
        phase_attend(&a, qkv, y);
        phase_quantize(y, B, att, NULL, 0.f, ACT_NONE, tmp, xq);
        phase_matmul(W->o_type, W->o, d, att, xq, tmp, B, x, NULL, 1, &failed);
        phase_quantize(x, B, d, W->norm2, W->eps, ACT_NONE, tmp, xq);
        phase_matmul(W->gate_up_type, W->gate_up, 2 * ff, d, xq, tmp, B, h, NULL, 0, &failed);
        phase_quantize(h, B, ff, NULL, 0.f, ACT_SWIGLU, tmp, xq);
        phase_matmul(W->down_type, W->down, d, ff, xq, tmp, B, x, NULL, 1, &failed);
    }
    free(qkv); free(y); free(h); free(tmp); free(xq);
    return failed ? OUT_OF_MEMORY : OK;
}
