/* kvl_blend.h - CacheBlend: fuse independently cached chunks into one prompt with selective recompute.
 *
 * A RAG prompt is a list of segments: chunks whose KV cache was computed on its own (a kvl_chunk_cache,
 * prefilled at positions n_ctx.. behind an optional context such as a BOS or a fixed system prefix) and
 * uncached text (BOS, the question). kvl_blend_plan_build lays the segments out in slots/positions,
 * checks the caches against the model and decides, per layer, which tokens are computed; the caller
 * loads the caches into a kvl_kv (kvl_blend_load: copy + RoPE re-rotation of the keys by the position
 * delta) and runs the plan (kvl_blend_run). The plan is plain data so that the GPU path and the
 * loading pipeline (layer i+1 loads while layer i recomputes) can follow it.
 *
 * Modes:
 *   FULL   every token computed at every layer (the reference);
 *   NAIVE  cached K/V used as they are (after re-rotation); only uncached tokens computed;
 *   BLEND  layers before select_layer computed for every non-exact token; at the selection layer(s)
 *          fresh K/V of the candidates are compared with the cached ones and the top `ratio` of the
 *          cached tokens (plus every uncached token) are kept and computed from then on;
 *   PREFIX exact reuse of leading segments whose cache is a true prefix of the prompt; everything
 *          after is computed at every layer.
 * In every mode but FULL, a segment is reused exactly (never recomputed) when its cache is a true
 * prefix: every segment before it is exact too and the prompt's tokens in front of it equal the
 * context its cache was computed behind (e.g. BOS + first chunk with a BOS-prefixed cache).
 *
 * Thread-safety: plans and chunk caches are plain data; distinct plans may run on distinct kvl_kv
 * objects of one model concurrently (the engine serialises the CPU pool).
 */
#ifndef KVL_BLEND_H
#define KVL_BLEND_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_codec.h"
#include "kvl_engine.h"
#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- chunk caches */

/* The KV cache of one chunk, as ingest produces it and the store keeps it. Plain data, owned by
 * whoever created it (kvl_chunk_cache_free). */
typedef struct kvl_chunk_cache {
    uint8_t fingerprint[32];   /* kvl_model_fingerprint of the model that computed it */
    int32_t n_layers, n_kv_heads, head_dim; /* shape of kv, checked against the model */
    int32_t n_tokens;
    int32_t *tokens;           /* [n_tokens] the chunk's token ids */
    int32_t n_ctx;             /* tokens in front of the chunk when it was prefilled (0: bare) */
    int32_t *ctx;              /* [n_ctx] those tokens (BOS, a system prefix); their K/V is not kept */
    float *kv;                 /* [n_layers][k|v][n_tokens][n_kv_heads][head_dim] float32 (the codec
                                * layout); keys rotated for positions n_ctx .. n_ctx + n_tokens - 1 */
    const uint8_t *enc;        /* or, with kv NULL: the cache still encoded (KVLC bytes, borrowed, not
                                * freed with the cache), for a loader that decodes it in place (the
                                * GPU path, kvl_gpu_blend_load); kvl_blend_load refuses such caches */
    size_t enc_size;
} kvl_chunk_cache;

/* Prefills ctx[0..n_ctx) + tokens[0..n) at positions 0.. on model m and keeps the K/V of tokens
 * (the context's K/V is dropped). ctx may be NULL when n_ctx == 0. *out is owned by the caller.
 * Errors: KVL_ERR_INVALID_ARG, KVL_ERR_RANGE (n <= 0), KVL_ERR_POSITION_RANGE (n_ctx + n past the
 * model's context), KVL_ERR_TOKEN_RANGE, KVL_ERR_NOMEM. */
kvl_status kvl_chunk_cache_prefill(kvl_model *m, const int32_t *tokens, int32_t n, const int32_t *ctx,
                                   int32_t n_ctx, kvl_chunk_cache **out);

/* Builds a chunk cache around caller data (copied): kv in the layout above for n tokens of a model
 * with the given fingerprint and shape. For caches that come back from the store or the codec. */
kvl_status kvl_chunk_cache_create(const uint8_t fingerprint[32], int32_t n_layers, int32_t n_kv_heads,
                                  int32_t head_dim, const int32_t *tokens, int32_t n, const int32_t *ctx,
                                  int32_t n_ctx, const float *kv, kvl_chunk_cache **out);

/* A cache that stays encoded: enc[0..enc_size) (borrowed: must outlive the cache's use) holds the
 * KVLC chunk of n tokens; kv is NULL. Its shape is checked against the chunk's header. Errors: as
 * kvl_chunk_cache_create, KVL_ERR_SHAPE (the chunk holds another shape or token count), the
 * codec's header errors. */
kvl_status kvl_chunk_cache_create_encoded(const uint8_t fingerprint[32], int32_t n_layers, int32_t n_kv_heads,
                                          int32_t head_dim, const int32_t *tokens, int32_t n, const int32_t *ctx,
                                          int32_t n_ctx, const uint8_t *enc, size_t enc_size, kvl_chunk_cache **out);

/* Number of floats of cc->kv. */
size_t kvl_chunk_cache_floats(const kvl_chunk_cache *cc);

/* Passes cc->kv through the codec as a store round trip does: encodes it with opts (NULL: codec
 * defaults) and decodes the result back into cc->kv (float32). *encoded_bytes (may be NULL) gets the
 * encoded size. Errors from kvl_codec_encode / kvl_codec_decode. Not thread-safe per cc. */
kvl_status kvl_chunk_cache_codec_roundtrip(kvl_chunk_cache *cc, const kvl_codec_opts *opts, size_t *encoded_bytes);

/* Frees a chunk cache; NULL is fine. */
void kvl_chunk_cache_free(kvl_chunk_cache *cc);

/* ---------------------------------------------------------------- requests */

typedef enum kvl_blend_mode {
    KVL_BLEND_FULL = 0,
    KVL_BLEND_NAIVE = 1,
    KVL_BLEND_BLEND = 2,
    KVL_BLEND_PREFIX = 3
} kvl_blend_mode;

/* Parses "full" / "naive" / "blend" / "prefix"; returns -1 if unknown. */
int kvl_blend_mode_parse(const char *s);
const char *kvl_blend_mode_name(int mode);

/* One piece of the prompt: a cached chunk (cache != NULL; tokens come from the cache) or uncached
 * text (cache == NULL: tokens[0..n_tokens)). Pointers are borrowed for the call only. */
typedef struct kvl_blend_segment {
    const kvl_chunk_cache *cache;
    const int32_t *tokens;
    int32_t n_tokens;
} kvl_blend_segment;

/* Selection metric: the engine's kvl_dev_metric (K, V, K+V squared deviation) or this one: K and V
 * deviations each divided by their mean over the candidates, then added. */
#define KVL_BLEND_METRIC_KV_NORM 4

typedef struct kvl_blend_opts {
    int32_t mode;          /* kvl_blend_mode */
    float ratio;           /* BLEND: fraction of the cached (non-exact) tokens recomputed, [0, 1] */
    int32_t select_layer;  /* BLEND: first layer that computes a subset (default 1); the layers before
                            * it run on every non-exact token */
    int32_t metric;        /* BLEND: kvl_dev_metric or KVL_BLEND_METRIC_KV_NORM ranking the candidates */
    int32_t gradual_layers;/* BLEND: >1 = the paper's gradual filtering: selection at select_layer ..
                            * select_layer + gradual_layers - 1, the kept fraction narrowing linearly
                            * from gradual_first to ratio; 0 or 1 = one selection layer (the code's) */
    float gradual_first;   /* BLEND: kept fraction at the first of the gradual layers (>= ratio) */
    int32_t fresh_candidates; /* BLEND: 1 (default) = at a selection layer the fresh K/V of every
                            * candidate replaces its cached K/V (they are computed anyway); 0 = only
                            * the kept tokens' (CacheBlend's code) */
    int32_t attn_weight;   /* BLEND: 1 (default) = rank by deviation x (1 + a / mean a), a = attention
                            * mass the query tokens (the uncached tokens after the last cached one)
                            * put on each candidate at the selection layer; 0 = deviation alone;
                            * 2 = attention mass alone. At layer 0 (select_layer 0) both rank by
                            * the query's attention alone: a re-rotated cache equals a fresh
                            * prefill there, so only the query's attention tells tokens apart */
    int32_t chunk_head;    /* BLEND: the first chunk_head tokens of every cached chunk are recomputed
                            * at every layer (EPIC); they count towards ratio. With ratio 0 (and no
                            * gradual layers) nothing is ranked and only these + uncached tokens run */
    int32_t whole_chunks;  /* BLEND: 1 = select whole chunks, the largest mean score first (the last
                            * one partly, by token score); 0 = tokens */
    float budget;          /* BLEND: > 0 = derive the policy from this compute budget (cached
                            * token-layers recomputed / (cached tokens x layers), qkv-only work counted
                            * whole): from 10% with naive_rank_layer >= 0 (default) one selection at
                            * layer 0 keeping r = budget at every layer, ranked by the naive pass;
                            * below 10% one selection keeping r = budget ranked by the question's
                            * attention at layer 0; with naive_rank_layer -1: query-attention
                            * selection at layer 0 keeping 2r, narrowed to r at layer 1 by the
                            * query's attention there, r = budget * L / (L + 2) (below a 20% budget
                            * one layer-0 selection keeping r = budget);
                            * overrides ratio, select_layer, attn_weight, gradual_*, chunk_head and
                            * whole_chunks. Default 0.2; 0 = the ratio policy */
    float guard;           /* BLEND: > 0 = when the kept tokens hold less than this share of the
                            * candidates' total score at the selection layer, keep more (by score)
                            * until they do or guard_max_ratio of the cached tokens are kept; the
                            * kept counts of that layer and the ones after grow at run time. One
                            * selection layer only. 0 = off (default) */
    float guard_max_ratio; /* BLEND: cap of the guard's kept ratio (default 0.5) */
    int32_t naive_guard;   /* BLEND: 1 = fall back to naive reuse when the blend looks worse:
                            * kvl_blend_run first runs naive reuse (the uncached tokens only, no cached
                            * token recomputed), then the blend, and keeps the blend's kv and logits
                            * unless naive reuse's mean entropy at the logit slots is lower than the
                            * blend's by more than naive_guard_margin nats; then the kv and the
                            * logits are naive reuse's. Costs one more pass over the uncached tokens
                            * and a copy of the prompt's K/V. Needs logit slots (without them there
                            * is nothing to compare and the blend is kept). 0 = off (default: on
                            * facts13M it fell back on 1-24% of the prompts and raised the mean KL
                            * at most budgets; docs/blend.md) */
    float naive_guard_margin; /* BLEND: see naive_guard (default 0.1 nats) */
    int32_t naive_rank_layer; /* BLEND: >= 0 (default 1) = a layer-0 selection by attention (the budget
                            * policy, or select_layer 0 with attn_weight 2) ranks the cached tokens by
                            * the attention the question puts on them at this layer in a naive-reuse
                            * pass run first (the uncached tokens only, over the caches as they are;
                            * the pass the naive guard needs anyway); the budget policy then keeps
                            * r = budget of the cached tokens at every layer (from a 10% budget;
                            * below it the budget policy ranks by layer 0 as with -1). -1 = rank by
                            * the question's attention at layer 0 (and narrow at layer 1 from a 20%
                            * budget, see budget) */
} kvl_blend_opts;

/* Defaults (chosen by measurement, docs/blend.md): BLEND with the budget policy at a 20% budget,
 * ranked by the question's attention at layer 1 of a naive pass, no guard.
 * Set budget to 0 to use the ratio policy, whose defaults are ratio 0.15, select_layer 1, metric V,
 * one selection layer, fresh candidates, attention weighting, no chunk head, tokens, no guard. */
kvl_blend_opts kvl_blend_opts_default(void);

/* ---------------------------------------------------------------- the plan */

typedef enum kvl_slot_kind {
    KVL_SLOT_UNCACHED = 0, /* no cache: computed at every layer */
    KVL_SLOT_CACHED = 1,   /* position-independent chunk cache: a recompute candidate */
    KVL_SLOT_EXACT = 2     /* true-prefix cache: reused as it is */
} kvl_slot_kind;

/* What one layer computes. slots[0 .. n_qkv) get fresh Q/K/V; the first n_keep of them (ascending
 * slot order) have their fresh K/V written into the kv and go through attention + FFN; the rest
 * (qkv only) were candidates that lost the ranking and keep their cached K/V. In a layer with
 * select != 0 the identities of the kept slots are decided by the ranking while the layer runs:
 * before kvl_blend_run, the slots of that layer and of every later one are placeholders and only
 * the counts (n_qkv, n_keep) are final (unless opts.guard widens them); kvl_blend_run fills them in. Every layer's
 * slots are a subset of the previous layer's kept slots (the engine's nesting rule). */
typedef struct kvl_blend_layer {
    int32_t n_qkv;
    int32_t n_keep;
    int32_t select;         /* 1: ranked at this layer (deviation and/or attention); 2: layer 0 ranked by the
                             * query's attention before any cached token is computed: only the
                             * first n_keep slots get Q/K/V (the others are the ranked candidates) */
    int32_t *slots;         /* [n_qkv] (room for n_slots: the guard may widen the set at run time) */
} kvl_blend_layer;

/* Plain-data plan: slot layout, what each slot is, per-layer compute sets, cost counts. Created by
 * kvl_blend_plan_build, filled in by kvl_blend_run, freed by kvl_blend_plan_free. */
typedef struct kvl_blend_plan {
    int32_t mode;             /* kvl_blend_mode it was built for */
    int32_t metric;           /* kvl_dev_metric used at selection layers */
    int32_t fresh_candidates, attn_weight, whole_chunks; /* from kvl_blend_opts */
    double qkv_weight;        /* FLOPs of a token's Q/K/V projections / those of a whole token-layer */
    int32_t budget_policy;    /* 1: the policy came from opts.budget, 0: from the explicit options */
    float ratio;              /* BLEND: the kept ratio the plan uses (after opts.budget) */
    int32_t n_slots, n_layers;
    int32_t *tokens;          /* [n_slots] */
    int32_t *positions;       /* [n_slots] (slot i sits at position i) */
    uint8_t *kind;            /* [n_slots] kvl_slot_kind */
    uint8_t *pinned;          /* [n_slots] 1: computed at every layer, never ranked (uncached tokens,
                               * EPIC chunk-head tokens) */
    int32_t *segment;         /* [n_slots] segment index */
    int32_t *src_index;       /* [n_slots] token index inside its segment's cache (-1 uncached) */
    int32_t *rot_delta;       /* [n_slots] key rotation applied on load (position - cache position) */
    int32_t n_segments;
    int32_t *seg_slot0;       /* [n_segments] first slot of each segment */
    int32_t n_cached, n_exact, n_uncached; /* slot counts by kind */
    int32_t n_logits;
    int32_t *logit_slots;     /* [n_logits] slots whose logits are produced (computed at every layer) */
    kvl_blend_layer *layers;  /* [n_layers] */
    float guard, guard_max_ratio; /* from kvl_blend_opts */
    int32_t guard_added;      /* set by kvl_blend_run: tokens the guard added to the kept set */
    int32_t have_captured;    /* set by kvl_blend_run after the first selection layer ranked: */
    double captured;          /* share of the candidates' total score held by the kept ones */
    int32_t naive_guard;      /* from kvl_blend_opts (0 outside BLEND) */
    float naive_guard_margin;
    int32_t naive_rank_layer; /* from kvl_blend_opts when it applies to this plan, else -1 */
    float *naive_mass;        /* [n_slots] with naive_rank_layer >= 0: the question's attention at that
                               * layer in the naive pass (filled by kvl_blend_run) */
    int32_t fell_back;        /* set by kvl_blend_run: 1 when the naive guard kept naive reuse */
    double entropy_blend, entropy_naive; /* set by kvl_blend_run with the naive guard: mean entropy
                                          * (nats) at the logit slots of the blend / naive reuse */
} kvl_blend_plan;

/* Lays out segs[0..n_seg) in order at positions 0.., checks every cache (fingerprint of m, shape,
 * tokens in the vocabulary), the context length and the logit slots (each must be uncached, or any
 * slot in FULL mode), and builds the per-layer compute sets for opts (NULL: defaults).
 * Errors: KVL_ERR_FINGERPRINT (a cache from another model), KVL_ERR_SHAPE (cache shape differs from
 * the model's), KVL_ERR_CONTEXT_FULL (prompt past max_seq), KVL_ERR_TOKEN_RANGE, KVL_ERR_BLEND_PLAN
 * (logit slot that would not be computed, bad options), KVL_ERR_INVALID_ARG, KVL_ERR_NOMEM.
 * *out is owned by the caller (kvl_blend_plan_free). */
kvl_status kvl_blend_plan_build(kvl_model *m, const kvl_blend_segment *segs, int32_t n_seg,
                                const int32_t *logit_slots, int32_t n_logits, const kvl_blend_opts *opts,
                                kvl_blend_plan **out);
void kvl_blend_plan_free(kvl_blend_plan *p);

/* Cost of a plan: the sum over layers of the slots that get fresh Q/K/V (token-layers), split into
 * cached candidates (the recompute spent on cached tokens) and the rest. */
typedef struct kvl_blend_cost {
    int64_t token_layers;        /* sum_l n_qkv, plus n_uncached x n_layers for the naive guard's pass */
    int64_t cached_token_layers; /* sum_l (n_qkv restricted to KVL_SLOT_CACHED slots) */
    int64_t full_token_layers;   /* n_slots * n_layers: a full prefill */
    double cached_fraction;      /* cached_token_layers / (n_cached * n_layers), 0 if no cached slot:
                                  * a qkv-only token-layer counts as a whole one */
    double cached_work_fraction; /* same with a qkv-only token-layer counted at its FLOP share
                                  * (plan->qkv_weight) */
    int32_t final_cached;        /* cached slots computed at the last layer */
} kvl_blend_cost;
kvl_blend_cost kvl_blend_plan_cost(const kvl_blend_plan *p);

/* Writes the caches of p's cached and exact slots into kv (capacity >= n_slots, same model) and
 * re-rotates the keys by rot_delta (kvl_kv_rerotate); marks those slots valid and the uncached ones
 * invalid. segs must be the segments the plan was built from. All layers at once: a layer-by-layer
 * loader writes layer l of every cached slot with kvl_kv_write before layer l runs, following the
 * same plan. */
kvl_status kvl_blend_load(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv);

/* kvl_blend_load for the segments s with !placed[s] (placed may be NULL): a loader that put some
 * segments' K/V into kv itself (decoded on a GPU, keys re-rotated, slots valid) passes them as
 * placed. An encoded cache (kv NULL) must be placed. Errors: as kvl_blend_load. */
kvl_status kvl_blend_load_rest(kvl_model *m, const kvl_blend_plan *p, const kvl_blend_segment *segs, kvl_kv *kv,
                               const uint8_t *placed);

/* Runs plan p over kv (loaded by kvl_blend_load): every layer in order, ranking candidates at
 * selection layers (filling p->layers[l].slots with the kept slots first), and writes the logits of
 * p->logit_slots into logits [n_logits][vocab] (may be NULL when n_logits == 0). On return kv holds
 * the fused cache of the prompt. When the plan ranks by the naive pass (p->naive_rank_layer >= 0)
 * or has the naive guard, naive reuse runs first over the loaded kv (uncached slots only); with the
 * guard, kv and logits are naive reuse's when p->fell_back is set on return. Errors from the
 * engine, KVL_ERR_BLEND_PLAN for an inconsistent plan, KVL_ERR_NOMEM. */
kvl_status kvl_blend_run(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits);

/* kvl_blend_run calling hook(ctx, l) before anything of layer l runs (no engine call of this run is
 * in flight then), so that a loader can put layer l's cached K/V in place just in time (the GPU
 * load path decodes layer groups while earlier layers compute). With a naive pass first (the
 * naive-pass ranking, the guard) the hook is called before each layer of both passes: a loader must
 * treat a second call for a layer already in place as a no-op. A hook error ends the run with it. */
typedef kvl_status (*kvl_blend_layer_hook)(void *ctx, int32_t layer);
kvl_status kvl_blend_run_hook(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, float *logits, kvl_blend_layer_hook hook,
                              void *ctx);

#ifdef __cplusplus
}
#endif
#endif
