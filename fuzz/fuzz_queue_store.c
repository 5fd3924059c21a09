/*
 * fuzz_queue_store.c -- `spoke-queue verify` and the readers on damaged LMDB values.
 *
 * LMDB keeps no checksums: a stray write of plugin code, or a disk, can change a stored
 * record's bytes (queue/record.c says why each record carries a CRC). The harness keeps
 * one queue open; per input it empties it, sends three real records (spk_queue_send) and
 * syncs them into LMDB, then overwrites one record's value with the input through the
 * queue's own LMDB handle, leaving the counters as they were -- damage. Then what
 * spoke-queue verify, stats, expiry and the uplink do: verify, stats, expire, read every
 * record in pages, decode the good ones, ack them all.
 *
 * Input: [which][flags][value]: record `which % 3` gets `value`; with flags bit 0 the
 * harness first makes the value's header consistent (magic, length, CRC) so mutations go
 * past the CRC into the decoder and the counters.
 * Oracles: verify passes when the value is what was there, and reports SPK_ECORRUPT with
 * a damaged record when the value is not a valid record; a reader marks such a record
 * (status SPK_ECORRUPT) and never hands it out as good; after every record read is
 * acknowledged nothing is pending.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "queue_int.h"

#define N_REC 3

static char dir[256];
static spk_queue *q;

static void fail(const char *what, const char *why)
{
    fprintf(stderr, "fuzz_queue_store: %s: %s\n", what, why);
    abort();
}

static void cleanup(void)
{
    if (q != NULL)
        spk_queue_close(q);
    static const char *const files[] = {"data.mdb", "lock.mdb", "journal.ctl", "journal"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char file[300];
        snprintf(file, sizeof(file), "%s/%s", dir, files[i]);
        unlink(file);
    }
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(dir, sizeof(dir), "%s/spoke-fuzz-store.XXXXXX", base);
    if (mkdtemp(dir) == NULL)
        fail("mkdtemp", strerror(errno));
    atexit(cleanup);
    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.journal_size = SPK_QUEUE_JOURNAL_MIN;
    o.map_size = 64u << 20;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(dir, &o, &q, &eb) != 0)
        fail("spk_queue_open", eb.msg);
    return 0;
}

/* Three records as a plugin sends them: JSON with metadata, empty, binary. */
static void send_three(uint64_t seqs[N_REC])
{
    const spoke_kv md[] = {{"model", "gpt-4o"}, {"route", "/v1/chat"}};
    static const struct {
        const char *p;
        size_t len;
        bool json;
    } r[N_REC] = {{"{\"hits\":3}", 10, true}, {"", 0, false}, {"\x00\x01\xff", 3, false}};
    for (int i = 0; i < N_REC; i++) {
        spk_errbuf eb = {{0}};
        if (spk_queue_send(q, 42 + (uint32_t)i, "edge-1", r[i].p, r[i].len, "corr", md,
                           i == 0 ? 2 : 0, r[i].json, spk_queue_now_ms(q), &seqs[i], NULL,
                           &eb) != 0)
            fail("spk_queue_send", eb.msg);
    }
    spk_errbuf eb = {{0}};
    if (spk_queue_sync(q, &eb) != 0)
        fail("spk_queue_sync", eb.msg);
}

/* Replace the value of `seq` in LMDB, counters untouched; returns whether it changed. */
static bool damage(uint64_t seq, const uint8_t *val, size_t len)
{
    MDB_txn *txn;
    uint8_t key[8];
    spk_be64(key, seq);
    MDB_val k = {8, key}, old, v = {len, (void *)val};
    if (spk_store_txn_begin(q, 0, &txn) != 0)
        fail("damage", "cannot begin a write transaction");
    if (mdb_get(txn, q->pending, &k, &old) != 0)
        fail("damage", "the record is not in LMDB after a sync");
    bool changed = old.mv_size != len || memcmp(old.mv_data, val, len) != 0;
    int rc = mdb_put(txn, q->pending, &k, &v, 0);
    if (rc != 0 || (rc = mdb_txn_commit(txn)) != 0)
        fail("damage", mdb_strerror(rc));
    return changed;
}

static size_t drain(uint64_t damaged_seq, bool valid)
{
    uint64_t from = 0;
    size_t n = 0;
    for (;;) {
        spk_queue_batch b = {0};
        spk_errbuf eb = {{0}};
        if (spk_queue_read_from(q, from, 2, 0, &b, &eb) != 0)
            fail("spk_queue_read_from", eb.msg);
        if (b.n == 0)
            return n;
        uint64_t seqs[2];
        for (size_t i = 0; i < b.n; i++) {
            spk_queue_item *it = &b.items[i];
            seqs[i] = it->seq;
            if (it->seq == damaged_seq && !valid && it->status == 0)
                fail("spk_queue_read", "a damaged record was handed out as good");
            if (it->status != 0)
                continue;
            Spoke__Control__V1__EdgePayload *p =
                spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
            if (p != NULL)
                spoke__control__v1__edge_payload__free_unpacked(p, NULL);
        }
        n += b.n;
        from = b.items[b.n - 1].seq + 1;
        int rc = spk_queue_ack(q, seqs, b.n, NULL, &eb);
        spk_queue_batch_free(&b);
        if (rc != 0)
            fail("spk_queue_ack", eb.msg);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2 || size - 2 > SPK_QUEUE_RECORD_MAX)
        return 0;
    spk_errbuf eb = {{0}};
    if (spk_queue_purge(q, NULL, &eb) != 0)
        fail("spk_queue_purge", eb.msg);
    uint64_t seqs[N_REC];
    send_three(seqs);
    size_t len = size - 2;
    uint8_t *val = malloc(len ? len : 1);
    if (val == NULL)
        abort();
    memcpy(val, data + 2, len);
    if ((data[1] & 1) && len >= sizeof(struct rec_hdr)) {
        struct rec_hdr h;
        memcpy(&h, val, sizeof(h));
        h.magic = REC_MAGIC;
        h.wire_len = (uint32_t)(len - sizeof(h));
        h.crc = spk_rec_crc(&h, val + sizeof(h), h.wire_len);
        memcpy(val, &h, sizeof(h));
    }
    uint64_t seq = seqs[data[0] % N_REC];
    bool changed = damage(seq, val, len);
    bool valid = spk_rec_valid(val, len);
    free(val);

    uint64_t bad = 0;
    int rc = spk_queue_verify(q, &bad, &eb);
    if (!changed && rc != 0)
        fail("spk_queue_verify of an undamaged queue", eb.msg);
    if (!valid && (rc != SPK_ECORRUPT || bad != 1))
        fail("spk_queue_verify missed a damaged record", rc == 0 ? "it passed" : eb.msg);
    if (rc != 0 && rc != SPK_ECORRUPT)
        fail("spk_queue_verify", eb.msg);
    spk_queue_stats st;
    if (spk_queue_stats_get(q, &st, &eb) != 0)
        fail("spk_queue_stats_get", eb.msg);
    spk_queue_stats_free(&st);
    if (spk_queue_expire(q, NULL, &eb) != 0)
        fail("spk_queue_expire", eb.msg);
    drain(seq, valid);
    if (spk_queue_stats_get(q, &st, &eb) != 0)
        fail("spk_queue_stats_get", eb.msg);
    if (st.pending != 0) {
        fprintf(stderr, "%llu records pending after every record read was acknowledged\n",
                (unsigned long long)st.pending);
        abort();
    }
    spk_queue_stats_free(&st);
    return 0;
}
