/*
 * test_queue.c -- unit tests of queue/: limits at their boundaries, queue full, ordering,
 * partial acks, expiry with a test clock, reopen, map full and disk full with recovery,
 * CRC detection, and the JSON/UTF-8 validators of core/json.c. Sends go through the
 * host's send_to_control below the plugin's context (spk_host_queue_send: the host's
 * UTF-8/JSON policy, then the queue), so the codes asserted are those a plugin gets; that
 * the queue alone stores what it is given is test_queue_stores_as_given.
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
#include <sys/mount.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cmocka.h>

#include "host.h"
#include "json.h"
#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

typedef qtest_fixture fixture;

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("queue", NULL);
    f->opts.map_size = 64ull * 1024 * 1024;
    f->opts.journal_size = SPK_QUEUE_JOURNAL_MIN;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    qtest_close(f);
    char mnt[600];
    snprintf(mnt, sizeof(mnt), "%s/tmpfs", f->root); /* f->dir may point into it */
    umount2(mnt, MNT_DETACH); /* test_disk_full_tmpfs, if it failed half-way */
    qtest_fixture_free(f);
    return 0;
}

static int send_raw(fixture *f, uint32_t plugin, const void *p, size_t len, const char *corr,
                    const spoke_kv *md, size_t n, uint64_t *seq, uint64_t *pending)
{
    spk_errbuf eb = {{0}};
    return spk_host_queue_send(f->q, plugin, "edge-1", p, len, corr, md, n, false, -1, seq,
                               pending, &eb);
}

static char *filled(size_t n, char c)
{
    char *s = malloc(n + 1);
    assert_non_null(s);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* ---- limits ------------------------------------------------------------------------- */

static void test_payload_limit(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    char *p = filled(SPOKE_MAX_PAYLOAD + 1, 'p');
    uint64_t seq = 0, pending = 0;
    assert_int_equal(send_raw(f, 1, p, SPOKE_MAX_PAYLOAD, NULL, NULL, 0, &seq, &pending), 0);
    assert_int_equal(seq, 1);
    assert_int_equal(pending, 1);
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, NULL, p, SPOKE_MAX_PAYLOAD + 1, NULL, NULL, 0,
                                    false, -1, &seq, &pending, &eb),
                     SPK_EPAYLOAD_TOO_LARGE);
    assert_non_null(strstr(eb.msg, "limit"));
    /* empty payloads are fine */
    assert_int_equal(send_raw(f, 1, NULL, 0, NULL, NULL, 0, &seq, &pending), 0);
    assert_int_equal(seq, 2);
    free(p);
}

static void test_metadata_limits(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spoke_kv md[SPOKE_MAX_METADATA + 1];
    for (size_t i = 0; i <= SPOKE_MAX_METADATA; i++) {
        md[i].key = "k";
        md[i].value = "v";
    }
    assert_int_equal(send_raw(f, 1, "x", 1, NULL, md, SPOKE_MAX_METADATA, NULL, NULL), 0);
    assert_int_equal(send_raw(f, 1, "x", 1, NULL, md, SPOKE_MAX_METADATA + 1, NULL, NULL),
                     SPK_ETOO_MANY_METADATA);

    char *k256 = filled(256, 'k'), *k257 = filled(257, 'k');
    char *v4096 = filled(4096, 'v'), *v4097 = filled(4097, 'v');
    char *c256 = filled(256, 'c'), *c257 = filled(257, 'c');
    spoke_kv one = {k256, v4096};
    assert_int_equal(send_raw(f, 1, "x", 1, c256, &one, 1, NULL, NULL), 0);
    one.key = k257;
    assert_int_equal(send_raw(f, 1, "x", 1, NULL, &one, 1, NULL, NULL), SPK_EMETADATA_KEY);
    one.key = k256;
    one.value = v4097;
    assert_int_equal(send_raw(f, 1, "x", 1, NULL, &one, 1, NULL, NULL), SPK_EMETADATA_VALUE);
    assert_int_equal(send_raw(f, 1, "x", 1, c257, NULL, 0, NULL, NULL), SPK_ECORRELATION_ID);

    /* NULL key, invalid UTF-8 */
    spoke_kv bad = {NULL, "v"};
    assert_int_equal(send_raw(f, 1, "x", 1, NULL, &bad, 1, NULL, NULL), SPK_EINVAL);
    assert_int_equal(send_raw(f, 1, "x", 1, "\xff\xfe", NULL, 0, NULL, NULL), SPK_EINVAL);

    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 2);
    assert_int_equal(st.refused_invalid, 6);
    spk_queue_stats_free(&st);
    free(k256), free(k257), free(v4096), free(v4097), free(c256), free(c257);
}

static void test_full_by_count(void **state)
{
    fixture *f = *state;
    f->opts.max_pending = 3;
    qtest_open(f);
    uint64_t pending = 0;
    for (int i = 0; i < 3; i++)
        assert_int_equal(send_raw(f, 1, "abc", 3, NULL, NULL, 0, NULL, &pending), 0);
    assert_int_equal(pending, 3);
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, NULL, "abc", 3, NULL, NULL, 0, false, -1, NULL,
                                    NULL, &eb),
                     SPK_EQUEUE_FULL);
    assert_non_null(strstr(eb.msg, "max_pending"));
    uint64_t one = 1;
    assert_int_equal(spk_queue_ack(f->q, &one, 1, NULL, NULL), 0);
    assert_int_equal(send_raw(f, 1, "abc", 3, NULL, NULL, 0, NULL, &pending), 0);
    assert_int_equal(pending, 3);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.refused_full, 1);
    spk_queue_stats_free(&st);
}

static void test_full_by_bytes(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "0123456789", 10, NULL, NULL, 0, NULL, NULL), 0);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    uint64_t b = st.pending_bytes; /* one record; the next ones have the same size */
    spk_queue_stats_free(&st);
    assert_true(b > SPK_QUEUE_RECORD_OVERHEAD + 10);

    /* exactly at the limit: accepted */
    f->opts.max_bytes = 2 * b;
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "0123456789", 10, NULL, NULL, 0, NULL, NULL), 0);
    assert_int_equal(send_raw(f, 1, "0123456789", 10, NULL, NULL, 0, NULL, NULL),
                     SPK_EQUEUE_FULL);
    /* one byte short of room: refused */
    uint64_t seqs[] = {1, 2};
    assert_int_equal(spk_queue_ack(f->q, seqs, 2, NULL, NULL), 0);
    f->opts.max_bytes = 2 * b - 1;
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "0123456789", 10, NULL, NULL, 0, NULL, NULL), 0);
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_send(f->q, 1, "edge-1", "0123456789", 10, NULL, NULL, 0, false,
                                    -1, NULL, NULL, &eb),
                     SPK_EQUEUE_FULL);
    assert_non_null(strstr(eb.msg, "max_bytes"));
}

/* ---- ordering, decoding, acks, expiry, reopen -------------------------------------- */

static void test_order_and_wire(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spoke_kv md[] = {{"zeta", "1"}, {"alpha", "2"}, {"mid", "3"}};
    for (int i = 0; i < 10; i++) {
        char p[32], c[32];
        int n = snprintf(p, sizeof(p), "payload-%d", i);
        snprintf(c, sizeof(c), "corr-%d", i);
        qtest_now += 5;
        uint64_t seq;
        assert_int_equal(send_raw(f, 40 + (uint32_t)i % 2, p, (size_t)n, c, md, 3, &seq, NULL),
                         0);
        assert_int_equal(seq, (uint64_t)i + 1);
    }
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, 4, 0, &b, NULL), 0);
    assert_int_equal(b.n, 4);
    for (size_t i = 0; i < b.n; i++) {
        assert_int_equal(b.items[i].seq, i + 1);
        assert_int_equal(b.items[i].status, 0);
        Spoke__Control__V1__EdgePayload *ep =
            spoke__control__v1__edge_payload__unpack(NULL, b.items[i].wire_len,
                                                     b.items[i].wire);
        assert_non_null(ep);
        char p[32], c[32];
        snprintf(p, sizeof(p), "payload-%zu", i);
        snprintf(c, sizeof(c), "corr-%zu", i);
        assert_int_equal(ep->sequence, i + 1);
        assert_int_equal(ep->plugin_id, 40 + i % 2);
        assert_int_equal(b.items[i].plugin_id, 40 + i % 2);
        assert_int_equal(ep->payload.len, strlen(p));
        assert_memory_equal(ep->payload.data, p, strlen(p));
        assert_string_equal(ep->correlation_id, c);
        assert_string_equal(ep->edge_id, "edge-1");
        assert_string_equal(ep->content_type, "");
        assert_int_equal(ep->edge_timestamp_ms, QTEST_T0 + 5 * ((int64_t)i + 1));
        assert_int_equal(ep->n_metadata, 3);
        for (size_t k = 0; k < 3; k++) {
            assert_string_equal(ep->metadata[k]->key, md[k].key);
            assert_string_equal(ep->metadata[k]->value, md[k].value);
        }
        spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    }
    spk_queue_batch_free(&b);

    /* the byte limit stops a batch but always returns the first record */
    assert_int_equal(spk_queue_read(f->q, 100, 1, &b, NULL), 0);
    assert_int_equal(b.n, 1);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_read(f->q, 100, 0, &b, NULL), 0);
    assert_int_equal(b.n, 10);
    spk_queue_batch_free(&b);
}

static void test_ack_partial(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    for (int i = 0; i < 6; i++)
        assert_int_equal(send_raw(f, i < 3 ? 7 : 8, "data", 4, NULL, NULL, 0, NULL, NULL), 0);
    uint64_t acks[] = {2, 4, 99, 2, 0};
    size_t acked = 0;
    assert_int_equal(spk_queue_ack(f->q, acks, 5, &acked, NULL), 0);
    assert_int_equal(acked, 2);
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, 100, 0, &b, NULL), 0);
    uint64_t want[] = {1, 3, 5, 6};
    assert_int_equal(b.n, 4);
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(b.items[i].seq, want[i]);
    spk_queue_batch_free(&b);

    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 4);
    assert_int_equal(st.acked, 2);
    assert_int_equal(st.n_plugins, 2);
    assert_int_equal(st.plugins[0].plugin_id, 7);
    assert_int_equal(st.plugins[0].pending, 2);
    assert_int_equal(st.plugins[1].plugin_id, 8);
    assert_int_equal(st.plugins[1].pending, 2);
    assert_int_equal(st.plugins[0].bytes + st.plugins[1].bytes, st.pending_bytes);
    spk_queue_stats_free(&st);

    /* acking everything empties counters and per-plugin entries */
    assert_int_equal(spk_queue_ack(f->q, want, 4, &acked, NULL), 0);
    assert_int_equal(acked, 4);
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.n_plugins, 0);
    assert_int_equal(st.oldest_age_ms, 0);
    spk_queue_stats_free(&st);
}

static void test_expiry(void **state)
{
    fixture *f = *state;
    f->opts.retention_ms = 1500;
    qtest_open(f);
    int64_t t0 = qtest_now;
    for (int i = 0; i < 3; i++) {
        qtest_now = t0 + 1000 * (i + 1);
        assert_int_equal(send_raw(f, 3, "e", 1, NULL, NULL, 0, NULL, NULL), 0);
    }
    uint64_t expired = 99;
    qtest_now = t0 + 2500; /* cutoff t0+1000: nothing older */
    assert_int_equal(spk_queue_expire(f->q, &expired, NULL), 0);
    assert_int_equal(expired, 0);
    qtest_now = t0 + 3600; /* cutoff t0+2100: the first two go */
    assert_int_equal(spk_queue_expire(f->q, &expired, NULL), 0);
    assert_int_equal(expired, 2);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 1);
    assert_int_equal(st.expired, 2);
    assert_int_equal(st.oldest_seq, 3);
    assert_int_equal(st.oldest_age_ms, 600);
    assert_int_equal(st.n_plugins, 1);
    assert_int_equal(st.plugins[0].pending, 1);
    spk_queue_stats_free(&st);
}

static void test_expiry_many(void **state)
{
    fixture *f = *state;
    f->opts.retention_ms = 10;
    qtest_open(f);
    for (int i = 0; i < 12000; i++)
        assert_int_equal(send_raw(f, 3, "e", 1, NULL, NULL, 0, NULL, NULL), 0);
    qtest_now += 11;
    uint64_t expired = 0;
    assert_int_equal(spk_queue_expire(f->q, &expired, NULL), 0);
    assert_int_equal(expired, 12000);
}

static void test_reopen_continues(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    uint64_t seq;
    for (int i = 0; i < 3; i++)
        assert_int_equal(send_raw(f, 1, "r", 1, NULL, NULL, 0, &seq, NULL), 0);
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "r", 1, NULL, NULL, 0, &seq, NULL), 0);
    assert_int_equal(seq, 4);
    uint64_t all[] = {1, 2, 3, 4};
    assert_int_equal(spk_queue_ack(f->q, all, 4, NULL, NULL), 0);
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "r", 1, NULL, NULL, 0, &seq, NULL), 0);
    assert_int_equal(seq, 5);
    uint64_t purged = 0;
    assert_int_equal(spk_queue_purge(f->q, &purged, NULL), 0);
    assert_int_equal(purged, 1);
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, "r", 1, NULL, NULL, 0, &seq, NULL), 0);
    assert_int_equal(seq, 6);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 1);
    assert_int_equal(st.purged, 1);
    assert_int_equal(st.next_seq, 7);
    spk_queue_stats_free(&st);
}

static void test_open_missing(void **state)
{
    fixture *f = *state;
    char path[600];
    snprintf(path, sizeof(path), "%s/nope", f->dir);
    spk_queue_opts o = f->opts;
    o.create = false;
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_open(path, &o, &q, &eb), SPK_ENOENT);
    assert_null(q);
    assert_non_null(strstr(eb.msg, "no queue"));
    /* create = true makes nested directories */
    snprintf(path, sizeof(path), "%s/a/b/c", f->dir);
    assert_int_equal(spk_queue_open(path, &f->opts, &q, &eb), 0);
    spk_queue_close(q);
}

static void test_json_send(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    const char *ok = "{\"hits\": 3, \"rate\": 0.5}";
    const char *bad = "{\"hits\": 3,}";
    uint64_t seq = 0;
    assert_int_equal(spk_host_queue_send(f->q, 9, NULL, ok, strlen(ok), NULL, NULL, 0, true, 5,
                                         &seq, NULL, NULL),
                     0);
    assert_int_equal(spk_host_queue_send(f->q, 9, NULL, bad, strlen(bad), NULL, NULL, 0, true,
                                         5, NULL, NULL, NULL),
                     SPK_ENOT_JSON);
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, 10, 0, &b, NULL), 0);
    assert_int_equal(b.n, 1);
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, b.items[0].wire_len, b.items[0].wire);
    assert_non_null(ep);
    assert_string_equal(ep->content_type, "application/json");
    assert_string_equal(ep->edge_id, "");
    assert_int_equal(ep->edge_timestamp_ms, 5);
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    spk_queue_batch_free(&b);
}

/* ---- map full, disk full, corruption ------------------------------------------------ */

/* Fill until refused; returns how many were accepted. */
static int fill_until_unavailable(fixture *f, const char *p, size_t len, spk_errbuf *eb)
{
    int n = 0;
    for (;;) {
        int rc = spk_queue_send(f->q, 1, NULL, p, len, NULL, NULL, 0, false, -1, NULL, NULL,
                                eb);
        if (rc != 0) {
            assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
            return n;
        }
        n++;
        assert_true(n < 1000000);
    }
}

static void ack_oldest(fixture *f, size_t n)
{
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, n, 0, &b, NULL), 0);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
}

/* After acks free pages, LMDB reuses them once no snapshot needs them: at most a couple
 * of commits later. */
static int send_with_retries(fixture *f, const char *p, size_t len)
{
    int rc = -1;
    spk_errbuf eb = {{0}};
    for (int i = 0; i < 3 && rc != 0; i++)
        rc = spk_queue_send(f->q, 1, NULL, p, len, NULL, NULL, 0, false, -1, NULL, NULL, &eb);
    if (rc != 0)
        print_message("send after recovery: %s\n", eb.msg);
    return rc;
}

static void test_map_full(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 256 * 1024;
    qtest_open(f);
    char *p = filled(3000, 'm');
    spk_errbuf eb = {{0}};
    int n = fill_until_unavailable(f, p, 3000, &eb);
    assert_true(n > 10);
    assert_non_null(strstr(eb.msg, "map is full"));
    /* 1 MiB does not fit either, cleanly */
    char *big = filled(SPOKE_MAX_PAYLOAD, 'b');
    assert_int_equal(send_raw(f, 1, big, SPOKE_MAX_PAYLOAD, NULL, NULL, 0, NULL, NULL),
                     SPK_EQUEUE_UNAVAILABLE);
    ack_oldest(f, (size_t)n / 2);
    assert_int_equal(send_with_retries(f, p, 3000), 0);
    /* A bigger map on the next open takes the 1 MiB payload. */
    f->opts.map_size = 8 * 1024 * 1024;
    qtest_open(f);
    assert_int_equal(send_raw(f, 1, big, SPOKE_MAX_PAYLOAD, NULL, NULL, 0, NULL, NULL), 0);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_true(st.refused_unavailable == 0); /* counters are per handle */
    spk_queue_stats_free(&st);
    free(p);
    free(big);
}

static void disk_full_tmpfs(fixture *f, size_t len);

/* 3000-byte records: LMDB keeps them in overflow pages, which fill the disk. */
static void test_disk_full_tmpfs(void **state)
{
    disk_full_tmpfs(*state, 3000);
}

/* 1000-byte records stay inline: LMDB's file fills the disk. */
static void test_disk_full_tmpfs_inline(void **state)
{
    disk_full_tmpfs(*state, 1000);
}

static void disk_full_tmpfs(fixture *f, size_t len)
{
    char mnt[600];
    snprintf(mnt, sizeof(mnt), "%s/tmpfs", f->root);
    assert_int_equal(mkdir(mnt, 0700), 0);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=24m") != 0) {
        print_message("SKIP disk-full on tmpfs: mount failed (%s); map-full test covers "
                      "the clean-error path\n", strerror(errno));
        skip();
    }
    char qdir[700];
    snprintf(qdir, sizeof(qdir), "%s/q", mnt);
    char *saved = f->dir;
    f->dir = strdup(qdir);
    assert_non_null(f->dir);
    f->opts.map_size = 64 * 1024 * 1024; /* the map is bigger than the disk */
    qtest_open(f);
    char *p = filled(len, 'd');
    spk_errbuf eb = {{0}};
    int n = fill_until_unavailable(f, p, len, &eb);
    assert_true(n > 10);
    assert_non_null(strstr(eb.msg, "disk full"));
    ack_oldest(f, (size_t)n / 2);
    assert_int_equal(send_with_retries(f, p, len), 0);
    /* and it still reopens */
    qtest_open(f);
    assert_int_equal(send_with_retries(f, p, len), 0);
    qtest_close(f);
    free(f->dir);
    f->dir = saved;
    umount2(mnt, MNT_DETACH);
    free(p);
}

static void test_crc_detects_damage(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    const char *canary = "CANARY-0123456789-abcdefghijklmnop";
    assert_int_equal(send_raw(f, 1, "before", 6, NULL, NULL, 0, NULL, NULL), 0);
    assert_int_equal(send_raw(f, 1, canary, strlen(canary), NULL, NULL, 0, NULL, NULL), 0);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0); /* from the journal into LMDB */
    qtest_close(f);

    char path[600];
    snprintf(path, sizeof(path), "%s/data.mdb", f->dir);
    long hit = qtest_file_find(path, canary, strlen(canary));
    assert_true(hit >= 0);
    qtest_file_poke(path, hit + 7, "X", 1);

    qtest_open(f);
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, 10, 0, &b, NULL), 0);
    assert_int_equal(b.n, 2);
    assert_int_equal(b.items[0].status, 0);
    assert_int_equal(b.items[1].status, SPK_ECORRUPT);
    assert_int_equal(b.items[1].seq, 2);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), SPK_ECORRUPT);
    uint64_t two = 2;
    size_t acked = 0;
    assert_int_equal(spk_queue_ack(f->q, &two, 1, &acked, NULL), 0);
    assert_int_equal(acked, 1);
}

/* The queue itself stores what it is given: text that is not UTF-8 or not JSON is the
 * host's business (spk_host_queue_send refuses it), and comes back byte for byte. */
static void test_queue_stores_as_given(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    spoke_kv md = {"k\xff", "v\xfe"};
    uint64_t seq = 0;
    assert_int_equal(spk_queue_send(f->q, 3, "edge-\xc0", "{not json", 9, "c\xff", &md, 1,
                                    true, 5, &seq, NULL, NULL),
                     0);
    assert_int_equal(seq, 1);
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, 10, 0, &b, NULL), 0);
    assert_int_equal(b.n, 1);
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, b.items[0].wire_len, b.items[0].wire);
    assert_non_null(ep);
    assert_int_equal(ep->payload.len, 9);
    assert_memory_equal(ep->payload.data, "{not json", 9);
    assert_string_equal(ep->correlation_id, "c\xff");
    assert_string_equal(ep->edge_id, "edge-\xc0");
    assert_string_equal(ep->content_type, "application/json");
    assert_int_equal(ep->n_metadata, 1);
    assert_string_equal(ep->metadata[0]->key, "k\xff");
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    spk_queue_batch_free(&b);
    /* the queue's own limits still hold */
    char *big = filled(SPOKE_MAX_PAYLOAD + 1, 'x');
    assert_int_equal(spk_queue_send(f->q, 3, NULL, big, SPOKE_MAX_PAYLOAD + 1, NULL, NULL, 0,
                                    false, 5, NULL, NULL, NULL),
                     SPK_EPAYLOAD_TOO_LARGE);
    free(big);
}

/* The one sync policy: interval syncs are due after opts.sync_interval_ms, `always` ones
 * never for time; either is due once the journal is SPK_QUEUE_SYNC_FILL full. */
static void test_sync_due(void **state)
{
    fixture *f = *state;
    f->opts.sync_interval_ms = 250;
    qtest_open(f);
    assert_false(spk_queue_sync_due(NULL, 1000));
    assert_false(spk_queue_sync_due(f->q, 0));
    assert_false(spk_queue_sync_due(f->q, 249));
    assert_true(spk_queue_sync_due(f->q, 250));
    f->opts.sync_always = true;
    qtest_open(f);
    assert_false(spk_queue_sync_due(f->q, UINT64_MAX));
    /* fill a quarter of the (4 MiB) journal: due for space, whatever the time */
    char *p = filled(64 * 1024, 'f');
    while (spk_queue_journal_fill(f->q) < SPK_QUEUE_SYNC_FILL)
        assert_int_equal(send_raw(f, 1, p, 64 * 1024, NULL, NULL, 0, NULL, NULL), 0);
    assert_true(spk_queue_sync_due(f->q, 0));
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    assert_false(spk_queue_sync_due(f->q, 0));
    free(p);
}

/* A sync that fails (the map is full) is not retried on every poll: the next is due
 * SPK_QUEUE_SYNC_RETRY_MIN_MS later, doubling per failure to SPK_QUEUE_SYNC_RETRY_MAX_MS,
 * whatever the journal's fill; the first sync that works ends the backoff. */
static void test_sync_backoff(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 256 * 1024;
    qtest_open(f);
    char *p = filled(3000, 's');
    spk_errbuf eb = {{0}};
    int n = fill_until_unavailable(f, p, 3000, &eb);
    assert_true(spk_queue_journal_fill(f->q) >= SPK_QUEUE_SYNC_FILL);
    assert_true(spk_queue_sync_due(f->q, 0));
    assert_int_equal(spk_queue_sync_failures(f->q), 0);
    uint64_t want = SPK_QUEUE_SYNC_RETRY_MIN_MS;
    for (unsigned k = 1; k <= 10; k++) {
        assert_int_equal(spk_queue_sync(f->q, &eb), SPK_EQUEUE_UNAVAILABLE);
        assert_int_equal(spk_queue_sync_failures(f->q), k);
        assert_int_equal(spk_queue_sync_retry_ms(f->q), want);
        /* the journal is still full, and an interval has passed: not due yet */
        assert_false(spk_queue_sync_due(f->q, SPK_QUEUE_SYNC_POLL_MS));
        assert_false(spk_queue_sync_due(f->q, want - 1));
        assert_true(spk_queue_sync_due(f->q, want));
        want = want * 2 < SPK_QUEUE_SYNC_RETRY_MAX_MS ? want * 2 : SPK_QUEUE_SYNC_RETRY_MAX_MS;
    }
    assert_int_equal(spk_queue_sync_retry_ms(f->q), SPK_QUEUE_SYNC_RETRY_MAX_MS);
    /* room again: the next sync works and the policy is the usual one */
    ack_oldest(f, (size_t)n);
    assert_int_equal(spk_queue_sync(f->q, &eb), 0);
    assert_int_equal(spk_queue_sync_failures(f->q), 0);
    assert_int_equal(spk_queue_sync_retry_ms(f->q), 0);
    assert_true(spk_queue_sync_due(f->q, f->opts.sync_interval_ms));
    free(p);
}

/* A queue path longer than the queue's buffers is refused, never truncated. */
static void test_path_too_long(void **state)
{
    fixture *f = *state;
    size_t n = 5000;
    char *path = malloc(n + 1);
    assert_non_null(path);
    int len = snprintf(path, n + 1, "%s/", f->root);
    memset(path + len, 'd', n - (size_t)len);
    path[n] = '\0';
    for (size_t i = (size_t)len + 200; i < n; i += 200)
        path[i] = '/'; /* components the file system takes */
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_open(path, &f->opts, &q, &eb), SPK_EINVAL);
    assert_null(q);
    assert_non_null(strstr(eb.msg, "path is 5000 bytes long"));
    free(path);
}

/* Two processes enqueue at once with sync always: every call that returned 0 is there,
 * and the group sync let some commits ride on another caller's flush. */
static void test_always_two_processes(void **state)
{
    fixture *f = *state;
    f->opts.sync_always = true;
    f->opts.clock = NULL;
    pid_t kids[2];
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        assert_true(kids[i] >= 0);
        if (kids[i] == 0) {
            spk_queue *q = qtest_child_open(f);
            for (int n = 0; n < 20; n++)
                if (spk_queue_send(q, 7, "e", "x", 1, NULL, NULL, 0, false, -1, NULL, NULL,
                                   NULL) != 0)
                    _exit(2);
            spk_queue_close(q);
            _exit(0);
        }
    }
    for (int i = 0; i < 2; i++)
        qtest_expect_exit0(kids[i], "writer");
    qtest_open(f);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 40);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

/* ---- JSON / UTF-8 ------------------------------------------------------------------- */

static void test_json_validator(void **state)
{
    (void)state;
    static const char *good[] = {
        "0", "-0", "1.5e10", "-1.25E-3", "true", "false", "null", "\"\"", "\"a\\u00e9\\n\"",
        "[]", "{}", " [1, 2 ,3] ", "{\"a\":{\"b\":[null,{}]}}", "\"caf\xc3\xa9\"",
        "\"\xf0\x9f\x98\x80\"", "\"\\ud800\"", "\t\r\n{\"k\" : \"v\"}\n",
    };
    static const char *bad[] = {
        "", " ", "01", "1.", ".5", "-", "1e", "+1", "tru", "nul", "True", "[1,]", "[,1]",
        "{\"a\"}", "{\"a\":}", "{a:1}", "{\"a\":1,}", "[1 2]", "\"abc", "\"\\x\"",
        "\"\\u12g4\"", "\"a\tb\"", "[1]]", "1 2", "{} {}", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"",
        "\"\xff\"", "[", "{", "NaN", "'a'", "\xef\xbb\xbf{}",
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (!spk_json_valid(good[i], strlen(good[i])))
            fail_msg("valid JSON refused: %s", good[i]);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (spk_json_valid(bad[i], strlen(bad[i])))
            fail_msg("invalid JSON accepted: %s", bad[i]);
    /* an embedded NUL byte */
    assert_false(spk_json_valid("\"a\0b\"", 5));
    assert_false(spk_json_valid("1\0", 2));
    assert_false(spk_json_valid(NULL, 0));
    /* length is respected: "12" with len 1 is "1" */
    assert_true(spk_json_valid("12x", 2));

    /* depth limit */
    size_t deep = SPK_JSON_MAX_DEPTH + 1;
    char *s = malloc(2 * deep);
    assert_non_null(s);
    memset(s, '[', deep);
    memset(s + deep, ']', deep);
    assert_false(spk_json_valid(s, 2 * deep));
    assert_true(spk_json_valid(s + 1, 2 * (deep - 1)));
    free(s);

    assert_true(spk_utf8_valid("plain", 5));
    assert_true(spk_utf8_valid("\xf4\x8f\xbf\xbf", 4));
    assert_false(spk_utf8_valid("\xf4\x90\x80\x80", 4));
    assert_false(spk_utf8_valid("\xe2\x82", 2));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_payload_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metadata_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_by_count, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_by_bytes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_and_wire, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ack_partial, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry_many, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen_continues, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_json_send, setup, teardown),
        cmocka_unit_test_setup_teardown(test_map_full, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_backoff, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disk_full_tmpfs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disk_full_tmpfs_inline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crc_detects_damage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_always_two_processes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queue_stores_as_given, setup, teardown),
        cmocka_unit_test_setup_teardown(test_path_too_long, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_due, setup, teardown),
        cmocka_unit_test(test_json_validator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
