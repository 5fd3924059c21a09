/*
 * test_queue_crash.c -- kill -9 real processes in the middle of queue calls.
 *
 * Each round forks two writer processes that enqueue in a loop and report every sequence
 * number through a pipe, but only AFTER spk_queue_enqueue() returned 0. The parent kills
 * both with SIGKILL at random moments. A third, uplink-like process runs through all the
 * rounds: it reads the oldest records, checks them, acknowledges most of each batch (a
 * partial set) and reports what it acks: an "intent" before the ack transaction and
 * "done" after it. After each round the parent opens the queue and checks:
 *   - every record decodes, passes its CRC, and carries the sequence number of its key;
 *   - no payload is stored twice;
 *   - every sequence number a writer reported is present exactly once with the payload
 *     that writer sent, unless the acker acked it (a "done" one must be absent; an
 *     "intent" one may be either: the acker may be inside that transaction);
 *   - the counters (pending, bytes, per-plugin) agree with the records.
 * Records that were committed but whose writer died before reporting may be present:
 * "accepted" means "enqueue returned 0".
 */
#include "qtest.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

#define ROUNDS 40
#define MAX_SEQ (4u * 1024 * 1024)

enum { MSG_WROTE = 1, MSG_ACK_INTENT = 2, MSG_ACK_DONE = 3, MSG_ERROR = 4 };

typedef struct report {
    uint64_t seq;
    uint32_t kind;
    uint32_t writer; /* MSG_WROTE: writer id; round and n are in the payload */
    uint32_t round;
    uint32_t n;
} report;

static const char *qpath;

/* QCRASH_MODE=always runs the same rounds with the group-synced `always` policy (ctest
 * registers that variant too). */
static spk_queue_opts crash_opts(void)
{
    spk_queue_opts o;
    spk_queue_opts_init(&o);
    o.map_size = 512ull * 1024 * 1024;
    o.max_pending = 50000;
    const char *mode = getenv("QCRASH_MODE");
    if (mode != NULL)
        o.sync_always = strstr(mode, "always") != NULL;
    return o;
}

static void put_report(int fd, const report *r)
{
    ssize_t w;
    do
        w = write(fd, r, sizeof(*r)); /* < PIPE_BUF: atomic */
    while (w < 0 && errno == EINTR);
}

static void make_payload(char *buf, size_t cap, uint32_t writer, uint32_t round, uint32_t n)
{
    snprintf(buf, cap, "w%u r%u n%u %s", writer, round, n,
             "padding-padding-padding-padding-padding-padding-padding");
}

/* A writer: runs until killed. */
static void writer_main(uint32_t id, uint32_t round, int fd)
{
    spk_queue_opts o = crash_opts();
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(qpath, &o, &q, &eb) != 0) {
        fprintf(stderr, "writer %u: %s\n", id, eb.msg);
        _exit(2);
    }
    spoke_kv md[] = {{"writer", "x"}, {"kind", "crash-test"}};
    for (uint32_t n = 0;; n++) {
        char p[128], corr[64];
        make_payload(p, sizeof(p), id, round, n);
        snprintf(corr, sizeof(corr), "c-%u-%u-%u", id, round, n);
        uint64_t seq = 0;
        int rc = spk_queue_send(q, id, "edge-crash", p, strlen(p), corr, md, 2, false, -1, &seq,
                                NULL, &eb);
        if (rc == 0) {
            report r = {seq, MSG_WROTE, id, round, n};
            put_report(fd, &r);
        } else if (rc != SPK_EQUEUE_FULL) {
            fprintf(stderr, "writer %u: enqueue: %s\n", id, eb.msg);
        }
        if (n % 64 == 0) { /* read transactions get killed too */
            spk_queue_stats st;
            if (spk_queue_stats_get(q, &st, NULL) == 0)
                spk_queue_stats_free(&st);
        }
    }
}

/* Check one stored record; returns 0 or -1. */
static int check_record(const spk_queue_item *it, uint32_t *writer, uint32_t *round,
                        uint32_t *n)
{
    if (it->status != 0)
        return -1;
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    if (ep == NULL)
        return -1;
    int ok = ep->sequence == it->seq && ep->plugin_id == it->plugin_id &&
             ep->payload.len < 128;
    char p[128] = {0}, want[128];
    if (ok) {
        memcpy(p, ep->payload.data, ep->payload.len);
        ok = sscanf(p, "w%u r%u n%u", writer, round, n) == 3 && *writer == ep->plugin_id;
    }
    if (ok) {
        make_payload(want, sizeof(want), *writer, *round, *n);
        ok = strcmp(p, want) == 0 && ep->n_metadata == 2;
    }
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    return ok ? 0 : -1;
}

/* The uplink-like reader/acker: runs until killed. */
static void acker_main(int fd)
{
    spk_queue_opts o = crash_opts();
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(qpath, &o, &q, &eb) != 0) {
        fprintf(stderr, "acker: %s\n", eb.msg);
        _exit(2);
    }
    for (unsigned iter = 0;; iter++) {
        spk_queue_batch b;
        if (spk_queue_read(q, 50, 0, &b, &eb) != 0) {
            fprintf(stderr, "acker: read: %s\n", eb.msg);
            report r = {0, MSG_ERROR, 0, 0, 0};
            put_report(fd, &r);
            _exit(3);
        }
        uint64_t seqs[50];
        size_t n = 0;
        for (size_t i = 0; i < b.n; i++) {
            uint32_t w, rd, k;
            if (check_record(&b.items[i], &w, &rd, &k) != 0) {
                fprintf(stderr, "acker: bad record seq %llu\n",
                        (unsigned long long)b.items[i].seq);
                report r = {b.items[i].seq, MSG_ERROR, 0, 0, 0};
                put_report(fd, &r);
                _exit(3);
            }
            if (i % 5 != 4) /* a partial set: every fifth stays for the next round */
                seqs[n++] = b.items[i].seq;
        }
        spk_queue_batch_free(&b);
        for (size_t i = 0; i < n; i++) {
            report r = {seqs[i], MSG_ACK_INTENT, 0, 0, 0};
            put_report(fd, &r);
        }
        size_t acked = 0;
        if (spk_queue_ack(q, seqs, n, &acked, &eb) != 0) {
            fprintf(stderr, "acker: ack: %s\n", eb.msg);
            report r = {0, MSG_ERROR, 0, 0, 0};
            put_report(fd, &r);
            _exit(3);
        }
        for (size_t i = 0; i < n; i++) {
            report r = {seqs[i], MSG_ACK_DONE, 0, 0, 0};
            put_report(fd, &r);
        }
        if (b.n == 0 || iter % 4 == 0)
            usleep(500);
    }
}

/* Per-sequence state collected by the parent. */
typedef struct seqinfo {
    uint8_t wrote;   /* a writer reported it */
    uint8_t ack;     /* 0, MSG_ACK_INTENT or MSG_ACK_DONE */
    uint8_t seen;    /* present in the current verification */
    uint32_t writer, round, n;
    uint32_t done_epoch; /* epoch in which the acker reported MSG_ACK_DONE */
} seqinfo;

/* Bumped at each verification snapshot: an ack reported done in an earlier epoch was
 * committed before the snapshot, so its record must be absent from it. */
static uint32_t epoch;

static seqinfo *seqs_info;
static uint64_t max_reported;

static void take_report(const report *r)
{
    if (r->kind == MSG_ERROR)
        fail_msg("the acker reported an error (seq %llu)", (unsigned long long)r->seq);
    assert_true(r->seq > 0 && r->seq < MAX_SEQ);
    seqinfo *s = &seqs_info[r->seq];
    if (r->kind == MSG_WROTE) {
        if (s->wrote)
            fail_msg("sequence %llu reported by two writers", (unsigned long long)r->seq);
        s->wrote = 1;
        s->writer = r->writer;
        s->round = r->round;
        s->n = r->n;
        if (r->seq > max_reported)
            max_reported = r->seq;
    } else if (r->kind == MSG_ACK_INTENT && s->ack == 0) {
        s->ack = MSG_ACK_INTENT;
    } else if (r->kind == MSG_ACK_DONE) {
        s->ack = MSG_ACK_DONE;
        s->done_epoch = epoch;
    }
}

/* Read every complete report available on fd; with `until_eof`, block until EOF. */
static void drain(int fd, bool until_eof)
{
    while (fd >= 0) {
        report r[64];
        if (!until_eof) {
            struct pollfd p = {fd, POLLIN, 0};
            if (poll(&p, 1, 0) <= 0)
                return;
        }
        ssize_t got = read(fd, r, sizeof(r));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return;
        assert_int_equal(got % (ssize_t)sizeof(report), 0); /* writes are atomic */
        for (ssize_t i = 0; i < got / (ssize_t)sizeof(report); i++)
            take_report(&r[i]);
    }
}

static void verify(int acker_fd, int round)
{
    spk_queue_opts o = crash_opts();
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(qpath, &o, &q, &eb) != 0)
        fail_msg("round %d: reopen: %s", round, eb.msg);
    drain(acker_fd, false);
    uint32_t snapshot_epoch = ++epoch;
    spk_queue_batch b;
    if (spk_queue_read(q, SIZE_MAX, 0, &b, &eb) != 0)
        fail_msg("round %d: read: %s", round, eb.msg);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(q, &st, NULL), 0);
    /* the acker runs on: drain what it announced before our snapshot */
    drain(acker_fd, false);

    uint64_t *content = calloc(b.n + 1, sizeof(*content));
    assert_non_null(content);
    uint64_t bytes = 0;
    for (size_t i = 0; i < b.n; i++) {
        const spk_queue_item *it = &b.items[i];
        uint32_t w, rd, n;
        if (check_record(it, &w, &rd, &n) != 0)
            fail_msg("round %d: bad record seq %llu", round, (unsigned long long)it->seq);
        if (i > 0 && it->seq <= b.items[i - 1].seq)
            fail_msg("round %d: records out of order", round);
        assert_true(it->seq < MAX_SEQ);
        seqinfo *s = &seqs_info[it->seq];
        s->seen = 1;
        if (s->wrote && (s->writer != w || s->round != rd || s->n != n))
            fail_msg("round %d: seq %llu holds another payload than reported", round,
                     (unsigned long long)it->seq);
        if (s->ack == MSG_ACK_DONE && s->done_epoch < snapshot_epoch)
            fail_msg("round %d: seq %llu acked but still present", round,
                     (unsigned long long)it->seq);
        content[i] = (uint64_t)w << 56 | (uint64_t)rd << 32 | n;
        bytes += spk_queue_record_size(it->wire_len);
    }
    qsort(content, b.n, sizeof(*content), qtest_cmp_u64);
    for (size_t i = 1; i < b.n; i++)
        if (content[i] == content[i - 1])
            fail_msg("round %d: a payload is stored twice", round);
    for (uint64_t seq = 1; seq <= max_reported; seq++) {
        seqinfo *s = &seqs_info[seq];
        if (s->wrote && !s->seen && s->ack == 0)
            fail_msg("round %d: seq %llu was accepted and is lost", round,
                     (unsigned long long)seq);
        s->seen = 0;
    }
    if (acker_fd < 0) { /* nobody else writes: records and counters are one snapshot */
        assert_int_equal(st.pending, b.n);
        assert_int_equal(st.pending_bytes, bytes);
    }
    uint64_t per_plugin = 0, per_plugin_bytes = 0;
    for (size_t i = 0; i < st.n_plugins; i++) {
        per_plugin += st.plugins[i].pending;
        per_plugin_bytes += st.plugins[i].bytes;
    }
    assert_int_equal(per_plugin, st.pending);
    assert_int_equal(per_plugin_bytes, st.pending_bytes);
    spk_queue_stats_free(&st);
    free(content);
    spk_queue_batch_free(&b);
    spk_queue_close(q);
}

static void test_kill9_rounds(void **state)
{
    (void)state;
    char *dir = qtest_tmpdir("qcrash");
    assert_non_null(dir);
    char path[600];
    snprintf(path, sizeof(path), "%s/q", dir);
    qpath = path;
    seqs_info = calloc(MAX_SEQ, sizeof(*seqs_info));
    assert_non_null(seqs_info);
    max_reported = 0;
    srand((unsigned)time(NULL));

    /* create the queue first, in a child, so the parent never holds an env across fork */
    int afd;
    pid_t acker = qtest_fork_pipe(&afd);
    if (acker == 0)
        acker_main(afd);
    fcntl(afd, F_SETFL, fcntl(afd, F_GETFL) | O_NONBLOCK);
    qtest_sleep_us(50 * 1000);

    uint64_t total_reports = 0;
    for (int round = 0; round < ROUNDS; round++) {
        int wfd[2];
        pid_t w[2];
        for (int i = 0; i < 2; i++) {
            w[i] = qtest_fork_pipe(&wfd[i]);
            if (w[i] == 0) {
                close(afd);
                writer_main((uint32_t)i + 1, (uint32_t)round, wfd[i]);
            }
        }
        /* kill each at its own random moment, draining reports meanwhile */
        long t_kill[2] = {5 + rand() % 60, 5 + rand() % 60};
        for (long t = 0, killed = 0; killed < 2; t++) {
            for (int i = 0; i < 2; i++)
                if (t == t_kill[i]) {
                    kill(w[i], SIGKILL);
                    killed++;
                }
            for (int i = 0; i < 2; i++)
                drain(wfd[i], false);
            drain(afd, false);
            qtest_sleep_us(1000);
        }
        for (int i = 0; i < 2; i++) {
            int status;
            assert_int_equal(waitpid(w[i], &status, 0), w[i]);
            if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
                fail_msg("round %d: writer %d ended otherwise than by our SIGKILL", round, i);
            drain(wfd[i], true);
            close(wfd[i]);
        }
        int st;
        if (waitpid(acker, &st, WNOHANG) != 0)
            fail_msg("round %d: the acker died", round);
        verify(afd, round);
    }
    for (uint64_t s = 1; s <= max_reported; s++)
        total_reports += seqs_info[s].wrote;
    print_message("%d rounds, %llu accepted enqueues checked, last seq %llu\n", ROUNDS,
                  (unsigned long long)total_reports, (unsigned long long)max_reported);
    assert_true(total_reports > 0);

    kill(acker, SIGKILL);
    int status;
    waitpid(acker, &status, 0);
    drain(afd, true);
    close(afd);
    verify(-1, ROUNDS); /* the acker is gone: nothing more to drain */

    /* still usable afterwards: what the killed writers left is read and acked (the writers
     * may have outpaced the acker up to max_pending, and a full queue would refuse the
     * send below with QUEUE_FULL, correctly), then a new record is accepted. */
    spk_queue_opts o = crash_opts();
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_open(qpath, &o, &q, &eb), 0);
    for (;;) {
        spk_queue_batch b = {0};
        assert_int_equal(spk_queue_read(q, 1000, 0, &b, &eb), 0);
        size_t n = b.n, acked = 0;
        uint64_t *ack = calloc(n ? n : 1, sizeof(*ack));
        assert_non_null(ack);
        for (size_t i = 0; i < n; i++)
            ack[i] = b.items[i].seq;
        spk_queue_batch_free(&b);
        assert_int_equal(spk_queue_ack(q, ack, n, &acked, &eb), 0);
        free(ack);
        assert_int_equal(acked, n);
        if (n == 0)
            break;
    }
    uint64_t seq = 0;
    assert_int_equal(spk_queue_send(q, 1, NULL, "after", 5, NULL, NULL, 0, false, -1, &seq,
                                    NULL, &eb),
                     0);
    assert_true(seq > max_reported);
    spk_queue_close(q);

    free(seqs_info);
    qtest_rmrf(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kill9_rounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
