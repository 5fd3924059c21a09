/*
 * kv.c -- the KV and dedupe store on LMDB; the contract is in kv.h.
 *
 * LAYOUT. One LMDB environment with five named DBs, all in LMDB's default memcmp order:
 *
 *   kv            key: plugin ID (u32 big-endian) + the plugin's key bytes, so a
 *                 namespace is one contiguous key range and a prefix scan is one cursor
 *                 walk from MDB_SET_RANGE. value: the plugin's bytes.
 *   dedupe        key: edge number (u32 BE) + sequence (u64 BE), 12 bytes.
 *                 value: the mark's time, Unix ms (u64 BE).
 *   dedupe_time   key: time (u64 BE) + edge number + sequence, 20 bytes; empty value.
 *                 The same marks in the order they were made.
 *   dedupe_edges  key: an edge ID's bytes; value: its edge number (u32, host order),
 *                 assigned on the edge's first mark as the DB's entry count + 1 (entries
 *                 are never deleted, so numbers are never reused).
 *   kv_meta       "format" -> u32 (1). Its presence is what makes an environment a kv
 *                 store: spk_kv_open() adds its DBs only to an empty one.
 *
 * WHY A TIME INDEX. A mark must be found by its exact (edge, seq): a batch resent after a
 * hub crash repeats sequence numbers, and a payload that found no receiver is delivered
 * (and marked) only later, after newer ones of its edge. So marks of one edge are not in
 * time order by sequence, and a per-edge low-water mark would either keep marks too long
 * or call a late payload a duplicate and lose it. dedupe_time orders the marks by when
 * they were made: expiry deletes from its front while the time is before the cutoff,
 * touching only what it removes (plus one look at the first mark it keeps), in
 * transactions of at most opts.expire_per_txn marks. The price is a second B-tree entry
 * per mark; since time only grows, it lands on the last leaf, which every mark of a
 * group commit dirties anyway. Edge IDs are replaced by 4-byte numbers so both keys stay
 * small whatever the ID's length (12 and 20 bytes: about 60 bytes a mark with LMDB's node
 * headers, 48 h of 1,000 payloads/s is ~10 GiB; size map_size for it).
 *
 * TRANSACTIONS. struct spk_kv_txn wraps an MDB_txn with what LMDB leaves to its caller:
 * which transaction is nested in which (a parent is not to be used while a child is
 * open), whether an error made it unusable (LMDB marks a transaction failed after a
 * MAP_FULL, and then answers only MDB_BAD_TXN; we keep the first error to return it
 * again), and whether a scan callback is running (no writes under an open cursor). The
 * environment is opened with MDB_NOTLS: read transactions belong to their spk_kv_txn, not
 * to the thread, so a process may hold several.
 *
 * CONCURRENCY. LMDB serialises writers of all processes with a robust process-shared
 * mutex in lock.mdb: a writer killed with kill -9 leaves it EOWNERDEAD and its
 * transaction uncommitted (its pages were never reachable from a meta page), and the
 * next writer carries on. MDB_NOLOCK is never used. Readers take a slot in lock.mdb;
 * slots of dead processes are cleared by mdb_reader_check() at open (and by LMDB when
 * the table fills).
 */
#include "fs.h"
#include "kv.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KV_FORMAT   1u
#define DD_KEY      12u /* edge number + seq */
#define DD_TIME_KEY 20u /* time + edge number + seq */

struct spk_kv {
    MDB_env *env;
    MDB_dbi kv, dd, dd_time, dd_edges, meta;
    spk_kv_opts opts;
    char *path;
    pid_t pid;         /* the process that opened it: the only one that may use it */
    unsigned n_active; /* top-level transactions open and not reset: while there are
                          any, a map grown by another process cannot be adopted */
    bool writing;      /* one of them is a write transaction */
    uint64_t dead_readers;
};

struct spk_kv_txn {
    spk_kv *kv;
    MDB_txn *txn;
    spk_kv_txn *parent;
    spk_kv_txn *child;
    bool write;
    bool scanning; /* inside a spk_kv_scan() callback */
    bool reset;    /* spk_kv_reset() released its snapshot */
    int failed;    /* 0, or the spk_err that made it unusable */
};

void spk_kv_opts_init(spk_kv_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->map_size = 1024ull * 1024 * 1024;
    o->sync = true;
    o->max_readers = 126;
    o->expire_per_txn = SPK_KV_EXPIRE_PER_TXN;
}

/* ---- helpers ------------------------------------------------------------------------- */

static void be32_put(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void be64_put(uint8_t *p, uint64_t v)
{
    be32_put(p, (uint32_t)(v >> 32));
    be32_put(p + 4, (uint32_t)v);
}

static uint64_t be64_get(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* Map an LMDB or errno code to an spk_err with a message naming the store and the step. */
static int lmdb_err(const spk_kv *kv, int rc, const char *what, spk_errbuf *eb)
{
    const char *path = kv != NULL && kv->path != NULL ? kv->path : "?";
    switch (rc) {
    case MDB_MAP_FULL:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "kv store %s: %s: the LMDB map is full (map_size = %llu bytes); "
                        "the transaction is void: abort it; space comes back with deletions "
                        "or expiry, or after reopening with a bigger map_size",
                        path, what, (unsigned long long)kv->opts.map_size);
    case MDB_TXN_FULL:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "kv store %s: %s: too many changes in one transaction (LMDB's dirty "
                        "page limit); the transaction is void: abort it",
                        path, what);
    case MDB_READERS_FULL:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "kv store %s: %s: all %u reader slots are in use", path, what,
                        kv->opts.max_readers);
    case MDB_MAP_RESIZED:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "kv store %s: %s: another process grew the map while transactions "
                        "of this one are open; retry once they ended",
                        path, what);
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
    case EIO:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE,
                        "kv store %s: %s: cannot write (%s; disk full?); nothing was stored", path,
                        what, mdb_strerror(rc));
    case ENOMEM:
        return spk_errf(eb, SPK_ENOMEM, "kv store %s: %s: out of memory", path, what);
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
    case MDB_INCOMPATIBLE:
        return spk_errf(eb, SPK_ECORRUPT, "kv store %s: %s: %s", path, what, mdb_strerror(rc));
    default:
        return spk_errf(eb, SPK_EQUEUE_UNAVAILABLE, "kv store %s: %s: %s", path, what,
                        mdb_strerror(rc));
    }
}

/* Record a failed write: from then on t answers only `err`. Not-found and key-exists
 * answers leave an LMDB transaction usable; anything else from a write may not. */
static int write_failed(spk_kv_txn *t, int rc, const char *what, spk_errbuf *eb)
{
    int err = lmdb_err(t->kv, rc, what, eb);
    if (rc != MDB_NOTFOUND && rc != MDB_KEYEXIST && t->failed == 0)
        t->failed = err;
    return err;
}

/* Check that t may be used now; `write` = for a change. */
static int txn_usable(const spk_kv_txn *t, bool write, const char *what, spk_errbuf *eb)
{
    if (t == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv %s: no transaction", what);
    if (t->child != NULL)
        return spk_errf(eb, SPK_EINVAL,
                        "kv store %s: %s: the transaction has an open nested transaction; "
                        "commit or abort that first",
                        t->kv->path, what);
    if (t->reset)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: %s: the transaction is reset; renew it",
                        t->kv->path, what);
    if (t->failed != 0)
        return spk_errf(eb, t->failed,
                        "kv store %s: %s: an earlier call failed in this transaction (%s); "
                        "abort it",
                        t->kv->path, what, spk_strerror(t->failed));
    if (write && !t->write)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: %s: the transaction is read-only",
                        t->kv->path, what);
    if (write && t->scanning)
        return spk_errf(eb, SPK_EINVAL,
                        "kv store %s: %s: not allowed from a scan callback of the same "
                        "transaction",
                        t->kv->path, what);
    return 0;
}

/* Build the kv DB's key for (ns, key) into buf (SPK_KV_LMDB_MAX_KEY bytes). */
static int kv_key(const spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, uint8_t *buf,
                  MDB_val *k, const char *what, spk_errbuf *eb)
{
    if (key == NULL && klen != 0)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: %s: NULL key of %zu bytes", t->kv->path, what,
                        klen);
    if (klen > SPK_KV_MAX_KEY)
        return spk_errf(eb, SPK_EINVAL,
                        "kv store %s: %s: plugin %u: key of %zu bytes is over the limit of "
                        "%u bytes",
                        t->kv->path, what, ns, klen, SPK_KV_MAX_KEY);
    be32_put(buf, ns);
    if (klen > 0)
        memcpy(buf + SPK_KV_NS_PREFIX, key, klen);
    k->mv_data = buf;
    k->mv_size = SPK_KV_NS_PREFIX + klen;
    return 0;
}


/* ---- open and close ------------------------------------------------------------------ */

/* Free the reader slots of processes that died inside a read transaction: until then
 * LMDB keeps the pages of their snapshots from reuse. */
static void clear_dead_readers(spk_kv *kv)
{
    int dead = 0;
    if (mdb_reader_check(kv->env, &dead) == 0 && dead > 0)
        kv->dead_readers += (uint64_t)dead;
}

static const char *const db_names[] = {"kv", "dedupe", "dedupe_time", "dedupe_edges", "kv_meta"};

/* Open the named DBs (creating them, and the format mark, when `create`). MDB_NOTFOUND
 * without `create` means the store is new: the caller retries with it. */
static int open_dbs(spk_kv *kv, bool create)
{
    MDB_dbi *dbis[] = {&kv->kv, &kv->dd, &kv->dd_time, &kv->dd_edges, &kv->meta};
    MDB_txn *txn;
    int rc = mdb_txn_begin(kv->env, NULL, create ? 0 : MDB_RDONLY, &txn);
    if (rc != 0)
        return rc;
    if (create) {
        /* Not into another LMDB environment (a queue's, say): one that holds anything and
         * no kv_meta is not ours. (With kv_meta, another process created it meanwhile.) */
        MDB_dbi main, m;
        MDB_stat st;
        if ((rc = mdb_dbi_open(txn, NULL, 0, &main)) != 0 || (rc = mdb_stat(txn, main, &st)) != 0)
            goto fail;
        if (st.ms_entries > 0 && mdb_dbi_open(txn, "kv_meta", 0, &m) == MDB_NOTFOUND) {
            rc = MDB_INCOMPATIBLE;
            goto fail;
        }
    }
    for (size_t i = 0; i < sizeof(dbis) / sizeof(dbis[0]) && rc == 0; i++)
        rc = mdb_dbi_open(txn, db_names[i], create ? MDB_CREATE : 0, dbis[i]);
    if (rc != 0)
        goto fail;
    MDB_val k = {6, "format"}, v;
    rc = mdb_get(txn, kv->meta, &k, &v);
    if (rc == MDB_NOTFOUND && create) {
        uint32_t format = KV_FORMAT;
        v.mv_size = sizeof(format);
        v.mv_data = &format;
        rc = mdb_put(txn, kv->meta, &k, &v, 0);
    } else if (rc == 0) {
        uint32_t format = 0;
        if (v.mv_size == sizeof(format))
            memcpy(&format, v.mv_data, sizeof(format));
        if (format != KV_FORMAT)
            rc = MDB_INCOMPATIBLE;
    }
    if (rc != 0)
        goto fail;
    return mdb_txn_commit(txn); /* keeps the DBI handles */
fail:
    mdb_txn_abort(txn);
    return rc;
}

int spk_kv_open(const char *dir, const spk_kv_opts *o, spk_kv **out, spk_errbuf *eb)
{
    if (dir == NULL || dir[0] == '\0' || out == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv store: no directory given");
    *out = NULL;
    spk_kv *kv = calloc(1, sizeof(*kv));
    if (kv == NULL || (kv->path = strdup(dir)) == NULL) {
        free(kv);
        return spk_errf(eb, SPK_ENOMEM, "kv store %s: out of memory", dir);
    }
    if (o != NULL)
        kv->opts = *o;
    else
        spk_kv_opts_init(&kv->opts);
    if (kv->opts.expire_per_txn == 0)
        kv->opts.expire_per_txn = SPK_KV_EXPIRE_PER_TXN;
    if (kv->opts.max_readers == 0)
        kv->opts.max_readers = 126;
    kv->pid = getpid();

    int err, rc = spk_mkdir_p(dir, 0700);
    if (rc != 0) {
        err = spk_errf(eb, rc == ENOSPC || rc == EDQUOT ? SPK_EQUEUE_UNAVAILABLE : SPK_EIO,
                       "kv store %s: cannot create the directory: %s", dir, strerror(rc));
        goto fail;
    }
    /* MDB_NOTLS: a read transaction belongs to its spk_kv_txn, not to the thread. Never
     * MDB_NOLOCK: the lock file is what makes concurrent processes and kill -9 safe. */
    unsigned flags = MDB_NOTLS;
    if (!kv->opts.sync)
        flags |= MDB_NOSYNC;
    if ((rc = mdb_env_create(&kv->env)) != 0 || (rc = mdb_env_set_maxdbs(kv->env, 8)) != 0 ||
        (rc = mdb_env_set_mapsize(kv->env, kv->opts.map_size)) != 0 ||
        (rc = mdb_env_set_maxreaders(kv->env, kv->opts.max_readers)) != 0) {
        err = lmdb_err(kv, rc, "create environment", eb);
        goto fail;
    }
    if ((rc = mdb_env_open(kv->env, dir, flags, 0600)) != 0) {
        err = lmdb_err(kv, rc, "open", eb);
        if (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH)
            err = spk_errf(eb, SPK_ECORRUPT, "kv store %s: not an LMDB store (%s)", dir,
                           mdb_strerror(rc));
        goto fail;
    }
    /* LMDB leaves its data file's descriptor inheritable (lmdb.h, mdb_env_get_fd; its lock
     * file is close-on-exec): no program this process execs may hold the store. */
    mdb_filehandle_t dfd;
    if ((rc = mdb_env_get_fd(kv->env, &dfd)) != 0 ||
        (rc = fcntl(dfd, F_SETFD, FD_CLOEXEC) != 0 ? errno : 0) != 0) {
        err = lmdb_err(kv, rc, "set close-on-exec", eb);
        goto fail;
    }
    if (mdb_env_get_maxkeysize(kv->env) < (int)SPK_KV_LMDB_MAX_KEY) {
        err = spk_errf(eb, SPK_EUNSUPPORTED,
                       "kv store %s: this LMDB allows keys of %d bytes, spoke needs %u", dir,
                       mdb_env_get_maxkeysize(kv->env), SPK_KV_LMDB_MAX_KEY);
        goto fail;
    }
    clear_dead_readers(kv);

    /* The usual case, an existing store, needs no write lock to open. */
    rc = open_dbs(kv, false);
    if (rc == MDB_NOTFOUND)
        rc = open_dbs(kv, true);
    if (rc != 0) {
        err = lmdb_err(kv, rc, "open its databases", eb);
        if (rc == MDB_INCOMPATIBLE)
            err = spk_errf(eb, SPK_ECORRUPT,
                           "kv store %s: not a spoke kv store, or of another format (want %u)", dir,
                           KV_FORMAT);
        goto fail;
    }
    *out = kv;
    return 0;
fail:
    if (kv->env != NULL)
        mdb_env_close(kv->env);
    free(kv->path);
    free(kv);
    return err;
}

void spk_kv_close(spk_kv *kv)
{
    if (kv == NULL)
        return;
    /* In a child that inherited the handle, closing the environment would release or
     * clear what belongs to the parent's LMDB state (reader slots, the lock file's fd):
     * free only our own memory. */
    if (kv->pid == getpid())
        mdb_env_close(kv->env);
    free(kv->path);
    free(kv);
}

int spk_kv_sync(spk_kv *kv, spk_errbuf *eb)
{
    if (kv == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv store: no handle");
    clear_dead_readers(kv);
    int rc = mdb_env_sync(kv->env, 1);
    if (rc != 0)
        return spk_errf(eb, SPK_EIO, "kv store %s: flush: %s", kv->path, mdb_strerror(rc));
    return 0;
}

const char *spk_kv_path(const spk_kv *kv)
{
    return kv->path;
}

/* ---- transactions -------------------------------------------------------------------- */

int spk_kv_begin(spk_kv *kv, spk_kv_txn *parent, bool write, spk_kv_txn **out, spk_errbuf *eb)
{
    if (kv == NULL || out == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv begin: no handle");
    *out = NULL;
    if (parent != NULL) {
        if (parent->kv != kv)
            return spk_errf(eb, SPK_EINVAL,
                            "kv store %s: begin: the parent belongs to "
                            "another store",
                            kv->path);
        if (!write || !parent->write)
            return spk_errf(eb, SPK_EINVAL,
                            "kv store %s: begin: only write transactions "
                            "nest",
                            kv->path);
        int err = txn_usable(parent, true, "begin nested", eb);
        if (err != 0)
            return err;
    } else {
        if (kv->pid != getpid())
            return spk_errf(eb, SPK_EINVAL,
                            "kv store %s: begin: the handle was opened by "
                            "process %ld; open the store again after fork",
                            kv->path, (long)kv->pid);
        if (write && kv->writing)
            return spk_errf(eb, SPK_EBUSY,
                            "kv store %s: begin: this process already holds "
                            "the store's write transaction",
                            kv->path);
    }
    spk_kv_txn *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return spk_errf(eb, SPK_ENOMEM, "kv store %s: begin: out of memory", kv->path);
    unsigned flags = write ? 0 : MDB_RDONLY;
    MDB_txn *ptxn = parent != NULL ? parent->txn : NULL;
    int rc = mdb_txn_begin(kv->env, ptxn, flags, &t->txn);
    if (rc == MDB_MAP_RESIZED && parent == NULL && kv->n_active == 0) {
        /* Another process grew the map: adopt its size (allowed with no transaction of
         * ours open), then try again. */
        rc = mdb_env_set_mapsize(kv->env, 0);
        if (rc == 0)
            rc = mdb_txn_begin(kv->env, NULL, flags, &t->txn);
    }
    if (rc != 0) {
        free(t);
        return lmdb_err(kv, rc, "begin", eb);
    }
    t->kv = kv;
    t->parent = parent;
    t->write = write;
    if (parent != NULL) {
        parent->child = t;
    } else {
        kv->n_active++;
        kv->writing = kv->writing || write;
    }
    *out = t;
    return 0;
}

/* Unlink and free t, whose MDB_txn has ended. */
static void txn_free(spk_kv_txn *t)
{
    if (t->parent != NULL) {
        t->parent->child = NULL;
    } else {
        if (!t->reset)
            t->kv->n_active--;
        if (t->write)
            t->kv->writing = false;
    }
    free(t);
}

void spk_kv_abort(spk_kv_txn *t)
{
    if (t == NULL)
        return;
    if (t->child != NULL)
        spk_kv_abort(t->child);
    mdb_txn_abort(t->txn);
    txn_free(t);
}

/* Commit the MDB_txn of t, a usable write transaction without a child, and free t.
 * Returns LMDB's code. */
static int commit_raw(spk_kv_txn *t)
{
    int rc = mdb_txn_commit(t->txn); /* ends the MDB_txn whatever it returns */
    /* Merging a child into its parent failed half-way, perhaps: do not trust the parent
     * any more. */
    if (rc != 0 && t->parent != NULL && t->parent->failed == 0)
        t->parent->failed = lmdb_err(t->kv, rc, "commit", NULL);
    txn_free(t);
    return rc;
}

int spk_kv_commit(spk_kv_txn *t, spk_errbuf *eb)
{
    if (t == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv commit: no transaction");
    if (t->child != NULL) {
        int err = spk_errf(eb, SPK_EINVAL,
                           "kv store %s: commit: a nested transaction is "
                           "still open; both were aborted",
                           t->kv->path);
        spk_kv_abort(t);
        return err;
    }
    if (t->failed != 0) {
        int err = spk_errf(eb, t->failed,
                           "kv store %s: commit: an earlier call failed in "
                           "this transaction (%s); it was aborted",
                           t->kv->path, spk_strerror(t->failed));
        spk_kv_abort(t);
        return err;
    }
    if (!t->write) {
        mdb_txn_abort(t->txn); /* a read-only transaction has nothing to commit */
        txn_free(t);
        return 0;
    }
    spk_kv *kv = t->kv;
    int rc = commit_raw(t);
    return rc == 0 ? 0 : lmdb_err(kv, rc, "commit", eb);
}

void spk_kv_reset(spk_kv_txn *t)
{
    if (t == NULL || t->write || t->reset)
        return;
    mdb_txn_reset(t->txn);
    t->reset = true;
    t->kv->n_active--;
}

int spk_kv_renew(spk_kv_txn *t, spk_errbuf *eb)
{
    if (t == NULL || !t->reset)
        return spk_errf(eb, SPK_EINVAL, "kv renew: not a reset read-only transaction");
    int rc = mdb_txn_renew(t->txn);
    if (rc == MDB_MAP_RESIZED && t->kv->n_active == 0) {
        /* no snapshot of ours is in use: the map may be adopted (reset transactions
         * hold a reader slot but no pointer into the map) */
        if ((rc = mdb_env_set_mapsize(t->kv->env, 0)) == 0)
            rc = mdb_txn_renew(t->txn);
    }
    if (rc != 0)
        return lmdb_err(t->kv, rc, "renew", eb);
    t->reset = false;
    t->kv->n_active++;
    return 0;
}

bool spk_kv_txn_writable(const spk_kv_txn *t)
{
    return t != NULL && t->write;
}

/* ---- per-plugin key-value ------------------------------------------------------------ */

int spk_kv_get(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, const void **val,
               size_t *vlen, spk_errbuf *eb)
{
    if (val == NULL || vlen == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv get: no place for the value");
    *val = NULL;
    *vlen = 0;
    int err = txn_usable(t, false, "get", eb);
    uint8_t kb[SPK_KV_LMDB_MAX_KEY];
    MDB_val k, v;
    if (err != 0 || (err = kv_key(t, ns, key, klen, kb, &k, "get", eb)) != 0)
        return err;
    int rc = mdb_get(t->txn, t->kv->kv, &k, &v);
    if (rc == MDB_NOTFOUND)
        return spk_errf(eb, SPK_ENOENT, "kv store %s: plugin %u: no such key", t->kv->path, ns);
    if (rc != 0)
        return lmdb_err(t->kv, rc, "get", eb);
    *val = v.mv_data;
    *vlen = v.mv_size;
    return 0;
}

int spk_kv_put(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, const void *val,
               size_t vlen, spk_errbuf *eb)
{
    int err = txn_usable(t, true, "put", eb);
    uint8_t kb[SPK_KV_LMDB_MAX_KEY];
    MDB_val k;
    if (err != 0 || (err = kv_key(t, ns, key, klen, kb, &k, "put", eb)) != 0)
        return err;
    if (val == NULL && vlen != 0)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: put: NULL value of %zu bytes", t->kv->path,
                        vlen);
    if (vlen > SPK_KV_MAX_VALUE)
        return spk_errf(eb, SPK_EPAYLOAD_TOO_LARGE,
                        "kv store %s: put: plugin %u: value of %zu bytes is over the limit "
                        "of %u bytes",
                        t->kv->path, ns, vlen, SPK_KV_MAX_VALUE);
    MDB_val v = {vlen, (void *)val};
    int rc = mdb_put(t->txn, t->kv->kv, &k, &v, 0);
    return rc == 0 ? 0 : write_failed(t, rc, "put", eb);
}

int spk_kv_del(spk_kv_txn *t, uint32_t ns, const void *key, size_t klen, spk_errbuf *eb)
{
    int err = txn_usable(t, true, "del", eb);
    uint8_t kb[SPK_KV_LMDB_MAX_KEY];
    MDB_val k;
    if (err != 0 || (err = kv_key(t, ns, key, klen, kb, &k, "del", eb)) != 0)
        return err;
    int rc = mdb_del(t->txn, t->kv->kv, &k, NULL);
    if (rc == MDB_NOTFOUND)
        return spk_errf(eb, SPK_ENOENT, "kv store %s: plugin %u: no such key", t->kv->path, ns);
    return rc == 0 ? 0 : write_failed(t, rc, "del", eb);
}

/* memcmp order of byte strings of different lengths. */
static int bytes_cmp(const void *a, size_t alen, const void *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = n > 0 ? memcmp(a, b, n) : 0;
    if (c != 0)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static bool has_prefix(const MDB_val *k, const uint8_t *pfx, size_t plen)
{
    return k->mv_size >= plen && memcmp(k->mv_data, pfx, plen) == 0;
}

int spk_kv_scan(spk_kv_txn *t, uint32_t ns, const void *prefix, size_t plen, const void *after,
                size_t alen, size_t max, spk_kv_scan_cb cb, void *arg, size_t *visited, bool *more,
                spk_errbuf *eb)
{
    if (visited != NULL)
        *visited = 0;
    if (more != NULL)
        *more = false;
    int err = txn_usable(t, false, "scan", eb);
    if (err != 0)
        return err;
    if (cb == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: scan: no callback", t->kv->path);
    uint8_t pb[SPK_KV_LMDB_MAX_KEY], sb[SPK_KV_LMDB_MAX_KEY];
    MDB_val pk, start;
    if ((err = kv_key(t, ns, prefix, plen, pb, &pk, "scan prefix", eb)) != 0)
        return err;
    /* Start at the prefix, or just after `after` when that lies at or beyond it. */
    bool skip_equal = false;
    start = pk;
    if (after != NULL && bytes_cmp(after, alen, prefix, plen) >= 0) {
        if ((err = kv_key(t, ns, after, alen, sb, &start, "scan resume key", eb)) != 0)
            return err;
        skip_equal = true;
    }

    MDB_cursor *c;
    int rc = mdb_cursor_open(t->txn, t->kv->kv, &c);
    if (rc != 0)
        return lmdb_err(t->kv, rc, "scan", eb);
    MDB_val k = start, v;
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    if (rc == 0 && skip_equal && bytes_cmp(k.mv_data, k.mv_size, start.mv_data, start.mv_size) == 0)
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
    size_t n = 0;
    while (rc == 0 && has_prefix(&k, pb, pk.mv_size)) {
        if (max != 0 && n == max) {
            if (more != NULL)
                *more = true;
            break;
        }
        t->scanning = true;
        int r = cb(arg, (const uint8_t *)k.mv_data + SPK_KV_NS_PREFIX, k.mv_size - SPK_KV_NS_PREFIX,
                   v.mv_data, v.mv_size);
        t->scanning = false;
        n++;
        if (r < 0) {
            err = r;
            break;
        }
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        if (r > 0) {
            if (more != NULL)
                *more = rc == 0 && has_prefix(&k, pb, pk.mv_size);
            break;
        }
    }
    if (err == 0 && rc != 0 && rc != MDB_NOTFOUND)
        err = lmdb_err(t->kv, rc, "scan", eb);
    mdb_cursor_close(c);
    if (visited != NULL)
        *visited = n;
    return err;
}

/* ---- one-shot calls ------------------------------------------------------------------ */

int spk_kv_put1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, const void *val, size_t vlen,
                spk_errbuf *eb)
{
    spk_kv_txn *t;
    int err = spk_kv_begin(kv, NULL, true, &t, eb);
    if (err != 0)
        return err;
    if ((err = spk_kv_put(t, ns, key, klen, val, vlen, eb)) != 0) {
        spk_kv_abort(t);
        return err;
    }
    return spk_kv_commit(t, eb);
}

int spk_kv_del1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, spk_errbuf *eb)
{
    spk_kv_txn *t;
    int err = spk_kv_begin(kv, NULL, true, &t, eb);
    if (err != 0)
        return err;
    if ((err = spk_kv_del(t, ns, key, klen, eb)) != 0) {
        spk_kv_abort(t);
        return err;
    }
    return spk_kv_commit(t, eb);
}

int spk_kv_get1(spk_kv *kv, uint32_t ns, const void *key, size_t klen, void *buf, size_t cap,
                size_t *vlen, spk_errbuf *eb)
{
    if (vlen == NULL || (buf == NULL && cap != 0))
        return spk_errf(eb, SPK_EINVAL, "kv get: no place for the value");
    *vlen = 0;
    spk_kv_txn *t;
    int err = spk_kv_begin(kv, NULL, false, &t, eb);
    if (err != 0)
        return err;
    const void *v;
    size_t n;
    if ((err = spk_kv_get(t, ns, key, klen, &v, &n, eb)) == 0) {
        if (cap > 0)
            memcpy(buf, v, n < cap ? n : cap);
        *vlen = n;
    }
    spk_kv_abort(t);
    return err;
}

/* ---- dedupe marks -------------------------------------------------------------------- */

static int check_edge(const spk_kv_txn *t, const char *edge_id, size_t *len, spk_errbuf *eb)
{
    size_t n = edge_id != NULL ? strnlen(edge_id, SPK_KV_MAX_EDGE_ID + 1) : 0;
    if (n == 0)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: dedupe: no edge ID", t->kv->path);
    if (n > SPK_KV_MAX_EDGE_ID)
        return spk_errf(eb, SPK_EINVAL,
                        "kv store %s: dedupe: edge ID of more than %u bytes (\"%.40s...\")",
                        t->kv->path, SPK_KV_MAX_EDGE_ID, edge_id);
    *len = n;
    return 0;
}

/* The number of edge `edge_id`; with `create`, assign one if it has none (t must be a
 * write transaction). MDB_NOTFOUND when it has none and !create. */
static int edge_number(spk_kv_txn *t, const char *edge_id, size_t len, bool create, uint32_t *no)
{
    MDB_val k = {len, (void *)edge_id}, v;
    int rc = mdb_get(t->txn, t->kv->dd_edges, &k, &v);
    if (rc == 0) {
        if (v.mv_size != sizeof(*no))
            return MDB_CORRUPTED;
        memcpy(no, v.mv_data, sizeof(*no));
        return 0;
    }
    if (rc != MDB_NOTFOUND || !create)
        return rc;
    MDB_stat st;
    if ((rc = mdb_stat(t->txn, t->kv->dd_edges, &st)) != 0)
        return rc;
    if (st.ms_entries >= UINT32_MAX)
        return MDB_MAP_FULL;
    *no = (uint32_t)st.ms_entries + 1;
    v.mv_size = sizeof(*no);
    v.mv_data = no;
    return mdb_put(t->txn, t->kv->dd_edges, &k, &v, MDB_NOOVERWRITE);
}

int spk_kv_dedupe_mark(spk_kv_txn *t, const char *edge_id, uint64_t seq, int64_t now_ms,
                       bool *duplicate, spk_errbuf *eb)
{
    size_t len = 0;
    int err = txn_usable(t, true, "dedupe mark", eb);
    if (err != 0 || (err = check_edge(t, edge_id, &len, eb)) != 0)
        return err;
    if (duplicate == NULL || now_ms < 0)
        return spk_errf(eb, SPK_EINVAL, "kv store %s: dedupe mark: %s", t->kv->path,
                        duplicate == NULL ? "no place for the answer" : "negative time");
    *duplicate = false;
    uint32_t no;
    int rc = edge_number(t, edge_id, len, true, &no);
    if (rc != 0)
        return write_failed(t, rc, "dedupe mark (edge number)", eb);

    uint8_t tk[DD_TIME_KEY], tv[8];
    be64_put(tk, (uint64_t)now_ms);
    be32_put(tk + 8, no);
    be64_put(tk + 12, seq);
    be64_put(tv, (uint64_t)now_ms);
    MDB_val k = {DD_KEY, tk + 8}, v = {sizeof(tv), tv};
    rc = mdb_put(t->txn, t->kv->dd, &k, &v, MDB_NOOVERWRITE);
    if (rc == MDB_KEYEXIST) {
        *duplicate = true;
        return 0;
    }
    if (rc != 0)
        return write_failed(t, rc, "dedupe mark", eb);
    MDB_val time_k = {DD_TIME_KEY, tk}, empty = {0, NULL};
    rc = mdb_put(t->txn, t->kv->dd_time, &time_k, &empty, 0);
    return rc == 0 ? 0 : write_failed(t, rc, "dedupe mark (time index)", eb);
}

int spk_kv_dedupe_marked(spk_kv_txn *t, const char *edge_id, uint64_t seq, int64_t *marked_ms,
                         spk_errbuf *eb)
{
    size_t len = 0;
    int err = txn_usable(t, false, "dedupe lookup", eb);
    if (err != 0 || (err = check_edge(t, edge_id, &len, eb)) != 0)
        return err;
    uint32_t no;
    int rc = edge_number(t, edge_id, len, false, &no);
    uint8_t kb[DD_KEY];
    MDB_val k = {DD_KEY, kb}, v;
    if (rc == 0) {
        be32_put(kb, no);
        be64_put(kb + 4, seq);
        rc = mdb_get(t->txn, t->kv->dd, &k, &v);
    }
    if (rc == MDB_NOTFOUND)
        return spk_errf(eb, SPK_ENOENT, "kv store %s: edge %s seq %llu: not marked", t->kv->path,
                        edge_id, (unsigned long long)seq);
    if (rc == 0 && v.mv_size != 8)
        rc = MDB_CORRUPTED;
    if (rc != 0)
        return lmdb_err(t->kv, rc, "dedupe lookup", eb);
    if (marked_ms != NULL)
        *marked_ms = (int64_t)be64_get(v.mv_data);
    return 0;
}

/* One expiry transaction's work on an open write transaction: remove up to `limit` of the
 * oldest marks made before `cutoff`. *n receives how many; *done whether no more are. */
static int expire_some(spk_kv_txn *t, uint64_t cutoff, uint32_t limit, uint32_t *n, bool *done)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(t->txn, t->kv->dd_time, &c);
    if (rc != 0)
        return rc;
    *n = 0;
    *done = false;
    MDB_val k, v;
    while (*n < limit) {
        rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        if (rc == MDB_NOTFOUND ||
            (rc == 0 && k.mv_size == DD_TIME_KEY && be64_get(k.mv_data) >= cutoff)) {
            *done = true;
            rc = 0;
            break;
        }
        if (rc == 0 && k.mv_size != DD_TIME_KEY)
            rc = MDB_CORRUPTED;
        if (rc != 0)
            break;
        MDB_val dk = {DD_KEY, (uint8_t *)k.mv_data + 8};
        rc = mdb_del(t->txn, t->kv->dd, &dk, NULL);
        if (rc == 0 || rc == MDB_NOTFOUND)
            rc = mdb_cursor_del(c, 0);
        if (rc != 0)
            break;
        (*n)++;
    }
    mdb_cursor_close(c);
    return rc;
}

int spk_kv_dedupe_expire(spk_kv *kv, int64_t older_than_ms, uint64_t *removed, spk_errbuf *eb)
{
    if (removed != NULL)
        *removed = 0;
    if (kv == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv dedupe expire: no handle");
    if (kv->pid == getpid() && !kv->writing)
        clear_dead_readers(kv);
    if (older_than_ms <= 0)
        return 0; /* marks have times >= 0: none is older */
    uint32_t limit = kv->opts.expire_per_txn;
    for (;;) {
        spk_kv_txn *t;
        int err = spk_kv_begin(kv, NULL, true, &t, eb);
        if (err != 0)
            return err;
        uint32_t n;
        bool done;
        int rc = expire_some(t, (uint64_t)older_than_ms, limit, &n, &done);
        if (rc == 0 && n > 0) {
            rc = commit_raw(t);
        } else {
            spk_kv_abort(t); /* failed, or nothing changed: no commit, no flush */
            if (rc == 0)
                return 0;
        }
        /* Deleting needs new pages too (copy-on-write of each touched path). In a map
         * that is full to the last page, a big batch can fail where a small one fits and
         * frees pages for the next: shrink the batch rather than never expire again. */
        if (rc == MDB_MAP_FULL && limit > 1) {
            limit /= 4;
            limit += limit == 0;
            continue;
        }
        if (rc != 0)
            return lmdb_err(kv, rc, "dedupe expire", eb);
        if (removed != NULL)
            *removed += n;
        if (done)
            return 0;
    }
}

/* ---- statistics ---------------------------------------------------------------------- */

int spk_kv_stat(spk_kv *kv, spk_kv_stats *st, spk_errbuf *eb)
{
    if (kv == NULL || st == NULL)
        return spk_errf(eb, SPK_EINVAL, "kv stat: no handle or no place for the answer");
    memset(st, 0, sizeof(*st));
    spk_kv_txn *t;
    int err = spk_kv_begin(kv, NULL, false, &t, eb);
    if (err != 0)
        return err;
    MDB_stat s;
    MDB_envinfo info;
    int rc = mdb_stat(t->txn, kv->kv, &s);
    if (rc == 0) {
        st->kv_entries = s.ms_entries;
        rc = mdb_stat(t->txn, kv->dd, &s);
    }
    if (rc == 0) {
        st->dedupe_marks = s.ms_entries;
        rc = mdb_stat(t->txn, kv->dd_edges, &s);
    }
    if (rc == 0) {
        st->dedupe_edges = s.ms_entries;
        rc = mdb_env_info(kv->env, &info);
    }
    if (rc == 0) {
        st->map_size = info.me_mapsize;
        st->map_used = ((uint64_t)info.me_last_pgno + 1) * s.ms_psize;
        st->readers = info.me_numreaders;
        st->last_txn_id = info.me_last_txnid;
        st->dead_readers = kv->dead_readers;
    }
    spk_kv_abort(t);
    return rc == 0 ? 0 : lmdb_err(kv, rc, "stat", eb);
}
