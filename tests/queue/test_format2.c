/*
 * test_format2.c -- a queue written by the format-2 code (segment files for large records,
 * tests/queue/fixtures/format2: real files that code wrote, see its README) is opened by
 * the current code: the records kept in segment files are moved into LMDB, every pending
 * record reads back byte-exact and in order, the acknowledged ones stay gone, the counters
 * agree, the segment files are deleted, and the queue goes on (sequence numbers, acks,
 * reopen). The fixture is copied first: it is never written.
 */
#include "qtest.h"

#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "format2.h"
#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

typedef qtest_fixture fixture;

static const char *const fixture_files[] = {"data.mdb", "seg-0000000000000000"};

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("fmt2", "q");
    assert_int_equal(mkdir(f->dir, 0700), 0);
    for (size_t i = 0; i < sizeof(fixture_files) / sizeof(fixture_files[0]); i++) {
        char from[600], to[700];
        size_t len;
        snprintf(from, sizeof(from), "%s/%s", FMT2_FIXTURE, fixture_files[i]);
        snprintf(to, sizeof(to), "%s/%s", f->dir, fixture_files[i]);
        uint8_t *buf = qtest_slurp(from, &len);
        FILE *fp = fopen(to, "wb");
        assert_non_null(fp);
        assert_int_equal(fwrite(buf, 1, len, fp), len);
        fclose(fp);
        free(buf);
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    qtest_fixture_free(*state);
    return 0;
}

static size_t seg_files(const fixture *f)
{
    DIR *d = opendir(f->dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        n += strncmp(de->d_name, "seg-", 4) == 0 || strncmp(de->d_name, "spare-", 6) == 0;
    closedir(d);
    return n;
}

/* Check that item `it` is fixture record `seq`, as format2.h says it was sent. */
static void check_record(const spk_queue_item *it, uint64_t seq)
{
    assert_int_equal(it->status, 0);
    assert_int_equal(it->seq, seq);
    assert_int_equal(it->plugin_id, (uint32_t)(seq % 3) + 1);
    assert_int_equal(it->edge_timestamp_ms, FMT2_T0 + (int64_t)seq);
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    assert_non_null(ep);
    assert_int_equal(ep->sequence, seq);
    assert_int_equal(ep->plugin_id, (uint32_t)(seq % 3) + 1);
    assert_string_equal(ep->edge_id, FMT2_EDGE);
    size_t len = fmt2_len(seq);
    assert_int_equal(ep->payload.len, len);
    for (size_t i = 0; i < len; i++)
        if (ep->payload.data[i] != fmt2_byte(seq, i))
            fail_msg("seq %llu: payload byte %zu differs", (unsigned long long)seq, i);
    char want[32];
    snprintf(want, sizeof(want), "c-%llu", (unsigned long long)seq);
    assert_string_equal(ep->correlation_id, seq % 2 == 0 ? want : "");
    if (seq % 3 == 0) {
        snprintf(want, sizeof(want), "v-%llu", (unsigned long long)seq);
        assert_int_equal(ep->n_metadata, 1);
        assert_string_equal(ep->metadata[0]->key, "k");
        assert_string_equal(ep->metadata[0]->value, want);
    } else {
        assert_int_equal(ep->n_metadata, 0);
    }
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
}

static void test_format2_opened_and_read(void **state)
{
    fixture *f = *state;
    assert_int_equal(seg_files(f), 1); /* what the old code left: its records are there */
    qtest_open(f);
    assert_int_equal(seg_files(f), 0); /* moved into LMDB, then deleted */
    uint64_t bad = 9;
    spk_errbuf eb = {{0}};
    if (spk_queue_verify(f->q, &bad, &eb) != 0)
        fail_msg("verify after the upgrade: %s", eb.msg);
    assert_int_equal(bad, 0);

    spk_queue_batch b;
    qtest_read_all(f, &b);
    size_t k = 0;
    for (uint64_t seq = 1; seq <= FMT2_RECORDS; seq++) {
        if (fmt2_acked(seq))
            continue;
        assert_true(k < b.n);
        check_record(&b.items[k++], seq);
    }
    assert_int_equal(b.n, k);
    uint64_t wire = 0;
    for (size_t i = 0; i < b.n; i++)
        wire += spk_queue_record_size(b.items[i].wire_len);
    spk_queue_batch_free(&b);

    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, k);
    assert_int_equal(st.pending_bytes, wire); /* the old counters still agree */
    assert_int_equal(st.acked, 3);
    assert_int_equal(st.next_seq, FMT2_RECORDS + 1);
    uint64_t per_plugin = 0;
    for (size_t i = 0; i < st.n_plugins; i++)
        per_plugin += st.plugins[i].pending;
    assert_int_equal(per_plugin, k);
    spk_queue_stats_free(&st);

    /* it goes on: a new record takes the next sequence number, a reopen changes nothing */
    uint64_t seq = 0;
    assert_int_equal(spk_queue_send(f->q, 1, FMT2_EDGE, "after", 5, NULL, NULL, 0, false, -1,
                                    &seq, NULL, NULL),
                     0);
    assert_int_equal(seq, FMT2_RECORDS + 1);
    qtest_open(f);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, k + 1);
    check_record(&b.items[0], 1);
    assert_int_equal(b.items[k].seq, FMT2_RECORDS + 1);
    /* acknowledged records of old segments go like any other */
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    qtest_open(f);
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

/* A segment file lost before the upgrade: its records are reported damaged, never
 * delivered as something else and never silently dropped; the others read as before. */
static void test_format2_lost_segment(void **state)
{
    fixture *f = *state;
    char path[700];
    snprintf(path, sizeof(path), "%s/seg-0000000000000000", f->dir);
    assert_int_equal(unlink(path), 0);
    qtest_open(f);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, FMT2_RECORDS - 3);
    size_t k = 0, damaged = 0;
    for (uint64_t seq = 1; seq <= FMT2_RECORDS; seq++) {
        if (fmt2_acked(seq))
            continue;
        const spk_queue_item *it = &b.items[k++];
        assert_int_equal(it->seq, seq);
        if (it->status == 0) {
            check_record(it, seq);
        } else {
            assert_int_equal(it->status, SPK_ECORRUPT);
            damaged++;
        }
    }
    assert_true(damaged > 0); /* the large ones */
    uint64_t bad = 0;
    assert_int_equal(spk_queue_verify(f->q, &bad, NULL), SPK_ECORRUPT);
    assert_int_equal(bad, damaged);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_format2_opened_and_read, setup, teardown),
        cmocka_unit_test_setup_teardown(test_format2_lost_segment, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
