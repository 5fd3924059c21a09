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
 *   meta     key: a name; value: u64. "format" (1), "next_seq", "bytes" (sum of
 *            record sizes in pending), and the lifetime counters "acked", "expired",
 *            "purged".
 *   plugins  key: plugin ID, 4 bytes big-endian; value: u64 count, u64 bytes of that
 *            plugin's pending records. Entries at zero are deleted.
 *
 * Every change to pending updates meta and plugins in the same write transaction, so the
 * counters can never disagree with the records, whatever process dies when. next_seq is
 * persisted with each enqueue, which makes sequence numbers monotonic across restarts and
 * purges. The pending count is the pending DB's entry count (mdb_stat, O(1)).
 *
 * CONCURRENCY. LMDB allows one write transaction at a time per environment, across
 * processes, through a robust process-shared mutex in lock.mdb: a writer killed with
 * kill -9 leaves the mutex EOWNERDEAD and its transaction uncommitted, and the next writer
 * carries on. Readers (the uplink's reads, stats) never block writers. Dead readers' slots
 * are cleared by mdb_reader_check() at open (and LMDB clears them itself when the reader
 * table fills).
 *
 * THE WRITABLE MAP (opts.writemap, spoked's default). With MDB_WRITEMAP an interval-policy
 * commit is a few stores into the shared mapping and no system call, about ten times
 * cheaper than LMDB's write(2) path. Plugins run in the same process, so the map is
 * guarded: PROT_NONE pages on both sides stop linear overflows from neighbouring
 * mappings, the per-record CRC and spk_queue_verify() detect any other stray store, and
 * blocks are fallocate()d ahead of use so a full disk is an error, never a SIGBUS
 * (ensure_headroom, wmap_headroom). docs/queue.md has the argument and the numbers.
 *
 * DURABILITY. interval: MDB_NOSYNC, flushed by the supervisor's timer (spk_queue_sync).
 * always: MDB_NOMETASYNC commits completed by a group sync shared across processes
 * (GROUP SYNC below). sync.lock in the queue directory holds the shared state of the
 * group sync and of the writer hint (WRITER HINT below).
 */
#include "queue.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "spoke/control/v1/control.pb-c.h"

#define REC_MAGIC 0x31515053u /* "SPQ1" little-endian */
#define QUEUE_FORMAT 1u
#define EXPIRE_PER_TXN 10000u
#define EXPIRE_PER_TXN_WRITEMAP 1000u /* bounded dirty set: fits the allocated headroom */
#define SYNC_MAGIC 0x31434e5953515053ull /* "SPQSYNC1" */

struct rec_hdr {
    uint32_t magic;
    uint32_t crc;
    uint32_t plugin_id;
    uint32_t wire_len;
    int64_t ts_ms;
};
_Static_assert(sizeof(struct rec_hdr) == SPK_QUEUE_RECORD_OVERHEAD, "record header size");

struct spk_queue {
    MDB_env *env;
    MDB_dbi pending;
    MDB_dbi meta;
    MDB_dbi plugins;
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
    /* sync always: the group-sync area shared by every process (see GROUP SYNC) */
    int sync_fd;
    struct sync_area *sync;
    uint64_t hint_seq;     /* tokens of writer_hint */
    uint64_t sync_calls;   /* syncs this handle did itself */
    uint64_t sync_shared;  /* commits made durable by another caller's sync */
};

/* The shared state of group sync: one page of the file sync.lock in the queue directory,
 * mapped shared by every process that opened the queue with sync_always. The file's
 * flock() is the leader lock: the kernel drops it when its holder dies, so a leader
 * killed mid-sync blocks nobody. */
struct sync_area {
    uint64_t magic;
    _Atomic uint64_t durable_txnid; /* every write transaction <= this is on disk */
    _Atomic uint64_t writer_hint;   /* 0, or the token of the enqueue that writes now */
    _Atomic uint64_t committing;    /* txnid whose sync_always commit is flushing now */
};

/* ---- CRC-32C ------------------------------------------------------------------------ */

static uint32_t crc32c_soft(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p,
                                                              size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

static uint32_t crc32c(uint32_t crc, const void *data, size_t n)
{
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return crc32c_hw(crc, data, n);
#endif
    return crc32c_soft(crc, data, n);
}

static uint32_t rec_crc(const struct rec_hdr *h, const void *wire, size_t wire_len)
{
    uint32_t c = crc32c(0xFFFFFFFFu, &h->plugin_id,
                        sizeof(*h) - offsetof(struct rec_hdr, plugin_id));
    return ~crc32c(c, wire, wire_len);
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

/* Add (count, bytes) to a plugin's counters; `sign` +1 or -1. */
static int plugin_adjust(spk_queue *q, MDB_txn *txn, uint32_t id, int sign, uint64_t bytes)
{
    uint8_t kb[4];
    be32(kb, id);
    MDB_val k = {4, kb}, v;
    uint64_t c[2] = {0, 0};
    int rc = mdb_get(txn, q->plugins, &k, &v);
    if (rc == 0 && v.mv_size == sizeof(c))
        memcpy(c, v.mv_data, sizeof(c));
    else if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    if (sign > 0) {
        c[0] += 1;
        c[1] += bytes;
    } else {
        c[0] = c[0] > 0 ? c[0] - 1 : 0;
        c[1] = c[1] > bytes ? c[1] - bytes : 0;
    }
    if (c[0] == 0)
        return rc == 0 ? mdb_del(txn, q->plugins, &k, NULL) : 0;
    v.mv_size = sizeof(c);
    v.mv_data = c;
    return mdb_put(txn, q->plugins, &k, &v, 0);
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
/* True when `need` bytes fit in what the file has allocated once LMDB's free pages (freed
 * by acks and expiry, reused before the file grows) are counted. Slow path only: walks
 * the free list, like `mdb_stat -f`. */
static bool fits_in_free_pages(spk_queue *q, uint64_t need)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    uint64_t free_pages = 0;
    struct stat st;
    if (fstat(q->fd, &st) != 0 || txn_begin(q, MDB_RDONLY, &txn) != 0)
        return false;
    if (mdb_cursor_open(txn, 0 /* FREE_DBI */, &cur) == 0) {
        while (mdb_cursor_get(cur, &k, &v, MDB_NEXT) == 0) {
            size_t n;
            if (v.mv_size >= sizeof(n)) {
                memcpy(&n, v.mv_data, sizeof(n));
                free_pages += n;
            }
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
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

/* ---- WRITER HINT (interval policy) --------------------------------------------------------
 *
 * With writemap and the interval policy an enqueue holds LMDB's writer mutex for about a
 * microsecond. When two workers enqueue at once, the loser of LMDB's robust mutex sleeps
 * in the kernel and is woken after the winner's unlock: a context switch each way, many
 * times the cost of the transaction. So enqueues first take a hint lock in the shared
 * area by spinning briefly; then LMDB's mutex is normally free and taken without a system
 * call. The hint is only a hint: LMDB's mutex still serialises writers, so a spinner that
 * gives up (holder descheduled, or killed while holding it) clears the token it saw and
 * goes on; the worst a stale or stolen hint costs is one spin. */
#define HINT_SPINS 4000

static uint64_t hint_acquire(spk_queue *q)
{
    struct sync_area *a = q->sync;
    if (a == NULL || q->opts.sync_always)
        return 0;
    uint64_t mine = ((uint64_t)(uint32_t)q->pid << 32) | (uint32_t)(++q->hint_seq | 1u);
    uint64_t seen = 0;
    for (int i = 0; i < HINT_SPINS; i++) {
        uint64_t cur = atomic_load_explicit(&a->writer_hint, memory_order_relaxed);
        if (cur == 0 && atomic_compare_exchange_weak_explicit(&a->writer_hint, &cur, mine,
                                                              memory_order_acquire,
                                                              memory_order_relaxed))
            return mine;
        seen = cur;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    /* Held all along: drop the token we saw (if it is still there) and go on unhinted. */
    atomic_compare_exchange_strong(&a->writer_hint, &seen, 0);
    return 0;
}

static void hint_release(spk_queue *q, uint64_t token)
{
    if (token != 0)
        atomic_compare_exchange_strong_explicit(&q->sync->writer_hint, &token, 0,
                                                memory_order_release, memory_order_relaxed);
}

/* ---- GROUP SYNC (sync always) -------------------------------------------------------------
 *
 * LMDB's synchronous commit is two flushes in a row under the writer lock: the data pages,
 * then the meta page. With MDB_NOMETASYNC a commit flushes the data pages and only writes
 * the meta page; the transaction is durable once any later flush of the file has
 * completed (LMDB keeps integrity in this mode: the meta page is never written before the
 * pages it points to are on disk, and the other meta slot still holds the previous
 * transaction). Two facts give group commit across processes:
 *
 *   1. When a commit of transaction T returns, every transaction < T is durable: its meta
 *      page was written before T started (writers are serialised) and T flushed the file
 *      after that.
 *   2. A flush that starts after transaction T's commit returned makes T durable.
 *
 * So after committing T, a caller raises durable_txnid to T - 1 (fact 1) and, while
 * durable_txnid < T, takes the leader lock (flock on sync.lock), re-checks, reads the last
 * committed transaction C >= T, flushes (mdb_env_sync) and raises durable_txnid to C
 * (fact 2). Callers that committed while a leader flushed find themselves covered by the
 * next leader's single flush, and a commit by another process covers earlier ones for
 * free: a caller that sees a later transaction's commit in flight (`committing`) waits
 * for it instead of flushing, so with two or more busy writers each record costs about
 * one flush, pipelined (the data flush of the next commit). The call returns only after a flush that covers its record has returned. A
 * leader killed mid-flush releases the flock with its process; the next caller flushes.
 * durable_txnid only ever holds values that were durable when stored, so a stale value
 * after a reboot is a safe under-estimate (transaction IDs never go below it). */
static int sync_open(spk_queue *q, spk_errbuf *eb)
{
    char file[4200];
    snprintf(file, sizeof(file), "%s/sync.lock", q->path);
    q->sync_fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (q->sync_fd < 0)
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot open %s: %s", q->path,
                        file, strerror(errno));
    struct stat st;
    size_t len = (size_t)sysconf(_SC_PAGESIZE);
    if (fstat(q->sync_fd, &st) != 0 ||
        ((size_t)st.st_size < len && ftruncate(q->sync_fd, (off_t)len) != 0))
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot size %s: %s", q->path,
                        file, strerror(errno));
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, q->sync_fd, 0);
    if (p == MAP_FAILED)
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "queue %s: cannot map %s: %s", q->path,
                        file, strerror(errno));
    q->sync = p;
    /* A fresh file is all zeros: durable_txnid 0 is a valid under-estimate. The magic only
     * marks the file as ours; racing initialisers write the same value. */
    if (q->sync->magic != SYNC_MAGIC)
        q->sync->magic = SYNC_MAGIC;
    return 0;
}

static void sync_close(spk_queue *q)
{
    if (q->sync != NULL)
        munmap(q->sync, (size_t)sysconf(_SC_PAGESIZE));
    if (q->sync_fd >= 0)
        close(q->sync_fd);
    q->sync = NULL;
    q->sync_fd = -1;
}

static void durable_raise(struct sync_area *a, uint64_t txnid)
{
    uint64_t cur = atomic_load_explicit(&a->durable_txnid, memory_order_acquire);
    while (cur < txnid && !atomic_compare_exchange_weak_explicit(
                              &a->durable_txnid, &cur, txnid, memory_order_acq_rel,
                              memory_order_acquire))
        ;
}

/* A later transaction's commit is flushing the file right now (fact 1 will cover txnid
 * when it returns): wait for it rather than issue a flush of our own, for at most
 * RIDE_WAIT_NS (its writer may have died mid-commit). True when txnid became durable. */
#define RIDE_WAIT_NS 20000000L
static bool ride_on_commit(struct sync_area *a, uint64_t txnid)
{
    struct timespec t0, now, nap = {0, 20000};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (atomic_load_explicit(&a->durable_txnid, memory_order_acquire) >= txnid)
            return true;
        if (atomic_load_explicit(&a->committing, memory_order_acquire) <= txnid)
            return false;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - t0.tv_sec) * 1000000000L + (now.tv_nsec - t0.tv_nsec) > RIDE_WAIT_NS)
            return false;
        nanosleep(&nap, NULL);
    }
}

/* Return once write transaction `txnid`, already committed, is on stable storage. */
static int group_sync(spk_queue *q, uint64_t txnid, spk_errbuf *eb)
{
    struct sync_area *a = q->sync;
    if (a == NULL)
        return 0;
    if (txnid > 0)
        durable_raise(a, txnid - 1);
    if (atomic_load_explicit(&a->durable_txnid, memory_order_acquire) >= txnid ||
        ride_on_commit(a, txnid)) {
        q->sync_shared++;
        return 0;
    }
    while (flock(q->sync_fd, LOCK_EX) != 0)
        if (errno != EINTR)
            return spk_errf(eb, SPK_EIO, "queue %s: the record is committed but its flush "
                            "could not be confirmed: flock: %s", q->path, strerror(errno));
    int err = 0;
    if (atomic_load_explicit(&a->durable_txnid, memory_order_acquire) >= txnid) {
        q->sync_shared++;
    } else {
        MDB_envinfo info;
        uint64_t upto = txnid;
        if (mdb_env_info(q->env, &info) == 0 && info.me_last_txnid > upto)
            upto = info.me_last_txnid;
        int rc = mdb_env_sync(q->env, 1);
        if (rc == 0) {
            durable_raise(a, upto);
            q->sync_calls++;
        } else {
            err = spk_errf(eb, SPK_EIO, "queue %s: the record is committed but its flush "
                           "failed (%s): it may not survive a power loss", q->path,
                           mdb_strerror(rc));
        }
    }
    flock(q->sync_fd, LOCK_UN);
    return err;
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
        (rc = mdb_dbi_open(txn, "plugins", MDB_CREATE, &q->plugins)) != 0)
        goto fail;
    uint64_t format = meta_get(txn, q->meta, "format");
    if (format == 0) {
        if ((rc = meta_put(txn, q->meta, "format", QUEUE_FORMAT)) != 0 ||
            (rc = meta_put(txn, q->meta, "next_seq", 1)) != 0)
            goto fail;
    } else if (format != QUEUE_FORMAT) {
        mdb_txn_abort(txn);
        return spk_errf(eb, SPK_ECORRUPT, "queue %s: unknown queue format %llu (this build "
                        "reads format %u)", q->path, (unsigned long long)format, QUEUE_FORMAT);
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
    q->sync_fd = -1;
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

    /* always: NOMETASYNC commits (data flushed, meta written) finished by a group sync;
     * interval: NOSYNC commits, flushed by the owner of the timer. See DURABILITY. */
    unsigned flags = q->opts.sync_always ? MDB_NOMETASYNC : MDB_NOSYNC;
    if (q->opts.writemap)
        flags |= MDB_WRITEMAP;
    if ((rc = mdb_env_create(&q->env)) != 0 || (rc = mdb_env_set_maxdbs(q->env, 4)) != 0 ||
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
        if (q->fd >= 0 && (err = ensure_headroom(q, 0, eb)) != 0)
            goto fail;
    }
    if ((err = open_dbs(q, eb)) != 0)
        goto fail;
    if (q->opts.writemap)
        place_guards(q);
    if ((err = sync_open(q, eb)) != 0)
        goto fail;
    *out = q;
    return 0;
fail:
    sync_close(q);
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
        sync_close(q);
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

int spk_queue_enqueue(spk_queue *q, const spk_queue_msg *m, uint64_t *seq_out,
                      uint64_t *pending_out, spk_errbuf *eb)
{
    Spoke__Control__V1__EdgePayload ep = SPOKE__CONTROL__V1__EDGE_PAYLOAD__INIT;
    Spoke__Control__V1__KeyValue kvs[SPOKE_MAX_METADATA];
    Spoke__Control__V1__KeyValue *kvp[SPOKE_MAX_METADATA];
    MDB_txn *txn = NULL;
    int err;
    int rc;

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

    if ((err = ensure_headroom(q, m->payload_len + 2048, eb)) != 0)
        return count_refusal(q, err);
    uint64_t hint = hint_acquire(q);
    rc = txn_begin(q, 0, &txn);
    if (rc != 0) {
        hint_release(q, hint);
        return count_refusal(q, lmdb_err(q, rc, "enqueue", eb));
    }

    MDB_stat ms;
    uint64_t seq = 0;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0)
        goto fail_lmdb;
    uint64_t pending = ms.ms_entries;
    uint64_t bytes = meta_get(txn, q->meta, "bytes");
    seq = meta_get(txn, q->meta, "next_seq");
    if (seq == 0)
        seq = 1;
    if (q->opts.max_pending > 0 && pending >= q->opts.max_pending) {
        err = spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu records pending "
                       "(queue.max_pending)", q->path, (unsigned long long)pending);
        goto fail;
    }
    ep.sequence = seq;
    size_t wire_len = spoke__control__v1__edge_payload__get_packed_size(&ep);
    uint64_t size = spk_queue_record_size(wire_len);
    if (q->opts.max_bytes > 0 && bytes + size > q->opts.max_bytes) {
        err = spk_errf(eb, SPK_EQUEUE_FULL, "queue %s full: %llu bytes pending, %llu more "
                       "would pass queue.max_bytes (%llu)", q->path,
                       (unsigned long long)bytes, (unsigned long long)size,
                       (unsigned long long)q->opts.max_bytes);
        goto fail;
    }

    uint8_t kb[8];
    be64(kb, seq);
    MDB_val k = {8, kb}, v = {(size_t)size, NULL};
    if ((rc = mdb_put(txn, q->pending, &k, &v, MDB_RESERVE | MDB_APPEND)) != 0)
        goto fail_lmdb;
    /* Encode straight into the record: no intermediate copy. */
    struct rec_hdr h = {REC_MAGIC, 0, m->plugin_id, (uint32_t)wire_len, m->edge_timestamp_ms};
    uint8_t *dst = v.mv_data;
    size_t packed = spoke__control__v1__edge_payload__pack(&ep, dst + sizeof(h));
    if (packed != wire_len) {
        err = spk_errf(eb, SPK_EIO, "queue %s: encoder wrote %zu bytes, expected %zu",
                       q->path, packed, wire_len);
        goto fail;
    }
    h.crc = rec_crc(&h, dst + sizeof(h), wire_len);
    memcpy(dst, &h, sizeof(h));

    if ((rc = meta_put(txn, q->meta, "next_seq", seq + 1)) != 0 ||
        (rc = meta_put(txn, q->meta, "bytes", bytes + size)) != 0 ||
        (rc = plugin_adjust(q, txn, m->plugin_id, +1, size)) != 0)
        goto fail_lmdb;
    uint64_t txnid = mdb_txn_id(txn);
    if (q->opts.sync_always && q->sync != NULL)
        atomic_store_explicit(&q->sync->committing, txnid, memory_order_release);
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (q->opts.sync_always && q->sync != NULL) {
        if (rc == 0 && txnid > 0)
            durable_raise(q->sync, txnid - 1); /* fact 1, before waiters look */
        uint64_t mine = txnid;
        atomic_compare_exchange_strong(&q->sync->committing, &mine, 0);
    }
    hint_release(q, hint);
    hint = 0;
    if (rc != 0)
        goto fail_lmdb;
    if (q->opts.sync_always && (err = group_sync(q, txnid, eb)) != 0)
        return count_refusal(q, err);
    if (seq_out != NULL)
        *seq_out = seq;
    if (pending_out != NULL)
        *pending_out = pending + 1;
    return 0;

fail_lmdb:
    err = rc == MDB_KEYEXIST
              ? spk_errf(eb, SPK_ECORRUPT, "queue %s: sequence %llu already stored "
                         "(next_seq is behind the records)", q->path, (unsigned long long)seq)
              : lmdb_err(q, rc, "enqueue", eb);
fail:
    if (txn != NULL)
        mdb_txn_abort(txn);
    hint_release(q, hint);
    return count_refusal(q, err);
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

/* Decode a stored value's header; returns 0 or SPK_ECORRUPT. */
static int rec_parse(const MDB_val *v, struct rec_hdr *h, const uint8_t **wire)
{
    if (v->mv_size < sizeof(*h))
        return SPK_ECORRUPT;
    memcpy(h, v->mv_data, sizeof(*h));
    if (h->magic != REC_MAGIC || h->wire_len != v->mv_size - sizeof(*h))
        return SPK_ECORRUPT;
    *wire = (const uint8_t *)v->mv_data + sizeof(*h);
    return 0;
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
    rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    while (rc == 0 && batch->n < n_items) {
        struct rec_hdr h;
        const uint8_t *wire = NULL;
        spk_queue_item *it = &batch->items[batch->n];
        it->seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        it->status = rec_parse(&v, &h, &wire);
        if (it->status == 0 && rec_crc(&h, wire, h.wire_len) != h.crc)
            it->status = SPK_ECORRUPT;
        if (it->status != 0) {
            it->wire_len = 0; /* skip its bytes; the caller acks it away */
        } else {
            if (max_wire_bytes > 0 && batch->n > 0 &&
                batch->wire_bytes + h.wire_len > max_wire_bytes)
                break;
            it->plugin_id = h.plugin_id;
            it->edge_timestamp_ms = h.ts_ms;
            it->wire_len = h.wire_len;
            if (batch->wire_bytes + h.wire_len > cap) {
                size_t ncap = cap * 2 > batch->wire_bytes + h.wire_len
                                  ? cap * 2 : batch->wire_bytes + h.wire_len;
                uint8_t *nbuf = realloc(batch->buf, ncap > 0 ? ncap : 1);
                if (nbuf == NULL) {
                    err = spk_errf(eb, SPK_ENOMEM, "queue %s: out of memory", q->path);
                    goto fail;
                }
                batch->buf = nbuf;
                cap = ncap;
            }
            memcpy(batch->buf + batch->wire_bytes, wire, h.wire_len);
            batch->wire_bytes += h.wire_len;
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
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return 0;
fail_lmdb:
    err = lmdb_err(q, rc, "read", eb);
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    spk_queue_batch_free(batch);
    return err;
}

/* ---- ack / expire / purge ------------------------------------------------------------- */

/* Delete the record under the cursor, updating counters. */
static int del_current(spk_queue *q, MDB_txn *txn, MDB_cursor *cur, const MDB_val *v,
                       uint64_t *bytes_freed)
{
    struct rec_hdr h;
    const uint8_t *wire;
    uint64_t size = v->mv_size;
    int rc;
    if (rec_parse(v, &h, &wire) == 0 && (rc = plugin_adjust(q, txn, h.plugin_id, -1, size)) != 0)
        return rc;
    *bytes_freed += size;
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

int spk_queue_ack(spk_queue *q, const uint64_t *seqs, size_t n, size_t *acked, spk_errbuf *eb)
{
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    uint64_t freed = 0;
    size_t count = 0;
    int rc;

    if (acked != NULL)
        *acked = 0;
    if (q == NULL || (seqs == NULL && n > 0))
        return spk_errf(eb, SPK_EINVAL, "queue: no handle or sequence list");
    if (n == 0)
        return 0;
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t i = 0; i < n; i++) {
        lo = seqs[i] < lo ? seqs[i] : lo;
        hi = seqs[i] > hi ? seqs[i] : hi;
    }
    uint64_t span = hi - lo + 1; /* 0 only after wrapping: every key */
    int err = wmap_headroom(q, span == 0 ? UINT64_MAX : span, n, eb);
    if (err != 0)
        return err;
    if ((rc = txn_begin(q, 0, &txn)) != 0)
        return lmdb_err(q, rc, "ack", eb);
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        uint8_t kb[8];
        be64(kb, seqs[i]);
        MDB_val k = {8, kb}, v;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
        if (rc == MDB_NOTFOUND)
            continue;
        if (rc != 0 || (rc = del_current(q, txn, cur, &v, &freed)) != 0)
            goto fail;
        count++;
    }
    mdb_cursor_close(cur);
    cur = NULL;
    if (count > 0 && (rc = finish_delete(q, txn, freed, "acked", count)) != 0)
        goto fail;
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0)
        goto fail;
    if (count > 0)
        free_space_now(q);
    if (acked != NULL)
        *acked = count;
    return 0;
fail:
    if (cur != NULL)
        mdb_cursor_close(cur);
    if (txn != NULL)
        mdb_txn_abort(txn);
    return lmdb_err(q, rc, "ack", eb);
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
    int64_t cutoff = spk_queue_now_ms(q) - (int64_t)q->opts.retention_ms;
    uint64_t per_txn = q->opts.writemap ? EXPIRE_PER_TXN_WRITEMAP : EXPIRE_PER_TXN;
    /* Bounded transactions, so a huge backlog does not make one huge dirty set. */
    for (;;) {
        MDB_txn *txn = NULL;
        MDB_cursor *cur = NULL;
        uint64_t freed = 0, n = 0;
        bool more = false;
        int err = wmap_headroom(q, per_txn, per_txn, eb);
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
            struct rec_hdr h;
            const uint8_t *wire;
            if (rec_parse(&v, &h, &wire) == 0 && h.ts_ms >= cutoff)
                break; /* a corrupt header counts as expired: it cannot be sent anyway */
            if (n == per_txn) {
                more = true;
                break;
            }
            if ((rc = del_current(q, txn, cur, &v, &freed)) != 0)
                goto fail;
            n++;
            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); /* we always delete the oldest */
        }
        if (rc != 0 && rc != MDB_NOTFOUND)
            goto fail;
        mdb_cursor_close(cur);
        cur = NULL;
        if (n > 0 && (rc = finish_delete(q, txn, freed, "expired", n)) != 0)
            goto fail;
        rc = mdb_txn_commit(txn);
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
    int err = wmap_headroom(q, 0, 0, eb); /* drops copy no leaves: branches + free list */
    if (err != 0)
        return err;
    if ((rc = txn_begin(q, 0, &txn)) != 0)
        return lmdb_err(q, rc, "purge", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_drop(txn, q->pending, 0)) != 0 || (rc = mdb_drop(txn, q->plugins, 0)) != 0 ||
        (rc = meta_put(txn, q->meta, "bytes", 0)) != 0 ||
        (rc = meta_add(txn, q->meta, "purged", ms.ms_entries)) != 0)
        goto fail;
    rc = mdb_txn_commit(txn);
    txn = NULL;
    if (rc != 0)
        goto fail;
    free_space_now(q);
    if (purged != NULL)
        *purged = ms.ms_entries;
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

    MDB_val k, v;
    if ((rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail_lmdb;
    if (mdb_cursor_get(cur, &k, &v, MDB_FIRST) == 0) {
        struct rec_hdr h;
        const uint8_t *wire;
        st->oldest_seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        if (rec_parse(&v, &h, &wire) == 0) {
            int64_t age = spk_queue_now_ms(q) - h.ts_ms;
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
    int rc = mdb_env_sync(q->env, 1);
    if (rc != 0)
        return spk_errf(eb, SPK_EIO, "queue %s: sync: %s", q->path, mdb_strerror(rc));
    return 0;
}

/* ---- verify ------------------------------------------------------------------------------ */

/* One read snapshot: records, their CRCs and order, and the counters kept beside them. A
 * stray store into a writable map shows up here as a CRC failure, a record count or byte
 * total that no longer matches the counters, or an LMDB error while walking the tree. */
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
    if ((rc = txn_begin(q, MDB_RDONLY, &txn)) != 0)
        return lmdb_err(q, rc, "verify", eb);
    MDB_stat ms;
    if ((rc = mdb_stat(txn, q->pending, &ms)) != 0 ||
        (rc = mdb_cursor_open(txn, q->pending, &cur)) != 0)
        goto fail;
    MDB_val k, v;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        struct rec_hdr h;
        const uint8_t *wire;
        uint64_t seq = k.mv_size == 8 ? get_be64(k.mv_data) : 0;
        if (seq <= prev)
            unordered = true;
        prev = seq;
        n++;
        bytes += v.mv_size;
        if (rec_parse(&v, &h, &wire) != 0 || rec_crc(&h, wire, h.wire_len) != h.crc)
            bad++;
    }
    if (rc != MDB_NOTFOUND)
        goto fail;
    mdb_cursor_close(cur);
    cur = NULL;
    uint64_t meta_bytes = meta_get(txn, q->meta, "bytes");
    uint64_t pl_count = 0, pl_bytes = 0;
    if ((rc = mdb_cursor_open(txn, q->plugins, &cur)) != 0)
        goto fail;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        uint64_t c[2] = {0, 0};
        if (v.mv_size == sizeof(c))
            memcpy(c, v.mv_data, sizeof(c));
        pl_count += c[0];
        pl_bytes += c[1];
    }
    if (rc != MDB_NOTFOUND)
        goto fail;
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
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
    mdb_txn_abort(txn);
    return lmdb_err(q, rc, "verify", eb);
}
