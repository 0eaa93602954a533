/* kvloom-bench-codec: CPU encode/decode throughput of the KV codec (MB/s of float16-equivalent KV,
 * 2 bytes per element) at 1 and 2 threads, on one 256-token chunk of seeded synthetic KV in a
 * realistic shape (default: Llama-3-8B, 32 layers x 8 KV heads x 128 dims), per level, with a
 * profile built from other synthetic chunks and without one. Best of R runs (wall clock) plus the
 * process CPU time of the 1-thread runs. Prints a table.
 * usage: kvloom-bench-codec [--layers L --heads H --dim D --tokens T] [--reps R] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvl_codec.h"

static double now_ms(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t rng(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}
static float unit(uint64_t *s) {
    float a = 0;
    for (int i = 0; i < 4; i++) a += (float)(rng(s) >> 40) / (float)(1ull << 24) - 0.5f;
    return a * 1.732f;
}

/* keys: per-channel means and spreads with outlier channels; values: zero-mean */
static void synth(float *x, const kvl_codec_shape *sh, uint64_t seed) {
    int32_t C = sh->n_kv_heads * sh->head_dim;
    uint64_t s = seed * 2654435761u + 88172645463325252ull, cs = 12345;
    for (int32_t l = 0; l < sh->n_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int32_t c = 0; c < C; c++) {
                /* channel statistics fixed per (l, kv, c) across chunks, as in a real model */
                float mean = kv == 0 ? unit(&cs) * 2 : 0, sd = 0.3f + (float)(rng(&cs) % 100) / 100;
                if (rng(&cs) % 16 == 0) sd *= 8;
                for (int32_t t = 0; t < sh->n_tokens; t++)
                    x[(((size_t)l * 2 + kv) * sh->n_tokens + t) * C + c] = mean + sd * unit(&s);
            }
}

int main(int argc, char **argv) {
    kvl_codec_shape sh = {32, 256, 8, 128};
    int reps = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--layers")) sh.n_layers = v;
        else if (!strcmp(argv[i], "--heads")) sh.n_kv_heads = v;
        else if (!strcmp(argv[i], "--dim")) sh.head_dim = v;
        else if (!strcmp(argv[i], "--tokens")) sh.n_tokens = v;
        else if (!strcmp(argv[i], "--reps")) reps = v;
        else {
            fprintf(stderr, "usage: kvloom-bench-codec [--layers L --heads H --dim D --tokens T] [--reps R]\n");
            return 2;
        }
    }
    if (reps < 1 || sh.n_layers < 1 || sh.n_tokens < 1 || sh.n_kv_heads < 1 || sh.head_dim < 1) {
        fprintf(stderr, "kvloom-bench-codec: arguments must be positive\n");
        return 2;
    }
    size_t n = (size_t)sh.n_layers * 2 * sh.n_tokens * sh.n_kv_heads * sh.head_dim;
    float *x = malloc(n * 4), *dec = malloc(n * 4), *cal = malloc(n * 4);
    if (!x || !dec || !cal) return 1;
    synth(x, &sh, 1);
    static const uint8_t fp[32] = {42};
    kvl_codec_profile_builder *b = NULL;
    kvl_codec_profile *prof = NULL;
    kvl_status st = kvl_codec_profile_builder_create(&sh, fp, &b);
    for (uint64_t k = 0; st == KVL_OK && k < 2; k++) {
        synth(cal, &sh, 100 + k);
        st = kvl_codec_profile_builder_add(b, cal, sh.n_tokens);
    }
    if (st == KVL_OK) st = kvl_codec_profile_builder_finish(b, &prof);
    kvl_codec_profile_builder_free(b);
    if (st != KVL_OK) {
        fprintf(stderr, "kvloom-bench-codec: profile: %s: %s\n", kvl_status_str(st), kvl_last_error());
        return 1;
    }
    double mb = 2.0 * n / 1e6;
    printf("KV chunk: %d layers x %d tokens x %d heads x %d dims = %zu elements (%.1f MB as float16)\n",
           sh.n_layers, sh.n_tokens, sh.n_kv_heads, sh.head_dim, n, mb);
    printf("%-5s %-7s %7s %8s %12s %12s %14s %14s\n", "level", "profile", "threads", "bits/el", "enc MB/s", "dec MB/s",
           "enc cpu MB/s", "dec cpu MB/s");
    for (int level = 0; level <= KVL_CODEC_MAX_LEVEL; level++)
        for (int up = 0; up <= (level > 0); up++)
            for (int th = 1; th <= 2; th++) {
                kvl_codec_opts o = {level, KVL_CODEC_SCHEME_KVLOOM, up ? prof : NULL, th, NULL};
                double be = 1e30, bd = 1e30, ce = 0, cd = 0;
                size_t ne = 0;
                for (int r = 0; r < reps; r++) {
                    uint8_t *e = NULL;
                    double t0 = now_ms(CLOCK_MONOTONIC), c0 = now_ms(CLOCK_PROCESS_CPUTIME_ID);
                    st = kvl_codec_encode(&sh, KVL_CODEC_F32, x, &o, &e, &ne);
                    double t1 = now_ms(CLOCK_MONOTONIC), c1 = now_ms(CLOCK_PROCESS_CPUTIME_ID);
                    if (st == KVL_OK) st = kvl_codec_decode(e, ne, up ? prof : NULL, 0, 0, KVL_CODEC_F32, dec, n * 4, th);
                    double t2 = now_ms(CLOCK_MONOTONIC), c2 = now_ms(CLOCK_PROCESS_CPUTIME_ID);
                    free(e);
                    if (st != KVL_OK) {
                        fprintf(stderr, "kvloom-bench-codec: %s: %s\n", kvl_status_str(st), kvl_last_error());
                        return 1;
                    }
                    be = fmin(be, t1 - t0);
                    bd = fmin(bd, t2 - t1);
                    ce += (c1 - c0) / reps;
                    cd += (c2 - c1) / reps;
                }
                printf("%-5d %-7s %7d %8.3f %12.1f %12.1f %14.1f %14.1f\n", level, up ? "yes" : "no", th, 8.0 * ne / n,
                       mb / (be / 1e3), mb / (bd / 1e3), mb / (ce / 1e3), mb / (cd / 1e3));
            }
    kvl_codec_profile_free(prof);
    free(x);
    free(dec);
    free(cal);
    return 0;
}
