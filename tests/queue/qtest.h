/*
 * qtest.h -- helpers shared by the queue unit tests (tests/queue/): a fixture that owns a
 * temporary directory, a queue handle and its options; a test clock; payloads generated
 * from a record ID that carry their ID in a tag, so a stored record says which one it is;
 * and small helpers for files and forked child processes.
 *
 * Failures: a helper without an spk_errbuf fails the running cmocka test (fail_msg or an
 * assert) on an unexpected error, so it is for the test's own process. The helpers meant
 * for forked children say so: they never assert, they return a code or _exit().
 *
 * Ownership: the fixture owns its strings and its handle (qtest_fixture_free() releases
 * them); anything else a helper returns is said at its declaration.
 */
#ifndef SPK_QTEST_H
#define SPK_QTEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "queue.h"

/* ---- temporary directories ----------------------------------------------------------- */

/* Make a fresh directory $TMPDIR/spk-<tag>-XXXXXX (/tmp without TMPDIR). Returns a malloc'd
 * path the caller frees, or NULL when it could not be made. */
char *qtest_tmpdir(const char *tag);

/* Remove a directory tree; errors are ignored. */
void qtest_rmrf(const char *path);

/* ---- the test clock -------------------------------------------------------------------- */

#define QTEST_T0 1700000000000 /* where qtest_now starts, in ms */

/* The time qtest_clock() reports, in ms; tests move it by hand. qtest_fixture_new() sets
 * it to QTEST_T0. */
extern int64_t qtest_now;

/* An spk_queue_opts.clock that returns qtest_now. */
int64_t qtest_clock(void *arg);

/* ---- the fixture ----------------------------------------------------------------------- */

typedef struct qtest_fixture {
    char *root;          /* the temporary directory: removed, with all in it, at the end */
    char *dir;           /* the queue's directory: a copy of root, or root/<sub> */
    spk_queue *q;        /* the handle qtest_open() opened, or NULL */
    spk_queue_opts opts; /* what qtest_open() opens with */
} qtest_fixture;

/* A fixture over a fresh temporary directory qtest_tmpdir(tag), its queue in root/<sub>
 * (in root itself when sub is NULL; qtest_open() creates it), no handle open yet, options
 * from spk_queue_opts_init() with opts.clock = qtest_clock; resets qtest_now to QTEST_T0.
 * Fails the test when anything cannot be made. The caller frees it with
 * qtest_fixture_free(). */
qtest_fixture *qtest_fixture_new(const char *tag, const char *sub);

/* Close f's handle, remove its root directory tree and free f; NULL is allowed. */
void qtest_fixture_free(qtest_fixture *f);

/* Close f's handle (if any) and set it to NULL. */
void qtest_close(qtest_fixture *f);

/* (Re)open the queue in f->dir with f->opts as f->q, closing the handle open before;
 * fails the test on an error. */
void qtest_open(qtest_fixture *f);

/* For a forked child: open its own handle on f's queue, or print why and _exit(2). The
 * child closes the handle with spk_queue_close(). */
spk_queue *qtest_child_open(const qtest_fixture *f);

/* Read every pending record of f->q into *b (freed by the caller with
 * spk_queue_batch_free()); fails the test on an error. */
void qtest_read_all(qtest_fixture *f, spk_queue_batch *b);

/* Acknowledge every record of *b on f->q; fails the test unless all of them were acked. */
void qtest_ack_batch(qtest_fixture *f, const spk_queue_batch *b);

/* ---- generated payloads ---------------------------------------------------------------- */

#define QTEST_TAG_PREFIX "qrec-"
#define QTEST_TAG_LEN    14 /* "qrec-%08x-" */

/* Write record id's tag, "qrec-<id as 8 hex digits>-", and its NUL into tag. */
void qtest_make_tag(char tag[QTEST_TAG_LEN + 1], uint32_t id);

/* Fill buf with the payload of record id: len pseudo-random bytes derived from id, the
 * first QTEST_TAG_LEN of them replaced by its tag when len >= QTEST_TAG_LEN. */
void qtest_gen_payload(uint8_t *buf, size_t len, uint32_t id);

/* Enqueue qtest_gen_payload(id, len) as plugin `plugin` (edge ID "edge-g") with
 * spk_queue_send(); seq, pending and eb as there. Returns the queue's code, or SPK_ENOMEM.
 * Never asserts: children use it too. */
int qtest_send_gen(spk_queue *q, uint32_t plugin, uint32_t id, size_t len, uint64_t *seq,
                   uint64_t *pending, spk_errbuf *eb);

/* What is wrong with a read item, as a static string, or NULL when nothing is: its status
 * is 0, it decodes, carries its key's sequence number and plugin, and its payload is a tag
 * and exactly qtest_gen_payload() of the ID in that tag. When the tag is read, *id and
 * *len receive that ID and the payload's length. Never asserts: children use it too. */
const char *qtest_item_problem(const spk_queue_item *it, uint32_t *id, size_t *len);

/* ---- files ------------------------------------------------------------------------------ */

/* The whole content of the file at path, in a malloc'd buffer (one byte longer than *len)
 * the caller frees; fails the test when it cannot be read. */
uint8_t *qtest_slurp(const char *path, size_t *len);

/* The offset of the first `n` bytes equal to needle in the file at path, or -1. */
long qtest_file_find(const char *path, const void *needle, size_t n);

/* Overwrite n bytes of the file at path from offset off with bytes. */
void qtest_file_poke(const char *path, long off, const void *bytes, size_t n);

/* ---- child processes -------------------------------------------------------------------- */

/* Make a pipe and fork. In the child, returns 0 with *fd the pipe's write end (the read
 * end closed); in the parent, returns the child's pid with *fd the read end (the write end
 * closed). The caller closes *fd. */
pid_t qtest_fork_pipe(int *fd);

/* Write all n bytes to fd, retrying after EINTR and short writes; _exit(9) on an error
 * (for children). */
void qtest_write_all(int fd, const void *p, size_t n);

/* Read exactly n bytes from fd into p, retrying after EINTR; false at EOF or on an error. */
bool qtest_read_full(int fd, void *p, size_t n);

/* Wait for child `pid` (`who` names it in the failure message); fails the test unless it
 * was killed by SIGKILL. */
void qtest_expect_killed(pid_t pid, const char *who);

/* Wait for child `pid`; fails the test unless it exited with status 0. */
void qtest_expect_exit0(pid_t pid, const char *who);

/* CLOCK_MONOTONIC in microseconds. */
int64_t qtest_mono_us(void);

/* Sleep `us` microseconds (nanosleep; an interruption ends it early). */
void qtest_sleep_us(long us);

/* A qsort() comparison of uint64_t values, ascending. */
int qtest_cmp_u64(const void *a, const void *b);

#endif
