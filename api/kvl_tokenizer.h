/* kvl_tokenizer.h - llama2.c tokenizer.bin (BPE merges by score, byte-fallback tokens).
 * A kvl_tokenizer is immutable after loading: thread-safe for concurrent encode/decode. */
#ifndef KVL_TOKENIZER_H
#define KVL_TOKENIZER_H

#include <stdint.h>

#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvl_tokenizer kvl_tokenizer; /* opaque */

/* Loads tokenizer.bin for a vocabulary of vocab_size tokens. *out owned by the caller. */
kvl_status kvl_tokenizer_load(const char *path, int32_t vocab_size, kvl_tokenizer **out);
void kvl_tokenizer_free(kvl_tokenizer *t);

/* Finds the tokenizer belonging to a model path: for a .bin checkpoint, tok*.bin / tokenizer.bin
 * beside it; for an HF directory, tokenizer.bin in it or in its parent. Writes the path into out. */
kvl_status kvl_tokenizer_find(const char *model_path, char *out, size_t out_size);

/* Encodes UTF-8 text (llama2.c semantics: a leading space is prepended to non-empty text, BOS
 * first when bos != 0). out has room for max_out ids; *n_out receives the count. */
kvl_status kvl_tokenizer_encode(const kvl_tokenizer *t, const char *text, int bos, int32_t *out,
                                int32_t max_out, int32_t *n_out);

/* The text piece of token (after prev: the leading space after BOS is dropped, <0xXX> byte tokens
 * become their byte). The returned pointer is owned by the tokenizer or by buf[8]. */
const char *kvl_tokenizer_piece(const kvl_tokenizer *t, int32_t prev, int32_t token, char buf[8]);

/* Decodes ids into out (NUL-terminated, truncated to out_size). Returns bytes written. */
size_t kvl_tokenizer_decode(const kvl_tokenizer *t, const int32_t *ids, int32_t n, int32_t prev,
                            char *out, size_t out_size);

int32_t kvl_tokenizer_vocab(const kvl_tokenizer *t);

#ifdef __cplusplus
}
#endif
#endif
