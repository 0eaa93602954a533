/* http_client.h - a minimal HTTP/1.1 client for the kvloom CLIs (kvloom ingest/ask, kvloom-admin
 * --server): one request per connection, plain http:// only. Thread-safe (no shared state). */
#ifndef KVL_HTTP_CLIENT_H
#define KVL_HTTP_CLIENT_H

#include <stddef.h>

#include "kvl_status.h"

typedef struct kvl_http_url {
    char host[300];
    char port[8];
    char prefix[512]; /* path prefix without a trailing slash */
} kvl_http_url;

/* Parses http://HOST[:PORT][/PREFIX]. KVL_ERR_INVALID_ARG for anything else (https included). */
kvl_status kvl_http_url_parse(const char *url, kvl_http_url *u);

/* Sends METHOD prefix+path with an optional bearer token and JSON body (NULL: none), reads the whole
 * response ("Connection: close"). *status = HTTP status; *resp = body, malloc'ed, NUL-terminated,
 * owned by the caller; *resp_len (may be NULL) its length. KVL_ERR_IO on connection failures,
 * KVL_ERR_HTTP on a malformed response. */
kvl_status kvl_http_call(const kvl_http_url *u, const char *method, const char *path, const char *token,
                         const char *body, int *status, char **resp, size_t *resp_len);

#endif
