/*
 * queue_int.h -- what the files of the queue share; nothing outside queue/ includes it
 * (tests/queue does, for the fault-injection seam at the end).
 *
 * The queue is four parts behind the public API of queue.c:
 *   record.c   the stored form of one record: encode, CRC, parse, the limits it checks
 *   journal.c  the ring every enqueue appends to: files, shared state, its lock, appends,
 *              rebuild after a crash, group commit (sync always), the flush-failure latch
 *   store.c    LMDB: opening the DBs (and upgrading older formats), transactions, the
 *              counters kept beside the records, deletes, disk headroom
 *   mover.c    moving journal records into LMDB, and releasing their journal space
 * Lock order, wherever both are taken: LMDB's writer lock, then the journal's; never the
 * reverse (a move holds an LMDB write transaction and takes the journal's lock to mirror
 * its commit).
 */
#ifndef SPK_QUEUE_INT_H
#define SPK_QUEUE_INT_H

#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

/* ---- records (record.c) --------------------------------------------------------------- */

#define REC_MAGIC 0x31515053u /* "SPQ1" little-endian */

/* The header of a stored record (the LMDB value, and the journal record's body):
 *   u32 magic "SPQ1" | u32 crc32c | u32 plugin_id | u32 wire_len | i64 edge_timestamp_ms
 * then wire_len bytes of the encoded EdgePayload. Host byte order. */
struct rec_hdr {
    uint32_t magic;
    uint32_t crc;
    uint32_t plugin_id;
    uint32_t wire_len;
    int64_t ts_ms;
};
_Static_assert(sizeof(struct rec_hdr) == SPK_QUEUE_RECORD_OVERHEAD, "record header size");

/* A parsed LMDB value. */
struct rec_view {
    struct rec_hdr h;
    const uint8_t *wire; /* into the value */
    uint64_t size;       /* the value's size: header + wire bytes */
};

/* An spk_queue_msg ready to encode: the EdgePayload and its metadata, pointing into the
 * message (borrowed for as long as the message is). */
struct rec_enc {
    Spoke__Control__V1__EdgePayload ep;
    Spoke__Control__V1__KeyValue kvs[SPOKE_MAX_METADATA];
    Spoke__Control__V1__KeyValue *kvp[SPOKE_MAX_METADATA];
    uint32_t plugin_id;
    int64_t ts_ms;
};

void spk_rec_prepare(struct rec_enc *e, const spk_queue_msg *m);
/* The encoded size of e with sequence number `seq` (which it stores). */
size_t spk_rec_wire_len(struct rec_enc *e, uint64_t seq);
/* Write the header and the wire_len encoded bytes at dst. Returns 0, or SPK_EIO when the
 * encoder disagrees with spk_rec_wire_len(). */
int spk_rec_encode(const struct rec_enc *e, uint8_t *dst, size_t wire_len);
uint32_t spk_rec_crc(const struct rec_hdr *h, const void *wire, size_t wire_len);
/* 0, or SPK_ECORRUPT when the value is not a record (its CRC is not checked here). */
int spk_rec_parse(const MDB_val *v, struct rec_view *r);
/* 0 when a parsed record's bytes match its CRC, else SPK_ECORRUPT. */
int spk_rec_check(const struct rec_view *r);
/* Check a journal record's body (a whole stored record of `len` bytes at p). */
bool spk_rec_valid(const uint8_t *p, size_t len);

void spk_be64(uint8_t out[8], uint64_t v);
uint64_t spk_get_be64(const uint8_t *p);
void spk_be32(uint8_t out[4], uint32_t v);

/* ---- the journal (journal.c) ---------------------------------------------------------- */

#define JREC_HDR 32u
#define JREC_MAGIC 0x314a5053u /* "SPJ1" */
#define JPAD_MAGIC 0x504a5053u /* "SPJP" */

/* A journal record's header (journal.c says how records sit in the ring). */
struct jrec {
    uint32_t magic;
    uint32_t hcrc; /* CRC-32C of off, seq, len, zero */
    uint64_t off;
    uint64_t seq;
    uint32_t len;
    uint32_t zero;
};
_Static_assert(sizeof(struct jrec) == JREC_HDR, "journal record header size");
/* CRC-32C of a header's off, seq, len and zero: its hcrc. */
uint32_t spk_journal_hcrc(const struct jrec *h);

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
    /* appends that find the ring full wait for a mover at work */
    _Atomic uint32_t release_gen;      /* futex word: bumped whenever `released` advances */
    _Atomic uint32_t release_sleepers; /* appends in futex_wait on it */
    /* THE FLUSH-FAILURE LATCH (journal.c): a journal flush failed; nothing past `synced`
     * is known to be on disk, appends are refused until a recovery drops it. */
    _Atomic uint32_t flush_failed;
    _Atomic uint64_t recover_ns;       /* when a recovery was last tried */
};
_Static_assert(sizeof(struct jctl) <= 4096, "journal.ctl is one page");

/* What an LMDB transaction says about the journal and the pending records. */
struct jbase {
    uint64_t txnid, pending, bytes, off, count, mbytes, next_seq;
};

/* ---- the handle ----------------------------------------------------------------------- */

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
    /* the journal */
    int cfd;               /* journal.ctl: OFD locks (byte 0 shared while open) */
    int jfd;               /* journal */
    struct jctl *jc;       /* journal.ctl, mapped shared */
    uint8_t *jmap;         /* the ring, mapped shared */
    void *jres;            /* the reservation holding jmap between two guard pages */
    uint64_t jsize;        /* ring bytes */
    uint8_t *scratch;      /* always: a record is built here, then written with pwrite */
    size_t scratch_cap;
    uint64_t rebuilds;     /* shared state rebuilt after a process died holding the lock */
    uint64_t moved_txns;   /* move transactions this handle committed */
    uint64_t sync_calls;   /* always: journal flushes this handle did itself */
    uint64_t sync_shared;  /* always: appends made durable by another caller's flush */
    unsigned sync_failures; /* spk_queue_sync() calls that failed in a row (the backoff) */
};

/* Longest queue directory path: room for "/journal.new" and the like after it. */
#define QUEUE_PATH_MAX 4000u
#define QUEUE_FILE_MAX (QUEUE_PATH_MAX + 32u)

uint64_t spk_mono_ns(void);
int spk_queue_count_refusal(spk_queue *q, int err);

/* journal.c */
int spk_journal_open(spk_queue *q, spk_errbuf *eb);
void spk_journal_close(spk_queue *q);
int spk_journal_lock(spk_queue *q, spk_errbuf *eb);
void spk_journal_unlock(spk_queue *q);
/* Under the lock: adopt the state of a committed transaction unless a newer one is there. */
void spk_journal_mirror(struct jctl *c, const struct jbase *b);
/* Rebuild the shared state from LMDB's committed state. Under the lock. */
int spk_journal_rebuild_from_lmdb(spk_queue *q);
/* Check the record at absolute offset `off`: its length in the ring, or 0 (see journal.c). */
size_t spk_journal_check(const spk_queue *q, uint64_t off, uint64_t *seq, const uint8_t **val,
                         uint32_t *vlen, bool *pad);
/* The next offset in [from, end) where a valid record (or a lap's end) starts, or end. */
uint64_t spk_journal_resync(const spk_queue *q, uint64_t from, uint64_t end);
/* Append one encoded record (the whole enqueue below the API: limits against the pending
 * counts, space, the write, publication, and with sync_always the flush). */
int spk_journal_append(spk_queue *q, struct rec_enc *e, uint64_t *seq_out,
                       uint64_t *pending_out, spk_errbuf *eb);
/* The end of what a move may take: the tail, and with sync_always no further than what is
 * flushed (a record whose flush has not succeeded is not moved, so never sent). */
uint64_t spk_journal_movable(const spk_queue *q);
bool spk_journal_staged(const spk_queue *q);
/* always: flush the journal up to its tail unless latched, so that a record whose writer
 * died between its publication and its flush can be moved (a move takes only flushed
 * records). A failed flush latches as an append's would. */
void spk_journal_flush_published(spk_queue *q);
/* Whether another handle is moving with release (holds MOVER_BYTE of journal.ctl). */
bool spk_journal_mover_active(const spk_queue *q);
int spk_journal_mover_lock(spk_queue *q);
void spk_journal_mover_unlock(spk_queue *q);
/* Let ring space below `upto` be reused and wake appends waiting for room. */
void spk_journal_release_upto(spk_queue *q, uint64_t upto);
void spk_journal_release_wake(struct jctl *c);
/* flush-failure latch: true while set */
bool spk_journal_latched(const spk_queue *q);

/* store.c */
int spk_store_err(spk_queue *q, int rc, const char *what, spk_errbuf *eb);
int spk_store_txn_begin(spk_queue *q, unsigned flags, MDB_txn **txn);
int spk_store_open_dbs(spk_queue *q, spk_errbuf *eb);
uint64_t spk_store_meta_get(MDB_txn *txn, MDB_dbi dbi, const char *name);
int spk_store_meta_put(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t value);
int spk_store_meta_add(MDB_txn *txn, MDB_dbi dbi, const char *name, uint64_t delta);
int spk_store_plugin_adjust(spk_queue *q, MDB_txn *txn, uint32_t id, int sign,
                            uint64_t count, uint64_t bytes);
int spk_store_jbase_read(spk_queue *q, MDB_txn *txn, struct jbase *b);
int spk_store_commit_mirrored(spk_queue *q, MDB_txn *txn, bool changed, struct jbase *out);
uint64_t spk_store_free_list_pages(spk_queue *q);
int spk_store_ensure_headroom(spk_queue *q, uint64_t size, spk_errbuf *eb);
uint64_t spk_store_map_room_pages(spk_queue *q);
uint64_t spk_store_record_pages16(const spk_queue *q, uint32_t vlen);
int spk_store_del_current(spk_queue *q, MDB_txn *txn, MDB_cursor *cur, const MDB_val *v,
                          uint64_t *bytes_freed);
int spk_store_finish_delete(spk_queue *q, MDB_txn *txn, uint64_t bytes_freed,
                            const char *counter, uint64_t n);
void spk_store_free_space_now(spk_queue *q);
int spk_store_ack_txn(spk_queue *q, const uint64_t *seqs, size_t n, size_t *count);
int spk_store_sum_counters(MDB_txn *txn, MDB_dbi dbi, uint64_t *count, uint64_t *bytes);
/* upgrade from format 2 (segment files): upgrade.c */
int spk_store_upgrade2(spk_queue *q, spk_errbuf *eb);
void spk_store_drop_segment_files(const spk_queue *q);

/* mover.c */
#define MOVE_MAX_RECORDS 16384u
#define MOVE_MAX_BYTES (4u << 20) /* of values, per move transaction */
#define MOVE_MAP_FULL (-30999)
int spk_mover_txn(spk_queue *q, uint64_t end, size_t limit, uint64_t max_bytes, bool drop,
                  uint64_t *moved_to, uint64_t *damaged);
int spk_mover_move(spk_queue *q, bool release, uint64_t budget, spk_errbuf *eb);
void spk_mover_consume_prepare(spk_queue *q);
void spk_mover_read_prepare(spk_queue *q);

/* ---- fault injection (tests only) ------------------------------------------------------
 * The journal's pwrite and fdatasync go through these; tests point them at failing
 * versions. Never changed outside tests/queue. */
extern ssize_t (*spk_journal_pwrite_fn)(int fd, const void *buf, size_t n, off_t off);
extern int (*spk_journal_fdatasync_fn)(int fd);
/* How long after a failed flush (or recovery) an append tries recovery again: 100 ms. */
extern uint64_t spk_journal_recover_retry_ns;

#endif
