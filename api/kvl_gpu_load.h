/* kvl_gpu_load.h - the GPU load path: chunk caches from the store straight into a CUDA KV cache.
 *
 * kvl_gpu_load reads the chunks' encoded caches with batched store reads (kvl_store_get_batch:
 * io_uring, many reads in flight, DRAM tier first), a group of chunks at a time, and decodes each
 * group on the GPU (kvl_codec_gpu: host validation, one H2D copy, one kernel) directly into the
 * chunks' slots of the engine's KV cache; keys are then re-rotated to the chunks' prompt positions.
 * The read of group g+1 runs on a second thread while group g is validated, copied and decoded.
 * Chunks the caller marks for recompute are prefilled from their tokens instead (kvl_load_decide
 * says when that is faster than loading).
 *
 * The store never learns about models (it is handed the model fingerprint to check), the codec
 * never about the engine: this file is where they meet. Built with KVL_CUDA only, except the cost
 * model (kvl_load_decide / kvl_load_recompute_ratio), which is plain arithmetic.
 * Thread-safety: one call per kv / decoder at a time.
 */
#ifndef KVL_GPU_LOAD_H
#define KVL_GPU_LOAD_H

#include <stdint.h>

#include "kvl_blend.h"
#include "kvl_codec.h"
#include "kvl_engine.h"
#include "kvl_status.h"
#include "kvl_store.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- cost model (controller) */

/* Throughputs measured on the machine (e.g. the store's direct-read bandwidth, kvl_codec_gpu's
 * decode rate, the engine's prefill rate for chunk-sized inputs). */
typedef struct kvl_load_costs {
    double read_gbps;      /* encoded bytes per second from where the caches live, GB/s */
    double decode_gbps;    /* decoded output bytes per second (incl. host validation), GB/s */
    double prefill_tok_s;  /* tokens per second when prefilling a chunk on its own */
    double fixed_ms;       /* per-chunk latency of a load (request, launch) */
} kvl_load_costs;

/* Estimated time to load one chunk (read and decode overlap, so the slower one counts) and to
 * recompute it from its tokens; returns 1 when recomputing is faster (or loading impossible:
 * a zero throughput). Outputs may be NULL. */
int kvl_load_decide(const kvl_load_costs *c, uint64_t encoded_bytes, uint64_t decoded_bytes, int32_t n_tokens,
                    double *load_ms, double *recompute_ms);

/* The codec level to load (CacheGen's adaptation): among n_levels stored encodings of a chunk,
 * levels[i] with encoded size bytes[i] (lower level = better quality), the best-quality one whose
 * load time fits budget_ms (e.g. the recompute time that hides it); the smallest one if none fits.
 * Returns the index i, or -1 when n_levels < 1. */
int kvl_load_pick_level(const kvl_load_costs *c, int32_t n_levels, const int32_t *levels, const uint64_t *bytes,
                        uint64_t decoded_bytes, double budget_ms);

/* Recompute ratio for blending (CacheBlend's controller): the share of context tokens whose
 * recompute fits under the load time of the context (so it costs no extra latency), clamped to
 * [r_min, r_max]. context_load_ms: estimated load time of all chunks; full_prefill_ms: estimated
 * time of recomputing every context token. */
double kvl_load_recompute_ratio(double context_load_ms, double full_prefill_ms, double r_min, double r_max);

/* ---------------------------------------------------------------- online cost estimates */

/* The costs a long-running loader (kvloomd) measures on its own work: each throughput is the ratio
 * of an exponentially weighted moving average (weight alpha for a new sample) of the amounts
 * (bytes, tokens) and of the times of its samples, so that a large sample counts more than a tiny
 * one whose time is mostly clock and call overhead. A throughput stays 0 until its first sample.
 * Fields the operator pinned (kvl_load_costs_parse) never change. Plain data: not thread-safe, the
 * owner serialises calls. */
enum { KVL_LOAD_READ = 0, KVL_LOAD_DECODE = 1, KVL_LOAD_PREFILL = 2, KVL_LOAD_N_RATES = 3 };
enum { /* one bit per cost: 1 << its rate index, fixed_ms after them */
    KVL_LOAD_PIN_READ = 1 << KVL_LOAD_READ, KVL_LOAD_PIN_DECODE = 1 << KVL_LOAD_DECODE,
    KVL_LOAD_PIN_PREFILL = 1 << KVL_LOAD_PREFILL, KVL_LOAD_PIN_FIXED = 1 << KVL_LOAD_N_RATES
};

typedef struct kvl_load_est {
    kvl_load_costs costs;              /* current estimates (0: not measured or pinned yet) */
    unsigned pinned;                   /* KVL_LOAD_PIN_* */
    double alpha;                      /* weight of a new sample, (0, 1] */
    double amount[KVL_LOAD_N_RATES];   /* EWMA of a sample's bytes (READ, DECODE) or tokens (PREFILL) */
    double ms[KVL_LOAD_N_RATES];       /* EWMA of a sample's milliseconds */
    uint64_t samples[KVL_LOAD_N_RATES];
} kvl_load_est;

/* Nothing measured, nothing pinned, fixed_ms 0; alpha outside (0, 1] means 0.2. */
void kvl_load_est_init(kvl_load_est *e, double alpha);

/* One measurement: amount bytes read from the store (KVL_LOAD_READ), bytes decoded into the
 * engine's KV dtype (KVL_LOAD_DECODE) or tokens prefilled (KVL_LOAD_PREFILL), in ms milliseconds.
 * Ignored when the rate is pinned, amount <= 0, ms <= 0 or either is not finite. */
void kvl_load_est_add(kvl_load_est *e, int which, double amount, double ms);

/* 1 when all three throughputs are known (measured or pinned): only then does
 * kvl_load_est_decide consult the cost model. */
int kvl_load_est_ready(const kvl_load_est *e);

/* kvl_load_decide on the current estimates, except that before kvl_load_est_ready it returns 0
 * (load) without estimating: an unmeasured cost never forces a recompute. load_ms / recompute_ms
 * (may be NULL) are set to -1 then. */
int kvl_load_est_decide(const kvl_load_est *e, uint64_t encoded_bytes, uint64_t decoded_bytes, int32_t n_tokens,
                        double *load_ms, double *recompute_ms);

/* Pins costs from "name=value[,name=value...]" with names read_gbps, decode_gbps, prefill_tok_s
 * (positive) and fixed_ms (>= 0), each at most once; the named fields are set in e->costs and
 * marked pinned, the others keep being measured. Errors: KVL_ERR_INVALID_ARG with a message naming
 * the bad part (empty spec, unknown name, missing '=', a value that is not a finite number in
 * range, a name given twice). e is unchanged on error. */
kvl_status kvl_load_costs_parse(const char *spec, kvl_load_est *e);

/* ---------------------------------------------------------------- the load (CUDA builds) */

typedef struct kvl_codec_gpu kvl_codec_gpu;

enum { KVL_LOAD_FROM_STORE = 0, KVL_LOAD_RECOMPUTE = 1 };

typedef struct kvl_gpu_load_chunk {
    kvl_store_key key;      /* store key of the chunk's encoded cache */
    int32_t slot0;          /* first slot of the chunk in the kv cache */
    int32_t n_tokens;       /* tokens of the chunk (the cache must hold exactly this many) */
    int32_t position;       /* prompt position of the chunk's first token: keys are re-rotated by it */
    int32_t action;         /* KVL_LOAD_FROM_STORE or KVL_LOAD_RECOMPUTE */
    const int32_t *tokens;  /* [n_tokens], needed for KVL_LOAD_RECOMPUTE (borrowed) */
    int32_t raw;            /* 1: the stored value is raw bf16 KV in the codec's layout
                               [layers][k|v][tokens][C] (codec off), copied as is; bf16 kv only */
} kvl_gpu_load_chunk;

typedef struct kvl_gpu_load_req {
    kvl_store *store;
    const uint8_t *fingerprint;        /* the model's (kvl_model_fingerprint), checked by the store */
    kvl_model *model;                  /* CUDA backend */
    kvl_kv *kv;                        /* of model */
    kvl_codec_gpu *dec;
    const kvl_codec_profile *profile;  /* the profile the chunks were encoded with, or NULL */
    const kvl_gpu_load_chunk *chunks;
    int32_t n_chunks;
    int32_t group;                     /* chunks per read batch / decode launch; <= 0: 8 */
    int32_t no_rerotate;               /* 1: leave keys at positions 0..n-1 (tests) */
} kvl_gpu_load_req;

typedef struct kvl_gpu_load_stats {
    double read_ms;       /* store reads, summed over groups (on the reader thread) */
    double read_wait_ms;  /* time the decoding thread waited for reads (the part not hidden) */
    double decode_ms;     /* GPU decode calls (validation, staging, copy, kernel) */
    double kernel_ms;     /* of which the decode kernels */
    double rerotate_ms;   /* key re-rotation */
    double recompute_ms;  /* chunks prefilled from tokens */
    double total_ms;
    uint64_t bytes_read;  /* encoded bytes */
    int32_t n_loaded, n_recomputed;
    /* kvl_gpu_blend only */
    double compute_ms;    /* the layer-step forward pass on the calling thread, waits included */
    double layer_wait_ms; /* of which waiting for layers still being decoded (load not hidden) */
    double first_byte_ms; /* from the call to the first chunk bytes at hand */
    double first_layer_ms; /* from the call to layer 0 decoded in every chunk (the forward starts) */
} kvl_gpu_load_stats;

/* Fills the chunks' slots of req->kv (all layers, marked valid) from the store or by recompute.
 * Errors: KVL_ERR_INVALID_ARG (bad request, slot ranges outside the kv, overlapping chunks are
 * not checked), the store's errors for a chunk (KVL_ERR_KEY_NOT_FOUND, KVL_ERR_CORRUPT,
 * KVL_ERR_FINGERPRINT, ...), the decoder's (a malformed cache, a cache of another shape:
 * KVL_ERR_CODEC), CUDA errors. On error the kv's contents in the chunks' slots are unspecified. */
kvl_status kvl_gpu_load(const kvl_gpu_load_req *req, kvl_gpu_load_stats *stats);

/* Load and blend, pipelined by layer: a reader thread streams the chunks' caches from the store
 * (kvl_store_get_batch_stream: every chunk's prefix grows together, DRAM-tier hits at once), a
 * decoder thread decodes layer group by layer group as soon as every chunk's bytes of the group
 * have landed (every chunk's layers [l, l + k) in one launch, k = the layers whose bytes are all
 * there, 1 <= k <= layer_group, steps growing 1, 4, 16, ...; keys
 * re-rotated to the chunks' positions on the GPU; raw chunks copied), and the calling thread runs
 * the layer-step forward pass (kvl_fwd_layer) over slots [0, n) computing the slots idx at every
 * layer, each layer as soon as its K/V is in place: reading, decoding and recomputing overlap.
 * The answer counts only once the store has verified every chunk's checksum (decoding starts on
 * unverified bytes; a chunk failing verification fails the call).
 * Returns the logits of logit_slot (vocab floats). The load chunks must all be
 * KVL_LOAD_FROM_STORE; their slots are marked valid; slots in idx are recomputed at every layer.
 * Errors: those of kvl_gpu_load and kvl_fwd_*. */
typedef struct kvl_gpu_blend_req {
    kvl_gpu_load_req load;
    int32_t n;
    const int32_t *tokens, *positions; /* [n] */
    const int32_t *idx;                /* [n_idx] slots computed at every layer (recompute + query) */
    int32_t n_idx;
    int32_t layer_group;               /* most layers per decode step; <= 0: no limit */
    int32_t logit_slot;
    float *logits;
} kvl_gpu_blend_req;
kvl_status kvl_gpu_blend(const kvl_gpu_blend_req *r, kvl_gpu_load_stats *stats);

/* kvl_blend_load on the GPU, for a CacheBlend plan over a CUDA kv: the segments whose chunk cache
 * is still encoded (kvl_chunk_cache_create_encoded) are decoded by dec straight into their slots
 * (all in one launch), their keys re-rotated by the plan's rot_delta and their slots marked valid;
 * the other segments are loaded by kvl_blend_load_rest. Then kvl_blend_run runs the plan as usual.
 * profile: the one the encoded caches need, or NULL. Errors: those of kvl_blend_load, of
 * kvl_codec_gpu_decode (malformed or mismatched chunks), KVL_ERR_INVALID_ARG (not a CUDA kv). */
kvl_status kvl_gpu_blend_load(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv,
                              kvl_codec_gpu *dec, const kvl_codec_profile *profile);

/* kvl_gpu_blend_load + kvl_blend_run, pipelined by layer as kvl_gpu_blend is: the other segments
 * are loaded first (kvl_blend_load_rest), then a decoder thread stages the encoded caches layer
 * step by layer step (1, 4, 16, ... layers) while kvl_blend_run_hook runs the plan, each step's
 * decode kernel and key re-rotation queued on the forward pass's stream right before its first
 * layer. Same results as kvl_gpu_blend_load + kvl_blend_run, bit for bit. stats may be NULL.
 * Errors: those of both. */
kvl_status kvl_gpu_blend_run(kvl_model *m, kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv, kvl_codec_gpu *dec,
                             const kvl_codec_profile *profile, float *logits, kvl_gpu_load_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
