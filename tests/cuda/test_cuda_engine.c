/* The CUDA backend through the engine API. Skips (exit 77) without a GPU.
 *   test_cuda_engine golden MODEL GOLDEN_DIR f32|bf16
 *       logits of every golden sequence: f32 weights rel err <= 1e-4 and every argmax equal;
 *       bf16 weights rel err <= 2e-2 per sequence and argmax agreement >= 99% overall, or, for a
 *       model where rounding the weights to bf16 alone (CPU, float32 arithmetic) already agrees on
 *       fewer, no more than half a point below that bound (near-ties in tiny models).
 *   test_cuda_engine match MODEL
 *       GPU (f32) against the CPU backend on the same inputs: full prefill, KV read/write/copy/
 *       rerotate, and a CacheBlend-style pass (cached KV, fresh K/V + deviation at layer 0, a
 *       recomputed subset from then on) through the kvl_fwd_* steps.
 *   test_cuda_engine plan
 *       the device-memory plan's arithmetic (no GPU needed): Llama-3-8B bf16 weights and KV bytes,
 *       float32 KV where the tensor-core attention does not apply, workspace growing with tokens.
 *   test_cuda_engine synth [LAYERS]
 *       Llama-3-8B-shaped synthetic weights (LAYERS layers, default 2) generated on the device:
 *       GPU f32 vs CPU f32 <= 1e-4 (same weights bit for bit) and GPU bf16 vs CPU f32 <= 2e-2. */
#include <stdint.h>

#include "engine_impl.h"
#include "kvl_cpu.h"
#include "kvl_cuda_backend.h"
#include "kvl_engine.h"
#include "kvl_test.h"

static kvl_model *load(const char *path, int backend, int wdt) {
    kvl_model_opts o = kvl_model_opts_default();
    o.backend = backend;
    o.weight_dtype = wdt;
    kvl_model *m = NULL;
    kvl_status s = kvl_model_load(path, &o, &m);
    if (s != KVL_OK) {
        fprintf(stderr, "load %s: %s: %s\n", path, kvl_status_str(s), kvl_last_error());
        exit(1);
    }
    return m;
}

/* argmax agreement with the goldens of model m over all sequences; -1 if none */
static double agreement(kvl_model *m, const char *dir) {
    size_t V = (size_t)kvl_model_get_config(m)->vocab_size;
    long ag = 0, tot = 0;
    for (int q = 0; q < 100; q++) {
        char tp[4096], lp[4096];
        size_t nt, nl;
        snprintf(tp, sizeof tp, "%s/seq%02d.tokens.i32", dir, q);
        snprintf(lp, sizeof lp, "%s/seq%02d.logits.f32", dir, q);
        int32_t *tok = kvl_test_read(tp, &nt);
        if (!tok) break;
        float *gold = kvl_test_read(lp, &nl);
        int32_t n = (int32_t)(nt / 4);
        int32_t *pos = malloc((size_t)n * 4);
        float *lg = malloc((size_t)n * V * 4);
        for (int32_t i = 0; i < n; i++) pos[i] = i;
        kvl_kv *kv = NULL;
        if (gold && nl == (size_t)n * V * 4 && kvl_kv_create(m, n, &kv) == KVL_OK &&
            kvl_forward(m, kv, n, tok, pos, NULL, n, pos, lg) == KVL_OK) {
            for (int32_t i = 0; i < n; i++) ag += kvl_argmax(lg + i * V, V) == kvl_argmax(gold + i * V, V);
            tot += n;
        }
        kvl_kv_free(kv);
        free(tok); free(gold); free(pos); free(lg);
    }
    return tot ? (double)ag / (double)tot : -1;
}

static int golden(const char *model, const char *dir, int bf16) {
    double bound = 1;
    if (bf16) { /* what bf16 weights allow at all: CPU, float32 arithmetic, weights rounded to bf16 */
        kvl_model *mc = load(model, KVL_BACKEND_CPU, KVL_WDTYPE_F32);
        for (size_t i = 0; i < mc->w.n_floats; i++) mc->w.buf[i] = kvl_bf16_to_f32(kvl_f32_to_bf16(mc->w.buf[i]));
        bound = agreement(mc, dir);
        kvl_model_free(mc);
        printf("bf16-rounded weights on the CPU (float32 arithmetic): argmax agreement %.4f\n", bound);
    }
    kvl_model *m = load(model, KVL_BACKEND_CUDA, bf16 ? KVL_WDTYPE_BF16 : KVL_WDTYPE_F32);
    const kvl_model_config *c = kvl_model_get_config(m);
    double tol = bf16 ? 2e-2 : 1e-4, worst = 0;
    long agree_all = 0, n_all = 0;
    for (int q = 0; q < 100; q++) {
        char tp[4096], lp[4096];
        snprintf(tp, sizeof tp, "%s/seq%02d.tokens.i32", dir, q);
        snprintf(lp, sizeof lp, "%s/seq%02d.logits.f32", dir, q);
        size_t nt, nl;
        int32_t *tok = kvl_test_read(tp, &nt);
        if (!tok) break;
        float *gold = kvl_test_read(lp, &nl);
        int32_t n = (int32_t)(nt / 4);
        size_t V = (size_t)c->vocab_size;
        CHECK_MSG(gold && nl == (size_t)n * V * 4, "%s: golden size mismatch", lp);
        if (!gold || nl != (size_t)n * V * 4) { free(tok); free(gold); continue; }
        int32_t *pos = malloc((size_t)n * 4);
        float *lg = malloc(nl);
        for (int32_t i = 0; i < n; i++) pos[i] = i;
        kvl_kv *kv = NULL;
        CHECK_OK(kvl_kv_create(m, n, &kv));
        CHECK_OK(kvl_forward(m, kv, n, tok, pos, NULL, n, pos, lg));
        double rel = kvl_rel_err(lg, gold, (size_t)n * V);
        int agree = 0;
        for (int32_t i = 0; i < n; i++) agree += kvl_argmax(lg + i * V, V) == kvl_argmax(gold + i * V, V);
        printf("seq%02d: %d tokens, rel err %.3e, argmax %d/%d\n", q, n, rel, agree, n);
        CHECK_MSG(rel <= tol, "seq%02d rel err %.3e > %.1e", q, rel, tol);
        if (!bf16) CHECK_MSG(agree == n, "seq%02d argmax agrees at %d of %d", q, agree, n);
        if (rel > worst) worst = rel;
        agree_all += agree;
        n_all += n;
        kvl_kv_free(kv);
        free(tok); free(gold); free(pos); free(lg);
    }
    CHECK_MSG(n_all > 0, "no golden sequences in %s", dir);
    double frac = n_all ? (double)agree_all / (double)n_all : 0;
    printf("%s on GPU (%s): worst rel err %.3e, argmax agreement %.4f (%ld/%ld)\n", model, bf16 ? "bf16" : "f32", worst,
           frac, agree_all, n_all);
    if (bf16) {
        double need = bound >= 0.995 ? 0.99 : bound - 0.005;
        CHECK_MSG(frac >= need, "argmax agreement %.4f < %.4f (bf16-weight bound %.4f)", frac, need, bound);
    }
    kvl_model_free(m);
    KVL_TEST_END();
}

static uint64_t rs = 99;
static int32_t rnd(int32_t n) {
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (int32_t)(rs % (uint64_t)n);
}

static float *read_all(kvl_kv *kv, int32_t L, int32_t n, size_t per) {
    float *b = malloc((size_t)L * 2 * per * 4);
    CHECK_OK(kvl_kv_read(kv, 0, L, 0, n, b));
    return b;
}

static int match(const char *model) {
    kvl_model *mc = load(model, KVL_BACKEND_CPU, KVL_WDTYPE_F32);
    kvl_model *mg = load(model, KVL_BACKEND_CUDA, KVL_WDTYPE_F32);
    const kvl_model_config *c = kvl_model_get_config(mc);
    CHECK(memcmp(kvl_model_fingerprint(mc), kvl_model_fingerprint(mg), 32) == 0);
    const int32_t n = c->max_seq < 64 ? c->max_seq : 64, L = c->n_layers;
    const size_t V = (size_t)c->vocab_size, per = kvl_model_kv_elems_per_layer(mc, n), tot = (size_t)L * 2 * per;
    int32_t tok[64], pos[64], all[64];
    for (int i = 0; i < n; i++) { tok[i] = rnd(c->vocab_size); pos[i] = all[i] = i; }
    kvl_kv *kc, *kg;
    CHECK_OK(kvl_kv_create(mc, n, &kc));
    CHECK_OK(kvl_kv_create(mg, n, &kg));
    float *lc = malloc((size_t)n * V * 4), *lgp = malloc((size_t)n * V * 4);
    CHECK_OK(kvl_forward(mc, kc, n, tok, pos, NULL, n, all, lc));
    CHECK_OK(kvl_forward(mg, kg, n, tok, pos, NULL, n, all, lgp));
    double e = kvl_rel_err(lgp, lc, (size_t)n * V);
    printf("full prefill: logits rel err %.3e\n", e);
    CHECK_MSG(e <= 1e-4, "prefill logits rel err %.3e", e);
    float *kvc = read_all(kc, L, n, per), *kvg = read_all(kg, L, n, per);
    e = kvl_rel_err(kvg, kvc, tot);
    CHECK_MSG(e <= 1e-5, "prefill KV rel err %.3e", e);

    /* write / read back exactly; overlapping copy; rerotation */
    float *rnd_kv = malloc(tot * 4);
    for (size_t i = 0; i < tot; i++) rnd_kv[i] = (float)rnd(2000) / 1000.0f - 1.0f;
    CHECK_OK(kvl_kv_write(kg, 0, L, 0, n, rnd_kv));
    CHECK_OK(kvl_kv_write(kc, 0, L, 0, n, rnd_kv));
    float *back = read_all(kg, L, n, per);
    CHECK(memcmp(back, rnd_kv, tot * 4) == 0);
    free(back);
    CHECK_OK(kvl_kv_copy(kg, 5, kg, 0, 20));
    CHECK_OK(kvl_kv_copy(kc, 5, kc, 0, 20));
    CHECK_OK(kvl_kv_rerotate(kg, 10, 30, 7));
    CHECK_OK(kvl_kv_rerotate(kc, 10, 30, 7));
    float *a = read_all(kc, L, n, per), *b = read_all(kg, L, n, per);
    e = kvl_rel_err(b, a, tot);
    CHECK_MSG(e <= 1e-6, "copy + rerotate rel err %.3e", e);
    free(a); free(b);

    /* CacheBlend-style pass: cached KV of the first prefill, half the tokens changed */
    CHECK_OK(kvl_kv_write(kg, 0, L, 0, n, kvc));
    CHECK_OK(kvl_kv_write(kc, 0, L, 0, n, kvc));
    for (int i = n / 2; i < n; i++) tok[i] = rnd(c->vocab_size);
    kvl_fwd *fc, *fg;
    CHECK_OK(kvl_fwd_begin(mc, kc, n, tok, pos, &fc));
    CHECK_OK(kvl_fwd_begin(mg, kg, n, tok, pos, &fg));
    size_t kd = per / (size_t)n;
    float *k1 = malloc((size_t)n * kd * 4), *v1 = malloc((size_t)n * kd * 4), *k2 = malloc((size_t)n * kd * 4),
          *v2 = malloc((size_t)n * kd * 4), dc[64], dg[64];
    CHECK_OK(kvl_fwd_qkv(fc, 0, all, n, k1, v1));
    CHECK_OK(kvl_fwd_qkv(fg, 0, all, n, k2, v2));
    e = kvl_rel_err(k2, k1, (size_t)n * kd) + kvl_rel_err(v2, v1, (size_t)n * kd);
    CHECK_MSG(e <= 1e-5, "fresh K/V rel err %.3e", e);
    CHECK_OK(kvl_fwd_deviation(fc, KVL_DEV_KV, dc));
    CHECK_OK(kvl_fwd_deviation(fg, KVL_DEV_KV, dg));
    e = kvl_rel_err(dg, dc, (size_t)n);
    CHECK_MSG(e <= 1e-4, "deviation rel err %.3e", e);
    /* recompute: the changed half sees nonzero deviation; take every 2nd changed slot + the last */
    int32_t sel[64], ns = 0;
    for (int i = n / 2; i < n; i++)
        if (i % 2 == 0 || i == n - 1) sel[ns++] = i;
    CHECK_OK(kvl_fwd_commit(fc, sel, ns));
    CHECK_OK(kvl_fwd_commit(fg, sel, ns));
    /* the question-attention step CacheBlend's default policy ranks by: same on both backends */
    {
        float mc_[64], mg_[64];
        CHECK_OK(kvl_fwd_attn_mass(fc, sel, ns, mc_));
        CHECK_OK(kvl_fwd_attn_mass(fg, sel, ns, mg_));
        e = kvl_rel_err(mg_, mc_, (size_t)n);
        CHECK_MSG(e <= 1e-4, "attention mass rel err %.3e", e);
    }
    CHECK_OK(kvl_fwd_attn_ffn(fc, sel, ns));
    CHECK_OK(kvl_fwd_attn_ffn(fg, sel, ns));
    for (int l = 1; l < L; l++) {
        CHECK_OK(kvl_fwd_layer(fc, l, sel, ns));
        CHECK_OK(kvl_fwd_layer(fg, l, sel, ns));
    }
    int32_t last = n - 1;
    CHECK_OK(kvl_fwd_logits(fc, &last, 1, lc));
    CHECK_OK(kvl_fwd_logits(fg, &last, 1, lgp));
    e = kvl_rel_err(lgp, lc, V);
    printf("blend pass (%d of %d recomputed): logits rel err %.3e\n", ns, n, e);
    CHECK_MSG(e <= 1e-4, "blend logits rel err %.3e", e);
    kvl_fwd_free(fc);
    kvl_fwd_free(fg);
    a = read_all(kc, L, n, per);
    b = read_all(kg, L, n, per);
    e = kvl_rel_err(b, a, tot);
    CHECK_MSG(e <= 1e-5, "blend KV rel err %.3e", e);
    free(a); free(b);
    /* decode steps on top: one computed token each */
    uint8_t comp[64] = {0};
    for (int step = 0; step < 3; step++) {
        int32_t s = n - 3 + step;
        memset(comp, 0, sizeof comp);
        comp[s] = 1;
        CHECK_OK(kvl_forward(mc, kc, s + 1, tok, pos, comp, 1, &s, lc));
        CHECK_OK(kvl_forward(mg, kg, s + 1, tok, pos, comp, 1, &s, lgp));
        e = kvl_rel_err(lgp, lc, V);
        CHECK_MSG(e <= 1e-4, "decode step %d rel err %.3e", step, e);
    }
    kvl_kv_free(kc);
    kvl_kv_free(kg);
    free(lc); free(lgp); free(kvc); free(kvg); free(rnd_kv); free(k1); free(v1); free(k2); free(v2);
    kvl_model_free(mc);
    kvl_model_free(mg);
    KVL_TEST_END();
}

static int synth(int layers) {
    kvl_model_config c = {0};
    c.dim = 4096; c.hidden_dim = 14336; c.n_layers = layers; c.n_heads = 32; c.n_kv_heads = 8; c.head_dim = 128;
    c.vocab_size = 128256; c.max_seq = 8192; c.rope_theta = 500000.0f; c.norm_eps = 1e-5f; c.tied_embeddings = 0;
    c.rope_style = KVL_ROPE_HALF; c.bos_id = 1; c.eos_id = 2;
    const int32_t n = 300, nl = 8;
    int32_t *tok = malloc(n * 4), *pos = malloc(n * 4), li[8];
    for (int i = 0; i < n; i++) { tok[i] = rnd(c.vocab_size); pos[i] = i; }
    for (int i = 0; i < nl; i++) li[i] = n - nl + i;
    size_t V = (size_t)c.vocab_size;
    float *ref = malloc(nl * V * 4), *got = malloc(nl * V * 4);
    kvl_model_opts o = kvl_model_opts_default();
    kvl_model *m = NULL;
    kvl_kv *kv = NULL;
    CHECK_OK(kvl_model_synthetic(&c, 42, &o, &m));
    CHECK_OK(kvl_kv_create(m, n, &kv));
    CHECK_OK(kvl_forward(m, kv, n, tok, pos, NULL, nl, li, ref));
    kvl_kv_free(kv);
    kvl_model_free(m);
    for (int w = 0; w < 2; w++) {
        o.backend = KVL_BACKEND_CUDA;
        o.weight_dtype = w ? KVL_WDTYPE_BF16 : KVL_WDTYPE_F32;
        CHECK_OK(kvl_model_synthetic(&c, 42, &o, &m));
        CHECK_OK(kvl_kv_create(m, n, &kv));
        CHECK_OK(kvl_forward(m, kv, n, tok, pos, NULL, nl, li, got));
        double e = kvl_rel_err(got, ref, nl * V);
        int agree = 0;
        for (int i = 0; i < nl; i++) agree += kvl_argmax(got + i * V, V) == kvl_argmax(ref + i * V, V);
        printf("8B-shaped synthetic, %d layers, %d tokens: GPU %s vs CPU f32 rel err %.3e, argmax %d/%d\n", layers, n,
               w ? "bf16" : "f32", e, agree, nl);
        CHECK_MSG(e <= (w ? 2e-2 : 1e-4), "synthetic %s rel err %.3e", w ? "bf16" : "f32", e);
        kvl_kv_free(kv);
        kvl_model_free(m);
    }
    free(tok); free(pos); free(ref); free(got);
    KVL_TEST_END();
}

static int plan(void) {
    kvl_model_config c = {0};
    c.dim = 4096; c.hidden_dim = 14336; c.n_layers = 32; c.n_heads = 32; c.n_kv_heads = 8; c.head_dim = 128;
    c.vocab_size = 128256; c.max_seq = 8192; c.rope_theta = 500000.0f; c.norm_eps = 1e-5f;
    kvl_cuda_plan p8, p32, pf;
    kvl_cuda_plan_for(&c, KVL_WDTYPE_BF16, 8192, &p8);
    kvl_cuda_plan_for(&c, KVL_WDTYPE_BF16, 32768, &p32);
    kvl_cuda_plan_for(&c, KVL_WDTYPE_F32, 8192, &pf);
    size_t D = 4096, V = 128256, lin = D * (4096 + 2 * 1024) + D * 4096 + 3 * D * 14336;
    size_t w16 = 2 * (2 * V * D + 32 * lin) + 4 * (D + 32 * 2 * D); /* matrices bf16, norms f32 */
    CHECK_MSG(p8.weights == w16, "bf16 weights %zu bytes, expected %zu", p8.weights, w16);
    CHECK_MSG(pf.weights == 2 * w16 - 4 * (D + 64 * D), "f32 weights %zu bytes", pf.weights);
    CHECK_MSG(p8.kv_per_token == 32 * 2 * 1024 * 2, "bf16 KV %zu bytes a token", p8.kv_per_token);
    CHECK_MSG(pf.kv_per_token == 32 * 2 * 1024 * 4, "f32 KV %zu bytes a token", pf.kv_per_token);
    CHECK(p32.weights == p8.weights && p32.fwd_bytes > p8.fwd_bytes && p8.fwd_bytes > 0);
    printf("8B bf16: weights %.2f GiB, KV %.2f GiB at 8k / %.2f GiB at 32k, workspace %.2f / %.2f GiB\n",
           p8.weights / 1073741824.0, p8.kv_per_token * 8192 / 1073741824.0, p32.kv_per_token * 32768 / 1073741824.0,
           p8.fwd_bytes / 1073741824.0, p32.fwd_bytes / 1073741824.0);
    c.head_dim = 8; /* no tensor-core attention for this head_dim: the KV stays float32 */
    kvl_cuda_plan_for(&c, KVL_WDTYPE_BF16, 16, &pf);
    CHECK_MSG(pf.kv_per_token == 32 * 2 * 8 * 8 * 4, "hd 8 KV %zu bytes a token", pf.kv_per_token);
    KVL_TEST_END();
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s golden MODEL DIR f32|bf16 | match MODEL | synth [LAYERS] | plan\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "plan") == 0) return plan();
    if (kvl_cuda_device_count() == 0) KVL_SKIP("no GPU");
    if (strcmp(argv[1], "golden") == 0 && argc == 5) return golden(argv[2], argv[3], strcmp(argv[4], "bf16") == 0);
    if (strcmp(argv[1], "match") == 0 && argc == 3) return match(argv[2]);
    if (strcmp(argv[1], "synth") == 0) return synth(argc > 2 ? atoi(argv[2]) : 2);
    fprintf(stderr, "bad arguments\n");
    return 2;
}
