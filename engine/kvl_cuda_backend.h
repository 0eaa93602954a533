/* kvl_cuda_backend.h - device-memory plan of the CUDA backend (engine/backend_cuda.c).
 *
 * One plan per model: the weights (one allocation), the KV cache (per token, all layers, K and V)
 * and the workspace of a forward pass over n tokens (one allocation per pass, from a stream-ordered
 * pool that keeps freed memory for the next pass). Only built with KVL_HAVE_CUDA.
 */
#ifndef KVL_CUDA_BACKEND_H
#define KVL_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvl_cuda_plan {
    size_t weights;          /* bytes of weights on the device */
    size_t kv_per_token;     /* bytes of K+V of one token over all layers */
    size_t fwd_bytes;        /* workspace of one forward pass over n_tokens (n_compute computed) */
    size_t cublas_ws;        /* cuBLASLt workspace per model */
} kvl_cuda_plan;

/* Fills *p for a model of config c with weights (and activations, and KV) of weight_dtype, for a
 * forward pass over n_tokens slots. Pure arithmetic; no device needed. */
void kvl_cuda_plan_for(const kvl_model_config *c, int32_t weight_dtype, int32_t n_tokens, kvl_cuda_plan *p);

/* Device memory in use on the model's GPU (total - free, bytes) and the device's total; 0 on error. */
kvl_status kvl_cuda_mem_info(const kvl_model *m, size_t *used, size_t *total);

/* Device-side view of a CUDA-backend KV cache, for writers that fill it on the GPU (the GPU
 * CacheGen decoder of the load path): data is [n_layers][2][capacity][n_channels] of dtype
 * (kvl_cu_dtype: 0 float32, 1 bfloat16) on device `gpu`. Waits for the model's pending GPU work
 * first. The view stays valid until kvl_kv_free; a writer must finish (synchronise) before the next
 * engine call on this kv and mark the slots it filled with kvl_kv_set_valid.
 * Errors: KVL_ERR_INVALID_ARG (NULL, or a kv of another backend), KVL_ERR_CUDA. */
typedef struct kvl_cuda_kv_view {
    void *data;
    int32_t dtype;
    int32_t capacity, n_layers, n_channels;
    int32_t gpu;
    void *stream; /* the model's cudaStream_t: work queued on it is ordered with the engine's passes
                     (a pipeline may queue its decode kernels there, between forward-pass layers) */
} kvl_cuda_kv_view;
kvl_status kvl_cuda_kv_view_get(kvl_kv *kv, kvl_cuda_kv_view *out);

enum { KVL_CUDA_KV_F32 = 0, KVL_CUDA_KV_BF16 = 1 }; /* kvl_cuda_kv_view.dtype */

/* Bytes of one element of the view's KV (what a chunk cache decodes to on this model). */
static inline size_t kvl_cuda_kv_elem_bytes(const kvl_cuda_kv_view *v) { return v->dtype == KVL_CUDA_KV_BF16 ? 2 : 4; }

/* Number of CUDA devices visible (0 when there is no usable driver/device). Never fails. */
int kvl_cuda_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
