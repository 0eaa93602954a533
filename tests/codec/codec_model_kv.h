/* codec_model_kv.h - real KV for the codec tests: a model's prefill of a fixed token sequence. */
#ifndef KVL_CODEC_MODEL_KV_H
#define KVL_CODEC_MODEL_KV_H

#include <stdint.h>
#include <stdlib.h>

#include "kvl_codec.h"
#include "kvl_engine.h"

/* The K/V (float32, codec layout) of m prefilling min(max_seq, t_max) tokens (i * 37 + 11) mod vocab
 * at positions 0..; *sh receives its shape. malloc'ed; NULL on failure. */
static inline float *kvl_test_model_kv(kvl_model *m, int32_t t_max, kvl_codec_shape *sh) {
    const kvl_model_config *c = kvl_model_get_config(m);
    int32_t T = c->max_seq < t_max ? c->max_seq : t_max;
    int32_t *ids = malloc((size_t)T * 4), *pos = malloc((size_t)T * 4);
    *sh = (kvl_codec_shape){c->n_layers, T, c->n_kv_heads, c->head_dim};
    float *x = malloc((size_t)c->n_layers * 2 * (size_t)T * (size_t)c->n_kv_heads * (size_t)c->head_dim * 4);
    kvl_kv *kv = NULL;
    int ok = ids && pos && x;
    for (int32_t i = 0; ok && i < T; i++) {
        ids[i] = (int32_t)((i * 37 + 11) % c->vocab_size);
        pos[i] = i;
    }
    ok = ok && kvl_kv_create(m, T, &kv) == KVL_OK && kvl_forward(m, kv, T, ids, pos, NULL, 0, NULL, NULL) == KVL_OK &&
         kvl_kv_read(kv, 0, c->n_layers, 0, T, x) == KVL_OK;
    kvl_kv_free(kv);
    free(ids);
    free(pos);
    if (!ok) {
        free(x);
        return NULL;
    }
    return x;
}

#endif
