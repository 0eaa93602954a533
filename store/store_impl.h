/* store_impl.h - private structures of the chunk store (see api/kvl_store.h, docs/store-format.md).
 *
 * Extent ownership is the core invariant: every block of every segment after the superblock is in
 * exactly one of three states, each recorded in RocksDB: FREE (cf "free"), PENDING (cf "pending":
 * allocated to an in-flight put, or released by a delete while a reader still holds it) or owned by
 * an ENTRY (cf "entries"). Every RocksDB write batch moves extents between these states atomically,
 * so any prefix of the write-ahead log is a consistent store; recovery turns all PENDING into FREE.
 * Batches that take an extent away from an entry are synced before the extent can be reused.
 */
#ifndef KVL_STORE_IMPL_H
#define KVL_STORE_IMPL_H

#include <liburing.h>
#include <pthread.h>
#include <rocksdb/c.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kvl_store.h"

#define KVL_STORE_FORMAT_VERSION 1
#define KVL_BLOCK 4096u             /* O_DIRECT alignment and allocation unit */
#define KVL_SEG_HDR 4096u           /* segment superblock */
#define KVL_EXT_HDR 256u            /* extent header at the start of every extent */
#define KVL_ENTRY_REC_BYTES 232u    /* serialized entry record (v1) */
#define KVL_NSHARDS 64
#define KVL_MAX_SEGS 4096         /* fixed arrays: readers index them without the allocator lock */
#define KVL_MAX_TENANTS 4096
#define KVL_LOG_KEEP 1000000u /* a clean close trims the audit log to its newest records */
#define KVL_NRINGS 4
#define KVL_IO_PIECE (1u << 20)     /* large reads/writes are split into pieces of this size */
#define KVL_STAGE_BYTES (4u << 20)  /* registered staging buffer per ring */
#define KVL_HUGE_BYTES (2u << 20)   /* transparent huge page size on x86-64 / arm64 4K kernels */

enum { CF_DEFAULT = 0, CF_ENTRIES, CF_FREE, CF_PENDING, CF_TENANTS, CF_LOG, CF_COUNT };

static inline uint64_t kvl_round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* ---- little-endian serialization helpers */
static inline void kvl_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void kvl_put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kvl_put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t kvl_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t kvl_get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static inline uint64_t kvl_get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
/* big-endian keys so RocksDB's bytewise order is numeric order */
static inline void kvl_put32be(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}
static inline void kvl_put64be(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}
static inline uint32_t kvl_get32be(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t kvl_get64be(const uint8_t *p) {
    return ((uint64_t)kvl_get32be(p) << 32) | kvl_get32be(p + 4);
}

/* ---- in-memory index record (mirror of one cf "entries" record plus access statistics) */
typedef struct kvl_rec {
    kvl_store_key key;
    uint8_t fp[KVL_STORE_FP_BYTES];
    uint64_t off, ext_len, value_len, checksum, generation, created_ns, expires_ns, cost;
    uint64_t last_access_ns, hits;
    uint32_t seg, n_tokens, tenant; /* tenant: index into kvl_store.tenants */
    uint16_t codec_id, codec_level;
    uint8_t mode, state; /* state: 0 empty, 1 live */
    uint8_t dirty;       /* access statistics not yet persisted */
} kvl_rec;

typedef struct kvl_shard {
    pthread_mutex_t mu;
    kvl_rec *slots; /* open addressing, linear probing, backward-shift deletion */
    size_t cap, n;
} kvl_shard;

typedef struct kvl_tenant {
    char name[KVL_STORE_TENANT_MAX + 1];
    uint64_t used, count, quota;
} kvl_tenant;

typedef struct kvl_ext {
    uint64_t off, len;
} kvl_ext;

typedef struct kvl_seg {
    int fd;
    uint32_t id;
    uint64_t size;
    int fenced;
    kvl_ext *free; /* sorted by offset, coalesced */
    size_t nfree, capfree;
    uint64_t free_bytes;
} kvl_seg;

typedef struct kvl_pin {
    uint32_t seg;
    uint64_t off, len;
    uint32_t count;
    int release; /* the owner let go while pinned: release to FREE when count drops to 0 */
} kvl_pin;

typedef struct kvl_ring {
    pthread_mutex_t mu;
    struct io_uring ring;
    void *stage; /* KVL_STAGE_BYTES, registered as fixed buffer 0 when fixed = 1 */
    int fixed;
} kvl_ring;

typedef struct kvl_ioreq kvl_ioreq;
typedef struct kvl_centry kvl_centry;
struct kvl_centry {
    kvl_store_key key;
    uint64_t generation;
    kvl_store_value *v;
    kvl_centry *prev, *next; /* LRU list, head = most recent */
    kvl_centry *hnext;       /* hash chain */
};

typedef struct kvl_cache {
    pthread_mutex_t mu;
    kvl_centry **buckets;
    size_t nbuckets, n;
    kvl_centry *head, *tail;
    uint64_t bytes, budget, hits;
} kvl_cache;

/* Reuses large aligned read buffers: fresh memory costs a page fault + zeroing per 4 KiB, which at
 * GB/s is as much as the read itself. Shared by the store and its values (refcounted), so values
 * may outlive the store. */
typedef struct kvl_pbuf kvl_pbuf;
struct kvl_pbuf {
    kvl_pbuf *next;
    size_t cap;
};
typedef struct kvl_bufpool {
    pthread_mutex_t mu;
    atomic_int refs;
    kvl_pbuf *free; /* LIFO; small lists in practice (bounded by max bytes) */
    uint64_t bytes, max, reused, allocated;
} kvl_bufpool;
kvl_bufpool *kvl_bufpool_create(uint64_t max_bytes);
void kvl_bufpool_unref(kvl_bufpool *p);
void *kvl_bufpool_get(kvl_bufpool *p, size_t len, size_t *cap);
void kvl_bufpool_put(kvl_bufpool *p, void *buf, size_t cap);
/* An O_DIRECT-aligned buffer of len bytes (free() it); from KVL_HUGE_BYTES up, 2 MiB aligned and
 * advised onto transparent huge pages (see io.c for why). NULL when out of memory. */
void *kvl_io_buf_alloc(size_t len);

struct kvl_store_value {
    atomic_int refs;
    kvl_bufpool *pool; /* buf returns here (NULL: free()) */
    size_t buf_cap;
    void *buf; /* aligned, owns header + tokens + value */
    size_t buf_len;
    const int32_t *tokens;
    const uint8_t *data;
    kvl_store_meta meta;
};

struct kvl_store {
    char *dir;
    kvl_store_options opt;
    rocksdb_t *db;
    rocksdb_options_t *dbopt;
    rocksdb_column_family_handle_t *cf[CF_COUNT];
    rocksdb_writeoptions_t *wsync, *wnosync;
    rocksdb_readoptions_t *ropt;

    kvl_shard shards[KVL_NSHARDS];

    pthread_mutex_t tmu; /* tenants */
    kvl_tenant *tenants; /* KVL_MAX_TENANTS, never moves: names stay valid without tmu */
    size_t ntenants;

    pthread_mutex_t amu; /* allocator: segments, free lists, pins, free/pending cf writes */
    kvl_seg *segs; /* KVL_MAX_SEGS, never moves; a segment's fd and size never change once published */
    size_t nsegs;
    kvl_pin *pins;
    size_t npins, cappins;
    uint64_t seg_bytes, capacity;
    atomic_uint_fast64_t used;    /* bytes allocated: entries + pending */
    atomic_uint_fast64_t pending; /* bytes in PENDING */
    pthread_mutex_t evmu;         /* one eviction run at a time */

    kvl_ring rings[KVL_NRINGS];
    int nrings, uring, fixed_ok;
    char io_detail[160];
    atomic_uint ring_rr;

    kvl_cache cache;
    kvl_bufpool *pool;

    /* verification workers: completed reads of a large batch are checksummed in parallel */
    pthread_t vthreads[8];
    int nvthreads, vstop, vstarted;
    pthread_mutex_t vmu;
    pthread_cond_t vcond;
    kvl_ioreq *vq_head, *vq_tail;

    atomic_uint_fast64_t gen, logseq;
    atomic_uint_fast64_t n_vworker; /* verifications done by worker threads */
    atomic_uint_fast64_t n_puts, n_gets, n_hits, n_miss, n_dels, n_evict, b_evict, n_corrupt;
    uint64_t rec_extents, rec_bytes, open_ns;
    int from_snapshot; /* the index came from index.snap at open */

    pthread_mutex_t fmu; /* fault injection */
    kvl_store_fault fault;
    int fault_count;
};

/* ---- io.c */
kvl_status kvl_io_init(kvl_store *st);
void kvl_io_free(kvl_store *st);
struct kvl_ioreq {
    int fd, write, fixed;
    void *buf;
    uint64_t off;
    size_t len;
    int err; /* errno of the first failure, 0 if none */
    /* optional: called on the submitting thread as soon as this request is complete, while the
     * others are still in flight (so checksums overlap the I/O) */
    void (*done)(kvl_ioreq *req, void *ctx);
    /* optional: called on the submitting thread whenever the completed prefix [0, ready) of a read
     * grows (pieces finish roughly in order), so the caller can checksum a large value piece by
     * piece while the rest of it is still in flight; not called for failed pieces (done is) */
    void (*progress)(kvl_ioreq *req, size_t ready, void *ctx);
    void *ctx;
    size_t tag;
    size_t left;      /* internal: pieces outstanding */
    size_t first;     /* internal: index of its first piece */
    size_t nready;    /* internal: pieces of its completed prefix */
    kvl_ioreq *qnext; /* internal: verification queue link */
};
/* Runs all requests with up to queue_depth pieces in flight; per-request errors in req[i].err. */
void kvl_io_run(kvl_store *st, kvl_ioreq *req, size_t n);
/* Same; interleave = 1 submits piece j of every request before piece j + 1 of any (reads that a
 * caller consumes progressively, value by value prefix). */
void kvl_io_run_order(kvl_store *st, kvl_ioreq *req, size_t n, int interleave);
/* Grabs a ring's registered staging buffer (or NULL): returned locked; kvl_io_stage_put unlocks. */
kvl_ring *kvl_io_stage_get(kvl_store *st);
void kvl_io_stage_put(kvl_ring *r);
/* Runs one write through r's fixed buffer (r locked by the caller). */
int kvl_io_write_fixed(kvl_store *st, kvl_ring *r, int fd, size_t len, uint64_t off);
/* Applies armed fault injection to a data write of len bytes; returns errno to fail with, 0 to go on;
 * *torn_len is set to the bytes to actually write when a torn write is armed. */
int kvl_fault_write(kvl_store *st, size_t len, size_t *torn_len);
int kvl_fault_fsync(kvl_store *st);

/* ---- keys / formats (format.c) */
void kvl_rec_encode(const kvl_rec *r, const kvl_store *st, uint8_t *out); /* KVL_ENTRY_REC_BYTES */
kvl_status kvl_rec_decode(const uint8_t *p, size_t n, kvl_rec *r, char tenant[KVL_STORE_TENANT_MAX + 1]);
/* Extent header: encode into hdr[KVL_EXT_HDR]; verify checks magic, version, header checksum. */
void kvl_ext_hdr_encode(uint8_t *hdr, const kvl_rec *r, const char *tenant);
kvl_status kvl_ext_hdr_check(const uint8_t *hdr, const kvl_rec *r);
uint64_t kvl_payload_sum(const int32_t *tokens, size_t n_tokens, const void *value, size_t len);
void kvl_rec_to_meta(const kvl_store *st, const kvl_rec *r, kvl_store_meta *m);

/* ---- store.c internals shared with audit.c */
kvl_shard *kvl_shard_of(kvl_store *st, const kvl_store_key *k);
kvl_rec *kvl_shard_find(kvl_shard *sh, const kvl_store_key *k);
void kvl_pin_ext(kvl_store *st, uint32_t seg, uint64_t off, uint64_t len);
void kvl_unpin_ext(kvl_store *st, uint32_t seg, uint64_t off);
kvl_status kvl_read_verify(kvl_store *st, size_t n, const kvl_rec *recs, kvl_store_value **out,
                           kvl_status *status);
/* Same, telling fn (kvl_store_get_batch_stream) about value prefixes as they arrive; fn_idx maps
 * rec i to the caller's item index (NULL: identity). Failed values stay in out[] for the caller. */
kvl_status kvl_read_verify_stream(kvl_store *st, size_t n, const kvl_rec *recs, kvl_store_value **out, kvl_status *status,
                                  kvl_store_stream_fn fn, void *fn_ctx, const size_t *fn_idx);
void kvl_log_append(kvl_store *st, rocksdb_writebatch_t *wb, const char *op, const kvl_store_key *key,
                    const char *tenant, uint64_t bytes, const char *detail);
kvl_status kvl_db_write(kvl_store *st, rocksdb_writebatch_t *wb, int sync);
uint64_t kvl_now_ns(void);
void kvl_lock_all(kvl_store *st);   /* every shard lock, ascending */
void kvl_unlock_all(kvl_store *st);
/* deletes log records older than the newest keep (unsynced); returns how many sequence numbers went */
uint64_t kvl_store_trim_log(kvl_store *st, uint64_t keep);

const char *kvl_tenant_name(kvl_store *st, uint32_t idx);

#endif
