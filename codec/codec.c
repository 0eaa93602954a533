/* codec.c - the CPU reference encoder and decoder of the KVLC bitstream (docs/codec-format.md). */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "codec_impl.h"
#include "kvl_codec_plan.h"

#define LOSSLESS_ZSTD_LEVEL 3

kvl_codec_opts kvl_codec_opts_default(void) {
    kvl_codec_opts o = {KVL_CODEC_LEVEL_DEFAULT, KVL_CODEC_SCHEME_KVLOOM, NULL, 1, NULL};
    return o;
}

static size_t dtype_size(int dt) { return dt == KVL_CODEC_F32 ? 4 : 2; }

static kvl_status check_shape(const kvl_codec_shape *s) {
    if (!s) return kvl_errorf(KVL_ERR_INVALID_ARG, "shape is NULL");
    if (s->n_layers < 1 || s->n_layers > KVLC_MAX_LAYERS || s->n_tokens < 1 || s->n_tokens > KVLC_MAX_TOKENS ||
        s->n_kv_heads < 1 || s->head_dim < 1 || s->n_kv_heads > 65535 || s->head_dim > 65535 ||
        (int64_t)s->n_kv_heads * s->head_dim > KVLC_MAX_CHANNELS)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "KV shape %d layers x %d tokens x %d heads x %d dims out of range",
                          s->n_layers, s->n_tokens, s->n_kv_heads, s->head_dim);
    return KVL_OK;
}

static float load_elem(const void *src, int dt, size_t i) {
    if (dt == KVL_CODEC_F32) return ((const float *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    return dt == KVL_CODEC_BF16 ? kvl_bf16_to_f32(h) : kvl_f16_to_f32(h);
}

static inline void store_elem(void *dst, int dt, size_t i, float v) {
    if (dt == KVL_CODEC_F32) ((float *)dst)[i] = v;
    else if (dt == KVL_CODEC_BF16) ((uint16_t *)dst)[i] = kvl_f32_to_bf16(v);
    else ((uint16_t *)dst)[i] = kvl_f32_to_f16(v);
}

/* ---------------------------------------------------------------- tables */

static int table_build(kvlc_table *t, int32_t amax, int pb, const uint32_t *freq, uint32_t *cum) {
    t->amax = amax;
    t->pb = pb;
    t->cum = cum;
    int32_t A = 2 * amax + 1;
    uint64_t c = 0;
    cum[0] = 0;
    for (int32_t s = 0; s < A; s++) {
        c += freq[s];
        cum[s + 1] = (uint32_t)c;
    }
    return c == (1ull << pb) ? 0 : -1;
}

/* symbol index whose interval holds slot: the largest s with cum[s] <= slot (zero-width symbols are
 * never returned because cum[s + 1] > slot for the largest such s). The lookup gives the symbol
 * holding the first slot of slot's 1/256 bucket; the scan walks from there. */
static inline int32_t table_find(const kvlc_table *t, uint32_t slot) {
    int32_t s = t->lut[slot >> (t->pb - 8)];
    while (t->cum[s + 1] <= slot) s++;
    return s;
}

/* ---------------------------------------------------------------- per-section work */

typedef struct sec_job {
    /* shared, read-only */
    const kvlc_params *p;
    const kvl_codec_profile *prof;
    const kvl_codec_shape *shape;
    int dtype;
    const void *kv;
    const float *rope_cs; /* kvlc_rope_table of the chunk when the profile rotates keys, else NULL */
    /* per section results */
    kvlc_buf *out; /* [2L] */
    kvl_status *st;
    char (*msg)[256];
} sec_job;

/* context index and alphabet half-width of symbol (t, c) */
typedef struct ctx_map {
    int mode; /* KVLC_TABLES_* */
    int has_delta;
    int Q;
} ctx_map;

static inline int32_t ctx_of(const ctx_map *m, int32_t c, int is_delta) {
    if (m->mode == KVLC_TABLES_CHUNK_LAYER) return is_delta;
    return c * (m->has_delta ? 2 : 1) + is_delta;
}

static kvl_status encode_lossless_section(const sec_job *j, int l, int kv, kvlc_buf *out) {
    int32_t T = j->shape->n_tokens, C = j->shape->n_kv_heads * j->shape->head_dim;
    size_t n = (size_t)T * C, es = dtype_size(j->dtype);
    const uint8_t *src = (const uint8_t *)j->kv + ((size_t)l * 2 + kv) * n * es;
    uint8_t *sh = malloc(n * es);
    size_t bound = ZSTD_compressBound(n * es);
    if (!sh || kvlc_buf_reserve(out, 4 + bound)) {
        free(sh);
        return KVL_ERR_NOMEM;
    }
    /* byte planes: the exponent bytes of neighbouring elements compress far better together */
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < es; b++) sh[b * n + i] = src[i * es + b];
    size_t z = ZSTD_compress(out->p + out->n + 4, bound, sh, n * es, LOSSLESS_ZSTD_LEVEL);
    free(sh);
    if (ZSTD_isError(z)) return kvl_errorf(KVL_ERR_INTERNAL, "zstd: %s", ZSTD_getErrorName(z));
    out->n += 4 + z;
    return KVL_OK;
}

/* Counts the symbols of every context, normalises, serialises the tables into out and builds
 * tabs[n_ctx] (cum arrays in cum_store, n_ctx * (4Q + 2) entries). */
static kvl_status put_chunk_tables(kvlc_buf *out, const ctx_map *m, int32_t n_ctx, const int16_t *sym, size_t n_sym,
                                   const int32_t *ctx_of_sym, int pb, kvlc_table *tabs, uint32_t *cum_store,
                                   uint32_t *freq_tmp) {
    int32_t stride = 4 * m->Q + 2;
    uint64_t *cnt = calloc((size_t)n_ctx * stride, sizeof *cnt);
    if (!cnt) return KVL_ERR_NOMEM;
    for (size_t i = 0; i < n_sym; i++) {
        int32_t x = ctx_of_sym[i];
        int32_t amax = (m->has_delta && (x % 2 == 1)) ? 2 * m->Q : m->Q;
        cnt[(size_t)x * stride + sym[i] + amax]++;
    }
    kvl_status st = KVL_OK;
    size_t cum_off = 0;
    for (int32_t x = 0; x < n_ctx && st == KVL_OK; x++) {
        int d = m->has_delta && (x % 2 == 1);
        int32_t amax = d ? 2 * m->Q : m->Q, A = 2 * amax + 1;
        const uint64_t *c = cnt + (size_t)x * stride;
        int32_t lo = 0, hi = -1;
        for (int32_t s = 0; s < A; s++)
            if (c[s]) {
                if (hi < 0) lo = s;
                hi = s;
            }
        tabs[x].amax = amax;
        tabs[x].pb = pb;
        tabs[x].cum = NULL;
        if (hi < 0) { /* context unused in this chunk: an empty table */
            if (kvlc_buf_varint(out, 0) || kvlc_buf_varint(out, 0)) st = KVL_ERR_NOMEM;
            continue;
        }
        if (kvlc_normalize(c, A, pb, 0, freq_tmp) != 0) {
            st = kvl_errorf(KVL_ERR_INTERNAL, "cannot normalise a %d-symbol table to %d bits", A, pb);
            break;
        }
        /* lo + 1 so that 0 can mean "empty" */
        if (kvlc_buf_varint(out, (uint32_t)lo + 1) || kvlc_buf_varint(out, (uint32_t)(hi - lo))) st = KVL_ERR_NOMEM;
        for (int32_t s = lo; s <= hi && st == KVL_OK; s++)
            if (kvlc_buf_varint(out, freq_tmp[s])) st = KVL_ERR_NOMEM;
        if (st == KVL_OK && table_build(&tabs[x], amax, pb, freq_tmp, cum_store + cum_off) != 0)
            st = kvl_errorf(KVL_ERR_INTERNAL, "table does not sum to 2^%d", pb);
        cum_off += (size_t)A + 1;
    }
    free(cnt);
    return st;
}

static kvl_status encode_quant_section(const sec_job *j, int l, int kv, kvlc_buf *out) {
    const kvlc_params *p = j->p;
    int32_t T = j->shape->n_tokens, C = j->shape->n_kv_heads * j->shape->head_dim;
    size_t n = (size_t)T * C;
    int Q = p->q[2 * l + kv];
    int has_delta = p->delta_group > 1;
    int cg = kvlc_cg(p->chan_group, C);
    int32_t n_streams = (C + cg - 1) / cg;
    int sm = kvlc_scale_of(p->scale_mode, kv);
    int32_t n_sc = kvlc_n_scales(sm, T, C);
    ctx_map m = {j->prof ? KVLC_TABLES_PROFILE : p->chunk_tables, has_delta, Q};
    int32_t n_ctx = m.mode == KVLC_TABLES_CHUNK_LAYER ? 1 + has_delta : C * (1 + has_delta);
    int32_t Amax = 4 * Q + 2;

    kvl_status st = KVL_OK;
    float *x = malloc(n * sizeof *x);
    int16_t *q = malloc(n * sizeof *q), *sym = malloc(n * sizeof *sym);
    int32_t *ctx = malloc(n * sizeof *ctx);
    uint16_t *sc = malloc((size_t)n_sc * sizeof *sc);
    kvlc_table *tabs = calloc((size_t)n_ctx, sizeof *tabs);
    uint32_t *cum_store = m.mode == KVLC_TABLES_PROFILE ? NULL : malloc((size_t)n_ctx * Amax * sizeof *cum_store);
    uint32_t *freq = malloc((size_t)Amax * sizeof *freq);
    size_t tcap = 2 * (size_t)T * cg + 16;
    uint8_t *tmp = malloc(tcap);
    if (!x || !q || !sym || !ctx || !sc || !tabs || (m.mode != KVLC_TABLES_PROFILE && !cum_store) || !freq || !tmp) {
        st = KVL_ERR_NOMEM;
        goto done;
    }
    size_t base = ((size_t)l * 2 + kv) * n;
    for (size_t i = 0; i < n; i++) x[i] = load_elem(j->kv, j->dtype, base + i);
    if (kv == 0 && j->rope_cs) kvlc_rotate_keys(x, T, j->shape->n_kv_heads, j->shape->head_dim, j->prof->key_rot, j->rope_cs, 1);
    if (kvlc_quantize_section(x, T, C, sm, Q, p->deadzone, sc, q) != 0) {
        st = kvl_errorf(KVL_ERR_RANGE, "layer %d %s: a value is not finite or its scale overflows", l, kv ? "v" : "k");
        goto done;
    }
    for (int32_t t = 0; t < T; t++) {
        int d = kvlc_is_delta(p->delta_group, t);
        int32_t ta = t - (has_delta ? t % p->delta_group : 0);
        for (int32_t c = 0; c < C; c++) {
            size_t i = (size_t)t * C + c;
            sym[i] = (int16_t)(d ? q[i] - q[(size_t)ta * C + c] : q[i]);
            ctx[i] = ctx_of(&m, c, d);
        }
    }
    if (kvlc_buf_reserve(out, 4)) { st = KVL_ERR_NOMEM; goto done; }
    out->n += 4; /* checksum, filled in below */
    if (m.mode == KVLC_TABLES_PROFILE) {
        const kvlc_plevel *pl = &j->prof->lv[p->level];
        for (int32_t c = 0; c < C; c++)
            for (int d = 0; d <= has_delta; d++)
                tabs[ctx_of(&m, c, d)] = pl->tables[kvlc_ptab_index(C, has_delta, l, kv, c, d)];
    } else {
        st = put_chunk_tables(out, &m, n_ctx, sym, n, ctx, p->chunk_pb, tabs, cum_store, freq);
        if (st != KVL_OK) goto done;
    }
    uint8_t b2[2];
    int32_t n_bf = sm == KVLC_SCALE_CHANNEL_OFFSET ? C : n_sc;
    for (int32_t i = 0; i < n_bf; i++) {
        kvlc_put16(b2, sc[i]);
        if (kvlc_buf_put(out, b2, 2)) { st = KVL_ERR_NOMEM; goto done; }
    }
    /* integer offsets as zigzag varints: most are small (a channel's mean in steps) */
    for (int32_t i = n_bf; i < n_sc; i++) {
        int32_t z = (int16_t)sc[i];
        if (kvlc_buf_varint(out, ((uint32_t)z << 1) ^ (uint32_t)(z >> 31))) { st = KVL_ERR_NOMEM; goto done; }
    }
    size_t sizes_at = out->n;
    if (kvlc_buf_reserve(out, 4 * (size_t)n_streams)) { st = KVL_ERR_NOMEM; goto done; }
    out->n += 4 * (size_t)n_streams;
    for (int32_t g = 0; g < n_streams; g++) {
        int32_t c0 = g * cg, c1 = c0 + cg < C ? c0 + cg : C;
        uint8_t *end = tmp + tcap, *ptr = end;
        uint32_t xs = KVLC_RANS_L;
        /* rANS codes in reverse so that the decoder reads forward */
        for (int32_t t = T - 1; t >= 0; t--)
            for (int32_t c = c1 - 1; c >= c0; c--) {
                size_t i = (size_t)t * C + c;
                const kvlc_table *tb = &tabs[ctx[i]];
                int32_t s = sym[i] + tb->amax;
                uint32_t start = tb->cum[s], f = tb->cum[s + 1] - start;
                KVL_ASSERT(f > 0);
                uint32_t xmax = ((KVLC_RANS_L >> tb->pb) << 8) * f;
                while (xs >= xmax) {
                    *--ptr = (uint8_t)xs;
                    xs >>= 8;
                }
                xs = ((xs / f) << tb->pb) + (xs % f) + start;
            }
        ptr -= 4;
        kvlc_put32(ptr, xs);
        size_t len = (size_t)(end - ptr);
        kvlc_put32(out->p + sizes_at + 4 * (size_t)g, (uint32_t)len);
        if (kvlc_buf_put(out, ptr, len)) { st = KVL_ERR_NOMEM; goto done; }
    }
done:
    free(x); free(q); free(sym); free(ctx); free(sc); free(tabs); free(cum_store); free(freq); free(tmp);
    return st;
}

static void *encode_worker(void *arg);

typedef struct worker {
    sec_job *j;
    int tid, nt, decode;
    /* decode only */
    const uint8_t *buf;
    const uint32_t *off;
    int32_t layer0, n_layers;
    int out_dtype;
    void *out;
} worker;

static kvl_status run_workers(worker *w, int nt, void *(*fn)(void *), int n_sec, sec_job *j) {
    pthread_t th[64];
    int started = 0;
    for (int t = 1; t < nt; t++) {
        if (pthread_create(&th[t], NULL, fn, &w[t]) != 0) break;
        started = t;
    }
    /* threads that failed to start: their share runs on the calling thread */
    for (int t = started + 1; t < nt; t++) fn(&w[t]);
    fn(&w[0]);
    for (int t = 1; t <= started; t++) pthread_join(th[t], NULL);
    for (int i = 0; i < n_sec; i++)
        if (j->st[i] != KVL_OK) return kvl_errorf(j->st[i], "%s", j->msg[i]);
    return KVL_OK;
}

static void *encode_worker(void *arg) {
    worker *w = arg;
    sec_job *j = w->j;
    int n_sec = 2 * j->shape->n_layers;
    for (int i = w->tid; i < n_sec; i += w->nt) {
        kvl_clear_error();
        int l = i / 2, kv = i % 2;
        kvl_status st = j->p->lossless ? encode_lossless_section(j, l, kv, &j->out[i])
                                       : encode_quant_section(j, l, kv, &j->out[i]);
        if (st == KVL_OK && j->out[i].n < 4) st = kvl_errorf(KVL_ERR_INTERNAL, "empty section");
        if (st == KVL_OK) kvlc_put32(j->out[i].p, kvlc_checksum(j->out[i].p + 4, j->out[i].n - 4));
        j->st[i] = st;
        snprintf(j->msg[i], sizeof j->msg[i], "%s", st == KVL_OK ? "" : kvl_last_error());
        if (st != KVL_OK) break;
    }
    return NULL;
}

static int profile_level_matches(const kvl_codec_profile *pr, const kvlc_params *p, const kvl_codec_shape *s) {
    if (pr->n_layers != s->n_layers || pr->n_kv_heads != s->n_kv_heads || pr->head_dim != s->head_dim) return 0;
    const kvlc_plevel *pl = &pr->lv[p->level];
    /* bins may differ: a profile chooses its own per model (kvl_codec_profile_builder_set_bins) */
    int C = s->n_kv_heads * s->head_dim;
    return pl->present && pl->scale_mode == p->scale_mode && pl->delta_group == p->delta_group &&
           kvlc_cg(pl->chan_group, C) == kvlc_cg(p->chan_group, C);
}

kvl_status kvl_codec_profile_check(const kvl_codec_profile *p, const kvl_codec_shape *shape, int32_t level) {
    if (!p || !shape) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    if (level < 1 || level > KVL_CODEC_MAX_LEVEL) return kvl_errorf(KVL_ERR_CODEC_LEVEL, "level %d is not a lossy level", level);
    if (shape->n_layers < 1 || shape->n_layers > KVLC_MAX_LAYERS) return kvl_errorf(KVL_ERR_INVALID_ARG, "bad layer count");
    kvlc_params prm;
    KVL_TRY(kvlc_params_get(level, KVL_CODEC_SCHEME_KVLOOM, shape->n_layers, &prm));
    int ok = profile_level_matches(p, &prm, shape);
    kvlc_params_free(&prm);
    if (!ok)
        return kvl_errorf(KVL_ERR_CODEC_PROFILE, "profile built for another KV shape or other level-%d parameters", level);
    return KVL_OK;
}

static int clamp_threads(int n) { return n < 1 ? 1 : n > 64 ? 64 : n; }

kvl_status kvl_codec_encode(const kvl_codec_shape *shape, kvl_codec_dtype dtype, const void *kv,
                            const kvl_codec_opts *opts, uint8_t **out, size_t *out_size) {
    if (!out || !out_size || !kv) return kvl_errorf(KVL_ERR_INVALID_ARG, "kv, out and out_size must not be NULL");
    *out = NULL;
    *out_size = 0;
    KVL_TRY(check_shape(shape));
    if (dtype != KVL_CODEC_F32 && dtype != KVL_CODEC_BF16 && dtype != KVL_CODEC_F16)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    kvl_codec_opts o = opts ? *opts : kvl_codec_opts_default();
    kvlc_params p;
    KVL_TRY(kvlc_params_get(o.level, o.scheme, shape->n_layers, &p));
    const kvl_codec_profile *prof = (!p.lossless && o.scheme == KVL_CODEC_SCHEME_KVLOOM) ? o.profile : NULL;
    if (prof && !profile_level_matches(prof, &p, shape)) {
        kvlc_params_free(&p);
        return kvl_errorf(KVL_ERR_CODEC_PROFILE,
                          "the profile was built for another KV shape or other level-%d parameters", o.level);
    }
    if (o.bins && !p.lossless) {
        for (int32_t i = 0; i < 2 * shape->n_layers; i++)
            if (o.bins[i] < 1 || o.bins[i] > KVLC_MAX_Q) {
                kvlc_params_free(&p);
                return kvl_errorf(KVL_ERR_INVALID_ARG, "bins[%d] = %u outside [1, %d]", i, o.bins[i], KVLC_MAX_Q);
            }
        if (prof && memcmp(prof->lv[o.level].q, o.bins, (size_t)shape->n_layers * 2 * sizeof *o.bins) != 0) {
            kvlc_params_free(&p);
            return kvl_errorf(KVL_ERR_CODEC_PROFILE, "bins differ from the profile's level-%d bins", o.level);
        }
        memcpy(p.q, o.bins, (size_t)shape->n_layers * 2 * sizeof *p.q);
    } else if (prof) {
        memcpy(p.q, prof->lv[o.level].q, (size_t)shape->n_layers * 2 * sizeof *p.q);
    }
    int L = shape->n_layers, n_sec = 2 * L;
    int32_t C = shape->n_kv_heads * shape->head_dim;
    float *cs = prof && prof->key_rot ? malloc((size_t)shape->n_tokens * shape->head_dim * sizeof *cs) : NULL;
    if (cs) kvlc_rope_table(prof->rope_theta, shape->head_dim, shape->n_tokens, cs);
    sec_job j = {&p, prof, shape, dtype, kv, cs, calloc((size_t)n_sec, sizeof(kvlc_buf)),
                 calloc((size_t)n_sec, sizeof(kvl_status)), calloc((size_t)n_sec, 256)};
    kvl_status st = KVL_OK;
    if (!j.out || !j.st || !j.msg || (prof && prof->key_rot && !cs)) { st = KVL_ERR_NOMEM; goto done; }
    int nt = clamp_threads(o.n_threads);
    if (nt > n_sec) nt = n_sec;
    worker w[64];
    for (int t = 0; t < nt; t++) w[t] = (worker){.j = &j, .tid = t, .nt = nt};
    st = run_workers(w, nt, encode_worker, n_sec, &j);
    if (st != KVL_OK) goto done;

    size_t hb = KVLC_HDR_FIXED + 4 * (size_t)L + 4 * ((size_t)n_sec + 1), total = hb;
    for (int i = 0; i < n_sec; i++) total += j.out[i].n;
    if (total > 0xffffffffu) { st = kvl_errorf(KVL_ERR_LIMIT, "encoded chunk of %zu bytes exceeds 4 GiB", total); goto done; }
    uint8_t *b = calloc(1, total);
    if (!b) { st = KVL_ERR_NOMEM; goto done; }
    memcpy(b, KVLC_MAGIC, 4);
    kvlc_put16(b + 4, KVLC_VERSION);
    kvlc_put16(b + 6, (uint16_t)hb);
    b[8] = p.lossless ? KVLC_MODE_LOSSLESS : KVLC_MODE_QUANT;
    b[9] = (uint8_t)o.level;
    b[10] = (uint8_t)o.scheme;
    b[11] = (uint8_t)dtype;
    if (!p.lossless) {
        int cg = kvlc_cg(p.chan_group, C);
        b[12] = (uint8_t)p.scale_mode;
        b[13] = (uint8_t)(prof ? KVLC_TABLES_PROFILE : p.chunk_tables);
        b[14] = (uint8_t)(prof ? KVLC_PROFILE_PB : p.chunk_pb);
        b[15] = (uint8_t)p.delta_group;
        kvlc_put16(b + 22, (uint16_t)cg);
    }
    kvlc_put16(b + 16, (uint16_t)L);
    kvlc_put16(b + 18, (uint16_t)shape->n_kv_heads);
    kvlc_put16(b + 20, (uint16_t)shape->head_dim);
    kvlc_put32(b + 24, (uint32_t)shape->n_tokens);
    kvlc_put64(b + 32, total);
    if (prof) memcpy(b + 40, prof->id, 16);
    uint8_t *dir = b + KVLC_HDR_FIXED;
    for (int l = 0; l < L; l++) {
        kvlc_put16(dir + 4 * l, p.lossless ? 0 : p.q[2 * l]);
        kvlc_put16(dir + 4 * l + 2, p.lossless ? 0 : p.q[2 * l + 1]);
    }
    size_t off = hb;
    uint8_t *offs = dir + 4 * (size_t)L;
    for (int i = 0; i < n_sec; i++) {
        kvlc_put32(offs + 4 * (size_t)i, (uint32_t)off);
        memcpy(b + off, j.out[i].p, j.out[i].n);
        off += j.out[i].n;
    }
    kvlc_put32(offs + 4 * (size_t)n_sec, (uint32_t)off);
    kvlc_put32(b + 56, kvlc_checksum(dir, hb - KVLC_HDR_FIXED));
    kvlc_put32(b + 60, kvlc_checksum(b, 60));
    *out = b;
    *out_size = total;
done:
    if (j.out)
        for (int i = 0; i < n_sec; i++) free(j.out[i].p);
    free(j.out); free(j.st); free(j.msg); free(cs);
    kvlc_params_free(&p);
    return st;
}

/* ---------------------------------------------------------------- decoder */

typedef struct hdr {
    kvl_codec_info info;
    int scale_mode, table_mode, pb, delta_group, chan_group;
    size_t hb;
} hdr;

static kvl_status bad(const char *what) { return kvl_errorf(KVL_ERR_CODEC, "malformed chunk: %s", what); }

static kvl_status parse_header(const uint8_t *b, size_t size, hdr *h) {
    memset(h, 0, sizeof *h);
    if (!b) return kvl_errorf(KVL_ERR_INVALID_ARG, "buffer is NULL");
    if (size < KVLC_HDR_FIXED) return kvl_errorf(KVL_ERR_TRUNCATED, "%zu bytes is shorter than a chunk header", size);
    if (memcmp(b, KVLC_MAGIC, 4) != 0) return kvl_errorf(KVL_ERR_MAGIC, "not a KVLC chunk (bad magic)");
    if (kvlc_get16(b + 4) != KVLC_VERSION)
        return kvl_errorf(KVL_ERR_VERSION, "KVLC version %u (this build reads %d)", kvlc_get16(b + 4), KVLC_VERSION);
    if (KVLC_SUM_BAD(kvlc_get32(b + 60), kvlc_checksum(b, 60))) return kvl_errorf(KVL_ERR_CHECKSUM, "chunk header checksum mismatch");
    kvl_codec_info *in = &h->info;
    int mode = b[8];
    in->level = b[9];
    in->scheme = b[10];
    in->src_dtype = b[11];
    h->scale_mode = b[12];
    h->table_mode = b[13];
    h->pb = b[14];
    h->delta_group = b[15];
    in->shape.n_layers = kvlc_get16(b + 16);
    in->shape.n_kv_heads = kvlc_get16(b + 18);
    in->shape.head_dim = kvlc_get16(b + 20);
    h->chan_group = kvlc_get16(b + 22);
    in->shape.n_tokens = (int32_t)kvlc_get32(b + 24);
    in->total_bytes = kvlc_get64(b + 32);
    memcpy(in->profile_id, b + 40, 16);
    int32_t L = in->shape.n_layers;
    int64_t C = (int64_t)in->shape.n_kv_heads * in->shape.head_dim;
    if (mode != KVLC_MODE_LOSSLESS && mode != KVLC_MODE_QUANT) return bad("unknown mode");
    in->lossless = mode == KVLC_MODE_LOSSLESS;
    if (in->level > KVL_CODEC_MAX_LEVEL || (in->level == 0) != in->lossless) return bad("level does not match mode");
    if (in->scheme != KVL_CODEC_SCHEME_KVLOOM && in->scheme != KVL_CODEC_SCHEME_LMCACHE) return bad("unknown scheme");
    if (in->src_dtype > KVL_CODEC_F16) return bad("unknown source dtype");
    if (L < 1 || in->shape.n_tokens < 1 || (uint32_t)in->shape.n_tokens > KVLC_MAX_TOKENS || C < 1 ||
        C > KVLC_MAX_CHANNELS)
        return bad("shape out of range");
    if (kvlc_get32(b + 28) != 0) return bad("reserved field not zero");
    if (in->lossless) {
        if (b[12] || b[13] || b[14] || b[15] || h->chan_group) return bad("lossless chunk with coder fields set");
    } else {
        if (!kvlc_scale_valid(h->scale_mode) || h->table_mode > KVLC_TABLES_CHUNK_CHANNEL || h->pb < KVLC_MIN_PB ||
            h->pb > KVLC_MAX_PB || h->delta_group == 1 || h->chan_group < 1 || h->chan_group > C)
            return bad("coder field out of range");
        if (h->table_mode == KVLC_TABLES_PROFILE && h->pb != KVLC_PROFILE_PB) return bad("profile tables with wrong precision");
    }
    in->uses_profile = !in->lossless && h->table_mode == KVLC_TABLES_PROFILE;
    static const uint8_t zero[16];
    if (!in->uses_profile && memcmp(in->profile_id, zero, 16) != 0) return bad("profile id set without profile tables");
    h->hb = KVLC_HDR_FIXED + 4 * (size_t)L + 4 * (2 * (size_t)L + 1);
    if (kvlc_get16(b + 6) != h->hb) return bad("header size does not match the layer count");
    if (in->total_bytes < h->hb) return bad("total size smaller than the header");
    if (in->total_bytes > size)
        return kvl_errorf(KVL_ERR_TRUNCATED, "chunk declares %llu bytes, %zu given",
                          (unsigned long long)in->total_bytes, size);
    if (KVLC_SUM_BAD(kvlc_get32(b + 56), kvlc_checksum(b + KVLC_HDR_FIXED, h->hb - KVLC_HDR_FIXED)))
        return kvl_errorf(KVL_ERR_CHECKSUM, "chunk directory checksum mismatch");
    const uint8_t *dir = b + KVLC_HDR_FIXED, *offs = dir + 4 * (size_t)L;
    for (int32_t i = 0; i < 2 * L; i++) {
        uint16_t q = kvlc_get16(dir + 2 * (size_t)i);
        if (in->lossless ? q != 0 : (q < 1 || q > KVLC_MAX_Q)) return bad("bin count out of range");
    }
    if (kvlc_get32(offs) != h->hb) return bad("first section does not follow the header");
    for (int32_t i = 0; i < 2 * L; i++)
        if (kvlc_get32(offs + 4 * (size_t)i + 4) < (uint64_t)kvlc_get32(offs + 4 * (size_t)i) + 4)
            return bad("section offsets not increasing");
    if (kvlc_get32(offs + 8 * (size_t)L) != in->total_bytes) return bad("last section does not end the chunk");
    in->n_elements = (uint64_t)L * 2 * (uint64_t)in->shape.n_tokens * (uint64_t)C;
    return KVL_OK;
}

kvl_status kvl_codec_info_get(const uint8_t *buf, size_t size, kvl_codec_info *info) {
    if (!info) return kvl_errorf(KVL_ERR_INVALID_ARG, "info is NULL");
    hdr h;
    KVL_TRY(parse_header(buf, size, &h));
    *info = h.info;
    return KVL_OK;
}

static int get_varint(const uint8_t **p, const uint8_t *end, uint32_t *v) {
    uint32_t r = 0;
    for (int k = 0; k < 5; k++) {
        if (*p >= end) return -1;
        uint8_t c = *(*p)++;
        if (k == 4 && (c & 0xf0)) return -1;
        r |= (uint32_t)(c & 0x7f) << (7 * k);
        if (!(c & 0x80)) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

typedef struct dec_ctx {
    const hdr *h;
    const kvl_codec_profile *prof;
    const float *rope_cs; /* kvlc_rope_table of the chunk when its profile rotates keys, else NULL */
} dec_ctx;

static kvl_status decode_lossless_section(const hdr *h, const uint8_t *s, size_t len, int out_dtype, void *out,
                                          size_t out_base) {
    int32_t T = h->info.shape.n_tokens, C = h->info.shape.n_kv_heads * h->info.shape.head_dim;
    size_t n = (size_t)T * C, es = dtype_size(h->info.src_dtype);
    unsigned long long fs = ZSTD_getFrameContentSize(s, len);
    if (fs != n * es) return bad("lossless section size does not match the shape");
    uint8_t *raw = malloc(n * es);
    if (!raw) return KVL_ERR_NOMEM;
    size_t z = ZSTD_decompress(raw, n * es, s, len);
    if (ZSTD_isError(z) || z != n * es) {
        free(raw);
        return bad("lossless section does not decompress");
    }
    int dt = h->info.src_dtype;
    if (dt == out_dtype) {
        uint8_t *o = (uint8_t *)out + out_base * es;
        for (size_t i = 0; i < n; i++)
            for (size_t b = 0; b < es; b++) o[i * es + b] = raw[b * n + i];
    } else {
        for (size_t i = 0; i < n; i++) {
            uint8_t e[4] = {0};
            for (size_t b = 0; b < es; b++) e[b] = raw[b * n + i];
            float v;
            if (dt == KVL_CODEC_F32) memcpy(&v, e, 4);
            else v = dt == KVL_CODEC_BF16 ? kvl_bf16_to_f32(kvlc_get16(e)) : kvl_f16_to_f32(kvlc_get16(e));
            store_elem(out, out_dtype, out_base + i, v);
        }
    }
    free(raw);
    return KVL_OK;
}

/* A quantised section's prelude, parsed and checked: tables, scales and stream sizes. The CPU
 * decoder below and the parallel-decode plan (kvl_codec_plan_add) both go through it, so both
 * reject exactly the same structural faults. */
typedef struct sec_parsed {
    int Q, has_delta, cg, sm;
    int32_t T, C, n_streams, n_sc, n_ctx;
    ctx_map m;
    kvlc_table *tabs;     /* [n_ctx]; cum NULL: empty context */
    float *scale;         /* [n_sc] */
    uint32_t *cum_store;  /* chunk tables only */
    uint16_t *lut_store;
    size_t n_cum;         /* entries of cum_store used */
    const uint8_t *sizes; /* n_streams u32 */
    const uint8_t *data;  /* first stream */
} sec_parsed;

static void sec_parsed_free(sec_parsed *sp) {
    free(sp->tabs); free(sp->scale); free(sp->cum_store); free(sp->lut_store);
    memset(sp, 0, sizeof *sp);
}

static kvl_status parse_section(const dec_ctx *d, int l, int kv, const uint8_t *s, size_t len, const uint8_t *dir,
                                sec_parsed *o) {
    const hdr *h = d->h;
    memset(o, 0, sizeof *o);
    int32_t T = h->info.shape.n_tokens, C = h->info.shape.n_kv_heads * h->info.shape.head_dim;
    int Q = kvlc_get16(dir + 4 * (size_t)l + 2 * (size_t)kv);
    int has_delta = h->delta_group > 1, cg = h->chan_group;
    int32_t n_streams = (C + cg - 1) / cg, sm = kvlc_scale_of(h->scale_mode, kv), n_sc = kvlc_n_scales(sm, T, C);
    ctx_map m = {h->table_mode, has_delta, Q};
    int32_t n_ctx = m.mode == KVLC_TABLES_CHUNK_LAYER ? 1 + has_delta : C * (1 + has_delta);
    *o = (sec_parsed){.Q = Q, .has_delta = has_delta, .cg = cg, .sm = sm, .T = T, .C = C, .n_streams = n_streams,
                      .n_sc = n_sc, .n_ctx = n_ctx, .m = m};
    const uint8_t *p = s, *end = s + len;
    kvl_status st = KVL_OK;
    o->tabs = calloc((size_t)n_ctx, sizeof *o->tabs);
    o->scale = malloc((size_t)n_sc * sizeof *o->scale);
    int32_t n_real = sm == KVLC_SCALE_CHANNEL_OFFSET ? C : n_sc; /* entries that are bf16 scales */
    uint32_t *freq = NULL;
    if (!o->tabs || !o->scale) { st = KVL_ERR_NOMEM; goto done; }
    if (m.mode == KVLC_TABLES_PROFILE) {
        const kvlc_plevel *pl = &d->prof->lv[h->info.level];
        for (int32_t c = 0; c < C; c++)
            for (int dd = 0; dd <= has_delta; dd++)
                o->tabs[ctx_of(&m, c, dd)] = pl->tables[kvlc_ptab_index(C, has_delta, l, kv, c, dd)];
    } else {
        int32_t Amax = 4 * Q + 2;
        o->cum_store = malloc((size_t)n_ctx * Amax * sizeof *o->cum_store);
        freq = malloc((size_t)Amax * sizeof *freq);
        o->lut_store = malloc((size_t)n_ctx * 256 * sizeof *o->lut_store);
        if (!o->cum_store || !freq || !o->lut_store) { st = KVL_ERR_NOMEM; goto done; }
        size_t cum_off = 0;
        for (int32_t x = 0; x < n_ctx; x++) {
            int isd = has_delta && (x % 2 == 1);
            int32_t amax = isd ? 2 * Q : Q, A = 2 * amax + 1;
            uint32_t lo1, span;
            if (get_varint(&p, end, &lo1) || get_varint(&p, end, &span)) { st = bad("truncated table"); goto done; }
            o->tabs[x].amax = amax;
            o->tabs[x].pb = h->pb;
            if (lo1 == 0) {
                if (span != 0) { st = bad("empty table with a span"); goto done; }
                continue;
            }
            uint32_t lo = lo1 - 1;
            if (lo >= (uint32_t)A || span >= (uint32_t)A - lo) { st = bad("table range outside the alphabet"); goto done; }
            memset(freq, 0, (size_t)A * sizeof *freq);
            uint64_t sum = 0;
            for (uint32_t k = 0; k <= span; k++) {
                uint32_t f;
                if (get_varint(&p, end, &f) || f > (1u << h->pb)) { st = bad("bad table frequency"); goto done; }
                freq[lo + k] = f;
                sum += f;
            }
            if (sum != (1ull << h->pb)) { st = bad("table frequencies do not sum to the total"); goto done; }
            table_build(&o->tabs[x], amax, h->pb, freq, o->cum_store + cum_off);
            kvlc_table_lut(&o->tabs[x], o->lut_store + (size_t)x * 256);
            cum_off += (size_t)A + 1;
        }
        o->n_cum = cum_off;
    }
    if ((size_t)(end - p) < 2 * (size_t)n_real + 4 * (size_t)n_streams) { st = bad("section too short for its scales"); goto done; }
    for (int32_t i = 0; i < n_real; i++, p += 2) {
        float v = kvl_bf16_to_f32(kvlc_get16(p));
        if (!isfinite(v) || v < 0 || signbit(v)) { st = bad("scale negative or not finite"); goto done; }
        o->scale[i] = v;
    }
    for (int32_t i = n_real; i < n_sc; i++) {
        uint32_t zz;
        if (get_varint(&p, end, &zz) || zz > 65534) { st = bad("bad channel offset"); goto done; }
        o->scale[i] = (float)(int32_t)((zz >> 1) ^ (0u - (zz & 1)));
    }
    if ((size_t)(end - p) < 4 * (size_t)n_streams) { st = bad("section too short for its stream sizes"); goto done; }
    o->sizes = p;
    p += 4 * (size_t)n_streams;
    o->data = p;
    uint64_t total = 0;
    for (int32_t g = 0; g < n_streams; g++) {
        total += kvlc_get32(o->sizes + 4 * (size_t)g);
    }
    if (total != (uint64_t)(end - p)) { st = bad("stream sizes do not add up to the section"); goto done; }
    /* checked up front rather than when the stream is reached: a parallel decoder needs it */
    for (int32_t g = 0; g < n_streams; g++)
        if (kvlc_get32(o->sizes + 4 * (size_t)g) < 4) { st = bad("stream shorter than its state"); goto done; }
done:
    free(freq);
    if (st != KVL_OK) sec_parsed_free(o);
    return st;
}

static kvl_status decode_quant_section(const dec_ctx *d, int l, int kv, const uint8_t *s, size_t len,
                                       int out_dtype, void *out, size_t out_base, const uint8_t *dir) {
    sec_parsed sp;
    KVL_TRY(parse_section(d, l, kv, s, len, dir, &sp));
    const hdr *h = d->h;
    int32_t T = sp.T, C = sp.C, cg = sp.cg, sm = sp.sm;
    int Q = sp.Q;
    const kvlc_table *tabs = sp.tabs;
    const float *scale = sp.scale;
    kvl_status st = KVL_OK;
    int32_t *anchor = malloc((size_t)cg * sizeof *anchor);
    /* rotated keys: the float32 values first, rotated forward, then stored in the output dtype */
    float *rot = kv == 0 && d->rope_cs ? malloc((size_t)T * C * sizeof *rot) : NULL;
    if (!anchor || (kv == 0 && d->rope_cs && !rot)) { st = KVL_ERR_NOMEM; goto done; }
    const uint8_t *p = sp.data;
    for (int32_t g = 0; g < sp.n_streams; g++) {
        size_t slen = kvlc_get32(sp.sizes + 4 * (size_t)g);
        const uint8_t *sp_ = p, *se = p + slen;
        p = se;
        uint32_t x = kvlc_get32(sp_);
        sp_ += 4;
        int32_t c0 = g * cg, c1 = c0 + cg < C ? c0 + cg : C;
        for (int32_t t = 0; t < T; t++) {
            int isd = kvlc_is_delta(h->delta_group, t);
            for (int32_t c = c0; c < c1; c++) {
                const kvlc_table *tb = &tabs[ctx_of(&sp.m, c, isd)];
                if (!tb->cum) { st = bad("symbol in a context with an empty table"); goto done; }
                uint32_t mask = (1u << tb->pb) - 1, slot = x & mask;
                int32_t si = table_find(tb, slot);
                uint32_t start = tb->cum[si], f = tb->cum[si + 1] - start;
                x = f * (x >> tb->pb) + slot - start;
                while (x < KVLC_RANS_L) {
                    if (sp_ >= se) { st = bad("stream ends early"); goto done; }
                    x = (x << 8) | *sp_++;
                }
                int32_t v = si - tb->amax, qv;
                if (isd) {
                    qv = anchor[c - c0] + v;
                    if (qv < -Q || qv > Q) { st = bad("delta leaves the quantiser range"); goto done; }
                } else {
                    qv = v;
                    anchor[c - c0] = v;
                }
                float val;
                /* one multiply, no FMA: the GPU decoder reproduces this bit for bit */
                if (sm == KVLC_SCALE_CHANNEL_OFFSET) val = (float)(qv + (int32_t)scale[C + c]) * scale[c];
                else val = (float)qv * scale[sm == KVLC_SCALE_TOKEN ? t : sm == KVLC_SCALE_CHANNEL ? c : 0];
                if (rot) rot[(size_t)t * C + c] = val;
                else store_elem(out, out_dtype, out_base + (size_t)t * C + c, val);
            }
        }
        if (x != KVLC_RANS_L || sp_ != se) { st = bad("stream does not end in the initial coder state"); goto done; }
    }
    if (rot) {
        kvlc_rotate_keys(rot, T, h->info.shape.n_kv_heads, h->info.shape.head_dim, d->prof->key_rot, d->rope_cs, 0);
        for (size_t i = 0; i < (size_t)T * C; i++) store_elem(out, out_dtype, out_base + i, rot[i]);
    }
done:
    free(anchor);
    free(rot);
    sec_parsed_free(&sp);
    return st;
}

static void *decode_worker(void *arg) {
    worker *w = arg;
    sec_job *j = w->j;
    const hdr *h = (const hdr *)j->kv; /* decode passes the parsed header through kv */
    int32_t C = h->info.shape.n_kv_heads * h->info.shape.head_dim;
    size_t n = (size_t)h->info.shape.n_tokens * C;
    dec_ctx d = {h, j->prof, j->rope_cs};
    int n_sec = 2 * w->n_layers;
    for (int i = w->tid; i < n_sec; i += w->nt) {
        kvl_clear_error();
        int l = w->layer0 + i / 2, kv = i % 2, si = 2 * l + kv;
        uint32_t a = w->off[si], b = w->off[si + 1];
        const uint8_t *s = w->buf + a;
        kvl_status st = KVL_OK;
        if (KVLC_SUM_BAD(kvlc_get32(s), kvlc_checksum(s + 4, b - a - 4)))
            st = kvl_errorf(KVL_ERR_CHECKSUM, "layer %d %s section checksum mismatch", l, kv ? "v" : "k");
        else if (h->info.lossless)
            st = decode_lossless_section(h, s + 4, b - a - 4, w->out_dtype, w->out, (size_t)i * n);
        else
            st = decode_quant_section(&d, l, kv, s + 4, b - a - 4, w->out_dtype, w->out, (size_t)i * n,
                                      w->buf + KVLC_HDR_FIXED);
        j->st[i] = st;
        snprintf(j->msg[i], sizeof j->msg[i], "%s", st == KVL_OK ? "" : kvl_last_error());
        if (st != KVL_OK) break;
    }
    return NULL;
}

/* The chunk's profile requirements: the profile it was encoded with, matching its shape, level
 * parameters and bins. */
static kvl_status check_profile(const hdr *hp, const uint8_t *buf, const kvl_codec_profile *profile) {
    const hdr h = *hp;
    int32_t L = h.info.shape.n_layers;
    if (h.info.uses_profile) {
        if (!profile) return kvl_errorf(KVL_ERR_CODEC_PROFILE, "the chunk was encoded with a profile; none given");
        if (memcmp(profile->id, h.info.profile_id, 16) != 0)
            return kvl_errorf(KVL_ERR_CODEC_PROFILE, "the chunk was encoded with another profile");
        const kvlc_plevel *pl = &profile->lv[h.info.level];
        if (profile->n_layers != L || profile->n_kv_heads != h.info.shape.n_kv_heads ||
            profile->head_dim != h.info.shape.head_dim || !pl->present || pl->scale_mode != h.scale_mode ||
            pl->delta_group != h.delta_group || h.info.scheme != KVL_CODEC_SCHEME_KVLOOM ||
            kvlc_cg(pl->chan_group, h.info.shape.n_kv_heads * h.info.shape.head_dim) != h.chan_group)
            return kvl_errorf(KVL_ERR_CODEC_PROFILE, "profile and chunk disagree on shape or level parameters");
        for (int32_t i = 0; i < 2 * L; i++)
            if (pl->q[i] != kvlc_get16(buf + KVLC_HDR_FIXED + 2 * (size_t)i))
                return kvl_errorf(KVL_ERR_CODEC_PROFILE, "profile and chunk disagree on bin counts");
    }
    return KVL_OK;
}

kvl_status kvl_codec_decode(const uint8_t *buf, size_t size, const kvl_codec_profile *profile, int32_t layer0,
                            int32_t n_layers, kvl_codec_dtype out_dtype, void *out, size_t out_cap,
                            int32_t n_threads) {
    hdr h;
    KVL_TRY(parse_header(buf, size, &h));
    int32_t L = h.info.shape.n_layers;
    if (!out) return kvl_errorf(KVL_ERR_INVALID_ARG, "out is NULL");
    if (out_dtype != KVL_CODEC_F32 && out_dtype != KVL_CODEC_BF16 && out_dtype != KVL_CODEC_F16)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown output dtype %d", (int)out_dtype);
    if (layer0 < 0 || layer0 >= L) return kvl_errorf(KVL_ERR_INVALID_ARG, "layer0 %d outside [0, %d)", layer0, L);
    if (n_layers <= 0) n_layers = L - layer0;
    if (n_layers > L - layer0) return kvl_errorf(KVL_ERR_INVALID_ARG, "layers [%d, %d) exceed %d", layer0, layer0 + n_layers, L);
    size_t need = h.info.n_elements / (size_t)L * (size_t)n_layers * dtype_size(out_dtype);
    if (out_cap < need) return kvl_errorf(KVL_ERR_INVALID_ARG, "output buffer of %zu bytes, %zu needed", out_cap, need);
    KVL_TRY(check_profile(&h, buf, profile));
    int n_sec = 2 * n_layers;
    int rotk = h.info.uses_profile && profile->key_rot;
    float *cs = rotk ? malloc((size_t)h.info.shape.n_tokens * h.info.shape.head_dim * sizeof *cs) : NULL;
    if (cs) kvlc_rope_table(profile->rope_theta, h.info.shape.head_dim, h.info.shape.n_tokens, cs);
    uint32_t *off = malloc(((size_t)2 * L + 1) * sizeof *off);
    sec_job j = {NULL, profile, NULL, 0, &h, cs, NULL, calloc((size_t)n_sec, sizeof(kvl_status)), calloc((size_t)n_sec, 256)};
    kvl_status st = KVL_OK;
    if (!off || !j.st || !j.msg || (rotk && !cs)) { st = KVL_ERR_NOMEM; goto done; }
    for (int32_t i = 0; i <= 2 * L; i++) off[i] = kvlc_get32(buf + KVLC_HDR_FIXED + 4 * (size_t)L + 4 * (size_t)i);
    int nt = clamp_threads(n_threads);
    if (nt > n_sec) nt = n_sec;
    worker w[64];
    for (int t = 0; t < nt; t++)
        w[t] = (worker){.j = &j, .tid = t, .nt = nt, .decode = 1, .buf = buf, .off = off, .layer0 = layer0,
                        .n_layers = n_layers, .out_dtype = out_dtype, .out = out};
    st = run_workers(w, nt, decode_worker, n_sec, &j);
done:
    free(off); free(j.st); free(j.msg); free(cs);
    return st;
}

/* ---------------------------------------------------------------- parallel-decode plans */

void kvl_codec_plan_init(kvl_codec_plan *p) { memset(p, 0, sizeof *p); }

void kvl_codec_plan_reset(kvl_codec_plan *p) {
    p->n_streams = p->n_sections = p->n_tables = p->n_cum = p->n_lut = p->n_scales = p->n_rope = 0;
    p->n_bytes = p->n_anchor = p->n_out = p->n_rot = 0;
    p->n_chunks = 0;
    p->profile = NULL;
}

void kvl_codec_plan_free(kvl_codec_plan *p) {
    if (!p) return;
    free(p->streams); free(p->sections); free(p->tables); free(p->cum); free(p->lut); free(p->scales); free(p->rope);
    memset(p, 0, sizeof *p);
}

/* grows *arr (elements of es bytes) to hold need elements */
static int plan_grow(void **arr, size_t *cap, size_t need, size_t es) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *q = realloc(*arr, nc * es);
    if (!q) return -1;
    *arr = q;
    *cap = nc;
    return 0;
}

static size_t level_store_cum(const kvl_codec_profile *pr, const kvlc_plevel *pl) {
    int32_t C = pr->n_kv_heads * pr->head_dim;
    int hd = pl->delta_group > 1;
    size_t n = 0;
    for (int32_t l = 0; l < pr->n_layers; l++)
        for (int kv = 0; kv < 2; kv++) n += (size_t)C * ((size_t)2 * pl->q[2 * l + kv] + 2 + (hd ? 4 * (size_t)pl->q[2 * l + kv] + 2 : 0));
    return n;
}

kvl_status kvl_codec_profile_stores(const kvl_codec_profile *prof, int32_t level, const uint32_t **cum, size_t *n_cum,
                                    const uint16_t **lut, size_t *n_lut) {
    if (!prof || !cum || !n_cum || !lut || !n_lut) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    if (level < 1 || level > KVL_CODEC_MAX_LEVEL || !prof->lv[level].present)
        return kvl_errorf(KVL_ERR_CODEC_LEVEL, "the profile has no level %d", level);
    const kvlc_plevel *pl = &prof->lv[level];
    size_t n_tab = (size_t)2 * prof->n_layers * prof->n_kv_heads * prof->head_dim * (pl->delta_group > 1 ? 2 : 1);
    *cum = pl->cum_store;
    *n_cum = level_store_cum(prof, pl);
    *lut = pl->lut_store;
    *n_lut = n_tab * 256;
    return KVL_OK;
}

kvl_status kvl_codec_plan_add(kvl_codec_plan *p, const uint8_t *buf, size_t size, const kvl_codec_profile *profile,
                              int32_t layer0, int32_t n_layers, const kvl_codec_place *place, size_t out_dtype_size) {
    if (!p || !place) return kvl_errorf(KVL_ERR_INVALID_ARG, "plan and place must not be NULL");
    if (out_dtype_size != 2 && out_dtype_size != 4) return kvl_errorf(KVL_ERR_INVALID_ARG, "output element size %zu", out_dtype_size);
    hdr h;
    KVL_TRY(parse_header(buf, size, &h));
    int32_t L = h.info.shape.n_layers;
    if (h.info.lossless) return kvl_errorf(KVL_ERR_CODEC_LEVEL, "lossless chunks are decoded by kvl_codec_decode");
    if (layer0 < 0 || layer0 >= L) return kvl_errorf(KVL_ERR_INVALID_ARG, "layer0 %d outside [0, %d)", layer0, L);
    if (n_layers <= 0) n_layers = L - layer0;
    if (n_layers > L - layer0) return kvl_errorf(KVL_ERR_INVALID_ARG, "layers [%d, %d) exceed %d", layer0, layer0 + n_layers, L);
    KVL_TRY(check_profile(&h, buf, profile));
    if (h.info.uses_profile && p->profile && p->profile != profile)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "a plan refers to one profile at most");
    const uint8_t *dir = buf + KVLC_HDR_FIXED;
    dec_ctx d = {&h, profile, NULL};
    /* only the bytes of the requested sections travel: [a0, a1) of the chunk */
    uint64_t r0 = kvlc_get32(dir + 4 * (size_t)L + 4 * (size_t)(2 * layer0));
    uint64_t r1 = kvlc_get32(dir + 4 * (size_t)L + 4 * (size_t)(2 * (layer0 + n_layers)));
    /* state to roll back to on error */
    size_t s0 = p->n_streams, x0 = p->n_sections, t0 = p->n_tables, c0_ = p->n_cum, u0 = p->n_lut, k0 = p->n_scales,
           r0_ = p->n_rope;
    uint64_t a0 = p->n_anchor, o0 = p->n_out, q0 = p->n_rot;
    kvl_status st = KVL_OK;
    /* one cos/sin table for the chunk's key sections when its profile rotates keys */
    int rotk = h.info.uses_profile && profile->key_rot;
    uint32_t rope_off = (uint32_t)p->n_rope;
    if (rotk) {
        size_t nr = (size_t)h.info.shape.n_tokens * (size_t)h.info.shape.head_dim;
        if (plan_grow((void **)&p->rope, &p->cap_rope, p->n_rope + nr, sizeof *p->rope)) return KVL_ERR_NOMEM;
        kvlc_rope_table(profile->rope_theta, h.info.shape.head_dim, h.info.shape.n_tokens, p->rope + p->n_rope);
        p->n_rope += nr;
    }
    /* the level's store offsets of the profile tables: table index order is kept by the store */
    const kvlc_plevel *pl = h.info.uses_profile ? &profile->lv[h.info.level] : NULL;
    for (int32_t i = 0; i < 2 * n_layers && st == KVL_OK; i++) {
        int l = layer0 + i / 2, kv = i % 2;
        uint32_t a = kvlc_get32(dir + 4 * (size_t)L + 4 * (size_t)(2 * l + kv));
        uint32_t b = kvlc_get32(dir + 4 * (size_t)L + 4 * (size_t)(2 * l + kv + 1));
        const uint8_t *s = buf + a;
        if (KVLC_SUM_BAD(kvlc_get32(s), kvlc_checksum(s + 4, b - a - 4))) {
            st = kvl_errorf(KVL_ERR_CHECKSUM, "layer %d %s section checksum mismatch", l, kv ? "v" : "k");
            break;
        }
        sec_parsed sp;
        st = parse_section(&d, l, kv, s + 4, b - a - 4, dir, &sp);
        if (st != KVL_OK) break;
        if (plan_grow((void **)&p->sections, &p->cap_sections, p->n_sections + 1, sizeof *p->sections) ||
            plan_grow((void **)&p->streams, &p->cap_streams, p->n_streams + (size_t)sp.n_streams, sizeof *p->streams) ||
            plan_grow((void **)&p->tables, &p->cap_tables, p->n_tables + (size_t)sp.n_ctx, sizeof *p->tables) ||
            plan_grow((void **)&p->cum, &p->cap_cum, p->n_cum + sp.n_cum, sizeof *p->cum) ||
            plan_grow((void **)&p->lut, &p->cap_lut, p->n_lut + (pl ? 0 : (size_t)sp.n_ctx * 256), sizeof *p->lut) ||
            plan_grow((void **)&p->scales, &p->cap_scales, p->n_scales + (size_t)sp.n_sc, sizeof *p->scales)) {
            sec_parsed_free(&sp);
            st = KVL_ERR_NOMEM;
            break;
        }
        uint32_t sec = (uint32_t)p->n_sections++;
        int64_t rel = ((int64_t)(l - layer0)) * place->layer_stride + (int64_t)kv * place->kv_stride;
        p->sections[sec] = (kvl_codec_plan_section){
            .T = sp.T, .C = sp.C, .Q = sp.Q, .sm = sp.sm, .delta_group = h.delta_group,
            .ctx_mode = sp.m.mode == KVLC_TABLES_CHUNK_LAYER ? 1 : 0, .tab_base = (uint32_t)p->n_tables,
            .scale_base = (uint32_t)p->n_scales, .chunk = p->n_chunks, .rot = (rotk && kv == 0) ? profile->key_rot : 0,
            .out = place->out + (uint64_t)(rel * (int64_t)out_dtype_size), .ld = place->token_stride,
            .rot_off = (rotk && kv == 0) ? p->n_rot : 0, .D = h.info.shape.head_dim, .rope_off = rope_off};
        if (rotk && kv == 0) p->n_rot += (uint64_t)sp.T * (uint64_t)sp.C;
        memcpy(p->scales + p->n_scales, sp.scale, (size_t)sp.n_sc * sizeof *p->scales);
        p->n_scales += (size_t)sp.n_sc;
        for (int32_t x = 0; x < sp.n_ctx; x++) {
            const kvlc_table *tb = &sp.tabs[x];
            kvl_codec_plan_table *pt = &p->tables[p->n_tables + (size_t)x];
            *pt = (kvl_codec_plan_table){KVL_CODEC_PLAN_EMPTY, 0, tb->amax, tb->pb, 0, 0};
            if (!tb->cum) continue;
            if (pl) {
                pt->src = h.info.level;
                pt->cum_off = (uint32_t)(tb->cum - pl->cum_store);
                pt->lut_off = (uint32_t)(tb->lut - pl->lut_store);
            } else {
                pt->cum_off = (uint32_t)(p->n_cum + (size_t)(tb->cum - sp.cum_store));
                pt->lut_off = (uint32_t)(p->n_lut + (size_t)x * 256);
            }
        }
        p->n_tables += (size_t)sp.n_ctx;
        if (!pl) {
            memcpy(p->cum + p->n_cum, sp.cum_store, sp.n_cum * sizeof *p->cum);
            memcpy(p->lut + p->n_lut, sp.lut_store, (size_t)sp.n_ctx * 256 * sizeof *p->lut);
            p->n_cum += sp.n_cum;
            p->n_lut += (size_t)sp.n_ctx * 256;
        }
        uint64_t off = p->n_bytes + (uint64_t)(sp.data - buf) - r0;
        for (int32_t g = 0; g < sp.n_streams; g++) {
            uint32_t len = kvlc_get32(sp.sizes + 4 * (size_t)g);
            int32_t c0 = g * sp.cg, c1 = c0 + sp.cg < sp.C ? c0 + sp.cg : sp.C;
            p->streams[p->n_streams++] = (kvl_codec_plan_stream){off, len, sec, c0, c1, (uint32_t)p->n_anchor, 0};
            p->n_anchor += (uint64_t)(c1 - c0);
            off += len;
        }
        p->n_out += (uint64_t)sp.T * (uint64_t)sp.C;
        sec_parsed_free(&sp);
        if (p->n_anchor > 0xffffffffu || p->n_cum > 0xffffffffu || p->n_lut > 0xffffffffu || p->n_scales > 0xffffffffu ||
            p->n_tables > 0xffffffffu || p->n_rope > 0xffffffffu)
            st = kvl_errorf(KVL_ERR_LIMIT, "decode plan exceeds 32-bit indices");
    }
    if (st != KVL_OK) {
        p->n_streams = s0; p->n_sections = x0; p->n_tables = t0; p->n_cum = c0_; p->n_lut = u0; p->n_scales = k0;
        p->n_anchor = a0; p->n_out = o0; p->n_rope = r0_; p->n_rot = q0;
        return st;
    }
    if (pl) p->profile = profile;
    p->n_bytes += r1 - r0;
    p->n_chunks++;
    return KVL_OK;
}

kvl_status kvl_codec_plan_append(kvl_codec_plan *d, const kvl_codec_plan *s) {
    if (!d || !s) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL plan");
    if (d->profile && s->profile && d->profile != s->profile) return kvl_errorf(KVL_ERR_INVALID_ARG, "plans of two profiles");
    if (plan_grow((void **)&d->sections, &d->cap_sections, d->n_sections + s->n_sections, sizeof *d->sections) ||
        plan_grow((void **)&d->streams, &d->cap_streams, d->n_streams + s->n_streams, sizeof *d->streams) ||
        plan_grow((void **)&d->tables, &d->cap_tables, d->n_tables + s->n_tables, sizeof *d->tables) ||
        plan_grow((void **)&d->cum, &d->cap_cum, d->n_cum + s->n_cum, sizeof *d->cum) ||
        plan_grow((void **)&d->lut, &d->cap_lut, d->n_lut + s->n_lut, sizeof *d->lut) ||
        plan_grow((void **)&d->scales, &d->cap_scales, d->n_scales + s->n_scales, sizeof *d->scales) ||
        plan_grow((void **)&d->rope, &d->cap_rope, d->n_rope + s->n_rope, sizeof *d->rope))
        return KVL_ERR_NOMEM;
    if (d->n_sections + s->n_sections > 0xffffffffu || d->n_tables + s->n_tables > 0xffffffffu ||
        d->n_cum + s->n_cum > 0xffffffffu || d->n_lut + s->n_lut > 0xffffffffu ||
        d->n_scales + s->n_scales > 0xffffffffu || d->n_anchor + s->n_anchor > 0xffffffffu ||
        d->n_rope + s->n_rope > 0xffffffffu)
        return kvl_errorf(KVL_ERR_LIMIT, "decode plan exceeds 32-bit indices");
    for (size_t i = 0; i < s->n_streams; i++) {
        kvl_codec_plan_stream x = s->streams[i];
        x.byte_off += d->n_bytes;
        x.sec += (uint32_t)d->n_sections;
        x.anchor_off += (uint32_t)d->n_anchor;
        d->streams[d->n_streams + i] = x;
    }
    for (size_t i = 0; i < s->n_sections; i++) {
        kvl_codec_plan_section x = s->sections[i];
        x.tab_base += (uint32_t)d->n_tables;
        x.scale_base += (uint32_t)d->n_scales;
        x.chunk += d->n_chunks;
        if (x.rot) {
            x.rot_off += d->n_rot;
            x.rope_off += (uint32_t)d->n_rope;
        }
        d->sections[d->n_sections + i] = x;
    }
    for (size_t i = 0; i < s->n_tables; i++) {
        kvl_codec_plan_table x = s->tables[i];
        if (x.src == 0 && x.cum_off != KVL_CODEC_PLAN_EMPTY) {
            x.cum_off += (uint32_t)d->n_cum;
            x.lut_off += (uint32_t)d->n_lut;
        }
        d->tables[d->n_tables + i] = x;
    }
    if (s->n_cum) memcpy(d->cum + d->n_cum, s->cum, s->n_cum * sizeof *d->cum);
    if (s->n_lut) memcpy(d->lut + d->n_lut, s->lut, s->n_lut * sizeof *d->lut);
    if (s->n_scales) memcpy(d->scales + d->n_scales, s->scales, s->n_scales * sizeof *d->scales);
    if (s->n_rope) memcpy(d->rope + d->n_rope, s->rope, s->n_rope * sizeof *d->rope);
    d->n_streams += s->n_streams;
    d->n_sections += s->n_sections;
    d->n_tables += s->n_tables;
    d->n_cum += s->n_cum;
    d->n_lut += s->n_lut;
    d->n_scales += s->n_scales;
    d->n_rope += s->n_rope;
    d->n_rot += s->n_rot;
    d->n_bytes += s->n_bytes;
    d->n_anchor += s->n_anchor;
    d->n_out += s->n_out;
    d->n_chunks += s->n_chunks;
    if (s->profile) d->profile = s->profile;
    return KVL_OK;
}

kvl_status kvl_codec_plan_range(const uint8_t *buf, size_t size, int32_t layer0, int32_t n_layers, uint64_t *off,
                                uint64_t *len) {
    if (!off || !len) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    hdr h;
    KVL_TRY(parse_header(buf, size, &h));
    int32_t L = h.info.shape.n_layers;
    if (layer0 < 0 || layer0 >= L) return kvl_errorf(KVL_ERR_INVALID_ARG, "layer0 %d outside [0, %d)", layer0, L);
    if (n_layers <= 0) n_layers = L - layer0;
    if (n_layers > L - layer0) return kvl_errorf(KVL_ERR_INVALID_ARG, "layers [%d, %d) exceed %d", layer0, layer0 + n_layers, L);
    const uint8_t *offs = buf + KVLC_HDR_FIXED + 4 * (size_t)L;
    *off = kvlc_get32(offs + 4 * (size_t)(2 * layer0));
    *len = kvlc_get32(offs + 4 * (size_t)(2 * (layer0 + n_layers))) - *off;
    return KVL_OK;
}

kvl_status kvl_codec_simulate(const kvl_codec_shape *shape, const float *kv, int32_t level, const uint16_t *bins,
                              int32_t key_rotation, float rope_theta, float *out) {
    if (!kv || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kv and out must not be NULL");
    KVL_TRY(check_shape(shape));
    if (level < 1 || level > KVL_CODEC_MAX_LEVEL) return kvl_errorf(KVL_ERR_CODEC_LEVEL, "level %d is not a lossy level", level);
    if (key_rotation < KVL_CODEC_KEYROT_NONE || key_rotation > KVL_CODEC_KEYROT_INTERLEAVED ||
        (key_rotation && (!(rope_theta > 0) || !isfinite(rope_theta) || shape->head_dim % 2 != 0)))
        return kvl_errorf(KVL_ERR_INVALID_ARG, "bad key rotation %d (RoPE base %g, head_dim %d)", key_rotation,
                          (double)rope_theta, shape->head_dim);
    kvlc_params p;
    KVL_TRY(kvlc_params_get(level, KVL_CODEC_SCHEME_KVLOOM, shape->n_layers, &p));
    int32_t L = shape->n_layers, T = shape->n_tokens, H = shape->n_kv_heads, D = shape->head_dim, C = H * D;
    size_t n = (size_t)T * C;
    kvl_status st = KVL_OK;
    for (int32_t i = 0; i < 2 * L && bins; i++)
        if (bins[i] < 1 || bins[i] > KVLC_MAX_Q) st = kvl_errorf(KVL_ERR_INVALID_ARG, "bins[%d] = %u outside [1, %d]", i, bins[i], KVLC_MAX_Q);
    if (st == KVL_OK && bins) memcpy(p.q, bins, (size_t)2 * L * sizeof *p.q);
    int16_t *q = malloc(n * sizeof *q);
    uint16_t *sc = malloc((size_t)(T > 2 * C ? T : 2 * C) * sizeof *sc);
    float *cs = key_rotation ? malloc((size_t)T * D * sizeof *cs) : NULL;
    if (st == KVL_OK && (!q || !sc || (key_rotation && !cs))) st = KVL_ERR_NOMEM;
    if (st == KVL_OK && cs) kvlc_rope_table(rope_theta, D, T, cs);
    for (int32_t i = 0; st == KVL_OK && i < 2 * L; i++) {
        int kvi = i % 2, sm = kvlc_scale_of(p.scale_mode, kvi);
        float *x = out + (size_t)i * n;
        memcpy(x, kv + (size_t)i * n, n * sizeof *x);
        if (kvi == 0 && cs) kvlc_rotate_keys(x, T, H, D, key_rotation, cs, 1);
        if (kvlc_quantize_section(x, T, C, sm, p.q[i], p.deadzone, sc, q) != 0) {
            st = kvl_errorf(KVL_ERR_RANGE, "layer %d %s: a value is not finite or its scale overflows", i / 2, kvi ? "v" : "k");
            break;
        }
        /* the decoder's reconstruction (decode_quant_section), value for value */
        for (int32_t t = 0; t < T; t++)
            for (int32_t c = 0; c < C; c++) {
                size_t k = (size_t)t * C + c;
                if (sm == KVLC_SCALE_CHANNEL_OFFSET)
                    x[k] = (float)(q[k] + (int32_t)(int16_t)sc[C + c]) * kvl_bf16_to_f32(sc[c]);
                else
                    x[k] = (float)q[k] * kvl_bf16_to_f32(sc[sm == KVLC_SCALE_TOKEN ? t : sm == KVLC_SCALE_CHANNEL ? c : 0]);
            }
        if (kvi == 0 && cs) kvlc_rotate_keys(x, T, H, D, key_rotation, cs, 0);
    }
    free(q);
    free(sc);
    free(cs);
    kvlc_params_free(&p);
    return st;
}
