/* libFuzzer target: the chunk decoder. Every input must be decoded or rejected with an error,
 * never crash or touch memory out of bounds (ASan/UBSan). Chunks that use a profile are decoded
 * with the fixed synthetic profile the seed corpus was written with (codec_synth.h). */
#include <stdint.h>
#include <stdlib.h>

#include "codec_synth.h"
#include "kvl_codec.h"

static kvl_codec_profile *prof;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    if (kvl_synth_profile(&prof) != KVL_OK) abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvl_codec_info info;
    if (kvl_codec_info_get(data, size, &info) != KVL_OK) return 0;
    /* the caller sizes the output from the header; bound it as a real caller would */
    if (info.n_elements > (1u << 22)) return 0;
    int32_t L = info.shape.n_layers;
    size_t per_layer = info.n_elements / (uint64_t)L;
    float *out = malloc(info.n_elements * sizeof *out);
    if (!out) return 0;
    kvl_codec_decode(data, size, prof, 0, 0, KVL_CODEC_F32, out, info.n_elements * sizeof *out, 1);
    kvl_codec_decode(data, size, NULL, L - 1, 1, KVL_CODEC_BF16, out, per_layer * 2, 2);
    free(out);
    return 0;
}
