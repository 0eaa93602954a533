/* kvl_store_admin.h - audit and admin operations of the chunk store, returning JSON (jansson) so the
 * kvloom-admin CLI and the HTTP service share one implementation.
 *
 * Every function takes an open store, returns a kvl_status, and on KVL_OK stores a new json_t in
 * *out that the caller owns (json_decref). All are thread-safe with concurrent store traffic;
 * audit holds the index locks while it compares the index with free space (short stalls of other
 * callers), but reads data without them.
 */
#ifndef KVL_STORE_ADMIN_H
#define KVL_STORE_ADMIN_H

#include <jansson.h>

#include "kvl_store.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Full check: every extent owned by exactly one of entry / free / pending (no overlaps, no orphaned
 * space), the RocksDB index equals the in-memory index and free lists, per-tenant usage recomputed
 * against the counters, and (check_data = 1) every entry's bytes read back and verified (header +
 * checksum). Report fields: ok (bool), entries, entry_bytes, free_bytes, pending_bytes,
 * orphan_bytes, overlaps, index_mismatches, free_mismatches, segments[], tenants[], verified,
 * damaged[] ({key, tenant, status, error}). Appends an "audit" record to the log. */
kvl_status kvl_store_audit(kvl_store *st, int check_data, json_t **out);

/* Counters, io backend, per-tenant usage and quotas. */
kvl_status kvl_store_admin_stat(kvl_store *st, json_t **out);

/* Entries (of tenant, or all when NULL) in key order, at most limit (0 = all). */
kvl_status kvl_store_admin_ls(kvl_store *st, const char *tenant, uint64_t limit, json_t **out);

/* Deletes the nkeys given keys when nkeys > 0, else evicts by req. Reports what went. */
kvl_status kvl_store_admin_evict(kvl_store *st, const kvl_store_evict_req *req, const kvl_store_key *keys,
                                 size_t nkeys, json_t **out);

/* Reads and verifies the given keys (all entries when nkeys == 0) without counting them as accesses.
 * Report: ok, verified, damaged[]. */
kvl_status kvl_store_admin_verify(kvl_store *st, const kvl_store_key *keys, size_t nkeys, json_t **out);

/* Persists access statistics, compacts every RocksDB column family, trims the log to its newest
 * keep_log records (0 = keep all). */
kvl_status kvl_store_admin_compact(kvl_store *st, uint64_t keep_log, json_t **out);

/* Writes the entries (of tenant, or all) with metadata, tokens and values to path in the export
 * format of docs/store-format.md; every value is verified before it is written. */
kvl_status kvl_store_admin_export(kvl_store *st, const char *path, const char *tenant, json_t **out);

/* Reads an export file and puts every record (keys, tenants and fingerprints preserved). Rejects a
 * malformed file (KVL_ERR_FORMAT / KVL_ERR_MAGIC / KVL_ERR_CHECKSUM) before writing anything from a
 * bad record; records before it stay imported. */
kvl_status kvl_store_admin_import(kvl_store *st, const char *path, json_t **out);

/* The newest n records of the append-only audit log (oldest first), each a JSON object. */
kvl_status kvl_store_admin_log(kvl_store *st, uint64_t n, json_t **out);

#ifdef __cplusplus
}
#endif
#endif
