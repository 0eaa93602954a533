/* The CPU backend: float32 (or bf16-stored) weights, pthread pool, kernels/cpu ops. */
#include <stdlib.h>
#include <string.h>

#include "engine_impl.h"
#include "kvl_cpu.h"

typedef struct {
    kvl_pool *pool;
} cpu_model;

typedef struct {
    float *x;          /* [n][dim] hidden state by slot */
    float *cos_t, *sin_t; /* [n][hd/2] by slot */
    /* pending qkv, rows in pend order */
    float *q;          /* [n][n_heads*hd] */
    float *k, *v;      /* [n][kv_dim] */
    float *xn;         /* [n][dim] scratch */
    float *att;        /* [n][n_heads*hd] */
    float *ffa, *ffb;  /* [n][hidden] */
    int32_t *qpos;     /* [n] */
} cpu_fwd;

static kvl_pool *pool_of(const kvl_model *m) { return ((cpu_model *)m->be_state)->pool; }

static kvl_status cpu_model_init(kvl_model *m) {
    cpu_model *c = calloc(1, sizeof *c);
    if (!c) return KVL_ERR_NOMEM;
    kvl_status s = kvl_pool_create(m->opts.n_threads, &c->pool);
    if (s != KVL_OK) {
        free(c);
        return s;
    }
    m->be_state = c;
    return KVL_OK;
}

static void cpu_model_fini(kvl_model *m) {
    cpu_model *c = m->be_state;
    if (!c) return;
    kvl_pool_free(c->pool);
    free(c);
    m->be_state = NULL;
}

static size_t kvd(const kvl_model *m) { return (size_t)m->cfg.n_kv_heads * m->cfg.head_dim; }

/* pointer to K (which=0) or V (1) of layer l, slot s */
static float *kv_at(const kvl_kv *kv, int32_t l, int which, int32_t s) {
    size_t d = kvd(kv->m);
    return (float *)kv->data + (((size_t)l * 2 + (size_t)which) * (size_t)kv->capacity + (size_t)s) * d;
}

static kvl_status cpu_kv_alloc(kvl_kv *kv) {
    size_t n = (size_t)kv->m->cfg.n_layers * 2 * (size_t)kv->capacity * kvd(kv->m);
    kv->data = malloc(n * sizeof(float));
    if (!kv->data) return kvl_errorf(KVL_ERR_NOMEM, "cannot allocate a %.1f MiB kv cache", (double)n * 4 / 1048576);
    return KVL_OK;
}

static void cpu_kv_release(kvl_kv *kv) {
    free(kv->data);
    kv->data = NULL;
}

static kvl_status cpu_kv_write(kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, const float *src) {
    size_t d = kvd(kv->m), blk = (size_t)n * d;
    for (int32_t l = 0; l < nl; l++)
        for (int w = 0; w < 2; w++) memcpy(kv_at(kv, l0 + l, w, s0), src + ((size_t)l * 2 + (size_t)w) * blk, blk * sizeof(float));
    return KVL_OK;
}

static kvl_status cpu_kv_read(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, float *dst) {
    size_t d = kvd(kv->m), blk = (size_t)n * d;
    for (int32_t l = 0; l < nl; l++)
        for (int w = 0; w < 2; w++) memcpy(dst + ((size_t)l * 2 + (size_t)w) * blk, kv_at(kv, l0 + l, w, s0), blk * sizeof(float));
    return KVL_OK;
}

static kvl_status cpu_kv_copy(kvl_kv *dst, int32_t d0, const kvl_kv *src, int32_t s0, int32_t n) {
    size_t d = kvd(dst->m);
    for (int32_t l = 0; l < dst->m->cfg.n_layers; l++)
        for (int w = 0; w < 2; w++) memmove(kv_at(dst, l, w, d0), kv_at(src, l, w, s0), (size_t)n * d * sizeof(float));
    return KVL_OK;
}

static kvl_status cpu_kv_rerotate(kvl_kv *kv, int32_t s0, int32_t n, int32_t delta) {
    const kvl_model_config *c = &kv->m->cfg;
    int half = c->head_dim / 2;
    float *cs = malloc(sizeof(float) * (size_t)half * 2);
    if (!cs) return KVL_ERR_NOMEM;
    kvl_cpu_rope_table_delta(cs, cs + half, delta, c->head_dim, c->rope_theta);
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int32_t s = 0; s < n; s++)
            kvl_cpu_rope(kv_at(kv, l, 0, s0 + s), (int64_t)kvd(kv->m), 1, c->n_kv_heads, c->head_dim, c->rope_style, cs, cs + half);
    free(cs);
    return KVL_OK;
}

static kvl_status cpu_fwd_init(kvl_fwd *f) {
    const kvl_model_config *c = &f->m->cfg;
    cpu_fwd *b = calloc(1, sizeof *b);
    if (!b) return KVL_ERR_NOMEM;
    size_t n = (size_t)f->n, D = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim, half = (size_t)c->head_dim / 2;
    b->x = malloc(n * D * sizeof(float));
    b->cos_t = malloc(n * half * sizeof(float));
    b->sin_t = malloc(n * half * sizeof(float));
    b->q = malloc(n * qd * sizeof(float));
    b->k = malloc(n * kvd(f->m) * sizeof(float));
    b->v = malloc(n * kvd(f->m) * sizeof(float));
    b->xn = malloc(n * D * sizeof(float));
    b->att = malloc(n * qd * sizeof(float));
    b->ffa = malloc(n * (size_t)c->hidden_dim * sizeof(float));
    b->ffb = malloc(n * (size_t)c->hidden_dim * sizeof(float));
    b->qpos = malloc(n * sizeof(int32_t));
    f->be = b;
    if (!b->x || !b->cos_t || !b->sin_t || !b->q || !b->k || !b->v || !b->xn || !b->att || !b->ffa || !b->ffb || !b->qpos)
        return kvl_errorf(KVL_ERR_NOMEM, "cannot allocate forward buffers for %zu tokens", n);
    kvl_cpu_rope_table(b->cos_t, b->sin_t, f->positions, f->n, c->head_dim, c->rope_theta);
    return KVL_OK;
}

static void cpu_fwd_fini(kvl_fwd *f) {
    cpu_fwd *b = f->be;
    if (!b) return;
    free(b->x); free(b->cos_t); free(b->sin_t); free(b->q); free(b->k); free(b->v);
    free(b->xn); free(b->att); free(b->ffa); free(b->ffb); free(b->qpos);
    free(b);
    f->be = NULL;
}

static kvl_status cpu_fwd_qkv(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n, float *k_out, float *v_out) {
    const kvl_model_config *c = &f->m->cfg;
    const kvl_layer_w *L = &f->m->w.layers[layer];
    cpu_fwd *b = f->be;
    size_t D = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim, kd = kvd(f->m), half = (size_t)c->head_dim / 2;
    if (layer == 0)
        for (int32_t i = 0; i < n; i++)
            memcpy(b->x + (size_t)idx[i] * D, f->m->w.tok_emb + (size_t)f->tokens[idx[i]] * D, D * sizeof(float));
    for (int32_t i = 0; i < n; i++)
        kvl_cpu_rmsnorm(b->xn + (size_t)i * D, b->x + (size_t)idx[i] * D, L->attn_norm, 1, (int64_t)D, c->norm_eps);
    pthread_mutex_lock(&f->m->mu);
    kvl_pool *p = pool_of(f->m);
    kvl_cpu_matmul(p, b->q, (int64_t)qd, b->xn, L->wq, n, (int64_t)qd, (int64_t)D);
    kvl_cpu_matmul(p, b->k, (int64_t)kd, b->xn, L->wk, n, (int64_t)kd, (int64_t)D);
    kvl_cpu_matmul(p, b->v, (int64_t)kd, b->xn, L->wv, n, (int64_t)kd, (int64_t)D);
    pthread_mutex_unlock(&f->m->mu);
    for (int32_t i = 0; i < n; i++) {
        const float *cs = b->cos_t + (size_t)idx[i] * half, *sn = b->sin_t + (size_t)idx[i] * half;
        kvl_cpu_rope(b->q + (size_t)i * qd, (int64_t)qd, 1, c->n_heads, c->head_dim, c->rope_style, cs, sn);
        kvl_cpu_rope(b->k + (size_t)i * kd, (int64_t)kd, 1, c->n_kv_heads, c->head_dim, c->rope_style, cs, sn);
    }
    if (k_out) memcpy(k_out, b->k, (size_t)n * kd * sizeof(float));
    if (v_out) memcpy(v_out, b->v, (size_t)n * kd * sizeof(float));
    return KVL_OK;
}

static kvl_status cpu_fwd_deviation(kvl_fwd *f, int32_t metric, float *dev) {
    cpu_fwd *b = f->be;
    size_t kd = kvd(f->m);
    for (int32_t i = 0; i < f->n_pend; i++) {
        double s = 0;
        if (metric & KVL_DEV_K) {
            const float *ck = kv_at(f->kv, f->layer, 0, f->pend[i]), *nk = b->k + (size_t)i * kd;
            for (size_t d = 0; d < kd; d++) s += (double)(nk[d] - ck[d]) * (nk[d] - ck[d]);
        }
        if (metric & KVL_DEV_V) {
            const float *cv = kv_at(f->kv, f->layer, 1, f->pend[i]), *nv = b->v + (size_t)i * kd;
            for (size_t d = 0; d < kd; d++) s += (double)(nv[d] - cv[d]) * (nv[d] - cv[d]);
        }
        dev[i] = (float)s;
    }
    return KVL_OK;
}

static kvl_status cpu_fwd_commit(kvl_fwd *f, const int32_t *sub, int32_t n) {
    cpu_fwd *b = f->be;
    size_t kd = kvd(f->m);
    for (int32_t i = 0; i < n; i++) {
        int32_t s = f->pend[sub[i]];
        memcpy(kv_at(f->kv, f->layer, 0, s), b->k + (size_t)sub[i] * kd, kd * sizeof(float));
        memcpy(kv_at(f->kv, f->layer, 1, s), b->v + (size_t)sub[i] * kd, kd * sizeof(float));
    }
    return KVL_OK;
}

static kvl_status cpu_fwd_attn_ffn(kvl_fwd *f, const int32_t *sub, int32_t n) {
    const kvl_model_config *c = &f->m->cfg;
    const kvl_layer_w *L = &f->m->w.layers[f->layer];
    cpu_fwd *b = f->be;
    size_t D = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim, F = (size_t)c->hidden_dim;
    /* gather the queries in sub order (sub may be a strict subset of the pending rows) */
    for (int32_t i = 0; i < n; i++) {
        if (sub[i] != i) memcpy(b->att + (size_t)i * qd, b->q + (size_t)sub[i] * qd, qd * sizeof(float));
        b->qpos[i] = f->positions[f->pend[sub[i]]];
    }
    int identity = 1;
    for (int32_t i = 0; i < n; i++) identity &= sub[i] == i;
    const float *qg = b->q;
    if (!identity) {
        memcpy(b->q, b->att, (size_t)n * qd * sizeof(float)); /* compact: pending q is not needed after this */
        qg = b->q;
    }
    pthread_mutex_lock(&f->m->mu);
    kvl_pool *p = pool_of(f->m);
    kvl_cpu_attention(p, b->att, (int64_t)qd, qg, (int64_t)qd, b->qpos, n, kv_at(f->kv, f->layer, 0, 0),
                      kv_at(f->kv, f->layer, 1, 0), f->positions, f->n, c->n_heads, c->n_kv_heads, c->head_dim);
    kvl_cpu_matmul(p, b->xn, (int64_t)D, b->att, L->wo, n, (int64_t)D, (int64_t)qd);
    for (int32_t i = 0; i < n; i++) kvl_cpu_add(b->x + (size_t)f->pend[sub[i]] * D, b->xn + (size_t)i * D, (int64_t)D);
    for (int32_t i = 0; i < n; i++)
        kvl_cpu_rmsnorm(b->xn + (size_t)i * D, b->x + (size_t)f->pend[sub[i]] * D, L->ffn_norm, 1, (int64_t)D, c->norm_eps);
    kvl_cpu_matmul(p, b->ffa, (int64_t)F, b->xn, L->w_gate, n, (int64_t)F, (int64_t)D);
    kvl_cpu_matmul(p, b->ffb, (int64_t)F, b->xn, L->w_up, n, (int64_t)F, (int64_t)D);
    kvl_cpu_swiglu(b->ffa, b->ffa, b->ffb, n, (int64_t)F);
    kvl_cpu_matmul(p, b->xn, (int64_t)D, b->ffa, L->w_down, n, (int64_t)D, (int64_t)F);
    pthread_mutex_unlock(&f->m->mu);
    for (int32_t i = 0; i < n; i++) kvl_cpu_add(b->x + (size_t)f->pend[sub[i]] * D, b->xn + (size_t)i * D, (int64_t)D);
    return KVL_OK;
}

static kvl_status cpu_fwd_logits(kvl_fwd *f, const int32_t *idx, int32_t n, float *logits) {
    const kvl_model_config *c = &f->m->cfg;
    cpu_fwd *b = f->be;
    size_t D = (size_t)c->dim;
    float *xn = malloc((size_t)n * D * sizeof(float));
    if (!xn) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++)
        kvl_cpu_rmsnorm(xn + (size_t)i * D, b->x + (size_t)idx[i] * D, f->m->w.final_norm, 1, (int64_t)D, c->norm_eps);
    pthread_mutex_lock(&f->m->mu);
    kvl_cpu_matmul(pool_of(f->m), logits, c->vocab_size, xn, f->m->w.wcls, n, c->vocab_size, (int64_t)D);
    pthread_mutex_unlock(&f->m->mu);
    free(xn);
    return KVL_OK;
}

static kvl_status cpu_fwd_attn_mass(kvl_fwd *f, const int32_t *sub, int32_t n, float *mass) {
    const kvl_model_config *c = &f->m->cfg;
    cpu_fwd *b = f->be;
    size_t qd = (size_t)c->n_heads * c->head_dim;
    float *q = malloc((size_t)(n ? n : 1) * qd * sizeof(float));
    int32_t *qpos = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!q || !qpos) {
        free(q);
        free(qpos);
        return KVL_ERR_NOMEM;
    }
    for (int32_t i = 0; i < n; i++) {
        memcpy(q + (size_t)i * qd, b->q + (size_t)sub[i] * qd, qd * sizeof(float));
        qpos[i] = f->positions[f->pend[sub[i]]];
    }
    kvl_cpu_attention_mass(mass, q, (int64_t)qd, qpos, n, kv_at(f->kv, f->layer, 0, 0), f->positions, f->kv->valid, f->n,
                           c->n_heads, c->n_kv_heads, c->head_dim);
    free(q);
    free(qpos);
    return KVL_OK;
}

const kvl_backend_ops kvl_backend_cpu = {
    "cpu", cpu_model_init, cpu_model_fini, cpu_kv_alloc, cpu_kv_release, cpu_kv_write, cpu_kv_read,
    cpu_kv_copy, cpu_kv_rerotate, cpu_fwd_init, cpu_fwd_fini, cpu_fwd_qkv, cpu_fwd_deviation,
    cpu_fwd_commit, cpu_fwd_attn_ffn, cpu_fwd_logits, cpu_fwd_attn_mass,
};
