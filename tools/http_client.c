/* A minimal HTTP/1.1 client for the CLIs (see http_client.h). */
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http_client.h"

kvl_status kvl_http_url_parse(const char *url, kvl_http_url *u) {
    memset(u, 0, sizeof *u);
    if (strncmp(url, "http://", 7) != 0)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "server URL '%s' must start with http:// (https is not supported)", url);
    const char *h = url + 7, *slash = strchr(h, '/');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    char hostport[300];
    if (hl == 0 || hl >= sizeof hostport) return kvl_errorf(KVL_ERR_INVALID_ARG, "server URL '%s': bad host", url);
    memcpy(hostport, h, hl);
    hostport[hl] = 0;
    char *colon = strrchr(hostport, ':');
    if (colon && !strchr(colon, ']')) {
        *colon = 0;
        snprintf(u->port, sizeof u->port, "%.7s", colon + 1);
    } else {
        strcpy(u->port, "80");
    }
    char *host = hostport;
    if (host[0] == '[') {
        host++;
        char *e = strchr(host, ']');
        if (e) *e = 0;
    }
    snprintf(u->host, sizeof u->host, "%s", host);
    if (slash) snprintf(u->prefix, sizeof u->prefix, "%s", slash);
    size_t pl = strlen(u->prefix);
    while (pl && u->prefix[pl - 1] == '/') u->prefix[--pl] = 0;
    return KVL_OK;
}

kvl_status kvl_http_call(const kvl_http_url *u, const char *method, const char *path, const char *token,
                         const char *body, int *status, char **resp, size_t *resp_len) {
    *resp = NULL;
    *status = 0;
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int e = getaddrinfo(u->host, u->port, &hints, &res);
    if (e) return kvl_errorf(KVL_ERR_IO, "%s:%s: %s", u->host, u->port, gai_strerror(e));
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return kvl_errorf(KVL_ERR_IO, "cannot connect to %s:%s: %s", u->host, u->port, strerror(errno));
    size_t bl = body ? strlen(body) : 0;
    char head[2048];
    int hn = snprintf(head, sizeof head,
                      "%s %s%s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\nUser-Agent: kvloom\r\n%s%s%s"
                      "%s",
                      method, u->prefix, path, u->host, u->port, token ? "Authorization: Bearer " : "",
                      token ? token : "", token ? "\r\n" : "", body ? "Content-Type: application/json\r\n" : "");
    hn += snprintf(head + hn, sizeof head - (size_t)hn, "Content-Length: %zu\r\n\r\n", bl);
    kvl_status st = KVL_OK;
    const char *parts[2] = {head, body};
    size_t lens[2] = {(size_t)hn, bl};
    for (int p = 0; p < 2 && st == KVL_OK; p++)
        for (size_t off = 0; off < lens[p];) {
            ssize_t w = send(fd, parts[p] + off, lens[p] - off, MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                st = kvl_errorf(KVL_ERR_IO, "send to %s:%s: %s", u->host, u->port, strerror(errno));
                break;
            }
            off += (size_t)w;
        }
    size_t cap = 65536, n = 0;
    char *buf = st == KVL_OK ? malloc(cap) : NULL;
    if (st == KVL_OK && !buf) st = KVL_ERR_NOMEM;
    while (st == KVL_OK) {
        if (n + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                st = KVL_ERR_NOMEM;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = recv(fd, buf + n, cap - n - 1, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) st = kvl_errorf(KVL_ERR_IO, "receive from %s:%s: %s", u->host, u->port, strerror(errno));
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    if (st != KVL_OK) {
        free(buf);
        return st;
    }
    buf[n] = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    if (n < 12 || strncmp(buf, "HTTP/1.", 7) != 0 || !sep) {
        free(buf);
        return kvl_errorf(KVL_ERR_HTTP, "malformed HTTP response from %s:%s", u->host, u->port);
    }
    *status = atoi(buf + 9);
    size_t body_off = (size_t)(sep + 4 - buf);
    memmove(buf, buf + body_off, n - body_off + 1);
    *resp = buf;
    if (resp_len) *resp_len = n - body_off;
    return KVL_OK;
}

