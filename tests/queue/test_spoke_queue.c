/*
 * test_spoke_queue.c -- the operator tool, run as a process on a real queue: `peek` pages
 * (--from SEQ --limit N, across more than one of its pages), lists everything with
 * --limit 0, previews 64 bytes of a payload or shows it whole with --full; `show SEQ`
 * shows one record whole and fails for a sequence number that is not pending.
 */
#include "qtest.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <cmocka.h>

#include "queue.h"

#define N_RECORDS 200u

typedef qtest_fixture fixture;

/* Run spoke-queue with `args` on f's queue; its stdout (malloc'd) and exit status. */
static char *run_tool(const fixture *f, const char *args, int *status)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "'%s' %s '%s'", SPOKE_QUEUE_BIN, args, f->dir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    assert_non_null(out);
    size_t n;
    while ((n = fread(out + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 4096) {
            cap *= 2;
            out = realloc(out, cap);
            assert_non_null(out);
        }
    }
    out[len] = '\0';
    int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return out;
}

/* The sequence numbers of the records listed, in order; returns how many. */
static size_t listed(const char *out, uint64_t *seqs, size_t cap)
{
    size_t n = 0;
    for (const char *l = out; l != NULL && *l != '\0';) {
        unsigned long long s;
        if (sscanf(l, "seq %llu  plugin", &s) == 1) {
            if (n < cap)
                seqs[n] = s;
            n++;
        }
        l = strchr(l, '\n');
        l = l != NULL ? l + 1 : NULL;
    }
    return n;
}

static size_t len_of(uint32_t id)
{
    return 50 + (id * 37) % 300; /* record 0 is 50 bytes, 7 is 309 */
}

static int setup(void **state)
{
    fixture *f = qtest_fixture_new("sq", "q");
    f->opts.journal_size = SPK_QUEUE_JOURNAL_MIN;
    f->opts.map_size = 64ull << 20;
    qtest_open(f);
    for (uint32_t id = 0; id < N_RECORDS; id++) {
        uint64_t seq = 0;
        assert_int_equal(qtest_send_gen(f->q, 1, id, len_of(id), &seq, NULL, NULL), 0);
        assert_int_equal(seq, id + 1);
    }
    assert_int_equal(spk_queue_sync(f->q, NULL), 0);
    qtest_close(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    qtest_fixture_free(*state);
    return 0;
}

static void test_peek_pages(void **state)
{
    fixture *f = *state;
    uint64_t seqs[N_RECORDS];
    int st;
    char *out = run_tool(f, "peek --from 50 --limit 100", &st);
    assert_int_equal(st, 0);
    assert_int_equal(listed(out, seqs, N_RECORDS), 100); /* more than one page of 64 */
    for (size_t i = 0; i < 100; i++)
        assert_int_equal(seqs[i], 50 + i);
    free(out);
    out = run_tool(f, "peek --limit 0", &st);
    assert_int_equal(st, 0);
    assert_int_equal(listed(out, seqs, N_RECORDS), N_RECORDS);
    assert_int_equal(seqs[N_RECORDS - 1], N_RECORDS);
    free(out);
    out = run_tool(f, "peek", &st); /* the default: 10 from the oldest */
    assert_int_equal(listed(out, seqs, N_RECORDS), 10);
    assert_int_equal(seqs[0], 1);
    free(out);
    out = run_tool(f, "peek --from 1000", &st);
    assert_int_equal(st, 0);
    assert_int_equal(listed(out, seqs, N_RECORDS), 0);
    assert_non_null(strstr(out, "no pending record from seq 1000 on"));
    free(out);
    out = run_tool(f, "peek --limit x", &st);
    assert_int_equal(st, 2);
    free(out);
}

static void test_full_payloads(void **state)
{
    fixture *f = *state;
    int st;
    /* record 7 (seq 8) has 309 bytes: a preview is cut, --full is not */
    char *out = run_tool(f, "peek --from 8 --limit 1", &st);
    assert_int_equal(st, 0);
    assert_non_null(strstr(out, "... (309 bytes)"));
    free(out);
    out = run_tool(f, "peek --from 8 --limit 1 --full", &st);
    assert_int_equal(st, 0);
    assert_null(strstr(out, "... ("));
    char tag[QTEST_TAG_LEN + 1];
    qtest_make_tag(tag, 7);
    assert_non_null(strstr(out, tag));
    const char *payload = strstr(out, "  payload: \"");
    assert_non_null(payload);
    assert_true(strlen(payload) > 309); /* every byte, escaped */
    free(out);
    out = run_tool(f, "show 8", &st);
    assert_int_equal(st, 0);
    uint64_t seqs[4];
    assert_int_equal(listed(out, seqs, 4), 1);
    assert_int_equal(seqs[0], 8);
    assert_null(strstr(out, "... ("));
    free(out);
    out = run_tool(f, "show 9999", &st);
    assert_int_equal(st, 1);
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_peek_pages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_payloads, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
