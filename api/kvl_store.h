/* kvl_store.h - the persistent chunk store: encoded chunk caches on NVMe, given back fast, across
 * crashes, never wrong bytes.
 *
 * A store is a directory holding a RocksDB index (index/) and a few large preallocated segment
 * files (seg-NNNNN.kvs) read and written with O_DIRECT through io_uring. Values are opaque byte
 * blobs (encoded chunks) plus metadata; the store knows models only through an opaque 32-byte
 * fingerprint. The on-disk format is specified in docs/store-format.md.
 *
 * Keys are 32-byte SHA-256 values derived hierarchically (BRIEF section 3):
 *   root   = H("kvloom-v1" | fingerprint | tenant)
 *   chunk  = H(root | "chunk" | LE token ids)          position-independent, for blending
 *   prefix = H(prev | LE token ids of the block)       chain starting at prev = root
 * Use the key functions below so every module derives identical keys.
 *
 * Durability: kvl_store_put returns KVL_OK only after the data was written with O_DIRECT,
 * fdatasync'd, and the index entry committed by a synced RocksDB write. A crash at any point leaves
 * either the old state or the new one; space written but never committed is reclaimed on open.
 *
 * Thread safety: every kvl_store_* function taking a kvl_store* is safe to call from many threads
 * at once on one handle, except kvl_store_close. A kvl_store_value is immutable and may be read by
 * many threads; kvl_store_value_free must be called once per reference obtained.
 */
#ifndef KVL_STORE_H
#define KVL_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "kvl_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVL_STORE_KEY_BYTES 32
#define KVL_STORE_FP_BYTES 32
#define KVL_STORE_TENANT_MAX 63 /* bytes of a tenant name, without the NUL */

typedef struct kvl_store kvl_store;             /* an open store; opaque */
typedef struct kvl_store_value kvl_store_value; /* a verified value read from the store; opaque */

typedef struct kvl_store_key {
    uint8_t b[KVL_STORE_KEY_BYTES];
} kvl_store_key;

/* ---- keys (pure functions, thread-safe, never fail) */

/* root = SHA-256("kvloom-v1" | fingerprint[32] | tenant bytes). tenant may be NULL (= ""). */
void kvl_store_root_key(const uint8_t fingerprint[KVL_STORE_FP_BYTES], const char *tenant,
                        kvl_store_key *out);
/* chunk key = SHA-256(root | "chunk" | token ids as little-endian int32). */
void kvl_store_chunk_key(const kvl_store_key *root, const int32_t *tokens, size_t n_tokens,
                         kvl_store_key *out);
/* prefix key = SHA-256(prev | token ids of this block as little-endian int32); prev is the root for
 * the first block, the previous block's prefix key after that. */
void kvl_store_prefix_key(const kvl_store_key *prev, const int32_t *tokens, size_t n_tokens,
                          kvl_store_key *out);
/* Lowercase hex (64 chars + NUL) of a key into hex[65]; returns hex. */
char *kvl_store_key_hex(const kvl_store_key *key, char hex[65]);
/* Parses 64 hex characters. KVL_ERR_INVALID_ARG if malformed. */
kvl_status kvl_store_key_parse(const char *hex, kvl_store_key *out);

/* ---- options */

typedef enum kvl_store_policy {
    KVL_STORE_EVICT_LRU = 0,  /* least recently used first */
    KVL_STORE_EVICT_COST = 1, /* smallest hits x recompute cost per byte first, then LRU */
} kvl_store_policy;

typedef enum kvl_store_mode {
    KVL_STORE_MODE_CHUNK = 0,  /* position-independent chunk cache (blending) */
    KVL_STORE_MODE_PREFIX = 1, /* exact prefix cache (prefix-chain key) */
} kvl_store_mode;

typedef struct kvl_store_options {
    int create;               /* create the store if the directory holds none (default 1) */
    int read_only;            /* open without writing anything (admin inspection; default 0) */
    uint64_t capacity_bytes;  /* limit on stored extent bytes; 0 = keep the stored setting
                                 (1 GiB for a new store) */
    uint64_t segment_bytes;   /* size of each segment file, new stores only (default 1 GiB) */
    uint64_t cache_bytes;     /* DRAM cache tier budget (default 256 MiB; 0 disables) */
    kvl_store_policy policy;  /* capacity eviction policy (default LRU) */
    uint64_t default_ttl_s;   /* TTL for puts that give none; 0 = no expiry (default) */
    int queue_depth;          /* io_uring reads/writes in flight per batch (default 64) */
    int stream_queue_depth;   /* 1 MiB reads in flight for streaming gets (default 16): fewer than a
                                 bulk read, because the first bytes of every value matter more
                                 than the last percent of bandwidth (the disk serves the
                                 requests in flight together, so the first one lands after about
                                 depth MiB / bandwidth) */
    int no_uring;             /* 1: use pread/pwrite instead of io_uring (reported in stats) */
    int load_threads;         /* threads that load the index at open; 0 = number of CPUs */
    uint64_t buffer_pool_bytes; /* freed read buffers kept for reuse (default 256 MiB; 0 = none) */
    int verify_threads;       /* threads that checksum batched reads besides the caller;
                                 0 = min(CPUs - 1, 4), -1 = none (the caller verifies alone) */
} kvl_store_options;

/* Fills the defaults documented above. */
void kvl_store_options_default(kvl_store_options *opt);

/* ---- open / close */

/* Opens (or creates) the store in dir and runs recovery. opt may be NULL for the defaults.
 * On success *out owns the store; free it with kvl_store_close. Errors: KVL_ERR_NOT_FOUND (no store
 * and create=0), KVL_ERR_VERSION / KVL_ERR_MAGIC (not a store of this version), KVL_ERR_DB,
 * KVL_ERR_UNSUPPORTED (filesystem without O_DIRECT), KVL_ERR_IO. Not thread-safe with itself on
 * the same directory (RocksDB's lock refuses a second opener: KVL_ERR_BUSY). */
kvl_status kvl_store_open(const char *dir, const kvl_store_options *opt, kvl_store **out);

/* Flushes access statistics and closes. Accepts NULL. No other call may be in flight. */
void kvl_store_close(kvl_store *st);

/* ---- metadata of an entry */

typedef struct kvl_store_meta {
    /* given at put */
    uint8_t fingerprint[KVL_STORE_FP_BYTES]; /* model fingerprint the value belongs to */
    char tenant[KVL_STORE_TENANT_MAX + 1];   /* tenant name, NUL-terminated */
    uint16_t codec_id;                       /* opaque to the store */
    uint16_t codec_level;                    /* opaque to the store */
    uint8_t mode;                            /* kvl_store_mode */
    uint64_t recompute_cost;                 /* cost of recomputing (cost-aware eviction);
                                                0 = use the token count */
    uint64_t ttl_s;                          /* 0 = the store's default TTL */
    /* filled by the store (ignored at put) */
    uint32_t n_tokens;
    uint64_t value_bytes;
    uint64_t extent_bytes;   /* bytes the entry occupies on disk */
    uint64_t created_ns;     /* CLOCK_REALTIME */
    uint64_t last_access_ns; /* CLOCK_REALTIME; 0 = never read */
    uint64_t hits;
    uint64_t expires_ns;     /* 0 = never */
    uint64_t generation;     /* unique per put, increasing */
    uint32_t segment;
    uint64_t offset;
    uint64_t checksum;       /* xxh3-64 of tokens + value */
} kvl_store_meta;

/* ---- put / get / delete */

/* Stores value (len bytes) with its metadata and the chunk's token ids under key, replacing an
 * older entry of the same key. The store copies everything; the caller keeps ownership. Returns
 * KVL_OK once durable (see the header comment). Errors: KVL_ERR_INVALID_ARG, KVL_ERR_QUOTA (the value
 * alone exceeds the tenant's quota), KVL_ERR_STORE_FULL (nothing evictable), KVL_ERR_LIMIT (larger
 * than a segment), KVL_ERR_IO / KVL_ERR_NOSPC / KVL_ERR_FSYNC (nothing committed; the segment is
 * fenced after KVL_ERR_FSYNC), KVL_ERR_DB, KVL_ERR_PERMISSION (read-only store). Thread-safe. */
kvl_status kvl_store_put(kvl_store *st, const kvl_store_key *key, const kvl_store_meta *meta,
                         const int32_t *tokens, size_t n_tokens, const void *value, size_t len);

/* One element of a batched put. */
typedef struct kvl_store_put_item {
    kvl_store_key key;
    const kvl_store_meta *meta;
    const int32_t *tokens;
    size_t n_tokens;
    const void *value;
    size_t len;
} kvl_store_put_item;

/* Puts n items with one fdatasync per touched segment and one synced index commit: all committed
 * or (on error) none. Same errors as kvl_store_put. Thread-safe. */
kvl_status kvl_store_put_batch(kvl_store *st, size_t n, const kvl_store_put_item *items);

/* Reads and verifies the value under key. If expect_fp is not NULL the entry's fingerprint must equal
 * it (KVL_ERR_FINGERPRINT otherwise). On success *out holds one reference (kvl_store_value_free).
 * Errors: KVL_ERR_KEY_NOT_FOUND (absent or expired), KVL_ERR_CORRUPT (bytes fail the checksum or the
 * header binding them to key and fingerprint), KVL_ERR_IO. Thread-safe. */
kvl_status kvl_store_get(kvl_store *st, const kvl_store_key *key, const uint8_t *expect_fp,
                         kvl_store_value **out);

/* Batched get: many reads in flight at once. out[i] and status[i] receive each key's result as
 * kvl_store_get would; the return value is KVL_OK when the batch ran (individual misses are in
 * status[]), or an error that applies to the whole batch. Thread-safe. */
kvl_status kvl_store_get_batch(kvl_store *st, size_t n, const kvl_store_key *keys,
                               const uint8_t *expect_fp, kvl_store_value **out,
                               kvl_status *status);

/* Streaming batched get, for consumers that start on a value before all of it has arrived (the
 * GPU load path decodes layer groups as their bytes land). As kvl_store_get_batch, and in addition
 * fn(ctx, i, data, ready, total) is called whenever the readable prefix data[0, ready) of item i's
 * value grows (total = the value's length; for a read without I/O error the last call has
 * ready == total). Reads are issued interleaved across the items (the first MiB of every value,
 * then the second, ...), so all prefixes grow together. DRAM-tier hits are reported whole before
 * any read starts. The bytes handed to fn are NOT yet verified: item i's checksum verdict is
 * status[i] when the call returns, and a consumer must discard whatever it made of item i unless
 * status[i] == KVL_OK. For that reason out[i] stays set (to be freed by the caller) for a value that
 * was read but failed verification; data stays valid until out[i] is freed. fn runs on the store's
 * reading thread (never twice at once for one call), must be quick and must not call the store.
 * ctx is passed through. Thread-safe as kvl_store_get_batch. */
typedef void (*kvl_store_stream_fn)(void *ctx, size_t i, const uint8_t *data, size_t ready, size_t total);
kvl_status kvl_store_get_batch_stream(kvl_store *st, size_t n, const kvl_store_key *keys,
                                      const uint8_t *expect_fp, kvl_store_value **out,
                                      kvl_status *status, kvl_store_stream_fn fn, void *ctx);

/* Accessors of a value; pointers stay valid until the reference is freed. */
const void *kvl_store_value_data(const kvl_store_value *v);
size_t kvl_store_value_size(const kvl_store_value *v);
const int32_t *kvl_store_value_tokens(const kvl_store_value *v);
size_t kvl_store_value_n_tokens(const kvl_store_value *v);
const kvl_store_meta *kvl_store_value_meta(const kvl_store_value *v);
/* Drops one reference. Accepts NULL. Thread-safe. */
void kvl_store_value_free(kvl_store_value *v);

/* Index-only lookup: KVL_OK and *meta filled (meta may be NULL) when a live entry exists,
 * KVL_ERR_KEY_NOT_FOUND otherwise. Does not count as an access. Thread-safe. */
kvl_status kvl_store_stat(kvl_store *st, const kvl_store_key *key, kvl_store_meta *meta);

/* Deletes the entry (durable on return); readers holding values keep them. KVL_ERR_KEY_NOT_FOUND if
 * absent. Thread-safe. */
kvl_status kvl_store_delete(kvl_store *st, const kvl_store_key *key);

/* Walks the prefix chain from root over tokens in blocks of block_tokens tokens and stops at the first
 * block without a live entry. *n_blocks = number of leading blocks cached; *last (may be NULL) = the
 * prefix key of the last cached block (the root if none). Thread-safe. */
kvl_status kvl_store_longest_prefix(kvl_store *st, const kvl_store_key *root, const int32_t *tokens,
                                    size_t n_tokens, size_t block_tokens, size_t *n_blocks,
                                    kvl_store_key *last);

/* ---- eviction */

typedef struct kvl_store_evict_req {
    kvl_store_policy policy;  /* order of victims */
    uint64_t target_bytes;    /* evict until used bytes <= target (UINT64_MAX: no size goal) */
    int expired_only;         /* 1: evict only entries whose TTL has passed */
    const char *tenant;       /* NULL: all tenants; else only this tenant's entries */
    uint64_t max_entries;     /* 0: no limit */
} kvl_store_evict_req;

/* Evicts entries (durable on return); entries being read stay readable to their readers. Reports
 * how many entries / bytes went in *n_evicted / *bytes_evicted (either may be NULL). Thread-safe. */
kvl_status kvl_store_evict(kvl_store *st, const kvl_store_evict_req *req, uint64_t *n_evicted,
                           uint64_t *bytes_evicted);

/* Sets a tenant's quota in bytes (0 = unlimited), durable; puts beyond it evict the tenant's own
 * entries (by the store policy). Thread-safe. */
kvl_status kvl_store_set_quota(kvl_store *st, const char *tenant, uint64_t quota_bytes);

/* Changes the capacity limit (durable); evicts down to it. Thread-safe. */
kvl_status kvl_store_set_capacity(kvl_store *st, uint64_t capacity_bytes);

/* ---- statistics */

typedef struct kvl_store_stats {
    uint64_t entries, used_bytes, capacity_bytes, free_bytes, pending_bytes;
    uint32_t segments, fenced_segments;
    uint64_t segment_bytes;
    uint64_t puts, gets, get_hits, get_misses, deletes, evictions, evicted_bytes;
    uint64_t cache_hits, cache_bytes, cache_entries, cache_budget;
    uint64_t corrupt_reads; /* reads that failed verification */
    uint64_t recovered_extents, recovered_bytes; /* reclaimed by the last open's recovery */
    uint64_t open_ns;                            /* open-to-ready time of this handle */
    int index_from_snapshot; /* 1: the index was loaded from the clean-close snapshot, 0: scanned */
    int verify_threads;      /* checksum worker threads */
    uint64_t worker_verified; /* reads whose verdict (checksum) a worker thread gave */
    char io_backend[16];    /* "io_uring" or "pread" */
    char io_detail[160];    /* what the backend detected: registered buffers or why not, probes */
    int registered_buffers; /* 1 when puts write through buffers registered with io_uring */
    int read_only;
    kvl_store_policy policy;
} kvl_store_stats;

/* Snapshot of the counters. Thread-safe. */
kvl_status kvl_store_get_stats(kvl_store *st, kvl_store_stats *out);

/* Persists access statistics (last access, hits) now; the store also does this on close and during
 * eviction runs. A crash loses at most the statistics since the last flush. Thread-safe. */
kvl_status kvl_store_flush(kvl_store *st);

/* ---- iteration (admin) */

/* Calls fn(key, meta, ctx) for every live entry (of tenant, when not NULL), in key order, over a
 * consistent snapshot of the index taken at the call. fn returns 0 to continue, nonzero to stop.
 * Thread-safe. */
kvl_status kvl_store_foreach(kvl_store *st, const char *tenant,
                             int (*fn)(const kvl_store_key *key, const kvl_store_meta *meta,
                                       void *ctx),
                             void *ctx);

/* ---- test-only fault injection (compiled in; never enabled unless called) */

typedef enum kvl_store_fault {
    KVL_STORE_FAULT_NONE = 0,
    KVL_STORE_FAULT_WRITE_EIO, /* the next data writes fail with EIO */
    KVL_STORE_FAULT_ENOSPC,    /* the next data writes fail with ENOSPC */
    KVL_STORE_FAULT_FSYNC_EIO, /* the next fdatasync fails with EIO (fences the segment) */
    KVL_STORE_FAULT_TORN,      /* the next data writes write only their first half but report
                                  success (a device that acknowledged lost sectors) */
} kvl_store_fault;

/* Arms fault kind for the next count data operations of its kind. Thread-safe. */
void kvl_store_test_fault(kvl_store *st, kvl_store_fault kind, int count);

/* Flips one byte of the stored extent of key at byte offset within the extent (0 = header), on
 * disk, bypassing the store, and drops the key from the DRAM cache. Thread-safe. */
kvl_status kvl_store_test_flip(kvl_store *st, const kvl_store_key *key, uint64_t offset);

#ifdef __cplusplus
}
#endif
#endif
