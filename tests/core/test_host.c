/*
 * test_host.c -- the host services table: one table per role (a service a role does not
 * offer is NULL, the ABI's rule 4), the 1.1 services config_get_duration and
 * config_get_size (missing vs malformed keys), the lifetime of returned strings, and
 * the lifecycle rule that fini never runs after a failed init. Against real .so files
 * built by the test suite (tests/plugins/t_*.c). And the 1.2 KV services on a real store
 * in a temporary directory, in both roles: limits at their edges, NOT_FOUND, namespaces,
 * a plugin without an ID, no store, the control role's delivery transaction (writes
 * visible in it, gone when it aborts, kept when it commits), scans, and value lifetimes.
 */
#include <ftw.h>
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
#include "kv.h"
#include "kv_conf.h"
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


/* ---- KV services (1.2) ----------------------------------------------------------------- */

#define MiB (1024u * 1024u)

/* A store in a temporary directory, an env of a role, and three bare plugins in it: IDs
 * 7 and 8, and one without an ID. */
typedef struct kvfix {
    char dir[256];
    spk_kv *kv;
    spk_config cfg;
    spk_host_env env;
    spk_plugin p[3];
    const spoke_host *h;
} kvfix;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void kvfix_init(kvfix *f, spoke_role role)
{
    memset(f, 0, sizeof(*f));
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/spk-host-kv-XXXXXX", tmp != NULL ? tmp : "/tmp");
    assert_non_null(mkdtemp(f->dir));
    f->cfg.kv_path = f->dir;   /* the edge's store */
    f->cfg.kv_map_size = 64ull * MiB;
    f->cfg.hub_store = f->dir; /* the control role's (hubd's) */
    f->cfg.hub_map_size = 64ull * MiB;
    spk_errbuf eb = {""};
    int rc = spk_kv_conf_open(&f->cfg, role, &f->kv, &eb);
    if (rc != 0)
        fail_msg("spk_kv_conf_open: %s", eb.msg);
    spk_host_env_init(&f->env, NULL, &f->cfg, role);
    f->env.kv = f->kv;
    static const uint32_t ids[3] = {7, 8, 0};
    for (int i = 0; i < 3; i++) {
        spk_plugin *p = &f->p[i];
        p->ctx.plugin = p;
        p->env = &f->env;
        p->id = ids[i];
        p->slot = &p->own_slot;
        snprintf(p->log_prefix, sizeof(p->log_prefix), "plugin p%d: ", i);
    }
    f->h = spk_host_table_for(role);
}

static void kvfix_free(kvfix *f)
{
    spk_host_env_fini(&f->env);
    spk_kv_close(f->kv);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static spoke_ctx *ctx_of(kvfix *f, int i) { return &f->p[i].ctx; }

static int put_s(kvfix *f, int i, const char *k, const char *v)
{
    return f->h->kv_put(ctx_of(f, i), k, strlen(k), v, strlen(v));
}

/* kv_get of k as a string in a static buffer ("" when absent), and its status. */
static const char *get_s(kvfix *f, int i, const char *k, int *rc)
{
    static char buf[256];
    const void *v = (void *)1;
    size_t n = 99;
    *rc = f->h->kv_get(ctx_of(f, i), k, strlen(k), &v, &n);
    if (*rc != 0) {
        assert_null(v);
        assert_int_equal(n, 0);
        return "";
    }
    assert_non_null(v);
    assert_true(n < sizeof(buf));
    memcpy(buf, v, n);
    buf[n] = '\0';
    return buf;
}

static void assert_get(kvfix *f, int i, const char *k, const char *want)
{
    int rc;
    const char *got = get_s(f, i, k, &rc);
    if (want == NULL) {
        assert_int_equal(rc, SPOKE_ERR_NOT_FOUND);
        return;
    }
    assert_int_equal(rc, 0);
    assert_string_equal(got, want);
}

/* Scans collect "k=v," into a string; `stop_at` (if set) stops there with stop_rc. */
typedef struct scan_acc {
    char s[4096];
    const char *stop_at;
    int stop_rc;
    kvfix *f;
    int nested_rc; /* what a KV call from inside the callback answered */
} scan_acc;

static int scan_collect(void *arg, const void *key, size_t klen, const void *val, size_t vlen)
{
    scan_acc *a = arg;
    size_t n = strlen(a->s);
    snprintf(a->s + n, sizeof(a->s) - n, "%.*s=%.*s,", (int)klen, (const char *)key, (int)vlen,
             (const char *)val);
    if (a->f != NULL)
        a->nested_rc = put_s(a->f, 0, "inside", "scan");
    if (a->stop_at != NULL && klen == strlen(a->stop_at) && memcmp(key, a->stop_at, klen) == 0)
        return a->stop_rc;
    return 0;
}

static const char *scan_s(kvfix *f, int i, const char *prefix, const char *after, size_t max,
                          int *rc)
{
    static scan_acc a;
    memset(&a, 0, sizeof(a));
    *rc = f->h->kv_scan(ctx_of(f, i), prefix, strlen(prefix), after,
                        after ? strlen(after) : 0, max, scan_collect, &a);
    return a.s;
}

static void test_kv_tables(void **state)
{
    (void)state;
    for (int r = 0; r < 2; r++) {
        const spoke_host *h = spk_host_table_for(r ? SPOKE_ROLE_CONTROL : SPOKE_ROLE_EDGE);
        assert_true(h->abi_minor >= 2); /* the KV services came with 1.2 */
        assert_true(SPOKE_HOST_HAS(h, kv_get) && SPOKE_HOST_HAS(h, kv_put));
        assert_true(SPOKE_HOST_HAS(h, kv_del) && SPOKE_HOST_HAS(h, kv_scan));
        /* A 1.1 host's table ends before them. */
        spoke_host old = *h;
        old.struct_size = (uint32_t)offsetof(spoke_host, kv_get);
        assert_true(SPOKE_HOST_HAS(&old, config_get_size));
        assert_false(SPOKE_HOST_HAS(&old, kv_get));
        assert_false(SPOKE_HOST_HAS(&old, kv_scan));
    }
    assert_string_equal(spk_strerror(SPOKE_ERR_NOT_FOUND), "no such key");
    assert_string_equal(spk_strerror(SPOKE_ERR_KV_UNAVAILABLE), "KV store unavailable");
    assert_int_equal(SPK_ENOT_FOUND, -18);
    assert_int_equal(SPK_EKV_UNAVAILABLE, -19);
    assert_int_equal(SPOKE_KV_MAX_KEY, SPK_KV_MAX_KEY);
    assert_int_equal(SPOKE_KV_MAX_VALUE, SPK_KV_MAX_VALUE);
}

/* put/get/del, NOT_FOUND, empty keys and values, NULL arguments. */
static void test_kv_basics(void **state)
{
    (void)state;
    for (int r = 0; r < 2; r++) {
        kvfix f;
        kvfix_init(&f, r ? SPOKE_ROLE_CONTROL : SPOKE_ROLE_EDGE);
        spoke_ctx *c = ctx_of(&f, 0);
        const spoke_host *h = f.h;
        assert_get(&f, 0, "a", NULL);
        assert_int_equal(h->kv_del(c, "a", 1), SPOKE_ERR_NOT_FOUND);
        assert_int_equal(put_s(&f, 0, "a", "one"), 0);
        assert_get(&f, 0, "a", "one");
        assert_int_equal(put_s(&f, 0, "a", "two"), 0); /* replaces */
        assert_get(&f, 0, "a", "two");
        assert_int_equal(h->kv_del(c, "a", 1), 0);
        assert_get(&f, 0, "a", NULL);
        assert_int_equal(h->kv_del(c, "a", 1), SPOKE_ERR_NOT_FOUND);

        /* The empty key and the empty value (NULL with length 0) are allowed; an empty
         * value reads back as a non-NULL pointer and length 0. */
        assert_int_equal(h->kv_put(c, NULL, 0, NULL, 0), 0);
        const void *v = NULL;
        size_t n = 9;
        assert_int_equal(h->kv_get(c, NULL, 0, &v, &n), 0);
        assert_non_null(v);
        assert_int_equal(n, 0);
        assert_int_equal(h->kv_del(c, "", 0), 0);

        /* NULL arguments. */
        assert_int_equal(h->kv_put(NULL, "a", 1, "v", 1), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_put(c, NULL, 1, "v", 1), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_put(c, "a", 1, NULL, 1), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_get(c, "a", 1, NULL, &n), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_get(c, "a", 1, &v, NULL), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_get(NULL, "a", 1, &v, &n), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_del(NULL, "a", 1), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_del(c, NULL, 1), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_scan(c, "", 0, NULL, 0, 0, NULL, NULL), SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_scan(c, NULL, 1, NULL, 0, 0, scan_collect, NULL),
                         SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_scan(c, "", 0, NULL, 1, 0, scan_collect, NULL),
                         SPOKE_ERR_INVALID);
        assert_int_equal(h->kv_scan(NULL, "", 0, NULL, 0, 0, scan_collect, NULL),
                         SPOKE_ERR_INVALID);
        kvfix_free(&f);
    }
}

/* Keys of 507 bytes pass and 508 do not; values of 1 MiB pass and 1 MiB + 1 do not. */
static void test_kv_limits(void **state)
{
    (void)state;
    kvfix f;
    kvfix_init(&f, SPOKE_ROLE_EDGE);
    spoke_ctx *c = ctx_of(&f, 0);
    const spoke_host *h = f.h;
    char key[SPOKE_KV_MAX_KEY + 1];
    memset(key, 'k', sizeof(key));
    assert_int_equal(h->kv_put(c, key, 507, "v", 1), 0);
    assert_int_equal(h->kv_put(c, key, 508, "v", 1), SPOKE_ERR_INVALID);
    const void *v;
    size_t n;
    assert_int_equal(h->kv_get(c, key, 507, &v, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(h->kv_get(c, key, 508, &v, &n), SPOKE_ERR_INVALID);
    assert_int_equal(h->kv_del(c, key, 508), SPOKE_ERR_INVALID);
    scan_acc a = {.s = ""};
    assert_int_equal(h->kv_scan(c, key, 508, NULL, 0, 0, scan_collect, &a), SPOKE_ERR_INVALID);
    assert_int_equal(h->kv_scan(c, "", 0, key, 508, 0, scan_collect, &a), SPOKE_ERR_INVALID);
    assert_int_equal(h->kv_scan(c, key, 507, NULL, 0, 0, scan_collect, &a), 0);
    assert_int_equal(strlen(a.s), 507 + 3);
    assert_int_equal(h->kv_del(c, key, 507), 0);

    uint8_t *big = malloc(MiB + 1);
    assert_non_null(big);
    for (size_t i = 0; i < MiB + 1; i++)
        big[i] = (uint8_t)(i * 7);
    assert_int_equal(h->kv_put(c, "big", 3, big, MiB), 0);
    assert_int_equal(h->kv_put(c, "big2", 4, big, MiB + 1), SPOKE_ERR_PAYLOAD_TOO_LARGE);
    assert_int_equal(h->kv_get(c, "big", 3, &v, &n), 0);
    assert_int_equal(n, MiB);
    assert_memory_equal(v, big, MiB);
    assert_int_equal(h->kv_get(c, "big2", 4, &v, &n), SPOKE_ERR_NOT_FOUND);
    /* A key too long is refused before a value too large. */
    assert_int_equal(h->kv_put(c, key, 508, big, MiB + 1), SPOKE_ERR_INVALID);
    free(big);
    kvfix_free(&f);
}

/* Two plugins with different IDs use the same key names without meeting; a plugin
 * without an ID gets UNSUPPORTED from every service. */
static void test_kv_namespaces(void **state)
{
    (void)state;
    for (int r = 0; r < 2; r++) {
        kvfix f;
        kvfix_init(&f, r ? SPOKE_ROLE_CONTROL : SPOKE_ROLE_EDGE);
        assert_int_equal(put_s(&f, 0, "k", "seven"), 0);
        assert_int_equal(put_s(&f, 0, "k2", "seven-2"), 0);
        assert_get(&f, 1, "k", NULL);
        assert_int_equal(put_s(&f, 1, "k", "eight"), 0);
        assert_get(&f, 0, "k", "seven");
        assert_get(&f, 1, "k", "eight");
        int rc;
        assert_string_equal(scan_s(&f, 0, "", NULL, 0, &rc), "k=seven,k2=seven-2,");
        assert_int_equal(rc, 0);
        assert_string_equal(scan_s(&f, 1, "", NULL, 0, &rc), "k=eight,");
        assert_int_equal(f.h->kv_del(ctx_of(&f, 1), "k2", 2), SPOKE_ERR_NOT_FOUND);
        assert_int_equal(f.h->kv_del(ctx_of(&f, 1), "k", 1), 0);
        assert_get(&f, 0, "k", "seven");
        /* Namespace 0 is the host's: no ID, no KV. */
        spoke_ctx *none = ctx_of(&f, 2);
        const void *v;
        size_t n;
        assert_int_equal(put_s(&f, 2, "k", "v"), SPOKE_ERR_UNSUPPORTED);
        assert_int_equal(f.h->kv_get(none, "k", 1, &v, &n), SPOKE_ERR_UNSUPPORTED);
        assert_int_equal(f.h->kv_del(none, "k", 1), SPOKE_ERR_UNSUPPORTED);
        scan_acc a = {.s = ""};
        assert_int_equal(f.h->kv_scan(none, "", 0, NULL, 0, 0, scan_collect, &a),
                         SPOKE_ERR_UNSUPPORTED);
        spk_kv_txn *t;
        assert_int_equal(spk_kv_begin(f.kv, NULL, false, &t, NULL), 0);
        assert_int_equal(spk_kv_get(t, 0, "k", 1, &v, &n, NULL), SPK_ENOENT);
        spk_kv_abort(t);
        kvfix_free(&f);
    }
}

/* Prefix, resume after a key, at most N, a callback that stops (> 0: success; < 0: its
 * own code), and no KV calls from inside a callback. */
static void test_kv_scan(void **state)
{
    (void)state;
    kvfix f;
    kvfix_init(&f, SPOKE_ROLE_EDGE);
    const char *keys[] = {"a", "b/1", "b/2", "b/3", "bb", "c"};
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(put_s(&f, 0, keys[i], "v"), 0);
    int rc;
    assert_string_equal(scan_s(&f, 0, "b/", NULL, 0, &rc), "b/1=v,b/2=v,b/3=v,");
    assert_string_equal(scan_s(&f, 0, "b", NULL, 0, &rc), "b/1=v,b/2=v,b/3=v,bb=v,");
    assert_string_equal(scan_s(&f, 0, "b/", "b/1", 0, &rc), "b/2=v,b/3=v,");
    assert_string_equal(scan_s(&f, 0, "b/", "b/1", 1, &rc), "b/2=v,");
    assert_string_equal(scan_s(&f, 0, "b/", "b/3", 0, &rc), "");
    assert_string_equal(scan_s(&f, 0, "", NULL, 2, &rc), "a=v,b/1=v,");
    assert_string_equal(scan_s(&f, 0, "", "a", 0, &rc), "b/1=v,b/2=v,b/3=v,bb=v,c=v,");
    assert_string_equal(scan_s(&f, 0, "z", NULL, 0, &rc), "");
    assert_int_equal(rc, 0);

    scan_acc a;
    memset(&a, 0, sizeof(a));
    a.stop_at = "b/2";
    a.stop_rc = 1;
    assert_int_equal(f.h->kv_scan(ctx_of(&f, 0), "", 0, NULL, 0, 0, scan_collect, &a), 0);
    assert_string_equal(a.s, "a=v,b/1=v,b/2=v,");
    memset(&a, 0, sizeof(a));
    a.stop_at = "b/1";
    a.stop_rc = -12345; /* the plugin's own code comes back unchanged */
    assert_int_equal(f.h->kv_scan(ctx_of(&f, 0), "", 0, NULL, 0, 0, scan_collect, &a), -12345);
    memset(&a, 0, sizeof(a));
    a.stop_at = "a";
    a.stop_rc = SPOKE_ERR_NOT_FOUND;
    assert_int_equal(f.h->kv_scan(ctx_of(&f, 0), "", 0, NULL, 0, 0, scan_collect, &a),
                     SPOKE_ERR_NOT_FOUND);

    /* KV calls from a callback are refused; after the scan they work again. */
    memset(&a, 0, sizeof(a));
    a.f = &f;
    assert_int_equal(f.h->kv_scan(ctx_of(&f, 0), "a", 1, NULL, 0, 0, scan_collect, &a), 0);
    assert_int_equal(a.nested_rc, SPOKE_ERR_UNSUPPORTED);
    assert_get(&f, 0, "inside", NULL);
    assert_int_equal(put_s(&f, 0, "inside", "after"), 0);
    kvfix_free(&f);
}

/* No store (not configured, or it could not be opened): KV_UNAVAILABLE, after the
 * argument checks; a store that cannot be opened is retried only after a while. */
static void test_kv_unavailable(void **state)
{
    (void)state;
    kvfix f;
    kvfix_init(&f, SPOKE_ROLE_EDGE);
    f.env.kv = NULL;
    const void *v;
    size_t n;
    spoke_ctx *c = ctx_of(&f, 0);
    scan_acc a = {.s = ""};
    assert_int_equal(put_s(&f, 0, "k", "v"), SPOKE_ERR_KV_UNAVAILABLE);
    assert_int_equal(f.h->kv_get(c, "k", 1, &v, &n), SPOKE_ERR_KV_UNAVAILABLE);
    assert_int_equal(f.h->kv_del(c, "k", 1), SPOKE_ERR_KV_UNAVAILABLE);
    assert_int_equal(f.h->kv_scan(c, "", 0, NULL, 0, 0, scan_collect, &a),
                     SPOKE_ERR_KV_UNAVAILABLE);
    char key[SPOKE_KV_MAX_KEY + 1] = {0};
    assert_int_equal(f.h->kv_put(c, key, sizeof(key), "v", 1), SPOKE_ERR_INVALID);
    assert_int_equal(f.h->kv_put(c, "k", 1, key, MiB + 1), SPOKE_ERR_PAYLOAD_TOO_LARGE);
    assert_int_equal(put_s(&f, 2, "k", "v"), SPOKE_ERR_UNSUPPORTED);

    /* spk_host_kv_open on a path that is a file: it fails, the env owns the (missing)
     * store, and the services answer KV_UNAVAILABLE. */
    char file[300];
    snprintf(file, sizeof(file), "%s/not-a-dir", f.dir);
    FILE *fp = fopen(file, "w");
    assert_non_null(fp);
    fclose(fp);
    spk_config cfg = f.cfg;
    cfg.kv_path = file;
    spk_host_env env;
    spk_host_env_init(&env, NULL, &cfg, SPOKE_ROLE_EDGE);
    spk_errbuf eb = {""};
    assert_int_not_equal(spk_host_kv_open(&env, &eb), 0);
    assert_non_null(strstr(eb.msg, "not-a-dir"));
    assert_null(env.kv);
    f.p[0].env = &env;
    assert_int_equal(put_s(&f, 0, "k", "v"), SPOKE_ERR_KV_UNAVAILABLE);
    assert_int_equal(spk_host_kv_sync(&env, NULL), 0);
    spk_host_kv_close(&env);
    spk_host_env_fini(&env);
    f.p[0].env = &f.env;

    /* spk_host_kv_open on a good path opens it; close flushes and forgets it. */
    cfg.kv_path = f.dir;
    spk_kv_close(f.kv); /* once per process: the fixture's handle goes first */
    f.kv = NULL;
    spk_host_env_init(&env, NULL, &cfg, SPOKE_ROLE_EDGE);
    assert_int_equal(spk_host_kv_open(&env, &eb), 0);
    assert_non_null(env.kv);
    f.p[0].env = &env;
    assert_int_equal(put_s(&f, 0, "k", "v"), 0);
    assert_get(&f, 0, "k", "v");
    assert_int_equal(spk_host_kv_sync(&env, &eb), 0);
    spk_host_kv_close(&env);
    assert_null(env.kv);
    spk_host_env_fini(&env);
    assert_int_equal(spk_kv_conf_open(&(spk_config){0}, SPOKE_ROLE_EDGE, &f.kv, &eb),
                     SPK_EINVAL);
    kvfix_free(&f);
}

/* The control role during accept_edge_payload: env->kv_txn is the delivery's nested
 * write transaction. Writes are visible in it, vanish when it (or its parent) aborts,
 * and stay when both commit; outside it, each call is its own transaction. */
static void test_kv_control_txn(void **state)
{
    (void)state;
    kvfix f;
    kvfix_init(&f, SPOKE_ROLE_CONTROL);
    spk_kv_txn *top, *child;
    int rc;
    assert_int_equal(put_s(&f, 0, "before", "1"), 0);

    /* A delivery whose transaction aborts leaves nothing. */
    assert_int_equal(spk_kv_begin(f.kv, NULL, true, &top, NULL), 0);
    assert_int_equal(spk_kv_begin(f.kv, top, true, &child, NULL), 0);
    f.env.kv_txn = child;
    assert_int_equal(put_s(&f, 0, "x", "aborted"), 0);
    assert_get(&f, 0, "x", "aborted");
    assert_get(&f, 0, "before", "1");
    assert_int_equal(f.h->kv_del(ctx_of(&f, 0), "before", 6), 0);
    assert_get(&f, 0, "before", NULL);
    assert_string_equal(scan_s(&f, 0, "", NULL, 0, &rc), "x=aborted,");
    f.env.kv_txn = NULL;
    spk_kv_abort(child);
    /* Outside the delivery (a timer) the plugin reads committed state... */
    assert_get(&f, 0, "x", NULL);
    assert_get(&f, 0, "before", "1");
    /* ... and cannot write while hubd holds its group commit (the rule in host.h). */
    assert_int_equal(put_s(&f, 0, "timer", "v"), SPOKE_ERR_KV_UNAVAILABLE);

    /* The next delivery in the same group commit commits: kept once the top commits. */
    assert_int_equal(spk_kv_begin(f.kv, top, true, &child, NULL), 0);
    bool dup = true;
    assert_int_equal(spk_kv_dedupe_mark(child, "edge-1", 1, 1000, &dup, NULL), 0);
    f.env.kv_txn = child;
    assert_int_equal(put_s(&f, 0, "x", "kept"), 0);
    assert_int_equal(put_s(&f, 1, "x", "other plugin"), 0);
    f.env.kv_txn = NULL;
    assert_int_equal(spk_kv_commit(child, NULL), 0);
    assert_get(&f, 0, "x", NULL); /* not committed yet */
    assert_int_equal(spk_kv_commit(top, NULL), 0);
    assert_get(&f, 0, "x", "kept");
    assert_get(&f, 1, "x", "other plugin");

    /* A committed child whose top-level transaction aborts (the hub died before its
     * commit) leaves nothing either: neither the writes nor the dedupe mark. */
    assert_int_equal(spk_kv_begin(f.kv, NULL, true, &top, NULL), 0);
    assert_int_equal(spk_kv_begin(f.kv, top, true, &child, NULL), 0);
    assert_int_equal(spk_kv_dedupe_mark(child, "edge-1", 2, 1000, &dup, NULL), 0);
    f.env.kv_txn = child;
    assert_int_equal(put_s(&f, 0, "x", "lost"), 0);
    f.env.kv_txn = NULL;
    assert_int_equal(spk_kv_commit(child, NULL), 0);
    spk_kv_abort(top);
    assert_get(&f, 0, "x", "kept");
    assert_int_equal(spk_kv_begin(f.kv, NULL, false, &top, NULL), 0);
    assert_int_equal(spk_kv_dedupe_marked(top, "edge-1", 2, NULL, NULL), SPK_ENOENT);
    assert_int_equal(spk_kv_dedupe_marked(top, "edge-1", 1, NULL, NULL), 0);
    spk_kv_abort(top);

    /* Limits and NOT_FOUND are the same inside a delivery. */
    assert_int_equal(spk_kv_begin(f.kv, NULL, true, &top, NULL), 0);
    f.env.kv_txn = top;
    assert_get(&f, 0, "nothing", NULL);
    assert_int_equal(f.h->kv_del(ctx_of(&f, 0), "nothing", 7), SPOKE_ERR_NOT_FOUND);
    char key[SPOKE_KV_MAX_KEY + 1];
    memset(key, 'k', sizeof(key));
    assert_int_equal(f.h->kv_put(ctx_of(&f, 0), key, 507, "v", 1), 0);
    assert_int_equal(f.h->kv_put(ctx_of(&f, 0), key, 508, "v", 1), SPOKE_ERR_INVALID);
    assert_int_equal(f.h->kv_put(ctx_of(&f, 0), "k", 1, key, MiB + 1),
                     SPOKE_ERR_PAYLOAD_TOO_LARGE);
    assert_int_equal(put_s(&f, 2, "k", "v"), SPOKE_ERR_UNSUPPORTED);
    f.env.kv_txn = NULL;
    spk_kv_abort(top);
    kvfix_free(&f);
}

/* A value from kv_get stays as it was until the plugin's next KV call, whatever another
 * worker writes meanwhile (edge: the host's copy), and within a delivery (control: the
 * transaction's own pages, which nothing else writes). */
static void test_kv_value_lifetime(void **state)
{
    (void)state;
    kvfix f;
    kvfix_init(&f, SPOKE_ROLE_EDGE);
    spoke_ctx *c = ctx_of(&f, 0);
    const void *v1;
    size_t n1;
    assert_int_equal(put_s(&f, 0, "k", "first value"), 0);
    assert_int_equal(f.h->kv_get(c, "k", 1, &v1, &n1), 0);
    /* Another process's writes (here: straight to the store, as another worker would). */
    assert_int_equal(spk_kv_put1(f.kv, 7, "k", 1, "changed!", 8, NULL), 0);
    assert_int_equal(spk_kv_del1(f.kv, 7, "k", 1, NULL), 0);
    assert_int_equal(spk_kv_put1(f.kv, 7, "k", 1, "third", 5, NULL), 0);
    assert_int_equal(n1, 11);
    assert_memory_equal(v1, "first value", 11);
    /* The next call may reuse the memory: the new value is read correctly, even one
     * larger than the buffer so far. */
    char big[4000];
    memset(big, 'b', sizeof(big));
    assert_int_equal(spk_kv_put1(f.kv, 7, "big", 3, big, sizeof(big), NULL), 0);
    const void *v2;
    size_t n2;
    assert_int_equal(f.h->kv_get(c, "big", 3, &v2, &n2), 0);
    assert_int_equal(n2, sizeof(big));
    assert_memory_equal(v2, big, sizeof(big));
    assert_get(&f, 0, "k", "third");
    kvfix_free(&f);

    kvfix_init(&f, SPOKE_ROLE_CONTROL);
    c = ctx_of(&f, 0);
    spk_kv_txn *top;
    assert_int_equal(spk_kv_begin(f.kv, NULL, true, &top, NULL), 0);
    f.env.kv_txn = top;
    assert_int_equal(put_s(&f, 0, "k", "in the delivery"), 0);
    assert_int_equal(put_s(&f, 0, "j", "another"), 0);
    assert_int_equal(f.h->kv_get(c, "k", 1, &v1, &n1), 0);
    /* Other processes cannot write meanwhile (hubd holds the write lock), and a read of
     * another key in the delivery keeps the first pointer good too. */
    assert_int_equal(f.h->kv_get(c, "j", 1, &v2, &n2), 0);
    assert_memory_equal(v1, "in the delivery", n1);
    assert_memory_equal(v2, "another", n2);
    f.env.kv_txn = NULL;
    assert_int_equal(spk_kv_commit(top, NULL), 0);
    assert_get(&f, 0, "k", "in the delivery");
    kvfix_free(&f);
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
        cmocka_unit_test(test_kv_tables),
        cmocka_unit_test(test_kv_basics),
        cmocka_unit_test(test_kv_limits),
        cmocka_unit_test(test_kv_namespaces),
        cmocka_unit_test(test_kv_scan),
        cmocka_unit_test(test_kv_unavailable),
        cmocka_unit_test(test_kv_control_txn),
        cmocka_unit_test(test_kv_value_lifetime),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
