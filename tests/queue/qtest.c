/*
 * qtest.c -- the helpers of qtest.h, shared by the queue unit tests. Linked into each test
 * of tests/queue/ beside its own file; it asserts with cmocka like the tests do.
 */
#include "qtest.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "spoke/control/v1/control.pb-c.h"

/* ---- temporary directories ----------------------------------------------------------- */

char *qtest_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char tmpl[512];
    snprintf(tmpl, sizeof(tmpl), "%s/spk-%s-XXXXXX", base != NULL ? base : "/tmp", tag);
    if (mkdtemp(tmpl) == NULL)
        return NULL;
    return strdup(tmpl);
}

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void qtest_rmrf(const char *path)
{
    nftw(path, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- the test clock -------------------------------------------------------------------- */

int64_t qtest_now = QTEST_T0;

int64_t qtest_clock(void *arg)
{
    (void)arg;
    return qtest_now;
}

/* ---- the fixture ----------------------------------------------------------------------- */

qtest_fixture *qtest_fixture_new(const char *tag, const char *sub)
{
    qtest_fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->root = qtest_tmpdir(tag);
    assert_non_null(f->root);
    size_t n = strlen(f->root) + (sub != NULL ? strlen(sub) + 1 : 0) + 1;
    f->dir = malloc(n);
    assert_non_null(f->dir);
    if (sub != NULL)
        snprintf(f->dir, n, "%s/%s", f->root, sub);
    else
        snprintf(f->dir, n, "%s", f->root);
    spk_queue_opts_init(&f->opts);
    f->opts.clock = qtest_clock;
    qtest_now = QTEST_T0;
    return f;
}

void qtest_fixture_free(qtest_fixture *f)
{
    if (f == NULL)
        return;
    spk_queue_close(f->q);
    qtest_rmrf(f->root);
    free(f->dir);
    free(f->root);
    free(f);
}

void qtest_close(qtest_fixture *f)
{
    spk_queue_close(f->q);
    f->q = NULL;
}

void qtest_open(qtest_fixture *f)
{
    spk_errbuf eb = {{0}};
    qtest_close(f);
    int rc = spk_queue_open(f->dir, &f->opts, &f->q, &eb);
    if (rc != 0)
        fail_msg("open: %d: %s", rc, eb.msg);
}

spk_queue *qtest_child_open(const qtest_fixture *f)
{
    spk_queue *q = NULL;
    spk_errbuf eb = {{0}};
    if (spk_queue_open(f->dir, &f->opts, &q, &eb) != 0) {
        fprintf(stderr, "child %d: open: %s\n", (int)getpid(), eb.msg);
        _exit(2);
    }
    return q;
}

void qtest_read_all(qtest_fixture *f, spk_queue_batch *b)
{
    spk_errbuf eb = {{0}};
    int rc = spk_queue_read(f->q, SIZE_MAX, 0, b, &eb);
    if (rc != 0)
        fail_msg("read: %d: %s", rc, eb.msg);
}

void qtest_ack_batch(qtest_fixture *f, const spk_queue_batch *b)
{
    if (b->n == 0)
        return;
    uint64_t *seqs = malloc(b->n * sizeof(*seqs));
    assert_non_null(seqs);
    for (size_t i = 0; i < b->n; i++)
        seqs[i] = b->items[i].seq;
    size_t acked = 0;
    spk_errbuf eb = {{0}};
    int rc = spk_queue_ack(f->q, seqs, b->n, &acked, &eb);
    free(seqs);
    if (rc != 0)
        fail_msg("ack: %d: %s", rc, eb.msg);
    assert_int_equal(acked, b->n);
}

/* ---- generated payloads ---------------------------------------------------------------- */

void qtest_make_tag(char tag[QTEST_TAG_LEN + 1], uint32_t id)
{
    snprintf(tag, QTEST_TAG_LEN + 1, QTEST_TAG_PREFIX "%08x-", id);
}

void qtest_gen_payload(uint8_t *buf, size_t len, uint32_t id)
{
    uint32_t x = id * 2654435761u + 0x9e3779b9u;
    for (size_t j = 0; j < len; j += 4) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        size_t n = len - j < 4 ? len - j : 4;
        memcpy(buf + j, &x, n);
    }
    if (len >= QTEST_TAG_LEN) {
        char tag[QTEST_TAG_LEN + 1];
        qtest_make_tag(tag, id);
        memcpy(buf, tag, QTEST_TAG_LEN);
    }
}

int qtest_send_gen(spk_queue *q, uint32_t plugin, uint32_t id, size_t len, uint64_t *seq,
                   uint64_t *pending, spk_errbuf *eb)
{
    uint8_t *p = malloc(len > 0 ? len : 1);
    if (p == NULL)
        return SPK_ENOMEM;
    qtest_gen_payload(p, len, id);
    int rc =
        spk_queue_send(q, plugin, "edge-g", p, len, NULL, NULL, 0, false, -1, seq, pending, eb);
    free(p);
    return rc;
}

const char *qtest_item_problem(const spk_queue_item *it, uint32_t *id, size_t *len)
{
    if (it->status != 0)
        return "status is not 0";
    Spoke__Control__V1__EdgePayload *ep =
        spoke__control__v1__edge_payload__unpack(NULL, it->wire_len, it->wire);
    if (ep == NULL)
        return "not a decodable EdgePayload";
    const char *why = NULL;
    char tag[QTEST_TAG_LEN + 1];
    unsigned tid = 0;
    if (ep->sequence != it->seq)
        why = "its sequence differs from its key";
    else if (ep->plugin_id != it->plugin_id)
        why = "its plugin differs from the item's";
    else if (ep->payload.len < QTEST_TAG_LEN)
        why = "its payload has no tag";
    if (why == NULL) {
        memcpy(tag, ep->payload.data, QTEST_TAG_LEN);
        tag[QTEST_TAG_LEN] = '\0';
        if (sscanf(tag, QTEST_TAG_PREFIX "%8x-", &tid) != 1)
            why = "its payload has no tag";
    }
    if (why == NULL) {
        uint8_t *want = malloc(ep->payload.len);
        if (want == NULL) {
            why = "out of memory";
        } else {
            qtest_gen_payload(want, ep->payload.len, tid);
            if (memcmp(want, ep->payload.data, ep->payload.len) != 0)
                why = "its payload bytes differ from what was sent";
            free(want);
        }
        *id = tid;
        *len = ep->payload.len;
    }
    spoke__control__v1__edge_payload__free_unpacked(ep, NULL);
    return why;
}

/* ---- files ------------------------------------------------------------------------------ */

uint8_t *qtest_slurp(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail_msg("open %s: %s", path, strerror(errno));
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    assert_non_null(buf);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
        assert_true(n > 0);
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return buf;
}

long qtest_file_find(const char *path, const void *needle, size_t n)
{
    size_t len;
    uint8_t *buf = qtest_slurp(path, &len);
    uint8_t *hit = memmem(buf, len, needle, n);
    long off = hit != NULL ? (long)(hit - buf) : -1;
    free(buf);
    return off;
}

void qtest_file_poke(const char *path, long off, const void *bytes, size_t n)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, bytes, n, (off_t)off), (ssize_t)n);
    close(fd);
}

/* ---- child processes -------------------------------------------------------------------- */

pid_t qtest_fork_pipe(int *fd)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        *fd = p[1];
        return 0;
    }
    close(p[1]);
    *fd = p[0];
    return pid;
}

void qtest_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            _exit(9);
        c += w;
        n -= (size_t)w;
    }
}

bool qtest_read_full(int fd, void *p, size_t n)
{
    char *c = p;
    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        c += r;
        n -= (size_t)r;
    }
    return true;
}

void qtest_expect_killed(pid_t pid, const char *who)
{
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGKILL)
        fail_msg("%s %d was not killed by our SIGKILL (status %#x, exit code %d)", who, (int)pid,
                 st, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

void qtest_expect_exit0(pid_t pid, const char *who)
{
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("%s %d failed (status %#x)", who, (int)pid, st);
}

int64_t qtest_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void qtest_sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000L};
    nanosleep(&ts, NULL);
}

int qtest_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}
