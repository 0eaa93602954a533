/* codec_common.c - level parameters, table normalisation, the quantiser, float conversions,
 * checksums and byte buffers shared by the encoder, decoder and profile builder. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "codec_impl.h"

/* Lossy levels of the KVLOOM scheme: scale granularity and the built-in bins used without a
 * profile. A profile built by `kvloom codec-profile` replaces the bins with ones searched per model
 * (per layer and k|v) to meet each level's KL target. Chosen by measurement on the shared models
 * (docs/BENCHMARKS.md, "Codec"). */
typedef struct level_def {
    int scale_mode, delta_group, chan_group;
    int qk_hi, qk_lo, qv_hi, qv_lo; /* max |symbol| in early / later layers */
    double k_early, v_early;        /* fraction of layers (rounded up) counted as early */
    int scale_v;                    /* scale granularity of values; -1: as keys */
    int n_list[2], list[2][64];     /* KVL_CODEC_TUNE only: explicit per-layer max symbols */
    double deadzone;                /* encoder rounding bias toward 0, in steps */
} level_def;

static const level_def KVLOOM_LEVELS[KVL_CODEC_MAX_LEVEL + 1] = {
    {0},
    /* keys: per-channel scale + integer offset; values: one scale per (layer, v); same bins in
     * every layer (measured: no layer band is consistently more sensitive across the models) */
    {KVLC_SCALE_CHANNEL_OFFSET, 0, 0, 16, 16, 8, 8, 0, 0, KVLC_SCALE_LAYER, {0, 0}, {{0}}, 0},
    {KVLC_SCALE_CHANNEL_OFFSET, 0, 0, 8, 8, 5, 5, 0, 0, KVLC_SCALE_LAYER, {0, 0}, {{0}}, 0},
    {KVLC_SCALE_CHANNEL_OFFSET, 0, 0, 5, 5, 3, 3, 0, 0, KVLC_SCALE_LAYER, {0, 0}, {{0}}, 0},
    {KVLC_SCALE_CHANNEL_OFFSET, 0, 0, 3, 3, 2, 2, 0, 0, KVLC_SCALE_LAYER, {0, 0}, {{0}}, 0},
};

/* LMCache's shipped CacheGen: keys of layers 0-9 and values of layers 0-1 get 32 bins, the rest
 * 16; one scale per (layer, k|v, token); CDFs per (layer, k|v, channel) rebuilt per chunk. Our
 * levels scale its bin counts: 1 = x2, 2 = x1 (LMCache's own setting), 3 = x0.5, 4 = x0.25. */
static const int LMCACHE_BINS_MUL4[KVL_CODEC_MAX_LEVEL + 1] = {0, 8, 4, 2, 1};

static int parse_tune(const char *s, level_def *d, int *pb, int *tables) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int a, b;
        double f;
        if (!strncmp(tok, "qkl=", 4) || !strncmp(tok, "qvl=", 4)) {
            int w = tok[1] == 'v';
            d->n_list[w] = 0;
            for (char *c = tok + 4; *c && d->n_list[w] < 64;) {
                d->list[w][d->n_list[w]++] = (int)strtol(c, &c, 10);
                if (*c == ':') c++;
                else if (*c) return -1;
            }
        } else if (!strcmp(tok, "vscale=token")) d->scale_v = KVLC_SCALE_TOKEN;
        else if (!strcmp(tok, "vscale=channel")) d->scale_v = KVLC_SCALE_CHANNEL;
        else if (!strcmp(tok, "vscale=layer")) d->scale_v = KVLC_SCALE_LAYER;
        else if (!strcmp(tok, "vscale=offset")) d->scale_v = KVLC_SCALE_CHANNEL_OFFSET;
        else if (sscanf(tok, "qk=%d/%d", &a, &b) == 2) d->qk_hi = a, d->qk_lo = b;
        else if (sscanf(tok, "qv=%d/%d", &a, &b) == 2) d->qv_hi = a, d->qv_lo = b;
        else if (sscanf(tok, "ke=%lf", &f) == 1) d->k_early = f;
        else if (sscanf(tok, "ve=%lf", &f) == 1) d->v_early = f;
        else if (sscanf(tok, "delta=%d", &a) == 1) d->delta_group = a;
        else if (sscanf(tok, "cg=%d", &a) == 1) d->chan_group = a;
        else if (sscanf(tok, "pb=%d", &a) == 1) *pb = a;
        else if (sscanf(tok, "dz=%lf", &f) == 1) d->deadzone = f;
        else if (!strcmp(tok, "scale=token")) d->scale_mode = KVLC_SCALE_TOKEN;
        else if (!strcmp(tok, "scale=channel")) d->scale_mode = KVLC_SCALE_CHANNEL;
        else if (!strcmp(tok, "scale=layer")) d->scale_mode = KVLC_SCALE_LAYER;
        else if (!strcmp(tok, "scale=offset")) d->scale_mode = KVLC_SCALE_CHANNEL_OFFSET;
        else if (!strcmp(tok, "tables=layer")) *tables = KVLC_TABLES_CHUNK_LAYER;
        else if (!strcmp(tok, "tables=channel")) *tables = KVLC_TABLES_CHUNK_CHANNEL;
        else return -1;
    }
    return 0;
}

kvl_status kvlc_params_get(int level, int scheme, int n_layers, kvlc_params *p) {
    memset(p, 0, sizeof *p);
    if (level < 0 || level > KVL_CODEC_MAX_LEVEL)
        return kvl_errorf(KVL_ERR_CODEC_LEVEL, "level %d outside [0, %d]", level, KVL_CODEC_MAX_LEVEL);
    if (scheme != KVL_CODEC_SCHEME_KVLOOM && scheme != KVL_CODEC_SCHEME_LMCACHE)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown codec scheme %d", scheme);
    if (n_layers < 1 || n_layers > KVLC_MAX_LAYERS)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "%d layers outside [1, %d]", n_layers, KVLC_MAX_LAYERS);
    p->level = level;
    p->scheme = scheme;
    p->n_layers = n_layers;
    p->q = calloc((size_t)n_layers * 2, sizeof *p->q);
    if (!p->q) return KVL_ERR_NOMEM;
    if (level == 0) {
        p->lossless = 1;
        return KVL_OK;
    }
    if (scheme == KVL_CODEC_SCHEME_LMCACHE) {
        p->scale_mode = KVLC_SCALE_TOKEN | (KVLC_SCALE_TOKEN << 4);
        p->chan_group = 32;
        p->chunk_tables = KVLC_TABLES_CHUNK_CHANNEL;
        p->chunk_pb = 12;
        for (int l = 0; l < n_layers; l++) {
            int kb = l < 10 ? 32 : 16, vb = l < 2 ? 32 : 16;
            p->q[2 * l] = (uint16_t)(kb * LMCACHE_BINS_MUL4[level] / 8);
            p->q[2 * l + 1] = (uint16_t)(vb * LMCACHE_BINS_MUL4[level] / 8);
        }
        return KVL_OK;
    }
    level_def d = KVLOOM_LEVELS[level];
    int pb = 12, tables = KVLC_TABLES_CHUNK_LAYER;
    const char *tune = getenv("KVL_CODEC_TUNE");
    if (tune && tune[0] && parse_tune(tune, &d, &pb, &tables) != 0) {
        kvlc_params_free(p);
        return kvl_errorf(KVL_ERR_INVALID_ARG, "cannot parse KVL_CODEC_TUNE='%s'", tune);
    }
    if (d.qk_hi < 1 || d.qk_lo < 1 || d.qv_hi < 1 || d.qv_lo < 1 || d.qk_hi > KVLC_MAX_Q ||
        d.qk_lo > KVLC_MAX_Q || d.qv_hi > KVLC_MAX_Q || d.qv_lo > KVLC_MAX_Q || d.chan_group < 0 ||
        d.chan_group > KVLC_MAX_CHANNELS || d.delta_group < 0 || d.delta_group > 255 || pb < KVLC_MIN_PB ||
        pb > KVLC_MAX_PB || !(d.deadzone >= 0 && d.deadzone < 0.5)) {
        kvlc_params_free(p);
        return kvl_errorf(KVL_ERR_INVALID_ARG, "level %d parameters out of range", level);
    }
    p->scale_mode = d.scale_mode | ((d.scale_v < 0 ? d.scale_mode : d.scale_v) << 4);
    p->delta_group = d.delta_group > 1 ? d.delta_group : 0;
    p->chan_group = d.chan_group;
    p->chunk_tables = tables;
    p->chunk_pb = pb;
    p->deadzone = (float)d.deadzone;
    int ke = (int)ceil(d.k_early * n_layers - 1e-9), ve = (int)ceil(d.v_early * n_layers - 1e-9);
    for (int l = 0; l < n_layers; l++) {
        p->q[2 * l] = (uint16_t)(l < ke ? d.qk_hi : d.qk_lo);
        p->q[2 * l + 1] = (uint16_t)(l < ve ? d.qv_hi : d.qv_lo);
        for (int w = 0; w < 2; w++)
            if (d.n_list[w]) {
                int v = d.list[w][l < d.n_list[w] ? l : d.n_list[w] - 1];
                if (v < 1 || v > KVLC_MAX_Q) {
                    kvlc_params_free(p);
                    return kvl_errorf(KVL_ERR_INVALID_ARG, "KVL_CODEC_TUNE bin count %d out of range", v);
                }
                p->q[2 * l + w] = (uint16_t)v;
            }
    }
    return KVL_OK;
}

void kvlc_params_free(kvlc_params *p) {
    if (!p) return;
    free(p->q);
    p->q = NULL;
}

double kvl_codec_level_error_bound(int32_t level, int32_t scheme, int32_t n_layers, int32_t layer, int32_t kv) {
    kvlc_params p;
    if (layer < 0 || layer >= n_layers || kv < 0 || kv > 1) return 0;
    if (kvlc_params_get(level, scheme, n_layers, &p) != KVL_OK) {
        kvl_clear_error();
        return 0;
    }
    /* half a step; with an integer offset the offset's own rounding can add a whole step */
    double steps = kvlc_scale_of(p.scale_mode, kv) == KVLC_SCALE_CHANNEL_OFFSET ? 1.5 : 0.5;
    double b = p.lossless ? 0 : steps / p.q[2 * layer + kv] * (1.0 + 1.0 / 64) + 1e-6;
    kvlc_params_free(&p);
    return b;
}

int kvlc_normalize(const uint64_t *counts, int32_t A, int pb, int all_nonzero, uint32_t *freq) {
    const uint64_t M = 1ull << pb;
    uint64_t total = 0, nnz = 0;
    for (int32_t s = 0; s < A; s++) {
        total += counts[s];
        if (counts[s] || all_nonzero) nnz++;
    }
    if (nnz == 0 || nnz > M) return -1;
    if (total == 0) { /* all_nonzero without data: uniform */
        for (int32_t s = 0; s < A; s++) freq[s] = (uint32_t)(M / (uint64_t)A);
        freq[A / 2] += (uint32_t)(M % (uint64_t)A);
        return 0;
    }
    int64_t sum = 0;
    int32_t best = 0;
    for (int32_t s = 0; s < A; s++) {
        if (counts[s] > counts[best]) best = s;
        uint64_t f = counts[s] ? (counts[s] * M + total / 2) / total : 0;
        if (f == 0 && (counts[s] || all_nonzero)) f = 1;
        freq[s] = (uint32_t)f;
        sum += (int64_t)f;
    }
    int64_t diff = (int64_t)M - sum;
    if (diff > 0) freq[best] += (uint32_t)diff;
    while (diff < 0) { /* take the excess from the largest frequencies, never below 1 */
        int32_t m = 0;
        for (int32_t s = 1; s < A; s++)
            if (freq[s] > freq[m]) m = s;
        int64_t take = (int64_t)freq[m] - 1;
        if (take > -diff) take = -diff;
        if (take <= 0) return -1;
        freq[m] -= (uint32_t)take;
        diff += take;
    }
    return 0;
}

/* round u to an integer, ties and fractions up to 0.5 + dz toward zero */
static inline float round_dz(float u, float dz) {
    if (dz <= 0) return nearbyintf(u);
    float a = floorf(fabsf(u) + 0.5f - dz);
    if (a < 0) a = 0;
    return u < 0 ? -a : a;
}

void kvlc_table_lut(kvlc_table *t, uint16_t *lut) {
    int32_t A = 2 * t->amax + 1, s = 0;
    for (uint32_t k = 0; k < 256; k++) {
        uint32_t slot = k << (t->pb - 8);
        while (s < A - 1 && t->cum[s + 1] <= slot) s++;
        lut[k] = (uint16_t)s;
    }
    t->lut = lut;
}

static inline int16_t quant1(float x, float s, int Q, float dz) {
    if (!(s > 0)) return 0;
    float r = round_dz(x / s, dz);
    if (r > (float)Q) r = (float)Q;
    if (r < (float)-Q) r = (float)-Q;
    return (int16_t)r;
}

/* bf16 scale for a group whose largest magnitude is m; -1 if it is not finite */
static inline int make_scale(float m, int Q, uint16_t *out) {
    uint16_t h = kvl_f32_to_bf16(m / (float)Q);
    if (!isfinite(kvl_bf16_to_f32(h))) return -1;
    *out = h;
    return 0;
}

int kvlc_quantize_section(const float *x, int32_t T, int32_t C, int scale_mode, int Q, float dz, uint16_t *sc,
                          int16_t *q) {
    size_t n = (size_t)T * (size_t)C;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return -1;
    if (scale_mode == KVLC_SCALE_TOKEN) {
        for (int32_t t = 0; t < T; t++) {
            const float *r = x + (size_t)t * C;
            float m = 0;
            for (int32_t c = 0; c < C; c++) m = fmaxf(m, fabsf(r[c]));
            if (make_scale(m, Q, &sc[t])) return -1;
            float s = kvl_bf16_to_f32(sc[t]);
            for (int32_t c = 0; c < C; c++) q[(size_t)t * C + c] = quant1(r[c], s, Q, dz);
        }
    } else if (scale_mode == KVLC_SCALE_CHANNEL) {
        for (int32_t c = 0; c < C; c++) {
            float m = 0;
            for (int32_t t = 0; t < T; t++) m = fmaxf(m, fabsf(x[(size_t)t * C + c]));
            if (make_scale(m, Q, &sc[c])) return -1;
            float s = kvl_bf16_to_f32(sc[c]);
            for (int32_t t = 0; t < T; t++) q[(size_t)t * C + c] = quant1(x[(size_t)t * C + c], s, Q, dz);
        }
    } else if (scale_mode == KVLC_SCALE_CHANNEL_OFFSET) {
        float rmax = 0; /* the widest channel range of the section */
        for (int32_t c = 0; c < C; c++) {
            float mn = x[c], mx = x[c];
            for (int32_t t = 1; t < T; t++) {
                mn = fminf(mn, x[(size_t)t * C + c]);
                mx = fmaxf(mx, x[(size_t)t * C + c]);
            }
            rmax = fmaxf(rmax, mx - mn);
        }
        for (int32_t c = 0; c < C; c++) {
            float mn = x[c], mx = x[c];
            for (int32_t t = 1; t < T; t++) {
                mn = fminf(mn, x[(size_t)t * C + c]);
                mx = fmaxf(mx, x[(size_t)t * C + c]);
            }
            /* The step of a channel of range r is sqrt(r * rmax) / 2Q: between the channel's own
             * range (every channel gets all 2Q + 1 levels) and one step for the whole section.
             * Narrow key channels matter about as much to q.k as wide ones, so giving them the
             * same number of levels over-spends bits on them; measured on the calibration text of
             * three models: 1-3% fewer bits at the same KL than r / 2Q, and r^0 (one step) loses
             * (docs/BENCHMARKS.md, "Codec"). Never so fine that the integer offset leaves int16. */
            float a = fmaxf(fabsf(mn), fabsf(mx));
            float r = sqrtf((mx - mn) * rmax);
            if (!(r >= mx - mn)) r = mx - mn; /* rounding (or an infinite range) */
            float step = fmaxf(r / (float)(2 * Q), a / (float)(30000 - Q));
            uint16_t h = kvl_f32_to_bf16(step);
            if (!isfinite(kvl_bf16_to_f32(h))) return -1;
            float s = kvl_bf16_to_f32(h);
            int32_t z = s > 0 ? (int32_t)nearbyintf(((mx + mn) * 0.5f) / s) : 0;
            if (z > 32767 || z < -32767) return -1;
            sc[c] = h;
            sc[C + c] = (uint16_t)(int16_t)z;
            for (int32_t t = 0; t < T; t++) {
                size_t i = (size_t)t * C + c;
                float u = x[i] / s;
                float r = !(s > 0) ? 0 : dz > 0 ? round_dz(u - (float)z, dz) : nearbyintf(u) - (float)z;
                q[i] = (int16_t)(r > (float)Q ? Q : r < (float)-Q ? -Q : r);
            }
        }
    } else {
        float m = 0;
        for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(x[i]));
        if (make_scale(m, Q, &sc[0])) return -1;
        float s = kvl_bf16_to_f32(sc[0]);
        for (size_t i = 0; i < n; i++) q[i] = quant1(x[i], s, Q, dz);
    }
    return 0;
}

uint32_t kvlc_checksum(const void *p, size_t n) { return (uint32_t)XXH3_64bits(p, n); }

int kvlc_buf_reserve(kvlc_buf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int kvlc_buf_put(kvlc_buf *b, const void *src, size_t n) {
    if (kvlc_buf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
    return 0;
}

int kvlc_buf_varint(kvlc_buf *b, uint32_t v) {
    uint8_t t[5];
    int k = 0;
    do {
        t[k] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v) t[k] |= 0x80;
        k++;
    } while (v);
    return kvlc_buf_put(b, t, (size_t)k);
}

void kvlc_rope_table(float theta, int32_t D, int32_t T, float *cs) {
    int32_t half = D / 2;
    float *sn = cs + (size_t)T * half;
    for (int32_t i = 0; i < half; i++) {
        double w = pow((double)theta, -(double)(2 * i) / (double)D);
        for (int32_t t = 0; t < T; t++) {
            double a = (double)t * w;
            cs[(size_t)t * half + i] = (float)cos(a);
            sn[(size_t)t * half + i] = (float)sin(a);
        }
    }
}

void kvlc_rotate_keys(float *x, int32_t T, int32_t H, int32_t D, int style, const float *cs, int inverse) {
    int32_t half = D / 2, C = H * D;
    const float *sn = cs + (size_t)T * half;
    for (int32_t t = 0; t < T; t++)
        for (int32_t h = 0; h < H; h++) {
            float *r = x + (size_t)t * C + (size_t)h * D;
            for (int32_t i = 0; i < half; i++) {
                float c = cs[(size_t)t * half + i], s = sn[(size_t)t * half + i];
                if (inverse) s = -s;
                float *a = style == KVL_CODEC_KEYROT_INTERLEAVED ? r + 2 * i : r + i;
                float *b = style == KVL_CODEC_KEYROT_INTERLEAVED ? r + 2 * i + 1 : r + i + half;
                float ac = *a * c, bs = *b * s, as = *a * s, bc = *b * c;
                *a = ac - bs;
                *b = as + bc;
            }
        }
}
