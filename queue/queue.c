/*
 * queue.c -- the durable edge-to-control queue on LMDB; the contract is in queue.h.
 *
 * LAYOUT. One LMDB environment (a directory: data.mdb, lock.mdb) with three named DBs:
 *
 *   pending  key: sequence number, 8 bytes big-endian, so LMDB's default memcmp order is
 *                 numeric order, the oldest record is the first key, and every new key is
 *                 the largest (MDB_APPEND: no search, pages filled completely).
 *            value: a 24-byte header, then the encoded spoke.control.v1.EdgePayload
 *                 (which carries the same sequence number), exactly the bytes the uplink
 *                 sends:
 *                   u32 magic "SPQ1" | u32 crc32c | u32 plugin_id | u32 wire_len |
 *                   i64 edge_timestamp_ms            (host byte order)
 *                 The header lets expiry, stats and acks work without decoding. The CRC
 *                 (CRC-32C over the header after the crc field, then the wire bytes) is
 *                 checked on every read: LMDB has no checksums of its own, and a record
 *                 damaged on disk or, with opts.writemap, by a stray write of plugin code
 *                 into the map, is reported (item.status = SPK_ECORRUPT) rather than
 *                 delivered as if it were what the plugin sent. It costs ~0.1 us per KiB
 *                 with SSE4.2.
 *   meta     key: a name; value: u64. "format" (1), "next_seq" (after the last record
 *            moved in), "bytes" (sum of record sizes in pending), the journal position
 *            "j_off" that moves have reached with the cumulative "j_count" and "j_bytes"
 *            moved, and the lifetime counters "acked", "expired", "purged", "damaged".
 *   plugins  key: plugin ID, 4 bytes big-endian; value: u64 count, u64 bytes of that
 *            plugin's pending records. Entries at zero are deleted.
 *   segs     key: segment number, 8 bytes big-endian; value: u64 count, u64 bytes of the
 *            pending records whose values are in that segment file (SEGMENTS). A record
 *            whose value would need LMDB overflow pages is stored there, and its `pending`
 *            value is a struct rec_ref: the same header with magic "SPQR", then the
 *            value's offset in segment space.
 *
 * Every change to pending updates meta and plugins in the same write transaction, so the
 * counters can never disagree with the records, whatever process dies when; a move also
 * advances j_off in that transaction, so each journal record reaches LMDB exactly once.
 * The pending count is the pending DB's entry count (mdb_stat, O(1)).
 *
 * Records enter through the JOURNAL (below): enqueues never open an LMDB transaction.
 *
 * CONCURRENCY. LMDB allows one write transaction at a time per environment, across
 * processes, through a robust process-shared mutex in lock.mdb: a writer killed with
 * kill -9 leaves the mutex EOWNERDEAD and its transaction uncommitted, and the next writer
 * carries on. Readers (the uplink's reads, stats) never block writers. Dead readers' slots
 * are cleared by mdb_reader_check() at open (and LMDB clears them itself when the reader
 * table fills). Lock order: LMDB's writer lock, then the journal's; never the reverse.
 *
 * THE WRITABLE MAP (opts.writemap, off by default). With MDB_WRITEMAP LMDB writes its
 * pages by storing into a shared mapping instead of write(2). The map is then guarded:
 * PROT_NONE pages on both sides, the per-record CRC and spk_queue_verify(), and blocks
 * fallocate()d ahead of use so a full disk is an error, never a SIGBUS (ensure_headroom,
 * wmap_headroom). Since enqueues go to the journal, moves are batched and gain little
 * from it; docs/queue.md has the numbers.
 */
#include "queue.h"
#include "crc32c.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <dirent.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <sys/mman.h>
#include <linux/futex.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "spoke/control/v1/control.pb-c.h"

#define REC_MAGIC 0x31515053u /* "SPQ1" little-endian */
#define REF_MAGIC 0x52515053u /* "SPQR": the record's value is in a segment file */
#define QUEUE_FORMAT 2u       /* 1: no segments (read as is, upgraded on open) */
#define EXPIRE_PER_TXN 10000u
#define EXPIRE_PER_TXN_WRITEMAP 1000u /* bounded dirty set: fits the allocated headroom */

struct rec_hdr {
    uint32_t magic;
    uint32_t crc;
    uint32_t plugin_id;
    uint32_t wire_len;
    int64_t ts_ms;
};
_Static_assert(sizeof(struct rec_hdr) == SPK_QUEUE_RECORD_OVERHEAD, "record header size");

/* The LMDB value of a record stored by reference (SEGMENTS): its header, with magic
 * REF_MAGIC and the CRC of the value in the segment, and where that value starts. */
struct rec_ref {
    struct rec_hdr h;
    uint64_t soff;
};

/* A parsed LMDB value: inline (wire points into LMDB) or by reference (soff). */
struct rec_view {
    struct rec_hdr h;
    const uint8_t *wire;
    uint64_t soff;
    uint64_t size; /* the record's stored size: header + wire bytes, wherever they are */
    bool ref;
};

_Static_assert(SPK_QUEUE_SEGMENT_MIN >= 2ull * SPOKE_MAX_PAYLOAD,
               "the largest record fits a segment");
#define SEG_FDS 4
#define SEG_SPARES 4 /* emptied segment files kept for reuse */

struct spk_queue {
    MDB_env *env;
    MDB_dbi pending;
    MDB_dbi meta;
    MDB_dbi plugins;
    MDB_dbi segs;
    uint64_t seg_size;     /* meta "seg_size": fixed when the queue got its segments */
    spk_queue_opts opts;
    pid_t pid;
    char *path;
    uint64_t refused_full;
    uint64_t refused_unavailable;
    uint64_t refused_invalid;
    uint64_t dead_readers;
    uint64_t reserve;      /* bytes of disk kept allocated past the used pages */
    uint64_t alloc_end;    /* this handle has fallocate()d the file up to here */
    uint32_t psize;
    int fd;                /* LMDB's data file descriptor (borrowed); -1: no headroom */
    /* writemap: PROT_NONE guard pages just below and above the map (NULL: none) */
    void *guard_lo, *guard_hi;
    /* the journal (see JOURNAL) */
    int cfd;               /* journal.ctl: OFD locks (byte 0 shared while open) */
    int jfd;               /* journal */
    struct jctl *jc;       /* journal.ctl, mapped shared */
    uint8_t *jmap;         /* the ring, mapped shared */
    void *jres;            /* the reservation holding jmap between two guard pages */
    uint64_t jsize;        /* ring bytes */
    uint8_t *scratch;      /* always: a record is built here, then written with pwrite */
    size_t scratch_cap;
    struct { uint64_t k; int fd; } segfd[SEG_FDS]; /* open segment files (fd -1: none) */
    unsigned segfd_next;
    uint64_t rebuilds;     /* shared state rebuilt after a process died holding the lock */
    uint64_t moved_txns;   /* move transactions this handle committed */
    uint64_t sync_calls;   /* always: journal flushes this handle did itself */
    uint64_t sync_shared;  /* always: appends made durable by another caller's flush */
};

/* ---- CRC-32C (crc32c.c) --------------------------------------------------------------- */

static uint32_t rec_crc(const struct rec_hdr *h, const void *wire, size_t wire_len)
{
    uint32_t c = spk_crc32c(0xFFFFFFFFu, &h->plugin_id,
                            sizeof(*h) - offsetof(struct rec_hdr, plugin_id));
    return ~spk_crc32c(c, wire, wire_len);
}

/* ---- small helpers -------------------------------------------------------------------- */

static void be64(uint8_t out[8], uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static void be32(uint8_t out[4], uint32_t v)
{
    for (int i = 3; i >= 0; i--) {
        out[i] = (uint8_t)v;
        v >>= 8;
    }
}

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
    opts->max_pending = 100000;
    opts->max_bytes = 1024ull * 1024 * 1024;
    opts->retention_ms = 24ull * 3600 * 1000;
    opts->sync_always = false;
    opts->map_size = 2048ull * 1024 * 1024;
    opts->create = true;
    opts->writemap = false;
    opts->journal_size = 64ull * 1024 * 1024;
    opts->segment_size = 32ull * 1024 * 1024;
    opts->clock = NULL;
}

/* Map an LMDB or errno code from a write path to an spk_err with a message. */
static int lmdb_err(spk_queue *q, int rc, const char *what, spk_errbuf *eb)
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

static void place_guards(spk_queue *q);

/* Begin a transaction, adopting a map size grown by another process. */
static int txn_begin(spk_queue *q, unsigned flags, MDB_txn **txn)
{
    int rc = mdb_txn_begin(q->env, NULL, flags, txn);
    if (rc == MDB_MAP_RESIZED) {
        rc = mdb_env_set_mapsize(q->env, 0);
        if (rc == 0 && q->opts.writemap)
            place_guards(q); /* the map moved */
        if (rc == 0)
            rc = mdb_txn_begin(q->env, NULL, flags, txn);
    }
    return rc;
}

static uint64_t meta_get(MDB_txn *txn, MDB_dbi dbi, const char *name)
{
    MDB_val k = {strlen(name), (void *)name}, v;
    uint64_t out = 0;
    if (mdb_get(txn, dbi, &k, &v) == 0 && v.mv_size == sizeof(out))
        memcpy(&out, v.mv_data, sizeof(out));
    return out;
}

static int meta_put(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t value)
{
    MDB_val k = {strlen(name), (void *)name}, v = {sizeof(value), &value};
    return mdb_put(txn, dbi, &k, &v, 0);
}

static int meta_add(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t delta)
{
    return meta_put(txn, dbi, name, meta_get(txn, dbi, name) + delta);
}

static int count_adjust(MDB_txn *txn, MDB_dbi dbi, void *key, size_t klen, int sign,
                        uint64_t count, uint64_t bytes, bool *zeroed);

/* Add (count, bytes) to a plugin's counters, or take them away (`sign` -1). */
static int plugin_adjust(spk_queue *q, MDB_txn *txn, uint32_t id, int sign, uint64_t count,
                         uint64_t bytes)
{
    uint8_t kb[4];
    be32(kb, id);
    return count_adjust(txn, q->plugins, kb, 4, sign, count, bytes, NULL);
}

static int mkdir_p(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(buf))
        return ENAMETOOLONG;
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST)
            return errno;
        buf[i] = c;
    }
    return 0;
}

/* DISK HEADROOM. Deleting records needs a few new pages (copy-on-write of the path to the
 * leaf, the free list's record). If enqueues could use the last free block of the disk,
 * an ack or expiry could then fail with ENOSPC, and nothing could ever free space again.
 * So an enqueue first makes sure the file has `reserve` bytes allocated past the used
 * pages plus the new record (fallocate with FALLOC_FL_KEEP_SIZE: blocks are reserved, the
 * file size does not change, LMDB's later writes there need no new blocks). When that
 * reservation fails the enqueue is refused as "disk full" while acks and expiry still
 * have room. Called outside the write transaction; another process may have reserved
 * more already, which makes our fallocate a cheap no-op. */
/* Pages on LMDB's free list (freed by acks and expiry, reused before the file grows).
 * Slow path only: walks the free list, like `mdb_stat -f`. 0 when it cannot be read. */
static uint64_t free_list_pages(spk_queue *q)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    uint64_t pages = 0;
    if (txn_begin(q, MDB_RDONLY, &txn) != 0)
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
    uint64_t free_pages = free_list_pages(q);
    uint64_t allocated = (uint64_t)st.st_blocks * 512;
    if (allocated < q->alloc_end)
        allocated = q->alloc_end;
    /* Some free pages are not reusable yet (freed by the last transactions, or pinned by
     * a reader), so demand half a reserve more: a hysteresis, not an exact count. */
    return need + q->reserve / 2 <= allocated + free_pages * q->psize;
}

static int ensure_headroom(spk_queue *q, uint64_t size, spk_errbuf *eb)
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

/* Before a deleting transaction with writemap: room for the pages it may copy, so that
 * no store of LMDB's lands in an unallocated hole (a SIGBUS on a full disk). Deleting
 * copies the leaves that hold the records, their branches, and a few pages of the meta,
 * plugins and free DBs. `span` records of consecutive sequence numbers hold the deleted
 * ones (expiry and purge: the oldest; an ack: from its lowest to its highest), in at most
 * `max_leaves` leaves (an ack of n scattered records: n). Without
 * writemap LMDB writes with pwrite(), which fails cleanly. */
static int wmap_headroom(spk_queue *q, uint64_t span, uint64_t max_leaves, spk_errbuf *eb)
{
    MDB_envinfo info;
    MDB_stat ms;
    MDB_txn *txn;
    if (!q->opts.writemap || q->fd < 0 || mdb_env_info(q->env, &info) != 0)
        return 0;
    uint64_t touched = span + 16;
    if (txn_begin(q, MDB_RDONLY, &txn) == 0) {
        if (mdb_stat(txn, q->pending, &ms) == 0 && ms.ms_leaf_pages > 0) {
            uint64_t per_leaf = ms.ms_entries / ms.ms_leaf_pages;
            uint64_t leaves = span / (per_leaf > 1 ? per_leaf / 2 : 1) + 1; /* half-full */
            if (leaves > max_leaves)
                leaves = max_leaves;
            if (leaves > ms.ms_leaf_pages)
                leaves = ms.ms_leaf_pages;
            /* and the free list's record of every page freed (8 bytes each) */
            uint64_t freed = ms.ms_branch_pages + ms.ms_leaf_pages + ms.ms_overflow_pages;
            touched = leaves + ms.ms_branch_pages + ms.ms_depth + freed / 512 + 32;
        }
        mdb_txn_abort(txn);
    }
    uint64_t need = ((uint64_t)info.me_last_pgno + 1 + touched) * q->psize;
    if (need > info.me_mapsize)
        need = info.me_mapsize;
    if (need <= q->alloc_end)
        return 0;
    /* No reserve demanded here: deleting is what the enqueues' reserve was kept for. */
    if (fallocate(q->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)need) != 0 &&
        !fits_in_free_pages(q, need))
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: disk full: no room for the "
                        "%llu pages a delete may copy (%s)", q->path,
                        (unsigned long long)touched, strerror(errno));
    q->alloc_end = need;
    return 0;
}

/* ---- writemap guard pages ---------------------------------------------------------------- */

/* With MDB_WRITEMAP the map is writable, and plugin code runs in this process. Plugins never
 * get a pointer into the map (payloads are copied in and out), so a stray store reaches it
 * either by running off the end of an adjacent mapping (a heap or mmap buffer overflow) or
 * through a wild pointer. A PROT_NONE page on each side of the map turns the first kind
 * into a fault; the record CRC and spk_queue_verify() detect the second (docs/queue.md).
 * Best effort: if a neighbour already occupies the page, there is nothing to guard
 * against on that side from an overflow that would first cross that neighbour. */
static void *guard_at(void *addr, size_t len)
{
    void *p = mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (p != addr) { /* a kernel without MAP_FIXED_NOREPLACE treats it as a hint */
        munmap(p, len);
        return NULL;
    }
    return p;
}

static void drop_guards(spk_queue *q)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    if (q->guard_lo != NULL)
        munmap(q->guard_lo, pg);
    if (q->guard_hi != NULL)
        munmap(q->guard_hi, pg);
    q->guard_lo = q->guard_hi = NULL;
}

/* The map's address range. LMDB does not export it (me_mapaddr is only set for a fixed
 * map), so take the address of a value read from the map and find the mapping that holds
 * it in /proc/self/maps. Once per open. */
static bool map_range(spk_queue *q, uintptr_t *lo, uintptr_t *hi)
{
    MDB_txn *txn;
    MDB_val k = {6, "format"}, v;
    uintptr_t addr = 0;
    if (mdb_txn_begin(q->env, NULL, MDB_RDONLY, &txn) != 0)
        return false;
    if (mdb_get(txn, q->meta, &k, &v) == 0)
        addr = (uintptr_t)v.mv_data;
    mdb_txn_abort(txn);
    FILE *fp = addr != 0 ? fopen("/proc/self/maps", "re") : NULL;
    if (fp == NULL)
        return false;
    char line[512];
    bool found = false;
    while (!found && fgets(line, sizeof(line), fp) != NULL) {
        unsigned long a, b;
        if (sscanf(line, "%lx-%lx", &a, &b) == 2 && addr >= a && addr < b) {
            *lo = a;
            *hi = b;
            found = true;
        }
    }
    fclose(fp);
    return found;
}

static void place_guards(spk_queue *q)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo, hi;
    drop_guards(q);
    if (!map_range(q, &lo, &hi))
        return;
    q->guard_lo = guard_at((void *)(lo - pg), pg);
    q->guard_hi = guard_at((void *)hi, pg);
}

/* ---- JOURNAL ----------------------------------------------------------------------------
 *
 * Why. A committed LMDB write transaction costs a few microseconds even with nothing to
 * flush: it copies every page on the path it changes (the record's leaf, the meta and
 * plugins DBs, the free list). Several workers take turns on LMDB's one writer lock, and a
 * 4 KiB record lands on fresh overflow pages. So send_to_control does not write LMDB:
 * it appends the record, already in its final stored form, to the journal, a ring file
 * shared by every process of the queue, and returns. Records are moved from the journal
 * into LMDB in batches (one transaction for thousands of records) by whoever consumes the
 * queue (spk_queue_read, _stats_get, _expire, _purge, _verify) and by spk_queue_sync,
 * which spoked's supervisor calls on its timer. A record is "pending" from its append
 * until it is acknowledged; where it sits is invisible to callers.
 *
 * Files. `journal`: the ring, journal_size bytes, allocated in full at creation (so an
 * append never needs a disk block: no ENOSPC, no SIGBUS through the map). `journal.ctl`:
 * one page of shared state (struct jctl), rebuilt from LMDB and the journal whenever the
 * first process opens the queue, so it never needs to reach the disk.
 *
 * Records. At absolute byte offset `off` (position off % size) a record is a 32-byte
 * struct jrec {magic, crc of the rest of the header, off, seq, len} followed by `len`
 * bytes of exactly the LMDB value (struct rec_hdr with its own CRC, then the encoded
 * EdgePayload), padded to 8 bytes. A record never wraps: the rest of the ring is skipped,
 * with a pad record when 32 bytes or more are left. Storing the absolute offset in each
 * header makes a record of an earlier lap at the same position invalid, so a scan stops
 * exactly at the end of what was written in this lap.
 *
 * Appending. Under jctl.lock (a robust, process-shared mutex): check the limits against
 * the pending counts (below), take the next sequence number, write the record at `tail`,
 * then publish it by advancing `tail` (a release store). Sequence numbers are handed out
 * in journal order, and a move always takes a prefix of the journal, so LMDB holds a
 * prefix of the sequence: the uplink reads in sequence order. A writer killed while
 * holding the lock leaves it EOWNERDEAD; the next locker rebuilds the shared state
 * (journal_rebuild) before going on.
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
 * behind, which the next transaction (the supervisor's timer: within one queue.sync
 * period) corrects; until then the counts are over, never under, the truth.
 *
 * Durability. interval: an append is a copy into the shared mapping, in the page cache as
 * soon as it is made, so it survives a crash of any process at once; spk_queue_sync moves
 * it into LMDB and flushes LMDB, which makes it safe from power loss. always: the record
 * is written with pwrite() and the journal is flushed (fdatasync) before the call returns;
 * concurrent callers of all processes share flushes (GROUP COMMIT below). LMDB itself runs
 * with MDB_NOMETASYNC: every commit flushes its data pages before writing its meta page,
 * so a power loss can cost at most the last transaction, never the file's integrity, and
 * that transaction's records are still in the journal (not yet released).
 *
 * Damage. Plugin code runs in the writers' processes and the ring is mapped writable
 * there. A stray store into a published record makes it fail its header or value CRC when
 * it is moved: it is skipped, counted (meta "damaged", spk_queue_stats.damaged), the move
 * resynchronises on the next valid header, and spk_queue_sync reports it. Guard pages
 * flank the mapping. docs/queue.md has the whole argument. */

#define JCTL_MAGIC 0x334c54434a4b5053ull /* "SPKJCTL3" */
#define JREC_MAGIC 0x314a5053u           /* "SPJ1" */
#define JPAD_MAGIC 0x504a5053u           /* "SPJP" */
#define JREC_HDR 32u
#define MOVE_MAX_RECORDS 16384u
#define MOVE_MAX_BYTES (4u << 20)     /* of values stored inline in LMDB */
#define MOVE_MAX_REF_BYTES (32u << 20) /* of values written to segments */
#define MOVE_MAX_PLUGINS 32u
#define JLOCK_SPINS 200

struct jrec {
    uint32_t magic;
    uint32_t hcrc; /* CRC-32C of off, seq, len, zero */
    uint64_t off;
    uint64_t seq;
    uint32_t len;
    uint32_t zero;
};
_Static_assert(sizeof(struct jrec) == JREC_HDR, "journal record header size");

/* The shared page (journal.ctl). Fields without _Atomic are read and written under lock. */
struct jctl {
    uint64_t magic;
    uint64_t size;           /* the ring's size this page describes */
    pthread_mutex_t lock;
    uint64_t next_seq;
    _Atomic uint64_t tail;   /* end of the published records (absolute offset) */
    uint64_t pub_count;      /* records / stored bytes ever published, cumulative */
    uint64_t pub_bytes;
    /* mirror of the newest LMDB transaction's state */
    uint64_t m_txnid;
    uint64_t m_pending;      /* records in LMDB */
    uint64_t m_bytes;
    _Atomic uint64_t m_off;  /* the journal is moved up to here */
    uint64_t m_count;        /* records / bytes ever moved, cumulative */
    uint64_t m_mbytes;
    _Atomic uint64_t released; /* ring space below this may be reused */
    _Atomic uint64_t synced;   /* always: the journal is on disk up to here */
    /* always: GROUP COMMIT */
    pthread_mutex_t flush_lock;      /* the leader's; robust, only ever trylocked */
    _Atomic uint32_t flush_gen;      /* futex word: bumped after every leader's turn */
    _Atomic uint32_t flush_sleepers; /* followers in futex_wait */
    _Atomic uint64_t mixed_ns;       /* when a publish last followed another process's */
    uint32_t last_pub;               /* under lock: pid of the last publisher */
    uint32_t need_rebuild;           /* under lock: a holder died; rebuild before use */
    /* appends that find the ring full wait for a mover at work (see Space above) */
    _Atomic uint32_t release_gen;      /* futex word: bumped whenever `released` advances */
    _Atomic uint32_t release_sleepers; /* appends in futex_wait on it */
};

_Static_assert(sizeof(struct jctl) <= 4096, "journal.ctl is one page");

/* What an LMDB transaction says about the journal and the pending records. */
struct jbase {
    uint64_t txnid, pending, bytes, off, count, mbytes, next_seq;
};

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

static uint32_t jrec_hcrc(const struct jrec *h)
{
    return ~spk_crc32c(0xFFFFFFFFu, &h->off, sizeof(*h) - offsetof(struct jrec, off));
}

static int jbase_read(spk_queue *q, MDB_txn *txn, struct jbase *b)
{
    MDB_stat ms;
    int rc = mdb_stat(txn, q->pending, &ms);
    if (rc != 0)
        return rc;
    b->txnid = mdb_txn_id(txn);
    b->pending = ms.ms_entries;
    b->bytes = meta_get(txn, q->meta, "bytes");
    b->off = meta_get(txn, q->meta, "j_off");
    b->count = meta_get(txn, q->meta, "j_count");
    b->mbytes = meta_get(txn, q->meta, "j_bytes");
    b->next_seq = meta_get(txn, q->meta, "next_seq");
    return 0;
}

/* Under lock: adopt the state of a committed transaction unless a newer one is there. */
static void mirror_store(struct jctl *c, const struct jbase *b)
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
static size_t jrec_check(const spk_queue *q, uint64_t off, uint64_t *seq, const uint8_t **val,
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
    if (h.off != off || h.zero != 0 || jrec_hcrc(&h) != h.hcrc)
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
    struct rec_hdr r;
    const uint8_t *v = q->jmap + pos + JREC_HDR;
    memcpy(&r, v, sizeof(r));
    if (r.magic != REC_MAGIC || r.wire_len != h.len - sizeof(r) ||
        rec_crc(&r, v + sizeof(r), r.wire_len) != r.crc)
        return 0;
    *seq = h.seq;
    *val = v;
    *vlen = h.len;
    return align8(JREC_HDR + h.len);
}

static uint64_t journal_resync(const spk_queue *q, uint64_t from, uint64_t end);
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
        size_t len = jrec_check(q, off, &seq, &val, &vlen, &pad);
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
            off = journal_resync(q, off, end);
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
    mirror_store(c, b);
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
static int journal_rebuild_from_lmdb(spk_queue *q)
{
    MDB_txn *txn;
    struct jbase b;
    int rc = txn_begin(q, MDB_RDONLY, &txn);
    if (rc != 0)
        return rc;
    rc = jbase_read(q, txn, &b);
    mdb_txn_abort(txn);
    if (rc == 0) {
        journal_rebuild(q, &b, false);
        q->rebuilds++;
    }
    return rc;
}

static int jlock(spk_queue *q, spk_errbuf *eb)
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
        if (journal_rebuild_from_lmdb(q) != 0) {
            pthread_mutex_unlock(m);
            return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: the journal's lock was "
                            "held by a process that died, and its state could not be "
                            "rebuilt yet (retried by the next call)", q->path);
        }
        q->jc->need_rebuild = 0;
    }
    return 0;
}

static void junlock(spk_queue *q)
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

static void journal_close(spk_queue *q)
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
        if (pwrite(fd, zero, n, (off_t)o) != (ssize_t)n)
            return errno != 0 ? errno : EIO;
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
    char tmp[4200];
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
static void seg_drop_unused(spk_queue *q);

static int journal_open(spk_queue *q, spk_errbuf *eb)
{
    char file[4200];
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
        if ((rc = mdb_env_sync(q->env, 1)) != 0 || (rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
            return lmdb_err(q, rc, "open the journal", eb);
        rc = jbase_read(q, txn, &b);
        mdb_txn_abort(txn);
        if (rc != 0)
            return lmdb_err(q, rc, "open the journal", eb);
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
        /* What the previous processes wrote is in the page cache; make it durable now,
         * so `synced` (= tail) is true. */
        fdatasync(q->jfd);
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
        seg_drop_unused(q); /* nobody else has the queue open, nobody is moving */
    }
    /* Byte 0 shared while open (converting our exclusive lock is atomic); then let the
     * next opener in. */
    if (ofd_lock(q->cfd, F_RDLCK, 0, true) != 0 || ofd_lock(q->cfd, F_UNLCK, 1, false) != 0)
        return spk_errf(eb, SPK_EIO, "queue %s: cannot lock journal.ctl: %s", q->path,
                        strerror(errno));
    return 0;
}

/* ---- SEGMENTS ----------------------------------------------------------------------------
 *
 * LMDB stores a value too large for a leaf (more than about half a page) in overflow pages
 * of its own, whole pages: a 4.2 KB record takes two 4 KiB pages, 8 KiB to allocate, copy,
 * write and flush, and a fresh file's pages are new disk blocks. Such records are moved
 * instead into SEGMENT files beside LMDB, and LMDB keeps a 32-byte struct rec_ref in
 * `pending` (magic REF_MAGIC: the record's header and where its value starts). Records that
 * fit a leaf stay inline. The choice is made per record when it is moved and is invisible
 * to callers.
 *
 * Segment space is one sequence of offsets; segment k holds [k * S, (k+1) * S) in the
 * file seg-<k in 16 hex digits>, where S is meta "seg_size" (opts.segment_size when the
 * queue was created; it never changes), each value whole (one that would cross
 * the end starts the next segment). meta "s_end" is where the next value goes; a move
 * writes its values there with pwritev(), flushes the segment (fdatasync) and only then
 * commits the transaction that points at them and advances s_end, so LMDB never refers to
 * bytes that a power loss could take back; a move that dies before its commit leaves bytes
 * past s_end, which the next move overwrites. The value in the segment is the exact value
 * the journal held (header with CRC, then the EdgePayload), so reads check it the same way.
 *
 * The `segs` DB counts, per segment (key k, 8 bytes big-endian), the pending records it
 * holds and their bytes, updated in the transactions that move, ack, expire and purge
 * them. A segment below the one s_end is in, with no entry, holds nothing pending and is
 * never written again: seg_reclaim() deletes its file (after such commits and at the first
 * open, which also removes what a crash between a commit and an unlink left). So disk use
 * follows acks at segment granularity; a segment with one record still pending stays
 * whole until that record is acknowledged or expires. */

/* Whether a value of `vlen` bytes goes to a segment: LMDB would give it overflow pages
 * (a leaf node of 8 bytes header, 8 key bytes and the value over half the page). */
static bool rec_by_ref(const spk_queue *q, uint64_t vlen)
{
    uint64_t psize = q->psize != 0 ? q->psize : 4096;
    return vlen + 16 > ((psize - 16) / 2 & ~1ull) - 2; /* LMDB's me_nodemax */
}

static void seg_name(const spk_queue *q, uint64_t k, char *buf, size_t n)
{
    snprintf(buf, n, "%s/seg-%016llx", q->path, (unsigned long long)k);
}

/* The segment number of a directory entry named seg-<16 hex digits>, or false. */
static bool seg_name_parse(const char *name, uint64_t *k)
{
    char *end;
    if (strncmp(name, "seg-", 4) != 0 || strlen(name) != 20)
        return false;
    *k = strtoull(name + 4, &end, 16);
    return *end == '\0';
}

/* An fd for reading segment k, from the handle's small cache (which owns it). Returns 0
 * or an errno value. */
static int seg_fd(spk_queue *q, uint64_t k, int *fd_out)
{
    for (unsigned i = 0; i < SEG_FDS; i++)
        if (q->segfd[i].fd >= 0 && q->segfd[i].k == k) {
            *fd_out = q->segfd[i].fd;
            return 0;
        }
    char name[4200];
    seg_name(q, k, name, sizeof(name));
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    unsigned slot = q->segfd_next++ % SEG_FDS;
    if (q->segfd[slot].fd >= 0)
        close(q->segfd[slot].fd);
    q->segfd[slot].k = k;
    q->segfd[slot].fd = fd;
    *fd_out = fd;
    return 0;
}

static void seg_forget(spk_queue *q, uint64_t k)
{
    for (unsigned i = 0; i < SEG_FDS; i++)
        if (q->segfd[i].fd >= 0 && q->segfd[i].k == k) {
            close(q->segfd[i].fd);
            q->segfd[i].fd = -1;
        }
}

/* Close cached fds of segment files deleted since (another process reclaimed them): an
 * open fd would keep their blocks allocated. Called once per read or verify. */
static void seg_fds_check(spk_queue *q)
{
    for (unsigned i = 0; i < SEG_FDS; i++) {
        struct stat st;
        if (q->segfd[i].fd >= 0 && fstat(q->segfd[i].fd, &st) == 0 && st.st_nlink == 0) {
            close(q->segfd[i].fd);
            q->segfd[i].fd = -1;
        }
    }
}

static void seg_close_all(spk_queue *q)
{
    for (unsigned i = 0; i < SEG_FDS; i++) {
        if (q->segfd[i].fd >= 0)
            close(q->segfd[i].fd);
        q->segfd[i].fd = -1;
    }
}

/* pwritev() all of iov[0..n) at `pos`, resuming after short writes. 0 or an errno value. */
static int pwritev_all(int fd, struct iovec *iov, int n, uint64_t pos)
{
    while (n > 0) {
        ssize_t w = pwritev(fd, iov, n, (off_t)pos);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        pos += (uint64_t)w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* The values a move writes: consecutive runs in one segment, written with pwritev() as
 * they fill, writeback started at once (sync_file_range), and every segment touched
 * flushed at the end, before the commit. So the disk writes one segment while the move
 * copies the next, and the flushes mostly wait for I/O already done. */
#define SEG_IOV 256
#define SEG_WRITER_FILES 8
struct seg_writer {
    spk_queue *q;
    uint64_t k;      /* the segment of the run; UINT64_MAX: none yet */
    uint64_t start;  /* the run's first byte (segment space) */
    uint64_t len;
    int niov;
    int nfd;         /* files[nfd - 1] is segment k */
    int files[SEG_WRITER_FILES]; /* opened by this move, flushed and closed at its end */
    struct iovec iov[SEG_IOV];
};

static void seg_writer_init(struct seg_writer *w, spk_queue *q)
{
    w->q = q;
    w->k = UINT64_MAX;
    w->len = 0;
    w->niov = 0;
    w->nfd = 0;
}

static int seg_run_write(struct seg_writer *w)
{
    if (w->niov == 0)
        return 0;
    int fd = w->files[w->nfd - 1];
    int e = pwritev_all(fd, w->iov, w->niov, w->start % w->q->seg_size);
    if (e == 0)
        sync_file_range(fd, (off_t)(w->start % w->q->seg_size), (off_t)w->len,
                        SYNC_FILE_RANGE_WRITE);
    w->start += w->len;
    w->len = 0;
    w->niov = 0;
    return e;
}

/* Write what is queued, flush the first `n` files and close them. 0 or an errno value. */
static int seg_flush_files(struct seg_writer *w, int n)
{
    int e = n == w->nfd ? seg_run_write(w) : 0;
    for (int i = 0; i < n; i++) {
        if (e == 0 && fdatasync(w->files[i]) != 0)
            e = errno;
        close(w->files[i]);
    }
    memmove(w->files, w->files + n, (size_t)(w->nfd - n) * sizeof(w->files[0]));
    w->nfd -= n;
    return e;
}

/* Flush and close everything (the end of a move; also its cleanup after a failure), and
 * the directory: a file this move wrote may have got its name from a rename (a spare
 * taken) by a process that died before flushing the directory. */
static int seg_flush(struct seg_writer *w)
{
    bool any = w->nfd > 0;
    int e = seg_flush_files(w, w->nfd);
    if (e == 0 && any)
        e = dir_sync(w->q->path);
    return e;
}

/* Segment k's file, created if missing (the directory then flushed, so that its name
 * survives a power loss). Returns an fd or -1 with errno set. */
static int seg_open_for_write(spk_queue *q, uint64_t k)
{
    char name[4200];
    seg_name(q, k, name, sizeof(name));
    int fd = open(name, O_RDWR | O_CLOEXEC);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    /* A spare left by seg_reclaim(), if there is one (another process may take it first). */
    DIR *d = opendir(q->path);
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        char spare[4200];
        if (strncmp(de->d_name, "spare-", 6) != 0)
            continue;
        snprintf(spare, sizeof(spare), "%s/%s", q->path, de->d_name);
        if (rename(spare, name) == 0)
            break;
    }
    if (d != NULL)
        closedir(d);
    if ((fd = open(name, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0)
        return -1;
    int e = dir_sync(q->path);
    if (e != 0) {
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* Queue `len` bytes at `val` for segment offset `soff`. 0 or an errno value. */
static int seg_add(struct seg_writer *w, uint64_t soff, const void *val, size_t len)
{
    uint64_t k = soff / w->q->seg_size;
    int e;
    if (k != w->k) {
        if ((e = seg_run_write(w)) != 0)
            return e;
        if (w->nfd == SEG_WRITER_FILES && (e = seg_flush_files(w, 1)) != 0)
            return e;
        int fd = seg_open_for_write(w->q, k);
        if (fd < 0)
            return errno;
        w->files[w->nfd++] = fd;
        w->k = k;
        w->start = soff;
    } else if (soff != w->start + w->len || w->niov == SEG_IOV) {
        if ((e = seg_run_write(w)) != 0)
            return e;
        w->start = soff;
    }
    w->iov[w->niov++] = (struct iovec){(void *)val, len};
    w->len += len;
    return 0;
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

/* Pending records taken out of segments by one transaction, summed per segment before
 * they are written to `segs` (records of one transaction mostly share a segment). */
#define SEG_DELTAS 8
struct seg_deltas {
    size_t n;
    bool zeroed; /* a segment's count reached zero: seg_reclaim() after the commit */
    struct { uint64_t k, count, bytes; } d[SEG_DELTAS];
};

static int seg_deltas_flush(spk_queue *q, MDB_txn *txn, struct seg_deltas *sd, int sign)
{
    for (size_t i = 0; i < sd->n; i++) {
        uint8_t kb[8];
        be64(kb, sd->d[i].k);
        int rc = count_adjust(txn, q->segs, kb, 8, sign, sd->d[i].count, sd->d[i].bytes,
                              &sd->zeroed);
        if (rc != 0)
            return rc;
    }
    sd->n = 0;
    return 0;
}

static int seg_deltas_add(spk_queue *q, MDB_txn *txn, struct seg_deltas *sd, int sign,
                          uint64_t k, uint64_t bytes)
{
    size_t i = 0;
    while (i < sd->n && sd->d[i].k != k)
        i++;
    if (i == sd->n) {
        int rc;
        if (sd->n == SEG_DELTAS && (rc = seg_deltas_flush(q, txn, sd, sign)) != 0)
            return rc;
        i = sd->n++;
        sd->d[i].k = k;
        sd->d[i].count = sd->d[i].bytes = 0;
    }
    sd->d[i].count++;
    sd->d[i].bytes += bytes;
    return 0;
}

/* Once the segment that s_end is in holds nothing pending, move s_end to the next
 * segment: the emptied one is then left behind and seg_reclaim() deletes its file, so
 * acknowledging everything gives all the space back. */
static int seg_retire_current(spk_queue *q, MDB_txn *txn)
{
    uint64_t s_end = meta_get(txn, q->meta, "s_end");
    if (s_end % q->seg_size == 0)
        return 0;
    uint8_t kb[8];
    be64(kb, s_end / q->seg_size);
    MDB_val k = {8, kb}, v;
    int rc = mdb_get(txn, q->segs, &k, &v);
    if (rc != MDB_NOTFOUND)
        return rc;
    return meta_put(txn, q->meta, "s_end", (s_end / q->seg_size + 1) * q->seg_size);
}

/* The end of a deleting transaction: take the records out of their segments' counts. */
static int seg_deltas_done(spk_queue *q, MDB_txn *txn, struct seg_deltas *sd)
{
    int rc = seg_deltas_flush(q, txn, sd, -1);
    if (rc == 0 && sd->zeroed)
        rc = seg_retire_current(q, txn);
    return rc;
}

/* Delete the files of segments that hold no pending record and are never written again
 * (below the segment s_end is in), as a snapshot sees them: a later transaction can only
 * add records at or above that segment, so the snapshot's verdict stays true. Errors are
 * ignored: a file left over is deleted next time. */
static bool seg_drop_spares(spk_queue *q);

static void seg_reclaim(spk_queue *q)
{
    MDB_txn *txn;
    if (txn_begin(q, MDB_RDONLY, &txn) != 0)
        return;
    uint64_t cur = meta_get(txn, q->meta, "s_end") / q->seg_size;
    DIR *d = cur > 0 ? opendir(q->path) : NULL;
    struct dirent *de;
    uint64_t *done = NULL;
    size_t ndone = 0, cap = 0, spares = 0;
    while (d != NULL && (de = readdir(d)) != NULL) {
        uint64_t k;
        if (strncmp(de->d_name, "spare-", 6) == 0) {
            spares++;
            continue;
        }
        if (!seg_name_parse(de->d_name, &k) || k >= cur)
            continue;
        uint8_t kb[8];
        be64(kb, k);
        MDB_val key = {8, kb}, v;
        if (mdb_get(txn, q->segs, &key, &v) != MDB_NOTFOUND)
            continue;
        if (ndone == cap) {
            size_t ncap = cap > 0 ? 2 * cap : 16;
            uint64_t *nd = realloc(done, ncap * sizeof(*nd));
            if (nd == NULL)
                break; /* the rest next time */
            done = nd;
            cap = ncap;
        }
        done[ndone++] = k;
    }
    if (d != NULL)
        closedir(d);
    mdb_txn_abort(txn);
    /* The deletes that emptied these segments may not be durable yet (MDB_NOMETASYNC):
     * after a power loss LMDB could come back with their records pending. Flush first. */
    if (ndone > 0 && mdb_env_sync(q->env, 1) != 0) {
        free(done);
        return;
    }
    /* Keep a few as spares: a new segment then overwrites blocks the file system has
     * already allocated, which is faster than allocating new ones (docs/queue.md). But
     * not when the disk is getting full: LMDB may need the space. */
    struct statvfs sv;
    if (ndone > 0 && statvfs(q->path, &sv) == 0 &&
        (uint64_t)sv.f_bavail * sv.f_frsize < 2ull * SEG_SPARES * q->seg_size) {
        spares = SEG_SPARES;
        seg_drop_spares(q);
    }
    for (size_t i = 0; i < ndone; i++) {
        char name[4200], spare[4200];
        seg_name(q, done[i], name, sizeof(name));
        snprintf(spare, sizeof(spare), "%s/spare-%016llx", q->path,
                 (unsigned long long)done[i]);
        seg_forget(q, done[i]);
        if (spares < SEG_SPARES && rename(name, spare) == 0)
            spares++;
        else
            unlink(name);
    }
    free(done);
}

/* Delete the files of segments above the one s_end is in: a move killed before its
 * commit leaves them, and nothing refers to them. Only while no other process has the
 * queue open (the first opener), since a move at work creates exactly such files. */
static void seg_drop_unused(spk_queue *q)
{
    MDB_txn *txn;
    if (txn_begin(q, MDB_RDONLY, &txn) != 0)
        return;
    uint64_t cur = meta_get(txn, q->meta, "s_end") / q->seg_size;
    mdb_txn_abort(txn);
    DIR *d = opendir(q->path);
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        uint64_t k;
        if (!seg_name_parse(de->d_name, &k) || k <= cur)
            continue;
        char name[4200];
        seg_name(q, k, name, sizeof(name));
        unlink(name);
    }
    if (d != NULL)
        closedir(d);
}

/* Delete every spare segment file: the disk is full and LMDB may need the space. */
static bool seg_drop_spares(spk_queue *q)
{
    DIR *d = opendir(q->path);
    struct dirent *de;
    bool any = false;
    while (d != NULL && (de = readdir(d)) != NULL) {
        char spare[4200];
        if (strncmp(de->d_name, "spare-", 6) != 0)
            continue;
        snprintf(spare, sizeof(spare), "%s/%s", q->path, de->d_name);
        any |= unlink(spare) == 0;
    }
    if (d != NULL)
        closedir(d);
    return any;
}

/* Decode an LMDB value; returns 0 or SPK_ECORRUPT (also for a reference whose value
 * could not be in a segment: a damaged reference must not make a reader allocate GiBs). */
static int rec_parse(const spk_queue *q, const MDB_val *v, struct rec_view *r)
{
    memset(r, 0, sizeof(*r));
    r->size = v->mv_size;
    if (v->mv_size < sizeof(r->h))
        return SPK_ECORRUPT;
    memcpy(&r->h, v->mv_data, sizeof(r->h));
    if (r->h.magic == REC_MAGIC && r->h.wire_len == v->mv_size - sizeof(r->h)) {
        r->wire = (const uint8_t *)v->mv_data + sizeof(r->h);
        return 0;
    }
    if (r->h.magic == REF_MAGIC && v->mv_size == sizeof(struct rec_ref)) {
        struct rec_ref ref;
        memcpy(&ref, v->mv_data, sizeof(ref));
        r->soff = ref.soff;
        r->ref = true;
        r->size = sizeof(r->h) + (uint64_t)r->h.wire_len;
        if (r->h.wire_len > SPK_QUEUE_SEGMENT_MIN ||
            r->soff % q->seg_size + r->size > q->seg_size) {
            r->size = 0; /* not to be believed; del_current still takes the record's count */
            return SPK_ECORRUPT;
        }
        return 0;
    }
    return SPK_ECORRUPT;
}

/* Copy a record's wire bytes to `dst` (r->h.wire_len bytes) and check them against its
 * CRC. Returns 0, SPK_ECORRUPT (damaged or missing bytes), SPK_ENOENT (its segment file is
 * gone: the record was deleted since the snapshot, or the file was lost) or SPK_EIO. */
static int rec_load(spk_queue *q, const struct rec_view *r, uint8_t *dst)
{
    if (!r->ref) {
        memcpy(dst, r->wire, r->h.wire_len);
        return rec_crc(&r->h, dst, r->h.wire_len) == r->h.crc ? 0 : SPK_ECORRUPT;
    }
    int fd;
    int e = seg_fd(q, r->soff / q->seg_size, &fd);
    if (e != 0)
        return e == ENOENT ? SPK_ENOENT : SPK_EIO;
    struct rec_hdr h;
    struct iovec iov[2] = {{&h, sizeof(h)}, {dst, r->h.wire_len}};
    uint64_t want = sizeof(h) + (uint64_t)r->h.wire_len;
    ssize_t got = preadv(fd, iov, 2, (off_t)(r->soff % q->seg_size));
    if (got < 0)
        return SPK_EIO;
    if ((uint64_t)got != want || h.magic != REC_MAGIC || h.crc != r->h.crc ||
        h.plugin_id != r->h.plugin_id || h.wire_len != r->h.wire_len || h.ts_ms != r->h.ts_ms ||
        rec_crc(&h, dst, h.wire_len) != h.crc)
        return SPK_ECORRUPT;
    return 0;
}

/* ---- moving journal records into LMDB ---------------------------------------------------- */

struct plugin_delta {
    uint32_t id;
    uint64_t count, bytes;
};

/* Skip a damaged stretch: the next offset in [from, end) where a valid record (or a lap's
 * end) starts, or `end`. Records are 8-byte aligned. */
static uint64_t journal_resync(const spk_queue *q, uint64_t from, uint64_t end)
{
    uint64_t seq;
    const uint8_t *val;
    uint32_t vlen;
    bool pad;
    for (uint64_t off = from + 8; off < end; off += 8) {
        if (q->jsize - off % q->jsize < JREC_HDR)
            return off; /* the implicit skip to the next lap */
        if (jrec_check(q, off, &seq, &val, &vlen, &pad) != 0)
            return off;
    }
    return end;
}

/* Commit `txn` (consumed: aborted on failure) and, when it changed the pending records,
 * mirror its state into journal.ctl (see JOURNAL, Counting). An empty transaction commits
 * nothing and reuses its ID, so it must not mirror. *out (if not NULL) receives the
 * state. Returns an LMDB code. */
static int commit_mirrored(spk_queue *q, MDB_txn *txn, bool changed, struct jbase *out)
{
    struct jbase b;
    int rc = jbase_read(q, txn, &b);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        return rc;
    if (changed && jlock(q, NULL) == 0) {
        mirror_store(q->jc, &b);
        junlock(q);
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
static uint64_t map_room_pages(spk_queue *q)
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
        room += free_list_pages(q);
    return room;
}

/* Pages a record of `vlen` value bytes may take, times 16 (fractions of a page). */
static uint64_t record_pages16(const spk_queue *q, uint32_t vlen)
{
    uint64_t node = (uint64_t)vlen + 8 + 16;
    if (node > q->psize / 2 - 64)
        return 16 * ((vlen + 16 + q->psize - 1) / q->psize) + 1;
    return (32 * node + q->psize - 1) / q->psize; /* leaves half full */
}

/* One transaction: move records from LMDB's journal position up to `end` (at most `limit`
 * records, `max_bytes` of inline values). *moved_to receives the new position, *damaged
 * the damaged records skipped. Values too large for a leaf go to segments (SEGMENTS): they
 * are written and flushed before the commit. Returns an LMDB/errno code. */
static int move_txn(spk_queue *q, uint64_t end, size_t limit, uint64_t max_bytes, bool drop,
                    uint64_t *moved_to, uint64_t *damaged)
{
    MDB_txn *txn = NULL;
    struct plugin_delta pd[MOVE_MAX_PLUGINS];
    size_t npd = 0;
    struct jbase b;
    struct seg_deltas sd = {0};
    struct seg_writer *sw = NULL;
    uint64_t room16 = map_room_pages(q), used16 = 16 * 8; /* and a few for the DBs' roots */
    room16 = room16 > UINT64_MAX / 16 ? UINT64_MAX : room16 * 16;
    int rc = txn_begin(q, 0, &txn);
    if (rc != 0)
        return rc;
    if ((rc = jbase_read(q, txn, &b)) != 0)
        goto fail;
    uint64_t s_end = meta_get(txn, q->meta, "s_end"), s_start = s_end;
    uint64_t off = b.off, n = 0, bytes = 0, inl = 0, refb = 0, bad = 0, last = 0;
    bool soft_full = false;
    while (off < end && n < limit && inl < max_bytes && refb < MOVE_MAX_REF_BYTES) {
        uint64_t seq = 0;
        const uint8_t *val;
        uint32_t vlen = 0;
        bool pad;
        size_t len = jrec_check(q, off, &seq, &val, &vlen, &pad);
        if (len != 0 && pad) {
            off += len;
            continue;
        }
        if (len == 0 || seq < b.next_seq || (last != 0 && seq <= last)) {
            bad++;
            off = journal_resync(q, off, end);
            continue;
        }
        if (drop) { /* purge: count it as purged instead of putting it */
            n++;
            bytes += vlen;
            last = seq;
            off += len;
            continue;
        }
        bool ref = rec_by_ref(q, vlen);
        used16 += record_pages16(q, ref ? sizeof(struct rec_ref) : vlen);
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
        be64(kb, seq);
        MDB_val k = {8, kb}, v = {vlen, (void *)val};
        struct rec_ref rr;
        if (ref) {
            if (sw == NULL) {
                if ((sw = malloc(sizeof(*sw))) == NULL) {
                    rc = ENOMEM;
                    goto fail;
                }
                seg_writer_init(sw, q);
            }
            if (s_end % q->seg_size + vlen > q->seg_size)
                s_end = (s_end / q->seg_size + 1) * q->seg_size; /* a value never spans two */
            if ((rc = seg_add(sw, s_end, val, vlen)) != 0 ||
                (rc = seg_deltas_add(q, txn, &sd, +1, s_end / q->seg_size, vlen)) != 0)
                goto fail;
            rr.h = h;
            rr.h.magic = REF_MAGIC;
            rr.soff = s_end;
            s_end += vlen;
            refb += vlen;
            v.mv_size = sizeof(rr);
            v.mv_data = &rr;
        } else {
            inl += vlen;
        }
        if ((rc = mdb_put(txn, q->pending, &k, &v, MDB_APPEND)) != 0)
            goto fail;
        pd[i].count++;
        pd[i].bytes += vlen;
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
        if ((rc = plugin_adjust(q, txn, pd[i].id, +1, pd[i].count, pd[i].bytes)) != 0)
            goto fail;
    /* The values must be on disk before the transaction that refers to them. */
    if (sw != NULL && (rc = seg_flush(sw)) != 0)
        goto fail;
    if ((rc = seg_deltas_flush(q, txn, &sd, +1)) != 0 ||
        (s_end != s_start && (rc = meta_put(txn, q->meta, "s_end", s_end)) != 0) ||
        (rc = meta_put(txn, q->meta, "j_off", off)) != 0 ||
        (rc = meta_put(txn, q->meta, "j_count", b.count + n)) != 0 ||
        (rc = meta_put(txn, q->meta, "j_bytes", b.mbytes + bytes)) != 0 ||
        (!drop && (rc = meta_put(txn, q->meta, "bytes", b.bytes + bytes)) != 0) ||
        (drop && n > 0 && (rc = meta_add(txn, q->meta, "purged", n)) != 0) ||
        (last >= b.next_seq && (rc = meta_put(txn, q->meta, "next_seq", last + 1)) != 0) ||
        (bad > 0 && (rc = meta_add(txn, q->meta, "damaged", bad)) != 0))
        goto fail;
    free(sw);
    sw = NULL;
    rc = commit_mirrored(q, txn, true, NULL);
    txn = NULL;
    if (rc != 0)
        return rc;
    if (s_end / q->seg_size != s_start / q->seg_size)
        seg_reclaim(q); /* the segments left behind may hold nothing pending any more */
    *moved_to = off;
    *damaged += bad;
    return 0;
fail:
    if (sw != NULL) {
        sw->niov = 0; /* nothing more to write: only close the files */
        seg_flush(sw);
        free(sw);
    }
    if (txn != NULL)
        mdb_txn_abort(txn);
    return rc;
}

static uint64_t mono_ns(void);
#define MOVE_EXTEND_NS (250 * 1000000ull) /* a move keeps up with new appends this long */

/* Whether another handle is moving with release (holds MOVER_BYTE). Our own lock never
 * conflicts with us, so a handle never waits for itself. */
static bool mover_active(const spk_queue *q)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = MOVER_BYTE,
                       .l_len = 1};
    return fcntl(q->cfd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
}

/* Tell appends waiting for journal space (futex on release_gen) to look again. */
static void release_wake(struct jctl *c)
{
    atomic_fetch_add(&c->release_gen, 1);
    if (atomic_load(&c->release_sleepers) > 0)
        syscall(SYS_futex, &c->release_gen, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* Let ring space below `upto` be reused: a move's end whose transaction is durable (a
 * later commit or an mdb_env_sync flushed LMDB after it). Wakes appends waiting for room. */
static void release_upto(spk_queue *q, uint64_t upto)
{
    struct jctl *c = q->jc;
    if (jlock(q, NULL) != 0)
        return;
    bool moved = false;
    if (upto > atomic_load_explicit(&c->released, memory_order_relaxed) && upto <= c->m_off) {
        atomic_store_explicit(&c->released, upto, memory_order_release);
        moved = true;
    }
    junlock(q);
    if (moved)
        release_wake(c);
}

/* Move every record published so far into LMDB (with a `budget` > 0: stop once that
 * many journal bytes are moved). With `release`, then flush LMDB and release the ring
 * space of everything moved. Returns 0, SPK_EQUEUE_UNAVAILABLE (map or
 * disk full: what was moved stays moved), SPK_EIO, or SPK_ECORRUPT when damaged records
 * were skipped (everything else was moved; the message says how many). */
static int journal_move(spk_queue *q, bool release, uint64_t budget, spk_errbuf *eb)
{
    uint64_t damaged = 0, end, moved_to, at, start;
    int rc = 0;
    if ((rc = jlock(q, eb)) != 0)
        return rc;
    end = atomic_load_explicit(&q->jc->tail, memory_order_acquire);
    at = start = q->jc->m_off;
    junlock(q);
    uint64_t t0 = mono_ns();
    /* Appends that find the ring full wait for a releasing move: it holds MOVER_BYTE of
     * journal.ctl (an OFD lock, which the kernel drops if the process dies). */
    bool mover = release && ofd_lock(q->cfd, F_WRLCK, MOVER_BYTE, false) == 0;
    size_t limit = MOVE_MAX_RECORDS;
    /* With the writable map every page a transaction touches must be allocated on disk
     * beforehand (ensure_headroom), so its batches are kept within the reserve. */
    uint64_t max_bytes = q->opts.writemap ? q->reserve / 4 : MOVE_MAX_BYTES;
    bool moved_any = false;
    int failed = 0;
    bool extended = false;
    uint64_t synced_to = 0; /* this call flushed LMDB with the journal moved up to here */
    while (at < end) {
        if (extended && mono_ns() - t0 >= MOVE_EXTEND_NS)
            break; /* the rest waits for the next call */
        uint64_t chunk = end - at < max_bytes ? end - at : max_bytes;
        int err = ensure_headroom(q, chunk, eb);
        if (err != 0 && seg_drop_spares(q))
            continue; /* the spare segments' space may be enough */
        if (err != 0 && max_bytes > 65536) {
            max_bytes /= 2; /* a smaller batch may fit on the disk */
            continue;
        }
        if (err == 0) {
            rc = move_txn(q, end, limit, max_bytes, false, &moved_to, &damaged);
            if ((rc == ENOSPC || rc == EDQUOT) && seg_drop_spares(q))
                continue; /* the spare segments' space may be enough */
            if ((rc == MDB_MAP_FULL || rc == ENOSPC || rc == EIO) && limit > 1) {
                limit /= 2; /* a smaller batch may fit */
                max_bytes = max_bytes > 131072 ? max_bytes / 2 : max_bytes;
                continue;
            }
            if (rc == MOVE_MAP_FULL)
                rc = MDB_MAP_FULL; /* as full as moves may make it: acks need the rest */
            if (rc != 0)
                err = lmdb_err(q, rc, "move records from the journal", eb);
        }
        if (err != 0) {
            if (!moved_any)
                failed = err; /* still release what earlier moves (readers') put in LMDB */
            break;            /* release what was moved; the caller retries for the rest */
        }
        if (moved_to == at)
            break;
        /* Make this move durable at once (MDB_NOMETASYNC left its meta page unflushed)
         * and let appends reuse its ring space while this call goes on: one more flush
         * per batch of up to MOVE_MAX_REF_BYTES, against appenders waiting a batch. */
        if (release && mdb_env_sync(q->env, 1) == 0) {
            release_upto(q, moved_to);
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
            uint64_t tail = atomic_load_explicit(&q->jc->tail, memory_order_acquire);
            if (tail - at >= q->jsize / 4 && tail - start <= q->jsize &&
                mono_ns() - t0 < MOVE_EXTEND_NS) {
                end = tail;
                extended = true;
            }
        }
    }
    int final = 0;
    if (release && (final = jlock(q, eb)) == 0) {
        uint64_t upto = q->jc->m_off; /* of a committed transaction */
        junlock(q);
        /* Flush unless this call's last batch did, and nobody moved further since. */
        if (upto != synced_to && (rc = mdb_env_sync(q->env, 1)) != 0)
            final = spk_errf(eb, SPK_EIO, "queue %s: sync: %s", q->path, mdb_strerror(rc));
        else
            release_upto(q, upto);
    }
    if (mover) { /* after the last release, so that waiters find the room */
        ofd_lock(q->cfd, F_UNLCK, MOVER_BYTE, false);
        release_wake(q->jc); /* waiters: stop waiting for us */
    }
    if (final != 0)
        return final;
    if (failed != 0)
        return failed;
    if (damaged > 0) {
        /* The skipped records were counted as published: count again from the journal. */
        if (jlock(q, NULL) == 0) {
            journal_rebuild_from_lmdb(q);
            junlock(q);
        }
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: journal: skipped %llu damaged record(s) "
                        "(a stray write by plugin code, or disk damage); every other record "
                        "was kept", q->path, (unsigned long long)damaged);
    }
    return 0;
}

/* Records published but not yet moved (cheap; no lock). */
static bool journal_staged(const spk_queue *q)
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
 * the robust flush_lock: nobody ever blocks on it); the leader reads `tail` -- every
 * record below it is completely written, since records are published after their pwrite
 * -- flushes, raises `synced` to that tail, unlocks, bumps flush_gen and wakes the
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
 * lost wake-up costs at most FOLLOWER_WAIT_NS. A failed flush is seen by every follower:
 * `synced` does not move, and each flushes on its own file descriptor next. */
#define GROUP_WAIT_NS 50000ull
#define GROUP_MIXED_NS 1000000ull
#define FOLLOWER_WAIT_NS 10000000L

static uint64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void flush_wait(struct jctl *c, uint32_t gen)
{
    struct timespec to = {0, FOLLOWER_WAIT_NS};
    atomic_fetch_add(&c->flush_sleepers, 1);
    syscall(SYS_futex, &c->flush_gen, FUTEX_WAIT, gen, &to, NULL, 0);
    atomic_fetch_sub(&c->flush_sleepers, 1);
}

static int group_commit(spk_queue *q, uint64_t end, spk_errbuf *eb)
{
    struct jctl *c = q->jc;
    for (;;) {
        uint32_t gen = atomic_load(&c->flush_gen);
        if (atomic_load_explicit(&c->synced, memory_order_acquire) >= end) {
            q->sync_shared++;
            return 0;
        }
        int rc = pthread_mutex_trylock(&c->flush_lock);
        if (rc == EOWNERDEAD) {
            pthread_mutex_consistent(&c->flush_lock); /* a leader died: nothing to repair */
            rc = 0;
        }
        if (rc == EBUSY) {
            flush_wait(c, gen);
            continue;
        }
        if (rc != 0)
            return spk_errf(eb, SPK_EIO, "queue %s: the record is stored but its flush could "
                            "not be confirmed: %s", q->path, strerror(rc));
        int err = 0;
        if (atomic_load_explicit(&c->synced, memory_order_acquire) < end) {
            uint64_t t0 = mono_ns();
            uint64_t seen = atomic_load_explicit(&c->tail, memory_order_acquire);
            if (t0 - atomic_load_explicit(&c->mixed_ns, memory_order_relaxed) <
                GROUP_MIXED_NS) {
                while (atomic_load_explicit(&c->tail, memory_order_acquire) == seen &&
                       mono_ns() - t0 < GROUP_WAIT_NS) {
#if defined(__x86_64__)
                    __builtin_ia32_pause();
#endif
                }
            }
            uint64_t upto = atomic_load_explicit(&c->tail, memory_order_acquire);
            if (fdatasync(q->jfd) == 0) {
                uint64_t cur = atomic_load(&c->synced);
                while (cur < upto && !atomic_compare_exchange_weak(&c->synced, &cur, upto))
                    ;
                q->sync_calls++;
            } else {
                err = spk_errf(eb, SPK_EIO, "queue %s: the record is stored but its flush "
                               "failed (%s): it may not survive a power loss", q->path,
                               strerror(errno));
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

/* ---- open / close ---------------------------------------------------------------------- */

static int open_dbs(spk_queue *q, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    int rc = txn_begin(q, 0, &txn);
    if (rc != 0)
        return lmdb_err(q, rc, "open", eb);
    if ((rc = mdb_dbi_open(txn, "pending", MDB_CREATE, &q->pending)) != 0 ||
        (rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &q->meta)) != 0 ||
        (rc = mdb_dbi_open(txn, "plugins", MDB_CREATE, &q->plugins)) != 0 ||
        (rc = mdb_dbi_open(txn, "segs", MDB_CREATE, &q->segs)) != 0)
        goto fail;
    uint64_t format = meta_get(txn, q->meta, "format");
    if (format == 0) {
        if ((rc = meta_put(txn, q->meta, "format", QUEUE_FORMAT)) != 0 ||
            (rc = meta_put(txn, q->meta, "next_seq", 1)) != 0)
            goto fail;
    } else if (format == 1) { /* format 1 had no segments; its records are all inline */
        if ((rc = meta_put(txn, q->meta, "format", QUEUE_FORMAT)) != 0)
            goto fail;
    } else if (format != QUEUE_FORMAT) {
        mdb_txn_abort(txn);
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: unknown queue format %llu (this build "
                        "reads format %u)", q->path, (unsigned long long)format, QUEUE_FORMAT);
    }
    q->seg_size = meta_get(txn, q->meta, "seg_size");
    if (q->seg_size == 0) {
        if (q->opts.segment_size < SPK_QUEUE_SEGMENT_MIN ||
            q->opts.segment_size > SPK_QUEUE_SEGMENT_MAX) {
            mdb_txn_abort(txn);
            return spk_errf(eb, SPK_EINVAL, "queue %s: segment size %llu: must be between %u "
                            "and %u bytes", q->path, (unsigned long long)q->opts.segment_size,
                            SPK_QUEUE_SEGMENT_MIN, SPK_QUEUE_SEGMENT_MAX);
        }
        q->seg_size = q->opts.segment_size;
        if ((rc = meta_put(txn, q->meta, "seg_size", q->seg_size)) != 0)
            goto fail;
    } else if (q->seg_size < SPK_QUEUE_SEGMENT_MIN || q->seg_size > SPK_QUEUE_SEGMENT_MAX) {
        mdb_txn_abort(txn);
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: damaged: segment size %llu out of range",
                        q->path, (unsigned long long)q->seg_size);
    }
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0)
        goto fail;
    return 0;
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    if (rc == MDB_INCOMPATIBLE)
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: not a spoke queue", q->path);
    return lmdb_err(q, rc, "open", eb);
}

int spk_queue_open(const char *path, const spk_queue_opts *opts, spk_queue **out,
                   spk_errbuf *eb)
{
    spk_queue *q = NULL;
    int err;
    int rc;

    if (path == NULL || *path == '\0' || out == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no path given");
    *out = NULL;
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
        q->opts.map_size = 2048ull * 1024 * 1024;
    q->pid = getpid();
    q->fd = -1;
    q->cfd = q->jfd = -1;
    for (unsigned i = 0; i < SEG_FDS; i++)
        q->segfd[i].fd = -1;
    q->path = strdup(path);
    if (q->path == NULL) {
        err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", path);
        goto fail;
    }

    char data[4200];
    snprintf(data, sizeof(data), "%s/data.mdb", path);
    struct stat st;
    if (!q->opts.create && stat(data, &st) != 0) {
        err = spk_errf(eb, SPK_ENOENT, "queue %s: no queue here (%s: %s)", path, data,
                       strerror(errno));
        goto fail;
    }
    if (q->opts.create && (rc = mkdir_p(path)) != 0) {
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
     * transaction, whose records the journal still holds. See JOURNAL. */
    unsigned flags = MDB_NOMETASYNC;
    if (q->opts.writemap)
        flags |= MDB_WRITEMAP;
    if ((rc = mdb_env_create(&q->env)) != 0 || (rc = mdb_env_set_maxdbs(q->env, 8)) != 0 ||
        (rc = mdb_env_set_mapsize(q->env, q->opts.map_size)) != 0) {
        err = lmdb_err(q, rc, "create environment", eb);
        goto fail;
    }
    rc = mdb_env_open(q->env, path, flags, 0600);
    if (rc != 0) {
        err = rc == ENOENT ? spk_errf(eb, SPK_ENOENT, "queue %s: %s", path, mdb_strerror(rc))
                           : lmdb_err(q, rc, "open", eb);
        if (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH)
            err = spk_errf(eb, SPK_ECORRUPT, "queue %s: not an LMDB queue (%s)", path,
                           mdb_strerror(rc));
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
    if (q->opts.writemap) {
        /* LMDB made the file map_size long but sparse: a store into a hole on a full disk
         * would be a SIGBUS. Allocate the used part and the reserve now, when failing is
         * still clean; every write transaction extends it ahead of use (ensure_headroom). */
        if (q->fd >= 0)
            ensure_headroom(q, 0, NULL); /* best effort: writers check again before use */
    }
    if ((err = open_dbs(q, eb)) != 0)
        goto fail;
    if (q->opts.writemap)
        place_guards(q);
    if ((err = journal_open(q, eb)) != 0)
        goto fail;
    seg_reclaim(q); /* what a crash between a commit and an unlink left */
    *out = q;
    return 0;
fail:
    journal_close(q);
    drop_guards(q);
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
        drop_guards(q);
        journal_close(q);
        seg_close_all(q);
        mdb_env_close(q->env);
    }
    free(q->path);
    free(q);
}

/* ---- enqueue --------------------------------------------------------------------------- */

static int check_str(const char *s, size_t limit, int code, const char *what, size_t index,
                     spk_errbuf *eb)
{
    size_t n = strnlen(s, (size_t)limit + 1);
    if (n > limit)
        return spk_errf(eb, code, "send_to_control: %s %zu is longer than %zu bytes", what,
                        index, limit);
    if (!spk_utf8_valid(s, n))
        return spk_errf(eb, SPK_EINVAL, "send_to_control: %s %zu is not valid UTF-8", what,
                        index);
    return 0;
}

int spk_queue_validate(const spk_queue_msg *m, spk_errbuf *eb)
{
    int err;
    if (m == NULL || (m->payload == NULL && m->payload_len > 0) ||
        (m->metadata == NULL && m->n_metadata > 0))
        return spk_errf(eb, SPK_EINVAL, "send_to_control: NULL payload or metadata");
    if (m->payload_len > SPOKE_MAX_PAYLOAD)
        return spk_errf(eb, SPK_EPAYLOAD_TOO_LARGE,
                        "send_to_control: payload of %zu bytes is over the %u-byte limit",
                        m->payload_len, SPOKE_MAX_PAYLOAD);
    if (m->correlation_id != NULL) {
        size_t n = strnlen(m->correlation_id, SPOKE_MAX_CORRELATION_ID + 1);
        if (n > SPOKE_MAX_CORRELATION_ID)
            return spk_errf(eb, SPK_ECORRELATION_ID,
                            "send_to_control: correlation ID is longer than %u bytes",
                            SPOKE_MAX_CORRELATION_ID);
        if (!spk_utf8_valid(m->correlation_id, n))
            return spk_errf(eb, SPK_EINVAL, "send_to_control: correlation ID is not UTF-8");
    }
    if (m->n_metadata > SPOKE_MAX_METADATA)
        return spk_errf(eb, SPK_ETOO_MANY_METADATA,
                        "send_to_control: %zu metadata entries, the limit is %u",
                        m->n_metadata, SPOKE_MAX_METADATA);
    for (size_t i = 0; i < m->n_metadata; i++) {
        if (m->metadata[i].key == NULL || m->metadata[i].value == NULL)
            return spk_errf(eb, SPK_EINVAL, "send_to_control: metadata entry %zu has a NULL "
                            "key or value", i);
        if ((err = check_str(m->metadata[i].key, SPOKE_MAX_METADATA_KEY, SPK_EMETADATA_KEY,
                             "metadata key", i, eb)) != 0 ||
            (err = check_str(m->metadata[i].value, SPOKE_MAX_METADATA_VALUE,
                             SPK_EMETADATA_VALUE, "metadata value", i, eb)) != 0)
            return err;
    }
    if (m->edge_id != NULL && !spk_utf8_valid(m->edge_id, strlen(m->edge_id)))
        return spk_errf(eb, SPK_EINVAL, "send_to_control: edge ID is not UTF-8");
    if (m->content_type != NULL && !spk_utf8_valid(m->content_type, strlen(m->content_type)))
        return spk_errf(eb, SPK_EINVAL, "send_to_control: content type is not UTF-8");
    return 0;
}

static char *str_or_empty(const char *s)
{
    return s != NULL ? (char *)s : (char *)protobuf_c_empty_string;
}

static int count_refusal(spk_queue *q, int err)
{
    if (err == SPK_EQUEUE_FULL)
        q->refused_full++;
    else if (err == SPK_EQUEUE_UNAVAILABLE || err == SPK_EIO || err == SPK_ECORRUPT)
        q->refused_unavailable++;
    else if (err != 0)
        q->refused_invalid++;
    return err;
}

/* Write a record of `size` stored bytes (need = its length in the ring) at absolute
 * offset `off`, after a pad of `padlen` bytes at `off - padlen`. Under the lock. */
static int journal_write(spk_queue *q, Spoke__Control__V1__EdgePayload *ep,
                         const spk_queue_msg *m, uint64_t off, uint64_t padlen,
                         size_t wire_len, size_t need, spk_errbuf *eb)
{
    struct jrec pad = {JPAD_MAGIC, 0, off - padlen, 0, (uint32_t)padlen, 0};
    struct jrec h = {JREC_MAGIC, 0, off, ep->sequence,
                     (uint32_t)(sizeof(struct rec_hdr) + wire_len), 0};
    struct rec_hdr r = {REC_MAGIC, 0, m->plugin_id, (uint32_t)wire_len, m->edge_timestamp_ms};
    pad.hcrc = jrec_hcrc(&pad);
    h.hcrc = jrec_hcrc(&h);
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
    uint8_t *wire = dst + JREC_HDR + sizeof(r);
    size_t packed = spoke__control__v1__edge_payload__pack(ep, wire);
    if (packed != wire_len)
        return spk_errf(eb, SPK_EIO, "queue %s: encoder wrote %zu bytes, expected %zu",
                        q->path, packed, wire_len);
    r.crc = rec_crc(&r, wire, wire_len);
    memcpy(dst + JREC_HDR, &r, sizeof(r));
    memcpy(dst, &h, sizeof(h));
    if (!q->opts.sync_always)
        return 0;
    /* always: pwrite (see GROUP COMMIT) */
    if ((padlen >= JREC_HDR &&
         pwrite(q->jfd, &pad, sizeof(pad), (off_t)((off - padlen) % q->jsize)) !=
             (ssize_t)sizeof(pad)) ||
        pwrite(q->jfd, dst, need, (off_t)(off % q->jsize)) != (ssize_t)need)
        return spk_errf(eb, errno == ENOSPC ? SPK_EQUEUE_UNAVAILABLE : SPK_EIO,
                        "queue %s: cannot write the journal: %s; nothing was stored",
                        q->path, strerror(errno != 0 ? errno : EIO));
    return 0;
}

#define APPEND_TRIES 4
#define APPEND_WAITS 10                /* a mover that frees nothing in 10 waits ... */
#define APPEND_WAIT_NS (10 * 1000000L) /* ... of 10 ms is helped, not waited for */
#define APPEND_WAIT_MAX_NS (1000 * 1000000ull) /* nor one that takes longer than 1 s */

int spk_queue_enqueue(spk_queue *q, const spk_queue_msg *m, uint64_t *seq_out,
                      uint64_t *pending_out, spk_errbuf *eb)
{
    Spoke__Control__V1__EdgePayload ep = SPOKE__CONTROL__V1__EDGE_PAYLOAD__INIT;
    Spoke__Control__V1__KeyValue kvs[SPOKE_MAX_METADATA];
    Spoke__Control__V1__KeyValue *kvp[SPOKE_MAX_METADATA];
    int err;

    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    if ((err = spk_queue_validate(m, eb)) != 0)
        return count_refusal(q, err);

    ep.plugin_id = m->plugin_id;
    ep.payload.len = m->payload_len;
    ep.payload.data = (uint8_t *)m->payload;
    ep.correlation_id = str_or_empty(m->correlation_id);
    ep.edge_timestamp_ms = m->edge_timestamp_ms;
    ep.content_type = str_or_empty(m->content_type);
    ep.edge_id = str_or_empty(m->edge_id);
    for (size_t i = 0; i < m->n_metadata; i++) {
        spoke__control__v1__key_value__init(&kvs[i]);
        kvs[i].key = (char *)m->metadata[i].key;
        kvs[i].value = (char *)m->metadata[i].value;
        kvp[i] = &kvs[i];
    }
    ep.n_metadata = m->n_metadata;
    ep.metadata = m->n_metadata > 0 ? kvp : NULL;

    struct jctl *c = q->jc;
    if ((err = jlock(q, eb)) != 0)
        return count_refusal(q, err);
    int waits = 0;
    uint64_t wait_from = 0;
    for (int tries = 0;; tries++) {
        uint64_t pending = c->m_pending + (c->pub_count - c->m_count);
        uint64_t bytes = c->m_bytes + (c->pub_bytes - c->m_mbytes);
        if (q->opts.max_pending > 0 && pending >= q->opts.max_pending) {
            junlock(q);
            return count_refusal(q, spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu "
                                             "records pending (queue.max_pending)", q->path,
                                             (unsigned long long)pending));
        }
        uint64_t seq = c->next_seq;
        ep.sequence = seq;
        size_t wire_len = spoke__control__v1__edge_payload__get_packed_size(&ep);
        uint64_t size = spk_queue_record_size(wire_len);
        if (q->opts.max_bytes > 0 && bytes + size > q->opts.max_bytes) {
            junlock(q);
            return count_refusal(
                q, spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu bytes pending, %llu "
                            "more would pass queue.max_bytes (%llu)", q->path,
                            (unsigned long long)bytes, (unsigned long long)size,
                            (unsigned long long)q->opts.max_bytes));
        }
        if (wire_len > SPK_QUEUE_SEGMENT_MIN - sizeof(struct rec_hdr) ||
            (rec_by_ref(q, size) && size > q->seg_size)) {
            junlock(q);
            return count_refusal(q, spk_errf(eb, SPK_EPAYLOAD_TOO_LARGE, "queue %s: a record "
                                             "of %llu bytes (payload, metadata, edge ID and "
                                             "content type) is over the %u-byte limit",
                                             q->path, (unsigned long long)size,
                                             SPK_QUEUE_SEGMENT_MIN - 24u));
        }
        size_t need = align8(JREC_HDR + (size_t)size);
        if (need > q->jsize / 2) { /* only with an absurdly long edge ID or content type */
            junlock(q);
            return count_refusal(q, spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: a record "
                                             "of %zu bytes is more than half the journal "
                                             "(%llu bytes); raise queue.journal_size",
                                             q->path, need, (unsigned long long)q->jsize));
        }
        uint64_t tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
        uint64_t pos = tail % q->jsize;
        uint64_t padlen = pos + need > q->jsize ? q->jsize - pos : 0;
        uint64_t released = atomic_load_explicit(&c->released, memory_order_acquire);
        if (tail + padlen + need - released > q->jsize) {
            /* The ring is full: wait for the mover at work, or move, flush and release
             * ourselves, and try again (see Space at the top of JOURNAL). */
            uint32_t gen = atomic_load(&c->release_gen);
            junlock(q);
            if (wait_from == 0)
                wait_from = mono_ns();
            if (waits < APPEND_WAITS && mono_ns() - wait_from < APPEND_WAIT_MAX_NS &&
                mover_active(q)) {
                struct timespec to = {0, APPEND_WAIT_NS};
                atomic_fetch_add(&c->release_sleepers, 1);
                syscall(SYS_futex, &c->release_gen, FUTEX_WAIT, gen, &to, NULL, 0);
                atomic_fetch_sub(&c->release_sleepers, 1);
                if (atomic_load(&c->release_gen) == gen)
                    waits++; /* no progress */
                tries--; /* waiting for a mover is not a failed try */
                if ((err = jlock(q, eb)) != 0)
                    return count_refusal(q, err);
                continue;
            }
            if (tries == APPEND_TRIES)
                return count_refusal(q, spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: "
                                                 "the journal (%llu bytes) stays full: "
                                                 "records are appended faster than they "
                                                 "can be moved into LMDB", q->path,
                                                 (unsigned long long)q->jsize));
            /* Only what this record needs (one batch): this runs inside a plugin's hook,
             * which the supervisor's watchdog times. */
            err = journal_move(q, true, need, eb);
            if (err != 0 && err != SPK_ECORRUPT)
                return count_refusal(q, err);
            if ((err = jlock(q, eb)) != 0)
                return count_refusal(q, err);
            continue;
        }
        uint64_t off = tail + padlen;
        if ((err = journal_write(q, &ep, m, off, padlen, wire_len, need, eb)) != 0) {
            junlock(q);
            return count_refusal(q, err);
        }
        c->next_seq = seq + 1;
        c->pub_count++;
        c->pub_bytes += size;
        atomic_store_explicit(&c->tail, off + need, memory_order_release);
        if (q->opts.sync_always && c->last_pub != (uint32_t)q->pid) {
            if (c->last_pub != 0)
                atomic_store_explicit(&c->mixed_ns, mono_ns(), memory_order_relaxed);
            c->last_pub = (uint32_t)q->pid;
        }
        junlock(q);
        if (q->opts.sync_always && (err = group_commit(q, off + need, eb)) != 0)
            return count_refusal(q, err);
        if (seq_out != NULL)
            *seq_out = seq;
        if (pending_out != NULL)
            *pending_out = pending + 1;
        return 0;
    }
}

int spk_queue_send(spk_queue *q, uint32_t plugin_id, const char *edge_id,
                   const void *payload, size_t len, const char *correlation_id,
                   const spoke_kv *metadata, size_t n_metadata, bool json, int64_t now_ms,
                   uint64_t *seq, uint64_t *pending, spk_errbuf *eb)
{
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    if (json && len <= SPOKE_MAX_PAYLOAD && !spk_json_valid(payload, len))
        return count_refusal(q, spk_errf(eb, SPK_ENOT_JSON, "send_to_control_json: the "
                                         "text is not one well-formed JSON value"));
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

/* Before reading LMDB: move what the journal holds, so readers see every pending record
 * in sequence order. Best effort: when the map or disk is full, what LMDB has is read. */
static void consume_prepare(spk_queue *q)
{
    /* Take the journal's lock once: if a writer died holding it, the rebuild adopts the
     * record it had completed, so this call moves it rather than count it as staged. */
    if (jlock(q, NULL) == 0)
        junlock(q);
    if (journal_staged(q))
        journal_move(q, false, 0, NULL);
}

/* spk_queue_read hands records to the uplink, which sends them: they must be durable in
 * LMDB first, or a power loss could take LMDB (and next_seq) back below sequence numbers
 * hubd has already seen, and new records would reuse them. So a read that moved anything
 * flushes, as spk_queue_sync does. */
static void read_prepare(spk_queue *q)
{
    if (jlock(q, NULL) == 0) /* as in consume_prepare */
        junlock(q);
    if (journal_staged(q) || atomic_load(&q->jc->released) !=
                                 atomic_load_explicit(&q->jc->m_off, memory_order_relaxed))
        journal_move(q, true, 0, NULL);
}

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
    read_prepare(q);
    seg_fds_check(q);
    if ((rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return lmdb_err(q, rc, "read", eb);
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
    MDB_val k, v;
    bool missing = false;
    rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (rc == 0 && batch->n < n_items) {
        struct rec_view r;
        spk_queue_item *it = &batch->items[batch->n];
        it->seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        it->status = rec_parse(q, &v, &r);
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
            errno = 0;
            it->status = rec_load(q, &r, batch->buf + batch->wire_bytes);
            if (r.ref && it->status == SPK_ECORRUPT)
                it->status = SPK_ENOENT; /* checked again below */
            if (it->status == SPK_EIO) {
                err = spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot read segment "
                               "seg-%016llx: %s", q->path,
                               (unsigned long long)(r.soff / q->seg_size),
                               strerror(errno != 0 ? errno : EIO));
                goto fail;
            }
        }
        if (it->status != 0) {
            it->wire_len = 0; /* skip its bytes; the caller acks it away */
            missing |= it->status == SPK_ENOENT;
        } else {
            it->plugin_id = r.h.plugin_id;
            it->edge_timestamp_ms = r.h.ts_ms;
            it->wire_len = r.h.wire_len;
            batch->wire_bytes += r.h.wire_len;
        }
        batch->n++;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    if (rc != 0 && rc != MDB_NOTFOUND)
        goto fail_lmdb;
    if (missing) {
        /* A segment file that is gone or holds other bytes: its records were acknowledged
         * (or expired, or purged) by another process since this snapshot, which then
         * deleted or reused the file; they are left out. One still pending is damage. */
        mdb_cursor_close(cur);
        cur = NULL;
        mdb_txn_abort(txn);
        txn = NULL;
        if ((rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
            goto fail_lmdb;
        size_t kept = 0;
        for (size_t i = 0; i < batch->n; i++) {
            spk_queue_item it = batch->items[i];
            if (it.status == SPK_ENOENT) {
                uint8_t kb[8];
                be64(kb, it.seq);
                MDB_val key = {8, kb}, val;
                if ((rc = mdb_get(txn, q->pending, &key, &val)) == MDB_NOTFOUND)
                    continue;
                if (rc != 0)
                    goto fail_lmdb;
                it.status = SPK_ECORRUPT;
            }
            batch->items[kept++] = it;
        }
        batch->n = kept;
    }
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
    err = lmdb_err(q, rc, "read", eb);
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    spk_queue_batch_free(batch);
    return err;
}

/* ---- ack / expire / purge ------------------------------------------------------------- */

/* Delete the record under the cursor, updating counters (a segment's through `sd`, which
 * the caller flushes with sign -1 before its commit). */
static int del_current(spk_queue *q, MDB_txn *txn, MDB_cursor *cur, const MDB_val *v,
                       uint64_t *bytes_freed, struct seg_deltas *sd)
{
    struct rec_view r;
    int rc;
    if (rec_parse(q, v, &r) == 0 || r.ref) { /* a damaged reference: its count at least */
        if ((rc = plugin_adjust(q, txn, r.h.plugin_id, -1, 1, r.size)) != 0)
            return rc;
        if (r.ref && (rc = seg_deltas_add(q, txn, sd, -1, r.soff / q->seg_size, r.size)) != 0)
            return rc;
    }
    *bytes_freed += r.size;
    return mdb_cursor_del(cur, 0);
}

static int finish_delete(spk_queue *q, MDB_txn *txn, uint64_t bytes_freed, const char *counter,
                         uint64_t n)
{
    uint64_t bytes = meta_get(txn, q->meta, "bytes");
    int rc = meta_put(txn, q->meta, "bytes", bytes > bytes_freed ? bytes - bytes_freed : 0);
    if (rc == 0 && n > 0)
        rc = meta_add(txn, q->meta, counter, n);
    return rc;
}

/* LMDB hands pages freed by transaction T to writers only from T + 2 on (T + 1 may still
 * be read by a snapshot of T). When the map is more than half used, commit one tiny
 * transaction after a delete, so that space freed by an ack, expiry or purge is usable by
 * the very next enqueue even if every enqueue in between fails with "map full". Errors
 * are ignored: this only hastens reuse. */
static void free_space_now(spk_queue *q)
{
    MDB_envinfo info;
    MDB_stat est;
    MDB_txn *txn;
    if (mdb_env_info(q->env, &info) != 0 || mdb_env_stat(q->env, &est) != 0)
        return;
    if ((info.me_last_pgno + 1) * (uint64_t)est.ms_psize < info.me_mapsize / 2)
        return;
    if (txn_begin(q, 0, &txn) != 0)
        return;
    if (meta_add(txn, q->meta, "generation", 1) != 0) {
        mdb_txn_abort(txn);
        return;
    }
    mdb_txn_commit(txn);
}

/* One transaction: delete the records of seqs[0..n) that are there; *count gets how many.
 * Returns an LMDB code. */
static int ack_txn(spk_queue *q, const uint64_t *seqs, size_t n, size_t *count)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    struct seg_deltas sd = {0};
    uint64_t freed = 0;
    size_t c = 0;
    int rc = txn_begin(q, 0, &txn);
    if (rc != 0)
        return rc;
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        uint8_t kb[8];
        be64(kb, seqs[i]);
        MDB_val k = {8, kb}, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
        if (rc == MDB_NOTFOUND)
            continue;
        if (rc != 0 || (rc = del_current(q, txn, cur, &v, &freed, &sd)) != 0)
            goto fail;
        c++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if ((rc = seg_deltas_done(q, txn, &sd)) != 0 ||
        (c > 0 && (rc = finish_delete(q, txn, freed, "acked", c)) != 0))
        goto fail;
    rc = commit_mirrored(q, txn, c > 0, NULL);
    txn = NULL;
    if (rc != 0)
        return rc;
    if (c > 0)
        free_space_now(q);
    if (sd.zeroed)
        seg_reclaim(q);
    *count = c;
    return 0;
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    return rc;
}

int spk_queue_ack(spk_queue *q, const uint64_t *seqs, size_t n, size_t *acked, spk_errbuf *eb)
{
    if (acked != NULL)
        *acked = 0;
    if (q == NULL || (seqs == NULL && n > 0))
        return spk_errf(eb, SPK_EINVAL, "queue: no handle or sequence list");
    if (n == 0)
        return 0;
    consume_prepare(q); /* a record may be acked before a read moved it */
    /* Deleting copies every leaf it touches, so a big ack on a full map or disk may not
     * fit in one transaction: then it goes in smaller ones, each freeing room for those
     * after it. */
    size_t done = 0, total = 0, chunk = n;
    while (done < n) {
        size_t m = n - done < chunk ? n - done : chunk, count = 0;
        uint64_t lo = UINT64_MAX, hi = 0;
        for (size_t i = done; i < done + m; i++) {
            lo = seqs[i] < lo ? seqs[i] : lo;
            hi = seqs[i] > hi ? seqs[i] : hi;
        }
        uint64_t span = hi - lo + 1; /* 0 only after wrapping: every key */
        int err = wmap_headroom(q, span == 0 ? UINT64_MAX : span, m, eb);
        if (err == SPK_EQUEUE_UNAVAILABLE && seg_drop_spares(q))
            continue;
        if (err == SPK_EQUEUE_UNAVAILABLE && m > 1) {
            chunk = m / 2;
            continue;
        }
        if (err != 0) {
            if (acked != NULL)
                *acked = total;
            return err;
        }
        int rc = ack_txn(q, seqs + done, m, &count);
        if ((rc == ENOSPC || rc == EDQUOT) && seg_drop_spares(q))
            continue;
        if ((rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT) && m > 1) {
            chunk = m / 2;
            continue;
        }
        if (rc != 0) {
            if (acked != NULL)
                *acked = total;
            return lmdb_err(q, rc, "ack", eb);
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
    consume_prepare(q);
    int64_t cutoff = spk_queue_now_ms(q) - (int64_t)q->opts.retention_ms;
    uint64_t per_txn = q->opts.writemap ? EXPIRE_PER_TXN_WRITEMAP : EXPIRE_PER_TXN;
    /* Bounded transactions, so a huge backlog does not make one huge dirty set. */
    for (;;) {
        MDB_txn *txn = NULL;
        MDB_cursor *cur = NULL;
        struct seg_deltas sd = {0};
        uint64_t freed = 0, n = 0;
        bool more = false;
        int err = wmap_headroom(q, per_txn, per_txn, eb);
        if (err == SPK_EQUEUE_UNAVAILABLE && seg_drop_spares(q))
            continue; /* the spare segments' space may be enough */
        if (err != 0) {
            if (expired != NULL)
                *expired = total;
            return err;
        }
        if ((rc = txn_begin(q, 0, &txn)) != 0)
            return lmdb_err(q, rc, "expire", eb);
        if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
            goto fail;
        MDB_val k, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        while (rc == 0) {
            struct rec_view r;
            if (rec_parse(q, &v, &r) == 0 && r.h.ts_ms >= cutoff)
                break; /* a corrupt header counts as expired: it cannot be sent anyway */
            if (n == per_txn) {
                more = true;
                break;
            }
            if ((rc = del_current(q, txn, cur, &v, &freed, &sd)) != 0)
                goto fail;
            n++;
            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); /* we always delete the oldest */
        }
        if (rc != 0 && rc != MDB_NOTFOUND)
            goto fail;
        mdb_cursor_close(cur);
        cur = NULL;
        if ((rc = seg_deltas_done(q, txn, &sd)) != 0 ||
            (n > 0 && (rc = finish_delete(q, txn, freed, "expired", n)) != 0))
            goto fail;
        rc = commit_mirrored(q, txn, n > 0, NULL);
        txn = NULL;
        if (rc != 0)
            goto fail;
        if (sd.zeroed)
            seg_reclaim(q);
        total += n;
        if (!more)
            break;
        continue;
    fail:
        if (cur != NULL)
            mdb_cursor_close(cur);
        if (txn != NULL)
            mdb_txn_abort(txn);
        if ((rc == ENOSPC || rc == EDQUOT) && seg_drop_spares(q))
            continue; /* the spare segments' space may be enough */
        if (expired != NULL)
            *expired = total;
        return lmdb_err(q, rc, "expire", eb);
    }
    if (total > 0)
        free_space_now(q);
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
    journal_move(q, false, 0, NULL);
    int err = wmap_headroom(q, 0, 0, eb); /* drops copy no leaves: branches + free list */
    if (err != 0)
        return err;
    if ((rc = txn_begin(q, 0, &txn)) != 0)
        return lmdb_err(q, rc, "purge", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_drop(txn, q->pending, 0)) != 0 || (rc = mdb_drop(txn, q->plugins, 0)) != 0 ||
        (rc = mdb_drop(txn, q->segs, 0)) != 0 || (rc = seg_retire_current(q, txn)) != 0 ||
        (rc = meta_put(txn, q->meta, "bytes", 0)) != 0 ||
        (rc = meta_add(txn, q->meta, "purged", ms.ms_entries)) != 0)
        goto fail;
    struct jbase jb;
    rc = commit_mirrored(q, txn, true, &jb);
    txn = NULL;
    if (rc != 0)
        goto fail;
    free_space_now(q);
    seg_reclaim(q);
    uint64_t total = ms.ms_entries;
    /* What the map could not take: drop it from the journal, counted as purged. */
    if (jlock(q, eb) == 0) {
        uint64_t end = atomic_load_explicit(&q->jc->tail, memory_order_acquire);
        uint64_t at = q->jc->m_off, dropped_to, bad = 0;
        junlock(q);
        while (at < end) {
            uint64_t before = jb.count;
            if ((rc = move_txn(q, end, MOVE_MAX_RECORDS, UINT64_MAX, true, &dropped_to,
                               &bad)) != 0)
                return lmdb_err(q, rc, "purge the journal", eb);
            if (dropped_to == at)
                break;
            at = dropped_to;
            if (jlock(q, NULL) == 0) {
                total += q->jc->m_count - before;
                jb.count = q->jc->m_count;
                junlock(q);
            }
        }
    }
    if (purged != NULL)
        *purged = total;
    return 0;
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    return lmdb_err(q, rc, "purge", eb);
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
    consume_prepare(q);
    if ((rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return lmdb_err(q, rc, "stats", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0)
        goto fail_lmdb;
    st->pending = ms.ms_entries;
    st->pending_bytes = meta_get(txn, q->meta, "bytes");
    st->next_seq = meta_get(txn, q->meta, "next_seq");
    st->acked = meta_get(txn, q->meta, "acked");
    st->expired = meta_get(txn, q->meta, "expired");
    st->purged = meta_get(txn, q->meta, "purged");
    st->damaged = meta_get(txn, q->meta, "damaged");
    uint64_t jcount = meta_get(txn, q->meta, "j_count");
    uint64_t jbytes = meta_get(txn, q->meta, "j_bytes");

    MDB_val k, v;
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail_lmdb;
    if (mdb_cursor_get(cur, &k, &v, MDB_FIRST) == 0) {
        struct rec_view r;
        st->oldest_seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        if (rec_parse(q, &v, &r) == 0) {
            int64_t age = spk_queue_now_ms(q) - r.h.ts_ms;
            st->oldest_age_ms = age > 0 ? age : 0;
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
    if (jlock(q, NULL) == 0) {
        st->staged = c->pub_count > jcount ? c->pub_count - jcount : 0;
        st->pending += st->staged;
        st->pending_bytes += c->pub_bytes > jbytes ? c->pub_bytes - jbytes : 0;
        if (c->next_seq > st->next_seq)
            st->next_seq = c->next_seq;
        st->journal_used = atomic_load(&c->tail) - atomic_load(&c->released);
        junlock(q);
    }
    st->journal_size = q->jsize;
    return 0;
fail_lmdb:
    err = lmdb_err(q, rc, "stats", eb);
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    spk_queue_stats_free(st);
    return err;
}

int spk_queue_sync(spk_queue *q, spk_errbuf *eb)
{
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    return journal_move(q, true, 0, eb);
}

double spk_queue_journal_fill(const spk_queue *q)
{
    if (q == NULL || q->jc == NULL || q->jsize == 0)
        return 0.0;
    uint64_t used = atomic_load_explicit(&q->jc->tail, memory_order_relaxed) -
                    atomic_load_explicit(&q->jc->released, memory_order_relaxed);
    return used >= q->jsize ? 1.0 : (double)used / (double)q->jsize;
}

/* ---- verify ------------------------------------------------------------------------------ */

/* Sum the (count, bytes) values of a counters DB (plugins, segs). Returns an LMDB code. */
static int sum_counters(MDB_txn *txn, MDB_dbi dbi, uint64_t *count, uint64_t *bytes)
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

/* One read snapshot: records, their CRCs and order, and the counters kept beside them. A
 * stray store into a writable map shows up here as a CRC failure, a record count or byte
 * total that no longer matches the counters, or an LMDB error while walking the tree. */
int spk_queue_verify(spk_queue *q, uint64_t *bad_out, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t n = 0, bytes = 0, bad = 0, prev = 0, refs = 0, ref_bytes = 0;
    uint8_t *buf = NULL;
    size_t cap = 0;
    uint64_t *recheck = NULL; /* by reference and unreadable: deleted since, or damaged? */
    size_t nrecheck = 0, recheck_cap = 0;
    bool unordered = false;
    int rc;

    if (bad_out != NULL)
        *bad_out = 0;
    if (q == NULL)
        return spk_errf(eb, SPK_EINVAL, "queue: no handle");
    consume_prepare(q);
    seg_fds_check(q);
    if ((rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return lmdb_err(q, rc, "verify", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    MDB_val k, v;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        struct rec_view r;
        uint64_t seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        if (seq <= prev)
            unordered = true;
        prev = seq;
        n++;
        int st = rec_parse(q, &v, &r);
        bytes += r.size;
        if (st == 0 && r.ref) {
            refs++;
            ref_bytes += r.size;
        }
        if (st == 0 && (buf == NULL || r.h.wire_len > cap)) {
            uint8_t *nbuf = realloc(buf, r.h.wire_len > 0 ? r.h.wire_len : 1);
            if (nbuf == NULL)
                goto nomem;
            buf = nbuf;
            cap = r.h.wire_len;
        }
        int ld = st == 0 ? rec_load(q, &r, buf) : st;
        if (ld != 0 && r.ref) {
            if (nrecheck == recheck_cap) {
                size_t ncap = recheck_cap ? recheck_cap * 2 : 64;
                uint64_t *nr = realloc(recheck, ncap * sizeof(*nr));
                if (nr == NULL)
                    goto nomem;
                recheck = nr;
                recheck_cap = ncap;
            }
            recheck[nrecheck++] = seq;
        } else if (ld != 0) {
            bad++;
        }
    }
    free(buf);
    if (rc != MDB_NOTFOUND)
        goto fail;
    mdb_cursor_close(cur);
    cur = NULL;
    uint64_t seg_count = 0, seg_bytes = 0, pl_count = 0, pl_bytes = 0;
    uint64_t meta_bytes = meta_get(txn, q->meta, "bytes");
    if ((rc = sum_counters(txn, q->segs, &seg_count, &seg_bytes)) != 0 ||
        (rc = sum_counters(txn, q->plugins, &pl_count, &pl_bytes)) != 0)
        goto fail;
    mdb_txn_abort(txn);
    txn = NULL;
    if (nrecheck > 0) {
        /* Records another process acknowledged (or expired, or purged) during the walk
         * lose their segment file; only those still pending are damage. */
        rc = txn_begin(q, MDB_RDONLY, &txn);
        for (size_t i = 0; rc == 0 && i < nrecheck; i++) {
            uint8_t kb[8];
            be64(kb, recheck[i]);
            MDB_val key = {8, kb}, val;
            int g = mdb_get(txn, q->pending, &key, &val);
            if (g == 0)
                bad++;
            else if (g != MDB_NOTFOUND)
                rc = g;
        }
        if (rc != 0)
            goto fail;
        mdb_txn_abort(txn);
        txn = NULL;
    }
    free(recheck);
    recheck = NULL;
    if (bad_out != NULL)
        *bad_out = bad;
    if (bad > 0 || unordered || n != ms.ms_entries || bytes != meta_bytes || n != pl_count ||
        bytes != pl_bytes || refs != seg_count || ref_bytes != seg_bytes)
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: damaged: %llu of %llu records fail their "
                        "CRC or are missing%s; walked %llu records / %llu bytes (%llu / %llu in "
                        "segments), counters say %llu entries, %llu bytes, per plugin %llu "
                        "records / %llu bytes, per segment %llu records / %llu bytes", q->path,
                        (unsigned long long)bad, (unsigned long long)n,
                        unordered ? ", keys out of order" : "", (unsigned long long)n,
                        (unsigned long long)bytes, (unsigned long long)refs,
                        (unsigned long long)ref_bytes, (unsigned long long)ms.ms_entries,
                        (unsigned long long)meta_bytes, (unsigned long long)pl_count,
                        (unsigned long long)pl_bytes, (unsigned long long)seg_count,
                        (unsigned long long)seg_bytes);
    return 0;
nomem:
    free(buf);
    free(recheck);
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
fail:
    free(recheck);
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    return lmdb_err(q, rc, "verify", eb);
}
