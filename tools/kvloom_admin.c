/* kvloom-admin - offline administration of a kvloom chunk store directory.
 *
 *   kvloom-admin --store DIR [--json] <command> [options]
 *   kvloom-admin --server URL [--token T] [--json] stat|tenants|audit|evict [options]
 *
 * With --server the commands go to a running kvloomd's admin listener (GET /admin/stats,
 * GET /admin/tenants, POST /admin/audit, POST /admin/evict); the token is the admin token
 * (default $KVLOOM_ADMIN_TOKEN).
 * The commands are thin wrappers over api/kvl_store_admin.h (the HTTP service exposes the same
 * functions). Read-only commands open the store read-only (safe next to a running writer); the rest
 * take the store's lock. Exit codes: 0 ok, 1 error, 2 usage, 3 audit/verify found damage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http_client.h"
#include "kvl_store.h"
#include "kvl_store_admin.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvloom-admin --store DIR [--json] [--create] <command> [options]\n"
            "       kvloom-admin --server URL [--token T] [--json] stat|tenants|audit|evict [options]\n"
            "  (--server: a running kvloomd's admin listener, e.g. http://127.0.0.1:8081;\n"
            "   --token: its admin token, default $KVLOOM_ADMIN_TOKEN)\n"
            "  (--create: make an empty store at DIR if none, for import)\n"
            "commands:\n"
            "  ls [--tenant T] [--limit N]          list entries\n"
            "  stat                                 counters, io backend, tenants\n"
            "  tenants                              per-tenant usage (--server only)\n"
            "  evict --key HEX [--key HEX ...]      delete these entries\n"
            "  evict [--tenant T] [--policy lru|cost] [--target BYTES] [--max N] [--expired]\n"
            "                                       evict by policy down to BYTES (default 0 = all)\n"
            "  audit [--no-data]                    full consistency + checksum audit\n"
            "  verify [HEX ...]                     verify checksums of these entries (default all)\n"
            "  compact [--keep-log N]               compact the index, trim the log to N records\n"
            "  export FILE [--tenant T]             write entries to an export file\n"
            "  import FILE                          read an export file into the store\n"
            "  log [--n N]                          newest N audit-log records (default 50)\n"
            "  set-quota TENANT BYTES               per-tenant quota (0 = none)\n"
            "  set-capacity BYTES                   capacity limit\n");
}

static int fail(const char *cmd, kvl_status s) {
    fprintf(stderr, "kvloom-admin %s: error: %s: %s\n", cmd, kvl_status_str(s), kvl_last_error());
    return 1;
}

static uint64_t parse_u64(const char *s, const char *what, int *bad) {
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t mul = 1;
    if (end && *end) {
        if (!strcmp(end, "K") || !strcmp(end, "KiB")) mul = 1ull << 10;
        else if (!strcmp(end, "M") || !strcmp(end, "MiB")) mul = 1ull << 20;
        else if (!strcmp(end, "G") || !strcmp(end, "GiB")) mul = 1ull << 30;
        else {
            fprintf(stderr, "kvloom-admin: %s '%s' is not a number (suffixes K, M, G)\n", what, s);
            *bad = 1;
        }
    }
    if (s[0] == '-') {
        fprintf(stderr, "kvloom-admin: %s must not be negative\n", what);
        *bad = 1;
    }
    return (uint64_t)v * mul;
}

static void fmt_time(uint64_t ns, char *b, size_t n) {
    if (!ns) {
        snprintf(b, n, "-");
        return;
    }
    time_t t = (time_t)(ns / 1000000000ull);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(b, n, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void print_flat(json_t *o, int indent) {
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        if (json_is_array(v) || json_is_object(v)) continue;
        char *d = json_dumps(v, JSON_ENCODE_ANY);
        printf("%*s%-20s %s\n", indent, "", k, d);
        free(d);
    }
}

static void print_human(const char *cmd, json_t *r) {
    if (!strcmp(cmd, "ls")) {
        printf("%-64s %-12s %6s %12s %6s %-20s\n", "key", "tenant", "tokens", "bytes", "hits", "last access");
        size_t i;
        json_t *e;
        json_array_foreach(r, i, e) {
            char t[32];
            fmt_time((uint64_t)json_integer_value(json_object_get(e, "last_access_ns")), t, sizeof t);
            printf("%-64s %-12s %6lld %12lld %6lld %-20s\n", json_string_value(json_object_get(e, "key")),
                   json_string_value(json_object_get(e, "tenant")),
                   (long long)json_integer_value(json_object_get(e, "n_tokens")),
                   (long long)json_integer_value(json_object_get(e, "value_bytes")),
                   (long long)json_integer_value(json_object_get(e, "hits")), t);
        }
        printf("%zu entries\n", json_array_size(r));
        return;
    }
    if (!strcmp(cmd, "log")) {
        size_t i;
        json_t *e;
        json_array_foreach(r, i, e) {
            char t[32];
            fmt_time((uint64_t)json_integer_value(json_object_get(e, "t")), t, sizeof t);
            printf("%8lld %s %-8s %-12s %10lld %.16s %s\n", (long long)json_integer_value(json_object_get(e, "seq")), t,
                   json_string_value(json_object_get(e, "op")), json_string_value(json_object_get(e, "tenant")),
                   (long long)json_integer_value(json_object_get(e, "bytes")),
                   json_string_value(json_object_get(e, "key")), json_string_value(json_object_get(e, "detail")));
        }
        return;
    }
    print_flat(r, 0);
    const char *k;
    json_t *v;
    json_object_foreach(r, k, v) {
        if (!json_is_array(v) || json_array_size(v) == 0) continue;
        printf("%s:\n", k);
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            if (json_is_object(e)) {
                print_flat(e, 2);
                printf("\n");
            } else {
                char *d = json_dumps(e, JSON_ENCODE_ANY);
                printf("  %s\n", d);
                free(d);
            }
        }
    }
}

/* --server: the same commands against a running kvloomd's admin API. */
static int run_server(const char *url, const char *token, const char *cmd, int as_json, const char *tenant,
                      const char *policy, uint64_t target, int has_target, uint64_t maxn, int expired, int no_data,
                      char **hex, size_t nhex) {
    kvl_http_url u;
    kvl_status s = kvl_http_url_parse(url, &u);
    if (s != KVL_OK) return fail(cmd, s);
    const char *method = "GET", *path = NULL;
    json_t *body = NULL;
    if (!strcmp(cmd, "stat")) path = "/admin/stats";
    else if (!strcmp(cmd, "tenants")) path = "/admin/tenants";
    else if (!strcmp(cmd, "audit")) {
        method = "POST";
        path = "/admin/audit";
        body = json_pack("{s:b}", "check_data", !no_data);
    } else if (!strcmp(cmd, "evict")) {
        method = "POST";
        path = "/admin/evict";
        body = json_object();
        if (nhex) {
            json_t *k = json_array();
            for (size_t i = 0; i < nhex; i++) json_array_append_new(k, json_string(hex[i]));
            json_object_set_new(body, "keys", k);
        } else {
            json_object_set_new(body, "policy", json_string(policy));
            if (expired) json_object_set_new(body, "expired_only", json_true());
            if (has_target || (!expired && !tenant)) json_object_set_new(body, "target_bytes", json_integer((json_int_t)target));
            if (maxn) json_object_set_new(body, "max_entries", json_integer((json_int_t)maxn));
        }
        if (tenant) json_object_set_new(body, "tenant", json_string(tenant));
    } else {
        fprintf(stderr, "kvloom-admin: '%s' works on a store directory (--store), not over --server\n", cmd);
        return 2;
    }
    char *b = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    int status = 0;
    char *resp = NULL;
    s = kvl_http_call(&u, method, path, token, b, &status, &resp, NULL);
    free(b);
    if (s != KVL_OK) return fail(cmd, s);
    json_t *r = json_loads(resp, 0, NULL);
    int rc = 0;
    if (status != 200) {
        json_t *e = json_object_get(r, "error");
        fprintf(stderr, "kvloom-admin %s: error: server answered %d: %s: %s\n", cmd, status,
                e ? json_string_value(json_object_get(e, "code")) : "?", e ? json_string_value(json_object_get(e, "message")) : resp);
        rc = 1;
    } else if (!r) {
        fprintf(stderr, "kvloom-admin %s: error: the server's answer is not JSON\n", cmd);
        rc = 1;
    } else {
        /* stat: the store part has the shape of the offline command's */
        json_t *show = !strcmp(cmd, "stat") && json_is_object(json_object_get(r, "store")) ? json_object_get(r, "store") : r;
        if (as_json) {
            char *d = json_dumps(r, JSON_INDENT(2));
            printf("%s\n", d);
            free(d);
        } else {
            print_human(cmd, show);
        }
        json_t *ok = json_object_get(r, "ok");
        if (ok && json_is_false(ok)) rc = 3;
    }
    json_decref(r);
    free(resp);
    return rc;
}

int main(int argc, char **argv) {
    const char *dir = NULL, *server = NULL, *token = getenv("KVLOOM_ADMIN_TOKEN");
    int as_json = 0, create = 0, i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--store") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--server") && i + 1 < argc) server = argv[++i];
        else if (!strcmp(argv[i], "--token") && i + 1 < argc) token = argv[++i];
        else if (!strcmp(argv[i], "--create")) create = 1;
        else if (!strcmp(argv[i], "--json")) as_json = 1;
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else break;
    }
    if ((!dir == !server) || i >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[i++];
    /* options after the command (and --json anywhere) */
    const char *tenant = NULL, *file = NULL, *policy = "lru";
    uint64_t limit = 0, target = 0, maxn = 0, keep_log = 0, logn = 50;
    int expired = 0, no_data = 0, bad = 0;
    kvl_store_key *keys = calloc((size_t)argc, sizeof *keys);
    char **hex = calloc((size_t)argc, sizeof *hex);
    size_t nhex = 0;
    int has_target = 0;
    size_t nkeys = 0;
    const char *pos[4] = {0};
    int npos = 0;
    for (; i < argc && !bad; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--json")) as_json = 1;
        else if (!strcmp(a, "--tenant") && more) tenant = argv[++i];
        else if (!strcmp(a, "--limit") && more) limit = parse_u64(argv[++i], "--limit", &bad);
        else if (!strcmp(a, "--target") && more) target = parse_u64(argv[++i], "--target", &bad), has_target = 1;
        else if (!strcmp(a, "--max") && more) maxn = parse_u64(argv[++i], "--max", &bad);
        else if (!strcmp(a, "--keep-log") && more) keep_log = parse_u64(argv[++i], "--keep-log", &bad);
        else if (!strcmp(a, "--n") && more) logn = parse_u64(argv[++i], "--n", &bad);
        else if (!strcmp(a, "--policy") && more) policy = argv[++i];
        else if (!strcmp(a, "--expired")) expired = 1;
        else if (!strcmp(a, "--no-data")) no_data = 1;
        else if (!strcmp(a, "--key") && more) {
            hex[nhex++] = argv[i + 1];
            if (kvl_store_key_parse(argv[++i], &keys[nkeys++]) != KVL_OK) {
                fprintf(stderr, "kvloom-admin: %s\n", kvl_last_error());
                bad = 1;
            }
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "kvloom-admin %s: unknown option %s\n", cmd, a);
            bad = 1;
        } else if (!strcmp(cmd, "verify")) {
            if (kvl_store_key_parse(a, &keys[nkeys++]) != KVL_OK) {
                fprintf(stderr, "kvloom-admin: %s\n", kvl_last_error());
                bad = 1;
            }
        } else if (npos < 4) pos[npos++] = a;
        else bad = 1;
    }
    if (strcmp(policy, "lru") && strcmp(policy, "cost")) {
        fprintf(stderr, "kvloom-admin: --policy is lru or cost\n");
        bad = 1;
    }
    int ro = !strcmp(cmd, "ls") || !strcmp(cmd, "stat") || !strcmp(cmd, "audit") || !strcmp(cmd, "verify") ||
             !strcmp(cmd, "export") || !strcmp(cmd, "log");
    int known = ro || (server && !strcmp(cmd, "tenants")) || !strcmp(cmd, "evict") || !strcmp(cmd, "compact") || !strcmp(cmd, "import") ||
                !strcmp(cmd, "set-quota") || !strcmp(cmd, "set-capacity");
    if (!known) fprintf(stderr, "kvloom-admin: unknown command '%s'\n", cmd);
    if ((!strcmp(cmd, "export") || !strcmp(cmd, "import")) && npos != 1) bad = 1;
    if (!strcmp(cmd, "set-quota") && npos != 2) bad = 1;
    if (!strcmp(cmd, "set-capacity") && npos != 1) bad = 1;
    if (bad || !known) {
        usage(stderr);
        free(keys);
        free(hex);
        return 2;
    }
    if (server) {
        int rc = run_server(server, token, cmd, as_json, tenant, policy, target, has_target, maxn, expired, no_data, hex, nhex);
        free(keys);
        free(hex);
        return rc;
    }
    file = pos[0];

    kvl_store_options o;
    kvl_store_options_default(&o);
    o.create = create && !ro;
    o.read_only = ro;
    o.cache_bytes = 0;
    kvl_store *st = NULL;
    kvl_status s = kvl_store_open(dir, &o, &st);
    if (s != KVL_OK) {
        free(keys);
        free(hex);
        return fail("open", s);
    }
    json_t *r = NULL;
    int rc = 0;
    if (!strcmp(cmd, "ls")) s = kvl_store_admin_ls(st, tenant, limit, &r);
    else if (!strcmp(cmd, "stat")) s = kvl_store_admin_stat(st, &r);
    else if (!strcmp(cmd, "audit")) s = kvl_store_audit(st, !no_data, &r);
    else if (!strcmp(cmd, "verify")) s = kvl_store_admin_verify(st, keys, nkeys, &r);
    else if (!strcmp(cmd, "export")) s = kvl_store_admin_export(st, file, tenant, &r);
    else if (!strcmp(cmd, "import")) s = kvl_store_admin_import(st, file, &r);
    else if (!strcmp(cmd, "log")) s = kvl_store_admin_log(st, logn, &r);
    else if (!strcmp(cmd, "compact")) s = kvl_store_admin_compact(st, keep_log, &r);
    else if (!strcmp(cmd, "evict")) {
        kvl_store_evict_req q = {.policy = strcmp(policy, "cost") ? KVL_STORE_EVICT_LRU : KVL_STORE_EVICT_COST,
                                 .target_bytes = expired ? UINT64_MAX : target,
                                 .expired_only = expired,
                                 .tenant = tenant,
                                 .max_entries = maxn};
        s = kvl_store_admin_evict(st, &q, keys, nkeys, &r);
    } else if (!strcmp(cmd, "set-quota")) {
        uint64_t q = parse_u64(pos[1], "quota", &bad);
        s = bad ? KVL_ERR_INVALID_ARG : kvl_store_set_quota(st, pos[0], q);
        if (s == KVL_OK) r = json_pack("{s:s s:I}", "tenant", pos[0], "quota", (json_int_t)q);
    } else if (!strcmp(cmd, "set-capacity")) {
        uint64_t c = parse_u64(pos[0], "capacity", &bad);
        s = bad ? KVL_ERR_INVALID_ARG : kvl_store_set_capacity(st, c);
        if (s == KVL_OK) r = json_pack("{s:I}", "capacity_bytes", (json_int_t)c);
    }
    if (s != KVL_OK) {
        rc = fail(cmd, s);
    } else {
        if (as_json) {
            char *d = json_dumps(r, JSON_INDENT(2));
            printf("%s\n", d);
            free(d);
        } else {
            print_human(cmd, r);
        }
        json_t *ok = json_is_object(r) ? json_object_get(r, "ok") : NULL;
        if (ok && json_is_false(ok)) rc = 3;
    }
    json_decref(r);
    kvl_store_close(st);
    free(keys);
    free(hex);
    return rc;
}
