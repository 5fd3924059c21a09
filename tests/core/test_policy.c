/*
 * test_policy.c -- the policy engine (core/policy.c) on its own: configs loaded by the
 * real parser from files, an engine built as a worker builds its own, signals handed to
 * spk_policy_signal() for a bare plugin and connection. First match and conditions, every
 * built-in action's effect on the connection, Lua actions' answers, the failures (error,
 * endless loop, endless loop that catches its timeout, unbounded allocation, a bad return
 * value, a built-in action that cannot be done) each counted by kind with the built-in
 * behaviour returned and the state still usable afterwards, the sandbox's removed
 * globals, and --check-config's messages with the file's line.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "policy.h"

static int load(const char *policies, spk_config **cfg, spk_errbuf *eb)
{
    char path[] = "/tmp/spoke-test-policy-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fprintf(f, "listen: { upstream: 127.0.0.1:5432 }\n%s", policies);
    fclose(f);
    int rc = spk_config_load(path, cfg, eb);
    unlink(path);
    return rc;
}

typedef struct fx {
    spk_config *cfg;
    spk_policy *pol;
    spk_policy_counters c;
    spk_plugin p;
    spoke_conn conn;
} fx;

static void fx_new(fx *x, const char *policies)
{
    memset(x, 0, sizeof(*x));
    spk_errbuf eb;
    int rc = load(policies, &x->cfg, &eb);
    if (rc != 0)
        fail_msg("%s", eb.msg);
    rc = spk_policy_new(x->cfg, NULL, &x->c, &x->pol, &eb);
    if (rc != 0)
        fail_msg("%s", eb.msg);
    assert_non_null(x->pol);
    x->p.name = (char *)"t-plugin";
    x->p.id = 5;
    x->p.slot = &x->p.own_slot;
    x->p.ctx.plugin = &x->p;
    snprintf(x->p.log_prefix, sizeof(x->p.log_prefix), "plugin t-plugin: ");
    x->conn.id = 9;
    snprintf(x->conn.peer, sizeof(x->conn.peer), "10.1.2.3:4000");
}

static void fx_free(fx *x)
{
    spk_policy_free(x->pol);
    spk_config_free(x->cfg);
    spk_bytes_free(&x->conn.reply);
}

static int sig(fx *x, const char *name, const char *reason)
{
    x->conn.flags = 0;
    x->conn.reply.len = 0;
    const spoke_kv f[] = {{"reason", reason}};
    return spk_policy_signal(x->pol, &x->p, &x->conn, name, f, reason ? 1 : 0);
}

static void no_policies_no_engine(void **state)
{
    (void)state;
    spk_config *cfg;
    spk_errbuf eb;
    assert_int_equal(load("", &cfg, &eb), 0);
    spk_policy *pol = (spk_policy *)1;
    assert_int_equal(spk_policy_new(cfg, NULL, NULL, &pol, &eb), 0);
    assert_null(pol);
    spk_config_free(cfg);
}

static void first_match_and_actions(void **state)
{
    (void)state;
    fx x;
    fx_new(&x,
           "policies:\n  list:\n"
           "    - { signal: terminate, when: \"fields.reason == 'keep'\", action: passthrough }\n"
           "    - { signal: terminate, when: \"conn.peer:match('^10%.') and plugin.id == 5\", "
           "action: terminate, answer: \"NO\\n\" }\n"
           "    - { signal: quit, action: close }\n"
           "    - { signal: \"*\", when: \"signal.name == 'other'\", action: passthrough }\n");
    assert_int_equal(sig(&x, "terminate", "keep"), 0); /* 1st */
    assert_int_equal(x.conn.flags, 0);
    assert_int_equal(sig(&x, "terminate", "go"), 0); /* 2nd */
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    assert_int_equal(x.conn.reply.len, 3);
    assert_memory_equal(x.conn.reply.data, "NO\n", 3);
    x.conn.flags = 0;
    assert_int_equal(spk_bytes_append(&x.conn.reply, "queued", 6), 0);
    assert_int_equal(spk_policy_signal(x.pol, &x.p, &x.conn, "quit", NULL, 0), 0); /* 3rd */
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    assert_int_equal(x.conn.reply.len, 0);       /* close drops what was queued */
    assert_int_equal(sig(&x, "other", NULL), 0); /* 4th */
    assert_int_equal(sig(&x, "unnamed", NULL), SPK_POLICY_BUILTIN); /* none */
    assert_int_equal(x.c.matched, 4);
    assert_int_equal(x.c.errors + x.c.timeouts + x.c.memory + x.c.action_failed, 0);
    /* the host's open: only a policy naming it, never * */
    spk_policy_open(x.pol, &x.conn);
    assert_int_equal(x.conn.flags, 0);
    fx_free(&x);
}

static void lua_actions(void **state)
{
    (void)state;
    fx x;
    fx_new(&x, "policies:\n  setup: \"n = 0\"\n  list:\n"
               "    - signal: a\n"
               "      run: |\n"
               "        n = n + 1\n"
               "        if n == 1 then return end\n"
               "        if n == 2 then return 'builtin' end\n"
               "        if n == 3 then return 'terminate', 'bye' end\n"
               "        return 42\n");
    assert_int_equal(sig(&x, "a", NULL), 0);
    assert_int_equal(x.conn.flags, 0);
    assert_int_equal(sig(&x, "a", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(sig(&x, "a", NULL), 0);
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    assert_memory_equal(x.conn.reply.data, "bye", 3);
    assert_int_equal(sig(&x, "a", NULL), SPK_POLICY_BUILTIN); /* 42: an error */
    assert_int_equal(x.c.errors, 1);
    fx_free(&x);
}

static void failures_are_counted_and_state_survives(void **state)
{
    (void)state;
    fx x;
    fx_new(&x,
           "policies:\n  timeout: 10000\n  memory: 1MiB\n  list:\n"
           "    - { signal: err, when: \"error('no')\", action: close }\n"
           "    - { signal: loop, when: \"(function() while true do end end)()\", action: close }\n"
           "    - signal: loop2\n"
           "      when: \"(function() while true do pcall(function() while true do end end) end "
           "end)()\"\n"
           "      action: close\n"
           "    - { signal: mem, run: \"t = {} while true do t[#t + 1] = string.rep('x', 10000) .. "
           "#t end\" }\n"
           "    - { signal: mem2, run: \"local t = {} while true do t[#t + 1] = string.rep('y', "
           "10000) .. #t end\" }\n"
           "    - { signal: send, action: send_to_control }\n"
           "    - { signal: ok, when: \"fields.reason == 'x'\", action: terminate }\n");
    assert_int_equal(sig(&x, "err", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.errors, 1);
    assert_int_equal(sig(&x, "loop", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.timeouts, 1);
    assert_int_equal(sig(&x, "loop2", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.timeouts, 2);
    assert_int_equal(sig(&x, "mem2", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.memory, 1);
    assert_true(spk_policy_memory(x.pol) <= 1024 * 1024);
    assert_int_equal(sig(&x, "send", NULL), SPK_POLICY_BUILTIN); /* no env: no queue */
    assert_int_equal(x.c.action_failed, 1);
    assert_int_equal(x.conn.flags, 0);       /* nothing failed acted on the connection */
    assert_int_equal(sig(&x, "ok", "x"), 0); /* the state still works */
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    /* a global that fills the state: that policy fails from then on, others still work
     * as long as they fit */
    assert_int_equal(sig(&x, "mem", NULL), SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.memory, 2);
    assert_true(spk_policy_memory(x.pol) <= 1024 * 1024);
    fx_free(&x);
}

/* An error raised in a function policies.setup defined names both lines of the file. */
static void error_in_setup_function(void **state)
{
    (void)state;
    fx x;
    fx_new(&x, "policies:\n"                                                            /* 2 */
               "  setup: |\n"                                                           /* 3 */
               "    function check(r)\n"                                                /* 4 */
               "      return r:len() > 0\n"                                             /* 5 */
               "    end\n"                                                              /* 6 */
               "  list:\n"                                                              /* 7 */
               "    - { signal: a, when: \"check(fields.reason)\", action: close }\n"); /* 8 */
    char path[] = "/tmp/spoke-test-policy-log-XXXXXX";
    int fd = mkstemp(path), saved = dup(2);
    assert_true(fd >= 0 && saved >= 0);
    dup2(fd, 2);
    int rc = sig(&x, "a", NULL); /* no reason: r is nil */
    dup2(saved, 2);
    close(saved);
    char logged[2048] = "";
    ssize_t n = pread(fd, logged, sizeof(logged) - 1, 0);
    close(fd);
    unlink(path);
    assert_true(n > 0);
    assert_int_equal(rc, SPK_POLICY_BUILTIN);
    assert_int_equal(x.c.errors, 1);
    if (strstr(logged, ":8: policies.list[0].when: Lua: ") == NULL ||
        strstr(logged, ":5: (policies.setup) attempt to index a nil value") == NULL)
        fail_msg("%s", logged);
    assert_int_equal(sig(&x, "a", "yes"), 0);
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    fx_free(&x);
}

static void sandbox(void **state)
{
    (void)state;
    fx x;
    fx_new(&x, "policies:\n  list:\n"
               "    - signal: probe\n"
               "      when: |\n"
               "        os == nil and io == nil and require == nil and package == nil and\n"
               "        debug == nil and coroutine == nil and dofile == nil and\n"
               "        loadfile == nil and print == nil and collectgarbage == nil and\n"
               "        string.dump == nil and ('').dump == nil and\n"
               "        load(string.char(27) .. 'Lua') == nil and load('return 1')() == 1 and\n"
               "        load('return x', 't', 't', {x = 2})() == 2\n"
               "      action: terminate\n");
    assert_int_equal(sig(&x, "probe", NULL), 0);
    assert_true(x.conn.flags & SPK_CONN_TERMINATE);
    fx_free(&x);
}

static void check_messages(void **state)
{
    (void)state;
    spk_config *cfg = NULL;
    spk_errbuf eb;
    assert_int_equal(load("policies:\n"           /* 2 */
                          "  list:\n"             /* 3 */
                          "    - signal: a\n"     /* 4 */
                          "      run: |\n"        /* 5 */
                          "        local x = 1\n" /* 6 */
                          "        x = = 2\n",    /* 7 */
                          &cfg, &eb),
                     SPK_ECONFIG);
    assert_non_null(strstr(eb.msg, ":7: policies.list[0].run: Lua: unexpected symbol near '='"));
    assert_int_equal(
        load("policies:\n  list:\n    - { signal: a, when: \"x ==\", action: close }\n", &cfg, &eb),
        SPK_ECONFIG);
    if (strstr(eb.msg, ":4: policies.list[0].when: Lua: unexpected symbol") == NULL)
        fail_msg("%s", eb.msg);
    assert_int_equal(load("policies:\n  list:\n    - { signal: a }\n", &cfg, &eb), SPK_ECONFIG);
    assert_non_null(strstr(eb.msg, "exactly one of `action:`"));
    assert_int_equal(load("policies:\n  list:\n    - { action: close }\n", &cfg, &eb), SPK_ECONFIG);
    assert_non_null(strstr(eb.msg, "`signal:` is required"));
    assert_int_equal(load("policies:\n  setup: \"while true do end\"\n", &cfg, &eb), SPK_ECONFIG);
    assert_non_null(strstr(eb.msg, "policies.setup: Lua: ran past policies.timeout"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(no_policies_no_engine),
        cmocka_unit_test(first_match_and_actions),
        cmocka_unit_test(lua_actions),
        cmocka_unit_test(failures_are_counted_and_state_survives),
        cmocka_unit_test(error_in_setup_function),
        cmocka_unit_test(sandbox),
        cmocka_unit_test(check_messages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
