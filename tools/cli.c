#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

int kvl_cli_fail(const char *cmd, kvl_status s) {
    const char *d = kvl_last_error();
    fprintf(stderr, "kvloom %s: error: %s%s%s\n", cmd, kvl_status_str(s), d[0] ? ": " : "", d);
    return 1;
}

int kvl_cli_usage(const char *cmd, const char *usage, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "kvloom %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nusage: %s\n", usage);
    return 2;
}

kvl_status kvl_cli_read_i32(const char *path, int32_t **out, int32_t *n) {
    *out = NULL;
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return kvl_errorf(errno == ENOENT ? KVL_ERR_NOT_FOUND : KVL_ERR_IO, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (sz < 0 || sz % 4 != 0 || sz > (1L << 30)) {
        fclose(f);
        return kvl_errorf(KVL_ERR_FORMAT, "%s: %ld bytes is not a whole number of int32 token ids", path, sz);
    }
    int32_t *buf = malloc(sz ? (size_t)sz : 4);
    if (!buf) { fclose(f); return KVL_ERR_NOMEM; }
    if (sz && fread(buf, (size_t)sz, 1, f) != 1) {
        fclose(f);
        free(buf);
        return kvl_errorf(KVL_ERR_IO, "%s: read failed", path);
    }
    fclose(f);
    *out = buf;
    *n = (int32_t)(sz / 4);
    return KVL_OK;
}

kvl_status kvl_cli_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return kvl_errorf(KVL_ERR_IO, "%s: %s", path, strerror(errno));
    if (n && fwrite(data, n, 1, f) != 1) {
        fclose(f);
        return kvl_errorf(KVL_ERR_IO, "%s: write failed", path);
    }
    if (fclose(f) != 0) return kvl_errorf(KVL_ERR_IO, "%s: %s", path, strerror(errno));
    return KVL_OK;
}

int kvl_cli_int(const char *s, long lo, long hi, long *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int kvl_cli_float(const char *s, double lo, double hi, double *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

kvl_status kvl_cli_load_model(const char *path, kvl_model **m) {
    kvl_model_opts o = kvl_model_opts_default();
    const char *g = getenv("KVL_GPU");
    if (g && *g) {
        o.backend = KVL_BACKEND_CUDA;
        o.gpu = atoi(g);
    }
    return kvl_model_load(path, &o, m);
}

double kvl_cli_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}
