/* kvl_codec_plan.h - a flat, validated description of how to decode KVLC chunks in parallel.
 *
 * kvl_codec_plan_add parses and checks a chunk on the host with the CPU decoder's own code
 * (header, directory, section checksums, probability tables, scales, stream sizes, profile match:
 * everything docs/codec-format.md lists except the in-stream checks) and appends one record per
 * independent rANS sub-stream. A parallel decoder (kernels/cuda/codec_decode.cu) then decodes every
 * stream of every chunk in the plan at once; the checks that need the symbols themselves (reading
 * past a stream's end, the final coder state, deltas leaving [-Q, Q], a symbol in an empty context)
 * are its job. All arrays are plain POD so that a plan can be copied to a device as is.
 *
 * Output placement is the caller's: element (layer l, k|v, token t, channel c) of a chunk lands at
 * out + l_rel * layer_stride + kv * kv_stride + t * token_stride + c (elements of the output dtype),
 * which covers both the codec layout [n_layers][2][T][C] and the engine's KV layout
 * [layer][k|v][slot][C] at a slot offset.
 *
 * Thread-safety: a plan is used by one thread at a time; distinct plans are independent.
 */
#ifndef KVL_CODEC_PLAN_H
#define KVL_CODEC_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_codec.h"
#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVL_CODEC_PLAN_EMPTY 0xffffffffu /* cum_off of a context with no table in this chunk */

typedef struct kvl_codec_plan_stream {
    uint64_t byte_off;  /* first byte (the 4-byte initial state) in the plan's byte buffer */
    uint32_t len;       /* bytes, >= 4 */
    uint32_t sec;       /* index into sections */
    int32_t c0, c1;     /* channels [c0, c1) of the section */
    uint32_t anchor_off; /* c1 - c0 int16 of scratch for the anchor row (deltas) */
    uint32_t pad;
} kvl_codec_plan_stream;

typedef struct kvl_codec_plan_section {
    int32_t T, C;        /* tokens, channels */
    int32_t Q;           /* largest |anchor| */
    int32_t sm;          /* scale mode (KVLC_SCALE_*: 0 token, 1 channel, 2 layer, 3 channel+offset) */
    int32_t delta_group; /* <= 1: no deltas */
    int32_t ctx_mode;    /* 1: one context per section (+1 delta); else one per channel (x2 with deltas) */
    uint32_t tab_base;   /* index of context 0 in tables */
    uint32_t scale_base; /* index of the first scale in scales (mode 3: C scales then C offsets) */
    uint32_t chunk;      /* index of the chunk (order of kvl_codec_plan_add calls) */
    int32_t rot;         /* kvl_codec_key_rotation of this (key) section, 0: none */
    uint64_t out;        /* output address (a device pointer as an integer) of element (t 0, c 0) */
    int64_t ld;          /* elements between tokens */
    /* rot != 0: the streams write float32 values to rot_scratch[rot_off + t * C + c]; a second pass
     * rotates the pairs forward with the cos/sin table rope[rope_off ..] (kvlc_rope_table layout: T *
     * D/2 cosines then T * D/2 sines) and stores them at out (docs/codec-format.md, "Key rotation") */
    uint64_t rot_off;
    int32_t D;           /* head_dim (rot != 0) */
    uint32_t rope_off;
} kvl_codec_plan_section;

typedef struct kvl_codec_plan_table {
    uint32_t cum_off;    /* into cum (src 0) or the profile's cum store (src 1); KVL_CODEC_PLAN_EMPTY */
    uint32_t lut_off;    /* 256 entries, same source */
    int32_t amax;        /* symbol index s decodes to s - amax */
    int32_t pb;          /* probability bits */
    int32_t src;         /* 0 chunk tables (this plan), 1 the profile's */
    int32_t pad;
} kvl_codec_plan_table;

typedef struct kvl_codec_plan {
    kvl_codec_plan_stream *streams;
    kvl_codec_plan_section *sections;
    kvl_codec_plan_table *tables;
    uint32_t *cum;       /* chunk tables' cumulative frequencies */
    uint16_t *lut;       /* chunk tables' 256-entry lookups */
    float *scales;       /* bf16 scales as float32; channel offsets as exact float32 integers */
    float *rope;         /* cos/sin tables of chunks whose profile rotates keys (one per chunk) */
    size_t n_streams, n_sections, n_tables, n_cum, n_lut, n_scales, n_rope;
    size_t cap_streams, cap_sections, cap_tables, cap_cum, cap_lut, cap_scales, cap_rope;
    uint64_t n_rot;      /* float32 scratch elements of rotated sections */
    uint64_t n_bytes;    /* bytes of all chunks added (the byte buffer they are concatenated into) */
    uint64_t n_anchor;   /* int16 of anchor scratch */
    uint64_t n_out;      /* output elements written */
    uint32_t n_chunks;
    const kvl_codec_profile *profile; /* the one profile the plan's profile tables refer to, or NULL */
} kvl_codec_plan;

/* Output placement of one chunk (see the header comment); strides in elements. */
typedef struct kvl_codec_place {
    uint64_t out;
    int64_t layer_stride, kv_stride, token_stride;
} kvl_codec_place;

/* An empty plan (all zero). */
void kvl_codec_plan_init(kvl_codec_plan *p);
/* Forgets every chunk but keeps the allocations. */
void kvl_codec_plan_reset(kvl_codec_plan *p);
/* Frees the arrays; p may be NULL. */
void kvl_codec_plan_free(kvl_codec_plan *p);

/* Validates buf[0..size) (a lossy chunk) for decoding layers [layer0, layer0 + n_layers) (n_layers
 * <= 0: all from layer0) with profile (required when the chunk uses one; a plan refers to one
 * profile at most) and appends its streams. Only the chunk's bytes of those layers' sections
 * (kvl_codec_plan_range) are read by the decoder: they are expected at byte offset p->n_bytes of
 * the buffer it reads (p->n_bytes then grows by their length).
 * out_dtype_size: 2 or 4 (for the output address arithmetic). Errors: exactly those
 * kvl_codec_decode returns for the same structural faults; KVL_ERR_CODEC_LEVEL for a lossless
 * chunk (decode it with kvl_codec_decode); KVL_ERR_INVALID_ARG for a second profile. On error the
 * plan is left as before the call. */
kvl_status kvl_codec_plan_add(kvl_codec_plan *p, const uint8_t *buf, size_t size, const kvl_codec_profile *profile,
                              int32_t layer0, int32_t n_layers, const kvl_codec_place *place, size_t out_dtype_size);

/* The byte range [*off, *off + *len) of buf holding the sections of layers [layer0, layer0 +
 * n_layers) (n_layers <= 0: all from layer0): what a decoder of a plan needs of the chunk. Checks
 * the header as kvl_codec_info_get does. */
kvl_status kvl_codec_plan_range(const uint8_t *buf, size_t size, int32_t layer0, int32_t n_layers, uint64_t *off,
                                uint64_t *len);

/* Appends every chunk of src to dst (indices shifted; src's chunk bytes are expected right after
 * dst's in the decoder's byte buffer). Both must refer to the same profile (or none). src is not
 * changed. Errors: KVL_ERR_INVALID_ARG (different profiles), KVL_ERR_NOMEM, KVL_ERR_LIMIT. */
kvl_status kvl_codec_plan_append(kvl_codec_plan *dst, const kvl_codec_plan *src);

/* The backing stores of a profile level's tables, for uploading next to a plan that refers to
 * them (table src 1): *cum / *lut point into the profile (borrowed), counts in entries. */
kvl_status kvl_codec_profile_stores(const kvl_codec_profile *prof, int32_t level, const uint32_t **cum,
                                    size_t *n_cum, const uint16_t **lut, size_t *n_lut);

#ifdef __cplusplus
}
#endif
#endif
