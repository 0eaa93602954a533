/* codec_impl.h - private parts of the codec: format constants, level parameters, rANS, tables,
 * the profile struct, byte helpers and float conversions. */
#ifndef KVL_CODEC_IMPL_H
#define KVL_CODEC_IMPL_H

#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "kvl_codec.h"
#include "kvl_half.h"

/* ---------------------------------------------------------------- format constants */
#define KVLC_MAGIC "KVLC"
#define KVLC_VERSION 1
#define KVLC_HDR_FIXED 64
#define KVLP_MAGIC "KVLP"
#define KVLP_VERSION 2
#define KVLP_HDR 88
#define KVLP_BODY_PREFIX 8 /* u8 key rotation, u8 0, u16 0, f32 rope theta */

#define KVLC_MAX_LAYERS 4096
#define KVLC_MAX_TOKENS (1 << 20)
#define KVLC_MAX_CHANNELS 65536
#define KVLC_MAX_Q 1023     /* anchors in [-Q, Q]; deltas in [-2Q, 2Q]: alphabet <= 4093 */
#define KVLC_PROFILE_PB 16  /* probability bits of profile tables */
#define KVLC_MIN_PB 8
#define KVLC_MAX_PB 16

enum { KVLC_MODE_LOSSLESS = 0, KVLC_MODE_QUANT = 1 };
/* TOKEN/CHANNEL/LAYER: symmetric, one bf16 scale per token row / channel / section.
 * CHANNEL_OFFSET: per channel a bf16 scale s and an int16 offset z; value = (float)(q + z) * s. */
enum { KVLC_SCALE_TOKEN = 0, KVLC_SCALE_CHANNEL = 1, KVLC_SCALE_LAYER = 2, KVLC_SCALE_CHANNEL_OFFSET = 3 };
#define KVLC_SCALE_MAX KVLC_SCALE_CHANNEL_OFFSET
enum { KVLC_TABLES_PROFILE = 0, KVLC_TABLES_CHUNK_LAYER = 1, KVLC_TABLES_CHUNK_CHANNEL = 2 };

static_assert(KVL_CODEC_MAX_LEVEL <= 255, "level is one byte in the header");

/* Everything the quantiser and coder need for one (level, scheme, shape). */
typedef struct kvlc_params {
    int lossless;
    int scheme;
    int level;
    int scale_mode;   /* KVLC_SCALE_* of keys in bits 0-3, of values in bits 4-7 */
    int delta_group;  /* tokens per anchor group; <= 1: no deltas */
    int chan_group;   /* channels per sub-stream (clamped to C) */
    int chunk_tables; /* KVLC_TABLES_CHUNK_* used when no profile */
    int chunk_pb;     /* probability bits of tables stored in a chunk */
    float deadzone;   /* rounding bias toward 0 in steps (encoder-side only) */
    int n_layers;
    uint16_t *q;      /* [n_layers][2] max |anchor symbol| (malloc'ed, kvlc_params_free) */
} kvlc_params;

/* Fills p for level/scheme/n_layers (q allocated). $KVL_CODEC_TUNE, when set, overrides the
 * KVLOOM scheme's lossy parameters for measurement runs (docs/codec-format.md, "Tuning"). */
kvl_status kvlc_params_get(int level, int scheme, int n_layers, kvlc_params *p);

/* Channels per sub-stream for C channels: cg, or with cg = 0 (the KVLOOM levels' default) 8 for
 * wide KV (C >= 256: a GPU decodes 4x more streams at once, measured 47 -> 280 GB/s of bf16 on an
 * H100 for 8B-shaped chunks at +0.6% size) and 32 for narrow KV, where 8 bytes of state and size
 * per stream would cost more and a GPU has parallelism to spare anyway; clamped to C. */
static inline int kvlc_cg(int cg, int C) {
    if (cg <= 0) cg = C >= 256 ? 8 : 32;
    return cg < C ? cg : C;
}
void kvlc_params_free(kvlc_params *p);

/* ---------------------------------------------------------------- probability tables */
/* One static table over the alphabet [-amax, amax]: freq/cum of symbol index s = v + amax. */
typedef struct kvlc_table {
    int32_t amax;
    int32_t pb;
    uint32_t *cum; /* [2*amax+2]; cum[0] = 0, cum[A] = 1 << pb; freq = cum[s+1] - cum[s] */
    uint16_t *lut; /* [256] decoder only: symbol holding slot k << (pb - 8) (search starts there) */
} kvlc_table;

/* Fills lut[256] for t (whose cum is complete) and points t->lut at it. */
void kvlc_table_lut(kvlc_table *t, uint16_t *lut);

/* Normalises counts[A] to frequencies summing to 1 << pb. all_nonzero: every symbol gets >= 1
 * (profiles: any symbol may occur later); else only symbols with a count. Deterministic, integer.
 * Returns -1 if impossible (no counts, or more nonzero symbols than 1 << pb). */
int kvlc_normalize(const uint64_t *counts, int32_t A, int pb, int all_nonzero, uint32_t *freq);

/* ---------------------------------------------------------------- rANS (byte-wise, 32-bit) */
#define KVLC_RANS_L (1u << 23)

typedef struct kvlc_rans_dec {
    uint32_t x;
    const uint8_t *p, *end;
} kvlc_rans_dec;

/* ---------------------------------------------------------------- profile */
typedef struct kvlc_plevel {
    int present;
    int scale_mode, delta_group, chan_group;
    uint16_t *q;         /* [L][2] */
    kvlc_table *tables;  /* [L][2][C][1 + has_delta] */
    uint32_t *cum_store; /* backing store of every table's cum */
    uint16_t *lut_store; /* backing store of every table's decode lookup */
} kvlc_plevel;

struct kvl_codec_profile {
    uint8_t fingerprint[32];
    uint8_t id[16];
    int32_t n_layers, n_kv_heads, head_dim;
    int32_t key_rot;   /* kvl_codec_key_rotation of every level's keys */
    float rope_theta;  /* > 0 with a rotation, else 0 */
    uint64_t calib_tokens;
    kvlc_plevel lv[KVL_CODEC_MAX_LEVEL + 1]; /* index 0 unused */
};

/* Index of the table of (layer, kv, channel, delta?) in a profile level. */
static inline size_t kvlc_ptab_index(int32_t C, int has_delta, int l, int kv, int c, int is_delta) {
    return (((size_t)l * 2 + (size_t)kv) * (size_t)C + (size_t)c) * (has_delta ? 2u : 1u) +
           (size_t)(is_delta ? 1 : 0);
}

/* ---------------------------------------------------------------- quantiser shared by the
 * encoder and the profile builder */
/* Quantises one (layer, k|v) section x[T][C] (float32) with max symbol Q: scales (bf16 bits) into
 * sc[n_scales] (CHANNEL_OFFSET: C scales then C int16 offsets) and symbols into q[T][C].
 * dz >= 0 widens the zero bin: |u| rounds down unless its fraction exceeds 0.5 + dz (encoder only). Returns -1 on a non-finite value. */
int kvlc_quantize_section(const float *x, int32_t T, int32_t C, int scale_mode, int Q, float dz, uint16_t *sc,
                          int16_t *q);
static inline int kvlc_scale_of(int packed, int kv) { return kv ? packed >> 4 : packed & 15; }
static inline int kvlc_scale_valid(int packed) { return (packed & 15) <= KVLC_SCALE_MAX && (packed >> 4) <= KVLC_SCALE_MAX; }
static inline int32_t kvlc_n_scales(int scale_mode, int32_t T, int32_t C) {
    return scale_mode == KVLC_SCALE_TOKEN ? T : scale_mode == KVLC_SCALE_CHANNEL ? C : scale_mode == KVLC_SCALE_LAYER ? 1 : 2 * C;
}
/* Symbol actually coded for q[t][c]: the value itself for anchors, q - q[anchor row] for deltas. */
static inline int kvlc_is_delta(int delta_group, int32_t t) {
    return delta_group > 1 && (t % delta_group) != 0;
}

/* ---------------------------------------------------------------- key rotation (profiles v2) */
/* cs[t][i] (cos) and cs[T * D/2 + t * D/2 + i] (sin) of the angle t * theta^(-2i / D), t in [0, T),
 * i in [0, D/2): computed in double and rounded to float once, so that every decoder that takes
 * this table (a GPU one uploads it) rotates identically. cs holds T * D floats. */
void kvlc_rope_table(float theta, int32_t D, int32_t T, float *cs);
/* Rotates the RoPE pairs of every head of x[T][H][D] by -angle(t) (inverse = 1, the encoder: back
 * to position 0) or +angle(t) (inverse = 0, the decoder). Pairs: (2i, 2i+1) for
 * KVL_CODEC_KEYROT_INTERLEAVED, (i, i + D/2) for KVL_CODEC_KEYROT_HALF. Each output is
 * fl(fl(a * b) -/+ fl(c * d)) with no fused multiply-add (the codec is built -ffp-contract=off). */
void kvlc_rotate_keys(float *x, int32_t T, int32_t H, int32_t D, int style, const float *cs, int inverse);

/* ---------------------------------------------------------------- bytes and floats */
static inline void kvlc_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void kvlc_put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kvlc_put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t kvlc_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t kvlc_get32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t kvlc_get64(const uint8_t *p) {
    return (uint64_t)kvlc_get32(p) | ((uint64_t)kvlc_get32(p + 4) << 32);
}

/* float conversions: kvl_half.h (shared with the engine) */

/* Fuzz builds skip checksum verification so that the fuzzer reaches the parsing behind it (the
 * libFuzzer convention; never defined in a real build). */
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
#define KVLC_SUM_BAD(stored, computed) ((void)(stored), (void)(computed), 0)
#else
#define KVLC_SUM_BAD(stored, computed) ((stored) != (computed))
#endif

/* xxh3-64 truncated to its low 32 bits: the section / header checksum */
uint32_t kvlc_checksum(const void *p, size_t n);

/* growable byte buffer */
typedef struct kvlc_buf {
    uint8_t *p;
    size_t n, cap;
} kvlc_buf;
int kvlc_buf_reserve(kvlc_buf *b, size_t extra);
int kvlc_buf_put(kvlc_buf *b, const void *src, size_t n);
int kvlc_buf_varint(kvlc_buf *b, uint32_t v);

#endif
