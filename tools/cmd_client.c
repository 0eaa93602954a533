/* kvloom ingest / ask: clients of a running kvloomd (plain HTTP/1.1 over TCP). */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "http_client.h"

int kvl_cmd_ingest(int argc, char **argv);
int kvl_cmd_ask(int argc, char **argv);

/* Prints the server's JSON error for a failed call; returns 1. */
static int server_error(const char *cmd, int status, const char *resp) {
    json_t *j = json_loads(resp, 0, NULL);
    json_t *e = json_object_get(j, "error");
    fprintf(stderr, "kvloom %s: error: server answered %d: %s: %s\n", cmd, status,
            e ? json_string_value(json_object_get(e, "code")) : "?",
            e ? json_string_value(json_object_get(e, "message")) : resp);
    json_decref(j);
    return 1;
}

static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 65536, len = 0;
    char *b = malloc(cap);
    while (b) {
        if (len + 1 >= cap) {
            char *nb = realloc(b, cap * 2);
            if (!nb) {
                free(b);
                b = NULL;
                break;
            }
            b = nb;
            cap *= 2;
        }
        size_t r = fread(b + len, 1, cap - len - 1, f);
        if (r == 0) break;
        len += r;
    }
    if (b && ferror(f)) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[len] = 0;
    *n = len;
    return b;
}

/* A document id from a file name: its base name with characters outside [A-Za-z0-9._-] as '_'. */
static void doc_id_of(const char *path, char out[129]) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    snprintf(out, 129, "%s", b);
    for (char *p = out; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '.' ||
              *p == '_' || *p == '-'))
            *p = '_';
    if (!out[0] || !strcmp(out, ".") || !strcmp(out, "..")) strcpy(out, "doc");
}

static const char *INGEST_USAGE =
    "kvloom ingest --server URL [--token T] [--chunk-tokens N] FILES...\n"
    "  each file becomes one document (id: the file's base name); progress on a terminal";

int kvl_cmd_ingest(int argc, char **argv) {
    const char *server = NULL, *token = getenv("KVLOOM_TOKEN");
    long chunk_tokens = 0;
    int first_file = argc;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--server")) server = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--token")) token = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--chunk-tokens")) {
            if (kvl_cli_int(argv[++i], 1, 1 << 20, &chunk_tokens))
                return kvl_cli_usage("ingest", INGEST_USAGE, "--chunk-tokens needs a positive integer");
        } else if (argv[i][0] == '-' && argv[i][1]) return kvl_cli_usage("ingest", INGEST_USAGE, "unknown argument '%s'", argv[i]);
        else {
            first_file = i;
            break;
        }
    }
    if (!server || first_file >= argc) return kvl_cli_usage("ingest", INGEST_USAGE, "--server and at least one FILE are required");
    kvl_http_url u;
    kvl_status st = kvl_http_url_parse(server, &u);
    if (st != KVL_OK) return kvl_cli_fail("ingest", st);
    int nf = argc - first_file, tty = isatty(STDERR_FILENO);
    uint64_t total_bytes = 0, done_bytes = 0, chunks = 0;
    for (int i = first_file; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) {
            fprintf(stderr, "kvloom ingest: error: %s: %s\n", argv[i], strerror(errno));
            return 1;
        }
        total_bytes += (uint64_t)sb.st_size;
    }
    double t0 = kvl_cli_now_ms();
    int failures = 0;
    for (int i = first_file; i < argc; i++) {
        size_t n = 0;
        char *text = read_file(argv[i], &n);
        if (!text) {
            fprintf(stderr, "kvloom ingest: error: %s: %s\n", argv[i], strerror(errno));
            failures++;
            continue;
        }
        char id[129];
        doc_id_of(argv[i], id);
        json_t *req = json_pack("{s:s%,s:s}", "text", text, n, "doc_id", id);
        free(text);
        if (!req) {
            fprintf(stderr, "kvloom ingest: error: %s is not valid UTF-8 text\n", argv[i]);
            failures++;
            continue;
        }
        if (chunk_tokens) json_object_set_new(req, "chunk_tokens", json_integer(chunk_tokens));
        char *body = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        int status = 0;
        char *resp = NULL;
        st = body ? kvl_http_call(&u, "POST", "/v1/documents", token, body, &status, &resp, NULL) : KVL_ERR_NOMEM;
        free(body);
        if (st != KVL_OK) {
            if (tty) fputc('\n', stderr);
            free(resp);
            return kvl_cli_fail("ingest", st);
        }
        done_bytes += (uint64_t)n;
        if (status != 201) {
            if (tty) fputc('\n', stderr);
            fprintf(stderr, "kvloom ingest: %s: ", argv[i]);
            server_error("ingest", status, resp);
            free(resp);
            failures++;
            continue;
        }
        json_t *j = json_loads(resp, 0, NULL);
        free(resp);
        size_t nc = json_array_size(json_object_get(j, "chunks"));
        chunks += nc;
        double el = (kvl_cli_now_ms() - t0) / 1e3, rate = el > 0 ? (double)chunks / el : 0;
        double eta = done_bytes ? el * (double)(total_bytes - done_bytes) / (double)done_bytes : 0;
        int k = i - first_file + 1;
        if (tty) {
            int w = 30, fill = total_bytes ? (int)(w * (double)done_bytes / (double)total_bytes) : w;
            fprintf(stderr, "\r[%-*.*s] %d/%d docs  %llu chunks  %.1f chunks/s  ETA %.0fs ", w, fill,
                    "##############################", k, nf, (unsigned long long)chunks, rate, eta);
        } else {
            fprintf(stderr, "ingested %d/%d %s: %zu chunks, %.1f chunks/s, ETA %.0fs\n", k, nf, argv[i], nc, rate, eta);
        }
        printf("%s\t%s\t%lld tokens\t%zu chunks\n", argv[i], json_string_value(json_object_get(j, "doc_id")),
               (long long)json_integer_value(json_object_get(j, "tokens")), nc);
        fflush(stdout);
        json_decref(j);
    }
    if (tty) fputc('\n', stderr);
    return failures ? 1 : 0;
}

static const char *ASK_USAGE =
    "kvloom ask --server URL [--token T] [--doc ID]... [--chunk KEY]... [--mode blend|prefix|naive|full]\n"
    "           [-n MAX_TOKENS] [--temp T] [--seed S] [--ratio R] [--json] \"question\"";

int kvl_cmd_ask(int argc, char **argv) {
    const char *server = NULL, *token = getenv("KVLOOM_TOKEN"), *mode = NULL, *question = NULL;
    long n = 64, seed = 0;
    double temp = 0, ratio = -1;
    int raw = 0;
    json_t *docs = json_array(), *chunks = json_array();
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--server")) server = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--token")) token = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "--doc")) json_array_append_new(docs, json_string(argv[++i]));
        else if (i + 1 < argc && !strcmp(argv[i], "--chunk")) json_array_append_new(chunks, json_string(argv[++i]));
        else if (i + 1 < argc && !strcmp(argv[i], "--mode")) mode = argv[++i];
        else if (i + 1 < argc && !strcmp(argv[i], "-n")) {
            if (kvl_cli_int(argv[++i], 0, 1 << 20, &n)) { rc = kvl_cli_usage("ask", ASK_USAGE, "-n needs a count >= 0"); goto out; }
        } else if (i + 1 < argc && !strcmp(argv[i], "--temp")) {
            if (kvl_cli_float(argv[++i], 0, 100, &temp)) { rc = kvl_cli_usage("ask", ASK_USAGE, "--temp needs a number in [0, 100]"); goto out; }
        } else if (i + 1 < argc && !strcmp(argv[i], "--ratio")) {
            if (kvl_cli_float(argv[++i], 0, 1, &ratio)) { rc = kvl_cli_usage("ask", ASK_USAGE, "--ratio needs a number in [0, 1]"); goto out; }
        } else if (i + 1 < argc && !strcmp(argv[i], "--seed")) {
            if (kvl_cli_int(argv[++i], 0, __LONG_MAX__, &seed)) { rc = kvl_cli_usage("ask", ASK_USAGE, "--seed needs an integer >= 0"); goto out; }
        } else if (!strcmp(argv[i], "--json")) raw = 1;
        else if (argv[i][0] == '-' && argv[i][1]) { rc = kvl_cli_usage("ask", ASK_USAGE, "unknown argument '%s'", argv[i]); goto out; }
        else if (!question) question = argv[i];
        else { rc = kvl_cli_usage("ask", ASK_USAGE, "one question only (quote it)"); goto out; }
    }
    if (!server || !question) { rc = kvl_cli_usage("ask", ASK_USAGE, "--server and a question are required"); goto out; }
    kvl_http_url u;
    kvl_status st = kvl_http_url_parse(server, &u);
    if (st != KVL_OK) { rc = kvl_cli_fail("ask", st); goto out; }
    json_t *req = json_pack("{s:s,s:I,s:f,s:I}", "query", question, "max_tokens", (json_int_t)n, "temperature", temp,
                            "seed", (json_int_t)seed);
    if (!req) { fprintf(stderr, "kvloom ask: error: the question is not valid UTF-8\n"); rc = 1; goto out; }
    if (json_array_size(docs)) json_object_set(req, "documents", docs);
    if (json_array_size(chunks)) json_object_set(req, "chunks", chunks);
    if (mode) json_object_set_new(req, "mode", json_string(mode));
    if (ratio >= 0) json_object_set_new(req, "recompute_ratio", json_real(ratio));
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    int status = 0;
    char *resp = NULL;
    st = body ? kvl_http_call(&u, "POST", "/v1/generate", token, body, &status, &resp, NULL) : KVL_ERR_NOMEM;
    free(body);
    if (st != KVL_OK) { rc = kvl_cli_fail("ask", st); goto out; }
    if (status != 200) {
        rc = server_error("ask", status, resp);
    } else if (raw) {
        printf("%s\n", resp);
    } else {
        json_t *j = json_loads(resp, 0, NULL);
        json_t *t = json_object_get(j, "timing"), *s = json_object_get(j, "stats");
        printf("%s\n", json_string_value(json_object_get(j, "text")));
        fflush(stdout);
        fprintf(stderr, "[%s] ttft %.1f ms, total %.1f ms; chunks hit %lld (recomputed by the load controller %lld), missed %lld; "
                "tokens cached %lld, recomputed %lld\n",
                json_string_value(json_object_get(j, "mode")), json_number_value(json_object_get(t, "ttft_ms")),
                json_number_value(json_object_get(t, "total_ms")), (long long)json_integer_value(json_object_get(s, "chunks_hit")),
                (long long)json_integer_value(json_object_get(s, "chunks_recomputed")),
                (long long)json_integer_value(json_object_get(s, "chunks_missed")),
                (long long)json_integer_value(json_object_get(s, "cached_tokens")),
                (long long)json_integer_value(json_object_get(s, "recomputed_tokens")));
        json_decref(j);
    }
    free(resp);
out:
    json_decref(docs);
    json_decref(chunks);
    return rc;
}
