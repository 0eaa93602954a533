/* test_codec_gpu.c - the GPU KVLC decoder against the CPU decoder: bit-identical output on every
 * level/scheme/table mode, on real KV (stories260K, facts13M) and synthetic Llama-3-8B-shaped
 * chunks, placed in the codec layout and in an engine-like KV layout, with profiles that rotate
 * keys and ones that do not; malformed chunks get the
 * CPU decoder's status. Exits 77 without a GPU.
 * KVL_GPU_CODEC_BENCH=N: throughput of N Llama-3-8B-shaped 512-token chunks per level instead. */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "codec/codec_synth.h"
#include "codec/codec_model_kv.h"
#include "kvl_codec.h"
#include "kvl_codec_gpu.h"
#include "kvl_engine.h"
#include "kvl_test.h"

static kvl_codec_gpu *G;

static size_t n_elems(const kvl_codec_shape *s) { return (size_t)s->n_layers * 2 * s->n_tokens * s->n_kv_heads * s->head_dim; }

/* GPU decode of enc (layers [l0, l0 + nl)) into a zeroed device buffer laid out with capacity cap
 * tokens at slot offset slot0, compared byte for byte with the CPU decode placed the same way. */
static void compare_one(const uint8_t *enc, size_t ne, const kvl_codec_profile *prof, const kvl_codec_shape *sh,
                        int32_t l0, int32_t nl, int32_t cap, int32_t slot0, kvl_codec_dtype dt, const char *what) {
    size_t es = dt == KVL_CODEC_BF16 ? 2 : 4, C = (size_t)sh->n_kv_heads * sh->head_dim, T = (size_t)sh->n_tokens;
    if (nl <= 0) nl = sh->n_layers - l0;
    size_t n_cpu = (size_t)nl * 2 * T * C, n_gpu = (size_t)nl * 2 * (size_t)cap * C;
    uint8_t *cpu = malloc(n_cpu * es), *want = calloc(n_gpu, es), *got = malloc(n_gpu * es);
    CHECK_OK(kvl_codec_decode(enc, ne, prof, l0, nl, dt, cpu, n_cpu * es, 2));
    for (size_t s = 0; s < (size_t)nl * 2; s++)
        memcpy(want + ((s * cap + slot0) * C) * es, cpu + s * T * C * es, T * C * es);
    void *d = NULL;
    CHECK(cudaMalloc(&d, n_gpu * es) == cudaSuccess);
    CHECK(cudaMemset(d, 0, n_gpu * es) == cudaSuccess);
    CHECK(cudaDeviceSynchronize() == cudaSuccess); /* the decoder's stream does not wait for the legacy stream */
    kvl_codec_gpu_chunk c = {enc, ne, l0, nl, (uint8_t *)d + (size_t)slot0 * C * es, 2 * (int64_t)cap * (int64_t)C,
                             (int64_t)cap * (int64_t)C, (int64_t)C};
    kvl_status st = kvl_codec_gpu_decode(G, &c, 1, prof, dt);
    CHECK_MSG(st == KVL_OK, "%s: %s %s", what, kvl_status_str(st), kvl_last_error());
    cudaMemcpy(got, d, n_gpu * es, cudaMemcpyDeviceToHost);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n_gpu * es; i++)
        if (got[i] != want[i] && bad++ == 0) first = i;
    CHECK_MSG(bad == 0, "%s: %zu bytes differ, first at %zu", what, bad, first);
    cudaFree(d);
    free(cpu); free(want); free(got);
}

/* every level and scheme, with and without a profile, both output types */
static void compare_all(const kvl_codec_shape *sh, const float *x, const kvl_codec_profile *prof, const char *name) {
    for (int scheme = 0; scheme < 2; scheme++)
        for (int level = 0; level <= KVL_CODEC_MAX_LEVEL; level++)
            for (int use_prof = 0; use_prof < 2; use_prof++) {
                if (use_prof && (!prof || level == 0 || scheme != KVL_CODEC_SCHEME_KVLOOM)) continue;
                if (scheme == KVL_CODEC_SCHEME_LMCACHE && level == 0) continue;
                kvl_codec_opts o = kvl_codec_opts_default();
                o.level = level;
                o.scheme = scheme;
                o.profile = use_prof ? prof : NULL;
                o.n_threads = 4;
                uint8_t *e = NULL;
                size_t ne = 0;
                CHECK_OK(kvl_codec_encode(sh, KVL_CODEC_F32, x, &o, &e, &ne));
                if (!e) continue;
                for (int dt = 0; dt < 2; dt++) {
                    char what[160];
                    snprintf(what, sizeof what, "%s scheme %d level %d prof %d %s", name, scheme, level, use_prof,
                             dt ? "bf16" : "f32");
                    kvl_codec_dtype t = dt ? KVL_CODEC_BF16 : KVL_CODEC_F32;
                    compare_one(e, ne, o.profile, sh, 0, 0, sh->n_tokens, 0, t, what);
                    /* engine layout: a later slot range of a larger cache, a layer subset */
                    int32_t l0 = sh->n_layers > 1 ? 1 : 0, nl = sh->n_layers - l0;
                    compare_one(e, ne, o.profile, sh, l0, nl, sh->n_tokens + 37, 29, t, what);
                }
                free(e);
            }
}

/* a profile calibrated on x; rot (kvl_codec_key_rotation) with RoPE base theta: keys rotated back */
static kvl_codec_profile *make_profile(const kvl_codec_shape *sh, const float *x, const uint8_t *fp, int rot, float theta) {
    kvl_codec_profile_builder *b = NULL;
    kvl_codec_profile *p = NULL;
    CHECK_OK(kvl_codec_profile_builder_create(sh, fp, &b));
    if (rot) CHECK_OK(kvl_codec_profile_builder_set_key_rotation(b, rot, theta));
    CHECK_OK(kvl_codec_profile_builder_add(b, x, sh->n_tokens));
    CHECK_OK(kvl_codec_profile_builder_finish(b, &p));
    kvl_codec_profile_builder_free(b);
    return p;
}

static void test_real(const char *model) {
    kvl_model *m = NULL;
    kvl_model_opts mo = kvl_model_opts_default();
    mo.n_threads = 2;
    CHECK_OK(kvl_model_load(model, &mo, &m));
    if (!m) return;
    const kvl_model_config *c = kvl_model_get_config(m);
    kvl_codec_shape sh;
    float *x = kvl_test_model_kv(m, 96, &sh);
    CHECK_MSG(x != NULL, "prefill of %s failed", model);
    if (!x) {
        kvl_model_free(m);
        return;
    }
    /* profile keys rotated as the model's RoPE (kvloom codec-profile's default) */
    kvl_codec_profile *p = make_profile(&sh, x, kvl_model_fingerprint(m),
                                        c->rope_style == KVL_ROPE_INTERLEAVED ? KVL_CODEC_KEYROT_INTERLEAVED : KVL_CODEC_KEYROT_HALF,
                                        c->rope_theta);
    compare_all(&sh, x, p, model);
    kvl_codec_profile_free(p);
    kvl_model_free(m);
    free(x);
}

/* several chunks of different levels (one with a profile, one lossless) in one call */
static void test_batch(void) {
    kvl_codec_shape sh = {4, 40, 2, 64};
    static const uint8_t fp[32] = {7};
    float *x = kvl_synth_kv(&sh, 5);
    kvl_codec_profile *p = make_profile(&sh, x, fp, KVL_CODEC_KEYROT_INTERLEAVED, 10000.0f);
    size_t C = 128, n = n_elems(&sh);
    uint8_t *e[5];
    size_t ne[5];
    kvl_codec_gpu_chunk ch[5];
    uint16_t *want = malloc(5 * n * 2), *got = malloc(5 * n * 2);
    void *d = NULL;
    cudaMalloc(&d, 5 * n * 2);
    for (int i = 0; i < 5; i++) {
        float *xi = kvl_synth_kv(&sh, 20 + (uint64_t)i);
        kvl_codec_opts o = kvl_codec_opts_default();
        o.level = i;
        o.profile = i == 3 ? p : NULL;
        CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, xi, &o, &e[i], &ne[i]));
        CHECK_OK(kvl_codec_decode(e[i], ne[i], p, 0, 0, KVL_CODEC_BF16, want + i * n, n * 2, 1));
        ch[i] = (kvl_codec_gpu_chunk){e[i], ne[i], 0, 0, (uint16_t *)d + i * n, 2 * 40 * (int64_t)C, 40 * (int64_t)C, (int64_t)C};
        free(xi);
    }
    CHECK_OK(kvl_codec_gpu_decode(G, ch, 5, p, KVL_CODEC_BF16));
    cudaMemcpy(got, d, 5 * n * 2, cudaMemcpyDeviceToHost);
    CHECK(memcmp(got, want, 5 * n * 2) == 0);
    /* two-phase: the lossy chunks staged, the kernel launched on another stream, then checked */
    {
        cudaStream_t other = NULL;
        cudaStreamCreate(&other);
        CHECK(cudaMemset(d, 0, 5 * n * 2) == cudaSuccess);
        CHECK(cudaDeviceSynchronize() == cudaSuccess);
        kvl_codec_gpu_batch *b = NULL;
        CHECK_ST(kvl_codec_gpu_stage(G, ch, 5, p, KVL_CODEC_BF16, &b), KVL_ERR_CODEC_LEVEL); /* chunk 0 is lossless */
        CHECK(b == NULL);
        CHECK_OK(kvl_codec_gpu_stage(G, ch + 1, 4, p, KVL_CODEC_BF16, &b));
        CHECK_OK(kvl_codec_gpu_launch(b, other));
        CHECK_ST(kvl_codec_gpu_launch(b, other), KVL_ERR_INVALID_ARG); /* once */
        CHECK_OK(kvl_codec_gpu_batch_finish(b));
        cudaMemcpy(got, d, 5 * n * 2, cudaMemcpyDeviceToHost);
        CHECK(memcmp(got + n, want + n, 4 * n * 2) == 0);
        /* a batch finished without a launch is an error, and freed */
        CHECK_OK(kvl_codec_gpu_stage(G, ch + 2, 1, NULL, KVL_CODEC_BF16, &b));
        CHECK_ST(kvl_codec_gpu_batch_finish(b), KVL_ERR_INVALID_ARG);
        CHECK_OK(kvl_codec_gpu_stage(G, ch + 2, 1, NULL, KVL_CODEC_BF16, &b));
        kvl_codec_gpu_batch_free(b);
        cudaStreamDestroy(other);
    }
    /* a second profile in the same call is refused; a chunk needing a profile without one too */
    CHECK_ST(kvl_codec_gpu_decode(G, &ch[3], 1, NULL, KVL_CODEC_BF16), KVL_ERR_CODEC_PROFILE);
    CHECK_ST(kvl_codec_gpu_decode(G, ch, 1, p, KVL_CODEC_F16), KVL_ERR_INVALID_ARG);
    for (int i = 0; i < 5; i++) free(e[i]);
    cudaFree(d);
    free(want); free(got); free(x);
    kvl_codec_profile_free(p);
}

/* truncations and single-bit flips: the GPU path returns what the CPU decoder returns */
static void test_malformed(void) {
    kvl_codec_shape sh = {2, 24, 2, 8};
    static const uint8_t fp[32] = {9};
    float *x = kvl_synth_kv(&sh, 11);
    kvl_codec_profile *p = make_profile(&sh, x, fp, KVL_CODEC_KEYROT_INTERLEAVED, 10000.0f);
    size_t n = n_elems(&sh);
    float *dec = malloc(n * 4);
    void *d = NULL;
    cudaMalloc(&d, n * 4);
    for (int variant = 0; variant < 4; variant++) {
        kvl_codec_opts o = kvl_codec_opts_default();
        if (variant == 0) o.level = 0;
        if (variant == 2) o.profile = p;
        if (variant == 3) o.scheme = KVL_CODEC_SCHEME_LMCACHE;
        uint8_t *e = NULL, *m = NULL;
        size_t ne = 0, mism = 0, accepted = 0;
        CHECK_OK(kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne));
        m = malloc(ne);
        for (size_t k = 0; k < 2 * ne; k++) {
            size_t len = ne;
            memcpy(m, e, ne);
            if (k < ne) len = k;                       /* truncated */
            else m[k - ne] ^= (uint8_t)(1u << (k % 8)); /* one bit flipped */
            kvl_codec_gpu_chunk c = {m, len, 0, 0, d, 2 * 24 * 16, 24 * 16, 16};
            kvl_status sc = kvl_codec_decode(m, len, o.profile, 0, 0, KVL_CODEC_F32, dec, n * 4, 1);
            kvl_status sg = kvl_codec_gpu_decode(G, &c, 1, o.profile, KVL_CODEC_F32);
            if (sc != sg && mism++ < 3)
                fprintf(stderr, "variant %d case %zu: cpu %s, gpu %s (%s)\n", variant, k, kvl_status_str(sc),
                        kvl_status_str(sg), kvl_last_error());
            accepted += sg == KVL_OK;
        }
        CHECK_MSG(mism == 0, "variant %d: %zu statuses differ", variant, mism);
        CHECK_MSG(accepted == 0, "variant %d: %zu malformed chunks accepted", variant, accepted);
        free(e); free(m);
    }
    cudaFree(d);
    free(dec); free(x);
    kvl_codec_profile_free(p);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* N Llama-3-8B-shaped chunks (32 layers, 8 KV heads of 128, 512 tokens) per level: GPU kernel and
 * call throughput vs the CPU decoder, GB/s of bf16 output */
static int bench(int N) {
    kvl_codec_shape sh = {32, 512, 8, 128};
    static const uint8_t fp[32] = {3};
    size_t n = n_elems(&sh);
    float *x = kvl_synth_kv(&sh, 1);
    kvl_codec_profile *p = make_profile(&sh, x, fp, 0, 0);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    void *d = NULL;
    if (cudaMalloc(&d, (size_t)N * n * 2) != cudaSuccess) return 1;
    uint16_t *hout = malloc(n * 2);
    printf("chunk: 32 layers x 512 tokens x 8 heads x 128, bf16 out %.1f MiB; %d chunks per call; cpu threads %ld\n",
           n * 2 / 1048576.0, N, ncpu);
    for (int level = 0; level <= KVL_CODEC_MAX_LEVEL; level++)
        for (int use_prof = 0; use_prof < 2; use_prof++) {
            if (use_prof && level == 0) continue;
            kvl_codec_opts o = kvl_codec_opts_default();
            o.level = level;
            o.profile = use_prof ? p : NULL;
            o.n_threads = (int32_t)ncpu;
            uint8_t *e = NULL;
            size_t ne = 0;
            if (kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne) != KVL_OK) return 1;
            kvl_codec_gpu_chunk *ch = malloc((size_t)N * sizeof *ch);
            for (int i = 0; i < N; i++)
                ch[i] = (kvl_codec_gpu_chunk){e, ne, 0, 0, (uint16_t *)d + (size_t)i * n, 2 * 512 * 1024, 512 * 1024, 1024};
            kvl_codec_gpu_stats best = {0};
            for (int r = 0; r < 3; r++) {
                kvl_codec_gpu_stats s;
                if (kvl_codec_gpu_decode(G, ch, N, o.profile, KVL_CODEC_BF16) != KVL_OK) {
                    fprintf(stderr, "decode: %s\n", kvl_last_error());
                    return 1;
                }
                kvl_codec_gpu_last_stats(G, &s);
                if (r == 0 || s.total_ms < best.total_ms) best = s;
            }
            /* bit-exactness of the benchmarked output too: the last chunk against the CPU */
            uint16_t *cpu = malloc(n * 2);
            kvl_codec_decode(e, ne, o.profile, 0, 0, KVL_CODEC_BF16, cpu, n * 2, (int32_t)ncpu);
            cudaMemcpy(hout, (uint16_t *)d + (size_t)(N - 1) * n, n * 2, cudaMemcpyDeviceToHost);
            int same = memcmp(cpu, hout, n * 2) == 0;
            double t0 = now_s();
            int reps = 2;
            for (int r = 0; r < reps; r++) kvl_codec_decode(e, ne, o.profile, 0, 0, KVL_CODEC_BF16, cpu, n * 2, (int32_t)ncpu);
            double cpu_s = (now_s() - t0) / reps;
            double out_gb = (double)N * n * 2 / 1e9;
            printf("level %d%s: %.2f MiB/chunk (%.2f bits/elem) | GPU kernel %.2f ms = %.1f GB/s | call %.2f ms = %.1f GB/s "
                   "(plan %.2f, h2d %.2f, lossless %.2f ms) | CPU %ld thr %.1f ms/chunk = %.2f GB/s | bit-exact %s\n",
                   level, use_prof ? " profile" : "", ne / 1048576.0, ne * 8.0 / n, best.kernel_ms,
                   best.kernel_ms > 0 ? out_gb / (best.kernel_ms / 1e3) : 0, best.total_ms, out_gb / (best.total_ms / 1e3),
                   best.plan_ms, best.h2d_ms, best.lossless_ms, ncpu, cpu_s * 1e3, n * 2 / 1e9 / cpu_s, same ? "yes" : "NO");
            if (!same) kvl_test_failures++;
            free(cpu); free(ch); free(e);
        }
    cudaFree(d);
    free(hout); free(x);
    kvl_codec_profile_free(p);
    KVL_TEST_END();
}

int main(int argc, char **argv) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) KVL_SKIP("no GPU");
    CHECK_OK(kvl_codec_gpu_create(NULL, &G));
    if (!G) return 1;
    const char *b = getenv("KVL_GPU_CODEC_BENCH");
    if (b && atoi(b) > 0) return bench(atoi(b));
    test_batch();
    test_malformed();
    static const uint8_t fp[32] = {1};
    kvl_codec_shape sh8b = {32, 64, 8, 128}; /* Llama-3-8B KV shape, short chunk */
    float *x = kvl_synth_kv(&sh8b, 3);
    kvl_codec_profile *p = make_profile(&sh8b, x, fp, 0, 0);
    compare_all(&sh8b, x, p, "llama3-8b-shape");
    kvl_codec_profile_free(p);
    /* keys rotated back (rotate-half pairs span two channel groups at head_dim 128) */
    p = make_profile(&sh8b, x, fp, KVL_CODEC_KEYROT_HALF, 500000.0f);
    compare_all(&sh8b, x, p, "llama3-8b-shape rot");
    kvl_codec_profile_free(p);
    free(x);
    for (int i = 1; i < argc; i++) test_real(argv[i]);
    /* narrow sub-streams (chan_group <= 8: the kernel's register fast path), with a channel tail
     * (cg 5 over 128 channels leaves 3), through the encoder's tuning hook */
    static const char *narrow[2] = {"cg=8", "cg=5"};
    for (int k = 0; k < 2; k++) {
        setenv("KVL_CODEC_TUNE", narrow[k], 1);
        test_batch();
        test_malformed();
        kvl_codec_shape shn = {4, 48, 8, 128};
        float *xn = kvl_synth_kv(&shn, 13);
        kvl_codec_profile *pn = make_profile(&shn, xn, fp, KVL_CODEC_KEYROT_HALF, 500000.0f);
        compare_all(&shn, xn, pn, narrow[k]);
        kvl_codec_profile_free(pn);
        free(xn);
        if (argc > 1) test_real(argv[1]);
        unsetenv("KVL_CODEC_TUNE");
    }
    kvl_codec_gpu_free(G);
    KVL_TEST_END();
}
