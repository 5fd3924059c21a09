/*
 * test_faults.c -- the journal's I/O failing under it, through the fault-injection seam of
 * queue/queue_int.h (spk_journal_pwrite_fn, spk_journal_fdatasync_fn), which only tests
 * set:
 *   - a failed fdatasync with sync `always`: the caller is answered
 *     SPK_EQUEUE_UNAVAILABLE and its record is never sent (no duplicate when the plugin
 *     retries); the failure latches, so a later flush that succeeds does not make the
 *     earlier record durable: appends are refused until the journal is rebuilt from what
 *     is known to be on disk; also when the process dies before that and the queue is
 *     opened again;
 *   - a short pwrite: the rest is written (a stale errno is not taken for an error), and a
 *     write that fails after a short one reports its own errno.
 */
#include "qtest.h"

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "queue.h"
#include "queue_int.h"

typedef qtest_fixture fixture;

static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static int fail_syncs;   /* fdatasync calls still to fail */
static int short_writes; /* pwrite calls still to cut short */
static int fail_after_short;

static int faulty_fdatasync(int fd)
{
    if (fail_syncs > 0) {
        fail_syncs--;
        errno = EIO;
        return -1;
    }
    return fdatasync(fd);
}

static ssize_t faulty_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (short_writes > 0 && n > 1) {
        short_writes--;
        ssize_t w = pwrite(fd, buf, n / 2, off);
        errno = ENOSPC; /* stale: a short write does not set errno */
        return w;
    }
    if (fail_after_short > 0) {
        fail_after_short--;
        errno = EIO;
        return -1;
    }
    return pwrite(fd, buf, n, off);
}

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("faults", NULL);
    f->opts.map_size = 64ull * 1024 * 1024;
    f->opts.journal_size = SPK_QUEUE_JOURNAL_MIN;
    f->opts.sync_always = true;
    fail_syncs = short_writes = fail_after_short = 0;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    spk_journal_fdatasync_fn = fdatasync;
    spk_journal_pwrite_fn = real_pwrite;
    spk_journal_recover_retry_ns = 100 * 1000000ull;
    fail_syncs = short_writes = fail_after_short = 0;
    qtest_fixture_free(*state);
    return 0;
}

static int send(fixture *f, const char *text, uint64_t *seq)
{
    spk_errbuf eb = {{0}};
    int rc = spk_queue_send(f->q, 1, "edge-f", text, strlen(text), NULL, NULL, 0, false, -1,
                            seq, NULL, &eb);
    if (rc != 0)
        print_message("send %s: %s\n", text, eb.msg);
    return rc;
}

/* The payloads of every pending record, in order, joined by spaces. */
static void pending_texts(fixture *f, char *out, size_t cap)
{
    spk_queue_batch b;
    qtest_read_all(f, &b);
    out[0] = '\0';
    for (size_t i = 0; i < b.n; i++) {
        assert_int_equal(b.items[i].status, 0);
        Spoke__Control__V1__EdgePayload *ep = spoke__control__v1__edge_payload__unpack(
            NULL, b.items[i].wire_len, b.items[i].wire);
        assert_non_null(ep);
        snprintf(out + strlen(out), cap - strlen(out), "%s%.*s", i ? " " : "",
                 (int)ep->payload.len, (const char *)ep->payload.data);
        spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    }
    spk_queue_batch_free(&b);
}

static void test_failed_flush_latches(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spk_journal_fdatasync_fn = faulty_fdatasync;
    uint64_t seq = 0;
    assert_int_equal(send(f, "A", &seq), 0);
    assert_int_equal(seq, 1);
    fail_syncs = 1;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, "edge-f", "B", 1, NULL, NULL, 0, false, -1, NULL,
                                    NULL, &eb),
                     SPK_EQUEUE_UNAVAILABLE);
    assert_non_null(strstr(eb.msg, "will not be sent"));
    /* The next flush would succeed, but must not vouch for B: appends are refused until
     * the journal is rebuilt, which an append tries only once in a while (here: not
     * before we say so, however slow the machine). */
    spk_journal_recover_retry_ns = UINT64_MAX;
    assert_int_equal(send(f, "C", NULL), SPK_EQUEUE_UNAVAILABLE);
    /* B is not moved into LMDB meanwhile (a read moves everything it may). */
    char texts[256];
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "A");
    /* A recovery that cannot flush its own work keeps the latch. */
    spk_journal_recover_retry_ns = 0;
    fail_syncs = 1;
    assert_int_equal(send(f, "D", NULL), SPK_EQUEUE_UNAVAILABLE);
    assert_int_equal(fail_syncs, 0); /* the recovery was tried, and its flush failed */
    assert_int_equal(send(f, "E", &seq), 0);
    assert_true(seq > 2);
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "A E"); /* B, C and D were refused, and are not sent */
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 2);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    /* and it stays so across a reopen */
    qtest_open(f);
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "A E");
}

/* The process dies between the failed flush and a recovery: the next first open of the
 * queue drops what was not known to be on disk. */
static void test_failed_flush_then_reopen(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spk_journal_fdatasync_fn = faulty_fdatasync;
    assert_int_equal(send(f, "A", NULL), 0);
    fail_syncs = 1;
    assert_int_equal(send(f, "B", NULL), SPK_EQUEUE_UNAVAILABLE);
    qtest_open(f); /* closes our handle first: the open is the first again */
    char texts[256];
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "A");
    uint64_t seq = 0;
    assert_int_equal(send(f, "C", &seq), 0);
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "A C");
}

static void test_short_pwrite(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spk_journal_pwrite_fn = faulty_pwrite;
    short_writes = 1;
    uint64_t seq = 0;
    assert_int_equal(send(f, "a record written in two pieces", &seq), 0);
    assert_int_equal(short_writes, 0);
    /* a short write, then a real failure: its own code, and nothing stored */
    short_writes = 1;
    fail_after_short = 1;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, "edge-f", "lost", 4, NULL, NULL, 0, false, -1,
                                    NULL, NULL, &eb),
                     SPK_EIO);
    assert_non_null(strstr(eb.msg, "Input/output error"));
    char texts[256]; /* no faults left: it writes */
    assert_int_equal(send(f, "after", NULL), 0);
    pending_texts(f, texts, sizeof(texts));
    assert_string_equal(texts, "a record written in two pieces after");
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

int main(void)
{
    real_pwrite = spk_journal_pwrite_fn;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_failed_flush_latches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_flush_then_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_short_pwrite, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
