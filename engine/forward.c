/* Backend-independent half of the engine API: argument checking, slot bookkeeping, ordering rules.
 * The backends (backend_cpu.c, kernels/cuda) only do arithmetic on already-checked inputs. */
#include <stdlib.h>
#include <string.h>

#include "engine_impl.h"

/* ------------------------------------------------------------ KV cache */

kvl_status kvl_kv_create(kvl_model *m, int32_t capacity, kvl_kv **out) {
    if (!m || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_kv_create: NULL argument");
    *out = NULL;
    if (capacity <= 0 || capacity > (1 << 24))
        return kvl_errorf(KVL_ERR_RANGE, "kv capacity %d out of range (1..%d)", capacity, 1 << 24);
    kvl_kv *kv = calloc(1, sizeof *kv);
    if (!kv) return KVL_ERR_NOMEM;
    kv->m = m;
    kv->capacity = capacity;
    kv->valid = calloc((size_t)capacity, 1);
    if (!kv->valid) { free(kv); return KVL_ERR_NOMEM; }
    kvl_status s = m->be->kv_alloc(kv);
    if (s != KVL_OK) {
        free(kv->valid);
        free(kv);
        return s;
    }
    *out = kv;
    return KVL_OK;
}

void kvl_kv_free(kvl_kv *kv) {
    if (!kv) return;
    kv->m->be->kv_release(kv);
    free(kv->valid);
    free(kv);
}

int32_t kvl_kv_capacity(const kvl_kv *kv) { return kv->capacity; }
void kvl_kv_clear(kvl_kv *kv) { memset(kv->valid, 0, (size_t)kv->capacity); }

static kvl_status check_range(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n) {
    if (!kv) return kvl_errorf(KVL_ERR_INVALID_ARG, "kv is NULL");
    if (l0 < 0 || nl < 0 || l0 + nl > kv->m->cfg.n_layers)
        return kvl_errorf(KVL_ERR_RANGE, "layers [%d, %d) outside the model's %d", l0, l0 + nl, kv->m->cfg.n_layers);
    if (s0 < 0 || n < 0 || (int64_t)s0 + n > kv->capacity)
        return kvl_errorf(KVL_ERR_RANGE, "slots [%d, %lld) outside the kv capacity %d", s0, (long long)s0 + n, kv->capacity);
    return KVL_OK;
}

kvl_status kvl_kv_write(kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, const float *src) {
    KVL_TRY(check_range(kv, l0, nl, s0, n));
    if (!src && n && nl) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_kv_write: NULL src");
    if (!n || !nl) return KVL_OK;
    KVL_TRY(kv->m->be->kv_write(kv, l0, nl, s0, n, src));
    if (l0 == 0 && nl == kv->m->cfg.n_layers) memset(kv->valid + s0, 1, (size_t)n);
    return KVL_OK;
}

kvl_status kvl_kv_read(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, float *dst) {
    KVL_TRY(check_range(kv, l0, nl, s0, n));
    if (!dst && n && nl) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_kv_read: NULL dst");
    if (!n || !nl) return KVL_OK;
    return kv->m->be->kv_read(kv, l0, nl, s0, n, dst);
}

kvl_status kvl_kv_set_valid(kvl_kv *kv, int32_t s0, int32_t n, int valid) {
    KVL_TRY(check_range(kv, 0, 0, s0, n));
    memset(kv->valid + s0, valid ? 1 : 0, (size_t)n);
    return KVL_OK;
}

int kvl_kv_is_valid(const kvl_kv *kv, int32_t slot) {
    return kv && slot >= 0 && slot < kv->capacity && kv->valid[slot];
}

kvl_status kvl_kv_copy(kvl_kv *dst, int32_t d0, const kvl_kv *src, int32_t s0, int32_t n) {
    if (!dst || !src) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_kv_copy: NULL kv");
    if (dst->m != src->m) return kvl_errorf(KVL_ERR_SHAPE, "kvl_kv_copy: caches of different models");
    KVL_TRY(check_range(dst, 0, 0, d0, n));
    KVL_TRY(check_range(src, 0, 0, s0, n));
    if (!n) return KVL_OK;
    KVL_TRY(dst->m->be->kv_copy(dst, d0, src, s0, n));
    memmove(dst->valid + d0, src->valid + s0, (size_t)n);
    return KVL_OK;
}

kvl_status kvl_kv_rerotate(kvl_kv *kv, int32_t s0, int32_t n, int32_t delta) {
    KVL_TRY(check_range(kv, 0, 0, s0, n));
    if (delta <= -(1 << 24) || delta >= (1 << 24)) return kvl_errorf(KVL_ERR_RANGE, "rotation delta %d out of range", delta);
    if (!n || !delta) return KVL_OK;
    return kv->m->be->kv_rerotate(kv, s0, n, delta);
}

/* ------------------------------------------------------------ forward */

kvl_status kvl_fwd_begin(kvl_model *m, kvl_kv *kv, int32_t n, const int32_t *tokens, const int32_t *positions,
                         kvl_fwd **out) {
    if (!m || !kv || !out || (n > 0 && (!tokens || !positions)))
        return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_begin: NULL argument");
    *out = NULL;
    if (kv->m != m) return kvl_errorf(KVL_ERR_SHAPE, "kv cache belongs to another model");
    if (n <= 0) return kvl_errorf(KVL_ERR_RANGE, "forward over %d tokens: need at least one", n);
    if (n > kv->capacity)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "%d tokens do not fit the kv cache of %d slots", n, kv->capacity);
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return kvl_errorf(KVL_ERR_TOKEN_RANGE, "token %d at index %d is outside the vocabulary [0, %d)", tokens[i], i, m->cfg.vocab_size);
        if (positions[i] < 0 || positions[i] >= m->cfg.max_seq)
            return kvl_errorf(KVL_ERR_POSITION_RANGE, "position %d at index %d is outside the model's context [0, %d)", positions[i], i, m->cfg.max_seq);
    }
    kvl_fwd *f = calloc(1, sizeof *f);
    if (!f) return KVL_ERR_NOMEM;
    f->m = m;
    f->kv = kv;
    f->n = n;
    f->layer = -1;
    f->qkv_layer_done = -1;
    size_t sz = (size_t)n * sizeof(int32_t);
    f->tokens = malloc(sz);
    f->positions = malloc(sz);
    f->done = calloc((size_t)n, sizeof(int32_t));
    f->pend = malloc(sz);
    f->pend_pos = malloc(sz);
    if (!f->tokens || !f->positions || !f->done || !f->pend || !f->pend_pos) {
        kvl_fwd_free(f);
        return KVL_ERR_NOMEM;
    }
    memcpy(f->tokens, tokens, sz);
    memcpy(f->positions, positions, sz);
    for (int32_t i = 0; i < n; i++) f->pend_pos[i] = -1;
    kvl_status s = m->be->fwd_init(f);
    if (s != KVL_OK) {
        kvl_fwd_free(f);
        return s;
    }
    *out = f;
    return KVL_OK;
}

void kvl_fwd_free(kvl_fwd *f) {
    if (!f) return;
    if (f->be) f->m->be->fwd_fini(f);
    free(f->tokens);
    free(f->positions);
    free(f->done);
    free(f->pend);
    free(f->pend_pos);
    free(f);
}

kvl_status kvl_fwd_qkv(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n_idx, float *k_out, float *v_out) {
    if (!f || (n_idx > 0 && !idx)) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_qkv: NULL argument");
    if (layer < 0 || layer >= f->m->cfg.n_layers) return kvl_errorf(KVL_ERR_RANGE, "layer %d outside [0, %d)", layer, f->m->cfg.n_layers);
    if (n_idx < 0 || n_idx > f->n) return kvl_errorf(KVL_ERR_RANGE, "%d tokens to compute out of %d", n_idx, f->n);
    if (layer != f->qkv_layer_done + 1)
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "layer %d computed out of order (next is %d)", layer, f->qkv_layer_done + 1);
    for (int32_t i = 0; i < f->n_pend; i++) f->pend_pos[f->pend[i]] = -1;
    f->n_pend = 0;
    for (int32_t i = 0; i < n_idx; i++) {
        int32_t s = idx[i];
        if (s < 0 || s >= f->n) return kvl_errorf(KVL_ERR_RANGE, "slot %d outside [0, %d)", s, f->n);
        if (f->pend_pos[s] >= 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "slot %d listed twice", s);
        if (f->done[s] != layer)
            return kvl_errorf(KVL_ERR_BLEND_PLAN, "slot %d cannot be computed at layer %d: its hidden state stops at layer %d", s, layer, f->done[s]);
        f->pend_pos[s] = i;
        f->pend[f->n_pend++] = s;
    }
    f->layer = layer;
    kvl_status st = f->m->be->fwd_qkv(f, layer, f->pend, f->n_pend, k_out, v_out);
    if (st != KVL_OK) {
        for (int32_t i = 0; i < f->n_pend; i++) f->pend_pos[f->pend[i]] = -1;
        f->n_pend = 0;
        f->layer = -1;
    }
    return st;
}

kvl_status kvl_fwd_deviation(kvl_fwd *f, int32_t metric, float *dev) {
    if (!f || !dev) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_deviation: NULL argument");
    if (f->layer < 0) return kvl_errorf(KVL_ERR_BLEND_PLAN, "deviation without a pending kvl_fwd_qkv");
    if (metric < KVL_DEV_K || metric > KVL_DEV_KV) return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown deviation metric %d", metric);
    for (int32_t i = 0; i < f->n_pend; i++)
        if (!f->kv->valid[f->pend[i]])
            return kvl_errorf(KVL_ERR_KV_MISSING, "slot %d has no cached K/V to compare with", f->pend[i]);
    return f->m->be->fwd_deviation(f, metric, dev);
}

/* maps slots to positions in the pending list */
static kvl_status to_sub(kvl_fwd *f, const int32_t *idx, int32_t n, int32_t **sub) {
    *sub = NULL;
    if (f->layer < 0) return kvl_errorf(KVL_ERR_BLEND_PLAN, "no pending kvl_fwd_qkv");
    if (n < 0 || n > f->n_pend) return kvl_errorf(KVL_ERR_RANGE, "%d slots, %d pending", n, f->n_pend);
    if (n > 0 && !idx) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL slot list");
    int32_t *s = malloc((size_t)(n ? n : 1) * sizeof *s);
    if (!s) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= f->n || f->pend_pos[idx[i]] < 0) {
            free(s);
            return kvl_errorf(KVL_ERR_BLEND_PLAN, "slot %d was not computed by the last kvl_fwd_qkv", idx[i]);
        }
        s[i] = f->pend_pos[idx[i]];
    }
    *sub = s;
    return KVL_OK;
}

kvl_status kvl_fwd_attn_mass(kvl_fwd *f, const int32_t *idx, int32_t n, float *mass) {
    if (!f || !mass) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_attn_mass: NULL argument");
    if (!f->m->be->fwd_attn_mass) return kvl_errorf(KVL_ERR_UNSUPPORTED, "the %s backend has no attention-mass step", f->m->be->name);
    int32_t *sub;
    KVL_TRY(to_sub(f, idx, n, &sub));
    kvl_status s = f->m->be->fwd_attn_mass(f, sub, n, mass);
    free(sub);
    return s;
}

kvl_status kvl_fwd_commit(kvl_fwd *f, const int32_t *idx, int32_t n) {
    if (!f) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_commit: NULL fwd");
    int32_t *sub;
    KVL_TRY(to_sub(f, idx, n, &sub));
    kvl_status s = n ? f->m->be->fwd_commit(f, sub, n) : KVL_OK;
    free(sub);
    if (s == KVL_OK)
        for (int32_t i = 0; i < n; i++) f->kv->valid[idx[i]] = 1;
    return s;
}

kvl_status kvl_fwd_attn_ffn(kvl_fwd *f, const int32_t *idx, int32_t n) {
    if (!f) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_attn_ffn: NULL fwd");
    int32_t *sub;
    KVL_TRY(to_sub(f, idx, n, &sub));
    for (int32_t j = 0; j < f->n; j++)
        if (!f->kv->valid[j]) {
            free(sub);
            return kvl_errorf(KVL_ERR_KV_MISSING, "slot %d (token %d, position %d) is neither computed nor cached", j, f->tokens[j], f->positions[j]);
        }
    kvl_status s = f->m->be->fwd_attn_ffn(f, sub, n);
    free(sub);
    if (s != KVL_OK) return s;
    for (int32_t i = 0; i < n; i++) f->done[idx[i]] = f->layer + 1;
    f->qkv_layer_done = f->layer;
    for (int32_t i = 0; i < f->n_pend; i++) f->pend_pos[f->pend[i]] = -1;
    f->n_pend = 0;
    f->layer = -1;
    return KVL_OK;
}

kvl_status kvl_fwd_layer(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n_idx) {
    KVL_TRY(kvl_fwd_qkv(f, layer, idx, n_idx, NULL, NULL));
    KVL_TRY(kvl_fwd_commit(f, idx, n_idx));
    return kvl_fwd_attn_ffn(f, idx, n_idx);
}

kvl_status kvl_fwd_logits(kvl_fwd *f, const int32_t *idx, int32_t n, float *logits) {
    if (!f || (n > 0 && (!idx || !logits))) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_fwd_logits: NULL argument");
    for (int32_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= f->n) return kvl_errorf(KVL_ERR_RANGE, "logit slot %d outside [0, %d)", idx[i], f->n);
        if (f->done[idx[i]] != f->m->cfg.n_layers)
            return kvl_errorf(KVL_ERR_BLEND_PLAN, "logits of slot %d wanted but it was not computed through every layer", idx[i]);
    }
    if (!n) return KVL_OK;
    return f->m->be->fwd_logits(f, idx, n, logits);
}

kvl_status kvl_forward(kvl_model *m, kvl_kv *kv, int32_t n, const int32_t *tokens, const int32_t *positions,
                       const uint8_t *compute, int32_t n_logits, const int32_t *logit_idx, float *logits) {
    kvl_fwd *f;
    KVL_TRY(kvl_fwd_begin(m, kv, n, tokens, positions, &f));
    kvl_status s = KVL_OK;
    int32_t *idx = malloc((size_t)n * sizeof *idx), ni = 0;
    if (!idx) { kvl_fwd_free(f); return KVL_ERR_NOMEM; }
    for (int32_t i = 0; i < n; i++)
        if (!compute || compute[i]) idx[ni++] = i;
    for (int32_t l = 0; l < m->cfg.n_layers && s == KVL_OK; l++) s = kvl_fwd_layer(f, l, idx, ni);
    if (s == KVL_OK) s = kvl_fwd_logits(f, logit_idx, n_logits, logits);
    free(idx);
    kvl_fwd_free(f);
    return s;
}
