/* load_controller.c - the cost model of the load path (api/kvl_gpu_load.h): load or recompute,
 * which codec level, which recompute ratio. Plain arithmetic, no device. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvl_gpu_load.h"

static double load_ms_of(const kvl_load_costs *c, uint64_t enc, uint64_t dec) {
    if (!(c->read_gbps > 0) || !(c->decode_gbps > 0)) return -1;
    double r = (double)enc / (c->read_gbps * 1e6), d = (double)dec / (c->decode_gbps * 1e6);
    return c->fixed_ms + (r > d ? r : d); /* read and decode of a stream of chunks overlap */
}

int kvl_load_decide(const kvl_load_costs *c, uint64_t encoded_bytes, uint64_t decoded_bytes, int32_t n_tokens,
                    double *load_ms, double *recompute_ms) {
    double l = c ? load_ms_of(c, encoded_bytes, decoded_bytes) : -1;
    double p = c && c->prefill_tok_s > 0 ? (double)n_tokens / c->prefill_tok_s * 1e3 : -1;
    if (load_ms) *load_ms = l;
    if (recompute_ms) *recompute_ms = p;
    if (l < 0) return 1;   /* cannot load */
    if (p < 0) return 0;   /* cannot recompute */
    return p < l;
}

int kvl_load_pick_level(const kvl_load_costs *c, int32_t n_levels, const int32_t *levels, const uint64_t *bytes,
                        uint64_t decoded_bytes, double budget_ms) {
    if (!c || n_levels < 1 || !levels || !bytes) return -1;
    int best = -1, smallest = 0;
    for (int32_t i = 0; i < n_levels; i++) {
        if (bytes[i] < bytes[smallest]) smallest = i;
        double l = load_ms_of(c, bytes[i], decoded_bytes);
        if (l >= 0 && l <= budget_ms && (best < 0 || levels[i] < levels[best])) best = i;
    }
    return best >= 0 ? best : smallest;
}

double kvl_load_recompute_ratio(double context_load_ms, double full_prefill_ms, double r_min, double r_max) {
    double r = full_prefill_ms > 0 ? context_load_ms / full_prefill_ms : r_max;
    if (!(r >= r_min)) r = r_min; /* also NaN */
    if (r > r_max) r = r_max;
    return r;
}

/* ---------------------------------------------------------------- online estimates */

void kvl_load_est_init(kvl_load_est *e, double alpha) {
    memset(e, 0, sizeof *e);
    e->alpha = alpha > 0 && alpha <= 1 ? alpha : 0.2;
}

static double *rate_of(kvl_load_est *e, int which) {
    switch (which) {
    case KVL_LOAD_READ: return &e->costs.read_gbps;
    case KVL_LOAD_DECODE: return &e->costs.decode_gbps;
    case KVL_LOAD_PREFILL: return &e->costs.prefill_tok_s;
    default: return NULL;
    }
}

void kvl_load_est_add(kvl_load_est *e, int which, double amount, double ms) {
    double *rate = rate_of(e, which);
    if (!rate || (e->pinned & (1u << which)) || !(amount > 0) || !(ms > 0) || !isfinite(amount) || !isfinite(ms)) return;
    if (e->samples[which]++ == 0) {
        e->amount[which] = amount;
        e->ms[which] = ms;
    } else {
        e->amount[which] += e->alpha * (amount - e->amount[which]);
        e->ms[which] += e->alpha * (ms - e->ms[which]);
    }
    /* bytes per ms / 1e6 = GB/s; tokens per ms * 1e3 = tokens/s */
    *rate = which == KVL_LOAD_PREFILL ? e->amount[which] / e->ms[which] * 1e3 : e->amount[which] / e->ms[which] / 1e6;
}

int kvl_load_est_ready(const kvl_load_est *e) {
    return e->costs.read_gbps > 0 && e->costs.decode_gbps > 0 && e->costs.prefill_tok_s > 0;
}

int kvl_load_est_decide(const kvl_load_est *e, uint64_t encoded_bytes, uint64_t decoded_bytes, int32_t n_tokens,
                        double *load_ms, double *recompute_ms) {
    if (!kvl_load_est_ready(e)) {
        if (load_ms) *load_ms = -1;
        if (recompute_ms) *recompute_ms = -1;
        return 0;
    }
    return kvl_load_decide(&e->costs, encoded_bytes, decoded_bytes, n_tokens, load_ms, recompute_ms);
}

kvl_status kvl_load_costs_parse(const char *spec, kvl_load_est *e) {
    /* in KVL_LOAD_* order (so that rate_of(k) and pin bit 1 << k name the same cost), fixed_ms last */
    static const char *const names[] = {"read_gbps", "decode_gbps", "prefill_tok_s", "fixed_ms"};
    if (!spec || !*spec)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "empty cost list (expected name=value,... with read_gbps, decode_gbps, "
                                               "prefill_tok_s, fixed_ms)");
    kvl_load_est t = *e;
    unsigned seen = 0;
    const char *p = spec;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        if (!eq)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "cost '%.*s' is not name=value", (int)(len > 64 ? 64 : len), p);
        size_t nl = (size_t)(eq - p);
        int k = -1;
        for (int i = 0; i < 4; i++)
            if (strlen(names[i]) == nl && !strncmp(p, names[i], nl)) k = i;
        if (k < 0)
            return kvl_errorf(KVL_ERR_INVALID_ARG,
                              "unknown cost '%.*s' (expected read_gbps, decode_gbps, prefill_tok_s or fixed_ms)",
                              (int)(nl > 64 ? 64 : nl), p);
        if (seen & (1u << k)) return kvl_errorf(KVL_ERR_INVALID_ARG, "cost %s given twice", names[k]);
        seen |= 1u << k;
        char val[64];
        size_t vl = len - nl - 1;
        if (vl == 0 || vl >= sizeof val) return kvl_errorf(KVL_ERR_INVALID_ARG, "cost %s needs a number", names[k]);
        memcpy(val, eq + 1, vl);
        val[vl] = 0;
        char *q = NULL;
        errno = 0;
        double v = strtod(val, &q);
        int ok = q && *q == 0 && errno == 0 && isfinite(v) && (k == 3 ? v >= 0 : v > 0);
        if (!ok)
            return kvl_errorf(KVL_ERR_INVALID_ARG, "cost %s needs a finite number %s, got '%s'", names[k],
                              k == 3 ? ">= 0" : "> 0", val);
        *(k < KVL_LOAD_N_RATES ? rate_of(&t, k) : &t.costs.fixed_ms) = v;
        t.pinned |= 1u << k;
        if (!end) break;
        p = end + 1;
    }
    *e = t;
    return KVL_OK;
}
