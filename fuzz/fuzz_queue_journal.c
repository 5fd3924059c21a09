/*
 * fuzz_queue_journal.c -- the queue opened on a damaged journal, then `spoke-queue verify`.
 *
 * Each input becomes the start of the ring file `journal` of a queue whose LMDB is new
 * (so the first open rebuilds from the ring from offset 0, as after a crash): the rest of
 * the ring is zeros. Then, as spoke-queue and the uplink do: open, verify, stats, read
 * expire (the default 24 h retention, against the records' own timestamps), read every
 * record in pages and decode each good one, ack them all, close.
 *
 * Oracles besides the sanitizers: journal damage is skipped when records move into LMDB,
 * so spk_queue_verify() must find LMDB consistent (SPK_ECORRUPT there is a finding), and
 * once every record read has been acknowledged nothing may be pending.
 *
 * Input: [flags][ring bytes]. With flags bit 0 set the harness first repairs what a
 * writer would have written consistently -- each record header's offset and CRCs, walking
 * the ring as journal.c does -- so the fuzzer gets past the CRCs to what follows them
 * (sequence order, pads, lengths near the ring's end). The corpus (fuzz/corpus/
 * queue_journal) holds rings written by the real queue (fuzz-seeds).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "queue_int.h"

#define RING           SPK_QUEUE_JOURNAL_MIN
#define RING_INPUT_MAX (256u * 1024)

static char dir[256];
static int ring_fd = -1;
static size_t dirty; /* bytes at the ring's start the previous input wrote */

static void fail(const char *what, const char *why)
{
    fprintf(stderr, "fuzz_queue_journal: %s: %s\n", what, why);
    abort();
}

static void cleanup(void)
{
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
    snprintf(dir, sizeof(dir), "%s/spoke-fuzz-journal.XXXXXX", base);
    if (mkdtemp(dir) == NULL)
        fail("mkdtemp", strerror(errno));
    atexit(cleanup);
    char file[300];
    snprintf(file, sizeof(file), "%s/journal", dir);
    ring_fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (ring_fd < 0 || ftruncate(ring_fd, RING) != 0)
        fail(file, strerror(errno));
    return 0;
}

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

/* Make the headers that look like records consistent, as journal_write() writes them. */
static void repair(uint8_t *ring, size_t n)
{
    size_t off = 0;
    while (off + JREC_HDR <= n) {
        struct jrec h;
        memcpy(&h, ring + off, sizeof(h));
        if (h.magic != JREC_MAGIC && h.magic != JPAD_MAGIC) {
            off += 8;
            continue;
        }
        h.off = off;
        h.zero = 0;
        if (h.magic == JREC_MAGIC && h.len >= sizeof(struct rec_hdr) &&
            off + JREC_HDR + h.len <= n) {
            uint8_t *v = ring + off + JREC_HDR;
            struct rec_hdr r;
            memcpy(&r, v, sizeof(r));
            r.magic = REC_MAGIC;
            r.wire_len = h.len - (uint32_t)sizeof(r);
            r.crc = spk_rec_crc(&r, v + sizeof(r), r.wire_len);
            memcpy(v, &r, sizeof(r));
        }
        h.hcrc = spk_journal_hcrc(&h);
        memcpy(ring + off, &h, sizeof(h));
        off += h.magic == JREC_MAGIC && h.len < n ? align8(JREC_HDR + h.len) : 8;
    }
}

static void remove_state(void)
{
    static const char *const files[] = {"data.mdb", "lock.mdb", "journal.ctl"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char file[300];
        snprintf(file, sizeof(file), "%s/%s", dir, files[i]);
        if (unlink(file) != 0 && errno != ENOENT)
            fail(file, strerror(errno));
    }
}

static void write_ring(const uint8_t *data, size_t n)
{
    static uint8_t zero[RING_INPUT_MAX];
    if (dirty > 0 && pwrite(ring_fd, zero, dirty, 0) != (ssize_t)dirty)
        fail("zero the ring", strerror(errno));
    if (n > 0 && pwrite(ring_fd, data, n, 0) != (ssize_t)n)
        fail("write the ring", strerror(errno));
    dirty = n;
}

/* Read every pending record a page at a time, decode the good ones, ack them all. */
static void drain(spk_queue *q)
{
    uint64_t from = 0;
    for (;;) {
        spk_queue_batch b = {0};
        spk_errbuf eb = {{0}};
        if (spk_queue_read_from(q, from, 16, 64 * 1024, &b, &eb) != 0)
            fail("spk_queue_read_from", eb.msg);
        if (b.n == 0)
            break;
        uint64_t seqs[16];
        for (size_t i = 0; i < b.n; i++) {
            seqs[i] = b.items[i].seq;
            if (b.items[i].status != 0)
                continue;
            Spoke__Control__V1__EdgePayload *p = spoke__control__v1__edge_payload__unpack(
                NULL, b.items[i].wire_len, b.items[i].wire);
            if (p != NULL)
                spoke__control__v1__edge_payload__free_unpacked(p, NULL);
        }
        from = b.items[b.n - 1].seq + 1;
        size_t acked = 0;
        int rc = spk_queue_ack(q, seqs, b.n, &acked, &eb);
        spk_queue_batch_free(&b);
        if (rc != 0)
            fail("spk_queue_ack", eb.msg);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size - 1 > RING_INPUT_MAX)
        return 0;
    size_t n = size - 1;
    static uint8_t ring[RING_INPUT_MAX];
    memcpy(ring, data + 1, n);
    if (data[0] & 1)
        repair(ring, n);
    remove_state();
    write_ring(ring, n);

    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.journal_size = RING;
    o.map_size = 64u << 20;
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(dir, &o, &q, &eb) != 0)
        fail("spk_queue_open", eb.msg);
    uint64_t bad = 0;
    if (spk_queue_verify(q, &bad, &eb) != 0)
        fail("spk_queue_verify after a damaged journal", eb.msg);
    spk_queue_stats st;
    if (spk_queue_stats_get(q, &st, &eb) != 0)
        fail("spk_queue_stats_get", eb.msg);
    spk_queue_stats_free(&st);
    uint64_t expired;
    if (spk_queue_expire(q, &expired, &eb) != 0)
        fail("spk_queue_expire", eb.msg);
    drain(q);
    if (spk_queue_stats_get(q, &st, &eb) != 0)
        fail("spk_queue_stats_get", eb.msg);
    if (st.pending != 0) {
        fprintf(stderr, "%llu records pending after every record read was acknowledged\n",
                (unsigned long long)st.pending);
        abort();
    }
    spk_queue_stats_free(&st);
    spk_queue_close(q);
    return 0;
}
