/* Reference float32 ops. The matmul is blocked (rows of W x tiles of tokens) and vectorised with
 * GCC/Clang vector extensions; each dot product is always reduced in the same order (8 lanes over
 * k, then a fixed horizontal sum, then the tail), so results are independent of the tiling. */
#include <math.h>
#include <string.h>

#include "kvl_cpu.h"

typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum8(v8f v) {
    float a = (v[0] + v[4]) + (v[1] + v[5]);
    float b = (v[2] + v[6]) + (v[3] + v[7]);
    return a + b;
}

/* ------------------------------------------------------------ matmul */

#define MM_ROWS 32 /* rows of W per task */
#define MM_TT 4    /* tokens per tile */

typedef struct {
    float *out;
    int64_t ldo;
    const float *x;
    const float *w;
    int64_t n, M, K;
} mm_ctx;

/* dot of x (K floats) with a W row, in the canonical order */
static inline float dot_f32(const float *x, const float *w, int64_t K) {
    v8f acc = {0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc += ld8(x + k) * ld8(w + k);
    float s = hsum8(acc);
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

static void mm_task(void *vctx, int64_t task) {
    const mm_ctx *c = vctx;
    int64_t m0 = task * MM_ROWS, m1 = m0 + MM_ROWS < c->M ? m0 + MM_ROWS : c->M;
    const int64_t K = c->K;
    const float *W = c->w;
    int64_t t = 0;
    /* tiles of MM_TT tokens x 2 rows: 8 accumulators, same per-element order as dot_f32 */
    for (; t + MM_TT <= c->n; t += MM_TT) {
        const float *x0 = c->x + (t + 0) * K, *x1 = c->x + (t + 1) * K;
        const float *x2 = c->x + (t + 2) * K, *x3 = c->x + (t + 3) * K;
        int64_t m = m0;
        for (; m + 2 <= m1; m += 2) {
            const float *w0 = W + m * K, *w1 = w0 + K;
            v8f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0},
                a31 = {0};
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) {
                v8f wa = ld8(w0 + k), wb = ld8(w1 + k);
                v8f y0 = ld8(x0 + k), y1 = ld8(x1 + k), y2 = ld8(x2 + k), y3 = ld8(x3 + k);
                a00 += y0 * wa; a01 += y0 * wb;
                a10 += y1 * wa; a11 += y1 * wb;
                a20 += y2 * wa; a21 += y2 * wb;
                a30 += y3 * wa; a31 += y3 * wb;
            }
            float s[4][2] = {{hsum8(a00), hsum8(a01)}, {hsum8(a10), hsum8(a11)},
                             {hsum8(a20), hsum8(a21)}, {hsum8(a30), hsum8(a31)}};
            const float *xs[4] = {x0, x1, x2, x3};
            for (; k < K; k++)
                for (int i = 0; i < 4; i++) {
                    s[i][0] += xs[i][k] * w0[k];
                    s[i][1] += xs[i][k] * w1[k];
                }
            for (int i = 0; i < 4; i++) {
                c->out[(t + i) * c->ldo + m] = s[i][0];
                c->out[(t + i) * c->ldo + m + 1] = s[i][1];
            }
        }
        for (; m < m1; m++)
            for (int i = 0; i < 4; i++) c->out[(t + i) * c->ldo + m] = dot_f32(c->x + (t + i) * K, W + m * K, K);
    }
    for (; t < c->n; t++)
        for (int64_t m = m0; m < m1; m++) c->out[t * c->ldo + m] = dot_f32(c->x + t * K, W + m * K, K);
}

void kvl_cpu_matmul(kvl_pool *p, float *out, int64_t ldo, const float *x, const float *w,
                    int64_t n, int64_t M, int64_t K) {
    if (n <= 0 || M <= 0) return;
    mm_ctx c = {out, ldo, x, w, n, M, K};
    kvl_pool_for(p, (M + MM_ROWS - 1) / MM_ROWS, mm_task, &c);
}

/* ------------------------------------------------------------ elementwise */

void kvl_cpu_rmsnorm(float *y, const float *x, const float *g, int64_t n, int64_t dim, float eps) {
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * dim;
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / (double)dim + (double)eps));
        float *yr = y + t * dim;
        for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * inv * g[i];
    }
}

void kvl_cpu_rope_table(float *cos_t, float *sin_t, const int32_t *pos, int64_t n, int head_dim,
                        double theta) {
    int half = head_dim / 2;
    for (int64_t t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            double inv = pow(theta, -(double)(2 * i) / (double)head_dim);
            double a = (double)pos[t] * inv;
            cos_t[t * half + i] = (float)cos(a);
            sin_t[t * half + i] = (float)sin(a);
        }
}

void kvl_cpu_rope_table_delta(float *cos_t, float *sin_t, int64_t delta, int head_dim,
                              double theta) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        double inv = pow(theta, -(double)(2 * i) / (double)head_dim);
        double a = (double)delta * inv;
        cos_t[i] = (float)cos(a);
        sin_t[i] = (float)sin(a);
    }
}

void kvl_cpu_rope(float *x, int64_t ld, int64_t n, int n_heads, int head_dim, int style,
                  const float *cos_t, const float *sin_t) {
    int half = head_dim / 2;
    for (int64_t t = 0; t < n; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + t * ld + (int64_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                int a = style == 0 ? i : 2 * i, b = style == 0 ? i + half : 2 * i + 1;
                float x0 = v[a], x1 = v[b];
                v[a] = x0 * c[i] - x1 * s[i];
                v[b] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

void kvl_cpu_swiglu(float *h, const float *g, const float *u, int64_t n, int64_t dim) {
    for (int64_t i = 0; i < n * dim; i++) {
        float x = g[i];
        h[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

void kvl_cpu_add(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* ------------------------------------------------------------ attention */

typedef struct {
    float *out;
    int64_t ldo;
    const float *q;
    int64_t ldq;
    const int32_t *qpos;
    const float *k, *v;
    const int32_t *kpos;
    int64_t n_kv;
    int n_heads, n_kv_heads, hd;
} att_ctx;

/* one task = one query token, all heads; scores in a heap scratch per task */
static void att_task(void *vctx, int64_t i) {
    const att_ctx *c = vctx;
    const int hd = c->hd, group = c->n_heads / c->n_kv_heads;
    const int64_t kv_ld = (int64_t)c->n_kv_heads * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *sc = malloc(sizeof(float) * (size_t)(c->n_kv > 0 ? c->n_kv : 1));
    KVL_ASSERT(sc != NULL);
    for (int h = 0; h < c->n_heads; h++) {
        const float *qh = c->q + i * c->ldq + (int64_t)h * hd;
        float *oh = c->out + i * c->ldo + (int64_t)h * hd;
        const int kh = h / group;
        float mx = -INFINITY;
        for (int64_t j = 0; j < c->n_kv; j++) {
            if (c->kpos[j] > c->qpos[i]) {
                sc[j] = -INFINITY;
                continue;
            }
            const float *kj = c->k + j * kv_ld + (int64_t)kh * hd;
            float s = dot_f32(qh, kj, hd) * scale;
            sc[j] = s;
            if (s > mx) mx = s;
        }
        for (int d = 0; d < hd; d++) oh[d] = 0;
        if (mx == -INFINITY) continue;
        double sum = 0;
        for (int64_t j = 0; j < c->n_kv; j++) {
            float e = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
            sc[j] = e;
            sum += e;
        }
        float inv = (float)(1.0 / sum);
        for (int64_t j = 0; j < c->n_kv; j++) {
            if (sc[j] == 0.0f) continue;
            const float *vj = c->v + j * kv_ld + (int64_t)kh * hd;
            float pj = sc[j] * inv;
            for (int d = 0; d < hd; d++) oh[d] += pj * vj[d];
        }
    }
    free(sc);
}

void kvl_cpu_attention(kvl_pool *p, float *out, int64_t ldo, const float *q, int64_t ldq,
                       const int32_t *qpos, int64_t n_q, const float *k, const float *v,
                       const int32_t *kpos, int64_t n_kv, int n_heads, int n_kv_heads, int hd) {
    att_ctx c = {out, ldo, q, ldq, qpos, k, v, kpos, n_kv, n_heads, n_kv_heads, hd};
    kvl_pool_for(p, n_q, att_task, &c);
}

void kvl_cpu_attention_mass(float *mass, const float *q, int64_t ldq, const int32_t *qpos, int64_t n_q,
                            const float *k, const int32_t *kpos, const uint8_t *use, int64_t n_kv,
                            int n_heads, int n_kv_heads, int hd) {
    const int group = n_heads / n_kv_heads;
    const int64_t kv_ld = (int64_t)n_kv_heads * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    double *acc = calloc((size_t)(n_kv > 0 ? n_kv : 1), sizeof *acc);
    float *sc = malloc(sizeof(float) * (size_t)(n_kv > 0 ? n_kv : 1));
    KVL_ASSERT(acc != NULL && sc != NULL);
    for (int64_t i = 0; i < n_q; i++)
        for (int h = 0; h < n_heads; h++) {
            const float *qh = q + i * ldq + (int64_t)h * hd;
            float mx = -INFINITY;
            for (int64_t j = 0; j < n_kv; j++) {
                if (kpos[j] > qpos[i] || (use && !use[j])) {
                    sc[j] = -INFINITY;
                    continue;
                }
                sc[j] = dot_f32(qh, k + j * kv_ld + (int64_t)(h / group) * hd, hd) * scale;
                if (sc[j] > mx) mx = sc[j];
            }
            if (mx == -INFINITY) continue;
            double sum = 0;
            for (int64_t j = 0; j < n_kv; j++) {
                sc[j] = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
                sum += sc[j];
            }
            for (int64_t j = 0; j < n_kv; j++) acc[j] += sc[j] / sum;
        }
    for (int64_t j = 0; j < n_kv; j++) mass[j] = (float)acc[j];
    free(acc);
    free(sc);
}
