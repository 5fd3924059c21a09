/*
 * mover.c -- moving records from the journal into LMDB, and giving their journal space
 * back.
 *
 * A move is one LMDB write transaction that takes a prefix of the journal's unmoved
 * records (from meta "j_off" on: at most MOVE_MAX_RECORDS records or MOVE_MAX_BYTES of
 * values), puts each one into `pending` with MDB_APPEND (sequence numbers ascend along
 * the journal), adds them to the plugins' counters and to "bytes", and advances j_off,
 * all in the same transaction: a journal record reaches LMDB exactly once, whatever
 * process dies when. A record that fails its CRC is skipped and counted as damaged; the
 * move resynchronises on the next valid header (journal.c, spk_journal_resync).
 *
 * Who moves. Every reading call (read, ack, expire, purge, stats, verify) first moves what
 * the journal holds, so it sees every record appended before it, in sequence order; the
 * owner of the sync timer calls spk_queue_sync() when spk_queue_sync_due() says so; and an
 * append that finds the ring full moves one batch itself. With sync_always a move takes
 * records only up to where the journal is flushed (spk_journal_movable), so a record whose
 * flush failed is never moved, hence never sent.
 *
 * Releasing. Ring space is reused only after the LMDB flush that made its records durable
 * there (LMDB commits with MDB_NOMETASYNC). A releasing move (spk_queue_sync, reads, a full
 * ring) flushes after each batch and lets appends reuse that space at once
 * (spk_journal_release_upto), holding MOVER_BYTE meanwhile so that appends waiting for
 * room wait for it rather than move themselves. While appends keep refilling a quarter of
 * the ring it keeps moving, but starts no new batch after MOVE_EXTEND_NS.
 *
 * Full map or disk. A move stops short of filling the map (store.c, map_room_pages: acks
 * and expiry need pages to delete), and halves its batch when LMDB or the disk says full;
 * what was moved stays moved, the rest waits in the journal.
 */
#include "queue_int.h"

#include <errno.h>
#include <string.h>


#define MOVE_MAX_PLUGINS 32u
#define MOVE_EXTEND_NS (250 * 1000000ull) /* a move keeps up with new appends this long */

struct plugin_delta {
    uint32_t id;
    uint64_t count, bytes;
};

/* One transaction: move records from LMDB's journal position up to `end` (at most `limit`
 * records, `max_bytes` of values); with `drop` (purge) count them as purged instead.
 * *moved_to receives the new position; *damaged is increased by the damaged records
 * skipped. Returns an LMDB/errno code, or MOVE_MAP_FULL. */
int spk_mover_txn(spk_queue *q, uint64_t end, size_t limit, uint64_t max_bytes, bool drop,
                  uint64_t *moved_to, uint64_t *damaged)
{
    MDB_txn *txn = NULL;
    struct plugin_delta pd[MOVE_MAX_PLUGINS];
    size_t npd = 0;
    struct jbase b;
    uint64_t room16 = spk_store_map_room_pages(q), used16 = 16 * 8; /* and the DBs' roots */
    room16 = room16 > UINT64_MAX / 16 ? UINT64_MAX : room16 * 16;
    int rc = spk_store_txn_begin(q, 0, &txn);
    if (rc != 0)
        return rc;
    if ((rc = spk_store_jbase_read(q, txn, &b)) != 0)
        goto fail;
    uint64_t off = b.off, n = 0, bytes = 0, bad = 0, last = 0;
    bool soft_full = false;
    while (off < end && n < limit && bytes < max_bytes) {
        uint64_t seq = 0;
        const uint8_t *val;
        uint32_t vlen = 0;
        bool pad;
        size_t len = spk_journal_check(q, off, &seq, &val, &vlen, &pad);
        if (len != 0 && pad) {
            off += len;
            continue;
        }
        if (len == 0 || seq < b.next_seq || (last != 0 && seq <= last)) {
            bad++;
            off = spk_journal_resync(q, off, end);
            continue;
        }
        if (!drop) {
            used16 += spk_store_record_pages16(q, vlen);
            if (used16 > room16) {
                soft_full = true;
                break;
            }
            struct rec_hdr h;
            memcpy(&h, val, sizeof(h));
            size_t i = 0;
            while (i < npd && pd[i].id != h.plugin_id)
                i++;
            if (i == npd) {
                if (npd == MOVE_MAX_PLUGINS)
                    break; /* the next transaction takes it */
                pd[npd++] = (struct plugin_delta){h.plugin_id, 0, 0};
            }
            uint8_t kb[8];
            spk_be64(kb, seq);
            MDB_val k = {8, kb}, v = {vlen, (void *)val};
            if ((rc = mdb_put(txn, q->pending, &k, &v, MDB_APPEND)) != 0)
                goto fail;
            pd[i].count++;
            pd[i].bytes += vlen;
        }
        n++;
        bytes += vlen;
        last = seq;
        off += len;
    }
    if (soft_full && n == 0 && bad == 0) {
        rc = MOVE_MAP_FULL;
        goto fail;
    }
    for (size_t i = 0; i < npd; i++)
        if ((rc = spk_store_plugin_adjust(q, txn, pd[i].id, +1, pd[i].count, pd[i].bytes)) !=
            0)
            goto fail;
    if ((rc = spk_store_meta_put(txn, q->meta, "j_off", off)) != 0 ||
        (rc = spk_store_meta_put(txn, q->meta, "j_count", b.count + n)) != 0 ||
        (rc = spk_store_meta_put(txn, q->meta, "j_bytes", b.mbytes + bytes)) != 0 ||
        (!drop && (rc = spk_store_meta_put(txn, q->meta, "bytes", b.bytes + bytes)) != 0) ||
        (drop && n > 0 && (rc = spk_store_meta_add(txn, q->meta, "purged", n)) != 0) ||
        (last >= b.next_seq &&
         (rc = spk_store_meta_put(txn, q->meta, "next_seq", last + 1)) != 0) ||
        (bad > 0 && (rc = spk_store_meta_add(txn, q->meta, "damaged", bad)) != 0))
        goto fail;
    rc = spk_store_commit_mirrored(q, txn, true, NULL);
    if (rc != 0)
        return rc;
    *moved_to = off;
    *damaged += bad;
    return 0;
fail:
    mdb_txn_abort(txn);
    return rc;
}

/* Move every record published so far into LMDB (with a `budget` > 0: stop once that
 * many journal bytes are moved). With `release`, then flush LMDB and release the ring
 * space of everything moved. Returns 0, SPK_EQUEUE_UNAVAILABLE (map or
 * disk full: what was moved stays moved), SPK_EIO, or SPK_ECORRUPT when damaged records
 * were skipped (everything else was moved; the message says how many). */
int spk_mover_move(spk_queue *q, bool release, uint64_t budget, spk_errbuf *eb)
{
    uint64_t damaged = 0, end, moved_to = 0, at, start;
    int rc = 0;
    spk_journal_flush_published(q);
    if ((rc = spk_journal_lock(q, eb)) != 0)
        return rc;
    end = spk_journal_movable(q);
    at = start = q->jc->m_off;
    spk_journal_unlock(q);
    uint64_t t0 = spk_mono_ns();
    bool mover = release && spk_journal_mover_lock(q) == 0;
    size_t limit = MOVE_MAX_RECORDS;
    uint64_t max_bytes = MOVE_MAX_BYTES;
    bool moved_any = false;
    int failed = 0;
    bool extended = false;
    uint64_t synced_to = 0; /* this call flushed LMDB with the journal moved up to here */
    while (at < end) {
        if (extended && spk_mono_ns() - t0 >= MOVE_EXTEND_NS)
            break; /* the rest waits for the next call */
        uint64_t chunk = end - at < max_bytes ? end - at : max_bytes;
        int err = spk_store_ensure_headroom(q, chunk, eb);
        if (err != 0 && max_bytes > 65536) {
            max_bytes /= 2; /* a smaller batch may fit on the disk */
            continue;
        }
        if (err == 0) {
            rc = spk_mover_txn(q, end, limit, max_bytes, false, &moved_to, &damaged);
            if ((rc == MDB_MAP_FULL || rc == ENOSPC || rc == EIO) && limit > 1) {
                limit /= 2; /* a smaller batch may fit */
                max_bytes = max_bytes > 131072 ? max_bytes / 2 : max_bytes;
                continue;
            }
            if (rc == MOVE_MAP_FULL)
                rc = MDB_MAP_FULL; /* as full as moves may make it: acks need the rest */
            if (rc != 0)
                err = spk_store_err(q, rc, "move records from the journal", eb);
        }
        if (err != 0) {
            if (!moved_any)
                failed = err; /* still release what earlier moves (readers') put in LMDB */
            break;            /* release what was moved; the caller retries for the rest */
        }
        if (moved_to == at)
            break;
        /* Make this move durable at once (MDB_NOMETASYNC left its meta page unflushed)
         * and let appends reuse its ring space while this call goes on. */
        if (release && mdb_env_sync(q->env, 1) == 0) {
            spk_journal_release_upto(q, moved_to);
            synced_to = moved_to;
        }
        at = moved_to;
        moved_any = true;
        q->moved_txns++;
        if (budget > 0 && at - start >= budget)
            break;
        if (release && at >= end) {
            /* When appends made meanwhile filled a quarter of the ring again, keep moving
             * (up to one lap per call), rather than make them wait for the next call. */
            uint64_t tail = spk_journal_movable(q);
            if (tail - at >= q->jsize / 4 && tail - start <= q->jsize &&
                spk_mono_ns() - t0 < MOVE_EXTEND_NS) {
                end = tail;
                extended = true;
            }
        }
    }
    int final = 0;
    if (release && (final = spk_journal_lock(q, eb)) == 0) {
        uint64_t upto = q->jc->m_off; /* of a committed transaction */
        spk_journal_unlock(q);
        /* Flush unless this call's last batch did, and nobody moved further since. */
        if (upto != synced_to && (rc = mdb_env_sync(q->env, 1)) != 0)
            final = spk_errf(eb, SPK_EIO, "queue %s: sync: %s", q->path, mdb_strerror(rc));
        else
            spk_journal_release_upto(q, upto);
    }
    if (mover) /* after the last release, so that waiters find the room */
        spk_journal_mover_unlock(q);
    if (final != 0)
        return final;
    if (failed != 0)
        return failed;
    if (damaged > 0) {
        /* The skipped records were counted as published: count again from the journal. */
        if (spk_journal_lock(q, NULL) == 0) {
            spk_journal_rebuild_from_lmdb(q);
            spk_journal_unlock(q);
        }
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: journal: skipped %llu damaged record(s) "
                        "(a stray write by plugin code, or disk damage); every other record "
                        "was kept", q->path, (unsigned long long)damaged);
    }
    return 0;
}

/* Before reading LMDB: move what the journal holds, so readers see every pending record
 * in sequence order. Best effort: when the map or disk is full, what LMDB has is read. */
void spk_mover_consume_prepare(spk_queue *q)
{
    /* Take the journal's lock once: if a writer died holding it, the rebuild adopts the
     * record it had completed, so this call moves it rather than count it as staged. */
    if (spk_journal_lock(q, NULL) == 0)
        spk_journal_unlock(q);
    if (spk_journal_staged(q))
        spk_mover_move(q, false, 0, NULL);
}

/* spk_queue_read hands records to the uplink, which sends them: they must be durable in
 * LMDB first, or a power loss could take LMDB (and next_seq) back below sequence numbers
 * hubd has already seen, and new records would reuse them. So a read that moved anything
 * flushes, as spk_queue_sync does. */
void spk_mover_read_prepare(spk_queue *q)
{
    if (spk_journal_lock(q, NULL) == 0) /* as in consume_prepare */
        spk_journal_unlock(q);
    if (spk_journal_staged(q) ||
        atomic_load(&q->jc->released) !=
            atomic_load_explicit(&q->jc->m_off, memory_order_relaxed))
        spk_mover_move(q, true, 0, NULL);
}
