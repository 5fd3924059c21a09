/*
 * upgrade.c -- opening a format-2 queue: its large records are read out of their segment
 * files once and put into LMDB, after which the queue is format 3 and the files go.
 *
 * Format 2 kept the value of a record too large for an LMDB leaf in a segment file
 * (seg-<k in 16 hex digits>, segment k holding offsets [k*S, (k+1)*S) of one segment
 * space, S = meta "seg_size"), and in `pending` a 32-byte reference: the record's header
 * with magic "SPQR", then the value's offset. A `segs` DB counted each segment's pending
 * records; meta "s_end" said where the next value would go; emptied files were kept as
 * spare-*.
 *
 * The upgrade runs in spk_queue_open (store.c, spk_store_open_dbs), before the journal is
 * opened, so no caller ever sees a reference. In write transactions of at most
 * UPGRADE_BYTES / UPGRADE_RECORDS, it replaces each reference by the value read from its
 * segment: header magic "SPQ1" and the same CRC, plugin, length and timestamp, then the
 * wire bytes. A record's stored size (header + wire bytes) is what it was, so "bytes" and
 * the per-plugin counters do not change. A value that cannot be read (file lost, short)
 * is stored as zeros under its header: it fails its CRC, so reads report it SPK_ECORRUPT
 * and verify counts it, exactly as format 2 did for damaged segments. The last
 * transaction drops `segs`, "s_end" and "seg_size" and sets "format" to 3; then LMDB is
 * flushed, and only then are seg-* and spare-* deleted. A crash at any point leaves either
 * format 2 with some records already inline (the next open goes on where it stopped:
 * references are recognised by their magic) or format 3 with files left over, which the
 * first process to open the queue deletes (journal.c, spk_journal_open). Several
 * processes opening at once take turns on LMDB's writer lock; the work is idempotent.
 *
 * Every process that used the old code must be stopped before the new code opens the
 * queue (docs/queue.md, "Upgrading a format-2 queue").
 */
#include "queue_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define REF_MAGIC 0x52515053u /* "SPQR" */
#define UPGRADE_BYTES (16u << 20)
#define UPGRADE_RECORDS 4096u

struct rec_ref {
    struct rec_hdr h;
    uint64_t soff;
};

/* Read the value a reference points to into dst (wire_len bytes after the header); zeros
 * where it cannot be read. */
static void read_value(const spk_queue *q, uint64_t seg_size, const struct rec_ref *ref,
                       uint8_t *dst)
{
    size_t want = sizeof(struct rec_hdr) + ref->h.wire_len;
    memset(dst, 0, want);
    if (seg_size == 0)
        return;
    char name[QUEUE_FILE_MAX];
    snprintf(name, sizeof(name), "%s/seg-%016llx", q->path,
             (unsigned long long)(ref->soff / seg_size));
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    size_t got = 0;
    while (got < want) {
        ssize_t n = pread(fd, dst + got, want - got, (off_t)(ref->soff % seg_size + got));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    if (got < want)
        memset(dst, 0, want);
}

/* One transaction, from sequence number *from on. Sets *done when nothing is left. */
static int upgrade_txn(spk_queue *q, uint64_t *from, bool *done, uint8_t **buf, size_t *cap)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    int rc = spk_store_txn_begin(q, 0, &txn);
    if (rc != 0)
        return rc;
    if (spk_store_meta_get(txn, q->meta, "format") != 2) {
        mdb_txn_abort(txn);
        *done = true;
        return 0;
    }
    uint64_t seg_size = spk_store_meta_get(txn, q->meta, "seg_size");
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    uint8_t kb[8];
    spk_be64(kb, *from);
    MDB_val k = {8, kb}, v;
    uint64_t n = 0, bytes = 0;
    bool more = false;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        struct rec_ref ref;
        if (v.mv_size != sizeof(ref))
            continue;
        memcpy(&ref, v.mv_data, sizeof(ref));
        if (ref.h.magic != REF_MAGIC || ref.h.wire_len > SPK_QUEUE_RECORD_MAX)
            continue;
        if (n >= UPGRADE_RECORDS || bytes >= UPGRADE_BYTES) {
            *from = k.mv_size == 8 ? spk_get_be64(k.mv_data) : *from;
            more = true;
            break;
        }
        size_t len = sizeof(struct rec_hdr) + ref.h.wire_len;
        if (len > *cap) {
            uint8_t *nb = realloc(*buf, len);
            if (nb == NULL) {
                rc = ENOMEM;
                goto fail;
            }
            *buf = nb;
            *cap = len;
        }
        read_value(q, seg_size, &ref, *buf);
        struct rec_hdr h = ref.h;
        h.magic = REC_MAGIC;
        memcpy(*buf, &h, sizeof(h)); /* the reference's header is the one LMDB vouched for */
        /* k points into the page the put rewrites: pass a copy */
        uint8_t kcopy[8];
        if (k.mv_size != sizeof(kcopy))
            continue;
        memcpy(kcopy, k.mv_data, sizeof(kcopy));
        MDB_val kc = {sizeof(kcopy), kcopy}, nv = {len, *buf};
        if ((rc = mdb_cursor_put(cur, &kc, &nv, MDB_CURRENT)) != 0)
            goto fail;
        n++;
        bytes += len;
    }
    if (rc != 0 && rc != MDB_NOTFOUND && !more)
        goto fail;
    mdb_cursor_close(cur);
    cur = NULL;
    if (!more) {
        MDB_dbi segs;
        MDB_val sk = {5, "s_end"}, zk = {8, "seg_size"};
        if ((rc = mdb_dbi_open(txn, "segs", 0, &segs)) == 0)
            rc = mdb_drop(txn, segs, 1);
        if (rc != 0 && rc != MDB_NOTFOUND)
            goto fail;
        if (((rc = mdb_del(txn, q->meta, &sk, NULL)) != 0 && rc != MDB_NOTFOUND) ||
            ((rc = mdb_del(txn, q->meta, &zk, NULL)) != 0 && rc != MDB_NOTFOUND) ||
            (rc = spk_store_meta_put(txn, q->meta, "format", 3)) != 0)
            goto fail;
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        return rc;
    *done = !more;
    return 0;
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return rc;
}

int spk_store_upgrade2(spk_queue *q, spk_errbuf *eb)
{
    uint64_t from = 0;
    bool done = false;
    uint8_t *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    while (!done && (rc = upgrade_txn(q, &from, &done, &buf, &cap)) == 0)
        ;
    free(buf);
    if (rc == 0)
        rc = mdb_env_sync(q->env, 1); /* durable before the files it replaces go */
    if (rc != 0)
        return spk_store_err(q, rc, "upgrade from format 2 (records in segment files are "
                             "moved into LMDB; a full map needs a bigger queue.map_size)", eb);
    spk_store_drop_segment_files(q);
    return 0;
}

void spk_store_drop_segment_files(const spk_queue *q)
{
    DIR *d = opendir(q->path);
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (!((strncmp(de->d_name, "seg-", 4) == 0 && len == 20) ||
              (strncmp(de->d_name, "spare-", 6) == 0 && len == 22)))
            continue;
        char name[QUEUE_FILE_MAX];
        snprintf(name, sizeof(name), "%s/%s", q->path, de->d_name);
        unlink(name);
    }
    if (d != NULL)
        closedir(d);
}
