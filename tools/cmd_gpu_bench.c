/* kvloom gpu-bench: full prefill, CacheBlend-style selective recompute and decode on the CUDA
 * backend, with a Llama-3-8B-shaped synthetic model (bf16 weights generated on the device).
 * Prints one line per measurement (key=value), for bench/gpu_prefill.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#ifdef KVL_HAVE_CUDA
#include "kvl_cuda_backend.h"
#endif

int kvl_cmd_gpu_bench(int argc, char **argv);

static const char *USAGE =
    "kvloom gpu-bench [--tokens N[,N...]] [--layers L] [--reps R] [--select FRAC] [--query Q]\n"
    "                 [--decode-ctx N] [--decode-steps S] [--f32]";

#ifdef KVL_HAVE_CUDA
static double gib(size_t b) { return (double)b / (double)(1u << 30); }

/* model FLOPs of computing n_c query tokens whose visible keys sum to vis (matmuls + attention) */
static double flops(const kvl_model_config *c, double n_c, double vis) {
    double D = c->dim, qd = (double)c->n_heads * c->head_dim, kd = (double)c->n_kv_heads * c->head_dim,
           F = c->hidden_dim;
    double lin = D * (qd + 2 * kd) + D * qd + 3 * D * F;
    return c->n_layers * (2 * lin * n_c + 4 * qd * vis);
}

static uint64_t rs = 12345;
static int32_t rnd(int32_t n) {
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (int32_t)(rs % (uint64_t)n);
}
#endif

int kvl_cmd_gpu_bench(int argc, char **argv) {
    char toks[256] = "8192,32768";
    long layers = 32, reps = 3, query = 64, dctx = 8192, dsteps = 64;
    double sel = 0.15;
    int f32 = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--tokens") == 0) snprintf(toks, sizeof toks, "%s", argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--layers") == 0) { if (kvl_cli_int(argv[++i], 1, 512, &layers)) return kvl_cli_usage("gpu-bench", USAGE, "bad --layers"); }
        else if (i + 1 < argc && strcmp(argv[i], "--reps") == 0) { if (kvl_cli_int(argv[++i], 1, 1000, &reps)) return kvl_cli_usage("gpu-bench", USAGE, "bad --reps"); }
        else if (i + 1 < argc && strcmp(argv[i], "--query") == 0) { if (kvl_cli_int(argv[++i], 1, 1 << 20, &query)) return kvl_cli_usage("gpu-bench", USAGE, "bad --query"); }
        else if (i + 1 < argc && strcmp(argv[i], "--decode-ctx") == 0) { if (kvl_cli_int(argv[++i], 0, 1 << 20, &dctx)) return kvl_cli_usage("gpu-bench", USAGE, "bad --decode-ctx"); }
        else if (i + 1 < argc && strcmp(argv[i], "--decode-steps") == 0) { if (kvl_cli_int(argv[++i], 0, 1 << 20, &dsteps)) return kvl_cli_usage("gpu-bench", USAGE, "bad --decode-steps"); }
        else if (i + 1 < argc && strcmp(argv[i], "--select") == 0) { if (kvl_cli_float(argv[++i], 0, 1, &sel)) return kvl_cli_usage("gpu-bench", USAGE, "bad --select"); }
        else if (strcmp(argv[i], "--f32") == 0) f32 = 1;
        else return kvl_cli_usage("gpu-bench", USAGE, "unknown or incomplete argument '%s'", argv[i]);
    }
#ifndef KVL_HAVE_CUDA
    (void)sel; (void)f32;
    kvl_errorf(KVL_ERR_UNSUPPORTED, "this build has no CUDA backend (configure with -DKVL_CUDA=ON)");
    return kvl_cli_fail("gpu-bench", KVL_ERR_UNSUPPORTED);
#else
    kvl_model_config c = {0};
    c.dim = 4096; c.hidden_dim = 14336; c.n_layers = (int32_t)layers; c.n_heads = 32; c.n_kv_heads = 8;
    c.head_dim = 128; c.vocab_size = 128256; c.max_seq = 131072; c.rope_theta = 500000.0f; c.norm_eps = 1e-5f;
    c.tied_embeddings = 0; c.rope_style = KVL_ROPE_HALF; c.bos_id = 128000; c.eos_id = 128001;
    kvl_model_opts o = kvl_model_opts_default();
    o.backend = KVL_BACKEND_CUDA;
    o.weight_dtype = f32 ? KVL_WDTYPE_F32 : KVL_WDTYPE_BF16;
    kvl_model *m = NULL;
    double t0 = kvl_cli_now_ms();
    kvl_status s = kvl_model_synthetic(&c, 7, &o, &m);
    if (s != KVL_OK) return kvl_cli_fail("gpu-bench", s);
    printf("model layers=%d dim=%d heads=%d kv_heads=%d ffn=%d vocab=%d dtype=%s init_ms=%.0f\n", c.n_layers, c.dim,
           c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, f32 ? "f32" : "bf16", kvl_cli_now_ms() - t0);
    float *logits = malloc((size_t)c.vocab_size * sizeof(float));
    int rc = 0;
    for (char *p = toks; *p && rc == 0;) {
        long T = strtol(p, &p, 10);
        if (*p == ',') p++;
        if (T <= 0) break;
        int32_t n = (int32_t)(T + query);
        int32_t *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4);
        uint8_t *comp = calloc((size_t)n, 1);
        for (int32_t i = 0; i < n; i++) { tok[i] = rnd(c.vocab_size); pos[i] = i; }
        kvl_kv *kv = NULL;
        if ((s = kvl_kv_create(m, n, &kv)) != KVL_OK) { rc = kvl_cli_fail("gpu-bench", s); break; }
        int32_t last = (int32_t)T - 1;
        double best = 1e30, sum = 0;
        for (long r = 0; r <= reps && s == KVL_OK; r++) { /* r = 0 warms up */
            double a = kvl_cli_now_ms();
            s = kvl_forward(m, kv, (int32_t)T, tok, pos, NULL, 1, &last, logits);
            double ms = kvl_cli_now_ms() - a;
            if (r > 0) { sum += ms; if (ms < best) best = ms; }
        }
        if (s != KVL_OK) { rc = kvl_cli_fail("gpu-bench", s); kvl_kv_free(kv); break; }
        double fl = flops(&c, (double)T, (double)T * (T + 1) / 2);
        double med = sum / reps;
        printf("prefill tokens=%ld ms_mean=%.1f ms_best=%.1f tflops=%.1f mfu_h100=%.3f\n", T, med, best, fl / best / 1e9,
               fl / best / 1e9 / 989.0);
        size_t used = 0, total = 0;
        kvl_cuda_plan pl;
        kvl_cuda_plan_for(&c, o.weight_dtype, (int32_t)T, &pl);
        kvl_cuda_mem_info(m, &used, &total);
        printf("memory tokens=%ld weights_gib=%.2f kv_gib=%.2f workspace_gib=%.2f plan_total_gib=%.2f device_used_gib=%.2f "
               "device_total_gib=%.2f\n", T, gib(pl.weights), gib(pl.kv_per_token * (size_t)T), gib(pl.fwd_bytes),
               gib(pl.weights + pl.kv_per_token * (size_t)T + pl.fwd_bytes + pl.cublas_ws), gib(used), gib(total));
        /* selective recompute: T cached tokens, sel*T of them recomputed, plus a fresh query */
        int32_t nsel = 0;
        for (int32_t i = 0; i < (int32_t)T; i++) comp[i] = 0;
        while (nsel < (int32_t)(sel * (double)T)) {
            int32_t j = rnd((int32_t)T);
            if (!comp[j]) { comp[j] = 1; nsel++; }
        }
        for (int32_t i = (int32_t)T; i < n; i++) comp[i] = 1;
        int32_t lq = n - 1;
        double sbest = 1e30, ssum = 0;
        for (long r = 0; r <= reps && s == KVL_OK; r++) {
            double a = kvl_cli_now_ms();
            s = kvl_forward(m, kv, n, tok, pos, comp, 1, &lq, logits);
            double ms = kvl_cli_now_ms() - a;
            if (r > 0) { ssum += ms; if (ms < sbest) sbest = ms; }
        }
        if (s != KVL_OK) { rc = kvl_cli_fail("gpu-bench", s); kvl_kv_free(kv); break; }
        printf("selective tokens=%ld recomputed=%d query=%ld ms_mean=%.1f ms_best=%.1f ratio_to_full_prefill=%.3f\n", T, nsel,
               query, ssum / reps, sbest, sbest / best);
        kvl_kv_free(kv);
        free(tok); free(pos); free(comp);
    }
    if (rc == 0 && dctx > 0 && dsteps > 0) {
        int32_t cap = (int32_t)(dctx + dsteps);
        int32_t *tok = malloc((size_t)cap * 4), *pos = malloc((size_t)cap * 4);
        uint8_t *comp = calloc((size_t)cap, 1);
        for (int32_t i = 0; i < cap; i++) { tok[i] = rnd(c.vocab_size); pos[i] = i; }
        kvl_kv *kv = NULL;
        s = kvl_kv_create(m, cap, &kv);
        int32_t last = (int32_t)dctx - 1;
        if (s == KVL_OK) s = kvl_forward(m, kv, (int32_t)dctx, tok, pos, NULL, 1, &last, logits);
        double a = 0;
        for (int32_t st = 0; st < dsteps && s == KVL_OK; st++) {
            if (st == 1) a = kvl_cli_now_ms(); /* step 0 warms up */
            int32_t i = (int32_t)dctx + st;
            tok[i] = kvl_sample(logits, c.vocab_size, 0, NULL);
            memset(comp, 0, (size_t)cap);
            comp[i] = 1;
            s = kvl_forward(m, kv, i + 1, tok, pos, comp, 1, &i, logits);
        }
        if (s != KVL_OK) rc = kvl_cli_fail("gpu-bench", s);
        else if (dsteps > 1) {
            double ms = kvl_cli_now_ms() - a;
            printf("decode context=%ld steps=%ld ms_per_token=%.2f tokens_per_s=%.1f\n", dctx, dsteps - 1,
                   ms / (double)(dsteps - 1), 1000.0 * (double)(dsteps - 1) / ms);
        }
        kvl_kv_free(kv);
        free(tok); free(pos); free(comp);
    }
    free(logits);
    kvl_model_free(m);
    return rc;
#endif
}
