/* test_load_est.c - the load controller's online estimates and pinned costs (kvl_load_est_*,
 * kvl_load_costs_parse in api/kvl_gpu_load.h): the plumbing kvloomd decides with. CPU only. */
#include <stdint.h>

#include "kvl_gpu_load.h"
#include "kvl_test.h"

static int near(double a, double b) { return fabs(a - b) <= 1e-9 * (fabs(b) + 1); }

int main(void) {
    kvl_load_est e;
    kvl_load_est_init(&e, 0.5);
    double l = 0, p = 0;
    /* nothing measured: load, never a forced recompute, and no estimate */
    CHECK(!kvl_load_est_ready(&e));
    CHECK(kvl_load_est_decide(&e, 1u << 30, 1u << 30, 1, &l, &p) == 0 && l == -1 && p == -1);
    /* first sample sets the rate: 2e6 bytes in 1 ms = 2 GB/s */
    kvl_load_est_add(&e, KVL_LOAD_READ, 2e6, 1.0);
    CHECK(near(e.costs.read_gbps, 2.0));
    /* EWMA of amounts and times (alpha 0.5): (2e6 + 1e6)/2 over (1 + 3)/2 ms = 0.75 GB/s */
    kvl_load_est_add(&e, KVL_LOAD_READ, 1e6, 3.0);
    CHECK(near(e.costs.read_gbps, 0.75));
    /* bad samples are ignored */
    kvl_load_est_add(&e, KVL_LOAD_READ, 1e6, 0.0);
    kvl_load_est_add(&e, KVL_LOAD_READ, -1, 1.0);
    kvl_load_est_add(&e, KVL_LOAD_READ, NAN, 1.0);
    kvl_load_est_add(&e, KVL_LOAD_READ, 1e6, INFINITY);
    kvl_load_est_add(&e, 7, 1e6, 1.0);
    CHECK(near(e.costs.read_gbps, 0.75) && e.samples[KVL_LOAD_READ] == 2);
    kvl_load_est_add(&e, KVL_LOAD_DECODE, 8e6, 1.0); /* 8 GB/s */
    CHECK(!kvl_load_est_ready(&e));
    CHECK(kvl_load_est_decide(&e, 1u << 30, 1u << 30, 1, NULL, NULL) == 0);
    kvl_load_est_add(&e, KVL_LOAD_PREFILL, 100, 10.0); /* 10000 tokens/s */
    CHECK(near(e.costs.prefill_tok_s, 1e4) && kvl_load_est_ready(&e));
    /* 1.5e6 encoded bytes at 0.75 GB/s = 2 ms, 8e6 decoded at 8 GB/s = 1 ms: load 2 ms; 32 tokens
     * at 1e4/s = 3.2 ms: load */
    CHECK(kvl_load_est_decide(&e, 1500000, 8000000, 32, &l, &p) == 0 && near(l, 2.0) && near(p, 3.2));
    /* 3e6 encoded bytes: 4 ms to load, 3.2 ms to recompute: recompute */
    CHECK(kvl_load_est_decide(&e, 3000000, 8000000, 32, &l, &p) == 1 && near(l, 4.0));

    /* pinned costs: parsed, fixed against samples, the others still measured */
    kvl_load_est q;
    kvl_load_est_init(&q, 0);
    CHECK(q.alpha == 0.2);
    CHECK_OK(kvl_load_costs_parse("read_gbps=1.5,prefill_tok_s=2e3,fixed_ms=0", &q));
    CHECK(q.pinned == (KVL_LOAD_PIN_READ | KVL_LOAD_PIN_PREFILL | KVL_LOAD_PIN_FIXED));
    CHECK(q.costs.read_gbps == 1.5 && q.costs.prefill_tok_s == 2000 && q.costs.fixed_ms == 0);
    kvl_load_est_add(&q, KVL_LOAD_READ, 1e9, 1.0);
    kvl_load_est_add(&q, KVL_LOAD_PREFILL, 1e9, 1.0);
    CHECK(q.costs.read_gbps == 1.5 && q.costs.prefill_tok_s == 2000);
    CHECK(!kvl_load_est_ready(&q));
    kvl_load_est_add(&q, KVL_LOAD_DECODE, 4e6, 2.0);
    CHECK(near(q.costs.decode_gbps, 2.0) && kvl_load_est_ready(&q));
    CHECK_OK(kvl_load_costs_parse("decode_gbps=3,fixed_ms=0.5", &q)); /* a second call pins more */
    CHECK(q.costs.decode_gbps == 3 && q.costs.fixed_ms == 0.5 && q.costs.read_gbps == 1.5);
    kvl_load_est_add(&q, KVL_LOAD_DECODE, 4e6, 2.0);
    CHECK(q.costs.decode_gbps == 3);

    /* refused specs leave the estimates as they were */
    static const char *const bad[] = {"", "read_gbps", "read_gbps=", "read_gbps=0", "read_gbps=-1", "read_gbps=abc",
                                      "read_gbps=1x", "read_gbps=inf", "read_gbps=nan", "fixed_ms=-0.1", "foo=1",
                                      "read_gbps=1,read_gbps=2", "read_gbps=1,", ",read_gbps=1", "decode_gbps=1e999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        kvl_load_est before = q;
        CHECK_ST(kvl_load_costs_parse(bad[i], &q), KVL_ERR_INVALID_ARG);
        CHECK_MSG(!memcmp(&before, &q, sizeof q), "'%s' changed the estimates", bad[i]);
        CHECK_MSG(kvl_last_error()[0] != 0, "'%s': no message", bad[i]);
    }
    CHECK_ST(kvl_load_costs_parse(NULL, &q), KVL_ERR_INVALID_ARG);
    KVL_TEST_END();
}
