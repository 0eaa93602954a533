/* codec_profile.c - per-model probability profiles: building from calibration KV, the KVLP file
 * format (docs/codec-format.md), parsing with full validation. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include "codec_impl.h"

#define PROFILE_ZSTD_LEVEL 9
#define PROFILE_MAX_RAW (1u << 30)

/* Table layout of one level: for (l, kv, c, d) the offset of its first symbol in a flat array
 * where table t holds A(t) + extra entries (extra = 0 for counts, 1 for cum arrays). */
static size_t level_entries(int32_t L, int32_t C, const uint16_t *q, int has_delta, int extra) {
    size_t n = 0;
    for (int32_t i = 0; i < 2 * L; i++)
        n += (size_t)C * ((size_t)(2 * q[i] + 1 + extra) + (has_delta ? (size_t)(4 * q[i] + 1 + extra) : 0));
    return n;
}

struct kvl_codec_profile_builder {
    int32_t L, H, D, C;
    int32_t key_rot;
    float rope_theta;
    uint8_t fp[32];
    uint64_t tokens;
    kvlc_params p[KVL_CODEC_MAX_LEVEL + 1];
    uint64_t *counts[KVL_CODEC_MAX_LEVEL + 1];
    size_t *sec_off[KVL_CODEC_MAX_LEVEL + 1]; /* [2L] */
};

void kvl_codec_profile_builder_free(kvl_codec_profile_builder *b) {
    if (!b) return;
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL; lv++) {
        kvlc_params_free(&b->p[lv]);
        free(b->counts[lv]);
        free(b->sec_off[lv]);
    }
    free(b);
}

kvl_status kvl_codec_profile_builder_create(const kvl_codec_shape *shape, const uint8_t fingerprint[32],
                                            kvl_codec_profile_builder **out) {
    if (!shape || !fingerprint || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    if (shape->n_layers < 1 || shape->n_layers > KVLC_MAX_LAYERS || shape->n_kv_heads < 1 || shape->head_dim < 1 ||
        shape->n_kv_heads > 65535 || shape->head_dim > 65535 ||
        (int64_t)shape->n_kv_heads * shape->head_dim > KVLC_MAX_CHANNELS)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "KV shape out of range");
    kvl_codec_profile_builder *b = calloc(1, sizeof *b);
    if (!b) return KVL_ERR_NOMEM;
    b->L = shape->n_layers;
    b->H = shape->n_kv_heads;
    b->D = shape->head_dim;
    b->C = b->H * b->D;
    memcpy(b->fp, fingerprint, 32);
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL; lv++) {
        kvl_status st = kvlc_params_get(lv, KVL_CODEC_SCHEME_KVLOOM, b->L, &b->p[lv]);
        if (st != KVL_OK) {
            kvl_codec_profile_builder_free(b);
            return st;
        }
        int hd = b->p[lv].delta_group > 1;
        b->counts[lv] = calloc(level_entries(b->L, b->C, b->p[lv].q, hd, 0), sizeof(uint64_t));
        b->sec_off[lv] = malloc((size_t)2 * b->L * sizeof(size_t));
        if (!b->counts[lv] || !b->sec_off[lv]) {
            kvl_codec_profile_builder_free(b);
            return KVL_ERR_NOMEM;
        }
        size_t off = 0;
        for (int32_t i = 0; i < 2 * b->L; i++) {
            b->sec_off[lv][i] = off;
            int Q = b->p[lv].q[i];
            off += (size_t)b->C * ((size_t)(2 * Q + 1) + (hd ? (size_t)(4 * Q + 1) : 0));
        }
    }
    *out = b;
    return KVL_OK;
}

kvl_status kvl_codec_profile_builder_set_bins(kvl_codec_profile_builder *b, int32_t level, const uint16_t *bins) {
    if (!b || !bins) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    if (level < 1 || level > KVL_CODEC_MAX_LEVEL) return kvl_errorf(KVL_ERR_CODEC_LEVEL, "level %d is not a lossy level", level);
    if (b->tokens) return kvl_errorf(KVL_ERR_INVALID_ARG, "bins must be set before calibration chunks are added");
    for (int32_t i = 0; i < 2 * b->L; i++)
        if (bins[i] < 1 || bins[i] > KVLC_MAX_Q) return kvl_errorf(KVL_ERR_INVALID_ARG, "bins[%d] = %u outside [1, %d]", i, bins[i], KVLC_MAX_Q);
    int hd = b->p[level].delta_group > 1;
    uint64_t *cnt = calloc(level_entries(b->L, b->C, bins, hd, 0), sizeof(uint64_t));
    if (!cnt) return KVL_ERR_NOMEM;
    free(b->counts[level]);
    b->counts[level] = cnt;
    memcpy(b->p[level].q, bins, (size_t)2 * b->L * sizeof *bins);
    size_t off = 0;
    for (int32_t i = 0; i < 2 * b->L; i++) {
        b->sec_off[level][i] = off;
        off += (size_t)b->C * ((size_t)(2 * bins[i] + 1) + (hd ? (size_t)(4 * bins[i] + 1) : 0));
    }
    return KVL_OK;
}

kvl_status kvl_codec_profile_builder_set_key_rotation(kvl_codec_profile_builder *b, int32_t rotation, float rope_theta) {
    if (!b) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    if (b->tokens) return kvl_errorf(KVL_ERR_INVALID_ARG, "the key rotation must be set before calibration chunks are added");
    if (rotation < KVL_CODEC_KEYROT_NONE || rotation > KVL_CODEC_KEYROT_INTERLEAVED)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown key rotation %d", rotation);
    if (rotation != KVL_CODEC_KEYROT_NONE && (!(rope_theta > 0) || !isfinite(rope_theta) || b->D % 2 != 0))
        return kvl_errorf(KVL_ERR_INVALID_ARG, "key rotation needs a finite RoPE base > 0 and an even head_dim (got %g, %d)",
                          (double)rope_theta, b->D);
    b->key_rot = rotation;
    b->rope_theta = rotation == KVL_CODEC_KEYROT_NONE ? 0.0f : rope_theta;
    return KVL_OK;
}

kvl_status kvl_codec_profile_builder_add(kvl_codec_profile_builder *b, const float *kv_in, int32_t T) {
    if (!b || !kv_in) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    if (T < 1 || T > KVLC_MAX_TOKENS) return kvl_errorf(KVL_ERR_INVALID_ARG, "%d calibration tokens", T);
    size_t n = (size_t)T * b->C;
    int16_t *q = malloc(n * sizeof *q);
    uint16_t *sc = malloc((size_t)(T > 2 * b->C ? T : 2 * b->C) * sizeof *sc);
    /* with a key rotation the keys are counted as the encoder quantises them: rotated back */
    float *rot = b->key_rot ? malloc((size_t)b->L * 2 * n * sizeof *rot) : NULL;
    float *cs = b->key_rot ? malloc((size_t)T * b->D * sizeof *cs) : NULL;
    if (!q || !sc || (b->key_rot && (!rot || !cs))) {
        free(q);
        free(sc);
        free(rot);
        free(cs);
        return KVL_ERR_NOMEM;
    }
    const float *kv = kv_in;
    if (b->key_rot) {
        memcpy(rot, kv_in, (size_t)b->L * 2 * n * sizeof *rot);
        kvlc_rope_table(b->rope_theta, b->D, T, cs);
        for (int32_t l = 0; l < b->L; l++) kvlc_rotate_keys(rot + (size_t)l * 2 * n, T, b->H, b->D, b->key_rot, cs, 1);
        kv = rot;
    }
    kvl_status st = KVL_OK;
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL && st == KVL_OK; lv++) {
        const kvlc_params *p = &b->p[lv];
        int hd = p->delta_group > 1;
        for (int32_t i = 0; i < 2 * b->L; i++) {
            int Q = p->q[i];
            if (kvlc_quantize_section(kv + (size_t)i * n, T, b->C, kvlc_scale_of(p->scale_mode, i % 2), Q, p->deadzone, sc, q) != 0) {
                st = kvl_errorf(KVL_ERR_RANGE, "calibration KV has a non-finite value (layer %d)", i / 2);
                break;
            }
            size_t per_c = (size_t)(2 * Q + 1) + (hd ? (size_t)(4 * Q + 1) : 0);
            uint64_t *cnt = b->counts[lv] + b->sec_off[lv][i];
            for (int32_t t = 0; t < T; t++) {
                int d = kvlc_is_delta(p->delta_group, t);
                int32_t ta = t - (hd ? t % p->delta_group : 0);
                for (int32_t c = 0; c < b->C; c++) {
                    int v = q[(size_t)t * b->C + c];
                    if (d) cnt[(size_t)c * per_c + (size_t)(2 * Q + 1) + (size_t)(v - q[(size_t)ta * b->C + c] + 2 * Q)]++;
                    else cnt[(size_t)c * per_c + (size_t)(v + Q)]++;
                }
            }
        }
    }
    free(q);
    free(sc);
    free(rot);
    free(cs);
    if (st == KVL_OK) b->tokens += (uint64_t)T;
    return st;
}

static void plevel_free(kvlc_plevel *pl) {
    free(pl->q);
    free(pl->tables);
    free(pl->cum_store);
    free(pl->lut_store);
    memset(pl, 0, sizeof *pl);
}

void kvl_codec_profile_free(kvl_codec_profile *p) {
    if (!p) return;
    for (int lv = 0; lv <= KVL_CODEC_MAX_LEVEL; lv++) plevel_free(&p->lv[lv]);
    free(p);
}

/* Allocates a level's table index for shape (L, C) and its q; tables' cum arrays point into
 * cum_store in (l, kv, c, d) order. */
static kvl_status plevel_alloc(kvlc_plevel *pl, int32_t L, int32_t C) {
    int hd = pl->delta_group > 1;
    size_t n_tab = (size_t)2 * L * C * (hd ? 2 : 1);
    pl->tables = calloc(n_tab, sizeof *pl->tables);
    pl->cum_store = malloc(level_entries(L, C, pl->q, hd, 1) * sizeof *pl->cum_store);
    pl->lut_store = malloc(n_tab * 256 * sizeof *pl->lut_store);
    if (!pl->tables || !pl->cum_store || !pl->lut_store) return KVL_ERR_NOMEM;
    size_t off = 0;
    for (int32_t l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int32_t c = 0; c < C; c++)
                for (int d = 0; d <= hd; d++) {
                    kvlc_table *t = &pl->tables[kvlc_ptab_index(C, hd, l, kv, c, d)];
                    int Q = pl->q[2 * l + kv];
                    t->amax = d ? 2 * Q : Q;
                    t->pb = KVLC_PROFILE_PB;
                    t->cum = pl->cum_store + off;
                    off += (size_t)(2 * t->amax + 2);
                }
    return KVL_OK;
}

/* the lookup of table t sits at the same index in lut_store as t in tables */
static void set_cum(kvlc_plevel *pl, kvlc_table *t, const uint32_t *freq) {
    uint32_t c = 0;
    t->cum[0] = 0;
    for (int32_t s = 0; s < 2 * t->amax + 1; s++) t->cum[s + 1] = (c += freq[s]);
    kvlc_table_lut(t, pl->lut_store + (size_t)(t - pl->tables) * 256);
}

/* the raw (uncompressed) body of the KVLP format */
static kvl_status body_serialize(const kvl_codec_profile *p, kvlc_buf *out) {
    int32_t L = p->n_layers, C = p->n_kv_heads * p->head_dim;
    uint8_t pre[KVLP_BODY_PREFIX] = {(uint8_t)p->key_rot, 0, 0, 0};
    uint32_t tb;
    memcpy(&tb, &p->rope_theta, 4);
    kvlc_put32(pre + 4, tb);
    if (kvlc_buf_put(out, pre, sizeof pre)) return KVL_ERR_NOMEM;
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL; lv++) {
        const kvlc_plevel *pl = &p->lv[lv];
        if (!pl->present) continue;
        int hd = pl->delta_group > 1;
        uint8_t h[8] = {(uint8_t)lv, (uint8_t)pl->scale_mode, (uint8_t)pl->delta_group, 0, 0, 0, 0, 0};
        kvlc_put16(h + 4, (uint16_t)pl->chan_group);
        if (kvlc_buf_put(out, h, 8)) return KVL_ERR_NOMEM;
        uint8_t b2[2];
        for (int32_t i = 0; i < 2 * L; i++) {
            kvlc_put16(b2, pl->q[i]);
            if (kvlc_buf_put(out, b2, 2)) return KVL_ERR_NOMEM;
        }
        size_t n_tab = (size_t)2 * L * C * (hd ? 2 : 1);
        for (size_t t = 0; t < n_tab; t++) {
            const kvlc_table *tb = &pl->tables[t];
            int32_t A = 2 * tb->amax + 1;
            if (kvlc_buf_reserve(out, 2 * (size_t)A)) return KVL_ERR_NOMEM;
            for (int32_t s = 0; s < A; s++) {
                kvlc_put16(out->p + out->n, (uint16_t)(tb->cum[s + 1] - tb->cum[s]));
                out->n += 2;
            }
        }
    }
    return KVL_OK;
}

static void profile_id(const uint8_t *raw, size_t n, uint8_t id[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(raw, n));
    memcpy(id, c.digest, 16);
}

kvl_status kvl_codec_profile_builder_finish(kvl_codec_profile_builder *b, kvl_codec_profile **out) {
    if (!b || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    if (b->tokens == 0) return kvl_errorf(KVL_ERR_CODEC_PROFILE, "no calibration KV was added");
    kvl_codec_profile *p = calloc(1, sizeof *p);
    if (!p) return KVL_ERR_NOMEM;
    memcpy(p->fingerprint, b->fp, 32);
    p->n_layers = b->L;
    p->n_kv_heads = b->H;
    p->head_dim = b->D;
    p->key_rot = b->key_rot;
    p->rope_theta = b->rope_theta;
    p->calib_tokens = b->tokens;
    kvl_status st = KVL_OK;
    uint32_t *freq = malloc((4 * KVLC_MAX_Q + 1) * sizeof *freq);
    if (!freq) st = KVL_ERR_NOMEM;
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL && st == KVL_OK; lv++) {
        kvlc_plevel *pl = &p->lv[lv];
        const kvlc_params *pp = &b->p[lv];
        pl->present = 1;
        pl->scale_mode = pp->scale_mode;
        pl->delta_group = pp->delta_group;
        pl->chan_group = kvlc_cg(pp->chan_group, b->C); /* stored resolved */
        pl->q = malloc((size_t)2 * b->L * sizeof *pl->q);
        if (!pl->q) { st = KVL_ERR_NOMEM; break; }
        memcpy(pl->q, pp->q, (size_t)2 * b->L * sizeof *pl->q);
        if ((st = plevel_alloc(pl, b->L, b->C)) != KVL_OK) break;
        int hd = pl->delta_group > 1;
        for (int32_t l = 0; l < b->L && st == KVL_OK; l++)
            for (int kv = 0; kv < 2; kv++) {
                int Q = pl->q[2 * l + kv];
                size_t per_c = (size_t)(2 * Q + 1) + (hd ? (size_t)(4 * Q + 1) : 0);
                const uint64_t *cnt = b->counts[lv] + b->sec_off[lv][2 * l + kv];
                for (int32_t c = 0; c < b->C; c++)
                    for (int d = 0; d <= hd; d++) {
                        kvlc_table *t = &pl->tables[kvlc_ptab_index(b->C, hd, l, kv, c, d)];
                        const uint64_t *cc = cnt + (size_t)c * per_c + (d ? (size_t)(2 * Q + 1) : 0);
                        if (kvlc_normalize(cc, 2 * t->amax + 1, KVLC_PROFILE_PB, 1, freq) != 0) {
                            st = kvl_errorf(KVL_ERR_INTERNAL, "cannot normalise a profile table");
                            break;
                        }
                        set_cum(pl, t, freq);
                    }
            }
    }
    free(freq);
    kvlc_buf raw = {0};
    if (st == KVL_OK) st = body_serialize(p, &raw);
    if (st == KVL_OK) profile_id(raw.p, raw.n, p->id);
    free(raw.p);
    if (st != KVL_OK) {
        kvl_codec_profile_free(p);
        return st;
    }
    *out = p;
    return KVL_OK;
}

kvl_status kvl_codec_profile_serialize(const kvl_codec_profile *p, uint8_t **out, size_t *out_size) {
    if (!p || !out || !out_size) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    *out_size = 0;
    kvlc_buf raw = {0};
    kvl_status st = body_serialize(p, &raw);
    if (st != KVL_OK) {
        free(raw.p);
        return st;
    }
    if (raw.n > PROFILE_MAX_RAW) {
        free(raw.p);
        return kvl_errorf(KVL_ERR_LIMIT, "profile body of %zu bytes exceeds the format's 1 GiB", raw.n);
    }
    size_t bound = ZSTD_compressBound(raw.n);
    uint8_t *b = malloc(KVLP_HDR + bound);
    if (!b) {
        free(raw.p);
        return KVL_ERR_NOMEM;
    }
    size_t z = ZSTD_compress(b + KVLP_HDR, bound, raw.p, raw.n, PROFILE_ZSTD_LEVEL);
    if (ZSTD_isError(z)) {
        free(raw.p);
        free(b);
        return kvl_errorf(KVL_ERR_INTERNAL, "zstd: %s", ZSTD_getErrorName(z));
    }
    int n_levels = 0;
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL; lv++) n_levels += p->lv[lv].present;
    memset(b, 0, KVLP_HDR);
    memcpy(b, KVLP_MAGIC, 4);
    kvlc_put16(b + 4, KVLP_VERSION);
    kvlc_put16(b + 6, (uint16_t)n_levels);
    memcpy(b + 8, p->fingerprint, 32);
    kvlc_put16(b + 40, (uint16_t)p->n_layers);
    kvlc_put16(b + 42, (uint16_t)p->n_kv_heads);
    kvlc_put16(b + 44, (uint16_t)p->head_dim);
    kvlc_put64(b + 48, p->calib_tokens);
    kvlc_put32(b + 56, (uint32_t)raw.n);
    kvlc_put32(b + 60, (uint32_t)z);
    memcpy(b + 64, p->id, 16);
    kvlc_put32(b + 80, kvlc_checksum(b + KVLP_HDR, z));
    kvlc_put32(b + 84, kvlc_checksum(b, 84));
    free(raw.p);
    *out = b;
    *out_size = KVLP_HDR + z;
    return KVL_OK;
}

static kvl_status pbad(const char *what) { return kvl_errorf(KVL_ERR_CODEC_PROFILE, "malformed profile: %s", what); }

kvl_status kvl_codec_profile_parse(const uint8_t *buf, size_t size, const uint8_t fingerprint[32],
                                   kvl_codec_profile **out) {
    if (!buf || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    if (size < KVLP_HDR) return kvl_errorf(KVL_ERR_TRUNCATED, "%zu bytes is shorter than a profile header", size);
    if (memcmp(buf, KVLP_MAGIC, 4) != 0) return kvl_errorf(KVL_ERR_MAGIC, "not a kvloom codec profile (bad magic)");
    if (kvlc_get16(buf + 4) != KVLP_VERSION)
        return kvl_errorf(KVL_ERR_VERSION, "profile version %u (this build reads %d)", kvlc_get16(buf + 4), KVLP_VERSION);
    if (KVLC_SUM_BAD(kvlc_get32(buf + 84), kvlc_checksum(buf, 84))) return kvl_errorf(KVL_ERR_CHECKSUM, "profile header checksum mismatch");
    int n_levels = kvlc_get16(buf + 6);
    int32_t L = kvlc_get16(buf + 40), H = kvlc_get16(buf + 42), D = kvlc_get16(buf + 44);
    int64_t C = (int64_t)H * D;
    uint32_t raw_n = kvlc_get32(buf + 56), zn = kvlc_get32(buf + 60);
    if (n_levels < 1 || n_levels > KVL_CODEC_MAX_LEVEL) return pbad("level count out of range");
    if (L < 1 || L > KVLC_MAX_LAYERS || C < 1 || C > KVLC_MAX_CHANNELS || kvlc_get16(buf + 46) != 0)
        return pbad("shape out of range");
    if (raw_n > PROFILE_MAX_RAW) return pbad("body too large");
    if (size - KVLP_HDR != zn) {
        if (size - KVLP_HDR < zn) return kvl_errorf(KVL_ERR_TRUNCATED, "profile body truncated");
        return pbad("trailing bytes after the body");
    }
    if (KVLC_SUM_BAD(kvlc_get32(buf + 80), kvlc_checksum(buf + KVLP_HDR, zn))) return kvl_errorf(KVL_ERR_CHECKSUM, "profile body checksum mismatch");
    if (fingerprint && memcmp(fingerprint, buf + 8, 32) != 0)
        return kvl_errorf(KVL_ERR_FINGERPRINT, "the profile was built for another model (fingerprint differs)");
    if (ZSTD_getFrameContentSize(buf + KVLP_HDR, zn) != raw_n) return pbad("compressed body size mismatch");
    uint8_t *raw = malloc(raw_n ? raw_n : 1);
    kvl_codec_profile *p = calloc(1, sizeof *p);
    uint32_t *freq = malloc((4 * KVLC_MAX_Q + 1) * sizeof *freq);
    kvl_status st = KVL_OK;
    if (!raw || !p || !freq) { st = KVL_ERR_NOMEM; goto fail; }
    size_t z = ZSTD_decompress(raw, raw_n, buf + KVLP_HDR, zn);
    if (ZSTD_isError(z) || z != raw_n) { st = pbad("body does not decompress"); goto fail; }
    uint8_t id[16];
    profile_id(raw, raw_n, id);
    if (KVLC_SUM_BAD(memcmp(id, buf + 64, 16), 0)) { st = pbad("profile id does not match its body"); goto fail; }
    memcpy(p->fingerprint, buf + 8, 32);
    memcpy(p->id, id, 16);
    p->n_layers = L;
    p->n_kv_heads = H;
    p->head_dim = D;
    p->calib_tokens = kvlc_get64(buf + 48);
    if (raw_n < KVLP_BODY_PREFIX) { st = pbad("body too short for its key-rotation block"); goto fail; }
    {
        uint32_t tb = kvlc_get32(raw + 4);
        memcpy(&p->rope_theta, &tb, 4);
        p->key_rot = raw[0];
        if (raw[1] || kvlc_get16(raw + 2) || p->key_rot > KVL_CODEC_KEYROT_INTERLEAVED ||
            (p->key_rot ? !(p->rope_theta > 0) || !isfinite(p->rope_theta) || D % 2 != 0 : tb != 0)) {
            st = pbad("key rotation out of range");
            goto fail;
        }
    }
    size_t at = KVLP_BODY_PREFIX;
    for (int k = 0; k < n_levels; k++) {
        if (raw_n - at < 8 + 4 * (size_t)L) { st = pbad("level header truncated"); goto fail; }
        const uint8_t *h = raw + at;
        int lv = h[0];
        if (lv < 1 || lv > KVL_CODEC_MAX_LEVEL || p->lv[lv].present) { st = pbad("level number out of range or repeated"); goto fail; }
        kvlc_plevel *pl = &p->lv[lv];
        pl->present = 1;
        pl->scale_mode = h[1];
        pl->delta_group = h[2];
        pl->chan_group = kvlc_get16(h + 4);
        if (!kvlc_scale_valid(pl->scale_mode) || pl->delta_group == 1 || pl->chan_group < 1 || h[3] || kvlc_get16(h + 6)) {
            st = pbad("level field out of range");
            goto fail;
        }
        pl->q = malloc((size_t)2 * L * sizeof *pl->q);
        if (!pl->q) { st = KVL_ERR_NOMEM; goto fail; }
        for (int32_t i = 0; i < 2 * L; i++) {
            pl->q[i] = kvlc_get16(h + 8 + 2 * (size_t)i);
            if (pl->q[i] < 1 || pl->q[i] > KVLC_MAX_Q) { st = pbad("bin count out of range"); goto fail; }
        }
        at += 8 + 4 * (size_t)L;
        int hd = pl->delta_group > 1;
        /* size check before allocating: the tables must all be in the body */
        size_t need = 2 * (level_entries(L, (int32_t)C, pl->q, hd, 0));
        if (raw_n - at < need) { st = pbad("tables truncated"); goto fail; }
        if ((st = plevel_alloc(pl, L, (int32_t)C)) != KVL_OK) goto fail;
        size_t n_tab = (size_t)2 * L * (size_t)C * (hd ? 2 : 1);
        for (size_t t = 0; t < n_tab; t++) {
            kvlc_table *tb = &pl->tables[t];
            int32_t A = 2 * tb->amax + 1;
            uint64_t sum = 0;
            for (int32_t s = 0; s < A; s++) {
                freq[s] = kvlc_get16(raw + at + 2 * (size_t)s);
                if (freq[s] == 0) { st = pbad("a profile symbol has zero probability"); goto fail; }
                sum += freq[s];
            }
            if (sum != (1u << KVLC_PROFILE_PB)) { st = pbad("table does not sum to 2^16"); goto fail; }
            set_cum(pl, tb, freq);
            at += 2 * (size_t)A;
        }
    }
    if (at != raw_n) { st = pbad("trailing bytes in the body"); goto fail; }
    free(raw);
    free(freq);
    *out = p;
    return KVL_OK;
fail:
    free(raw);
    free(freq);
    kvl_codec_profile_free(p);
    return st;
}

kvl_status kvl_codec_profile_save(const kvl_codec_profile *p, const char *path) {
    if (!p || !path) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    uint8_t *b = NULL;
    size_t n = 0;
    KVL_TRY(kvl_codec_profile_serialize(p, &b, &n));
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp) {
        free(b);
        return kvl_errorf(KVL_ERR_INVALID_ARG, "path too long");
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        free(b);
        return kvl_errorf(KVL_ERR_IO, "%s: %s", tmp, strerror(errno));
    }
    int ok = fwrite(b, n, 1, f) == 1;
    ok = (fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0) && ok;
    ok = (fclose(f) == 0) && ok;
    free(b);
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return kvl_errorf(KVL_ERR_IO, "%s: %s", path, strerror(e));
    }
    return KVL_OK;
}

kvl_status kvl_codec_profile_load(const char *path, const uint8_t fingerprint[32], kvl_codec_profile **out) {
    if (!path || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return kvl_errorf(errno == ENOENT ? KVL_ERR_NOT_FOUND : KVL_ERR_IO, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (sz < 0 || (unsigned long)sz > PROFILE_MAX_RAW) {
        fclose(f);
        return kvl_errorf(KVL_ERR_CODEC_PROFILE, "%s: bad profile file size", path);
    }
    uint8_t *b = malloc(sz ? (size_t)sz : 1);
    if (!b) {
        fclose(f);
        return KVL_ERR_NOMEM;
    }
    if (sz && fread(b, (size_t)sz, 1, f) != 1) {
        fclose(f);
        free(b);
        return kvl_errorf(KVL_ERR_IO, "%s: read failed", path);
    }
    fclose(f);
    kvl_status st = kvl_codec_profile_parse(b, (size_t)sz, fingerprint, out);
    free(b);
    if (st != KVL_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvl_last_error());
        return kvl_errorf(st, "%s: %s", path, msg);
    }
    return KVL_OK;
}

const uint8_t *kvl_codec_profile_fingerprint(const kvl_codec_profile *p) { return p->fingerprint; }
const uint8_t *kvl_codec_profile_id(const kvl_codec_profile *p) { return p->id; }
kvl_codec_shape kvl_codec_profile_shape(const kvl_codec_profile *p) {
    kvl_codec_shape s = {p->n_layers, 0, p->n_kv_heads, p->head_dim};
    return s;
}
const uint16_t *kvl_codec_profile_bins(const kvl_codec_profile *p, int32_t level) {
    return (level >= 1 && level <= KVL_CODEC_MAX_LEVEL && p->lv[level].present) ? p->lv[level].q : NULL;
}

kvl_status kvl_codec_level_bins(int32_t level, int32_t scheme, int32_t n_layers, uint16_t *bins) {
    if (!bins) return kvl_errorf(KVL_ERR_INVALID_ARG, "NULL argument");
    kvlc_params p;
    KVL_TRY(kvlc_params_get(level, scheme, n_layers, &p));
    memcpy(bins, p.q, (size_t)2 * n_layers * sizeof *bins);
    kvlc_params_free(&p);
    return KVL_OK;
}

uint64_t kvl_codec_profile_calib_tokens(const kvl_codec_profile *p) { return p->calib_tokens; }

int32_t kvl_codec_profile_key_rotation(const kvl_codec_profile *p, float *rope_theta) {
    if (rope_theta) *rope_theta = p->rope_theta;
    return p->key_rot;
}
