/* codec/gpu/codec_gpu.c - host side of the GPU KVLC decoder (api/kvl_codec_gpu.h): validation and planning
 * with the CPU code, staging, launch, error re-diagnosis. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "kvl_codec_gpu.h"
#include "kvl_codec_plan.h"
#include "kvl_cuda_codec.h"

/* threads that validate and stage chunks in one call (each takes a contiguous range) */
#define KVL_GPU_PLAN_THREADS 8

struct kvl_codec_gpu {
    cudaStream_t st;
    int own_stream;
    cudaEvent_t ev[3];
    kvl_codec_plan plan;
    uint8_t *h_stage; /* pinned: chunk bytes, then the plan blob */
    size_t h_cap;
    uint8_t *d_buf;   /* device copy of h_stage */
    size_t d_cap;
    uint8_t *h_plan, *d_plan; /* pinned / device: the plan arrays */
    size_t hp_cap, dp_cap;
    kvl_codec_plan wplan[KVL_GPU_PLAN_THREADS]; /* per planning thread */
    int16_t *d_anchor;
    size_t anchor_cap;
    float *d_rot;     /* float32 scratch of rotated key sections */
    size_t rot_cap;
    uint32_t *d_err, *h_err;
    void *h_tmp;      /* pinned: lossless decode target */
    size_t tmp_cap;
    const kvl_codec_profile *prof; /* profile whose stores are on the device */
    uint8_t prof_id[16];
    uint16_t *d_pcum[5];
    uint16_t *d_plut[5];
    kvl_codec_gpu_stats stats;
};

static kvl_status cu_err(cudaError_t e, const char *what) {
    if (e == cudaErrorMemoryAllocation) return kvl_errorf(KVL_ERR_GPU_OOM, "%s: out of device memory", what);
    return kvl_errorf(KVL_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
}
#define CU(call, what)                                  \
    do {                                                \
        cudaError_t e_ = (call);                        \
        if (e_ != cudaSuccess) return cu_err(e_, what); \
    } while (0)

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

kvl_status kvl_codec_gpu_create(void *cuda_stream, kvl_codec_gpu **out) {
    if (!out) return kvl_errorf(KVL_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) return kvl_errorf(KVL_ERR_NO_GPU, "no CUDA device");
    kvl_codec_gpu *g = calloc(1, sizeof *g);
    if (!g) return KVL_ERR_NOMEM;
    kvl_codec_plan_init(&g->plan);
    kvl_status st = KVL_OK;
    cudaError_t e = cudaSuccess;
    if (cuda_stream) g->st = (cudaStream_t)cuda_stream;
    else {
        /* the highest priority: decoding feeds a forward pass that waits for it, so its blocks go
         * ahead of the forward pass's queued ones */
        int lo = 0, hi = 0;
        cudaDeviceGetStreamPriorityRange(&lo, &hi);
        e = cudaStreamCreateWithPriority(&g->st, cudaStreamNonBlocking, hi);
        g->own_stream = e == cudaSuccess;
    }
    for (int i = 0; i < 3 && e == cudaSuccess; i++) e = cudaEventCreate(&g->ev[i]);
    if (e == cudaSuccess) e = cudaMalloc((void **)&g->d_err, 8);
    if (e == cudaSuccess) e = cudaHostAlloc((void **)&g->h_err, 8, cudaHostAllocDefault);
    if (e != cudaSuccess) st = cu_err(e, "decoder setup");
    if (st != KVL_OK) {
        kvl_codec_gpu_free(g);
        return st;
    }
    *out = g;
    return KVL_OK;
}

static void drop_profile(kvl_codec_gpu *g) {
    for (int lv = 0; lv < 5; lv++) {
        cudaFree(g->d_pcum[lv]);
        cudaFree(g->d_plut[lv]);
        g->d_pcum[lv] = NULL;
        g->d_plut[lv] = NULL;
    }
    g->prof = NULL;
}

void kvl_codec_gpu_free(kvl_codec_gpu *g) {
    if (!g) return;
    if (g->st) cudaStreamSynchronize(g->st);
    drop_profile(g);
    kvl_codec_plan_free(&g->plan);
    for (int k = 0; k < KVL_GPU_PLAN_THREADS; k++) kvl_codec_plan_free(&g->wplan[k]);
    cudaFreeHost(g->h_plan);
    cudaFree(g->d_plan);
    cudaFreeHost(g->h_stage);
    cudaFree(g->d_buf);
    cudaFree(g->d_anchor);
    cudaFree(g->d_rot);
    cudaFree(g->d_err);
    cudaFreeHost(g->h_err);
    cudaFreeHost(g->h_tmp);
    for (int i = 0; i < 3; i++)
        if (g->ev[i]) cudaEventDestroy(g->ev[i]);
    if (g->own_stream) cudaStreamDestroy(g->st);
    free(g);
}

void kvl_codec_gpu_last_stats(const kvl_codec_gpu *g, kvl_codec_gpu_stats *s) {
    if (g && s) *s = g->stats;
}

static kvl_status grow_host(void **p, size_t *cap, size_t need) {
    if (need <= *cap) return KVL_OK;
    size_t nc = need + need / 4 + 4096;
    cudaFreeHost(*p);
    *p = NULL;
    *cap = 0;
    CU(cudaHostAlloc(p, nc, cudaHostAllocDefault), "pinned staging");
    *cap = nc;
    return KVL_OK;
}

static kvl_status grow_dev(void **p, size_t *cap, size_t need) {
    if (need <= *cap) return KVL_OK;
    size_t nc = need + need / 4 + 4096;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    CU(cudaMalloc(p, nc), "device staging");
    *cap = nc;
    return KVL_OK;
}

/* the profile's table stores for every level, uploaded once per profile */
static kvl_status upload_profile(kvl_codec_gpu *g, const kvl_codec_profile *prof) {
    if (g->prof == prof && memcmp(g->prof_id, kvl_codec_profile_id(prof), 16) == 0) return KVL_OK;
    drop_profile(g);
    for (int lv = 1; lv <= KVL_CODEC_MAX_LEVEL; lv++) {
        const uint32_t *cum;
        const uint16_t *lut;
        size_t nc, nl;
        if (kvl_codec_profile_stores(prof, lv, &cum, &nc, &lut, &nl) != KVL_OK) continue; /* level absent */
        /* compact form (kvl_cuda_codec.h): only valid because profile tables have pb 16 and no
         * zero frequency, which the profile parser and builder guarantee */
        uint16_t *c16 = malloc(nc * 2), *l64 = malloc(nl / 4 * 2);
        if (!c16 || !l64) {
            free(c16);
            free(l64);
            return KVL_ERR_NOMEM;
        }
        kvl_cu_codec_compact_profile(cum, nc, lut, nl, c16, l64);
        cudaError_t e = cudaMalloc((void **)&g->d_pcum[lv], nc * 2);
        if (e == cudaSuccess) e = cudaMalloc((void **)&g->d_plut[lv], nl / 4 * 2);
        if (e == cudaSuccess) e = cudaMemcpy(g->d_pcum[lv], c16, nc * 2, cudaMemcpyHostToDevice);
        if (e == cudaSuccess) e = cudaMemcpy(g->d_plut[lv], l64, nl / 4 * 2, cudaMemcpyHostToDevice);
        free(c16);
        free(l64);
        if (e != cudaSuccess) return cu_err(e, "profile upload");
    }
    kvl_clear_error();
    g->prof = prof;
    memcpy(g->prof_id, kvl_codec_profile_id(prof), 16);
    return KVL_OK;
}

static size_t al256(size_t x) { return (x + 255) & ~(size_t)255; }

/* CPU decode of one chunk into pinned memory, then per-section copies to its placement */
static kvl_status lossless_chunk(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *c, const kvl_codec_info *in,
                                 const kvl_codec_profile *prof, kvl_codec_dtype dt) {
    int32_t L = in->shape.n_layers, nl = c->n_layers <= 0 ? L - c->layer0 : c->n_layers;
    if (c->layer0 < 0 || c->layer0 >= L || nl > L - c->layer0)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "layers [%d, +%d) outside the chunk's %d", c->layer0, nl, L);
    size_t es = dt == KVL_CODEC_BF16 ? 2 : 4, T = (size_t)in->shape.n_tokens,
           C = (size_t)in->shape.n_kv_heads * in->shape.head_dim, bytes = (size_t)nl * 2 * T * C * es;
    KVL_TRY(grow_host(&g->h_tmp, &g->tmp_cap, bytes));
    CU(cudaStreamSynchronize(g->st), "decoder stream"); /* h_tmp may still feed an earlier copy */
    KVL_TRY(kvl_codec_decode(c->buf, c->size, prof, c->layer0, nl, dt, g->h_tmp, bytes, 4));
    for (int32_t i = 0; i < 2 * nl; i++) {
        uint8_t *dst = (uint8_t *)c->d_out + ((int64_t)(i / 2) * c->layer_stride + (int64_t)(i % 2) * c->kv_stride) * (int64_t)es;
        CU(cudaMemcpy2DAsync(dst, (size_t)c->token_stride * es, (uint8_t *)g->h_tmp + (size_t)i * T * C * es, C * es,
                             C * es, T, cudaMemcpyHostToDevice, g->st),
           "lossless copy");
    }
    CU(cudaStreamSynchronize(g->st), "decoder stream");
    return KVL_OK;
}

typedef struct plan_worker {
    kvl_codec_gpu *g;
    const kvl_codec_gpu_chunk *chunks;
    const int32_t *lossy;
    const uint64_t *boff, *roff;
    int32_t k0, k1;
    const kvl_codec_profile *profile;
    size_t es;
    kvl_codec_plan *plan;
    kvl_status st;
    char msg[256];
} plan_worker;

static void *plan_run(void *arg) {
    plan_worker *w = arg;
    kvl_codec_plan_reset(w->plan);
    kvl_clear_error();
    w->st = KVL_OK;
    for (int32_t k = w->k0; k < w->k1 && w->st == KVL_OK; k++) {
        const kvl_codec_gpu_chunk *c = &w->chunks[w->lossy[k]];
        kvl_codec_place pl = {(uint64_t)(uintptr_t)c->d_out, c->layer_stride, c->kv_stride, c->token_stride};
        w->st = kvl_codec_plan_add(w->plan, c->buf, c->size, w->profile, c->layer0, c->n_layers, &pl, w->es);
        if (w->st == KVL_OK) memcpy(w->g->h_stage + w->boff[k], c->buf + w->roff[k], w->boff[k + 1] - w->boff[k]);
    }
    snprintf(w->msg, sizeof w->msg, "%s", w->st == KVL_OK ? "" : kvl_last_error());
    return NULL;
}

/* The host half shared by kvl_codec_gpu_decode and kvl_codec_gpu_stage: validates and plans the
 * lossy chunks of chunks[0..n) on worker threads, stages their bytes in h_stage and the plan arrays
 * in h_plan (laid out at off[0..6]: streams, sections, tables, cum, lut, scales, rope tables;
 * *total bytes).
 * lossy[0..*n_lossy) = the caller's index of each planned chunk. */
static kvl_status host_plan(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *chunks, int32_t n, const kvl_codec_profile *profile,
                            size_t es, int32_t *lossy, int32_t *n_lossy_out, size_t off[7], size_t *total) {
    kvl_codec_plan *p = &g->plan;
    kvl_codec_plan_reset(p);
    *n_lossy_out = 0;
    uint64_t *boff = malloc(((size_t)n + 1) * sizeof *boff); /* staging offset of lossy chunk k */
    uint64_t *roff = malloc(((size_t)n + 1) * sizeof *roff); /* its first byte in the chunk */
    if (!boff || !roff) {
        free(boff);
        free(roff);
        return KVL_ERR_NOMEM;
    }
    int32_t n_lossy = 0;
    kvl_status st = KVL_OK;
    boff[0] = 0;
    for (int32_t i = 0; i < n && st == KVL_OK; i++) {
        const kvl_codec_gpu_chunk *c = &chunks[i];
        kvl_codec_info in;
        if (!c->d_out) st = kvl_errorf(KVL_ERR_INVALID_ARG, "chunk %d: d_out is NULL", i);
        if (st == KVL_OK) st = kvl_codec_info_get(c->buf, c->size, &in);
        if (st != KVL_OK || in.lossless) continue;
        uint64_t ro = 0, rl = 0;
        st = kvl_codec_plan_range(c->buf, c->size, c->layer0, c->n_layers, &ro, &rl);
        if (st != KVL_OK) continue;
        lossy[n_lossy] = i;
        roff[n_lossy] = ro;
        boff[n_lossy + 1] = boff[n_lossy] + rl;
        n_lossy++;
    }
    if (st != KVL_OK || n_lossy == 0) goto out;
    st = grow_host((void **)&g->h_stage, &g->h_cap, boff[n_lossy]);
    if (st != KVL_OK) goto out;
    /* h_stage may still feed the previous call's copy */
    if (cudaStreamSynchronize(g->st) != cudaSuccess) { st = cu_err(cudaGetLastError(), "decoder stream"); goto out; }
    {
        /* validation, planning and staging of disjoint chunk ranges on worker threads; the
         * per-worker plans are then appended in order, so chunk k's bytes sit at boff[k] */
        int nw = n_lossy < KVL_GPU_PLAN_THREADS ? n_lossy : KVL_GPU_PLAN_THREADS;
        plan_worker w[KVL_GPU_PLAN_THREADS];
        pthread_t th[KVL_GPU_PLAN_THREADS];
        int started[KVL_GPU_PLAN_THREADS] = {0};
        for (int k = 0; k < nw; k++) {
            w[k] = (plan_worker){g, chunks, lossy, boff, roff, (int32_t)((int64_t)n_lossy * k / nw),
                                 (int32_t)((int64_t)n_lossy * (k + 1) / nw), profile, es, &g->wplan[k], KVL_OK, ""};
            if (k > 0) started[k] = pthread_create(&th[k], NULL, plan_run, &w[k]) == 0;
        }
        for (int k = 1; k < nw; k++)
            if (!started[k]) plan_run(&w[k]);
        plan_run(&w[0]);
        for (int k = 1; k < nw; k++)
            if (started[k]) pthread_join(th[k], NULL);
        for (int k = 0; k < nw && st == KVL_OK; k++)
            if (w[k].st != KVL_OK) st = kvl_errorf(w[k].st, "%s", w[k].msg);
        for (int k = 0; k < nw && st == KVL_OK; k++) st = kvl_codec_plan_append(p, &g->wplan[k]);
    }
    if (st != KVL_OK) goto out;
    if (p->profile) {
        st = upload_profile(g, p->profile);
        if (st != KVL_OK) goto out;
    }
    /* the plan arrays in a second pinned blob, each 256-byte aligned */
    off[0] = 0;
    off[1] = off[0] + al256(p->n_streams * sizeof *p->streams);
    off[2] = off[1] + al256(p->n_sections * sizeof *p->sections);
    off[3] = off[2] + al256(p->n_tables * sizeof *p->tables);
    off[4] = off[3] + al256(p->n_cum * 4);
    off[5] = off[4] + al256(p->n_lut * 2);
    off[6] = off[5] + al256(p->n_scales * 4);
    *total = off[6] + al256(p->n_rope * 4);
    st = grow_host((void **)&g->h_plan, &g->hp_cap, *total);
    if (st != KVL_OK) goto out;
    memcpy(g->h_plan + off[0], p->streams, p->n_streams * sizeof *p->streams);
    memcpy(g->h_plan + off[1], p->sections, p->n_sections * sizeof *p->sections);
    memcpy(g->h_plan + off[2], p->tables, p->n_tables * sizeof *p->tables);
    if (p->n_cum) memcpy(g->h_plan + off[3], p->cum, p->n_cum * 4);
    if (p->n_lut) memcpy(g->h_plan + off[4], p->lut, p->n_lut * 2);
    memcpy(g->h_plan + off[5], p->scales, p->n_scales * 4);
    if (p->n_rope) memcpy(g->h_plan + off[6], p->rope, p->n_rope * 4);
    *n_lossy_out = n_lossy;
out:
    free(boff);
    free(roff);
    return st;
}

/* kernel arguments for a plan whose bytes sit at d_bytes and arrays at d_plan (offsets off) */
static kvl_cu_codec_args make_args(const kvl_codec_gpu *g, const uint8_t *d_bytes, const uint8_t *d_plan, const size_t off[7],
                                   int16_t *d_anchor, float *d_rot, uint32_t *d_err) {
    kvl_cu_codec_args a = {0};
    a.bytes = d_bytes;
    a.streams = (const kvl_codec_plan_stream *)(d_plan + off[0]);
    a.sections = (const kvl_codec_plan_section *)(d_plan + off[1]);
    a.tables = (const kvl_codec_plan_table *)(d_plan + off[2]);
    a.cum = (const uint32_t *)(d_plan + off[3]);
    a.lut = (const uint16_t *)(d_plan + off[4]);
    for (int lv = 0; lv < 5; lv++) {
        a.pcum[lv] = g->d_pcum[lv];
        a.plut[lv] = g->d_plut[lv];
    }
    a.scales = (const float *)(d_plan + off[5]);
    a.anchor = d_anchor;
    a.rot = g->plan.n_rot ? d_rot : NULL;
    a.rope = (const float *)(d_plan + off[6]);
    a.n_streams = (uint32_t)g->plan.n_streams;
    a.n_sections = (uint32_t)g->plan.n_sections;
    a.err = d_err;
    return a;
}

/* A fault the kernel found in stream s (of chunks[k]): the CPU decoder names it exactly as it would */
static kvl_status rediagnose(const kvl_codec_gpu_chunk *c, uint32_t s, uint32_t why, const kvl_codec_profile *profile) {
    kvl_codec_info in;
    kvl_codec_info_get(c->buf, c->size, &in);
    int32_t nl = c->n_layers <= 0 ? in.shape.n_layers - c->layer0 : c->n_layers;
    size_t need = (size_t)nl * 2 * (size_t)in.shape.n_tokens * in.shape.n_kv_heads * in.shape.head_dim * 4;
    void *tmp = malloc(need);
    if (!tmp) return KVL_ERR_NOMEM;
    kvl_status st = kvl_codec_decode(c->buf, c->size, profile, c->layer0, nl, KVL_CODEC_F32, tmp, need, 1);
    free(tmp);
    if (st == KVL_OK)
        st = kvl_errorf(KVL_ERR_INTERNAL, "GPU decoder rejected stream %u (reason %u) the CPU decoder accepts", s, why);
    return st;
}

kvl_status kvl_codec_gpu_decode(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *chunks, int32_t n,
                                const kvl_codec_profile *profile, kvl_codec_dtype out_dtype) {
    if (!g || (!chunks && n > 0) || n < 0) return kvl_errorf(KVL_ERR_INVALID_ARG, "bad arguments");
    if (out_dtype != KVL_CODEC_F32 && out_dtype != KVL_CODEC_BF16)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "GPU output dtype must be f32 or bf16");
    double t0 = now_ms();
    kvl_codec_gpu_stats stats = {0};
    size_t es = out_dtype == KVL_CODEC_BF16 ? 2 : 4;
    kvl_codec_plan *p = &g->plan;
    int32_t *lossy = malloc((size_t)(n ? n : 1) * sizeof *lossy); /* plan chunk index -> caller's */
    if (!lossy) return KVL_ERR_NOMEM;
    int32_t n_lossy = 0;
    size_t off[7] = {0}, total = 0;
    kvl_status st = host_plan(g, chunks, n, profile, es, lossy, &n_lossy, off, &total);
    if (st != KVL_OK || n_lossy == 0) goto lossless;
    st = grow_dev((void **)&g->d_buf, &g->d_cap, p->n_bytes);
    if (st == KVL_OK) st = grow_dev((void **)&g->d_plan, &g->dp_cap, total);
    if (st == KVL_OK) st = grow_dev((void **)&g->d_anchor, &g->anchor_cap, p->n_anchor * 2 + 2);
    if (st == KVL_OK && p->n_rot) st = grow_dev((void **)&g->d_rot, &g->rot_cap, p->n_rot * 4);
    if (st != KVL_OK) goto done;
    stats.plan_ms = now_ms() - t0;
    {
        kvl_cu_codec_args a = make_args(g, g->d_buf, g->d_plan, off, g->d_anchor, g->d_rot, g->d_err);
        cudaError_t e = cudaEventRecord(g->ev[0], g->st);
        if (e == cudaSuccess) e = cudaMemcpyAsync(g->d_buf, g->h_stage, p->n_bytes, cudaMemcpyHostToDevice, g->st);
        if (e == cudaSuccess) e = cudaMemcpyAsync(g->d_plan, g->h_plan, total, cudaMemcpyHostToDevice, g->st);
        if (e == cudaSuccess) e = cudaMemsetAsync(g->d_err, 0xff, 4, g->st);
        if (e == cudaSuccess) e = cudaMemsetAsync(g->d_err + 1, 0, 4, g->st);
        if (e == cudaSuccess) e = cudaEventRecord(g->ev[1], g->st);
        if (e == cudaSuccess) e = kvl_cu_codec_decode(&a, out_dtype == KVL_CODEC_BF16 ? KVL_CU_BF16 : KVL_CU_F32, g->st);
        if (e == cudaSuccess) e = cudaEventRecord(g->ev[2], g->st);
        if (e == cudaSuccess) e = cudaMemcpyAsync(g->h_err, g->d_err, 8, cudaMemcpyDeviceToHost, g->st);
        if (e == cudaSuccess) e = cudaStreamSynchronize(g->st);
        if (e != cudaSuccess) { st = cu_err(e, "GPU decode"); goto done; }
        float ms = 0;
        cudaEventElapsedTime(&ms, g->ev[0], g->ev[1]);
        stats.h2d_ms = ms;
        cudaEventElapsedTime(&ms, g->ev[1], g->ev[2]);
        stats.kernel_ms = ms;
        if (g->h_err[0] != 0xffffffffu) {
            uint32_t sx = g->h_err[0] < p->n_streams ? g->h_err[0] : 0;
            st = rediagnose(&chunks[lossy[p->sections[p->streams[sx].sec].chunk]], sx, g->h_err[1], profile);
            goto done;
        }
    }
lossless:
    if (st != KVL_OK) goto done;
    double tl = now_ms();
    for (int32_t i = 0; i < n && st == KVL_OK; i++) {
        kvl_codec_info in;
        kvl_codec_info_get(chunks[i].buf, chunks[i].size, &in);
        if (in.lossless) st = lossless_chunk(g, &chunks[i], &in, profile, out_dtype);
    }
    stats.lossless_ms = now_ms() - tl;
    stats.in_bytes = p->n_bytes;
    stats.out_elems = p->n_out;
    stats.n_streams = p->n_streams;
done:
    free(lossy);
    if (st == KVL_OK) {
        stats.total_ms = now_ms() - t0;
        g->stats = stats;
    }
    return st;
}

/* ---------------------------------------------------------------- two-phase decoding */

struct kvl_codec_gpu_batch {
    kvl_codec_gpu *g;
    uint8_t *d_blob;       /* bytes | plan arrays | anchor | rotation scratch | err, stream-ordered */
    size_t off[7];
    uint64_t n_bytes, n_streams;
    size_t o_plan, o_anchor, o_rot, o_err;
    cudaEvent_t copied;    /* the H2D copies are done (recorded on the decoder's stream) */
    cudaStream_t launched; /* the stream the kernel went to (NULL: not launched) */
    int dtype;             /* kvl_cu_dtype */
    kvl_cu_codec_args args;
    int32_t *stream_chunk; /* [n_streams] the caller's chunk of each stream (for re-diagnosis) */
    const kvl_codec_gpu_chunk *chunks;
    int32_t *lossy;
    const kvl_codec_profile *profile;
};

kvl_status kvl_codec_gpu_stage(kvl_codec_gpu *g, const kvl_codec_gpu_chunk *chunks, int32_t n,
                               const kvl_codec_profile *profile, kvl_codec_dtype out_dtype, kvl_codec_gpu_batch **out) {
    if (!g || !out || (!chunks && n > 0) || n < 1) return kvl_errorf(KVL_ERR_INVALID_ARG, "bad arguments");
    *out = NULL;
    if (out_dtype != KVL_CODEC_F32 && out_dtype != KVL_CODEC_BF16)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "GPU output dtype must be f32 or bf16");
    for (int32_t i = 0; i < n; i++) {
        kvl_codec_info in;
        KVL_TRY(kvl_codec_info_get(chunks[i].buf, chunks[i].size, &in));
        if (in.lossless) return kvl_errorf(KVL_ERR_CODEC_LEVEL, "chunk %d is lossless: decode it with kvl_codec_gpu_decode", i);
    }
    kvl_codec_gpu_batch *b = calloc(1, sizeof *b);
    if (!b) return KVL_ERR_NOMEM;
    b->g = g;
    b->chunks = chunks;
    b->profile = profile;
    b->dtype = out_dtype == KVL_CODEC_BF16 ? KVL_CU_BF16 : KVL_CU_F32;
    b->lossy = malloc((size_t)n * sizeof *b->lossy);
    int32_t n_lossy = 0;
    size_t total = 0;
    kvl_status st = b->lossy ? host_plan(g, chunks, n, profile, out_dtype == KVL_CODEC_BF16 ? 2 : 4, b->lossy, &n_lossy,
                                         b->off, &total)
                             : KVL_ERR_NOMEM;
    const kvl_codec_plan *p = &g->plan;
    if (st == KVL_OK && !(b->stream_chunk = malloc((p->n_streams ? p->n_streams : 1) * sizeof *b->stream_chunk)))
        st = KVL_ERR_NOMEM;
    for (size_t k = 0; st == KVL_OK && k < p->n_streams; k++) b->stream_chunk[k] = b->lossy[p->sections[p->streams[k].sec].chunk];
    cudaError_t e = cudaSuccess;
    if (st == KVL_OK) {
        b->n_bytes = p->n_bytes;
        b->n_streams = p->n_streams;
        b->o_plan = al256(p->n_bytes);
        b->o_anchor = b->o_plan + al256(total);
        b->o_rot = b->o_anchor + al256(p->n_anchor * 2 + 2);
        b->o_err = b->o_rot + al256(p->n_rot * 4);
        e = cudaMallocAsync((void **)&b->d_blob, b->o_err + 256, g->st);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&b->copied, cudaEventDisableTiming);
        if (e == cudaSuccess) e = cudaMemcpyAsync(b->d_blob, g->h_stage, p->n_bytes, cudaMemcpyHostToDevice, g->st);
        if (e == cudaSuccess) e = cudaMemcpyAsync(b->d_blob + b->o_plan, g->h_plan, total, cudaMemcpyHostToDevice, g->st);
        if (e == cudaSuccess) e = cudaMemsetAsync(b->d_blob + b->o_err, 0xff, 4, g->st);
        if (e == cudaSuccess) e = cudaMemsetAsync(b->d_blob + b->o_err + 4, 0, 4, g->st);
        if (e == cudaSuccess) e = cudaEventRecord(b->copied, g->st);
        if (e != cudaSuccess) st = cu_err(e, "GPU decode staging");
    }
    if (st == KVL_OK)
        b->args = make_args(g, b->d_blob, b->d_blob + b->o_plan, b->off, (int16_t *)(b->d_blob + b->o_anchor),
                            (float *)(b->d_blob + b->o_rot), (uint32_t *)(b->d_blob + b->o_err));
    if (st != KVL_OK) {
        kvl_codec_gpu_batch_free(b);
        return st;
    }
    *out = b;
    return KVL_OK;
}

kvl_status kvl_codec_gpu_launch(kvl_codec_gpu_batch *b, void *stream) {
    if (!b || b->launched) return kvl_errorf(KVL_ERR_INVALID_ARG, "no batch, or launched already");
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e = cudaStreamWaitEvent(s, b->copied, 0);
    if (e == cudaSuccess) e = kvl_cu_codec_decode(&b->args, (kvl_cu_dtype)b->dtype, s);
    if (e != cudaSuccess) return cu_err(e, "GPU decode launch");
    b->launched = s;
    return KVL_OK;
}

kvl_status kvl_codec_gpu_batch_finish(kvl_codec_gpu_batch *b) {
    if (!b) return KVL_OK;
    kvl_status st = KVL_OK;
    if (!b->launched) {
        st = kvl_errorf(KVL_ERR_INVALID_ARG, "batch finished without a launch");
    } else {
        uint32_t h[2] = {0, 0};
        cudaError_t e = cudaStreamSynchronize(b->launched);
        if (e == cudaSuccess) e = cudaMemcpy(h, b->d_blob + b->o_err, 8, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) st = cu_err(e, "GPU decode");
        else if (h[0] != 0xffffffffu) {
            uint32_t sx = h[0] < b->n_streams ? h[0] : 0;
            st = rediagnose(&b->chunks[b->stream_chunk[sx]], sx, h[1], b->profile);
        }
    }
    kvl_codec_gpu_batch_free(b);
    return st;
}

void kvl_codec_gpu_batch_free(kvl_codec_gpu_batch *b) {
    if (!b) return;
    /* the blob goes back to the pool in stream order: after the kernel (or the copies) */
    if (b->d_blob) cudaFreeAsync(b->d_blob, b->launched ? b->launched : b->g->st);
    if (b->copied) cudaEventDestroy(b->copied);
    free(b->stream_chunk);
    free(b->lossy);
    free(b);
}
