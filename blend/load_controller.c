/* load_controller.c - the cost model of the load path (api/kvl_gpu_load.h): load or recompute,
 * which codec level, which recompute ratio. Plain arithmetic, no device. */
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
