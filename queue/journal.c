/*
 * journal.c -- the ring every enqueue appends to, shared by every process of the queue.
 *
 * Why. A committed LMDB write transaction costs a few microseconds even with nothing to
 * flush: it copies every page on the path it changes (the record's leaf, the meta and
 * plugins DBs, the free list), and several workers take turns on LMDB's one writer lock.
 * So send_to_control does not write LMDB: it appends the record, already in its final
 * stored form (record.c), to the journal and returns. Records are moved from the journal
 * into LMDB in batches (mover.c) by whoever consumes the queue (spk_queue_read, _stats_get,
 * _expire, _purge, _verify) and by spk_queue_sync, which the owner of the sync timer calls
 * when spk_queue_sync_due() says so. A record is "pending" from its append until it is
 * acknowledged; where it sits is invisible to callers.
 *
 * Files. `journal`: the ring, journal_size bytes, allocated and written in full at
 * creation (so an append never needs a disk block: no ENOSPC, no SIGBUS through the map).
 * `journal.ctl`: one page of shared state (struct jctl, queue_int.h), rebuilt from LMDB
 * and the journal whenever the first process opens the queue, so it never needs to reach
 * the disk.
 *
 * Records. At absolute byte offset `off` (position off % size) a record is a 32-byte
 * struct jrec {magic, crc of the rest of the header, off, seq, len} followed by `len`
 * bytes of exactly the LMDB value (record.c), padded to 8 bytes. A record never wraps:
 * the rest of the ring is skipped, with a pad record when 32 bytes or more are left.
 * Storing the absolute offset in each header makes a record of an earlier lap at the same
 * position invalid, so a scan stops exactly at the end of what was written in this lap.
 *
 * Appending. Under jctl.lock (a robust, process-shared mutex, held for the copy of one
 * record): check the limits against the pending counts (below), take the next sequence
 * number, write the record at `tail`, then publish it by advancing `tail` (a release
 * store). Sequence numbers are handed out in journal order, and a move always takes a
 * prefix of the journal, so LMDB holds a prefix of the sequence: the uplink reads in
 * sequence order. A writer killed while holding the lock leaves it EOWNERDEAD; the next
 * locker rebuilds the shared state (journal_rebuild) before going on.
 *
 * Space. A record is in the ring from its append until a move put it in LMDB *and* an
 * LMDB flush made that move durable; only then does `released` pass it and its bytes can
 * be reused. An append that finds the ring full waits for the process moving it, if one is
 * at work (an OFD lock on MOVER_BYTE; futex on release_gen, at most APPEND_WAIT_MAX_NS), or
 * moves and flushes itself, then retries; only if that cannot free room (the LMDB map or
 * disk is full) is it refused.
 *
 * Counting. The pending count and bytes (queue.max_pending, queue.max_bytes, the returned
 * `pending`) are: LMDB's pending records, plus the records published but not yet moved.
 * Every LMDB transaction that changes them mirrors, after its commit and under the lock,
 * its counts and the journal position it moved up to (`m_*`, guarded by the transaction
 * ID so an older one never overwrites a newer one); staged = pub_count - m_count. A
 * process killed between a commit and its mirror update leaves the mirror one transaction
 * behind, which the next transaction corrects; until then the counts are over, never
 * under, the truth.
 *
 * Durability. interval: an append is a copy into the shared mapping, in the page cache as
 * soon as it is made, so it survives a crash of any process at once; spk_queue_sync moves
 * it into LMDB and flushes LMDB, which makes it safe from power loss. always: the record
 * is written with pwrite() and the journal is flushed (fdatasync) before the call returns;
 * concurrent callers of all processes share flushes (GROUP COMMIT below), and a move takes
 * records only up to `synced`, so a record is never sent before its flush succeeded.
 * LMDB runs with MDB_NOMETASYNC: every commit flushes its data pages before writing its
 * meta page, so a power loss can cost at most the last transaction, never the file's
 * integrity, and that transaction's records are still in the journal (not yet released).
 *
 * Damage. Plugin code runs in the writers' processes and the ring is mapped writable
 * there. A stray store into a published record makes it fail its header or value CRC when
 * it is moved: it is skipped, counted (meta "damaged", spk_queue_stats.damaged), the move
 * resynchronises on the next valid header, and spk_queue_sync reports it. Guard pages
 * flank the mapping. docs/queue.md has the whole argument.
 */
#include "queue_int.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"

#define JCTL_MAGIC 0x344c54434a4b5053ull /* "SPKJCTL4": the latch fields were added */
#define JLOCK_SPINS 200

static ssize_t plain_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    return pwrite(fd, buf, n, off);
}

ssize_t (*spk_journal_pwrite_fn)(int fd, const void *buf, size_t n, off_t off) = plain_pwrite;
int (*spk_journal_fdatasync_fn)(int fd) = fdatasync;

/* Write all n bytes at off, resuming after short writes. A short write leaves errno as it
 * was, so only a failed call's errno is believed; one that makes no progress means the
 * disk is full. Returns 0 or an errno value. */
static int pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = spk_journal_pwrite_fn(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno != 0 ? errno : EIO;
        if (w == 0)
            return ENOSPC;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

uint64_t spk_mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int journal_recover(spk_queue *q);

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

uint32_t spk_journal_hcrc(const struct jrec *h)
{
    return ~spk_crc32c(0xFFFFFFFFu, &h->off, sizeof(*h) - offsetof(struct jrec, off));
}

/* Under lock: adopt the state of a committed transaction unless a newer one is there. */
void spk_journal_mirror(struct jctl *c, const struct jbase *b)
{
    if (b->txnid < c->m_txnid)
        return;
    c->m_txnid = b->txnid;
    c->m_pending = b->pending;
    c->m_bytes = b->bytes;
    c->m_off = b->off;
    c->m_count = b->count;
    c->m_mbytes = b->mbytes;
    if (b->next_seq > c->next_seq)
        c->next_seq = b->next_seq;
    /* released never passes what LMDB has (it may have gone back after a power loss) */
    if (atomic_load_explicit(&c->released, memory_order_relaxed) > b->off)
        atomic_store_explicit(&c->released, b->off, memory_order_relaxed);
}

/* Check the record at absolute offset `off`. Returns its length in the ring (header,
 * value, padding) and fills the out-parameters, or 0 when there is no valid record there.
 * *pad is set for a pad record or the implicit skip at the end of a lap (val is NULL). */
size_t spk_journal_check(const spk_queue *q, uint64_t off, uint64_t *seq, const uint8_t **val,
                         uint32_t *vlen, bool *pad)
{
    uint64_t size = q->jsize;
    uint64_t pos = off % size;
    *pad = false;
    *val = NULL;
    if (size - pos < JREC_HDR) {
        *pad = true;
        return (size_t)(size - pos);
    }
    struct jrec h;
    memcpy(&h, q->jmap + pos, sizeof(h));
    if (h.off != off || h.zero != 0 || spk_journal_hcrc(&h) != h.hcrc)
        return 0;
    if (h.magic == JPAD_MAGIC) {
        if (h.len != size - pos)
            return 0;
        *pad = true;
        return h.len;
    }
    if (h.magic != JREC_MAGIC || h.len < sizeof(struct rec_hdr) ||
        pos + JREC_HDR + h.len > size)
        return 0;
    const uint8_t *v = q->jmap + pos + JREC_HDR;
    if (!spk_rec_valid(v, h.len))
        return 0;
    *seq = h.seq;
    *val = v;
    *vlen = h.len;
    return align8(JREC_HDR + h.len);
}

#define REBUILD_RESYNC (SPK_QUEUE_JOURNAL_MIN / 2)

/* Walk the valid records from LMDB's journal position on and rebuild the shared state
 * from them and from LMDB's base `b`: at the first open (`first`: LMDB was just flushed,
 * so everything it has moved is durable and the ring before it is free), after a process
 * died holding the lock, and after a move skipped damage. Called alone or under the
 * lock. A stretch that is not a valid record is damage (a stray write, or a page lost to
 * a power failure) if a valid record of this lap with a later sequence number follows
 * it within the ring, and the end otherwise: a half-written append is always the last
 * thing written, and records of earlier laps carry other offsets. Damage is kept inside
 * the published range, for the next move to skip and count. Returns the records found. */
static uint64_t journal_rebuild(spk_queue *q, const struct jbase *b, bool first)
{
    struct jctl *c = q->jc;
    uint64_t off = b->off, good = b->off, n = 0, bytes = 0, last = 0, seq = 0;
    uint64_t limit = b->off + q->jsize;
    const uint8_t *val;
    uint32_t vlen = 0;
    bool pad;
    while (off < limit) {
        size_t len = spk_journal_check(q, off, &seq, &val, &vlen, &pad);
        if (len != 0 && off + len > limit)
            break;
        if (len != 0 && pad) {
            off += len;
            continue;
        }
        if (len == 0 || seq < b->next_seq || (n > 0 && seq <= last)) {
            /* The end, unless a valid record of this lap follows. Damage spans at most one
             * record (the largest is under REBUILD_RESYNC), so look no further than that:
             * a scan to the end of the ring would read all of it at every first open. */
            uint64_t end = off + REBUILD_RESYNC < limit ? off + REBUILD_RESYNC : limit;
            off = spk_journal_resync(q, off, end);
            if (off == end)
                break;
            continue;
        }
        last = seq;
        n++;
        bytes += vlen;
        off += len;
        good = off;
    }
    /* Under the lock (not `first`), everything below the tail was published: a stretch
     * that scans as damaged there stays published (a move may already hold that end, and
     * moves skip damage), so the tail never goes back. */
    uint64_t old_tail = atomic_load(&c->tail);
    if (!first && old_tail > good && old_tail - b->off <= q->jsize)
        good = old_tail;
    c->m_txnid = 0;
    if (first)
        atomic_store(&c->released, b->off);
    spk_journal_mirror(c, b);
    if (last + 1 > c->next_seq)
        c->next_seq = last + 1;
    if (c->next_seq == 0)
        c->next_seq = 1;
    atomic_store(&c->tail, good);
    c->pub_count = b->count + n;
    c->pub_bytes = b->mbytes + bytes;
    if (atomic_load(&c->synced) > good)
        atomic_store(&c->synced, good);
    return n;
}

/* Rebuild from LMDB's committed state (a read transaction: no writer lock needed). */
int spk_journal_rebuild_from_lmdb(spk_queue *q)
{
    MDB_txn *txn;
    struct jbase b;
    int rc = spk_store_txn_begin(q, MDB_RDONLY, &txn);
    if (rc != 0)
        return rc;
    rc = spk_store_jbase_read(q, txn, &b);
    mdb_txn_abort(txn);
    if (rc == 0) {
        journal_rebuild(q, &b, false);
        q->rebuilds++;
    }
    return rc;
}

int spk_journal_lock(spk_queue *q, spk_errbuf *eb)
{
    pthread_mutex_t *m = &q->jc->lock;
    int rc = EBUSY;
    for (int i = 0; i < JLOCK_SPINS && rc == EBUSY; i++) {
        rc = pthread_mutex_trylock(m);
#if defined(__x86_64__)
        if (rc == EBUSY)
            __builtin_ia32_pause();
#endif
    }
    if (rc == EBUSY)
        rc = pthread_mutex_lock(m);
    if (rc == EOWNERDEAD) {
        /* Its holder died: the shared state may be half-updated. The mutex is made
         * consistent at once (a mutex unlocked without that is unusable for good), and
         * the flag makes every locker rebuild until one succeeds. */
        q->jc->need_rebuild = 1;
        pthread_mutex_consistent(m);
        rc = 0;
    }
    if (rc != 0)
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: journal lock: %s (restart "
                        "every process using the queue)", q->path, strerror(rc));
    if (q->jc->need_rebuild) {
        if (spk_journal_rebuild_from_lmdb(q) != 0) {
            pthread_mutex_unlock(m);
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal's lock was "
                            "held by a process that died, and its state could not be "
                            "rebuilt yet (retried by the next call)", q->path);
        }
        q->jc->need_rebuild = 0;
    }
    return 0;
}

void spk_journal_unlock(spk_queue *q)
{
    pthread_mutex_unlock(&q->jc->lock);
}

/* journal.ctl's lock bytes: 0 shared while open, 1 serialises openers, MOVER_BYTE held by
 * a process moving with release (spk_queue_sync, reads). */
#define MOVER_BYTE 2

static int ofd_lock(int fd, short type, off_t start, bool wait)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = 1};
    int rc;
    while ((rc = fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &fl)) != 0 && errno == EINTR)
        ;
    return rc;
}

/* Map the ring between two PROT_NONE guard pages: one reservation, the file mapped over
 * its middle. */
static int journal_map(spk_queue *q)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = (size_t)q->jsize;
    uint8_t *res = mmap(NULL, len + 2 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (res == MAP_FAILED)
        return errno;
    void *p = mmap(res + pg, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, q->jfd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        munmap(res, len + 2 * pg);
        return e;
    }
    q->jres = res;
    q->jmap = p;
    return 0;
}

static void journal_close_map(spk_queue *q)
{
    if (q->jres != NULL)
        munmap(q->jres, (size_t)q->jsize + 2 * (size_t)sysconf(_SC_PAGESIZE));
    q->jres = q->jmap = NULL;
}

void spk_journal_close(spk_queue *q)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    journal_close_map(q);
    if (q->jc != NULL)
        munmap(q->jc, pg);
    if (q->jfd >= 0)
        close(q->jfd);
    if (q->cfd >= 0)
        close(q->cfd); /* drops our OFD locks */
    q->jc = NULL;
    q->jfd = q->cfd = -1;
    free(q->scratch);
    q->scratch = NULL;
    q->scratch_cap = 0;
}

/* Give the ring file `size` bytes of written blocks: fallocate() reserves them (a clean
 * ENOSPC now rather than a SIGBUS later), then zeros are written over them, so that no
 * append ever lands in an unwritten extent. On ext4 the first write into an unwritten
 * extent converts it, a metadata change that makes the `always` policy's fdatasync commit
 * the file system journal too: two flushes per record instead of one. Once per queue. */
static int journal_alloc(int fd, uint64_t size)
{
    if (ftruncate(fd, (off_t)size) != 0)
        return errno;
    if (fallocate(fd, 0, 0, (off_t)size) != 0 && errno != EOPNOTSUPP && errno != ENOSYS)
        return errno;
    static const uint8_t zero[1 << 16];
    for (uint64_t o = 0; o < size; o += sizeof(zero)) {
        size_t n = size - o < sizeof(zero) ? (size_t)(size - o) : sizeof(zero);
        int e = pwrite_all(fd, zero, n, o);
        if (e != 0)
            return e;
    }
    return fdatasync(fd) == 0 ? 0 : errno;
}

/* Flush directory `path`, so that names created or renamed in it survive a power loss.
 * Returns 0 or an errno value. */
static int dir_sync(const char *path)
{
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return errno;
    int e = fsync(dfd) == 0 ? 0 : errno;
    close(dfd);
    return e;
}

/* (Re)create the ring file at `file` with `size` bytes, fully allocated and written, by
 * way of journal.new and a rename: a crash half-way leaves the old file or none, never a
 * sparse journal that a later open would take for a whole one. Replaces q->jfd. */
static int journal_create(spk_queue *q, const char *file, uint64_t size)
{
    char tmp[QUEUE_FILE_MAX];
    snprintf(tmp, sizeof(tmp), "%s/journal.new", q->path);
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return errno;
    int e = journal_alloc(fd, size);
    if (e == 0 && rename(tmp, file) != 0)
        e = errno;
    if (e != 0) {
        close(fd);
        unlink(tmp);
        return e;
    }
    dir_sync(q->path); /* the rename itself survives a power loss (best effort) */
    if (q->jfd >= 0)
        close(q->jfd);
    q->jfd = fd;
    return 0;
}

/* Open journal and journal.ctl. The first process to open the queue (no other holds the
 * shared lock on byte 0 of journal.ctl) rebuilds the shared state; openers are serialised
 * by an exclusive lock on byte 1 while they do this. */
int spk_journal_open(spk_queue *q, spk_errbuf *eb)
{
    char file[QUEUE_FILE_MAX];
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    int e;
    snprintf(file, sizeof(file), "%s/journal.ctl", q->path);
    q->cfd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (q->cfd < 0)
        return spk_errf(eb, errno == ENOSPC ? SPK_EQUEUE_UNAVAILABLE : SPK_EIO,
                        "queue %s: cannot open %s: %s", q->path, file, strerror(errno));
    if (ofd_lock(q->cfd, F_WRLCK, 1, true) != 0)
        return spk_errf(eb, SPK_EIO, "queue %s: cannot lock %s: %s", q->path, file,
                        strerror(errno));
    bool alone = ofd_lock(q->cfd, F_WRLCK, 0, false) == 0;
    struct stat st;
    if (fstat(q->cfd, &st) != 0 ||
        ((size_t)st.st_size < pg && ftruncate(q->cfd, (off_t)pg) != 0))
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot size %s: %s", q->path,
                        file, strerror(errno));
    void *p = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_SHARED, q->cfd, 0);
    if (p == MAP_FAILED)
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot map %s: %s", q->path,
                        file, strerror(errno));
    q->jc = p;

    snprintf(file, sizeof(file), "%s/journal", q->path);
    q->jfd = open(file, O_RDWR | O_CLOEXEC);
    uint64_t have = 0;
    if (q->jfd >= 0 && fstat(q->jfd, &st) == 0)
        have = (uint64_t)st.st_size;
    else if (q->jfd >= 0 || errno != ENOENT)
        return spk_errf(eb, SPK_EIO, "queue %s: cannot open %s: %s", q->path, file,
                        strerror(errno));
    uint64_t want = q->opts.journal_size;
    if (!alone) {
        /* The first opener sized it; a size in journal.ctl that disagrees means damage. */
        if (q->jc->magic != JCTL_MAGIC || q->jc->size != have || have < SPK_QUEUE_JOURNAL_MIN)
            return spk_errf(eb, SPK_ECORRUPT, "queue %s: %s does not match journal.ctl; stop "
                            "every process using the queue and open it again", q->path, file);
        q->jsize = have;
    } else {
        q->jsize = have >= SPK_QUEUE_JOURNAL_MIN ? have : want;
        if (have != q->jsize && (e = journal_create(q, file, q->jsize)) != 0)
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot allocate the "
                            "%llu-byte journal %s: %s", q->path,
                            (unsigned long long)q->jsize, file, strerror(e));
    }
    if ((e = journal_map(q)) != 0)
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot map %s: %s", q->path,
                        file, strerror(e));
    if (alone) {
        struct jctl *c = q->jc;
        pthread_mutexattr_t ma;
        MDB_txn *txn;
        struct jbase b;
        int rc;
        if (c->magic != JCTL_MAGIC || c->size != q->jsize)
            memset(c, 0, sizeof(*c));
        /* Nobody else has the queue open: no sleeper. */
        atomic_store(&c->release_sleepers, 0);
        atomic_store(&c->flush_sleepers, 0);
        /* What earlier processes committed may be in the page cache only: flush it, so
         * what LMDB says it moved may be released. */
        if ((rc = mdb_env_sync(q->env, 1)) != 0 || (rc = spk_store_txn_begin(q, MDB_RDONLY, &txn)) != 0)
            return spk_store_err(q, rc, "open the journal", eb);
        rc = spk_store_jbase_read(q, txn, &b);
        mdb_txn_abort(txn);
        if (rc != 0)
            return spk_store_err(q, rc, "open the journal", eb);
        uint64_t staged = journal_rebuild(q, &b, true);
        if (staged == 0 && q->jsize != want && want >= SPK_QUEUE_JOURNAL_MIN) {
            /* Empty: take the configured size. Offsets are absolute, so nothing moves. */
            journal_close_map(q);
            q->jsize = want;
            if ((e = journal_create(q, file, want)) != 0 || (e = journal_map(q)) != 0)
                return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot resize the "
                                "journal %s to %llu bytes: %s", q->path, file,
                                (unsigned long long)want, strerror(e));
            journal_rebuild(q, &b, true);
        }
        /* A flush of the journal failed and no process recovered since (THE FLUSH-FAILURE
         * LATCH): drop what was not known to be on disk, before anything is moved. */
        if (atomic_load(&c->flush_failed) && (e = journal_recover(q)) != 0)
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: a flush of the journal "
                            "failed, and its unflushed records cannot be dropped yet: %s",
                            q->path, strerror(e));
        /* What the previous processes wrote is in the page cache; make it durable now,
         * so `synced` (= tail) is true. If that fails, nothing is claimed durable: the
         * open fails, and is retried (the records stay where they are). */
        if (spk_journal_fdatasync_fn(q->jfd) != 0)
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot flush the journal: "
                            "%s", q->path, strerror(errno));
        atomic_store(&c->synced, atomic_load(&c->tail));
        if (pthread_mutexattr_init(&ma) != 0 ||
            pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED) != 0 ||
            pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST) != 0 ||
            pthread_mutex_init(&c->lock, &ma) != 0 || pthread_mutex_init(&c->flush_lock, &ma) != 0)
            return spk_errf(eb, SPK_EIO, "queue %s: cannot initialise the journal lock",
                            q->path);
        pthread_mutexattr_destroy(&ma);
        c->size = q->jsize;
        c->magic = JCTL_MAGIC;
        spk_store_drop_segment_files(q); /* an upgrade that died before it deleted them */
    }
    /* Byte 0 shared while open (converting our exclusive lock is atomic); then let the
     * next opener in. */
    if (ofd_lock(q->cfd, F_RDLCK, 0, true) != 0 || ofd_lock(q->cfd, F_UNLCK, 1, false) != 0)
        return spk_errf(eb, SPK_EIO, "queue %s: cannot lock journal.ctl: %s", q->path,
                        strerror(errno));
    return 0;
}

/* Skip a damaged stretch: the next offset in [from, end) where a valid record (or a lap's
 * end) starts, or `end`. Records are 8-byte aligned. */
uint64_t spk_journal_resync(const spk_queue *q, uint64_t from, uint64_t end)
{
    uint64_t seq;
    const uint8_t *val;
    uint32_t vlen;
    bool pad;
    for (uint64_t off = from + 8; off < end; off += 8) {
        if (q->jsize - off % q->jsize < JREC_HDR)
            return off; /* the implicit skip to the next lap */
        if (spk_journal_check(q, off, &seq, &val, &vlen, &pad) != 0)
            return off;
    }
    return end;
}

/* Whether another handle is moving with release (holds MOVER_BYTE). Our own lock never
 * conflicts with us, so a handle never waits for itself. */
bool spk_journal_mover_active(const spk_queue *q)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = MOVER_BYTE,
                       .l_len = 1};
    return fcntl(q->cfd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

/* Take / drop MOVER_BYTE: appends that find the ring full wait for a releasing move that
 * holds it (an OFD lock, which the kernel drops if the process dies). 0 when taken. */
int spk_journal_mover_lock(spk_queue *q)
{
    return ofd_lock(q->cfd, F_WRLCK, MOVER_BYTE, false);
}

void spk_journal_mover_unlock(spk_queue *q)
{
    ofd_lock(q->cfd, F_UNLCK, MOVER_BYTE, false);
    spk_journal_release_wake(q->jc); /* waiters: stop waiting for us */
}

/* Tell appends waiting for journal space (futex on release_gen) to look again. */
void spk_journal_release_wake(struct jctl *c)
{
    atomic_fetch_add(&c->release_gen, 1);
    if (atomic_load(&c->release_sleepers) > 0)
        syscall(SYS_futex, &c->release_gen, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* Let ring space below `upto` be reused: a move's end whose transaction is durable (a
 * later commit or an mdb_env_sync flushed LMDB after it). Wakes appends waiting for room. */
void spk_journal_release_upto(spk_queue *q, uint64_t upto)
{
    struct jctl *c = q->jc;
    if (spk_journal_lock(q, NULL) != 0)
        return;
    bool moved = false;
    if (upto > atomic_load_explicit(&c->released, memory_order_relaxed) && upto <= c->m_off) {
        atomic_store_explicit(&c->released, upto, memory_order_release);
        moved = true;
    }
    spk_journal_unlock(q);
    if (moved)
        spk_journal_release_wake(c);
}

/* Records published but not yet moved (cheap; no lock). */
bool spk_journal_staged(const spk_queue *q)
{
    return atomic_load_explicit(&q->jc->tail, memory_order_acquire) !=
           atomic_load_explicit(&q->jc->m_off, memory_order_relaxed);
}

/* ---- GROUP COMMIT (sync always) ----------------------------------------------------------
 *
 * An `always` append writes its record with pwrite() (flushing a page dirtied through a
 * shared mapping costs ~3x more on ext4: docs/queue.md) and publishes it; then the record
 * must be on disk before the call returns. `synced` says up to where the journal is known
 * flushed. A caller whose record ends past it tries to become the leader (a trylock of
 * the robust flush_lock -- not the append lock jctl.lock: appends go on while a leader
 * flushes, and nobody ever blocks on flush_lock); the leader reads `tail` -- every record
 * below it is completely written, since records are published after their pwrite --
 * flushes, raises `synced` to that tail, unlocks, bumps flush_gen and wakes the
 * followers, who sleep on flush_gen (a futex in the shared page, with a timeout) and then
 * either find themselves covered or lead the next flush. Callers of every process that
 * appended while a leader flushed are covered by the next single flush.
 *
 * Two writers alone would still alternate -- each appends while the other flushes, and
 * each flush covers one record -- because a writer publishes its next record some 45 us
 * after its flush returns. So when the last publishes came from different processes
 * (mixed_ns, within 1 ms), the leader waits up to GROUP_WAIT_NS for one more publish
 * before it reads `tail`: measured, 0.5 flushes per record with two writers and 0.33 with
 * four, against 0.85 and 0.7 with a plain leader lock; a single writer never waits.
 *
 * Crash safety: `synced` only moves to a tail read before an fdatasync that returned 0.
 * A leader killed anywhere leaves flush_lock EOWNERDEAD: the next trylock makes its
 * caller the leader (there is nothing to repair). Followers sleep with a timeout, so a
 * lost wake-up costs at most FOLLOWER_WAIT_NS.
 *
 * THE FLUSH-FAILURE LATCH. When fdatasync fails, Linux may have dropped the dirty pages it
 * could not write and marked them clean: a later fdatasync that succeeds says nothing
 * about them. So a failed flush sets jctl.flush_failed (shared: the page cache is) and
 * `synced` stays where the last good flush left it. Then: every caller whose record ends
 * past `synced` is answered SPK_EQUEUE_UNAVAILABLE, and its record is NOT sent (moves
 * take records only up to `synced`, spk_journal_movable); appends are refused with
 * SPK_EQUEUE_UNAVAILABLE; and recovery (journal_recover) rebuilds the journal from what
 * is known to be on disk: it overwrites [synced, tail) with zeros, flushes that, and only
 * when the flush succeeds sets tail back to `synced`, recounts from LMDB and the journal,
 * and clears the latch. An append tries it at most every spk_journal_recover_retry_ns
 * (100 ms), the first
 * process to open the queue always. The sequence numbers of the dropped records are not
 * used again by this run of the queue. */
#define GROUP_WAIT_NS 50000ull
#define GROUP_MIXED_NS 1000000ull
#define FOLLOWER_WAIT_NS 10000000L
uint64_t spk_journal_recover_retry_ns = 100 * 1000000ull;

static void flush_wait(struct jctl *c, uint32_t gen)
{
    struct timespec to = {0, FOLLOWER_WAIT_NS};
    atomic_fetch_add(&c->flush_sleepers, 1);
    syscall(SYS_futex, &c->flush_gen, FUTEX_WAIT, gen, &to, NULL, 0);
    atomic_fetch_sub(&c->flush_sleepers, 1);
}

static void latch(struct jctl *c)
{
    atomic_store(&c->recover_ns, spk_mono_ns());
    atomic_store(&c->flush_failed, 1);
}

bool spk_journal_latched(const spk_queue *q)
{
    return atomic_load_explicit(&q->jc->flush_failed, memory_order_acquire) != 0;
}

static int latched_err(spk_queue *q, spk_errbuf *eb)
{
    return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: a flush of the journal failed; "
                    "records are refused until the journal is rebuilt from what is on disk "
                    "(retried by the next send)", q->path);
}

uint64_t spk_journal_movable(const spk_queue *q)
{
    uint64_t end = atomic_load_explicit(&q->jc->tail, memory_order_acquire);
    if (q->opts.sync_always) {
        uint64_t synced = atomic_load_explicit(&q->jc->synced, memory_order_acquire);
        if (synced < end)
            end = synced;
    }
    return end;
}

/* Drop what is not known to be on disk: zeros over [synced, tail), flushed, then tail back
 * to synced and the counts rebuilt. Under the lock, or alone at the first open. Returns 0
 * or an errno value (the latch stays). */
static int journal_recover(spk_queue *q)
{
    static const uint8_t zero[1 << 16];
    struct jctl *c = q->jc;
    uint64_t from = atomic_load(&c->synced), to = atomic_load(&c->tail);
    uint64_t m_off = atomic_load(&c->m_off);
    if (from < m_off)
        from = m_off; /* moved into LMDB: known to be on disk there */
    atomic_store(&c->recover_ns, spk_mono_ns());
    for (uint64_t o = from; o < to;) {
        uint64_t pos = o % q->jsize;
        uint64_t n = to - o;
        if (n > sizeof(zero))
            n = sizeof(zero);
        if (n > q->jsize - pos)
            n = q->jsize - pos;
        int e = pwrite_all(q->jfd, zero, (size_t)n, pos);
        if (e != 0)
            return e;
        o += n;
    }
    if (spk_journal_fdatasync_fn(q->jfd) != 0)
        return errno != 0 ? errno : EIO;
    atomic_store(&c->tail, from);
    atomic_store(&c->synced, from);
    int rc = spk_journal_rebuild_from_lmdb(q);
    if (rc != 0)
        return EIO;
    atomic_store(&c->flush_failed, 0);
    return 0;
}

/* always: wait until the journal is flushed up to `end` (leading a flush if nobody is).
 * Returns 0, or SPK_EQUEUE_UNAVAILABLE when the flush failed (the record is then never
 * sent: see the latch above). */
static int group_commit(spk_queue *q, uint64_t end, spk_errbuf *eb)
{
    struct jctl *c = q->jc;
    for (;;) {
        uint32_t gen = atomic_load(&c->flush_gen);
        if (atomic_load_explicit(&c->synced, memory_order_acquire) >= end) {
            q->sync_shared++;
            return 0;
        }
        if (atomic_load(&c->flush_failed))
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal's flush "
                            "failed: the record was not stored and will not be sent",
                            q->path);
        int rc = pthread_mutex_trylock(&c->flush_lock);
        if (rc == EOWNERDEAD) {
            pthread_mutex_consistent(&c->flush_lock); /* a leader died: nothing to repair */
            rc = 0;
        }
        if (rc == EBUSY) {
            flush_wait(c, gen);
            continue;
        }
        if (rc != 0) {
            latch(c); /* no flush can be led: as good as a failed one */
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal cannot be "
                            "flushed (%s): the record was not stored and will not be sent",
                            q->path, strerror(rc));
        }
        int err = 0;
        if (atomic_load(&c->flush_failed)) {
            err = latched_err(q, eb);
        } else if (atomic_load_explicit(&c->synced, memory_order_acquire) < end) {
            uint64_t t0 = spk_mono_ns();
            uint64_t seen = atomic_load_explicit(&c->tail, memory_order_acquire);
            if (t0 - atomic_load_explicit(&c->mixed_ns, memory_order_relaxed) <
                GROUP_MIXED_NS) {
                while (atomic_load_explicit(&c->tail, memory_order_acquire) == seen &&
                       spk_mono_ns() - t0 < GROUP_WAIT_NS) {
#if defined(__x86_64__)
                    __builtin_ia32_pause();
#endif
                }
            }
            uint64_t upto = atomic_load_explicit(&c->tail, memory_order_acquire);
            if (spk_journal_fdatasync_fn(q->jfd) == 0) {
                uint64_t cur = atomic_load(&c->synced);
                while (cur < upto && !atomic_compare_exchange_weak(&c->synced, &cur, upto))
                    ;
                q->sync_calls++;
            } else {
                int e = errno;
                latch(c); /* before the unlock: no later leader may flush past it */
                err = spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal's flush "
                               "failed (%s): the record was not stored and will not be "
                               "sent", q->path, strerror(e));
            }
        } else {
            q->sync_shared++;
        }
        pthread_mutex_unlock(&c->flush_lock);
        atomic_fetch_add(&c->flush_gen, 1);
        if (atomic_load(&c->flush_sleepers) > 0)
            syscall(SYS_futex, &c->flush_gen, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
        return err;
    }
}

void spk_journal_flush_published(spk_queue *q)
{
    if (!q->opts.sync_always || spk_journal_latched(q))
        return;
    uint64_t tail = atomic_load_explicit(&q->jc->tail, memory_order_acquire);
    if (atomic_load_explicit(&q->jc->synced, memory_order_acquire) < tail)
        group_commit(q, tail, NULL);
}

/* ---- appending -------------------------------------------------------------------------- */

/* Write a record of `size` stored bytes (need = its length in the ring) at absolute
 * offset `off`, after a pad of `padlen` bytes at `off - padlen`. Under the lock. */
static int journal_write(spk_queue *q, const struct rec_enc *e, uint64_t seq, uint64_t off,
                         uint64_t padlen, size_t wire_len, size_t need, spk_errbuf *eb)
{
    struct jrec pad = {JPAD_MAGIC, 0, off - padlen, 0, (uint32_t)padlen, 0};
    struct jrec h = {JREC_MAGIC, 0, off, seq, (uint32_t)(sizeof(struct rec_hdr) + wire_len), 0};
    pad.hcrc = spk_journal_hcrc(&pad);
    h.hcrc = spk_journal_hcrc(&h);
    uint8_t *dst;
    if (!q->opts.sync_always) {
        /* interval: straight into the shared mapping, no copy and no system call */
        if (padlen >= JREC_HDR)
            memcpy(q->jmap + (off - padlen) % q->jsize, &pad, sizeof(pad));
        dst = q->jmap + off % q->jsize;
    } else {
        if (need > q->scratch_cap) {
            uint8_t *nb = realloc(q->scratch, need);
            if (nb == NULL)
                return spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
            q->scratch = nb;
            q->scratch_cap = need;
        }
        dst = q->scratch;
    }
    if (spk_rec_encode(e, dst + JREC_HDR, wire_len) != 0)
        return spk_errf(eb, SPK_EIO, "queue %s: the encoder did not write the %zu bytes it "
                        "announced", q->path, wire_len);
    memcpy(dst, &h, sizeof(h));
    if (!q->opts.sync_always)
        return 0;
    /* always: pwrite (see GROUP COMMIT) */
    int err = 0;
    if (padlen >= JREC_HDR)
        err = pwrite_all(q->jfd, &pad, sizeof(pad), (off - padlen) % q->jsize);
    if (err == 0)
        err = pwrite_all(q->jfd, dst, need, off % q->jsize);
    if (err != 0)
        return spk_errf(eb, err == ENOSPC || err == EDQUOT ? SPK_EQUEUE_UNAVAILABLE : SPK_EIO,
                        "queue %s: cannot write the journal: %s; nothing was stored",
                        q->path, strerror(err));
    return 0;
}

#define APPEND_TRIES 4
#define APPEND_WAITS 10                /* a mover that frees nothing in 10 waits ... */
#define APPEND_WAIT_NS (10 * 1000000L) /* ... of 10 ms is helped, not waited for */
#define APPEND_WAIT_MAX_NS (1000 * 1000000ull) /* nor one that takes longer than 1 s */

int spk_journal_append(spk_queue *q, struct rec_enc *e, uint64_t *seq_out,
                       uint64_t *pending_out, spk_errbuf *eb)
{
    struct jctl *c = q->jc;
    int err;
    if ((err = spk_journal_lock(q, eb)) != 0)
        return err;
    int waits = 0;
    uint64_t wait_from = 0;
    for (int tries = 0;; tries++) {
        if (atomic_load(&c->flush_failed)) {
            int rerr = EAGAIN;
            if (spk_mono_ns() - atomic_load(&c->recover_ns) >= spk_journal_recover_retry_ns)
                rerr = journal_recover(q);
            if (rerr != 0) {
                spk_journal_unlock(q);
                return latched_err(q, eb);
            }
        }
        uint64_t pending = c->m_pending + (c->pub_count - c->m_count);
        uint64_t bytes = c->m_bytes + (c->pub_bytes - c->m_mbytes);
        if (q->opts.max_pending > 0 && pending >= q->opts.max_pending) {
            spk_journal_unlock(q);
            return spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu records pending "
                            "(queue.max_pending)", q->path, (unsigned long long)pending);
        }
        uint64_t seq = c->next_seq;
        size_t wire_len = spk_rec_wire_len(e, seq);
        uint64_t size = spk_queue_record_size(wire_len);
        if (q->opts.max_bytes > 0 && bytes + size > q->opts.max_bytes) {
            spk_journal_unlock(q);
            return spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu bytes pending, %llu "
                            "more would pass queue.max_bytes (%llu)", q->path,
                            (unsigned long long)bytes, (unsigned long long)size,
                            (unsigned long long)q->opts.max_bytes);
        }
        if (size > SPK_QUEUE_RECORD_MAX) {
            spk_journal_unlock(q);
            return spk_errf(eb, SPK_EPAYLOAD_TOO_LARGE, "queue %s: a record of %llu bytes "
                            "(payload, metadata, edge ID and content type) is over the "
                            "%u-byte limit", q->path, (unsigned long long)size,
                            SPK_QUEUE_RECORD_MAX);
        }
        size_t need = align8(JREC_HDR + (size_t)size);
        if (need > q->jsize / 2) { /* cannot happen with SPK_QUEUE_JOURNAL_MIN */
            spk_journal_unlock(q);
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: a record of %zu bytes is "
                            "more than half the journal (%llu bytes); raise "
                            "queue.journal_size", q->path, need, (unsigned long long)q->jsize);
        }
        uint64_t tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
        uint64_t pos = tail % q->jsize;
        uint64_t padlen = pos + need > q->jsize ? q->jsize - pos : 0;
        uint64_t released = atomic_load_explicit(&c->released, memory_order_acquire);
        if (tail + padlen + need - released > q->jsize) {
            /* The ring is full: wait for the mover at work, or move, flush and release
             * ourselves, and try again (see Space at the top). */
            uint32_t gen = atomic_load(&c->release_gen);
            spk_journal_unlock(q);
            if (wait_from == 0)
                wait_from = spk_mono_ns();
            if (waits < APPEND_WAITS && spk_mono_ns() - wait_from < APPEND_WAIT_MAX_NS &&
                spk_journal_mover_active(q)) {
                struct timespec to = {0, APPEND_WAIT_NS};
                atomic_fetch_add(&c->release_sleepers, 1);
                syscall(SYS_futex, &c->release_gen, FUTEX_WAIT, gen, &to, NULL, 0);
                atomic_fetch_sub(&c->release_sleepers, 1);
                if (atomic_load(&c->release_gen) == gen)
                    waits++; /* no progress */
                tries--;     /* waiting for a mover is not a failed try */
                if ((err = spk_journal_lock(q, eb)) != 0)
                    return err;
                continue;
            }
            if (tries == APPEND_TRIES)
                return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal (%llu "
                                "bytes) stays full: records are appended faster than they "
                                "can be moved into LMDB", q->path,
                                (unsigned long long)q->jsize);
            /* Only what this record needs (one batch): this runs inside a plugin's hook,
             * which the supervisor's watchdog times. */
            err = spk_mover_move(q, true, need, eb);
            if (err != 0 && err != SPK_ECORRUPT)
                return err;
            if ((err = spk_journal_lock(q, eb)) != 0)
                return err;
            continue;
        }
        uint64_t off = tail + padlen;
        if ((err = journal_write(q, e, seq, off, padlen, wire_len, need, eb)) != 0) {
            spk_journal_unlock(q);
            return err;
        }
        c->next_seq = seq + 1;
        c->pub_count++;
        c->pub_bytes += size;
        atomic_store_explicit(&c->tail, off + need, memory_order_release);
        if (q->opts.sync_always && c->last_pub != (uint32_t)q->pid) {
            if (c->last_pub != 0)
                atomic_store_explicit(&c->mixed_ns, spk_mono_ns(), memory_order_relaxed);
            c->last_pub = (uint32_t)q->pid;
        }
        spk_journal_unlock(q);
        if (q->opts.sync_always && (err = group_commit(q, off + need, eb)) != 0)
            return err;
        if (seq_out != NULL)
            *seq_out = seq;
        if (pending_out != NULL)
            *pending_out = pending + 1;
        return 0;
    }
}
