/*
 * test_large.c -- records too large for an LMDB leaf, which LMDB keeps in overflow pages
 * (queue/store.c): mixed sizes read back in order and byte-exact; batch limits; moves
 * bigger than one batch; the record size limit; reopen; expiry and purge; damage in an
 * overflow page reported per record, never delivered; a reader, an acker and a writer in
 * three processes; kill -9 of writers and movers in the middle of moves. And that no file
 * but the journal's and LMDB's is ever made (the segment files of format 2 are gone).
 *
 * Real files in a temporary directory, real fork()ed processes and real SIGKILLs; no mocks.
 * Every payload is qtest_gen_payload(): pseudo-random bytes derived from a record ID that
 * start with the tag "qrec-<ID in hex>-", so a stored record says which one it is and can
 * be found in data.mdb. LARGE_FILTER=<name> runs one test.
 */
#include "qtest.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

#define BIG      3000u /* a payload whose record certainly needs LMDB overflow pages */
#define SMALL    100u  /* one that certainly fits a leaf */

/* f->root holds the queue and the tests' own files; the queue is f->dir, root/q. */
typedef qtest_fixture fixture;

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("large", "q");
    f->opts.map_size = 512ull * 1024 * 1024;
    f->opts.journal_size = 8ull * 1024 * 1024;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    qtest_fixture_free(*state);
    return 0;
}

/* ---- payloads ------------------------------------------------------------------------------- */

/* Enqueue record `id` and check its sequence number when `want_seq` is not 0. */
static void must_send(fixture *f, uint32_t id, size_t len, uint64_t want_seq)
{
    spk_errbuf eb = {{0}};
    uint64_t seq = 0;
    int rc = qtest_send_gen(f->q, 1 + id % 3, id, len, &seq, NULL, &eb);
    if (rc != 0)
        fail_msg("enqueue of record %u (%zu bytes): %d: %s", id, len, rc, eb.msg);
    if (want_seq != 0 && seq != want_seq)
        fail_msg("record %u got sequence %llu, expected %llu", id, (unsigned long long)seq,
                 (unsigned long long)want_seq);
}

/* Assert that `it` is record `id` with sequence `seq`, `len` bytes, byte-exact. */
static void check_item(const spk_queue_item *it, uint64_t seq, uint32_t id, size_t len)
{
    if (it->status != 0)
        fail_msg("seq %llu: status %d, expected 0", (unsigned long long)it->seq, it->status);
    assert_int_equal(it->seq, seq);
    uint32_t got_id = 0;
    size_t got_len = 0;
    const char *why = qtest_item_problem(it, &got_id, &got_len);
    if (why != NULL)
        fail_msg("seq %llu: %s", (unsigned long long)seq, why);
    if (got_id != id || got_len != len)
        fail_msg("seq %llu: record %u of %zu bytes, expected record %u of %zu bytes",
                 (unsigned long long)seq, got_id, got_len, id, len);
}

/* Ack the given sequence numbers; returns how many were acked. */
static size_t ack_seqs(fixture *f, const uint64_t *seqs, size_t n)
{
    size_t acked = 0;
    spk_errbuf eb = {{0}};
    int rc = spk_queue_ack(f->q, seqs, n, &acked, &eb);
    if (rc != 0)
        fail_msg("ack: %d: %s", rc, eb.msg);
    return acked;
}

/* Ack records lo..hi (IDs, every `step`-th) of a queue where record ID i has sequence
 * i + 1; returns how many were acked. */
static size_t ack_ids(fixture *f, uint32_t lo, uint32_t hi, uint32_t step)
{
    size_t cap = (hi - lo) / step + 1, n = 0;
    uint64_t *seqs = malloc(cap * sizeof(*seqs));
    assert_non_null(seqs);
    for (uint64_t id = lo; id <= hi; id += step)
        seqs[n++] = id + 1;
    size_t acked = ack_seqs(f, seqs, n);
    free(seqs);
    return acked;
}

static void get_stats(fixture *f, spk_queue_stats *st)
{
    spk_errbuf eb = {{0}};
    int rc = spk_queue_stats_get(f->q, st, &eb);
    if (rc != 0)
        fail_msg("stats: %d: %s", rc, eb.msg);
}

/* spk_queue_verify() must find nothing wrong. */
static void verify_clean(fixture *f)
{
    uint64_t bad = 99;
    spk_errbuf eb = {{0}};
    int rc = spk_queue_verify(f->q, &bad, &eb);
    if (rc != 0)
        fail_msg("verify: %d: %s", rc, eb.msg);
    assert_int_equal(bad, 0);
}

/* ---- files ---------------------------------------------------------------------------------- */

/* Files in the queue directory other than the journal's and LMDB's (format 2 had seg-*
 * and spare-*): there must never be any. */
static size_t other_files(const fixture *f)
{
    static const char *known[] = {".", "..", "data.mdb", "lock.mdb", "journal", "journal.ctl"};
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        bool ok = false;
        for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
            ok |= strcmp(de->d_name, known[i]) == 0;
        if (!ok) {
            print_message("unexpected file in the queue: %s\n", de->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

/* Where LMDB's data file holds record `id`'s tag, or -1. */
static long in_data_mdb(const fixture *f, uint32_t id)
{
    char path[700], tag[QTEST_TAG_LEN + 1];
    snprintf(path, sizeof(path), "%s/data.mdb", f->dir);
    qtest_make_tag(tag, id);
    return qtest_file_find(path, tag, QTEST_TAG_LEN);
}

/* ---- 1. mixed sizes in order ---------------------------------------------------------------- */

static size_t mixed_len(uint32_t id)
{
    switch (id % 3) {
    case 0:
        return SMALL;
    case 1:
        return BIG;
    default:
        return SPOKE_MAX_PAYLOAD;
    }
}

/* Read everything and check that record IDs first..first+n-1 are there with sequence
 * numbers seq0.., byte-exact; returns the sum of their stored sizes. */
static uint64_t check_all(fixture *f, size_t n, uint32_t first, uint64_t seq0,
                          size_t (*len_of)(uint32_t))
{
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, n);
    uint64_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        check_item(&b.items[i], seq0 + i, first + (uint32_t)i, len_of(first + (uint32_t)i));
        bytes += spk_queue_record_size(b.items[i].wire_len);
    }
    spk_queue_batch_free(&b);
    return bytes;
}

static size_t big_len(uint32_t id)
{
    (void)id;
    return BIG;
}

/* Enqueue records from..to-1: record i has sequence i + 1 and len_of(i) bytes. */
static void send_range(fixture *f, uint32_t from, uint32_t to, size_t (*len_of)(uint32_t))
{
    for (uint32_t id = from; id < to; id++)
        must_send(f, id, len_of(id), id + 1);
}

/* Open the queue and enqueue records 0..n-1 as send_range() does, all moved by a sync. */
static void open_and_send(fixture *f, uint32_t n, size_t (*len_of)(uint32_t))
{
    qtest_open(f);
    send_range(f, 0, n, len_of);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
}

/* Enqueue records 0..n-1 as send_range() does, 500 at a time, each 500 moved by a sync;
 * returns n. */
static uint32_t fill_records(fixture *f, uint32_t n, size_t (*len_of)(uint32_t))
{
    for (uint32_t at = 0; at < n; at += 500) {
        send_range(f, at, at + 500 < n ? at + 500 : n, len_of);
        assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    }
    return n;
}

static void test_mixed_sizes_in_order(void **state)
{
    fixture *f = *state;
    const uint32_t n = 15;
    open_and_send(f, n, mixed_len);
    /* every record is in LMDB's file, the big ones in overflow pages; no other file */
    assert_int_equal(other_files(f), 0);
    for (uint32_t id = 0; id < n; id++)
        if (in_data_mdb(f, id) < 0)
            fail_msg("record %u (%zu bytes) is not in data.mdb", id, mixed_len(id));
    uint64_t bytes = check_all(f, n, 0, 1, mixed_len);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, n);
    assert_int_equal(st.pending_bytes, bytes);
    assert_int_equal(st.staged, 0);
    spk_queue_stats_free(&st);
    verify_clean(f);

    /* batch limits count the wire bytes of records in overflow pages too */
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, SIZE_MAX, 1, &b, NULL), 0);
    assert_int_equal(b.n, 1); /* the first record always comes */
    check_item(&b.items[0], 1, 0, SMALL);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_read(f->q, SIZE_MAX, 2 * BIG, &b, NULL), 0);
    assert_int_equal(b.n, 2); /* 100 + 3000 bytes fit, the 1 MiB one does not */
    check_item(&b.items[1], 2, 1, BIG);
    spk_queue_batch_free(&b);
}

/* ---- 1b. moves bigger than one batch ---------------------------------------------------------
 *
 * More than MOVE_MAX_BYTES (4 MiB) of values staged at once: a sync moves them in several
 * transactions, releasing journal space after each; acks between syncs free overflow
 * pages that later moves reuse. */
#define MULTI_N 14000u

static size_t multi_len(uint32_t id)
{
    return id % 50 == 7 ? SMALL : id % 997 == 3 ? 200000 : BIG;
}

static void test_multi_batch_moves(void **state)
{
    fixture *f = *state;
    f->opts.journal_size = 128ull * 1024 * 1024;
    open_and_send(f, MULTI_N, multi_len);
    check_all(f, MULTI_N, 0, 1, multi_len);
    verify_clean(f);
    /* ack the older half */
    assert_int_equal(ack_ids(f, 0, MULTI_N / 2 - 1, 1), MULTI_N / 2);
    send_range(f, MULTI_N, 2 * MULTI_N, multi_len);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    check_all(f, MULTI_N + MULTI_N / 2, MULTI_N / 2, MULTI_N / 2 + 1, multi_len);
    verify_clean(f);
    /* everything acked: a reopen sees an empty queue, and no other file was ever made */
    assert_int_equal(ack_ids(f, MULTI_N / 2, 2 * MULTI_N - 1, 1), MULTI_N + MULTI_N / 2);
    qtest_open(f);
    assert_int_equal(other_files(f), 0);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    spk_queue_stats_free(&st);
}

/* A record over SPK_QUEUE_RECORD_MAX (here: a 1 MiB payload with an edge ID of 1.5 MiB) is refused at once with its own code, not accepted and then
 * reported damaged; one byte under the limit is accepted and read back. */
static void test_record_size_limit(void **state)
{
    fixture *f = *state;
    f->opts.journal_size = 16ull * 1024 * 1024;
    qtest_open(f);
    size_t plen = 1024 * 1024, elen = 1536 * 1024;
    char *edge = malloc(elen + 1);
    uint8_t *p = malloc(plen);
    assert_non_null(edge);
    assert_non_null(p);
    memset(edge, 'e', elen);
    edge[elen] = '\0';
    qtest_gen_payload(p, plen, 1);
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, edge, p, plen, NULL, NULL, 0, false, -1, NULL,
                                    NULL, &eb),
                     SPK_EPAYLOAD_TOO_LARGE);
    assert_non_null(strstr(eb.msg, "over the"));
    /* a record just under the limit: wire bytes = 2 MiB - 24 - a few header bytes */
    size_t under = SPK_QUEUE_RECORD_MAX - 24 - plen - 64;
    edge[under] = '\0';
    uint64_t seq = 0;
    int rc = spk_queue_send(f->q, 1, edge, p, plen, NULL, NULL, 0, false, -1, &seq, NULL, &eb);
    if (rc != 0)
        fail_msg("just under the limit: %d: %s", rc, eb.msg);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 1);
    assert_int_equal(b.items[0].status, 0);
    assert_int_equal(b.items[0].seq, seq);
    spk_queue_batch_free(&b);
    verify_clean(f);
    free(edge);
    free(p);
}

/* ---- 2. reopen ------------------------------------------------------------------------------ */

static void test_reopen(void **state)
{
    fixture *f = *state;
    open_and_send(f, 6, mixed_len);
    send_range(f, 6, 9, mixed_len); /* these stay in the journal */
    qtest_open(f);
    must_send(f, 9, mixed_len(9), 10);
    check_all(f, 10, 0, 1, mixed_len);
    verify_clean(f);
    assert_int_equal(other_files(f), 0);

    assert_int_equal(ack_ids(f, 0, 3, 1), 4);
    qtest_open(f);
    qtest_open(f);
    check_all(f, 6, 4, 5, mixed_len);
    must_send(f, 10, mixed_len(10), 11);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 7);
    assert_int_equal(st.next_seq, 12);
    assert_int_equal(st.acked, 4);
    spk_queue_stats_free(&st);
    verify_clean(f);
}

/* ---- 4. expiry ------------------------------------------------------------------------------ */

static size_t exp_len(uint32_t id)
{
    return id % 100 == 50 ? SMALL : BIG;
}

static void test_expiry(void **state)
{
    fixture *f = *state;
    f->opts.retention_ms = 1000;
    qtest_open(f);
    int64_t t0 = qtest_now;
    /* Old records, a few small ones among them. */
    uint32_t n_old = fill_records(f, 1500, exp_len);
    /* Young ones. */
    qtest_now = t0 + 2000;
    const uint32_t n_young = 6;
    send_range(f, n_old, n_old + n_young, exp_len);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);

    /* cutoff t0 + 1500: the old ones go */
    qtest_now = t0 + 2500;
    uint64_t expired = 0;
    assert_int_equal(spk_queue_expire(f->q, &expired, NULL), 0);
    assert_int_equal(expired, n_old);
    check_all(f, n_young, n_old, n_old + 1, exp_len);
    verify_clean(f);

    /* the young ones' turn */
    qtest_now = t0 + 10000;
    assert_int_equal(spk_queue_expire(f->q, &expired, NULL), 0);
    assert_int_equal(expired, n_young);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.expired, n_old + n_young);
    spk_queue_stats_free(&st);
    verify_clean(f);

    /* and the queue goes on */
    uint32_t id = n_old + n_young;
    send_range(f, id, id + 3, big_len);
    check_all(f, 3, id, id + 1, big_len);
    assert_int_equal(other_files(f), 0);
}

/* ---- 5. purge ------------------------------------------------------------------------------- */

static size_t purge_len(uint32_t id)
{
    return id >= 40 && id < 43 ? SPOKE_MAX_PAYLOAD : BIG;
}

static void test_purge(void **state)
{
    fixture *f = *state;
    open_and_send(f, 43, purge_len);
    send_range(f, 43, 53, purge_len); /* these stay in the journal */
    uint64_t purged = 0;
    assert_int_equal(spk_queue_purge(f->q, &purged, NULL), 0);
    assert_int_equal(purged, 53);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.purged, 53);
    spk_queue_stats_free(&st);
    verify_clean(f);

    send_range(f, 53, 58, purge_len);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    check_all(f, 5, 53, 54, purge_len);
    verify_clean(f);

    /* everything moved this time; after a reopen */
    qtest_open(f);
    assert_int_equal(spk_queue_purge(f->q, &purged, NULL), 0);
    assert_int_equal(purged, 5);
    must_send(f, 58, BIG, 59);
    check_all(f, 1, 58, 59, purge_len);
    verify_clean(f);
}

/* ---- 6. damage ------------------------------------------------------------------------------ */

static size_t dmg_len(uint32_t id)
{
    return id == 2 ? SMALL : BIG;
}

static void file_flip(const char *path, long off, size_t n)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    assert_true(fd >= 0);
    uint8_t buf[64];
    assert_true(n <= sizeof(buf));
    assert_int_equal(pread(fd, buf, n, off), (ssize_t)n);
    for (size_t i = 0; i < n; i++)
        buf[i] ^= 0xA5;
    assert_int_equal(pwrite(fd, buf, n, off), (ssize_t)n);
    close(fd);
}

static void test_damage(void **state)
{
    fixture *f = *state;
    open_and_send(f, 6, dmg_len);

    /* flip bytes in the middle of record 3's payload, in its overflow page */
    char path[700];
    snprintf(path, sizeof(path), "%s/data.mdb", f->dir);
    long off = in_data_mdb(f, 3);
    assert_true(off >= 0);
    file_flip(path, off + 1000, 8);

    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 6);
    for (uint32_t i = 0; i < 6; i++) {
        if (i == 3) {
            assert_int_equal(b.items[i].seq, 4);
            assert_int_equal(b.items[i].status, SPK_ECORRUPT);
            assert_int_equal(b.items[i].wire_len, 0);
        } else {
            check_item(&b.items[i], i + 1, i, dmg_len(i));
        }
    }
    spk_queue_batch_free(&b);
    uint64_t bad = 0;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_verify(f->q, &bad, &eb), SPK_ECORRUPT);
    assert_int_equal(bad, 1);
    assert_non_null(strstr(eb.msg, "1 of 6"));
    /* acking the damaged record drops it; the rest is clean */
    uint64_t four = 4;
    assert_int_equal(ack_seqs(f, &four, 1), 1);
    verify_clean(f);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 5);
    for (size_t i = 0; i < b.n; i++)
        assert_int_equal(b.items[i].status, 0);
    spk_queue_batch_free(&b);

    /* Damage at the end of record 5 (the last): that record only. */
    off = in_data_mdb(f, 5);
    assert_true(off >= 0);
    file_flip(path, off + BIG - 20, 8);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 5);
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(b.items[i].status, 0);
    assert_int_equal(b.items[4].seq, 6);
    assert_int_equal(b.items[4].status, SPK_ECORRUPT);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, &bad, NULL), SPK_ECORRUPT);
    assert_int_equal(bad, 1);
    uint64_t six = 6;
    assert_int_equal(ack_seqs(f, &six, 1), 1);
    verify_clean(f);
    assert_int_equal(ack_ids(f, 0, 5, 1), 4);
    verify_clean(f);
}

/* ---- child processes ------------------------------------------------------------------------ */

/* Whether the parent closed the stop pipe (its write end). */
static bool stop_requested(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP)) != 0;
}

/* Wait for `pid` to exit 0 within `ms` milliseconds; kill it and fail otherwise. */
static void expect_exit0_within(pid_t pid, const char *who, long ms)
{
    int64_t end = qtest_mono_us() + ms * 1000;
    int st = 0;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        assert_int_equal(r, 0);
        if (qtest_mono_us() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            fail_msg("%s did not finish within %ld ms", who, ms);
        }
        qtest_sleep_us(1000);
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("%s failed (status %#x, exit code %d)", who, st,
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

/* ---- 8. a reader, an acker and a writer at once --------------------------------------------- */

#define CONC_TIME_US     1500000
#define CONC_MAX_BYTES   (160ull * 1024 * 1024)
#define CONC_MAX_RECORDS 40000u

/* Mostly big records of varied sizes, some inline, some of 300 KB. */
static size_t conc_len(uint32_t id)
{
    if (id % 7 == 3)
        return 200;
    if (id % 61 == 17)
        return 300000;
    return 2500 + (id * 2654435761u >> 7) % 20000;
}

/* The acker's report of one acked record, written after spk_queue_ack() returned. */
typedef struct ackrep {
    uint64_t seq;
    uint32_t id;
    uint32_t pad;
} ackrep;

/* What the non-acking reader found. */
typedef struct readsum {
    uint64_t reads, items, checked, corrupt, bad, unordered, errors;
} readsum;

enum { ACKER_CORRUPT = 20, ACKER_BAD = 21, ACKER_READ = 22, ACKER_ACK = 23, ACKER_COUNT = 24 };

static void acker_child(fixture *f, int stop_fd, int out_fd)
{
    spk_queue *q = qtest_child_open(f);
    for (;;) {
        bool stop = stop_requested(stop_fd);
        spk_queue_batch b;
        spk_errbuf eb = {{0}};
        if (spk_queue_read(q, 64, 0, &b, &eb) != 0) {
            fprintf(stderr, "acker: read: %s\n", eb.msg);
            _exit(ACKER_READ);
        }
        if (b.n == 0) {
            spk_queue_batch_free(&b);
            if (stop)
                break; /* everything appended before the stop was read and acked */
            qtest_sleep_us(200);
            continue;
        }
        uint64_t seqs[64];
        ackrep reps[64];
        for (size_t i = 0; i < b.n; i++) {
            uint32_t id = 0;
            size_t len = 0;
            const spk_queue_item *it = &b.items[i];
            if (it->status != 0) {
                fprintf(stderr, "acker: seq %llu: status %d\n", (unsigned long long)it->seq,
                        it->status);
                _exit(ACKER_CORRUPT);
            }
            const char *why = qtest_item_problem(it, &id, &len);
            if (why != NULL || len != conc_len(id)) {
                fprintf(stderr, "acker: seq %llu: %s\n", (unsigned long long)it->seq,
                        why != NULL ? why : "wrong length");
                _exit(ACKER_BAD);
            }
            seqs[i] = it->seq;
            reps[i] = (ackrep){it->seq, id, 0};
        }
        size_t acked = 0;
        if (spk_queue_ack(q, seqs, b.n, &acked, &eb) != 0) {
            fprintf(stderr, "acker: ack: %s\n", eb.msg);
            _exit(ACKER_ACK);
        }
        if (acked != b.n) { /* nobody else acks: everything read is still pending */
            fprintf(stderr, "acker: acked %zu of %zu\n", acked, b.n);
            _exit(ACKER_COUNT);
        }
        qtest_write_all(out_fd, reps, b.n * sizeof(reps[0]));
        spk_queue_batch_free(&b);
    }
    spk_queue_close(q);
    _exit(0);
}

static void reader_child(fixture *f, int stop_fd, int out_fd)
{
    spk_queue *q = qtest_child_open(f);
    readsum s = {0};
    while (!stop_requested(stop_fd)) {
        spk_queue_batch b;
        spk_errbuf eb = {{0}};
        if (spk_queue_read(q, 20, 0, &b, &eb) != 0) {
            fprintf(stderr, "reader: read: %s\n", eb.msg);
            s.errors++;
            continue;
        }
        s.reads++;
        for (size_t i = 0; i < b.n; i++) {
            const spk_queue_item *it = &b.items[i];
            uint32_t id = 0;
            size_t len = 0;
            s.items++;
            if (i > 0 && it->seq <= b.items[i - 1].seq)
                s.unordered++;
            if (it->status == SPK_ECORRUPT) {
                fprintf(stderr, "reader: seq %llu: SPK_ECORRUPT\n", (unsigned long long)it->seq);
                s.corrupt++;
                continue;
            }
            const char *why = qtest_item_problem(it, &id, &len);
            if (why != NULL || len != conc_len(id) || it->seq != (uint64_t)id + 1) {
                fprintf(stderr, "reader: seq %llu: %s\n", (unsigned long long)it->seq,
                        why != NULL ? why : "wrong length or record");
                s.bad++;
                continue;
            }
            s.checked++;
        }
        spk_queue_batch_free(&b);
    }
    spk_queue_close(q);
    qtest_write_all(out_fd, &s, sizeof(s));
    _exit(0);
}

static void test_concurrent_reader_acker(void **state)
{
    fixture *f = *state;
    qtest_open(f); /* creates the queue; the children open their own handles */
    char apath[700];
    snprintf(apath, sizeof(apath), "%s/acked.bin", f->root);
    int afd = open(apath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(afd >= 0);
    int stop[2], rpipe[2];
    assert_int_equal(pipe(stop), 0);
    assert_int_equal(pipe(rpipe), 0);

    pid_t acker = fork();
    assert_true(acker >= 0);
    if (acker == 0) {
        close(stop[1]);
        close(rpipe[0]);
        close(rpipe[1]);
        acker_child(f, stop[0], afd);
    }
    pid_t reader = fork();
    assert_true(reader >= 0);
    if (reader == 0) {
        close(stop[1]);
        close(rpipe[0]);
        close(afd);
        reader_child(f, stop[0], rpipe[1]);
    }
    close(stop[0]);
    close(rpipe[1]);

    /* Enqueue for a while. */
    int64_t end = qtest_mono_us() + CONC_TIME_US;
    uint64_t bytes = 0;
    uint32_t n = 0;
    uint8_t *buf = malloc(300000);
    assert_non_null(buf);
    while (n < CONC_MAX_RECORDS && bytes < CONC_MAX_BYTES && qtest_mono_us() < end) {
        size_t len = conc_len(n);
        qtest_gen_payload(buf, len, n);
        uint64_t seq = 0;
        spk_errbuf eb = {{0}};
        int rc = spk_queue_send(f->q, 1 + n % 3, "edge-c", buf, len, NULL, NULL, 0, false, -1, &seq,
                                NULL, &eb);
        if (rc != 0 || seq != (uint64_t)n + 1) {
            kill(acker, SIGKILL);
            kill(reader, SIGKILL);
            waitpid(acker, NULL, 0);
            waitpid(reader, NULL, 0);
            fail_msg("enqueue %u: %d (seq %llu): %s", n, rc, (unsigned long long)seq, eb.msg);
        }
        n++;
        bytes += len;
        /* Move what was appended now and then, so that the children's reads mostly find
         * it moved and are quick: many reads race with the acker's deletions. */
        if (n % 64 == 0 && spk_queue_sync(f->q, &eb) != 0) {
            kill(acker, SIGKILL);
            kill(reader, SIGKILL);
            waitpid(acker, NULL, 0);
            waitpid(reader, NULL, 0);
            fail_msg("sync: %s", eb.msg);
        }
    }
    free(buf);
    int64_t t_enq = qtest_mono_us() - (end - CONC_TIME_US);
    close(stop[1]); /* stop: the reader ends, the acker empties the queue and ends */

    readsum s;
    struct pollfd p = {rpipe[0], POLLIN, 0};
    bool got_sum = poll(&p, 1, 20000) == 1 && qtest_read_full(rpipe[0], &s, sizeof(s));
    close(rpipe[0]);
    expect_exit0_within(reader, "the reader", 20000);
    expect_exit0_within(acker, "the acker", 20000);
    assert_true(got_sum);
    print_message("%u records (%llu MiB) enqueued in %lld ms; reader: %llu reads, %llu "
                  "items, %llu checked\n",
                  n, (unsigned long long)(bytes >> 20), (long long)(t_enq / 1000),
                  (unsigned long long)s.reads, (unsigned long long)s.items,
                  (unsigned long long)s.checked);
    assert_int_equal(s.corrupt, 0);
    assert_int_equal(s.bad, 0);
    assert_int_equal(s.unordered, 0);
    assert_int_equal(s.errors, 0);
    assert_true(s.reads > 0);

    /* Every record was acked exactly once, as the record it is. */
    size_t len = 0;
    uint8_t *raw = qtest_slurp(apath, &len);
    close(afd);
    assert_int_equal(len % sizeof(ackrep), 0);
    const ackrep *reps = (const ackrep *)raw;
    size_t nrep = len / sizeof(ackrep);
    uint8_t *times = calloc(n + 1, 1);
    assert_non_null(times);
    for (size_t i = 0; i < nrep; i++) {
        if (reps[i].seq < 1 || reps[i].seq > n)
            fail_msg("acked an unknown sequence %llu", (unsigned long long)reps[i].seq);
        if (reps[i].id != reps[i].seq - 1)
            fail_msg("seq %llu held record %u", (unsigned long long)reps[i].seq, reps[i].id);
        if (times[reps[i].seq]++ != 0)
            fail_msg("seq %llu acked twice", (unsigned long long)reps[i].seq);
    }
    for (uint32_t i = 1; i <= n; i++)
        if (times[i] != 1)
            fail_msg("seq %u was never acked", i);
    free(times);
    free(raw);

    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.acked, n);
    spk_queue_stats_free(&st);
    verify_clean(f);
    assert_int_equal(other_files(f), 0);
}

/* ---- 9. kill -9 during moves ---------------------------------------------------------------- */

#define K9_ROUNDS  20
#define K9_WRITERS 2

typedef struct wreport {
    uint64_t seq;
    uint32_t id;
    uint32_t pad;
} wreport;

/* Record i of writer w in round r. */
static uint32_t k9_id(uint32_t round, uint32_t w, uint32_t i)
{
    return (round + 1) << 24 | w << 23 | i;
}

static void k9_writer(fixture *f, uint32_t round, uint32_t w, int fd)
{
    spk_queue *q = qtest_child_open(f);
    for (uint32_t i = 0; i < (1u << 23); i++) {
        uint32_t id = k9_id(round, w, i);
        uint64_t seq = 0;
        spk_errbuf eb = {{0}};
        int rc = qtest_send_gen(q, 1 + w, id, BIG, &seq, NULL, &eb);
        if (rc != 0) {
            fprintf(stderr, "writer %u: enqueue: %d: %s\n", w, rc, eb.msg);
            _exit(3);
        }
        wreport r = {seq, id, 0};
        qtest_write_all(fd, &r, sizeof(r)); /* < PIPE_BUF: atomic */
    }
    _exit(4);
}

static void k9_syncer(fixture *f)
{
    spk_queue *q = qtest_child_open(f);
    for (;;) {
        spk_errbuf eb = {{0}};
        int rc = spk_queue_sync(q, &eb);
        if (rc != 0) {
            fprintf(stderr, "syncer: sync: %d: %s\n", rc, eb.msg);
            _exit(3);
        }
    }
}

/* Per sequence number: what a writer reported, and whether the parent acked it. */
typedef struct k9seq {
    uint32_t id;
    uint8_t reported, acked, seen;
} k9seq;

typedef struct k9state {
    k9seq *v;
    uint64_t cap;
} k9state;

static k9seq *k9_at(k9state *s, uint64_t seq)
{
    if (seq >= s->cap) {
        uint64_t cap = s->cap > 0 ? s->cap : 65536;
        while (cap <= seq)
            cap *= 2;
        s->v = realloc(s->v, cap * sizeof(*s->v));
        assert_non_null(s->v);
        memset(s->v + s->cap, 0, (cap - s->cap) * sizeof(*s->v));
        s->cap = cap;
    }
    return &s->v[seq];
}

static void k9_take(k9state *s, const wreport *r)
{
    k9seq *e = k9_at(s, r->seq);
    if (e->reported)
        fail_msg("sequence %llu reported twice", (unsigned long long)r->seq);
    e->reported = 1;
    e->id = r->id;
}

/* Take every report available on fd (all of them until EOF with `until_eof`). */
static void k9_drain(int fd, k9state *s, bool until_eof)
{
    for (;;) {
        if (!until_eof) {
            struct pollfd p = {fd, POLLIN, 0};
            if (poll(&p, 1, 0) <= 0 || (p.revents & POLLIN) == 0)
                return;
        }
        wreport r[64];
        ssize_t got = read(fd, r, sizeof(r));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return;
        assert_int_equal(got % (ssize_t)sizeof(wreport), 0); /* writes are atomic */
        for (ssize_t i = 0; i < got / (ssize_t)sizeof(wreport); i++)
            k9_take(s, &r[i]);
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* After a round: everything reported is there once, byte-exact, nothing acked came back,
 * counters and verify agree. Acks all but every 16th record of this round. Returns the
 * number of records seen. */
static size_t k9_check(fixture *f, k9state *s, uint32_t round)
{
    qtest_open(f); /* every child is dead: the first open since */
    spk_queue_batch b;
    qtest_read_all(f, &b);
    spk_queue_stats st;
    get_stats(f, &st);
    uint32_t *ids = malloc((b.n + 1) * sizeof(*ids));
    uint64_t *acks = malloc((b.n + 1) * sizeof(*acks));
    assert_non_null(ids);
    assert_non_null(acks);
    uint64_t bytes = 0;
    size_t nack = 0;
    for (size_t i = 0; i < b.n; i++) {
        const spk_queue_item *it = &b.items[i];
        uint32_t id = 0;
        size_t len = 0;
        const char *why = qtest_item_problem(it, &id, &len);
        if (why != NULL)
            fail_msg("round %u: seq %llu (status %d): %s", round, (unsigned long long)it->seq,
                     it->status, why);
        if (len != BIG)
            fail_msg("round %u: seq %llu has %zu bytes", round, (unsigned long long)it->seq, len);
        if (i > 0 && it->seq <= b.items[i - 1].seq)
            fail_msg("round %u: seq %llu after %llu", round, (unsigned long long)it->seq,
                     (unsigned long long)b.items[i - 1].seq);
        k9seq *e = k9_at(s, it->seq);
        if (e->acked)
            fail_msg("round %u: seq %llu was acked and is back", round,
                     (unsigned long long)it->seq);
        if (e->reported && e->id != id)
            fail_msg("round %u: seq %llu holds record %x, its writer sent %x", round,
                     (unsigned long long)it->seq, id, e->id);
        e->seen = 1;
        ids[i] = id;
        bytes += spk_queue_record_size(it->wire_len);
        bool keep = (id >> 24) == round + 1 && (id & 0x7FFFFFu) % 16 == 0;
        if (!keep)
            acks[nack++] = it->seq;
    }
    qsort(ids, b.n, sizeof(*ids), cmp_u32);
    for (size_t i = 1; i < b.n; i++)
        if (ids[i] == ids[i - 1])
            fail_msg("round %u: record %x is stored twice", round, ids[i]);
    for (uint64_t seq = 1; seq < s->cap; seq++) {
        k9seq *e = &s->v[seq];
        if (e->reported && !e->acked && !e->seen)
            fail_msg("round %u: seq %llu (record %x) was accepted and is lost", round,
                     (unsigned long long)seq, e->id);
        e->seen = 0;
    }
    assert_int_equal(st.pending, b.n);
    assert_int_equal(st.pending_bytes, bytes);
    assert_int_equal(st.staged, 0);
    spk_queue_stats_free(&st);
    verify_clean(f);

    assert_int_equal(ack_seqs(f, acks, nack), nack);
    for (size_t i = 0; i < nack; i++)
        k9_at(s, acks[i])->acked = 1;
    size_t seen = b.n;
    free(ids);
    free(acks);
    spk_queue_batch_free(&b);
    qtest_close(f); /* the next round's first open is the children's */
    return seen;
}

static void test_kill9_moves(void **state)
{
    fixture *f = *state;
    f->opts.journal_size = SPK_QUEUE_JOURNAL_MIN; /* a small ring: writers move too */
    f->opts.clock = NULL;
    k9state s = {NULL, 0};
    srand((unsigned)time(NULL));
    uint64_t reported = 0, seen = 0;
    for (uint32_t round = 0; round < K9_ROUNDS; round++) {
        pid_t pids[K9_WRITERS + 1];
        int fds[K9_WRITERS];
        for (uint32_t w = 0; w < K9_WRITERS; w++) {
            pids[w] = qtest_fork_pipe(&fds[w]);
            if (pids[w] == 0)
                k9_writer(f, round, w, fds[w]);
        }
        pids[K9_WRITERS] = fork();
        assert_true(pids[K9_WRITERS] >= 0);
        if (pids[K9_WRITERS] == 0)
            k9_syncer(f);

        /* kill each at its own random moment, taking reports meanwhile */
        long t_kill[K9_WRITERS + 1];
        for (int i = 0; i <= K9_WRITERS; i++)
            t_kill[i] = 3 + rand() % 60;
        int killed = 0;
        for (long t = 0; killed <= K9_WRITERS; t++) {
            for (int i = 0; i <= K9_WRITERS; i++)
                if (t == t_kill[i]) {
                    kill(pids[i], SIGKILL);
                    killed++;
                }
            for (int w = 0; w < K9_WRITERS; w++)
                k9_drain(fds[w], &s, false);
            qtest_sleep_us(1000);
        }
        for (int i = 0; i <= K9_WRITERS; i++)
            qtest_expect_killed(pids[i], i < K9_WRITERS ? "writer" : "syncer");
        for (int w = 0; w < K9_WRITERS; w++) {
            k9_drain(fds[w], &s, true);
            close(fds[w]);
        }
        seen += k9_check(f, &s, round);
    }
    for (uint64_t seq = 1; seq < s.cap; seq++)
        reported += s.v[seq].reported;
    print_message("%d rounds: %llu accepted enqueues checked, %llu records seen\n", K9_ROUNDS,
                  (unsigned long long)reported, (unsigned long long)seen);
    assert_true(reported > 0);

    /* Ack what is left. */
    qtest_open(f);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    assert_int_equal(other_files(f), 0);
    spk_queue_stats st;
    get_stats(f, &st);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    uint64_t next = st.next_seq;
    spk_queue_stats_free(&st);
    for (uint32_t i = 0; i < 10; i++)
        must_send(f, i, BIG, next + i);
    check_all(f, 10, 0, next, big_len);
    qtest_read_all(f, &b);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    assert_int_equal(other_files(f), 0);
    verify_clean(f);
    free(s.v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_mixed_sizes_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_purge, setup, teardown),
        cmocka_unit_test_setup_teardown(test_damage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_reader_acker, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multi_batch_moves, setup, teardown),
        cmocka_unit_test_setup_teardown(test_record_size_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9_moves, setup, teardown),
    };
    if (getenv("LARGE_FILTER") != NULL)
        cmocka_set_test_filter(getenv("LARGE_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
