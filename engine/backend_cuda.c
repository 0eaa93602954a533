/* The CUDA backend: weights, KV cache and activations in device memory; cuBLASLt GEMMs; kernels in
 * kernels/cuda (kvl_cuda.h). forward.c has already validated every argument.
 *
 * Types: with KVL_WDTYPE_F32 everything is float32 (GEMMs with CUBLAS_COMPUTE_32F: no TF32), the
 * exactness mode. With KVL_WDTYPE_BF16 weights, GEMM inputs, the K/V cache and attention are bf16
 * with float32 accumulation; the residual stream and norms stay float32.
 * Device weight layout per layer: wqkv [q|k|v rows][dim] (one GEMM), wo, wgu [gate|up rows][dim]
 * (one GEMM), wdown; norm gains float32.
 * $KVL_CUDA_ATTN (auto, generic, mma, wg1, wg2, wg2r, wg2h, wg3, wg4, wg4s3) picks the attention kernel for comparisons (kvl_cuda.h).
 * Concurrency: one stream and one cuBLASLt handle per model; every entry point holds the model's
 * mutex, so forward passes of several threads interleave but never overlap on the GPU.
 */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_impl.h"
#include "kvl_cpu.h"
#include "kvl_cuda.h"
#include "kvl_cuda_backend.h"
#include "kvl_synth.h"

#define FFN_CHUNK 8192   /* rows of the FFN intermediate held at once */
#define LOGIT_CHUNK 256  /* rows of logits produced per GEMM */
#define LT_WS (32u << 20)
#define GEMM_CACHE 48
#define GEMM_TRY 8 /* cuBLASLt candidates timed for a large product */

typedef struct {
    int used;
    int64_t M, N, K, ldo;
    cudaDataType_t at, ot;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} gemm_entry;

typedef struct {
    float *attn_norm, *ffn_norm;
    void *wqkv, *wo, *wgu, *wdown;
} cu_layer;

/* op classes of KVL_CUDA_PROFILE */
enum { PR_NORM, PR_QKV, PR_ROPE, PR_ATTN, PR_WO, PR_GU, PR_SWIGLU, PR_DOWN, PR_LOGITS, PR_N };

typedef struct {
    int dev;
    cudaStream_t st;
    cublasLtHandle_t lt;
    void *lt_ws;
    kvl_cu_dtype wt; /* weights and GEMM inputs */
    kvl_cu_dtype kt; /* Q/K/V, the KV cache and attention: bf16 where the tensor-core attention
                      * kernel takes the head_dim, else float32 (the generic kernel computes in
                      * float32; bf16 storage would only lose precision) */
    void *wbuf;
    void *emb, *cls;
    float *final_norm;
    cu_layer *L;
    gemm_entry gc[GEMM_CACHE];
    int gc_next;
    int att_mode; /* KVL_CU_ATT_* */
    kvl_cu_dtype bt; /* output of the residual-branch GEMMs (attention output and FFN down
                      * projections) before they are added to the float32 residual */
    int prof;        /* KVL_CUDA_PROFILE=1: time each op class of a pass (synchronising) */
    cudaEvent_t pe[2];
    double pms[PR_N];
} cu_model;

static const char *const pr_name[PR_N] = {"embed+norm+residual", "qkv_gemm", "rope", "attention", "o_gemm",
                                          "gate_up_gemm", "swiglu", "down_gemm", "logits"};

static void prof_begin(cu_model *c) {
    if (c->prof) cudaEventRecord(c->pe[0], c->st);
}
static void prof_end(cu_model *c, int k) {
    if (!c->prof) return;
    float ms = 0;
    if (cudaEventRecord(c->pe[1], c->st) == cudaSuccess && cudaEventSynchronize(c->pe[1]) == cudaSuccess &&
        cudaEventElapsedTime(&ms, c->pe[0], c->pe[1]) == cudaSuccess)
        c->pms[k] += ms;
}

/* staged index lists of a forward pass: uploaded only when they change */
enum { IX_QKV, IX_COMMIT, IX_ATTN, IX_LOGITS, IX_N };

typedef struct {
    int32_t *d_tok, *d_pos;  /* [n] by slot */
    float *x;                /* [n][D] residual by slot */
    void *xn;                /* [n][D] normed (GEMM input) */
    void *qkv;               /* [n][qd+2kd] */
    void *q, *qg;            /* [n][qd] pending order / gathered for attention */
    void *kf, *vf;           /* [n][kd] fresh K/V, pending order */
    void *att;               /* [n][qd] */
    void *tmp;               /* [n][D] of the residual-branch type (cu_model.bt) */
    void *gu, *hb;           /* [chunk][2F], [chunk][F] */
    float *kvout;            /* [n][2kd] float32 read-out of fresh K/V */
    float *dev;              /* [n] */
    float *logit;            /* [LOGIT_CHUNK][V] */
    void *att_ws;
    int32_t *d_ix[IX_N];     /* [3n] each */
    int32_t *h_ix[IX_N];     /* host copy of what d_ix holds */
    int32_t n_ix[IX_N];
    void *block;             /* the one allocation */
} cu_fwd;

#define CM(m) ((cu_model *)(m)->be_state)

static kvl_status cuda_err(cudaError_t e, const char *what) {
    if (e == cudaErrorMemoryAllocation) return kvl_errorf(KVL_ERR_GPU_OOM, "%s: out of device memory", what);
    return kvl_errorf(KVL_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
}

#define CU(call)                                                          \
    do {                                                                  \
        cudaError_t e_ = (call);                                          \
        if (e_ != cudaSuccess) return cuda_err(e_, #call);                \
    } while (0)
#define LT(call)                                                          \
    do {                                                                  \
        cublasStatus_t e_ = (call);                                       \
        if (e_ != CUBLAS_STATUS_SUCCESS)                                  \
            return kvl_errorf(KVL_ERR_CUBLAS, "%s: cuBLAS status %d", #call, (int)e_); \
    } while (0)

static size_t al(size_t b) { return (b + 255) & ~(size_t)255; }

int kvl_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/* ------------------------------------------------------------ plan */

typedef struct {
    size_t emb, cls, final_norm, layer, qkv, wo, gu, down, norm;
} wsizes;

static wsizes weight_sizes(const kvl_model_config *c, size_t es) {
    size_t D = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim, kd = (size_t)c->n_kv_heads * c->head_dim,
           F = (size_t)c->hidden_dim, V = (size_t)c->vocab_size;
    wsizes w;
    w.emb = al(V * D * es);
    w.cls = c->tied_embeddings ? 0 : al(V * D * es);
    w.final_norm = al(D * 4);
    w.norm = al(D * 4);
    w.qkv = al((qd + 2 * kd) * D * es);
    w.wo = al(D * qd * es);
    w.gu = al(2 * F * D * es);
    w.down = al(D * F * es);
    w.layer = 2 * w.norm + w.qkv + w.wo + w.gu + w.down;
    return w;
}

/* byte offsets of the per-pass buffers; returns the total */
typedef struct {
    size_t tok, pos, x, xn, qkv, q, qg, kf, vf, att, tmp, gu, hb, kvout, dev, logit, ix[IX_N], att_ws, total;
} fsizes;

static kvl_cu_dtype kv_type(const kvl_model_config *c, kvl_cu_dtype wt) {
    return wt == KVL_CU_BF16 && (c->head_dim == 64 || c->head_dim == 128) ? KVL_CU_BF16 : KVL_CU_F32;
}

static fsizes fwd_sizes(const kvl_model_config *c, size_t es, size_t ek, int32_t n) {
    size_t N = (size_t)n, D = (size_t)c->dim, qd = (size_t)c->n_heads * c->head_dim,
           kd = (size_t)c->n_kv_heads * c->head_dim, F = (size_t)c->hidden_dim;
    size_t ch = N < FFN_CHUNK ? N : FFN_CHUNK, lc = N < LOGIT_CHUNK ? N : LOGIT_CHUNK;
    fsizes f;
    size_t o = 0;
#define PUT(field, bytes) do { f.field = o; o += al(bytes); } while (0)
    PUT(tok, N * 4);
    PUT(pos, N * 4);
    PUT(x, N * D * 4);
    PUT(xn, N * D * es);
    PUT(qkv, N * (qd + 2 * kd) * ek);
    PUT(q, N * qd * ek);
    PUT(qg, N * qd * (ek > es ? ek : es));
    PUT(kf, N * kd * ek);
    PUT(vf, N * kd * ek);
    PUT(att, N * qd * ek);
    PUT(tmp, N * D * 4);
    PUT(gu, ch * 2 * F * es);
    PUT(hb, ch * F * es);
    PUT(kvout, N * 2 * kd * 4);
    PUT(dev, N * 4);
    PUT(logit, lc * (size_t)c->vocab_size * 4);
    for (int i = 0; i < IX_N; i++) PUT(ix[i], 3 * N * 4);
    PUT(att_ws, kvl_cu_attention_ws(n, n, c->n_heads, c->n_kv_heads, c->head_dim));
#undef PUT
    f.total = o;
    return f;
}

void kvl_cuda_plan_for(const kvl_model_config *c, int32_t wdt, int32_t n, kvl_cuda_plan *p) {
    kvl_cu_dtype wt = wdt == KVL_WDTYPE_BF16 ? KVL_CU_BF16 : KVL_CU_F32;
    size_t es = kvl_cu_dtype_size(wt), ek = kvl_cu_dtype_size(kv_type(c, wt));
    wsizes w = weight_sizes(c, es);
    p->weights = w.emb + w.cls + w.final_norm + (size_t)c->n_layers * w.layer;
    p->kv_per_token = (size_t)c->n_layers * 2 * (size_t)c->n_kv_heads * c->head_dim * ek;
    p->fwd_bytes = fwd_sizes(c, es, ek, n).total;
    p->cublas_ws = LT_WS;
}

kvl_status kvl_cuda_mem_info(const kvl_model *m, size_t *used, size_t *total) {
    if (!m || m->opts.backend != KVL_BACKEND_CUDA) return kvl_errorf(KVL_ERR_INVALID_ARG, "not a CUDA model");
    CU(cudaSetDevice(CM(m)->dev));
    size_t fr = 0, to = 0;
    CU(cudaMemGetInfo(&fr, &to));
    *used = to - fr;
    *total = to;
    return KVL_OK;
}

kvl_status kvl_cuda_kv_view_get(kvl_kv *kv, kvl_cuda_kv_view *out) {
    if (!kv || !out || kv->m->opts.backend != KVL_BACKEND_CUDA || !kv->data)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "not a CUDA kv cache");
    cu_model *c = CM(kv->m);
    pthread_mutex_lock(&kv->m->mu);
    cudaError_t e = cudaSetDevice(c->dev);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->st);
    pthread_mutex_unlock(&kv->m->mu);
    if (e != cudaSuccess) return cuda_err(e, "kv view");
    *out = (kvl_cuda_kv_view){kv->data, (int32_t)c->kt, kv->capacity, kv->m->cfg.n_layers,
                              kv->m->cfg.n_kv_heads * kv->m->cfg.head_dim, c->dev, (void *)c->st};
    return KVL_OK;
}

/* ------------------------------------------------------------ GEMM: out[n][M] = x[n][K] . w[M][K]^T */

static kvl_status gemm(cu_model *c, void *out, kvl_cu_dtype ot, int64_t ldo, const void *x, const void *w, int64_t M,
                       int64_t N, int64_t K) {
    if (N <= 0) return KVL_OK;
    cudaDataType_t at = c->wt == KVL_CU_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    cudaDataType_t odt = ot == KVL_CU_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    gemm_entry *g = NULL;
    for (int i = 0; i < GEMM_CACHE; i++) {
        gemm_entry *e = &c->gc[i];
        if (e->used && e->M == M && e->N == N && e->K == K && e->ldo == ldo && e->at == at && e->ot == odt) {
            g = e;
            break;
        }
    }
    if (!g) {
        g = &c->gc[c->gc_next];
        c->gc_next = (c->gc_next + 1) % GEMM_CACHE;
        if (g->used) {
            cublasLtMatmulDescDestroy(g->op);
            cublasLtMatrixLayoutDestroy(g->la);
            cublasLtMatrixLayoutDestroy(g->lb);
            cublasLtMatrixLayoutDestroy(g->lc);
            g->used = 0;
        }
        LT(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        LT(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        LT(cublasLtMatrixLayoutCreate(&g->la, at, (uint64_t)K, (uint64_t)M, K));
        LT(cublasLtMatrixLayoutCreate(&g->lb, at, (uint64_t)K, (uint64_t)N, K));
        LT(cublasLtMatrixLayoutCreate(&g->lc, odt, (uint64_t)M, (uint64_t)N, ldo));
        cublasLtMatmulPreference_t pref;
        LT(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t wsz = LT_WS;
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz);
        cublasLtMatmulHeuristicResult_t res[GEMM_TRY];
        int nres = 0;
        cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(c->lt, g->op, g->la, g->lb, g->lc, g->lc, pref, GEMM_TRY, res, &nres);
        cublasLtMatmulPreferenceDestroy(pref);
        if (hs != CUBLAS_STATUS_SUCCESS || nres < 1) {
            cublasLtMatmulDescDestroy(g->op);
            cublasLtMatrixLayoutDestroy(g->la);
            cublasLtMatrixLayoutDestroy(g->lb);
            cublasLtMatrixLayoutDestroy(g->lc);
            return kvl_errorf(KVL_ERR_CUBLAS, "no cuBLASLt algorithm for %lldx%lldx%lld (status %d)", (long long)M,
                              (long long)N, (long long)K, (int)hs);
        }
        g->algo = res[0].algo;
        /* large products: time the candidates once on the real operands and keep the fastest
         * (the output is recomputed below with the chosen one) */
        if ((double)M * (double)N * (double)K >= 1e10 && nres > 1) {
            cudaEvent_t e0, e1;
            float best = 1e30f;
            if (cudaEventCreate(&e0) == cudaSuccess) {
                if (cudaEventCreate(&e1) == cudaSuccess) {
                    float one = 1.0f, zero = 0.0f;
                    for (int i = 0; i < nres; i++) {
                        int ok = cublasLtMatmul(c->lt, g->op, &one, w, g->la, x, g->lb, &zero, out, g->lc, out, g->lc,
                                                &res[i].algo, c->lt_ws, LT_WS, c->st) == CUBLAS_STATUS_SUCCESS;
                        cudaEventRecord(e0, c->st);
                        for (int r = 0; r < 2 && ok; r++)
                            ok = cublasLtMatmul(c->lt, g->op, &one, w, g->la, x, g->lb, &zero, out, g->lc, out, g->lc,
                                                &res[i].algo, c->lt_ws, LT_WS, c->st) == CUBLAS_STATUS_SUCCESS;
                        cudaEventRecord(e1, c->st);
                        float ms = 0;
                        if (ok && cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess &&
                            ms < best) {
                            best = ms;
                            g->algo = res[i].algo;
                        }
                    }
                    cudaEventDestroy(e1);
                }
                cudaEventDestroy(e0);
            }
            (void)cudaGetLastError();
        }
        g->M = M; g->N = N; g->K = K; g->ldo = ldo; g->at = at; g->ot = odt;
        g->used = 1;
    }
    float alpha = 1.0f, beta = 0.0f;
    LT(cublasLtMatmul(c->lt, g->op, &alpha, w, g->la, x, g->lb, &beta, out, g->lc, out, g->lc, &g->algo, c->lt_ws,
                      LT_WS, c->st));
    return KVL_OK;
}

/* ------------------------------------------------------------ model */

static kvl_status upload(cu_model *c, void *dst, const float *src, size_t count, void *stage, size_t stage_floats) {
    if (c->wt == KVL_CU_F32) {
        CU(cudaMemcpyAsync(dst, src, count * 4, cudaMemcpyHostToDevice, c->st));
        return KVL_OK;
    }
    for (size_t o = 0; o < count; o += stage_floats) {
        size_t k = count - o < stage_floats ? count - o : stage_floats;
        CU(cudaMemcpyAsync(stage, src + o, k * 4, cudaMemcpyHostToDevice, c->st));
        CU(kvl_cu_convert((char *)dst + o * 2, KVL_CU_BF16, stage, KVL_CU_F32, k, c->st));
    }
    return KVL_OK;
}

static kvl_status synth(cu_model *c, void *dst, kvl_cu_dtype dt, uint64_t seed, uint32_t tid, size_t count, int norm,
                        double scale) {
    CU(kvl_cu_synth_fill(dst, dt, seed, tid, count, norm, (float)scale, c->st));
    return KVL_OK;
}

static kvl_status place_weights(kvl_model *m) {
    cu_model *c = CM(m);
    const kvl_model_config *k = &m->cfg;
    size_t es = kvl_cu_dtype_size(c->wt);
    wsizes ws = weight_sizes(k, es);
    size_t total = ws.emb + ws.cls + ws.final_norm + (size_t)k->n_layers * ws.layer;
    cudaError_t e = cudaMalloc(&c->wbuf, total);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        c->wbuf = NULL;
        return kvl_errorf(e == cudaErrorMemoryAllocation ? KVL_ERR_GPU_OOM : KVL_ERR_CUDA,
                          "cannot allocate %.2f GiB of weights on GPU %d: %s", (double)total / (1 << 30), c->dev,
                          cudaGetErrorString(e));
    }
    c->L = calloc((size_t)k->n_layers, sizeof *c->L);
    if (!c->L) return KVL_ERR_NOMEM;
    char *p = c->wbuf;
    c->emb = p; p += ws.emb;
    c->cls = k->tied_embeddings ? c->emb : p; p += ws.cls;
    c->final_norm = (float *)p; p += ws.final_norm;
    for (int l = 0; l < k->n_layers; l++) {
        cu_layer *L = &c->L[l];
        L->attn_norm = (float *)p; p += ws.norm;
        L->ffn_norm = (float *)p; p += ws.norm;
        L->wqkv = p; p += ws.qkv;
        L->wo = p; p += ws.wo;
        L->wgu = p; p += ws.gu;
        L->wdown = p; p += ws.down;
    }
    size_t D = (size_t)k->dim, qd = (size_t)k->n_heads * k->head_dim, kd = (size_t)k->n_kv_heads * k->head_dim,
           F = (size_t)k->hidden_dim, V = (size_t)k->vocab_size;
    if (m->synthetic && !m->w.buf) {
        /* same tensor ids and scales as kvl_model_synthetic's host fill */
        uint64_t sd = m->synth_seed;
        KVL_TRY(synth(c, c->emb, c->wt, sd, 0, V * D, 0, 1.0));
        for (int l = 0; l < k->n_layers; l++) {
            cu_layer *L = &c->L[l];
            uint32_t b = 1 + KVL_SYN_PER_LAYER * (uint32_t)l;
            KVL_TRY(synth(c, L->attn_norm, KVL_CU_F32, sd, b + KVL_SYN_ATTN_NORM, D, 1, 1));
            KVL_TRY(synth(c, L->wqkv, c->wt, sd, b + KVL_SYN_WQ, qd * D, 0, 1 / sqrt((double)D)));
            KVL_TRY(synth(c, (char *)L->wqkv + qd * D * es, c->wt, sd, b + KVL_SYN_WK, kd * D, 0, 1 / sqrt((double)D)));
            KVL_TRY(synth(c, (char *)L->wqkv + (qd + kd) * D * es, c->wt, sd, b + KVL_SYN_WV, kd * D, 0, 1 / sqrt((double)D)));
            KVL_TRY(synth(c, L->wo, c->wt, sd, b + KVL_SYN_WO, D * qd, 0, 1 / sqrt((double)qd)));
            KVL_TRY(synth(c, L->ffn_norm, KVL_CU_F32, sd, b + KVL_SYN_FFN_NORM, D, 1, 1));
            KVL_TRY(synth(c, L->wgu, c->wt, sd, b + KVL_SYN_GATE, F * D, 0, 1 / sqrt((double)D)));
            KVL_TRY(synth(c, (char *)L->wgu + F * D * es, c->wt, sd, b + KVL_SYN_UP, F * D, 0, 1 / sqrt((double)D)));
            KVL_TRY(synth(c, L->wdown, c->wt, sd, b + KVL_SYN_DOWN, D * F, 0, 1 / sqrt((double)F)));
        }
        KVL_TRY(synth(c, c->final_norm, KVL_CU_F32, sd, 1 + KVL_SYN_PER_LAYER * (uint32_t)k->n_layers, D, 1, 1));
        if (!k->tied_embeddings)
            KVL_TRY(synth(c, c->cls, c->wt, sd, 2 + KVL_SYN_PER_LAYER * (uint32_t)k->n_layers, V * D, 0, 1 / sqrt((double)D)));
        CU(cudaStreamSynchronize(c->st));
        return KVL_OK;
    }
    if (!m->w.buf) return kvl_errorf(KVL_ERR_INTERNAL, "CUDA backend: the model has no host weights to upload");
    const size_t stage_floats = (size_t)16 << 20;
    void *stage = NULL;
    if (c->wt == KVL_CU_BF16) CU(cudaMalloc(&stage, stage_floats * 4));
    kvl_status s = KVL_OK;
    const kvl_weights *w = &m->w;
#define UP(dst, src, cnt) do { if (s == KVL_OK) s = upload(c, (dst), (src), (cnt), stage, stage_floats); } while (0)
#define UPF(dst, src, cnt) do { if (s == KVL_OK && cudaMemcpyAsync((dst), (src), (cnt) * 4, cudaMemcpyHostToDevice, c->st) != cudaSuccess) s = cuda_err(cudaGetLastError(), "norm upload"); } while (0)
    UP(c->emb, w->tok_emb, V * D);
    for (int l = 0; l < k->n_layers; l++) {
        const kvl_layer_w *H = &w->layers[l];
        cu_layer *L = &c->L[l];
        UPF(L->attn_norm, H->attn_norm, D);
        UPF(L->ffn_norm, H->ffn_norm, D);
        UP(L->wqkv, H->wq, qd * D);
        UP((char *)L->wqkv + qd * D * es, H->wk, kd * D);
        UP((char *)L->wqkv + (qd + kd) * D * es, H->wv, kd * D);
        UP(L->wo, H->wo, D * qd);
        UP(L->wgu, H->w_gate, F * D);
        UP((char *)L->wgu + F * D * es, H->w_up, F * D);
        UP(L->wdown, H->w_down, D * F);
    }
    UPF(c->final_norm, w->final_norm, D);
    if (!k->tied_embeddings) UP(c->cls, w->wcls, V * D);
#undef UP
#undef UPF
    cudaError_t se = cudaStreamSynchronize(c->st);
    if (stage) cudaFree(stage);
    if (s == KVL_OK && se != cudaSuccess) s = cuda_err(se, "weight upload");
    return s;
}

static void cuda_model_fini(kvl_model *m) {
    cu_model *c = CM(m);
    if (!c) return;
    cudaSetDevice(c->dev);
    if (c->st) cudaStreamSynchronize(c->st);
    for (int i = 0; i < GEMM_CACHE; i++)
        if (c->gc[i].used) {
            cublasLtMatmulDescDestroy(c->gc[i].op);
            cublasLtMatrixLayoutDestroy(c->gc[i].la);
            cublasLtMatrixLayoutDestroy(c->gc[i].lb);
            cublasLtMatrixLayoutDestroy(c->gc[i].lc);
        }
    if (c->lt) cublasLtDestroy(c->lt);
    if (c->pe[0]) cudaEventDestroy(c->pe[0]);
    if (c->pe[1]) cudaEventDestroy(c->pe[1]);
    cudaFree(c->lt_ws);
    cudaFree(c->wbuf);
    if (c->st) cudaStreamDestroy(c->st);
    free(c->L);
    free(c);
    m->be_state = NULL;
}

static kvl_status model_init_impl(kvl_model *m) {
    int n = kvl_cuda_device_count();
    if (n <= 0) return kvl_errorf(KVL_ERR_NO_GPU, "no CUDA device is visible");
    if (m->opts.gpu < 0 || m->opts.gpu >= n)
        return kvl_errorf(KVL_ERR_NO_GPU, "GPU %d requested, %d visible", m->opts.gpu, n);
    if (m->opts.weight_dtype != KVL_WDTYPE_F32 && m->opts.weight_dtype != KVL_WDTYPE_BF16)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "unknown weight dtype %d", m->opts.weight_dtype);
    cu_model *c = calloc(1, sizeof *c);
    if (!c) return KVL_ERR_NOMEM;
    m->be_state = c;
    c->dev = m->opts.gpu;
    c->wt = m->opts.weight_dtype == KVL_WDTYPE_BF16 ? KVL_CU_BF16 : KVL_CU_F32;
    c->kt = kv_type(&m->cfg, c->wt);
    const char *am = getenv("KVL_CUDA_ATTN");
    if (am && *am) {
        if (!strcmp(am, "auto")) c->att_mode = KVL_CU_ATT_AUTO;
        else if (!strcmp(am, "generic")) c->att_mode = KVL_CU_ATT_GENERIC;
        else if (!strcmp(am, "mma")) c->att_mode = KVL_CU_ATT_MMA;
        else if (!strcmp(am, "wg1")) c->att_mode = KVL_CU_ATT_WG1;
        else if (!strcmp(am, "wg2r")) c->att_mode = KVL_CU_ATT_WG2R;
        else if (!strcmp(am, "wg2h")) c->att_mode = KVL_CU_ATT_WG2H;
        else if (!strcmp(am, "wg3")) c->att_mode = KVL_CU_ATT_WG3;
        else if (!strcmp(am, "wg4")) c->att_mode = KVL_CU_ATT_WG4;
        else if (!strcmp(am, "wg4s3")) c->att_mode = KVL_CU_ATT_WG4S3;
        else if (!strcmp(am, "wg2")) c->att_mode = KVL_CU_ATT_WG2;
        else if (!strcmp(am, "ws")) c->att_mode = KVL_CU_ATT_WS;
        else if (!strcmp(am, "wspp")) c->att_mode = KVL_CU_ATT_WSPP;
        else if (!strcmp(am, "ws3")) c->att_mode = KVL_CU_ATT_WS3;
        else return kvl_errorf(KVL_ERR_INVALID_ARG, "KVL_CUDA_ATTN=%s: use auto, generic, mma, wg1, wg2, wg2r, wg2h, wg3, wg4, wg4s3, ws, wspp or ws3", am);
    }
    c->bt = KVL_CU_F32;
    const char *br = getenv("KVL_CUDA_BRANCH");
    if (br && *br) {
        if (!strcmp(br, "bf16")) c->bt = c->wt; /* bf16 only with bf16 weights */
        else if (strcmp(br, "f32")) return kvl_errorf(KVL_ERR_INVALID_ARG, "KVL_CUDA_BRANCH=%s: use f32 or bf16", br);
    }
    const char *pr = getenv("KVL_CUDA_PROFILE");
    c->prof = pr && *pr == '1';
    CU(cudaSetDevice(c->dev));
    CU(cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking));
    if (c->prof) {
        CU(cudaEventCreate(&c->pe[0]));
        CU(cudaEventCreate(&c->pe[1]));
    }
    LT(cublasLtCreate(&c->lt));
    CU(cudaMalloc(&c->lt_ws, LT_WS));
    /* forward passes allocate from the device's default pool: keep freed blocks for the next pass */
    cudaMemPool_t pool;
    CU(cudaDeviceGetDefaultMemPool(&pool, c->dev));
    uint64_t thr = UINT64_MAX;
    CU(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &thr));
    KVL_TRY(place_weights(m));
    /* the device holds the weights now; host copies of loaded models are not needed */
    kvl_weights_free(&m->w);
    return KVL_OK;
}

static kvl_status cuda_model_init(kvl_model *m) {
    kvl_status s = model_init_impl(m);
    if (s != KVL_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvl_last_error());
        cuda_model_fini(m);
        kvl_errorf(s, "%s", msg);
    }
    return s;
}

/* ------------------------------------------------------------ KV cache */

static size_t kvd(const kvl_model *m) { return (size_t)m->cfg.n_kv_heads * m->cfg.head_dim; }

static char *kv_at(const kvl_kv *kv, int32_t l, int w, int32_t s) {
    size_t es = kvl_cu_dtype_size(CM(kv->m)->kt);
    return (char *)kv->data + ((((size_t)l * 2 + (size_t)w) * (size_t)kv->capacity + (size_t)s) * kvd(kv->m)) * es;
}

static kvl_status kv_alloc_impl(kvl_kv *kv) {
    cu_model *c = CM(kv->m);
    size_t bytes = (size_t)kv->m->cfg.n_layers * 2 * (size_t)kv->capacity * kvd(kv->m) * kvl_cu_dtype_size(c->kt);
    CU(cudaSetDevice(c->dev));
    cudaError_t e = cudaMalloc(&kv->data, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        kv->data = NULL;
        return kvl_errorf(e == cudaErrorMemoryAllocation ? KVL_ERR_GPU_OOM : KVL_ERR_CUDA,
                          "cannot allocate a %.1f MiB kv cache on GPU %d: %s", (double)bytes / 1048576, c->dev,
                          cudaGetErrorString(e));
    }
    return KVL_OK;
}

#define LOCKED(m, expr)                         \
    do {                                        \
        pthread_mutex_lock(&(m)->mu);           \
        kvl_status s_ = (expr);                 \
        pthread_mutex_unlock(&(m)->mu);         \
        return s_;                              \
    } while (0)

static kvl_status cuda_kv_alloc(kvl_kv *kv) { LOCKED(kv->m, kv_alloc_impl(kv)); }

static void cuda_kv_release(kvl_kv *kv) {
    if (!kv->data) return;
    pthread_mutex_lock(&kv->m->mu);
    cudaSetDevice(CM(kv->m)->dev);
    cudaStreamSynchronize(CM(kv->m)->st); /* no pass may still read it */
    cudaFree(kv->data);
    pthread_mutex_unlock(&kv->m->mu);
    kv->data = NULL;
}

static kvl_status kv_xfer(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, float *host, int to_dev) {
    cu_model *c = CM(kv->m);
    size_t blk = (size_t)n * kvd(kv->m);
    CU(cudaSetDevice(c->dev));
    void *stage = NULL;
    if (c->kt != KVL_CU_F32) CU(cudaMallocAsync(&stage, blk * 4, c->st));
    kvl_status s = KVL_OK;
    for (int32_t l = 0; l < nl && s == KVL_OK; l++)
        for (int w = 0; w < 2 && s == KVL_OK; w++) {
            float *h = host + ((size_t)l * 2 + (size_t)w) * blk;
            char *d = kv_at(kv, l0 + l, w, s0);
            cudaError_t e;
            if (c->kt == KVL_CU_F32) {
                e = to_dev ? cudaMemcpyAsync(d, h, blk * 4, cudaMemcpyHostToDevice, c->st)
                           : cudaMemcpyAsync(h, d, blk * 4, cudaMemcpyDeviceToHost, c->st);
            } else if (to_dev) {
                e = cudaMemcpyAsync(stage, h, blk * 4, cudaMemcpyHostToDevice, c->st);
                if (e == cudaSuccess) e = kvl_cu_convert(d, c->kt, stage, KVL_CU_F32, blk, c->st);
            } else {
                e = kvl_cu_convert(stage, KVL_CU_F32, d, c->kt, blk, c->st);
                if (e == cudaSuccess) e = cudaMemcpyAsync(h, stage, blk * 4, cudaMemcpyDeviceToHost, c->st);
            }
            if (e != cudaSuccess) s = cuda_err(e, to_dev ? "kv write" : "kv read");
        }
    if (stage) cudaFreeAsync(stage, c->st);
    cudaError_t e = cudaStreamSynchronize(c->st);
    if (s == KVL_OK && e != cudaSuccess) s = cuda_err(e, "kv transfer");
    return s;
}

static kvl_status cuda_kv_write(kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, const float *src) {
    LOCKED(kv->m, kv_xfer(kv, l0, nl, s0, n, (float *)src, 1));
}

static kvl_status cuda_kv_read(const kvl_kv *kv, int32_t l0, int32_t nl, int32_t s0, int32_t n, float *dst) {
    LOCKED(kv->m, kv_xfer(kv, l0, nl, s0, n, dst, 0));
}

static kvl_status kv_copy_impl(kvl_kv *dst, int32_t d0, const kvl_kv *src, int32_t s0, int32_t n) {
    cu_model *c = CM(dst->m);
    size_t bytes = (size_t)n * kvd(dst->m) * kvl_cu_dtype_size(c->kt);
    CU(cudaSetDevice(c->dev));
    int overlap = dst == src && d0 < s0 + n && s0 < d0 + n;
    void *tmp = NULL;
    if (overlap) CU(cudaMallocAsync(&tmp, bytes, c->st));
    kvl_status s = KVL_OK;
    for (int32_t l = 0; l < dst->m->cfg.n_layers && s == KVL_OK; l++)
        for (int w = 0; w < 2 && s == KVL_OK; w++) {
            cudaError_t e;
            if (overlap) {
                e = cudaMemcpyAsync(tmp, kv_at(src, l, w, s0), bytes, cudaMemcpyDeviceToDevice, c->st);
                if (e == cudaSuccess) e = cudaMemcpyAsync(kv_at(dst, l, w, d0), tmp, bytes, cudaMemcpyDeviceToDevice, c->st);
            } else {
                e = cudaMemcpyAsync(kv_at(dst, l, w, d0), kv_at(src, l, w, s0), bytes, cudaMemcpyDeviceToDevice, c->st);
            }
            if (e != cudaSuccess) s = cuda_err(e, "kv copy");
        }
    if (tmp) cudaFreeAsync(tmp, c->st);
    return s;
}

static kvl_status cuda_kv_copy(kvl_kv *dst, int32_t d0, const kvl_kv *src, int32_t s0, int32_t n) {
    LOCKED(dst->m, kv_copy_impl(dst, d0, src, s0, n));
}

static kvl_status kv_rerotate_impl(kvl_kv *kv, int32_t s0, int32_t n, int32_t delta) {
    cu_model *c = CM(kv->m);
    const kvl_model_config *k = &kv->m->cfg;
    CU(cudaSetDevice(c->dev));
    CU(kvl_cu_rerotate(kv_at(kv, 0, 0, s0), c->kt, k->n_layers, (int64_t)(2 * (size_t)kv->capacity * kvd(kv->m)), n,
                       (int64_t)kvd(kv->m), k->n_kv_heads, k->head_dim, k->rope_style, k->rope_theta, delta, c->st));
    return KVL_OK;
}

static kvl_status cuda_kv_rerotate(kvl_kv *kv, int32_t s0, int32_t n, int32_t delta) {
    LOCKED(kv->m, kv_rerotate_impl(kv, s0, n, delta));
}

/* ------------------------------------------------------------ forward */

static cu_fwd *FB(kvl_fwd *f) { return f->be; }

static kvl_status fwd_init_impl(kvl_fwd *f) {
    cu_model *c = CM(f->m);
    size_t es = kvl_cu_dtype_size(c->wt);
    cu_fwd *b = calloc(1, sizeof *b);
    if (!b) return KVL_ERR_NOMEM;
    f->be = b;
    fsizes z = fwd_sizes(&f->m->cfg, es, kvl_cu_dtype_size(c->kt), f->n);
    CU(cudaSetDevice(c->dev));
    cudaError_t e = cudaMallocAsync(&b->block, z.total, c->st);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        b->block = NULL;
        return kvl_errorf(e == cudaErrorMemoryAllocation ? KVL_ERR_GPU_OOM : KVL_ERR_CUDA,
                          "cannot allocate %.1f MiB of forward workspace for %d tokens: %s", (double)z.total / 1048576,
                          f->n, cudaGetErrorString(e));
    }
    char *p = b->block;
    b->d_tok = (int32_t *)(p + z.tok);
    b->d_pos = (int32_t *)(p + z.pos);
    b->x = (float *)(p + z.x);
    b->xn = p + z.xn;
    b->qkv = p + z.qkv;
    b->q = p + z.q;
    b->qg = p + z.qg;
    b->kf = p + z.kf;
    b->vf = p + z.vf;
    b->att = p + z.att;
    b->tmp = p + z.tmp;
    b->gu = p + z.gu;
    b->hb = p + z.hb;
    b->kvout = (float *)(p + z.kvout);
    b->dev = (float *)(p + z.dev);
    b->logit = (float *)(p + z.logit);
    b->att_ws = p + z.att_ws;
    for (int i = 0; i < IX_N; i++) {
        b->d_ix[i] = (int32_t *)(p + z.ix[i]);
        b->h_ix[i] = malloc((size_t)f->n * 3 * sizeof(int32_t));
        b->n_ix[i] = -1;
        if (!b->h_ix[i]) return KVL_ERR_NOMEM;
    }
    CU(cudaMemcpyAsync(b->d_tok, f->tokens, (size_t)f->n * 4, cudaMemcpyHostToDevice, c->st));
    CU(cudaMemcpyAsync(b->d_pos, f->positions, (size_t)f->n * 4, cudaMemcpyHostToDevice, c->st));
    return KVL_OK;
}

static void fwd_fini_impl(kvl_fwd *f) {
    cu_fwd *b = FB(f);
    if (!b) return;
    cu_model *c = CM(f->m);
    cudaSetDevice(c->dev);
    if (b->block) cudaFreeAsync(b->block, c->st);
    for (int i = 0; i < IX_N; i++) free(b->h_ix[i]);
    free(b);
    f->be = NULL;
}

static kvl_status cuda_fwd_init(kvl_fwd *f) {
    pthread_mutex_lock(&f->m->mu);
    kvl_status s = fwd_init_impl(f);
    if (s != KVL_OK) fwd_fini_impl(f);
    pthread_mutex_unlock(&f->m->mu);
    return s;
}

static void cuda_fwd_fini(kvl_fwd *f) {
    pthread_mutex_lock(&f->m->mu);
    fwd_fini_impl(f);
    pthread_mutex_unlock(&f->m->mu);
}

/* Uploads three index lists of n entries, a[i], b[i], c[i] (b, c may be NULL), into d_ix[which]
 * unless it already holds them (decode and kvl_forward reuse one list for every layer). */
static kvl_status stage_ix(kvl_fwd *f, int which, int32_t n, const int32_t *a, const int32_t *bb, const int32_t *cc,
                           const int32_t **da, const int32_t **db, const int32_t **dc) {
    cu_fwd *b = FB(f);
    int32_t *h = b->h_ix[which];
    int same = b->n_ix[which] == n;
    for (int32_t i = 0; i < n && same; i++)
        same = h[i] == a[i] && (!bb || h[n + i] == bb[i]) && (!cc || h[2 * n + i] == cc[i]);
    if (!same) {
        for (int32_t i = 0; i < n; i++) {
            h[i] = a[i];
            h[n + i] = bb ? bb[i] : 0;
            h[2 * n + i] = cc ? cc[i] : 0;
        }
        b->n_ix[which] = n;
        CU(cudaMemcpyAsync(b->d_ix[which], h, (size_t)n * 3 * 4, cudaMemcpyHostToDevice, CM(f->m)->st));
    }
    *da = b->d_ix[which];
    if (db) *db = b->d_ix[which] + n;
    if (dc) *dc = b->d_ix[which] + 2 * n;
    return KVL_OK;
}

static kvl_status fwd_qkv_impl(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n, float *k_out, float *v_out) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    const kvl_model_config *k = &f->m->cfg;
    const cu_layer *L = &c->L[layer];
    int64_t D = k->dim, qd = (int64_t)k->n_heads * k->head_dim, kd = (int64_t)k->n_kv_heads * k->head_dim;
    CU(cudaSetDevice(c->dev));
    if (n == 0) return KVL_OK;
    int32_t *tok = malloc((size_t)n * 2 * sizeof *tok);
    if (!tok) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) {
        tok[i] = f->tokens[idx[i]];
        tok[n + i] = f->positions[idx[i]];
    }
    const int32_t *d_idx, *d_tok, *d_pos;
    kvl_status s = stage_ix(f, IX_QKV, n, idx, tok, tok + n, &d_idx, &d_tok, &d_pos);
    free(tok);
    KVL_TRY(s);
    prof_begin(c);
    if (layer == 0) CU(kvl_cu_copy_rows(b->x, KVL_CU_F32, D, d_idx, c->emb, c->wt, D, d_tok, n, D, c->st));
    CU(kvl_cu_add_rmsnorm(b->xn, c->wt, b->x, d_idx, NULL, KVL_CU_F32, L->attn_norm, n, D, k->norm_eps, c->st));
    prof_end(c, PR_NORM);
    prof_begin(c);
    KVL_TRY(gemm(c, b->qkv, c->kt, qd + 2 * kd, b->xn, L->wqkv, qd + 2 * kd, n, D));
    prof_end(c, PR_QKV);
    prof_begin(c);
    CU(kvl_cu_rope_split(b->q, c->kt, b->kf, b->vf, c->kt, b->qkv, c->kt, qd + 2 * kd, d_pos, n, k->n_heads,
                         k->n_kv_heads, k->head_dim, k->rope_style, k->rope_theta, c->st));
    prof_end(c, PR_ROPE);
    if (k_out || v_out) {
        CU(kvl_cu_convert(b->kvout, KVL_CU_F32, b->kf, c->kt, (size_t)n * kd, c->st));
        CU(kvl_cu_convert(b->kvout + (size_t)n * kd, KVL_CU_F32, b->vf, c->kt, (size_t)n * kd, c->st));
        if (k_out) CU(cudaMemcpyAsync(k_out, b->kvout, (size_t)n * kd * 4, cudaMemcpyDeviceToHost, c->st));
        if (v_out) CU(cudaMemcpyAsync(v_out, b->kvout + (size_t)n * kd, (size_t)n * kd * 4, cudaMemcpyDeviceToHost, c->st));
        CU(cudaStreamSynchronize(c->st));
    }
    return KVL_OK;
}

static kvl_status cuda_fwd_qkv(kvl_fwd *f, int32_t layer, const int32_t *idx, int32_t n, float *k_out, float *v_out) {
    LOCKED(f->m, fwd_qkv_impl(f, layer, idx, n, k_out, v_out));
}

static kvl_status fwd_deviation_impl(kvl_fwd *f, int32_t metric, float *dev) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    int64_t kd = (int64_t)kvd(f->m);
    if (f->n_pend == 0) return KVL_OK;
    CU(cudaSetDevice(c->dev));
    const int32_t *d_idx, *d_tok, *d_pos;
    /* the pending list is what fwd_qkv staged */
    int32_t *tok = malloc((size_t)f->n_pend * 2 * sizeof *tok);
    if (!tok) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < f->n_pend; i++) {
        tok[i] = f->tokens[f->pend[i]];
        tok[f->n_pend + i] = f->positions[f->pend[i]];
    }
    kvl_status s = stage_ix(f, IX_QKV, f->n_pend, f->pend, tok, tok + f->n_pend, &d_idx, &d_tok, &d_pos);
    free(tok);
    KVL_TRY(s);
    CU(kvl_cu_deviation(b->dev, b->kf, b->vf, kv_at(f->kv, f->layer, 0, 0), kv_at(f->kv, f->layer, 1, 0), c->kt, d_idx,
                        f->n_pend, kd, metric, c->st));
    CU(cudaMemcpyAsync(dev, b->dev, (size_t)f->n_pend * 4, cudaMemcpyDeviceToHost, c->st));
    CU(cudaStreamSynchronize(c->st));
    return KVL_OK;
}

static kvl_status cuda_fwd_deviation(kvl_fwd *f, int32_t metric, float *dev) {
    LOCKED(f->m, fwd_deviation_impl(f, metric, dev));
}

static kvl_status fwd_commit_impl(kvl_fwd *f, const int32_t *sub, int32_t n) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    int64_t kd = (int64_t)kvd(f->m);
    CU(cudaSetDevice(c->dev));
    int32_t *rows = malloc((size_t)n * sizeof *rows);
    if (!rows) return KVL_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) rows[i] = f->pend[sub[i]];
    const int32_t *d_sub, *d_rows;
    kvl_status s = stage_ix(f, IX_COMMIT, n, sub, rows, NULL, &d_sub, &d_rows, NULL);
    free(rows);
    KVL_TRY(s);
    CU(kvl_cu_copy_rows(kv_at(f->kv, f->layer, 0, 0), c->kt, kd, d_rows, b->kf, c->kt, kd, d_sub, n, kd, c->st));
    CU(kvl_cu_copy_rows(kv_at(f->kv, f->layer, 1, 0), c->kt, kd, d_rows, b->vf, c->kt, kd, d_sub, n, kd, c->st));
    return KVL_OK;
}

static kvl_status cuda_fwd_commit(kvl_fwd *f, const int32_t *sub, int32_t n) { LOCKED(f->m, fwd_commit_impl(f, sub, n)); }

static kvl_status fwd_attn_ffn_impl(kvl_fwd *f, const int32_t *sub, int32_t n) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    const kvl_model_config *k = &f->m->cfg;
    const cu_layer *L = &c->L[f->layer];
    int64_t D = k->dim, qd = (int64_t)k->n_heads * k->head_dim, kd = (int64_t)k->n_kv_heads * k->head_dim,
            F = k->hidden_dim;
    CU(cudaSetDevice(c->dev));
    if (n == 0) return KVL_OK;
    int32_t *h = malloc((size_t)n * 2 * sizeof *h);
    if (!h) return KVL_ERR_NOMEM;
    int identity = n == f->n_pend;
    for (int32_t i = 0; i < n; i++) {
        h[i] = f->pend[sub[i]];
        h[n + i] = f->positions[h[i]];
        identity &= sub[i] == i;
    }
    const int32_t *d_sub, *d_rows, *d_qpos;
    kvl_status s = stage_ix(f, IX_ATTN, n, sub, h, h + n, &d_sub, &d_rows, &d_qpos);
    free(h);
    KVL_TRY(s);
    const void *qsrc = b->q;
    prof_begin(c);
    if (!identity) {
        CU(kvl_cu_copy_rows(b->qg, c->kt, qd, NULL, b->q, c->kt, qd, d_sub, n, qd, c->st));
        qsrc = b->qg;
    }
    CU(kvl_cu_attention(b->att, qd, qsrc, qd, c->kt, d_qpos, n, kv_at(f->kv, f->layer, 0, 0),
                        kv_at(f->kv, f->layer, 1, 0), c->kt, b->d_pos, f->n, k->n_heads, k->n_kv_heads, k->head_dim,
                        b->att_ws, c->att_mode, c->st));
    prof_end(c, PR_ATTN);
    (void)kd;
    const void *att = b->att;
    prof_begin(c);
    if (c->kt != c->wt) { /* the output projection takes GEMM-input type; qg is free again */
        CU(kvl_cu_convert(b->qg, c->wt, b->att, c->kt, (size_t)n * qd, c->st));
        att = b->qg;
    }
    KVL_TRY(gemm(c, b->tmp, c->bt, D, att, L->wo, D, n, qd));
    prof_end(c, PR_WO);
    prof_begin(c);
    CU(kvl_cu_add_rmsnorm(b->xn, c->wt, b->x, d_rows, b->tmp, c->bt, L->ffn_norm, n, D, k->norm_eps, c->st));
    prof_end(c, PR_NORM);
    size_t es = kvl_cu_dtype_size(c->wt), bs = kvl_cu_dtype_size(c->bt);
    for (int64_t r0 = 0; r0 < n; r0 += FFN_CHUNK) {
        int64_t rn = n - r0 < FFN_CHUNK ? n - r0 : FFN_CHUNK;
        prof_begin(c);
        KVL_TRY(gemm(c, b->gu, c->wt, 2 * F, (char *)b->xn + (size_t)r0 * D * es, L->wgu, 2 * F, rn, D));
        prof_end(c, PR_GU);
        prof_begin(c);
        CU(kvl_cu_swiglu(b->hb, b->gu, c->wt, rn, F, c->st));
        prof_end(c, PR_SWIGLU);
        prof_begin(c);
        KVL_TRY(gemm(c, (char *)b->tmp + (size_t)r0 * D * bs, c->bt, D, b->hb, L->wdown, D, rn, F));
        prof_end(c, PR_DOWN);
    }
    prof_begin(c);
    CU(kvl_cu_add_rmsnorm(NULL, c->wt, b->x, d_rows, b->tmp, c->bt, NULL, n, D, k->norm_eps, c->st));
    prof_end(c, PR_NORM);
    return KVL_OK;
}

static kvl_status cuda_fwd_attn_ffn(kvl_fwd *f, const int32_t *sub, int32_t n) { LOCKED(f->m, fwd_attn_ffn_impl(f, sub, n)); }

static kvl_status fwd_logits_impl(kvl_fwd *f, const int32_t *idx, int32_t n, float *logits) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    const kvl_model_config *k = &f->m->cfg;
    int64_t D = k->dim, V = k->vocab_size;
    size_t es = kvl_cu_dtype_size(c->wt);
    CU(cudaSetDevice(c->dev));
    const int32_t *d_idx;
    KVL_TRY(stage_ix(f, IX_LOGITS, n, idx, NULL, NULL, &d_idx, NULL, NULL));
    prof_begin(c);
    CU(kvl_cu_add_rmsnorm(b->xn, c->wt, b->x, d_idx, NULL, KVL_CU_F32, c->final_norm, n, D, k->norm_eps, c->st));
    for (int64_t r0 = 0; r0 < n; r0 += LOGIT_CHUNK) {
        int64_t rn = n - r0 < LOGIT_CHUNK ? n - r0 : LOGIT_CHUNK;
        KVL_TRY(gemm(c, b->logit, KVL_CU_F32, V, (char *)b->xn + (size_t)r0 * D * es, c->cls, V, rn, D));
        CU(cudaMemcpyAsync(logits + (size_t)r0 * V, b->logit, (size_t)rn * V * 4, cudaMemcpyDeviceToHost, c->st));
    }
    CU(cudaStreamSynchronize(c->st));
    prof_end(c, PR_LOGITS);
    if (c->prof) { /* one line a pass (a pass ends with its logits) */
        double tot = 0;
        for (int i = 0; i < PR_N; i++) tot += c->pms[i];
        fprintf(stderr, "kvl cuda profile (ms):");
        for (int i = 0; i < PR_N; i++) {
            fprintf(stderr, " %s %.2f", pr_name[i], c->pms[i]);
            c->pms[i] = 0;
        }
        fprintf(stderr, " total %.2f\n", tot);
    }
    return KVL_OK;
}

static kvl_status cuda_fwd_logits(kvl_fwd *f, const int32_t *idx, int32_t n, float *logits) {
    LOCKED(f->m, fwd_logits_impl(f, idx, n, logits));
}

/* CacheBlend's question-guided selection needs the attention probabilities of a few query tokens
 * (the question) over every slot. With so few queries the arithmetic is negligible; the cost is
 * reading this layer's keys once, so the probabilities come from the CPU reference op on host copies
 * of the pending Q rows and the layer's K (one device-to-host copy of n x kv_dim per call). */
static kvl_status fwd_attn_mass_impl(kvl_fwd *f, const int32_t *sub, int32_t n, float *mass) {
    cu_model *c = CM(f->m);
    cu_fwd *b = FB(f);
    const kvl_model_config *k = &f->m->cfg;
    size_t qd = (size_t)k->n_heads * (size_t)k->head_dim, kd = kvd(f->m), es = kvl_cu_dtype_size(c->kt);
    size_t nq = (size_t)(n > 0 ? n : 1), nk = (size_t)f->n;
    CU(cudaSetDevice(c->dev));
    CU(cudaStreamSynchronize(c->st));
    float *q = malloc(nq * qd * sizeof(float)), *kf = malloc(nk * kd * sizeof(float));
    int32_t *qpos = malloc(nq * sizeof(int32_t));
    uint8_t *raw = malloc((nq * qd > nk * kd ? nq * qd : nk * kd) * es);
    kvl_status s = (!q || !kf || !qpos || !raw) ? KVL_ERR_NOMEM : KVL_OK;
    cudaError_t e = cudaSuccess;
    for (int32_t i = 0; s == KVL_OK && e == cudaSuccess && i < n; i++) {
        e = cudaMemcpy(raw + (size_t)i * qd * es, (const char *)b->q + (size_t)sub[i] * qd * es, qd * es,
                       cudaMemcpyDeviceToHost);
        qpos[i] = f->positions[f->pend[sub[i]]];
    }
    if (s == KVL_OK && e == cudaSuccess)
        for (size_t i = 0; i < (size_t)n * qd; i++) {
            if (c->kt == KVL_CU_BF16) {
                uint16_t h;
                memcpy(&h, raw + 2 * i, 2);
                q[i] = kvl_bf16_to_f32(h);
            } else {
                memcpy(&q[i], raw + 4 * i, 4);
            }
        }
    if (s == KVL_OK && e == cudaSuccess)
        e = cudaMemcpy(raw, kv_at(f->kv, f->layer, 0, 0), nk * kd * es, cudaMemcpyDeviceToHost);
    if (s == KVL_OK && e == cudaSuccess) {
        for (size_t i = 0; i < nk * kd; i++) {
            if (c->kt == KVL_CU_BF16) {
                uint16_t h;
                memcpy(&h, raw + 2 * i, 2);
                kf[i] = kvl_bf16_to_f32(h);
            } else {
                memcpy(&kf[i], raw + 4 * i, 4);
            }
        }
        kvl_cpu_attention_mass(mass, q, (int64_t)qd, qpos, n, kf, f->positions, f->kv->valid, f->n, k->n_heads,
                               k->n_kv_heads, k->head_dim);
    }
    if (s == KVL_OK && e != cudaSuccess) s = cuda_err(e, "attention mass: device-to-host copy");
    free(q);
    free(kf);
    free(qpos);
    free(raw);
    return s;
}

static kvl_status cuda_fwd_attn_mass(kvl_fwd *f, const int32_t *sub, int32_t n, float *mass) {
    LOCKED(f->m, fwd_attn_mass_impl(f, sub, n, mass));
}

const kvl_backend_ops kvl_backend_cuda = {
    "cuda", cuda_model_init, cuda_model_fini, cuda_kv_alloc, cuda_kv_release, cuda_kv_write, cuda_kv_read,
    cuda_kv_copy, cuda_kv_rerotate, cuda_fwd_init, cuda_fwd_fini, cuda_fwd_qkv, cuda_fwd_deviation,
    cuda_fwd_commit, cuda_fwd_attn_ffn, cuda_fwd_logits,
    cuda_fwd_attn_mass,
};
