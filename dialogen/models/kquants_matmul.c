/* The unit formats' products by format and number of rows (kquants_dot.c's loops compiled once per
 * format), and F16/BF16. Included by kernels.c after kquants_dot.c. */

/* units_dot with the format and the row count as constants, so each pair compiles to its own loop */
static inline __attribute__((always_inline)) void rows_of(int type, const uint8_t *w, int nu, int nb,
                                                          const int8_t *x, size_t xs, int Kp, float *out, int rn) {
    switch (rn) {
#if UNIT_ROWS == 8
        case 8: units_dot(type, w, nu, nb, x, xs, Kp, out, 8); break;
        case 7: units_dot(type, w, nu, nb, x, xs, Kp, out, 7); break;
        case 6: units_dot(type, w, nu, nb, x, xs, Kp, out, 6); break;
        case 5: units_dot(type, w, nu, nb, x, xs, Kp, out, 5); break;
#endif
        case 4: units_dot(type, w, nu, nb, x, xs, Kp, out, 4); break;
        case 3: units_dot(type, w, nu, nb, x, xs, Kp, out, 3); break;
        case 2: units_dot(type, w, nu, nb, x, xs, Kp, out, 2); break;
        default: units_dot(type, w, nu, nb, x, xs, Kp, out, 1); break;
    }
}

#ifdef TWO_WEIGHT_ROWS
#define DOT_2W(T) \
    static void dot2_##T(const uint8_t *w, size_t row_bytes, int nu, int nb, const int8_t *x, int Kp, float *out) { \
        units_dot_2w(T, w, row_bytes, nu, nb, x, Kp, out); \
    }
#else
#define DOT_2W(T)
#endif
#ifdef GROUP_TILE
#define GROUP_T(T) \
    static void group_##T(const uint8_t *w, size_t rb, int nu, int nb, const int8_t *xk, size_t xs, int Kp, int R, \
                          uint8_t *t, float *y, int N, int n0, const float *bias, int acc) { \
        group_product(T, w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); \
    }
#else
#define GROUP_T(T)
#endif
#define UNITS_ROWS(T) DOT_2W(T) GROUP_T(T) \
    static void rows_##T(const uint8_t *w, int nu, int nb, const int8_t *x, size_t xs, int Kp, float *out, int rn) { \
        rows_of(T, w, nu, nb, x, xs, Kp, out, rn); \
    }
UNITS_ROWS(Q4_K) UNITS_ROWS(Q5_K) UNITS_ROWS(Q6_K) UNITS_ROWS(Q2_K) UNITS_ROWS(Q3_K) UNITS_ROWS(IQ4_XS)
UNITS_ROWS(Q5_0) UNITS_ROWS(Q5_1) UNITS_ROWS(IQ4_NL)

static void units_rows(int type, const uint8_t *w, int nu, int nb, const int8_t *x, size_t xs, int Kp, float *out,
                       int rn) {
    switch (type) {
        case Q4_K: rows_Q4_K(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q5_K: rows_Q5_K(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q6_K: rows_Q6_K(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q2_K: rows_Q2_K(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q3_K: rows_Q3_K(w, nu, nb, x, xs, Kp, out, rn); break;
        case IQ4_XS: rows_IQ4_XS(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q5_0: rows_Q5_0(w, nu, nb, x, xs, Kp, out, rn); break;
        case Q5_1: rows_Q5_1(w, nu, nb, x, xs, Kp, out, rn); break;
        default: rows_IQ4_NL(w, nu, nb, x, xs, Kp, out, rn); break;
    }
}

#ifdef TWO_WEIGHT_ROWS
static void units_dot2(int type, const uint8_t *w, size_t row_bytes, int nu, int nb, const int8_t *x, int Kp,
                       float *out) {
    switch (type) {
        case Q4_K: dot2_Q4_K(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q5_K: dot2_Q5_K(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q6_K: dot2_Q6_K(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q2_K: dot2_Q2_K(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q3_K: dot2_Q3_K(w, row_bytes, nu, nb, x, Kp, out); break;
        case IQ4_XS: dot2_IQ4_XS(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q5_0: dot2_Q5_0(w, row_bytes, nu, nb, x, Kp, out); break;
        case Q5_1: dot2_Q5_1(w, row_bytes, nu, nb, x, Kp, out); break;
        default: dot2_IQ4_NL(w, row_bytes, nu, nb, x, Kp, out); break;
    }
}
#endif

#ifdef GROUP_TILE
static void units_group(int type, const uint8_t *w, size_t rb, int nu, int nb, const int8_t *xk, size_t xs, int Kp,
                        int R, uint8_t *t, float *y, int N, int n0, const float *bias, int acc) {
    switch (type) {
        case Q4_K: group_Q4_K(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q5_K: group_Q5_K(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q6_K: group_Q6_K(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q2_K: group_Q2_K(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q3_K: group_Q3_K(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case IQ4_XS: group_IQ4_XS(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q5_0: group_Q5_0(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        case Q5_1: group_Q5_1(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
        default: group_IQ4_NL(w, rb, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias, acc); break;
    }
}
#endif

/* y (R, N) (+)= xq (R, K) @ W (N, K)^T + bias for the unit formats; *failed set when out of memory */
static void units_matmul(int type, const uint8_t *w, int N, int K, const xblock *xq, int R, float *y,
                         const float *bias, int accumulate, int *failed) {
    const int small = small_blocks(type), nb = small ? K / QK : K / KU, nu = small ? (nb + 7) / 8 : nb;
    const int Kp = nu * KU;
    const size_t row_bytes = (size_t)nb * block_bytes(type), xs = krow_bytes(Kp);
    int8_t *xk = malloc(xs * (size_t)R);  /* each thread's own copy, as in phase_matmul */
    if (!xk) set_failed(failed);
    for (int r = 0; xk && r < R; r++) make_krow(xq + (size_t)r * (K / QK), K, Kp, xk + r * xs);
    float out[UNIT_ROWS];
#ifdef GROUP_TILE
    if (R >= GROUP_TILE && N % GROUP_TILE == 0) {  /* prompt rows: 16 weight rows unpacked once for all of them */
        uint8_t *t = xk ? malloc(group_tile_bytes(nu)) : NULL;
        if (xk && !t) set_failed(failed);
        #pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += GROUP_TILE) {
            if (!t) continue;
            units_group(type, w + (size_t)n0 * row_bytes, row_bytes, nu, nb, xk, xs, Kp, R, t, y, N, n0, bias,
                        accumulate);
        }
        free(t);
        free(xk);
        return;
    }
#endif
#ifdef TWO_WEIGHT_ROWS
    if (R == 1 && N % 2 == 0 && two_rows_pay(type)) {  /* a decode step: two weight rows at a time */
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n += 2) {
            if (!xk) continue;
            units_dot2(type, w + (size_t)n * row_bytes, row_bytes, nu, nb, xk, Kp, out);
            for (int i = 0; i < 2; i++) {
                float v = out[i] + (bias ? bias[n + i] : 0.f);
                y[n + i] = accumulate ? y[n + i] + v : v;
            }
        }
        free(xk);
        return;
    }
#endif
    #pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        if (!xk) continue;  /* still in the shared loop: the others wait for every thread at its end */
        const uint8_t *wn = w + (size_t)n * row_bytes;
        for (int r0 = 0; r0 < R; r0 += UNIT_ROWS) {
            int rn = R - r0 < UNIT_ROWS ? R - r0 : UNIT_ROWS;
            units_rows(type, wn, nu, nb, xk + r0 * xs, xs, Kp, out, rn);
            for (int r = 0; r < rn; r++) {
                float v = out[r] + (bias ? bias[n] : 0.f);
                float *dst = y + (size_t)(r0 + r) * N + n;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
    free(xk);
}

/* ---- F16 and BF16: float activations times the weights widened in registers ------------------ */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FLOAT_ROWS 8
#define FW 16
static inline __m512 wide16(int type, const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return type == F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define VF __m512
#define VZERO _mm512_setzero_ps()
#define VWIDE wide16
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VSUM(v) _mm512_reduce_add_ps(v)
#define VADD _mm512_add_ps
#elif defined(__AVX2__) && defined(__F16C__)
#define FLOAT_ROWS 4
#define FW 8
static inline __m256 wide8(int type, const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return type == F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#define VF __m256
#define VZERO _mm256_setzero_ps()
#define VWIDE wide8
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VSUM(v) hsum(v)
#define VADD _mm256_add_ps
#else
#define FLOAT_ROWS 8
#endif

#ifdef FW
/* out[r] = W[n] . x[r] for RN float rows of K (stride K) */
static inline __attribute__((always_inline)) void float_dot(int type, const uint16_t *w, int K, const float *x,
                                                            float *out, const int RN) {
    VF acc[FLOAT_ROWS][2];
    for (int r = 0; r < RN; r++) acc[r][0] = acc[r][1] = VZERO;
    int k = 0;
    for (; k + 2 * FW <= K; k += 2 * FW)
        for (int h = 0; h < 2; h++) {
            if (!h) prefetch_span(w + k, 2 * FW * sizeof(uint16_t));
            VF wv = VWIDE(type, w + k + h * FW);
            for (int r = 0; r < RN; r++) acc[r][h] = VFMA(wv, VLOAD(x + (size_t)r * K + k + h * FW), acc[r][h]);
        }
    for (int r = 0; r < RN; r++) {
        float sum = VSUM(VADD(acc[r][0], acc[r][1]));
        for (int j = k; j < K; j++) sum += wide1(type, w[j]) * x[(size_t)r * K + j];
        out[r] = sum;
    }
}
#else
static void float_dot(int type, const uint16_t *w, int K, const float *x, float *out, int RN) {
    for (int r = 0; r < RN; r++) {
        float sum = 0.f;
        for (int j = 0; j < K; j++) sum += wide1(type, w[j]) * x[(size_t)r * K + j];
        out[r] = sum;
    }
}
#endif

static void float_matmul(int type, const uint16_t *w, int N, int K, const float *x, int R, float *y,
                         const float *bias, int accumulate) {
    float out[FLOAT_ROWS];
    #pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t *wn = w + (size_t)n * K;
        for (int r0 = 0; r0 < R; r0 += FLOAT_ROWS) {
            int rn = R - r0 < FLOAT_ROWS ? R - r0 : FLOAT_ROWS;
            const float *xr = x + (size_t)r0 * K;
            switch (rn) {
#if FLOAT_ROWS == 8
                case 8: float_dot(type, wn, K, xr, out, 8); break;
                case 7: float_dot(type, wn, K, xr, out, 7); break;
                case 6: float_dot(type, wn, K, xr, out, 6); break;
                case 5: float_dot(type, wn, K, xr, out, 5); break;
#endif
                case 4: float_dot(type, wn, K, xr, out, 4); break;
                case 3: float_dot(type, wn, K, xr, out, 3); break;
                case 2: float_dot(type, wn, K, xr, out, 2); break;
                default: float_dot(type, wn, K, xr, out, 1); break;
            }
            for (int r = 0; r < rn; r++) {
                float v = out[r] + (bias ? bias[n] : 0.f);
                float *dst = y + (size_t)(r0 + r) * N + n;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
}
