/*
 * test_journal.c -- the queue's journal (queue/journal.c): records that are still only in
 * the ring survive their writer's kill -9; the ring wraps many laps with records of mixed
 * sizes; a full ring with no consumer moves itself; the largest record fits; damage in the
 * ring is detected, not delivered; sequence numbers continue across reopens; the journal
 * lock recovers (EOWNERDEAD) from writers killed at random moments; two `always` writers;
 * journal_size changes and validation. Real files in a temporary directory, real fork()ed
 * processes and real SIGKILLs; no mocks and no timing assertions.
 */
#include "qtest.h"

#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "queue.h"
#include "spoke/control/v1/control.pb-c.h"

#define JMIN ((uint64_t)SPK_QUEUE_JOURNAL_MIN)

typedef qtest_fixture fixture;

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("journal", NULL);
    f->opts.map_size = 256ull * 1024 * 1024;
    f->opts.journal_size = JMIN;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    qtest_fixture_free(*state);
    return 0;
}

/* ---- payloads ------------------------------------------------------------------------ */

/* Enqueue record `id`, qtest_gen_payload(id, len), as plugin 1; fails the test on error. */
static void must_send(fixture *f, uint32_t id, size_t len, uint64_t *seq)
{
    spk_errbuf eb = {{0}};
    int rc = qtest_send_gen(f->q, 1, id, len, seq, NULL, &eb);
    if (rc != 0)
        fail_msg("enqueue of record %u (%zu bytes): %d: %s", id, len, rc, eb.msg);
}

/* Check a read item: its CRC passed, it decodes, carries `seq`, and its payload is exactly
 * qtest_gen_payload(id, len) (which may be too short for a tag). */
static void check_item(const spk_queue_item *it, uint64_t seq, uint32_t id, size_t len)
{
    assert_int_equal(it->status, 0);
    assert_int_equal(it->seq, seq);
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    assert_non_null(ep);
    assert_int_equal(ep->sequence, seq);
    assert_int_equal(ep->plugin_id, it->plugin_id);
    if (ep->payload.len != len)
        fail_msg("seq %llu: payload of %zu bytes, expected %zu (record %u)",
                 (unsigned long long)seq, ep->payload.len, len, id);
    uint8_t *want = malloc(len > 0 ? len : 1);
    assert_non_null(want);
    qtest_gen_payload(want, len, id);
    if (len > 0 && memcmp(ep->payload.data, want, len) != 0)
        fail_msg("seq %llu: payload differs from record %u", (unsigned long long)seq, id);
    free(want);
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
}

/* The record ID from a stored payload's tag; fails unless the record is intact
 * (qtest_item_problem()). The payload length of record `id` must be len_of(id). */
static uint32_t check_tagged(const spk_queue_item *it, size_t (*len_of)(uint32_t))
{
    uint32_t id = 0;
    size_t len = 0;
    const char *why = qtest_item_problem(it, &id, &len);
    if (why != NULL)
        fail_msg("seq %llu: %s", (unsigned long long)it->seq, why);
    if (len != len_of(id))
        fail_msg("seq %llu: record %x has %zu bytes, expected %zu", (unsigned long long)it->seq, id,
                 len, len_of(id));
    return id;
}

static uint64_t stats_pending(fixture *f)
{
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    uint64_t n = st.pending;
    spk_queue_stats_free(&st);
    return n;
}

/* ---- files ------------------------------------------------------------------------- */

static void qfile(const fixture *f, const char *name, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%s", f->dir, name);
}

/* Offset of `needle` in the queue file `name`, or -1. */
static long file_find(const fixture *f, const char *name, const void *needle, size_t n)
{
    char path[600];
    qfile(f, name, path, sizeof(path));
    return qtest_file_find(path, needle, n);
}

static void file_poke(const fixture *f, const char *name, long off, const void *bytes,
                      size_t n)
{
    char path[600];
    qfile(f, name, path, sizeof(path));
    qtest_file_poke(path, off, bytes, n);
}

static uint64_t file_size(const fixture *f, const char *name)
{
    char path[600];
    struct stat st;
    qfile(f, name, path, sizeof(path));
    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_size;
}

/* ---- child processes ----------------------------------------------------------------- */

/* What a writer process reports through its pipe, only after an enqueue returned 0. */
typedef struct wreport {
    uint64_t seq;
    uint32_t id;
    uint32_t len;
} wreport;

#define READY_ID UINT32_MAX

static void put_report(int fd, uint64_t seq, uint32_t id, size_t len)
{
    wreport r = {seq, id, (uint32_t)len};
    qtest_write_all(fd, &r, sizeof(r)); /* < PIPE_BUF: atomic */
}

/* Read one report; 1, or 0 at EOF (every writer end closed). */
static int get_report(int fd, wreport *r)
{
    return qtest_read_full(fd, r, sizeof(*r));
}

typedef struct reports {
    wreport *v;
    size_t n, cap;
} reports;

static void reports_add(reports *rs, const wreport *r)
{
    if (rs->n == rs->cap) {
        rs->cap = rs->cap > 0 ? 2 * rs->cap : 1024;
        rs->v = realloc(rs->v, rs->cap * sizeof(*rs->v));
        assert_non_null(rs->v);
    }
    rs->v[rs->n++] = *r;
}

/* Read reports until EOF. */
static void drain_reports(int fd, reports *rs)
{
    wreport r;
    while (get_report(fd, &r))
        reports_add(rs, &r);
}

/* Collect reports for `us` microseconds (so the writer never blocks on a full pipe). */
static void collect_for(int fd, int64_t us, reports *rs)
{
    int64_t end = qtest_mono_us() + us;
    for (;;) {
        int64_t left = end - qtest_mono_us();
        if (left <= 0)
            return;
        struct pollfd p = {fd, POLLIN, 0};
        int n = poll(&p, 1, (int)((left + 999) / 1000));
        if (n <= 0 || (p.revents & POLLIN) == 0) {
            if (n > 0 && (p.revents & (POLLHUP | POLLERR)) != 0)
                return;
            continue;
        }
        wreport r;
        if (!get_report(fd, &r))
            return;
        reports_add(rs, &r);
    }
}

/* Fork a child running fn(f, write end, arg); *rfd receives the read end. The child never
 * returns and never touches the parent's handle: it opens its own. */
static pid_t spawn(fixture *f, void (*fn)(fixture *, int, uint32_t), uint32_t arg, int *rfd)
{
    pid_t pid = qtest_fork_pipe(rfd);
    if (pid == 0) {
        fn(f, *rfd, arg);
        _exit(0);
    }
    return pid;
}

/* In a writer child: enqueue record `id`, `len` bytes, as plugin `plugin` and report it on
 * fd once accepted; print why and _exit(3) when it is refused. */
static void child_send(spk_queue *q, int fd, uint32_t plugin, uint32_t id, size_t len)
{
    uint64_t seq = 0;
    spk_errbuf eb = {{0}};
    if (qtest_send_gen(q, plugin, id, len, &seq, NULL, &eb) != 0) {
        fprintf(stderr, "writer (plugin %u): enqueue of record %x: %s\n", plugin, id, eb.msg);
        _exit(3);
    }
    put_report(fd, seq, id, len);
}

/* ---- 1. kill -9 of a writer whose records are only in the journal --------------------- */

#define DIE_K 400u

static size_t die_len(uint32_t id)
{
    return QTEST_TAG_LEN + 2 + (id * 37u) % 900;
}

/* Enqueue DIE_K records (IDs base..), reporting each, then kill -9 ourselves. */
static void writer_then_die(fixture *f, int fd, uint32_t base)
{
    spk_queue *q = qtest_child_open(f);
    for (uint32_t i = 0; i < DIE_K; i++)
        child_send(q, fd, 5, base + i, die_len(base + i));
    raise(SIGKILL);
    _exit(4);
}

static void run_writer_then_die(fixture *f, uint32_t base, reports *rs)
{
    int fd;
    pid_t pid = spawn(f, writer_then_die, base, &fd);
    drain_reports(fd, rs);
    close(fd);
    qtest_expect_killed(pid, "child");
}

static void check_die_batch(const spk_queue_batch *b, size_t from, const reports *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        const wreport *r = &rs->v[i];
        check_item(&b->items[from + i], r->seq, r->id, r->len);
    }
}

static void test_kill9_writer_nothing_moved(void **state)
{
    fixture *f = *state;
    reports rs = {0};

    /* (a) No other process has the queue open: the next open rebuilds from the files. */
    run_writer_then_die(f, 0, &rs);
    assert_int_equal(rs.n, DIE_K);
    for (size_t i = 0; i < rs.n; i++)
        assert_int_equal(rs.v[i].seq, i + 1);
    char tag[QTEST_TAG_LEN + 1];
    qtest_make_tag(tag, 0);
    assert_true(file_find(f, "journal", tag, QTEST_TAG_LEN) >= 0);
    assert_int_equal(file_find(f, "data.mdb", tag, QTEST_TAG_LEN), -1); /* nothing was moved */
    qtest_open(f);
    assert_true(spk_queue_journal_fill(f->q) > 0.0); /* still in the ring */
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, DIE_K);
    check_die_batch(&b, 0, &rs);
    spk_queue_batch_free(&b);
    assert_int_equal(stats_pending(f), DIE_K);

    /* (b) This process keeps its handle open meanwhile: no rebuild, the shared state is
     * what the dead writer left. */
    reports rs2 = {0};
    run_writer_then_die(f, DIE_K, &rs2);
    assert_int_equal(rs2.n, DIE_K);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 2 * DIE_K);
    check_die_batch(&b, 0, &rs);
    check_die_batch(&b, DIE_K, &rs2);
    spk_queue_batch_free(&b);
    qtest_open(f);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 2 * DIE_K);
    check_die_batch(&b, DIE_K, &rs2);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    free(rs.v);
    free(rs2.v);
}

/* ---- 2. wrap-around ---------------------------------------------------------------- */

#define LAP_MAX_RECORD (300u * 1024)
#define LAPS 6

static uint32_t xorshift(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

typedef struct laps {
    size_t *lens;      /* payload length of record i (seq i + 1) */
    size_t cap;
    uint64_t enq, acked, next_read;
} laps;

/* Read up to max_n records, check that they are the next ones in order, ack them. */
static void laps_read_ack(fixture *f, laps *l, size_t max_n, size_t max_bytes)
{
    spk_queue_batch b;
    assert_int_equal(spk_queue_read(f->q, max_n, max_bytes, &b, NULL), 0);
    uint64_t unread = l->enq - (l->next_read - 1);
    size_t want = unread < max_n ? (size_t)unread : max_n;
    if (max_bytes == 0)
        assert_int_equal(b.n, want);
    else
        assert_true(b.n >= (want > 0 ? 1u : 0u) && b.n <= want);
    for (size_t i = 0; i < b.n; i++) {
        uint64_t seq = l->next_read++;
        check_item(&b.items[i], seq, (uint32_t)(seq - 1), l->lens[seq - 1]);
    }
    qtest_ack_batch(f, &b);
    l->acked += b.n;
    spk_queue_batch_free(&b);
}

static void wrap_laps(fixture *f)
{
    qtest_open(f);
    laps l = {NULL, 0, 0, 0, 1};
    uint32_t rng = 0x2545f491u;
    uint8_t *buf = malloc(LAP_MAX_RECORD);
    assert_non_null(buf);
    uint64_t total = 0;
    while (total < LAPS * JMIN) {
        size_t len;
        uint32_t r = xorshift(&rng);
        if (l.enq == 0)
            len = 1;
        else if (l.enq == 1 || l.enq == 2)
            len = LAP_MAX_RECORD;
        else if (r % 5 == 0)
            len = 1 + xorshift(&rng) % LAP_MAX_RECORD;
        else
            len = 1 + xorshift(&rng) % 3000;
        if (l.enq == l.cap) {
            l.cap = l.cap > 0 ? 2 * l.cap : 256;
            l.lens = realloc(l.lens, l.cap * sizeof(*l.lens));
            assert_non_null(l.lens);
        }
        l.lens[l.enq] = len;
        qtest_gen_payload(buf, len, (uint32_t)l.enq);
        uint64_t seq = 0, pending = 0;
        spk_errbuf eb = {{0}};
        int rc = spk_queue_send(f->q, 1 + (uint32_t)(l.enq % 3), "edge-w", buf, len, NULL,
                                NULL, 0, false, -1, &seq, &pending, &eb);
        if (rc != 0)
            fail_msg("enqueue %llu (%zu bytes): %d: %s", (unsigned long long)l.enq, len, rc,
                     eb.msg);
        l.enq++;
        total += len + 64;
        assert_int_equal(seq, l.enq);
        assert_int_equal(pending, l.enq - l.acked);
        double fill = spk_queue_journal_fill(f->q);
        assert_true(fill >= 0.0 && fill <= 1.0);

        r = xorshift(&rng);
        if (r % 4 == 0)
            laps_read_ack(f, &l, 1 + (r >> 8) % 6, (r >> 16) % 3 == 0 ? 65536 : 0);
        if (l.enq % 50 == 0)
            assert_int_equal(stats_pending(f), l.enq - l.acked);
        if (l.enq % 97 == 0)
            assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    }
    assert_int_equal(stats_pending(f), l.enq - l.acked);
    while (l.next_read <= l.enq)
        laps_read_ack(f, &l, 64, 0);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.acked, l.enq);
    assert_int_equal(st.next_seq, l.enq + 1);
    assert_int_equal(st.journal_size, JMIN);
    assert_int_equal(st.damaged, 0);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    /* and after a reopen the sequence goes on */
    qtest_open(f);
    uint64_t seq = 0;
    must_send(f, 7, 100, &seq);
    assert_int_equal(seq, l.enq + 1);
    free(buf);
    free(l.lens);
}

static void test_wrap_laps(void **state)
{
    wrap_laps(*state);
}

static void test_wrap_laps_always(void **state)
{
    fixture *f = *state;
    f->opts.sync_always = true;
    wrap_laps(f);
}

/* ---- 3. a full journal and no consumer ----------------------------------------------- */

#define FULL_N 5000u
#define FULL_LEN 4096u

static void test_full_journal_no_consumer(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    for (uint32_t i = 0; i < FULL_N; i++) {
        uint64_t seq = 0, pending = 0;
        spk_errbuf eb = {{0}};
        int rc = qtest_send_gen(f->q, 2, i, FULL_LEN, &seq, &pending, &eb);
        if (rc != 0)
            fail_msg("enqueue %u: %d: %s", i, rc, eb.msg);
        assert_int_equal(seq, i + 1);
        assert_int_equal(pending, i + 1);
        assert_true(spk_queue_journal_fill(f->q) <= 1.0);
    }
    assert_true((uint64_t)FULL_N * FULL_LEN > 4 * JMIN);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, FULL_N);
    for (uint32_t i = 0; i < FULL_N; i++)
        check_item(&b.items[i], i + 1, i, FULL_LEN);
    spk_queue_batch_free(&b);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, FULL_N);
    assert_int_equal(st.staged, 0);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

/* ---- 4. the largest record ------------------------------------------------------------- */

typedef struct maxrec {
    uint8_t *payload;
    char *keys[SPOKE_MAX_METADATA];
    char *values[SPOKE_MAX_METADATA];
    spoke_kv md[SPOKE_MAX_METADATA];
    char corr[SPOKE_MAX_CORRELATION_ID + 1];
} maxrec;

static void maxrec_init(maxrec *m, uint32_t id)
{
    m->payload = malloc(SPOKE_MAX_PAYLOAD);
    assert_non_null(m->payload);
    qtest_gen_payload(m->payload, SPOKE_MAX_PAYLOAD, id);
    for (size_t i = 0; i < SPOKE_MAX_METADATA; i++) {
        m->keys[i] = malloc(SPOKE_MAX_METADATA_KEY + 1);
        m->values[i] = malloc(SPOKE_MAX_METADATA_VALUE + 1);
        assert_non_null(m->keys[i]);
        assert_non_null(m->values[i]);
        memset(m->keys[i], 'a' + (int)(i % 26), SPOKE_MAX_METADATA_KEY);
        memset(m->values[i], 'A' + (int)(i % 26), SPOKE_MAX_METADATA_VALUE);
        m->keys[i][SPOKE_MAX_METADATA_KEY] = m->values[i][SPOKE_MAX_METADATA_VALUE] = '\0';
        char head[32];
        int n = snprintf(head, sizeof(head), "key-%02zu-", i);
        memcpy(m->keys[i], head, (size_t)n);
        n = snprintf(head, sizeof(head), "value-%02zu-%u-", i, id);
        memcpy(m->values[i], head, (size_t)n);
        m->md[i].key = m->keys[i];
        m->md[i].value = m->values[i];
    }
    memset(m->corr, 'c', SPOKE_MAX_CORRELATION_ID);
    m->corr[SPOKE_MAX_CORRELATION_ID] = '\0';
}

static void maxrec_free(maxrec *m)
{
    free(m->payload);
    for (size_t i = 0; i < SPOKE_MAX_METADATA; i++) {
        free(m->keys[i]);
        free(m->values[i]);
    }
}

static int maxrec_send(fixture *f, const maxrec *m, uint64_t *seq, spk_errbuf *eb)
{
    spk_queue_msg msg = {
        .plugin_id = 77,
        .edge_id = "edge-max",
        .payload = m->payload,
        .payload_len = SPOKE_MAX_PAYLOAD,
        .correlation_id = m->corr,
        .metadata = m->md,
        .n_metadata = SPOKE_MAX_METADATA,
        .content_type = "application/octet-stream",
        .edge_timestamp_ms = qtest_now,
    };
    return spk_queue_enqueue(f->q, &msg, seq, NULL, eb);
}

static void maxrec_check(const spk_queue_item *it, const maxrec *m, uint64_t seq)
{
    assert_int_equal(it->status, 0);
    assert_int_equal(it->seq, seq);
    assert_int_equal(it->plugin_id, 77);
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    assert_non_null(ep);
    assert_int_equal(ep->sequence, seq);
    assert_int_equal(ep->payload.len, SPOKE_MAX_PAYLOAD);
    assert_true(memcmp(ep->payload.data, m->payload, SPOKE_MAX_PAYLOAD) == 0);
    assert_string_equal(ep->correlation_id, m->corr);
    assert_string_equal(ep->edge_id, "edge-max");
    assert_string_equal(ep->content_type, "application/octet-stream");
    assert_int_equal(ep->n_metadata, SPOKE_MAX_METADATA);
    for (size_t i = 0; i < SPOKE_MAX_METADATA; i++) {
        assert_string_equal(ep->metadata[i]->key, m->keys[i]);
        assert_string_equal(ep->metadata[i]->value, m->values[i]);
    }
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
}

static void test_max_record_fits(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    maxrec m;
    maxrec_init(&m, 1);
    uint64_t seq = 0;
    spk_errbuf eb = {{0}};
    int rc = maxrec_send(f, &m, &seq, &eb);
    if (rc != 0)
        fail_msg("enqueue of the largest record: %d: %s", rc, eb.msg);
    assert_int_equal(seq, 1);
    assert_true(spk_queue_journal_fill(f->q) > 0.25); /* it is over a quarter of the ring */
    /* it survives a reopen while still in the journal */
    qtest_open(f);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 1);
    maxrec_check(&b.items[0], &m, 1);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    maxrec_free(&m);
}

/* The largest record must fit wherever the ring's tail happens to be, with the journal
 * otherwise empty (everything moved, flushed and acked). */
static void test_max_record_any_position(void **state)
{
    fixture *f = *state;
    maxrec m;
    maxrec_init(&m, 2);
    static const uint64_t kib[] = {256, 1024, 2048, 2600, 2900, 3300, 3900};
    for (size_t i = 0; i < sizeof(kib) / sizeof(kib[0]); i++) {
        /* a fresh queue in a subdirectory (the fixture's teardown removes it) */
        char dir[600];
        snprintf(dir, sizeof(dir), "%s/at-%llu", f->dir, (unsigned long long)kib[i]);
        fixture g = *f;
        g.dir = dir;
        g.q = NULL;
        qtest_open(&g);
        /* records that take the ring's tail to about kib[i] KiB, moved and acked */
        for (uint64_t at = 0; at < kib[i];) {
            uint64_t step = kib[i] - at > 1000 ? 1000 : kib[i] - at;
            must_send(&g, 1, (size_t)step * 1024 - 200, NULL);
            at += step;
        }
        assert_int_equal(spk_queue_sync(g.q, NULL), 0);
        spk_queue_batch b;
        qtest_read_all(&g, &b);
        qtest_ack_batch(&g, &b);
        spk_queue_batch_free(&b);
        assert_true(spk_queue_journal_fill(g.q) == 0.0);
        uint64_t seq = 0;
        spk_errbuf eb = {{0}};
        int rc = maxrec_send(&g, &m, &seq, &eb);
        if (rc != 0)
            fail_msg("tail at %llu KiB of the ring: the largest record was refused: %d: %s",
                     (unsigned long long)kib[i], rc, eb.msg);
        qtest_open(&g);
        qtest_read_all(&g, &b);
        assert_int_equal(b.n, 1);
        maxrec_check(&b.items[0], &m, seq);
        spk_queue_batch_free(&b);
        qtest_close(&g);
    }
    maxrec_free(&m);
}

/* ---- 5. damage in the journal ------------------------------------------------------- */

#define DMG_LEN 300u

/* Enqueue records A, B, C (IDs 0xA, 0xB, 0xC) and find B's payload in the journal file. */
static long damage_setup(fixture *f, bool reopen)
{
    qtest_open(f);
    for (uint32_t id = 0xA; id <= 0xC; id++)
        must_send(f, id, DMG_LEN, NULL);
    if (reopen)
        qtest_close(f);
    char tag[QTEST_TAG_LEN + 1];
    qtest_make_tag(tag, 0xB);
    long at = file_find(f, "journal", tag, QTEST_TAG_LEN);
    assert_true(at > 0);
    return at;
}

/* Damage B's payload in the journal: with the queue open, or (reopen) while no process has
 * it open, reopening it after. */
static void damage_payload(fixture *f, bool reopen)
{
    long at = damage_setup(f, reopen);
    file_poke(f, "journal", at + 40, "\xde\xad\xbe", 3);
    if (reopen)
        qtest_open(f);
}

static void damage_check(fixture *f)
{
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_queue_sync(f->q, &eb), SPK_ECORRUPT);
    assert_non_null(strstr(eb.msg, "damaged"));
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 2);
    check_item(&b.items[0], 1, 0xA, DMG_LEN);
    check_item(&b.items[1], 3, 0xC, DMG_LEN);
    spk_queue_batch_free(&b);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.damaged, 1);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    /* the next record follows C */
    uint64_t seq = 0;
    must_send(f, 0xD, DMG_LEN, &seq);
    assert_int_equal(seq, 4);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 3);
    check_item(&b.items[0], 1, 0xA, DMG_LEN);
    check_item(&b.items[1], 3, 0xC, DMG_LEN);
    check_item(&b.items[2], 4, 0xD, DMG_LEN);
    spk_queue_batch_free(&b);
}

/* The counts after a damaged record was skipped: what is there, no more. */
static void damage_counts(fixture *f)
{
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 3); /* A, C, D */
    uint64_t bytes = 0;
    for (size_t i = 0; i < b.n; i++)
        bytes += spk_queue_record_size(b.items[i].wire_len);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    if (st.pending != b.n || st.pending_bytes != bytes || st.staged != 0)
        fail_msg("after a skipped damaged record: stats say %llu pending (%llu staged), "
                 "%llu bytes; %zu records, %llu bytes are there",
                 (unsigned long long)st.pending, (unsigned long long)st.staged,
                 (unsigned long long)st.pending_bytes, b.n, (unsigned long long)bytes);
    spk_queue_stats_free(&st);
    /* and queue.max_pending counts the same */
    uint64_t pending = 0;
    spk_errbuf eb = {{0}};
    assert_int_equal(qtest_send_gen(f->q, 1, 0xE, DMG_LEN, NULL, &pending, &eb), 0);
    assert_int_equal(pending, b.n + 1);
    spk_queue_batch_free(&b);
}

/* A stray write into a published record while the queue is open (the mapping is shared:
 * the file and every process's view are the same pages). */
static void test_damage_payload_open(void **state)
{
    fixture *f = *state;
    damage_payload(f, false);
    damage_check(f);
}

/* The same with B's journal header hit (its `off` field): the move resynchronises on C. */
static void test_damage_header_open(void **state)
{
    fixture *f = *state;
    damage_setup(f, false);
    /* the journal record headers begin with "SPJ1"; A's is at 0, B's is the second */
    long a = file_find(f, "journal", "SPJ1", 4);
    assert_int_equal(a, 0);
    char path[600];
    size_t len;
    qfile(f, "journal", path, sizeof(path));
    uint8_t *buf = qtest_slurp(path, &len);
    uint8_t *hit = memmem(buf + 4, len - 4, "SPJ1", 4);
    assert_non_null(hit);
    long b_at = (long)(hit - buf);
    free(buf);
    file_poke(f, "journal", b_at + 8, "\x55", 1);
    damage_check(f);
}

/* After the skipped record, stats.pending, pending_bytes, staged and the pending count
 * enqueue checks against queue.max_pending agree with the records that are there. */
static void test_damage_pending_count(void **state)
{
    fixture *f = *state;
    damage_payload(f, false);
    damage_check(f);
    damage_counts(f);
}

/* As the brief: damage B while no process has the queue open, reopen, sync. */
static void test_damage_payload_reopen(void **state)
{
    fixture *f = *state;
    damage_payload(f, true);
    damage_check(f);
}

/* ---- 6. sequence numbers across reopens ---------------------------------------------- */

static void test_seq_across_reopen(void **state)
{
    fixture *f = *state;
    qtest_open(f);
    uint64_t seq = 0;
    for (uint32_t i = 0; i < 3; i++) {
        must_send(f, i, 50, &seq);
        assert_int_equal(seq, i + 1);
    }
    qtest_open(f); /* the three are only in the journal */
    assert_true(spk_queue_journal_fill(f->q) > 0.0);
    must_send(f, 3, 50, &seq);
    assert_int_equal(seq, 4);

    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 4);
    for (uint32_t i = 0; i < 4; i++)
        check_item(&b.items[i], i + 1, i, 50);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    qtest_open(f);
    assert_true(spk_queue_journal_fill(f->q) == 0.0);
    must_send(f, 4, 50, &seq);
    assert_int_equal(seq, 5);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 1);
    assert_int_equal(st.next_seq, 6);
    assert_int_equal(st.acked, 4);
    spk_queue_stats_free(&st);

    /* moved but not acked, then one more staged: reopen twice */
    must_send(f, 5, 50, &seq);
    qtest_open(f);
    qtest_open(f);
    must_send(f, 6, 50, &seq);
    assert_int_equal(seq, 7);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 3);
    for (uint32_t i = 0; i < 3; i++)
        check_item(&b.items[i], i + 5, i + 4, 50);
    spk_queue_batch_free(&b);
}

/* ---- 7. the journal lock's holder dies ------------------------------------------------ */

#define KILL_ROUNDS 80
#define KILL_ROUNDS_ALWAYS 24
#define PARENT_ID 0xF0000000u

/* Record `id` of round r, number i is (r << 20 | i); the parent's are PARENT_ID | r. */
static size_t kill_len(uint32_t id)
{
    if ((id & PARENT_ID) == PARENT_ID)
        return 333;
    return QTEST_TAG_LEN + 50 + ((id & 0xFFFFFu) * 97u) % 1800;
}

/* Enqueue in a tight loop until killed; reports "ready" once open, then every record. */
static void kill_looper(fixture *f, int fd, uint32_t round)
{
    spk_queue *q = qtest_child_open(f);
    put_report(fd, 0, READY_ID, 0);
    uint8_t buf[2048];
    for (uint32_t i = 0; i < 0xFFFFFu; i++) {
        uint32_t id = round << 20 | i;
        size_t len = kill_len(id);
        qtest_gen_payload(buf, len, id);
        uint64_t seq = 0;
        spk_errbuf eb = {{0}};
        if (spk_queue_send(q, 100 + round, "edge-k", buf, len, NULL, NULL, 0, false, -1, &seq,
                           NULL, &eb) != 0) {
            fprintf(stderr, "looper %u: enqueue: %s\n", round, eb.msg);
            _exit(3);
        }
        put_report(fd, seq, id, len);
    }
    _exit(5);
}

static bool batch_has(const spk_queue_batch *b, uint64_t seq)
{
    size_t lo = 0, hi = b->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (b->items[mid].seq == seq)
            return true;
        if (b->items[mid].seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

static void lock_holder_dies(fixture *f, int rounds)
{
    qtest_open(f); /* once, before any child; the children open their own */
    srand(4242);
    uint64_t total = 0;
    for (int round = 0; round < rounds; round++) {
        reports rs = {0};
        int fd;
        pid_t pid = spawn(f, kill_looper, (uint32_t)round, &fd);
        wreport ready;
        struct pollfd p = {fd, POLLIN, 0};
        assert_int_equal(poll(&p, 1, 30000), 1);
        if (!get_report(fd, &ready) || ready.id != READY_ID)
            fail_msg("round %d: the writer did not open the queue", round);
        collect_for(fd, rand() % 3001, &rs);
        assert_int_equal(kill(pid, SIGKILL), 0);
        qtest_expect_killed(pid, "child");
        drain_reports(fd, &rs);
        close(fd);

        uint64_t pseq = 0;
        spk_errbuf eb = {{0}};
        int rc = qtest_send_gen(f->q, 1, PARENT_ID | (uint32_t)round,
                                kill_len(PARENT_ID | (uint32_t)round), &pseq, NULL, &eb);
        if (rc != 0)
            fail_msg("round %d: enqueue after the kill: %d: %s", round, rc, eb.msg);
        uint64_t pending = stats_pending(f);
        spk_queue_batch b;
        qtest_read_all(f, &b);
        if (b.n != pending)
            fail_msg("round %d: stats say %llu pending, %zu records are there", round,
                     (unsigned long long)pending, b.n);
        for (size_t i = 0; i < b.n; i++) {
            if (i > 0 && b.items[i].seq <= b.items[i - 1].seq)
                fail_msg("round %d: sequence %llu after %llu", round,
                         (unsigned long long)b.items[i].seq,
                         (unsigned long long)b.items[i - 1].seq);
            uint32_t id = check_tagged(&b.items[i], kill_len);
            if (id != (PARENT_ID | (uint32_t)round) && (id >> 20) != (uint32_t)round)
                fail_msg("round %d: record %x of another round", round, id);
        }
        assert_true(b.n > 0);
        assert_int_equal(b.items[b.n - 1].seq, pseq); /* the parent's is the newest */
        for (size_t i = 0; i < rs.n; i++)
            if (!batch_has(&b, rs.v[i].seq))
                fail_msg("round %d: reported record %x (seq %llu) is missing", round,
                         rs.v[i].id, (unsigned long long)rs.v[i].seq);
        total += b.n;
        qtest_ack_batch(f, &b);
        spk_queue_batch_free(&b);
        free(rs.v);
    }
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.acked, total);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
}

static void test_lock_holder_dies(void **state)
{
    lock_holder_dies(*state, KILL_ROUNDS);
}

static void test_lock_holder_dies_always(void **state)
{
    fixture *f = *state;
    f->opts.sync_always = true;
    lock_holder_dies(f, KILL_ROUNDS_ALWAYS);
}

/* ---- 8. two `always` writers --------------------------------------------------------- */

#define TWO_N 150u

static size_t two_len(uint32_t id)
{
    return QTEST_TAG_LEN + 10 + (id * 13u) % 700;
}

static void two_writer(fixture *f, int fd, uint32_t w)
{
    spk_queue *q = qtest_child_open(f);
    for (uint32_t i = 0; i < TWO_N; i++) {
        uint32_t id = w << 20 | i;
        child_send(q, fd, w, id, two_len(id));
    }
    spk_queue_close(q);
    _exit(0);
}

static void test_two_writers_always(void **state)
{
    fixture *f = *state;
    f->opts.sync_always = true;
    int fd[2];
    pid_t pid[2];
    reports rs = {0};
    for (uint32_t w = 0; w < 2; w++)
        pid[w] = spawn(f, two_writer, w + 1, &fd[w]);
    for (int w = 0; w < 2; w++) {
        drain_reports(fd[w], &rs);
        close(fd[w]);
        qtest_expect_exit0(pid[w], "writer");
    }
    assert_int_equal(rs.n, 2 * TWO_N);
    uint64_t *seqs = malloc(rs.n * sizeof(*seqs));
    assert_non_null(seqs);
    for (size_t i = 0; i < rs.n; i++)
        seqs[i] = rs.v[i].seq;
    qsort(seqs, rs.n, sizeof(*seqs), qtest_cmp_u64);
    for (size_t i = 1; i < rs.n; i++)
        assert_true(seqs[i] > seqs[i - 1]); /* no sequence number given twice */
    free(seqs);

    qtest_open(f);
    assert_int_equal(stats_pending(f), 2 * TWO_N);
    spk_queue_batch b;
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 2 * TWO_N);
    for (size_t i = 0; i < b.n; i++) {
        if (i > 0)
            assert_true(b.items[i].seq > b.items[i - 1].seq);
        check_tagged(&b.items[i], two_len);
    }
    for (size_t i = 0; i < rs.n; i++) {
        bool found = false;
        for (size_t j = 0; j < b.n && !found; j++)
            if (b.items[j].seq == rs.v[i].seq) {
                check_item(&b.items[j], rs.v[i].seq, rs.v[i].id, rs.v[i].len);
                found = true;
            }
        if (!found)
            fail_msg("record %x (seq %llu) is missing", rs.v[i].id,
                     (unsigned long long)rs.v[i].seq);
    }
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
    free(rs.v);
}

/* ---- 9. journal_size changes ---------------------------------------------------------- */

static void test_journal_resize(void **state)
{
    fixture *f = *state;
    uint64_t seq = 0, next = 1;
    spk_queue_batch b;

    /* 2 MiB, records still staged: a reopen asking for 4 MiB keeps 2 MiB */
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), JMIN);
    /* first past a lap, so offsets are beyond the ring's size */
    for (uint32_t i = 0; i < 40; i++)
        must_send(f, 1000 + i, 64 * 1024, &seq);
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 40);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    next = seq + 1;
    for (uint32_t i = 0; i < 5; i++) {
        must_send(f, i, 2000, &seq);
        assert_int_equal(seq, next + i);
    }
    qtest_close(f);
    f->opts.journal_size = 2 * JMIN;
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), JMIN);
    assert_true(spk_queue_journal_fill(f->q) > 0.0);
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.journal_size, JMIN);
    assert_int_equal(st.pending, 5);
    spk_queue_stats_free(&st);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 5);
    for (uint32_t i = 0; i < 5; i++)
        check_item(&b.items[i], next + i, i, 2000);

    /* emptied (moved, flushed, acked): the next first open takes 4 MiB */
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    next += 5;
    qtest_close(f);
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), 2 * JMIN);
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.journal_size, 2 * JMIN);
    assert_int_equal(st.pending, 0);
    spk_queue_stats_free(&st);
    /* it works: two and a half laps of the bigger ring, half of them staged at a reopen */
    for (uint32_t i = 0; i < 160; i++) {
        must_send(f, 2000 + i, 64 * 1024, &seq);
        assert_int_equal(seq, next + i);
        if (i % 40 == 39) {
            qtest_open(f);
            qtest_read_all(f, &b);
            assert_int_equal(b.n, 40);
            for (uint32_t k = 0; k < 40; k++)
                check_item(&b.items[k], next + i - 39 + k, 2000 + i - 39 + k, 64 * 1024);
            qtest_ack_batch(f, &b);
            spk_queue_batch_free(&b);
        }
    }
    next += 160;
    /* staged records again, reopened asking for 2 MiB: stays 4 MiB, nothing lost */
    for (uint32_t i = 0; i < 3; i++)
        must_send(f, 3000 + i, 5000, &seq);
    qtest_close(f);
    f->opts.journal_size = JMIN;
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), 2 * JMIN);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 3);
    for (uint32_t i = 0; i < 3; i++)
        check_item(&b.items[i], next + i, 3000 + i, 5000);
    qtest_ack_batch(f, &b);
    spk_queue_batch_free(&b);
    next += 3;
    /* and empty, back to 2 MiB */
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    qtest_close(f);
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), JMIN);
    must_send(f, 4000, 100, &seq);
    assert_int_equal(seq, next);
    qtest_close(f);
    qtest_open(f);
    qtest_read_all(f, &b);
    assert_int_equal(b.n, 1);
    check_item(&b.items[0], next, 4000, 100);
    spk_queue_batch_free(&b);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

/* ---- 10. journal_size validation --------------------------------------------------------- */

static void test_journal_size_invalid(void **state)
{
    fixture *f = *state;
    static const uint64_t bad[] = {0, 4096, JMIN - 4096, JMIN + 1, JMIN + 512, 3 * JMIN - 8};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        spk_queue_opts o = f->opts;
        o.journal_size = bad[i];
        spk_queue *q = NULL;
        spk_errbuf eb = {{0}};
        assert_int_equal(spk_queue_open(f->dir, &o, &q, &eb), SPK_EINVAL);
        assert_null(q);
        if (strstr(eb.msg, "journal size") == NULL)
            fail_msg("journal_size %llu: message does not name the journal size: %s",
                     (unsigned long long)bad[i], eb.msg);
        char num[32];
        snprintf(num, sizeof(num), "%llu", (unsigned long long)bad[i]);
        assert_non_null(strstr(eb.msg, num));
    }
    /* any multiple of 4096 from the minimum on is fine */
    f->opts.journal_size = JMIN + 4096;
    qtest_open(f);
    assert_int_equal(file_size(f, "journal"), JMIN + 4096);
    must_send(f, 1, 10, NULL);
}

/* ---- 11. a full map: purge and release still work ------------------------------------- */

/* Fill a small map and the journal behind it until appends are refused; a sync then still
 * frees the journal space of what readers had moved, and purge deletes every accepted
 * record, those the map could not take included; appends work again after. */
static void test_full_map_purge(void **state)
{
    fixture *f = *state;
    f->opts.map_size = 1024 * 1024;
    qtest_open(f);
    uint32_t n = 0;
    for (;;) {
        spk_errbuf eb = {{0}};
        int rc = qtest_send_gen(f->q, 1, n, 2000, NULL, NULL, &eb);
        if (rc != 0) {
            assert_int_equal(rc, SPK_EQUEUE_UNAVAILABLE);
            assert_non_null(strstr(eb.msg, "map is full"));
            break;
        }
        n++;
        assert_true(n < 100000);
    }
    assert_true(n > 1000); /* the journal took what the map could not */
    spk_queue_stats st;
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, n);
    assert_true(st.staged > 0);
    spk_queue_stats_free(&st);
    assert_int_equal(spk_queue_sync(f->q, NULL), SPK_EQUEUE_UNAVAILABLE);
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    /* what is in LMDB was released: only the staged records hold journal space (each
     * 2000 payload bytes plus headers, and at most one lap-end pad) */
    assert_true(st.journal_used <= st.staged * 2200 + 4096);
    spk_queue_stats_free(&st);
    uint64_t purged = 0;
    assert_int_equal(spk_queue_purge(f->q, &purged, NULL), 0);
    assert_int_equal(purged, n);
    assert_int_equal(spk_queue_stats_get(f->q, &st, NULL), 0);
    assert_int_equal(st.pending, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.purged, n);
    spk_queue_stats_free(&st);
    uint64_t seq = 0;
    must_send(f, 7, 2000, &seq);
    assert_int_equal(seq, (uint64_t)n + 1);
    assert_int_equal(spk_queue_verify(f->q, NULL, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_kill9_writer_nothing_moved, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrap_laps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrap_laps_always, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_journal_no_consumer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_record_fits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_record_any_position, setup, teardown),
        cmocka_unit_test_setup_teardown(test_damage_payload_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_damage_header_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_damage_pending_count, setup, teardown),
        cmocka_unit_test_setup_teardown(test_damage_payload_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_seq_across_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lock_holder_dies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lock_holder_dies_always, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_writers_always, setup, teardown),
        cmocka_unit_test_setup_teardown(test_journal_resize, setup, teardown),
        cmocka_unit_test_setup_teardown(test_journal_size_invalid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_map_purge, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
