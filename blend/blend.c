/* CacheBlend on top of the engine's layer-step API: chunk caches, plan building, loading (copy +
 * key re-rotation) and the per-layer selective recompute. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvl_blend.h"

/* ---------------------------------------------------------------- chunk caches */

static size_t cc_floats(int32_t L, int32_t kvh, int32_t hd, int32_t n) {
    return (size_t)L * 2 * (size_t)n * (size_t)kvh * (size_t)hd;
}

size_t kvl_chunk_cache_floats(const kvl_chunk_cache *cc) {
    return cc ? cc_floats(cc->n_layers, cc->n_kv_heads, cc->head_dim, cc->n_tokens) : 0;
}

void kvl_chunk_cache_free(kvl_chunk_cache *cc) {
    if (!cc) return;
    free(cc->tokens);
    free(cc->ctx);
    free(cc->kv);
    free(cc);
}

/* allocates a cache with copies of tokens/ctx and an uninitialised kv */
static kvl_status cc_alloc(const uint8_t fp[32], int32_t L, int32_t kvh, int32_t hd, const int32_t *tokens, int32_t n,
                           const int32_t *ctx, int32_t n_ctx, int with_kv, kvl_chunk_cache **out) {
    *out = NULL;
    if (!fp || !tokens || (n_ctx > 0 && !ctx)) return kvl_errorf(KVL_ERR_INVALID_ARG, "chunk cache: NULL argument");
    if (n <= 0) return kvl_errorf(KVL_ERR_RANGE, "chunk cache of %d tokens: need at least one", n);
    if (n_ctx < 0) return kvl_errorf(KVL_ERR_RANGE, "chunk cache context of %d tokens", n_ctx);
    if (L <= 0 || kvh <= 0 || hd <= 0) return kvl_errorf(KVL_ERR_SHAPE, "chunk cache shape %dx%dx%d", L, kvh, hd);
    kvl_chunk_cache *cc = calloc(1, sizeof *cc);
    if (!cc) return KVL_ERR_NOMEM;
    memcpy(cc->fingerprint, fp, 32);
    cc->n_layers = L;
    cc->n_kv_heads = kvh;
    cc->head_dim = hd;
    cc->n_tokens = n;
    cc->n_ctx = n_ctx;
    cc->tokens = malloc((size_t)n * sizeof(int32_t));
    cc->ctx = malloc((size_t)(n_ctx ? n_ctx : 1) * sizeof(int32_t));
    cc->kv = with_kv ? malloc(cc_floats(L, kvh, hd, n) * sizeof(float)) : NULL;
    if (!cc->tokens || !cc->ctx || (with_kv && !cc->kv)) {
        kvl_chunk_cache_free(cc);
        return kvl_errorf(KVL_ERR_NOMEM, "cannot allocate a chunk cache of %d tokens", n);
    }
    memcpy(cc->tokens, tokens, (size_t)n * sizeof(int32_t));
    if (n_ctx) memcpy(cc->ctx, ctx, (size_t)n_ctx * sizeof(int32_t));
    *out = cc;
    return KVL_OK;
}

kvl_status kvl_chunk_cache_create(const uint8_t fingerprint[32], int32_t L, int32_t kvh, int32_t hd, const int32_t *tokens,
                                  int32_t n, const int32_t *ctx, int32_t n_ctx, const float *kv, kvl_chunk_cache **out) {
    if (!out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_create: NULL out");
    if (!kv) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_create: NULL kv");
    KVL_TRY(cc_alloc(fingerprint, L, kvh, hd, tokens, n, ctx, n_ctx, 1, out));
    memcpy((*out)->kv, kv, kvl_chunk_cache_floats(*out) * sizeof(float));
    return KVL_OK;
}

kvl_status kvl_chunk_cache_create_encoded(const uint8_t fingerprint[32], int32_t L, int32_t kvh, int32_t hd,
                                          const int32_t *tokens, int32_t n, const int32_t *ctx, int32_t n_ctx,
                                          const uint8_t *enc, size_t enc_size, kvl_chunk_cache **out) {
    if (!out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_create_encoded: NULL out");
    if (!enc) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_create_encoded: NULL bytes");
    *out = NULL;
    kvl_codec_info in;
    KVL_TRY(kvl_codec_info_get(enc, enc_size, &in));
    if (in.shape.n_layers != L || in.shape.n_kv_heads != kvh || in.shape.head_dim != hd || in.shape.n_tokens != n)
        return kvl_errorf(KVL_ERR_SHAPE, "encoded cache of %d layers x %d tokens x %d x %d, expected %d x %d x %d x %d",
                          in.shape.n_layers, in.shape.n_tokens, in.shape.n_kv_heads, in.shape.head_dim, L, n, kvh, hd);
    KVL_TRY(cc_alloc(fingerprint, L, kvh, hd, tokens, n, ctx, n_ctx, 0, out));
    (*out)->enc = enc;
    (*out)->enc_size = enc_size;
    return KVL_OK;
}

kvl_status kvl_chunk_cache_prefill(kvl_model *m, const int32_t *tokens, int32_t n, const int32_t *ctx, int32_t n_ctx,
                                   kvl_chunk_cache **out) {
    if (!m || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_prefill: NULL argument");
    *out = NULL;
    const kvl_model_config *c = kvl_model_get_config(m);
    if (n > 0 && n_ctx >= 0 && (int64_t)n_ctx + n > c->max_seq)
        return kvl_errorf(KVL_ERR_POSITION_RANGE, "chunk of %d tokens behind %d context tokens exceeds the model's context of %d",
                          n, n_ctx, c->max_seq);
    kvl_chunk_cache *cc;
    KVL_TRY(cc_alloc(kvl_model_fingerprint(m), c->n_layers, c->n_kv_heads, c->head_dim, tokens, n, ctx, n_ctx, 1, &cc));
    int32_t tot = n_ctx + n;
    int32_t *tok = malloc((size_t)tot * sizeof *tok), *pos = malloc((size_t)tot * sizeof *pos);
    kvl_kv *kv = NULL;
    kvl_status s = tok && pos ? KVL_OK : KVL_ERR_NOMEM;
    if (s == KVL_OK) {
        if (n_ctx) memcpy(tok, ctx, (size_t)n_ctx * sizeof *tok);
        memcpy(tok + n_ctx, tokens, (size_t)n * sizeof *tok);
        for (int32_t i = 0; i < tot; i++) pos[i] = i;
        s = kvl_kv_create(m, tot, &kv);
    }
    if (s == KVL_OK) s = kvl_forward(m, kv, tot, tok, pos, NULL, 0, NULL, NULL);
    if (s == KVL_OK) s = kvl_kv_read(kv, 0, c->n_layers, n_ctx, n, cc->kv);
    kvl_kv_free(kv);
    free(tok);
    free(pos);
    if (s != KVL_OK) {
        kvl_chunk_cache_free(cc);
        return s;
    }
    *out = cc;
    return KVL_OK;
}

kvl_status kvl_chunk_cache_codec_roundtrip(kvl_chunk_cache *cc, const kvl_codec_opts *opts, size_t *encoded_bytes) {
    if (!cc || !cc->kv) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_chunk_cache_codec_roundtrip: NULL cache");
    kvl_codec_shape shape = {cc->n_layers, cc->n_tokens, cc->n_kv_heads, cc->head_dim};
    kvl_codec_opts o = opts ? *opts : kvl_codec_opts_default();
    uint8_t *buf = NULL;
    size_t size = 0;
    KVL_TRY(kvl_codec_encode(&shape, KVL_CODEC_F32, cc->kv, &o, &buf, &size));
    kvl_status s = kvl_codec_decode(buf, size, o.profile, 0, cc->n_layers, KVL_CODEC_F32, cc->kv,
                                    kvl_chunk_cache_floats(cc) * sizeof(float), 1);
    free(buf);
    if (s == KVL_OK && encoded_bytes) *encoded_bytes = size;
    return s;
}

/* ---------------------------------------------------------------- options */

kvl_blend_opts kvl_blend_opts_default(void) {
    kvl_blend_opts o = {KVL_BLEND_BLEND, 0.15f, 1, KVL_DEV_V, 1, 0.3f, 1, 1, 0, 0, 0.2f, 0.0f, 0.5f, 0, 0.1f, 1};
    return o;
}

static const char *MODE_NAMES[] = {"full", "naive", "blend", "prefix"};

int kvl_blend_mode_parse(const char *s) {
    for (int i = 0; s && i < 4; i++)
        if (!strcmp(s, MODE_NAMES[i])) return i;
    return -1;
}

const char *kvl_blend_mode_name(int mode) { return mode >= 0 && mode < 4 ? MODE_NAMES[mode] : "?"; }

/* ---------------------------------------------------------------- plan */

void kvl_blend_plan_free(kvl_blend_plan *p) {
    if (!p) return;
    free(p->tokens);
    free(p->positions);
    free(p->kind);
    free(p->pinned);
    free(p->segment);
    free(p->src_index);
    free(p->rot_delta);
    free(p->seg_slot0);
    free(p->logit_slots);
    free(p->naive_mass);
    if (p->layers)
        for (int32_t l = 0; l < p->n_layers; l++) free(p->layers[l].slots);
    free(p->layers);
    free(p);
}

static kvl_status check_opts(const kvl_blend_opts *o, int32_t n_layers) {
    if (o->mode < KVL_BLEND_FULL || o->mode > KVL_BLEND_PREFIX) return kvl_errorf(KVL_ERR_BLEND_PLAN, "unknown blend mode %d", o->mode);
    if (o->mode != KVL_BLEND_BLEND) return KVL_OK;
    if (!(o->budget >= 0.0f && o->budget <= 1.0f)) return kvl_errorf(KVL_ERR_BLEND_PLAN, "budget %g outside [0, 1]", (double)o->budget);
    if (o->naive_rank_layer < -1 || o->naive_rank_layer >= n_layers)
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "naive_rank_layer %d outside [-1, %d)", o->naive_rank_layer, n_layers);
    if (o->naive_guard < 0 || o->naive_guard > 1) return kvl_errorf(KVL_ERR_BLEND_PLAN, "naive_guard %d is neither 0 nor 1", o->naive_guard);
    if (!(o->naive_guard_margin >= 0.0f) || isinf(o->naive_guard_margin))
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "naive_guard_margin %g must be a finite number >= 0", (double)o->naive_guard_margin);
    if (!(o->guard >= 0.0f && o->guard <= 1.0f) || !(o->guard_max_ratio >= 0.0f && o->guard_max_ratio <= 1.0f))
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "guard %g / guard_max_ratio %g outside [0, 1]", (double)o->guard, (double)o->guard_max_ratio);
    if (o->attn_weight < 0 || o->attn_weight > 2) return kvl_errorf(KVL_ERR_BLEND_PLAN, "unknown attention weighting %d", o->attn_weight);
    if (o->chunk_head < 0) return kvl_errorf(KVL_ERR_BLEND_PLAN, "chunk head of %d tokens", o->chunk_head);
    if (!(o->ratio >= 0.0f && o->ratio <= 1.0f)) return kvl_errorf(KVL_ERR_BLEND_PLAN, "recompute ratio %g outside [0, 1]", (double)o->ratio);
    if (o->select_layer < 0 || o->select_layer >= n_layers)
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "selection layer %d outside the model's layers [0, %d)", o->select_layer, n_layers);
    if (o->metric < KVL_DEV_K || o->metric > KVL_BLEND_METRIC_KV_NORM) return kvl_errorf(KVL_ERR_BLEND_PLAN, "unknown deviation metric %d", o->metric);
    int32_t g = o->gradual_layers < 1 ? 1 : o->gradual_layers;
    if (o->select_layer + g > n_layers)
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "gradual filtering over %d layers from layer %d passes the model's %d layers", g,
                          o->select_layer, n_layers);
    if (o->guard > 0.0f && g > 1) return kvl_errorf(KVL_ERR_BLEND_PLAN, "the guard works with one selection layer, not gradual filtering");
    if (g > 1 && !(o->gradual_first >= o->ratio && o->gradual_first <= 1.0f))
        return kvl_errorf(KVL_ERR_BLEND_PLAN, "gradual filtering starts at ratio %g, must lie in [ratio %g, 1]",
                          (double)o->gradual_first, (double)o->ratio);
    return KVL_OK;
}

/* slots get room for every slot of the prompt: the guard may widen a layer's set at run time */
static kvl_status set_layer(kvl_blend_layer *L, int32_t cap, const int32_t *slots, int32_t n_qkv, int32_t n_keep, int select) {
    L->slots = malloc((size_t)(cap > n_qkv ? cap : n_qkv > 0 ? n_qkv : 1) * sizeof(int32_t));
    if (!L->slots) return KVL_ERR_NOMEM;
    if (n_qkv) memcpy(L->slots, slots, (size_t)n_qkv * sizeof(int32_t));
    L->n_qkv = n_qkv;
    L->n_keep = n_keep;
    L->select = select;
    return KVL_OK;
}

static kvl_status build_layers(kvl_blend_plan *p, const kvl_blend_opts *o) {
    int32_t n = p->n_slots, *all = malloc((size_t)n * sizeof(int32_t)), *pin = malloc((size_t)n * sizeof(int32_t));
    int32_t n_all = 0, n_pin = 0, n_pin_cached = 0;
    if (!all || !pin) {
        free(all);
        free(pin);
        return KVL_ERR_NOMEM;
    }
    /* a BLEND plan without a ranking step (ratio 0, no gradual layers) computes only the pinned
     * tokens: no layer runs on every token */
    int32_t g = o->gradual_layers < 1 ? 1 : o->gradual_layers;
    int ranks = o->mode == KVL_BLEND_BLEND && (o->ratio > 0.0f || g > 1);
    for (int32_t i = 0; i < n; i++) {
        int k = p->kind[i];
        int computed;
        switch (o->mode) {
        case KVL_BLEND_FULL: computed = 1; break;
        case KVL_BLEND_NAIVE: computed = k == KVL_SLOT_UNCACHED; break;
        case KVL_BLEND_PREFIX: computed = k != KVL_SLOT_EXACT; break;
        default: computed = ranks ? k != KVL_SLOT_EXACT : p->pinned[i]; break;
        }
        if (computed) all[n_all++] = i;
        if (p->pinned[i]) {
            pin[n_pin++] = i;
            n_pin_cached += k == KVL_SLOT_CACHED;
        }
    }
    kvl_status s = KVL_OK;
    int32_t keep = n_all;
    for (int32_t l = 0; l < p->n_layers && s == KVL_OK; l++) {
        if (!ranks || l < o->select_layer) {
            s = set_layer(&p->layers[l], p->n_slots, all, n_all, n_all, 0);
        } else if (l < o->select_layer + g) {
            /* kept fraction of the cached candidates at this selection layer (pinned chunk-head
             * tokens count towards it) */
            int32_t j = l - o->select_layer;
            double r = g > 1 ? o->gradual_first + (o->ratio - o->gradual_first) * (double)j / (double)(g - 1) : o->ratio;
            int32_t n_sel = (int32_t)floor(r * p->n_cached + 0.5);
            if (n_sel < n_pin_cached) n_sel = n_pin_cached;
            int32_t n_qkv = keep; /* candidates = what the previous layer kept */
            int32_t n_keep = n_pin - n_pin_cached + n_sel;
            if (n_keep > n_qkv) n_keep = n_qkv;
            /* the kept set is decided at run time: list the candidates (previous layer's kept slots) */
            s = set_layer(&p->layers[l], p->n_slots, l ? p->layers[l - 1].slots : all, n_qkv, n_keep,
                          l == 0 && o->attn_weight ? 2 : 1);
            keep = n_keep;
        } else {
            /* same set as the last selection layer; filled in by kvl_blend_run */
            s = set_layer(&p->layers[l], p->n_slots, p->layers[l - 1].slots, keep, keep, 0);
        }
    }
    free(all);
    free(pin);
    return s;
}

/* Turns a budget (cached token-layers recomputed / (cached tokens x layers), a qkv-only token-layer
 * counted whole) into the policy chosen by measurement on facts13M and the TinyStories models
 * (docs/BENCHMARKS.md, "Blend policies"): query-attention selection with gradual filtering. Layer 0
 * keeps the 2r of the cached tokens the query attends to most (exact there, nothing spent on
 * ranking); layer 1 computes Q/K/V for those and keeps the r the query attends to most there; the
 * other layers compute r. Cost: (2 * 2r + (L - 2) * r) / L = budget, so r = budget * L / (L + 2);
 * counts are rounded down so that the plan stays within the budget. Below a 20% budget: layer 0
 * keeps r = budget, no narrowing. */
static void apply_budget(kvl_blend_plan *p, kvl_blend_opts *o) {
    int32_t L = p->n_layers, n = p->n_cached;
    o->select_layer = 0;
    o->attn_weight = 2; /* layer 1 ranks by the query's attention too: beat deviation x attention on facts13M */
    o->chunk_head = 0;
    o->whole_chunks = 0;
    p->budget_policy = 1;
    /* below 20% the narrowing step keeps only a few tokens and spends half the budget on the wider
     * layer-0 set; measured on facts13M cross at a 10% budget it lost to naive reuse (1.15x its KL)
     * where one selection layer won (0.93x): one selection layer, r = budget */
    /* below a 10% budget (one or two tokens of a short prompt) the naive pass's ranking lost to
     * naive reuse on facts13M within compositions (1.02x at 5%) where layer-0 attention won (0.94x);
     * from 10% up it wins everywhere (docs/BENCHMARKS.md, "Blend policies") */
    if (o->budget < 0.1f) o->naive_rank_layer = -1;
    if (o->naive_rank_layer >= 0) { /* ranked by the naive pass: one selection, r = budget */
        o->gradual_layers = 1;
        o->ratio = n ? (float)(floor((double)o->budget * n + 1e-9) / n) : 0.0f;
        return;
    }
    if (L < 3 || n == 0 || o->budget < 0.2f) {
        o->gradual_layers = 1;
        o->ratio = n ? (float)(floor((double)o->budget * n + 1e-9) / n) : 0.0f;
        return;
    }
    double r = (double)o->budget * L / (L + 2);
    int32_t k = (int32_t)floor(r * n + 1e-9), k0 = 2 * k;
    if (k0 > n) { /* 2r past every token: layer 0 keeps all, the rest of the budget goes to r */
        k0 = n;
        k = (int32_t)floor(((double)o->budget * L * n - 2.0 * n) / (L - 2) + 1e-9);
        if (k > n) k = n;
        if (k < 0) k = 0;
    }
    o->gradual_layers = 2;
    o->ratio = (float)k / n;
    o->gradual_first = (float)k0 / n;
}

kvl_status kvl_blend_plan_build(kvl_model *m, const kvl_blend_segment *segs, int32_t n_seg, const int32_t *logit_slots,
                                int32_t n_logits, const kvl_blend_opts *opts, kvl_blend_plan **out) {
    if (!m || !out || !segs || (n_logits > 0 && !logit_slots))
        return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_blend_plan_build: NULL argument");
    *out = NULL;
    if (n_seg <= 0) return kvl_errorf(KVL_ERR_BLEND_PLAN, "a prompt needs at least one segment");
    if (n_logits < 0) return kvl_errorf(KVL_ERR_RANGE, "%d logit slots", n_logits);
    kvl_blend_opts o = opts ? *opts : kvl_blend_opts_default();
    const kvl_model_config *c = kvl_model_get_config(m);
    KVL_TRY(check_opts(&o, c->n_layers));
    const uint8_t *fp = kvl_model_fingerprint(m);
    int64_t total = 0;
    for (int32_t s = 0; s < n_seg; s++) {
        const kvl_chunk_cache *cc = segs[s].cache;
        if (cc) {
            if (memcmp(cc->fingerprint, fp, 32) != 0)
                return kvl_errorf(KVL_ERR_FINGERPRINT, "segment %d: the chunk cache was computed by another model (fingerprint mismatch)", s);
            if (cc->n_layers != c->n_layers || cc->n_kv_heads != c->n_kv_heads || cc->head_dim != c->head_dim)
                return kvl_errorf(KVL_ERR_SHAPE, "segment %d: cache shape %d layers x %d kv heads x %d dims, model has %dx%dx%d", s,
                                  cc->n_layers, cc->n_kv_heads, cc->head_dim, c->n_layers, c->n_kv_heads, c->head_dim);
            if (cc->n_tokens <= 0 || !cc->tokens || (!cc->kv && !cc->enc) || cc->n_ctx < 0 || (cc->n_ctx > 0 && !cc->ctx))
                return kvl_errorf(KVL_ERR_INVALID_ARG, "segment %d: malformed chunk cache", s);
            total += cc->n_tokens;
        } else {
            if (segs[s].n_tokens <= 0 || !segs[s].tokens)
                return kvl_errorf(KVL_ERR_INVALID_ARG, "segment %d: uncached text without tokens", s);
            total += segs[s].n_tokens;
        }
    }
    if (total > c->max_seq)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "the prompt has %lld tokens, past the model's context of %d", (long long)total, c->max_seq);
    int32_t n = (int32_t)total;
    kvl_blend_plan *p = calloc(1, sizeof *p);
    if (!p) return KVL_ERR_NOMEM;
    p->mode = o.mode;
    p->metric = o.metric;
    p->fresh_candidates = o.fresh_candidates;
    p->attn_weight = o.attn_weight;
    p->whole_chunks = o.whole_chunks;
    p->guard = o.guard;
    p->guard_max_ratio = o.guard_max_ratio;
    p->naive_guard = o.mode == KVL_BLEND_BLEND ? o.naive_guard : 0;
    p->naive_guard_margin = o.naive_guard_margin;
    p->naive_rank_layer = -1;
    {
        /* FLOPs of the Q/K/V projections relative to a whole token-layer (projections + FFN) */
        double D = c->dim, qkv = D * ((double)c->n_heads + 2.0 * c->n_kv_heads) * c->head_dim;
        double rest = (double)c->n_heads * c->head_dim * D + 3.0 * D * c->hidden_dim;
        p->qkv_weight = qkv / (qkv + rest);
    }
    p->n_slots = n;
    p->n_layers = c->n_layers;
    p->n_segments = n_seg;
    size_t sz = (size_t)n * sizeof(int32_t);
    p->tokens = malloc(sz);
    p->positions = malloc(sz);
    p->kind = malloc((size_t)n);
    p->pinned = malloc((size_t)n);
    p->segment = malloc(sz);
    p->src_index = malloc(sz);
    p->rot_delta = malloc(sz);
    p->seg_slot0 = malloc((size_t)n_seg * sizeof(int32_t));
    p->logit_slots = malloc((size_t)(n_logits ? n_logits : 1) * sizeof(int32_t));
    p->layers = calloc((size_t)c->n_layers, sizeof *p->layers);
    if (!p->tokens || !p->positions || !p->kind || !p->pinned || !p->segment || !p->src_index || !p->rot_delta || !p->seg_slot0 ||
        !p->logit_slots || !p->layers) {
        kvl_blend_plan_free(p);
        return KVL_ERR_NOMEM;
    }
    kvl_status st = KVL_OK;
    int32_t at = 0;
    for (int32_t s = 0; s < n_seg; s++) {
        const kvl_chunk_cache *cc = segs[s].cache;
        const int32_t *tok = cc ? cc->tokens : segs[s].tokens;
        int32_t len = cc ? cc->n_tokens : segs[s].n_tokens;
        /* exact: the cache was computed behind exactly the tokens that precede it here (FULL computes
         * everything, so it has no exact slots) */
        int exact = cc && o.mode != KVL_BLEND_FULL && cc->n_ctx == at &&
                    (at == 0 || memcmp(cc->ctx, p->tokens, (size_t)at * sizeof(int32_t)) == 0);
        p->seg_slot0[s] = at;
        for (int32_t i = 0; i < len; i++, at++) {
            if (tok[i] < 0 || tok[i] >= c->vocab_size) {
                st = kvl_errorf(KVL_ERR_TOKEN_RANGE, "segment %d token %d: id %d outside the vocabulary [0, %d)", s, i, tok[i], c->vocab_size);
                break;
            }
            p->tokens[at] = tok[i];
            p->positions[at] = at;
            p->segment[at] = s;
            p->src_index[at] = cc ? i : -1;
            p->rot_delta[at] = cc ? at - (cc->n_ctx + i) : 0;
            p->kind[at] = !cc ? KVL_SLOT_UNCACHED : exact ? KVL_SLOT_EXACT : KVL_SLOT_CACHED;
            p->pinned[at] = p->kind[at] == KVL_SLOT_UNCACHED || (p->kind[at] == KVL_SLOT_CACHED && o.mode == KVL_BLEND_BLEND && i < o.chunk_head);
            if (p->kind[at] == KVL_SLOT_UNCACHED) p->n_uncached++;
            else if (p->kind[at] == KVL_SLOT_EXACT) p->n_exact++;
            else p->n_cached++;
        }
        if (st != KVL_OK) break;
    }
    for (int32_t i = 0; i < n_logits && st == KVL_OK; i++) {
        int32_t s = logit_slots[i];
        if (s < 0 || s >= n) st = kvl_errorf(KVL_ERR_RANGE, "logit slot %d outside the prompt's %d slots", s, n);
        else if (o.mode != KVL_BLEND_FULL && p->kind[s] != KVL_SLOT_UNCACHED && !(o.mode == KVL_BLEND_PREFIX && p->kind[s] == KVL_SLOT_CACHED))
            st = kvl_errorf(KVL_ERR_BLEND_PLAN, "logits wanted at slot %d, which mode %s takes from a cache instead of computing it", s,
                            kvl_blend_mode_name(o.mode));
        else p->logit_slots[i] = s;
    }
    p->n_logits = n_logits;
    if (st == KVL_OK && o.mode == KVL_BLEND_BLEND && o.budget > 0.0f) apply_budget(p, &o);
    /* the naive pass ranks only a layer-0 selection by attention (the budget policy's, or
     * select_layer 0 with attn_weight 2): nothing else reads its attention */
    if (st == KVL_OK && o.mode == KVL_BLEND_BLEND && o.naive_rank_layer >= 0 && o.select_layer == 0 && o.attn_weight == 2 &&
        (o.ratio > 0.0f || o.gradual_layers > 1)) {
        p->naive_rank_layer = o.naive_rank_layer;
        p->naive_mass = calloc((size_t)n, sizeof *p->naive_mass);
        if (!p->naive_mass) st = KVL_ERR_NOMEM;
    }
    p->ratio = o.mode == KVL_BLEND_BLEND ? o.ratio : 0.0f;
    if (st == KVL_OK) st = build_layers(p, &o);
    if (st != KVL_OK) {
        kvl_blend_plan_free(p);
        return st;
    }
    *out = p;
    return KVL_OK;
}

kvl_blend_cost kvl_blend_plan_cost(const kvl_blend_plan *p) {
    kvl_blend_cost c = {0, 0, 0, 0.0, 0.0, 0};
    if (!p) return c;
    double work = 0;
    for (int32_t l = 0; l < p->n_layers; l++) {
        const kvl_blend_layer *L = &p->layers[l];
        c.token_layers += L->n_qkv;
        int32_t computed = L->select == 2 ? L->n_keep : L->n_qkv; /* select 2: candidates get no qkv */
        c.token_layers += computed - L->n_qkv;
        for (int32_t i = 0; i < computed; i++) {
            int cached = p->kind[L->slots[i]] == KVL_SLOT_CACHED;
            c.cached_token_layers += cached;
            if (cached) work += i < L->n_keep ? 1.0 : p->qkv_weight;
        }
    }
    if ((p->naive_guard && p->n_logits > 0) || p->naive_rank_layer >= 0)
        c.token_layers += (int64_t)p->n_uncached * p->n_layers; /* the naive pass */
    c.cached_work_fraction = p->n_cached ? work / ((double)p->n_cached * p->n_layers) : 0.0;
    const kvl_blend_layer *last = &p->layers[p->n_layers - 1];
    for (int32_t i = 0; i < last->n_keep; i++) c.final_cached += p->kind[last->slots[i]] == KVL_SLOT_CACHED;
    c.full_token_layers = (int64_t)p->n_slots * p->n_layers;
    c.cached_fraction = p->n_cached ? (double)c.cached_token_layers / ((double)p->n_cached * p->n_layers) : 0.0;
    return c;
}

/* ---------------------------------------------------------------- load and run */

kvl_status kvl_blend_load(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv) {
    return kvl_blend_load_rest(m, p, segs, kv, NULL);
}

kvl_status kvl_blend_load_rest(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv,
                               const uint8_t *placed) {
    if (!m || !p || !segs || !kv) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_blend_load: NULL argument");
    if (kvl_kv_capacity(kv) < p->n_slots)
        return kvl_errorf(KVL_ERR_CONTEXT_FULL, "the kv cache has %d slots, the plan needs %d", kvl_kv_capacity(kv), p->n_slots);
    const kvl_model_config *c = kvl_model_get_config(m);
    if (c->n_layers != p->n_layers) return kvl_errorf(KVL_ERR_SHAPE, "plan for %d layers, model has %d", p->n_layers, c->n_layers);
    float *zeros = NULL;
    for (int32_t s = 0; s < p->n_segments; s++) {
        int32_t s0 = p->seg_slot0[s], len = (s + 1 < p->n_segments ? p->seg_slot0[s + 1] : p->n_slots) - s0;
        const kvl_chunk_cache *cc = segs[s].cache;
        if ((cc ? cc->n_tokens : segs[s].n_tokens) != len) {
            free(zeros);
            return kvl_errorf(KVL_ERR_BLEND_PLAN, "segment %d has %d tokens, the plan placed %d", s, cc ? cc->n_tokens : segs[s].n_tokens, len);
        }
        kvl_status st = KVL_OK;
        if (placed && placed[s]) continue;
        if (cc && !cc->kv && p->mode != KVL_BLEND_FULL) {
            free(zeros);
            return kvl_errorf(KVL_ERR_INVALID_ARG, "segment %d: an encoded cache must be decoded by its loader (kvl_gpu_blend_load)", s);
        }
        if (cc && p->mode != KVL_BLEND_FULL) {
            st = kvl_kv_write(kv, 0, c->n_layers, s0, len, cc->kv);
            if (st == KVL_OK) st = kvl_kv_rerotate(kv, s0, len, p->rot_delta[s0]);
        } else {
            /* zeros, so that no stale values are ever read for slots the plan computes */
            free(zeros);
            zeros = calloc(kvl_model_kv_elems_per_layer(m, len) * 2 * (size_t)c->n_layers, sizeof(float));
            if (!zeros) return KVL_ERR_NOMEM;
            st = kvl_kv_write(kv, 0, c->n_layers, s0, len, zeros);
            if (st == KVL_OK) st = kvl_kv_set_valid(kv, s0, len, 0);
        }
        if (st != KVL_OK) {
            free(zeros);
            return st;
        }
    }
    free(zeros);
    return KVL_OK;
}

typedef struct {
    float dev;
    int32_t slot;
    float chunk_mean;
} ranked;

static int by_dev_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->dev != y->dev) return x->dev > y->dev ? -1 : 1;
    return x->slot < y->slot ? -1 : x->slot > y->slot;
}

static int by_chunk_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->chunk_mean != y->chunk_mean) return x->chunk_mean > y->chunk_mean ? -1 : 1;
    return by_dev_desc(a, b);
}

static int by_int(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* Ranks the candidates of a selection layer (f holds their fresh qkv): keeps every non-cached slot
 * and the n_keep - (#non-cached) cached slots that deviate most; rewrites L->slots as kept (ascending)
 * then dropped (ascending). */
/* Whole-chunk selection: orders the candidates chunk by chunk, the chunk with the largest mean
 * score first, each chunk's tokens by score; the kept prefix is then whole chunks plus the top
 * tokens of one more. */
static void chunk_order(const kvl_blend_plan *p, ranked *r, int32_t nr) {
    double *sum = calloc((size_t)p->n_segments, sizeof *sum), *cnt = calloc((size_t)p->n_segments, sizeof *cnt);
    if (!sum || !cnt) { /* ranking by token then: still a valid selection */
        free(sum);
        free(cnt);
        qsort(r, (size_t)nr, sizeof *r, by_dev_desc);
        return;
    }
    for (int32_t i = 0; i < nr; i++) {
        sum[p->segment[r[i].slot]] += r[i].dev;
        cnt[p->segment[r[i].slot]] += 1;
    }
    /* key = chunk mean in the high part, token score as tie-break: sort by (mean desc, dev desc) */
    for (int32_t i = 0; i < nr; i++) {
        int32_t g = p->segment[r[i].slot];
        r[i].chunk_mean = (float)(sum[g] / cnt[g]);
    }
    qsort(r, (size_t)nr, sizeof *r, by_chunk_desc);
    free(sum);
    free(cnt);
}

/* dev[i] *= 1 + mass/mean(mass): a token the query attends to counts up to several times more, but
 * a token with a large deviation and little attention still ranks (the attention at the selection
 * layer is not the attention of the deeper layers; a pure product lost 2x on llama2xs280K) */
static void weight_by_mass(float *dev, const float *mass, const int32_t *slots, int32_t n) {
    double mean = 0;
    for (int32_t i = 0; i < n; i++) mean += mass[slots[i]];
    mean /= n > 0 ? n : 1;
    if (mean <= 0) return;
    for (int32_t i = 0; i < n; i++) dev[i] *= (float)(1.0 + mass[slots[i]] / mean);
}

/* The question, whose attention ranks the cached tokens: the uncached tokens after the last cached
 * one, up to the first logit slot there. Tokens after that slot (a teacher-forced continuation or
 * answer in an evaluation) are not known when a request is served, so the ranking must not see
 * them. */
static int32_t query_slots(const kvl_blend_plan *p, int32_t *q) {
    int32_t last_cached = -1, end = p->n_slots - 1, nq = 0;
    for (int32_t i = 0; i < p->n_slots; i++)
        if (p->kind[i] != KVL_SLOT_UNCACHED) last_cached = i;
    for (int32_t i = 0; i < p->n_logits; i++)
        if (p->logit_slots[i] > last_cached && p->logit_slots[i] < end) end = p->logit_slots[i];
    for (int32_t i = last_cached + 1; i <= end; i++)
        if (p->kind[i] == KVL_SLOT_UNCACHED) q[nq++] = i;
    return nq;
}

static kvl_status select_layer(kvl_fwd *f, kvl_blend_plan *p, kvl_blend_layer *L) {
    int32_t n = L->n_qkv;
    float *dev = calloc((size_t)(n ? n : 1), sizeof *dev); /* zeros: attention ranking without a query */
    ranked *r = malloc((size_t)n * sizeof *r);
    int32_t *tmp = malloc((size_t)n * sizeof *tmp);
    kvl_status s = dev && r && tmp ? KVL_OK : KVL_ERR_NOMEM;
    if (s == KVL_OK && p->attn_weight == 2) {
        /* ranked by attention alone: no deviation (uncached slots have nothing to compare with) */
    } else if (s == KVL_OK && p->metric == KVL_BLEND_METRIC_KV_NORM) {
        /* K and V deviations live on different scales (keys are larger): each is divided by its
         * mean over the candidates before they are added */
        float *dv = malloc((size_t)n * sizeof *dv);
        s = dv ? kvl_fwd_deviation(f, KVL_DEV_K, dev) : KVL_ERR_NOMEM;
        if (s == KVL_OK) s = kvl_fwd_deviation(f, KVL_DEV_V, dv);
        if (s == KVL_OK) {
            double mk = 0, mv = 0;
            for (int32_t i = 0; i < n; i++) mk += dev[i], mv += dv[i];
            mk = mk > 0 ? n / mk : 0;
            mv = mv > 0 ? n / mv : 0;
            for (int32_t i = 0; i < n; i++) dev[i] = (float)(dev[i] * mk + dv[i] * mv);
        }
        free(dv);
    } else if (s == KVL_OK) s = kvl_fwd_deviation(f, p->metric, dev);
    /* fresh K/V: the uncached candidates always (they have no other), the cached ones by option;
     * then the attention the query puts on each slot over that fused cache */
    int32_t n_commit = 0;
    for (int32_t i = 0; i < n && s == KVL_OK; i++)
        if (p->fresh_candidates || p->kind[L->slots[i]] != KVL_SLOT_CACHED) tmp[n_commit++] = L->slots[i];
    if (s == KVL_OK) s = kvl_fwd_commit(f, tmp, n_commit);
    if (s == KVL_OK && p->attn_weight) {
        /* the query slots are uncached, so every selection layer computes them */
        int32_t nq = query_slots(p, tmp);
        float *mass = malloc((size_t)p->n_slots * sizeof *mass);
        s = mass ? kvl_fwd_attn_mass(f, tmp, nq, mass) : KVL_ERR_NOMEM;
        if (s == KVL_OK && nq > 0) {
            if (p->attn_weight == 2)
                for (int32_t i = 0; i < n; i++) dev[i] = mass[L->slots[i]]; /* attention alone */
            else weight_by_mass(dev, mass, L->slots, n);
        }
        free(mass);
    }
    if (s == KVL_OK) {
        int32_t nk = 0, nr = 0;
        for (int32_t i = 0; i < n; i++) {
            if (p->kind[L->slots[i]] != KVL_SLOT_CACHED || p->pinned[L->slots[i]]) tmp[nk++] = L->slots[i];
            else r[nr++] = (ranked){isnan(dev[i]) ? INFINITY : dev[i], L->slots[i], 0.0f};
        }
        int32_t want = L->n_keep - nk;
        if (want < 0 || want > nr) {
            s = kvl_errorf(KVL_ERR_BLEND_PLAN, "selection keeps %d of %d candidates, %d of which must be kept", L->n_keep, n, nk);
        } else {
            if (p->whole_chunks) chunk_order(p, r, nr);
            else qsort(r, (size_t)nr, sizeof *r, by_dev_desc);
            double tot = 0, kept = 0;
            for (int32_t i = 0; i < nr; i++) tot += r[i].dev;
            for (int32_t i = 0; i < want; i++) kept += r[i].dev;
            if (p->guard > 0 && tot > 0 && kept < p->guard * tot) {
                /* guard: the kept tokens hold too little of the deviation, so the rest of the
                 * cache stays far from what a full prefill computes next to freshly computed
                 * tokens; keep more, up to guard_max_ratio of the cached tokens */
                int32_t cap = (int32_t)floor(p->guard_max_ratio * p->n_cached + 0.5);
                if (cap > nr) cap = nr;
                int32_t w = want;
                while (w < cap && kept < p->guard * tot) kept += r[w++].dev;
                if (w > want) {
                    L->n_keep += w - want;
                    p->guard_added += w - want;
                    want = w;
                }
            }
            for (int32_t i = 0; i < want; i++) tmp[nk++] = r[i].slot;
            if (!p->have_captured) {
                p->captured = tot > 0 ? kept / tot : 1.0;
                p->have_captured = 1;
            }
            qsort(tmp, (size_t)nk, sizeof *tmp, by_int);
            int32_t nd = 0;
            for (int32_t i = want; i < nr; i++) tmp[nk + nd++] = r[i].slot;
            qsort(tmp + nk, (size_t)nd, sizeof *tmp, by_int);
            memcpy(L->slots, tmp, (size_t)n * sizeof *tmp);
        }
    }
    free(dev);
    free(r);
    free(tmp);
    return s;
}

/* Query-attention selection at layer 0 (select == 2): a re-rotated cache is exact at layer 0, so the
 * query's attention over it is what a full prefill sees there. Only the uncached (and pinned) slots
 * get Q/K/V first; the cached candidates are ranked by the attention mass the query puts on them and
 * only the kept ones are computed: no token-layer is spent on ranking. */
static kvl_status select_attention_first(kvl_fwd *f, kvl_blend_plan *p, kvl_blend_layer *L, int32_t l) {
    int32_t n = L->n_qkv, nu = 0, nq = 0, nr = 0;
    int32_t *tmp = malloc((size_t)n * sizeof *tmp), *q = malloc((size_t)n * sizeof *q);
    ranked *r = malloc((size_t)n * sizeof *r);
    float *mass = malloc((size_t)p->n_slots * sizeof *mass);
    kvl_status s = tmp && q && r && mass ? KVL_OK : KVL_ERR_NOMEM;
    if (s == KVL_OK) nq = query_slots(p, q);
    for (int32_t i = 0; i < n && s == KVL_OK; i++) {
        int32_t j = L->slots[i];
        if (p->kind[j] != KVL_SLOT_CACHED || p->pinned[j]) tmp[nu++] = j;
    }
    if (s == KVL_OK) s = kvl_fwd_qkv(f, l, tmp, nu, NULL, NULL);
    if (s == KVL_OK) s = kvl_fwd_commit(f, tmp, nu);
    /* ranked by the question's attention at a deeper layer of the naive pass, or here at layer 0 */
    if (s == KVL_OK && nq > 0 && p->naive_rank_layer >= 0) memcpy(mass, p->naive_mass, (size_t)p->n_slots * sizeof *mass);
    else if (s == KVL_OK && nq > 0) s = kvl_fwd_attn_mass(f, q, nq, mass);
    if (s == KVL_OK) {
        for (int32_t i = 0; i < n; i++) {
            int32_t j = L->slots[i];
            if (p->kind[j] == KVL_SLOT_CACHED && !p->pinned[j]) r[nr++] = (ranked){nq > 0 ? mass[j] : 0.0f, j, 0.0f};
        }
        int32_t want = L->n_keep - nu;
        if (want < 0 || want > nr) s = kvl_errorf(KVL_ERR_BLEND_PLAN, "selection keeps %d of %d candidates, %d of which must be kept", L->n_keep, n, nu);
        else {
            if (p->whole_chunks) chunk_order(p, r, nr);
            else qsort(r, (size_t)nr, sizeof *r, by_dev_desc);
            double tot = 0, kept = 0;
            for (int32_t i = 0; i < nr; i++) tot += r[i].dev, kept += i < want ? r[i].dev : 0;
            p->captured = tot > 0 ? kept / tot : 1.0;
            p->have_captured = 1;
            int32_t nk = nu;
            for (int32_t i = 0; i < want; i++) tmp[nk++] = r[i].slot;
            qsort(tmp, (size_t)nk, sizeof *tmp, by_int);
            int32_t nd = 0;
            for (int32_t i = want; i < nr; i++) tmp[nk + nd++] = r[i].slot;
            qsort(tmp + nk, (size_t)nd, sizeof *tmp, by_int);
            memcpy(L->slots, tmp, (size_t)n * sizeof *tmp);
        }
    }
    if (s == KVL_OK) s = kvl_fwd_qkv(f, l, L->slots, L->n_keep, NULL, NULL);
    if (s == KVL_OK) s = kvl_fwd_commit(f, L->slots, L->n_keep);
    free(tmp);
    free(q);
    free(r);
    free(mass);
    return s;
}

/* Mean entropy (nats) of the softmax of logits [n][vocab]. */
static double mean_entropy(const float *logits, int32_t n, int32_t vocab) {
    double tot = 0;
    for (int32_t t = 0; t < n; t++) {
        const float *x = logits + (size_t)t * vocab;
        float mx = x[0];
        for (int32_t i = 1; i < vocab; i++) mx = x[i] > mx ? x[i] : mx;
        double z = 0, ez = 0;
        for (int32_t i = 0; i < vocab; i++) {
            double e = exp((double)x[i] - mx);
            z += e;
            ez += e * ((double)x[i] - mx);
        }
        tot += log(z) - ez / z; /* H = log Z - E[x - max] */
    }
    return n > 0 ? tot / n : 0.0;
}

/* Naive reuse over the loaded kv: the uncached slots at every layer, the caches as they are; logits
 * of the plan's logit slots into out (when it has any). With p->naive_rank_layer >= 0 it also
 * records the attention the question puts on every slot at that layer into p->naive_mass. */
static kvl_status run_naive(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *out, kvl_blend_layer_hook hook,
                            void *ctx) {
    int32_t *idx = malloc((size_t)p->n_slots * sizeof *idx), *q = malloc((size_t)p->n_slots * sizeof *q), nu = 0;
    if (!idx || !q) {
        free(idx);
        free(q);
        return KVL_ERR_NOMEM;
    }
    for (int32_t i = 0; i < p->n_slots; i++)
        if (p->kind[i] == KVL_SLOT_UNCACHED) idx[nu++] = i;
    int32_t nq = query_slots(p, q);
    kvl_fwd *f = NULL;
    kvl_status s = kvl_fwd_begin(m, kv, p->n_slots, p->tokens, p->positions, &f);
    for (int32_t l = 0; l < p->n_layers && s == KVL_OK; l++) {
        if (hook && (s = hook(ctx, l)) != KVL_OK) break; /* layer l's caches are read below */
        s = kvl_fwd_qkv(f, l, idx, nu, NULL, NULL);
        if (s == KVL_OK) s = kvl_fwd_commit(f, idx, nu);
        if (s == KVL_OK && l == p->naive_rank_layer) {
            if (nq > 0) s = kvl_fwd_attn_mass(f, q, nq, p->naive_mass);
            else memset(p->naive_mass, 0, (size_t)p->n_slots * sizeof *p->naive_mass);
        }
        if (s == KVL_OK) s = kvl_fwd_attn_ffn(f, idx, nu);
    }
    if (s == KVL_OK && p->n_logits > 0) s = kvl_fwd_logits(f, p->logit_slots, p->n_logits, out);
    if (f) kvl_fwd_free(f);
    free(idx);
    free(q);
    return s;
}

static kvl_status run_blend(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits, kvl_blend_layer_hook hook,
                            void *ctx);

kvl_status kvl_blend_run(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits) {
    return kvl_blend_run_hook(m, p, kv, logits, NULL, NULL);
}

kvl_status kvl_blend_run_hook(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits, kvl_blend_layer_hook hook,
                              void *ctx) {
    if (!m || !p || !kv || (p->n_logits > 0 && !logits)) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_blend_run: NULL argument");
    if (kvl_model_get_config(m)->n_layers != p->n_layers)
        return kvl_errorf(KVL_ERR_SHAPE, "plan for %d layers, model has %d", p->n_layers, kvl_model_get_config(m)->n_layers);
    p->fell_back = 0;
    p->entropy_blend = p->entropy_naive = 0;
    int guard = p->naive_guard && p->n_logits > 0;
    if (!guard && p->naive_rank_layer < 0) return run_blend(m, p, kv, logits, hook, ctx);
    /* Naive reuse first: it reads the caches as loaded and writes only the uncached slots, which
     * the blend recomputes at every layer before reading them. It gives the ranking (where the
     * question looks at a deeper layer, over the caches as they are) and the guard's alternative. */
    const kvl_model_config *c = kvl_model_get_config(m);
    size_t nkv = guard ? kvl_model_kv_elems_per_layer(m, p->n_slots) * 2 * (size_t)p->n_layers : 1;
    size_t nlg = (size_t)(p->n_logits ? p->n_logits : 1) * (size_t)c->vocab_size;
    float *naive_kv = guard ? malloc(nkv * sizeof(float)) : NULL, *naive_lg = malloc(nlg * sizeof(float));
    kvl_status s = (naive_kv || !guard) && naive_lg ? KVL_OK : KVL_ERR_NOMEM;
    /* the hook runs before each layer of the first pass that reads it (a layer already put in
     * place makes a later call for it a no-op) */
    if (s == KVL_OK) s = run_naive(m, p, kv, naive_lg, hook, ctx);
    if (s == KVL_OK && guard) s = kvl_kv_read(kv, 0, p->n_layers, 0, p->n_slots, naive_kv);
    if (s == KVL_OK) s = run_blend(m, p, kv, logits, hook, ctx);
    if (s == KVL_OK && guard) {
        /* Without the full prefill's answer, the run-time evidence of a partial recompute that
         * misleads the question (docs/blend.md: fresh tokens over-attract it) is that it leaves
         * the question less sure of its next token than naive reuse does */
        p->entropy_naive = mean_entropy(naive_lg, p->n_logits, c->vocab_size);
        p->entropy_blend = mean_entropy(logits, p->n_logits, c->vocab_size);
        if (p->entropy_naive + p->naive_guard_margin < p->entropy_blend) {
            p->fell_back = 1;
            s = kvl_kv_write(kv, 0, p->n_layers, 0, p->n_slots, naive_kv);
            memcpy(logits, naive_lg, (size_t)p->n_logits * (size_t)c->vocab_size * sizeof(float));
        }
    }
    free(naive_kv);
    free(naive_lg);
    return s;
}

static kvl_status run_blend(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits, kvl_blend_layer_hook hook,
                            void *ctx) {
    kvl_fwd *f;
    KVL_TRY(kvl_fwd_begin(m, kv, p->n_slots, p->tokens, p->positions, &f));
    kvl_status s = KVL_OK;
    p->have_captured = 0;
    p->captured = 0;
    p->guard_added = 0;
    for (int32_t l = 0; l < p->n_layers && s == KVL_OK; l++) {
        if (hook && (s = hook(ctx, l)) != KVL_OK) break;
        kvl_blend_layer *L = &p->layers[l];
        /* a layer whose set has the size of the previous layer's kept set is exactly that set (the
         * sets nest); copying it carries the run-time selection down to the following layers */
        if (l > 0 && L->n_qkv == p->layers[l - 1].n_keep && L->slots != p->layers[l - 1].slots)
            memcpy(L->slots, p->layers[l - 1].slots, (size_t)L->n_qkv * sizeof(int32_t));
        if (L->select == 2) {
            s = select_attention_first(f, p, L, l);
            if (s == KVL_OK) s = kvl_fwd_attn_ffn(f, L->slots, L->n_keep);
            continue;
        }
        s = kvl_fwd_qkv(f, l, L->slots, L->n_qkv, NULL, NULL);
        if (s == KVL_OK && L->select) {
            int32_t before = L->n_keep;
            s = select_layer(f, p, L);
            /* the guard widened the set: the layers that follow (single selection layer) take it */
            for (int32_t l2 = l + 1; s == KVL_OK && L->n_keep != before && l2 < p->n_layers; l2++)
                p->layers[l2].n_qkv = p->layers[l2].n_keep = L->n_keep;
        }
        /* selection layers committed their fresh K/V while ranking */
        if (s == KVL_OK && !L->select) s = kvl_fwd_commit(f, L->slots, L->n_keep);
        if (s == KVL_OK && L->select && !p->fresh_candidates) s = kvl_fwd_commit(f, L->slots, L->n_keep);
        if (s == KVL_OK) s = kvl_fwd_attn_ffn(f, L->slots, L->n_keep);
    }
    if (s == KVL_OK) s = kvl_fwd_logits(f, p->logit_slots, p->n_logits, logits);
    kvl_fwd_free(f);
    return s;
}
