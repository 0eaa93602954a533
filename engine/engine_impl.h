/* engine_impl.h - private structures of the engine and the backend interface. */
#ifndef KVL_ENGINE_IMPL_H
#define KVL_ENGINE_IMPL_H

#include <pthread.h>

#include "kvl_engine.h"

/* Host copy of the weights, float32, in the model's own RoPE layout (cfg.rope_style).
 * One allocation; the per-tensor pointers point into it. */
typedef struct kvl_layer_w {
    float *attn_norm; /* [dim] */
    float *wq;        /* [n_heads*hd][dim] */
    float *wk;        /* [n_kv_heads*hd][dim] */
    float *wv;        /* [n_kv_heads*hd][dim] */
    float *wo;        /* [dim][n_heads*hd] */
    float *ffn_norm;  /* [dim] */
    float *w_gate;    /* [hidden][dim] */
    float *w_up;      /* [hidden][dim] */
    float *w_down;    /* [dim][hidden] */
} kvl_layer_w;

typedef struct kvl_weights {
    float *buf;       /* owns everything below */
    size_t n_floats;
    float *tok_emb;   /* [vocab][dim] */
    kvl_layer_w *layers;
    float *final_norm;/* [dim] */
    float *wcls;      /* [vocab][dim]; == tok_emb when tied */
} kvl_weights;

struct kvl_fwd;

/* A backend does the arithmetic; engine/forward.c does validation and bookkeeping, so every
 * backend gets inputs that are already checked. */
typedef struct kvl_backend_ops {
    const char *name;
    kvl_status (*model_init)(kvl_model *m);
    void (*model_fini)(kvl_model *m);
    kvl_status (*kv_alloc)(kvl_kv *kv);
    void (*kv_release)(kvl_kv *kv);
    kvl_status (*kv_write)(kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, const float *src);
    kvl_status (*kv_read)(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, float *dst);
    kvl_status (*kv_copy)(kvl_kv *dst, int32_t d0, const kvl_kv *src, int32_t s0, int32_t n);
    kvl_status (*kv_rerotate)(kvl_kv *kv, int32_t s0, int32_t n, int32_t delta);
    kvl_status (*fwd_init)(struct kvl_fwd *f);
    void (*fwd_fini)(struct kvl_fwd *f);
    kvl_status (*fwd_qkv)(struct kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n, float *k_out, float *v_out);
    kvl_status (*fwd_deviation)(struct kvl_fwd *f, int32_t metric, float *dev);
    kvl_status (*fwd_commit)(struct kvl_fwd *f, const int32_t *sub, int32_t n);
    kvl_status (*fwd_attn_ffn)(struct kvl_fwd *f, const int32_t *sub, int32_t n);
    kvl_status (*fwd_logits)(struct kvl_fwd *f, const int32_t *idx, int32_t n, float *logits);
    /* added for CacheBlend's attention-weighted selection; NULL: KVL_ERR_UNSUPPORTED */
    kvl_status (*fwd_attn_mass)(struct kvl_fwd *f, const int32_t *sub, int32_t n, float *mass);
} kvl_backend_ops;

extern const kvl_backend_ops kvl_backend_cpu;
#ifdef KVL_HAVE_CUDA
extern const kvl_backend_ops kvl_backend_cuda;
#endif

struct kvl_model {
    kvl_model_config cfg;
    kvl_model_opts opts;
    uint8_t fingerprint[32];
    kvl_weights w;          /* host weights; may be freed by a GPU backend after upload */
    int synthetic;          /* 1: weights are kvl_synth.h's formula for synth_seed (w may be empty:
                             * a GPU backend generates them on the device) */
    uint64_t synth_seed;
    const kvl_backend_ops *be;
    void *be_state;
    pthread_mutex_t mu;     /* serialises forward passes on the CPU pool */
};

struct kvl_kv {
    kvl_model *m;
    int32_t capacity;
    uint8_t *valid;         /* [capacity], host */
    void *data;             /* backend memory: [layer][2][capacity][kv_heads][hd] */
};

/* A forward pass in progress. The qkv step records which slots it computed ("pending"), in the
 * order given; commit and attn_ffn take positions into that list (sub) after forward.c maps slots. */
struct kvl_fwd {
    kvl_model *m;
    kvl_kv *kv;
    int32_t n;
    int32_t *tokens, *positions;  /* [n] copies */
    int32_t *done;                /* [n]: number of layers computed for the slot (0..L) */
    int32_t layer;                /* layer of the pending qkv, -1 none */
    int32_t *pend;                /* [n] slots of the pending qkv */
    int32_t n_pend;
    int32_t *pend_pos;            /* [n] slot -> index into pend, -1 */
    int32_t qkv_layer_done;       /* last layer whose attn_ffn ran, for order checks */
    void *be;                     /* backend state */
};

/* model_load.c helpers shared with the loaders */
kvl_status kvl_weights_alloc(kvl_weights *w, const kvl_model_config *cfg);
void kvl_weights_free(kvl_weights *w);
kvl_status kvl_config_validate(const kvl_model_config *cfg);
kvl_status kvl_model_finish(kvl_model *m, const kvl_model_opts *opts, int hash_weights,
                            uint64_t synthetic_seed);

kvl_status kvl_load_llama2c(const char *path, kvl_model_config *cfg, kvl_weights *w);
kvl_status kvl_load_hf(const char *dir, kvl_model_config *cfg, kvl_weights *w);

#endif
