/* io.c - the data path: io_uring (feature-detected at run time) with O_DIRECT, pread/pwrite when
 * io_uring is unavailable or disabled (reported in stats, never silent), and fault injection. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "store_impl.h"

kvl_status kvl_io_init(kvl_store *st) {
    st->nrings = 0;
    st->uring = 0;
    st->fixed_ok = 0;
    if (st->opt.no_uring || getenv("KVL_STORE_NO_URING")) {
        snprintf(st->io_detail, sizeof st->io_detail, "io_uring disabled by %s; pread/pwrite",
                 st->opt.no_uring ? "option no_uring" : "KVL_STORE_NO_URING");
        return KVL_OK;
    }
    unsigned entries = (unsigned)(st->opt.queue_depth > 0 ? st->opt.queue_depth : 64);
    if (entries < 8) entries = 8;
    int nfixed = 0, reg_err = 0;
    for (int i = 0; i < KVL_NRINGS; i++) {
        kvl_ring *r = &st->rings[i];
        int e = io_uring_queue_init(entries, &r->ring, 0);
        if (e < 0) {
            if (i == 0) {
                snprintf(st->io_detail, sizeof st->io_detail,
                         "io_uring_queue_init failed (%s); pread/pwrite", strerror(-e));
                return KVL_OK;
            }
            break;
        }
        if (i == 0) {
            struct io_uring_probe *p = io_uring_get_probe_ring(&r->ring);
            int ok = p && io_uring_opcode_supported(p, IORING_OP_READ) &&
                     io_uring_opcode_supported(p, IORING_OP_WRITE);
            int okfixed = p && io_uring_opcode_supported(p, IORING_OP_WRITE_FIXED);
            if (p) io_uring_free_probe(p);
            if (!ok) {
                io_uring_queue_exit(&r->ring);
                snprintf(st->io_detail, sizeof st->io_detail,
                         "kernel io_uring lacks IORING_OP_READ/WRITE; pread/pwrite");
                return KVL_OK;
            }
            if (!okfixed) reg_err = EOPNOTSUPP;
        }
        pthread_mutex_init(&r->mu, NULL);
        r->fixed = 0;
        r->stage = NULL;
        if (!reg_err && (r->stage = kvl_io_buf_alloc(KVL_STAGE_BYTES)) != NULL) {
            struct iovec iov = {r->stage, KVL_STAGE_BYTES};
            int e2 = io_uring_register_buffers(&r->ring, &iov, 1);
            if (e2 == 0) {
                r->fixed = 1;
                nfixed++;
            } else {
                reg_err = -e2;
            }
        }
        st->nrings++;
    }
    st->uring = 1;
    st->fixed_ok = nfixed == st->nrings;
    if (st->fixed_ok)
        snprintf(st->io_detail, sizeof st->io_detail,
                 "io_uring, %d rings x %u entries, puts <= %u KiB via registered buffers", st->nrings,
                 entries, KVL_STAGE_BYTES >> 10);
    else
        snprintf(st->io_detail, sizeof st->io_detail,
                 "io_uring, %d rings x %u entries, buffer registration refused (%s): plain buffers",
                 st->nrings, entries, strerror(reg_err));
    return KVL_OK;
}

void kvl_io_free(kvl_store *st) {
    for (int i = 0; i < st->nrings; i++) {
        kvl_ring *r = &st->rings[i];
        if (r->fixed) io_uring_unregister_buffers(&r->ring);
        io_uring_queue_exit(&r->ring);
        free(r->stage);
        pthread_mutex_destroy(&r->mu);
    }
    st->nrings = 0;
}

static kvl_ring *ring_get(kvl_store *st) {
    unsigned start = atomic_fetch_add(&st->ring_rr, 1);
    for (int i = 0; i < st->nrings; i++) {
        kvl_ring *r = &st->rings[(start + (unsigned)i) % (unsigned)st->nrings];
        if (pthread_mutex_trylock(&r->mu) == 0) return r;
    }
    kvl_ring *r = &st->rings[start % (unsigned)st->nrings];
    pthread_mutex_lock(&r->mu);
    return r;
}

kvl_ring *kvl_io_stage_get(kvl_store *st) {
    if (!st->uring || !st->fixed_ok) return NULL;
    return ring_get(st);
}

void kvl_io_stage_put(kvl_ring *r) {
    if (r) pthread_mutex_unlock(&r->mu);
}

int kvl_io_write_fixed(kvl_store *st, kvl_ring *r, int fd, size_t len, uint64_t off) {
    (void)st;
    size_t done = 0;
    while (done < len) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        if (!sqe) return EBUSY;
        io_uring_prep_write_fixed(sqe, fd, (char *)r->stage + done, (unsigned)(len - done), off + done, 0);
        int e = io_uring_submit(&r->ring);
        if (e < 0) return -e;
        struct io_uring_cqe *cqe;
        e = io_uring_wait_cqe(&r->ring, &cqe);
        if (e < 0) return -e;
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (res < 0) return -res;
        if (res == 0) return EIO;
        done += (size_t)res;
    }
    return 0;
}

static void run_plain(kvl_ioreq *req, size_t n, int call_done) {
    for (size_t i = 0; i < n; i++) {
        size_t done = 0;
        while (done < req[i].len && !req[i].err) {
            ssize_t k = req[i].write
                            ? pwrite(req[i].fd, (char *)req[i].buf + done, req[i].len - done, (off_t)(req[i].off + done))
                            : pread(req[i].fd, (char *)req[i].buf + done, req[i].len - done, (off_t)(req[i].off + done));
            if (k < 0 && errno == EINTR) continue;
            if (k < 0) req[i].err = errno;
            else if (k == 0) req[i].err = EIO; /* short: past the end of the segment */
            else done += (size_t)k;
        }
        if (call_done && req[i].done) req[i].done(&req[i], req[i].ctx);
    }
}

typedef struct piece {
    size_t req;
    uint64_t pos; /* byte position within the request */
    size_t len;
    int fin; /* completed (successfully or not) */
} piece;

void kvl_io_run(kvl_store *st, kvl_ioreq *req, size_t n) { kvl_io_run_order(st, req, n, 0); }

void kvl_io_run_order(kvl_store *st, kvl_ioreq *req, size_t n, int interleave) {
    if (!n) return;
    if (!st->uring) {
        run_plain(req, n, 1);
        return;
    }
    size_t npieces = 0, maxp = 0;
    for (size_t i = 0; i < n; i++) {
        size_t np = (req[i].len + KVL_IO_PIECE - 1) / KVL_IO_PIECE;
        npieces += np;
        if (np > maxp) maxp = np;
    }
    piece *pc = malloc((npieces ? npieces : 1) * sizeof *pc);
    size_t *ord = malloc((npieces ? npieces : 1) * sizeof *ord); /* submission order: indices into pc */
    if (!pc || !ord) {
        free(pc);
        free(ord);
        run_plain(req, n, 1);
        return;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        req[i].left = (req[i].len + KVL_IO_PIECE - 1) / KVL_IO_PIECE;
        if (!req[i].left && req[i].done) req[i].done(&req[i], req[i].ctx);
    }
    for (size_t i = 0; i < n; i++) {
        req[i].first = k;
        req[i].nready = 0;
        for (uint64_t p = 0; p < req[i].len; p += KVL_IO_PIECE)
            pc[k++] = (piece){i, p, (size_t)(req[i].len - p < KVL_IO_PIECE ? req[i].len - p : KVL_IO_PIECE), 0};
    }
    /* in order: request by request; interleaved: piece j of every request, then piece j + 1, so the
     * completed prefixes of all requests grow together (a streaming reader can use the first
     * part of every value before any value is complete) */
    k = 0;
    if (interleave) {
        for (size_t j = 0; j < maxp; j++)
            for (size_t i = 0; i < n; i++)
                if (j * KVL_IO_PIECE < req[i].len) ord[k++] = req[i].first + j;
    } else {
        for (size_t x = 0; x < npieces; x++) ord[k++] = x;
    }
    kvl_ring *r = ring_get(st);
    unsigned qd = r->ring.sq.ring_entries;
    if (st->opt.queue_depth > 0 && (unsigned)st->opt.queue_depth < qd) qd = (unsigned)st->opt.queue_depth;
    if (interleave && st->opt.stream_queue_depth > 0 && (unsigned)st->opt.stream_queue_depth < qd)
        qd = (unsigned)st->opt.stream_queue_depth;
    size_t next = 0, inflight = 0;
    while (next < npieces || inflight) {
        int queued = 0;
        while (next < npieces && inflight < qd) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
            if (!sqe) break;
            piece *p = &pc[ord[next++]];
            kvl_ioreq *q = &req[p->req];
            if (q->write)
                io_uring_prep_write(sqe, q->fd, (char *)q->buf + p->pos, (unsigned)p->len, q->off + p->pos);
            else
                io_uring_prep_read(sqe, q->fd, (char *)q->buf + p->pos, (unsigned)p->len, q->off + p->pos);
            io_uring_sqe_set_data(sqe, p);
            inflight++;
            queued++;
        }
        int e = io_uring_submit_and_wait(&r->ring, inflight ? 1 : 0);
        if (e < 0 && e != -EINTR && e != -EAGAIN && e != -EBUSY) {
            /* the ring itself failed: fail what is left and let the caller see EIO */
            for (size_t i = 0; i < n; i++)
                if (!req[i].err) req[i].err = -e;
            /* reap whatever completes so the ring stays usable */
            while (inflight) {
                struct io_uring_cqe *cqe;
                if (io_uring_wait_cqe(&r->ring, &cqe) < 0) break;
                io_uring_cqe_seen(&r->ring, cqe);
                inflight--;
            }
            for (size_t i = 0; i < n; i++)
                if (req[i].left && req[i].done) {
                    req[i].left = 0;
                    req[i].done(&req[i], req[i].ctx);
                }
            break;
        }
        (void)queued;
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            piece *p = io_uring_cqe_get_data(cqe);
            kvl_ioreq *q = &req[p->req];
            int res = cqe->res;
            seen++;
            inflight--;
            if (res < 0) {
                if (!q->err) q->err = -res;
            } else if (res == 0) {
                if (!q->err) q->err = EIO;
            } else if ((size_t)res < p->len) {
                /* short transfer: finish the rest synchronously (rare with O_DIRECT) */
                kvl_ioreq rest = *q;
                rest.buf = (char *)q->buf + p->pos + (size_t)res;
                rest.off = q->off + p->pos + (size_t)res;
                rest.len = p->len - (size_t)res;
                rest.err = 0;
                rest.done = NULL;
                run_plain(&rest, 1, 0);
                if (rest.err && !q->err) q->err = rest.err;
            }
            p->fin = 1;
            if (q->progress && !q->err) {
                size_t np = (q->len + KVL_IO_PIECE - 1) / KVL_IO_PIECE, before = q->nready;
                while (q->nready < np && pc[q->first + q->nready].fin) q->nready++;
                if (q->nready != before) {
                    /* as for done below: completions back to the ring first, then the caller's work */
                    io_uring_cq_advance(&r->ring, seen);
                    seen = 0;
                    size_t ready = q->nready * (size_t)KVL_IO_PIECE;
                    q->progress(q, ready < q->len ? ready : q->len, q->ctx);
                }
            }
            if (--q->left == 0 && q->done) {
                /* the request is complete: hand the ring's completions back first, then let the
                 * caller work (verify) while the kernel keeps the rest in flight */
                io_uring_cq_advance(&r->ring, seen);
                seen = 0;
                q->done(q, q->ctx);
            }
        }
        io_uring_cq_advance(&r->ring, seen);
    }
    pthread_mutex_unlock(&r->mu);
    free(pc);
    free(ord);
}

kvl_bufpool *kvl_bufpool_create(uint64_t max_bytes) {
    kvl_bufpool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    atomic_init(&p->refs, 1);
    p->max = max_bytes;
    return p;
}

static void pool_drain(kvl_bufpool *p) {
    while (p->free) {
        kvl_pbuf *b = p->free;
        p->free = b->next;
        free(b);
    }
    p->bytes = 0;
}

void kvl_bufpool_unref(kvl_bufpool *p) {
    if (p && atomic_fetch_sub(&p->refs, 1) == 1) {
        pool_drain(p);
        pthread_mutex_destroy(&p->mu);
        free(p);
    }
}

/* capacity classes of 1/4 octave: at most ~19% of a buffer goes unused */
static size_t pool_class(size_t len) {
    if (len <= 65536) return (len + 4095) / 4096 * 4096;
    int lg = 63 - __builtin_clzll((unsigned long long)len);
    size_t step = (size_t)1 << (lg - 2);
    return (len + step - 1) / step * step;
}

void *kvl_bufpool_get(kvl_bufpool *p, size_t len, size_t *cap) {
    size_t c = pool_class(len);
    *cap = c;
    if (p && p->max) {
        pthread_mutex_lock(&p->mu);
        for (kvl_pbuf **pp = &p->free; *pp; pp = &(*pp)->next)
            if ((*pp)->cap == c) {
                kvl_pbuf *b = *pp;
                *pp = b->next;
                p->bytes -= c;
                p->reused++;
                pthread_mutex_unlock(&p->mu);
                return b;
            }
        p->allocated++;
        pthread_mutex_unlock(&p->mu);
    }
    return kvl_io_buf_alloc(c);
}

void *kvl_io_buf_alloc(size_t len) {
    void *b = NULL;
    if (len < KVL_HUGE_BYTES) {
        if (posix_memalign(&b, KVL_BLOCK, len)) return NULL;
        return b;
    }
    /* Large read buffers go on transparent huge pages: an O_DIRECT request is then a few
     * physically contiguous segments instead of 256 scattered 4 KiB pages per MiB, which a
     * virtio disk (max_segments 254) otherwise has to split, and the block layer can merge
     * neighbouring 1 MiB pieces into requests up to max_sectors_kb. Advice only: where the kernel
     * refuses (THP off), this is an ordinary aligned buffer. */
    if (posix_memalign(&b, KVL_HUGE_BYTES, len)) return NULL;
    madvise(b, len, MADV_HUGEPAGE);
    return b;
}

void kvl_bufpool_put(kvl_bufpool *p, void *buf, size_t cap) {
    if (!buf) return;
    if (p && p->max && cap >= sizeof(kvl_pbuf)) {
        pthread_mutex_lock(&p->mu);
        if (p->bytes + cap <= p->max) {
            kvl_pbuf *b = buf;
            b->cap = cap;
            b->next = p->free;
            p->free = b;
            p->bytes += cap;
            buf = NULL;
        }
        pthread_mutex_unlock(&p->mu);
    }
    free(buf);
}

int kvl_fault_write(kvl_store *st, size_t len, size_t *torn_len) {
    int e = 0;
    *torn_len = len;
    pthread_mutex_lock(&st->fmu);
    if (st->fault_count > 0) {
        switch (st->fault) {
        case KVL_STORE_FAULT_WRITE_EIO: e = EIO; st->fault_count--; break;
        case KVL_STORE_FAULT_ENOSPC: e = ENOSPC; st->fault_count--; break;
        case KVL_STORE_FAULT_TORN:
            *torn_len = len / 2 / KVL_BLOCK * KVL_BLOCK;
            st->fault_count--;
            break;
        default: break;
        }
    }
    pthread_mutex_unlock(&st->fmu);
    return e;
}

int kvl_fault_fsync(kvl_store *st) {
    int e = 0;
    pthread_mutex_lock(&st->fmu);
    if (st->fault_count > 0 && st->fault == KVL_STORE_FAULT_FSYNC_EIO) {
        e = EIO;
        st->fault_count--;
    }
    pthread_mutex_unlock(&st->fmu);
    return e;
}

void kvl_store_test_fault(kvl_store *st, kvl_store_fault kind, int count) {
    if (!st) return;
    pthread_mutex_lock(&st->fmu);
    st->fault = kind;
    st->fault_count = count;
    pthread_mutex_unlock(&st->fmu);
}
