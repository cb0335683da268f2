/* The unit formats' dot products, one loop per SIMD path (kquants.c describes the formats and
 * the activation rows). Included by kernels.c after kquants.c. */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* weights 64c .. 64c+63 of a unit as unsigned bytes: two unpack32 steps, or for the formats whose
 * 64 weights come from one 32-byte run, that run broadcast and shifted per half */
static inline __attribute__((always_inline)) __m512i unpack64(int type, const uint8_t *w, int nblk, int c) {
    const __m512i low4 = _mm512_set1_epi8(15);
    switch (type) {
        case Q4_K: case Q5_K: {  /* low nibbles: sub-block 2c, high: 2c + 1 */
            __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + (type == Q4_K ? 16 : 48) + 32 * c)));
            __m512i u = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)), low4);
            if (type == Q4_K) return u;
            __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 16)));
            __mmask64 bit = _mm512_test_epi8_mask(h, _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << 2 * c)),
                                                                       _mm256_set1_epi8((char)(2 << 2 * c)), 1));
            return _mm512_mask_add_epi8(u, bit, u, _mm512_set1_epi8(16));
        }
        case Q6_K: {  /* 64 bytes of low bits: low nibbles (c even) or high; 2-bit highs shifted per half */
            int h = c >> 1, hs = 4 * (c & 1);
            __m512i ql = _mm512_loadu_si512(w + 64 * h);
            __m512i lo = _mm512_and_si512(_mm512_srli_epi16(ql, hs), low4);
            __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h)));
            __m512i hi = _mm512_srlv_epi64(qh, _mm512_setr_epi64(hs, hs, hs, hs, hs + 2, hs + 2, hs + 2, hs + 2));
            return _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(3)), 4));
        }
        default:
            return _mm512_inserti64x4(_mm512_castsi256_si512(unpack32(type, w, nblk, 2 * c)),
                                      unpack32(type, w, nblk, 2 * c + 1), 1);
    }
}

#define UNIT_ROWS 8
/* out[r] = W[n] . x[r] for RN (1..8) krows (stride xstride bytes): 64 weights a step. The 16 lanes of
 * a step's integer sums cover its four groups of 16 in order, so the group scales go to the lanes
 * with one permute. */
static inline __attribute__((always_inline)) void units_dot(int type, const uint8_t *w, int nu, int nb,
                                                            const int8_t *x, size_t xstride, int Kp, float *out,
                                                            const int RN) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int two = RN <= 2;  /* two accumulators a row where few rows leave the adds waiting on each other */
    __m512 acc[8][2];
    for (int r = 0; r < RN; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int s = 0; s < nu; s++) {
        const uint8_t *blk = w + s * ub;
        const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
        prefetch_span(blk, ub);
        __m512 vws, vwm;
        kscales16(type, blk, nblk, &vws, &vwm);
        __m512i u[4];
        for (int c = 0; c < 4; c++) u[c] = unpack64(type, blk, nblk, c);
        for (int r = 0; r < RN; r++) {
            const int8_t *xr = x + r * xstride;
            const float *d16 = (const float *)(xr + Kp) + 16 * s, *s16 = d16 + Kp / 16;
            __m512 S = _mm512_mul_ps(vws, _mm512_loadu_ps(d16));  /* (16,) ws * xd per group */
            acc[r][two] = _mm512_fmadd_ps(vwm, _mm512_loadu_ps(s16), acc[r][two]);
            for (int c = 0; c < 4; c++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[c],
                                                _mm512_loadu_si512(xr + (size_t)s * KU + 64 * c));
                __m512 sc = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * c)), S);
                acc[r][two & c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[r][two & c]);
            }
        }
    }
    for (int r = 0; r < RN; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

/* a decode step (one krow) against two weight rows at once, w and w + row_bytes: twice the
 * independent work in flight, and each activation load serves both */
static inline __attribute__((always_inline)) void units_dot_2w(int type, const uint8_t *w, size_t row_bytes, int nu,
                                                               int nb, const int8_t *x, int Kp, float *out) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[2][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()}, {_mm512_setzero_ps(), _mm512_setzero_ps()}};
    for (int s = 0; s < nu; s++) {
        const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
        const float *d16 = (const float *)(x + Kp) + 16 * s, *s16 = d16 + Kp / 16;
        __m512 xd = _mm512_loadu_ps(d16), xs = _mm512_loadu_ps(s16);
        __m512i xq[4];
        for (int c = 0; c < 4; c++) xq[c] = _mm512_loadu_si512(x + (size_t)s * KU + 64 * c);
        for (int i = 0; i < 2; i++) {
            const uint8_t *blk = w + i * row_bytes + s * ub;
            prefetch_span(blk, ub);
            __m512 vws, vwm;
            kscales16(type, blk, nblk, &vws, &vwm);
            __m512 S = _mm512_mul_ps(vws, xd);
            acc[i][1] = _mm512_fmadd_ps(vwm, xs, acc[i][1]);
            for (int c = 0; c < 4; c++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), unpack64(type, blk, nblk, c), xq[c]);
                __m512 sc = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * c)), S);
                acc[i][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc[i][c & 1]);
            }
        }
    }
    for (int i = 0; i < 2; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}
#define TWO_WEIGHT_ROWS 1
static int two_rows_pay(int type) { (void)type; return 1; }

/* ---- many activation rows: 16 weight rows unpacked once into a scratch tile, in the tiled order
 * of kernels.c (each 64-byte chunk holds 4 consecutive weights of each of the 16 rows), with their
 * group scales as [unit][group][row]; then one multiply-add instruction takes 4 weights of all 16
 * rows against 4 activations, and the scales apply to the 16 rows at once. The tile is rebuilt per
 * group of rows and never kept: no copy of the weights outlives the call. */
#define GROUP_TILE 16
static size_t group_tile_bytes(int nu) { return (size_t)nu * (64 * 64 + 2 * 16 * 16 * sizeof(float)); }

static inline __attribute__((always_inline)) void tile_group(int type, const uint8_t *w, size_t row_bytes, int nu,
                                                             int nb, uint8_t *t) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    float *tws = (float *)(t + (size_t)nu * 4096), *twm = tws + (size_t)nu * 256;
    const __m512i quads = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(64));
    for (int i = 0; i < GROUP_TILE; i++)
        for (int s = 0; s < nu; s++) {
            const uint8_t *blk = w + i * row_bytes + s * ub;
            const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
            __m512 vws, vwm;
            kscales16(type, blk, nblk, &vws, &vwm);
            float ws[16], wm[16];
            _mm512_storeu_ps(ws, vws);
            _mm512_storeu_ps(wm, vwm);
            for (int g = 0; g < 16; g++) { tws[(s * 16 + g) * 16 + i] = ws[g]; twm[(s * 16 + g) * 16 + i] = wm[g]; }
            for (int c = 0; c < 4; c++)  /* lane q of the chunk: weights 4q..4q+3 -> chunk 16c + q, row i */
                _mm512_i32scatter_epi32(t + (size_t)s * 4096 + (16 * c) * 64 + 4 * i, quads, unpack64(type, blk, nblk, c), 1);
        }
}

/* out[r * 16 + i] = W[i] . x[r] for RN (1..4) krows against a tile */
static inline __attribute__((always_inline)) void tile_rows(const uint8_t *t, int nu, const int8_t *x, size_t xstride,
                                                            int Kp, float *out, const int RN) {
    const float *tws = (const float *)(t + (size_t)nu * 4096), *twm = tws + (size_t)nu * 256;
    __m512 acc[4];
    for (int r = 0; r < RN; r++) acc[r] = _mm512_setzero_ps();
    for (int s = 0; s < nu; s++)
        for (int g = 0; g < 16; g++) {
            const uint8_t *tg = t + (size_t)s * 4096 + g * 256;
            __m512i w0 = _mm512_loadu_si512(tg), w1 = _mm512_loadu_si512(tg + 64);
            __m512i w2 = _mm512_loadu_si512(tg + 128), w3 = _mm512_loadu_si512(tg + 192);
            __m512 ws = _mm512_loadu_ps(tws + (s * 16 + g) * 16), wm = _mm512_loadu_ps(twm + (s * 16 + g) * 16);
            for (int r = 0; r < RN; r++) {
                const int8_t *xr = x + r * xstride;
                const int32_t *xq = (const int32_t *)(xr + (size_t)s * KU + 16 * g);
                const float *d16 = (const float *)(xr + Kp) + 16 * s + g, *s16 = d16 + Kp / 16;
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_set1_epi32(xq[0]));
                p = _mm512_dpbusd_epi32(p, w1, _mm512_set1_epi32(xq[1]));
                p = _mm512_dpbusd_epi32(p, w2, _mm512_set1_epi32(xq[2]));
                p = _mm512_dpbusd_epi32(p, w3, _mm512_set1_epi32(xq[3]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws, _mm512_set1_ps(*d16)), acc[r]);
                acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(*s16), acc[r]);
            }
        }
    for (int r = 0; r < RN; r++) _mm512_storeu_ps(out + r * 16, acc[r]);
}

static inline __attribute__((always_inline)) void group_product(int type, const uint8_t *w, size_t row_bytes, int nu,
                                                                int nb, const int8_t *xk, size_t xs, int Kp, int R,
                                                                uint8_t *t, float *y, int N, int n0, const float *bias,
                                                                int accumulate) {
    float out[4 * 16];
    tile_group(type, w, row_bytes, nu, nb, t);
    for (int r0 = 0; r0 < R; r0 += 4) {
        int rn = R - r0 < 4 ? R - r0 : 4;
        const int8_t *xr = xk + r0 * xs;
        switch (rn) {
            case 4: tile_rows(t, nu, xr, xs, Kp, out, 4); break;
            case 3: tile_rows(t, nu, xr, xs, Kp, out, 3); break;
            case 2: tile_rows(t, nu, xr, xs, Kp, out, 2); break;
            default: tile_rows(t, nu, xr, xs, Kp, out, 1); break;
        }
        for (int r = 0; r < rn; r++)
            for (int i = 0; i < 16; i++) {
                float v = out[r * 16 + i] + (bias ? bias[n0 + i] : 0.f);
                float *dst = y + (size_t)(r0 + r) * N + n0 + i;
                *dst = accumulate ? *dst + v : v;
            }
    }
}
#elif defined(__AVX2__)
#define UNIT_ROWS 4
static inline __m256 unit_dot32(int type, __m256i u, __m256i x) {
#ifdef SIGNED_IQ4
    if (type == IQ4_NL || type == IQ4_XS) {  /* the signed levels: |level| times x with level's sign */
        __m256i k = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
        return dot_u8_i8(_mm256_sign_epi8(k, k), _mm256_sign_epi8(x, k));
    }
#endif
    (void)type;
    return dot_u8_i8(u, x);
}

/* kscales for 2 x 8 lanes: ws, and wm = mg - offset * ws */
static inline __attribute__((always_inline)) void kscales8(int type, const uint8_t *w, int nblk, __m256 *ws,
                                                           __m256 *wm) {
    const __m256i dup_lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), dup_hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    switch (type) {
        case Q4_K: case Q5_K: {  /* bytes [sc0..7, m0..7] -> each scale and minimum twice */
            __m128i b = six_bits128(type, w + 4);
            __m256i sc = _mm256_cvtepu8_epi32(b), mn = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
            __m256 d = _mm256_set1_ps(f16at(w)), ndmin = _mm256_set1_ps(-f16at(w + 2));
            ws[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(sc, dup_lo)));
            ws[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(sc, dup_hi)));
            wm[0] = _mm256_mul_ps(ndmin, _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(mn, dup_lo)));
            wm[1] = _mm256_mul_ps(ndmin, _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(mn, dup_hi)));
            return;
        }
        case Q6_K: case Q3_K: {
            __m256 d = _mm256_set1_ps(f16at(w + (type == Q6_K ? 208 : 108)));
            __m256 noff = _mm256_set1_ps(type == Q6_K ? -32.f : -4.f);
            __m128i b = type == Q6_K ? _mm_loadu_si128((const __m128i *)(w + 192)) : six_bits128(type, w + 96);
            __m256i lo = type == Q6_K ? _mm256_cvtepi8_epi32(b) : _mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(32));
            __m256i hi = type == Q6_K ? _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))
                                      : _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), _mm256_set1_epi32(32));
            ws[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(lo));
            ws[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(hi));
            wm[0] = _mm256_mul_ps(ws[0], noff);
            wm[1] = _mm256_mul_ps(ws[1], noff);
            return;
        }
        case Q2_K: {
            __m128i b = _mm_loadu_si128((const __m128i *)w);
            __m256 d = _mm256_set1_ps(f16at(w + 80)), ndmin = _mm256_set1_ps(-f16at(w + 82));
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(b, 8) : b);
                ws[h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))));
                wm[h] = _mm256_mul_ps(ndmin, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)));
            }
            return;
        }
        default: {
            float s[16], m[16];
            kscales(type, w, nblk, s, m);
            __m256 noff = _mm256_set1_ps((float)-dot_offset(type));
            for (int h = 0; h < 2; h++) {
                ws[h] = _mm256_loadu_ps(s + 8 * h);
                wm[h] = _mm256_add_ps(_mm256_loadu_ps(m + 8 * h), _mm256_mul_ps(noff, ws[h]));
            }
        }
    }
}

/* the same, 32 weights a step, for RN (1..4) krows: each row's 16 group scales (ws * xd) are made
 * once a unit, and a step's 8 lanes take theirs with one permute */
static inline __attribute__((always_inline)) void units_dot(int type, const uint8_t *w, int nu, int nb,
                                                            const int8_t *x, size_t xstride, int Kp, float *out,
                                                            const int RN) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    const int two = RN <= 2;
    __m256 acc[4][2];
    float S[4][16];
    for (int r = 0; r < RN; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int s = 0; s < nu; s++) {
        const uint8_t *blk = w + s * ub;
        const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
        prefetch_span(blk, ub);
        __m256 ws[2], wm[2];
        kscales8(type, blk, nblk, ws, wm);
        for (int r = 0; r < RN; r++) {
            const float *d16 = (const float *)(x + r * xstride + Kp) + 16 * s, *s16 = d16 + Kp / 16;
            for (int h = 0; h < 2; h++) {
                _mm256_storeu_ps(S[r] + 8 * h, _mm256_mul_ps(ws[h], _mm256_loadu_ps(d16 + 8 * h)));
                acc[r][two] = _mm256_fmadd_ps(wm[h], _mm256_loadu_ps(s16 + 8 * h), acc[r][two]);
            }
        }
        for (int c = 0; c < 8; c++) {
            const __m256i pick = _mm256_setr_epi32(2 * (c & 3), 2 * (c & 3), 2 * (c & 3), 2 * (c & 3), 2 * (c & 3) + 1,
                                                   2 * (c & 3) + 1, 2 * (c & 3) + 1, 2 * (c & 3) + 1);
            __m256i u = unpack32(type, blk, nblk, c);
            for (int r = 0; r < RN; r++) {
                const int8_t *xr = x + r * xstride + (size_t)s * KU + 32 * c;
                __m256 p = unit_dot32(type, u, _mm256_loadu_si256((const __m256i *)xr));
                __m256 sc = _mm256_permutevar8x32_ps(_mm256_loadu_ps(S[r] + 8 * (c >> 2)), pick);
                acc[r][two & c] = _mm256_fmadd_ps(p, sc, acc[r][two & c]);
            }
        }
    }
    for (int r = 0; r < RN; r++) out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

/* a decode step (one krow) against two weight rows at once, as on AVX-512 */
static inline __attribute__((always_inline)) void units_dot_2w(int type, const uint8_t *w, size_t row_bytes, int nu,
                                                               int nb, const int8_t *x, int Kp, float *out) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    __m256 acc[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
    float S[2][16];
    for (int s = 0; s < nu; s++) {
        const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
        const float *d16 = (const float *)(x + Kp) + 16 * s, *s16 = d16 + Kp / 16;
        for (int i = 0; i < 2; i++) {
            __m256 ws[2], wm[2];
            prefetch_span(w + i * row_bytes + s * ub, ub);
            kscales8(type, w + i * row_bytes + s * ub, nblk, ws, wm);
            for (int h = 0; h < 2; h++) {
                _mm256_storeu_ps(S[i] + 8 * h, _mm256_mul_ps(ws[h], _mm256_loadu_ps(d16 + 8 * h)));
                acc[i][1] = _mm256_fmadd_ps(wm[h], _mm256_loadu_ps(s16 + 8 * h), acc[i][1]);
            }
        }
        for (int c = 0; c < 8; c++) {
            const __m256i pick = _mm256_setr_epi32(2 * (c & 3), 2 * (c & 3), 2 * (c & 3), 2 * (c & 3), 2 * (c & 3) + 1,
                                                   2 * (c & 3) + 1, 2 * (c & 3) + 1, 2 * (c & 3) + 1);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (size_t)s * KU + 32 * c));
            for (int i = 0; i < 2; i++) {
                __m256 p = unit_dot32(type, unpack32(type, w + i * row_bytes + s * ub, nblk, c), xv);
                __m256 sc = _mm256_permutevar8x32_ps(_mm256_loadu_ps(S[i] + 8 * (c >> 2)), pick);
                acc[i][c & 1] = _mm256_fmadd_ps(p, sc, acc[i][c & 1]);
            }
        }
    }
    for (int i = 0; i < 2; i++) out[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
}
#define TWO_WEIGHT_ROWS 1
/* with 16 vector registers, only the formats of the lightest unpacking gain from the second row */
static int two_rows_pay(int type) { return type == Q4_K || type == Q5_K || type == IQ4_XS; }
#else
#define UNIT_ROWS 8
static inline __attribute__((always_inline)) void units_dot(int type, const uint8_t *w, int nu, int nb, const int8_t *x, size_t xstride, int Kp,
                      float *out, int RN) {
    const size_t ub = (size_t)block_bytes(type) * (small_blocks(type) ? 8 : 1);
    const float off = (float)koffset(type);
    uint8_t u[KU];
    float ws[16], mg[16];
    for (int r = 0; r < RN; r++) out[r] = 0.f;
    for (int s = 0; s < nu; s++) {
        const int nblk = nb - 8 * s < 8 ? nb - 8 * s : 8;
        prefetch_span(w + s * ub, ub);
        kscales(type, w + s * ub, nblk, ws, mg);
        unpack_plain(type, w + s * ub, nblk, u);
        for (int r = 0; r < RN; r++) {
            const int8_t *xr = x + r * xstride + (size_t)s * KU;
            const float *d16 = (const float *)(x + r * xstride + Kp) + 16 * s, *s16 = d16 + Kp / 16;
            float sum = 0.f;
            for (int g = 0; g < 16; g++) {
                int isum = 0;
                for (int i = 0; i < 16; i++) isum += u[16 * g + i] * xr[16 * g + i];
                sum += ws[g] * d16[g] * (float)isum + (mg[g] - off * ws[g]) * s16[g];
            }
            out[r] += sum;
        }
    }
}
#endif
