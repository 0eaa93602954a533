/* libFuzzer target: request bodies through the service's handlers (JSON parsing, strict field checks,
 * limits, the engine and store behind them) without libmicrohttpd. The first byte picks the endpoint,
 * the rest is the body. Every answer must be a status in [200, 599] with a body; every error body
 * must be {"error": {"code": string, "message": string, ...}}. */
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http_impl.h"

static kvl_http_server *srv;
static char dir[] = "/tmp/kvl-fuzz-http-XXXXXX";

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void cleanup(void) {
    kvl_http_server_free(srv);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    if (!mkdtemp(dir)) abort();
    kvl_http_config c = kvl_http_config_default();
    c.model_path = KVL_FUZZ_MODEL;
    c.store_dir = dir;
    c.listen = "127.0.0.1:0";
    c.admin_listen = "127.0.0.1:0";
    c.store_capacity_bytes = 32u << 20;
    c.store_segment_bytes = 8u << 20;
    /* small limits keep every input fast */
    c.limits.max_tokens = 512;
    c.limits.max_chunks = 16;
    c.limits.max_new_tokens = 4;
    kvl_status s = kvl_http_server_create(&c, &srv);
    if (s != KVL_OK) {
        fprintf(stderr, "fuzz_http_body: cannot create the server: %s: %s\n", kvl_status_str(s), kvl_last_error());
        abort();
    }
    atexit(cleanup);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const kvl_route routes[] = {KVL_R_DOCS_POST, KVL_R_GENERATE, KVL_R_CONTEXT, KVL_R_ADMIN_EVICT};
    if (size < 1) return 0;
    kvl_req r;
    memset(&r, 0, sizeof r);
    r.srv = srv;
    r.route = routes[data[0] % (sizeof routes / sizeof routes[0])];
    r.listener = r.route == KVL_R_ADMIN_EVICT ? KVL_L_ADMIN : KVL_L_API;
    strcpy(r.tenant, KVL_DEFAULT_TENANT);
    r.body_len = size - 1;
    r.body = malloc(size);
    memcpy(r.body, data + 1, size - 1);
    r.body[size - 1] = 0;
    r.t_start = kvl_now_ms();
    kvl_handle_request(&r);
    if (r.status < 200 || r.status > 599 || !r.resp) abort();
    if (r.status >= 400) {
        json_t *j = json_loadb(r.resp, r.resp_len, 0, NULL);
        json_t *e = json_object_get(j, "error");
        if (!json_is_string(json_object_get(e, "code")) || !json_is_string(json_object_get(e, "message"))) abort();
        json_decref(j);
    }
    free(r.resp);
    free(r.body);
    return 0;
}
