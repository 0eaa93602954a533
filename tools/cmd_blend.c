/* kvloom blend-eval: quality and cost of CacheBlend against a full prefill of the same prompt.
 * kvloom blend-bench: CPU timing of full prefill vs naive vs blend on a synthetic model. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "kvl_blend.h"

int kvl_cmd_blend_eval(int argc, char **argv);
int kvl_cmd_blend_bench(int argc, char **argv);

#define MAX_CHUNKS 256
#define MAX_RATIOS 32

static const char *EVAL_USAGE =
    "kvloom blend-eval --model PATH --chunks A.i32,B.i32,... --tail T.i32 --query-len Q\n"
    "         [--mode blend|naive|full|prefix] [--ratio R[,R2,...]] [--select-layer L] [--metric k|v|kv|kvn]\n"
    "         [--gradual N --gradual-first R0] [--fresh-candidates 0|1] [--attn-weight 0|1|2]\n"
    "         [--chunk-head N] [--whole-chunks 0|1] [--budget B[,B2,...]]\n"
    "         [--guard SHARE [--guard-max R]] [--naive-guard 0|1] [--naive-guard-margin NATS]\n"
    "         [--rank-layer L|-1]\n"
    "         [--codec-level L] [--diag 0|1]\n"
    "         [--chunk-prefix none|bos|system] [--system S.i32]\n"
    "  prompt = BOS [+ system] + chunks + tail; each chunk is prefilled alone (behind --chunk-prefix:\n"
    "  nothing, a BOS, or BOS + the system prefix; default none); the system prefix's own cache is\n"
    "  computed once behind the BOS and reused exactly. Each cache is placed at its offset; the mode's\n"
    "  logits at the positions predicting tail[Q:] are compared with a full prefill (teacher-forced).\n"
    "  --codec-level L passes each chunk cache through the codec (encode + decode) first.\n"
    "  One JSON line per ratio (or budget).";

/* splits a comma list in place */
static int split_commas(char *s, char **out, int max) {
    int n = 0;
    for (char *t = strtok(s, ","); t; t = strtok(NULL, ",")) {
        if (n == max) return -1;
        out[n++] = t;
    }
    return n;
}

static int parse_metric(const char *s) {
    if (!strcmp(s, "k")) return KVL_DEV_K;
    if (!strcmp(s, "v")) return KVL_DEV_V;
    if (!strcmp(s, "kv")) return KVL_DEV_KV;
    if (!strcmp(s, "kvn")) return KVL_BLEND_METRIC_KV_NORM;
    return -1;
}

static const char *metric_name(int m) { return m == KVL_DEV_K ? "k" : m == KVL_DEV_V ? "v" : m == KVL_DEV_KV ? "kv" : "kvn"; }

/* log-softmax of x[n] into y (double) */
static void log_softmax(const float *x, int32_t n, double *y) {
    double mx = x[0];
    for (int32_t i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0;
    for (int32_t i = 0; i < n; i++) s += exp((double)x[i] - mx);
    double ls = log(s) + mx;
    for (int32_t i = 0; i < n; i++) y[i] = (double)x[i] - ls;
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

typedef struct {
    double mean_kl, max_kl, top1, acc_mode, acc_full, rel_err;
    double ent_mode, ent_full; /* mean entropy (nats) of the mode's / full prefill's distributions */
} quality;

/* KL(full || mode) per position, top-1 agreement, accuracy against the teacher-forced targets */
static quality compare(const float *full, const float *mode, const int32_t *targets, int32_t n_pos, int32_t vocab) {
    quality q = {0, 0, 0, 0, 0, 0, 0, 0};
    double *lp = malloc((size_t)vocab * sizeof *lp), *lq = malloc((size_t)vocab * sizeof *lq);
    double num = 0, den = 0;
    if (!lp || !lq) {
        free(lp);
        free(lq);
        q.mean_kl = NAN;
        return q;
    }
    for (int32_t t = 0; t < n_pos; t++) {
        const float *a = full + (size_t)t * vocab, *b = mode + (size_t)t * vocab;
        log_softmax(a, vocab, lp);
        log_softmax(b, vocab, lq);
        double kl = 0;
        for (int32_t i = 0; i < vocab; i++) kl += exp(lp[i]) * (lp[i] - lq[i]);
        if (kl < 0) kl = 0; /* rounding when the distributions are equal */
        for (int32_t i = 0; i < vocab; i++) q.ent_full -= exp(lp[i]) * lp[i], q.ent_mode -= exp(lq[i]) * lq[i];
        q.mean_kl += kl;
        if (kl > q.max_kl) q.max_kl = kl;
        int32_t am = argmax(a, vocab), bm = argmax(b, vocab);
        q.top1 += am == bm;
        q.acc_full += am == targets[t];
        q.acc_mode += bm == targets[t];
        for (int32_t i = 0; i < vocab; i++) {
            double d = (double)a[i] - b[i];
            num += d * d;
            den += (double)a[i] * a[i];
        }
    }
    q.mean_kl /= n_pos;
    q.top1 /= n_pos;
    q.acc_full /= n_pos;
    q.acc_mode /= n_pos;
    q.ent_mode /= n_pos;
    q.ent_full /= n_pos;
    q.rel_err = den > 0 ? sqrt(num / den) : sqrt(num);
    free(lp);
    free(lq);
    return q;
}

/* Attention the query tokens (slots q0..n-1) put on every slot, per layer, summed over heads and
 * divided by heads x queries: mass [n_layers][n_slots], from a step-by-step forward over plan p (kv
 * loaded for it; a blend plan must have run once so that its slots are filled). */
static kvl_status attn_profile(kvl_model *m, kvl_blend_plan *p, kvl_kv *kv, int32_t q0, double *mass_out) {
    kvl_fwd *f;
    KVL_TRY(kvl_fwd_begin(m, kv, p->n_slots, p->tokens, p->positions, &f));
    const kvl_model_config *c = kvl_model_get_config(m);
    int32_t nq = p->n_slots - q0, *q = malloc((size_t)nq * sizeof *q);
    float *mass = malloc((size_t)p->n_slots * sizeof *mass);
    kvl_status s = q && mass ? KVL_OK : KVL_ERR_NOMEM;
    for (int32_t i = 0; i < nq; i++) q[i] = q0 + i;
    for (int32_t l = 0; l < p->n_layers && s == KVL_OK; l++) {
        kvl_blend_layer *L = &p->layers[l];
        s = kvl_fwd_qkv(f, l, L->slots, L->n_qkv, NULL, NULL);
        if (s == KVL_OK) s = kvl_fwd_commit(f, L->slots, L->select && p->fresh_candidates ? L->n_qkv : L->n_keep);
        if (s == KVL_OK) s = kvl_fwd_attn_mass(f, q, nq, mass);
        for (int32_t j = 0; j < p->n_slots && s == KVL_OK; j++) mass_out[(size_t)l * p->n_slots + j] = mass[j] / ((double)nq * c->n_heads);
        if (s == KVL_OK) s = kvl_fwd_attn_ffn(f, L->slots, L->n_keep);
    }
    free(q);
    free(mass);
    kvl_fwd_free(f);
    return s;
}

/* sum of mass[l][*] over the slots with sel[j] */
static double mass_on(const double *mass, int32_t n, int32_t l, const uint8_t *sel) {
    double t = 0;
    for (int32_t j = 0; j < n; j++)
        if (sel[j]) t += mass[(size_t)l * n + j];
    return t;
}

/* --diag: per layer, the relative squared deviation of the placed chunk caches from the K/V a full
 * prefill computes (chunk-initial tokens vs the rest), and where the query's attention goes (BOS,
 * chunk-initial tokens, the cached tokens a blend at bo->ratio recomputes) in the full prefill, in
 * naive reuse and in that blend. One JSON line. */
static kvl_status diag(kvl_model *m, const kvl_blend_segment *segs, int n_segs, const int32_t *lslots, int32_t n_pos,
                       int32_t q0, const char *prefix, const kvl_blend_opts *bo) {
    const kvl_model_config *c = kvl_model_get_config(m);
    kvl_blend_plan *pn = NULL, *pf = NULL, *pb = NULL;
    kvl_blend_opts o = kvl_blend_opts_default();
    o.mode = KVL_BLEND_NAIVE;
    KVL_TRY(kvl_blend_plan_build(m, segs, n_segs, lslots, n_pos, &o, &pn));
    o.mode = KVL_BLEND_FULL;
    kvl_status s = kvl_blend_plan_build(m, segs, n_segs, lslots, n_pos, &o, &pf);
    if (s == KVL_OK) s = kvl_blend_plan_build(m, segs, n_segs, lslots, n_pos, bo, &pb);
    int32_t n = pn->n_slots, L = c->n_layers;
    size_t per = kvl_model_kv_elems_per_layer(m, n), d = per / (size_t)n;
    float *a = malloc(per * 2 * (size_t)L * sizeof(float)), *b = malloc(per * 2 * (size_t)L * sizeof(float));
    float *lg = malloc((size_t)n_pos * (size_t)c->vocab_size * sizeof(float));
    double *mf = malloc((size_t)L * n * sizeof(double)), *mn = malloc((size_t)L * n * sizeof(double)), *mb = malloc((size_t)L * n * sizeof(double));
    uint8_t *is_bos = calloc((size_t)n, 1), *is_first = calloc((size_t)n, 1), *is_kept = calloc((size_t)n * L, 1);
    kvl_kv *kv = NULL;
    if (s == KVL_OK && (!a || !b || !lg || !mf || !mn || !mb || !is_bos || !is_first || !is_kept)) s = KVL_ERR_NOMEM;
    if (s == KVL_OK) s = kvl_kv_create(m, n, &kv);
    if (s == KVL_OK) s = kvl_blend_load(m, pf, segs, kv);
    if (s == KVL_OK) s = attn_profile(m, pf, kv, q0, mf);
    if (s == KVL_OK) s = kvl_kv_read(kv, 0, L, 0, n, a);
    if (s == KVL_OK) s = kvl_blend_load(m, pn, segs, kv);
    if (s == KVL_OK) s = kvl_kv_read(kv, 0, L, 0, n, b);
    if (s == KVL_OK) s = attn_profile(m, pn, kv, q0, mn);
    if (s == KVL_OK) s = kvl_blend_load(m, pb, segs, kv);
    if (s == KVL_OK) s = kvl_blend_run(m, pb, kv, lg);
    if (s == KVL_OK) s = kvl_blend_load(m, pb, segs, kv);
    if (s == KVL_OK) s = attn_profile(m, pb, kv, q0, mb);
    if (s == KVL_OK) {
        is_bos[0] = 1;
        for (int32_t j = 0; j < n; j++) is_first[j] = pn->src_index[j] == 0 && pn->kind[j] == KVL_SLOT_CACHED;
        for (int32_t l = 0; l < L; l++)
            for (int32_t i = 0; i < pb->layers[l].n_keep; i++) {
                int32_t j = pb->layers[l].slots[i];
                is_kept[(size_t)l * n + j] = pb->kind[j] == KVL_SLOT_CACHED;
            }
        json_t *j = json_pack("{s:s, s:f}", "chunk_prefix", prefix, "diag_ratio", (double)bo->ratio);
        const char *names[4] = {"k_dev_first", "k_dev_rest", "v_dev_first", "v_dev_rest"};
        json_t *arr[4];
        for (int t = 0; t < 4; t++) arr[t] = json_array();
        for (int32_t l = 0; l < L; l++)
            for (int w = 0; w < 2; w++) {
                double sf = 0, sr = 0;
                int nf = 0, nr = 0;
                for (int32_t i = 0; i < n; i++) {
                    if (pn->kind[i] != KVL_SLOT_CACHED) continue;
                    const float *x = a + ((size_t)l * 2 + (size_t)w) * per + (size_t)i * d, *y = b + ((size_t)l * 2 + (size_t)w) * per + (size_t)i * d;
                    double num = 0, den = 0;
                    for (size_t e = 0; e < d; e++) num += ((double)x[e] - y[e]) * ((double)x[e] - y[e]), den += (double)x[e] * x[e];
                    double r = den > 0 ? num / den : 0;
                    if (is_first[i]) sf += r, nf++;
                    else sr += r, nr++;
                }
                json_array_append_new(arr[w * 2], json_real(nf ? sf / nf : 0));
                json_array_append_new(arr[w * 2 + 1], json_real(nr ? sr / nr : 0));
            }
        for (int t = 0; t < 4; t++) json_object_set_new(j, names[t], arr[t]);
        const double *prof[3] = {mf, mn, mb};
        const char *pname[3] = {"full", "naive", "blend"};
        for (int t = 0; t < 3; t++) {
            json_t *xb = json_array(), *xf = json_array(), *xk = json_array();
            for (int32_t l = 0; l < L; l++) {
                json_array_append_new(xb, json_real(mass_on(prof[t], n, l, is_bos)));
                json_array_append_new(xf, json_real(mass_on(prof[t], n, l, is_first)));
                json_array_append_new(xk, json_real(mass_on(prof[t], n, l, is_kept + (size_t)l * n)));
            }
            char k1[64], k2[64], k3[64];
            snprintf(k1, sizeof k1, "%s_attn_bos", pname[t]);
            snprintf(k2, sizeof k2, "%s_attn_chunk_first", pname[t]);
            snprintf(k3, sizeof k3, "%s_attn_recomputed", pname[t]);
            json_object_set_new(j, k1, xb);
            json_object_set_new(j, k2, xf);
            json_object_set_new(j, k3, xk);
        }
        char *txt = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(5));
        if (txt) printf("%s\n", txt);
        free(txt);
        json_decref(j);
    }
    kvl_kv_free(kv);
    free(a); free(b); free(lg); free(mf); free(mn); free(mb); free(is_bos); free(is_first); free(is_kept);
    kvl_blend_plan_free(pn);
    kvl_blend_plan_free(pf);
    kvl_blend_plan_free(pb);
    return s;
}

int kvl_cmd_blend_eval(int argc, char **argv) {
    const char *C = "blend-eval";
    const char *model = NULL, *tail_path = NULL, *prefix = "none", *sys_path = NULL;
    char *chunks_arg = NULL, *ratio_arg = NULL, *budget_arg = NULL;
    const kvl_blend_opts def = kvl_blend_opts_default();
    long qlen = -1, sel_layer = def.select_layer, gradual = def.gradual_layers, fresh = def.fresh_candidates, attnw = def.attn_weight;
    long chunk_head = def.chunk_head, whole = def.whole_chunks, want_diag = 0, codec_level = -1;
    size_t codec_bytes = 0, raw_bytes = 0;
    double gfirst = -1, guard = def.guard, guard_max = def.guard_max_ratio, ng_margin = def.naive_guard_margin;
    long naive_guard = def.naive_guard, rank_layer = def.naive_rank_layer;
    int mode = def.mode, metric = def.metric;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: %s\n", EVAL_USAGE);
            return 0;
        }
        if (!v) return kvl_cli_usage(C, EVAL_USAGE, "unknown or incomplete argument '%s'", a);
        i++;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--chunks")) chunks_arg = argv[i];
        else if (!strcmp(a, "--tail")) tail_path = v;
        else if (!strcmp(a, "--query-len")) {
            if (kvl_cli_int(v, 1, 1 << 24, &qlen)) return kvl_cli_usage(C, EVAL_USAGE, "--query-len needs an integer >= 1, got '%s'", v);
        } else if (!strcmp(a, "--mode")) {
            if ((mode = kvl_blend_mode_parse(v)) < 0) return kvl_cli_usage(C, EVAL_USAGE, "unknown --mode '%s'", v);
        } else if (!strcmp(a, "--ratio")) ratio_arg = argv[i];
        else if (!strcmp(a, "--select-layer")) {
            if (kvl_cli_int(v, 0, 1 << 16, &sel_layer)) return kvl_cli_usage(C, EVAL_USAGE, "--select-layer needs a layer index, got '%s'", v);
        } else if (!strcmp(a, "--metric")) {
            if ((metric = parse_metric(v)) < 0) return kvl_cli_usage(C, EVAL_USAGE, "--metric must be k, v, kv or kvn, got '%s'", v);
        } else if (!strcmp(a, "--gradual")) {
            if (kvl_cli_int(v, 1, 1 << 16, &gradual)) return kvl_cli_usage(C, EVAL_USAGE, "--gradual needs a layer count >= 1, got '%s'", v);
        } else if (!strcmp(a, "--gradual-first")) {
            if (kvl_cli_float(v, 0, 1, &gfirst)) return kvl_cli_usage(C, EVAL_USAGE, "--gradual-first needs a ratio in [0, 1], got '%s'", v);
        } else if (!strcmp(a, "--fresh-candidates")) {
            if (kvl_cli_int(v, 0, 1, &fresh)) return kvl_cli_usage(C, EVAL_USAGE, "--fresh-candidates must be 0 or 1, got '%s'", v);
        } else if (!strcmp(a, "--attn-weight")) {
            if (kvl_cli_int(v, 0, 2, &attnw)) return kvl_cli_usage(C, EVAL_USAGE, "--attn-weight must be 0, 1 or 2, got '%s'", v);
        } else if (!strcmp(a, "--chunk-prefix")) {
            if (strcmp(v, "none") && strcmp(v, "bos") && strcmp(v, "system"))
                return kvl_cli_usage(C, EVAL_USAGE, "--chunk-prefix must be none, bos or system, got '%s'", v);
            prefix = v;
        } else if (!strcmp(a, "--system")) sys_path = v;
        else if (!strcmp(a, "--budget")) budget_arg = argv[i];
        else if (!strcmp(a, "--codec-level")) {
            if (kvl_cli_int(v, 0, KVL_CODEC_MAX_LEVEL, &codec_level))
                return kvl_cli_usage(C, EVAL_USAGE, "--codec-level needs a level in [0, %d], got '%s'", KVL_CODEC_MAX_LEVEL, v);
        }
        else if (!strcmp(a, "--guard")) {
            if (kvl_cli_float(v, 0, 1, &guard)) return kvl_cli_usage(C, EVAL_USAGE, "--guard needs a share in [0, 1], got '%s'", v);
        } else if (!strcmp(a, "--rank-layer")) {
            if (kvl_cli_int(v, -1, 1 << 16, &rank_layer)) return kvl_cli_usage(C, EVAL_USAGE, "--rank-layer needs a layer index or -1, got '%s'", v);
        } else if (!strcmp(a, "--naive-guard")) {
            if (kvl_cli_int(v, 0, 1, &naive_guard)) return kvl_cli_usage(C, EVAL_USAGE, "--naive-guard must be 0 or 1, got '%s'", v);
        } else if (!strcmp(a, "--naive-guard-margin")) {
            if (kvl_cli_float(v, 0, 1e6, &ng_margin))
                return kvl_cli_usage(C, EVAL_USAGE, "--naive-guard-margin needs nats >= 0, got '%s'", v);
        } else if (!strcmp(a, "--guard-max")) {
            if (kvl_cli_float(v, 0, 1, &guard_max)) return kvl_cli_usage(C, EVAL_USAGE, "--guard-max needs a ratio in [0, 1], got '%s'", v);
        }
 else if (!strcmp(a, "--diag")) {
            if (kvl_cli_int(v, 0, 1, &want_diag)) return kvl_cli_usage(C, EVAL_USAGE, "--diag must be 0 or 1, got '%s'", v);
        }
        else if (!strcmp(a, "--chunk-head")) {
            if (kvl_cli_int(v, 0, 1 << 20, &chunk_head)) return kvl_cli_usage(C, EVAL_USAGE, "--chunk-head needs a token count >= 0, got '%s'", v);
        } else if (!strcmp(a, "--whole-chunks")) {
            if (kvl_cli_int(v, 0, 1, &whole)) return kvl_cli_usage(C, EVAL_USAGE, "--whole-chunks must be 0 or 1, got '%s'", v);
        } else return kvl_cli_usage(C, EVAL_USAGE, "unknown argument '%s'", a);
    }
    if (!model || !chunks_arg || !tail_path || qlen < 0)
        return kvl_cli_usage(C, EVAL_USAGE, "--model, --chunks, --tail and --query-len are required");
    if (!strcmp(prefix, "system") && !sys_path) return kvl_cli_usage(C, EVAL_USAGE, "--chunk-prefix system needs --system");
    char *chunk_paths[MAX_CHUNKS], *ratio_strs[MAX_RATIOS];
    int n_chunks = split_commas(chunks_arg, chunk_paths, MAX_CHUNKS);
    if (n_chunks <= 0) return kvl_cli_usage(C, EVAL_USAGE, "--chunks needs 1..%d comma-separated files", MAX_CHUNKS);
    double ratios[MAX_RATIOS];
    int n_ratios = 1;
    ratios[0] = def.ratio;
    if (ratio_arg) {
        n_ratios = split_commas(ratio_arg, ratio_strs, MAX_RATIOS);
        if (n_ratios <= 0) return kvl_cli_usage(C, EVAL_USAGE, "--ratio needs 1..%d comma-separated ratios", MAX_RATIOS);
        for (int i = 0; i < n_ratios; i++)
            if (kvl_cli_float(ratio_strs[i], 0, 1, &ratios[i])) return kvl_cli_usage(C, EVAL_USAGE, "--ratio needs ratios in [0, 1], got '%s'", ratio_strs[i]);
    }
    /* --budget B[,B2,...] replaces --ratio: one result per budget */
    int by_budget = budget_arg != NULL;
    if (by_budget) {
        if (ratio_arg) return kvl_cli_usage(C, EVAL_USAGE, "--budget and --ratio exclude each other");
        n_ratios = split_commas(budget_arg, ratio_strs, MAX_RATIOS);
        if (n_ratios <= 0) return kvl_cli_usage(C, EVAL_USAGE, "--budget needs 1..%d comma-separated budgets", MAX_RATIOS);
        for (int i = 0; i < n_ratios; i++)
            if (kvl_cli_float(ratio_strs[i], 0, 1, &ratios[i]) || ratios[i] <= 0)
                return kvl_cli_usage(C, EVAL_USAGE, "--budget needs budgets in (0, 1], got '%s'", ratio_strs[i]);
    }
    if (mode != KVL_BLEND_BLEND) n_ratios = 1;

    kvl_status s = KVL_OK;
    kvl_model *m = NULL;
    int32_t *chunk_tok[MAX_CHUNKS] = {0}, chunk_n[MAX_CHUNKS] = {0}, *tail = NULL, n_tail = 0;
    kvl_chunk_cache *caches[MAX_CHUNKS] = {0};
    kvl_blend_segment segs[MAX_CHUNKS + 3];
    int32_t *prompt = NULL, *pos = NULL, *lslots = NULL, *targets = NULL, *ctx = NULL, *sys = NULL, n_sys = 0;
    kvl_chunk_cache *sys_cache = NULL;
    float *full_logits = NULL, *mode_logits = NULL;
    kvl_kv *kv = NULL;
    int rc = 0;
    for (int i = 0; i < n_chunks && s == KVL_OK; i++) {
        s = kvl_cli_read_i32(chunk_paths[i], &chunk_tok[i], &chunk_n[i]);
        if (s == KVL_OK && chunk_n[i] == 0) s = kvl_errorf(KVL_ERR_FORMAT, "%s holds no tokens", chunk_paths[i]);
    }
    if (s == KVL_OK) s = kvl_cli_read_i32(tail_path, &tail, &n_tail);
    if (s == KVL_OK && sys_path) {
        s = kvl_cli_read_i32(sys_path, &sys, &n_sys);
        if (s == KVL_OK && n_sys == 0) s = kvl_errorf(KVL_ERR_FORMAT, "%s holds no tokens", sys_path);
    }
    if (s == KVL_OK && qlen >= n_tail)
        s = kvl_errorf(KVL_ERR_RANGE, "--query-len %ld leaves no continuation in the %d-token tail", qlen, n_tail);
    if (s == KVL_OK) s = kvl_cli_load_model(model, &m);
    const kvl_model_config *c = m ? kvl_model_get_config(m) : NULL;
    int32_t n = 1 + n_sys + n_tail, n_pos = n_tail - (int32_t)qlen;
    for (int i = 0; i < n_chunks; i++) n += chunk_n[i];
    if (s == KVL_OK && n > c->max_seq)
        s = kvl_errorf(KVL_ERR_CONTEXT_FULL, "the prompt (BOS + %d system + %d chunks + %d-token tail = %d tokens) exceeds the model's context of %d",
                       n_sys, n_chunks, n_tail, n, c->max_seq);
    if (s == KVL_OK) {
        prompt = malloc((size_t)n * sizeof *prompt);
        pos = malloc((size_t)n * sizeof *pos);
        ctx = malloc((size_t)n * sizeof *ctx);
        lslots = malloc((size_t)n_pos * sizeof *lslots);
        targets = malloc((size_t)n_pos * sizeof *targets);
        full_logits = malloc((size_t)n_pos * (size_t)c->vocab_size * sizeof(float));
        mode_logits = malloc((size_t)n_pos * (size_t)c->vocab_size * sizeof(float));
        if (!prompt || !pos || !ctx || !lslots || !targets || !full_logits || !mode_logits) s = KVL_ERR_NOMEM;
    }
    if (s == KVL_OK) {
        int32_t at = 0;
        prompt[at++] = c->bos_id;
        if (n_sys) memcpy(prompt + at, sys, (size_t)n_sys * sizeof *prompt);
        at += n_sys;
        for (int i = 0; i < n_chunks; i++) {
            memcpy(prompt + at, chunk_tok[i], (size_t)chunk_n[i] * sizeof *prompt);
            at += chunk_n[i];
        }
        memcpy(prompt + at, tail, (size_t)n_tail * sizeof *prompt);
        for (int32_t i = 0; i < n; i++) pos[i] = i;
        /* tail[Q + t] is predicted by slot (n - n_tail) + Q - 1 + t */
        for (int32_t t = 0; t < n_pos; t++) {
            lslots[t] = n - n_tail + (int32_t)qlen - 1 + t;
            targets[t] = tail[qlen + t];
        }
        /* chunk caches (ingest; not timed): prefill alone behind the chosen context. In prefix mode
         * each chunk's cache is a prefix-cache entry: computed behind everything that precedes it. */
        int32_t ahead = 1 + n_sys;
        memcpy(ctx, prompt, (size_t)n * sizeof *ctx);
        if (n_sys) s = kvl_chunk_cache_prefill(m, sys, n_sys, ctx, 1, &sys_cache);
        for (int i = 0; i < n_chunks && s == KVL_OK; i++) {
            int32_t n_ctx = 0;
            if (mode == KVL_BLEND_PREFIX) n_ctx = ahead;
            else if (!strcmp(prefix, "bos")) n_ctx = 1;
            else if (!strcmp(prefix, "system")) n_ctx = 1 + n_sys;
            s = kvl_chunk_cache_prefill(m, chunk_tok[i], chunk_n[i], ctx, n_ctx, &caches[i]);
            if (s == KVL_OK && codec_level >= 0) {
                /* the chunk's cache as it would come back from the store: encoded, then decoded */
                kvl_codec_opts co = kvl_codec_opts_default();
                co.level = (int32_t)codec_level;
                size_t sz = 0;
                s = kvl_chunk_cache_codec_roundtrip(caches[i], &co, &sz);
                codec_bytes += sz;
                raw_bytes += kvl_chunk_cache_floats(caches[i]) * sizeof(float);
            }
            ahead += chunk_n[i];
        }
    }
    double full_ms = 0;
    if (s == KVL_OK) s = kvl_kv_create(m, n, &kv);
    if (s == KVL_OK) {
        double t0 = kvl_cli_now_ms();
        s = kvl_forward(m, kv, n, prompt, pos, NULL, n_pos, lslots, full_logits);
        full_ms = kvl_cli_now_ms() - t0;
    }
    int32_t bos = c ? c->bos_id : 0;
    int n_segs = 0;
    segs[n_segs++] = (kvl_blend_segment){NULL, &bos, 1};
    if (sys_cache) segs[n_segs++] = (kvl_blend_segment){sys_cache, NULL, 0};
    for (int i = 0; i < n_chunks; i++) segs[n_segs++] = (kvl_blend_segment){caches[i], NULL, 0};
    segs[n_segs++] = (kvl_blend_segment){NULL, tail, n_tail};
    for (int r = 0; r < n_ratios && s == KVL_OK; r++) {
        kvl_blend_opts o = kvl_blend_opts_default();
        o.mode = mode;
        o.ratio = (float)ratios[r];
        o.select_layer = (int32_t)sel_layer;
        o.metric = metric;
        o.gradual_layers = (int32_t)gradual;
        o.gradual_first = gfirst >= 0 ? (float)gfirst : (float)fmin(1.0, 2.0 * ratios[r]);
        if (o.gradual_first < o.ratio) o.gradual_first = o.ratio;
        o.fresh_candidates = (int32_t)fresh;
        o.attn_weight = (int32_t)attnw;
        o.chunk_head = (int32_t)chunk_head;
        o.whole_chunks = (int32_t)whole;
        o.guard = (float)guard;
        o.guard_max_ratio = (float)guard_max;
        o.naive_guard = (int32_t)naive_guard;
        o.naive_rank_layer = (int32_t)rank_layer;
        o.naive_guard_margin = (float)ng_margin;
        if (by_budget) {
            o.budget = (float)ratios[r];
            o.ratio = 0.0f;
        } else if (ratio_arg || mode != KVL_BLEND_BLEND) o.budget = 0.0f; /* the ratio policy */
        if (r == 0 && want_diag && mode == KVL_BLEND_BLEND) s = diag(m, segs, n_segs, lslots, n_pos, n - n_tail, prefix, &o);
        if (s != KVL_OK) break;
        kvl_blend_plan *p = NULL;
        double t0 = kvl_cli_now_ms();
        s = kvl_blend_plan_build(m, segs, n_segs, lslots, n_pos, &o, &p);
        if (s == KVL_OK) s = kvl_blend_load(m, p, segs, kv);
        if (s == KVL_OK) s = kvl_blend_run(m, p, kv, mode_logits);
        double mode_ms = kvl_cli_now_ms() - t0;
        if (s == KVL_OK) {
            quality q = compare(full_logits, mode_logits, targets, n_pos, c->vocab_size);
            kvl_blend_cost cost = kvl_blend_plan_cost(p);
            json_t *j = json_pack("{s:s, s:f, s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:f, s:f, s:f, s:f, s:f, s:f, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:i, s:f, s:f, s:i, s:i, s:f, s:f, s:i}",
                                  "mode", kvl_blend_mode_name(mode), "ratio", (double)p->ratio,
                                  "metric", metric_name(metric), "select_layer", (int)sel_layer, "gradual", (int)gradual,
                                  "fresh_candidates", (int)fresh, "attn_weight", (int)attnw,
                                  "chunk_head", (int)chunk_head, "whole_chunks", (int)whole,
                                  "chunk_prefix", prefix, "mean_kl", q.mean_kl, "max_kl", q.max_kl, "top1_agreement", q.top1,
                                  "target_acc_mode", q.acc_mode, "target_acc_full", q.acc_full, "rel_logit_err", q.rel_err,
                                  "recomputed_tokens", (int)cost.final_cached, "computed_tokens", (int)p->layers[p->n_layers - 1].n_keep,
                                  "cached_tokens", (int)p->n_cached, "exact_tokens", (int)p->n_exact, "total_tokens", (int)n,
                                  "token_layers", (int)cost.token_layers, "cached_fraction", cost.cached_fraction,
                                  "cached_work_fraction", cost.cached_work_fraction, "captured", p->have_captured ? p->captured : -1.0,
                                  "budget", (double)o.budget, "budget_policy", (int)p->budget_policy, "guard_added", (int)p->guard_added,
                                  "codec_level", (int)codec_level, "codec_bytes", (double)codec_bytes, "raw_f32_bytes", (double)raw_bytes,
                                  "compute_fraction", (double)cost.token_layers / (double)cost.full_token_layers, "mode_ms", mode_ms,
                                  "full_ms", full_ms, "positions", (int)n_pos, "entropy_mode", q.ent_mode, "entropy_full", q.ent_full,
                                  "naive_guard", (int)p->naive_guard, "fell_back", (int)p->fell_back, "entropy_blend", p->entropy_blend,
                                  "entropy_naive", p->entropy_naive, "rank_layer", (int)p->naive_rank_layer);
            char *txt = j ? json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10)) : NULL;
            if (txt) printf("%s\n", txt);
            else s = kvl_errorf(KVL_ERR_NOMEM, "cannot format the JSON result");
            free(txt);
            json_decref(j);
        }
        kvl_blend_plan_free(p);
    }
    if (s != KVL_OK) rc = kvl_cli_fail(C, s);
    kvl_kv_free(kv);
    for (int i = 0; i < n_chunks; i++) {
        free(chunk_tok[i]);
        kvl_chunk_cache_free(caches[i]);
    }
    kvl_chunk_cache_free(sys_cache);
    free(sys);
    free(tail); free(prompt); free(pos); free(ctx); free(lslots); free(targets); free(full_logits); free(mode_logits);
    kvl_model_free(m);
    return rc;
}

static const char *BENCH_USAGE =
    "kvloom blend-bench [--layers 12] [--dim 768] [--heads 12] [--kv-heads 4] [--hidden 2048]\n"
    "         [--chunks 8] [--chunk-len 256] [--query 64] [--ratio 0.15[,R2,...]] [--repeat 1] [--seed 1]\n"
    "  times, in one run on a synthetic model: full prefill, naive reuse and blend at each ratio of\n"
    "  BOS + chunks + query (chunk caches prefilled beforehand, not timed); prints a table and a JSON line";

static uint64_t xorshift(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

int kvl_cmd_blend_bench(int argc, char **argv) {
    const char *C = "blend-bench";
    long L = 12, D = 768, H = 12, KVH = 4, F = 2048, NC = 8, CL = 256, Q = 64, rep = 1, seed = 1;
    char *ratio_arg = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: %s\n", BENCH_USAGE);
            return 0;
        }
        long *dst = !strcmp(a, "--layers") ? &L : !strcmp(a, "--dim") ? &D : !strcmp(a, "--heads") ? &H
                  : !strcmp(a, "--kv-heads") ? &KVH : !strcmp(a, "--hidden") ? &F : !strcmp(a, "--chunks") ? &NC
                  : !strcmp(a, "--chunk-len") ? &CL : !strcmp(a, "--query") ? &Q : !strcmp(a, "--repeat") ? &rep
                  : !strcmp(a, "--seed") ? &seed : NULL;
        if (!v) return kvl_cli_usage(C, BENCH_USAGE, "unknown or incomplete argument '%s'", a);
        i++;
        if (!strcmp(a, "--ratio")) ratio_arg = argv[i];
        else if (!dst) return kvl_cli_usage(C, BENCH_USAGE, "unknown argument '%s'", a);
        else if (kvl_cli_int(v, 1, 1 << 20, dst)) return kvl_cli_usage(C, BENCH_USAGE, "%s needs a positive integer, got '%s'", a, v);
    }
    double ratios[MAX_RATIOS] = {0.15};
    int n_ratios = 1;
    if (ratio_arg) {
        char *rs[MAX_RATIOS];
        n_ratios = split_commas(ratio_arg, rs, MAX_RATIOS);
        if (n_ratios <= 0) return kvl_cli_usage(C, BENCH_USAGE, "--ratio needs 1..%d comma-separated ratios", MAX_RATIOS);
        for (int i = 0; i < n_ratios; i++)
            if (kvl_cli_float(rs[i], 0, 1, &ratios[i])) return kvl_cli_usage(C, BENCH_USAGE, "--ratio needs ratios in [0, 1], got '%s'", rs[i]);
    }
    if (D % H || H % KVH) return kvl_cli_usage(C, BENCH_USAGE, "--dim must be a multiple of --heads, --heads of --kv-heads");
    if (NC > MAX_CHUNKS) return kvl_cli_usage(C, BENCH_USAGE, "at most %d chunks", MAX_CHUNKS);
    int32_t n = (int32_t)(1 + NC * CL + Q);
    kvl_model_config cfg = {(int32_t)D, (int32_t)F, (int32_t)L, (int32_t)H, (int32_t)KVH, (int32_t)(D / H), 32000, n, 10000.0f, 1e-5f,
                            0, KVL_ROPE_HALF, 1, 2};
    kvl_model *m = NULL;
    kvl_status s = kvl_model_synthetic(&cfg, (uint64_t)seed, NULL, &m);
    int32_t *prompt = malloc((size_t)n * sizeof *prompt), *pos = malloc((size_t)n * sizeof *pos);
    kvl_chunk_cache *caches[MAX_CHUNKS] = {0};
    kvl_blend_segment segs[MAX_CHUNKS + 2];
    kvl_kv *kv = NULL;
    float *logits = malloc(32000 * sizeof(float));
    if (s == KVL_OK && (!prompt || !pos || !logits)) s = KVL_ERR_NOMEM;
    if (s == KVL_OK) {
        uint64_t r = 0x9E3779B97F4A7C15ull ^ (uint64_t)seed;
        prompt[0] = 1;
        for (int32_t i = 1; i < n; i++) prompt[i] = 3 + (int32_t)(xorshift(&r) % 31000);
        for (int32_t i = 0; i < n; i++) pos[i] = i;
        for (long c = 0; c < NC && s == KVL_OK; c++) s = kvl_chunk_cache_prefill(m, prompt + 1 + c * CL, (int32_t)CL, NULL, 0, &caches[c]);
    }
    if (s == KVL_OK) s = kvl_kv_create(m, n, &kv);
    segs[0] = (kvl_blend_segment){NULL, prompt, 1};
    for (long c = 0; c < NC; c++) segs[1 + c] = (kvl_blend_segment){caches[c], NULL, 0};
    segs[1 + NC] = (kvl_blend_segment){NULL, prompt + 1 + NC * CL, (int32_t)Q};
    int32_t last = n - 1;
    /* rows: full prefill, naive, blend at each ratio; best of --repeat */
    int n_rows = 2 + n_ratios;
    double ms[2 + MAX_RATIOS], frac[2 + MAX_RATIOS];
    for (int row = 0; row < n_rows && s == KVL_OK; row++) {
        ms[row] = INFINITY;
        for (long it = 0; it < rep && s == KVL_OK; it++) {
            double t0 = kvl_cli_now_ms();
            if (row == 0) {
                s = kvl_forward(m, kv, n, prompt, pos, NULL, 1, &last, logits);
                frac[row] = 1.0;
            } else {
                kvl_blend_opts o = kvl_blend_opts_default();
                o.mode = row == 1 ? KVL_BLEND_NAIVE : KVL_BLEND_BLEND;
                o.ratio = row == 1 ? 0.0f : (float)ratios[row - 2];
                o.budget = 0.0f; /* the ratio policy: the blend issue's speed bar is for ratio 15% */
                kvl_blend_plan *p = NULL;
                s = kvl_blend_plan_build(m, segs, (int32_t)NC + 2, &last, 1, &o, &p);
                if (s == KVL_OK) s = kvl_blend_load(m, p, segs, kv);
                if (s == KVL_OK) s = kvl_blend_run(m, p, kv, logits);
                if (s == KVL_OK) {
                    kvl_blend_cost cst = kvl_blend_plan_cost(p);
                    frac[row] = (double)cst.token_layers / (double)cst.full_token_layers;
                }
                kvl_blend_plan_free(p);
            }
            double t = kvl_cli_now_ms() - t0;
            if (t < ms[row]) ms[row] = t;
        }
    }
    int rc = 0;
    if (s == KVL_OK) {
        printf("synthetic model: %ld layers, dim %ld, %ld heads / %ld kv heads, ffn %ld; prompt = BOS + %ld x %ld + %ld = %d tokens\n",
               L, D, H, KVH, F, NC, CL, Q, n);
        printf("%-14s %12s %10s %14s\n", "mode", "ms", "vs full", "token-layers");
        for (int row = 0; row < n_rows; row++) {
            char name[32];
            if (row == 0) snprintf(name, sizeof name, "full");
            else if (row == 1) snprintf(name, sizeof name, "naive");
            else snprintf(name, sizeof name, "blend %.0f%%", ratios[row - 2] * 100);
            printf("%-14s %12.1f %9.1f%% %13.1f%%\n", name, ms[row], 100.0 * ms[row] / ms[0], 100.0 * frac[row]);
        }
        json_t *j = json_pack("{s:f, s:f}", "full_ms", ms[0], "naive_ms", ms[1]);
        json_t *b = json_array();
        for (int r = 0; r < n_ratios; r++) json_array_append_new(b, json_pack("{s:f, s:f, s:f}", "ratio", ratios[r], "ms", ms[2 + r], "vs_full", ms[2 + r] / ms[0]));
        json_object_set_new(j, "blend", b);
        char *txt = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(6));
        if (txt) printf("%s\n", txt);
        free(txt);
        json_decref(j);
    } else rc = kvl_cli_fail(C, s);
    kvl_kv_free(kv);
    for (long c = 0; c < NC; c++) kvl_chunk_cache_free(caches[c]);
    kvl_model_free(m);
    free(prompt); free(pos); free(logits);
    return rc;
}
