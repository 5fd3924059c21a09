/*
 * test_kv.c -- unit tests of core/kv.c on real LMDB files in a temporary directory:
 * get/put/del, prefix scans and resume, limits at their edges, namespaces, nested
 * transactions, group commit of several batches, dedupe marks and bounded expiry, map
 * full, two processes at once, and processes killed with SIGKILL inside a write
 * transaction.
 *
 * Forked children never assert (cmocka's state is the parent's): they report through
 * their exit status, 0 = fine, anything else names the step that failed.
 */
#include <errno.h>
#include <ftw.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include <lmdb.h>

#include "kv.h"

typedef struct fixture {
    char dir[256];
    spk_kv_opts opts;
    spk_kv *kv;
} fixture;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/spk-kv-XXXXXX", tmp != NULL ? tmp : "/tmp");
    assert_non_null(mkdtemp(f->dir));
    spk_kv_opts_init(&f->opts);
    f->opts.map_size = 64ull * 1024 * 1024;
    f->opts.sync = false; /* the tests' speed; durability is LMDB's, tested there */
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    spk_kv_close(f->kv);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void kv_open(fixture *f)
{
    spk_errbuf eb = {{0}};
    spk_kv_close(f->kv);
    f->kv = NULL;
    int rc = spk_kv_open(f->dir, &f->opts, &f->kv, &eb);
    if (rc != 0)
        fail_msg("spk_kv_open: %s: %s", spk_strerror(rc), eb.msg);
}

static spk_kv_txn *begin(fixture *f, spk_kv_txn *parent, bool write)
{
    spk_errbuf eb = {{0}};
    spk_kv_txn *t = NULL;
    int rc = spk_kv_begin(f->kv, parent, write, &t, &eb);
    if (rc != 0)
        fail_msg("spk_kv_begin: %s: %s", spk_strerror(rc), eb.msg);
    return t;
}

static void commit(spk_kv_txn *t)
{
    spk_errbuf eb = {{0}};
    int rc = spk_kv_commit(t, &eb);
    if (rc != 0)
        fail_msg("spk_kv_commit: %s: %s", spk_strerror(rc), eb.msg);
}

static void put_s(spk_kv_txn *t, uint32_t ns, const char *k, const char *v)
{
    spk_errbuf eb = {{0}};
    int rc = spk_kv_put(t, ns, k, strlen(k), v, strlen(v), &eb);
    if (rc != 0)
        fail_msg("spk_kv_put %s: %s: %s", k, spk_strerror(rc), eb.msg);
}

/* The value of k as a string in buf ("" if empty), or NULL when absent. */
static const char *get_s(spk_kv_txn *t, uint32_t ns, const char *k, char *buf, size_t cap)
{
    const void *v;
    size_t vl;
    int rc = spk_kv_get(t, ns, k, strlen(k), &v, &vl, NULL);
    if (rc == SPK_ENOENT)
        return NULL;
    assert_int_equal(rc, 0);
    assert_true(vl < cap);
    memcpy(buf, v, vl);
    buf[vl] = '\0';
    return buf;
}

static void assert_value(spk_kv_txn *t, uint32_t ns, const char *k, const char *want)
{
    char buf[256];
    const char *got = get_s(t, ns, k, buf, sizeof(buf));
    if (want == NULL && got != NULL)
        fail_msg("key %s: want absent, got \"%s\"", k, got);
    if (want != NULL && (got == NULL || strcmp(got, want) != 0))
        fail_msg("key %s: want \"%s\", got %s%s%s", k, want, got ? "\"" : "", got ? got : "absent",
                 got ? "\"" : "");
}

static spk_kv_stats stats(fixture *f)
{
    spk_kv_stats st;
    assert_int_equal(spk_kv_stat(f->kv, &st, NULL), 0);
    return st;
}

/* ---- get, put, del ------------------------------------------------------------------- */

static void test_put_get_del(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 1, "alpha", "one");
    assert_value(t, 1, "alpha", "one"); /* a transaction sees its own writes */
    put_s(t, 1, "alpha", "uno");        /* replaced */
    put_s(t, 1, "empty", "");
    assert_int_equal(spk_kv_put(t, 1, NULL, 0, "k0", 2, NULL), 0); /* the empty key */
    commit(t);

    t = begin(f, NULL, false);
    assert_value(t, 1, "alpha", "uno");
    assert_value(t, 1, "empty", "");
    const void *v;
    size_t vl;
    assert_int_equal(spk_kv_get(t, 1, NULL, 0, &v, &vl, NULL), 0);
    assert_memory_equal(v, "k0", 2);
    assert_int_equal(spk_kv_get(t, 1, "nope", 4, &v, &vl, NULL), SPK_ENOENT);
    assert_null(v);
    assert_int_equal(vl, 0);
    /* a read-only transaction refuses writes */
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_kv_put(t, 1, "x", 1, "y", 1, &eb), SPK_EINVAL);
    assert_non_null(strstr(eb.msg, "read-only"));
    assert_int_equal(spk_kv_del(t, 1, "alpha", 5, NULL), SPK_EINVAL);
    commit(t); /* ends a read-only one */

    t = begin(f, NULL, true);
    assert_int_equal(spk_kv_del(t, 1, "alpha", 5, NULL), 0);
    assert_int_equal(spk_kv_del(t, 1, "alpha", 5, &eb), SPK_ENOENT); /* absent: ENOENT */
    assert_non_null(strstr(eb.msg, "no such key"));
    put_s(t, 1, "after", "ok"); /* ENOENT left the transaction usable */
    commit(t);

    kv_open(f); /* reopen: committed state persists */
    t = begin(f, NULL, false);
    assert_value(t, 1, "alpha", NULL);
    assert_value(t, 1, "after", "ok");
    spk_kv_abort(t);
    assert_int_equal(stats(f).kv_entries, 3);
}

static void test_namespaces(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 0, "k", "ns0");
    put_s(t, 1, "k", "ns1");
    put_s(t, 0x100, "k", "ns256");
    put_s(t, UINT32_MAX, "k", "nsmax");
    commit(t);
    t = begin(f, NULL, true);
    assert_value(t, 0, "k", "ns0");
    assert_value(t, 1, "k", "ns1");
    assert_value(t, 0x100, "k", "ns256");
    assert_value(t, UINT32_MAX, "k", "nsmax");
    assert_value(t, 2, "k", NULL);
    assert_int_equal(spk_kv_del(t, 1, "k", 1, NULL), 0);
    assert_value(t, 0, "k", "ns0");
    assert_value(t, 0x100, "k", "ns256");
    commit(t);
}

/* ---- scans --------------------------------------------------------------------------- */

typedef struct scan_log {
    char keys[64][64];
    size_t n;
    int stop_at;   /* return 1 at this callback (1-based); 0: never */
    int fail_at;   /* return -12345 at this one */
    spk_kv_txn *t; /* try a put from the callback when set */
    int put_rc;
} scan_log;

static int record(void *arg, const void *k, size_t kl, const void *v, size_t vl)
{
    scan_log *l = arg;
    assert_true(kl < sizeof(l->keys[0]) && l->n < 64);
    memcpy(l->keys[l->n], k, kl);
    l->keys[l->n][kl] = '\0';
    l->n++;
    (void)v, (void)vl;
    if (l->t != NULL)
        l->put_rc = spk_kv_put(l->t, 5, "x", 1, "y", 1, NULL);
    if (l->fail_at != 0 && (int)l->n == l->fail_at)
        return -12345;
    return l->stop_at != 0 && (int)l->n == l->stop_at ? 1 : 0;
}

static size_t scan(spk_kv_txn *t, uint32_t ns, const char *prefix, const char *after, size_t max,
                   scan_log *l, bool *more)
{
    size_t visited = 99;
    l->n = 0;
    int rc = spk_kv_scan(t, ns, prefix, prefix ? strlen(prefix) : 0, after,
                         after ? strlen(after) : 0, max, record, l, &visited, more, NULL);
    assert_int_equal(rc, 0);
    assert_int_equal(visited, l->n);
    return visited;
}

static void test_scan_prefix_resume(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *t = begin(f, NULL, true);
    const char *keys[] = {"a", "ab", "abc", "abd", "b", "user"};
    for (size_t i = 0; i < 6; i++)
        put_s(t, 7, keys[i], "v");
    char k[32];
    for (int i = 24; i >= 0; i--) { /* inserted out of order: scans are in key order */
        snprintf(k, sizeof(k), "user:%02d", i);
        put_s(t, 7, k, k);
    }
    put_s(t, 6, "user:zz", "other namespace, before");
    put_s(t, 8, "user:00", "other namespace, after");
    commit(t);

    t = begin(f, NULL, false);
    scan_log l = {0};
    bool more;
    /* the whole namespace, in order */
    assert_int_equal(scan(t, 7, NULL, NULL, 0, &l, &more), 31);
    assert_false(more);
    assert_string_equal(l.keys[0], "a");
    assert_string_equal(l.keys[5], "user");
    assert_string_equal(l.keys[6], "user:00");
    assert_string_equal(l.keys[30], "user:24");

    /* "ab": itself and its extensions, not "a" nor "b" */
    assert_int_equal(scan(t, 7, "ab", NULL, 0, &l, &more), 3);
    assert_string_equal(l.keys[0], "ab");
    assert_string_equal(l.keys[2], "abd");

    /* pages of 10, each resumed after the last key seen */
    char last[64] = "";
    size_t total = 0;
    int pages = 0;
    do {
        scan(t, 7, "user:", pages == 0 ? NULL : last, 10, &l, &more);
        for (size_t i = 0; i < l.n; i++) {
            snprintf(k, sizeof(k), "user:%02zu", total + i);
            assert_string_equal(l.keys[i], k);
        }
        total += l.n;
        if (l.n > 0)
            snprintf(last, sizeof(last), "%s", l.keys[l.n - 1]);
        pages++;
    } while (more);
    assert_int_equal(total, 25);
    assert_int_equal(pages, 3); /* 10, 10, 5 */

    /* exactly max left: more is false */
    assert_int_equal(scan(t, 7, "user:", "user:14", 10, &l, &more), 10);
    assert_false(more);
    /* a resume key before the prefix starts at the prefix; one past it finds nothing */
    assert_int_equal(scan(t, 7, "user:", "a", 0, &l, &more), 25);
    assert_int_equal(scan(t, 7, "user:", "user:24", 0, &l, &more), 0);
    assert_int_equal(scan(t, 7, "user:", "zzz", 0, &l, &more), 0);
    /* a resume key that is not stored resumes at the next one */
    assert_int_equal(scan(t, 7, "user:", "user:05x", 0, &l, &more), 19);
    assert_string_equal(l.keys[0], "user:06");
    /* no match at all */
    assert_int_equal(scan(t, 7, "nothing", NULL, 0, &l, &more), 0);
    assert_int_equal(scan(t, 9, NULL, NULL, 0, &l, &more), 0);

    /* the callback stops the scan: more tells whether keys remain */
    l.stop_at = 3;
    assert_int_equal(scan(t, 7, "user:", NULL, 0, &l, &more), 3);
    assert_true(more);
    assert_int_equal(scan(t, 7, "user:", "user:21", 0, &l, &more), 3);
    assert_false(more);
    l.stop_at = 0;
    /* a negative answer is returned */
    l.fail_at = 2;
    l.n = 0;
    size_t visited;
    assert_int_equal(spk_kv_scan(t, 7, NULL, 0, NULL, 0, 0, record, &l, &visited, NULL, NULL),
                     -12345);
    assert_int_equal(visited, 2);
    l.fail_at = 0;
    spk_kv_abort(t);

    /* no writes from the callback into the scanned transaction */
    t = begin(f, NULL, true);
    l.t = t;
    assert_int_equal(scan(t, 7, "ab", NULL, 1, &l, &more), 1);
    assert_int_equal(l.put_rc, SPK_EINVAL);
    l.t = NULL;
    put_s(t, 7, "after-scan", "fine"); /* and writes work again after it */
    commit(t);
}

/* ---- limits -------------------------------------------------------------------------- */

static void test_limits(void **state)
{
    fixture *f = *state;
    kv_open(f);
    size_t big = SPK_KV_MAX_VALUE + 1;
    uint8_t *buf = malloc(big);
    assert_non_null(buf);
    memset(buf, 'k', big);
    spk_errbuf eb = {{0}};
    spk_kv_txn *t = begin(f, NULL, true);

    /* key: SPK_KV_MAX_KEY accepted, one more refused */
    assert_int_equal(SPK_KV_MAX_KEY, 507);
    assert_int_equal(spk_kv_put(t, 1, buf, SPK_KV_MAX_KEY, "v", 1, &eb), 0);
    assert_int_equal(spk_kv_put(t, 1, buf, SPK_KV_MAX_KEY + 1, "v", 1, &eb), SPK_EINVAL);
    assert_non_null(strstr(eb.msg, "key of 508 bytes is over the limit of 507"));
    const void *v;
    size_t vl;
    assert_int_equal(spk_kv_get(t, 1, buf, SPK_KV_MAX_KEY, &v, &vl, NULL), 0);
    assert_int_equal(spk_kv_get(t, 1, buf, SPK_KV_MAX_KEY + 1, &v, &vl, NULL), SPK_EINVAL);
    assert_int_equal(spk_kv_del(t, 1, buf, SPK_KV_MAX_KEY + 1, NULL), SPK_EINVAL);
    bool more;
    assert_int_equal(
        spk_kv_scan(t, 1, buf, SPK_KV_MAX_KEY + 1, NULL, 0, 0, record, NULL, NULL, &more, NULL),
        SPK_EINVAL);
    assert_int_equal(
        spk_kv_scan(t, 1, "a", 1, buf, SPK_KV_MAX_KEY + 1, 0, record, NULL, NULL, &more, NULL),
        SPK_EINVAL);

    /* value: SPK_KV_MAX_VALUE accepted, one more refused with its own code */
    assert_int_equal(spk_kv_put(t, 2, "big", 3, buf, SPK_KV_MAX_VALUE, &eb), 0);
    assert_int_equal(spk_kv_put(t, 2, "bigger", 6, buf, big, &eb), SPK_EPAYLOAD_TOO_LARGE);
    assert_non_null(strstr(eb.msg, "value of 1048577 bytes is over the limit of 1048576"));

    /* NULL with a length */
    assert_int_equal(spk_kv_put(t, 2, NULL, 3, "v", 1, NULL), SPK_EINVAL);
    assert_int_equal(spk_kv_put(t, 2, "k", 1, NULL, 3, NULL), SPK_EINVAL);

    /* edge IDs: SPK_KV_MAX_EDGE_ID bytes accepted, one more and empty refused */
    char edge[SPK_KV_MAX_EDGE_ID + 2];
    memset(edge, 'e', sizeof(edge));
    edge[SPK_KV_MAX_EDGE_ID] = '\0';
    bool dup;
    assert_int_equal(spk_kv_dedupe_mark(t, edge, 1, 1000, &dup, &eb), 0);
    assert_false(dup);
    edge[SPK_KV_MAX_EDGE_ID] = 'e';
    edge[SPK_KV_MAX_EDGE_ID + 1] = '\0';
    assert_int_equal(spk_kv_dedupe_mark(t, edge, 1, 1000, &dup, &eb), SPK_EINVAL);
    assert_int_equal(spk_kv_dedupe_mark(t, "", 1, 1000, &dup, NULL), SPK_EINVAL);
    assert_int_equal(spk_kv_dedupe_mark(t, NULL, 1, 1000, &dup, NULL), SPK_EINVAL);
    assert_int_equal(spk_kv_dedupe_mark(t, "e", 1, -1, &dup, NULL), SPK_EINVAL);
    /* refused arguments leave the transaction usable */
    commit(t);

    t = begin(f, NULL, false);
    assert_int_equal(spk_kv_get(t, 2, "big", 3, &v, &vl, NULL), 0);
    assert_int_equal(vl, SPK_KV_MAX_VALUE);
    assert_memory_equal(v, buf, vl);
    assert_int_equal(spk_kv_get(t, 2, "bigger", 6, &v, &vl, NULL), SPK_ENOENT);
    spk_kv_abort(t);
    free(buf);
}

/* ---- nested transactions ------------------------------------------------------------- */

static void test_nested(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 1, "parent", "p1");
    put_s(t, 1, "shared", "before");

    spk_kv_txn *c = begin(f, t, true);
    put_s(c, 1, "child", "c1");
    put_s(c, 1, "shared", "changed by child");
    assert_int_equal(spk_kv_del(c, 1, "parent", 6, NULL), 0);
    assert_value(c, 1, "parent", NULL);
    /* the parent is not usable while its child is open */
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_kv_put(t, 1, "x", 1, "y", 1, &eb), SPK_EINVAL);
    assert_non_null(strstr(eb.msg, "nested"));
    spk_kv_txn *c2 = NULL;
    assert_int_equal(spk_kv_begin(f->kv, t, true, &c2, NULL), SPK_EINVAL);
    assert_null(c2);
    spk_kv_abort(c); /* the child's changes are gone, the parent's stay */
    assert_value(t, 1, "child", NULL);
    assert_value(t, 1, "parent", "p1");
    assert_value(t, 1, "shared", "before");

    c = begin(f, t, true); /* a committed child's changes become the parent's */
    put_s(c, 1, "child2", "c2");
    spk_kv_txn *g = begin(f, c, true); /* a grandchild, aborted */
    put_s(g, 1, "grandchild", "g");
    spk_kv_abort(g);
    g = begin(f, c, true); /* and one committed */
    put_s(g, 1, "grandchild2", "g2");
    commit(g);
    commit(c);
    assert_value(t, 1, "child2", "c2");
    assert_value(t, 1, "grandchild", NULL);
    assert_value(t, 1, "grandchild2", "g2");

    /* only write transactions nest; a read-only child is refused */
    assert_int_equal(spk_kv_begin(f->kv, t, false, &c2, NULL), SPK_EINVAL);
    commit(t);

    t = begin(f, NULL, false);
    assert_value(t, 1, "parent", "p1");
    assert_value(t, 1, "shared", "before");
    assert_value(t, 1, "child", NULL);
    assert_value(t, 1, "child2", "c2");
    assert_value(t, 1, "grandchild2", "g2");
    assert_int_equal(spk_kv_begin(f->kv, t, true, &c2, NULL), SPK_EINVAL); /* read parent */
    spk_kv_abort(t);

    /* aborting a parent aborts its open child; committing one with an open child is
     * refused and aborts both */
    t = begin(f, NULL, true);
    put_s(t, 1, "gone", "1");
    c = begin(f, t, true);
    put_s(c, 1, "gone2", "1");
    spk_kv_abort(t);
    t = begin(f, NULL, true);
    c = begin(f, t, true);
    put_s(c, 1, "gone3", "1");
    assert_int_equal(spk_kv_commit(t, NULL), SPK_EINVAL);
    t = begin(f, NULL, false);
    assert_value(t, 1, "gone", NULL);
    assert_value(t, 1, "gone2", NULL);
    assert_value(t, 1, "gone3", NULL);
    spk_kv_abort(t);

    /* one write transaction per handle: a second top-level one is refused, not a
     * deadlock; read-only ones may be open beside it */
    t = begin(f, NULL, true);
    assert_int_equal(spk_kv_begin(f->kv, NULL, true, &c2, &eb), SPK_EBUSY);
    spk_kv_txn *r = begin(f, NULL, false);
    spk_kv_txn *r2 = begin(f, NULL, false);
    put_s(t, 1, "late", "1");
    assert_value(r, 1, "late", NULL); /* readers see the last commit only */
    commit(t);
    assert_value(r, 1, "late", NULL); /* a snapshot */
    spk_kv_abort(r);
    spk_kv_abort(r2);
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 1, NULL, NULL), 0);
}

/* ---- group commit -------------------------------------------------------------------- */

/* A control plugin's accept_edge_payload, as hubd would run it: count the payload in KV
 * (read-modify-write of a per-edge counter) and remember its sequence number. Fails (its
 * writes then rolled back) when `fail` is set, after having written. */
static int deliver(spk_kv_txn *parent, spk_kv *kv, const char *edge, uint64_t seq, bool fail)
{
    spk_kv_txn *c;
    int rc = spk_kv_begin(kv, parent, true, &c, NULL);
    if (rc != 0)
        return rc;
    char key[64];
    snprintf(key, sizeof(key), "count:%s", edge);
    const void *v;
    size_t vl;
    uint64_t n = 0;
    rc = spk_kv_get(c, 42, key, strlen(key), &v, &vl, NULL);
    if (rc == 0 && vl == sizeof(n))
        memcpy(&n, v, sizeof(n));
    n++;
    rc = spk_kv_put(c, 42, key, strlen(key), &n, sizeof(n), NULL);
    char sk[64];
    snprintf(sk, sizeof(sk), "seen:%s:%llu", edge, (unsigned long long)seq);
    if (rc == 0)
        rc = spk_kv_put(c, 42, sk, strlen(sk), "1", 1, NULL);
    if (rc != 0 || fail) {
        spk_kv_abort(c);
        return rc != 0 ? rc : 1;
    }
    return spk_kv_commit(c, NULL);
}

/* One group commit: `nb` batches of edges edge-<b> with sequence numbers first..first+per-1,
 * the payload (b, fail_seq) failing; returns how many were duplicates. Never asserts (a
 * forked child runs it); < 0 on an error. With kill_before_commit the process SIGKILLs
 * itself where it would commit. */
static int group_commit(spk_kv *kv, int nb, uint64_t first, int per, int fail_b, uint64_t fail_seq,
                        int64_t now, bool kill_before_commit)
{
    spk_kv_txn *t;
    int rc = spk_kv_begin(kv, NULL, true, &t, NULL);
    if (rc != 0)
        return rc;
    int dups = 0;
    for (int b = 0; b < nb; b++) {
        char edge[32];
        snprintf(edge, sizeof(edge), "edge-%d", b);
        for (uint64_t s = first; s < first + (uint64_t)per; s++) {
            bool dup;
            if ((rc = spk_kv_dedupe_mark(t, edge, s, now, &dup, NULL)) != 0)
                goto fail;
            if (dup) {
                dups++;
                continue;
            }
            rc = deliver(t, kv, edge, s, b == fail_b && s == fail_seq);
            if (rc < 0)
                goto fail;
        }
    }
    if (kill_before_commit)
        raise(SIGKILL);
    rc = spk_kv_commit(t, NULL);
    return rc != 0 ? rc : dups;
fail:
    spk_kv_abort(t);
    return rc;
}

static uint64_t counter(fixture *f, const char *edge)
{
    spk_kv_txn *t = begin(f, NULL, false);
    char key[64];
    snprintf(key, sizeof(key), "count:%s", edge);
    const void *v;
    size_t vl;
    uint64_t n = 0;
    if (spk_kv_get(t, 42, key, strlen(key), &v, &vl, NULL) == 0) {
        assert_int_equal(vl, sizeof(n));
        memcpy(&n, v, sizeof(n));
    }
    spk_kv_abort(t);
    return n;
}

static bool marked(fixture *f, const char *edge, uint64_t seq, int64_t *when)
{
    spk_kv_txn *t = begin(f, NULL, false);
    int rc = spk_kv_dedupe_marked(t, edge, seq, when, NULL);
    spk_kv_abort(t);
    assert_true(rc == 0 || rc == SPK_ENOENT);
    return rc == 0;
}

static void test_group_commit(void **state)
{
    fixture *f = *state;
    f->opts.sync = true; /* as hubd opens it */
    kv_open(f);
    uint64_t txn0 = stats(f).last_txn_id;
    /* 3 batches of 5 payloads; edge-1's seq 12 fails in its plugin */
    assert_int_equal(group_commit(f->kv, 3, 10, 5, 1, 12, 5000, false), 0);
    assert_int_equal(stats(f).last_txn_id, txn0 + 1); /* ONE commit for all of them */
    assert_int_equal(counter(f, "edge-0"), 5);
    assert_int_equal(counter(f, "edge-1"), 4); /* the failed delivery's writes undone */
    assert_int_equal(counter(f, "edge-2"), 5);
    spk_kv_txn *t = begin(f, NULL, false);
    assert_value(t, 42, "seen:edge-1:11", "1");
    assert_value(t, 42, "seen:edge-1:12", NULL);
    assert_value(t, 42, "seen:edge-1:13", "1");
    spk_kv_abort(t);
    for (int b = 0; b < 3; b++) {
        char edge[32];
        snprintf(edge, sizeof(edge), "edge-%d", b);
        for (uint64_t s = 10; s < 15; s++) {
            int64_t when = 0;
            assert_true(marked(f, edge, s, &when)); /* marked, also the failed one: */
            assert_int_equal(when, 5000);           /* "handled with an error" is final */
        }
        assert_false(marked(f, edge, 9, NULL));
        assert_false(marked(f, edge, 15, NULL));
    }
    /* the batches resent (the edge did not get the answer): all duplicates, no change */
    assert_int_equal(group_commit(f->kv, 3, 10, 5, -1, 0, 6000, false), 15);
    assert_int_equal(counter(f, "edge-0"), 5);
    assert_int_equal(counter(f, "edge-1"), 4);
    /* resent with newer ones: only those are delivered */
    assert_int_equal(group_commit(f->kv, 3, 12, 5, -1, 0, 6000, false), 9);
    assert_int_equal(counter(f, "edge-0"), 7);
    assert_int_equal(counter(f, "edge-1"), 6);
    int64_t when = 0;
    assert_true(marked(f, "edge-0", 12, &when));
    assert_int_equal(when, 5000); /* a duplicate keeps the first mark's time */
    assert_int_equal(stats(f).dedupe_marks, 21);
    assert_int_equal(stats(f).dedupe_edges, 3);
}

/* ---- dedupe -------------------------------------------------------------------------- */

static void test_dedupe_mark_expire(void **state)
{
    fixture *f = *state;
    f->opts.expire_per_txn = 7;
    kv_open(f);
    /* 50 marks at times 1000..1049 over three edges, sequence numbers out of time order
     * (a late payload marked after newer ones of its edge) */
    spk_kv_txn *t = begin(f, NULL, true);
    for (int i = 0; i < 50; i++) {
        char edge[16];
        snprintf(edge, sizeof(edge), "e%d", i % 3);
        uint64_t seq = (uint64_t)(1000 - i);
        bool dup = true;
        assert_int_equal(spk_kv_dedupe_mark(t, edge, seq, 1000 + i, &dup, NULL), 0);
        assert_false(dup);
        assert_int_equal(spk_kv_dedupe_mark(t, edge, seq, 2000, &dup, NULL), 0);
        assert_true(dup); /* in the same transaction too */
    }
    /* a mark in an aborted nested transaction is forgotten */
    spk_kv_txn *c = begin(f, t, true);
    bool dup;
    assert_int_equal(spk_kv_dedupe_mark(c, "e9", 1, 1000, &dup, NULL), 0);
    spk_kv_abort(c);
    assert_int_equal(spk_kv_dedupe_marked(t, "e9", 1, NULL, NULL), SPK_ENOENT);
    commit(t);
    assert_false(marked(f, "e9", 1, NULL));
    assert_int_equal(stats(f).dedupe_marks, 50);

    /* nothing is older than the oldest: no transaction at all */
    uint64_t txn0 = stats(f).last_txn_id, removed = 99;
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 1000, &removed, NULL), 0);
    assert_int_equal(removed, 0);
    assert_int_equal(stats(f).last_txn_id, txn0);

    /* 30 marks are older than 1030: in transactions of at most 7 (7+7+7+7+2) */
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 1030, &removed, NULL), 0);
    assert_int_equal(removed, 30);
    assert_int_equal(stats(f).last_txn_id, txn0 + 5);
    assert_int_equal(stats(f).dedupe_marks, 20);
    for (int i = 0; i < 50; i++) {
        char edge[16];
        snprintf(edge, sizeof(edge), "e%d", i % 3);
        int64_t when = -1;
        bool m = marked(f, edge, (uint64_t)(1000 - i), &when);
        if (i < 30) {
            assert_false(m);
        } else {
            assert_true(m); /* younger than the cutoff (1030 itself included): kept */
            assert_int_equal(when, 1000 + i);
        }
    }
    /* an expired mark is forgotten: the same (edge, seq) is new again */
    t = begin(f, NULL, true);
    assert_int_equal(spk_kv_dedupe_mark(t, "e0", 1000, 3000, &dup, NULL), 0);
    assert_false(dup);
    assert_int_equal(spk_kv_dedupe_mark(t, "e1", 1000 - 31, 3000, &dup, NULL), 0);
    assert_true(dup);
    commit(t);

    /* exactly 14 left before 1044 + the new one at 3000: 7 + 7, then one empty look */
    txn0 = stats(f).last_txn_id;
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 1044, &removed, NULL), 0);
    assert_int_equal(removed, 14);
    assert_int_equal(stats(f).last_txn_id, txn0 + 2);
    /* everything */
    assert_int_equal(spk_kv_dedupe_expire(f->kv, INT64_MAX, &removed, NULL), 0);
    assert_int_equal(removed, 7);
    assert_int_equal(stats(f).dedupe_marks, 0);
    assert_int_equal(stats(f).dedupe_edges, 3); /* edge numbers stay */

    /* expiry begins its own transactions: not while this handle writes */
    t = begin(f, NULL, true);
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 5000, &removed, NULL), SPK_EBUSY);
    spk_kv_abort(t);

    /* a large expiry: 5000 marks, default batch size */
    f->opts.expire_per_txn = 0; /* = SPK_KV_EXPIRE_PER_TXN */
    kv_open(f);
    t = begin(f, NULL, true);
    for (uint64_t s = 0; s < 5000; s++)
        assert_int_equal(spk_kv_dedupe_mark(t, "big", s, 100000 + (int64_t)s, &dup, NULL), 0);
    commit(t);
    txn0 = stats(f).last_txn_id;
    assert_int_equal(spk_kv_dedupe_expire(f->kv, 100000 + 4500, &removed, NULL), 0);
    assert_int_equal(removed, 4500);
    assert_int_equal(stats(f).last_txn_id, txn0 + 5);
    assert_false(marked(f, "big", 4499, NULL));
    assert_true(marked(f, "big", 4500, NULL));
}

/* ---- map full ------------------------------------------------------------------------ */

static void test_map_full(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 1024 * 1024;
    kv_open(f);
    static uint8_t val[64 * 1024];
    memset(val, 'v', sizeof(val));
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 1, "kept", "committed before");
    commit(t);

    /* fill the map in one transaction: a clean error, then the transaction is void */
    spk_errbuf eb = {{0}};
    t = begin(f, NULL, true);
    int rc = 0, i;
    char k[32];
    for (i = 0; i < 100 && rc == 0; i++) {
        snprintf(k, sizeof(k), "fill-%d", i);
        rc = spk_kv_put(t, 1, k, strlen(k), val, sizeof(val), &eb);
    }
    assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
    assert_true(i > 3);
    assert_non_null(strstr(eb.msg, "map is full"));
    assert_int_equal(spk_kv_put(t, 1, "small", 5, "x", 1, NULL), SPK_EQUEUE_UNAVAILABLE);
    const void *v;
    size_t vl;
    assert_int_equal(spk_kv_get(t, 1, "kept", 4, &v, &vl, NULL), SPK_EQUEUE_UNAVAILABLE);
    bool dup;
    assert_int_equal(spk_kv_dedupe_mark(t, "e", 1, 1, &dup, NULL), SPK_EQUEUE_UNAVAILABLE);
    assert_int_equal(spk_kv_commit(t, &eb), SPK_EQUEUE_UNAVAILABLE); /* aborted */
    assert_non_null(strstr(eb.msg, "aborted"));

    /* the store is intact and usable */
    t = begin(f, NULL, true);
    assert_value(t, 1, "kept", "committed before");
    assert_value(t, 1, "fill-0", NULL);
    put_s(t, 1, "after", "ok");
    commit(t);

    /* a nested transaction that fills the map is void, its parent is not: hubd drops
     * only that payload's writes */
    t = begin(f, NULL, true);
    put_s(t, 1, "parent", "p");
    spk_kv_txn *c = begin(f, t, true);
    rc = 0;
    for (i = 0; i < 100 && rc == 0; i++) {
        snprintf(k, sizeof(k), "fill-%d", i);
        rc = spk_kv_put(c, 1, k, strlen(k), val, sizeof(val), NULL);
    }
    assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
    assert_int_equal(spk_kv_commit(c, NULL), SPK_EQUEUE_UNAVAILABLE);
    assert_value(t, 1, "parent", "p");
    assert_value(t, 1, "fill-0", NULL);
    assert_int_equal(spk_kv_dedupe_mark(t, "e", 1, 1, &dup, NULL), 0);
    commit(t);
    t = begin(f, NULL, false);
    assert_value(t, 1, "parent", "p");
    assert_value(t, 1, "after", "ok");
    assert_int_equal(spk_kv_dedupe_marked(t, "e", 1, NULL, NULL), 0);
    spk_kv_abort(t);
}

/* ---- processes ------------------------------------------------------------------------ */

#define PROC_TXNS 200

static int count_cb(void *arg, const void *k, size_t kl, const void *v, size_t vl)
{
    (void)k, (void)kl, (void)v, (void)vl;
    ++*(size_t *)arg;
    return 0;
}

/* A child: PROC_TXNS write transactions, each adding one to a shared counter and storing
 * its own key, with reads of the other writer's progress between them. */
static int proc_writer(const char *dir, const spk_kv_opts *o, int id)
{
    spk_kv *kv;
    if (spk_kv_open(dir, o, &kv, NULL) != 0)
        return 10;
    uint64_t last = 0;
    for (int i = 0; i < PROC_TXNS; i++) {
        spk_kv_txn *t;
        if (spk_kv_begin(kv, NULL, true, &t, NULL) != 0)
            return 11;
        const void *v;
        size_t vl;
        uint64_t n = 0;
        int rc = spk_kv_get(t, 3, "counter", 7, &v, &vl, NULL);
        if (rc == 0 && vl == sizeof(n))
            memcpy(&n, v, sizeof(n));
        else if (rc != SPK_ENOENT)
            return 12;
        if (n < last)
            return 13; /* went backwards */
        n++;
        char k[32];
        snprintf(k, sizeof(k), "w%d:%03d", id, i);
        if (spk_kv_put(t, 3, "counter", 7, &n, sizeof(n), NULL) != 0 ||
            spk_kv_put(t, 3, k, strlen(k), &n, sizeof(n), NULL) != 0)
            return 14;
        bool dup;
        if (spk_kv_dedupe_mark(t, id ? "edge-b" : "edge-a", (uint64_t)i, 1000 + i, &dup, NULL) !=
                0 ||
            dup)
            return 15;
        if (spk_kv_commit(t, NULL) != 0)
            return 16;
        last = n;
        if (spk_kv_begin(kv, NULL, false, &t, NULL) != 0)
            return 17;
        size_t seen = 0;
        char other[8];
        snprintf(other, sizeof(other), "w%d:", !id);
        if (spk_kv_scan(t, 3, other, 3, NULL, 0, 0, count_cb, &seen, NULL, NULL, NULL)) {
            spk_kv_abort(t);
            return 18;
        }
        spk_kv_abort(t);
    }
    spk_kv_close(kv);
    return 0;
}

static int wait_child(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        assert_int_equal(errno, EINTR);
    return st;
}

static void test_two_processes(void **state)
{
    fixture *f = *state;
    kv_open(f); /* the parent's handle is open across the fork: the children open their own */
    pid_t pids[2];
    for (int id = 0; id < 2; id++) {
        pids[id] = fork();
        assert_true(pids[id] >= 0);
        if (pids[id] == 0)
            _exit(proc_writer(f->dir, &f->opts, id));
    }
    for (int id = 0; id < 2; id++) {
        int st = wait_child(pids[id]);
        assert_true(WIFEXITED(st));
        if (WEXITSTATUS(st) != 0)
            fail_msg("writer %d failed at step %d", id, WEXITSTATUS(st));
    }
    /* every transaction of both happened once, serialised */
    spk_kv_txn *t = begin(f, NULL, false);
    const void *v;
    size_t vl;
    uint64_t n;
    assert_int_equal(spk_kv_get(t, 3, "counter", 7, &v, &vl, NULL), 0);
    memcpy(&n, v, sizeof(n));
    assert_int_equal(n, 2 * PROC_TXNS);
    size_t seen = 0, visited;
    assert_int_equal(spk_kv_scan(t, 3, "w", 1, NULL, 0, 0, count_cb, &seen, &visited, NULL, NULL),
                     0);
    assert_int_equal(seen, 2 * PROC_TXNS);
    spk_kv_abort(t);
    assert_int_equal(stats(f).dedupe_marks, 2 * PROC_TXNS);
    /* the inherited handle in a child: refused, and closing it there harms nothing */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        spk_kv_txn *ct;
        int rc = spk_kv_begin(f->kv, NULL, false, &ct, NULL);
        spk_kv_close(f->kv);
        _exit(rc == SPK_EINVAL ? 0 : 1);
    }
    int st = wait_child(pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    t = begin(f, NULL, true);
    put_s(t, 3, "parent-after", "ok");
    commit(t);
}

enum kill_how { KILL_SELF, KILL_BY_PARENT, KILL_READER };

/* A child that writes (or reads) in a transaction and dies in the middle of it. */
static void doomed_child(const char *dir, const spk_kv_opts *o, enum kill_how how, int fd)
{
    spk_kv *kv;
    spk_kv_txn *t;
    if (spk_kv_open(dir, o, &kv, NULL) != 0 ||
        spk_kv_begin(kv, NULL, how != KILL_READER, &t, NULL) != 0)
        _exit(10);
    if (how != KILL_READER) {
        static uint8_t val[8192];
        memset(val, 'd', sizeof(val));
        for (int i = 0; i < 300; i++) { /* enough to have written pages to the file */
            char k[32];
            snprintf(k, sizeof(k), "doomed-%03d", i);
            bool dup;
            if (spk_kv_put(t, 1, k, strlen(k), val, sizeof(val), NULL) != 0 ||
                spk_kv_put(t, 1, "kept", 4, "overwritten", 11, NULL) != 0 ||
                spk_kv_dedupe_mark(t, "edge-doomed", (uint64_t)i, 1000, &dup, NULL) != 0)
                _exit(11);
        }
    }
    if (how == KILL_SELF)
        raise(SIGKILL);
    char c = 'r';
    if (write(fd, &c, 1) != 1)
        _exit(12);
    pause(); /* the parent kills us here */
    _exit(13);
}

static void kill9(fixture *f, enum kill_how how)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        doomed_child(f->dir, &f->opts, how, p[1]);
    }
    close(p[1]);
    if (how != KILL_SELF) {
        char c;
        assert_int_equal(read(p[0], &c, 1), 1); /* it holds its transaction now */
        assert_int_equal(kill(pid, SIGKILL), 0);
    }
    close(p[0]);
    int st = wait_child(pid);
    assert_true(WIFSIGNALED(st));
    assert_int_equal(WTERMSIG(st), SIGKILL);
}

static void check_after_kill(fixture *f, int round)
{
    /* the next writer gets the dead writer's lock; none of its changes are there */
    spk_kv_txn *t = begin(f, NULL, true);
    assert_value(t, 1, "kept", "committed");
    assert_value(t, 1, "doomed-000", NULL);
    assert_value(t, 1, "doomed-299", NULL);
    assert_int_equal(spk_kv_dedupe_marked(t, "edge-doomed", 0, NULL, NULL), SPK_ENOENT);
    char k[32];
    snprintf(k, sizeof(k), "round-%d", round);
    put_s(t, 1, k, "ok");
    commit(t);
    t = begin(f, NULL, false);
    assert_value(t, 1, k, "ok");
    spk_kv_abort(t);
}

static void test_kill9_mid_txn(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 1, "kept", "committed");
    commit(t);
    uint64_t entries = stats(f).kv_entries;

    kill9(f, KILL_SELF); /* SIGKILLs itself after its puts, before its commit */
    check_after_kill(f, 0);
    kill9(f, KILL_BY_PARENT); /* killed by us while it holds the write lock */
    check_after_kill(f, 1);
    kill9(f, KILL_READER); /* dies with a read transaction open: a stale reader slot */
    check_after_kill(f, 2);
    assert_int_equal(stats(f).dead_readers, 0);
    assert_int_equal(spk_kv_sync(f->kv, NULL), 0); /* clears it */
    assert_int_equal(stats(f).dead_readers, 1);
    for (int i = 3; i < 6; i++) {
        kill9(f, i % 2 ? KILL_SELF : KILL_BY_PARENT);
        check_after_kill(f, i);
    }
    assert_int_equal(stats(f).kv_entries, entries + 6);
    assert_int_equal(stats(f).dedupe_marks, 0);

    /* reopening (clearing the dead reader's slot) finds the same store */
    kv_open(f);
    t = begin(f, NULL, false);
    assert_value(t, 1, "kept", "committed");
    assert_value(t, 1, "round-5", "ok");
    spk_kv_abort(t);
    assert_int_equal(stats(f).kv_entries, entries + 6);
}

/* A writer for test_kill9_random: forever, group commits of 5 payloads of its edge, each
 * marked and (if new) delivered in a nested transaction that adds one to "total" and
 * stores item:<edge>:<seq>; every third commit also resends its last 3 payloads. So at
 * every commit total == items == marks, whoever dies when. */
static void random_writer(const char *dir, const spk_kv_opts *o, int id)
{
    spk_kv *kv;
    if (spk_kv_open(dir, o, &kv, NULL) != 0)
        _exit(10);
    char edge[16], nk[16];
    snprintf(edge, sizeof(edge), "edge-%d", id);
    snprintf(nk, sizeof(nk), "next:%d", id);
    for (unsigned round = 0;; round++) {
        spk_kv_txn *t, *c;
        const void *v;
        size_t vl;
        uint64_t next = 0;
        if (spk_kv_begin(kv, NULL, true, &t, NULL) != 0)
            _exit(11);
        if (spk_kv_get(t, 9, nk, strlen(nk), &v, &vl, NULL) == 0)
            memcpy(&next, v, sizeof(next));
        uint64_t first = round % 3 == 2 && next >= 3 ? next - 3 : next;
        for (uint64_t s = first; s < first + 5; s++) {
            bool dup;
            if (spk_kv_dedupe_mark(t, edge, s, 1000 + (int64_t)round, &dup, NULL) != 0)
                _exit(12);
            if (dup)
                continue;
            if (spk_kv_begin(kv, t, true, &c, NULL) != 0)
                _exit(13);
            uint64_t total = 0;
            if (spk_kv_get(c, 9, "total", 5, &v, &vl, NULL) == 0)
                memcpy(&total, v, sizeof(total));
            total++;
            char ik[48];
            snprintf(ik, sizeof(ik), "item:%s:%08llu", edge, (unsigned long long)s);
            if (spk_kv_put(c, 9, "total", 5, &total, sizeof(total), NULL) != 0 ||
                spk_kv_put(c, 9, ik, strlen(ik), "x", 1, NULL) != 0 || spk_kv_commit(c, NULL))
                _exit(14);
        }
        next = first + 5;
        if (spk_kv_put(t, 9, nk, strlen(nk), &next, sizeof(next), NULL) != 0 ||
            spk_kv_commit(t, NULL) != 0)
            _exit(15);
    }
}

/* Writers killed at random moments (in a transaction, in a nested one, in a commit and
 * its flush): after each round the store is consistent and its invariant holds. */
static void test_kill9_random(void **state)
{
    fixture *f = *state;
    kv_open(f);
    srand(12345);
    uint64_t last_total = 0;
    for (int round = 0; round < 16; round++) {
        f->opts.sync = round % 2 == 1; /* with and without the flush at commit */
        pid_t pids[2];
        for (int id = 0; id < 2; id++) {
            pids[id] = fork();
            assert_true(pids[id] >= 0);
            if (pids[id] == 0)
                random_writer(f->dir, &f->opts, id);
        }
        usleep(5000 + (useconds_t)(rand() % 45000));
        for (int id = 0; id < 2; id++)
            assert_int_equal(kill(pids[id], SIGKILL), 0);
        for (int id = 0; id < 2; id++) {
            int st = wait_child(pids[id]);
            if (!WIFSIGNALED(st))
                fail_msg("round %d: writer %d exited with %d", round, id, WEXITSTATUS(st));
        }
        /* a write transaction first: the dead writer's lock must be recovered */
        spk_kv_txn *t = begin(f, NULL, true);
        const void *v;
        size_t vl;
        uint64_t total = 0;
        if (spk_kv_get(t, 9, "total", 5, &v, &vl, NULL) == 0)
            memcpy(&total, v, sizeof(total));
        size_t items = 0;
        assert_int_equal(
            spk_kv_scan(t, 9, "item:", 5, NULL, 0, 0, count_cb, &items, NULL, NULL, NULL), 0);
        commit(t);
        assert_int_equal(items, total);
        assert_int_equal(stats(f).dedupe_marks, total);
        assert_true(total >= last_total);
        last_total = total;
    }
    assert_true(last_total > 0); /* they got somewhere */
}

/* Exactly once across a hub crash: a group commit killed before its commit leaves neither
 * marks nor KV writes; the resend is delivered once. */
static void test_kill9_group_commit(void **state)
{
    fixture *f = *state;
    f->opts.sync = true;
    kv_open(f);
    assert_int_equal(group_commit(f->kv, 2, 1, 10, -1, 0, 1000, false), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        spk_kv *kv;
        if (spk_kv_open(f->dir, &f->opts, &kv, NULL) != 0)
            _exit(10);
        group_commit(kv, 2, 5, 10, -1, 0, 2000, true); /* 5..14: 11..14 new per edge */
        _exit(11);
    }
    int st = wait_child(pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    assert_int_equal(counter(f, "edge-0"), 10);
    assert_false(marked(f, "edge-0", 11, NULL));
    /* the edge resends: new ones delivered once, old ones duplicates */
    assert_int_equal(group_commit(f->kv, 2, 5, 10, -1, 0, 3000, false), 12);
    assert_int_equal(counter(f, "edge-0"), 14);
    assert_int_equal(counter(f, "edge-1"), 14);
    int64_t when = 0;
    assert_true(marked(f, "edge-1", 14, &when));
    assert_int_equal(when, 3000); /* marked by the resend, not by the dead process */
    assert_int_equal(group_commit(f->kv, 2, 5, 10, -1, 0, 4000, false), 20);
    assert_int_equal(counter(f, "edge-1"), 14);
}

/* hubd's case: dedupe marks fill the map; expiry still frees room, and marking works
 * again after it. */
static void test_map_full_by_marks(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 256 * 1024;
    kv_open(f);
    int rc = 0, marks = 0;
    spk_errbuf eb = {{0}};
    while (rc == 0) { /* group commits of 10 marks and a small KV write */
        spk_kv_txn *t = begin(f, NULL, true);
        char k[32];
        snprintf(k, sizeof(k), "stat-%06d", marks);
        rc = spk_kv_put(t, 1, k, strlen(k), "counted", 7, &eb);
        for (int j = 0; j < 10 && rc == 0; j++) {
            bool dup;
            rc = spk_kv_dedupe_mark(t, "edge-full", (uint64_t)(marks + j), marks + j, &dup, &eb);
        }
        if (rc == 0)
            rc = spk_kv_commit(t, &eb);
        else
            spk_kv_abort(t);
        if (rc == 0)
            marks += 10;
    }
    assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
    assert_non_null(strstr(eb.msg, "map is full"));
    assert_true(marks > 500);
    uint64_t removed = 0;
    rc = spk_kv_dedupe_expire(f->kv, marks / 2, &removed, &eb);
    if (rc != 0)
        fail_msg("expire in a full map: %s", eb.msg);
    assert_int_equal(removed, (uint64_t)marks / 2);
    assert_true(marked(f, "edge-full", (uint64_t)marks - 1, NULL));
    spk_kv_txn *t = begin(f, NULL, true);
    for (int j = 0; j < 10; j++) {
        bool dup;
        assert_int_equal(
            spk_kv_dedupe_mark(t, "edge-full", (uint64_t)(marks + j), marks + j, &dup, NULL), 0);
        assert_false(dup);
    }
    commit(t);
}

/* In another process, open the store with a map of map_size and write `n` values of
 * 64 KiB, keys big-<first>... */
static void grow_in_child(fixture *f, uint64_t map_size, int first, int n)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        spk_kv_opts o = f->opts;
        o.map_size = map_size;
        spk_kv *kv;
        spk_kv_txn *t;
        static uint8_t val[64 * 1024];
        if (spk_kv_open(f->dir, &o, &kv, NULL) != 0 || spk_kv_begin(kv, NULL, true, &t, NULL))
            _exit(10);
        for (int i = first; i < first + n; i++) {
            char k[16];
            snprintf(k, sizeof(k), "big-%03d", i);
            if (spk_kv_put(t, 1, k, strlen(k), val, sizeof(val), NULL) != 0)
                _exit(11);
        }
        _exit(spk_kv_commit(t, NULL) != 0 ? 12 : 0);
    }
    int st = wait_child(pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

/* Another process grows the map past this handle's: the next begin adopts its size. */
static void test_map_resized(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 1024 * 1024;
    kv_open(f);
    spk_kv_txn *r = begin(f, NULL, false); /* kept, reset, across the growth */
    spk_kv_reset(r);
    grow_in_child(f, 16 * 1024 * 1024, 0, 64); /* 4 MiB: past this handle's map */
    /* the reset reader is the only transaction: renew adopts the new size */
    spk_errbuf eb = {{0}};
    int rc = spk_kv_renew(r, &eb);
    if (rc != 0)
        fail_msg("renew: %s", eb.msg);
    const void *v;
    size_t vl;
    assert_int_equal(spk_kv_get(r, 1, "big-063", 7, &v, &vl, NULL), 0);
    assert_int_equal(vl, 64 * 1024);
    spk_kv_abort(r);
    spk_kv_txn *t = begin(f, NULL, true);
    put_s(t, 1, "small", "fits");
    commit(t);
    assert_int_equal(stats(f).map_size, 16 * 1024 * 1024);
    assert_int_equal(stats(f).kv_entries, 65);

    /* again, with only a reset transaction here: a top-level begin adopts it */
    r = begin(f, NULL, false);
    spk_kv_reset(r);
    grow_in_child(f, 32 * 1024 * 1024, 64, 192); /* 12 MiB more */
    t = begin(f, NULL, true);
    assert_int_equal(spk_kv_get(t, 1, "big-255", 7, &v, &vl, NULL), 0);
    put_s(t, 1, "small2", "fits");
    commit(t);
    assert_int_equal(stats(f).map_size, 32 * 1024 * 1024);
    assert_int_equal(spk_kv_renew(r, NULL), 0);
    assert_int_equal(spk_kv_get(r, 1, "small2", 6, &v, &vl, NULL), 0);
    spk_kv_abort(r);
    /* while a transaction of this handle is open it cannot: a clean error */
    r = begin(f, NULL, false);
    grow_in_child(f, 64 * 1024 * 1024, 256, 256); /* 16 MiB more */
    spk_kv_txn *t2 = NULL;
    spk_errbuf eb2 = {{0}};
    rc = spk_kv_begin(f->kv, NULL, false, &t2, &eb2);
    assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
    assert_non_null(strstr(eb2.msg, "grew the map"));
    assert_null(t2);
    spk_kv_abort(r);
    t = begin(f, NULL, false);
    assert_int_equal(spk_kv_get(t, 1, "big-511", 7, &v, &vl, NULL), 0);
    spk_kv_abort(t);
}

/* A reader kept across hooks: reset between them, renewed on the latest commit. */
static void test_reset_renew(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_kv_txn *w = begin(f, NULL, true);
    put_s(w, 1, "k", "v1");
    commit(w);
    spk_kv_txn *r = begin(f, NULL, false);
    assert_value(r, 1, "k", "v1");
    spk_kv_reset(r);
    const void *v;
    size_t vl;
    assert_int_equal(spk_kv_get(r, 1, "k", 1, &v, &vl, NULL), SPK_EINVAL); /* reset */
    w = begin(f, NULL, true);
    put_s(w, 1, "k", "v2");
    commit(w);
    assert_int_equal(spk_kv_renew(r, NULL), 0);
    assert_value(r, 1, "k", "v2");                       /* the latest snapshot */
    assert_int_equal(spk_kv_renew(r, NULL), SPK_EINVAL); /* not reset */
    spk_kv_reset(r);
    spk_kv_reset(r);                             /* twice is fine */
    assert_int_equal(spk_kv_commit(r, NULL), 0); /* ends a reset one */
    w = begin(f, NULL, true);
    spk_kv_reset(w); /* a no-op on a write transaction */
    put_s(w, 1, "k", "v3");
    assert_int_equal(spk_kv_renew(w, NULL), SPK_EINVAL);
    commit(w);
}

static void test_one_shot(void **state)
{
    fixture *f = *state;
    kv_open(f);
    spk_errbuf eb = {{0}};
    char buf[8];
    size_t vl = 99;
    assert_int_equal(spk_kv_get1(f->kv, 4, "k", 1, buf, sizeof(buf), &vl, NULL), SPK_ENOENT);
    assert_int_equal(vl, 0);
    assert_int_equal(spk_kv_put1(f->kv, 4, "k", 1, "0123456789", 10, &eb), 0);
    assert_int_equal(spk_kv_get1(f->kv, 4, "k", 1, buf, sizeof(buf), &vl, NULL), 0);
    assert_int_equal(vl, 10); /* the full length; only cap bytes copied */
    assert_memory_equal(buf, "01234567", 8);
    assert_int_equal(spk_kv_get1(f->kv, 4, "k", 1, NULL, 0, &vl, NULL), 0); /* length only */
    assert_int_equal(vl, 10);
    assert_int_equal(spk_kv_put1(f->kv, 4, "k", 1, "x", SPK_KV_MAX_VALUE + 1, &eb),
                     SPK_EPAYLOAD_TOO_LARGE);
    assert_int_equal(spk_kv_del1(f->kv, 4, "k", 1, NULL), 0);
    assert_int_equal(spk_kv_del1(f->kv, 4, "k", 1, NULL), SPK_ENOENT);
    /* not inside this handle's write transaction */
    spk_kv_txn *t = begin(f, NULL, true);
    assert_int_equal(spk_kv_put1(f->kv, 4, "k", 1, "v", 1, &eb), SPK_EBUSY);
    assert_int_equal(spk_kv_get1(f->kv, 4, "k", 1, buf, sizeof(buf), &vl, NULL), SPK_ENOENT);
    spk_kv_abort(t);
}

/* ---- open ---------------------------------------------------------------------------- */

static void test_open(void **state)
{
    fixture *f = *state;
    spk_errbuf eb = {{0}};
    spk_kv *kv = NULL;
    assert_int_equal(spk_kv_open(NULL, NULL, &kv, NULL), SPK_EINVAL);
    assert_int_equal(spk_kv_open("", NULL, &kv, NULL), SPK_EINVAL);
    /* creates missing parent directories */
    char sub[400];
    snprintf(sub, sizeof(sub), "%s/a/b/kv", f->dir);
    assert_int_equal(spk_kv_open(sub, NULL, &kv, &eb), 0);
    assert_string_equal(spk_kv_path(kv), sub);
    spk_kv_stats st;
    assert_int_equal(spk_kv_stat(kv, &st, NULL), 0);
    assert_int_equal(st.map_size, 1024ull * 1024 * 1024); /* the default */
    assert_int_equal(spk_kv_sync(kv, NULL), 0);
    spk_kv_close(kv);
    /* a directory whose data.mdb is not LMDB */
    char bad[400], file[460];
    snprintf(bad, sizeof(bad), "%s/bad", f->dir);
    assert_int_equal(mkdir(bad, 0700), 0);
    snprintf(file, sizeof(file), "%s/data.mdb", bad);
    FILE *fp = fopen(file, "w");
    assert_non_null(fp);
    for (int i = 0; i < 4096; i++)
        fputc('x', fp);
    fclose(fp);
    assert_int_equal(spk_kv_open(bad, NULL, &kv, &eb), SPK_ECORRUPT);
    assert_non_null(strstr(eb.msg, "not an LMDB store"));
    /* another LMDB environment (a queue's, say) is refused and left as it was */
    char other[400];
    snprintf(other, sizeof(other), "%s/other", f->dir);
    assert_int_equal(mkdir(other, 0700), 0);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_val k = {4, "key1"}, v = {3, "val"};
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 4), 0);
    assert_int_equal(mdb_env_open(env, other, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "pending", MDB_CREATE, &dbi), 0);
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    assert_int_equal(spk_kv_open(other, NULL, &kv, &eb), SPK_ECORRUPT);
    assert_non_null(strstr(eb.msg, "not a spoke kv store"));
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 4), 0);
    assert_int_equal(mdb_env_open(env, other, MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "kv", 0, &dbi), MDB_NOTFOUND);
    mdb_txn_abort(txn);
    mdb_env_close(env);
    spk_kv_close(NULL);
    spk_kv_abort(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_put_get_del, setup, teardown),
        cmocka_unit_test_setup_teardown(test_namespaces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_prefix_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_nested, setup, teardown),
        cmocka_unit_test_setup_teardown(test_group_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dedupe_mark_expire, setup, teardown),
        cmocka_unit_test_setup_teardown(test_map_full, setup, teardown),
        cmocka_unit_test_setup_teardown(test_map_full_by_marks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_map_resized, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_renew, setup, teardown),
        cmocka_unit_test_setup_teardown(test_one_shot, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_processes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9_mid_txn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9_group_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9_random, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
