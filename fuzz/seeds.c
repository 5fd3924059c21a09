/*
 * seeds.c -- fuzz-seeds DIR: writes the corpus entries that come from a real queue.
 *
 * It makes a queue in a temporary directory, sends records through the queue's own
 * spk_queue_send() (payloads of several sizes, JSON and not, metadata, correlation IDs),
 * and writes under DIR (fuzz/corpus):
 *   queue_journal/real-*   the ring as the queue wrote it (flags byte, then the ring's
 *                          used start), and a copy with a record's byte flipped
 *   queue_record/real-*    each stored record (flags byte, then the LMDB value)
 *   queue_store/real-*     the same records as the value that replaces one in LMDB
 *   edge_batch/real-*      a SendPluginControlBatchRequest built as the uplink builds one
 *                          (core/uplink.c encode_batch: pbwire.h around the stored bytes)
 *   grpc_body/real-*       that request framed (limit and chunk bytes, 5-byte prefix)
 * Run it after a change of the record or journal format (docs/fuzzing.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "grpc.h"
#include "pbwire.h"
#include "queue_int.h"

static const char *out_dir;

static void die(const char *what, const char *why)
{
    fprintf(stderr, "fuzz-seeds: %s: %s\n", what, why);
    exit(1);
}

static void put(const char *target, const char *name, uint8_t flags, const void *data, size_t n)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", out_dir, target);
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        die(path, strerror(errno));
    snprintf(path, sizeof(path), "%s/%s/%s", out_dir, target, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || (flags != 0xff && fputc(flags, f) == EOF) || fwrite(data, 1, n, f) != n ||
        fclose(f) != 0)
        die(path, strerror(errno));
}

static void send_records(spk_queue *q)
{
    static char big[3000];
    memset(big, 'x', sizeof(big));
    const spoke_kv md[] = {{"model", "gpt-4o"}, {"route", "/v1/chat"}, {"ünï", "cödé"}};
    struct {
        uint32_t plugin;
        const char *payload;
        size_t len;
        const char *corr;
        size_t n_md;
        bool json;
    } r[] = {
        {42, "{\"hits\":3,\"misses\":1}", 21, "req-1", 2, true},
        {42, "", 0, NULL, 0, false},
        {7, "\x00\x01\x02\xff binary", 11, "c", 3, false},
        {1000, big, sizeof(big), "req-big", 1, false},
        {42, "[1,2,3]", 7, NULL, 0, true},
    };
    for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        uint64_t seq, pending;
        spk_errbuf eb = {{0}};
        if (spk_queue_send(q, r[i].plugin, "edge-us-west-1", r[i].payload, r[i].len, r[i].corr, md,
                           r[i].n_md, r[i].json, 1764633600000 + (int64_t)i, &seq, &pending,
                           &eb) != 0)
            die("spk_queue_send", eb.msg);
    }
}

/* The used start of the ring: up to the end of the last valid-looking record. */
static size_t ring_used(const uint8_t *ring, size_t size, size_t *n_rec, size_t *recs)
{
    size_t off = 0;
    *n_rec = 0;
    while (off + JREC_HDR <= size) {
        struct jrec h;
        memcpy(&h, ring + off, sizeof(h));
        if (h.magic != JREC_MAGIC || h.off != off || off + JREC_HDR + h.len > size)
            break;
        recs[(*n_rec)++] = off;
        off += (JREC_HDR + h.len + 7) & ~(size_t)7;
    }
    return off;
}

static void journal_seeds(const char *qdir)
{
    char file[512];
    snprintf(file, sizeof(file), "%s/journal", qdir);
    int fd = open(file, O_RDONLY);
    static uint8_t ring[256 * 1024];
    ssize_t got = fd >= 0 ? pread(fd, ring, sizeof(ring), 0) : -1;
    if (got <= 0)
        die(file, strerror(errno));
    close(fd);
    size_t recs[64], n_rec;
    size_t used = ring_used(ring, (size_t)got, &n_rec, recs);
    if (n_rec == 0)
        die(file, "no record in the ring");
    put("queue_journal", "real-ring", 0, ring, used);
    put("queue_journal", "real-ring-repair", 1, ring, used);
    /* a stray write into the second record's value: damage the move must skip */
    ring[recs[1] + JREC_HDR + 30] ^= 0x5a;
    put("queue_journal", "real-ring-damaged", 0, ring, used);
    ring[recs[1] + JREC_HDR + 30] ^= 0x5a;
    for (size_t i = 0; i < n_rec; i++) {
        struct jrec h;
        memcpy(&h, ring + recs[i], sizeof(h));
        char name[32];
        snprintf(name, sizeof(name), "real-%zu", i);
        put("queue_record", name, 0, ring + recs[i] + JREC_HDR, h.len);
        /* fuzz_queue_store: [which][flags][value]: record i % 3 replaced by this one */
        uint8_t *v = malloc(1 + h.len);
        if (v == NULL)
            die("malloc", strerror(ENOMEM));
        v[0] = 0;
        memcpy(v + 1, ring + recs[i] + JREC_HDR, h.len);
        put("queue_store", name, (uint8_t)(i % 3), v, 1 + h.len);
        free(v);
    }
}

static void batch_seeds(spk_queue *q)
{
    spk_queue_batch b = {0};
    spk_errbuf eb = {{0}};
    if (spk_queue_read(q, 100, 0, &b, &eb) != 0 || b.n == 0)
        die("spk_queue_read", eb.msg);
    const char *id = "edge-us-west-1", *ns = "prod";
    for (size_t k = 1; k <= b.n; k += b.n - 1) { /* one payload, then all */
        size_t n = spk_pb_bytes_len(1, strlen(id)) + spk_pb_bytes_len(2, strlen(ns));
        for (size_t i = 0; i < k; i++)
            n += spk_pb_bytes_len(3, b.items[i].wire_len);
        uint8_t *req = malloc(2 + SPK_GRPC_PREFIX + n);
        if (req == NULL)
            die("malloc", strerror(ENOMEM));
        uint8_t *p = req + 2 + SPK_GRPC_PREFIX;
        p = spk_pb_put_bytes(p, 1, id, strlen(id));
        p = spk_pb_put_bytes(p, 2, ns, strlen(ns));
        for (size_t i = 0; i < k; i++)
            p = spk_pb_put_bytes(p, 3, b.items[i].wire, b.items[i].wire_len);
        req[0] = 20; /* limit 1 MiB */
        req[1] = 63; /* DATA frames of 64 bytes */
        spk_grpc_prefix(req + 2, (uint32_t)n);
        char name[32];
        snprintf(name, sizeof(name), "real-%zu", k);
        put("edge_batch", name, 0xff, req + 2 + SPK_GRPC_PREFIX, n);
        put("grpc_body", name, 0xff, req, 2 + SPK_GRPC_PREFIX + n);
        free(req);
        if (b.n == 1)
            break;
    }
    spk_queue_batch_free(&b);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz-seeds DIR (fuzz/corpus)\n");
        return 2;
    }
    out_dir = argv[1];
    char qdir[] = "/tmp/spoke-fuzz-seeds.XXXXXX";
    if (mkdtemp(qdir) == NULL)
        die("mkdtemp", strerror(errno));
    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.journal_size = SPK_QUEUE_JOURNAL_MIN;
    o.map_size = 64u << 20;
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(qdir, &o, &q, &eb) != 0)
        die("spk_queue_open", eb.msg);
    send_records(q);
    journal_seeds(qdir);
    batch_seeds(q);
    spk_queue_close(q);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", qdir);
    return system(cmd) == 0 ? 0 : 1;
}
