/* libFuzzer target: the profile parser (KVLP files). Accepted profiles are serialised again and
 * must parse to the same id. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvl_codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvl_codec_profile *p = NULL;
    if (kvl_codec_profile_parse(data, size, NULL, &p) != KVL_OK) return 0;
    uint8_t *b = NULL;
    size_t n = 0;
    kvl_codec_profile *q = NULL;
    if (kvl_codec_profile_serialize(p, &b, &n) != KVL_OK || kvl_codec_profile_parse(b, n, NULL, &q) != KVL_OK ||
        memcmp(kvl_codec_profile_id(p), kvl_codec_profile_id(q), 16) != 0)
        abort();
    free(b);
    kvl_codec_profile_free(q);
    kvl_codec_profile_free(p);
    return 0;
}
