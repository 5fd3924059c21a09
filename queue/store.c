/*
 * store.c -- LMDB, where records stay from their move out of the journal until they are
 * acknowledged, expire or are purged: the DBs, transactions, the counters kept beside the
 * records, deletes, and the disk headroom that keeps deletes possible on a full disk.
 *
 * LAYOUT. One LMDB environment (a directory: data.mdb, lock.mdb) with three named DBs:
 *
 *   pending  key: sequence number, 8 bytes big-endian, so LMDB's default memcmp order is
 *                 numeric order, the oldest record is the first key, and every new key is
 *                 the largest (MDB_APPEND: no search, pages filled completely).
 *            value: the stored record (record.c): a 24-byte header, then the encoded
 *                 EdgePayload, exactly the bytes the uplink sends. A value over about half
 *                 a page goes to LMDB overflow pages of its own, as LMDB does by itself.
 *   meta     key: a name; value: u64. "format" (QUEUE_FORMAT), "next_seq" (after the last
 *            record moved in), "bytes" (sum of record sizes in pending), the journal
 *            position "j_off" that moves have reached with the cumulative "j_count" and
 *            "j_bytes" moved, the lifetime counters "acked", "expired", "purged",
 *            "damaged", and "generation" (free_space_now's tick).
 *   plugins  key: plugin ID, 4 bytes big-endian; value: u64 count, u64 bytes of that
 *            plugin's pending records. Entries at zero are deleted.
 *
 * Every change to pending updates meta and plugins in the same write transaction, so the
 * counters can never disagree with the records, whatever process dies when; a move also
 * advances j_off in that transaction, so each journal record reaches LMDB exactly once.
 * The pending count is the pending DB's entry count (mdb_stat, O(1)). After each commit
 * that changes them, the counts are mirrored into the journal's shared page
 * (spk_store_commit_mirrored), where appends check the limits without opening LMDB.
 *
 * FORMATS. 1: no segments; 2: records too large for a leaf kept in segment files seg-*
 * with a `segs` DB counting them; 3 (this one): LMDB only. A format-1 queue is taken as
 * it is; a format-2 queue is upgraded when it is opened (upgrade.c).
 *
 * CONCURRENCY. LMDB allows one write transaction at a time per environment, across
 * processes, through a robust process-shared mutex in lock.mdb: a writer killed with
 * kill -9 leaves the mutex EOWNERDEAD and its transaction uncommitted, and the next writer
 * carries on. Readers (the uplink's reads, stats) never block writers. Dead readers' slots
 * are cleared by mdb_reader_check() at open (and LMDB clears them itself when the reader
 * table fills). Lock order: LMDB's writer lock, then the journal's; never the reverse.
 */
#include "queue_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define QUEUE_FORMAT 3u

/* Map an LMDB or errno code from a write path to an spk_err with a message. */
/* Map an LMDB or errno code from a write path to an spk_err with a message. */
int spk_store_err(spk_queue *q, int rc, const char *what, spk_errbuf *eb)
{
    switch (rc) {
    case MDB_MAP_FULL:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "queue %s: %s: the LMDB map is full (queue.map_size = %llu bytes); "
                        "records are accepted again once acks or expiry free space, or "
                        "after reopening with a bigger queue.map_size",
                        q->path, what, (unsigned long long)q->opts.map_size);
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
    case EIO:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "queue %s: %s: cannot write (%s; disk full?); nothing was stored",
                        q->path, what, mdb_strerror(rc));
    case ENOMEM:
        return spk_errf(eb, SPK_ENOMEM, "queue %s: %s: out of memory", q->path, what);
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: %s: %s", q->path, what,
                        mdb_strerror(rc));
    default:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: %s: %s", q->path, what,
                        mdb_strerror(rc));
    }
}

/* Begin a transaction, adopting a map size grown by another process. */
int spk_store_txn_begin(spk_queue *q, unsigned flags, MDB_txn **txn)
{
    int rc = mdb_txn_begin(q->env, NULL, flags, txn);
    if (rc == MDB_MAP_RESIZED) {
        rc = mdb_env_set_mapsize(q->env, 0);
        if (rc == 0)
            rc = mdb_txn_begin(q->env, NULL, flags, txn);
    }
    return rc;
}

uint64_t spk_store_meta_get(MDB_txn *txn, MDB_dbi dbi, const char *name)
{
    MDB_val k = {strlen(name), (void *)name}, v;
    uint64_t out = 0;
    if (mdb_get(txn, dbi, &k, &v) == 0 && v.mv_size == sizeof(out))
        memcpy(&out, v.mv_data, sizeof(out));
    return out;
}

int spk_store_meta_put(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t value)
{
    MDB_val k = {strlen(name), (void *)name}, v = {sizeof(value), &value};
    return mdb_put(txn, dbi, &k, &v, 0);
}

int spk_store_meta_add(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t delta)
{
    return spk_store_meta_put(txn, dbi, name, spk_store_meta_get(txn, dbi, name) + delta);
}


/* Add (count, bytes) to the counters under `key` in `dbi`, or take them away (`sign` -1);
 * an entry that reaches zero is deleted (*zeroed set, when given). */
static int count_adjust(MDB_txn *txn, MDB_dbi dbi, void *key, size_t klen, int sign,
                        uint64_t count, uint64_t bytes, bool *zeroed)
{
    MDB_val k = {klen, key}, v;
    uint64_t c[2] = {0, 0};
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc == 0 && v.mv_size == sizeof(c))
        memcpy(c, v.mv_data, sizeof(c));
    else if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    if (sign > 0) {
        c[0] += count;
        c[1] += bytes;
    } else {
        c[0] = c[0] > count ? c[0] - count : 0;
        c[1] = c[1] > bytes ? c[1] - bytes : 0;
    }
    if (c[0] == 0) {
        if (rc != 0)
            return 0;
        if (zeroed != NULL)
            *zeroed = true;
        return mdb_del(txn, dbi, &k, NULL);
    }
    v.mv_size = sizeof(c);
    v.mv_data = c;
    return mdb_put(txn, dbi, &k, &v, 0);
}

/* Add (count, bytes) to a plugin's counters, or take them away (`sign` -1). */
int spk_store_plugin_adjust(spk_queue *q, MDB_txn *txn, uint32_t id, int sign, uint64_t count,
                         uint64_t bytes)
{
    uint8_t kb[4];
    spk_be32(kb, id);
    return count_adjust(txn, q->plugins, kb, 4, sign, count, bytes, NULL);
}

/* DISK HEADROOM. Deleting records needs a few new pages (copy-on-write of the path to the
 * leaf, the free list's record). If enqueues could use the last free block of the disk,
 * an ack or expiry could then fail with ENOSPC, and nothing could ever free space again.
 * So a move first makes sure the file has `reserve` bytes allocated past the used
 * pages plus the records it moves (fallocate with FALLOC_FL_KEEP_SIZE: blocks are reserved, the
 * file size does not change, LMDB's later writes there need no new blocks). When that
 * reservation fails the enqueue is refused as "disk full" while acks and expiry still
 * have room. Called outside the write transaction; another process may have reserved
 * more already, which makes our fallocate a cheap no-op. */

/* Pages on LMDB's free list (freed by acks and expiry, reused before the file grows).
 * Slow path only: walks the free list, like `mdb_stat -f`. 0 when it cannot be read. */
uint64_t spk_store_free_list_pages(spk_queue *q)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    uint64_t pages = 0;
    if (spk_store_txn_begin(q, MDB_RDONLY, &txn) != 0)
        return 0;
    if (mdb_cursor_open(txn, 0 /* FREE_DBI */, &cur) == 0) {
        while (mdb_cursor_get(cur, &k, &v, MDB_NEXT) == 0) {
            size_t n;
            if (v.mv_size >= sizeof(n)) {
                memcpy(&n, v.mv_data, sizeof(n));
                pages += n;
            }
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    return pages;
}

/* True when `need` bytes fit in what the file has allocated once LMDB's free pages are
 * counted. */
static bool fits_in_free_pages(spk_queue *q, uint64_t need)
{
    struct stat st;
    if (fstat(q->fd, &st) != 0)
        return false;
    uint64_t free_pages = spk_store_free_list_pages(q);
    uint64_t allocated = (uint64_t)st.st_blocks * 512;
    if (allocated < q->alloc_end)
        allocated = q->alloc_end;
    /* Some free pages are not reusable yet (freed by the last transactions, or pinned by
     * a reader), so demand half a reserve more: a hysteresis, not an exact count. */
    return need + q->reserve / 2 <= allocated + free_pages * q->psize;
}

int spk_store_ensure_headroom(spk_queue *q, uint64_t size, spk_errbuf *eb)
{
    MDB_envinfo info;
    if (q->fd < 0 || mdb_env_info(q->env, &info) != 0)
        return 0;
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * q->psize;
    uint64_t need = used + size + 16ull * q->psize + q->reserve;
    if (need > info.me_mapsize)
        need = info.me_mapsize;
    if (need <= q->alloc_end)
        return 0;
    uint64_t target = need + q->reserve; /* grow in steps, not per record */
    if (target > info.me_mapsize)
        target = info.me_mapsize;
    if (fallocate(q->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)target) != 0) {
        int e = errno;
        if (e == EOPNOTSUPP || e == ENOSYS) {
            q->fd = -1; /* file system without fallocate: no headroom guarantee */
            return 0;
        }
        if (fallocate(q->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)need) != 0 &&
            !fits_in_free_pages(q, need))
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                            "queue %s: disk full: cannot keep %llu bytes free for acks and "
                            "expiry (%s); nothing was stored", q->path,
                            (unsigned long long)q->reserve, strerror(errno));
        target = need;
    }
    q->alloc_end = target;
    return 0;
}

int spk_store_jbase_read(spk_queue *q, MDB_txn *txn, struct jbase *b)
{
    MDB_stat ms;
    int rc = mdb_stat(txn, q->pending, &ms);
    if (rc != 0)
        return rc;
    b->txnid = mdb_txn_id(txn);
    b->pending = ms.ms_entries;
    b->bytes = spk_store_meta_get(txn, q->meta, "bytes");
    b->off = spk_store_meta_get(txn, q->meta, "j_off");
    b->count = spk_store_meta_get(txn, q->meta, "j_count");
    b->mbytes = spk_store_meta_get(txn, q->meta, "j_bytes");
    b->next_seq = spk_store_meta_get(txn, q->meta, "next_seq");
    return 0;
}

/* Commit `txn` (consumed: aborted on failure) and, when it changed the pending records,
 * mirror its state into journal.ctl (see JOURNAL, Counting). An empty transaction commits
 * nothing and reuses its ID, so it must not mirror. *out (if not NULL) receives the
 * state. Returns an LMDB code. */
int spk_store_commit_mirrored(spk_queue *q, MDB_txn *txn, bool changed, struct jbase *out)
{
    struct jbase b;
    int rc = spk_store_jbase_read(q, txn, &b);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        return rc;
    if (changed && spk_journal_lock(q, NULL) == 0) {
        spk_journal_mirror(q->jc, &b);
        spk_journal_unlock(q);
    }
    if (out != NULL)
        *out = b;
    return 0;
}

/* Moves stop short of filling the map: acks and expiry need pages to delete records (each
 * copies the leaves and branches it changes, and records the freed pages), and only
 * deleting frees space. So a move may add at most `room` pages: the map's pages minus the
 * used ones and a reserve, plus the free list's pages (LMDB reuses those first) when the
 * map is nearly full. Computed before the write transaction; a record's pages are
 * estimated on the high side (overflow pages whole, small records in half-full leaves). */
#define MOVE_MAP_FULL (-30999)
uint64_t spk_store_map_room_pages(spk_queue *q)
{
    MDB_envinfo info;
    if (q->psize == 0 || mdb_env_info(q->env, &info) != 0)
        return UINT64_MAX;
    uint64_t pages = info.me_mapsize / q->psize;
    uint64_t keep = pages / 8;
    if (keep > (4ull << 20) / q->psize)
        keep = (4ull << 20) / q->psize;
    if (keep < 16)
        keep = 16;
    uint64_t used = (uint64_t)info.me_last_pgno + 1;
    uint64_t room = used + keep < pages ? pages - used - keep : 0;
    if (room < 2ull * MOVE_MAX_BYTES / q->psize)
        room += spk_store_free_list_pages(q);
    return room;
}

/* Pages a record of `vlen` value bytes may take, times 16 (fractions of a page). */
uint64_t spk_store_record_pages16(const spk_queue *q, uint32_t vlen)
{
    uint64_t node = (uint64_t)vlen + 8 + 16;
    if (node > q->psize / 2 - 64)
        return 16 * ((vlen + 16 + q->psize - 1) / q->psize) + 1;
    return (32 * node + q->psize - 1) / q->psize; /* leaves half full */
}

/* ---- ack / expire / purge ------------------------------------------------------------- */

/* Delete the record under the cursor, updating its plugin's counters (a value that is not
 * a record has no plugin to take it from; its bytes still leave "bytes"). */
int spk_store_del_current(spk_queue *q, MDB_txn *txn, MDB_cursor *cur, const MDB_val *v,
                          uint64_t *bytes_freed)
{
    struct rec_view r;
    int rc;
    if (spk_rec_parse(v, &r) == 0 &&
        (rc = spk_store_plugin_adjust(q, txn, r.h.plugin_id, -1, 1, r.size)) != 0)
        return rc;
    *bytes_freed += r.size;
    return mdb_cursor_del(cur, 0);
}

int spk_store_finish_delete(spk_queue *q, MDB_txn *txn, uint64_t bytes_freed, const char *counter,
                         uint64_t n)
{
    uint64_t bytes = spk_store_meta_get(txn, q->meta, "bytes");
    int rc = spk_store_meta_put(txn, q->meta, "bytes", bytes > bytes_freed ? bytes - bytes_freed : 0);
    if (rc == 0 && n > 0)
        rc = spk_store_meta_add(txn, q->meta, counter, n);
    return rc;
}

/* LMDB hands pages freed by transaction T to writers only from T + 2 on (T + 1 may still
 * be read by a snapshot of T). When the map is more than half used, commit one tiny
 * transaction after a delete, so that space freed by an ack, expiry or purge is usable by
 * the very next enqueue even if every enqueue in between fails with "map full". Errors
 * are ignored: this only hastens reuse. */
void spk_store_free_space_now(spk_queue *q)
{
    MDB_envinfo info;
    MDB_stat est;
    MDB_txn *txn;
    if (mdb_env_info(q->env, &info) != 0 || mdb_env_stat(q->env, &est) != 0)
        return;
    if ((info.me_last_pgno + 1) * (uint64_t)est.ms_psize < info.me_mapsize / 2)
        return;
    if (spk_store_txn_begin(q, 0, &txn) != 0)
        return;
    if (spk_store_meta_add(txn, q->meta, "generation", 1) != 0) {
        mdb_txn_abort(txn);
        return;
    }
    mdb_txn_commit(txn);
}

/* One transaction: delete the records of seqs[0..n) that are there; *count gets how many.
 * Returns an LMDB code. */
int spk_store_ack_txn(spk_queue *q, const uint64_t *seqs, size_t n, size_t *count)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t freed = 0;
    size_t c = 0;
    int rc = spk_store_txn_begin(q, 0, &txn);
    if (rc != 0)
        return rc;
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        uint8_t kb[8];
        spk_be64(kb, seqs[i]);
        MDB_val k = {8, kb}, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
        if (rc == MDB_NOTFOUND)
            continue;
        if (rc != 0 || (rc = spk_store_del_current(q, txn, cur, &v, &freed)) != 0)
            goto fail;
        c++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if (c > 0 && (rc = spk_store_finish_delete(q, txn, freed, "acked", c)) != 0)
        goto fail;
    rc = spk_store_commit_mirrored(q, txn, c > 0, NULL);
    txn = NULL;
    if (rc != 0)
        return rc;
    if (c > 0)
        spk_store_free_space_now(q);
    *count = c;
    return 0;
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    return rc;
}

/* Sum the (count, bytes) values of a counters DB (plugins). Returns an LMDB code. */
int spk_store_sum_counters(MDB_txn *txn, MDB_dbi dbi, uint64_t *count, uint64_t *bytes)
{
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = mdb_cursor_open(txn, dbi, &cur);
    if (rc != 0)
        return rc;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        uint64_t c[2] = {0, 0};
        if (v.mv_size == sizeof(c))
            memcpy(c, v.mv_data, sizeof(c));
        *count += c[0];
        *bytes += c[1];
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Open (creating) the DBs and check the format: a new queue gets format 3 and next_seq 1,
 * a format-1 queue is taken as it is, a format-2 one is upgraded (upgrade.c). */
int spk_store_open_dbs(spk_queue *q, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    int rc = spk_store_txn_begin(q, 0, &txn);
    if (rc != 0)
        return spk_store_err(q, rc, "open", eb);
    if ((rc = mdb_dbi_open(txn, "pending", MDB_CREATE, &q->pending)) != 0 ||
        (rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &q->meta)) != 0 ||
        (rc = mdb_dbi_open(txn, "plugins", MDB_CREATE, &q->plugins)) != 0)
        goto fail;
    uint64_t format = spk_store_meta_get(txn, q->meta, "format");
    if (format == 0) {
        if ((rc = spk_store_meta_put(txn, q->meta, "format", QUEUE_FORMAT)) != 0 ||
            (rc = spk_store_meta_put(txn, q->meta, "next_seq", 1)) != 0)
            goto fail;
    } else if (format == 1) { /* format 1 had no segments: its records are all in LMDB */
        if ((rc = spk_store_meta_put(txn, q->meta, "format", QUEUE_FORMAT)) != 0)
            goto fail;
    } else if (format != 2 && format != QUEUE_FORMAT) {
        mdb_txn_abort(txn);
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: unknown queue format %llu (this build "
                        "reads formats 1 to %u)", q->path, (unsigned long long)format,
                        QUEUE_FORMAT);
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0)
        goto fail;
    return format == 2 ? spk_store_upgrade2(q, eb) : 0;
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    if (rc == MDB_INCOMPATIBLE)
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: not a spoke queue", q->path);
    return spk_store_err(q, rc, "open", eb);
}
