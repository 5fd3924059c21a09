/*
 * test_store_damage.c -- records damaged inside LMDB (a stray write: LMDB keeps no
 * checksums), as fuzz/fuzz_queue_store.c makes them, replayed as unit tests:
 *   - a value replaced by a valid record with an empty EdgePayload (24 bytes, CRC right):
 *     the reader copied its zero wire bytes to a NULL buffer (undefined behaviour, caught
 *     by UBSan in the sanitizer build; found by fuzz_queue_store);
 *   - a value cut short of its header: verify reports it, the reader marks it, an ack
 *     removes it and the queue verifies clean again;
 *   - a damaged header's timestamp far in the past: the oldest age was `now - ts` in
 *     int64_t, which overflowed (UB; found by fuzz_queue_store); it is the largest age.
 */
#include "qtest.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "queue.h"
#include "queue_int.h"

/* Replace the LMDB value of `seq` with val[0..len), counters untouched. */
static void overwrite(spk_queue *q, uint64_t seq, const void *val, size_t len)
{
    MDB_txn *txn;
    uint8_t key[8];
    spk_be64(key, seq);
    MDB_val k = {8, key}, v = {len, (void *)val};
    assert_int_equal(spk_store_txn_begin(q, 0, &txn), 0);
    assert_int_equal(mdb_put(txn, q->pending, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
}

static uint64_t send_one(qtest_fixture *f)
{
    uint64_t seq;
    spk_errbuf eb;
    assert_int_equal(spk_queue_send(f->q, 42, "edge-1", "abc", 3, NULL, NULL, 0, false, qtest_now,
                                    &seq, NULL, &eb),
                     0);
    assert_int_equal(spk_queue_sync(f->q, &eb), 0);
    return seq;
}

static void test_valid_record_with_empty_wire(void **state)
{
    (void)state;
    qtest_fixture *f = qtest_fixture_new("store-damage-empty", NULL);
    qtest_open(f);
    uint64_t seq = send_one(f);
    struct rec_hdr h = {REC_MAGIC, 0, 42, 0, qtest_now};
    h.crc = spk_rec_crc(&h, NULL, 0);
    overwrite(f->q, seq, &h, sizeof(h));
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 1);
    assert_int_equal(b.items[0].status, 0); /* a record, if an odd one */
    assert_int_equal(b.items[0].wire_len, 0);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    qtest_fixture_free(f);
}

static void test_value_cut_short(void **state)
{
    (void)state;
    qtest_fixture *f = qtest_fixture_new("store-damage-short", NULL);
    qtest_open(f);
    uint64_t seq = send_one(f);
    overwrite(f->q, seq, "SPQ1", 4);
    uint64_t bad = 0;
    spk_errbuf eb;
    assert_int_equal(spk_queue_verify(f->q, &bad, &eb), SPK_ECORRUPT);
    assert_int_equal(bad, 1);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 1);
    assert_int_equal(b.items[0].status, SPK_ECORRUPT);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, &eb), 0);
    assert_int_equal(st.pending, 0);
    spk_queue_stats_free(&st);
    qtest_fixture_free(f);
}

static void test_timestamp_far_in_the_past(void **state)
{
    (void)state;
    qtest_fixture *f = qtest_fixture_new("store-damage-ts", NULL);
    qtest_open(f);
    uint64_t seq = send_one(f);
    struct rec_hdr h = {REC_MAGIC, 0, 42, 0, INT64_MIN + 1};
    h.crc = spk_rec_crc(&h, NULL, 0);
    overwrite(f->q, seq, &h, sizeof(h));
    spk_queue_stats st;
    spk_errbuf eb;
    assert_int_equal(spk_queue_stats_get(f->q, &st, &eb), 0);
    assert_int_equal(st.oldest_seq, seq);
    assert_true(st.oldest_age_ms == INT64_MAX);
    spk_queue_stats_free(&st);
    qtest_fixture_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_record_with_empty_wire),
        cmocka_unit_test(test_value_cut_short),
        cmocka_unit_test(test_timestamp_far_in_the_past),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
