#include "kvl_status.h"

#include <stdarg.h>

static _Thread_local char kvl_err_buf[1024];

const char *kvl_status_str(kvl_status s) {
    switch (s) {
#define C(x) case x: return #x;
        C(KVL_OK) C(KVL_ERR_INVALID_ARG) C(KVL_ERR_NOMEM) C(KVL_ERR_INTERNAL) C(KVL_ERR_UNSUPPORTED)
        C(KVL_ERR_RANGE) C(KVL_ERR_LIMIT) C(KVL_ERR_BUSY) C(KVL_ERR_CANCELLED) C(KVL_ERR_TIMEOUT)
        C(KVL_ERR_IO) C(KVL_ERR_NOT_FOUND) C(KVL_ERR_NOSPC) C(KVL_ERR_FSYNC) C(KVL_ERR_FENCED)
        C(KVL_ERR_PERMISSION) C(KVL_ERR_EXISTS)
        C(KVL_ERR_FORMAT) C(KVL_ERR_TRUNCATED) C(KVL_ERR_CHECKSUM) C(KVL_ERR_VERSION)
        C(KVL_ERR_MAGIC) C(KVL_ERR_JSON)
        C(KVL_ERR_MODEL_CONFIG) C(KVL_ERR_MODEL_WEIGHTS) C(KVL_ERR_TOKEN_RANGE)
        C(KVL_ERR_POSITION_RANGE) C(KVL_ERR_KV_MISSING) C(KVL_ERR_SHAPE) C(KVL_ERR_FINGERPRINT)
        C(KVL_ERR_TOKENIZER) C(KVL_ERR_CONTEXT_FULL)
        C(KVL_ERR_CODEC) C(KVL_ERR_CODEC_PROFILE) C(KVL_ERR_CODEC_LEVEL)
        C(KVL_ERR_STORE) C(KVL_ERR_KEY_NOT_FOUND) C(KVL_ERR_STORE_FULL) C(KVL_ERR_QUOTA)
        C(KVL_ERR_DB) C(KVL_ERR_CORRUPT)
        C(KVL_ERR_BLEND_PLAN)
        C(KVL_ERR_AUTH) C(KVL_ERR_FORBIDDEN) C(KVL_ERR_HTTP)
        C(KVL_ERR_CUDA) C(KVL_ERR_NO_GPU) C(KVL_ERR_GPU_OOM) C(KVL_ERR_CUBLAS)
#undef C
    }
    return "KVL_ERR_UNKNOWN";
}

kvl_status kvl_errorf(kvl_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(kvl_err_buf, sizeof kvl_err_buf, fmt, ap);
    va_end(ap);
    return s;
}

const char *kvl_last_error(void) { return kvl_err_buf; }

void kvl_clear_error(void) { kvl_err_buf[0] = 0; }
