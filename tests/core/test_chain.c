/*
 * test_chain.c -- verdict merging and buffer rewriting in the plugin chain, with plugins
 * built in-process (the chain does not care how a table got there).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "chain.h"
#include "host.h"

static const spoke_host *H;
static char trace[256]; /* which plugins ran, in order */

/* A fake plugin: its self is a small struct saying what to do. */
typedef struct fake {
    char tag;
    spoke_verdict verdict;
    const char *rewrite; /* buf_set to this, if not NULL */
    const char *reply;   /* respond() this, if not NULL */
    int terminate;       /* raise the terminate signal */
    spoke_ctx *ctx;
} fake;

static spoke_verdict fake_hook(void *self, spoke_conn *conn, spoke_buf *buf)
{
    fake *f = self;
    size_t n = strlen(trace);
    trace[n] = f->tag;
    trace[n + 1] = '\0';
    if (f->rewrite)
        assert_int_equal(H->buf_set(buf, f->rewrite, strlen(f->rewrite)), 0);
    if (f->reply)
        assert_int_equal(H->respond(conn, f->reply, strlen(f->reply)), 0);
    if (f->terminate) {
        spoke_kv why = {"reason", "test"};
        assert_int_equal(H->signal(f->ctx, conn, "terminate", &why, 1), 0);
    }
    return f->verdict;
}

/* on_half_close of a fake: appends its tag to buf (what earlier plugins put there stays),
 * then acts as fake_hook does. */
static spoke_verdict fake_half_close(void *self, spoke_conn *conn, int from_client,
                                     spoke_buf *buf)
{
    fake *f = self;
    assert_int_equal(conn->reply_to_server, !from_client);
    size_t n = buf->len;
    uint8_t *p = H->buf_resize(buf, n + 1);
    assert_non_null(p);
    p[n] = (uint8_t)f->tag;
    return fake_hook(self, conn, buf);
}

typedef struct fixture {
    spk_plugin plugins[4];
    spk_plugin *pv[4];
    fake fakes[4];
    spk_plugin_set set;
    spk_chain chain;
    spoke_conn conn;
    spk_buf buf;
} fixture;

static void setup_chain(fixture *fx, size_t n)
{
    memset(fx, 0, sizeof(*fx));
    for (size_t i = 0; i < n; i++) {
        spk_plugin *p = &fx->plugins[i];
        p->index = (unsigned)i;
        p->ctx.plugin = p;
        snprintf(p->log_prefix, sizeof(p->log_prefix), "plugin f%zu: ", i);
        p->table.on_traffic_from_client = fake_hook;
        fx->fakes[i].tag = (char)('a' + i);
        fx->fakes[i].ctx = &p->ctx;
        p->self = &fx->fakes[i];
        fx->pv[i] = p;
    }
    fx->set.v = fx->pv;
    fx->set.n = n;
    trace[0] = '\0';
}

static void build(fixture *fx)
{
    assert_int_equal(spk_chain_build(&fx->chain, &fx->set), 0);
    assert_int_equal(spk_chain_conn_init(&fx->chain, &fx->conn, 1, "127.0.0.1:1"), 0);
}

static spoke_verdict run(fixture *fx, const char *data)
{
    spk_buf_view(&fx->buf, (const uint8_t *)data, strlen(data));
    return spk_chain_run(&fx->chain, SPK_HOOK_FROM_CLIENT, &fx->conn, &fx->buf);
}

static void teardown_chain(fixture *fx)
{
    spk_chain_conn_fini(&fx->conn);
    spk_chain_free(&fx->chain);
    spk_buf_free(&fx->buf);
}

static void test_all_continue_runs_in_order(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 3);
    build(&fx);
    assert_int_equal(run(&fx, "hello"), SPOKE_CONTINUE);
    assert_string_equal(trace, "abc");
    assert_memory_equal(fx.buf.pub.data, "hello", 5);
    teardown_chain(&fx);
}

static void test_later_plugins_see_rewrites(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 3);
    fx.fakes[0].rewrite = "first rewrite, longer than the input";
    fx.fakes[0].verdict = SPOKE_MODIFIED;
    fx.fakes[2].rewrite = "x"; /* shrink */
    fx.fakes[2].verdict = SPOKE_MODIFIED;
    build(&fx);
    assert_int_equal(run(&fx, "hi"), SPOKE_CONTINUE);
    assert_string_equal(trace, "abc");
    assert_int_equal(fx.buf.pub.len, 1);
    assert_memory_equal(fx.buf.pub.data, "x", 1);
    teardown_chain(&fx);
}

static void test_first_stop_wins(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 3);
    fx.fakes[1].verdict = SPOKE_RESPOND;
    fx.fakes[1].reply = "answer";
    fx.fakes[2].verdict = SPOKE_CLOSE; /* never runs */
    build(&fx);
    assert_int_equal(run(&fx, "q"), SPOKE_RESPOND);
    assert_string_equal(trace, "ab");
    assert_int_equal(fx.conn.reply.len, 6);
    assert_memory_equal(fx.conn.reply.data, "answer", 6);
    assert_int_equal(fx.conn.reply_to_server, 0);
    teardown_chain(&fx);
}

static void test_close_stops_chain(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 2);
    fx.fakes[0].verdict = SPOKE_CLOSE;
    build(&fx);
    assert_int_equal(run(&fx, "q"), SPOKE_CLOSE);
    assert_string_equal(trace, "a");
    teardown_chain(&fx);
}

static void test_unknown_verdict_is_close(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 2);
    fx.fakes[0].verdict = (spoke_verdict)42;
    build(&fx);
    assert_int_equal(run(&fx, "q"), SPOKE_CLOSE);
    assert_string_equal(trace, "a");
    teardown_chain(&fx);
}

static void test_terminate_signal_closes(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 3);
    fx.fakes[1].terminate = 1;
    fx.fakes[1].reply = "bye";
    build(&fx);
    assert_int_equal(run(&fx, "q"), SPOKE_CLOSE);
    assert_string_equal(trace, "ab");
    assert_true(fx.conn.flags & SPK_CONN_TERMINATE);
    teardown_chain(&fx);
}

static void test_plugins_without_hook_are_skipped(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 3);
    fx.plugins[1].table.on_traffic_from_client = NULL;
    build(&fx);
    assert_int_equal(fx.chain.n_traffic[SPK_HOOK_FROM_CLIENT], 2);
    assert_int_equal(fx.chain.n_traffic[SPK_HOOK_TO_SERVER], 0);
    assert_int_equal(run(&fx, "q"), SPOKE_CONTINUE);
    assert_string_equal(trace, "ac");
    teardown_chain(&fx);
}

static void test_slot_records_plugin_and_hook(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 2);
    build(&fx);
    spk_slot slot;
    memset(&slot, 0, sizeof(slot));
    spk_chain_set_slot(&fx.chain, &slot);
    run(&fx, "q");
    assert_int_equal(atomic_load(&slot.seq), 2);
    assert_int_equal(atomic_load(&slot.plugin), 0); /* left the chain */
    assert_int_equal(atomic_load(&slot.hook), SPK_HOOK_FROM_CLIENT);
    teardown_chain(&fx);
}

static void test_buf_resize_keeps_prefix(void **state)
{
    (void)state;
    spk_buf b;
    memset(&b, 0, sizeof(b));
    static const uint8_t src[] = "abcdef";
    spk_buf_view(&b, src, 6);
    uint8_t *w = H->buf_resize(&b.pub, 1 << 20); /* grow to 1 MiB */
    assert_non_null(w);
    assert_memory_equal(w, "abcdef", 6);
    assert_int_equal(b.pub.len, 1 << 20);
    w = H->buf_resize(&b.pub, 3);
    assert_memory_equal(b.pub.data, "abc", 3);
    assert_int_equal(b.pub.len, 3);
    /* buf_set with a pointer into the buffer itself */
    assert_int_equal(H->buf_set(&b.pub, b.pub.data + 1, 2), 0);
    assert_memory_equal(b.pub.data, "bc", 2);
    assert_int_equal(H->buf_set(&b.pub, NULL, 0), 0);
    assert_int_equal(b.pub.len, 0);
    assert_int_equal(H->buf_set(&b.pub, NULL, 5), SPOKE_ERR_INVALID);
    spk_buf_free(&b);
}

/* on_half_close (ABI 1.3): in chain order, each plugin sees what earlier ones put in the
 * buffer, plugins without it are skipped, the first stop wins, respond() goes to the side
 * that half-closed. */
static void test_half_close_order_and_merge(void **state)
{
    (void)state;
    fixture fx;
    setup_chain(&fx, 4);
    fx.plugins[0].table.on_half_close = fake_half_close;
    fx.plugins[2].table.on_half_close = fake_half_close;
    fx.plugins[3].table.on_half_close = fake_half_close;
    fx.fakes[0].verdict = SPOKE_MODIFIED;
    fx.fakes[2].verdict = SPOKE_MODIFIED;
    build(&fx);
    assert_true(fx.chain.any_half_close);
    spk_buf_view(&fx.buf, NULL, 0);
    assert_int_equal(spk_chain_half_close(&fx.chain, &fx.conn, true, &fx.buf), SPOKE_CONTINUE);
    assert_string_equal(trace, "acd");
    assert_int_equal(fx.buf.pub.len, 3);
    assert_memory_equal(fx.buf.pub.data, "acd", 3);
    /* the server's half-close; c answers (to the server) and stops the chain */
    trace[0] = '\0';
    fx.fakes[2].verdict = SPOKE_RESPOND;
    fx.fakes[2].reply = "bye";
    spk_buf_view(&fx.buf, NULL, 0);
    assert_int_equal(spk_chain_half_close(&fx.chain, &fx.conn, false, &fx.buf), SPOKE_RESPOND);
    assert_string_equal(trace, "ac");
    assert_int_equal(fx.conn.reply_to_server, 1);
    assert_memory_equal(fx.conn.reply.data, "bye", 3);
    teardown_chain(&fx);
    /* nobody implements it: the proxy skips the call */
    setup_chain(&fx, 2);
    build(&fx);
    assert_false(fx.chain.any_half_close);
    teardown_chain(&fx);
}

int main(void)
{
    H = spk_host_table();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_continue_runs_in_order),
        cmocka_unit_test(test_later_plugins_see_rewrites),
        cmocka_unit_test(test_first_stop_wins),
        cmocka_unit_test(test_close_stops_chain),
        cmocka_unit_test(test_unknown_verdict_is_close),
        cmocka_unit_test(test_terminate_signal_closes),
        cmocka_unit_test(test_plugins_without_hook_are_skipped),
        cmocka_unit_test(test_slot_records_plugin_and_hook),
        cmocka_unit_test(test_buf_resize_keeps_prefix),
        cmocka_unit_test(test_half_close_order_and_merge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
