/* Every CUDA kernel of kernels/cuda against its CPU reference (kernels/cpu), on fresh random
 * inputs, with outputs poisoned (NaN bytes) before each launch so that an unwritten element fails.
 * Skips (exit 77) without a GPU. KVL_LONG=1 adds larger attention shapes. */
#include <cuda_runtime_api.h>
#include <stdint.h>

/* gcc 13 follows constant-propagated sizes of unreachable paths into malloc and warns */
#pragma GCC diagnostic ignored "-Walloc-size-larger-than="

#include "kvl_cpu.h"
#include "kvl_cuda.h"
#include "kvl_synth.h"
#include "kvl_test.h"

static uint64_t rng = 0x1234567u;
static float frand(void) { /* [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((double)(rng >> 11) * (1.0 / 4503599627370496.0) - 1.0);
}
static int irand(int n) { return (int)((frand() + 1.0f) * 0.5f * (float)n) % n; }

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static void *dup_dev(const void *h, size_t bytes) {
    void *d = NULL;
    CK(cudaMalloc(&d, bytes ? bytes : 1));
    if (bytes) CK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}
static void *poisoned(size_t bytes) {
    void *d = NULL;
    CK(cudaMalloc(&d, bytes ? bytes : 1));
    CK(cudaMemset(d, 0xff, bytes ? bytes : 1)); /* NaN in f32 and bf16 */
    return d;
}
static void fetch(void *h, const void *d, size_t bytes) {
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}
static float *rand_f(size_t n) {
    if (n > ((size_t)1 << 32)) exit(3); /* a bound the compiler can see */
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}
static uint16_t *to_bf(const float *x, size_t n) {
    if (n > ((size_t)1 << 32)) exit(3);
    uint16_t *b = malloc(n * 2);
    for (size_t i = 0; i < n; i++) b[i] = kvl_f32_to_bf16(x[i]);
    return b;
}
static void round_bf(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = kvl_bf16_to_f32(kvl_f32_to_bf16(x[i]));
}
static float *bf_to_f(const uint16_t *b, size_t n) {
    if (n > ((size_t)1 << 32)) exit(3);
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = kvl_bf16_to_f32(b[i]);
    return x;
}
static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static void test_synth_convert(void) {
    size_t n = 100003;
    void *d = poisoned(n * 4);
    float *h = malloc(n * 4), *ref = malloc(n * 4);
    for (int norm = 0; norm < 2; norm++) {
        CK(kvl_cu_synth_fill(d, KVL_CU_F32, 77, 5, n, norm, 0.125f, 0));
        fetch(h, d, n * 4);
        for (size_t i = 0; i < n; i++) ref[i] = kvl_synth_weight(77, 5, i, norm, 0.125f);
        CHECK(memcmp(h, ref, n * 4) == 0);
    }
    uint16_t *hb = malloc(n * 2);
    CK(cudaMemset(d, 0xff, n * 4));
    CK(kvl_cu_synth_fill(d, KVL_CU_BF16, 77, 5, n, 0, 0.125f, 0));
    fetch(hb, d, n * 2);
    int same = 1;
    for (size_t i = 0; i < n; i++) same &= hb[i] == kvl_f32_to_bf16(kvl_synth_weight(77, 5, i, 0, 0.125f));
    CHECK(same);
    /* f32 -> bf16 -> f32 conversions, bit-exact with the host's round-to-nearest-even */
    float *x = rand_f(n);
    for (size_t i = 0; i < n; i += 7) x[i] *= 1e30f;
    void *dx = dup_dev(x, n * 4), *db = poisoned(n * 2), *dy = poisoned(n * 4);
    CK(kvl_cu_convert(db, KVL_CU_BF16, dx, KVL_CU_F32, n, 0));
    CK(kvl_cu_convert(dy, KVL_CU_F32, db, KVL_CU_BF16, n, 0));
    fetch(hb, db, n * 2);
    fetch(h, dy, n * 4);
    same = 1;
    for (size_t i = 0; i < n; i++) same &= hb[i] == kvl_f32_to_bf16(x[i]) && h[i] == kvl_bf16_to_f32(hb[i]);
    CHECK_MSG(same, "bf16 conversion differs from kvl_f32_to_bf16");
    cudaFree(d); cudaFree(dx); cudaFree(db); cudaFree(dy);
    free(h); free(ref); free(hb); free(x);
    printf("synth + convert ok\n");
}

static void test_copy_rows(void) {
    const int64_t n = 37, rows = 50;
    const int64_t cols_list[] = {64, 24, 13};
    for (int ci = 0; ci < 3; ci++) {
        int64_t cols = cols_list[ci], lds = cols + 8, ldd = cols + 16;
        int32_t sidx[37], didx[37];
        int perm[50];
        for (int i = 0; i < rows; i++) perm[i] = i;
        for (int i = rows - 1; i > 0; i--) { int j = irand(i + 1), t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
        for (int i = 0; i < n; i++) { sidx[i] = irand(rows); didx[i] = perm[i]; }
        float *src = rand_f((size_t)rows * lds);
        int32_t *dsi = dup_dev(sidx, sizeof sidx), *ddi = dup_dev(didx, sizeof didx);
        for (int mode = 0; mode < 3; mode++) { /* f32->f32, bf16->bf16, f32->bf16 */
            kvl_cu_dtype st = mode == 1 ? KVL_CU_BF16 : KVL_CU_F32, dt = mode == 0 ? KVL_CU_F32 : KVL_CU_BF16;
            uint16_t *sb = to_bf(src, (size_t)rows * lds);
            void *ds = st == KVL_CU_BF16 ? dup_dev(sb, (size_t)rows * lds * 2) : dup_dev(src, (size_t)rows * lds * 4);
            size_t es = kvl_cu_dtype_size(dt), bytes = (size_t)rows * ldd * es;
            void *dd = poisoned(bytes);
            CK(kvl_cu_copy_rows(dd, dt, ldd, ddi, ds, st, lds, dsi, n, cols, 0));
            void *h = malloc(bytes);
            fetch(h, dd, bytes);
            int ok = 1;
            for (int i = 0; i < n; i++)
                for (int64_t c = 0; c < cols; c++) {
                    float want = src[sidx[i] * lds + c];
                    if (dt == KVL_CU_BF16) {
                        uint16_t got = ((uint16_t *)h)[didx[i] * ldd + c];
                        ok &= got == kvl_f32_to_bf16(want);
                    } else {
                        ok &= ((float *)h)[didx[i] * ldd + c] == want;
                    }
                }
            CHECK_MSG(ok, "copy_rows cols %lld mode %d", (long long)cols, mode);
            free(h); free(sb); cudaFree(ds); cudaFree(dd);
        }
        free(src); cudaFree(dsi); cudaFree(ddi);
    }
    printf("copy_rows ok\n");
}

static void test_rmsnorm(void) {
    const int64_t n = 9, rows = 13, dim = 1000;
    float *x = rand_f((size_t)rows * dim), *add = rand_f((size_t)n * dim), *g = rand_f((size_t)dim);
    int32_t r[9];
    for (int i = 0; i < n; i++) r[i] = (int32_t)(rows - 1 - i);
    float *dx = dup_dev(x, (size_t)rows * dim * 4), *da = dup_dev(add, (size_t)n * dim * 4), *dg = dup_dev(g, (size_t)dim * 4);
    int32_t *dr = dup_dev(r, sizeof r);
    float *dy = poisoned((size_t)n * dim * 4);
    CK(kvl_cu_add_rmsnorm(dy, KVL_CU_F32, dx, dr, da, KVL_CU_F32, dg, n, dim, 1e-5f, 0));
    float *y = malloc((size_t)n * dim * 4), *xg = malloc((size_t)rows * dim * 4), *ref = malloc((size_t)n * dim * 4);
    fetch(y, dy, (size_t)n * dim * 4);
    fetch(xg, dx, (size_t)rows * dim * 4);
    for (int i = 0; i < n; i++) {
        kvl_cpu_add(x + (size_t)r[i] * dim, add + (size_t)i * dim, dim);
        kvl_cpu_rmsnorm(ref + (size_t)i * dim, x + (size_t)r[i] * dim, g, 1, dim, 1e-5f);
    }
    CHECK(memcmp(xg, x, (size_t)rows * dim * 4) == 0);
    double e = kvl_rel_err(y, ref, (size_t)n * dim);
    CHECK_MSG(e <= 1e-6 && all_finite(y, (size_t)n * dim), "rmsnorm rel err %.3e", e);
    /* bf16 output, no add, identity rows */
    uint16_t *yb = malloc((size_t)n * dim * 2);
    void *dyb = poisoned((size_t)n * dim * 2);
    CK(kvl_cu_add_rmsnorm(dyb, KVL_CU_BF16, dx, NULL, NULL, KVL_CU_F32, dg, n, dim, 1e-5f, 0));
    fetch(yb, dyb, (size_t)n * dim * 2);
    kvl_cpu_rmsnorm(ref, x, g, n, dim, 1e-5f);
    float *yf = bf_to_f(yb, (size_t)n * dim);
    e = kvl_rel_err(yf, ref, (size_t)n * dim);
    CHECK_MSG(e <= 4e-3 && all_finite(yf, (size_t)n * dim), "rmsnorm bf16 rel err %.3e", e);
    /* a bf16 addend (the engine's residual branch with KVL_CUDA_BRANCH=bf16): x += bf16(add) exactly */
    {
        uint16_t *ab = to_bf(add, (size_t)n * dim);
        float *af = bf_to_f(ab, (size_t)n * dim), *x2 = malloc((size_t)rows * dim * 4);
        memcpy(x2, x, (size_t)rows * dim * 4);
        void *dab = dup_dev(ab, (size_t)n * dim * 2);
        CK(kvl_cu_add_rmsnorm(NULL, KVL_CU_F32, dx, dr, dab, KVL_CU_BF16, NULL, n, dim, 1e-5f, 0));
        fetch(xg, dx, (size_t)rows * dim * 4);
        for (int i = 0; i < n; i++) kvl_cpu_add(x2 + (size_t)r[i] * dim, af + (size_t)i * dim, dim);
        CHECK_MSG(memcmp(xg, x2, (size_t)rows * dim * 4) == 0, "add_rmsnorm with a bf16 addend");
        free(ab); free(af); free(x2); cudaFree(dab);
    }
    printf("add_rmsnorm ok\n");
    free(x); free(add); free(g); free(y); free(xg); free(ref); free(yb); free(yf);
    cudaFree(dx); cudaFree(da); cudaFree(dg); cudaFree(dr); cudaFree(dy); cudaFree(dyb);
}

static void test_rope(void) {
    const int hds[] = {8, 16, 6, 64, 128};
    for (int hi = 0; hi < 5; hi++)
        for (int style = 0; style < 2; style++) {
            int hd = hds[hi], nh = 4, nkv = 2;
            int64_t n = 11, qd = nh * hd, kd = nkv * hd, ld = qd + 2 * kd + 3;
            float *qkv = rand_f((size_t)n * ld);
            int32_t pos[11];
            for (int i = 0; i < n; i++) pos[i] = i == 0 ? 0 : irand(200000);
            float *dqkv = dup_dev(qkv, (size_t)n * ld * 4);
            int32_t *dpos = dup_dev(pos, sizeof pos);
            float *dq = poisoned((size_t)n * qd * 4), *dk = poisoned((size_t)n * kd * 4), *dv = poisoned((size_t)n * kd * 4);
            CK(kvl_cu_rope_split(dq, KVL_CU_F32, dk, dv, KVL_CU_F32, dqkv, KVL_CU_F32, ld, dpos, n, nh, nkv, hd, style,
                                 500000.0, 0));
            float *q = malloc((size_t)n * qd * 4), *k = malloc((size_t)n * kd * 4), *v = malloc((size_t)n * kd * 4);
            fetch(q, dq, (size_t)n * qd * 4);
            fetch(k, dk, (size_t)n * kd * 4);
            fetch(v, dv, (size_t)n * kd * 4);
            float *cs = malloc((size_t)n * hd / 2 * 4), *sn = malloc((size_t)n * hd / 2 * 4);
            kvl_cpu_rope_table(cs, sn, pos, n, hd, 500000.0);
            kvl_cpu_rope(qkv, ld, n, nh, hd, style, cs, sn);
            kvl_cpu_rope(qkv + qd, ld, n, nkv, hd, style, cs, sn);
            double eq = 0, ek = 0;
            int vok = 1;
            float *rq = malloc((size_t)n * qd * 4), *rk = malloc((size_t)n * kd * 4);
            for (int i = 0; i < n; i++) {
                memcpy(rq + i * qd, qkv + i * ld, (size_t)qd * 4);
                memcpy(rk + i * kd, qkv + i * ld + qd, (size_t)kd * 4);
                vok &= memcmp(v + i * kd, qkv + i * ld + qd + kd, (size_t)kd * 4) == 0;
            }
            eq = kvl_rel_err(q, rq, (size_t)n * qd);
            ek = kvl_rel_err(k, rk, (size_t)n * kd);
            CHECK_MSG(eq <= 1e-6 && ek <= 1e-6 && vok && all_finite(q, (size_t)n * qd), "rope hd %d style %d: q %.3e k %.3e v %d",
                      hd, style, eq, ek, vok);
            free(qkv); free(q); free(k); free(v); free(cs); free(sn); free(rq); free(rk);
            cudaFree(dqkv); cudaFree(dpos); cudaFree(dq); cudaFree(dk); cudaFree(dv);
        }
    printf("rope_split ok\n");
}

static void test_rerotate(void) {
    for (int style = 0; style < 2; style++) {
        int L = 3, cap = 20, nkv = 2, hd = 16, kd = nkv * hd, s0 = 5, n = 9;
        int64_t delta = style ? -1234 : 70000;
        size_t tot = (size_t)L * 2 * cap * kd;
        float *kv = rand_f(tot), *got = malloc(tot * 4);
        float *d = dup_dev(kv, tot * 4);
        CK(kvl_cu_rerotate(d + (size_t)s0 * kd, KVL_CU_F32, L, 2 * (int64_t)cap * kd, n, kd, nkv, hd, style, 10000.0,
                           delta, 0));
        fetch(got, d, tot * 4);
        float cs[8], sn[8];
        kvl_cpu_rope_table_delta(cs, sn, delta, hd, 10000.0);
        for (int l = 0; l < L; l++)
            for (int s = 0; s < n; s++) kvl_cpu_rope(kv + ((size_t)l * 2 * cap + s0 + s) * kd, kd, 1, nkv, hd, style, cs, sn);
        double e = kvl_rel_err(got, kv, tot);
        CHECK_MSG(e <= 1e-6, "rerotate style %d rel err %.3e", style, e);
        free(kv); free(got); cudaFree(d);
    }
    printf("rerotate ok\n");
}

static void test_swiglu_dev_argmax(void) {
    int64_t n = 7, F = 333;
    float *gu = rand_f((size_t)n * 2 * F);
    for (size_t i = 0; i < (size_t)n * 2 * F; i++) gu[i] *= 8;
    float *dgu = dup_dev(gu, (size_t)n * 2 * F * 4), *dh = poisoned((size_t)n * F * 4);
    CK(kvl_cu_swiglu(dh, dgu, KVL_CU_F32, n, F, 0));
    float *h = malloc((size_t)n * F * 4), *ref = malloc((size_t)n * F * 4);
    fetch(h, dh, (size_t)n * F * 4);
    for (int64_t i = 0; i < n; i++) kvl_cpu_swiglu(ref + i * F, gu + i * 2 * F, gu + i * 2 * F + F, 1, F);
    double e = kvl_rel_err(h, ref, (size_t)n * F);
    CHECK_MSG(e <= 1e-6 && all_finite(h, (size_t)n * F), "swiglu rel err %.3e", e);
    /* deviation: fresh rows i against cached rows slots[i] */
    int64_t kd = 40, rows = 12;
    float *kn = rand_f((size_t)n * kd), *vn = rand_f((size_t)n * kd), *kc = rand_f((size_t)rows * kd), *vc = rand_f((size_t)rows * kd);
    int32_t slots[7] = {3, 0, 11, 5, 6, 2, 9};
    void *dkn = dup_dev(kn, (size_t)n * kd * 4), *dvn = dup_dev(vn, (size_t)n * kd * 4), *dkc = dup_dev(kc, (size_t)rows * kd * 4),
         *dvc = dup_dev(vc, (size_t)rows * kd * 4), *ds = dup_dev(slots, sizeof slots);
    float *dd = poisoned((size_t)n * 4), dev[7];
    for (int metric = 1; metric <= 3; metric++) {
        CK(kvl_cu_deviation(dd, dkn, dvn, dkc, dvc, KVL_CU_F32, ds, n, kd, metric, 0));
        fetch(dev, dd, sizeof dev);
        int ok = 1;
        for (int i = 0; i < n; i++) {
            double s = 0;
            for (int c = 0; c < kd; c++) {
                if (metric & 1) s += ((double)kn[i * kd + c] - kc[slots[i] * kd + c]) * ((double)kn[i * kd + c] - kc[slots[i] * kd + c]);
                if (metric & 2) s += ((double)vn[i * kd + c] - vc[slots[i] * kd + c]) * ((double)vn[i * kd + c] - vc[slots[i] * kd + c]);
            }
            ok &= fabs(dev[i] - s) <= 1e-6 * s;
        }
        CHECK_MSG(ok, "deviation metric %d", metric);
    }
    /* argmax: first maximum wins, like kvl_sample's greedy pick */
    int64_t V = 5000, R = 4;
    float *lg = rand_f((size_t)R * V);
    lg[1 * V + 17] = 5; lg[1 * V + 4000] = 5;
    lg[2 * V + 4999] = 9;
    float *dl = dup_dev(lg, (size_t)R * V * 4);
    int32_t *da = poisoned(R * 4), am[4];
    CK(kvl_cu_argmax(da, dl, R, V, 0));
    fetch(am, da, sizeof am);
    for (int r = 0; r < R; r++) CHECK_MSG(am[r] == (int32_t)kvl_argmax(lg + r * V, (size_t)V), "argmax row %d: %d", r, am[r]);
    free(gu); free(h); free(ref); free(kn); free(vn); free(kc); free(vc); free(lg);
    cudaFree(dgu); cudaFree(dh); cudaFree(dkn); cudaFree(dvn); cudaFree(dkc); cudaFree(dvc); cudaFree(ds); cudaFree(dd);
    cudaFree(dl); cudaFree(da);
    printf("swiglu, deviation, argmax ok\n");
}

/* one attention case: kind 0 = full causal prefill, 1 = random query subset, random key positions,
 * 2 = queries before every key (see nothing: zeros) mixed with ordinary ones */
static void attn_case(int hd, int nh, int nkv, int64_t n_kv, int64_t n_q, int kind, int bf16, int mode) {
    int64_t qd = (int64_t)nh * hd, kd = (int64_t)nkv * hd, ldq = qd + (bf16 ? 8 : 3);
    float *q = rand_f((size_t)n_q * ldq), *k = rand_f((size_t)n_kv * kd), *v = rand_f((size_t)n_kv * kd);
    for (size_t i = 0; i < (size_t)n_q * ldq; i++) q[i] *= 3; /* sharper softmax */
    int32_t *qpos = malloc((size_t)n_q * 4), *kpos = malloc((size_t)n_kv * 4);
    for (int64_t j = 0; j < n_kv; j++) kpos[j] = kind == 0 ? (int32_t)j : 100 + irand((int)n_kv * 2);
    for (int64_t i = 0; i < n_q; i++) {
        if (kind == 0) qpos[i] = (int32_t)(n_kv - n_q + i);
        else if (kind == 2 && i % 3 == 0) qpos[i] = irand(100);
        else qpos[i] = 100 + irand((int)n_kv * 2);
    }
    if (bf16) { round_bf(q, (size_t)n_q * ldq); round_bf(k, (size_t)n_kv * kd); round_bf(v, (size_t)n_kv * kd); }
    kvl_cu_dtype t = bf16 ? KVL_CU_BF16 : KVL_CU_F32;
    size_t es = bf16 ? 2 : 4;
    void *dq, *dk, *dv;
    if (bf16) {
        uint16_t *qb = to_bf(q, (size_t)n_q * ldq), *kb = to_bf(k, (size_t)n_kv * kd), *vb = to_bf(v, (size_t)n_kv * kd);
        dq = dup_dev(qb, (size_t)n_q * ldq * 2); dk = dup_dev(kb, (size_t)n_kv * kd * 2); dv = dup_dev(vb, (size_t)n_kv * kd * 2);
        free(qb); free(kb); free(vb);
    } else {
        dq = dup_dev(q, (size_t)n_q * ldq * 4); dk = dup_dev(k, (size_t)n_kv * kd * 4); dv = dup_dev(v, (size_t)n_kv * kd * 4);
    }
    int32_t *dqp = dup_dev(qpos, (size_t)n_q * 4), *dkp = dup_dev(kpos, (size_t)n_kv * 4);
    int64_t ldo = qd + 2;
    void *dout = poisoned((size_t)n_q * ldo * es), *ws = poisoned(kvl_cu_attention_ws(n_q, n_kv, nh, nkv, hd));
    CK(kvl_cu_attention(dout, ldo, dq, ldq, t, dqp, n_q, dk, dv, t, dkp, n_kv, nh, nkv, hd, ws, mode, 0));
    void *h = malloc((size_t)n_q * ldo * es);
    fetch(h, dout, (size_t)n_q * ldo * es);
    float *got = malloc((size_t)n_q * qd * 4), *ref = malloc((size_t)n_q * qd * 4);
    for (int64_t i = 0; i < n_q; i++)
        for (int64_t c = 0; c < qd; c++)
            got[i * qd + c] = bf16 ? kvl_bf16_to_f32(((uint16_t *)h)[i * ldo + c]) : ((float *)h)[i * ldo + c];
    kvl_cpu_attention(NULL, ref, qd, q, ldq, qpos, n_q, k, v, kpos, n_kv, nh, nkv, hd);
    double e = kvl_rel_err(got, ref, (size_t)n_q * qd);
    double tol = bf16 ? 1.5e-2 : 1e-5;
    CHECK_MSG(e <= tol && all_finite(got, (size_t)n_q * qd), "attention hd %d nh %d/%d n_kv %lld n_q %lld kind %d %s%s: rel err %.3e",
              hd, nh, nkv, (long long)n_kv, (long long)n_q, kind, bf16 ? "bf16" : "f32", mode == KVL_CU_ATT_GENERIC ? " generic" : mode == KVL_CU_ATT_MMA ? " mma.sync" : mode == KVL_CU_ATT_WG1 ? " wgmma x1" : mode == KVL_CU_ATT_WG2R ? " wgmma x2r" : mode == KVL_CU_ATT_WG2H ? " wgmma x2h" : mode == KVL_CU_ATT_WG3 ? " wgmma x3" : mode == KVL_CU_ATT_WG4 ? " wgmma x4" : mode == KVL_CU_ATT_WG4S3 ? " wgmma x4s3" : mode == KVL_CU_ATT_WG2 ? " wgmma x2" : "", e);
    if (kind == 2) { /* the blind queries must be exact zeros */
        int z = 1;
        for (int64_t i = 0; i < n_q; i++)
            if (qpos[i] < 100)
                for (int64_t c = 0; c < qd; c++) z &= got[i * qd + c] == 0.0f;
        CHECK_MSG(z, "queries that see no key must give zeros (hd %d)", hd);
    }
    free(q); free(k); free(v); free(qpos); free(kpos); free(h); free(got); free(ref);
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dqp); cudaFree(dkp); cudaFree(dout); cudaFree(ws);
}

static void test_attention(int longer) {
    /* generic kernel: any head_dim, float32 and bf16 KV, decode and prefill shapes */
    const int ghd[] = {8, 16, 6, 64, 100, 128, 256};
    for (int i = 0; i < 7; i++)
        for (int kind = 0; kind < 3; kind++) {
            attn_case(ghd[i], 4, 2, 300, kind == 0 ? 300 : 37, kind, 0, KVL_CU_ATT_GENERIC);
            attn_case(ghd[i], 8, 8, 1000, 1, kind == 2 ? 1 : kind, 0, KVL_CU_ATT_GENERIC); /* split-KV decode */
            attn_case(ghd[i], 4, 1, 777, 5, kind, 1, KVL_CU_ATT_GENERIC);
        }
    /* flash kernels (wgmma and mma.sync): bf16, head_dim 64 / 128, tails not multiples of 64 */
    const int fhd[] = {64, 128};
    const int modes[] = {KVL_CU_ATT_AUTO, KVL_CU_ATT_MMA, KVL_CU_ATT_WG1, KVL_CU_ATT_WG2R, KVL_CU_ATT_WG2H,
                         KVL_CU_ATT_WG3, KVL_CU_ATT_WG4, KVL_CU_ATT_WG4S3, KVL_CU_ATT_WG2, KVL_CU_ATT_WS,
                         KVL_CU_ATT_WSPP, KVL_CU_ATT_WS3};
    for (int mi = 0; mi < 12; mi++)
        for (int i = 0; i < 2; i++)
            for (int kind = 0; kind < 3; kind++) {
                attn_case(fhd[i], 8, 2, 200, kind == 0 ? 200 : 77, kind, 1, modes[mi]);
                attn_case(fhd[i], 4, 4, 1000, kind == 0 ? 1000 : 16, kind, 1, modes[mi]);
                attn_case(fhd[i], 32, 8, 513, kind == 0 ? 130 : 300, kind, 1, modes[mi]);
                if (longer) attn_case(fhd[i], 32, 8, 4100, kind == 0 ? 4100 : 700, kind, 1, modes[mi]);
            }
    printf("attention ok\n");
}

/* KVL_ATTN_BENCH=N: times a causal prefill attention of N tokens (32 heads, 8 KV heads, hd 128,
 * bf16) with each kernel; prints TFLOP/s (causal FLOPs: 4 * heads * hd * N(N+1)/2, or for a query
 * subset the sum over queries of 4 * heads * hd * (keys at or before it)). KVL_ATTN_BENCH_SEL=1:
 * the selective-recompute shape instead: 15% of N tokens spread evenly plus the last 64 as queries,
 * over all N + 64 keys. */
static void attn_bench(int64_t n, int sel) {
    int nh = 32, nkv = 8, hd = 128;
    int64_t qd = (int64_t)nh * hd, kd = (int64_t)nkv * hd, nk_t = sel ? n + 64 : n;
    int32_t *pos = malloc((size_t)nk_t * 4), *qp = malloc((size_t)nk_t * 4);
    for (int64_t i = 0; i < nk_t; i++) pos[i] = (int32_t)i;
    int64_t nq_t = 0;
    double fl = 0;
    for (int64_t i = 0; i < nk_t; i++) {
        int take = !sel || i >= n || (i * 3) / 20 != ((i + 1) * 3) / 20; /* selective: 15% spread evenly */
        if (take) {
            qp[nq_t++] = (int32_t)i;
            fl += 4.0 * nh * hd * (double)(i + 1);
        }
    }
    size_t nq = (size_t)nq_t * qd, nk = (size_t)nk_t * kd, nx = nq > nk ? nq : nk;
    float *x = rand_f(nx);
    uint16_t *b = to_bf(x, nx);
    void *dq = dup_dev(b, nq * 2), *dk = dup_dev(b, nk * 2), *dv = dup_dev(b, nk * 2), *dout = poisoned(nq * 2);
    int32_t *dp = dup_dev(pos, (size_t)nk_t * 4), *dqp = dup_dev(qp, (size_t)nq_t * 4);
    void *ws = poisoned(kvl_cu_attention_ws(nq_t, nk_t, nh, nkv, hd));
    const int modes[] = {KVL_CU_ATT_AUTO, KVL_CU_ATT_WG4, KVL_CU_ATT_WG2, KVL_CU_ATT_WG2R, KVL_CU_ATT_WG1,
                         KVL_CU_ATT_MMA, KVL_CU_ATT_WG3, KVL_CU_ATT_WG4S3, KVL_CU_ATT_WS, KVL_CU_ATT_WSPP,
                         KVL_CU_ATT_WS3};
    const char *names[] = {"default", "wgmma x4", "wgmma x2, 2 blocks/SM", "wgmma x2, 1 block/SM", "wgmma x1",
                           "mma.sync", "wgmma x3", "wgmma x4, 3 stages", "warp-specialised (ws)",
                           "warp-specialised, ping-pong (wspp)", "warp-specialised, 3 consumers, 64-key tiles (ws3)"};
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const char *rp = getenv("KVL_ATTN_BENCH_REPS"); /* sustained load: the default kernel N times back to back */
    if (rp && atoi(rp) > 0) {
        int nr = atoi(rp);
        float *t = malloc((size_t)nr * sizeof *t), lo = 1e30f, hi = 0;
        CK(cudaEventRecord(e0, 0));
        for (int r = 0; r < nr; r++) {
            CK(kvl_cu_attention(dout, qd, dq, qd, KVL_CU_BF16, dqp, nq_t, dk, dv, KVL_CU_BF16, dp, nk_t, nh, nkv, hd, ws,
                                KVL_CU_ATT_AUTO, 0));
            CK(cudaEventRecord(e1, 0));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&t[r], e0, e1));
            CK(cudaEventRecord(e0, 0));
            lo = t[r] < lo ? t[r] : lo;
            hi = t[r] > hi ? t[r] : hi;
        }
        printf("attention bench n=%lld default x%d back to back: first %.3f %.3f %.3f ... last %.3f %.3f %.3f ms, min %.3f max %.3f\n",
               (long long)n, nr, t[0], t[1 % nr], t[2 % nr], t[nr > 2 ? nr - 3 : 0], t[nr > 1 ? nr - 2 : 0], t[nr - 1], lo, hi);
        free(t);
    }
    for (int mi = 0; mi < 11 && !(rp && atoi(rp) > 0); mi++) {
        float best = 1e30f;
        for (int r = 0; r < 4; r++) {
            CK(cudaEventRecord(e0, 0));
            CK(kvl_cu_attention(dout, qd, dq, qd, KVL_CU_BF16, dqp, nq_t, dk, dv, KVL_CU_BF16, dp, nk_t, nh, nkv, hd, ws,
                                modes[mi], 0));
            CK(cudaEventRecord(e1, 0));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (r > 0 && ms < best) best = ms;
        }
        printf("attention bench n=%lld%s q=%lld %s: %.3f ms, %.1f TFLOP/s\n", (long long)n, sel ? " selective" : "",
               (long long)nq_t, names[mi], best, fl / best / 1e9);
    }
    free(x); free(b); free(pos); free(qp);
    cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dout); cudaFree(dp); cudaFree(dqp); cudaFree(ws);
}

int main(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) KVL_SKIP("no GPU");
    const char *lg = getenv("KVL_LONG"), *ab = getenv("KVL_ATTN_BENCH");
    if (ab && atol(ab) > 0) {
        const char *sb = getenv("KVL_ATTN_BENCH_SEL");
        attn_bench(atol(ab), sb && *sb == '1');
        return 0;
    }
    test_synth_convert();
    test_copy_rows();
    test_rmsnorm();
    test_rope();
    test_rerotate();
    test_swiglu_dev_argmax();
    test_attention(lg && *lg == '1');
    KVL_TEST_END();
}
