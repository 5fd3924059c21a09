/*
 * kv.h -- the LMDB store behind the KV host service and hubd's dedupe table.
 *
 * One store is one LMDB environment in a directory (data.mdb, lock.mdb), opened by every
 * process that uses it: the workers of one spoked share one (the edge's KV), the workers
 * of one hubd share another (the control plugins' KV and the dedupe marks). It holds:
 *
 *   kv      per-plugin namespaces: get, put, delete and prefix scans of a plugin's keys,
 *           isolated by plugin ID (ns). Keys are compared as bytes (memcmp order).
 *   dedupe  marks of (edge ID, sequence number) already delivered, each with the time it
 *           was marked, so hubd drops a payload an edge resends after a hub crash.
 *
 * TRANSACTIONS are explicit, so that hubd can make a batch's dedupe marks and the KV
 * writes of the control plugins it ran one atomic unit, and GROUP COMMIT several batches:
 *
 *     spk_kv_begin(kv, NULL, true, &top)              one write transaction
 *     for each batch, for each payload:
 *         spk_kv_dedupe_mark(top, edge, seq, now, &dup)
 *         if (!dup) {
 *             spk_kv_begin(kv, top, true, &child)      a NESTED transaction
 *             ... accept_edge_payload() puts/deletes in `child` ...
 *             ok ? spk_kv_commit(child) : spk_kv_abort(child)   only this payload undone
 *         }
 *     spk_kv_commit(top)                              one commit, one flush, for all
 *     ... then answer the batches ...
 *
 * A process that dies before the top commit leaves nothing of it: not the marks, not the
 * KV writes; the edge resends and the KV changes exactly once. LMDB allows ONE write
 * transaction at a time per store, across all its processes: keep write transactions
 * short, and never begin a second top-level write transaction in a process that already
 * holds one (it would wait for itself forever; refused with SPK_EBUSY). A hub worker's
 * group commit holds that lock while its control plugins run, so the other workers'
 * commits (and expiry) wait for it: plugins.hook_timeout bounds the wait. Read-only
 * transactions never block and are never blocked; any number may be open. Costs measured
 * on the 2-core machine, no flush: a mark ~0.3 us, a nested transaction with one put
 * ~0.4 us more.
 *
 * PROCESSES. Any number of processes may open the same directory and use it concurrently.
 * A process killed at any point (kill -9 included) leaves the store consistent: its
 * uncommitted transaction is simply absent, the next writer recovers LMDB's robust writer
 * mutex, and spk_kv_open() clears reader slots left by dead processes.
 *   Never use a handle across fork(): open the store in each process AFTER it forked, and
 *   in a child do not call any function (not even spk_kv_close) on a handle inherited
 *   from the parent (top-level begins refuse one; close only frees its memory). Open a
 *   store once per process (LMDB's locks are per process: a second handle on the same
 *   directory in one process breaks them). A handle and its transactions are used by one
 *   thread at a time.
 *
 * DURABILITY (opts.sync). "Committed" = spk_kv_commit() of a top-level transaction
 * returned 0.
 *   sync = true   the commit returns after LMDB flushed it (fdatasync of data, then of
 *                 its meta page): it survives a crash of any process and a power loss.
 *                 hubd uses this: a batch is answered only after its commit, and an edge
 *                 deletes what the hub answered, so a commit that a power loss could undo
 *                 would lose those payloads' KV effects for good.
 *   sync = false  commits are written to the file (the kernel's page cache) but not
 *                 flushed (MDB_NOSYNC): they survive a crash of any spoke process at once;
 *                 spk_kv_sync() flushes. A power loss or kernel crash can lose the commits
 *                 since the last spk_kv_sync() and, as LMDB warns for MDB_NOSYNC, may
 *                 damage the file. For the edge's cache-style KV, whose owner calls
 *                 spk_kv_sync() on a timer.
 *   Every process opening a store should use the same setting: it is per handle, not
 *   stored in the file.
 *
 * LIMITS. A plugin key is at most SPK_KV_MAX_KEY bytes (LMDB's key limit, 511, minus the
 * 4-byte namespace prefix); an empty key is allowed. A value is at most SPK_KV_MAX_VALUE
 * bytes; empty is allowed. An edge ID is 1 to SPK_KV_MAX_EDGE_ID bytes. A length equal to
 * a limit is accepted, one byte more refused.
 *
 * ERRORS. Every function returns 0 or a negative spk_err (core/err.h) and, when `eb` is
 * not NULL, fills it with a sentence for the operator. Codes:
 *   SPK_EINVAL              bad argument (NULL, a key or edge ID over its limit, a write
 *                           in a read-only transaction, a parent used while its child is
 *                           open, a handle from another process)
 *   SPK_EPAYLOAD_TOO_LARGE  a value over SPK_KV_MAX_VALUE
 *   SPK_ENOENT              get/del/dedupe_marked: no such entry
 *   SPK_EBUSY               a top-level write transaction while this handle holds one
 *   SPK_EQUEUE_UNAVAILABLE  the map (opts.map_size) or the disk is full, or the store
 *                           cannot be opened or written. A write transaction that got it
 *                           is unusable (every later call in it returns the same code):
 *                           abort it. If it was a nested one, its parent is still usable.
 *                           Space comes back with deletions, expiry, or a bigger
 *                           map_size on the next open. Deleting needs a few free pages
 *                           too (copy-on-write), and LMDB reuses a freed page only two
 *                           commits later: expiry retries with smaller transactions, but
 *                           a map filled to its last page (say by large values) can refuse
 *                           even those; then only a bigger map_size helps. Size map_size
 *                           with room to spare and watch spk_kv_stat()'s map_used.
 *   SPK_ECORRUPT            the file is not an LMDB store, or a stored entry is malformed
 *   SPK_ENOMEM, SPK_EIO     allocation or system call failure
 */
#ifndef SPK_KV_H
#define SPK_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* LMDB's default maximum key size (mdb_env_get_maxkeysize); spk_kv_open() checks it. */
#define SPK_KV_LMDB_MAX_KEY 511u
/* The namespace prefix (plugin ID, big-endian) in front of every plugin key. */
#define SPK_KV_NS_PREFIX 4u
/* Longest plugin key, in bytes. */
#define SPK_KV_MAX_KEY (SPK_KV_LMDB_MAX_KEY - SPK_KV_NS_PREFIX)
/* Largest value, in bytes (1 MiB, as a payload). */
#define SPK_KV_MAX_VALUE (1024u * 1024u)
/* Longest edge ID of a dedupe mark, in bytes. */
#define SPK_KV_MAX_EDGE_ID 256u
/* Dedupe marks spk_kv_dedupe_expire() removes per write transaction. */
#define SPK_KV_EXPIRE_PER_TXN 1000u

/* One open store (per process). */
typedef struct spk_kv spk_kv;

/* One transaction: read-only or write, top-level or nested in a write transaction. */
typedef struct spk_kv_txn spk_kv_txn;

/* Options of spk_kv_open(). Fill with spk_kv_opts_init(), then override. */
typedef struct spk_kv_opts {
    uint64_t map_size;       /* LMDB map size in bytes: the most the store can hold
                                (default 1 GiB); a bigger size stored in the file wins */
    bool sync;               /* flush at every top-level commit (default true; see
                                DURABILITY) */
    unsigned max_readers;    /* read transactions open at once, all processes together
                                (default 126, LMDB's) */
    uint32_t expire_per_txn; /* marks per expiry transaction (default
                                SPK_KV_EXPIRE_PER_TXN; tests lower it) */
} spk_kv_opts;

/* Defaults as listed above. */
void spk_kv_opts_init(spk_kv_opts *o);

/* Open (creating it and its parent directories if missing) the store in directory `dir`.
 * Clears reader slots left by dead processes. `o` may be NULL for defaults. On success
 * *out is a handle the caller closes with spk_kv_close(). Returns 0, SPK_EINVAL,
 * SPK_EQUEUE_UNAVAILABLE (cannot create or open, disk full), SPK_ECORRUPT (not an LMDB
 * file; an LMDB environment that is not a kv store, such as a queue's, which is left
 * untouched; a kv store of another format), SPK_EUNSUPPORTED (an LMDB built with a key
 * limit under 511 bytes), SPK_ENOMEM, SPK_EIO. */
int spk_kv_open(const char *dir, const spk_kv_opts *o, spk_kv **out, spk_errbuf *eb);

/* Close the handle; NULL is allowed. Every transaction of it must have ended. With
 * opts.sync = false it does not flush: call spk_kv_sync() first if that is wanted. */
void spk_kv_close(spk_kv *kv);

/* Flush every commit so far to stable storage (fdatasync); cheap when opts.sync is true.
 * Also clears reader slots of dead processes (as spk_kv_dedupe_expire() does): a worker
 * killed inside a read transaction otherwise keeps its snapshot's pages from reuse until
 * the next open, and the file grows. The edge's owner of the store calls it on a timer.
 * Returns 0, SPK_EINVAL, SPK_EIO. */
int spk_kv_sync(spk_kv *kv, spk_errbuf *eb);

/* The directory the store was opened in; owned by kv. */
const char *spk_kv_path(const spk_kv *kv);

/* ---- transactions ------------------------------------------------------------------ */

/* Begin a transaction. parent = NULL: a top-level one, read-only (write = false) or write
 * (write = true; waits while another process holds the store's write transaction).
 * parent = a write transaction: a nested write transaction (write must be true) whose
 * changes become the parent's at spk_kv_commit(), or vanish at spk_kv_abort(); while it
 * is open the parent may not be used (SPK_EINVAL), except to abort it. A parent has at
 * most one open child; children nest to any depth. On success *out is the transaction,
 * owned by the caller until spk_kv_commit() or spk_kv_abort() ends it. Returns 0,
 * SPK_EINVAL, SPK_EBUSY (a top-level write transaction while this handle holds one),
 * SPK_EQUEUE_UNAVAILABLE (the parent failed earlier, or LMDB refused: too many readers,
 * or another process grew the map while transactions of this handle that are not reset
 * are open; retry once they ended), SPK_ENOMEM. */
int spk_kv_begin(spk_kv *kv, spk_kv_txn *parent, bool write, spk_kv_txn **out, spk_errbuf *eb);

/* Commit t and end it, whatever the result (t is freed). A nested transaction's changes
 * become its parent's; a top-level one's become visible to every process, durable as
 * DURABILITY says. A read-only transaction just ends. A transaction that failed earlier
 * (see ERRORS) is aborted and its code returned; one with an open child is aborted with
 * that child and SPK_EINVAL returned. Returns 0, SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE
 * (nothing of t was committed), SPK_ENOMEM, SPK_EIO. */
int spk_kv_commit(spk_kv_txn *t, spk_errbuf *eb);

/* Abort t and end it (t is freed): none of its changes remain. An open child of t is
 * aborted and freed too (its pointer is then invalid). NULL is allowed. */
void spk_kv_abort(spk_kv_txn *t);

/* Release the snapshot of a top-level read-only transaction but keep it (and its reader
 * slot) for spk_kv_renew(): cheaper than an abort and a begin, for a worker that reads in
 * every hook. While reset, t may only be renewed or aborted (other calls: SPK_EINVAL);
 * what a get returned from it is invalid. Holding a reset transaction pins nothing. A
 * no-op for other transactions and NULL. */
void spk_kv_reset(spk_kv_txn *t);

/* Take the latest snapshot in a read-only transaction that spk_kv_reset() released.
 * Returns 0, SPK_EINVAL (not a reset read-only transaction), SPK_EQUEUE_UNAVAILABLE (as
 * spk_kv_begin; t stays reset). */
int spk_kv_renew(spk_kv_txn *t, spk_errbuf *eb);

/* True for a write transaction (top-level or nested). */
bool spk_kv_txn_writable(const spk_kv_txn *t);

/* ---- per-plugin key-value ------------------------------------------------------------ */

/* Look up `key` (klen bytes, at most SPK_KV_MAX_KEY; may be NULL when klen is 0) of
 * namespace `ns`. On success *val and *vlen describe the value, BORROWED from the store:
 * valid until t (or an ancestor) ends or is reset, or the next write (put, del,
 * dedupe_mark) in t or a child of t; copy it to keep it. Returns 0, SPK_ENOENT (absent; *val =
 * NULL, *vlen = 0), SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE (t failed earlier), SPK_ECORRUPT. */
int spk_kv_get(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, const void **val,
               size_t *vlen, spk_errbuf *eb);

/* Store `val` (vlen bytes, at most SPK_KV_MAX_VALUE; may be NULL when vlen is 0) under
 * `key` of `ns`, replacing any value there. t must be a write transaction. The bytes are
 * copied. Returns 0, SPK_EINVAL, SPK_EPAYLOAD_TOO_LARGE, SPK_EQUEUE_UNAVAILABLE (map or
 * disk full: t is now unusable, abort it), SPK_ENOMEM. */
int spk_kv_put(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, const void *val,
               size_t vlen, spk_errbuf *eb);

/* Delete `key` of `ns`. t must be a write transaction. Returns 0 (deleted), SPK_ENOENT
 * (there was no such key; nothing changed, t stays usable), SPK_EINVAL,
 * SPK_EQUEUE_UNAVAILABLE (as spk_kv_put). */
int spk_kv_del(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, spk_errbuf *eb);

/* Called by spk_kv_scan() for each entry, in key order: the plugin key (without the
 * namespace prefix) and the value, both borrowed for the duration of the call. Return 0
 * to go on, > 0 to stop the scan there (not an error), < 0 to stop it and make
 * spk_kv_scan() return that code. It must not write in the scanned transaction nor begin
 * a nested one in it (both refused with SPK_EINVAL), nor end it. */
typedef int (*spk_kv_scan_cb)(void *arg, const void *key, size_t klen, const void *val,
                              size_t vlen);

/* Visit the keys of `ns` that begin with `prefix` (plen bytes, at most SPK_KV_MAX_KEY;
 * plen 0: every key of ns), in key order, strictly after `after` (alen bytes; NULL: from
 * the first), at most `max` of them (0: no limit). To resume a scan that stopped, pass the
 * last key it visited as `after`. Allocates nothing per entry. *visited (if not NULL)
 * receives the number of callbacks made; *more (if not NULL) whether a further matching
 * key exists after the last one visited (the scan stopped at max or by the callback).
 * Returns 0, the callback's negative code, SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE (t failed
 * earlier), SPK_ENOMEM. */
int spk_kv_scan(spk_kv_txn *t, uint32_t ns, const void *prefix, size_t plen, const void *after,
                size_t alen, size_t max, spk_kv_scan_cb cb, void *arg, size_t *visited, bool *more,
                spk_errbuf *eb);

/* ---- one-shot calls (the edge role's KV service) ---------------------------------------- */

/* As spk_kv_put() / spk_kv_del(), each in a write transaction of its own, committed (and
 * flushed per opts.sync) before it returns; nothing is changed unless it returns 0. Not
 * while this handle holds a write transaction (SPK_EBUSY). Returns as spk_kv_begin() and
 * spk_kv_put() / spk_kv_del() / spk_kv_commit(). */
int spk_kv_put1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, const void *val, size_t vlen,
                spk_errbuf *eb);
int spk_kv_del1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, spk_errbuf *eb);

/* As spk_kv_get() in a read-only transaction of its own, COPYING the value into buf (cap
 * bytes; may be NULL when cap is 0). *vlen receives the value's full length; when it is
 * over cap only the first cap bytes are copied (call again with a bigger buffer). Returns
 * 0, SPK_ENOENT (*vlen = 0), SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE, SPK_ECORRUPT. */
int spk_kv_get1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, void *buf, size_t cap,
                size_t *vlen, spk_errbuf *eb);

/* ---- dedupe marks (hubd) ------------------------------------------------------------- */

/* Mark (edge_id, seq) as delivered at now_ms (Unix ms, >= 0) in the write transaction t.
 * *duplicate receives true when it was marked already (nothing changes: the first mark's
 * time stays), false when this call recorded it. The mark is part of t: aborting t (or
 * an ancestor) forgets it. Returns 0, SPK_EINVAL (NULL, empty or over SPK_KV_MAX_EDGE_ID,
 * negative time, read-only t), SPK_EQUEUE_UNAVAILABLE (as spk_kv_put), SPK_ECORRUPT,
 * SPK_ENOMEM. */
int spk_kv_dedupe_mark(spk_kv_txn *t, const char *edge_id, uint64_t seq, int64_t now_ms,
                       bool *duplicate, spk_errbuf *eb);

/* Whether (edge_id, seq) is marked, in any transaction t; *marked_ms (if not NULL)
 * receives the time of its mark. Returns 0 (marked), SPK_ENOENT (not marked), SPK_EINVAL,
 * SPK_EQUEUE_UNAVAILABLE (t failed earlier), SPK_ECORRUPT. */
int spk_kv_dedupe_marked(spk_kv_txn *t, const char *edge_id, uint64_t seq, int64_t *marked_ms,
                         spk_errbuf *eb);

/* Remove every mark made before older_than_ms (time < older_than_ms), oldest first, in
 * write transactions of at most opts.expire_per_txn marks each (fewer when the map is
 * full: see ERRORS), so a large expiry holds the write lock only briefly at a time; each one is
 * committed (and flushed per opts.sync) before the next begins. Marks at or after older_than_ms
 * stay. hubd calls it with now - dedupe_retention, on a timer; it also clears dead readers
 * (spk_kv_sync). It begins its own transactions: do not call it while this handle holds a write
 * transaction (SPK_EBUSY). *removed (if not NULL) receives the number removed, also on failure
 * (what earlier transactions committed). Returns 0, SPK_EINVAL, SPK_EBUSY, SPK_EQUEUE_UNAVAILABLE,
 * SPK_ECORRUPT, SPK_ENOMEM. */
int spk_kv_dedupe_expire(spk_kv *kv, int64_t older_than_ms, uint64_t *removed, spk_errbuf *eb);

/* ---- statistics ----------------------------------------------------------------------- */

typedef struct spk_kv_stats {
    uint64_t kv_entries;   /* keys of every namespace */
    uint64_t dedupe_marks; /* marks */
    uint64_t dedupe_edges; /* edges ever marked (never forgotten; see kv.c) */
    uint64_t map_size;     /* bytes */
    uint64_t map_used;     /* bytes of the map in use (pages up to the last used one) */
    uint64_t last_txn_id;  /* LMDB's ID of the last committed write transaction: grows
                              by one per top-level commit, of any process */
    unsigned readers;      /* reader slots used so far (LMDB's high-water mark) */
    uint64_t dead_readers; /* slots of dead processes this handle cleared (open, sync,
                              expire) */
} spk_kv_stats;

/* Fill *st from a fresh read-only transaction. Returns 0, SPK_EINVAL,
 * SPK_EQUEUE_UNAVAILABLE. */
int spk_kv_stat(spk_kv *kv, spk_kv_stats *st, spk_errbuf *eb);

#endif
