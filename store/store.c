/* store.c - open/recovery, the extent allocator, put/get/delete, the DRAM cache tier, eviction.
 *
 * Lock order (never take an earlier one while holding a later one):
 *   evmu -> shard locks (ascending index) -> amu -> tmu -> cache.mu -> ring locks -> fmu
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
/* xxh3 compiled here, for this build's target CPU (AVX2/AVX-512 with KVL_NATIVE), instead of the
 * shared library's baseline SSE2 build: ~40% faster checksums of freshly read values */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "store_impl.h"

static const char *cf_names[CF_COUNT] = {"default", "entries", "free", "pending", "tenants", "log"};
static const uint8_t seg_magic[8] = {'K', 'V', 'L', 'S', 'E', 'G', '0', '1'};
static const uint8_t store_magic[8] = {'K', 'V', 'L', 'S', 'T', 'O', 'R', 'E'};

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static kvl_status io_status(int e, const char *what) {
    if (e == ENOSPC) return kvl_errorf(KVL_ERR_NOSPC, "%s: %s", what, strerror(e));
    return kvl_errorf(KVL_ERR_IO, "%s: %s", what, strerror(e));
}

kvl_status kvl_db_write(kvl_store *st, rocksdb_writebatch_t *wb, int sync) {
    char *err = NULL;
    rocksdb_write(st->db, sync ? st->wsync : st->wnosync, wb, &err);
    if (err) {
        kvl_status s = kvl_errorf(KVL_ERR_DB, "rocksdb write: %s", err);
        rocksdb_free(err);
        return s;
    }
    return KVL_OK;
}

/* ------------------------------------------------------------------ tenants */

static int tenant_name_ok(const char *t) {
    size_t n = strlen(t);
    if (n > KVL_STORE_TENANT_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = t[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.' || c == ':' || c == '@'))
            return 0;
    }
    return 1;
}

/* index of tenant name, created when absent; tmu held by the caller; UINT32_MAX when the table is full */
static uint32_t tenant_intern_locked(kvl_store *st, const char *name) {
    for (size_t i = 0; i < st->ntenants; i++)
        if (strcmp(st->tenants[i].name, name) == 0) return (uint32_t)i;
    if (st->ntenants == KVL_MAX_TENANTS) return UINT32_MAX;
    kvl_tenant *t = &st->tenants[st->ntenants];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    return (uint32_t)st->ntenants++;
}

static uint32_t tenant_intern(kvl_store *st, const char *name) {
    pthread_mutex_lock(&st->tmu);
    uint32_t i = tenant_intern_locked(st, name);
    pthread_mutex_unlock(&st->tmu);
    return i;
}

const char *kvl_tenant_name(kvl_store *st, uint32_t idx) {
    /* tenants are never removed, names never change and the array never moves: the pointer stays
     * valid after the lock is dropped */
    pthread_mutex_lock(&st->tmu);
    const char *n = idx < st->ntenants ? st->tenants[idx].name : "";
    pthread_mutex_unlock(&st->tmu);
    return n;
}

static void tenant_add(kvl_store *st, uint32_t idx, int64_t bytes, int64_t count) {
    pthread_mutex_lock(&st->tmu);
    st->tenants[idx].used += (uint64_t)bytes;
    st->tenants[idx].count += (uint64_t)count;
    pthread_mutex_unlock(&st->tmu);
}

/* ------------------------------------------------------------------ index shards */

static uint64_t key_hash(const kvl_store_key *k) {
    uint64_t h;
    memcpy(&h, k->b + 8, 8);
    return h;
}

/* by the leading key bits, so the open-time loaders (which split the key space into contiguous
 * ranges) each fill their own shards without contending */
static inline int shard_idx(const kvl_store_key *k) { return k->b[0] / (256 / KVL_NSHARDS); }
kvl_shard *kvl_shard_of(kvl_store *st, const kvl_store_key *k) { return &st->shards[shard_idx(k)]; }

kvl_rec *kvl_shard_find(kvl_shard *sh, const kvl_store_key *k) {
    if (!sh->cap) return NULL;
    size_t m = sh->cap - 1, i = key_hash(k) & m;
    while (sh->slots[i].state) {
        if (memcmp(sh->slots[i].key.b, k->b, 32) == 0) return &sh->slots[i];
        i = (i + 1) & m;
    }
    return NULL;
}

/* zeroed slot table; big ones on transparent huge pages where the kernel allows (one fault per
 * 2 MiB instead of per 4 KiB: loading a 1M-entry index touches ~350 MB) */
static kvl_rec *slots_alloc(size_t n, int zero) {
    size_t bytes = n * sizeof(kvl_rec);
    if (bytes < (4u << 20)) return zero ? calloc(n, sizeof(kvl_rec)) : malloc(bytes);
    void *p = NULL;
    if (posix_memalign(&p, 2u << 20, bytes)) return NULL;
    madvise(p, bytes, MADV_HUGEPAGE); /* advice only: fine if refused */
    if (zero) memset(p, 0, bytes);
    return p;
}

static kvl_status shard_grow(kvl_shard *sh) {
    size_t nc = sh->cap ? sh->cap * 2 : 1024;
    kvl_rec *ns = slots_alloc(nc, 1);
    if (!ns) return kvl_errorf(KVL_ERR_NOMEM, "index shard of %zu slots", nc);
    for (size_t i = 0; i < sh->cap; i++) {
        if (!sh->slots[i].state) continue;
        size_t j = key_hash(&sh->slots[i].key) & (nc - 1);
        while (ns[j].state) j = (j + 1) & (nc - 1);
        ns[j] = sh->slots[i];
    }
    free(sh->slots);
    sh->slots = ns;
    sh->cap = nc;
    return KVL_OK;
}

/* inserts or replaces; caller holds sh->mu */
static kvl_status shard_put(kvl_shard *sh, const kvl_rec *r) {
    kvl_rec *x = kvl_shard_find(sh, &r->key);
    if (x) {
        *x = *r;
        x->state = 1;
        return KVL_OK;
    }
    if ((sh->n + 1) * 10 >= sh->cap * 7) KVL_TRY(shard_grow(sh));
    size_t m = sh->cap - 1, i = key_hash(&r->key) & m;
    while (sh->slots[i].state) i = (i + 1) & m;
    sh->slots[i] = *r;
    sh->slots[i].state = 1;
    sh->n++;
    return KVL_OK;
}

static void shard_del(kvl_shard *sh, kvl_rec *x) {
    size_t m = sh->cap - 1, i = (size_t)(x - sh->slots), j = i;
    sh->slots[i].state = 0;
    sh->n--;
    /* backward-shift deletion keeps probe chains intact without tombstones */
    for (;;) {
        j = (j + 1) & m;
        if (!sh->slots[j].state) break;
        size_t home = key_hash(&sh->slots[j].key) & m;
        if (((j - home) & m) >= ((j - i) & m)) {
            sh->slots[i] = sh->slots[j];
            sh->slots[j].state = 0;
            i = j;
        }
    }
}

/* ------------------------------------------------------------------ log */

void kvl_log_append(kvl_store *st, rocksdb_writebatch_t *wb, const char *op, const kvl_store_key *key,
                    const char *tenant, uint64_t bytes, const char *detail) {
    uint8_t k[8];
    kvl_put64be(k, atomic_fetch_add(&st->logseq, 1));
    char hex[65] = "";
    if (key) kvl_store_key_hex(key, hex);
    char v[512];
    int n = snprintf(v, sizeof v, "{\"t\":%llu,\"op\":\"%s\",\"key\":\"%s\",\"tenant\":\"%s\",\"bytes\":%llu,\"detail\":\"%s\"}",
                     (unsigned long long)kvl_now_ns(), op, hex, tenant ? tenant : "",
                     (unsigned long long)bytes, detail ? detail : "");
    if (n < 0 || n >= (int)sizeof v) n = (int)strlen(v);
    rocksdb_writebatch_put_cf(wb, st->cf[CF_LOG], (const char *)k, 8, v, (size_t)n);
}

/* ------------------------------------------------------------------ allocator */

static void ext_key(uint8_t k[12], uint32_t seg, uint64_t off) {
    kvl_put32be(k, seg);
    kvl_put64be(k + 4, off);
}

static void cf_put_ext(kvl_store *st, rocksdb_writebatch_t *wb, int cf, uint32_t seg, uint64_t off, uint64_t len) {
    uint8_t k[12], v[8];
    ext_key(k, seg, off);
    kvl_put64(v, len);
    rocksdb_writebatch_put_cf(wb, st->cf[cf], (const char *)k, 12, (const char *)v, 8);
}

static void cf_del_ext(kvl_store *st, rocksdb_writebatch_t *wb, int cf, uint32_t seg, uint64_t off) {
    uint8_t k[12];
    ext_key(k, seg, off);
    rocksdb_writebatch_delete_cf(wb, st->cf[cf], (const char *)k, 12);
}

/* position of the first free extent with offset >= off */
static size_t free_lower(const kvl_seg *s, uint64_t off) {
    size_t lo = 0, hi = s->nfree;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->free[mid].off < off) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* adds [off, off+len) to the in-memory free list, coalescing; wb (may be NULL) gets the cf ops */
static kvl_status free_insert(kvl_store *st, kvl_seg *s, uint64_t off, uint64_t len, rocksdb_writebatch_t *wb) {
    size_t i = free_lower(s, off);
    int merge_prev = i > 0 && s->free[i - 1].off + s->free[i - 1].len == off;
    int merge_next = i < s->nfree && off + len == s->free[i].off;
    KVL_ASSERT(!(i > 0 && s->free[i - 1].off + s->free[i - 1].len > off));
    KVL_ASSERT(!(i < s->nfree && off + len > s->free[i].off));
    s->free_bytes += len;
    if (merge_prev) {
        kvl_ext *p = &s->free[i - 1];
        p->len += len;
        if (merge_next) {
            if (wb) cf_del_ext(st, wb, CF_FREE, s->id, s->free[i].off);
            p->len += s->free[i].len;
            memmove(&s->free[i], &s->free[i + 1], (s->nfree - i - 1) * sizeof *s->free);
            s->nfree--;
        }
        if (wb) cf_put_ext(st, wb, CF_FREE, s->id, p->off, p->len);
        return KVL_OK;
    }
    if (merge_next) {
        if (wb) cf_del_ext(st, wb, CF_FREE, s->id, s->free[i].off);
        s->free[i].off = off;
        s->free[i].len += len;
        if (wb) cf_put_ext(st, wb, CF_FREE, s->id, off, s->free[i].len);
        return KVL_OK;
    }
    if (s->nfree == s->capfree) {
        size_t nc = s->capfree ? s->capfree * 2 : 64;
        kvl_ext *ne = realloc(s->free, nc * sizeof *ne);
        if (!ne) return kvl_errorf(KVL_ERR_NOMEM, "free list");
        s->free = ne;
        s->capfree = nc;
    }
    memmove(&s->free[i + 1], &s->free[i], (s->nfree - i) * sizeof *s->free);
    s->free[i] = (kvl_ext){off, len};
    s->nfree++;
    if (wb) cf_put_ext(st, wb, CF_FREE, s->id, off, len);
    return KVL_OK;
}

/* best fit over unfenced segments; takes the front of the chosen free extent; amu held */
/* free extents an allocation batch changed: the record keyed by orig now covers [cur, cur+len)
 * (len 0: gone). Written once per batch, not once per allocation. */
typedef struct free_change {
    uint32_t seg;
    uint64_t orig, cur, len;
} free_change;

typedef struct free_tracker {
    free_change *c;
    size_t n, cap;
} free_tracker;

static int alloc_locked(kvl_store *st, uint64_t len, rocksdb_writebatch_t *wb, free_tracker *tr, uint32_t *seg,
                        uint64_t *off) {
    kvl_seg *best = NULL;
    size_t bi = 0;
    for (size_t si = 0; si < st->nsegs; si++) {
        kvl_seg *s = &st->segs[si];
        if (s->fenced || s->free_bytes < len) continue;
        for (size_t i = 0; i < s->nfree; i++)
            if (s->free[i].len >= len && (!best || s->free[i].len < best->free[bi].len)) {
                best = s;
                bi = i;
                if (s->free[i].len == len) goto found;
            }
    }
    if (!best) return 0;
found:;
    kvl_ext *e = &best->free[bi];
    *seg = best->id;
    *off = e->off;
    free_change *fc = NULL;
    for (size_t i = 0; i < tr->n && !fc; i++)
        if (tr->c[i].seg == best->id && tr->c[i].len && tr->c[i].cur == e->off) fc = &tr->c[i];
    if (!fc) {
        if (tr->n == tr->cap) {
            size_t nc = tr->cap ? tr->cap * 2 : 8;
            free_change *nn = realloc(tr->c, nc * sizeof *nn);
            if (!nn) return 0;
            tr->c = nn;
            tr->cap = nc;
        }
        fc = &tr->c[tr->n++];
        *fc = (free_change){best->id, e->off, e->off, e->len};
    }
    fc->cur = e->off + len;
    fc->len = e->len - len;
    if (e->len > len) {
        e->off += len;
        e->len -= len;
    } else {
        memmove(e, e + 1, (best->nfree - bi - 1) * sizeof *e);
        best->nfree--;
    }
    best->free_bytes -= len;
    cf_put_ext(st, wb, CF_PENDING, *seg, *off, len);
    atomic_fetch_add(&st->pending, len);
    return 1;
}

static kvl_status write_superblock(kvl_store *st, int fd, uint32_t id) {
    void *b = NULL;
    if (posix_memalign(&b, KVL_BLOCK, KVL_SEG_HDR)) return kvl_errorf(KVL_ERR_NOMEM, "superblock");
    memset(b, 0, KVL_SEG_HDR);
    uint8_t *p = b;
    memcpy(p, seg_magic, 8);
    kvl_put32(p + 8, KVL_STORE_FORMAT_VERSION);
    kvl_put32(p + 12, id);
    kvl_put64(p + 16, st->seg_bytes);
    kvl_put32(p + 24, KVL_BLOCK);
    kvl_put64(p + 32, XXH3_64bits(p, 32));
    ssize_t k = pwrite(fd, b, KVL_SEG_HDR, 0);
    int e = errno;
    free(b);
    if (k != (ssize_t)KVL_SEG_HDR) return io_status(k < 0 ? e : EIO, "writing a segment superblock");
    return KVL_OK;
}

static void seg_path(const kvl_store *st, uint32_t id, char *buf, size_t n) {
    snprintf(buf, n, "%s/seg-%05u.kvs", st->dir, id);
}

static kvl_status fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return io_status(errno, "opening the store directory");
    int r = fsync(fd);
    int e = errno;
    close(fd);
    return r ? kvl_errorf(KVL_ERR_FSYNC, "fsync of the store directory: %s", strerror(e)) : KVL_OK;
}

/* creates, preallocates and registers one more segment; amu held */
static kvl_status seg_create_locked(kvl_store *st) {
    uint32_t id = (uint32_t)st->nsegs;
    if (id >= KVL_MAX_SEGS) return kvl_errorf(KVL_ERR_LIMIT, "a store has at most %d segments", KVL_MAX_SEGS);
    char path[4096];
    seg_path(st, id, path, sizeof path);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (errno == EINVAL)
            return kvl_errorf(KVL_ERR_UNSUPPORTED, "%s: the filesystem does not support O_DIRECT", path);
        return io_status(errno, path);
    }
    kvl_status s = write_superblock(st, fd, id);
    if (s == KVL_OK) {
        int e = posix_fallocate(fd, 0, (off_t)st->seg_bytes);
        if (e) s = io_status(e, "preallocating a segment");
    }
    if (s == KVL_OK && fdatasync(fd)) s = kvl_errorf(KVL_ERR_FSYNC, "fdatasync of new segment: %s", strerror(errno));
    if (s == KVL_OK) s = fsync_dir(st->dir);
    if (s != KVL_OK) {
        close(fd);
        unlink(path);
        return s;
    }
    kvl_seg *sg = &st->segs[st->nsegs];
    memset(sg, 0, sizeof *sg);
    sg->fd = fd;
    sg->id = id;
    sg->size = st->seg_bytes;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    uint8_t mk[8] = {'s', 'e', 'g', '/'}, mv[16];
    kvl_put32be(mk + 4, id);
    kvl_put64(mv, st->seg_bytes);
    kvl_put64(mv + 8, 0); /* fenced flag */
    rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], (const char *)mk, 8, (const char *)mv, 16);
    free_insert(st, sg, KVL_SEG_HDR, st->seg_bytes - KVL_SEG_HDR, wb);
    kvl_log_append(st, wb, "segment", NULL, NULL, st->seg_bytes, "created");
    s = kvl_db_write(st, wb, 1);
    rocksdb_writebatch_destroy(wb);
    if (s != KVL_OK) {
        free(sg->free);
        close(fd);
        return s;
    }
    st->nsegs++;
    return KVL_OK;
}

static uint64_t max_segments(const kvl_store *st) {
    /* one segment beyond the capacity absorbs fragmentation; fenced ones do not count */
    uint64_t n = (st->capacity + st->seg_bytes - 1) / st->seg_bytes + 1;
    for (size_t i = 0; i < st->nsegs; i++)
        if (st->segs[i].fenced) n++;
    return n;
}

/* allocates extents for n lengths, all or nothing; returns 1 on success, 0 when space ran out */
static kvl_status alloc_many(kvl_store *st, size_t n, const uint64_t *len, uint32_t *seg, uint64_t *off, int *ok) {
    kvl_status s = KVL_OK;
    *ok = 0;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    free_tracker tr = {0};
    pthread_mutex_lock(&st->amu);
    size_t i = 0;
    for (; i < n; i++) {
        if (alloc_locked(st, len[i], wb, &tr, &seg[i], &off[i])) continue;
        if (st->nsegs < max_segments(st)) {
            s = seg_create_locked(st);
            if (s != KVL_OK) break;
            i--;
            continue;
        }
        break;
    }
    if (s == KVL_OK && i == n) {
        for (size_t k = 0; k < tr.n; k++) {
            cf_del_ext(st, wb, CF_FREE, tr.c[k].seg, tr.c[k].orig);
            if (tr.c[k].len) cf_put_ext(st, wb, CF_FREE, tr.c[k].seg, tr.c[k].cur, tr.c[k].len);
        }
        s = kvl_db_write(st, wb, 0);
        if (s == KVL_OK) *ok = 1;
    }
    free(tr.c);
    if (!*ok) {
        /* put back what this call took (the batch was not written) */
        for (size_t j = 0; j < i; j++) {
            kvl_seg *sg = &st->segs[seg[j]];
            free_insert(st, sg, off[j], len[j], NULL);
            atomic_fetch_sub(&st->pending, len[j]);
        }
    }
    pthread_mutex_unlock(&st->amu);
    rocksdb_writebatch_destroy(wb);
    return s;
}

static kvl_pin *pin_find(kvl_store *st, uint32_t seg, uint64_t off) {
    for (size_t i = 0; i < st->npins; i++)
        if (st->pins[i].seg == seg && st->pins[i].off == off) return &st->pins[i];
    return NULL;
}

/* PENDING -> FREE for one extent (no reader holds it); amu held */
static void release_now_locked(kvl_store *st, uint32_t seg, uint64_t off, uint64_t len) {
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    cf_del_ext(st, wb, CF_PENDING, seg, off);
    KVL_ASSERT(free_insert(st, &st->segs[seg], off, len, wb) == KVL_OK);
    /* unsynced: the extent is already out of every entry durably; losing this write leaves it
     * PENDING, which recovery frees */
    if (kvl_db_write(st, wb, 0) != KVL_OK) {
        /* the in-memory free list moved ahead of the index; recovery reconciles (pending -> free) */
        fprintf(stderr, "kvloom store: releasing an extent failed: %s\n", kvl_last_error());
    }
    rocksdb_writebatch_destroy(wb);
    atomic_fetch_sub(&st->pending, len);
    atomic_fetch_sub(&st->used, len);
}

/* the owner lets go of a PENDING extent; freed now or when its last reader unpins */
static void release_ext(kvl_store *st, uint32_t seg, uint64_t off, uint64_t len) {
    pthread_mutex_lock(&st->amu);
    kvl_pin *p = pin_find(st, seg, off);
    if (p) p->release = 1;
    else release_now_locked(st, seg, off, len);
    pthread_mutex_unlock(&st->amu);
}

void kvl_pin_ext(kvl_store *st, uint32_t seg, uint64_t off, uint64_t len) {
    pthread_mutex_lock(&st->amu);
    kvl_pin *p = pin_find(st, seg, off);
    if (!p) {
        if (st->npins == st->cappins) {
            size_t nc = st->cappins ? st->cappins * 2 : 64;
            kvl_pin *np = realloc(st->pins, nc * sizeof *np);
            KVL_ASSERT(np);
            st->pins = np;
            st->cappins = nc;
        }
        p = &st->pins[st->npins++];
        *p = (kvl_pin){seg, off, len, 0, 0};
    }
    p->count++;
    pthread_mutex_unlock(&st->amu);
}

void kvl_unpin_ext(kvl_store *st, uint32_t seg, uint64_t off) {
    pthread_mutex_lock(&st->amu);
    kvl_pin *p = pin_find(st, seg, off);
    KVL_ASSERT(p && p->count > 0);
    if (--p->count == 0) {
        kvl_pin q = *p;
        *p = st->pins[--st->npins];
        if (q.release) release_now_locked(st, q.seg, q.off, q.len);
    }
    pthread_mutex_unlock(&st->amu);
}

/* fsync error: never retry, never write to this segment again (durably marked) */
static void fence_segment(kvl_store *st, uint32_t seg, int err) {
    pthread_mutex_lock(&st->amu);
    int was = st->segs[seg].fenced;
    st->segs[seg].fenced = 1;
    pthread_mutex_unlock(&st->amu);
    if (was) return;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    uint8_t mk[8] = {'s', 'e', 'g', '/'}, mv[16];
    kvl_put32be(mk + 4, seg);
    kvl_put64(mv, st->segs[seg].size);
    kvl_put64(mv + 8, 1);
    rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], (const char *)mk, 8, (const char *)mv, 16);
    char d[96];
    snprintf(d, sizeof d, "segment %u fenced after fdatasync error: %s", seg, strerror(err));
    kvl_log_append(st, wb, "fence", NULL, NULL, 0, d);
    kvl_db_write(st, wb, 1);
    rocksdb_writebatch_destroy(wb);
    fprintf(stderr, "kvloom store: %s\n", d);
}

/* ------------------------------------------------------------------ DRAM cache */

static void value_ref(kvl_store_value *v) { atomic_fetch_add(&v->refs, 1); }

void kvl_store_value_free(kvl_store_value *v) {
    if (!v) return;
    if (atomic_fetch_sub(&v->refs, 1) == 1) {
        if (v->pool) {
            kvl_bufpool_put(v->pool, v->buf, v->buf_cap);
            kvl_bufpool_unref(v->pool);
        } else {
            free(v->buf);
        }
        free(v);
    }
}

static size_t cache_bucket(const kvl_cache *c, const kvl_store_key *k) { return key_hash(k) & (c->nbuckets - 1); }

static void cache_unlink(kvl_cache *c, kvl_centry *e) {
    if (e->prev) e->prev->next = e->next;
    else c->head = e->next;
    if (e->next) e->next->prev = e->prev;
    else c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void cache_remove(kvl_cache *c, kvl_centry *e) {
    kvl_centry **pp = &c->buckets[cache_bucket(c, &e->key)];
    while (*pp != e) pp = &(*pp)->hnext;
    *pp = e->hnext;
    cache_unlink(c, e);
    c->bytes -= e->v->buf_len;
    c->n--;
    kvl_store_value_free(e->v);
    free(e);
}

static kvl_centry *cache_find(kvl_cache *c, const kvl_store_key *k) {
    for (kvl_centry *e = c->buckets[cache_bucket(c, k)]; e; e = e->hnext)
        if (memcmp(e->key.b, k->b, 32) == 0) return e;
    return NULL;
}

static kvl_store_value *cache_get(kvl_store *st, const kvl_store_key *k, uint64_t gen) {
    kvl_cache *c = &st->cache;
    if (!c->budget) return NULL;
    kvl_store_value *v = NULL;
    pthread_mutex_lock(&c->mu);
    kvl_centry *e = cache_find(c, k);
    if (e && e->generation != gen) {
        cache_remove(c, e); /* an older generation of this key: never serve it */
    } else if (e) {
        cache_unlink(c, e);
        e->next = c->head;
        if (c->head) c->head->prev = e;
        c->head = e;
        if (!c->tail) c->tail = e;
        value_ref(e->v);
        v = e->v;
        c->hits++;
    }
    pthread_mutex_unlock(&c->mu);
    return v;
}

static void cache_put(kvl_store *st, const kvl_store_key *k, uint64_t gen, kvl_store_value *v) {
    kvl_cache *c = &st->cache;
    if (!c->budget || v->buf_len > c->budget) return;
    kvl_centry *n = malloc(sizeof *n);
    if (!n) return;
    pthread_mutex_lock(&c->mu);
    kvl_centry *e = cache_find(c, k);
    if (e) cache_remove(c, e);
    n->key = *k;
    n->generation = gen;
    n->v = v;
    value_ref(v);
    n->prev = NULL;
    n->next = c->head;
    if (c->head) c->head->prev = n;
    c->head = n;
    if (!c->tail) c->tail = n;
    size_t b = cache_bucket(c, k);
    n->hnext = c->buckets[b];
    c->buckets[b] = n;
    c->n++;
    c->bytes += v->buf_len;
    while (c->bytes > c->budget && c->tail) cache_remove(c, c->tail);
    pthread_mutex_unlock(&c->mu);
}

static void cache_drop(kvl_store *st, const kvl_store_key *k) {
    kvl_cache *c = &st->cache;
    if (!c->budget) return;
    pthread_mutex_lock(&c->mu);
    kvl_centry *e = cache_find(c, k);
    if (e) cache_remove(c, e);
    pthread_mutex_unlock(&c->mu);
}

/* ------------------------------------------------------------------ open / close */

static void verify_workers_start(kvl_store *st);
static void verify_workers_stop(kvl_store *st);

void kvl_store_options_default(kvl_store_options *o) {
    memset(o, 0, sizeof *o);
    o->create = 1;
    o->segment_bytes = 1ull << 30;
    o->cache_bytes = 256ull << 20;
    o->policy = KVL_STORE_EVICT_LRU;
    o->queue_depth = 64;
    o->stream_queue_depth = 16;
    o->buffer_pool_bytes = 256ull << 20;
}

static kvl_status db_status(char *err, const char *what) {
    kvl_status s = KVL_ERR_DB;
    if (strstr(err, "lock") || strstr(err, "Resource temporarily unavailable")) s = KVL_ERR_BUSY;
    s = kvl_errorf(s, "%s: %s", what, err);
    rocksdb_free(err);
    return s;
}

static kvl_status db_open(kvl_store *st, int exists) {
    char path[4096];
    snprintf(path, sizeof path, "%s/index", st->dir);
    st->dbopt = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(st->dbopt, !exists);
    /* also when the directory exists: a crash during creation can leave an index without them */
    rocksdb_options_set_create_missing_column_families(st->dbopt, !st->opt.read_only);
    rocksdb_options_set_wal_recovery_mode(st->dbopt, 2 /* point in time: a prefix of the log */);
    rocksdb_options_set_max_background_jobs(st->dbopt, 2);
    rocksdb_options_set_keep_log_file_num(st->dbopt, 2);
    rocksdb_options_set_info_log_level(st->dbopt, 3 /* errors only */);
    rocksdb_options_set_compression(st->dbopt, rocksdb_no_compression);
    const rocksdb_options_t *cfo[CF_COUNT];
    for (int i = 0; i < CF_COUNT; i++) cfo[i] = st->dbopt;
    char *err = NULL;
    if (st->opt.read_only)
        st->db = rocksdb_open_for_read_only_column_families(st->dbopt, path, CF_COUNT, cf_names, cfo, st->cf, 0, &err);
    else
        st->db = rocksdb_open_column_families(st->dbopt, path, CF_COUNT, cf_names, cfo, st->cf, &err);
    if (err) return db_status(err, "opening the RocksDB index");
    st->wsync = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(st->wsync, 1);
    st->wnosync = rocksdb_writeoptions_create();
    st->ropt = rocksdb_readoptions_create();
    return KVL_OK;
}

static kvl_status db_get(kvl_store *st, int cf, const void *k, size_t kn, char **val, size_t *vn) {
    char *err = NULL;
    *val = rocksdb_get_cf(st->db, st->ropt, st->cf[cf], k, kn, vn, &err);
    if (err) return db_status(err, "rocksdb get");
    return KVL_OK;
}

static kvl_status load_format(kvl_store *st, int fresh) {
    char *v = NULL;
    size_t vn = 0;
    KVL_TRY(db_get(st, CF_DEFAULT, "format", 6, &v, &vn));
    if (!v) {
        /* the format record is the first synced write of a new store: without it, creation never
         * finished and nothing else was committed */
        if (!fresh && (st->opt.read_only || !st->opt.create))
            return kvl_errorf(KVL_ERR_FORMAT, "%s: index has no format record", st->dir);
        uint8_t f[40] = {0};
        memcpy(f, store_magic, 8);
        kvl_put32(f + 8, KVL_STORE_FORMAT_VERSION);
        kvl_put32(f + 12, KVL_BLOCK);
        st->seg_bytes = kvl_round_up(st->opt.segment_bytes ? st->opt.segment_bytes : (1ull << 30), KVL_BLOCK);
        if (st->seg_bytes < 1ull << 20) st->seg_bytes = 1ull << 20;
        kvl_put64(f + 16, st->seg_bytes);
        kvl_put64(f + 24, kvl_now_ns());
        kvl_put64(f + 32, 0);
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], "format", 6, (const char *)f, sizeof f);
        uint8_t c[8];
        kvl_put64(c, st->opt.capacity_bytes ? st->opt.capacity_bytes : (1ull << 30));
        rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], "capacity", 8, (const char *)c, 8);
        kvl_status s = kvl_db_write(st, wb, 1);
        rocksdb_writebatch_destroy(wb);
        KVL_TRY(s);
        KVL_TRY(db_get(st, CF_DEFAULT, "format", 6, &v, &vn));
    }
    kvl_status s = KVL_OK;
    if (vn != 40 || memcmp(v, store_magic, 8) != 0) s = kvl_errorf(KVL_ERR_MAGIC, "%s: not a kvloom store", st->dir);
    else if (kvl_get32((uint8_t *)v + 8) != KVL_STORE_FORMAT_VERSION)
        s = kvl_errorf(KVL_ERR_VERSION, "%s: store format version %u, this build reads %d", st->dir,
                       kvl_get32((uint8_t *)v + 8), KVL_STORE_FORMAT_VERSION);
    else if (kvl_get32((uint8_t *)v + 12) != KVL_BLOCK)
        s = kvl_errorf(KVL_ERR_FORMAT, "%s: block size %u", st->dir, kvl_get32((uint8_t *)v + 12));
    else st->seg_bytes = kvl_get64((uint8_t *)v + 16);
    rocksdb_free(v);
    KVL_TRY(s);
    KVL_TRY(db_get(st, CF_DEFAULT, "capacity", 8, &v, &vn));
    st->capacity = v && vn == 8 ? kvl_get64((uint8_t *)v) : (1ull << 30);
    rocksdb_free(v);
    return KVL_OK;
}

static kvl_status open_segments(kvl_store *st) {
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_DEFAULT]);
    kvl_status s = KVL_OK;
    void *sb = NULL;
    if (posix_memalign(&sb, KVL_BLOCK, KVL_SEG_HDR)) {
        rocksdb_iter_destroy(it);
        return kvl_errorf(KVL_ERR_NOMEM, "superblock");
    }
    for (rocksdb_iter_seek(it, "seg/", 4); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
        const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
        if (kn != 8 || memcmp(k, "seg/", 4) != 0) break;
        uint32_t id = kvl_get32be(k + 4);
        if (id != st->nsegs || vn != 16) {
            s = kvl_errorf(KVL_ERR_CORRUPT, "segment records are not numbered 0..n-1 (found %u)", id);
            break;
        }
        char path[4096];
        seg_path(st, id, path, sizeof path);
        int fd = open(path, (st->opt.read_only ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC);
        if (fd < 0) {
            s = errno == EINVAL ? kvl_errorf(KVL_ERR_UNSUPPORTED, "%s: no O_DIRECT on this filesystem", path)
                                : kvl_errorf(KVL_ERR_CORRUPT, "segment %s: %s", path, strerror(errno));
            break;
        }
        ssize_t r = pread(fd, sb, KVL_SEG_HDR, 0);
        const uint8_t *p = sb;
        if (r != (ssize_t)KVL_SEG_HDR || memcmp(p, seg_magic, 8) != 0 || kvl_get64(p + 32) != XXH3_64bits(p, 32) ||
            kvl_get32(p + 12) != id || kvl_get64(p + 16) != kvl_get64(v)) {
            close(fd);
            s = kvl_errorf(KVL_ERR_CORRUPT, "segment %s: bad superblock", path);
            break;
        }
        if (kvl_get32(p + 8) != KVL_STORE_FORMAT_VERSION) {
            close(fd);
            s = kvl_errorf(KVL_ERR_VERSION, "segment %s: version %u", path, kvl_get32(p + 8));
            break;
        }
        if (st->nsegs >= KVL_MAX_SEGS) {
            close(fd);
            s = kvl_errorf(KVL_ERR_LIMIT, "more than %d segments", KVL_MAX_SEGS);
            break;
        }
        kvl_seg *sg = &st->segs[st->nsegs++];
        memset(sg, 0, sizeof *sg);
        sg->fd = fd;
        sg->id = id;
        sg->size = kvl_get64(v);
        sg->fenced = kvl_get64(v + 8) != 0;
    }
    free(sb);
    rocksdb_iter_destroy(it);
    KVL_TRY(s);
    if (!st->opt.read_only) {
        /* a crash while creating segment n leaves a file without a record: remove it */
        for (uint32_t id = (uint32_t)st->nsegs;; id++) {
            char path[4096];
            seg_path(st, id, path, sizeof path);
            if (unlink(path) != 0) break;
        }
    }
    return KVL_OK;
}

/* recovery: every PENDING extent belongs to no committed entry: make it FREE */
static kvl_status recover_pending(kvl_store *st, rocksdb_writebatch_t *wb) {
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_PENDING]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
        const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
        if (kn != 12 || vn != 8) continue;
        uint32_t seg = kvl_get32be(k);
        uint64_t off = kvl_get64be(k + 4), len = kvl_get64(v);
        if (seg >= st->nsegs) continue;
        if (st->opt.read_only) {
            atomic_fetch_add(&st->pending, len);
            continue;
        }
        rocksdb_writebatch_delete_cf(wb, st->cf[CF_PENDING], (const char *)k, 12);
        KVL_TRY(free_insert(st, &st->segs[seg], off, len, wb));
        st->rec_extents++;
        st->rec_bytes += len;
    }
    rocksdb_iter_destroy(it);
    return KVL_OK;
}

static kvl_status load_free(kvl_store *st) {
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_FREE]);
    kvl_status s = KVL_OK;
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
        const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
        uint32_t seg = kn == 12 ? kvl_get32be(k) : UINT32_MAX;
        if (kn != 12 || vn != 8 || seg >= st->nsegs) {
            s = kvl_errorf(KVL_ERR_CORRUPT, "malformed free-space record");
            break;
        }
        kvl_seg *sg = &st->segs[seg];
        uint64_t off = kvl_get64be(k + 4), len = kvl_get64(v);
        if (off < KVL_SEG_HDR || off + len > sg->size || off % KVL_BLOCK || len % KVL_BLOCK) {
            s = kvl_errorf(KVL_ERR_CORRUPT, "free-space record outside segment %u", seg);
            break;
        }
        /* records are in offset order and never adjacent (they are coalesced when written) */
        if (sg->nfree == sg->capfree) {
            size_t nc = sg->capfree ? sg->capfree * 2 : 64;
            kvl_ext *ne = realloc(sg->free, nc * sizeof *ne);
            if (!ne) {
                s = kvl_errorf(KVL_ERR_NOMEM, "free list");
                break;
            }
            sg->free = ne;
            sg->capfree = nc;
        }
        if (sg->nfree && sg->free[sg->nfree - 1].off + sg->free[sg->nfree - 1].len > off) {
            s = kvl_errorf(KVL_ERR_CORRUPT, "overlapping free-space records in segment %u", seg);
            break;
        }
        sg->free[sg->nfree++] = (kvl_ext){off, len};
        sg->free_bytes += len;
    }
    rocksdb_iter_destroy(it);
    return s;
}

static kvl_status load_tenants(kvl_store *st) {
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_TENANTS]);
    for (rocksdb_iter_seek_to_first(it); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const char *k = rocksdb_iter_key(it, &kn);
        const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
        if (kn > KVL_STORE_TENANT_MAX || vn != 8) continue;
        char name[KVL_STORE_TENANT_MAX + 1];
        memcpy(name, k, kn);
        name[kn] = 0;
        uint32_t i = tenant_intern(st, name);
        if (i == UINT32_MAX) {
            rocksdb_iter_destroy(it);
            return kvl_errorf(KVL_ERR_LIMIT, "more than %d tenants", KVL_MAX_TENANTS);
        }
        st->tenants[i].quota = kvl_get64(v);
    }
    rocksdb_iter_destroy(it);
    return KVL_OK;
}

typedef struct load_job {
    kvl_store *st;
    int lo, hi; /* first key byte range [lo, hi) */
    kvl_status status;
    char err[256];
    uint64_t max_gen, used;
    uint64_t *tused, *tcount;
    size_t nt;
} load_job;

static void *load_thread(void *arg) {
    load_job *j = arg;
    kvl_store *st = j->st;
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_readoptions_set_fill_cache(ro, 0);
    rocksdb_readoptions_set_readahead_size(ro, 4u << 20);
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, ro, st->cf[CF_ENTRIES]);
    uint8_t lo = (uint8_t)j->lo;
    char last_tenant[KVL_STORE_TENANT_MAX + 1] = "";
    uint32_t last_idx = UINT32_MAX;
    for (rocksdb_iter_seek(it, (const char *)&lo, 1); rocksdb_iter_valid(it); rocksdb_iter_next(it)) {
        size_t kn, vn;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
        if (kn >= 1 && k[0] >= j->hi) break;
        const uint8_t *v = (const uint8_t *)rocksdb_iter_value(it, &vn);
        kvl_rec r;
        char tenant[KVL_STORE_TENANT_MAX + 1];
        kvl_status s = kn == 32 ? kvl_rec_decode(v, vn, &r, tenant) : kvl_errorf(KVL_ERR_FORMAT, "key of %zu bytes", kn);
        if (s == KVL_OK && (r.seg >= st->nsegs || r.off + r.ext_len > st->segs[r.seg].size))
            s = kvl_errorf(KVL_ERR_CORRUPT, "entry extent outside its segment");
        if (s != KVL_OK) {
            j->status = s;
            snprintf(j->err, sizeof j->err, "index entry: %s", kvl_last_error());
            break;
        }
        memcpy(r.key.b, k, 32);
        if (last_idx == UINT32_MAX || strcmp(tenant, last_tenant) != 0) {
            last_idx = tenant_intern(st, tenant);
            snprintf(last_tenant, sizeof last_tenant, "%s", tenant);
            if (last_idx == UINT32_MAX) {
                j->status = KVL_ERR_LIMIT;
                snprintf(j->err, sizeof j->err, "more than %d tenants", KVL_MAX_TENANTS);
                break;
            }
        }
        r.tenant = last_idx;
        if (r.tenant >= j->nt) {
            size_t nn = r.tenant + 16;
            uint64_t *a = realloc(j->tused, nn * 8), *b = a ? realloc(j->tcount, nn * 8) : NULL;
            if (!a || !b) {
                if (a) j->tused = a;
                j->status = KVL_ERR_NOMEM;
                snprintf(j->err, sizeof j->err, "loading the index");
                break;
            }
            j->tused = a;
            j->tcount = b;
            memset(j->tused + j->nt, 0, (nn - j->nt) * 8);
            memset(j->tcount + j->nt, 0, (nn - j->nt) * 8);
            j->nt = nn;
        }
        j->tused[r.tenant] += r.ext_len;
        j->tcount[r.tenant]++;
        j->used += r.ext_len;
        if (r.generation > j->max_gen) j->max_gen = r.generation;
        /* no lock: during open nobody else sees the store, and loaders own disjoint shards */
        s = shard_put(kvl_shard_of(st, &r.key), &r);
        if (s != KVL_OK) {
            j->status = s;
            snprintf(j->err, sizeof j->err, "%s", kvl_last_error());
            break;
        }
    }
    rocksdb_iter_destroy(it);
    rocksdb_readoptions_destroy(ro);
    return NULL;
}

static kvl_status load_entries(kvl_store *st) {
    uint64_t est = 0;
    if (rocksdb_property_int_cf(st->db, st->cf[CF_ENTRIES], "rocksdb.estimate-num-keys", &est) == 0 && est) {
        /* size every shard once for the expected count: no rehashing while loading */
        size_t per = (size_t)(est / KVL_NSHARDS * 10 / 6) + 16, cap = 1024;
        while (cap < per) cap *= 2;
        for (int i = 0; i < KVL_NSHARDS; i++) {
            kvl_shard *sh = &st->shards[i];
            if (sh->cap >= cap) continue;
            kvl_rec *ns = slots_alloc(cap, 1);
            if (!ns) break;
            free(sh->slots);
            sh->slots = ns;
            sh->cap = cap;
        }
    }
    int nt = st->opt.load_threads > 0 ? st->opt.load_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (nt < 1) nt = 1;
    if (nt > 16) nt = 16;
    load_job jobs[16];
    pthread_t th[16];
    for (int t = 0; t < nt; t++) {
        /* ranges on shard boundaries: no two loaders share a shard */
        jobs[t] = (load_job){.st = st, .lo = KVL_NSHARDS * t / nt * (256 / KVL_NSHARDS),
                             .hi = KVL_NSHARDS * (t + 1) / nt * (256 / KVL_NSHARDS)};
        if (nt == 1 || pthread_create(&th[t], NULL, load_thread, &jobs[t]) != 0) {
            load_thread(&jobs[t]);
            th[t] = 0;
        }
    }
    kvl_status s = KVL_OK;
    uint64_t max_gen = 0;
    for (int t = 0; t < nt; t++) {
        if (th[t]) pthread_join(th[t], NULL);
        if (jobs[t].status != KVL_OK && s == KVL_OK) s = kvl_errorf(jobs[t].status, "%s", jobs[t].err);
        if (jobs[t].max_gen > max_gen) max_gen = jobs[t].max_gen;
        atomic_fetch_add(&st->used, jobs[t].used);
        for (size_t i = 0; i < jobs[t].nt; i++)
            if (jobs[t].tcount[i]) tenant_add(st, (uint32_t)i, (int64_t)jobs[t].tused[i], (int64_t)jobs[t].tcount[i]);
        free(jobs[t].tused);
        free(jobs[t].tcount);
    }
    uint64_t now = kvl_now_ns();
    atomic_store(&st->gen, (max_gen > now ? max_gen : now) + 1);
    return s;
}

static kvl_status init_logseq(kvl_store *st) {
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->ropt, st->cf[CF_LOG]);
    rocksdb_iter_seek_to_last(it);
    uint64_t next = 1;
    if (rocksdb_iter_valid(it)) {
        size_t kn;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &kn);
        if (kn == 8) next = kvl_get64be(k) + 1;
    }
    rocksdb_iter_destroy(it);
    atomic_store(&st->logseq, next);
    return KVL_OK;
}


/* ------------------------------------------------------------------ index snapshot
 * A clean close dumps the in-memory index (shard tables verbatim + tenant names) to DIR/index.snap,
 * stamped with RocksDB's last sequence number. The next open uses it instead of scanning `entries`
 * only if that sequence number is unchanged (nothing was written in between, by anyone), the
 * layout constants match and the whole file's checksum holds; otherwise it scans. It is a cache
 * in host layout, never a source of truth: a writable open deletes it before writing anything. */

static const uint8_t snap_magic[8] = {'K', 'V', 'L', 'S', 'N', 'A', 'P', '1'};

static void snap_path(const kvl_store *st, char *b, size_t n) { snprintf(b, n, "%s/index.snap", st->dir); }

static int snap_write_all(FILE *f, XXH3_state_t *h, const void *p, size_t n) {
    XXH3_64bits_update(h, p, n);
    return fwrite(p, 1, n, f) == n;
}

static void snapshot_write(kvl_store *st) {
    uint64_t total = 0;
    for (int i = 0; i < KVL_NSHARDS; i++) total += st->shards[i].n;
    if (total < 10000) return; /* small stores scan in milliseconds */
    char path[4096], tmp[4200];
    snap_path(st, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return;
    XXH3_state_t *h = XXH3_createState();
    XXH3_64bits_reset(h);
    uint8_t hd[48] = {0};
    memcpy(hd, snap_magic, 8);
    kvl_put32(hd + 8, KVL_NSHARDS);
    kvl_put32(hd + 12, (uint32_t)sizeof(kvl_rec));
    kvl_put32(hd + 16, (uint32_t)st->ntenants);
    kvl_put64(hd + 24, rocksdb_get_latest_sequence_number(st->db));
    kvl_put64(hd + 32, total);
    int ok = snap_write_all(f, h, hd, sizeof hd);
    for (size_t i = 0; ok && i < st->ntenants; i++) ok = snap_write_all(f, h, st->tenants[i].name, sizeof st->tenants[i].name);
    for (int i = 0; ok && i < KVL_NSHARDS; i++) {
        uint8_t c[16];
        kvl_put64(c, st->shards[i].cap);
        kvl_put64(c + 8, st->shards[i].n);
        ok = snap_write_all(f, h, c, 16) && (!st->shards[i].cap || snap_write_all(f, h, st->shards[i].slots, st->shards[i].cap * sizeof(kvl_rec)));
    }
    uint8_t t[8];
    kvl_put64(t, XXH3_64bits_digest(h));
    XXH3_freeState(h);
    ok = ok && fwrite(t, 8, 1, f) == 1;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) unlink(tmp);
}

/* 1 when the index came from the snapshot; 0 to scan (the reason does not matter) */
static int snapshot_load(kvl_store *st, uint64_t seq_at_open) {
    char path[4096];
    snap_path(st, path, sizeof path);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    int ok = 0;
    size_t nt = 0;
    XXH3_state_t *h = XXH3_createState();
    XXH3_64bits_reset(h);
    uint8_t hd[48];
    if (fread(hd, sizeof hd, 1, f) != 1 || memcmp(hd, snap_magic, 8) != 0 || kvl_get32(hd + 8) != KVL_NSHARDS ||
        kvl_get32(hd + 12) != sizeof(kvl_rec) || kvl_get32(hd + 16) > KVL_MAX_TENANTS || kvl_get64(hd + 24) != seq_at_open)
        goto out;
    XXH3_64bits_update(h, hd, sizeof hd);
    nt = kvl_get32(hd + 16);
    for (size_t i = 0; i < nt; i++) {
        if (fread(st->tenants[i].name, sizeof st->tenants[i].name, 1, f) != 1) goto out;
        XXH3_64bits_update(h, st->tenants[i].name, sizeof st->tenants[i].name);
        st->tenants[i].name[KVL_STORE_TENANT_MAX] = 0;
    }
    for (int i = 0; i < KVL_NSHARDS; i++) {
        uint8_t c[16];
        if (fread(c, 16, 1, f) != 1) goto out;
        XXH3_64bits_update(h, c, 16);
        uint64_t cap = kvl_get64(c), n = kvl_get64(c + 8);
        if (cap & (cap - 1) || n > cap || cap > (1ull << 32)) goto out;
        kvl_shard *sh = &st->shards[i];
        free(sh->slots);
        sh->slots = NULL;
        sh->cap = sh->n = 0;
        if (!cap) continue;
        sh->slots = slots_alloc(cap, 0);
        if (!sh->slots || fread(sh->slots, sizeof(kvl_rec), cap, f) != cap) goto out;
        XXH3_64bits_update(h, sh->slots, cap * sizeof(kvl_rec));
        sh->cap = cap;
        sh->n = n;
    }
    uint8_t t[8];
    if (fread(t, 8, 1, f) != 1 || kvl_get64(t) != XXH3_64bits_digest(h)) goto out;
    /* derived state, and a sanity pass over what we trust from now on */
    uint64_t max_gen = 0, cnt = 0;
    for (int i = 0; i < KVL_NSHARDS; i++)
        for (size_t j = 0; j < st->shards[i].cap; j++) {
            kvl_rec *r = &st->shards[i].slots[j];
            if (!r->state) continue;
            if (r->tenant >= nt || r->seg >= st->nsegs || r->off + r->ext_len > st->segs[r->seg].size ||
                shard_idx(&r->key) != i)
                goto out;
            r->dirty = 0;
            cnt++;
        }
    if (cnt != kvl_get64(hd + 32)) goto out;
    st->ntenants = nt;
    for (int i = 0; i < KVL_NSHARDS; i++)
        for (size_t j = 0; j < st->shards[i].cap; j++) {
            kvl_rec *r = &st->shards[i].slots[j];
            if (!r->state) continue;
            st->tenants[r->tenant].used += r->ext_len;
            st->tenants[r->tenant].count++;
            atomic_fetch_add(&st->used, r->ext_len);
            if (r->generation > max_gen) max_gen = r->generation;
        }
    uint64_t now = kvl_now_ns();
    atomic_store(&st->gen, (max_gen > now ? max_gen : now) + 1);
    ok = 1;
out:
    XXH3_freeState(h);
    fclose(f);
    if (!ok) {
        /* back to a clean slate for the scan */
        for (int i = 0; i < KVL_NSHARDS; i++) {
            free(st->shards[i].slots);
            st->shards[i].slots = NULL;
            st->shards[i].cap = st->shards[i].n = 0;
        }
        for (size_t i = 0; i < KVL_MAX_TENANTS && i < nt; i++) memset(&st->tenants[i], 0, sizeof st->tenants[i]);
        st->ntenants = 0;
    }
    if (!st->opt.read_only) unlink(path); /* used or not, it is stale once we write */
    return ok;
}

kvl_status kvl_store_open(const char *dir, const kvl_store_options *opt, kvl_store **out) {
    if (!dir || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_open: NULL argument");
    *out = NULL;
    uint64_t t0 = mono_ns();
    kvl_store *st = calloc(1, sizeof *st);
    if (!st) return kvl_errorf(KVL_ERR_NOMEM, "store");
    if (opt) st->opt = *opt;
    else kvl_store_options_default(&st->opt);
    st->dir = strdup(dir);
    for (int i = 0; i < KVL_NSHARDS; i++) pthread_mutex_init(&st->shards[i].mu, NULL);
    pthread_mutex_init(&st->tmu, NULL);
    pthread_mutex_init(&st->amu, NULL);
    pthread_mutex_init(&st->evmu, NULL);
    pthread_mutex_init(&st->fmu, NULL);
    pthread_mutex_init(&st->cache.mu, NULL);
    st->cache.budget = st->opt.cache_bytes;
    st->cache.nbuckets = 1 << 14;
    st->cache.buckets = calloc(st->cache.nbuckets, sizeof *st->cache.buckets);
    st->segs = calloc(KVL_MAX_SEGS, sizeof *st->segs);
    st->pool = kvl_bufpool_create(st->opt.buffer_pool_bytes);
    st->tenants = calloc(KVL_MAX_TENANTS, sizeof *st->tenants);
    if (!st->dir || !st->cache.buckets || !st->segs || !st->tenants || !st->pool) {
        kvl_store_close(st);
        return kvl_errorf(KVL_ERR_NOMEM, "store");
    }
    kvl_status s = KVL_OK;
    char path[4096];
    snprintf(path, sizeof path, "%s/index/CURRENT", dir);
    struct stat sb;
    int exists = stat(path, &sb) == 0;
    if (!exists) {
        if (!st->opt.create || st->opt.read_only) s = kvl_errorf(KVL_ERR_NOT_FOUND, "%s: no kvloom store here", dir);
        else if (mkdir(dir, 0755) != 0 && errno != EEXIST) s = io_status(errno, dir);
    }
    if (s == KVL_OK && !st->opt.read_only) {
        /* fail at open, not at the first put, on a filesystem without O_DIRECT (tmpfs) */
        char probe[4200];
        snprintf(probe, sizeof probe, "%s/.direct-probe", dir);
        int fd = open(probe, O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0644);
        if (fd < 0 && errno == EINVAL)
            s = kvl_errorf(KVL_ERR_UNSUPPORTED, "%s: the filesystem does not support O_DIRECT", dir);
        else if (fd < 0)
            s = io_status(errno, probe);
        else
            close(fd);
        unlink(probe);
    }
    if (s == KVL_OK) s = db_open(st, exists);
    uint64_t seq_at_open = s == KVL_OK ? rocksdb_get_latest_sequence_number(st->db) : 0;
    int from_snapshot = 0;
    if (s == KVL_OK) s = load_format(st, !exists);
    if (s == KVL_OK && st->opt.capacity_bytes && !st->opt.read_only && st->opt.capacity_bytes != st->capacity) {
        st->capacity = st->opt.capacity_bytes;
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        uint8_t c[8];
        kvl_put64(c, st->capacity);
        rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], "capacity", 8, (const char *)c, 8);
        s = kvl_db_write(st, wb, 1);
        rocksdb_writebatch_destroy(wb);
    }
    if (s == KVL_OK) s = open_segments(st);
    if (s == KVL_OK) s = load_free(st);
    if (s == KVL_OK) s = init_logseq(st);
    if (s == KVL_OK) {
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        s = recover_pending(st, wb);
        if (s == KVL_OK && st->rec_extents) {
            char d[96];
            snprintf(d, sizeof d, "reclaimed %llu uncommitted extents", (unsigned long long)st->rec_extents);
            kvl_log_append(st, wb, "recover", NULL, NULL, st->rec_bytes, d);
            s = kvl_db_write(st, wb, 1);
        }
        rocksdb_writebatch_destroy(wb);
    }
    if (s == KVL_OK && exists) from_snapshot = snapshot_load(st, seq_at_open);
    if (s == KVL_OK) s = load_tenants(st);
    if (s == KVL_OK && !from_snapshot) s = load_entries(st);
    st->from_snapshot = from_snapshot;
    if (s == KVL_OK) {
        atomic_fetch_add(&st->used, atomic_load(&st->pending));
        s = kvl_io_init(st);
    }
    if (s == KVL_OK) {
        verify_workers_start(st);
        st->vstarted = 1;
    }
    if (s != KVL_OK) {
        kvl_store_close(st);
        return s;
    }
    st->open_ns = mono_ns() - t0;
    *out = st;
    return KVL_OK;
}

uint64_t kvl_store_trim_log(kvl_store *st, uint64_t keep) {
    uint64_t next = atomic_load(&st->logseq);
    if (!keep || next <= keep + 1) return 0;
    uint8_t lo[8], hi[8];
    kvl_put64be(lo, 0);
    kvl_put64be(hi, next - keep);
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    rocksdb_writebatch_delete_range_cf(wb, st->cf[CF_LOG], (const char *)lo, 8, (const char *)hi, 8);
    kvl_status s = kvl_db_write(st, wb, 0);
    rocksdb_writebatch_destroy(wb);
    return s == KVL_OK ? next - keep - 1 : 0;
}

void kvl_store_close(kvl_store *st) {
    if (!st) return;
    if (st->db && !st->opt.read_only && st->nsegs) {
        kvl_store_flush(st);
        /* a clean close leaves nothing to replay: the next open reads SST files only. free and
         * pending are tiny but churn (tombstones): compacting them keeps recovery scans short */
        rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
        rocksdb_flushoptions_set_wait(fo, 1);
        char *err = NULL;
        for (int i = 0; i < CF_COUNT && !err; i++) rocksdb_flush_cf(st->db, fo, st->cf[i], &err);
        if (err) {
            fprintf(stderr, "kvloom store: flush at close: %s\n", err);
            rocksdb_free(err);
        }
        rocksdb_flushoptions_destroy(fo);
        rocksdb_compact_range_cf(st->db, st->cf[CF_FREE], NULL, 0, NULL, 0);
        rocksdb_compact_range_cf(st->db, st->cf[CF_PENDING], NULL, 0, NULL, 0);
        /* short-lived or crashing writers leave level-0 files that background compaction never got
         * to; RocksDB opens every file at open, so do not let them pile up */
        kvl_store_trim_log(st, KVL_LOG_KEEP);
        for (int i = 0; i < CF_COUNT; i++) {
            uint64_t files = 0;
            for (int l = 0; l < 7; l++) {
                char prop[64];
                snprintf(prop, sizeof prop, "rocksdb.num-files-at-level%d", l);
                char *v = rocksdb_property_value_cf(st->db, st->cf[i], prop); /* a string property */
                if (v) files += strtoull(v, NULL, 10);
                free(v);
            }
            /* sequential keys (the log) flush into many small non-overlapping files that RocksDB
             * only moves between levels, never merges: rewrite them into one */
            if (files >= 16) {
                rocksdb_compactoptions_t *co = rocksdb_compactoptions_create();
                rocksdb_compactoptions_set_bottommost_level_compaction(co, 2 /* force */);
                rocksdb_compact_range_cf_opt(st->db, st->cf[i], co, NULL, 0, NULL, 0);
                rocksdb_compactoptions_destroy(co);
            }
        }
        if (!err) snapshot_write(st);
    }
    if (st->vstarted) verify_workers_stop(st);
    while (st->cache.head) cache_remove(&st->cache, st->cache.head);
    free(st->cache.buckets);
    kvl_bufpool_unref(st->pool);
    kvl_io_free(st);
    for (size_t i = 0; i < st->nsegs; i++) {
        close(st->segs[i].fd);
        free(st->segs[i].free);
    }
    free(st->segs);
    free(st->pins);
    for (int i = 0; i < KVL_NSHARDS; i++) {
        free(st->shards[i].slots);
        pthread_mutex_destroy(&st->shards[i].mu);
    }
    free(st->tenants);
    if (st->db) {
        for (int i = 0; i < CF_COUNT; i++)
            if (st->cf[i]) rocksdb_column_family_handle_destroy(st->cf[i]);
        rocksdb_close(st->db);
    }
    if (st->dbopt) rocksdb_options_destroy(st->dbopt);
    if (st->wsync) rocksdb_writeoptions_destroy(st->wsync);
    if (st->wnosync) rocksdb_writeoptions_destroy(st->wnosync);
    if (st->ropt) rocksdb_readoptions_destroy(st->ropt);
    pthread_mutex_destroy(&st->tmu);
    pthread_mutex_destroy(&st->amu);
    pthread_mutex_destroy(&st->evmu);
    pthread_mutex_destroy(&st->fmu);
    pthread_mutex_destroy(&st->cache.mu);
    free(st->dir);
    free(st);
}

/* ------------------------------------------------------------------ eviction */

typedef struct cand {
    double score;
    uint64_t t;
    kvl_store_key key;
    uint64_t gen, bytes;
    uint32_t tenant;
} cand;

static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? -1 : 1;
    if (x->t != y->t) return x->t < y->t ? -1 : 1;
    return memcmp(x->key.b, y->key.b, 32);
}

void kvl_lock_all(kvl_store *st) {
    for (int i = 0; i < KVL_NSHARDS; i++) pthread_mutex_lock(&st->shards[i].mu);
}
void kvl_unlock_all(kvl_store *st) {
    for (int i = KVL_NSHARDS - 1; i >= 0; i--) pthread_mutex_unlock(&st->shards[i].mu);
}

/* tenant < 0: all tenants, measured against st->used; else only that tenant, measured against its
 * usage. Evicts until the measure <= target (expired entries always go first). */
static kvl_status evict_run(kvl_store *st, kvl_store_policy pol, int64_t tenant, uint64_t target, int expired_only,
                            uint64_t max_entries, const char *why, uint64_t *n_out, uint64_t *b_out) {
    pthread_mutex_lock(&st->evmu);
    uint64_t now = kvl_now_ns();
    size_t nc = 0, capc = 0;
    cand *c = NULL;
    kvl_status s = KVL_OK;
    for (int i = 0; i < KVL_NSHARDS && s == KVL_OK; i++) {
        kvl_shard *sh = &st->shards[i];
        pthread_mutex_lock(&sh->mu);
        for (size_t j = 0; j < sh->cap; j++) {
            kvl_rec *r = &sh->slots[j];
            if (!r->state || (tenant >= 0 && r->tenant != (uint32_t)tenant)) continue;
            int expired = r->expires_ns && r->expires_ns <= now;
            if (expired_only && !expired) continue;
            if (nc == capc) {
                size_t ncap = capc ? capc * 2 : 1024;
                cand *n2 = realloc(c, ncap * sizeof *c);
                if (!n2) {
                    s = kvl_errorf(KVL_ERR_NOMEM, "eviction candidates");
                    break;
                }
                c = n2;
                capc = ncap;
            }
            cand *x = &c[nc++];
            x->t = r->last_access_ns ? r->last_access_ns : r->created_ns;
            if (expired) x->score = -INFINITY;
            else if (pol == KVL_STORE_EVICT_COST)
                x->score = (double)(r->hits + 1) * (double)(r->cost ? r->cost : 1) / (double)r->ext_len;
            else x->score = 0;
            x->key = r->key;
            x->gen = r->generation;
            x->bytes = r->ext_len;
            x->tenant = r->tenant;
        }
        pthread_mutex_unlock(&sh->mu);
    }
    if (s != KVL_OK) {
        free(c);
        pthread_mutex_unlock(&st->evmu);
        return s;
    }
    if (nc) qsort(c, nc, sizeof *c, cand_cmp);
    uint64_t measure;
    if (tenant >= 0) {
        pthread_mutex_lock(&st->tmu);
        measure = st->tenants[tenant].used;
        pthread_mutex_unlock(&st->tmu);
    } else {
        measure = atomic_load(&st->used);
    }
    size_t nv = 0;
    uint64_t freed = 0;
    while (nv < nc && (max_entries == 0 || nv < max_entries)) {
        if (!(expired_only || c[nv].score == -INFINITY) && measure - (freed < measure ? freed : measure) <= target) break;
        freed += c[nv].bytes;
        nv++;
    }
    uint64_t n_ev = 0, b_ev = 0;
    if (nv) {
        typedef struct { uint32_t seg; uint64_t off, len; kvl_store_key key; } victim;
        victim *vic = malloc(nv * sizeof *vic);
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        kvl_lock_all(st);
        size_t k = 0;
        for (size_t i = 0; vic && i < nv; i++) {
            kvl_shard *sh = kvl_shard_of(st, &c[i].key);
            kvl_rec *r = kvl_shard_find(sh, &c[i].key);
            if (!r || r->generation != c[i].gen) continue; /* replaced or deleted meanwhile */
            rocksdb_writebatch_delete_cf(wb, st->cf[CF_ENTRIES], (const char *)r->key.b, 32);
            cf_put_ext(st, wb, CF_PENDING, r->seg, r->off, r->ext_len);
            kvl_log_append(st, wb, "evict", &r->key, kvl_tenant_name(st, r->tenant), r->ext_len, why);
            vic[k++] = (victim){r->seg, r->off, r->ext_len, r->key};
        }
        s = vic ? kvl_db_write(st, wb, 1) : kvl_errorf(KVL_ERR_NOMEM, "victims");
        if (s == KVL_OK) {
            for (size_t i = 0; i < k; i++) {
                kvl_shard *sh = kvl_shard_of(st, &vic[i].key);
                kvl_rec *r = kvl_shard_find(sh, &vic[i].key);
                tenant_add(st, r->tenant, -(int64_t)r->ext_len, -1);
                shard_del(sh, r);
                atomic_fetch_add(&st->pending, vic[i].len);
            }
        }
        kvl_unlock_all(st);
        rocksdb_writebatch_destroy(wb);
        if (s == KVL_OK) {
            for (size_t i = 0; i < k; i++) {
                cache_drop(st, &vic[i].key);
                release_ext(st, vic[i].seg, vic[i].off, vic[i].len);
                b_ev += vic[i].len;
            }
            n_ev = k;
            atomic_fetch_add(&st->n_evict, n_ev);
            atomic_fetch_add(&st->b_evict, b_ev);
        }
        free(vic);
    }
    free(c);
    pthread_mutex_unlock(&st->evmu);
    if (n_out) *n_out = n_ev;
    if (b_out) *b_out = b_ev;
    return s;
}

kvl_status kvl_store_evict(kvl_store *st, const kvl_store_evict_req *req, uint64_t *n_evicted, uint64_t *bytes_evicted) {
    if (!st || !req) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_evict: NULL argument");
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    int64_t t = -1;
    if (req->tenant) {
        pthread_mutex_lock(&st->tmu);
        for (size_t i = 0; i < st->ntenants; i++)
            if (strcmp(st->tenants[i].name, req->tenant) == 0) t = (int64_t)i;
        pthread_mutex_unlock(&st->tmu);
        if (t < 0) {
            if (n_evicted) *n_evicted = 0;
            if (bytes_evicted) *bytes_evicted = 0;
            return KVL_OK;
        }
    }
    return evict_run(st, req->policy, t, req->target_bytes, req->expired_only, req->max_entries,
                     req->expired_only ? "ttl" : "explicit", n_evicted, bytes_evicted);
}

/* reserves need bytes of capacity for tenant (evicting as the quota and capacity demand) */
static kvl_status make_room(kvl_store *st, uint32_t tenant, uint64_t need) {
    pthread_mutex_lock(&st->tmu);
    uint64_t quota = st->tenants[tenant].quota, tused = st->tenants[tenant].used;
    pthread_mutex_unlock(&st->tmu);
    if (quota) {
        if (need > quota)
            return kvl_errorf(KVL_ERR_QUOTA, "%llu bytes exceed tenant '%s' quota of %llu", (unsigned long long)need,
                              kvl_tenant_name(st, tenant), (unsigned long long)quota);
        if (tused + need > quota)
            KVL_TRY(evict_run(st, st->opt.policy, tenant, quota - need, 0, 0, "quota", NULL, NULL));
    }
    if (need > st->capacity)
        return kvl_errorf(KVL_ERR_STORE_FULL, "%llu bytes exceed the capacity of %llu", (unsigned long long)need,
                          (unsigned long long)st->capacity);
    for (int round = 0, waits = 0; round < 8; round++) {
        uint64_t u = atomic_load(&st->used);
        while (u + need <= st->capacity)
            if (atomic_compare_exchange_weak(&st->used, &u, u + need)) return KVL_OK;
        /* evict a little more than needed so a full store does not sort its index on every put */
        uint64_t slack = st->capacity / 32;
        uint64_t target = st->capacity - need > slack ? st->capacity - need - slack : 0;
        uint64_t n = 0;
        KVL_TRY(evict_run(st, st->opt.policy, -1, target, 0, 0, "capacity", &n, NULL));
        if (n == 0 && round > 0) {
            /* nothing left to evict, but space held by puts in flight and by extents that readers
             * still pin comes back shortly: wait for it (up to ~2 s) before calling the store full */
            uint64_t entry_bytes = 0;
            pthread_mutex_lock(&st->tmu);
            for (size_t i = 0; i < st->ntenants; i++) entry_bytes += st->tenants[i].used;
            pthread_mutex_unlock(&st->tmu);
            if (atomic_load(&st->used) <= entry_bytes || waits >= 2000) break;
            waits++;
            round--;
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    return kvl_errorf(KVL_ERR_STORE_FULL, "no room for %llu bytes: capacity %llu, used %llu, nothing evictable",
                      (unsigned long long)need, (unsigned long long)st->capacity,
                      (unsigned long long)atomic_load(&st->used));
}

kvl_status kvl_store_set_quota(kvl_store *st, const char *tenant, uint64_t quota_bytes) {
    if (!st || !tenant || !tenant_name_ok(tenant))
        return kvl_errorf(KVL_ERR_INVALID_ARG, "bad tenant name '%s'", tenant ? tenant : "(null)");
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    uint32_t t = tenant_intern(st, tenant);
    if (t == UINT32_MAX) return kvl_errorf(KVL_ERR_LIMIT, "a store holds at most %d tenants", KVL_MAX_TENANTS);
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    uint8_t v[8];
    kvl_put64(v, quota_bytes);
    rocksdb_writebatch_put_cf(wb, st->cf[CF_TENANTS], tenant, strlen(tenant), (const char *)v, 8);
    kvl_log_append(st, wb, "quota", NULL, tenant, quota_bytes, "");
    kvl_status s = kvl_db_write(st, wb, 1);
    rocksdb_writebatch_destroy(wb);
    KVL_TRY(s);
    pthread_mutex_lock(&st->tmu);
    st->tenants[t].quota = quota_bytes;
    uint64_t used = st->tenants[t].used;
    pthread_mutex_unlock(&st->tmu);
    if (quota_bytes && used > quota_bytes) KVL_TRY(evict_run(st, st->opt.policy, t, quota_bytes, 0, 0, "quota", NULL, NULL));
    return KVL_OK;
}

kvl_status kvl_store_set_capacity(kvl_store *st, uint64_t capacity_bytes) {
    if (!st || !capacity_bytes) return kvl_errorf(KVL_ERR_INVALID_ARG, "capacity must be > 0");
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    uint8_t c[8];
    kvl_put64(c, capacity_bytes);
    rocksdb_writebatch_put_cf(wb, st->cf[CF_DEFAULT], "capacity", 8, (const char *)c, 8);
    kvl_log_append(st, wb, "capacity", NULL, NULL, capacity_bytes, "");
    kvl_status s = kvl_db_write(st, wb, 1);
    rocksdb_writebatch_destroy(wb);
    KVL_TRY(s);
    pthread_mutex_lock(&st->amu);
    st->capacity = capacity_bytes;
    pthread_mutex_unlock(&st->amu);
    if (atomic_load(&st->used) > capacity_bytes)
        KVL_TRY(evict_run(st, st->opt.policy, -1, capacity_bytes, 0, 0, "capacity", NULL, NULL));
    return KVL_OK;
}

/* ------------------------------------------------------------------ put */

static int key_cmp(const void *a, const void *b) { return memcmp(a, b, 32); }

/* header + LE tokens + value + zero padding into buf (need bytes, aligned) */
static void build_extent(void *buf, const kvl_store_put_item *x, const kvl_rec *r, uint64_t need) {
    uint8_t *p = buf;
    kvl_ext_hdr_encode(p, r, x->meta->tenant);
    for (size_t t = 0; t < x->n_tokens; t++) kvl_put32(p + KVL_EXT_HDR + 4 * t, (uint32_t)x->tokens[t]);
    size_t used = KVL_EXT_HDR + 4 * x->n_tokens;
    if (x->len) memcpy(p + used, x->value, x->len);
    memset(p + used + x->len, 0, need - used - x->len);
}

kvl_status kvl_store_put_batch(kvl_store *st, size_t n, const kvl_store_put_item *it) {
    if (!st || (n && !it)) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_put_batch: NULL argument");
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    if (!n) return KVL_OK;
    kvl_status s = KVL_OK;
    uint64_t *need = calloc(n, 8), *off = calloc(n, 8);
    uint32_t *seg = calloc(n, 4), *ten = calloc(n, 4);
    kvl_rec *recs = calloc(n, sizeof *recs);
    kvl_store_key *sorted = malloc(n * sizeof *sorted);
    if (!need || !off || !seg || !ten || !recs || !sorted) {
        s = kvl_errorf(KVL_ERR_NOMEM, "put batch of %zu", n);
        goto out_free;
    }
    for (size_t i = 0; i < n && s == KVL_OK; i++) {
        const kvl_store_put_item *x = &it[i];
        if (!x->meta || (x->len && !x->value) || (x->n_tokens && !x->tokens))
            s = kvl_errorf(KVL_ERR_INVALID_ARG, "put item %zu: NULL meta, value or tokens", i);
        else if (!tenant_name_ok(x->meta->tenant))
            s = kvl_errorf(KVL_ERR_INVALID_ARG, "tenant '%.64s' must be 1-63 of [A-Za-z0-9_.:@-] (or empty)", x->meta->tenant);
        else if (x->n_tokens > UINT32_MAX / 4 || x->meta->mode > KVL_STORE_MODE_PREFIX)
            s = kvl_errorf(KVL_ERR_INVALID_ARG, "put item %zu: bad token count or mode", i);
        if (s != KVL_OK) break;
        need[i] = kvl_round_up(KVL_EXT_HDR + 4ull * x->n_tokens + x->len, KVL_BLOCK);
        if (need[i] > st->seg_bytes - KVL_SEG_HDR)
            s = kvl_errorf(KVL_ERR_LIMIT, "value of %zu bytes does not fit a segment of %llu", x->len,
                           (unsigned long long)st->seg_bytes);
        ten[i] = tenant_intern(st, x->meta->tenant);
        if (ten[i] == UINT32_MAX) s = kvl_errorf(KVL_ERR_LIMIT, "a store holds at most %d tenants", KVL_MAX_TENANTS);
        sorted[i] = x->key;
    }
    if (s != KVL_OK) goto out_free;
    qsort(sorted, n, sizeof *sorted, key_cmp);
    for (size_t i = 1; i < n; i++)
        if (!memcmp(sorted[i].b, sorted[i - 1].b, 32)) {
            s = kvl_errorf(KVL_ERR_INVALID_ARG, "put batch names one key twice");
            goto out_free;
        }

    /* 1. room (quota + capacity): reserves bytes in st->used */
    size_t reserved = 0;
    for (; reserved < n; reserved++) {
        s = make_room(st, ten[reserved], need[reserved]);
        if (s != KVL_OK) break;
    }
    if (s != KVL_OK) {
        for (size_t i = 0; i < reserved; i++) atomic_fetch_sub(&st->used, need[i]);
        goto out_free;
    }
    /* 2. extents: FREE -> PENDING */
    int ok = 0;
    for (int round = 0; round < 4 && s == KVL_OK && !ok; round++) {
        s = alloc_many(st, n, need, seg, off, &ok);
        if (s == KVL_OK && !ok) {
            /* fragmentation: free more space by the store policy and try again */
            uint64_t total = 0, ev = 0;
            for (size_t i = 0; i < n; i++) total += need[i];
            uint64_t u = atomic_load(&st->used);
            s = evict_run(st, st->opt.policy, -1, u > 2 * total ? u - 2 * total : 0, 0, 0, "fragmentation", &ev, NULL);
            if (s == KVL_OK && ev == 0) break;
        }
    }
    if (s == KVL_OK && !ok) s = kvl_errorf(KVL_ERR_STORE_FULL, "no free extent large enough");
    if (s != KVL_OK) {
        for (size_t i = 0; i < n; i++) atomic_fetch_sub(&st->used, need[i]);
        goto out_free;
    }
    /* 3. data: O_DIRECT writes of header + tokens + value */
    kvl_ring *ring1 = NULL;
    uint64_t now = kvl_now_ns();
    for (size_t i = 0; i < n; i++) {
        const kvl_store_put_item *x = &it[i];
        kvl_rec *r = &recs[i];
        r->key = x->key;
        memcpy(r->fp, x->meta->fingerprint, 32);
        r->seg = seg[i];
        r->off = off[i];
        r->ext_len = need[i];
        r->value_len = x->len;
        r->n_tokens = (uint32_t)x->n_tokens;
        r->checksum = kvl_payload_sum(x->tokens, x->n_tokens, x->value, x->len);
        r->generation = atomic_fetch_add(&st->gen, 1);
        r->created_ns = now;
        uint64_t ttl = x->meta->ttl_s ? x->meta->ttl_s : st->opt.default_ttl_s;
        r->expires_ns = ttl ? now + ttl * 1000000000ull : 0;
        r->cost = x->meta->recompute_cost ? x->meta->recompute_cost : (x->n_tokens ? x->n_tokens : 1);
        r->codec_id = x->meta->codec_id;
        r->codec_level = x->meta->codec_level;
        r->mode = x->meta->mode;
        r->tenant = ten[i];
        r->state = 1;
    }
    if (n == 1 && need[0] <= KVL_STAGE_BYTES && (ring1 = kvl_io_stage_get(st)) != NULL) {
        /* a single small put: build it in a ring's registered buffer and write it as a fixed buffer */
        build_extent(ring1->stage, &it[0], &recs[0], need[0]);
        size_t wlen;
        int e = kvl_fault_write(st, need[0], &wlen);
        if (!e && wlen) e = kvl_io_write_fixed(st, ring1, st->segs[seg[0]].fd, wlen, off[0]);
        kvl_io_stage_put(ring1);
        if (e) s = io_status(e, "writing an extent");
    } else {
        /* batches and large values: up to ~64 MiB of extents in flight at once */
        kvl_ioreq *rq = calloc(n, sizeof *rq);
        if (!rq) s = kvl_errorf(KVL_ERR_NOMEM, "put batch");
        size_t i = 0;
        while (s == KVL_OK && i < n) {
            size_t j = i, m = 0;
            uint64_t bytes = 0;
            while (j < n && (j == i || bytes + need[j] <= (64u << 20))) {
                size_t cap = 0;
                void *buf = kvl_bufpool_get(st->pool, need[j], &cap);
                if (!buf) {
                    s = kvl_errorf(KVL_ERR_NOMEM, "write buffer of %llu bytes", (unsigned long long)need[j]);
                    break;
                }
                build_extent(buf, &it[j], &recs[j], need[j]);
                size_t wlen;
                int e = kvl_fault_write(st, need[j], &wlen);
                rq[m++] = (kvl_ioreq){.fd = st->segs[seg[j]].fd, .write = 1, .buf = buf, .off = off[j], .len = wlen, .err = e,
                                      .tag = cap};
                bytes += need[j];
                j++;
            }
            /* requests that already carry an injected error are not submitted */
            for (size_t k = 0; k < m; k++)
                if (rq[k].err) {
                    s = io_status(rq[k].err, "writing an extent");
                    break;
                }
            if (s == KVL_OK) kvl_io_run(st, rq, m);
            for (size_t k = 0; k < m; k++) {
                if (s == KVL_OK && rq[k].err) s = io_status(rq[k].err, "writing an extent");
                kvl_bufpool_put(st->pool, rq[k].buf, rq[k].tag);
            }
            i = j;
        }
        free(rq);
    }
    /* 4. fdatasync every touched segment; an error fences it */
    for (size_t i = 0; i < n && s == KVL_OK; i++) {
        int dup = 0;
        for (size_t j = 0; j < i; j++) dup |= seg[j] == seg[i];
        if (dup) continue;
        int e = kvl_fault_fsync(st);
        if (!e && fdatasync(st->segs[seg[i]].fd) != 0) e = errno;
        if (e) {
            fence_segment(st, seg[i], e);
            s = kvl_errorf(KVL_ERR_FSYNC, "fdatasync of segment %u: %s (segment fenced)", seg[i], strerror(e));
        }
    }
    if (s != KVL_OK) {
        /* nothing committed; extents in fenced segments stay PENDING (recovery frees them) */
        for (size_t i = 0; i < n; i++) {
            pthread_mutex_lock(&st->amu);
            int fenced = st->segs[seg[i]].fenced;
            pthread_mutex_unlock(&st->amu);
            if (fenced) {
                atomic_fetch_sub(&st->used, need[i]); /* stays PENDING on disk until recovery */
                continue;
            }
            release_ext(st, seg[i], off[i], need[i]);
        }
        goto out_free;
    }
    /* 5. commit: one synced batch PENDING -> ENTRY (old entries of the same keys -> PENDING) */
    {
        int locked[KVL_NSHARDS] = {0};
        for (size_t i = 0; i < n; i++) locked[shard_idx(&it[i].key)] = 1;
        for (int i = 0; i < KVL_NSHARDS; i++)
            if (locked[i]) pthread_mutex_lock(&st->shards[i].mu);
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        kvl_rec *old = calloc(n, sizeof *old);
        if (!old) s = kvl_errorf(KVL_ERR_NOMEM, "put");
        for (size_t i = 0; i < n && s == KVL_OK; i++) {
            kvl_rec *cur = kvl_shard_find(kvl_shard_of(st, &recs[i].key), &recs[i].key);
            if (cur) {
                old[i] = *cur;
                cf_put_ext(st, wb, CF_PENDING, cur->seg, cur->off, cur->ext_len);
            }
            uint8_t rb[KVL_ENTRY_REC_BYTES];
            kvl_rec_encode(&recs[i], st, rb);
            rocksdb_writebatch_put_cf(wb, st->cf[CF_ENTRIES], (const char *)recs[i].key.b, 32, (const char *)rb, sizeof rb);
            cf_del_ext(st, wb, CF_PENDING, seg[i], off[i]);
            kvl_log_append(st, wb, cur ? "replace" : "put", &recs[i].key, it[i].meta->tenant, need[i], "");
        }
        if (s == KVL_OK) s = kvl_db_write(st, wb, 1);
        if (s == KVL_OK) {
            for (size_t i = 0; i < n; i++) {
                kvl_shard *sh = kvl_shard_of(st, &recs[i].key);
                s = shard_put(sh, &recs[i]);
                KVL_ASSERT(s == KVL_OK); /* committed: the in-memory index must follow */
                tenant_add(st, ten[i], (int64_t)need[i], 1);
                atomic_fetch_sub(&st->pending, need[i]);
                if (old[i].state) {
                    tenant_add(st, old[i].tenant, -(int64_t)old[i].ext_len, -1);
                    atomic_fetch_add(&st->pending, old[i].ext_len);
                }
            }
        }
        for (int i = KVL_NSHARDS - 1; i >= 0; i--)
            if (locked[i]) pthread_mutex_unlock(&st->shards[i].mu);
        rocksdb_writebatch_destroy(wb);
        for (size_t i = 0; i < n; i++) {
            if (s != KVL_OK) {
                release_ext(st, seg[i], off[i], need[i]);
            } else if (old && old[i].state) {
                cache_drop(st, &old[i].key);
                release_ext(st, old[i].seg, old[i].off, old[i].ext_len);
            }
        }
        free(old);
        if (s == KVL_OK) atomic_fetch_add(&st->n_puts, n);
    }
out_free:
    free(need);
    free(off);
    free(seg);
    free(ten);
    free(recs);
    free(sorted);
    return s;
}

kvl_status kvl_store_put(kvl_store *st, const kvl_store_key *key, const kvl_store_meta *meta, const int32_t *tokens,
                         size_t n_tokens, const void *value, size_t len) {
    if (!key) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_put: NULL key");
    kvl_store_put_item x = {*key, meta, tokens, n_tokens, value, len};
    return kvl_store_put_batch(st, 1, &x);
}

/* ------------------------------------------------------------------ get */

/* Verification of a batch of extent reads, overlapped with the I/O at piece granularity: as the
 * completed prefix of a value grows (kvl_ioreq.progress), its header is checked and its payload
 * (tokens + value, contiguous after the header) is fed to a streaming xxh3, so when the last piece
 * of the batch lands only that piece is left to hash instead of a whole value. Each value is owned
 * by at most one thread at a time (vstate.owned); the bytes of a value are hashed in order. */
typedef struct vstate {
    XXH3_state_t *xs;
    size_t ready;    /* completed prefix of the extent (bytes) */
    size_t hashed;   /* payload bytes hashed so far */
    int owned;       /* a thread is hashing it or it sits in the worker queue */
    int iodone;      /* all its reads finished (rq->err says how) */
    int hdr_ok;      /* header checked */
    kvl_status bad;  /* first failure seen while reading (the value fails once its I/O is done) */
} vstate;

typedef struct verify_ctx {
    kvl_store *st;
    const kvl_rec *recs;
    kvl_store_value **out;
    kvl_status *status;
    vstate *vs;
    char (*msg)[160]; /* per item: the detail of a failure (kvl_errorf is per thread) */
    int parallel;     /* hand work to the store's verification workers */
    kvl_store_stream_fn fn; /* streaming get: told as values' prefixes arrive (or NULL) */
    void *fn_ctx;
    const size_t *fn_idx;   /* the caller's item index of each value */
    pthread_mutex_t mu; /* vstate fields and left */
    pthread_cond_t cv;
    size_t left; /* values not finished (under mu) */
} verify_ctx;

/* Does the work of value rq->tag that is ready: header check, hashing of the new bytes, and once
 * all its reads are done the final verdict. Called by the value's owner (owned = 1 on entry);
 * returns having given up ownership: 1 when it gave the verdict, else 0. After the verdict it
 * touches nothing of c (may be gone). */
static int verify_work(kvl_ioreq *rq, verify_ctx *c) {
    size_t i = rq->tag;
    vstate *v = &c->vs[i];
    const kvl_rec *r = &c->recs[i];
    uint8_t *p = c->out[i]->buf;
    const size_t pay_end = KVL_EXT_HDR + 4ull * r->n_tokens + r->value_len;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        size_t ready = v->ready < pay_end ? v->ready : pay_end;
        int iodone = v->iodone;
        size_t from = KVL_EXT_HDR + v->hashed;
        if (v->bad || ready <= from) {
            if (!iodone) {
                v->owned = 0;
                pthread_mutex_unlock(&c->mu);
                return 0;
            }
            pthread_mutex_unlock(&c->mu);
            break;
        }
        pthread_mutex_unlock(&c->mu);
        kvl_status s = KVL_OK;
        if (!v->hdr_ok) { /* ready > KVL_EXT_HDR here */
            s = kvl_ext_hdr_check(p, r);
            if (s == KVL_OK) {
                v->hdr_ok = 1;
                v->xs = XXH3_createState();
                if (!v->xs || XXH3_64bits_reset(v->xs) != XXH_OK)
                    s = kvl_errorf(KVL_ERR_NOMEM, "checksum state");
            }
        }
        if (s == KVL_OK) {
            /* no lock needed for the bytes: [from, ready) is complete and only the owner reads it */
            if (XXH3_64bits_update(v->xs, p + from, ready - from) != XXH_OK)
                s = kvl_errorf(KVL_ERR_INTERNAL, "checksum update");
        }
        pthread_mutex_lock(&c->mu);
        if (s == KVL_OK) {
            v->hashed = ready - KVL_EXT_HDR;
        } else {
            v->bad = s;
            snprintf(c->msg[i], sizeof c->msg[i], "%s", kvl_last_error());
        }
        pthread_mutex_unlock(&c->mu);
    }
    /* all reads of this value are done and everything that could be hashed is: the verdict */
    kvl_store *st = c->st;
    kvl_store_value *val = c->out[i];
    kvl_status s = v->bad;
    if (s == KVL_OK && rq->err) {
        s = io_status(rq->err, "reading an extent");
        snprintf(c->msg[i], sizeof c->msg[i], "%s", kvl_last_error());
    }
    if (s == KVL_OK && !v->hdr_ok) { /* an empty payload: nothing was hashed, the header is still due */
        s = kvl_ext_hdr_check(p, r);
        if (s == KVL_OK) {
            v->hdr_ok = 1;
            v->xs = XXH3_createState();
            if (!v->xs || XXH3_64bits_reset(v->xs) != XXH_OK) s = kvl_errorf(KVL_ERR_NOMEM, "checksum state");
        }
        if (s != KVL_OK) snprintf(c->msg[i], sizeof c->msg[i], "%s", kvl_last_error());
    }
    if (s == KVL_OK) {
        if (v->hashed != pay_end - KVL_EXT_HDR || XXH3_64bits_digest(v->xs) != r->checksum) {
            s = kvl_errorf(KVL_ERR_CORRUPT, "checksum mismatch in segment %u at %llu", r->seg,
                           (unsigned long long)r->off);
            snprintf(c->msg[i], sizeof c->msg[i], "%s", kvl_last_error());
        } else {
            val->tokens = (const int32_t *)(p + KVL_EXT_HDR);
            val->data = p + KVL_EXT_HDR + 4ull * r->n_tokens;
            kvl_rec_to_meta(st, r, &val->meta);
        }
    }
    if (s != KVL_OK) {
        if (s == KVL_ERR_CORRUPT) atomic_fetch_add(&st->n_corrupt, 1);
        /* a streaming consumer may still be reading the bytes: it frees the value itself */
        if (!c->fn) {
            kvl_store_value_free(val);
            c->out[i] = NULL;
        }
        c->status[i] = s;
    }
    pthread_mutex_lock(&c->mu);
    if (--c->left == 0) pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu); /* c may be gone after this */
    return 1;
}

/* hands value rq->tag (just made owned) to a worker, or works on it right here */
static void verify_dispatch(kvl_ioreq *rq, verify_ctx *c) {
    if (!c->parallel) {
        verify_work(rq, c);
        return;
    }
    kvl_store *st = c->st;
    rq->qnext = NULL;
    pthread_mutex_lock(&st->vmu);
    if (st->vq_tail) st->vq_tail->qnext = rq;
    else st->vq_head = rq;
    st->vq_tail = rq;
    pthread_cond_signal(&st->vcond);
    pthread_mutex_unlock(&st->vmu);
}

/* streaming get: the value bytes of the extent prefix [0, ready) go to the caller's callback */
static void stream_tell(verify_ctx *c, size_t i, size_t ready) {
    const kvl_rec *r = &c->recs[i];
    size_t v0 = KVL_EXT_HDR + 4ull * r->n_tokens, vr = ready > v0 ? ready - v0 : 0;
    if (vr > r->value_len) vr = r->value_len;
    if (vr) c->fn(c->fn_ctx, c->fn_idx ? c->fn_idx[i] : i, (const uint8_t *)c->out[i]->buf + v0, vr, r->value_len);
}

/* io callbacks (on the submitting thread): record the news, take ownership if nobody has it */
static void verify_progress(kvl_ioreq *rq, size_t ready, void *arg) {
    verify_ctx *c = arg;
    if (c->fn) stream_tell(c, rq->tag, ready);
    vstate *v = &c->vs[rq->tag];
    pthread_mutex_lock(&c->mu);
    v->ready = ready;
    int take = !v->owned;
    if (take) v->owned = 1;
    pthread_mutex_unlock(&c->mu);
    if (take) verify_dispatch(rq, c);
}

static void verify_done(kvl_ioreq *rq, void *arg) {
    verify_ctx *c = arg;
    if (c->fn && !rq->err) stream_tell(c, rq->tag, rq->len);
    vstate *v = &c->vs[rq->tag];
    pthread_mutex_lock(&c->mu);
    if (!rq->err) v->ready = rq->len;
    v->iodone = 1;
    int take = !v->owned;
    if (take) v->owned = 1;
    pthread_mutex_unlock(&c->mu);
    if (take) verify_dispatch(rq, c);
}

static kvl_ioreq *vq_pop_locked(kvl_store *st) {
    kvl_ioreq *rq = st->vq_head;
    if (rq) {
        st->vq_head = rq->qnext;
        if (!st->vq_head) st->vq_tail = NULL;
    }
    return rq;
}

static void *verify_worker(void *arg) {
    kvl_store *st = arg;
    pthread_mutex_lock(&st->vmu);
    for (;;) {
        kvl_ioreq *rq = vq_pop_locked(st);
        if (!rq) {
            if (st->vstop) break;
            pthread_cond_wait(&st->vcond, &st->vmu);
            continue;
        }
        pthread_mutex_unlock(&st->vmu);
        if (verify_work(rq, rq->ctx)) atomic_fetch_add(&st->n_vworker, 1);
        pthread_mutex_lock(&st->vmu);
    }
    pthread_mutex_unlock(&st->vmu);
    return NULL;
}

static void verify_workers_start(kvl_store *st) {
    pthread_mutex_init(&st->vmu, NULL);
    pthread_cond_init(&st->vcond, NULL);
    int n = st->opt.verify_threads;
    if (n == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n = cpus > 1 ? (int)(cpus - 1 < 4 ? cpus - 1 : 4) : 0;
    }
    if (n > 8) n = 8;
    for (int i = 0; i < n; i++)
        if (pthread_create(&st->vthreads[st->nvthreads], NULL, verify_worker, st) == 0) st->nvthreads++;
}

static void verify_workers_stop(kvl_store *st) {
    pthread_mutex_lock(&st->vmu);
    st->vstop = 1;
    pthread_cond_broadcast(&st->vcond);
    pthread_mutex_unlock(&st->vmu);
    for (int i = 0; i < st->nvthreads; i++) pthread_join(st->vthreads[i], NULL);
    st->nvthreads = 0;
    pthread_mutex_destroy(&st->vmu);
    pthread_cond_destroy(&st->vcond);
}

/* reads and verifies the extents of recs (already pinned by the caller) */
kvl_status kvl_read_verify(kvl_store *st, size_t n, const kvl_rec *recs, kvl_store_value **out, kvl_status *status) {
    return kvl_read_verify_stream(st, n, recs, out, status, NULL, NULL, NULL);
}

kvl_status kvl_read_verify_stream(kvl_store *st, size_t n, const kvl_rec *recs, kvl_store_value **out, kvl_status *status,
                                  kvl_store_stream_fn fn, void *fn_ctx, const size_t *fn_idx) {
    kvl_ioreq *rq = calloc(n ? n : 1, sizeof *rq);
    char (*msg)[160] = calloc(n ? n : 1, sizeof *msg);
    vstate *vs = calloc(n ? n : 1, sizeof *vs);
    if (!rq || !msg || !vs) {
        free(rq);
        free(msg);
        free(vs);
        return kvl_errorf(KVL_ERR_NOMEM, "read batch");
    }
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) total += recs[i].ext_len;
    /* workers pay off when there are several big values to checksum */
    int parallel = st->nvthreads > 0 && n >= 2 && total >= (256u << 10);
    verify_ctx ctx = {.st = st, .recs = recs, .out = out, .status = status, .vs = vs, .msg = msg, .parallel = parallel,
                      .fn = fn, .fn_ctx = fn_ctx, .fn_idx = fn_idx};
    pthread_mutex_init(&ctx.mu, NULL);
    pthread_cond_init(&ctx.cv, NULL);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        out[i] = NULL;
        status[i] = KVL_OK;
        kvl_store_value *v = calloc(1, sizeof *v);
        size_t cap = 0;
        void *buf = v ? kvl_bufpool_get(st->pool, recs[i].ext_len, &cap) : NULL;
        if (!buf) {
            free(v);
            status[i] = KVL_ERR_NOMEM;
            snprintf(msg[i], sizeof msg[i], "read buffer of %llu bytes", (unsigned long long)recs[i].ext_len);
            continue;
        }
        v->buf = buf;
        v->buf_len = recs[i].ext_len;
        v->buf_cap = cap;
        v->pool = st->pool;
        atomic_fetch_add(&st->pool->refs, 1);
        atomic_init(&v->refs, 1);
        out[i] = v;
        rq[m++] = (kvl_ioreq){.fd = st->segs[recs[i].seg].fd, .buf = buf, .off = recs[i].off, .len = recs[i].ext_len,
                              .done = verify_done, .progress = verify_progress, .ctx = &ctx, .tag = i};
    }
    ctx.left = m;
    kvl_io_run_order(st, rq, m, fn != NULL);
    /* help with the queue, then wait for what the workers still hold */
    for (;;) {
        pthread_mutex_lock(&ctx.mu);
        size_t left = ctx.left;
        pthread_mutex_unlock(&ctx.mu);
        if (!left) break;
        pthread_mutex_lock(&st->vmu);
        kvl_ioreq *j = parallel ? vq_pop_locked(st) : NULL;
        pthread_mutex_unlock(&st->vmu);
        if (j) {
            verify_work(j, j->ctx);
            continue;
        }
        pthread_mutex_lock(&ctx.mu);
        while (ctx.left) pthread_cond_wait(&ctx.cv, &ctx.mu);
        pthread_mutex_unlock(&ctx.mu);
        break;
    }
    for (size_t i = 0; i < n; i++)
        if (status[i] != KVL_OK) {
            kvl_errorf(status[i], "%s", msg[i]); /* the first failure's detail, on the caller's thread */
            break;
        }
    for (size_t i = 0; i < n; i++) XXH3_freeState(vs[i].xs);
    pthread_mutex_destroy(&ctx.mu);
    pthread_cond_destroy(&ctx.cv);
    free(rq);
    free(msg);
    free(vs);
    return KVL_OK;
}

kvl_status kvl_store_get_batch(kvl_store *st, size_t n, const kvl_store_key *keys, const uint8_t *expect_fp,
                               kvl_store_value **out, kvl_status *status) {
    return kvl_store_get_batch_stream(st, n, keys, expect_fp, out, status, NULL, NULL);
}

kvl_status kvl_store_get_batch_stream(kvl_store *st, size_t n, const kvl_store_key *keys, const uint8_t *expect_fp,
                                      kvl_store_value **out, kvl_status *status, kvl_store_stream_fn fn, void *fn_ctx) {
    if (!st || (n && (!keys || !out || !status))) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_get_batch: NULL argument");
    kvl_rec *rd = malloc((n ? n : 1) * sizeof *rd);
    size_t *idx = malloc((n ? n : 1) * sizeof *idx);
    kvl_store_value **tmp = malloc((n ? n : 1) * sizeof *tmp);
    kvl_status *tst = malloc((n ? n : 1) * sizeof *tst);
    uint8_t *dram = calloc(n ? n : 1, 1);
    if (!rd || !idx || !tmp || !tst || !dram) {
        free(rd);
        free(idx);
        free(tmp);
        free(tst);
        free(dram);
        return kvl_errorf(KVL_ERR_NOMEM, "get batch");
    }
    size_t m = 0;
    uint64_t now = kvl_now_ns();
    for (size_t i = 0; i < n; i++) {
        out[i] = NULL;
        kvl_shard *sh = kvl_shard_of(st, &keys[i]);
        pthread_mutex_lock(&sh->mu);
        kvl_rec *r = kvl_shard_find(sh, &keys[i]);
        if (!r || (r->expires_ns && r->expires_ns <= now)) {
            status[i] = KVL_ERR_KEY_NOT_FOUND;
        } else if (expect_fp && memcmp(expect_fp, r->fp, 32) != 0) {
            status[i] = KVL_ERR_FINGERPRINT;
        } else {
            r->last_access_ns = now;
            r->hits++;
            r->dirty = 1;
            status[i] = KVL_OK;
            out[i] = cache_get(st, &keys[i], r->generation);
            if (out[i]) {
                /* the cached copy's metadata is from its read; refresh the access fields */
                dram[i] = 1;
            } else {
                /* pinned under the shard lock: a delete/evict that follows cannot free the extent
                 * while we read it */
                kvl_pin_ext(st, r->seg, r->off, r->ext_len);
                rd[m] = *r;
                idx[m++] = i;
            }
        }
        pthread_mutex_unlock(&sh->mu);
    }
    /* DRAM-tier hits are complete (and verified when they were read): tell a streaming caller first */
    for (size_t i = 0; fn && i < n; i++)
        if (dram[i]) fn(fn_ctx, i, kvl_store_value_data(out[i]), kvl_store_value_size(out[i]), kvl_store_value_size(out[i]));
    kvl_read_verify_stream(st, m, rd, tmp, tst, fn, fn_ctx, idx);
    for (size_t j = 0; j < m; j++) {
        kvl_unpin_ext(st, rd[j].seg, rd[j].off);
        out[idx[j]] = tmp[j];
        status[idx[j]] = tst[j];
        if (tmp[j] && tst[j] == KVL_OK) cache_put(st, &rd[j].key, rd[j].generation, tmp[j]);
    }
    uint64_t hits = 0;
    for (size_t i = 0; i < n; i++) hits += status[i] == KVL_OK;
    atomic_fetch_add(&st->n_gets, n);
    atomic_fetch_add(&st->n_hits, hits);
    atomic_fetch_add(&st->n_miss, n - hits);
    free(rd);
    free(idx);
    free(tmp);
    free(tst);
    free(dram);
    return KVL_OK;
}

kvl_status kvl_store_get(kvl_store *st, const kvl_store_key *key, const uint8_t *expect_fp, kvl_store_value **out) {
    if (!st || !key || !out) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_get: NULL argument");
    kvl_status s;
    KVL_TRY(kvl_store_get_batch(st, 1, key, expect_fp, out, &s));
    if (s == KVL_ERR_KEY_NOT_FOUND) {
        char hex[65];
        return kvl_errorf(s, "no entry %s", kvl_store_key_hex(key, hex));
    }
    if (s == KVL_ERR_FINGERPRINT) return kvl_errorf(s, "entry belongs to another model fingerprint");
    return s;
}

const void *kvl_store_value_data(const kvl_store_value *v) { return v ? v->data : NULL; }
size_t kvl_store_value_size(const kvl_store_value *v) { return v ? v->meta.value_bytes : 0; }
const int32_t *kvl_store_value_tokens(const kvl_store_value *v) { return v ? v->tokens : NULL; }
size_t kvl_store_value_n_tokens(const kvl_store_value *v) { return v ? v->meta.n_tokens : 0; }
const kvl_store_meta *kvl_store_value_meta(const kvl_store_value *v) { return v ? &v->meta : NULL; }

kvl_status kvl_store_stat(kvl_store *st, const kvl_store_key *key, kvl_store_meta *meta) {
    if (!st || !key) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_stat: NULL argument");
    kvl_shard *sh = kvl_shard_of(st, key);
    uint64_t now = kvl_now_ns();
    pthread_mutex_lock(&sh->mu);
    kvl_rec *r = kvl_shard_find(sh, key);
    kvl_status s = KVL_OK;
    if (!r || (r->expires_ns && r->expires_ns <= now)) s = KVL_ERR_KEY_NOT_FOUND;
    else if (meta) kvl_rec_to_meta(st, r, meta);
    pthread_mutex_unlock(&sh->mu);
    return s;
}

kvl_status kvl_store_delete(kvl_store *st, const kvl_store_key *key) {
    if (!st || !key) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_delete: NULL argument");
    if (st->opt.read_only) return kvl_errorf(KVL_ERR_PERMISSION, "store opened read-only");
    kvl_shard *sh = kvl_shard_of(st, key);
    pthread_mutex_lock(&sh->mu);
    kvl_rec *r = kvl_shard_find(sh, key);
    if (!r) {
        pthread_mutex_unlock(&sh->mu);
        char hex[65];
        return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "no entry %s", kvl_store_key_hex(key, hex));
    }
    kvl_rec old = *r;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    rocksdb_writebatch_delete_cf(wb, st->cf[CF_ENTRIES], (const char *)key->b, 32);
    cf_put_ext(st, wb, CF_PENDING, r->seg, r->off, r->ext_len);
    kvl_log_append(st, wb, "delete", key, kvl_tenant_name(st, r->tenant), r->ext_len, "");
    kvl_status s = kvl_db_write(st, wb, 1);
    rocksdb_writebatch_destroy(wb);
    if (s == KVL_OK) {
        shard_del(sh, r);
        tenant_add(st, old.tenant, -(int64_t)old.ext_len, -1);
        atomic_fetch_add(&st->pending, old.ext_len);
    }
    pthread_mutex_unlock(&sh->mu);
    if (s != KVL_OK) return s;
    cache_drop(st, key);
    release_ext(st, old.seg, old.off, old.ext_len);
    atomic_fetch_add(&st->n_dels, 1);
    return KVL_OK;
}

kvl_status kvl_store_longest_prefix(kvl_store *st, const kvl_store_key *root, const int32_t *tokens, size_t n_tokens,
                                    size_t block_tokens, size_t *n_blocks, kvl_store_key *last) {
    if (!st || !root || !n_blocks || (n_tokens && !tokens) || !block_tokens)
        return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_longest_prefix: bad argument");
    kvl_store_key cur = *root, next;
    size_t nb = 0;
    for (size_t pos = 0; pos + block_tokens <= n_tokens; pos += block_tokens) {
        kvl_store_prefix_key(&cur, tokens + pos, block_tokens, &next);
        if (kvl_store_stat(st, &next, NULL) != KVL_OK) break;
        cur = next;
        nb++;
    }
    *n_blocks = nb;
    if (last) *last = cur;
    return KVL_OK;
}

/* ------------------------------------------------------------------ stats, flush, foreach */

kvl_status kvl_store_get_stats(kvl_store *st, kvl_store_stats *o) {
    if (!st || !o) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_get_stats: NULL argument");
    memset(o, 0, sizeof *o);
    for (int i = 0; i < KVL_NSHARDS; i++) {
        pthread_mutex_lock(&st->shards[i].mu);
        o->entries += st->shards[i].n;
        pthread_mutex_unlock(&st->shards[i].mu);
    }
    pthread_mutex_lock(&st->amu);
    o->segments = (uint32_t)st->nsegs;
    for (size_t i = 0; i < st->nsegs; i++) {
        o->free_bytes += st->segs[i].free_bytes;
        o->fenced_segments += st->segs[i].fenced != 0;
    }
    o->capacity_bytes = st->capacity;
    pthread_mutex_unlock(&st->amu);
    o->used_bytes = atomic_load(&st->used);
    o->pending_bytes = atomic_load(&st->pending);
    o->segment_bytes = st->seg_bytes;
    o->puts = atomic_load(&st->n_puts);
    o->gets = atomic_load(&st->n_gets);
    o->get_hits = atomic_load(&st->n_hits);
    o->get_misses = atomic_load(&st->n_miss);
    o->deletes = atomic_load(&st->n_dels);
    o->evictions = atomic_load(&st->n_evict);
    o->evicted_bytes = atomic_load(&st->b_evict);
    o->corrupt_reads = atomic_load(&st->n_corrupt);
    pthread_mutex_lock(&st->cache.mu);
    o->cache_hits = st->cache.hits;
    o->cache_bytes = st->cache.bytes;
    o->cache_entries = st->cache.n;
    o->cache_budget = st->cache.budget;
    pthread_mutex_unlock(&st->cache.mu);
    o->recovered_extents = st->rec_extents;
    o->recovered_bytes = st->rec_bytes;
    o->open_ns = st->open_ns;
    o->index_from_snapshot = st->from_snapshot;
    o->verify_threads = st->nvthreads;
    o->worker_verified = atomic_load(&st->n_vworker);
    snprintf(o->io_backend, sizeof o->io_backend, "%s", st->uring ? "io_uring" : "pread");
    snprintf(o->io_detail, sizeof o->io_detail, "%s", st->io_detail);
    o->registered_buffers = st->uring && st->fixed_ok;
    o->read_only = st->opt.read_only;
    o->policy = st->opt.policy;
    return KVL_OK;
}

kvl_status kvl_store_flush(kvl_store *st) {
    if (!st) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_flush: NULL");
    if (st->opt.read_only) return KVL_OK;
    kvl_status s = KVL_OK;
    for (int i = 0; i < KVL_NSHARDS && s == KVL_OK; i++) {
        kvl_shard *sh = &st->shards[i];
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        pthread_mutex_lock(&sh->mu);
        size_t nd = 0;
        for (size_t j = 0; j < sh->cap; j++) {
            kvl_rec *r = &sh->slots[j];
            if (!r->state || !r->dirty) continue;
            uint8_t rb[KVL_ENTRY_REC_BYTES];
            kvl_rec_encode(r, st, rb);
            rocksdb_writebatch_put_cf(wb, st->cf[CF_ENTRIES], (const char *)r->key.b, 32, (const char *)rb, sizeof rb);
            r->dirty = 0;
            nd++;
        }
        /* unsynced and under the shard lock: ordered before any later delete of these keys */
        if (nd) s = kvl_db_write(st, wb, 0);
        pthread_mutex_unlock(&sh->mu);
        rocksdb_writebatch_destroy(wb);
    }
    return s;
}

static int meta_key_cmp(const void *a, const void *b) { return memcmp(((const kvl_rec *)a)->key.b, ((const kvl_rec *)b)->key.b, 32); }

kvl_status kvl_store_foreach(kvl_store *st, const char *tenant,
                             int (*fn)(const kvl_store_key *, const kvl_store_meta *, void *), void *ctx) {
    if (!st || !fn) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_foreach: NULL argument");
    size_t n = 0, cap = 0;
    kvl_rec *all = NULL;
    uint64_t now = kvl_now_ns();
    kvl_lock_all(st);
    for (int i = 0; i < KVL_NSHARDS; i++) cap += st->shards[i].n;
    all = malloc((cap ? cap : 1) * sizeof *all);
    if (all)
        for (int i = 0; i < KVL_NSHARDS; i++)
            for (size_t j = 0; j < st->shards[i].cap; j++) {
                kvl_rec *r = &st->shards[i].slots[j];
                if (!r->state || (r->expires_ns && r->expires_ns <= now)) continue;
                if (tenant && strcmp(kvl_tenant_name(st, r->tenant), tenant) != 0) continue;
                all[n++] = *r;
            }
    kvl_unlock_all(st);
    if (!all) return kvl_errorf(KVL_ERR_NOMEM, "foreach snapshot");
    qsort(all, n, sizeof *all, meta_key_cmp);
    for (size_t i = 0; i < n; i++) {
        kvl_store_meta m;
        kvl_rec_to_meta(st, &all[i], &m);
        if (fn(&all[i].key, &m, ctx)) break;
    }
    free(all);
    return KVL_OK;
}

kvl_status kvl_store_test_flip(kvl_store *st, const kvl_store_key *key, uint64_t offset) {
    if (!st || !key) return kvl_errorf(KVL_ERR_INVALID_ARG, "kvl_store_test_flip: NULL argument");
    kvl_shard *sh = kvl_shard_of(st, key);
    pthread_mutex_lock(&sh->mu);
    kvl_rec *r = kvl_shard_find(sh, key);
    kvl_rec c = r ? *r : (kvl_rec){0};
    pthread_mutex_unlock(&sh->mu);
    if (!r) return kvl_errorf(KVL_ERR_KEY_NOT_FOUND, "flip: no such entry");
    if (offset >= c.ext_len) return kvl_errorf(KVL_ERR_RANGE, "flip: offset beyond the extent");
    void *b = NULL;
    if (posix_memalign(&b, KVL_BLOCK, KVL_BLOCK)) return kvl_errorf(KVL_ERR_NOMEM, "flip");
    uint64_t blk = c.off + offset / KVL_BLOCK * KVL_BLOCK;
    int fd = st->segs[c.seg].fd;
    kvl_status s = KVL_OK;
    if (pread(fd, b, KVL_BLOCK, (off_t)blk) != KVL_BLOCK) s = io_status(errno, "flip read");
    else {
        ((uint8_t *)b)[offset % KVL_BLOCK] ^= 0x5a;
        if (pwrite(fd, b, KVL_BLOCK, (off_t)blk) != KVL_BLOCK || fdatasync(fd)) s = io_status(errno, "flip write");
    }
    free(b);
    cache_drop(st, key);
    return s;
}
