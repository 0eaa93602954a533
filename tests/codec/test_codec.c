/* test_codec - codec round trips (every level, scheme, dtype; synthetic and real KV), determinism,
 * error bounds, layer-subset decoding, profiles, and rejection of malformed input.
 *   test_codec [MODEL]        MODEL: a model whose real KV is also round-tripped (optional)
 *   test_codec --write-corpus DIR   writes the fuzz seed corpus (decode/ and profile/) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec_impl.h"
#include "kvl_codec_plan.h"
#include "codec_synth.h"
#include "codec_model_kv.h"
#include "kvl_engine.h"
#include "kvl_test.h"

static size_t n_elems(const kvl_codec_shape *s) {
    return (size_t)s->n_layers * 2 * s->n_tokens * s->n_kv_heads * s->head_dim;
}

/* checks dec against x under the stated bound for the bins the chunk was coded with (the level's
 * built-in bins unless a profile or opts.bins chose others); rot: the chunk's profile rotates keys
 * (their bound doubles: a pair's two errors mix). Returns the worst error / bound */
static double check_bound(const kvl_codec_shape *sh, const float *x, const float *dec, int level, int scheme,
                          const uint8_t *chunk, int rot) {
    int32_t T = sh->n_tokens, C = sh->n_kv_heads * sh->head_dim;
    kvlc_params p;
    CHECK_OK(kvlc_params_get(level, scheme, sh->n_layers, &p));
    double worst = 0;
    for (int32_t l = 0; l < sh->n_layers; l++)
        for (int kv = 0; kv < 2; kv++) {
            const float *xs = x + ((size_t)l * 2 + kv) * T * C, *ds = dec + ((size_t)l * 2 + kv) * T * C;
            int sm = kvlc_scale_of(p.scale_mode, kv);
            int Q = kvlc_get16(chunk + KVLC_HDR_FIXED + 4 * (size_t)l + 2 * (size_t)kv);
            double rb = (sm == KVLC_SCALE_CHANNEL_OFFSET ? 1.5 : 0.5) / Q * (1.0 + 1.0 / 64) + 1e-6;
            if (Q == p.q[2 * l + kv]) CHECK(rb == kvl_codec_level_error_bound(level, scheme, sh->n_layers, l, kv));
            if (rot && kv == 0) rb = 3.0 / Q * (1.0 + 1.0 / 64) + 1e-6;
            /* largest |x| of each token row, each channel and the whole section */
            float *rowm = calloc((size_t)T, sizeof *rowm), *colm = calloc((size_t)C, sizeof *colm), all = 0;
            for (int32_t t = 0; t < T; t++)
                for (int32_t c = 0; c < C; c++) {
                    float a = fabsf(xs[(size_t)t * C + c]);
                    rowm[t] = fmaxf(rowm[t], a);
                    colm[c] = fmaxf(colm[c], a);
                    all = fmaxf(all, a);
                }
            for (int32_t t = 0; t < T; t++)
                for (int32_t c = 0; c < C; c++) {
                    size_t i = (size_t)t * C + c;
                    float g = rot && kv == 0 ? all : sm == KVLC_SCALE_TOKEN ? rowm[t] : sm == KVLC_SCALE_CHANNEL ? colm[c] : all;
                    double e = fabs((double)xs[i] - ds[i]), b = rb * g + 1e-30;
                    if (e / b > worst) worst = e / b;
                }
            free(rowm);
            free(colm);
        }
    kvlc_params_free(&p);
    return worst;
}

static void roundtrip_all(const kvl_codec_shape *sh, const float *x, const kvl_codec_profile *prof, const char *what) {
    size_t n = n_elems(sh);
    float *dec = malloc(n * 4);
    for (int scheme = 0; scheme < 2; scheme++)
        for (int level = 0; level <= KVL_CODEC_MAX_LEVEL; level++) {
            if (scheme == KVL_CODEC_SCHEME_LMCACHE && level == 0) continue;
            for (int use_prof = 0; use_prof <= (prof && scheme == 0 && level > 0); use_prof++) {
                kvl_codec_opts o = {level, scheme, use_prof ? prof : NULL, 1, NULL};
                uint8_t *a = NULL, *b = NULL;
                size_t na = 0, nb = 0;
                CHECK_OK(kvl_codec_encode(sh, KVL_CODEC_F32, x, &o, &a, &na));
                o.n_threads = 2; /* determinism across runs and thread counts */
                CHECK_OK(kvl_codec_encode(sh, KVL_CODEC_F32, x, &o, &b, &nb));
                CHECK_MSG(na == nb && a && b && memcmp(a, b, na) == 0, "%s: level %d scheme %d not deterministic", what, level, scheme);
                kvl_codec_info info;
                CHECK_OK(kvl_codec_info_get(a, na, &info));
                CHECK(info.level == level && info.scheme == scheme && info.total_bytes == na && info.n_elements == n);
                CHECK(info.uses_profile == use_prof && info.lossless == (level == 0));
                CHECK_OK(kvl_codec_decode(a, na, use_prof ? prof : NULL, 0, 0, KVL_CODEC_F32, dec, n * 4, 2));
                if (level == 0) {
                    CHECK_MSG(memcmp(dec, x, n * 4) == 0, "%s: lossless not exact", what);
                } else {
                    int rot = use_prof ? kvl_codec_profile_key_rotation(prof, NULL) : 0;
                    double w = check_bound(sh, x, dec, level, scheme, a, rot);
                    CHECK_MSG(w <= 1.0, "%s: level %d scheme %d profile %d: error %.3f x its bound", what, level, scheme, use_prof, w);
                    printf("%-10s scheme %d level %d profile %d: %6.3f bits/element, worst error %.2f of bound\n", what, scheme,
                           level, use_prof, 8.0 * na / n, w);
                    if (use_prof) { /* kvl_codec_simulate is the decoder without the coder, bit for bit */
                        float theta = 0;
                        float *sim = malloc(n * 4);
                        int kr = kvl_codec_profile_key_rotation(prof, &theta);
                        CHECK_OK(kvl_codec_simulate(sh, x, level, kvl_codec_profile_bins(prof, level), kr, theta, sim));
                        CHECK_MSG(memcmp(sim, dec, n * 4) == 0, "%s: level %d: simulate differs from decode", what, level);
                        free(sim);
                    }
                }
                /* layer subset decodes the same values as the full decode */
                if (sh->n_layers > 1) {
                    size_t per_layer = n / sh->n_layers;
                    float *sub = malloc(per_layer * 4);
                    CHECK_OK(kvl_codec_decode(a, na, use_prof ? prof : NULL, 1, 1, KVL_CODEC_F32, sub, per_layer * 4, 1));
                    CHECK(memcmp(sub, dec + per_layer, per_layer * 4) == 0);
                    CHECK_ST(kvl_codec_decode(a, na, use_prof ? prof : NULL, 0, 0, KVL_CODEC_F32, sub, per_layer * 4, 1),
                             KVL_ERR_INVALID_ARG);
                    free(sub);
                }
                /* bf16 output = bf16 rounding of the f32 output */
                uint16_t *h = malloc(n * 2);
                CHECK_OK(kvl_codec_decode(a, na, use_prof ? prof : NULL, 0, 0, KVL_CODEC_BF16, h, n * 2, 1));
                size_t bad = 0;
                for (size_t i = 0; i < n; i++) bad += h[i] != kvl_f32_to_bf16(dec[i]);
                CHECK(bad == 0);
                free(h);
                free(a);
                free(b);
            }
        }
    free(dec);
}

static void test_dtypes(void) {
    kvl_codec_shape sh = {2, 40, 2, 16};
    size_t n = n_elems(&sh);
    float *x = kvl_synth_kv(&sh, 7);
    uint16_t *h16 = malloc(n * 2), *b16 = malloc(n * 2), *o16 = malloc(n * 2);
    float *dec = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        h16[i] = kvl_f32_to_f16(x[i]);
        b16[i] = kvl_f32_to_bf16(x[i]);
    }
    uint8_t *e = NULL;
    size_t ne = 0;
    kvl_codec_opts o = kvl_codec_opts_default();
    o.level = 0;
    /* lossless keeps the source dtype's bits */
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F16, h16, &o, &e, &ne));
    CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F16, o16, n * 2, 1));
    CHECK(memcmp(o16, h16, n * 2) == 0);
    CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F32, dec, n * 4, 1));
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += dec[i] != kvl_f16_to_f32(h16[i]);
    CHECK(bad == 0);
    free(e);
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_BF16, b16, &o, &e, &ne));
    CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_BF16, o16, n * 2, 1));
    CHECK(memcmp(o16, b16, n * 2) == 0);
    free(e);
    /* lossy from f16 input: within the bound of the f16 values */
    o.level = 2;
    float *xf = malloc(n * 4);
    for (size_t i = 0; i < n; i++) xf[i] = kvl_f16_to_f32(h16[i]);
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F16, h16, &o, &e, &ne));
    CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F32, dec, n * 4, 1));
    CHECK(check_bound(&sh, xf, dec, 2, 0, e, 0) <= 1.0);
    free(e);
    /* f16 conversion agrees with the compiler's for a sweep of values */
    size_t mism = 0;
    for (uint32_t k = 0; k < 200000; k++) {
        uint64_t s = k * 0x9e3779b97f4a7c15ull + 1;
        uint32_t u = (uint32_t)(kvl_synth_next(&s) >> 32);
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f)) continue;
        _Float16 r = (_Float16)f;
        uint16_t want;
        memcpy(&want, &r, 2);
        mism += kvl_f32_to_f16(f) != want;
        if (kvl_f16_to_f32((uint16_t)k) != (float)(*(_Float16 *)&(uint16_t){(uint16_t)k}) && !isnan(kvl_f16_to_f32((uint16_t)k)))
            mism++;
    }
    CHECK_MSG(mism == 0, "%zu f16 conversion mismatches", mism);
    free(x); free(xf); free(h16); free(b16); free(o16); free(dec);
}

static void test_bad_args(void) {
    kvl_codec_shape sh = {2, 8, 1, 4};
    float *x = kvl_synth_kv(&sh, 3);
    uint8_t *e = NULL;
    size_t ne = 0;
    kvl_codec_opts o = kvl_codec_opts_default();
    o.level = 9;
    CHECK_ST(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_CODEC_LEVEL);
    o.level = 2;
    kvl_codec_shape bad = sh;
    bad.n_tokens = 0;
    CHECK_ST(kvl_codec_encode(&bad, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_INVALID_ARG);
    x[5] = NAN;
    CHECK_ST(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_RANGE);
    x[5] = INFINITY;
    CHECK_ST(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_RANGE);
    o.level = 0; /* lossless keeps any bits */
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
    free(e);
    /* all-zero input */
    memset(x, 0, n_elems(&sh) * 4);
    o.level = 3;
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
    float *d = malloc(n_elems(&sh) * 4);
    CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F32, d, n_elems(&sh) * 4, 1));
    size_t nz = 0;
    for (size_t i = 0; i < n_elems(&sh); i++) nz += d[i] != 0;
    CHECK(nz == 0);
    free(e); free(d); free(x);
}

/* every truncation and every single-byte corruption of a chunk must be rejected (checksums) */
static void test_malformed(const kvl_codec_profile *prof) {
    kvl_codec_shape sh = {2, 24, 2, 8};
    size_t n = n_elems(&sh);
    float *x = kvl_synth_kv(&sh, 11), *dec = malloc(n * 4);
    for (int variant = 0; variant < 3; variant++) {
        kvl_codec_opts o = kvl_codec_opts_default();
        if (variant == 0) o.level = 0;
        if (variant == 2) o.profile = prof;
        uint8_t *e = NULL;
        size_t ne = 0;
        CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
        const kvl_codec_profile *pp = variant == 2 ? prof : NULL;
        size_t accepted = 0;
        for (size_t cut = 0; cut < ne; cut++)
            accepted += kvl_codec_decode(e, cut, pp, 0, 0, KVL_CODEC_F32, dec, n * 4, 1) == KVL_OK;
        CHECK_MSG(accepted == 0, "variant %d: %zu truncations accepted", variant, accepted);
        uint8_t *m = malloc(ne);
        for (size_t i = 0; i < ne; i++) {
            memcpy(m, e, ne);
            m[i] ^= (uint8_t)(1u << (i % 8));
            accepted += kvl_codec_decode(m, ne, pp, 0, 0, KVL_CODEC_F32, dec, n * 4, 1) == KVL_OK;
        }
        CHECK_MSG(accepted == 0, "variant %d: %zu corrupted chunks accepted", variant, accepted);
        memcpy(m, e, ne);
        m[0] = 'X';
        CHECK_ST(kvl_codec_decode(m, ne, pp, 0, 0, KVL_CODEC_F32, dec, n * 4, 1), KVL_ERR_MAGIC);
        memcpy(m, e, ne);
        m[4] = 9;
        CHECK_ST(kvl_codec_decode(m, ne, pp, 0, 0, KVL_CODEC_F32, dec, n * 4, 1), KVL_ERR_VERSION);
        CHECK_ST(kvl_codec_decode(e, ne - 1, pp, 0, 0, KVL_CODEC_F32, dec, n * 4, 1), KVL_ERR_TRUNCATED);
        if (variant == 2) {
            CHECK_ST(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F32, dec, n * 4, 1), KVL_ERR_CODEC_PROFILE);
        }
        free(m);
        free(e);
    }
    free(x);
    free(dec);
}

static void test_profile(const kvl_codec_profile *prof) {
    uint8_t *b = NULL;
    size_t nb = 0;
    CHECK_OK(kvl_codec_profile_serialize(prof, &b, &nb));
    kvl_codec_profile *q = NULL;
    CHECK_OK(kvl_codec_profile_parse(b, nb, kvl_codec_profile_fingerprint(prof), &q));
    CHECK(q && memcmp(kvl_codec_profile_id(q), kvl_codec_profile_id(prof), 16) == 0);
    uint8_t *b2 = NULL;
    size_t nb2 = 0;
    if (q) CHECK_OK(kvl_codec_profile_serialize(q, &b2, &nb2));
    CHECK(nb2 == nb && b2 && memcmp(b, b2, nb) == 0);
    free(b2);
    kvl_codec_profile_free(q);
    q = NULL;
    uint8_t other[32] = {9};
    CHECK_ST(kvl_codec_profile_parse(b, nb, other, &q), KVL_ERR_FINGERPRINT);
    /* a chunk encoded with one profile is refused with another */
    kvl_codec_shape sh = {2, 16, 2, 8};
    float *x = kvl_synth_kv(&sh, 5);
    kvl_codec_profile_builder *bl = NULL;
    static const uint8_t fp2[32] = {7};
    CHECK_OK(kvl_codec_profile_builder_create(&sh, fp2, &bl));
    CHECK_ST(kvl_codec_profile_builder_finish(bl, &q), KVL_ERR_CODEC_PROFILE);
    CHECK_OK(kvl_codec_profile_builder_add(bl, x, sh.n_tokens));
    CHECK_OK(kvl_codec_profile_builder_finish(bl, &q));
    kvl_codec_profile_builder_free(bl);
    kvl_codec_opts o = kvl_codec_opts_default();
    o.profile = prof;
    uint8_t *e = NULL;
    size_t ne = 0;
    float *d = malloc(n_elems(&sh) * 4);
    CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
    CHECK_ST(kvl_codec_decode(e, ne, q, 0, 0, KVL_CODEC_F32, d, n_elems(&sh) * 4, 1), KVL_ERR_CODEC_PROFILE);
    CHECK_OK(kvl_codec_decode(e, ne, prof, 0, 0, KVL_CODEC_F32, d, n_elems(&sh) * 4, 1));
    /* a profile for another shape is refused by the encoder */
    kvl_codec_shape sh3 = {3, 16, 2, 8};
    float *x3 = kvl_synth_kv(&sh3, 5);
    uint8_t *e3 = NULL;
    CHECK_ST(kvl_codec_encode(&sh3, KVL_CODEC_F32, x3, &o, &e3, &ne), KVL_ERR_CODEC_PROFILE);
    CHECK_ST(kvl_codec_profile_check(prof, &sh3, 2), KVL_ERR_CODEC_PROFILE);
    CHECK_OK(kvl_codec_profile_check(prof, &sh, 2));
    /* every truncation / byte flip of the profile file is rejected */
    size_t accepted = 0;
    kvl_codec_profile *r = NULL;
    for (size_t cut = 0; cut < nb; cut += 1 + cut / 64) {
        accepted += kvl_codec_profile_parse(b, cut, NULL, &r) == KVL_OK;
        kvl_codec_profile_free(r);
        r = NULL;
    }
    uint8_t *m = malloc(nb);
    for (size_t i = 0; i < nb; i++) {
        memcpy(m, b, nb);
        m[i] ^= 0x10;
        accepted += kvl_codec_profile_parse(m, nb, NULL, &r) == KVL_OK;
        kvl_codec_profile_free(r);
        r = NULL;
    }
    CHECK_MSG(accepted == 0, "%zu malformed profiles accepted", accepted);
    free(m); free(x3); free(e3); free(e); free(d); free(b);
    kvl_codec_profile_free(q);

    /* per-model bins: set on the builder, carried by the profile, used by the encoder */
    uint16_t bins[4] = {3, 1, 7, 2}, other_bins[4] = {3, 1, 7, 3};
    CHECK_OK(kvl_codec_profile_builder_create(&sh, fp2, &bl));
    CHECK_ST(kvl_codec_profile_builder_set_bins(bl, 0, bins), KVL_ERR_CODEC_LEVEL);
    CHECK_OK(kvl_codec_profile_builder_set_bins(bl, 2, bins));
    CHECK_OK(kvl_codec_profile_builder_add(bl, x, sh.n_tokens));
    CHECK_ST(kvl_codec_profile_builder_set_bins(bl, 3, bins), KVL_ERR_INVALID_ARG); /* after _add */
    q = NULL;
    CHECK_OK(kvl_codec_profile_builder_finish(bl, &q));
    kvl_codec_profile_builder_free(bl);
    if (q) {
        CHECK(memcmp(kvl_codec_profile_bins(q, 2), bins, sizeof bins) == 0);
        o.profile = q;
        e = NULL;
        CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
        d = malloc(n_elems(&sh) * 4);
        CHECK_OK(kvl_codec_decode(e, ne, q, 0, 0, KVL_CODEC_F32, d, n_elems(&sh) * 4, 1));
        CHECK(e && kvlc_get16(e + KVLC_HDR_FIXED + 4) == 7 && check_bound(&sh, x, d, 2, 0, e, 0) <= 1.0);
        free(e);
        o.bins = other_bins;
        CHECK_ST(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_CODEC_PROFILE);
        o.profile = NULL; /* without a profile any valid bins go */
        CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
        CHECK_OK(kvl_codec_decode(e, ne, NULL, 0, 0, KVL_CODEC_F32, d, n_elems(&sh) * 4, 1));
        CHECK(check_bound(&sh, x, d, 2, 0, e, 0) <= 1.0);
        free(e);
        other_bins[0] = 0;
        CHECK_ST(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne), KVL_ERR_INVALID_ARG);
        free(d);
    }
    kvl_codec_profile_free(q);
    free(x);
}

/* synthetic keys the way a RoPE cache holds them: per-channel means plus noise, rotated by the
 * token's position (pairs of `style`, base 10000); values as kvl_synth_kv */
static float *rope_kv(const kvl_codec_shape *sh, int style, uint64_t seed) {
    float *x = kvl_synth_kv(sh, seed);
    int32_t T = sh->n_tokens, D = sh->head_dim, C = sh->n_kv_heads * D;
    for (int32_t l = 0; l < sh->n_layers; l++)
        for (int32_t t = 0; t < T; t++)
            for (int32_t h = 0; h < sh->n_kv_heads; h++)
                for (int32_t i = 0; i < D / 2; i++) {
                    float *r = x + ((size_t)l * 2 * T + t) * C + (size_t)h * D;
                    int32_t a = style == KVL_CODEC_KEYROT_INTERLEAVED ? 2 * i : i;
                    int32_t b = style == KVL_CODEC_KEYROT_INTERLEAVED ? 2 * i + 1 : i + D / 2;
                    double ang = t * pow(10000.0, -2.0 * i / D), u = r[a], v = r[b];
                    r[a] = (float)(u * cos(ang) - v * sin(ang));
                    r[b] = (float)(u * sin(ang) + v * cos(ang));
                }
    return x;
}

static kvl_codec_profile *rot_profile(const kvl_codec_shape *sh, int style, const float *x) {
    static const uint8_t fp[32] = {5};
    kvl_codec_profile_builder *b = NULL;
    kvl_codec_profile *p = NULL;
    CHECK_OK(kvl_codec_profile_builder_create(sh, fp, &b));
    CHECK_OK(kvl_codec_profile_builder_set_key_rotation(b, style, 10000.0f));
    CHECK_OK(kvl_codec_profile_builder_add(b, x, sh->n_tokens));
    CHECK_OK(kvl_codec_profile_builder_finish(b, &p));
    kvl_codec_profile_builder_free(b);
    return p;
}

/* profiles that rotate keys back to position 0: round trips of both pair layouts, rotated keys
 * cost fewer bits than unrotated ones, bad settings refused, decode plans (GPU) carry them */
static void test_key_rotation(const kvl_codec_profile *synth) {
    float theta = 0;
    CHECK(kvl_codec_profile_key_rotation(synth, &theta) == KVL_CODEC_KEYROT_INTERLEAVED && theta == 10000.0f);
    kvl_codec_shape sh = {2, 96, 2, 16};
    size_t n = n_elems(&sh);
    for (int style = KVL_CODEC_KEYROT_NONE; style <= KVL_CODEC_KEYROT_INTERLEAVED; style++) {
        float *x = rope_kv(&sh, style ? style : KVL_CODEC_KEYROT_INTERLEAVED, 40 + (uint64_t)style);
        kvl_codec_profile *p = rot_profile(&sh, style, x);
        if (!p) { free(x); continue; }
        CHECK(kvl_codec_profile_key_rotation(p, &theta) == style && theta == (style ? 10000.0f : 0.0f));
        roundtrip_all(&sh, x, p, style == KVL_CODEC_KEYROT_HALF ? "rope-half" : style ? "rope-il" : "rope-none");
        /* the rotation pays on rotated keys: compare with the same data under no rotation */
        if (style) {
            kvl_codec_profile *p0 = rot_profile(&sh, KVL_CODEC_KEYROT_NONE, x);
            kvl_codec_opts o = kvl_codec_opts_default();
            uint8_t *e = NULL, *e0 = NULL;
            size_t ne = 0, ne0 = 0;
            o.profile = p;
            CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
            o.profile = p0;
            CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e0, &ne0));
            CHECK_MSG(ne < ne0, "rotated %zu bytes, unrotated %zu", ne, ne0);
            /* decode plans (the GPU decoder): the key sections of a rotating chunk carry the rotation,
             * one cos/sin table per chunk, float32 scratch per key section; appending shifts them */
            kvl_codec_plan pl, p2;
            kvl_codec_plan_init(&pl);
            kvl_codec_plan_init(&p2);
            kvl_codec_place place = {0, (int64_t)(n / 2), (int64_t)(n / 4), 32};
            CHECK_OK(kvl_codec_plan_add(&pl, e0, ne0, p0, 0, 0, &place, 4));
            CHECK(pl.n_rot == 0 && pl.n_rope == 0);
            CHECK_OK(kvl_codec_plan_add(&p2, e, ne, p, 0, 0, &place, 4));
            size_t TC = (size_t)sh.n_tokens * sh.n_kv_heads * sh.head_dim;
            CHECK(p2.n_rot == 2 * TC && p2.n_rope == (size_t)sh.n_tokens * sh.head_dim);
            for (size_t k = 0; k < p2.n_sections; k++)
                CHECK(p2.sections[k].rot == (k % 2 == 0 ? style : 0) && (k % 2 || p2.sections[k].rot_off == k / 2 * TC));
            kvl_codec_plan_reset(&pl);
            CHECK_OK(kvl_codec_plan_append(&pl, &p2));
            CHECK_OK(kvl_codec_plan_append(&pl, &p2));
            CHECK(pl.n_rot == 4 * TC && pl.n_rope == 2 * p2.n_rope && pl.sections[4].rot_off == 2 * TC &&
                  pl.sections[4].rope_off == p2.n_rope && memcmp(pl.rope, pl.rope + p2.n_rope, p2.n_rope * 4) == 0);
            kvl_codec_plan_free(&pl);
            kvl_codec_plan_free(&p2);
            free(e);
            free(e0);
            kvl_codec_profile_free(p0);
        }
        kvl_codec_profile_free(p);
        free(x);
    }
    /* bad settings */
    static const uint8_t fp[32] = {5};
    kvl_codec_profile_builder *b = NULL;
    kvl_codec_shape odd = {1, 8, 2, 5};
    CHECK_OK(kvl_codec_profile_builder_create(&odd, fp, &b));
    CHECK_ST(kvl_codec_profile_builder_set_key_rotation(b, KVL_CODEC_KEYROT_HALF, 10000.0f), KVL_ERR_INVALID_ARG);
    kvl_codec_profile_builder_free(b);
    CHECK_OK(kvl_codec_profile_builder_create(&sh, fp, &b));
    CHECK_ST(kvl_codec_profile_builder_set_key_rotation(b, 3, 10000.0f), KVL_ERR_INVALID_ARG);
    CHECK_ST(kvl_codec_profile_builder_set_key_rotation(b, KVL_CODEC_KEYROT_HALF, 0.0f), KVL_ERR_INVALID_ARG);
    CHECK_ST(kvl_codec_profile_builder_set_key_rotation(b, KVL_CODEC_KEYROT_HALF, NAN), KVL_ERR_INVALID_ARG);
    float *x = kvl_synth_kv(&sh, 3), *out = malloc(n * 4);
    CHECK_OK(kvl_codec_profile_builder_add(b, x, sh.n_tokens));
    CHECK_ST(kvl_codec_profile_builder_set_key_rotation(b, KVL_CODEC_KEYROT_HALF, 10000.0f), KVL_ERR_INVALID_ARG);
    kvl_codec_profile_builder_free(b);
    CHECK_ST(kvl_codec_simulate(&sh, x, 2, NULL, 3, 10000.0f, out), KVL_ERR_INVALID_ARG);
    CHECK_ST(kvl_codec_simulate(&sh, x, 0, NULL, 0, 0, out), KVL_ERR_CODEC_LEVEL);
    CHECK_ST(kvl_codec_simulate(&odd, x, 2, NULL, KVL_CODEC_KEYROT_HALF, 10000.0f, out), KVL_ERR_INVALID_ARG);
    free(x);
    free(out);
}

/* real KV of a model (prefill of a token sequence) through every level */
static void test_real(const char *model) {
    kvl_model *m = NULL;
    kvl_model_opts mo = kvl_model_opts_default();
    mo.n_threads = 1;
    CHECK_OK(kvl_model_load(model, &mo, &m));
    if (!m) return;
    kvl_codec_shape sh;
    float *x = kvl_test_model_kv(m, 64, &sh);
    CHECK_MSG(x != NULL, "prefill of %s failed", model);
    if (!x) {
        kvl_model_free(m);
        return;
    }
    kvl_codec_profile_builder *b = NULL;
    kvl_codec_profile *p = NULL;
    CHECK_OK(kvl_codec_profile_builder_create(&sh, kvl_model_fingerprint(m), &b));
    CHECK_OK(kvl_codec_profile_builder_add(b, x, sh.n_tokens));
    CHECK_OK(kvl_codec_profile_builder_finish(b, &p));
    roundtrip_all(&sh, x, p, "real");
    kvl_codec_profile_builder_free(b);
    kvl_codec_profile_free(p);
    kvl_model_free(m);
    free(x);
}

static int write_corpus(const char *dir) {
    char path[4096];
    kvl_codec_profile *prof = NULL;
    if (kvl_synth_profile(&prof) != KVL_OK) return 1;
    uint8_t *b = NULL;
    size_t nb = 0;
    if (kvl_codec_profile_serialize(prof, &b, &nb) != KVL_OK) return 1;
    snprintf(path, sizeof path, "%s/profile/synth.kvlp", dir);
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    fwrite(b, nb, 1, f);
    fclose(f);
    free(b);
    kvl_codec_shape sh = {2, 12, 2, 8};
    float *x = kvl_synth_kv(&sh, 21);
    int k = 0;
    for (int scheme = 0; scheme < 2; scheme++)
        for (int level = 0; level <= KVL_CODEC_MAX_LEVEL; level++)
            for (int up = 0; up < 2; up++) {
                if ((scheme && (level == 0 || up)) || (up && level == 0)) continue;
                kvl_codec_opts o = {level, scheme, up ? prof : NULL, 1, NULL};
                uint8_t *e = NULL;
                size_t ne = 0;
                if (kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne) != KVL_OK) return 1;
                snprintf(path, sizeof path, "%s/decode/s%d_l%d_p%d.kvlc", dir, scheme, level, up);
                f = fopen(path, "wb");
                if (!f) return 1;
                fwrite(e, ne, 1, f);
                fclose(f);
                free(e);
                k++;
            }
    printf("wrote %d chunks and 1 profile under %s\n", k, dir);
    free(x);
    kvl_codec_profile_free(prof);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write-corpus")) return write_corpus(argv[2]);
    kvl_codec_profile *prof = NULL;
    CHECK_OK(kvl_synth_profile(&prof));
    if (!prof) KVL_TEST_END();
    kvl_codec_shape shapes[] = {{2, 64, 2, 8}, {3, 1, 1, 1}, {1, 37, 3, 5}, {2, 300, 1, 40}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        float *x = kvl_synth_kv(&shapes[i], 1 + i);
        roundtrip_all(&shapes[i], x, i == 0 ? prof : NULL, "synthetic");
        free(x);
    }
    test_dtypes();
    test_bad_args();
    test_malformed(prof);
    test_profile(prof);
    test_key_rotation(prof);
    if (argc > 1) test_real(argv[1]);
    kvl_codec_profile_free(prof);
    KVL_TEST_END();
}
