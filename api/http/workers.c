/* A fixed pool of worker threads running request jobs (engine, store and disk work) off the
 * libmicrohttpd threads. */
#include <string.h>

#include "http_impl.h"

static void *worker_main(void *arg) {
    kvl_workers *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->head) break; /* stop requested and the queue is empty */
        kvl_job *j = w->head;
        w->head = j->next;
        if (!w->head) w->tail = NULL;
        pthread_mutex_unlock(&w->mu);
        j->fn(j->arg);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

kvl_status kvl_workers_start(kvl_workers *w, int n) {
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->threads = calloc((size_t)n, sizeof *w->threads);
    if (!w->threads) return KVL_ERR_NOMEM;
    for (int i = 0; i < n; i++) {
        if (pthread_create(&w->threads[i], NULL, worker_main, w) != 0) {
            kvl_workers_stop(w);
            return kvl_errorf(KVL_ERR_INTERNAL, "cannot start worker thread %d", i);
        }
        w->n_threads++;
    }
    return KVL_OK;
}

void kvl_workers_submit(kvl_workers *w, kvl_job *job) {
    job->next = NULL;
    pthread_mutex_lock(&w->mu);
    if (w->tail) w->tail->next = job;
    else w->head = job;
    w->tail = job;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void kvl_workers_stop(kvl_workers *w) {
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n_threads; i++) pthread_join(w->threads[i], NULL);
    free(w->threads);
    w->threads = NULL;
    w->n_threads = 0;
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}
