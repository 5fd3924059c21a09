/*
 * queue.c -- the public API of the durable edge-to-control queue (queue.h), built on the
 * parts described in queue_int.h.
 *
 * An enqueue validates the queue's own limits (record.c), encodes the record once and
 * appends it to the journal (journal.c); it never opens an LMDB transaction. Every other
 * call works on LMDB (store.c) after moving into it what the journal holds (mover.c), so
 * it sees every record appended before it, in sequence order: read copies the oldest
 * records out of one read snapshot, ack / expire / purge delete in write transactions
 * that keep the counters beside the records, stats and verify read one snapshot.
 * Deletes on a full map or disk go in smaller transactions, each freeing room for the
 * next. spk_queue_sync_due() is the one sync policy: the owner of the sync timer (the
 * supervisor, or a --single-process worker) polls it every SPK_QUEUE_SYNC_POLL_MS.
 */
#include "fs.h"
#include "queue_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPIRE_PER_TXN 10000u

static int64_t realtime_ms(void *arg)
{
    (void)arg;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t spk_queue_now_ms(const spk_queue *q)
{
    return q->opts.clock(q->opts.clock_arg);
}

void spk_queue_opts_init(spk_queue_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->max_pending = SPK_QUEUE_DEFAULT_MAX_PENDING;
    opts->max_bytes = SPK_QUEUE_DEFAULT_MAX_BYTES;
    opts->retention_ms = SPK_QUEUE_DEFAULT_RETENTION_MS;
    opts->sync_always = false;
    opts->sync_interval_ms = SPK_QUEUE_DEFAULT_SYNC_INTERVAL_MS;
    opts->map_size = SPK_QUEUE_DEFAULT_MAP_SIZE;
    opts->create = true;
    opts->journal_size = SPK_QUEUE_DEFAULT_JOURNAL_SIZE;
    opts->clock = NULL;
}

int spk_queue_count_refusal(spk_queue *q, int err)
{
    if (err == SPK_EQUEUE_FULL)
        q->refused_full++;
    else if (err == SPK_EQUEUE_UNAVAILABLE || err == SPK_EIO || err == SPK_ECORRUPT)
        q->refused_unavailable++;
    else if (err != 0)
        q->refused_invalid++;
    return err;
}

void spk_queue_refused(spk_queue *q, int err)
{
    if (q != NULL)
        spk_queue_count_refusal(q, err);
}

/* ---- open / close ---------------------------------------------------------------------- */

int spk_queue_open(const char *path, const spk_queue_opts *opts, spk_queue **out,
                   spk_errbuf *eb)
{
    spk_queue *q = NULL;
    int err;
    int rc;

    if (path == NULL || *path == '\0' || out == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no path given");
    *out = NULL;
    if (strlen(path) > QUEUE_PATH_MAX)
        return spk_errf(eb, SPK_EINVAL, "queue %.64s...: the path is %zu bytes long, more "
                        "than the %u a queue directory may have", path, strlen(path),
                        QUEUE_PATH_MAX);
    q = calloc(1, sizeof(*q));
    if (q == NULL)
        return spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", path);
    if (opts != NULL)
        q->opts = *opts;
    else
        spk_queue_opts_init(&q->opts);
    if (q->opts.clock == NULL)
        q->opts.clock = realtime_ms;
    if (q->opts.map_size == 0)
        q->opts.map_size = SPK_QUEUE_DEFAULT_MAP_SIZE;
    q->pid = getpid();
    q->fd = -1;
    q->cfd = q->jfd = -1;
    q->path = strdup(path);
    if (q->path == NULL) {
        err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", path);
        goto fail;
    }

    char data[QUEUE_FILE_MAX];
    snprintf(data, sizeof(data), "%s/data.mdb", path);
    struct stat st;
    if (!q->opts.create && stat(data, &st) != 0) {
        err = spk_errf(eb, SPK_ENOENT, "queue %s: no queue here (%s: %s)", path, data,
                       strerror(errno));
        goto fail;
    }
    if (q->opts.create && (rc = spk_mkdir_p(path, 0700)) != 0) {
        err = spk_errf(eb, rc == ENOSPC ? SPK_EQUEUE_UNAVAILABLE : SPK_EIO,
                       "queue %s: cannot create the directory: %s", path, strerror(rc));
        goto fail;
    }
    if (q->opts.journal_size < SPK_QUEUE_JOURNAL_MIN || q->opts.journal_size % 4096 != 0) {
        err = spk_errf(eb, SPK_EINVAL, "queue %s: journal size %llu: must be a multiple of "
                       "4096 and at least %u bytes", path,
                       (unsigned long long)q->opts.journal_size, SPK_QUEUE_JOURNAL_MIN);
        goto fail;
    }
    /* Every commit flushes its data pages before it writes its meta page, whatever the
     * policy: LMDB stays intact through a power loss, which can cost at most the last
     * transaction, whose records the journal still holds (journal.c). LMDB's map is
     * read-only: plugin code in this process cannot write into it. */
    if ((rc = mdb_env_create(&q->env)) != 0 || (rc = mdb_env_set_maxdbs(q->env, 8)) != 0 ||
        (rc = mdb_env_set_mapsize(q->env, q->opts.map_size)) != 0) {
        err = spk_store_err(q, rc, "create environment", eb);
        goto fail;
    }
    rc = mdb_env_open(q->env, path, MDB_NOMETASYNC, 0600);
    if (rc != 0) {
        err = rc == ENOENT ? spk_errf(eb, SPK_ENOENT, "queue %s: %s", path, mdb_strerror(rc))
                           : spk_store_err(q, rc, "open", eb);
        if (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH)
            err = spk_errf(eb, SPK_ECORRUPT, "queue %s: not an LMDB queue (%s)", path,
                           mdb_strerror(rc));
        goto fail;
    }
    /* LMDB leaves its data file's descriptor inheritable (lmdb.h, mdb_env_get_fd; its lock
     * file is close-on-exec): no program this process execs may hold the queue. */
    mdb_filehandle_t dfd;
    if ((rc = mdb_env_get_fd(q->env, &dfd)) != 0 ||
        (rc = fcntl(dfd, F_SETFD, FD_CLOEXEC) != 0 ? errno : 0) != 0) {
        err = spk_store_err(q, rc, "set close-on-exec", eb);
        goto fail;
    }
    int dead = 0;
    if (mdb_reader_check(q->env, &dead) == 0 && dead > 0)
        q->dead_readers = (uint64_t)dead;

    MDB_stat est;
    mdb_filehandle_t fd;
    if (mdb_env_stat(q->env, &est) == 0 && mdb_env_get_fd(q->env, &fd) == 0) {
        q->fd = fd;
        q->psize = est.ms_psize;
        q->reserve = q->opts.map_size / 64;
        if (q->reserve < 256 * 1024)
            q->reserve = 256 * 1024;
        if (q->reserve > 8 * 1024 * 1024)
            q->reserve = 8 * 1024 * 1024;
    }
    if ((err = spk_store_open_dbs(q, eb)) != 0)
        goto fail;
    if ((err = spk_journal_open(q, eb)) != 0)
        goto fail;
    *out = q;
    return 0;
fail:
    spk_journal_close(q);
    if (q->env != NULL)
        mdb_env_close(q->env);
    free(q->path);
    free(q);
    return err;
}

void spk_queue_close(spk_queue *q)
{
    if (q == NULL)
        return;
    /* In a forked child, mdb_env_close would clear the parent's reader slots (they carry
     * the parent's pid); leave the inherited environment alone. */
    if (q->pid == getpid()) {
        spk_journal_close(q);
        mdb_env_close(q->env);
    }
    free(q->path);
    free(q);
}

/* ---- enqueue --------------------------------------------------------------------------- */

int spk_queue_enqueue(spk_queue *q, const spk_queue_msg *m, uint64_t *seq_out,
                      uint64_t *pending_out, spk_errbuf *eb)
{
    struct rec_enc e;
    int err;
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    if ((err = spk_queue_validate(m, eb)) != 0)
        return spk_queue_count_refusal(q, err);
    spk_rec_prepare(&e, m);
    return spk_queue_count_refusal(q, spk_journal_append(q, &e, seq_out, pending_out, eb));
}

int spk_queue_send(spk_queue *q, uint32_t plugin_id, const char *edge_id,
                   const void *payload, size_t len, const char *correlation_id,
                   const spoke_kv *metadata, size_t n_metadata, bool json, int64_t now_ms,
                   uint64_t *seq, uint64_t *pending, spk_errbuf *eb)
{
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    spk_queue_msg m = {
        .plugin_id = plugin_id,
        .edge_id = edge_id,
        .payload = payload,
        .payload_len = len,
        .correlation_id = correlation_id,
        .metadata = metadata,
        .n_metadata = n_metadata,
        .content_type = json ? "application/json" : NULL,
        .edge_timestamp_ms = now_ms >= 0 ? now_ms : spk_queue_now_ms(q),
    };
    return spk_queue_enqueue(q, &m, seq, pending, eb);
}

/* ---- read ------------------------------------------------------------------------------- */

void spk_queue_batch_free(spk_queue_batch *batch)
{
    if (batch == NULL)
        return;
    free(batch->items);
    free(batch->buf);
    memset(batch, 0, sizeof(*batch));
}

int spk_queue_read(spk_queue *q, size_t max_n, size_t max_wire_bytes, spk_queue_batch *batch,
                   spk_errbuf *eb)
{
    return spk_queue_read_from(q, 0, max_n, max_wire_bytes, batch, eb);
}

int spk_queue_read_from(spk_queue *q, uint64_t from_seq, size_t max_n, size_t max_wire_bytes,
                        spk_queue_batch *batch, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    size_t cap = 0;
    int err = 0;
    int rc;

    if (batch == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no batch");
    memset(batch, 0, sizeof(*batch));
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    if (max_n == 0)
        return 0;
    spk_mover_read_prepare(q);
    if ((rc = spk_store_txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return spk_store_err(q, rc, "read", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail_lmdb;
    size_t n_items = ms.ms_entries < max_n ? ms.ms_entries : max_n;
    if (n_items == 0)
        goto done;
    batch->items = calloc(n_items, sizeof(*batch->items));
    if (batch->items == NULL) {
        err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
        goto fail;
    }
    uint8_t kb[8];
    spk_be64(kb, from_seq);
    MDB_val k = {8, kb}, v;
    rc = mdb_cursor_get(cur, &k, &v, from_seq > 0 ? MDB_SET_RANGE : MDB_FIRST);
    while (rc == 0 && batch->n < n_items) {
        struct rec_view r;
        spk_queue_item *it = &batch->items[batch->n];
        it->seq = k.mv_size == 8 ? spk_get_be64(k.mv_data) : 0;
        it->status = spk_rec_parse(&v, &r);
        if (it->status == 0)
            it->status = spk_rec_check(&r);
        if (it->status == 0) {
            if (max_wire_bytes > 0 && batch->n > 0 &&
                batch->wire_bytes + r.h.wire_len > max_wire_bytes)
                break;
            if (batch->wire_bytes + r.h.wire_len > cap) {
                size_t ncap = cap * 2 > batch->wire_bytes + r.h.wire_len
                                  ? cap * 2 : batch->wire_bytes + r.h.wire_len;
                uint8_t *nbuf = realloc(batch->buf, ncap > 0 ? ncap : 1);
                if (nbuf == NULL) {
                    err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
                    goto fail;
                }
                batch->buf = nbuf;
                cap = ncap;
            }
            if (r.h.wire_len > 0) /* an empty one (damage, but CRC-valid) has no buffer */
                memcpy(batch->buf + batch->wire_bytes, r.wire, r.h.wire_len);
            it->plugin_id = r.h.plugin_id;
            it->edge_timestamp_ms = r.h.ts_ms;
            it->wire_len = r.h.wire_len;
            batch->wire_bytes += r.h.wire_len;
        } else {
            it->wire_len = 0; /* skip its bytes; the caller acks it away */
        }
        batch->n++;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc != 0 && rc != MDB_NOTFOUND)
        goto fail_lmdb;
    /* Point items into the final buffer (it may have moved while growing). */
    size_t off = 0;
    for (size_t i = 0; i < batch->n; i++) {
        batch->items[i].wire = batch->buf != NULL ? batch->buf + off : NULL;
        off += batch->items[i].wire_len;
    }
done:
    if (cur != NULL)
        mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return 0;
fail_lmdb:
    err = spk_store_err(q, rc, "read", eb);
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    spk_queue_batch_free(batch);
    return err;
}

/* ---- ack / expire / purge ------------------------------------------------------------- */

int spk_queue_ack(spk_queue *q, const uint64_t *seqs, size_t n, size_t *acked, spk_errbuf *eb)
{
    if (acked != NULL)
        *acked = 0;
    if (q == NULL || (seqs == NULL && n > 0))
        return spk_errf(eb, SPK_EINVAL, "queue: no handle or sequence list");
    if (n == 0)
        return 0;
    spk_mover_consume_prepare(q); /* a record may be acked before a read moved it */
    /* Deleting copies every leaf it touches, so a big ack on a full map or disk may not
     * fit in one transaction: then it goes in smaller ones, each freeing room for those
     * after it. */
    size_t done = 0, total = 0, chunk = n;
    while (done < n) {
        size_t m = n - done < chunk ? n - done : chunk, count = 0;
        int rc = spk_store_ack_txn(q, seqs + done, m, &count);
        if ((rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT) && m > 1) {
            chunk = m / 2;
            continue;
        }
        if (rc != 0) {
            if (acked != NULL)
                *acked = total;
            return spk_store_err(q, rc, "ack", eb);
        }
        total += count;
        done += m;
    }
    if (acked != NULL)
        *acked = total;
    return 0;
}

int spk_queue_expire(spk_queue *q, uint64_t *expired, spk_errbuf *eb)
{
    uint64_t total = 0;
    int rc;

    if (expired != NULL)
        *expired = 0;
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    if (q->opts.retention_ms == 0)
        return 0;
    spk_mover_consume_prepare(q);
    int64_t cutoff = spk_queue_now_ms(q) - (int64_t)q->opts.retention_ms;
    /* Bounded transactions, so a huge backlog does not make one huge dirty set. */
    for (;;) {
        MDB_txn *txn = NULL;
        MDB_cursor *cur = NULL;
        uint64_t freed = 0, n = 0;
        bool more = false;
        if ((rc = spk_store_txn_begin(q, 0, &txn)) != 0)
            return spk_store_err(q, rc, "expire", eb);
        if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
            goto fail;
        MDB_val k, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        while (rc == 0) {
            struct rec_view r;
            if (spk_rec_parse(&v, &r) == 0 && r.h.ts_ms >= cutoff)
                break; /* a corrupt header counts as expired: it cannot be sent anyway */
            if (n == EXPIRE_PER_TXN) {
                more = true;
                break;
            }
            if ((rc = spk_store_del_current(q, txn, cur, &v, &freed)) != 0)
                goto fail;
            n++;
            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); /* we always delete the oldest */
        }
        if (rc != 0 && rc != MDB_NOTFOUND)
            goto fail;
        mdb_cursor_close(cur);
        cur = NULL;
        if (n > 0 && (rc = spk_store_finish_delete(q, txn, freed, "expired", n)) != 0)
            goto fail;
        rc = spk_store_commit_mirrored(q, txn, n > 0, NULL);
        txn = NULL;
        if (rc != 0)
            goto fail;
        total += n;
        if (!more)
            break;
        continue;
    fail:
        if (cur != NULL)
            mdb_cursor_close(cur);
        if (txn != NULL)
            mdb_txn_abort(txn);
        if (expired != NULL)
            *expired = total;
        return spk_store_err(q, rc, "expire", eb);
    }
    if (total > 0)
        spk_store_free_space_now(q);
    if (expired != NULL)
        *expired = total;
    return 0;
}

int spk_queue_purge(spk_queue *q, uint64_t *purged, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    int rc;

    if (purged != NULL)
        *purged = 0;
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    /* The journal's records are pending too: moved if they fit, dropped below if not. */
    spk_mover_move(q, false, 0, NULL);
    if ((rc = spk_store_txn_begin(q, 0, &txn)) != 0)
        return spk_store_err(q, rc, "purge", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_drop(txn, q->pending, 0)) != 0 || (rc = mdb_drop(txn, q->plugins, 0)) != 0 ||
        (rc = spk_store_meta_put(txn, q->meta, "bytes", 0)) != 0 ||
        (rc = spk_store_meta_add(txn, q->meta, "purged", ms.ms_entries)) != 0)
        goto fail;
    struct jbase jb;
    rc = spk_store_commit_mirrored(q, txn, true, &jb);
    txn = NULL;
    if (rc != 0)
        goto fail;
    spk_store_free_space_now(q);
    uint64_t total = ms.ms_entries;
    /* What the map could not take: drop it from the journal, counted as purged. */
    if (spk_journal_lock(q, eb) == 0) {
        uint64_t end = spk_journal_movable(q);
        uint64_t at = q->jc->m_off, dropped_to, bad = 0;
        spk_journal_unlock(q);
        while (at < end) {
            uint64_t before = jb.count;
            if ((rc = spk_mover_txn(q, end, MOVE_MAX_RECORDS, UINT64_MAX, true, &dropped_to,
                                    &bad)) != 0)
                return spk_store_err(q, rc, "purge the journal", eb);
            if (dropped_to == at)
                break;
            at = dropped_to;
            if (spk_journal_lock(q, NULL) == 0) {
                total += q->jc->m_count - before;
                jb.count = q->jc->m_count;
                spk_journal_unlock(q);
            }
        }
    }
    if (purged != NULL)
        *purged = total;
    return 0;
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    return spk_store_err(q, rc, "purge", eb);
}

/* ---- stats / sync ---------------------------------------------------------------------- */

void spk_queue_stats_free(spk_queue_stats *st)
{
    if (st == NULL)
        return;
    free(st->plugins);
    st->plugins = NULL;
    st->n_plugins = 0;
}

int spk_queue_stats_get(spk_queue *q, spk_queue_stats *st, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    int err;
    int rc;

    if (st == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no stats");
    memset(st, 0, sizeof(*st));
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    st->refused_full = q->refused_full;
    st->refused_unavailable = q->refused_unavailable;
    st->refused_invalid = q->refused_invalid;
    st->dead_readers_cleared = q->dead_readers;
    spk_mover_consume_prepare(q);
    if ((rc = spk_store_txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return spk_store_err(q, rc, "stats", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0)
        goto fail_lmdb;
    st->pending = ms.ms_entries;
    st->pending_bytes = spk_store_meta_get(txn, q->meta, "bytes");
    st->next_seq = spk_store_meta_get(txn, q->meta, "next_seq");
    st->acked = spk_store_meta_get(txn, q->meta, "acked");
    st->expired = spk_store_meta_get(txn, q->meta, "expired");
    st->purged = spk_store_meta_get(txn, q->meta, "purged");
    st->damaged = spk_store_meta_get(txn, q->meta, "damaged");
    uint64_t jcount = spk_store_meta_get(txn, q->meta, "j_count");
    uint64_t jbytes = spk_store_meta_get(txn, q->meta, "j_bytes");

    MDB_val k, v;
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail_lmdb;
    if (mdb_cursor_get(cur, &k, &v, MDB_FIRST) == 0) {
        struct rec_view r;
        st->oldest_seq = k.mv_size == 8 ? spk_get_be64(k.mv_data) : 0;
        int64_t now = spk_queue_now_ms(q);
        /* a damaged header's timestamp can be anything: subtract without overflow */
        if (spk_rec_parse(&v, &r) == 0 && r.h.ts_ms < now) {
            uint64_t age = (uint64_t)now - (uint64_t)r.h.ts_ms;
            st->oldest_age_ms = age > INT64_MAX ? INT64_MAX : (int64_t)age;
        }
    }
    mdb_cursor_close(cur);
    cur = NULL;

    if ((rc = mdb_stat(txn, q->plugins, &ms)) != 0 ||
        (rc = mdb_cursor_open(txn, q->plugins, &cur)) != 0)
        goto fail_lmdb;
    if (ms.ms_entries > 0) {
        st->plugins = calloc(ms.ms_entries, sizeof(*st->plugins));
        if (st->plugins == NULL) {
            err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
            goto fail;
        }
    }
    rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (rc == 0 && st->n_plugins < ms.ms_entries) {
        uint64_t c[2] = {0, 0};
        if (k.mv_size == 4 && v.mv_size == sizeof(c)) {
            const uint8_t *kb = k.mv_data;
            memcpy(c, v.mv_data, sizeof(c));
            spk_queue_plugin_stat *ps = &st->plugins[st->n_plugins++];
            ps->plugin_id = (uint32_t)kb[0] << 24 | (uint32_t)kb[1] << 16 |
                            (uint32_t)kb[2] << 8 | kb[3];
            ps->pending = c[0];
            ps->bytes = c[1];
        }
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc != 0 && rc != MDB_NOTFOUND)
        goto fail_lmdb;
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    /* Records appended since the snapshot's move are pending too. (After the read
     * transaction: a locker may have to rebuild, which opens one of its own.) */
    struct jctl *c = q->jc;
    if (spk_journal_lock(q, NULL) == 0) {
        st->staged = c->pub_count > jcount ? c->pub_count - jcount : 0;
        st->pending += st->staged;
        st->pending_bytes += c->pub_bytes > jbytes ? c->pub_bytes - jbytes : 0;
        if (c->next_seq > st->next_seq)
            st->next_seq = c->next_seq;
        st->journal_used = atomic_load(&c->tail) - atomic_load(&c->released);
        spk_journal_unlock(q);
    }
    st->journal_size = q->jsize;
    return 0;
fail_lmdb:
    err = spk_store_err(q, rc, "stats", eb);
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    spk_queue_stats_free(st);
    return err;
}

double spk_queue_journal_fill(const spk_queue *q)
{
    if (q == NULL || q->jc == NULL || q->jsize == 0)
        return 0.0;
    uint64_t used = atomic_load_explicit(&q->jc->tail, memory_order_relaxed) -
                    atomic_load_explicit(&q->jc->released, memory_order_relaxed);
    return used >= q->jsize ? 1.0 : (double)used / (double)q->jsize;
}


int spk_queue_sync(spk_queue *q, spk_errbuf *eb)
{
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    int rc = spk_mover_move(q, true, 0, eb);
    /* Damaged records were skipped and everything else moved: the sync did its work. */
    if (rc == 0 || rc == SPK_ECORRUPT)
        q->sync_failures = 0;
    else if (q->sync_failures < UINT_MAX)
        q->sync_failures++;
    return rc;
}

unsigned spk_queue_sync_failures(const spk_queue *q)
{
    return q != NULL ? q->sync_failures : 0;
}

uint64_t spk_queue_sync_retry_ms(const spk_queue *q)
{
    if (q == NULL || q->sync_failures == 0)
        return 0;
    uint64_t ms = SPK_QUEUE_SYNC_RETRY_MIN_MS;
    for (unsigned i = 1; i < q->sync_failures && ms < SPK_QUEUE_SYNC_RETRY_MAX_MS; i++)
        ms *= 2;
    return ms < SPK_QUEUE_SYNC_RETRY_MAX_MS ? ms : SPK_QUEUE_SYNC_RETRY_MAX_MS;
}

bool spk_queue_sync_due(const spk_queue *q, uint64_t ms_since_last_sync)
{
    if (q == NULL)
        return false;
    /* After a failure, only the backoff decides: neither the interval nor a full journal
     * makes a failing disk worth more than one attempt per delay. */
    if (q->sync_failures > 0)
        return ms_since_last_sync >= spk_queue_sync_retry_ms(q);
    /* always: appends are durable in the journal already; moving them is for readers (who
     * move what they need themselves) and for space, so only a quarter-full journal is
     * moved: a move's flushes would compete with the appends' own. */
    if (!q->opts.sync_always && ms_since_last_sync >= q->opts.sync_interval_ms)
        return true;
    return spk_queue_journal_fill(q) >= SPK_QUEUE_SYNC_FILL;
}

/* ---- verify ------------------------------------------------------------------------------ */

/* One read snapshot: records, their CRCs and order, and the counters kept beside them. */
int spk_queue_verify(spk_queue *q, uint64_t *bad_out, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t n = 0, bytes = 0, bad = 0, prev = 0;
    bool unordered = false;
    int rc;

    if (bad_out != NULL)
        *bad_out = 0;
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    spk_mover_consume_prepare(q);
    if ((rc = spk_store_txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return spk_store_err(q, rc, "verify", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    MDB_val k, v;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        struct rec_view r;
        uint64_t seq = k.mv_size == 8 ? spk_get_be64(k.mv_data) : 0;
        if (seq <= prev)
            unordered = true;
        prev = seq;
        n++;
        int st = spk_rec_parse(&v, &r);
        bytes += r.size;
        if (st != 0 || spk_rec_check(&r) != 0)
            bad++;
    }
    if (rc != MDB_NOTFOUND)
        goto fail;
    mdb_cursor_close(cur);
    cur = NULL;
    uint64_t pl_count = 0, pl_bytes = 0;
    uint64_t meta_bytes = spk_store_meta_get(txn, q->meta, "bytes");
    if ((rc = spk_store_sum_counters(txn, q->plugins, &pl_count, &pl_bytes)) != 0)
        goto fail;
    mdb_txn_abort(txn);
    txn = NULL;
    if (bad_out != NULL)
        *bad_out = bad;
    if (bad > 0 || unordered || n != ms.ms_entries || bytes != meta_bytes || n != pl_count ||
        bytes != pl_bytes)
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: damaged: %llu of %llu records fail their "
                        "CRC%s; walked %llu records / %llu bytes, counters say %llu entries, "
                        "%llu bytes, per plugin %llu records / %llu bytes", q->path,
                        (unsigned long long)bad, (unsigned long long)n,
                        unordered ? ", keys out of order" : "", (unsigned long long)n,
                        (unsigned long long)bytes, (unsigned long long)ms.ms_entries,
                        (unsigned long long)meta_bytes, (unsigned long long)pl_count,
                        (unsigned long long)pl_bytes);
    return 0;
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    return spk_store_err(q, rc, "verify", eb);
}
