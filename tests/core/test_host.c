/*
 * test_host.c -- the host services table: one table per role (a service a role does not
 * offer is NULL, the ABI's rule 4), the 1.1 services config_get_duration and
 * config_get_size (missing vs malformed keys), the lifetime of returned strings, and
 * the lifecycle rule that fini never runs after a failed init. Against real .so files
 * built by the test suite (tests/plugins/t_*.c).
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

#include "host.h"
#include "loader.h"

static char tdir[1024];

static const char *tplugin(const char *name)
{
    static char path[4][1200];
    static int i;
    i = (i + 1) % 4;
    snprintf(path[i], sizeof(path[i]), "%s/%s.so", tdir, name);
    return path[i];
}

/* A config of up to four plugin entries, each with up to four `config:` pairs. */
typedef struct fix {
    spk_config cfg;
    spk_plugin_conf pc[4];
    spoke_kv kv[4][4];
} fix;

static void fix_init(fix *f)
{
    memset(f, 0, sizeof(*f));
    f->cfg.file = "test.yaml";
    f->cfg.compatibility = SPK_COMPAT_STRICT;
    f->cfg.plugins_dir = tdir;
    f->cfg.plugins = f->pc;
}

static spk_plugin_conf *fix_add(fix *f, const char *path, const char *name)
{
    size_t i = f->cfg.n_plugins++;
    spk_plugin_conf *pc = &f->pc[i];
    pc->path = (char *)path;
    pc->file = (char *)path;
    pc->name = (char *)name;
    pc->enabled = true;
    pc->line = (int)i + 10;
    pc->config = f->kv[i];
    return pc;
}

static void conf_set(spk_plugin_conf *pc, const char *key, const char *value)
{
    spoke_kv *kv = (spoke_kv *)pc->config;
    kv[pc->n_config++] = (spoke_kv){.key = key, .value = value};
}

/* ---- one table per role --------------------------------------------------------- */

static void test_role_tables(void **state)
{
    (void)state;
    const spoke_host *e = spk_host_table_for(SPOKE_ROLE_EDGE);
    const spoke_host *c = spk_host_table_for(SPOKE_ROLE_CONTROL);
    assert_ptr_equal(spk_host_table(), e);
    assert_true(e != c);
    for (int i = 0; i < 2; i++) {
        const spoke_host *h = i ? c : e;
        assert_int_equal(h->abi_major, SPOKE_ABI_MAJOR);
        assert_int_equal(h->abi_minor, SPOKE_ABI_MINOR);
        assert_int_equal(h->struct_size, sizeof(spoke_host));
        /* Offered in both roles. */
        assert_true(SPOKE_HOST_HAS(h, log));
        assert_true(SPOKE_HOST_HAS(h, config_get));
        assert_true(SPOKE_HOST_HAS(h, edge_id));
        assert_true(SPOKE_HOST_HAS(h, edge_namespace));
        assert_true(SPOKE_HOST_HAS(h, every));
        assert_true(SPOKE_HOST_HAS(h, timer_cancel));
        assert_true(SPOKE_HOST_HAS(h, signal));
        assert_true(SPOKE_HOST_HAS(h, strerror));
        assert_true(SPOKE_HOST_HAS(h, config_get_duration));
        assert_true(SPOKE_HOST_HAS(h, config_get_size));
    }
    /* Edge role only: set in the edge table, NULL (not an erroring stub) in control's. */
    assert_true(SPOKE_HOST_HAS(e, buf_set) && SPOKE_HOST_HAS(e, buf_resize));
    assert_true(SPOKE_HOST_HAS(e, conn_id) && SPOKE_HOST_HAS(e, conn_peer));
    assert_true(SPOKE_HOST_HAS(e, conn_data) && SPOKE_HOST_HAS(e, respond));
    assert_true(SPOKE_HOST_HAS(e, send_to_control) && SPOKE_HOST_HAS(e, send_to_control_json));
    assert_null(c->buf_set);
    assert_null(c->buf_resize);
    assert_null(c->conn_id);
    assert_null(c->conn_peer);
    assert_null(c->conn_data);
    assert_null(c->respond);
    assert_null(c->send_to_control);
    assert_null(c->send_to_control_json);
    assert_false(SPOKE_HOST_HAS(c, send_to_control));
}

/* A host table cut off before a 1.1 field does not offer it, whatever follows. */
static void test_host_has_reads_struct_size(void **state)
{
    (void)state;
    spoke_host h = *spk_host_table();
    h.struct_size = (uint32_t)offsetof(spoke_host, config_get_duration);
    assert_true(SPOKE_HOST_HAS(&h, strerror));
    assert_false(SPOKE_HOST_HAS(&h, config_get_duration));
    assert_false(SPOKE_HOST_HAS(&h, config_get_size));
}

/* The plugin sees its role's table: t_lifecycle records whether it was offered
 * send_to_control. */
static char *read_file(const char *path)
{
    static char buf[4096];
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    buf[n] = '\0';
    if (f)
        fclose(f);
    return buf;
}

static int run_set(fix *f, const spoke_host *host, spoke_role role, spk_errbuf *eb)
{
    spk_plugin_set set;
    int rc = spk_plugin_set_load(&f->cfg, host, NULL, NULL, NULL, 0, &set, eb);
    if (rc == 0) {
        rc = spk_plugin_set_init(&set, role, eb);
        spk_host_unload(&set);
    }
    return rc;
}

static void mark_path(char *out, size_t cap)
{
    snprintf(out, cap, "/tmp/spoke-test-host-%ld.mark", (long)getpid());
    unlink(out);
}

static void test_plugin_sees_role_table(void **state)
{
    (void)state;
    char mark[256];
    spk_errbuf eb = {""};
    for (int r = 0; r < 2; r++) {
        spoke_role role = r ? SPOKE_ROLE_CONTROL : SPOKE_ROLE_EDGE;
        fix f;
        fix_init(&f);
        mark_path(mark, sizeof(mark));
        conf_set(fix_add(&f, tplugin("t_lifecycle"), "a"), "mark", mark);
        assert_int_equal(run_set(&f, spk_host_table_for(role), role, &eb), 0);
        assert_string_equal(read_file(mark), r ? "init a send_to_control=no\nfini a\n"
                                               : "init a send_to_control=yes\nfini a\n");
        unlink(mark);
    }
}

/* ---- fini after a failed init: never for that plugin; in reverse order for the others */

static void test_no_fini_after_failed_init(void **state)
{
    (void)state;
    char mark[256];
    spk_errbuf eb = {""};
    fix f;
    fix_init(&f);
    mark_path(mark, sizeof(mark));
    conf_set(fix_add(&f, tplugin("t_lifecycle"), "a"), "mark", mark);
    conf_set(fix_add(&f, tplugin("t_lifecycle"), "b"), "mark", mark);
    spk_plugin_conf *c = fix_add(&f, tplugin("t_lifecycle"), "c");
    conf_set(c, "mark", mark);
    conf_set(c, "fail", "1");
    conf_set(fix_add(&f, tplugin("t_lifecycle"), "d"), "mark", mark);
    assert_int_equal(run_set(&f, spk_host_table(), SPOKE_ROLE_EDGE, &eb), SPK_EPLUGIN_INIT);
    assert_non_null(strstr(eb.msg, "plugin 'c' init failed"));
    /* c's init ran and failed: no fini for c; d never started; b and a finalised, in
     * reverse order, exactly once (freeing the set does not call them again). */
    assert_string_equal(read_file(mark), "init a send_to_control=yes\n"
                                         "init b send_to_control=yes\n"
                                         "init c send_to_control=yes\n"
                                         "fini b\n"
                                         "fini a\n");
    unlink(mark);
}

/* ---- config_get_duration / config_get_size ------------------------------------------ */

static void test_config_units_services(void **state)
{
    (void)state;
    fix f;
    fix_init(&f);
    spk_plugin_conf *pc = fix_add(&f, tplugin("t_units"), NULL);
    conf_set(pc, "interval", "1500ms");
    conf_set(pc, "limit", "64KiB");
    conf_set(pc, "bad", "1.5s");
    conf_set(pc, "zero", "0");
    spk_plugin_set set;
    spk_errbuf eb = {""};
    assert_int_equal(spk_plugin_set_load(&f.cfg, spk_host_table(), NULL, NULL, NULL, 0, &set, &eb), 0);
    spoke_ctx *ctx = &set.v[0]->ctx;
    const spoke_host *h = spk_host_table();
    uint64_t v;

    /* Set and well-formed: the value, with the config file's units. */
    v = 7;
    assert_int_equal(h->config_get_duration(ctx, "interval", &v), 0);
    assert_int_equal(v, 1500);
    v = 7;
    assert_int_equal(h->config_get_size(ctx, "limit", &v), 0);
    assert_int_equal(v, 65536);
    v = 7;
    assert_int_equal(h->config_get_duration(ctx, "zero", &v), 0);
    assert_int_equal(v, 0);
    v = 7;
    assert_int_equal(h->config_get_size(ctx, "zero", &v), 0);
    assert_int_equal(v, 0);

    /* Not set: success, and the caller's default stays. */
    v = 7;
    assert_int_equal(h->config_get_duration(ctx, "missing", &v), 0);
    assert_int_equal(v, 7);
    assert_int_equal(h->config_get_size(ctx, "missing", &v), 0);
    assert_int_equal(v, 7);

    /* Malformed: SPOKE_ERR_INVALID, and *out untouched. */
    assert_int_equal(h->config_get_duration(ctx, "bad", &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_size(ctx, "bad", &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_duration(ctx, "limit", &v), SPOKE_ERR_INVALID); /* a size */
    assert_int_equal(h->config_get_size(ctx, "interval", &v), SPOKE_ERR_INVALID);  /* "ms" */
    assert_int_equal(v, 7);

    /* NULL arguments. */
    assert_int_equal(h->config_get_duration(NULL, "interval", &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_duration(ctx, NULL, &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_duration(ctx, "interval", NULL), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_size(NULL, "limit", &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_size(ctx, NULL, &v), SPOKE_ERR_INVALID);
    assert_int_equal(h->config_get_size(ctx, "limit", NULL), SPOKE_ERR_INVALID);
    assert_int_equal(v, 7);

    /* The plugin's own use: well-formed values start it. */
    assert_int_equal(spk_plugin_set_init(&set, SPOKE_ROLE_EDGE, &eb), 0);
    spk_host_unload(&set);
}

static void test_config_units_malformed_refuses_init(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"interval", "fast"}, {"interval", "10"}, {"interval", "1.5s"}, {"interval", "1d"},
        {"limit", "1K"},      {"limit", "-1"},    {"limit", "1 KiB"},   {"limit", "1PiB"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        fix f;
        spk_errbuf eb = {""};
        fix_init(&f);
        conf_set(fix_add(&f, tplugin("t_units"), NULL), cases[i][0], cases[i][1]);
        int rc = run_set(&f, spk_host_table(), SPOKE_ROLE_EDGE, &eb);
        if (rc != SPK_EPLUGIN_INIT || strstr(eb.msg, "invalid argument") == NULL)
            fail_msg("%s: '%s': rc %d, '%s'", cases[i][0], cases[i][1], rc, eb.msg);
    }
}

/* ---- lifetimes of returned strings --------------------------------------------------- */

static void test_string_lifetimes(void **state)
{
    (void)state;
    const spoke_host *h = spk_host_table();
    /* strerror: static text, the same pointer every time. */
    const char *s = h->strerror(SPOKE_ERR_QUEUE_FULL);
    assert_string_equal(s, "queue full");
    assert_ptr_equal(h->strerror(SPOKE_ERR_QUEUE_FULL), s);
    assert_non_null(h->strerror(12345));
    /* conn_peer: the connection's own buffer (lives as long as the connection). */
    spoke_conn conn;
    memset(&conn, 0, sizeof(conn));
    snprintf(conn.peer, sizeof(conn.peer), "127.0.0.1:5555");
    assert_ptr_equal(h->conn_peer(&conn), conn.peer);
    assert_string_equal(h->conn_peer(NULL), "");
    /* edge_id / edge_namespace: the config's strings, unchanged between calls; "" with no
     * environment. */
    spk_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.edge_id = "edge-1";
    cfg.edge_namespace = "prod";
    spk_host_env env;
    spk_host_env_init(&env, NULL, &cfg, SPOKE_ROLE_EDGE);
    spk_plugin p;
    memset(&p, 0, sizeof(p));
    p.ctx.plugin = &p;
    p.env = &env;
    assert_ptr_equal(h->edge_id(&p.ctx), cfg.edge_id);
    assert_ptr_equal(h->edge_namespace(&p.ctx), cfg.edge_namespace);
    assert_string_equal(h->edge_id(NULL), "");
    p.env = NULL;
    assert_string_equal(h->edge_namespace(&p.ctx), "");
}

int main(void)
{
    const char *t = getenv("SPOKE_TEST_PLUGIN_DIR");
    if (t == NULL) {
        fprintf(stderr, "set SPOKE_TEST_PLUGIN_DIR (ctest does)\n");
        return 1;
    }
    snprintf(tdir, sizeof(tdir), "%s", t);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_role_tables),
        cmocka_unit_test(test_host_has_reads_struct_size),
        cmocka_unit_test(test_plugin_sees_role_table),
        cmocka_unit_test(test_no_fini_after_failed_init),
        cmocka_unit_test(test_config_units_services),
        cmocka_unit_test(test_config_units_malformed_refuses_init),
        cmocka_unit_test(test_string_lifetimes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
