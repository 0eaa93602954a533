/* kvl_safetensors.h - parser for the safetensors container (8-byte little-endian header length,
 * JSON header, raw tensor data). Validates every offset and size against the file; fuzzed. */
#ifndef KVL_SAFETENSORS_H
#define KVL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_status.h"

#define KVL_ST_MAX_HEADER (64u << 20) /* header JSON larger than this is rejected */
#define KVL_ST_MAX_DIMS 8

typedef enum { KVL_ST_F32 = 0, KVL_ST_BF16 = 1, KVL_ST_F16 = 2 } kvl_st_dtype;

typedef struct kvl_st_tensor {
    char *name;               /* owned */
    int dtype;                /* kvl_st_dtype */
    int ndim;
    int64_t shape[KVL_ST_MAX_DIMS];
    uint64_t begin, end;      /* byte range inside the data section */
} kvl_st_tensor;

typedef struct kvl_st_file {
    kvl_st_tensor *t;         /* owned, n entries */
    int n;
    uint64_t data_offset;     /* where the data section starts in the file */
    uint64_t data_size;
} kvl_st_file;

/* Parses the header of a safetensors file whose first `len` bytes are in buf; file_size is the whole
 * file's size (== len when buf holds it all). Every tensor must lie inside the data section and
 * its byte size must equal numel * element size. Unsupported dtypes are rejected only when a
 * caller asks for that tensor (dtype = -1 here). Returns KVL_ERR_TRUNCATED / KVL_ERR_FORMAT /
 * KVL_ERR_JSON with a detail message. On success out owns its arrays (kvl_st_free). */
kvl_status kvl_st_parse(const uint8_t *buf, size_t len, uint64_t file_size, kvl_st_file *out);
void kvl_st_free(kvl_st_file *f);

/* Finds a tensor by name; NULL if absent. */
const kvl_st_tensor *kvl_st_find(const kvl_st_file *f, const char *name);

#endif
