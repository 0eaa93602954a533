/* A small fork-join pool: workers sleep on a condition variable between jobs; indices are handed
 * out through an atomic counter so uneven items balance themselves. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "kvl_cpu.h"

struct kvl_pool {
    int n_threads;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t cv_job, cv_done;
    uint64_t generation; /* bumped per job */
    int stop;
    /* current job */
    kvl_pool_fn fn;
    void *ctx;
    int64_t n;
    atomic_llong next;
    int busy_workers;
};

static void run_items(kvl_pool *p, kvl_pool_fn fn, void *ctx, int64_t n) {
    for (;;) {
        int64_t i = atomic_fetch_add(&p->next, 1);
        if (i >= n) break;
        fn(ctx, i);
    }
}

static void *worker(void *arg) {
    kvl_pool *p = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->cv_job, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        kvl_pool_fn fn = p->fn;
        void *ctx = p->ctx;
        int64_t n = p->n;
        pthread_mutex_unlock(&p->mu);
        run_items(p, fn, ctx, n);
        pthread_mutex_lock(&p->mu);
        if (--p->busy_workers == 0) pthread_cond_signal(&p->cv_done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

kvl_status kvl_pool_create(int n_threads, kvl_pool **out) {
    if (!out) return KVL_ERR_INVALID_ARG;
    *out = NULL;
    if (n_threads <= 0) {
        const char *e = getenv("KVL_THREADS");
        n_threads = e ? atoi(e) : 0;
        if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
        if (n_threads <= 0) n_threads = 1;
    }
    if (n_threads > 256) return kvl_errorf(KVL_ERR_RANGE, "thread count %d > 256", n_threads);
    kvl_pool *p = calloc(1, sizeof *p);
    if (!p) return KVL_ERR_NOMEM;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_job, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    if (n_threads > 1) {
        p->th = calloc((size_t)n_threads - 1, sizeof *p->th);
        if (!p->th) { kvl_pool_free(p); return KVL_ERR_NOMEM; }
        for (int i = 0; i < n_threads - 1; i++) {
            if (pthread_create(&p->th[i], NULL, worker, p) != 0) {
                p->n_threads = i + 1; /* only i workers exist */
                kvl_pool_free(p);
                return kvl_errorf(KVL_ERR_NOMEM, "pthread_create failed");
            }
        }
    }
    *out = p;
    return KVL_OK;
}

void kvl_pool_free(kvl_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv_job);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads - 1 && p->th; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_job);
    pthread_cond_destroy(&p->cv_done);
    free(p);
}

int kvl_pool_threads(const kvl_pool *p) { return p ? p->n_threads : 1; }

void kvl_pool_for(kvl_pool *p, int64_t n, kvl_pool_fn fn, void *ctx) {
    if (n <= 0) return;
    if (!p || p->n_threads == 1 || n == 1) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    atomic_store(&p->next, 0);
    p->busy_workers = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->cv_job);
    pthread_mutex_unlock(&p->mu);
    run_items(p, fn, ctx, n);
    pthread_mutex_lock(&p->mu);
    while (p->busy_workers > 0) pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
