/* GGUF block products on x86 CPUs with AVX2, FMA and F16C (AVX-VNNI or AVX-512 VNNI where the
 * build has them): y [M, N] = x [M, K] @ W^T.
 *
 * W holds the file's blocks of 32 columns split in planes (flashserve.kernels.cpu_native.split_blocks):
 *   qs [N, K / 2] (Q4_0, Q4_1, Q5_0: byte i of a block holds column i in its low half, i + 16 in
 *      its high half) or [N, K] (Q8_0: int8), d [N, K / 32] fp16 scales, m [N, K / 32] fp16
 *      offsets (Q4_1), qh [N, K / 32] uint32 fifth bits (Q5_0: bit j for column j);
 *   w = d * u + m (Q4_1), d * (u - 8) (Q4_0), d * (u + 16 * bit - 16) (Q5_0), d * q (Q8_0).
 * Q4_K's super-blocks come as Q4_1-like planes whose d and m are fp32 (its 6-bit sub-block scales
 * and minima times the super-block's fp16 ones: exact in fp32, not in fp16); Q5_K's likewise,
 * with Q5_0's fifth bits (w = d * (u + 16 * bit) + m). Q6_K's come as
 * Q8_0-like planes of q - 32 whose d and m are the fp32 scales of each block's two 16-column
 * halves (w = d * q for columns 0..15, m * q for 16..31).
 *
 * Each row of x is first quantized in blocks of 32 to int16 with its own scale (dx = amax /
 * 32767, round to nearest even): a relative error near 1e-5, against 2e-3 for bf16 activations
 * and 5e-3 for llama.cpp's int8 blocks, at the same speed here. A block's product is then an
 * exact integer dot product (16-bit pairs summed in 32 bits), scaled in fp32: dw * dx * dot(u, xq)
 * plus the block's offset times sx = dx * sum(xq). The blocks of a row are summed in a fixed
 * order, so a row's result does not depend on M, on the other rows, or on the thread count
 * (threads split the output columns). flashserve.kernels.cpu_native's references compute the
 * same quantities in torch.
 *
 * Group layout: each run of 8 blocks (all but a row's last nb % 8) is stored transposed, so that
 * one vector holds two columns of each of the 8 blocks and its pairwise products sum block i in
 * lane i. Chunk c (c < 16) of a group holds columns 2c, 2c + 1 of block 0, then of block 1 ... 7:
 * 16 int16 activations, or 16 Q8_0 / Q6_K bytes; a 4-bit chunk c < 8 holds the bytes of columns
 * 2c, 2c + 1 (and 2c + 16, 2c + 17 in their high halves). The 8 fifth-bit words of a Q5_0 or Q5_K
 * group: word 2p the fifth bits of the low halves of chunks 2p (bits 0..15) and 2p + 1 (16..31),
 * word 2p + 1 those of the high halves. A group's 8 dot products are then exact int32 lanes,
 * converted and scaled with the 8 blocks' scales in one operation each; the tail blocks keep the
 * file's order.
 *
 * Beside the products: RMSNorm, rope with the K/V cache writes, one-query attention, SiLU-and-mul
 * and GELU(tanh)-and-mul in fp32, LoRA adapters' deltas (fs_lora_add), and fs_decode_layer, a
 * decoder layer's decode step made of them (the Llama family's, and layers with q/k norms, norms
 * after the blocks, GELU and sliding windows such as Gemma 3's, with or without LoRA adapters);
 * fs_decode_stack runs it for every layer of a model in one call.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QK = 32, FS_Q4_0 = 0, FS_Q4_1 = 1, FS_Q8_0 = 2, FS_Q5_0 = 3, FS_Q4_K = 4, FS_Q6_K = 5, FS_Q5_K = 6,
       PREFETCH_ROWS = 4 };

#define BYTE_QUANTS(qtype) ((qtype) == FS_Q8_0 || (qtype) == FS_Q6_K) /* one int8 a column */
#define FIFTH_BITS(qtype) ((qtype) == FS_Q5_0 || (qtype) == FS_Q5_K)  /* nibbles and a qh plane */
#define FP32_SCALES(qtype) ((qtype) == FS_Q4_K || (qtype) == FS_Q5_K || (qtype) == FS_Q6_K)
#define OFFSETS(qtype) ((qtype) == FS_Q4_1 || (qtype) == FS_Q4_K || (qtype) == FS_Q5_K)  /* an m plane of offsets */

#define INLINE static inline __attribute__((always_inline))

/* x [M, K] fp32 -> xq [M, K] int16, dx [M, K / 32] and sx = dx * sum(xq) [M, K / 32] */
void fs_quantize_rows(const float *x, int64_t m_rows, int64_t k, int16_t *xq, float *dx, float *sx) {
    int64_t nb = k / QK;
    for (int64_t r = 0; r < m_rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *p = x + r * k + b * QK;
            int16_t *q = xq + r * k + b * QK;
            float amax = 0.0f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(p[i]));
            float d = amax / 32767.0f;
            float inv = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                int v = (int)nearbyintf(p[i] * inv);
                q[i] = (int16_t)v;
                sum += v;
            }
            dx[r * nb + b] = d;
            sx[r * nb + b] = d * (float)sum;
        }
    }
}

/* Rows of int16 blocks [M, K] into the group layout (top of the file), in place. */
void fs_group_layout(int16_t *xq, int64_t m_rows, int64_t k) {
    const int64_t groups = k / QK / 8;
    for (int64_t r = 0; r < m_rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            int16_t *p = xq + r * k + g * 8 * QK, t[8 * QK];
            memcpy(t, p, sizeof(t));
            for (int i = 0; i < 8; i++)
                for (int c = 0; c < 16; c++) {
                    p[16 * c + 2 * i] = t[QK * i + 2 * c];
                    p[16 * c + 2 * i + 1] = t[QK * i + 2 * c + 1];
                }
        }
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 fifth bits (bit i for word i) as 16-bit words of 16 or 0. */
INLINE __m256i fifth_bits(uint16_t bits) {
    const __m256i lane = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                           (short)32768);
    __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)bits), lane), lane);
    return _mm256_and_si256(set, _mm256_set1_epi16(16));
}

/* Block b of a weight row as 16-bit words: columns 0..15 in lo, 16..31 in hi. */
INLINE void block_words(const int qtype, const uint8_t *qs, const uint32_t *qh, int64_t b, __m256i *lo, __m256i *hi) {
    if (BYTE_QUANTS(qtype)) {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + b * 32)));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + b * 32 + 16)));
    } else {  /* nibble byte i widened to word i: column i in its low 4 bits, i + 16 in the next 4 */
        __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + b * 16)));
        *lo = _mm256_and_si256(bytes, _mm256_set1_epi16(15));
        *hi = _mm256_srli_epi16(bytes, 4);
        if (FIFTH_BITS(qtype)) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)  /* 16 added where the bit is set, as group_dots does */
            *lo = _mm256_mask_add_epi16(*lo, (__mmask16)qh[b], *lo, _mm256_set1_epi16(16));
            *hi = _mm256_mask_add_epi16(*hi, (__mmask16)(qh[b] >> 16), *hi, _mm256_set1_epi16(16));
#else
            *lo = _mm256_or_si256(*lo, fifth_bits((uint16_t)qh[b]));
            *hi = _mm256_or_si256(*hi, fifth_bits((uint16_t)(qh[b] >> 16)));
#endif
        }
    }
}

/* A block's words times block b of an activation row: 8 lanes of exact int32 sums, as fp32. */
INLINE __m256 words_dot(__m256i lo, __m256i hi, const int16_t *x, int64_t b) {
    x += b * QK;
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
    return _mm256_cvtepi32_ps(p);
}

enum { MAX_TILE = 4 };

/* acc + the pairwise products of 16-bit words w and 16 words at x, summed in 32-bit lanes. */
INLINE __m256i dot_add(__m256i acc, __m256i w, const int16_t *x) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, w, xv);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, w, xv);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, xv));
#endif
}

/* A group of 8 blocks of a weight row (g: its bytes, qhg: its fifth-bit words) times R activation
 * rows (x: the group's 256 values of row 0, rows k apart), both in the group layout (top of the
 * file): lane i of dots[r] is block i's exact integer dot product with row r (Q6_K: of its columns
 * 0..15, and those of 16..31 in highs[r]). Integer sums, so the AVX2, AVX-VNNI and AVX-512 forms
 * give the same lanes. */
INLINE void group_dots(const int qtype, const int R, const uint8_t *g, const uint32_t *qhg, const int16_t *x,
                       int64_t k, __m256i *dots, __m256i *highs) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    __m512i s0[MAX_TILE], s1[MAX_TILE];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm512_setzero_si512();
    if (BYTE_QUANTS(qtype)) {
        for (int p = 0; p < 8; p++) {  /* chunks 2p and 2p + 1: columns 0..15 of the blocks for p < 4 */
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(g + 32 * p)));
            for (int r = 0; r < R; r++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + r * k + 32 * p));
                if (p < 4) s0[r] = _mm512_dpwssd_epi32(s0[r], w, xv);
                else s1[r] = _mm512_dpwssd_epi32(s1[r], w, xv);
            }
        }
    } else {
        for (int p = 0; p < 4; p++) {  /* chunks 2p and 2p + 1: low nibbles columns 4p .. 4p + 3, high 16 more */
            __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(g + 32 * p)));
            __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(bytes, 4);
            if (FIFTH_BITS(qtype)) {
                lo = _mm512_mask_add_epi16(lo, (__mmask32)qhg[2 * p], lo, _mm512_set1_epi16(16));
                hi = _mm512_mask_add_epi16(hi, (__mmask32)qhg[2 * p + 1], hi, _mm512_set1_epi16(16));
            }
            for (int r = 0; r < R; r++) {
                s0[r] = _mm512_dpwssd_epi32(s0[r], lo, _mm512_loadu_si512((const void *)(x + r * k + 32 * p)));
                s1[r] = _mm512_dpwssd_epi32(s1[r], hi, _mm512_loadu_si512((const void *)(x + r * k + 128 + 32 * p)));
            }
        }
    }
    for (int r = 0; r < R; r++) {  /* lanes 8..15: the odd chunks' */
        if (qtype == FS_Q6_K) {
            dots[r] = _mm256_add_epi32(_mm512_castsi512_si256(s0[r]), _mm512_extracti64x4_epi64(s0[r], 1));
            highs[r] = _mm256_add_epi32(_mm512_castsi512_si256(s1[r]), _mm512_extracti64x4_epi64(s1[r], 1));
        } else {
            __m512i sum = _mm512_add_epi32(s0[r], s1[r]);
            dots[r] = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
        }
    }
#else
    __m256i s0[MAX_TILE], s1[MAX_TILE];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm256_setzero_si256();
    if (BYTE_QUANTS(qtype)) {
        for (int c = 0; c < 8; c++) {  /* columns 2c, 2c + 1 of each block, and 16 more */
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(g + 16 * c)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(g + 16 * c + 128)));
            for (int r = 0; r < R; r++) {
                s0[r] = dot_add(s0[r], w0, x + r * k + 16 * c);
                s1[r] = dot_add(s1[r], w1, x + r * k + 16 * c + 128);
            }
        }
    } else {
        for (int c = 0; c < 8; c++) {  /* low nibbles columns 2c, 2c + 1 of each block, high ones 16 more */
            __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(g + 16 * c)));
            __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(bytes, 4);
            if (FIFTH_BITS(qtype)) {
                lo = _mm256_or_si256(lo, fifth_bits((uint16_t)(qhg[c & ~1] >> (16 * (c & 1)))));
                hi = _mm256_or_si256(hi, fifth_bits((uint16_t)(qhg[c | 1] >> (16 * (c & 1)))));
            }
            for (int r = 0; r < R; r++) {
                s0[r] = dot_add(s0[r], lo, x + r * k + 16 * c);
                s1[r] = dot_add(s1[r], hi, x + r * k + 128 + 16 * c);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        if (qtype == FS_Q6_K) dots[r] = s0[r], highs[r] = s1[r];
        else dots[r] = _mm256_add_epi32(s0[r], s1[r]);
    }
#endif
}

/* One weight row (qs, d, m, qh) times R quantized activation rows (x, dx, sx; rows k, nb apart),
 * R <= MAX_TILE a constant after inlining: each group (and tail block) is widened once for the R
 * rows, and each row's sums take the same operations in the same order whatever R is, so a row's
 * result does not depend on the rows beside it. */
INLINE void tile_dot(const int qtype, const int R, const uint8_t *qs, const void *d, const void *m,
                     const uint32_t *qh, const int16_t *x, const float *dx, const float *sx, int64_t k, int64_t nb,
                     float *out, int64_t out_stride) {
    const uint16_t *dh = d, *mh = m;  /* fp16 scales and offsets, or fp32 ones (the K-quants) */
    const float *df = d, *mf = m;
    const int fp32 = FP32_SCALES(qtype);
    __m256 acc[MAX_TILE], off[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = off[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 dw = fp32 ? _mm256_loadu_ps(df + b) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + b)));
        __m256 mw = fp32 ? _mm256_loadu_ps(mf + b)
                    : qtype == FS_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mh + b))) : dw;
        __m256i dots[MAX_TILE], highs[MAX_TILE];
        group_dots(qtype, R, qs + b * (BYTE_QUANTS(qtype) ? QK : QK / 2), FIFTH_BITS(qtype) ? qh + b : 0,
                   x + b * QK, k, dots, highs);
        for (int r = 0; r < R; r++) {
            __m256 dxr = _mm256_loadu_ps(dx + r * nb + b);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dxr), _mm256_cvtepi32_ps(dots[r]), acc[r]);
            if (qtype == FS_Q6_K)
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(mw, dxr), _mm256_cvtepi32_ps(highs[r]), acc[r]);
            else if (qtype != FS_Q8_0) off[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(sx + r * nb + b), off[r]);
        }
    }
    float tail[MAX_TILE] = {0};
    for (; b < nb; b++) {  /* the last nb % 8 blocks, one at a time */
        float dw = fp32 ? df[b] : _cvtsh_ss(dh[b]);
        float mw = fp32 ? mf[b] : qtype == FS_Q4_1 ? _cvtsh_ss(mh[b]) : dw;
        __m256i lo, hi;
        block_words(qtype, qs, qh, b, &lo, &hi);
        for (int r = 0; r < R; r++) {
            if (qtype == FS_Q6_K) {  /* the two halves' sums apart, each with its scale */
                const int16_t *xb = x + r * k + b * QK;
                __m256 lo_dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xb)));
                __m256 hi_dot =
                    _mm256_cvtepi32_ps(_mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xb + 16))));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[r * nb + b]), lo_dot, acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(mw * dx[r * nb + b]), hi_dot, acc[r]);
                continue;
            }
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[r * nb + b]), words_dot(lo, hi, x + r * k, b), acc[r]);
            if (qtype != FS_Q8_0) tail[r] += mw * sx[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++) {
        float offset = hsum(off[r]) + tail[r];
        /* offset: 0 for Q8_0 and Q6_K */
        out[r * out_stride] = hsum(acc[r]) + (qtype == FS_Q4_0 ? -8.0f * offset : qtype == FS_Q5_0 ? -16.0f * offset
                                                                                                    : offset);
    }
}

/* Output columns [n0, n1) of every row of y (rows ldy apart), qtype a constant after inlining: one
 * activation row at a time for a single row (batch-1 decode), tiles of MAX_TILE rows and one of the
 * rest else. */
INLINE void columns(const int qtype, const uint8_t *qs, const void *d, const void *m, const uint32_t *qh,
                    int64_t ldy, int64_t k, const int16_t *xq, const float *dx, const float *sx, int64_t m_rows,
                    float *y, int64_t n0, int64_t n1) {
    const int64_t nb = k / QK, row_bytes = BYTE_QUANTS(qtype) ? k : k / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *q = qs + n * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64)  /* a few rows ahead: measured ~7% faster */
            _mm_prefetch((const char *)(q + PREFETCH_ROWS * row_bytes + off), _MM_HINT_T0);
        const int64_t sb = FP32_SCALES(qtype) ? 4 : 2;  /* bytes of a scale */
        const void *dn = (const char *)d + n * nb * sb;
        const void *mn = OFFSETS(qtype) || qtype == FS_Q6_K ? (const char *)m + n * nb * sb : 0;
        const uint32_t *qhn = FIFTH_BITS(qtype) ? qh + n * nb : 0;
        int64_t r = 0;
        for (; r + MAX_TILE <= m_rows; r += MAX_TILE)
            tile_dot(qtype, MAX_TILE, q, dn, mn, qhn, xq + r * k, dx + r * nb, sx + r * nb, k, nb, y + r * ldy + n,
                     ldy);
        const int16_t *xr = xq + r * k;
        const float *dxr = dx + r * nb, *sxr = sx + r * nb;
        float *yr = y + r * ldy + n;
        switch (m_rows - r) {  /* the rest, as one tile of its own size */
        case 3: tile_dot(qtype, 3, q, dn, mn, qhn, xr, dxr, sxr, k, nb, yr, ldy); break;
        case 2: tile_dot(qtype, 2, q, dn, mn, qhn, xr, dxr, sxr, k, nb, yr, ldy); break;
        case 1: tile_dot(qtype, 1, q, dn, mn, qhn, xr, dxr, sxr, k, nb, yr, ldy); break;
        }
    }
}

/* A buffer of the calling thread, grown as needed: each thread (a caller, or an OpenMP worker in
 * attention) keeps its own. */
typedef struct {
    void *data;
    size_t bytes;
} scratch;

/* s's memory, at least `need` bytes of it; NULL when it cannot grow. */
static void *scratch_at_least(scratch *s, size_t need) {
    if (need > s->bytes) {
        void *grown = realloc(s->data, need);
        if (!grown) return NULL;
        s->data = grown;
        s->bytes = need;
    }
    return s->data;
}

static __thread scratch activations;  /* the quantized activations of a product */

/* y [M, N] fp32 (rows ldy apart) = x [M, K] fp32 times W (N rows, planes as above; m NULL but for
 * Q4_1, Q4_K, Q5_K and Q6_K, qh NULL but for Q5_0 and Q5_K) transposed. Returns 0, or -1 when the
 * quantized activations cannot be allocated. */
static int matmul_into(int qtype, const uint8_t *qs, const void *d, const void *m, const uint32_t *qh,
                       int64_t n_cols, int64_t k, const float *x, int64_t m_rows, float *y, int64_t ldy, int threads) {
    int64_t nb = k / QK;
    size_t need = (size_t)(m_rows * k) * sizeof(int16_t) + 2 * (size_t)(m_rows * nb) * sizeof(float);
    float *dx = scratch_at_least(&activations, need);
    if (!dx) return -1;
    float *sx = dx + m_rows * nb;
    int16_t *xq = (int16_t *)(sx + m_rows * nb);
    fs_quantize_rows(x, m_rows, k, xq, dx, sx);
    fs_group_layout(xq, m_rows, k);
    /* Columns in chunks of 16 so that threads write whole cache lines of y. */
    int64_t chunks = (n_cols + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * 16, n1 = n0 + 16 < n_cols ? n0 + 16 : n_cols;
        if (qtype == FS_Q4_0) columns(FS_Q4_0, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else if (qtype == FS_Q4_1) columns(FS_Q4_1, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else if (qtype == FS_Q4_K) columns(FS_Q4_K, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else if (qtype == FS_Q6_K) columns(FS_Q6_K, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else if (qtype == FS_Q5_K) columns(FS_Q5_K, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else if (qtype == FS_Q5_0) columns(FS_Q5_0, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
        else columns(FS_Q8_0, qs, d, m, qh, ldy, k, xq, dx, sx, m_rows, y, n0, n1);
    }
    return 0;
}

/* y [M, N] fp32 = x [M, K] fp32 times W transposed (matmul_into with y's rows packed). */
int fs_matmul(int qtype, const uint8_t *qs, const void *d, const void *m, const uint32_t *qh, int64_t n_cols,
              int64_t k, const float *x, int64_t m_rows, float *y, int threads) {
    return matmul_into(qtype, qs, d, m, qh, n_cols, k, x, m_rows, y, n_cols, threads);
}

/* Rope on the q and k heads of qkv [T, (H + 2 Hkv) D] (rotate-half over whole heads), q into q_out
 * [T, H, D], k and v into the caches' rows [slot, Hkv, D]: y = x * cos_full + swap_halves(x) *
 * sin_signed with cos_full, sin_signed [T, D]. Two roundings and an add per value, as the torch
 * formula (flashserve.layers.rotary.rotate_q_k) computes them: the library is built without
 * contracting them into FMAs, so the values are the same bit for bit. */
void fs_rope_store(const float *qkv, int64_t t_rows, int64_t heads, int64_t kv_heads, int64_t dim,
                   const float *cos_full, const float *sin_signed, float *q_out, float *k_cache, float *v_cache,
                   const int64_t *slots) {
    int64_t stride = (heads + 2 * kv_heads) * dim, half = dim / 2;
    for (int64_t t = 0; t < t_rows; t++) {
        const float *c = cos_full + t * dim, *s = sin_signed + t * dim, *row = qkv + t * stride;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            const float *x = row + h * dim;
            float *y = h < heads ? q_out + (t * heads + h) * dim : k_cache + (slots[t] * kv_heads + h - heads) * dim;
            for (int64_t i = 0; i < half; i++) {
                y[i] = x[i] * c[i] + x[i + half] * s[i];
                y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
        }
        memcpy(v_cache + slots[t] * kv_heads * dim, row + (heads + kv_heads) * dim,
               (size_t)(kv_heads * dim) * sizeof(float));
    }
}

/* out [M, D] = x / sqrt(mean(x^2) + eps) * w, row by row (8-lane fp32 sums of squares). */
void fs_rms_norm(const float *x, const float *w, int64_t m_rows, int64_t dim, float eps, float *out) {
    for (int64_t r = 0; r < m_rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; i < dim; i++) ss += xr[i] * xr[i];
        __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(ss / (float)dim + eps));
        for (i = 0; i + 8 <= dim; i += 8)
            _mm256_storeu_ps(o + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rstd), _mm256_loadu_ps(w + i)));
        float rs = _mm256_cvtss_f32(rstd);
        for (; i < dim; i++) o[i] = xr[i] * rs * w[i];
    }
}

/* e^x in 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
 * (truncation below 6e-9 relative), times 2^n built in the exponent bits; x is clamped to
 * [-87, 88], so the result is a normal float. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* Lanes [0, count) of 8 loaded from p, the others 0 (tails go through the same vector code). */
INLINE __m256 load_tail(const float *p, int64_t count) {
    float lanes[8] = {0};
    memcpy(lanes, p, (size_t)count * sizeof(float));
    return _mm256_loadu_ps(lanes);
}

INLINE void store_tail(float *p, __m256 v, int64_t count) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    memcpy(p, lanes, (size_t)count * sizeof(float));
}

/* silu(g) * u = g / (1 + e^-g) * u, in 8 lanes. */
INLINE __m256 silu_mul8(__m256 g, __m256 u) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

/* gelu_tanh(g) * u in 8 lanes: 0.5 g (1 + tanh y) with y = sqrt(2 / pi) (g + 0.044715 g^3) is
 * g / (1 + e^(-2 y)), computed so (1 + tanh y loses most of its digits where tanh y nears -1). */
INLINE __m256 gelu_tanh_mul8(__m256 g, __m256 u) {
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    __m256 inner = _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f), cube));
    __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), inner));  /* -2 sqrt(2 / pi) */
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

enum { FS_SILU = 0, FS_GELU_TANH = 1 };  /* the gate's activation */

/* out [T, I] = act(x[:, :I]) * x[:, I:] for x [T, 2 I], act a constant after inlining. */
INLINE void gate_mul(const int act, const float *x, int64_t t_rows, int64_t inter, float *out) {
    for (int64_t t = 0; t < t_rows; t++) {
        const float *g = x + t * 2 * inter, *u = g + inter;
        float *o = out + t * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i);
            _mm256_storeu_ps(o + i, act == FS_GELU_TANH ? gelu_tanh_mul8(gv, uv) : silu_mul8(gv, uv));
        }
        if (i < inter) {
            __m256 gv = load_tail(g + i, inter - i), uv = load_tail(u + i, inter - i);
            store_tail(o + i, act == FS_GELU_TANH ? gelu_tanh_mul8(gv, uv) : silu_mul8(gv, uv), inter - i);
        }
    }
}

/* out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2 I]. */
void fs_silu_mul(const float *x, int64_t t_rows, int64_t inter, float *out) {
    gate_mul(FS_SILU, x, t_rows, inter, out);
}

/* out [T, I] = gelu_tanh(x[:, :I]) * x[:, I:] for x [T, 2 I]. */
void fs_gelu_tanh_mul(const float *x, int64_t t_rows, int64_t inter, float *out) {
    gate_mul(FS_GELU_TANH, x, t_rows, inter, out);
}

enum { MAX_DIM = 512 };
static __thread scratch softmax_row;  /* a head's scores, then their exponentials */

/* One head: out [D] = softmax(scale * K q) V over s_len rows of k and v: row r at rows[r] * stride
 * (rows NULL: at r * stride); D a multiple of 8, at most MAX_DIM. Scores, then e^(score - max) and
 * their sum in 8 lanes, then the weighted rows of v summed in order, divided by the sum: the same
 * values wherever the rows lie. Returns -1 without scratch memory. */
static int attend_head(const float *q, const float *k, const float *v, const int64_t *rows, int64_t s_len,
                       int64_t stride, int64_t dim, float scale, float *out) {
    float *scores = scratch_at_least(&softmax_row, (size_t)s_len * sizeof(float));
    if (!scores) return -1;
    float mx = -INFINITY;
    for (int64_t s = 0; s < s_len; s++) {
        const float *kr = k + (rows ? rows[s] : s) * stride;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kr + i), acc);
        scores[s] = hsum(acc) * scale;
        mx = fmaxf(mx, scores[s]);
    }
    __m256 top = _mm256_set1_ps(mx), total = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= s_len; s += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top));
        _mm256_storeu_ps(scores + s, e);
        total = _mm256_add_ps(total, e);
    }
    if (s < s_len) {
        int64_t rest = s_len - s;
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)rest),
                                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
        __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(load_tail(scores + s, rest), top)), keep);
        store_tail(scores + s, e, rest);
        total = _mm256_add_ps(total, e);
    }
    __m256 acc[MAX_DIM / 8];
    for (int64_t i = 0; i < dim / 8; i++) acc[i] = _mm256_setzero_ps();
    for (s = 0; s < s_len; s++) {
        const float *vr = v + (rows ? rows[s] : s) * stride;
        __m256 p = _mm256_set1_ps(scores[s]);
        for (int64_t i = 0; i < dim / 8; i++) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * i), acc[i]);
    }
    __m256 inv = _mm256_set1_ps(1.0f / hsum(total));
    for (int64_t i = 0; i < dim / 8; i++) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
    return 0;
}

/* One query row per call: q [H, D] over s_len keys of k, v [rows, Hkv, D] (rows kv_heads * dim
 * apart): rows[0..s_len) of them, or the first s_len where rows is NULL; the H / Hkv query heads of
 * a group share one kv head. out [H, D]. Heads are split over threads once the work is large; each
 * head's result does not depend on that. Returns 0, or -1 (no memory). */
int fs_attention(const float *q, const float *k, const float *v, const int64_t *rows, int64_t s_len, int64_t heads,
                 int64_t kv_heads, int64_t dim, float scale, float *out, int threads) {
    int64_t group = heads / kv_heads, stride = kv_heads * dim;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && s_len * heads >= 4096) \
    reduction(| : failed)
    for (int64_t h = 0; h < heads; h++)
        failed |= attend_head(q + h * dim, k + (h / group) * dim, v + (h / group) * dim, rows, s_len, stride, dim,
                              scale, out + h * dim);
    return failed ? -1 : 0;
}

static __thread scratch lora_rows;  /* a LoRA product's x A^T rows */

/* x [K] . a [K] in a fixed order: two 8-lane sums over 16 columns at a time (tails through the
 * same vector code), then across lanes. */
INLINE float dot_row(const float *x, const float *a, int64_t k) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(a + i + 8), acc1);
    }
    for (; i < k; i += 8) {
        int64_t rest = k - i < 8 ? k - i : 8;
        acc0 = _mm256_fmadd_ps(load_tail(x + i, rest), load_tail(a + i, rest), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

enum { LORA_COLS = 64 };  /* output columns of one LoRA task: 8 vectors of sums */

/* LoRA deltas added in place (flashserve.lora): for each row r of x [M, K] whose adapter
 * s = ids[r] is >= 0, y[r, :N] (rows ldy apart) += t B_s, where t [width] = x[r] A_s^T with A_s
 * the rows s * width .. (s + 1) * width of a [adapters * width, K] and B_s the same rows of b_t
 * [adapters * width, N]. t's entries are dot_row's; each output sums its width products in order
 * before the add. Threads split the (row, column) pairs, then the (row, 64 columns) tasks, so a
 * row's values depend on neither M nor the thread count. Returns 0; -1 when t cannot be allocated;
 * -2, changing nothing, when a row names an adapter >= adapters. */
int fs_lora_add(const float *x, int64_t m_rows, int64_t k, const float *a, const float *b_t, int64_t n,
                int64_t width, int64_t adapters, const int64_t *ids, float *y, int64_t ldy, int threads) {
    int64_t used = 0;
    for (int64_t r = 0; r < m_rows; r++) {
        if (ids[r] >= adapters) return -2;
        used += ids[r] >= 0;
    }
    if (!used) return 0;
    float *t = scratch_at_least(&lora_rows, (size_t)(m_rows * width) * sizeof(float));
    if (!t) return -1;
    const int64_t tasks = (n + LORA_COLS - 1) / LORA_COLS;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_rows * width; i++) {
            const int64_t r = i / width, s = ids[r];
            if (s >= 0) t[i] = dot_row(x + r * k, a + (s * width + i % width) * k, k);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m_rows * tasks; i++) {
            const int64_t r = i / tasks, s = ids[r], j0 = (i % tasks) * LORA_COLS;
            if (s < 0) continue;
            const int64_t cols = n - j0 < LORA_COLS ? n - j0 : LORA_COLS, full = cols / 8, rest = cols % 8;
            const float *tr = t + r * width, *b = b_t + s * width * n + j0;
            __m256 acc[LORA_COLS / 8 + 1];
            for (int64_t v = 0; v <= full; v++) acc[v] = _mm256_setzero_ps();
            for (int64_t c = 0; c < width; c++) {
                const __m256 tc = _mm256_set1_ps(tr[c]);
                const float *bc = b + c * n;
                for (int64_t v = 0; v < full; v++) acc[v] = _mm256_fmadd_ps(tc, _mm256_loadu_ps(bc + 8 * v), acc[v]);
                if (rest) acc[full] = _mm256_fmadd_ps(tc, load_tail(bc + 8 * full, rest), acc[full]);
            }
            float *yr = y + r * ldy + j0;
            for (int64_t v = 0; v < full; v++)
                _mm256_storeu_ps(yr + 8 * v, _mm256_add_ps(_mm256_loadu_ps(yr + 8 * v), acc[v]));
            if (rest) store_tail(yr + 8 * full, _mm256_add_ps(load_tail(yr + 8 * full, rest), acc[full]), rest);
        }
    }
    return 0;
}

/* A decoder layer's decode step in one call (flashserve.models.cpu_decode): the same functions
 * in the same order as its general forward, so the values are the same bit for bit. The layer is
 * described as data: its four products (each one matrix, or several whose outputs are
 * concatenated, as q, k and v of different types), which norms it has and where, the gate's
 * activation and the attention window. */
typedef struct {
    const uint8_t *qs;
    const void *d, *m;
    const uint32_t *qh;
    int64_t n, k, qtype;
} fs_weight;

enum { MAX_PARTS = 3 };

typedef struct {  /* one product: the parts' output columns side by side, n in all */
    fs_weight parts[MAX_PARTS];
    int64_t n_parts, n;
    const float *lora_a, *lora_b_t;  /* LoRA adapters (fs_lora_add's a and b_t; NULL: none) */
    int64_t lora_width, lora_adapters;
} fs_linear;

typedef struct {  /* an RMSNorm: its fp32 weight (NULL: the layer has none there) and eps */
    const float *w;
    double eps;
} fs_norm;

typedef struct {
    fs_linear qkv, o, gate_up, down;
    /* before attention; q's and k's heads before rope (Qwen3, Gemma 3); attention's output before
     * the residual add (Gemma 3); before the MLP; the MLP's output (Gemma 3) */
    fs_norm attn_in, q, k, attn_out, mlp_in, mlp_out;
    double scale;  /* of the scores */
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    int64_t activation;  /* the gate's: FS_SILU or FS_GELU_TANH */
    int64_t window;  /* keys a query sees, itself included (a sliding window); 0: every key before it */
} fs_layer;

typedef struct {
    int64_t t_rows, n_seqs;
    const int64_t *seqs;  /* [n_seqs, 4]: its first context row in the cache (-1: scattered), its length, its
                           * new rows, where its context rows start in rows (when scattered) */
    const int64_t *rows;  /* the context rows of the scattered sequences, one after the other */
    const int64_t *slots;  /* [T]: the cache row each new token's k and v go to */
    const float *cos_full, *sin_signed;  /* [T, D] */
    int64_t threads;
} fs_step;

static __thread scratch layer_rows;  /* a decode step's intermediate rows */

/* y [M, l->n] = x [M, K] times each part of l, the parts' columns side by side (the values of
 * concatenating the parts' products: each column is its own weight row's), plus each row's LoRA
 * delta where l has adapters and lora_ids (each row's adapter, -1: none) is given. */
static int linear(const fs_linear *l, const float *x, int64_t m_rows, float *y, int threads,
                  const int64_t *lora_ids) {
    int64_t col = 0;
    for (int64_t i = 0; i < l->n_parts; i++) {
        const fs_weight *w = &l->parts[i];
        if (matmul_into((int)w->qtype, w->qs, w->d, w->m, w->qh, w->n, w->k, x, m_rows, y + col, l->n, threads))
            return -1;
        col += w->n;
    }
    if (l->lora_a && lora_ids)
        return fs_lora_add(x, m_rows, l->parts[0].k, l->lora_a, l->lora_b_t, l->n, l->lora_width, l->lora_adapters,
                           lora_ids, y, l->n, threads);
    return 0;
}

/* Rows x [M, D] normalised in place by norm, where the layer has that norm. */
static void norm_in_place(const fs_norm *norm, float *x, int64_t m_rows, int64_t dim) {
    if (norm->w) fs_rms_norm(x, norm->w, m_rows, dim, (float)norm->eps, x);
}

/* The first key position a query at position p sees: p + 1 - window in a sliding window, else 0. */
INLINE int64_t first_key(const fs_layer *L, int64_t p) {
    return L->window > 0 && p + 1 > L->window ? p + 1 - L->window : 0;
}

/* hidden, residual (NULL: the first layer, whose residual stream is hidden) [T, hidden] -> out (the
 * MLP's output) and res_out (the residual stream after attention) [T, hidden], with the layer's
 * caches k_cache, v_cache [rows, Hkv, D] (norms the layer lacks are skipped):
 *   res = hidden + residual; qkv = qkv(rms_norm(res, attn_in)); q, k = rms_norm per head (q, k);
 *   a = attention(rope(q, k)); res = rms_norm(o(a), attn_out) + res;
 *   out = rms_norm(down(act_mul(gate_up(rms_norm(res, mlp_in)))), mlp_out).
 * Row j of a sequence with n new rows sits at position p = seq_len - n + j and attends over its
 * context rows first_key(p) .. p (a decode step, or a chain of drafts each seeing the keys of its
 * own decode step), read in place. out and res_out may be hidden and residual themselves (read only
 * in the first sum, before anything is written: fs_decode_stack). lora_ids [T]: each row's LoRA
 * adapter (-1: none) for the products that have adapters (NULL: no row has one). Returns 0; -1
 * when scratch memory cannot be allocated; -2 when a row names an adapter a product lacks. */
int fs_decode_layer(const fs_layer *L, const fs_step *st, const float *hidden, const float *residual, float *out,
                    float *res_out, float *k_cache, float *v_cache, const int64_t *lora_ids) {
    const int64_t t = st->t_rows, hid = L->hidden, h = L->heads, hkv = L->kv_heads, dim = L->head_dim;
    const int64_t qkv_cols = (h + 2 * hkv) * dim, inter = L->intermediate, stride = hkv * dim;
    const int threads = (int)st->threads;
    int rc;
    size_t need = (size_t)(t * (hid + qkv_cols + 2 * h * dim + 3 * inter)) * sizeof(float);
    float *x = scratch_at_least(&layer_rows, need);
    if (!x) return -1;
    float *qkv = x + t * hid, *q = qkv + t * qkv_cols, *att = q + t * h * dim;
    float *gate_up = att + t * h * dim, *act = gate_up + 2 * t * inter;
    for (int64_t i = 0; i < t * hid; i++) res_out[i] = residual ? hidden[i] + residual[i] : hidden[i];
    fs_rms_norm(res_out, L->attn_in.w, t, hid, (float)L->attn_in.eps, x);
    if ((rc = linear(&L->qkv, x, t, qkv, threads, lora_ids))) return rc;
    for (int64_t r = 0; r < t; r++) {
        norm_in_place(&L->q, qkv + r * qkv_cols, h, dim);
        norm_in_place(&L->k, qkv + r * qkv_cols + h * dim, hkv, dim);
    }
    fs_rope_store(qkv, t, h, hkv, dim, st->cos_full, st->sin_signed, q, k_cache, v_cache, st->slots);
    int64_t row = 0;
    for (int64_t i = 0; i < st->n_seqs; i++) {
        const int64_t *seq = st->seqs + 4 * i, first = seq[0], seq_len = seq[1], n = seq[2];
        const int64_t *rows = first < 0 ? st->rows + seq[3] : NULL;
        for (int64_t j = 0; j < n; j++, row++) {
            const int64_t p = seq_len - n + j, lo = first_key(L, p);
            const int64_t at = rows ? 0 : (first + lo) * stride;  /* consecutive rows: from the first key */
            if (fs_attention(q + row * h * dim, k_cache + at, v_cache + at, rows ? rows + lo : NULL, p + 1 - lo, h,
                             hkv, dim, (float)L->scale, att + row * h * dim, threads))
                return -1;
        }
    }
    if ((rc = linear(&L->o, att, t, out, threads, lora_ids))) return rc;
    norm_in_place(&L->attn_out, out, t, hid);
    for (int64_t i = 0; i < t * hid; i++) res_out[i] = out[i] + res_out[i];
    fs_rms_norm(res_out, L->mlp_in.w, t, hid, (float)L->mlp_in.eps, x);
    if ((rc = linear(&L->gate_up, x, t, gate_up, threads, lora_ids))) return rc;
    if (L->activation == FS_GELU_TANH) fs_gelu_tanh_mul(gate_up, t, inter, act);
    else fs_silu_mul(gate_up, t, inter, act);
    if ((rc = linear(&L->down, act, t, out, threads, lora_ids))) return rc;
    norm_in_place(&L->mlp_out, out, t, hid);
    return 0;
}

/* A decode step through a stack of n_layers layers in one call: layer i is fs_decode_layer of
 * layers[i] with the step steps[step_of[i]] (the step of its rope base and KV-cache group) and its
 * caches k_caches[i], v_caches[i]. The residual stream is carried as the per-layer calls carry it:
 * layer 0 reads hidden and residual (NULL: the first layer of the model), each later layer the out
 * and res_out of the one before, updated in place (fs_decode_layer reads its hidden and residual
 * rows only in its first sum, before it writes out or res_out, so the values are those of separate
 * calls). out, res_out [T, hidden]: the last layer's. lora_ids and the value returned: as
 * fs_decode_layer's. */
int fs_decode_stack(const fs_layer *layers, int64_t n_layers, const fs_step *steps, const int64_t *step_of,
                    float *const *k_caches, float *const *v_caches, const float *hidden, const float *residual,
                    float *out, float *res_out, const int64_t *lora_ids) {
    for (int64_t i = 0; i < n_layers; i++) {
        int rc = fs_decode_layer(&layers[i], &steps[step_of[i]], i ? out : hidden, i ? res_out : residual, out,
                                 res_out, k_caches[i], v_caches[i], lora_ids);
        if (rc) return rc;
    }
    return 0;
}

