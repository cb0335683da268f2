/* GGUF's other common weight formats, multiplied as shipped: the K-quants (Q2_K..Q6_K), IQ4_XS,
 * the 32-value Q5_0, Q5_1 and IQ4_NL blocks, and F16/BF16. Included by kernels.c (one translation
 * unit), after its helpers: half_to_float, xblock, nibbles, dot_u8_i8, hsum; its products are in
 * kquants_dot.c and kquants_matmul.c.
 *
 * The quantized formats are read in units of 256 weights: one super-block, or eight 32-blocks (the
 * last unit of a row may hold fewer). Within a unit, each group g of 16 consecutive weights is
 *     w = ws[g] * (u - off) + mg[g]
 * with u an unsigned byte unpacked from the bits, ws and mg floats made from the unit's scales
 * (mg = 0 where the format has no minimum), and off a constant of the format (Q6_K 32, Q3_K 4,
 * Q5_0 16, IQ4 128: its 16 levels plus 128). Activations are the per-32 int8 blocks of
 * `quantize_row` (scale xd), laid out per row with int8 values contiguous (a `krow`). A group's
 * product is then one integer sum and two float terms:
 *     sum w x = ws * xd * sum(u q) + (mg - off * ws) * xd * sum(q)
 * where xd * sum(q) over each 16 values is precomputed in the krow. Layouts (bytes), per unit:
 *   Q4_K {f16 d, dmin; u8 sc[12]; u8 qs[128]}        w = d*sc_j*q - dmin*m_j, 6-bit sc/m per 32
 *   Q5_K {f16 d, dmin; u8 sc[12]; u8 qh[32]; qs[128]} the same with q's fifth bit in qh
 *   Q6_K {u8 ql[128]; u8 qh[64]; i8 sc[16]; f16 d}    w = d*sc_g*(q - 32), 6-bit q
 *   Q2_K {u8 sc[16]; u8 qs[64]; f16 d, dmin}          w = d*(sc&15)*q - dmin*(sc>>4), 2-bit q
 *   Q3_K {u8 hmask[32]; u8 qs[64]; u8 sc[12]; f16 d}  w = d*(sc_g - 32)*(q - 4), 3-bit q, 6-bit sc
 *   IQ4_XS {f16 d; u16 sc_h; u8 sc_l[4]; u8 qs[128]}  w = d*(sc_j - 32)*level[q]
 *   Q5_0 {f16 d; u32 qh; u8 qs[16]}, Q5_1 {f16 d, m; u32 qh; u8 qs[16]}, IQ4_NL {f16 d; u8 qs[16]}
 */
#define KU 256  /* weights a unit */

static int unit_format(int type) {
    switch (type) {
        case Q5_0: case Q5_1: case IQ4_NL: case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: case IQ4_XS: return 1;
        default: return 0;
    }
}

static int small_blocks(int type) { return type == Q5_0 || type == Q5_1 || type == IQ4_NL; }  /* 32 a block */

static int koffset(int type) {
    switch (type) {
        case Q6_K: return 32;
        case Q3_K: return 4;
        case Q5_0: return 16;
        case IQ4_NL: case IQ4_XS: return 128;
        default: return 0;
    }
}

/* the integer sums' offset: the signed IQ4 levels go through the sign trick where a plain AVX2
 * multiply-add of bytes (no VNNI) would saturate on levels over 127 */
#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)) && \
    !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
#define SIGNED_IQ4 1
static int dot_offset(int type) { return type == IQ4_NL || type == IQ4_XS ? 0 : koffset(type); }
#else
static __attribute__((unused)) int dot_offset(int type) { return koffset(type); }
#endif

/* IQ4's 16 non-linear levels (-127 .. 113), plus 128 */
static const uint8_t IQ4_LEVELS[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

static inline float f16at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

/* 12 bytes of six-bit values -> 16 bytes: Q4_K/Q5_K [8 scales, 8 minimums]; Q3_K 16 scales (+32) */
static void six_bits(int type, const uint8_t *p, uint8_t *b) {
    uint32_t a[3], v[4];
    memcpy(a, p, 12);
    if (type == Q3_K) {
        v[0] = (a[0] & 0x0f0f0f0f) | ((a[2] & 0x03030303) << 4);
        v[1] = (a[1] & 0x0f0f0f0f) | (((a[2] >> 2) & 0x03030303) << 4);
        v[2] = ((a[0] >> 4) & 0x0f0f0f0f) | (((a[2] >> 4) & 0x03030303) << 4);
        v[3] = ((a[1] >> 4) & 0x0f0f0f0f) | (((a[2] >> 6) & 0x03030303) << 4);
    } else {
        v[0] = a[0] & 0x3f3f3f3f;
        v[1] = (a[2] & 0x0f0f0f0f) | ((a[0] >> 2) & 0x30303030);
        v[2] = a[1] & 0x3f3f3f3f;
        v[3] = ((a[2] >> 4) & 0x0f0f0f0f) | ((a[1] >> 2) & 0x30303030);
    }
    memcpy(b, v, 16);
}

/* a unit's 16 group scales ws and minimums mg; nblk: the 32-blocks present (Q5_0, Q5_1, IQ4_NL) */
static inline __attribute__((always_inline)) void kscales(int type, const uint8_t *w, int nblk, float *ws, float *mg) {
    uint8_t b[16];
    switch (type) {
        case Q4_K: case Q5_K: {
            float d = f16at(w), dmin = f16at(w + 2);
            six_bits(type, w + 4, b);
            for (int g = 0; g < 16; g++) { ws[g] = d * (float)b[g >> 1]; mg[g] = -(dmin * (float)b[8 + (g >> 1)]); }
            return;
        }
        case Q6_K: {
            float d = f16at(w + 208);
            for (int g = 0; g < 16; g++) { ws[g] = d * (float)(int8_t)w[192 + g]; mg[g] = 0.f; }
            return;
        }
        case Q2_K: {
            float d = f16at(w + 80), dmin = f16at(w + 82);
            for (int g = 0; g < 16; g++) { ws[g] = d * (float)(w[g] & 15); mg[g] = -(dmin * (float)(w[g] >> 4)); }
            return;
        }
        case Q3_K: {
            float d = f16at(w + 108);
            six_bits(type, w + 96, b);
            for (int g = 0; g < 16; g++) { ws[g] = d * (float)((int)b[g] - 32); mg[g] = 0.f; }
            return;
        }
        case IQ4_XS: {
            float d = f16at(w);
            uint16_t sh;
            memcpy(&sh, w + 2, 2);
            for (int j = 0; j < 8; j++) {
                int ls = ((w[4 + j / 2] >> 4 * (j & 1)) & 15) | (((sh >> 2 * j) & 3) << 4);
                ws[2 * j] = ws[2 * j + 1] = d * (float)(ls - 32);
                mg[2 * j] = mg[2 * j + 1] = 0.f;
            }
            return;
        }
        default: {  /* eight 32-blocks */
            int bb = block_bytes(type);
            for (int j = 0; j < 8; j++) {
                float d = j < nblk ? f16at(w + j * bb) : 0.f;
                float m = j < nblk && type == Q5_1 ? f16at(w + j * bb + 2) : 0.f;
                ws[2 * j] = ws[2 * j + 1] = d;
                mg[2 * j] = mg[2 * j + 1] = m;
            }
        }
    }
}

/* a unit's 256 weights as unsigned bytes u, in order (zeros past nblk blocks) */
static inline __attribute__((always_inline)) void unpack_plain(int type, const uint8_t *w, int nblk, uint8_t *u) {
    switch (type) {
        case Q4_K: case Q5_K: {
            const uint8_t *qs = w + (type == Q4_K ? 16 : 48), *qh = w + 16;
            for (int i = 0; i < 4; i++)
                for (int l = 0; l < 32; l++) {
                    int lo = qs[32 * i + l] & 15, hi = qs[32 * i + l] >> 4;
                    if (type == Q5_K) { lo |= ((qh[l] >> 2 * i) & 1) << 4; hi |= ((qh[l] >> (2 * i + 1)) & 1) << 4; }
                    u[64 * i + l] = (uint8_t)lo;
                    u[64 * i + 32 + l] = (uint8_t)hi;
                }
            return;
        }
        case Q6_K:
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
                uint8_t *o = u + 128 * h;
                for (int l = 0; l < 32; l++) {
                    o[l] = (uint8_t)((ql[l] & 15) | ((qh[l] & 3) << 4));
                    o[l + 32] = (uint8_t)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4));
                    o[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                    o[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
                }
            }
            return;
        case Q2_K: case Q3_K: {
            const uint8_t *qs = w + (type == Q2_K ? 16 : 32);
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 32; l++) {
                        int q = (qs[32 * h + l] >> 2 * j) & 3;
                        if (type == Q3_K) q |= ((w[l] >> (4 * h + j)) & 1) << 2;
                        u[128 * h + 32 * j + l] = (uint8_t)q;
                    }
            return;
        }
        case IQ4_XS:
            for (int j = 0; j < 8; j++)
                for (int l = 0; l < 16; l++) {
                    uint8_t q = w[8 + 16 * j + l];
                    u[32 * j + l] = IQ4_LEVELS[q & 15];
                    u[32 * j + 16 + l] = IQ4_LEVELS[q >> 4];
                }
            return;
        default: {  /* eight 32-blocks */
            int bb = block_bytes(type);
            for (int j = 0; j < 8; j++) {
                uint8_t *o = u + 32 * j;
                if (j >= nblk) { memset(o, 0, 32); continue; }
                const uint8_t *b = w + j * bb;
                const uint8_t *qs = b + (type == IQ4_NL ? 2 : type == Q5_0 ? 6 : 8);
                uint32_t qh = 0;
                if (type != IQ4_NL) memcpy(&qh, b + (type == Q5_0 ? 2 : 4), 4);
                for (int l = 0; l < 16; l++) {
                    if (type == IQ4_NL) { o[l] = IQ4_LEVELS[qs[l] & 15]; o[l + 16] = IQ4_LEVELS[qs[l] >> 4]; continue; }
                    o[l] = (uint8_t)((qs[l] & 15) | (((qh >> l) & 1) << 4));
                    o[l + 16] = (uint8_t)((qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4));
                }
            }
        }
    }
}

static inline float wide1(int type, uint16_t h) {  /* one F16/BF16 value */
    if (type == F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* one row of K weights -> float */
static void dequantize_row(int type, const uint8_t *w, int K, float *o) {
    if (type == F16 || type == BF16) {
        const uint16_t *h = (const uint16_t *)w;
        for (int k = 0; k < K; k++) o[k] = wide1(type, h[k]);
        return;
    }
    const int small = small_blocks(type), nb = small ? K / QK : K / KU, off = koffset(type);
    const size_t ub = (size_t)block_bytes(type) * (small ? 8 : 1);
    uint8_t u[KU];
    float ws[16], mg[16];
    for (int s = 0; s * KU < K; s++) {
        int nblk = small ? (nb - 8 * s < 8 ? nb - 8 * s : 8) : 8, n = K - s * KU < KU ? K - s * KU : KU;
        kscales(type, w + s * ub, nblk, ws, mg);
        unpack_plain(type, w + s * ub, nblk, u);
        for (int i = 0; i < n; i++) o[s * KU + i] = ws[i >> 4] * (float)((int)u[i] - off) + mg[i >> 4];
    }
}

/* ---- activation rows: the int8 values contiguous (Kp, zeros past K), then per 16 values the scale
 * of their 32-block (Kp/16 floats) and that scale times their sum (Kp/16 floats) ---------------- */
static size_t krow_bytes(int Kp) { return (size_t)Kp + 2 * sizeof(float) * (size_t)(Kp / 16); }

static void make_krow(const xblock *x, int K, int Kp, int8_t *o) {
    float *d16 = (float *)(o + Kp), *s16 = d16 + Kp / 16;
    memset(o, 0, krow_bytes(Kp));
    for (int b = 0; b < K / QK; b++) {
        int s0 = 0, s1 = 0;
        memcpy(o + b * QK, x[b].q, QK);
        for (int j = 0; j < 16; j++) { s0 += x[b].q[j]; s1 += x[b].q[16 + j]; }
        d16[2 * b] = d16[2 * b + 1] = x[b].d;
        s16[2 * b] = x[b].d * (float)s0;
        s16[2 * b + 1] = x[b].d * (float)s1;
    }
}

#ifdef __AVX2__
static inline __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m256i bits_at(__m256i v, int shift, int mask) {  /* (v >> shift) & mask in each byte */
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8((char)mask));
}
static inline __m256i fifth_bits(uint32_t bits) {  /* bit j -> 16 in byte j */
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), pick), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

/* weights 32c .. 32c+31 of a unit as unsigned bytes (unpack_plain's, 32 at a time) */
static inline __attribute__((always_inline)) __m256i unpack32(int type, const uint8_t *w, int nblk, int c) {
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
    switch (type) {
        case Q4_K: return bits_at(load32(w + 16 + 32 * (c >> 1)), 4 * (c & 1), 15);
        case Q5_K:
            return _mm256_or_si256(bits_at(load32(w + 48 + 32 * (c >> 1)), 4 * (c & 1), 15),
                                   _mm256_slli_epi16(bits_at(load32(w + 16), c, 1), 4));
        case Q6_K: {
            int h = c >> 2, j = c & 3;
            return _mm256_or_si256(bits_at(load32(w + 64 * h + 32 * (j & 1)), 4 * (j >> 1), 15),
                                   _mm256_slli_epi16(bits_at(load32(w + 128 + 32 * h), 2 * j, 3), 4));
        }
        case Q2_K: return bits_at(load32(w + 16 + 32 * (c >> 2)), 2 * (c & 3), 3);
        case Q3_K:  /* the high bit of weight 32c + l is bit c of hmask[l] */
            return _mm256_or_si256(bits_at(load32(w + 32 + 32 * (c >> 2)), 2 * (c & 3), 3),
                                   _mm256_slli_epi16(bits_at(load32(w), c, 1), 2));
        case IQ4_XS: return _mm256_shuffle_epi8(levels, nibbles(w + 8 + 16 * c));
        default: {
            if (c >= nblk) return _mm256_setzero_si256();
            const uint8_t *b = w + c * block_bytes(type);
            if (type == IQ4_NL) return _mm256_shuffle_epi8(levels, nibbles(b + 2));
            uint32_t qh;
            memcpy(&qh, b + (type == Q5_0 ? 2 : 4), 4);
            return _mm256_or_si256(nibbles(b + (type == Q5_0 ? 6 : 8)), fifth_bits(qh));
        }
    }
}
#endif

#ifdef __AVX2__
/* six_bits in a register: the 12 bytes as words [a0, a1, a2] rearranged by lane */
static inline __m128i six_bits128(int type, const uint8_t *p) {
    int32_t a2;
    memcpy(&a2, p + 8, 4);
    __m128i a = _mm_insert_epi32(_mm_loadl_epi64((const __m128i *)p), a2, 2);  /* reads the 12 bytes only */
    if (type == Q3_K) {  /* [a0 & f, a1 & f, a0 >> 4 & f, a1 >> 4 & f] | (a2 >> 2i & 3) << 4 */
        __m128i lo = _mm_srlv_epi32(_mm_shuffle_epi32(a, _MM_SHUFFLE(1, 0, 1, 0)), _mm_setr_epi32(0, 0, 4, 4));
        __m128i hi = _mm_srlv_epi32(_mm_shuffle_epi32(a, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 2, 4, 6));
        return _mm_or_si128(_mm_and_si128(lo, _mm_set1_epi32(0x0f0f0f0f)),
                            _mm_slli_epi32(_mm_and_si128(hi, _mm_set1_epi32(0x03030303)), 4));
    }
    /* [a0 & 3f, a2 & f | a0 >> 2 & 30, a1 & 3f, a2 >> 4 & f | a1 >> 2 & 30] */
    __m128i lo = _mm_srlv_epi32(_mm_shuffle_epi32(a, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
    __m128i hi = _mm_srli_epi32(_mm_shuffle_epi32(a, _MM_SHUFFLE(1, 1, 0, 0)), 2);
    lo = _mm_and_si128(lo, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    return _mm_or_si128(lo, _mm_and_si128(hi, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

/* kscales for 16 lanes: ws, and wm = mg - off * ws */
static inline __attribute__((always_inline)) void kscales16(int type, const uint8_t *w, int nblk, __m512 *ws,
                                                            __m512 *wm) {
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512 zero = _mm512_setzero_ps();
    switch (type) {
        case Q4_K: case Q5_K: {  /* lanes [sc0..7, m0..7] -> each scale and minimum twice */
            __m512i v = _mm512_cvtepu8_epi32(six_bits128(type, w + 4));
            __m512 d = _mm512_set1_ps(f16at(w)), dmin = _mm512_set1_ps(f16at(w + 2));
            *ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(pairs, v)));
            __m512i m = _mm512_permutexvar_epi32(_mm512_add_epi32(pairs, _mm512_set1_epi32(8)), v);
            *wm = _mm512_sub_ps(zero, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)));
            return;
        }
        case Q6_K:
            *ws = _mm512_mul_ps(_mm512_set1_ps(f16at(w + 208)),
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 192)))));
            *wm = _mm512_mul_ps(*ws, _mm512_set1_ps(-32.f));
            return;
        case Q2_K: {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));
            *ws = _mm512_mul_ps(_mm512_set1_ps(f16at(w + 80)), _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))));
            *wm = _mm512_sub_ps(zero, _mm512_mul_ps(_mm512_set1_ps(f16at(w + 82)), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4))));
            return;
        }
        case Q3_K: {
            __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(six_bits128(type, w + 96)), _mm512_set1_epi32(32));
            *ws = _mm512_mul_ps(_mm512_set1_ps(f16at(w + 108)), _mm512_cvtepi32_ps(v));
            *wm = _mm512_mul_ps(*ws, _mm512_set1_ps(-4.f));
            return;
        }
        default: {
            float s[16], m[16];
            kscales(type, w, nblk, s, m);
            *ws = _mm512_loadu_ps(s);
            *wm = _mm512_fmadd_ps(_mm512_set1_ps((float)-koffset(type)), *ws, _mm512_loadu_ps(m));
        }
    }
}
#endif
