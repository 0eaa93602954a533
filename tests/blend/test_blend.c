/* CacheBlend tests on small synthetic models (both RoPE layouts): ratio 1 equals full prefill,
 * re-rotated caches equal a prefill at the new offset, plan sets and selection are what the plan
 * says, naive equals a masked forward, bad input gives clear errors. */
#include <stdint.h>

#include "kvl_blend.h"
#include "kvl_test.h"

#define NCH 3
#define CL 12
#define NQ 6

static kvl_model_config tiny_cfg(int rope_style) {
    kvl_model_config c = {64, 96, 4, 4, 2, 16, 128, 96, 10000.0f, 1e-5f, 0, rope_style, 1, 2};
    return c;
}

/* the ratio policy (the default is the budget policy), without the naive pass (ranking and guard),
 * so that each mechanism is tested alone */
static kvl_blend_opts ratio_opts(void) {
    kvl_blend_opts o = kvl_blend_opts_default();
    o.budget = 0.0f;
    o.naive_guard = 0;
    o.naive_rank_layer = -1;
    return o;
}

typedef struct {
    kvl_model *m;
    int32_t chunk[NCH][CL], tail[NQ], bos;
    kvl_chunk_cache *cc[NCH];
    kvl_blend_segment segs[NCH + 2];
    int32_t prompt[1 + NCH * CL + NQ], pos[1 + NCH * CL + NQ];
    int32_t n;
} fixture;

static void fixture_init(fixture *fx, int rope_style, int n_ctx_bos, uint64_t seed) {
    kvl_model_config c = tiny_cfg(rope_style);
    memset(fx, 0, sizeof *fx);
    CHECK_OK(kvl_model_synthetic(&c, seed, NULL, &fx->m));
    uint64_t r = seed * 2654435761u + 7;
    fx->bos = 1;
    int32_t at = 0;
    fx->prompt[at++] = fx->bos;
    for (int i = 0; i < NCH; i++)
        for (int j = 0; j < CL; j++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            fx->chunk[i][j] = 3 + (int32_t)((r >> 33) % 120);
            fx->prompt[at++] = fx->chunk[i][j];
        }
    for (int j = 0; j < NQ; j++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        fx->tail[j] = 3 + (int32_t)((r >> 33) % 120);
        fx->prompt[at++] = fx->tail[j];
    }
    fx->n = at;
    for (int32_t i = 0; i < at; i++) fx->pos[i] = i;
    fx->segs[0] = (kvl_blend_segment){NULL, &fx->bos, 1};
    for (int i = 0; i < NCH; i++) {
        CHECK_OK(kvl_chunk_cache_prefill(fx->m, fx->chunk[i], CL, &fx->bos, n_ctx_bos, &fx->cc[i]));
        fx->segs[1 + i] = (kvl_blend_segment){fx->cc[i], NULL, 0};
    }
    fx->segs[1 + NCH] = (kvl_blend_segment){NULL, fx->tail, NQ};
}

static void fixture_free(fixture *fx) {
    for (int i = 0; i < NCH; i++) kvl_chunk_cache_free(fx->cc[i]);
    kvl_model_free(fx->m);
}

/* runs opts over the fixture keeping the kv: logits of the tail slots into out, the kv's K/V of
 * every slot into kv_out (may be NULL) */
static kvl_blend_plan *run_keep(fixture *fx, kvl_blend_opts o, float *out, float *kv_out) {
    int32_t ls[NQ];
    for (int i = 0; i < NQ; i++) ls[i] = fx->n - NQ + i;
    kvl_blend_plan *p = NULL;
    kvl_kv *kv = NULL;
    CHECK_OK(kvl_blend_plan_build(fx->m, fx->segs, NCH + 2, ls, NQ, &o, &p));
    CHECK_OK(kvl_kv_create(fx->m, fx->n, &kv));
    if (p && kv) {
        CHECK_OK(kvl_blend_load(fx->m, p, fx->segs, kv));
        CHECK_OK(kvl_blend_run(fx->m, p, kv, out));
        if (kv_out) CHECK_OK(kvl_kv_read(kv, 0, p->n_layers, 0, fx->n, kv_out));
    }
    kvl_kv_free(kv);
    return p;
}

/* runs opts over the fixture, logits of the tail slots into out [NQ][vocab]; returns the plan */
static kvl_blend_plan *run_mode(fixture *fx, kvl_blend_opts o, float *out) { return run_keep(fx, o, out, NULL); }

static void full_logits(fixture *fx, float *out) {
    int32_t ls[NQ];
    for (int i = 0; i < NQ; i++) ls[i] = fx->n - NQ + i;
    kvl_kv *kv = NULL;
    CHECK_OK(kvl_kv_create(fx->m, fx->n, &kv));
    CHECK_OK(kvl_forward(fx->m, kv, fx->n, fx->prompt, fx->pos, NULL, NQ, ls, out));
    kvl_kv_free(kv);
}

/* ratio 1.0 (and FULL, PREFIX with true-prefix caches) reproduce a full prefill */
static void test_ratio_one_is_full(int rope_style) {
    for (int bos = 0; bos <= 1; bos++) {
        fixture fx;
        fixture_init(&fx, rope_style, bos, 11);
        size_t V = 128, nl = NQ * V;
        float *ref = malloc(nl * sizeof(float)), *got = malloc(nl * sizeof(float));
        full_logits(&fx, ref);
        int modes[] = {KVL_BLEND_BLEND, KVL_BLEND_FULL, KVL_BLEND_PREFIX};
        for (int k = 0; k < 3; k++) {
            kvl_blend_opts o = ratio_opts();
            o.mode = modes[k];
            o.ratio = 1.0f;
            kvl_blend_plan *p = run_mode(&fx, o, got);
            double e = kvl_rel_err(got, ref, nl);
            CHECK_MSG(e <= 1e-5, "rope %d bos %d mode %s: rel err %g", rope_style, bos, kvl_blend_mode_name(modes[k]), e);
            /* with a BOS-prefixed cache the first chunk is a true prefix: never recomputed */
            if (p) CHECK(p->n_exact == (modes[k] == KVL_BLEND_FULL ? 0 : bos ? CL : 0));
            kvl_blend_plan_free(p);
        }
        free(ref);
        free(got);
        fixture_free(&fx);
    }
}

/* a chunk cache placed at offset p (keys re-rotated on load) equals the chunk prefilled at p */
static void test_rerotation(int rope_style) {
    kvl_model_config c = tiny_cfg(rope_style);
    kvl_model *m = NULL;
    CHECK_OK(kvl_model_synthetic(&c, 5, NULL, &m));
    if (!m) return;
    int32_t tok[CL + 1], pos[CL + 1], pad[40];
    for (int i = 0; i <= CL; i++) tok[i] = 3 + (i * 37) % 120;
    for (int i = 0; i < 40; i++) pad[i] = 3 + (i * 11) % 120;
    size_t per = kvl_model_kv_elems_per_layer(m, CL) * 2 * (size_t)c.n_layers;
    float *a = malloc(per * sizeof(float)), *b = malloc(per * sizeof(float));
    int offsets[] = {1, 7, 40};
    for (int n_ctx = 0; n_ctx <= 1; n_ctx++) {
        kvl_chunk_cache *cc = NULL;
        CHECK_OK(kvl_chunk_cache_prefill(m, tok + 1, CL, tok, n_ctx, &cc));
        for (int k = 0; k < 3 && cc; k++) {
            int p = offsets[k];
            /* through the plan: p uncached tokens in front, then the cached chunk */
            kvl_blend_segment segs[2] = {{NULL, pad, p}, {cc, NULL, 0}};
            kvl_blend_opts o = ratio_opts();
            o.mode = KVL_BLEND_NAIVE;
            kvl_blend_plan *pl = NULL;
            kvl_kv *kv = NULL, *ref = NULL;
            CHECK_OK(kvl_blend_plan_build(m, segs, 2, NULL, 0, &o, &pl));
            CHECK_OK(kvl_kv_create(m, p + CL, &kv));
            if (pl && kv) {
                CHECK(pl->rot_delta[p] == p - n_ctx);
                CHECK_OK(kvl_blend_load(m, pl, segs, kv));
                CHECK_OK(kvl_kv_read(kv, 0, c.n_layers, p, CL, a));
                CHECK(kvl_kv_is_valid(kv, p) && !kvl_kv_is_valid(kv, 0));
            }
            /* reference: the chunk (behind its context) prefilled alone at positions p - n_ctx .. */
            for (int i = 0; i <= CL; i++) pos[i] = p - n_ctx + i;
            CHECK_OK(kvl_kv_create(m, CL + 1, &ref));
            if (ref) {
                CHECK_OK(kvl_forward(m, ref, CL + n_ctx, tok + 1 - n_ctx, pos, NULL, 0, NULL, NULL));
                CHECK_OK(kvl_kv_read(ref, 0, c.n_layers, n_ctx, CL, b));
            }
            double e = kvl_rel_err(a, b, per);
            CHECK_MSG(e <= 1e-5, "rope %d ctx %d offset %d: rel err %g", rope_style, n_ctx, p, e);
            kvl_kv_free(kv);
            kvl_kv_free(ref);
            kvl_blend_plan_free(pl);
        }
        kvl_chunk_cache_free(cc);
    }
    free(a);
    free(b);
    kvl_model_free(m);
}

static int contains(const int32_t *s, int32_t n, int32_t x) {
    for (int32_t i = 0; i < n; i++)
        if (s[i] == x) return 1;
    return 0;
}

/* the kept slots of a selection are the cached slots of highest score: none dropped above any kept */
static void check_top(const kvl_blend_plan *p, int32_t n, const int32_t *kept, int32_t n_kept, const float *score,
                      const char *what) {
    float min_kept = INFINITY, max_dropped = -INFINITY;
    for (int32_t i = 0; i < n; i++) {
        if (p->kind[i] != KVL_SLOT_CACHED) continue;
        if (contains(kept, n_kept, i)) min_kept = fminf(min_kept, score[i]);
        else max_dropped = fmaxf(max_dropped, score[i]);
    }
    CHECK_MSG(min_kept >= max_dropped, "%s: kept min %g < dropped max %g", what, (double)min_kept, (double)max_dropped);
}

/* the per-layer sets: counts, nesting, uncached always kept, the selection is the top deviation */
static void test_plan(void) {
    fixture fx;
    fixture_init(&fx, KVL_ROPE_HALF, 0, 3);
    float *lg = malloc(NQ * 128 * sizeof(float));
    int32_t n_cached = NCH * CL, n_unc = 1 + NQ;
    /* single-layer selection at layer 1 by key deviation alone */
    kvl_blend_opts o = ratio_opts();
    o.ratio = 0.25f;
    o.metric = KVL_DEV_K;
    o.attn_weight = 0;
    kvl_blend_plan *p = run_mode(&fx, o, lg);
    if (p) {
        int32_t want = n_unc + (int32_t)(0.25 * n_cached + 0.5);
        CHECK(p->n_cached == n_cached && p->n_uncached == n_unc && p->n_exact == 0);
        CHECK(p->layers[0].n_qkv == fx.n && p->layers[0].n_keep == fx.n && !p->layers[0].select);
        CHECK(p->layers[1].select && p->layers[1].n_qkv == fx.n && p->layers[1].n_keep == want);
        for (int l = 2; l < p->n_layers; l++) {
            CHECK(p->layers[l].n_qkv == want && p->layers[l].n_keep == want && !p->layers[l].select);
            CHECK(!memcmp(p->layers[l].slots, p->layers[1].slots, (size_t)want * sizeof(int32_t)));
        }
        for (int32_t i = 0; i < fx.n; i++)
            if (p->kind[i] == KVL_SLOT_UNCACHED) CHECK(contains(p->layers[1].slots, want, i));
        for (int32_t i = 1; i < want; i++) CHECK(p->layers[1].slots[i - 1] < p->layers[1].slots[i]);
        kvl_blend_cost cost = kvl_blend_plan_cost(p);
        CHECK(cost.token_layers == 2LL * fx.n + 2LL * want);
        CHECK(cost.final_cached == want - n_unc);
        /* independent ranking: fresh layer-1 keys vs cached ones through the engine's steps */
        kvl_kv *kv = NULL;
        kvl_fwd *f = NULL;
        CHECK_OK(kvl_kv_create(fx.m, fx.n, &kv));
        CHECK_OK(kvl_blend_load(fx.m, p, fx.segs, kv));
        CHECK_OK(kvl_fwd_begin(fx.m, kv, fx.n, fx.prompt, fx.pos, &f));
        int32_t all[64];
        for (int32_t i = 0; i < fx.n; i++) all[i] = i;
        CHECK_OK(kvl_fwd_layer(f, 0, all, fx.n));
        float dev[64];
        CHECK_OK(kvl_fwd_qkv(f, 1, all, fx.n, NULL, NULL));
        CHECK_OK(kvl_fwd_deviation(f, KVL_DEV_K, dev));
        check_top(p, fx.n, p->layers[1].slots, want, dev, "key deviation");
        kvl_fwd_free(f);
        kvl_kv_free(kv);
    }
    kvl_blend_plan_free(p);

    /* attention-weighted value deviation (the default): same ranking rebuilt from the engine steps */
    o = ratio_opts();
    o.ratio = 0.25f;
    p = run_mode(&fx, o, lg);
    if (p) {
        int32_t want = p->layers[1].n_keep;
        kvl_kv *kv = NULL;
        kvl_fwd *f = NULL;
        CHECK_OK(kvl_kv_create(fx.m, fx.n, &kv));
        CHECK_OK(kvl_blend_load(fx.m, p, fx.segs, kv));
        CHECK_OK(kvl_fwd_begin(fx.m, kv, fx.n, fx.prompt, fx.pos, &f));
        /* the question = the tail up to the first logit slot: here the tail's first token */
        int32_t all[64], q[1] = {fx.n - NQ};
        for (int32_t i = 0; i < fx.n; i++) all[i] = i;
        CHECK_OK(kvl_fwd_layer(f, 0, all, fx.n));
        float dev[64], mass[64];
        CHECK_OK(kvl_fwd_qkv(f, 1, all, fx.n, NULL, NULL));
        CHECK_OK(kvl_fwd_deviation(f, KVL_DEV_V, dev));
        CHECK_OK(kvl_fwd_commit(f, all, fx.n));
        CHECK_OK(kvl_fwd_attn_mass(f, q, 1, mass));
        double tot = 0, mean = 0;
        for (int32_t i = 0; i < fx.n; i++) tot += mass[i], mean += mass[i] / fx.n;
        CHECK_MSG(fabs(tot - 4) < 1e-3, "attention mass sums to %g, want 1 query x 4 heads", tot);
        float sc[64];
        for (int32_t i = 0; i < fx.n; i++) sc[i] = (float)(dev[i] * (1.0 + mass[i] / mean));
        check_top(p, fx.n, p->layers[1].slots, want, sc, "value deviation x attention");
        kvl_fwd_free(f);
        kvl_kv_free(kv);
    }
    kvl_blend_plan_free(p);

    /* gradual filtering over 3 layers from 60% to 20%: sets narrow and nest */
    o = ratio_opts();
    o.ratio = 0.2f;
    o.gradual_layers = 3;
    o.gradual_first = 0.6f;
    p = run_mode(&fx, o, lg);
    if (p) {
        int32_t k1 = n_unc + (int32_t)(0.6 * n_cached + 0.5), k2 = n_unc + (int32_t)(0.4 * n_cached + 0.5),
                k3 = n_unc + (int32_t)(0.2 * n_cached + 0.5);
        CHECK(p->layers[1].select && p->layers[2].select && p->layers[3].select);
        CHECK(p->layers[1].n_keep == k1 && p->layers[2].n_qkv == k1 && p->layers[2].n_keep == k2);
        CHECK(p->layers[3].n_qkv == k2 && p->layers[3].n_keep == k3);
        for (int l = 2; l < 4; l++)
            for (int32_t i = 0; i < p->layers[l].n_qkv; i++)
                CHECK(contains(p->layers[l - 1].slots, p->layers[l - 1].n_keep, p->layers[l].slots[i]));
    }
    kvl_blend_plan_free(p);

    /* query-attention selection at layer 0: no cached token computed but the kept ones, and the
     * kept ones are those the query attends to most at layer 0 (exact there) */
    o = ratio_opts();
    o.select_layer = 0;
    o.attn_weight = 2;
    o.ratio = 0.25f;
    p = run_mode(&fx, o, lg);
    if (p) {
        int32_t want = n_unc + (int32_t)(0.25 * n_cached + 0.5);
        CHECK(p->layers[0].select == 2 && p->layers[0].n_keep == want);
        for (int l = 1; l < p->n_layers; l++) CHECK(p->layers[l].n_qkv == want && p->layers[l].n_keep == want);
        kvl_blend_cost cost = kvl_blend_plan_cost(p);
        CHECK(cost.token_layers == (int64_t)want * p->n_layers);
        CHECK(fabs(cost.cached_fraction - (double)(want - n_unc) / n_cached) < 1e-12);
        kvl_kv *kv = NULL;
        kvl_fwd *f = NULL;
        CHECK_OK(kvl_kv_create(fx.m, fx.n, &kv));
        CHECK_OK(kvl_blend_load(fx.m, p, fx.segs, kv));
        CHECK_OK(kvl_fwd_begin(fx.m, kv, fx.n, fx.prompt, fx.pos, &f));
        int32_t unc[16], q[1] = {fx.n - NQ}, nu = 0;
        for (int32_t i = 0; i < fx.n; i++)
            if (p->kind[i] == KVL_SLOT_UNCACHED) unc[nu++] = i;
        float mass[64];
        CHECK_OK(kvl_fwd_qkv(f, 0, unc, nu, NULL, NULL));
        CHECK_OK(kvl_fwd_commit(f, unc, nu));
        CHECK_OK(kvl_fwd_attn_mass(f, q, 1, mass));
        check_top(p, fx.n, p->layers[0].slots, want, mass, "query attention");
        kvl_fwd_free(f);
        kvl_kv_free(kv);
    }
    kvl_blend_plan_free(p);

    /* the guard widens the kept set until it holds the asked share of the score (or its cap) */
    o = ratio_opts();
    o.ratio = 0.05f;
    o.guard = 0.9f;
    o.guard_max_ratio = 0.6f;
    p = run_mode(&fx, o, lg);
    if (p) {
        int32_t base = n_unc + (int32_t)(0.05 * n_cached + 0.5), cap = n_unc + (int32_t)(0.6 * n_cached + 0.5);
        CHECK(p->guard_added > 0 && p->layers[1].n_keep == base + p->guard_added && p->layers[1].n_keep <= cap);
        CHECK(p->captured >= 0.9 - 1e-9 || p->layers[1].n_keep == cap);
        for (int l = 2; l < p->n_layers; l++) {
            CHECK(p->layers[l].n_keep == p->layers[1].n_keep && p->layers[l].n_qkv == p->layers[1].n_keep);
            CHECK(!memcmp(p->layers[l].slots, p->layers[1].slots, (size_t)p->layers[1].n_keep * sizeof(int32_t)));
        }
    }
    kvl_blend_plan_free(p);

    /* a budget: query-attention selection, 2r kept at layer 0 and r from layer 1, within budget */
    float budgets[] = {0.05f, 0.2f, 0.5f, 0.8f};
    for (int k = 0; k < 4; k++) {
        o = ratio_opts();
        o.budget = budgets[k];
        p = run_mode(&fx, o, lg);
        if (p) {
            kvl_blend_cost cost = kvl_blend_plan_cost(p);
            CHECK_MSG(cost.cached_fraction <= budgets[k] + 1e-9, "budget %g spent %g", (double)budgets[k], cost.cached_fraction);
            CHECK_MSG(cost.cached_fraction >= budgets[k] - 0.1, "budget %g spent only %g", (double)budgets[k], cost.cached_fraction);
            int narrow = budgets[k] >= 0.2f; /* below 20%: one selection layer */
            CHECK(p->budget_policy == 1 && p->layers[0].select == 2 && p->layers[1].select == narrow);
            CHECK(p->layers[1].n_qkv == p->layers[0].n_keep && p->layers[1].n_keep <= p->layers[1].n_qkv);
            for (int l = 2; l < p->n_layers; l++) CHECK(p->layers[l].n_qkv == p->layers[1].n_keep);
        }
        kvl_blend_plan_free(p);
    }

    /* naive: only uncached tokens, and the result is the engine's masked forward over the loaded kv */
    o = ratio_opts();
    o.mode = KVL_BLEND_NAIVE;
    p = run_mode(&fx, o, lg);
    if (p) {
        for (int l = 0; l < p->n_layers; l++) CHECK(p->layers[l].n_qkv == n_unc && p->layers[l].n_keep == n_unc);
        kvl_kv *kv = NULL;
        float *ref = malloc(NQ * 128 * sizeof(float));
        uint8_t mask[64];
        int32_t ls[NQ];
        for (int32_t i = 0; i < fx.n; i++) mask[i] = p->kind[i] == KVL_SLOT_UNCACHED;
        for (int i = 0; i < NQ; i++) ls[i] = fx.n - NQ + i;
        CHECK_OK(kvl_kv_create(fx.m, fx.n, &kv));
        CHECK_OK(kvl_blend_load(fx.m, p, fx.segs, kv));
        CHECK_OK(kvl_forward(fx.m, kv, fx.n, fx.prompt, fx.pos, mask, NQ, ls, ref));
        CHECK(kvl_rel_err(lg, ref, NQ * 128) == 0.0);
        free(ref);
        kvl_kv_free(kv);
    }
    kvl_blend_plan_free(p);
    free(lg);
    fixture_free(&fx);
}

static double entropy_of(const float *lg, int n, int vocab) {
    double tot = 0;
    for (int t = 0; t < n; t++) {
        const float *x = lg + (size_t)t * vocab;
        double mx = x[0], z = 0, ez = 0;
        for (int i = 1; i < vocab; i++) mx = x[i] > mx ? x[i] : mx;
        for (int i = 0; i < vocab; i++) z += exp(x[i] - mx), ez += exp(x[i] - mx) * (x[i] - mx);
        tot += log(z) - ez / z;
    }
    return tot / n;
}

/* The default budget policy ranks by the naive pass: the kept cached tokens at every layer are the
 * ones the question (the tail up to the first logit slot) attends to most at naive_rank_layer of a
 * naive-reuse forward, rebuilt here from the engine's steps; the budget holds. */
static void test_naive_rank(void) {
    fixture fx;
    fixture_init(&fx, KVL_ROPE_HALF, 1, 5);
    float *lg = malloc(NQ * 128 * sizeof(float));
    const float budgets[] = {0.1f, 0.25f, 0.5f};
    for (int k = 0; k < 3; k++) {
        kvl_blend_opts o = kvl_blend_opts_default();
        o.budget = budgets[k];
        o.naive_guard = 0;
        CHECK(o.naive_rank_layer == 1);
        kvl_blend_plan *p = run_mode(&fx, o, lg);
        if (!p) continue;
        int32_t want = p->n_uncached + (int32_t)floor(budgets[k] * p->n_cached + 1e-9);
        CHECK(p->budget_policy == 1 && p->naive_rank_layer == 1 && p->layers[0].select == 2 && p->layers[0].n_keep == want);
        for (int l = 1; l < p->n_layers; l++) {
            CHECK(p->layers[l].n_qkv == want && p->layers[l].n_keep == want && !p->layers[l].select);
            CHECK(!memcmp(p->layers[l].slots, p->layers[0].slots, (size_t)want * sizeof(int32_t)));
        }
        kvl_blend_cost cost = kvl_blend_plan_cost(p);
        CHECK_MSG(cost.cached_fraction <= budgets[k] + 1e-9, "budget %g spent %g", (double)budgets[k], cost.cached_fraction);
        /* token-layers: the kept set at every layer + the naive pass over the uncached tokens */
        CHECK(cost.token_layers == (int64_t)(want + p->n_uncached) * p->n_layers);
        kvl_kv *kv = NULL;
        kvl_fwd *f = NULL;
        CHECK_OK(kvl_kv_create(fx.m, fx.n, &kv));
        CHECK_OK(kvl_blend_load(fx.m, p, fx.segs, kv));
        CHECK_OK(kvl_fwd_begin(fx.m, kv, fx.n, fx.prompt, fx.pos, &f));
        int32_t unc[16], nu = 0, q[1] = {fx.n - NQ};
        for (int32_t i = 0; i < fx.n; i++)
            if (p->kind[i] == KVL_SLOT_UNCACHED) unc[nu++] = i;
        float mass[64];
        for (int l = 0; l <= 1 && f; l++) {
            CHECK_OK(kvl_fwd_qkv(f, l, unc, nu, NULL, NULL));
            CHECK_OK(kvl_fwd_commit(f, unc, nu));
            if (l == 1) CHECK_OK(kvl_fwd_attn_mass(f, q, 1, mass));
            else CHECK_OK(kvl_fwd_attn_ffn(f, unc, nu));
        }
        char what[64];
        snprintf(what, sizeof what, "budget %g: naive-pass attention", (double)budgets[k]);
        check_top(p, fx.n, p->layers[0].slots, want, mass, what);
        kvl_fwd_free(f);
        kvl_kv_free(kv);
        kvl_blend_plan_free(p);
    }
    /* below a 10% budget: layer-0 attention, no naive pass */
    kvl_blend_opts o = kvl_blend_opts_default();
    o.budget = 0.05f;
    kvl_blend_plan *p = run_mode(&fx, o, lg);
    if (p) {
        CHECK(p->naive_rank_layer == -1 && p->layers[0].select == 2 && !p->layers[1].select);
        CHECK(kvl_blend_plan_cost(p).token_layers == (int64_t)p->layers[0].n_keep * p->n_layers);
    }
    kvl_blend_plan_free(p);
    free(lg);
    fixture_free(&fx);
}

/* The ranking sees the question only up to the first logit slot: tokens after it (an evaluation's
 * teacher-forced continuation) must not change which tokens are recomputed, whether the ranking is
 * the naive pass's, layer 0's or layer 1's attention */
static void test_ranking_ignores_future(void) {
    for (int v = 0; v < 3; v++) {
        fixture fx;
        fixture_init(&fx, KVL_ROPE_INTERLEAVED, 0, 21);
        kvl_blend_opts o = kvl_blend_opts_default();
        o.naive_guard = 0;
        if (v == 1) o.naive_rank_layer = -1, o.budget = 0.3f; /* layer-0 + layer-1 query attention */
        if (v == 2) o = ratio_opts();                          /* deviation x layer-1 attention */
        float *lg = malloc(NQ * 128 * sizeof(float));
        int32_t kept[3][64], nk[3] = {0, 0, 0};
        for (int t = 0; t < 2; t++) {
            if (t == 1)
                for (int j = 1; j < NQ; j++) fx.tail[j] = 3 + (fx.tail[j] * 7 + 13) % 120; /* another continuation */
            kvl_blend_plan *p = run_mode(&fx, o, lg);
            if (!p) continue;
            const kvl_blend_layer *L = &p->layers[p->n_layers - 1];
            nk[t] = L->n_keep;
            memcpy(kept[t], L->slots, (size_t)L->n_keep * sizeof(int32_t));
            kvl_blend_plan_free(p);
        }
        CHECK_MSG(nk[0] == nk[1] && nk[0] > 0 && !memcmp(kept[0], kept[1], (size_t)nk[0] * sizeof(int32_t)),
                  "variant %d: the kept set changed with the tokens after the first logit slot", v);
        free(lg);
        fixture_free(&fx);
    }
}

/* The naive guard keeps the blend's logits and kv unless naive reuse is surer (lower mean entropy at
 * the logit slots) by more than the margin; then logits and kv are exactly naive reuse's. Both
 * branches are exercised over budgets and seeds. */
static void test_naive_guard(void) {
    int fell = 0, kept = 0;
    for (uint64_t seed = 31; seed < 37; seed++) {
        fixture fx;
        fixture_init(&fx, seed % 2 ? KVL_ROPE_HALF : KVL_ROPE_INTERLEAVED, 1, seed);
        size_t V = 128, nl = NQ * V, nkv = (size_t)4 * 2 * 64 * 2 * 16;
        float *lb = malloc(nl * sizeof(float)), *ln = malloc(nl * sizeof(float)), *lgd = malloc(nl * sizeof(float));
        float *kb = calloc(nkv, sizeof(float)), *kn = calloc(nkv, sizeof(float)), *kg = calloc(nkv, sizeof(float));
        const float budgets[] = {0.05f, 0.2f, 0.5f};
        for (int k = 0; k < 3; k++) {
            kvl_blend_opts o = kvl_blend_opts_default();
            o.budget = budgets[k];
            o.naive_guard = 0;
            kvl_blend_plan *pb = run_keep(&fx, o, lb, kb);
            kvl_blend_opts on = o;
            on.mode = KVL_BLEND_NAIVE;
            kvl_blend_plan *pn = run_keep(&fx, on, ln, kn);
            o.naive_guard = 1;
            o.naive_guard_margin = 0.0f;
            kvl_blend_plan *pg = run_keep(&fx, o, lgd, kg);
            if (pb && pn && pg) {
                double eb = entropy_of(lb, NQ, (int)V), en = entropy_of(ln, NQ, (int)V);
                CHECK_MSG(fabs(pg->entropy_blend - eb) < 1e-6 && fabs(pg->entropy_naive - en) < 1e-6,
                          "entropies %g / %g, recomputed %g / %g", pg->entropy_blend, pg->entropy_naive, eb, en);
                CHECK(pg->fell_back == (en < eb));
                size_t n_kv = (size_t)pg->n_layers * 2 * fx.n * 2 * 16;
                if (pg->fell_back) {
                    fell++;
                    CHECK(kvl_rel_err(lgd, ln, nl) == 0.0 && kvl_rel_err(kg, kn, n_kv) == 0.0);
                } else {
                    kept++;
                    CHECK(kvl_rel_err(lgd, lb, nl) == 0.0 && kvl_rel_err(kg, kb, n_kv) == 0.0);
                }
                /* the same selection as without the guard */
                CHECK(!memcmp(pg->layers[0].slots, pb->layers[0].slots, (size_t)pb->layers[0].n_keep * sizeof(int32_t)));
            }
            kvl_blend_plan_free(pb);
            kvl_blend_plan_free(pn);
            kvl_blend_plan_free(pg);
        }
        free(lb);
        free(ln);
        free(lgd);
        free(kb);
        free(kn);
        free(kg);
        fixture_free(&fx);
    }
    CHECK_MSG(fell > 0 && kept > 0, "the guard fell back %d times and kept the blend %d times: both branches wanted", fell, kept);
}

static void test_bad_input(void) {
    fixture fx;
    fixture_init(&fx, KVL_ROPE_INTERLEAVED, 0, 9);
    int32_t last = fx.n - 1;
    kvl_blend_plan *p = NULL;
    kvl_blend_opts o = ratio_opts();

    /* a cache from another model (other seed: other fingerprint) */
    kvl_model_config c = tiny_cfg(KVL_ROPE_INTERLEAVED);
    kvl_model *other = NULL;
    kvl_chunk_cache *foreign = NULL, *shaped = NULL;
    CHECK_OK(kvl_model_synthetic(&c, 10, NULL, &other));
    if (other) CHECK_OK(kvl_chunk_cache_prefill(other, fx.chunk[0], CL, NULL, 0, &foreign));
    kvl_blend_segment segs[NCH + 2];
    memcpy(segs, fx.segs, sizeof segs);
    segs[1].cache = foreign;
    CHECK_ST(kvl_blend_plan_build(fx.m, segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_FINGERPRINT);
    CHECK(p == NULL);

    /* right fingerprint, wrong shape */
    const kvl_chunk_cache *good = fx.cc[0];
    CHECK_OK(kvl_chunk_cache_create(good->fingerprint, good->n_layers - 1, good->n_kv_heads, good->head_dim, good->tokens, CL,
                                    NULL, 0, good->kv, &shaped));
    segs[1].cache = shaped;
    CHECK_ST(kvl_blend_plan_build(fx.m, segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_SHAPE);

    /* past the context: the model allows 96 positions */
    int32_t longtail[90];
    for (int i = 0; i < 90; i++) longtail[i] = 5;
    memcpy(segs, fx.segs, sizeof segs);
    segs[NCH + 1] = (kvl_blend_segment){NULL, longtail, 90};
    CHECK_ST(kvl_blend_plan_build(fx.m, segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_CONTEXT_FULL);
    kvl_chunk_cache *none = NULL;
    CHECK_ST(kvl_chunk_cache_prefill(fx.m, longtail, 90, longtail, 10, &none), KVL_ERR_POSITION_RANGE);
    CHECK(none == NULL);

    /* tokens outside the vocabulary, logits of a cached slot, bad options */
    int32_t badtok[2] = {5, 4000};
    memcpy(segs, fx.segs, sizeof segs);
    segs[NCH + 1] = (kvl_blend_segment){NULL, badtok, 2};
    last = 1 + NCH * CL + 1;
    CHECK_ST(kvl_blend_plan_build(fx.m, segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_TOKEN_RANGE);
    int32_t cached_slot = 3;
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &cached_slot, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    last = fx.n - 1;
    o.ratio = 1.5f;
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    o = ratio_opts();
    o.select_layer = 4;
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    o = ratio_opts();
    o.gradual_layers = 4; /* layers 1..4 of a 4-layer model */
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, 0, &last, 1, NULL, &p), KVL_ERR_BLEND_PLAN);
    o = kvl_blend_opts_default();
    o.naive_rank_layer = 4; /* a 4-layer model */
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    o = kvl_blend_opts_default();
    o.naive_guard_margin = -0.5f;
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);
    o.naive_guard_margin = NAN;
    CHECK_ST(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, &o, &p), KVL_ERR_BLEND_PLAN);

    /* a kv too small for the plan; a kv of another model */
    CHECK_OK(kvl_blend_plan_build(fx.m, fx.segs, NCH + 2, &last, 1, NULL, &p));
    kvl_kv *small = NULL, *alien = NULL;
    CHECK_OK(kvl_kv_create(fx.m, fx.n - 1, &small));
    if (p && small) CHECK_ST(kvl_blend_load(fx.m, p, fx.segs, small), KVL_ERR_CONTEXT_FULL);
    if (other) CHECK_OK(kvl_kv_create(other, fx.n, &alien));
    if (p && alien) CHECK_ST(kvl_blend_run(fx.m, p, alien, NULL), KVL_ERR_INVALID_ARG);
    float lg[128];
    if (p && alien) CHECK_ST(kvl_blend_run(fx.m, p, alien, lg), KVL_ERR_SHAPE);
    kvl_kv_free(small);
    kvl_kv_free(alien);
    kvl_blend_plan_free(p);
    kvl_chunk_cache_free(foreign);
    kvl_chunk_cache_free(shaped);
    kvl_model_free(other);
    fixture_free(&fx);
}

int main(void) {
    test_ratio_one_is_full(KVL_ROPE_HALF);
    test_ratio_one_is_full(KVL_ROPE_INTERLEAVED);
    test_rerotation(KVL_ROPE_HALF);
    test_rerotation(KVL_ROPE_INTERLEAVED);
    test_plan();
    test_naive_rank();
    test_ranking_ignores_future();
    test_naive_guard();
    test_bad_input();
    KVL_TEST_END();
}
