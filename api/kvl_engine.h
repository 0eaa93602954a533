/* kvl_engine.h - models, KV caches and the forward pass.
 *
 * A kvl_model holds a Llama-architecture model (weights, config, fingerprint) bound to a backend
 * (the CPU reference backend is always built; CUDA plugs in behind the same interface).
 * A kvl_kv is a KV cache owned by the model's backend: [layer][k|v][slot][kv_head][head_dim], with
 * a "valid" bit per slot. A forward pass covers the slots 0..n-1 of a kv, with explicit token ids
 * and RoPE positions per slot; a token either is computed or takes its K/V from the cache. Attention
 * is causal by position: the query at slot i sees every slot j < n with positions[j] <= positions[i].
 *
 * Full prefill, prefill on top of a cached prefix, one-token decode and CacheBlend's selective
 * recompute are all this one primitive (kvl_forward for a fixed compute set, the kvl_fwd_* layer
 * steps when the set changes from layer to layer).
 *
 * Thread-safety: a kvl_model may be used by several threads at once for forward passes on distinct
 * kvl_kv objects; a kvl_kv and a kvl_fwd are used by one thread at a time.
 */
#ifndef KVL_ENGINE_H
#define KVL_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* RoPE pair layout of the q/k projection rows (and so of the cached keys). */
typedef enum kvl_rope_style {
    KVL_ROPE_HALF = 0,        /* Hugging Face: dim i pairs with i + head_dim/2 (rotate-half) */
    KVL_ROPE_INTERLEAVED = 1  /* llama2.c / Meta: dim 2i pairs with 2i+1 */
} kvl_rope_style;

typedef struct kvl_model_config {
    int32_t dim;          /* hidden size */
    int32_t hidden_dim;   /* FFN intermediate size */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t vocab_size;
    int32_t max_seq;      /* positions allowed: [0, max_seq) */
    float rope_theta;
    float norm_eps;
    int32_t tied_embeddings; /* 1: the classifier is the embedding matrix */
    int32_t rope_style;      /* kvl_rope_style */
    int32_t bos_id, eos_id;
} kvl_model_config;

typedef struct kvl_model kvl_model; /* opaque */
typedef struct kvl_kv kvl_kv;       /* opaque */
typedef struct kvl_fwd kvl_fwd;     /* opaque: one forward pass in progress */

typedef enum kvl_backend_kind { KVL_BACKEND_CPU = 0, KVL_BACKEND_CUDA = 1 } kvl_backend_kind;

typedef enum kvl_weight_dtype {
    KVL_WDTYPE_F32 = 0,  /* float32 weights (exactness checks; the CPU default) */
    KVL_WDTYPE_BF16 = 1  /* bfloat16 weights, float32 accumulation (the GPU default) */
} kvl_weight_dtype;

typedef struct kvl_model_opts {
    int32_t backend;      /* kvl_backend_kind */
    int32_t n_threads;    /* CPU threads; <= 0: $KVL_THREADS, else the number of online CPUs */
    int32_t gpu;          /* CUDA device ordinal */
    int32_t weight_dtype; /* kvl_weight_dtype for the backend's copy of the weights */
} kvl_model_opts;

/* Default options: CPU backend, automatic thread count, f32 weights. */
kvl_model_opts kvl_model_opts_default(void);

/* Loads a model. path is a Hugging Face directory (config.json + model.safetensors or sharded with
 * model.safetensors.index.json; f32/bf16/f16 tensors) or a llama2.c checkpoint (.bin, legacy
 * format). opts may be NULL (defaults). On success *out owns the model (kvl_model_free).
 * Errors: KVL_ERR_NOT_FOUND, KVL_ERR_MODEL_CONFIG, KVL_ERR_MODEL_WEIGHTS, KVL_ERR_TRUNCATED,
 * KVL_ERR_FORMAT, KVL_ERR_NOMEM, with a detail message (kvl_last_error). */
kvl_status kvl_model_load(const char *path, const kvl_model_opts *opts, kvl_model **out);

/* Builds a model with seeded synthetic weights for cfg (speed work where no real weights exist).
 * The same (cfg, seed) gives the same weights on every backend. */
kvl_status kvl_model_synthetic(const kvl_model_config *cfg, uint64_t seed,
                               const kvl_model_opts *opts, kvl_model **out);

/* Frees a model; NULL is fine. All its kv objects must be freed first. */
void kvl_model_free(kvl_model *m);

/* The model's config (owned by the model). */
const kvl_model_config *kvl_model_get_config(const kvl_model *m);

/* SHA-256 over the canonical config and every weight (float32 little-endian): 32 bytes owned by
 * the model. Two files holding the same weights in the same RoPE layout give the same value. */
const uint8_t *kvl_model_fingerprint(const kvl_model *m);

/* Hex form of the fingerprint into out (65 bytes incl. NUL). */
void kvl_model_fingerprint_hex(const kvl_model *m, char out[65]);

/* Backend of the model (kvl_backend_kind) and its human name ("cpu", "cuda"). */
int kvl_model_backend(const kvl_model *m);
const char *kvl_model_backend_name(const kvl_model *m);

/* Number of float elements of one layer's K (or V) for n tokens: n * n_kv_heads * head_dim. */
size_t kvl_model_kv_elems_per_layer(const kvl_model *m, int32_t n_tokens);

/* ---------------------------------------------------------------- KV cache */

/* Creates an empty KV cache with room for capacity slots (capacity <= max_seq is not required:
 * positions, not slots, are bounded by max_seq). *out is owned by the caller (kvl_kv_free). */
kvl_status kvl_kv_create(kvl_model *m, int32_t capacity, kvl_kv **out);
void kvl_kv_free(kvl_kv *kv);
int32_t kvl_kv_capacity(const kvl_kv *kv);

/* Marks every slot invalid (contents untouched). */
void kvl_kv_clear(kvl_kv *kv);

/* Copies K/V of slots [slot0, slot0+n) and layers [layer0, layer0+n_layers) into / out of a host
 * buffer in the codec layout [layer][k|v][token][kv_head][head_dim] (float32). Writing marks the
 * slots valid once all layers of a slot have been written (a write of layers [0, n_layers) does;
 * partial-layer writes mark nothing, kvl_kv_set_valid does). Not thread-safe per kv. */
kvl_status kvl_kv_write(kvl_kv *kv, int32_t layer0, int32_t n_layers, int32_t slot0, int32_t n,
                        const float *src);
kvl_status kvl_kv_read(const kvl_kv *kv, int32_t layer0, int32_t n_layers, int32_t slot0,
                       int32_t n, float *dst);
kvl_status kvl_kv_set_valid(kvl_kv *kv, int32_t slot0, int32_t n, int valid);
int kvl_kv_is_valid(const kvl_kv *kv, int32_t slot);

/* Copies slots [src0, src0+n) of src into slots [dst0, dst0+n) of dst (same model), all layers,
 * validity included. */
kvl_status kvl_kv_copy(kvl_kv *dst, int32_t dst0, const kvl_kv *src, int32_t src0, int32_t n);

/* Rotates the cached keys of slots [slot0, slot0+n) by delta positions (RoPE is a rotation: a key
 * computed at position p becomes the key at p + delta). Values are unchanged. */
kvl_status kvl_kv_rerotate(kvl_kv *kv, int32_t slot0, int32_t n, int32_t delta);

/* ---------------------------------------------------------------- forward pass */

/* One forward pass over slots [0, n) with one compute set for all layers.
 *   tokens, positions: [n] (token ids in [0, vocab), positions in [0, max_seq))
 *   compute: [n], 1 = compute this token (its K/V is written into kv, slot marked valid),
 *            0 = take its K/V from kv (must be valid); NULL = compute all.
 *   logit_idx: [n_logits] slots whose logits are wanted (each must be computed);
 *   logits: [n_logits][vocab] float32 out (may be NULL when n_logits == 0). */
kvl_status kvl_forward(kvl_model *m, kvl_kv *kv, int32_t n, const int32_t *tokens,
                       const int32_t *positions, const uint8_t *compute, int32_t n_logits,
                       const int32_t *logit_idx, float *logits);

/* Layer-by-layer form for plans whose compute set changes per layer (CacheBlend).
 * kvl_fwd_begin validates tokens/positions and embeds nothing yet; kvl_fwd_layer computes layer
 * `layer` (layers must be run in order 0..L-1) for the slots idx[0..n_idx): each must have been
 * computed at the previous layer (or layer == 0). Per layer it runs, in order:
 *   qkv:    K/V (RoPE applied) and Q for idx;
 *   commit: the fresh K/V of idx written into kv (unless KVL_FWD_NO_COMMIT);
 *   attn+ffn for the queries idx over all slots [0, n) that are valid.
 * kvl_fwd_qkv / kvl_fwd_deviation / kvl_fwd_commit / kvl_fwd_attn_ffn expose the steps so that a
 * caller can compare fresh K/V to the cached ones before deciding what to keep. */
kvl_status kvl_fwd_begin(kvl_model *m, kvl_kv *kv, int32_t n, const int32_t *tokens,
                         const int32_t *positions, kvl_fwd **out);
void kvl_fwd_free(kvl_fwd *f);

kvl_status kvl_fwd_layer(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n_idx);

/* Step 1: Q/K/V of layer for idx (kept inside f, not yet in kv). If k_out/v_out are not NULL they
 * receive the fresh K and V, [n_idx][kv_heads][head_dim] each (float32, host). */
kvl_status kvl_fwd_qkv(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n_idx, float *k_out,
                       float *v_out);

typedef enum kvl_dev_metric { KVL_DEV_K = 1, KVL_DEV_V = 2, KVL_DEV_KV = 3 } kvl_dev_metric;

/* Step 1b: per-token squared L2 deviation between the fresh K/V of the last kvl_fwd_qkv and the
 * K/V currently in kv for those slots (which must be valid): dev[n_idx], ordered as the idx given to
 * kvl_fwd_qkv. */
kvl_status kvl_fwd_deviation(kvl_fwd *f, int32_t metric, float *dev);

/* Step 2: writes the fresh K/V of the slots idx (a subset of the last kvl_fwd_qkv's idx) into kv
 * and marks them valid. */
kvl_status kvl_fwd_commit(kvl_fwd *f, const int32_t *idx, int32_t n_idx);

/* Step 2b (CacheBlend's attention-weighted selection): for the queries idx (a subset of the last
 * kvl_fwd_qkv's slots, their fresh Q), the softmax attention probabilities over the valid slots of
 * [0, n) with this layer's K as it is now in kv (commit first what should be fresh), causal by
 * position, summed over heads and queries: mass[n] (invalid slots get 0). Read-only on kv.
 * KVL_ERR_UNSUPPORTED on a backend without this step. */
kvl_status kvl_fwd_attn_mass(kvl_fwd *f, const int32_t *idx, int32_t n_idx, float *mass);

/* Step 3: attention (queries idx, a subset of the last kvl_fwd_qkv's idx) over the valid slots of
 * [0, n), output projection, residual, FFN, residual: the hidden states of idx for the next layer. */
kvl_status kvl_fwd_attn_ffn(kvl_fwd *f, const int32_t *idx, int32_t n_idx);

/* Final norm + classifier for slots idx (computed through the last layer): logits [n_idx][vocab]. */
kvl_status kvl_fwd_logits(kvl_fwd *f, const int32_t *idx, int32_t n_idx, float *logits);

/* ---------------------------------------------------------------- sampling and generation */

/* Picks a token from logits[vocab]: argmax when temperature <= 0, else a draw from
 * softmax(logits / temperature) with the xorshift state *rng (advanced). */
int32_t kvl_sample(const float *logits, int32_t vocab, float temperature, uint64_t *rng);

/* Called for every generated token; return nonzero to stop. */
typedef int (*kvl_token_cb)(int32_t token, void *user);

/* Generates up to max_new tokens after prompt[0..n_prompt) (prefill, then one-token decodes),
 * stopping early at EOS/BOS or when cb returns nonzero. out (may be NULL) receives the generated ids,
 * *n_out their count. positions are 0..; the prompt plus output must fit in max_seq. */
kvl_status kvl_generate(kvl_model *m, const int32_t *prompt, int32_t n_prompt, int32_t max_new,
                        float temperature, uint64_t seed, kvl_token_cb cb, void *user,
                        int32_t *out, int32_t *n_out);

#ifdef __cplusplus
}
#endif
#endif
