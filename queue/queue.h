/*
 * queue.h -- the durable edge-to-control queue (LMDB).
 *
 * Edge plugins call send_to_control(); the host checks its own policy (UTF-8, JSON: core/
 * host.c) and commits the payload here as one encoded spoke.control.v1.EdgePayload
 * (transport/proto/.../control.proto). The queue stores what it is given and checks only
 * its own limits (sizes and counts). The uplink process reads the oldest records, sends
 * their stored bytes to hubd without re-encoding them, and acknowledges (deletes) what
 * hubd accepted. Records older than the retention are expired. Design: queue_int.h and
 * the top comment of each file it names; the whole argument, with the recovery rules in
 * one place: docs/queue.md.
 *
 * STORAGE. A queue is a directory with two stores and nothing else: the journal (files
 * journal and journal.ctl), a ring that every enqueue appends to, and LMDB (data.mdb,
 * lock.mdb: DBs pending, meta, plugins), where records stay until they are acknowledged;
 * a record too large for an LMDB leaf is kept in LMDB's overflow pages. Records are moved
 * from the journal into LMDB in batches by every reading call (read, ack, expire, purge,
 * stats, verify) and by spk_queue_sync(); an enqueue only moves them itself when it finds
 * the ring full. Where a pending record sits is invisible to callers: reads see every
 * record appended before them, in sequence order. A queue of format 2 (segment files
 * seg-*) is upgraded when it is opened: see spk_queue_open().
 *
 * PROCESSES. Any number of processes (workers, the uplink, spoke-queue) may open the same
 * queue directory at once and call any function concurrently: appends are serialised by
 * a robust process-shared mutex in journal.ctl held for the copy of one record, LMDB
 * serialises its writers the same way, and LMDB's readers never block. A process killed
 * at any point (kill -9 included) leaves the queue consistent: a record is there once its
 * append published it, an unfinished LMDB transaction is simply not there, and the next
 * locker of either mutex recovers it (EOWNERDEAD) and rebuilds what the dead process may
 * have half-updated. spk_queue_open() clears the reader slots of dead processes.
 *   Never use a handle across fork(): open the queue in each process AFTER it forked, and
 *   in a child do not call any function (not even spk_queue_close) on a handle inherited
 *   from the parent. A handle is used by one thread at a time.
 *
 * DURABILITY (opts.sync_always). "Committed" = spk_queue_enqueue() returned 0.
 *   always    the record is on stable storage before the call returns: it is written to
 *             the journal with pwrite() and the journal is flushed (fdatasync), one flush
 *             shared by every caller of every process that appended meanwhile (GROUP
 *             COMMIT in journal.c). Survives a crash of any process and power loss.
 *             If the flush fails, the call fails with SPK_EQUEUE_UNAVAILABLE and the record
 *             is NOT sent (it is dropped from the journal, never moved to LMDB): the
 *             answer and the record's fate agree, so a plugin that retries makes no
 *             duplicate. A failed flush also latches: appends are refused with
 *             SPK_EQUEUE_UNAVAILABLE until the journal is rebuilt from what is known to
 *             be on disk (tried by the next append, at most every 100 ms).
 *   interval  the record is copied into the journal's shared mapping, so it is in the
 *             kernel's page cache before the call returns and survives a crash of any
 *             spoke process at once. The next spk_queue_sync() moves it into LMDB and
 *             flushes LMDB; a power loss or kernel crash before that can lose it.
 *   WHEN TO SYNC is decided in one place, spk_queue_sync_due(): the process that owns the
 *   timer (spoked's supervisor; the worker in --single-process) polls it every
 *   SPK_QUEUE_SYNC_POLL_MS and calls spk_queue_sync() when it says so, and once at
 *   shutdown after the writers exited. Workers never sync on their hot path.
 *   Either way LMDB commits flush their data pages before their meta page
 *   (MDB_NOMETASYNC), so LMDB's file stays intact through a power loss, and journal
 *   space is reused only after the LMDB flush that made its records durable there.
 *
 * ERRORS. Every function returns 0 or a negative spk_err (core/err.h) and, when `eb` is
 * not NULL, fills it with a sentence for the operator. Codes:
 *   SPK_EINVAL              bad argument (NULL, handle closed, a path too long)
 *   SPK_EPAYLOAD_TOO_LARGE, SPK_ETOO_MANY_METADATA, SPK_EMETADATA_KEY,
 *   SPK_EMETADATA_VALUE, SPK_ECORRELATION_ID   a payload limit (abi/spoke.h SPOKE_MAX_*);
 *                           a value equal to a limit is accepted, one byte more refused
 *   SPK_EQUEUE_FULL         opts.max_pending records or opts.max_bytes bytes are pending
 *   SPK_EQUEUE_UNAVAILABLE  the map (opts.map_size) or the disk is full, or the queue
 *                           cannot be opened/written; nothing was stored. The queue works
 *                           again once space is back (acks, expiry, a bigger map_size on
 *                           the next open, or disk space).
 *   SPK_ENOENT              spk_queue_open() with create = false and no queue at the path
 *   SPK_ECORRUPT            a stored record fails its CRC or the file is not a queue
 *   SPK_ENOMEM, SPK_EIO     allocation or system call failure
 */
#ifndef SPK_QUEUE_H
#define SPK_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "spoke.h"

typedef struct spk_queue spk_queue;

/* A clock returning Unix time in milliseconds; tests inject their own. */
typedef int64_t (*spk_queue_clock)(void *arg);

/* Options of spk_queue_open(). Fill with spk_queue_opts_init(), then override; the host
 * copies them from spk_config (queue.* keys). */
typedef struct spk_queue_opts {
    uint64_t max_pending;   /* queue.max_pending: records (default 100000); 0 = no limit */
    uint64_t max_bytes;     /* queue.max_bytes: sum of spk_queue_record_size() of pending
                               records (default 1 GiB); 0 = no limit */
    uint64_t retention_ms;  /* queue.retention (default 24 h); 0 = never expire */
    bool sync_always;       /* queue.sync == "always"; false = interval (see DURABILITY) */
    uint64_t sync_interval_ms; /* queue.sync = <duration>: spk_queue_sync_due() says a
                               sync is due this long after the last one (default 100 ms) */
    uint64_t map_size;      /* queue.map_size: LMDB map size in bytes (default 2 GiB); a
                               bigger size stored in the file wins */
    bool create;            /* create the directory and database if missing (default
                               true); false: SPK_ENOENT when absent (tools) */
    uint64_t journal_size;  /* queue.journal_size: bytes of the ring that records are
                               appended to before they are moved into LMDB (default 64 MiB,
                               at least SPK_QUEUE_JOURNAL_MIN = 4 MiB, a multiple of
                               4096). Takes effect when the journal is created, or reopened
                               empty by
                               the first process. */
    spk_queue_clock clock;  /* NULL: CLOCK_REALTIME */
    void *clock_arg;
} spk_queue_opts;

/* Defaults and minimums: the one place they are written (core/config.c uses these). */
#define SPK_QUEUE_DEFAULT_MAX_PENDING 100000u
#define SPK_QUEUE_DEFAULT_MAX_BYTES (1024ull * 1024 * 1024)
#define SPK_QUEUE_DEFAULT_RETENTION_MS (24ull * 3600 * 1000)
#define SPK_QUEUE_DEFAULT_SYNC_INTERVAL_MS 100u
#define SPK_QUEUE_DEFAULT_MAP_SIZE (2048ull * 1024 * 1024)
#define SPK_QUEUE_DEFAULT_JOURNAL_SIZE (64ull * 1024 * 1024)
#define SPK_QUEUE_MAP_SIZE_MIN (1024u * 1024)
#define SPK_QUEUE_MAX_BYTES_MIN 1024u

/* The largest stored record (header + encoded EdgePayload): a 1 MiB payload with full
 * metadata is ~1.3 MB; a longer edge ID or content type can pass it, and is refused with
 * SPK_EPAYLOAD_TOO_LARGE. */
#define SPK_QUEUE_RECORD_MAX (2u * 1024 * 1024)

/* The smallest journal: room for two of the largest record. A record never wraps around
 * the ring, so one that does not fit before its end skips there; with room for two, the
 * largest record fits wherever the tail of an empty ring stands. */
#define SPK_QUEUE_JOURNAL_MIN (2u * SPK_QUEUE_RECORD_MAX)

/* Defaults as listed above. */
void spk_queue_opts_init(spk_queue_opts *opts);

/* Bytes a record of `wire_len` encoded bytes counts against max_bytes (the stored size:
 * a fixed header plus the encoded EdgePayload). */
#define SPK_QUEUE_RECORD_OVERHEAD 24u
static inline uint64_t spk_queue_record_size(size_t wire_len)
{
    return (uint64_t)wire_len + SPK_QUEUE_RECORD_OVERHEAD;
}

/* Open (and, with opts->create, create) the queue in directory `path` (files data.mdb,
 * lock.mdb, journal and journal.ctl). The first process to open it rebuilds the
 * journal's shared state from the files (and the journal takes opts->journal_size if it
 * is new or empty). Clears reader slots left by dead processes. opts may be NULL for
 * defaults. A queue of format 2 (written by spoke before the segment files were removed)
 * is upgraded here: the records kept in its segment files are moved into LMDB, then the
 * files are deleted (docs/queue.md, "Upgrading a format-2 queue"); no process running
 * the older code may have it open.
 * On success *out is a handle the caller closes with spk_queue_close(). Returns 0,
 * SPK_ENOENT, SPK_EQUEUE_UNAVAILABLE (cannot open or create, disk full), SPK_ECORRUPT
 * (not a queue, or an unknown format version), SPK_EINVAL, SPK_ENOMEM. */
int spk_queue_open(const char *path, const spk_queue_opts *opts, spk_queue **out,
                   spk_errbuf *eb);

/* Close the handle; NULL is allowed. In interval mode it does NOT sync: call
 * spk_queue_sync() first when the process that owns the timer shuts down. */
void spk_queue_close(spk_queue *q);

/* The queue's clock (opts.clock), Unix ms. */
int64_t spk_queue_now_ms(const spk_queue *q);

/* One payload to enqueue. Every pointer is borrowed for the duration of the call. */
typedef struct spk_queue_msg {
    uint32_t plugin_id;
    const char *edge_id;          /* NULL or "": not stored (the batch's applies) */
    const void *payload;          /* may be NULL when payload_len is 0 */
    size_t payload_len;           /* <= SPOKE_MAX_PAYLOAD */
    const char *correlation_id;   /* NULL or "": none; <= SPOKE_MAX_CORRELATION_ID bytes */
    const spoke_kv *metadata;     /* n_metadata entries, kept in this order */
    size_t n_metadata;            /* <= SPOKE_MAX_METADATA */
    const char *content_type;     /* NULL or "": raw bytes */
    int64_t edge_timestamp_ms;    /* Unix ms; also the age used by expiry */
} spk_queue_msg;

/* Validate the queue's limits of `m` without touching the queue. Strings must be
 * NUL-terminated; metadata keys and values must not be NULL. Their encoding is not
 * checked (UTF-8 is the host's policy). Returns 0, one of the limit codes (checked in
 * the order payload, correlation ID, metadata count, then each entry's key and value),
 * or SPK_EINVAL. */
int spk_queue_validate(const spk_queue_msg *m, spk_errbuf *eb);

/* Validate `m` and append it to the journal as one record, encoded once as an
 * EdgePayload carrying its new sequence number (see DURABILITY for when it is committed).
 * On success *seq (if not NULL) is that number (per queue, starting at 1, strictly
 * increasing across restarts and never reused, even after purge, in the order of the
 * appends) and *pending (if not NULL) the number of pending records including this one.
 * When the journal is full it waits (at most 1 s) for another process moving records
 * into LMDB to free room, or moves them itself. Returns 0, a limit
 * code, SPK_EQUEUE_FULL, SPK_EQUEUE_UNAVAILABLE (journal full and LMDB's map or disk full),
 * SPK_EINVAL, SPK_ENOMEM, SPK_EIO. Nothing is stored, and nothing will be sent, unless it
 * returns 0 -- with sync_always too: a record whose flush failed is answered
 * SPK_EQUEUE_UNAVAILABLE and dropped (see DURABILITY). */
int spk_queue_enqueue(spk_queue *q, const spk_queue_msg *m, uint64_t *seq,
                      uint64_t *pending, spk_errbuf *eb);

/* spk_queue_enqueue() of one payload stamped with plugin_id, edge_id and now_ms (pass the
 * loop's cached time, or < 0 for the queue's clock), marked "application/json" when
 * `json` is true (whether it is JSON is the caller's check). Arguments and returns as
 * spk_queue_enqueue(). */
int spk_queue_send(spk_queue *q, uint32_t plugin_id, const char *edge_id,
                   const void *payload, size_t len, const char *correlation_id,
                   const spoke_kv *metadata, size_t n_metadata, bool json, int64_t now_ms,
                   uint64_t *seq, uint64_t *pending, spk_errbuf *eb);

/* Count a send that the caller refused by its own policy before calling the queue (the
 * host's UTF-8 and JSON checks: `err` SPK_EINVAL or SPK_ENOT_JSON), so that
 * spk_queue_stats' refused_* counters stay the count of every refused send. NULL q is
 * allowed. */
void spk_queue_refused(spk_queue *q, int err);

/* One record read from the queue. */
typedef struct spk_queue_item {
    uint64_t seq;
    uint32_t plugin_id;
    int64_t edge_timestamp_ms;
    const uint8_t *wire;   /* the stored, encoded EdgePayload; points into the batch */
    size_t wire_len;
    int status;            /* 0, or SPK_ECORRUPT when the record failed its CRC (wire is
                              then not to be sent: ack it to drop it, and log it) */
} spk_queue_item;

/* Records from spk_queue_read(), owned by the caller: free with spk_queue_batch_free(). */
typedef struct spk_queue_batch {
    spk_queue_item *items;
    size_t n;
    size_t wire_bytes;     /* sum of wire_len */
    uint8_t *buf;          /* backing store of every item's wire bytes */
} spk_queue_batch;

/* Copy the oldest pending records (lowest sequence first) into *batch: at most `max_n`,
 * and no more than `max_wire_bytes` wire bytes in total, except that the first record is
 * always returned (0 = no byte limit). Nothing is removed: ack what was delivered. An
 * empty queue gives n = 0. The read transaction is closed before returning, so holding a
 * batch during a network call does not pin old pages. Returns 0, SPK_EINVAL, SPK_ENOMEM,
 * SPK_EQUEUE_UNAVAILABLE. On failure *batch is empty. */
int spk_queue_read(spk_queue *q, size_t max_n, size_t max_wire_bytes, spk_queue_batch *batch,
                   spk_errbuf *eb);

/* spk_queue_read() from the first pending record whose sequence number is >= from_seq
 * (0: the oldest): for tools that page through the queue with bounded memory. */
int spk_queue_read_from(spk_queue *q, uint64_t from_seq, size_t max_n, size_t max_wire_bytes,
                        spk_queue_batch *batch, spk_errbuf *eb);

/* Free what spk_queue_read() stored in *batch and empty it; NULL is allowed. */
void spk_queue_batch_free(spk_queue_batch *batch);

/* Delete the records with the given sequence numbers in one transaction. Sequence numbers
 * that are not pending (unknown, already acked or expired) are ignored; duplicates are
 * fine. *acked (if not NULL) receives how many records were deleted. Returns 0,
 * SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE. */
int spk_queue_ack(spk_queue *q, const uint64_t *seqs, size_t n, size_t *acked,
                  spk_errbuf *eb);

/* Delete every record whose edge timestamp is older than now - retention (now from the
 * queue's clock), oldest first, stopping at the first younger one (so a clock stepped
 * backwards only delays expiry). *expired (if not NULL) receives the count, which is also
 * added to the persistent `expired` counter. A no-op when retention is 0. The uplink calls
 * it on its heartbeat. Returns 0, SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE. */
int spk_queue_expire(spk_queue *q, uint64_t *expired, spk_errbuf *eb);

/* Pending records of one plugin. */
typedef struct spk_queue_plugin_stat {
    uint32_t plugin_id;
    uint64_t pending;
    uint64_t bytes;
} spk_queue_plugin_stat;

typedef struct spk_queue_stats {
    uint64_t pending;          /* records */
    uint64_t pending_bytes;    /* sum of spk_queue_record_size() */
    int64_t oldest_age_ms;     /* now - oldest record's edge timestamp; 0 when empty */
    uint64_t oldest_seq;       /* 0 when empty */
    uint64_t next_seq;         /* the sequence number the next record will get */
    /* Persistent counters (in the file, all processes together, since creation): */
    uint64_t acked;
    uint64_t expired;
    uint64_t purged;
    /* This handle's counters (this process, since open): refused enqueues by reason. */
    uint64_t refused_full;        /* SPK_EQUEUE_FULL */
    uint64_t refused_unavailable; /* SPK_EQUEUE_UNAVAILABLE */
    uint64_t refused_invalid;     /* a limit, SPK_EINVAL, or the caller's own refusals
                                     (spk_queue_refused: not UTF-8, SPK_ENOT_JSON) */
    uint64_t dead_readers_cleared;/* stale reader slots cleared at open */
    uint64_t damaged;          /* persistent: journal records found damaged and skipped */
    uint64_t staged;           /* of `pending`: records in the journal, not yet in LMDB */
    uint64_t journal_size;     /* ring bytes */
    uint64_t journal_used;     /* ring bytes not yet free for reuse */
    spk_queue_plugin_stat *plugins; /* per plugin, by plugin ID; owned by the stats */
    size_t n_plugins;
} spk_queue_stats;

/* Fill *st from one consistent snapshot. Free st->plugins with spk_queue_stats_free().
 * Returns 0, SPK_EINVAL, SPK_ENOMEM, SPK_EQUEUE_UNAVAILABLE. */
int spk_queue_stats_get(spk_queue *q, spk_queue_stats *st, spk_errbuf *eb);
void spk_queue_stats_free(spk_queue_stats *st);

/* Move every record appended so far from the journal into LMDB (with sync_always: every
 * record whose flush succeeded), flush LMDB (every commit of every process), and free the
 * journal space of what was moved. Called when spk_queue_sync_due() says so, and at
 * shutdown. Returns 0, SPK_EIO, SPK_EQUEUE_UNAVAILABLE (the map or disk is full: what
 * fitted was moved), or SPK_ECORRUPT when damaged journal records were skipped (counted
 * in spk_queue_stats.damaged; every other record was moved). */
int spk_queue_sync(spk_queue *q, spk_errbuf *eb);

/* THE SYNC POLICY, for the process that owns the sync timer: poll this every
 * SPK_QUEUE_SYNC_POLL_MS with the time since its last spk_queue_sync() (or since it
 * opened the queue), and call spk_queue_sync() when it returns true. Due when
 *   interval: ms_since_last_sync >= opts.sync_interval_ms, or
 *   either:   the journal is SPK_QUEUE_SYNC_FILL full or more (spk_queue_journal_fill),
 *             so that appends under load do not find it full;
 * with sync_always only the second: the appends are durable already, and a move's
 * flushes would compete with theirs. After a failed spk_queue_sync() (any error but
 * SPK_ECORRUPT, which still moved every sound record) neither applies: the next is due
 * spk_queue_sync_retry_ms() after the failed one, SPK_QUEUE_SYNC_RETRY_MIN_MS doubling
 * with each failure in a row up to SPK_QUEUE_SYNC_RETRY_MAX_MS, so a full or failing
 * disk is tried a few times a second at first and then every few seconds, not every
 * poll; the first sync that succeeds ends the backoff. The failures are counted per
 * handle (spk_queue_sync_failures). Lock-free and cheap; false for a NULL q. */
#define SPK_QUEUE_SYNC_POLL_MS 5u
#define SPK_QUEUE_SYNC_FILL 0.25
#define SPK_QUEUE_SYNC_RETRY_MIN_MS 100u
#define SPK_QUEUE_SYNC_RETRY_MAX_MS 5000u
bool spk_queue_sync_due(const spk_queue *q, uint64_t ms_since_last_sync);

/* spk_queue_sync() calls on this handle that failed in a row (0: the last one succeeded,
 * or none was made), and the delay the backoff above puts after the last of them (0 when
 * none failed). For the caller's log: it says when syncing starts to fail and when it
 * works again, once each (core/queue_conf.c, spk_queue_conf_sync_tick). */
unsigned spk_queue_sync_failures(const spk_queue *q);
uint64_t spk_queue_sync_retry_ms(const spk_queue *q);

/* How full the journal is, 0.0 to 1.0: the bytes not yet free for reuse (records not
 * moved, or moved but not flushed) over its size. Lock-free and cheap: what
 * spk_queue_sync_due() looks at to sync early under load; also a metric. */
double spk_queue_journal_fill(const spk_queue *q);

/* Walk every pending record in one read snapshot and check that nothing was damaged:
 * each record's magic, length and CRC, that keys ascend, and that the record count and
 * byte total agree with the counters kept in the same transactions (meta "bytes" and the
 * per-plugin counts). *bad (if not NULL) receives the number of damaged records. Returns
 * 0 when all agree, SPK_ECORRUPT with what disagrees in eb, SPK_EINVAL,
 * SPK_EQUEUE_UNAVAILABLE, SPK_ENOMEM. O(pending): an operator or periodic check
 * (`spoke-queue verify`), not a hot-path call. */
int spk_queue_verify(spk_queue *q, uint64_t *bad, spk_errbuf *eb);

/* Delete every pending record (operator action). Sequence numbers keep counting.
 * *purged (if not NULL) receives the count. Returns 0, SPK_EINVAL, SPK_EQUEUE_UNAVAILABLE. */
int spk_queue_purge(spk_queue *q, uint64_t *purged, spk_errbuf *eb);

#endif
