/* kvl_codec.h - the CacheGen KV codec (CPU reference encoder and decoder).
 *
 * A chunk's KV is one tensor [layers][k|v][tokens][kv_heads][head_dim] (float32, bfloat16 or
 * float16; the engine's kvl_kv_read gives float32 in exactly this layout). kvl_codec_encode turns it
 * into one self-describing buffer (docs/codec-format.md): quantised symbols entropy-coded with a
 * static rANS range coder in independent sub-streams, or zstd over the raw bits at the lossless
 * level. Probability tables come from a per-model profile (kvl_codec_profile, built offline from
 * calibration KV and tied to the model fingerprint) or, without one, are stored in the chunk.
 *
 * The codec knows nothing about models, stores or engines beyond the tensor shape.
 *
 * Thread-safety: every function is reentrant; a kvl_codec_profile is immutable after it is built
 * or parsed and may be shared by any number of threads encoding/decoding at once. A profile
 * builder is used by one thread at a time.
 */
#ifndef KVL_CODEC_H
#define KVL_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of the KV tensors given to / returned by the codec. */
typedef enum kvl_codec_dtype {
    KVL_CODEC_F32 = 0,
    KVL_CODEC_BF16 = 1,
    KVL_CODEC_F16 = 2
} kvl_codec_dtype;

/* Quality levels. 0 is lossless (zstd over the raw bits of the input dtype); 1..KVL_CODEC_MAX_LEVEL
 * are lossy, higher = smaller and less accurate. KVL_CODEC_LEVEL_DEFAULT is the default lossy
 * level (the one held to the quality bar in docs/BENCHMARKS.md). */
#define KVL_CODEC_LEVEL_LOSSLESS 0
#define KVL_CODEC_MAX_LEVEL 4
#define KVL_CODEC_LEVEL_DEFAULT 2

/* Coding schemes. KVLOOM is ours; LMCACHE reproduces the scheme of LMCache's shipped CacheGen code
 * (one scale per (layer, k|v, token), 32/16 bins, per-chunk per-channel tables, no deltas) as a
 * comparison peer; its levels 1..4 scale the bin counts (x2, x1, x0.5, x0.25). */
typedef enum kvl_codec_scheme {
    KVL_CODEC_SCHEME_KVLOOM = 0,
    KVL_CODEC_SCHEME_LMCACHE = 1
} kvl_codec_scheme;

typedef struct kvl_codec_shape {
    int32_t n_layers;   /* 1 .. 4096 */
    int32_t n_tokens;   /* 1 .. 1<<20 */
    int32_t n_kv_heads; /* n_kv_heads * head_dim: 1 .. 65536 */
    int32_t head_dim;
} kvl_codec_shape;

/* How a profile's chunks transform keys before quantising (docs/codec-format.md, "Key rotation").
 * Keys in a KV cache are RoPE-rotated by their position, which spreads each channel over its whole
 * range; rotated back to position 0 (by the token's index in the chunk) they cluster, and cost
 * about 0.15-0.75 fewer bits per key element at the same step on the shared models. The decoder
 * rotates them forward again, so the output is the cache's own layout. */
typedef enum kvl_codec_key_rotation {
    KVL_CODEC_KEYROT_NONE = 0,
    KVL_CODEC_KEYROT_HALF = 1,        /* RoPE pairs (i, i + head_dim/2): Hugging Face rotate-half */
    KVL_CODEC_KEYROT_INTERLEAVED = 2  /* RoPE pairs (2i, 2i + 1): llama2.c / Meta */
} kvl_codec_key_rotation;

typedef struct kvl_codec_profile kvl_codec_profile;                 /* opaque, immutable */
typedef struct kvl_codec_profile_builder kvl_codec_profile_builder; /* opaque */

typedef struct kvl_codec_opts {
    int32_t level;     /* 0 lossless, 1..KVL_CODEC_MAX_LEVEL lossy */
    int32_t scheme;    /* kvl_codec_scheme */
    const kvl_codec_profile *profile; /* borrowed; NULL: the chunk carries its own tables. Ignored
                                         by level 0 and by the LMCACHE scheme */
    int32_t n_threads; /* worker threads for this call; <= 1: the calling thread only */
    const uint16_t *bins; /* borrowed, may be NULL: [n_layers][2] largest |symbol| per (layer, k|v)
                             replacing the level's (or the profile's) bins, 1..1023; with a profile
                             they must equal the profile's. Ignored at level 0. */
} kvl_codec_opts;

/* Defaults: the default lossy level, KVLOOM scheme, no profile, 1 thread, the level's bins. */
kvl_codec_opts kvl_codec_opts_default(void);

/* What a buffer's header says (kvl_codec_info reads it without decoding). */
typedef struct kvl_codec_info {
    kvl_codec_shape shape;
    int32_t level;
    int32_t scheme;
    int32_t src_dtype;       /* kvl_codec_dtype the chunk was encoded from */
    int32_t lossless;        /* 1 at level 0 */
    int32_t uses_profile;    /* 1: decoding needs the profile whose id is profile_id */
    uint8_t profile_id[16];
    uint64_t total_bytes;    /* size of the encoded chunk */
    uint64_t n_elements;     /* layers * 2 * tokens * kv_heads * head_dim */
} kvl_codec_info;

/* Encodes kv ([n_layers][2][n_tokens][n_kv_heads][head_dim] of dtype, borrowed) into a new buffer:
 * *out is malloc'ed and owned by the caller (free()), *out_size its length. Deterministic: the same
 * input, options and profile give identical bytes on every run and thread count.
 * Lossy levels reject non-finite values (KVL_ERR_RANGE); level 0 keeps any bits.
 * Errors: KVL_ERR_INVALID_ARG (shape/dtype), KVL_ERR_CODEC_LEVEL, KVL_ERR_CODEC_PROFILE (profile for
 * another shape), KVL_ERR_RANGE, KVL_ERR_NOMEM. */
kvl_status kvl_codec_encode(const kvl_codec_shape *shape, kvl_codec_dtype dtype, const void *kv,
                            const kvl_codec_opts *opts, uint8_t **out, size_t *out_size);

/* Reads and checks the header of buf[0..size) (magic, version, header checksum, field ranges,
 * declared size <= size) and fills *info. Does not touch the sections. */
kvl_status kvl_codec_info_get(const uint8_t *buf, size_t size, kvl_codec_info *info);

/* Decodes layers [layer0, layer0 + n_layers) of buf into out, laid out
 * [n_layers][2][n_tokens][n_kv_heads][head_dim] of out_dtype; out_cap is out's size in bytes
 * (borrowed, caller-allocated). profile: the profile the chunk was encoded with (required when
 * info.uses_profile, checked by id; otherwise ignored, may be NULL). n_layers <= 0 means all layers
 * from layer0. Every section read is checked (checksum, bounds, stream consistency): any malformed
 * input returns an error (KVL_ERR_FORMAT family / KVL_ERR_CODEC / KVL_ERR_CHECKSUM /
 * KVL_ERR_TRUNCATED / KVL_ERR_MAGIC / KVL_ERR_VERSION / KVL_ERR_CODEC_PROFILE), never a crash;
 * out's contents are then unspecified. */
kvl_status kvl_codec_decode(const uint8_t *buf, size_t size, const kvl_codec_profile *profile,
                            int32_t layer0, int32_t n_layers, kvl_codec_dtype out_dtype, void *out,
                            size_t out_cap, int32_t n_threads);

/* Largest absolute error a lossy level guarantees for one element, relative to the largest
 * absolute value of the scale group it belongs to (its token row / channel / whole (layer, k|v),
 * whichever the level's scale granularity for that layer and k|v is): 0.5 / Q; where keys carry
 * a per-channel scale and integer offset, 1.5 / Q relative to the largest |value| of the whole
 * (layer, k|v) (the steps of narrow channels follow the widest channel, docs/codec-format.md);
 * with a margin for the bfloat16 rounding of scales. Used by tests; returns 0 for level 0. */
double kvl_codec_level_error_bound(int32_t level, int32_t scheme, int32_t n_layers, int32_t layer,
                                   int32_t kv);

/* ---------------------------------------------------------------- profiles */

/* Starts a profile for models of this KV shape (n_tokens ignored) and fingerprint (32 bytes,
 * copied). Calibration chunks are added with _add; _finish builds the tables for every lossy level
 * of the KVLOOM scheme. */
kvl_status kvl_codec_profile_builder_create(const kvl_codec_shape *shape,
                                            const uint8_t fingerprint[32],
                                            kvl_codec_profile_builder **out);
void kvl_codec_profile_builder_free(kvl_codec_profile_builder *b);

/* Makes every level of the profile rotate keys (kvl_codec_key_rotation; rope_theta: the model's
 * RoPE base, finite and > 0; head_dim must be even). Call before any chunk is added.
 * Errors: KVL_ERR_INVALID_ARG. */
kvl_status kvl_codec_profile_builder_set_key_rotation(kvl_codec_profile_builder *b, int32_t rotation,
                                                      float rope_theta);

/* Adds one calibration chunk (float32, [n_layers][2][n_tokens][heads][dim], borrowed): it is
 * quantised exactly as the encoder would quantise a chunk of that size, and its symbols counted. */
kvl_status kvl_codec_profile_builder_add(kvl_codec_profile_builder *b, const float *kv,
                                         int32_t n_tokens);

/* Replaces the bins (largest |symbol| per (layer, k|v), bins[n_layers][2], 1..1023, copied) of a
 * lossy level before any chunk is added: a profile may pick its bins per model (kvloom
 * codec-profile searches them on calibration text); chunks encoded with the profile use them.
 * Errors: KVL_ERR_INVALID_ARG (after _add, bad values), KVL_ERR_CODEC_LEVEL. */
kvl_status kvl_codec_profile_builder_set_bins(kvl_codec_profile_builder *b, int32_t level, const uint16_t *bins);

/* Builds the profile (*out owned by the caller, kvl_codec_profile_free). The builder may be freed
 * afterwards. Fails with KVL_ERR_CODEC_PROFILE if nothing was added. */
kvl_status kvl_codec_profile_builder_finish(kvl_codec_profile_builder *b, kvl_codec_profile **out);

void kvl_codec_profile_free(kvl_codec_profile *p);

/* Serialises a profile (the KVLP file format, docs/codec-format.md): *out malloc'ed (free()). */
kvl_status kvl_codec_profile_serialize(const kvl_codec_profile *p, uint8_t **out, size_t *out_size);

/* Parses a serialised profile (buf borrowed). Rejects every malformed input with an error.
 * fingerprint: if not NULL, the profile must belong to this model (else KVL_ERR_FINGERPRINT). */
kvl_status kvl_codec_profile_parse(const uint8_t *buf, size_t size, const uint8_t fingerprint[32],
                                   kvl_codec_profile **out);

/* File helpers around serialize/parse. save writes atomically (temp file + rename). */
kvl_status kvl_codec_profile_save(const kvl_codec_profile *p, const char *path);
kvl_status kvl_codec_profile_load(const char *path, const uint8_t fingerprint[32],
                                  kvl_codec_profile **out);

/* KVL_OK if p can encode/decode chunks of shape (n_tokens ignored) at lossy level `level` of the
 * KVLOOM scheme with this build's level parameters; KVL_ERR_CODEC_PROFILE (with the reason) if it
 * was built for another shape or with other level parameters (a stale profile: rebuild it). */
kvl_status kvl_codec_profile_check(const kvl_codec_profile *p, const kvl_codec_shape *shape, int32_t level);

/* Accessors (pointers owned by the profile). */
const uint8_t *kvl_codec_profile_fingerprint(const kvl_codec_profile *p); /* 32 bytes */
const uint8_t *kvl_codec_profile_id(const kvl_codec_profile *p);          /* 16 bytes */
kvl_codec_shape kvl_codec_profile_shape(const kvl_codec_profile *p);      /* n_tokens = 0 */
/* bins[n_layers][2] of a lossy level (NULL if the level is absent) */
const uint16_t *kvl_codec_profile_bins(const kvl_codec_profile *p, int32_t level);
/* The built-in bins of a level/scheme for n_layers into bins[n_layers][2]. */
kvl_status kvl_codec_level_bins(int32_t level, int32_t scheme, int32_t n_layers, uint16_t *bins);
uint64_t kvl_codec_profile_calib_tokens(const kvl_codec_profile *p);
/* kvl_codec_key_rotation of the profile; *rope_theta (may be NULL) its RoPE base (0 without). */
int32_t kvl_codec_profile_key_rotation(const kvl_codec_profile *p, float *rope_theta);

/* The float32 KV a decoder returns for `kv` (float32, shape) encoded at lossy `level` of the
 * KVLOOM scheme with bins[n_layers][2] (NULL: the level's) and a profile of this key rotation /
 * RoPE base, without entropy coding: the same quantiser, reconstruction and rotation, bit for bit
 * (for calibration searches that only need the decoded values). out: n_elements floats.
 * Errors: KVL_ERR_INVALID_ARG, KVL_ERR_CODEC_LEVEL, KVL_ERR_RANGE (non-finite input). */
kvl_status kvl_codec_simulate(const kvl_codec_shape *shape, const float *kv, int32_t level, const uint16_t *bins,
                              int32_t key_rotation, float rope_theta, float *out);

#ifdef __cplusplus
}
#endif
#endif
