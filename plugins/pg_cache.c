/*
 * pg-cache -- a PostgreSQL query cache shared by every worker of a spoked, kept in the
 * host's KV store (LMDB), with its counts reported to the control plane. The edge half of
 * the reference example: cache-stats-aggregator (the same plugin ID) sums the reports at
 * the hub.
 *
 * WHAT IT CACHES. It decodes the protocol in both directions (pgwire.h). A simple Query
 * whose text is one read-only statement without volatile functions (pgsql.h), sent while
 * the session is idle outside a transaction (the last ReadyForQuery said 'I') and nothing
 * else is outstanding, is looked up by (the session's startup message, the query text):
 * the startup message carries the user, the database and every other startup setting.
 * A hit is answered with the bytes the server sent the first time (RowDescription,
 * DataRows, CommandComplete, ReadyForQuery), and the server never sees the query. A miss
 * goes to the server; if its answer is exactly RowDescription, DataRow*, CommandComplete
 * and ReadyForQuery 'I' (no error, no notice, nothing else), it is stored. A session that
 * changes its settings (SET, RESET, DISCARD, CREATE TEMP) is neither served nor stored
 * from then on; the extended protocol is never cached (its writes still invalidate).
 *
 * INVALIDATION. Every name a cached answer depends on (pgsql.h: every identifier of its
 * query) has a generation in the KV store, "g<name>", and the entry holds the generations
 * it was read under, read BEFORE the query was sent to the server. A write to table t
 * gives "g<t>" a new, never-repeating value (time, pid, counter) when the server reports
 * the writing session idle again (ReadyForQuery 'I': the write is committed, or rolled
 * back), before that answer goes on to the client. So an answer read before the commit
 * holds an old generation, one read after it the new one, whatever the interleaving of
 * workers; a lookup compares, and a stale entry is a miss (and is deleted). Writes that
 * cannot be bounded to tables (DDL, CALL, ...) renew "g" itself, on which every entry
 * depends. With `invalidate: all` every write does. The workers share the store, so an
 * invalidation is seen by all at once.
 *
 * STORE LAYOUT (the plugin's KV namespace; pid = the worker's, 4 bytes):
 *   e<hash16><pid>  an entry: header, names and generations, identity, answer bytes.
 *                   Each worker writes only keys with its own pid, so two workers storing
 *                   the same query make two entries (a lookup takes the first) and the
 *                   byte counts stay exact without a multi-key transaction.
 *   u<hash16><pid>  its LRU record: last use (refreshed at most once a second), stored
 *                   time, size. Written after the entry; eviction walks these.
 *   g<name>, g      generations (16 bytes; absent = all zero).
 *   s<pid>          one worker's counts: hits, misses, invalidations, and the entries and
 *                   bytes it added minus those it removed (whoever stored them). Summed
 *                   over all s-keys they give the cache's totals; each worker writes only
 *                   its own, after every event, so a kill -9 loses none of them.
 *   #epoch          when the counts began (ms); a new store starts a new epoch.
 * max_bytes bounds the sum of entry and LRU record sizes: a store that would pass it first
 * evicts, least recently used first, down to 90% of it. Every report_interval each worker
 * also deletes the entries past their TTL.
 *
 * REPORTS. Every report_interval each worker sends the totals (not differences) with
 * send_to_control_json, metadata metric_type = cache_stats:
 *   {"source": "pg-cache", "epoch": E, "hits": H, "misses": M, "invalidations": I,
 *    "entries": N, "bytes": B}
 * Totals from several workers arrive in any order; the aggregator keeps the largest.
 *
 * Config: ttl (duration, default 60s), max_bytes (size, default 64MiB), report_interval
 * (duration, default 10s), invalidate (tables | all, default tables). Needs an `id:`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pgsql.h"
#include "pgwire.h"
#include "spoke.h"

#define DEFAULT_TTL_MS    60000u
#define DEFAULT_MAX_BYTES (64ull << 20)
#define DEFAULT_REPORT_MS 10000u
#define MAX_DURATION_MS   (24ull * 3600u * 1000u)
#define MIN_MAX_BYTES     (64ull << 10)
#define MAX_MAX_BYTES     (1ull << 40)
#define MAX_QUERY         (256u * 1024u) /* a longer Query is not analysed: it may write */
#define GEN_LEN           16u
#define HASH_LEN          16u
#define EKEY_LEN          (1u + HASH_LEN + 4u)
#define ENTRY_MAGIC       0x70674331u /* "pgC1" */
#define LRU_REFRESH_MS    1000u

static const spoke_host *host;

typedef struct counts {
    int64_t hits, misses, invalidations, entries, bytes;
} counts;

typedef struct pgcache {
    spoke_ctx *ctx;
    uint64_t ttl_ms, max_bytes, report_ms;
    int all;      /* invalidate: all */
    int disabled; /* an invalidation could not be stored: serve nothing */
    uint8_t pid[4];
    uint32_t gen_seq;
    counts mine;      /* this worker's s-record, as stored */
    uint8_t *scratch; /* a found entry, copied out of a scan */
    size_t scratch_len, scratch_cap;
    uint8_t found_key[EKEY_LEN];
} pgcache;

typedef struct candidate {
    int active, ok, saw_t, saw_c;
    uint8_t hash[HASH_LEN];
    uint8_t *query;
    size_t qlen;
    pgsql_names names;
    uint8_t gens[PGSQL_MAX_NAMES + 1][GEN_LEN]; /* [0]: "g", then one per name */
    uint8_t *resp;
    size_t rlen, rcap;
} candidate;

typedef struct pgconn {
    uint64_t id;
    spoke_conn *sc; /* during a hook */
    pgcache *pc;
    pgw_stream cs, ss; /* client's and server's streams */
    int off;           /* not decoded any more (TLS, cancel, lost track) */
    uint8_t *ident;    /* the startup message's body, without the application's name */
    size_t ident_len;
    uint8_t tx;           /* the last ReadyForQuery status; 0 before the first */
    unsigned outstanding; /* ReadyForQuery messages the server still owes */
    int nocache;          /* the session changed a setting */
    int executed;         /* an Execute since the last ReadyForQuery */
    int dirty_all;
    pgsql_names dirty; /* tables written, to invalidate at the next idle ReadyForQuery */
    int ext_all;
    pgsql_names ext; /* tables written by statements this session parsed */
    int chunk_one;   /* the current client chunk is exactly one message */
    size_t chunk_len;
    int answered; /* a hit answered the current client chunk */
    candidate cand;
} pgconn;

/* ---- small helpers ---------------------------------------------------------------- */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void hash_identity(const uint8_t *ident, size_t ilen, const uint8_t *q, size_t qlen,
                          uint8_t out[HASH_LEN])
{
    uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
    const uint8_t *parts[2] = {ident, q};
    size_t lens[2] = {ilen, qlen};
    for (int p = 0; p < 2; p++)
        for (size_t i = 0; i < lens[p]; i++) {
            a = (a ^ parts[p][i]) * 0x100000001b3ull;
            b = (b ^ parts[p][i]) * 0x100000001b3ull;
            b ^= b >> 29;
        }
    memcpy(out, &a, 8);
    memcpy(out + 8, &b, 8);
}

static void ekey(char kind, const uint8_t hash[HASH_LEN], const uint8_t pid[4],
                 uint8_t out[EKEY_LEN])
{
    out[0] = (uint8_t)kind;
    memcpy(out + 1, hash, HASH_LEN);
    memcpy(out + 1 + HASH_LEN, pid, 4);
}

/* The generation of `name` ("" = the global one) into out (zeros when never written). */
static void gen_get(pgcache *pc, const char *name, uint8_t out[GEN_LEN])
{
    char key[PGSQL_NAME_MAX + 2];
    size_t n = strlen(name);
    key[0] = 'g';
    memcpy(key + 1, name, n);
    const void *v;
    size_t vlen;
    if (host->kv_get(pc->ctx, key, n + 1, &v, &vlen) == 0 && vlen == GEN_LEN)
        memcpy(out, v, GEN_LEN);
    else
        memset(out, 0, GEN_LEN);
}

static int gen_bump(pgcache *pc, const char *name)
{
    char key[PGSQL_NAME_MAX + 2];
    size_t n = strlen(name);
    key[0] = 'g';
    memcpy(key + 1, name, n);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint8_t g[GEN_LEN];
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    uint32_t seq = ++pc->gen_seq;
    memcpy(g, &ns, 8);
    memcpy(g + 8, pc->pid, 4);
    memcpy(g + 12, &seq, 4);
    return host->kv_put(pc->ctx, key, n + 1, g, GEN_LEN);
}

static void counts_save(pgcache *pc)
{
    uint8_t key[5] = {'s'};
    memcpy(key + 1, pc->pid, 4);
    int rc = host->kv_put(pc->ctx, key, sizeof(key), &pc->mine, sizeof(pc->mine));
    if (rc != 0)
        host->log(pc->ctx, SPOKE_LOG_WARN, "counts not stored: %s", host->strerror(rc));
}

static int sum_counts_cb(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    (void)key;
    counts *sum = arg;
    if (klen != 5 || vlen != sizeof(counts))
        return 0;
    counts c;
    memcpy(&c, val, sizeof(c));
    sum->hits += c.hits;
    sum->misses += c.misses;
    sum->invalidations += c.invalidations;
    sum->entries += c.entries;
    sum->bytes += c.bytes;
    return 0;
}

/* The totals of every worker, past and present. */
static int sum_counts(pgcache *pc, counts *sum)
{
    memset(sum, 0, sizeof(*sum));
    return host->kv_scan(pc->ctx, "s", 1, NULL, 0, 0, sum_counts_cb, sum);
}

/* ---- entries ------------------------------------------------------------------------ */

/* An entry's value: head, then per name (u8 length, name, generation), then the global
 * generation, the identity (startup body, NUL, query), the answer. */
typedef struct entry_head {
    uint32_t magic;
    uint32_t n_names;
    uint64_t stored_ms;
    uint32_t ident_len;
    uint32_t resp_len;
} entry_head;

typedef struct lru_rec {
    uint64_t used_ms, stored_ms, size;
} lru_rec;

/* Delete entry `key` (and its LRU record); count it when it was still there. */
static void entry_delete(pgcache *pc, const uint8_t key[EKEY_LEN], uint64_t size)
{
    uint8_t ukey[EKEY_LEN];
    memcpy(ukey, key, EKEY_LEN);
    ukey[0] = 'u';
    if (size == 0) {
        const void *v;
        size_t vlen;
        if (host->kv_get(pc->ctx, ukey, EKEY_LEN, &v, &vlen) == 0 && vlen == sizeof(lru_rec)) {
            lru_rec r;
            memcpy(&r, v, sizeof(r));
            size = r.size;
        }
    }
    if (host->kv_del(pc->ctx, key, EKEY_LEN) == 0) {
        pc->mine.entries--;
        pc->mine.bytes -= (int64_t)size;
        counts_save(pc);
    }
    host->kv_del(pc->ctx, ukey, EKEY_LEN);
}

typedef struct find_arg {
    pgcache *pc;
    const uint8_t *ident;
    size_t ilen;
    const uint8_t *q;
    size_t qlen;
    int found;
} find_arg;

/* Scan callback: the first entry with this exact identity is copied to pc->scratch. */
static int find_cb(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    find_arg *fa = arg;
    entry_head h;
    if (klen != EKEY_LEN || vlen < sizeof(h))
        return 0;
    memcpy(&h, val, sizeof(h));
    if (h.magic != ENTRY_MAGIC || h.ident_len != fa->ilen + 1 + fa->qlen ||
        (size_t)h.resp_len + h.ident_len + sizeof(h) > vlen)
        return 0;
    const uint8_t *ident = (const uint8_t *)val + vlen - h.resp_len - h.ident_len;
    if (memcmp(ident, fa->ident, fa->ilen) != 0 || ident[fa->ilen] != 0 ||
        memcmp(ident + fa->ilen + 1, fa->q, fa->qlen) != 0)
        return 0;
    pgcache *pc = fa->pc;
    if (pc->scratch_cap < vlen) {
        uint8_t *b = realloc(pc->scratch, vlen);
        if (b == NULL)
            return -1;
        pc->scratch = b;
        pc->scratch_cap = vlen;
    }
    memcpy(pc->scratch, val, vlen);
    pc->scratch_len = vlen;
    memcpy(pc->found_key, key, EKEY_LEN);
    fa->found = 1;
    return 1;
}

/* Whether the entry in pc->scratch is still valid: TTL, and every generation it holds
 * equals the current one. Returns the answer's offset in scratch, or 0 when stale. */
static size_t entry_valid(pgcache *pc)
{
    const uint8_t *v = pc->scratch;
    size_t vlen = pc->scratch_len;
    entry_head h;
    memcpy(&h, v, sizeof(h));
    if (now_ms() - h.stored_ms >= pc->ttl_ms || h.n_names > PGSQL_MAX_NAMES)
        return 0;
    size_t off = sizeof(h);
    uint8_t cur[GEN_LEN];
    for (uint32_t i = 0; i < h.n_names; i++) {
        if (off >= vlen)
            return 0;
        size_t nl = v[off++];
        if (nl > PGSQL_NAME_MAX || off + nl + GEN_LEN > vlen)
            return 0;
        char name[PGSQL_NAME_MAX + 1];
        memcpy(name, v + off, nl);
        name[nl] = '\0';
        off += nl;
        gen_get(pc, name, cur);
        if (memcmp(cur, v + off, GEN_LEN) != 0)
            return 0;
        off += GEN_LEN;
    }
    if (off + GEN_LEN > vlen)
        return 0;
    gen_get(pc, "", cur);
    if (memcmp(cur, v + off, GEN_LEN) != 0)
        return 0;
    return vlen - h.resp_len;
}

/* Refresh the LRU record of a used entry, at most once a second. */
static void lru_touch(pgcache *pc, const uint8_t key[EKEY_LEN])
{
    uint8_t ukey[EKEY_LEN];
    memcpy(ukey, key, EKEY_LEN);
    ukey[0] = 'u';
    const void *v;
    size_t vlen;
    lru_rec r;
    if (host->kv_get(pc->ctx, ukey, EKEY_LEN, &v, &vlen) != 0 || vlen != sizeof(r))
        return;
    memcpy(&r, v, sizeof(r));
    uint64_t now = now_ms();
    if (now < r.used_ms + LRU_REFRESH_MS)
        return;
    r.used_ms = now;
    host->kv_put(pc->ctx, ukey, EKEY_LEN, &r, sizeof(r));
}

/* ---- eviction and expiry -------------------------------------------------------------- */

typedef struct lru_item {
    uint64_t used_ms, stored_ms, size;
    uint8_t key[EKEY_LEN];
} lru_item;

typedef struct lru_list {
    lru_item *v;
    size_t n, cap;
    int failed;
} lru_list;

static int lru_collect_cb(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    lru_list *l = arg;
    if (klen != EKEY_LEN || vlen != sizeof(lru_rec))
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        lru_item *v = realloc(l->v, cap * sizeof(*v));
        if (v == NULL) {
            l->failed = 1;
            return 1;
        }
        l->v = v;
        l->cap = cap;
    }
    lru_rec r;
    memcpy(&r, val, sizeof(r));
    lru_item *it = &l->v[l->n++];
    it->used_ms = r.used_ms;
    it->stored_ms = r.stored_ms;
    it->size = r.size;
    memcpy(it->key, key, EKEY_LEN);
    it->key[0] = 'e';
    return 0;
}

static int by_use(const void *a, const void *b)
{
    const lru_item *x = a, *y = b;
    return x->used_ms < y->used_ms ? -1 : x->used_ms > y->used_ms;
}

/* Delete the entries past their TTL, then, least recently used first, entries until the
 * cache holds at most `target` bytes. */
static void sweep(pgcache *pc, uint64_t target)
{
    lru_list l = {0};
    host->kv_scan(pc->ctx, "u", 1, NULL, 0, 0, lru_collect_cb, &l);
    counts sum;
    sum_counts(pc, &sum);
    int64_t total = sum.bytes;
    uint64_t now = now_ms();
    if (l.n > 1)
        qsort(l.v, l.n, sizeof(*l.v), by_use);
    size_t evicted = 0, expired = 0;
    for (size_t i = 0; i < l.n; i++) {
        int old = now - l.v[i].stored_ms >= pc->ttl_ms;
        if (!old && (total <= 0 || (uint64_t)total <= target))
            continue;
        int64_t before = pc->mine.bytes;
        entry_delete(pc, l.v[i].key, l.v[i].size);
        if (pc->mine.bytes != before) {
            total -= (int64_t)l.v[i].size;
            old ? expired++ : evicted++;
        }
    }
    free(l.v);
    if (evicted + expired > 0)
        host->log(pc->ctx, SPOKE_LOG_DEBUG,
                  "removed %zu expired and %zu least recently used "
                  "entries",
                  expired, evicted);
}

/* ---- storing -------------------------------------------------------------------------- */

static void store(pgcache *pc, pgconn *c)
{
    candidate *cd = &c->cand;
    size_t names_len = 0;
    for (size_t i = 0; i < cd->names.n; i++)
        names_len += 1 + strlen(cd->names.v[i]) + GEN_LEN;
    size_t ilen = c->ident_len + 1 + cd->qlen;
    size_t vlen = sizeof(entry_head) + names_len + GEN_LEN + ilen + cd->rlen;
    uint64_t size = vlen + EKEY_LEN + sizeof(lru_rec) + EKEY_LEN;
    if (vlen > SPOKE_KV_MAX_VALUE || size > pc->max_bytes / 2)
        return; /* too big to be worth it */
    uint8_t *v = malloc(vlen);
    if (v == NULL)
        return;
    entry_head h = {ENTRY_MAGIC, (uint32_t)cd->names.n, now_ms(), (uint32_t)ilen,
                    (uint32_t)cd->rlen};
    memcpy(v, &h, sizeof(h));
    size_t off = sizeof(h);
    for (size_t i = 0; i < cd->names.n; i++) {
        size_t nl = strlen(cd->names.v[i]);
        v[off++] = (uint8_t)nl;
        memcpy(v + off, cd->names.v[i], nl);
        off += nl;
        memcpy(v + off, cd->gens[i + 1], GEN_LEN);
        off += GEN_LEN;
    }
    memcpy(v + off, cd->gens[0], GEN_LEN);
    off += GEN_LEN;
    memcpy(v + off, c->ident, c->ident_len);
    off += c->ident_len;
    v[off++] = 0;
    memcpy(v + off, cd->query, cd->qlen);
    off += cd->qlen;
    memcpy(v + off, cd->resp, cd->rlen);

    /* Room first: the sum of every worker's bytes, evicting down to 90%. */
    counts sum;
    if (sum_counts(pc, &sum) == 0 && sum.bytes + (int64_t)size > (int64_t)pc->max_bytes)
        sweep(pc, pc->max_bytes / 10 * 9 - size);

    uint8_t key[EKEY_LEN], ukey[EKEY_LEN];
    ekey('e', cd->hash, pc->pid, key);
    ekey('u', cd->hash, pc->pid, ukey);
    /* Our own key for this query may exist (another session of this worker stored it
     * first): replace it, counting the difference. Only this worker writes this key. */
    uint64_t old = 0;
    const void *ov;
    size_t ovlen;
    int had = host->kv_get(pc->ctx, ukey, EKEY_LEN, &ov, &ovlen) == 0 && ovlen == sizeof(lru_rec);
    if (had) {
        lru_rec r;
        memcpy(&r, ov, sizeof(r));
        old = r.size;
    }
    int rc = host->kv_put(pc->ctx, key, EKEY_LEN, v, vlen);
    free(v);
    if (rc != 0) {
        host->log(pc->ctx, SPOKE_LOG_WARN, "conn %llu: answer of %zu bytes not stored: %s",
                  (unsigned long long)c->id, cd->rlen, host->strerror(rc));
        return;
    }
    lru_rec r = {h.stored_ms, h.stored_ms, size};
    host->kv_put(pc->ctx, ukey, EKEY_LEN, &r, sizeof(r));
    if (!had)
        pc->mine.entries++;
    pc->mine.bytes += (int64_t)size - (int64_t)old;
    counts_save(pc);
}

/* ---- the candidate: a cacheable query on its way to the server ------------------------ */

static void cand_reset(candidate *cd)
{
    free(cd->query);
    free(cd->resp);
    memset(cd, 0, sizeof(*cd));
}

static void cand_append(candidate *cd, uint8_t type, const uint8_t *body, size_t len)
{
    size_t need = cd->rlen + 5 + len;
    if (body == NULL && len > 0) {
        cd->ok = 0;
        return;
    }
    if (need > SPOKE_KV_MAX_VALUE) {
        cd->ok = 0;
        return;
    }
    if (need > cd->rcap) {
        size_t cap = cd->rcap ? cd->rcap : 1024;
        while (cap < need)
            cap *= 2;
        uint8_t *r = realloc(cd->resp, cap);
        if (r == NULL) {
            cd->ok = 0;
            return;
        }
        cd->resp = r;
        cd->rcap = cap;
    }
    uint8_t *p = cd->resp + cd->rlen;
    uint32_t l = (uint32_t)len + 4;
    p[0] = type;
    p[1] = (uint8_t)(l >> 24), p[2] = (uint8_t)(l >> 16), p[3] = (uint8_t)(l >> 8);
    p[4] = (uint8_t)l;
    if (len > 0)
        memcpy(p + 5, body, len);
    cd->rlen = need;
}

/* ---- invalidation ------------------------------------------------------------------------ */

static void merge(pgsql_names *into, int *into_all, const pgsql_names *from, int from_all)
{
    *into_all |= from_all || from->overflow;
    for (size_t i = 0; i < from->n && !*into_all; i++) {
        size_t j = 0;
        while (j < into->n && strcmp(into->v[j], from->v[i]) != 0)
            j++;
        if (j < into->n)
            continue;
        if (into->n == PGSQL_MAX_NAMES)
            *into_all = 1;
        else
            strcpy(into->v[into->n++], from->v[i]);
    }
}

/* The session is idle: what it wrote is committed (or rolled back). New generations for
 * every table written; the global one for unbounded writes (or every write, with
 * invalidate: all). */
static void flush_writes(pgcache *pc, pgconn *c)
{
    if (c->executed)
        merge(&c->dirty, &c->dirty_all, &c->ext, c->ext_all);
    c->executed = 0;
    if (c->dirty.n == 0 && !c->dirty_all)
        return;
    int64_t n = 0;
    int rc = 0;
    if (c->dirty_all || pc->all) {
        rc = gen_bump(pc, "");
        n += rc == 0;
    } else {
        for (size_t i = 0; i < c->dirty.n; i++) {
            int r = gen_bump(pc, c->dirty.v[i]);
            n += r == 0;
            rc = r != 0 ? r : rc;
        }
    }
    /* An invalidation that could not be recorded: the everything-generation is the last
     * resort; if that fails too, this worker answers nothing from the cache any more. */
    if (rc != 0 && !(c->dirty_all || pc->all) && gen_bump(pc, "") == 0) {
        n++;
        rc = 0;
    }
    if (rc != 0 && !pc->disabled) {
        pc->disabled = 1;
        host->log(pc->ctx, SPOKE_LOG_ERROR,
                  "conn %llu: a write's invalidation could not be "
                  "stored (%s): this worker answers nothing from the cache from now on, and "
                  "other workers may serve answers it made stale until their ttl; make room "
                  "in the KV store (kv.map_size) and restart",
                  (unsigned long long)c->id, host->strerror(rc));
    }
    if (n > 0) {
        pc->mine.invalidations += n;
        counts_save(pc);
    }
    c->dirty.n = 0;
    c->dirty.overflow = 0;
    c->dirty_all = 0;
}

/* ---- client messages ---------------------------------------------------------------------- */

static void stop_decoding(pgconn *c, const char *why)
{
    if (c->off)
        return;
    host->log(c->pc->ctx, SPOKE_LOG_INFO, "conn %llu: %s; not decoding this connection",
              (unsigned long long)c->id, why);
    c->off = 1;
    cand_reset(&c->cand);
}

/* A simple Query: note its writes; answer it from the cache or make it the candidate. */
static void on_query(pgcache *pc, pgconn *c, const uint8_t *body, size_t len)
{
    unsigned before = c->outstanding++;
    if (body == NULL) {
        c->dirty_all = 1; /* too long to read: it may write anything */
        return;
    }
    size_t qlen = len > 0 && body[len - 1] == 0 ? len - 1 : len;
    pgsql_info in;
    pgsql_analyze((const char *)body, qlen, &in);
    merge(&c->dirty, &c->dirty_all, &in.writes, in.writes_all);
    if (in.session_change)
        c->nocache = 1;
    if (!in.cacheable || c->nocache || c->tx != 'I' || before != 0 || c->ident == NULL ||
        c->cand.active || pc->disabled)
        return;
    uint8_t hash[HASH_LEN];
    hash_identity(c->ident, c->ident_len, body, qlen, hash);
    find_arg fa = {pc, c->ident, c->ident_len, body, qlen, 0};
    uint8_t prefix[1 + HASH_LEN] = {'e'};
    memcpy(prefix + 1, hash, HASH_LEN);
    host->kv_scan(pc->ctx, prefix, sizeof(prefix), NULL, 0, 0, find_cb, &fa);
    if (fa.found && c->chunk_one) {
        size_t at = entry_valid(pc);
        if (at > 0 && host->respond(c->sc, pc->scratch + at, pc->scratch_len - at) == 0) {
            c->outstanding--;
            c->answered = 1;
            pc->mine.hits++;
            counts_save(pc);
            lru_touch(pc, pc->found_key);
            return;
        }
        if (at == 0)
            entry_delete(pc, pc->found_key, 0);
    } else if (fa.found && entry_valid(pc) == 0) {
        entry_delete(pc, pc->found_key, 0);
    }
    pc->mine.misses++;
    counts_save(pc);
    /* The generations now, before the server runs the query. */
    candidate *cd = &c->cand;
    cand_reset(cd);
    if ((cd->query = malloc(qlen ? qlen : 1)) == NULL)
        return;
    memcpy(cd->query, body, qlen);
    cd->qlen = qlen;
    memcpy(cd->hash, hash, HASH_LEN);
    cd->names = in.reads;
    gen_get(pc, "", cd->gens[0]);
    for (size_t i = 0; i < cd->names.n; i++)
        gen_get(pc, cd->names.v[i], cd->gens[i + 1]);
    cd->active = cd->ok = 1;
}

/* Parse: the statement may be executed any number of times later; its writes are noted
 * for every ReadyForQuery that follows an Execute. */
static void on_parse(pgconn *c, const uint8_t *body, size_t len)
{
    size_t off = 0;
    const uint8_t *name, *query;
    if (body == NULL || pgw_cstring(body, len, &off, &name) < 0) {
        c->ext_all = 1;
        return;
    }
    long qlen = pgw_cstring(body, len, &off, &query);
    if (qlen < 0) {
        c->ext_all = 1;
        return;
    }
    pgsql_info in;
    pgsql_analyze((const char *)query, (size_t)qlen, &in);
    merge(&c->ext, &c->ext_all, &in.writes, in.writes_all);
    if (in.session_change)
        c->nocache = 1;
}

static void on_startup(pgconn *c, const uint8_t *body, size_t len)
{
    uint32_t code = pgw_be32(body);
    if (code == PGW_CODE_SSL || code == PGW_CODE_GSSENC) {
        c->ss.want_byte = 1;
        return;
    }
    if (code == PGW_CODE_CANCEL) {
        stop_decoding(c, "cancel request");
        return;
    }
    if (code >> 16 != 3) {
        stop_decoding(c, "unsupported protocol version");
        return;
    }
    if ((c->ident = malloc(len)) == NULL) {
        stop_decoding(c, "out of memory");
        return;
    }
    /* The session's identity: every startup setting as sent, except the application's
     * name, which no cacheable query can read (current_setting and pg_* are not cached). */
    memcpy(c->ident, body, 4); /* the protocol version */
    size_t off = 4, o = 4;
    for (;;) {
        const uint8_t *k, *v;
        size_t at = off;
        long kl = pgw_cstring(body, len, &off, &k);
        long vl = kl > 0 ? pgw_cstring(body, len, &off, &v) : -1;
        if (vl < 0)
            break;
        if ((kl == 16 && memcmp(k, "application_name", 16) == 0) ||
            (kl == 25 && memcmp(k, "fallback_application_name", 25) == 0))
            continue;
        memcpy(c->ident + o, body + at, off - at);
        o += off - at;
    }
    c->ident_len = o;
    c->cs.untyped = 0;
}

static int client_want(void *arg, uint8_t type, size_t len)
{
    (void)arg;
    (void)len;
    return type == 0 || type == 'Q' || type == 'P';
}

static int client_msg(void *arg, const pgw_msg *m)
{
    pgconn *c = arg;
    pgcache *pc = c->pc;
    if (m->kind == PGW_UNTYPED) {
        if (m->body == NULL)
            c->off = 1;
        else
            on_startup(c, m->body, m->len);
        return c->off ? -1 : 0;
    }
    switch (m->type) {
    case 'Q':
        c->chunk_one = c->chunk_one && m->whole && m->start == 0 && m->end == c->chunk_len;
        on_query(pc, c, m->body, m->len);
        break;
    case 'P':
        on_parse(c, m->body, m->len);
        break;
    case 'E':
        c->executed = 1;
        break;
    case 'S':
        c->outstanding++;
        break;
    case 'F':
        c->outstanding++;
        c->dirty_all = 1; /* a function call may write anything */
        break;
    default:
        break;
    }
    return 0;
}

/* ---- server messages ---------------------------------------------------------------------- */

static int server_want(void *arg, uint8_t type, size_t len)
{
    (void)len;
    pgconn *c = arg;
    return type == 'Z' ||
           (c->cand.active && c->cand.ok && (type == 'T' || type == 'D' || type == 'C'));
}

static int server_msg(void *arg, const pgw_msg *m)
{
    pgconn *c = arg;
    pgcache *pc = c->pc;
    if (m->kind == PGW_BYTE) {
        if (m->type == 'S' || m->type == 'G')
            stop_decoding(c, "the server accepted encryption, the session is encrypted");
        return c->off ? -1 : 0;
    }
    candidate *cd = &c->cand;
    if (m->type != 'Z') {
        if (cd->active && cd->ok) {
            if (m->type == 'T' || m->type == 'D' || m->type == 'C') {
                cd->saw_t |= m->type == 'T';
                cd->saw_c |= m->type == 'C';
                cand_append(cd, m->type, m->body, m->len);
            } else {
                cd->ok = 0; /* an error, a notice, anything else: not stored */
            }
        }
        return 0;
    }
    if (m->body == NULL || m->len != 1) {
        stop_decoding(c, "malformed ReadyForQuery");
        return -1;
    }
    c->tx = m->body[0];
    if (c->outstanding > 0)
        c->outstanding--;
    if (c->tx == 'I')
        flush_writes(pc, c);
    if (cd->active) {
        cand_append(cd, 'Z', m->body, 1);
        if (cd->ok && cd->saw_t && cd->saw_c && c->tx == 'I')
            store(pc, c);
        cand_reset(cd);
    }
    return 0;
}

/* ---- hooks -------------------------------------------------------------------------------- */

static pgconn *conn_get(pgcache *pc, spoke_conn *conn, int create)
{
    void **slot = host->conn_data(conn, pc->ctx);
    if (slot == NULL)
        return NULL;
    pgconn *c = *slot;
    if (c == NULL && create) {
        if ((c = calloc(1, sizeof(*c))) == NULL) {
            host->log(pc->ctx, SPOKE_LOG_WARN, "conn %llu: out of memory; not caching it",
                      (unsigned long long)host->conn_id(conn));
            return NULL;
        }
        c->id = host->conn_id(conn);
        c->pc = pc;
        c->cs.untyped = 1;
        c->cs.max_body = MAX_QUERY;
        c->ss.max_body = SPOKE_KV_MAX_VALUE;
        *slot = c;
    }
    if (c != NULL)
        c->sc = conn;
    return c;
}

static spoke_verdict from_client(void *self, spoke_conn *conn, spoke_buf *buf)
{
    pgcache *pc = self;
    pgconn *c = conn_get(pc, conn, 1);
    if (c == NULL || c->off || buf->len == 0)
        return SPOKE_CONTINUE;
    c->chunk_one = pgw_at_boundary(&c->cs);
    c->chunk_len = buf->len;
    c->answered = 0;
    int rc = pgw_feed(&c->cs, buf->data, buf->len, client_want, client_msg, c);
    if (rc < 0)
        stop_decoding(c, "lost track of the client's protocol");
    /* Answered from the cache: the chunk was that one Query, the server never sees it. */
    return c->answered ? SPOKE_RESPOND : SPOKE_CONTINUE;
}

static spoke_verdict from_server(void *self, spoke_conn *conn, spoke_buf *buf)
{
    pgcache *pc = self;
    pgconn *c = conn_get(pc, conn, 0);
    if (c == NULL || c->off || buf->len == 0)
        return SPOKE_CONTINUE;
    int rc = pgw_feed(&c->ss, buf->data, buf->len, server_want, server_msg, c);
    if (rc < 0)
        stop_decoding(c, "lost track of the server's protocol");
    return SPOKE_CONTINUE;
}

static void on_close(void *self, spoke_conn *conn)
{
    pgcache *pc = self;
    void **slot = host->conn_data(conn, pc->ctx);
    if (slot == NULL || *slot == NULL)
        return;
    pgconn *c = *slot;
    /* Writes of a session that ended mid-way: invalidate them anyway (a commit may have
     * happened without our seeing its ReadyForQuery). */
    flush_writes(pc, c);
    cand_reset(&c->cand);
    pgw_release(&c->cs);
    pgw_release(&c->ss);
    free(c->ident);
    free(c);
    *slot = NULL;
}

/* ---- reports -------------------------------------------------------------------------------- */

static uint64_t epoch(pgcache *pc)
{
    const void *v;
    size_t vlen;
    uint64_t e = 0;
    if (host->kv_get(pc->ctx, "#epoch", 6, &v, &vlen) == 0 && vlen == sizeof(e)) {
        memcpy(&e, v, sizeof(e));
        return e;
    }
    e = now_ms();
    host->kv_put(pc->ctx, "#epoch", 6, &e, sizeof(e));
    return e;
}

static void report(pgcache *pc, int final)
{
    counts t;
    if (sum_counts(pc, &t) != 0) {
        host->log(pc->ctx, SPOKE_LOG_WARN, "no report: the KV store is unavailable");
        return;
    }
    char json[400];
    int n = snprintf(json, sizeof(json),
                     "{\"source\": \"pg-cache\", \"epoch\": %" PRIu64 ", \"hits\": %" PRId64
                     ", \"misses\": %" PRId64 ", \"invalidations\": %" PRId64
                     ", \"entries\": %" PRId64 ", \"bytes\": %" PRId64 "}",
                     epoch(pc), t.hits, t.misses, t.invalidations, t.entries > 0 ? t.entries : 0,
                     t.bytes > 0 ? t.bytes : 0);
    static const spoke_kv md[] = {{"metric_type", "cache_stats"}};
    int rc = host->send_to_control_json(pc->ctx, json, (size_t)n, NULL, md, 1, NULL);
    if (rc != 0)
        host->log(pc->ctx, SPOKE_LOG_WARN,
                  "report not queued (%s); the next one carries the "
                  "same totals",
                  host->strerror(rc));
    host->log(pc->ctx, final ? SPOKE_LOG_INFO : SPOKE_LOG_DEBUG,
              "edge totals: hits=%" PRId64 " misses=%" PRId64 " invalidations=%" PRId64
              " entries=%" PRId64 " bytes=%" PRId64,
              t.hits, t.misses, t.invalidations, t.entries, t.bytes);
}

static void on_timer(void *self, void *arg)
{
    (void)arg;
    pgcache *pc = self;
    if (pc == NULL)
        return;
    sweep(pc, pc->max_bytes);
    report(pc, 0);
}

/* ---- init ----------------------------------------------------------------------------------- */

static int duration(spoke_ctx *ctx, const char *key, uint64_t *ms)
{
    if (host->config_get_duration(ctx, key, ms) != 0 || *ms == 0 || *ms > MAX_DURATION_MS) {
        host->log(ctx, SPOKE_LOG_ERROR, "%s: '%s' is not a duration between 1ms and 24h", key,
                  host->config_get(ctx, key));
        return SPOKE_ERR_INVALID;
    }
    return 0;
}

static int init(spoke_ctx *ctx, const spoke_init_args *args, void **self)
{
    if (!SPOKE_HOST_HAS(host, kv_scan) || !SPOKE_HOST_HAS(host, send_to_control_json)) {
        host->log(ctx, SPOKE_LOG_ERROR,
                  "needs the edge role of a spoke ABI 1.2 host (KV "
                  "services and send_to_control_json)");
        return SPOKE_ERR_UNSUPPORTED;
    }
    if (args->plugin_id == 0) {
        host->log(ctx, SPOKE_LOG_ERROR,
                  "needs an `id:` (its KV namespace, and the ID of "
                  "cache-stats-aggregator at the hub)");
        return SPOKE_ERR_INVALID;
    }
    uint64_t ttl = DEFAULT_TTL_MS, report_ms = DEFAULT_REPORT_MS, max = DEFAULT_MAX_BYTES;
    int rc;
    if ((rc = duration(ctx, "ttl", &ttl)) != 0 ||
        (rc = duration(ctx, "report_interval", &report_ms)) != 0)
        return rc;
    if (host->config_get_size(ctx, "max_bytes", &max) != 0 || max < MIN_MAX_BYTES ||
        max > MAX_MAX_BYTES) {
        host->log(ctx, SPOKE_LOG_ERROR,
                  "max_bytes: '%s' is not a size between 64KiB and "
                  "1TiB",
                  host->config_get(ctx, "max_bytes"));
        return SPOKE_ERR_INVALID;
    }
    const char *inv = host->config_get(ctx, "invalidate");
    if (inv != NULL && strcmp(inv, "tables") != 0 && strcmp(inv, "all") != 0) {
        host->log(ctx, SPOKE_LOG_ERROR, "invalidate: '%s' is not 'tables' or 'all'", inv);
        return SPOKE_ERR_INVALID;
    }
    pgcache *pc = calloc(1, sizeof(*pc));
    if (pc == NULL)
        return SPOKE_ERR_NOMEM;
    pc->ctx = ctx;
    pc->ttl_ms = ttl;
    pc->report_ms = report_ms;
    pc->max_bytes = max;
    pc->all = inv != NULL && strcmp(inv, "all") == 0;
    uint32_t pid = (uint32_t)getpid();
    memcpy(pc->pid, &pid, 4);
    /* A pid seen before (a restarted worker may get one): continue its counts. */
    uint8_t key[5] = {'s'};
    memcpy(key + 1, pc->pid, 4);
    const void *v;
    size_t vlen;
    rc = host->kv_get(ctx, key, sizeof(key), &v, &vlen);
    if (rc == 0 && vlen == sizeof(pc->mine))
        memcpy(&pc->mine, v, sizeof(pc->mine));
    else if (rc != SPOKE_ERR_NOT_FOUND && rc != 0)
        host->log(ctx, SPOKE_LOG_WARN, "KV store: %s; caching nothing until it is back",
                  host->strerror(rc));
    epoch(pc);
    int64_t id = host->every(ctx, report_ms, on_timer, NULL);
    if (id < 0) {
        free(pc);
        return (int)id;
    }
    *self = pc;
    return 0;
}

static void fini(void *self)
{
    pgcache *pc = self;
    report(pc, 1);
    free(pc->scratch);
    free(pc);
}

static const spoke_plugin pg_cache = {
    SPOKE_PLUGIN_HEADER,
    .name = "pg-cache",
    .version = "1.0.0",
    .description = "caches PostgreSQL SELECT answers in the shared KV store; reports to control",
    .init = init,
    .fini = fini,
    .on_close = on_close,
    .on_traffic_from_client = from_client,
    .on_traffic_from_server = from_server,
};

SPOKE_PLUGIN_ENTRY(pg_cache, host)
