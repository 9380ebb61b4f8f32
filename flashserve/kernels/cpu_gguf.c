/* GGUF block products on x86 CPUs with AVX2, FMA and F16C: y [M, N] = x [M, K] @ W^T.
 *
 * W stays in the file's blocks of 32 columns (row-major, K / 32 blocks a row):
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles;        w = d * (u - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; w = d * u + m
 *   Q8_0 (34 bytes): fp16 d, 32 int8;                     w = d * q
 * (byte i of the nibbles holds column i in its low half and column i + 16 in its high half).
 *
 * Each row of x is first quantized in blocks of 32 to int16 with its own scale (dx = amax /
 * 32767, round to nearest even): a relative error near 1e-5, against 2e-3 for bf16 activations
 * and 5e-3 for llama.cpp's int8 blocks, at the same speed here (the step is bound by reading W).
 * A block's product is then an exact integer dot product (16-bit pairs summed in 32 bits), scaled
 * in fp32: dw * dx * dot(u, xq) plus the block's offset times dx * sum(xq). Blocks are summed in
 * a fixed order, in two interleaved 8-lane fp32 accumulators; a row's result does not depend on
 * M, on the other rows, or on the thread count (threads split the output columns).
 * flashserve.kernels.cpu_native's references compute the same quantities in torch.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QK = 32, FS_Q4_0 = 0, FS_Q4_1 = 1, FS_Q8_0 = 2 };

typedef struct {  /* one activation block */
    float d;      /* scale: x ~= d * q */
    float s;      /* d * sum(q) */
    int16_t q[QK];
} xblock;

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* x [M, K] fp32 -> M * K / 32 blocks */
void fs_quantize_rows(const float *x, int64_t m_rows, int64_t k, xblock *out) {
    int64_t nb = k / QK;
    for (int64_t r = 0; r < m_rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *p = x + r * k + b * QK;
            xblock *o = out + r * nb + b;
            float amax = 0.0f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(p[i]));
            float d = amax / 32767.0f;
            float inv = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                int v = (int)nearbyintf(p[i] * inv);
                o->q[i] = (int16_t)v;
                sum += v;
            }
            o->d = d;
            o->s = d * (float)sum;
        }
    }
}

#define INLINE static inline __attribute__((always_inline))

INLINE __m256 int_dot(__m256i lo, __m256i hi, const int16_t *x) {  /* 16-bit columns 0..15 and 16..31 */
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
    return _mm256_cvtepi32_ps(p);
}

/* One weight block times one activation block: acc += dw * dx * dot(u, xq); returns the offset term. */
INLINE float block(const int qtype, const uint8_t *w, const xblock *x, __m256 *acc) {
    float dw = f16(w);
    __m256 dot;
    float offset;
    if (qtype == FS_Q8_0) {
        dot = int_dot(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 2))),
                      _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 18))), x->q);
        offset = 0.0f;
    } else {  /* nibble byte i widened to word i: columns i (low 4 bits) and i + 16 (high 4) */
        __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + (qtype == FS_Q4_1 ? 4 : 2))));
        dot = int_dot(_mm256_and_si256(b, _mm256_set1_epi16(15)), _mm256_srli_epi16(b, 4), x->q);
        offset = qtype == FS_Q4_1 ? f16(w + 2) * x->s : -8.0f * dw * x->s;
    }
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * x->d), dot, *acc);
    return offset;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Output columns [n0, n1) of every row of y, qtype a constant after inlining. One accumulator a
 * row: more (interleaved blocks, or several weight rows at once) measured no faster. */
INLINE void columns(const int qtype, const uint8_t *w, int64_t n_cols, int64_t nb, const xblock *xq, int64_t m_rows,
                    float *y, int64_t n0, int64_t n1) {
    const int64_t bb = qtype == FS_Q4_0 ? 18 : qtype == FS_Q4_1 ? 20 : 34;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * nb * bb;
        for (int64_t m = 0; m < m_rows; m++) {
            const xblock *x = xq + m * nb;
            __m256 acc = _mm256_setzero_ps();
            float offset = 0.0f;
            for (int64_t b = 0; b < nb; b++) offset += block(qtype, wr + b * bb, x + b, &acc);
            y[m * n_cols + n] = hsum(acc) + offset;
        }
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
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rstd), _mm256_loadu_ps(w + i)));
        float rs = _mm256_cvtss_f32(rstd);
        for (; i < dim; i++) o[i] = xr[i] * rs * w[i];
    }
}

static __thread xblock *scratch;  /* each calling thread's activation blocks, grown as needed */
static __thread int64_t scratch_blocks;

/* y [M, N] fp32 = x [M, K] fp32 times w (N rows of K / 32 blocks) transposed. Returns 0, or -1
 * when the activation blocks cannot be allocated. */
int fs_matmul(int qtype, const uint8_t *w, int64_t n_cols, int64_t k, const float *x, int64_t m_rows, float *y,
              int threads) {
    int64_t nb = k / QK;
    if (m_rows * nb > scratch_blocks) {
        xblock *grown = realloc(scratch, (size_t)(m_rows * nb) * sizeof(xblock));
        if (!grown) return -1;
        scratch = grown;
        scratch_blocks = m_rows * nb;
    }
    fs_quantize_rows(x, m_rows, k, scratch);
    const xblock *xq = scratch;
    /* Columns in chunks of 16 so that threads write whole cache lines of y. */
    int64_t chunks = (n_cols + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n0 = c * 16, n1 = n0 + 16 < n_cols ? n0 + 16 : n_cols;
        if (qtype == FS_Q4_0) columns(FS_Q4_0, w, n_cols, nb, xq, m_rows, y, n0, n1);
        else if (qtype == FS_Q4_1) columns(FS_Q4_1, w, n_cols, nb, xq, m_rows, y, n0, n1);
        else columns(FS_Q8_0, w, n_cols, nb, xq, m_rows, y, n0, n1);
    }
    return 0;
}
