/* kvl_status.h - the one status enum of kvloom.
 *
 * Every fallible function returns a kvl_status; KVL_OK is 0 and every error is negative, grouped by
 * class in blocks of 100. Numbers are never reused: add new codes at the end of their block.
 * kvl_status_str() names a status; kvl_last_error() gives the detail message of the last error set
 * on the calling thread (thread-local, valid until the next kvl_errorf on that thread).
 */
#ifndef KVL_STATUS_H
#define KVL_STATUS_H

#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvl_status {
    KVL_OK = 0,

    /* -1 .. -99: generic */
    KVL_ERR_INVALID_ARG = -1,   /* a parameter is NULL, negative or inconsistent */
    KVL_ERR_NOMEM = -2,         /* an allocation failed */
    KVL_ERR_INTERNAL = -3,      /* a bug: an invariant that should hold did not */
    KVL_ERR_UNSUPPORTED = -4,   /* valid request this build or machine cannot serve */
    KVL_ERR_RANGE = -5,         /* a value lies outside its allowed range */
    KVL_ERR_LIMIT = -6,         /* a configured size/count limit was exceeded */
    KVL_ERR_BUSY = -7,          /* resource temporarily unavailable, try again */
    KVL_ERR_CANCELLED = -8,     /* the operation was cancelled */
    KVL_ERR_TIMEOUT = -9,       /* the operation ran past its time limit */

    /* -100 .. -199: operating system and I/O */
    KVL_ERR_IO = -100,          /* read/write failed */
    KVL_ERR_NOT_FOUND = -101,   /* a file or directory does not exist */
    KVL_ERR_NOSPC = -102,       /* no space left on the device */
    KVL_ERR_FSYNC = -103,       /* fsync/fdatasync failed: the file is fenced */
    KVL_ERR_FENCED = -104,      /* the file was fenced after an earlier fsync error */
    KVL_ERR_PERMISSION = -105,  /* permission denied */
    KVL_ERR_EXISTS = -106,      /* the target already exists */

    /* -200 .. -299: malformed data */
    KVL_ERR_FORMAT = -200,      /* malformed input (bad field, bad structure) */
    KVL_ERR_TRUNCATED = -201,   /* input ends before its declared size */
    KVL_ERR_CHECKSUM = -202,    /* a checksum does not match: the bytes are damaged */
    KVL_ERR_VERSION = -203,     /* unsupported format version */
    KVL_ERR_MAGIC = -204,       /* wrong magic number: not this kind of file */
    KVL_ERR_JSON = -205,        /* JSON syntax or type error */

    /* -300 .. -399: model and engine */
    KVL_ERR_MODEL_CONFIG = -300,  /* config is missing, inconsistent or unsupported */
    KVL_ERR_MODEL_WEIGHTS = -301, /* a tensor is missing, has the wrong shape or dtype */
    KVL_ERR_TOKEN_RANGE = -302,   /* a token id lies outside [0, vocab) */
    KVL_ERR_POSITION_RANGE = -303,/* a position lies outside [0, max_seq) */
    KVL_ERR_KV_MISSING = -304,    /* a token is not computed and has no cached K/V */
    KVL_ERR_SHAPE = -305,         /* tensor/KV shapes do not agree */
    KVL_ERR_FINGERPRINT = -306,   /* cached data belongs to another model */
    KVL_ERR_TOKENIZER = -307,     /* tokenizer file malformed or text not encodable */
    KVL_ERR_CONTEXT_FULL = -308,  /* the KV cache has no room for more tokens */

    /* -400 .. -499: codec */
    KVL_ERR_CODEC = -400,         /* encoded stream malformed */
    KVL_ERR_CODEC_PROFILE = -401, /* profile missing, malformed or for another model */
    KVL_ERR_CODEC_LEVEL = -402,   /* unknown quality level */

    /* -500 .. -599: store */
    KVL_ERR_STORE = -500,         /* generic store failure */
    KVL_ERR_KEY_NOT_FOUND = -501, /* no committed entry under this key */
    KVL_ERR_STORE_FULL = -502,    /* capacity reached and nothing evictable */
    KVL_ERR_QUOTA = -503,         /* the tenant's quota is exhausted */
    KVL_ERR_DB = -504,            /* the RocksDB index reported an error */
    KVL_ERR_CORRUPT = -505,       /* stored bytes fail verification */

    /* -600 .. -699: blend */
    KVL_ERR_BLEND_PLAN = -600,    /* inconsistent blend plan or inputs */

    /* -700 .. -799: service */
    KVL_ERR_AUTH = -700,          /* missing or wrong credentials */
    KVL_ERR_FORBIDDEN = -701,     /* credentials valid but not allowed here */
    KVL_ERR_HTTP = -702,          /* HTTP protocol error */

    /* -800 .. -899: GPU */
    KVL_ERR_CUDA = -800,          /* a CUDA runtime/driver call failed */
    KVL_ERR_NO_GPU = -801,        /* no usable GPU */
    KVL_ERR_GPU_OOM = -802,       /* device memory exhausted */
    KVL_ERR_CUBLAS = -803         /* a cuBLAS/cuBLASLt call failed */
} kvl_status;

/* Name of a status ("KVL_ERR_FORMAT"), never NULL. Thread-safe. */
const char *kvl_status_str(kvl_status s);

/* Records a detail message for status s on the calling thread and returns s. printf-style. */
kvl_status kvl_errorf(kvl_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Detail message of the last kvl_errorf on this thread ("" if none). Thread-local storage, valid
 * until the next kvl_errorf on the same thread. */
const char *kvl_last_error(void);

/* Clears the thread's detail message. */
void kvl_clear_error(void);

/* Propagate a failing status, keeping the expression text in the detail message when none set. */
#define KVL_TRY(expr)                                                                        \
    do {                                                                                     \
        kvl_status kvl_try_s_ = (expr);                                                      \
        if (kvl_try_s_ != KVL_OK) {                                                          \
            if (!kvl_last_error()[0])                                                        \
                kvl_errorf(kvl_try_s_, "%s:%d: %s", __FILE__, __LINE__, #expr);             \
            return kvl_try_s_;                                                               \
        }                                                                                    \
    } while (0)

/* A broken invariant is a bug: abort with file:line. */
#define KVL_ASSERT(cond)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "kvloom: assertion failed at %s:%d: %s\n", __FILE__, __LINE__,  \
                    #cond);                                                                  \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
