/* libFuzzer target: the safetensors header parser must reject every malformed input with a status
 * and never read outside the buffer. */
#include <stddef.h>
#include <stdint.h>

#include "kvl_safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvl_st_file f;
    if (kvl_st_parse(data, size, size, &f) == KVL_OK) {
        /* every accepted tensor lies inside the buffer */
        for (int i = 0; i < f.n; i++) {
            KVL_ASSERT(f.t[i].begin <= f.t[i].end);
            KVL_ASSERT(f.data_offset + f.t[i].end <= size);
            volatile uint8_t sink = 0;
            if (f.t[i].end > f.t[i].begin) sink ^= data[f.data_offset + f.t[i].end - 1];
            (void)sink;
        }
        (void)kvl_st_find(&f, "a");
        kvl_st_free(&f);
    }
    return 0;
}
