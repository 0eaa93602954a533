/* kvloomd: the kvloom service daemon.
 *
 *   kvloomd --model PATH --store DIR --listen HOST:PORT --admin-listen HOST:PORT [--auth FILE] [--gpu N]
 *           [--load-controller on|off] [--load-costs read_gbps=X,decode_gbps=Y,prefill_tok_s=Z,fixed_ms=W] ...
 *
 * Logs one line when ready ("kvloomd: ready: ..."); SIGTERM / SIGINT drain the requests in flight
 * and exit 0. Exit 2 on usage errors, 1 when the server cannot start. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "kvl_gpu_load.h"
#include "kvl_http.h"

static const char *USAGE =
    "kvloomd --model PATH --store DIR --listen HOST:PORT --admin-listen HOST:PORT [--auth FILE] [--gpu N]\n"
    "        [--workers N] [--http-threads N] [--max-body-bytes N] [--max-tokens N] [--max-chunks N]\n"
    "        [--max-new-tokens N] [--max-concurrent N] [--request-timeout-ms N] [--drain-timeout-ms N]\n"
    "        [--store-capacity-mb N] [--store-segment-mb N]\n"
    "        [--load-controller on|off] [--load-costs read_gbps=X,decode_gbps=Y,prefill_tok_s=Z,fixed_ms=W]";

static int usage(const char *fmt, const char *arg) {
    fprintf(stderr, "kvloomd: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nusage: %s\n", USAGE);
    return 2;
}

int main(int argc, char **argv) {
    kvl_http_config c = kvl_http_config_default();
    long drain_ms = 30000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: %s\n", USAGE);
            return 0;
        }
        if (i + 1 >= argc) return usage("unknown or incomplete argument '%s'", a);
        const char *v = argv[++i];
        long n = 0;
#define NUM(flag, lo, hi, dst)                                                                 \
    else if (!strcmp(a, flag)) {                                                               \
        if (kvl_cli_int(v, lo, hi, &n)) return usage(flag " needs an integer in range, got '%s'", v); \
        dst = n;                                                                               \
    }
        if (!strcmp(a, "--model")) c.model_path = v;
        else if (!strcmp(a, "--store")) c.store_dir = v;
        else if (!strcmp(a, "--listen")) c.listen = v;
        else if (!strcmp(a, "--admin-listen")) c.admin_listen = v;
        else if (!strcmp(a, "--auth")) c.auth_file = v;
        else if (!strcmp(a, "--load-controller")) {
            if (strcmp(v, "on") && strcmp(v, "off")) return usage("--load-controller needs 'on' or 'off', got '%s'", v);
            c.load_controller = !strcmp(v, "on");
        } else if (!strcmp(a, "--load-costs")) {
            kvl_load_est e;
            kvl_load_est_init(&e, 0);
            if (kvl_load_costs_parse(v, &e) != KVL_OK) return usage("--load-costs: %s", kvl_last_error());
            c.load_costs = v;
        }
        NUM("--gpu", 0, 64, c.gpu)
        NUM("--workers", 1, 256, c.workers)
        NUM("--http-threads", 1, 256, c.http_threads)
        NUM("--max-body-bytes", 1, 1L << 32, c.limits.max_body_bytes)
        NUM("--max-tokens", 1, 1 << 24, c.limits.max_tokens)
        NUM("--max-chunks", 1, 1 << 20, c.limits.max_chunks)
        NUM("--max-new-tokens", 0, 1 << 20, c.limits.max_new_tokens)
        NUM("--max-concurrent", 1, 1 << 20, c.limits.max_concurrent)
        NUM("--request-timeout-ms", 1, 86400000L, c.limits.request_timeout_ms)
        NUM("--drain-timeout-ms", 0, 86400000L, drain_ms)
        NUM("--store-capacity-mb", 1, 1L << 30, c.store_capacity_bytes)
        NUM("--store-segment-mb", 1, 1L << 20, c.store_segment_bytes)
        else return usage("unknown argument '%s'", a);
#undef NUM
    }
    c.store_capacity_bytes <<= 20;
    c.store_segment_bytes <<= 20;
    if (!c.model_path || !c.store_dir || !c.listen || !c.admin_listen)
        return usage("%s", "--model, --store, --listen and --admin-listen are required");
    if (c.load_costs && !c.load_controller)
        return usage("%s", "--load-costs needs the load controller (--load-controller on): with it off they are unused");

    /* every thread the server starts inherits this mask, so the signals reach only sigwait below */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    kvl_http_server *s = NULL;
    kvl_status st = kvl_http_server_create(&c, &s);
    if (st == KVL_OK) st = kvl_http_server_start(s);
    if (st != KVL_OK) {
        const char *d = kvl_last_error();
        fprintf(stderr, "kvloomd: error: %s%s%s\n", kvl_status_str(st), d[0] ? ": " : "", d);
        kvl_http_server_free(s);
        return 1;
    }
    /* the one ready line: where it listens and what it serves */
    const char *colon = strrchr(c.listen, ':'), *acolon = strrchr(c.admin_listen, ':');
    printf("kvloomd: ready: api http://%.*s:%d admin http://%.*s:%d; %s\n", (int)(colon - c.listen), c.listen,
           kvl_http_server_port(s, 0), (int)(acolon - c.admin_listen), c.admin_listen, kvl_http_server_port(s, 1),
           kvl_http_server_describe(s));
    fflush(stdout);

    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "kvloomd: %s: draining\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    int left = kvl_http_server_drain(s, (int)drain_ms);
    if (left) fprintf(stderr, "kvloomd: %d request(s) still in flight after %ld ms; closing them\n", left, drain_ms);
    kvl_http_server_free(s);
    fprintf(stderr, "kvloomd: stopped\n");
    return 0;
}
