/* kvl_test.h - minimal test helpers: CHECK records a failure and goes on; the test's exit code is
 * the failure count (ctest reports it), KVL_SKIP exits with code 77 (ctest SKIP_RETURN_CODE). */
#ifndef KVL_TEST_H
#define KVL_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvl_status.h"

static int kvl_test_failures = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);              \
            kvl_test_failures++;                                                         \
        }                                                                                \
    } while (0)

#define CHECK_MSG(cond, ...)                                                             \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                \
            fprintf(stderr, "\n");                                                       \
            kvl_test_failures++;                                                         \
        }                                                                                \
    } while (0)

/* status equality, printing both names and the detail message on mismatch */
#define CHECK_ST(expr, want)                                                             \
    do {                                                                                 \
        kvl_status got_ = (expr);                                                        \
        if (got_ != (want)) {                                                            \
            fprintf(stderr, "FAIL %s:%d: %s -> %s (want %s) [%s]\n", __FILE__, __LINE__, \
                    #expr, kvl_status_str(got_), kvl_status_str(want), kvl_last_error()); \
            kvl_test_failures++;                                                         \
        }                                                                                \
    } while (0)

#define CHECK_OK(expr) CHECK_ST(expr, KVL_OK)

#define KVL_SKIP(...)                                                                    \
    do {                                                                                 \
        printf("skipped: ");                                                             \
        printf(__VA_ARGS__);                                                             \
        printf("\n");                                                                    \
        exit(77);                                                                        \
    } while (0)

#define KVL_TEST_END()                                                                   \
    do {                                                                                 \
        if (kvl_test_failures) fprintf(stderr, "%d check(s) failed\n", kvl_test_failures); \
        else printf("all checks passed\n");                                              \
        return kvl_test_failures ? 1 : 0;                                                \
    } while (0)

/* relative L2 error ||a-b|| / ||b|| */
static inline double kvl_rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static inline size_t kvl_argmax(const float *x, size_t n) {
    size_t b = 0;
    for (size_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* Reads a whole binary file; NULL if missing. *n = bytes. */
static inline void *kvl_test_read(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = malloc(sz > 0 ? (size_t)sz : 1);
    if (b && sz > 0 && fread(b, (size_t)sz, 1, f) != 1) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *n = (size_t)(sz > 0 ? sz : 0);
    return b;
}

#endif
