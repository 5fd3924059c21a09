/*
 * test_config.c -- the configuration loader: defaults, every key, durations and sizes as
 * keys (their syntax is tested in base/test_units.c), each class of error with its exact
 * file:line and dotted key, plugin entries (args, env, config flattening, sha256,
 * duplicates), flow style, and the dump reading back the same.
 *
 * Each YAML input is written to a temp file (mkstemps under /tmp), loaded, and removed.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

/* ---- allocation failures ------------------------------------------------------------
 * Outside the sanitizer build, the test replaces malloc & co. (glibc supports that) with
 * wrappers that count live blocks and can fail the N-th allocation; test_alloc_failures
 * fails each allocation of a load in turn and checks that nothing leaks. Under ASan the
 * wrappers would fight its allocator, so that test is skipped there (LSan covers leaks on
 * the other error paths). */
#if defined(__SANITIZE_ADDRESS__)
#define SPK_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SPK_TEST_ASAN 1
#endif
#endif

#ifndef SPK_TEST_ASAN
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void __libc_free(void *p);

static long alloc_count, alloc_fail_at, alloc_live; /* fail_at 0: never */

static bool alloc_should_fail(void)
{
    if (alloc_fail_at == 0 || ++alloc_count != alloc_fail_at)
        return false;
    errno = ENOMEM;
    return true;
}

void *malloc(size_t n)
{
    void *p = alloc_should_fail() ? NULL : __libc_malloc(n);
    alloc_live += p != NULL;
    return p;
}

void *calloc(size_t n, size_t size)
{
    void *p = alloc_should_fail() ? NULL : __libc_calloc(n, size);
    alloc_live += p != NULL;
    return p;
}

void *realloc(void *p, size_t n)
{
    if (alloc_should_fail())
        return NULL;
    void *q = __libc_realloc(p, n);
    if (p == NULL && q != NULL)
        alloc_live++;
    else if (p != NULL && n == 0)
        alloc_live--;
    return q;
}

void free(void *p)
{
    alloc_live -= p != NULL;
    __libc_free(p);
}
#endif

/* ---- helpers ------------------------------------------------------------------------ */

typedef struct loaded {
    char path[64];
    int rc;
    spk_config *cfg;
    spk_errbuf eb;
} loaded;

static void write_tmp(const char *text, char path[64])
{
    snprintf(path, 64, "/tmp/spk-test-config-XXXXXX.yaml");
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

static loaded load_text(const char *text)
{
    loaded l;
    memset(&l, 0, sizeof(l));
    write_tmp(text, l.path);
    l.rc = spk_config_load(l.path, &l.cfg, &l.eb);
    unlink(l.path);
    return l;
}

static spk_config *load_ok(const char *text)
{
    loaded l = load_text(text);
    if (l.rc != 0)
        fail_msg("load failed (%d): %s\n--- input ---\n%s", l.rc, l.eb.msg, text);
    assert_non_null(l.cfg);
    return l.cfg;
}

/* Expect SPK_ECONFIG with a message "<file>:<line>: <key>: ..." containing `what`. */
static void expect_error(const char *text, int line, const char *key, const char *what)
{
    loaded l = load_text(text);
    char prefix[256];
    if (key != NULL)
        snprintf(prefix, sizeof(prefix), "%s:%d: %s: ", l.path, line, key);
    else
        snprintf(prefix, sizeof(prefix), "%s:%d: ", l.path, line);
    if (l.rc != SPK_ECONFIG || l.cfg != NULL)
        fail_msg("want SPK_ECONFIG, got %d (%s)\n--- input ---\n%s", l.rc, l.eb.msg, text);
    if (strncmp(l.eb.msg, prefix, strlen(prefix)) != 0 ||
        (what != NULL && strstr(l.eb.msg, what) == NULL))
        fail_msg("message\n  '%s'\nwant prefix\n  '%s'\nand '%s'", l.eb.msg, prefix,
                 what ? what : "");
}

/* Expect the whole message to be "<file>:" + rest. */
static void expect_message(const char *text, const char *rest)
{
    loaded l = load_text(text);
    char want[1024];
    snprintf(want, sizeof(want), "%s:%s", l.path, rest);
    assert_int_equal(l.rc, SPK_ECONFIG);
    assert_null(l.cfg);
    assert_string_equal(l.eb.msg, want);
}

static const char *UP = "listen: { upstream: 127.0.0.1:5432 }\n";

/* A config with `section_text` added after a valid listen section. */
static const char *with_upstream(const char *section_text)
{
    static char buf[8192];
    snprintf(buf, sizeof(buf), "%s%s", UP, section_text);
    return buf;
}

/* The dump, minus comment lines (which carry file names and line numbers). */
static char *dump_text(const spk_config *cfg)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    spk_config_dump(cfg, f);
    fclose(f);
    char *out = malloc(len + 1), *o = out;
    assert_non_null(out);
    for (char *line = strtok(buf, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        if (line[strspn(line, " ")] == '#')
            continue;
        o += sprintf(o, "%s\n", line);
    }
    *o = '\0';
    free(buf);
    return out;
}

/* ---- defaults and a full config ----------------------------------------------------- */

static void test_defaults(void **state)
{
    (void)state;
    spk_config *cfg = load_ok(UP);
    char host[256] = "";
    gethostname(host, sizeof(host) - 1);
    assert_string_equal(cfg->edge_id, host);
    assert_string_equal(cfg->edge_namespace, "default");
    assert_int_equal(cfg->n_listen, 1);
    assert_string_equal(cfg->listen[0], "127.0.0.1:6432");
    assert_string_equal(cfg->upstream, "127.0.0.1:5432");
    assert_int_equal(cfg->workers, 0);
    assert_int_equal(cfg->upstream_connect, SPK_CONNECT_EAGER);
    assert_int_equal(cfg->connect_timeout_ms, 5000);
    assert_int_equal(cfg->read_chunk, 64 * 1024);
    assert_int_equal(cfg->high_watermark, 1024 * 1024);
    assert_int_equal(cfg->backlog, 1024);
    assert_int_equal(cfg->max_connections, 100000);
    assert_string_equal(cfg->plugins_dir, "/usr/lib/spoke/plugins");
    assert_false(cfg->autoload);
    assert_int_equal(cfg->compatibility, SPK_COMPAT_STRICT);
    assert_int_equal(cfg->health_check_period_ms, 5000);
    assert_int_equal(cfg->hook_timeout_ms, 50);
    assert_int_equal(cfg->start_timeout_ms, 5000);
    assert_true(cfg->reload_on_crash);
    assert_int_equal(cfg->health_fail_limit, 3);
    assert_int_equal(cfg->crash_limit, 3);
    assert_int_equal(cfg->crash_window_ms, 60000);
    assert_int_equal(cfg->drain_timeout_ms, 30000);
    assert_int_equal(cfg->tick_ms, 1000);
    assert_int_equal(cfg->n_plugins, 0);
    assert_null(cfg->plugins);
    assert_string_equal(cfg->queue_path, "/var/lib/spoke/queue");
    assert_int_equal(cfg->queue_max_pending, 100000);
    assert_int_equal(cfg->queue_max_bytes, 1ull << 30);
    assert_int_equal(cfg->queue_retention_ms, 24ull * 3600 * 1000);
    assert_false(cfg->queue_sync_always);
    assert_int_equal(cfg->queue_sync_interval_ms, 100);
    assert_int_equal(cfg->queue_map_size, 2ull << 30);
    assert_int_equal(cfg->queue_journal_size, 64ull << 20);
    assert_null(cfg->uplink_url);
    assert_int_equal(cfg->uplink_heartbeat_ms, 30000);
    assert_int_equal(cfg->uplink_batch_size, 100);
    assert_null(cfg->uplink_token_file);
    assert_null(cfg->uplink_ca);
    assert_null(cfg->metrics_listen);
    assert_int_equal(cfg->log_level, SPOKE_LOG_INFO);
    assert_non_null(cfg->run_dir);
    if (geteuid() == 0)
        assert_string_equal(cfg->run_dir, "/run/spoke");
    else
        assert_string_equal(cfg->run_dir, "/tmp"); /* the config file's directory */
    assert_true(strncmp(cfg->file, "/tmp/spk-test-config-", 21) == 0);
    spk_config_free(cfg);
}

static const char FULL[] =
    "run_dir: /tmp/spoke-run/\n"         /* 1 */
    "edge:\n"                            /* 2 */
    "  id: edge-us-west-1\n"             /* 3 */
    "  namespace: prod\n"                /* 4 */
    "listen:\n"                          /* 5 */
    "  address:\n"                       /* 6 */
    "    - 0.0.0.0:6432\n"               /* 7 */
    "    - \"[::1]:6433\"\n"             /* 8 */
    "    - unix:/run/spoke/spoke.sock\n" /* 9 */
    "  upstream: db.internal:5432\n"     /* 10 */
    "  workers: 8\n"                     /* 11 */
    "  upstream_connect: lazy\n"         /* 12 */
    "  connect_timeout: 2500ms\n"        /* 13 */
    "  read_chunk: 16KiB\n"              /* 14 */
    "  high_watermark: 4MiB\n"           /* 15 */
    "  backlog: 512\n"                   /* 16 */
    "  max_connections: 5000\n"          /* 17 */
    "plugins:\n"                         /* 18 */
    "  dir: /opt/spoke/plugins/\n"       /* 19 */
    "  autoload: yes\n"                  /* 20 */
    "  compatibility: loose\n"           /* 21 */
    "  health_check_period: 10s\n"       /* 22 */
    "  hook_timeout: 20ms\n"             /* 23 */
    "  start_timeout: 3s\n"              /* 24 */
    "  reload_on_crash: off\n"           /* 25 */
    "  health_fail_limit: 5\n"           /* 26 */
    "  crash_limit: 4\n"                 /* 27 */
    "  crash_window: 2m\n"               /* 28 */
    "  drain_timeout: 0\n"               /* 29 */
    "  tick: 250ms\n"                    /* 30 */
    "  list:\n"                          /* 31 */
    "    - id: 42\n"                     /* 32 */
    "      name: acme-cache\n"           /* 33 */
    "      file: cache.so\n"             /* 34 */
    "      sha256: 000102030405060708090a0b0c0d0e0f101112131415161718191A1B1C1D1E1F\n"
    "      enabled: true\n"                       /* 36 */
    "      args: [--fast, \"\", \"two words\"]\n" /* 37 */
    "      env: [A=1, B_2=x=y, _C=]\n"            /* 38 */
    "      config: {ttl: 60s, nested: {k: v}}\n"  /* 39 */
    "    - file: /abs/other.so\n"                 /* 40 */
    "      enabled: false\n"                      /* 41 */
    "queue:\n"                                    /* 42 */
    "  path: /var/tmp/q\n"                        /* 43 */
    "  max_pending: 500\n"                        /* 44 */
    "  max_bytes: 512MiB\n"                       /* 45 */
    "  retention: 1h\n"                           /* 46 */
    "  sync: always\n"                            /* 47 */
    "  map_size: 1GiB\n"                          /* 48 */
    "uplink:\n"                                   /* 49 */
    "  url: https://hub.example:7443\n"           /* 50 */
    "  heartbeat: 15s\n"                          /* 51 */
    "  batch_size: 250\n"                         /* 52 */
    "  token_file: /etc/spoke/token\n"            /* 53 */
    "  ca: /etc/spoke/ca.pem\n"                   /* 54 */
    "metrics:\n"                                  /* 55 */
    "  listen: 127.0.0.1:9090\n"                  /* 56 */
    "log:\n"                                      /* 57 */
    "  level: debug\n";                           /* 58 */

static void check_full(const spk_config *cfg)
{
    assert_string_equal(cfg->run_dir, "/tmp/spoke-run");
    assert_string_equal(cfg->edge_id, "edge-us-west-1");
    assert_string_equal(cfg->edge_namespace, "prod");
    assert_int_equal(cfg->n_listen, 3);
    assert_string_equal(cfg->listen[0], "0.0.0.0:6432");
    assert_string_equal(cfg->listen[1], "[::1]:6433");
    assert_string_equal(cfg->listen[2], "unix:/run/spoke/spoke.sock");
    assert_string_equal(cfg->upstream, "db.internal:5432");
    assert_int_equal(cfg->workers, 8);
    assert_int_equal(cfg->upstream_connect, SPK_CONNECT_LAZY);
    assert_int_equal(cfg->connect_timeout_ms, 2500);
    assert_int_equal(cfg->read_chunk, 16 * 1024);
    assert_int_equal(cfg->high_watermark, 4 * 1024 * 1024);
    assert_int_equal(cfg->backlog, 512);
    assert_int_equal(cfg->max_connections, 5000);
    assert_string_equal(cfg->plugins_dir, "/opt/spoke/plugins");
    assert_true(cfg->autoload);
    assert_int_equal(cfg->compatibility, SPK_COMPAT_LOOSE);
    assert_int_equal(cfg->health_check_period_ms, 10000);
    assert_int_equal(cfg->hook_timeout_ms, 20);
    assert_int_equal(cfg->start_timeout_ms, 3000);
    assert_false(cfg->reload_on_crash);
    assert_int_equal(cfg->health_fail_limit, 5);
    assert_int_equal(cfg->crash_limit, 4);
    assert_int_equal(cfg->crash_window_ms, 120000);
    assert_int_equal(cfg->drain_timeout_ms, 0);
    assert_int_equal(cfg->tick_ms, 250);

    assert_int_equal(cfg->n_plugins, 2);
    const spk_plugin_conf *a = &cfg->plugins[0], *b = &cfg->plugins[1];
    assert_int_equal(a->id, 42);
    assert_string_equal(a->name, "acme-cache");
    assert_string_equal(a->file, "cache.so");
    assert_string_equal(a->path, "/opt/spoke/plugins/cache.so");
    assert_true(a->has_sha256);
    for (int i = 0; i < 32; i++)
        assert_int_equal(a->sha256[i], i);
    assert_true(a->enabled);
    assert_false(a->autoloaded);
    assert_int_equal(a->n_args, 3);
    assert_string_equal(a->args[0], "--fast");
    assert_string_equal(a->args[1], "");
    assert_string_equal(a->args[2], "two words");
    assert_int_equal(a->n_env, 3);
    assert_string_equal(a->env[0], "A=1");
    assert_string_equal(a->env[1], "B_2=x=y");
    assert_string_equal(a->env[2], "_C=");
    assert_int_equal(a->n_config, 2);
    assert_string_equal(a->config[0].key, "ttl");
    assert_string_equal(a->config[0].value, "60s");
    assert_string_equal(a->config[1].key, "nested.k");
    assert_string_equal(a->config[1].value, "v");

    assert_null(b->name);
    assert_int_equal(b->id, 0);
    assert_string_equal(b->file, "/abs/other.so");
    assert_string_equal(b->path, "/abs/other.so");
    assert_false(b->has_sha256);
    assert_false(b->enabled);
    assert_int_equal(b->n_args + b->n_env + b->n_config, 0);

    assert_string_equal(cfg->queue_path, "/var/tmp/q");
    assert_int_equal(cfg->queue_max_pending, 500);
    assert_int_equal(cfg->queue_max_bytes, 512ull << 20);
    assert_int_equal(cfg->queue_retention_ms, 3600000);
    assert_true(cfg->queue_sync_always);
    assert_int_equal(cfg->queue_map_size, 1ull << 30);
    assert_string_equal(cfg->uplink_url, "https://hub.example:7443");
    assert_int_equal(cfg->uplink_heartbeat_ms, 15000);
    assert_int_equal(cfg->uplink_batch_size, 250);
    assert_string_equal(cfg->uplink_token_file, "/etc/spoke/token");
    assert_string_equal(cfg->uplink_ca, "/etc/spoke/ca.pem");
    assert_string_equal(cfg->metrics_listen, "127.0.0.1:9090");
    assert_int_equal(cfg->log_level, SPOKE_LOG_DEBUG);
}

static void test_full(void **state)
{
    (void)state;
    spk_config *cfg = load_ok(FULL);
    check_full(cfg);
    assert_int_equal(cfg->plugins[0].line, 32);
    assert_int_equal(cfg->plugins[1].line, 40);
    spk_config_free(cfg);
}

/* The dump holds every key, and loading it back gives the same config (and dump). */
static void test_dump_round_trip(void **state)
{
    (void)state;
    spk_config *cfg = load_ok(FULL);
    char *d1 = dump_text(cfg);
    assert_non_null(strstr(d1, "\n  hook_timeout: 20ms\n"));
    assert_non_null(strstr(d1, "\n  crash_window: 2m\n"));
    assert_non_null(strstr(d1, "\n  connect_timeout: 2500ms\n"));
    assert_non_null(strstr(d1, "\n  read_chunk: 16KiB\n"));
    assert_non_null(strstr(d1, "\n  sync: always\n"));
    assert_non_null(strstr(d1, "\n    - \"[::1]:6433\"\n"));
    assert_non_null(strstr(d1, "\n  workers: 8\n"));
    assert_non_null(strstr(d1, "\n  level: debug\n"));
    assert_non_null(strstr(d1, "\n        nested.k: v\n"));
    assert_non_null(strstr(
        d1, "\n      sha256: 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"));
    spk_config *again = load_ok(d1);
    check_full(again);
    char *d2 = dump_text(again);
    assert_string_equal(d1, d2);
    free(d2);
    spk_config_free(again);
    free(d1);
    spk_config_free(cfg);

    /* defaults too: every key is printed, `~` for the unset ones */
    cfg = load_ok(UP);
    d1 = dump_text(cfg);
    assert_non_null(strstr(d1, "\n  url: ~\n"));
    assert_non_null(strstr(d1, "\n  workers: auto\n"));
    assert_non_null(strstr(d1, "\n  sync: 100ms\n"));
    assert_non_null(strstr(d1, "\n  max_bytes: 1GiB\n"));
    assert_non_null(strstr(d1, "\n  list: []\n"));
    again = load_ok(d1);
    d2 = dump_text(again);
    assert_string_equal(d1, d2);
    free(d1);
    free(d2);
    spk_config_free(again);
    spk_config_free(cfg);
}

/* Strings holding what YAML reads as a line break (NEL U+0085, LS U+2028, PS U+2029) or
 * refuses raw (C1 controls, U+FEFF, U+FFFE/U+FFFF) dump as escapes, and a value ending in
 * ':' is quoted, so they load back unchanged (fuzz_config found "\N" in a plugin's config
 * coming back as a space, and "g:" making the dump unreadable). */
static void test_dump_escapes_what_yaml_reads_otherwise(void **state)
{
    (void)state;
    spk_config *cfg = load_ok("listen: { upstream: 127.0.0.1:5432 }\n"
                              "plugins:\n  list:\n"
                              "    - { file: a.so, config: { m: \"a\\Nb\\Lc\\Pd\\x80e\\uFEFFf\" } }\n");
    assert_string_equal(cfg->plugins[0].config[0].value,
                        "a\xc2\x85" "b\xe2\x80\xa8" "c\xe2\x80\xa9" "d\xc2\x80" "e\xef\xbb\xbf" "f");
    char *d1 = dump_text(cfg);
    spk_config *again = load_ok(d1);
    assert_string_equal(again->plugins[0].config[0].value, cfg->plugins[0].config[0].value);
    char *d2 = dump_text(again);
    assert_string_equal(d1, d2);
    free(d1);
    free(d2);
    spk_config_free(again);
    spk_config_free(cfg);

    /* a value ending in ':' is quoted: plain, "k: g:" is not YAML (fuzz_config) */
    cfg = load_ok("listen: { upstream: 127.0.0.1:5432 }\n"
                  "plugins:\n  list:\n    - { file: a.so, config: { k: [\"g:\", \"a:b\"] } }\n");
    d1 = dump_text(cfg);
    assert_non_null(strstr(d1, "\n        k.0: \"g:\"\n"));
    again = load_ok(d1);
    assert_string_equal(again->plugins[0].config[0].value, "g:");
    assert_string_equal(again->plugins[0].config[1].value, "a:b");
    free(d1);
    spk_config_free(again);
    spk_config_free(cfg);
}

/* Keys check their own ranges, and say so with the range in the key's unit. */
static void test_ranges(void **state)
{
    (void)state;
    expect_message(with_upstream("plugins:\n  hook_timeout: 0\n"),
                   "3: plugins.hook_timeout: 0 is out of range 1ms..1h");
    expect_message(with_upstream("plugins:\n  hook_timeout: 2h\n"),
                   "3: plugins.hook_timeout: 2h is out of range 1ms..1h");
    expect_message(with_upstream("listen2: {}\n"),
                   "2: listen2: unknown section (known: edge, listen, plugins, queue, kv, "
                   "uplink, metrics, log, policies; and the keys run_dir, user, group)");
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  read_chunk: 512\n",
                   "3: listen.read_chunk: 512 is out of range 1KiB..16MiB");
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  read_chunk: 17MiB\n",
                   "3: listen.read_chunk: 17MiB is out of range 1KiB..16MiB");
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  workers: 0\n",
                   "3: listen.workers: expected 'auto' or an integer in 1..256, got '0'");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  workers: 257\n", 3, "listen.workers",
                 "1..256");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  workers: -1\n", 3, "listen.workers",
                 "got '-1'");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  workers: [1]\n", 3, "listen.workers",
                 "got a list");
    expect_message(with_upstream("uplink:\n  batch_size: 10001\n"),
                   "3: uplink.batch_size: expected an integer in 1..10000, got '10001'");
    expect_error(with_upstream("uplink:\n  batch_size: 0\n"), 3, "uplink.batch_size", "'0'");
    expect_error(with_upstream("plugins:\n  crash_limit: 0\n"), 3, "plugins.crash_limit",
                 "1..100");
    expect_error(with_upstream("plugins:\n  crash_limit: 99999999999999999999999\n"), 3,
                 "plugins.crash_limit", "got '99999999999999999999999'");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  backlog: 70000\n", 3, "listen.backlog",
                 "1..65535");

    spk_config *cfg = load_ok("listen:\n  upstream: 127.0.0.1:1\n  workers: auto\n"
                              "  read_chunk: 1KiB\n  backlog: 65535\n"
                              "plugins: { hook_timeout: 1h, crash_limit: 1, drain_timeout: 0ms }\n"
                              "uplink: { batch_size: 10000 }\n");
    assert_int_equal(cfg->workers, 0);
    assert_int_equal(cfg->read_chunk, 1024);
    assert_int_equal(cfg->backlog, 65535);
    assert_int_equal(cfg->hook_timeout_ms, 3600000);
    assert_int_equal(cfg->crash_limit, 1);
    assert_int_equal(cfg->drain_timeout_ms, 0);
    assert_int_equal(cfg->uplink_batch_size, 10000);
    spk_config_free(cfg);

    cfg = load_ok("listen: { upstream: 127.0.0.1:1, workers: 256 }\n");
    assert_int_equal(cfg->workers, 256);
    spk_config_free(cfg);
}

/* ---- error classes ------------------------------------------------------------------ */

/* Counts the code holds in fixed tables are capped at their size, and a config over a cap
 * is refused naming the key and the cap (issue 12, item 3): workers (status slots),
 * crash_limit (the crash-time ring), listen addresses (a worker's listening sockets),
 * plugins enabled in a generation (a status slot's plugin table). */
static void test_caps(void **state)
{
    (void)state;
    static char text[16384];
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  workers: 257\n", 3, "listen.workers",
                 "an integer in 1..256");
    expect_error(with_upstream("plugins:\n  crash_limit: 101\n"), 3, "plugins.crash_limit",
                 "an integer in 1..100");
    spk_config *cfg = load_ok(with_upstream("plugins:\n  crash_limit: 100\n"));
    assert_int_equal(cfg->crash_limit, SPK_CRASH_LIMIT_MAX);
    spk_config_free(cfg);

    /* listen.address: 64 addresses load, 65 are refused. */
    for (int n = SPK_LISTEN_MAX; n <= SPK_LISTEN_MAX + 1; n++) {
        size_t len = (size_t)snprintf(text, sizeof(text), "listen:\n  upstream: 127.0.0.1:1\n"
                                                          "  address:\n");
        for (int i = 0; i < n; i++)
            len += (size_t)snprintf(text + len, sizeof(text) - len, "    - 127.0.0.1:%d\n",
                                    10000 + i);
        if (n == SPK_LISTEN_MAX) {
            cfg = load_ok(text);
            assert_int_equal(cfg->n_listen, 64);
            spk_config_free(cfg);
        } else {
            expect_error(text, 4, "listen.address", "65 addresses, more than the 64");
        }
    }

    /* plugins.list: 64 enabled entries load (a 65th disabled one does not count), 65 are
     * refused. */
    for (int n = SPK_PLUGINS_MAX; n <= SPK_PLUGINS_MAX + 1; n++) {
        size_t len = (size_t)snprintf(text, sizeof(text), "%splugins:\n  list:\n", UP);
        for (int i = 0; i <= SPK_PLUGINS_MAX; i++)
            len += (size_t)snprintf(text + len, sizeof(text) - len,
                                    "    - { file: p%d.so, enabled: %s }\n", i,
                                    i < n ? "true" : "false");
        if (n == SPK_PLUGINS_MAX) {
            cfg = load_ok(text);
            assert_int_equal(cfg->n_plugins, 65);
            spk_config_free(cfg);
        } else {
            expect_error(text, 4, "plugins.list", "65 plugins enabled, more than the 64");
        }
    }
}

static void test_bad_duration_message(void **state)
{
    (void)state;
    /* the same text as tests/integration/test_refusals.py */
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  address: 127.0.0.1:9\n"
                   "plugins:\n  hook_timeout: fast\n",
                   "5: plugins.hook_timeout: expected a duration such as 50ms or 2s, "
                   "got 'fast'");
    expect_message(with_upstream("queue: { max_bytes: lots }\n"),
                   "2: queue.max_bytes: expected a size such as 64KiB or 1GiB, got 'lots'");
    expect_message(with_upstream("queue:\n  retention:\n"),
                   "3: queue.retention: expected a duration such as 50ms or 2s, got an "
                   "empty value");
}

static void test_unknown_keys(void **state)
{
    (void)state;
    expect_message(with_upstream("plugins:\n  dir: /x\n  hook_timout: 1s\n"),
                   "4: plugins.hook_timout: unknown key (known keys in plugins: dir, autoload, "
                   "compatibility, health_check_period, hook_timeout, start_timeout, "
                   "reload_on_crash, health_fail_limit, crash_limit, crash_window, "
                   "drain_timeout, tick, list, strict_modes)");
    expect_error(with_upstream("\n\nnonsense: 1\n"), 4, "nonsense", "unknown section");
    expect_error("listen: { upstream: 127.0.0.1:1, port: 5 }\n", 1, "listen.port", "unknown key");
    expect_error(with_upstream("plugins:\n  list:\n    - file: a.so\n      sha: abc\n"), 5,
                 "plugins.list[0].sha", "unknown key (known keys in plugins.list[0]: id, name");
}

static void test_wrong_types(void **state)
{
    (void)state;
    expect_message(with_upstream("plugins:\n  - a\n"),
                   "3: plugins: expected a mapping, got a list");
    expect_message(with_upstream("edge:\n  id: { a: 1 }\n"),
                   "3: edge.id: expected a string, got a mapping");
    expect_message("listen:\n  upstream: [127.0.0.1:1]\n",
                   "2: listen.upstream: expected an address (host:port, [ipv6]:port or "
                   "unix:/path), got a list");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  address: { a: 1 }\n", 3, "listen.address",
                 "got a mapping");
    expect_message(with_upstream("plugins:\n  autoload: maybe\n"),
                   "3: plugins.autoload: expected true or false, got 'maybe'");
    expect_message(with_upstream("plugins:\n  compatibility: lax\n"),
                   "3: plugins.compatibility: expected one of strict, loose, got 'lax'");
    expect_message(with_upstream("log: { level: verbose }\n"),
                   "2: log.level: expected one of debug, info, warn, error, got 'verbose'");
    expect_error("listen: { upstream: 127.0.0.1:1,\n  upstream_connect: later }\n", 2,
                 "listen.upstream_connect", "one of eager, lazy");
    expect_error(with_upstream("plugins:\n  list: { file: a.so }\n"), 3, "plugins.list",
                 "expected a list of plugin entries, got a mapping");
    expect_error(with_upstream("plugins:\n  list:\n    - a.so\n"), 4, "plugins.list[0]",
                 "expected a mapping with at least `file:`, got a string");
    expect_message("- listen\n",
                   "1: expected a mapping of sections (edge, listen, plugins, ...), got a list");
    expect_error(with_upstream("uplink: { url: ftp://hub }\n"), 2, "uplink.url",
                 "expected a URL such as https://hub:7443, got 'ftp://hub'");
    expect_error(with_upstream("uplink: { url: \"https://\" }\n"), 2, "uplink.url", NULL);
    expect_error(with_upstream("run_dir: [a]\n"), 2, "run_dir", "expected a directory");

    /* the bool spellings */
    spk_config *cfg = load_ok(with_upstream("plugins: { autoload: on, reload_on_crash: no }\n"));
    assert_true(cfg->autoload);
    assert_false(cfg->reload_on_crash);
    spk_config_free(cfg);
    cfg = load_ok(with_upstream("plugins: { autoload: True, reload_on_crash: OFF }\n"));
    assert_true(cfg->autoload);
    assert_false(cfg->reload_on_crash);
    spk_config_free(cfg);
}

static void test_missing_required(void **state)
{
    (void)state;
    expect_message("edge: { id: x }\nlisten:\n  workers: 2\n",
                   "2: listen.upstream: required key is missing (the server to proxy to, e.g. "
                   "127.0.0.1:5432)");
    expect_error("edge: { id: x }\n", 1, "listen.upstream", "required key is missing");
    expect_error("", 1, "listen.upstream", "required key is missing");
    expect_error("# only a comment\n", 1, "listen.upstream", "required key is missing");
    expect_error(with_upstream("plugins:\n  list:\n    - name: a\n      id: 3\n"), 4,
                 "plugins.list[0]", "`file:` is required");
    expect_error(with_upstream("plugins:\n  list:\n    - file: \"\"\n"), 4, "plugins.list[0]",
                 "must not be empty");
}

static void test_missing_file(void **state)
{
    (void)state;
    spk_config *cfg = (spk_config *)(uintptr_t)1;
    spk_errbuf eb;
    assert_int_equal(spk_config_load("/tmp/spk-no-such-dir/spoke.yaml", &cfg, &eb), SPK_ENOENT);
    assert_null(cfg);
    assert_string_equal(eb.msg,
                        "cannot open /tmp/spk-no-such-dir/spoke.yaml: No such file or directory");
    assert_int_equal(spk_config_load("/tmp", &cfg, &eb), SPK_EIO);
    assert_string_equal(eb.msg, "cannot open /tmp: Is a directory");
    /* a NULL errbuf is allowed */
    assert_int_equal(spk_config_load("/tmp/spk-no-such-dir/spoke.yaml", &cfg, NULL), SPK_ENOENT);
}

static void test_malformed_yaml(void **state)
{
    (void)state;
    /* the unclosed flow list of tests/integration/test_refusals.py */
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  address: [unclosed\nplugins: {}\n", 4, NULL,
                 "YAML syntax error: did not find expected ',' or ']' (column 8; while "
                 "parsing a flow sequence that starts at line 3)");
    /* a tab where indentation is expected */
    expect_error("listen:\n  upstream: 127.0.0.1:1\n\tworkers: 2\n", 3, NULL,
                 "YAML syntax error: found a tab character that violates indentation (column 1");
    /* a block mapping key at a wrong indentation */
    expect_error("listen:\n  upstream: 127.0.0.1:1\n   workers: 2\n", 3, NULL,
                 "YAML syntax error: mapping values are not allowed in this context (column 11)");
    expect_error("listen: {upstream: \"127.0.0.1:1}\n", 2, NULL,
                 "YAML syntax error: found "
                 "unexpected end of stream");
    expect_error(with_upstream("a: &x 1\nb: *x\n"), 3, NULL, "YAML aliases (*x) are not supported");
    expect_error(with_upstream("? [a, b]\n: 1\n"), 2, NULL, "mapping keys must be strings");
    expect_error(with_upstream("---\nlog: {}\n"), 2, NULL, "only one YAML document is allowed");
    expect_error(with_upstream("edge: { id: \"a\\0b\" }\n"), 2, NULL, "NUL character");
    /* invalid UTF-8 */
    expect_error("listen: { upstream: \"\xff\xfe\" }\n", 1, NULL, "YAML syntax error: invalid");
    /* nesting bombs end cleanly */
    char deep[400];
    memset(deep, '[', 200);
    strcpy(deep + 200, "\n");
    expect_error(deep, 1, NULL, "nested deeper than 64 levels");
}

static void test_duplicate_keys(void **state)
{
    (void)state;
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  upstream: 127.0.0.1:2\n",
                   "3: listen.upstream: duplicate key (first at line 2)");
    expect_message(with_upstream("log: {}\nlog: {}\n"), "3: log: duplicate key (first at line 2)");
    expect_error("listen: { upstream: 127.0.0.1:1, upstream: 127.0.0.1:1 }\n", 1, "listen.upstream",
                 "duplicate key (first at line 1)");
    expect_error(with_upstream("plugins:\n  list:\n    - file: a.so\n      file: b.so\n"), 5,
                 "plugins.list[0].file", "duplicate key (first at line 4)");
    expect_error(with_upstream("plugins:\n  list:\n    - file: a.so\n      config:\n"
                               "        a: { x: 1, x: 2 }\n"),
                 6, "plugins.list[0].config.a.x", "duplicate key (first at line 6)");
}

static void test_addresses(void **state)
{
    (void)state;
    static const char *const good[] = {
        "127.0.0.1:5432",        "0.0.0.0:1",         "db.internal:65535",
        "localhost:6432",        "a-b.c-d.e:80",      "\"[::1]:6432\"",
        "\"[2001:db8::1]:443\"", "unix:/tmp/pg.sock", "\"[::ffff:1.2.3.4]:80\"",
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), "listen:\n  upstream: %s\nmetrics: { listen: %s }\n", good[i],
                 good[i]);
        spk_config *cfg = load_ok(text);
        const char *want = good[i][0] == '"' ? good[i] + 1 : good[i];
        assert_memory_equal(cfg->upstream, want, strlen(cfg->upstream));
        assert_memory_equal(cfg->metrics_listen, want, strlen(cfg->metrics_listen));
        spk_config_free(cfg);
    }
    static const struct {
        const char *addr, *why;
    } bad[] = {
        {"127.0.0.1", "expected host:port, [ipv6]:port or unix:/path"},
        {"127.0.0.1:0", "the port must be a number in 1..65535"},
        {"127.0.0.1:65536", "the port must be a number in 1..65535"},
        {"127.0.0.1:http", "the port must be a number in 1..65535"},
        {"\"127.0.0.1:\"", "the port must be a number in 1..65535"},
        {"\"::1:80\"", "an IPv6 address must be in brackets, as in [::1]:6432"},
        {"\"[::1]80\"", "expected [ipv6]:port"},
        {"\"[zz::1]:80\"", "not an IPv6 address between the brackets"},
        {"\"[1.2.3.4]:80\"", "not an IPv6 address between the brackets"},
        {"unix:rel/path", "a unix socket path must be absolute (unix:/path)"},
        {"\"unix:\"", "a unix socket path must be absolute (unix:/path)"},
        {"\":5432\"", "the host is missing (0.0.0.0 means every interface)"},
        {"256.1.1.1:80", "not an IPv4 address"},
        {"1.2.3:80", "not an IPv4 address"},
        {"-bad.com:80", "not a valid host name"},
        {"bad-.com:80", "not a valid host name"},
        {"a..b:80", "not a valid host name"},
        {"under_score:80", "not a valid host name"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char text[256], want[256];
        snprintf(text, sizeof(text), "listen:\n  upstream: %s\n", bad[i].addr);
        const char *a = bad[i].addr[0] == '"' ? bad[i].addr + 1 : bad[i].addr;
        snprintf(want, sizeof(want), "2: listen.upstream: invalid address '%.*s': %s",
                 (int)(strlen(a) - (a != bad[i].addr)), a, bad[i].why);
        expect_message(text, want);
    }
    char longpath[200];
    snprintf(longpath, sizeof(longpath), "listen: { upstream: unix:/%0120d }\n", 0);
    expect_error(longpath, 1, "listen.upstream", "must be shorter than 108 bytes");

    /* a list of addresses, and the index of the wrong one */
    spk_config *cfg = load_ok("listen:\n  upstream: 127.0.0.1:1\n"
                              "  address: [127.0.0.1:1, \"[::1]:2\", unix:/tmp/s]\n");
    assert_int_equal(cfg->n_listen, 3);
    assert_string_equal(cfg->listen[0], "127.0.0.1:1");
    assert_string_equal(cfg->listen[1], "[::1]:2");
    assert_string_equal(cfg->listen[2], "unix:/tmp/s");
    spk_config_free(cfg);
    expect_message("listen:\n  upstream: 127.0.0.1:1\n  address:\n    - 127.0.0.1:1\n"
                   "    - 127.0.0.1:99999\n",
                   "5: listen.address[1]: invalid address '127.0.0.1:99999': the port must be "
                   "a number in 1..65535");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  address: []\n", 3, "listen.address",
                 "expected at least one address, got an empty list");
    expect_error("listen:\n  upstream: 127.0.0.1:1\n  address: [[a]]\n", 3, "listen.address[0]",
                 "got a list");
}

static void test_queue(void **state)
{
    (void)state;
    spk_config *cfg = load_ok(with_upstream("queue: { sync: 10ms }\n"));
    assert_false(cfg->queue_sync_always);
    assert_int_equal(cfg->queue_sync_interval_ms, 10);
    spk_config_free(cfg);
    cfg = load_ok(with_upstream("queue: { sync: always }\n"));
    assert_true(cfg->queue_sync_always);
    spk_config_free(cfg);
    expect_message(with_upstream("queue: { sync: never }\n"),
                   "2: queue.sync: expected 'always' or a duration such as 100ms, got 'never'");
    expect_error(with_upstream("queue: { sync: 0 }\n"), 2, "queue.sync", "out of range 1ms..1h");
    expect_message(with_upstream("\nqueue:\n  max_bytes: 4GiB\n"),
                   "4: queue.max_bytes: 4GiB exceeds queue.map_size (2GiB); raise "
                   "queue.map_size");
    cfg = load_ok(with_upstream("queue: { journal_size: 4MiB }\n"));
    assert_int_equal(cfg->queue_journal_size, 4ull << 20);
    spk_config_free(cfg);
    expect_error(with_upstream("queue: { journal_size: 2MiB }\n"), 2, "queue.journal_size",
                 "out of range");
    expect_message(with_upstream("\nqueue:\n  journal_size: 5000000\n"),
                   "4: queue.journal_size: 5000000B is not a multiple of 4 KiB");
    /* queue.segment_size and queue.writemap were removed: naming them is an error */
    expect_error(with_upstream("queue: { segment_size: 2MiB }\n"), 2, "queue.segment_size",
                 "this key was removed");
    expect_error(with_upstream("queue: { writemap: true }\n"), 2, "queue.writemap",
                 "this key was removed");
    cfg = load_ok(with_upstream("queue: { max_bytes: 4GiB, map_size: 8GB }\n"));
    assert_int_equal(cfg->queue_max_bytes, 4ull << 30);
    assert_int_equal(cfg->queue_map_size, 8000000000ull);
    spk_config_free(cfg);
}

/* ---- plugins ------------------------------------------------------------------------ */

static void test_plugin_entries(void **state)
{
    (void)state;
    spk_config *cfg = load_ok(
        with_upstream("plugins:\n"                                                     /* 2 */
                      "  dir: plugs\n"                                                 /* 3 */
                      "  list:\n"                                                      /* 4 */
                      "    - file: one.so\n"                                           /* 5 */
                      "      args:\n"                                                  /* 6 */
                      "        - -v\n"                                                 /* 7 */
                      "        - 42\n"                                                 /* 8 */
                      "      env: [\"PATH=/bin:/usr/bin\", EMPTY=]\n"                  /* 9 */
                      "      config:\n"                                                /* 10 */
                      "        a: { b: 1 }\n"                                          /* 11 */
                      "        l: [x, y]\n"                                            /* 12 */
                      "        e:\n"                                                   /* 13 */
                      "        q: \"quoted: text\"\n"                                  /* 14 */
                      "        n: { deep: [ { k: v }, [p, q] ] }\n"                    /* 15 */
                      "        none: {}\n"                                             /* 16 */
                      "    - { file: sub/two.so, name: acme.two_2, id: 4294967295 }\n" /* 17 */
                      "    -\n"                                                        /* 18 */
                      "      file: three.so\n"                                         /* 19 */
                      "      args: []\n"                                               /* 20 */
                      "      config: {}\n"));                                          /* 21 */
    assert_int_equal(cfg->n_plugins, 3);
    const spk_plugin_conf *p = &cfg->plugins[0];
    assert_int_equal(p->line, 5);
    assert_string_equal(p->path, "plugs/one.so");
    assert_true(p->enabled);
    assert_int_equal(p->n_args, 2);
    assert_string_equal(p->args[0], "-v");
    assert_string_equal(p->args[1], "42");
    assert_int_equal(p->n_env, 2);
    assert_string_equal(p->env[0], "PATH=/bin:/usr/bin");
    assert_string_equal(p->env[1], "EMPTY=");
    static const char *const want[][2] = {
        {"a.b", "1"},          {"l.0", "x"},        {"l.1", "y"},        {"e", ""},
        {"q", "quoted: text"}, {"n.deep.0.k", "v"}, {"n.deep.1.0", "p"}, {"n.deep.1.1", "q"},
    };
    assert_int_equal(p->n_config, sizeof(want) / sizeof(want[0]));
    for (size_t i = 0; i < p->n_config; i++) {
        assert_string_equal(p->config[i].key, want[i][0]);
        assert_string_equal(p->config[i].value, want[i][1]);
    }
    p = &cfg->plugins[1];
    assert_int_equal(p->line, 17);
    assert_string_equal(p->name, "acme.two_2");
    assert_int_equal(p->id, 4294967295u);
    assert_string_equal(p->path, "plugs/sub/two.so");
    p = &cfg->plugins[2];
    assert_int_equal(p->line, 19);
    assert_int_equal(p->n_args, 0);
    assert_int_equal(p->n_config, 0);
    spk_config_free(cfg);

    /* the `config:` example from spoke.h */
    cfg = load_ok(
        with_upstream("plugins: { list: [ { file: x.so, config: {a: {b: 1}, l: [x, y]} } ] }\n"));
    assert_int_equal(cfg->plugins[0].n_config, 3);
    assert_string_equal(cfg->plugins[0].config[0].key, "a.b");
    assert_string_equal(cfg->plugins[0].config[2].key, "l.1");
    assert_string_equal(cfg->plugins[0].config[2].value, "y");
    spk_config_free(cfg);
}

static void test_plugin_errors(void **state)
{
    (void)state;
    const char *head = "plugins:\n  list:\n    - file: a.so\n"; /* lines 2-4 */
    char text[1024];
#define ENTRY(extra) (snprintf(text, sizeof(text), "%s%s%s", UP, head, extra), text)
    expect_message(ENTRY("      env: [A=1, \"1X=2\"]\n"),
                   "5: plugins.list[0].env[1]: expected KEY=value with KEY made of "
                   "[A-Za-z0-9_], not starting with a digit, got '1X=2'");
    expect_error(ENTRY("      env: [NOEQUALS]\n"), 5, "plugins.list[0].env[0]", "'NOEQUALS'");
    expect_error(ENTRY("      env: [A-B=1]\n"), 5, "plugins.list[0].env[0]", "'A-B=1'");
    expect_error(ENTRY("      env: [=1]\n"), 5, "plugins.list[0].env[0]", "'=1'");
    expect_error(ENTRY("      env: A=1\n"), 5, "plugins.list[0].env",
                 "expected a list of strings, got a string");
    expect_error(ENTRY("      args:\n        - ok\n        - { a: 1 }\n"), 7,
                 "plugins.list[0].args[1]", "expected a string, got a mapping");
    expect_error(ENTRY("      args: [a, ~]\n"), 5, "plugins.list[0].args[1]",
                 "expected a string, got an empty value");
    expect_error(ENTRY("      config: [a, b]\n"), 5, "plugins.list[0].config",
                 "expected a mapping, got a list");
    expect_message(ENTRY("      config:\n        a.b: 1\n        a: { b: 2 }\n"),
                   "7: plugins.list[0].config.a.b: flattens to the same key as the entry at "
                   "line 6");
    expect_message(ENTRY("      name: My Plugin\n"),
                   "5: plugins.list[0].name: 'My Plugin' may only contain letters, digits, "
                   "'.', '_' and '-' (convention: lowercase, vendor-prefixed, as in acme-cache)");
    expect_error(ENTRY("      name: acme/x\n"), 5, "plugins.list[0].name", "may only contain");
    expect_error(ENTRY("      name: x12345678901234567890123456789012345678901234567890123456789"
                       "01234\n"),
                 5, "plugins.list[0].name", "is longer than 64 characters");
    expect_error(ENTRY("      id: -1\n"), 5, "plugins.list[0].id",
                 "expected an integer in 0..4294967295, got '-1'");
    expect_error(ENTRY("      id: 4294967296\n"), 5, "plugins.list[0].id", "'4294967296'");
    expect_error(ENTRY("      enabled: 1\n"), 5, "plugins.list[0].enabled",
                 "expected true or false, got '1'");
    expect_error(ENTRY("    - file: b.so\n      bogus: 1\n"), 6, "plugins.list[1].bogus",
                 "unknown key");

    /* a 64-character name is fine */
    spk_config *cfg = load_ok(ENTRY("      name: x123456789012345678901234567890123456789012345678"
                                    "901234567890123\n"));
    assert_int_equal(strlen(cfg->plugins[0].name), 64);
    spk_config_free(cfg);
#undef ENTRY
}

static void test_sha256(void **state)
{
    (void)state;
    static const char hex[] = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
    static const uint8_t bin[32] = {
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4,
        0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b,
        0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
    };
    char text[512];
    snprintf(text, sizeof(text), "%splugins: { list: [ { file: a.so, sha256: %s } ] }\n", UP, hex);
    spk_config *cfg = load_ok(text);
    assert_true(cfg->plugins[0].has_sha256);
    assert_memory_equal(cfg->plugins[0].sha256, bin, 32);
    spk_config_free(cfg);

    static const char *const bad[] = {
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",   /* 63 */
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555", /* 65 */
        "g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  /* not hex */
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85 ",  "0x",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[512];
        snprintf(text, sizeof(text),
                 "%splugins:\n  list:\n    - file: a.so\n      sha256: \"%s\"\n", UP, bad[i]);
        snprintf(want, sizeof(want),
                 "5: plugins.list[0].sha256: expected 64 hex digits (a SHA-256 sum), got '%s'",
                 bad[i]);
        expect_message(text, want);
    }
    expect_error(with_upstream("plugins:\n  list:\n    - file: a.so\n      sha256: [a]\n"), 5,
                 "plugins.list[0].sha256", "got a list");
}

static void test_duplicate_plugins(void **state)
{
    (void)state;
    expect_message(with_upstream("plugins:\n  list:\n"
                                 "    - { file: a.so, name: acme-x }\n"   /* 4 */
                                 "    - { file: b.so, name: acme-y }\n"   /* 5 */
                                 "    - { file: c.so, name: acme-x }\n"), /* 6 */
                   "6: plugins.list[2].name: 'acme-x' is already the name of plugins.list[0] at "
                   "line 4 (plugin names must be unique)");
    expect_message(with_upstream("plugins:\n  list:\n"
                                 "    - file: a.so\n" /* 4 */
                                 "      id: 7\n"
                                 "    - file: b.so\n" /* 6 */
                                 "      id: 7\n"),
                   "6: plugins.list[1].id: 7 is already the ID of plugins.list[0] at line 4 "
                   "(plugin IDs must be unique)");
    /* no explicit name, or ID 0: the parser cannot know; the loader checks again */
    spk_config *cfg = load_ok(with_upstream("plugins:\n  list:\n"
                                            "    - { file: a.so, id: 0 }\n"
                                            "    - { file: a.so, id: 0 }\n"));
    assert_int_equal(cfg->n_plugins, 2);
    spk_config_free(cfg);
}

/* ---- flow style --------------------------------------------------------------------- */

static void test_flow_style(void **state)
{
    (void)state;
    /* the sketch of DESIGN.md, all flow */
    static const char flow[] =
        "edge: { id: edge-us-west-1, namespace: prod }\n"
        "listen: { address: 0.0.0.0:6432, upstream: 127.0.0.1:5432, workers: auto }\n"
        "plugins: { dir: /usr/lib/spoke/plugins, compatibility: strict, hook_timeout: 50ms,\n"
        "  list: [ { id: 42, name: llm-cache, file: llm-cache.so, config: { ttl: 60s } } ] }\n"
        "queue: { path: /var/lib/spoke/queue, max_pending: 100000, max_bytes: 1GiB, "
        "retention: 24h, sync: 100ms }\n"
        "uplink: { url: \"https://hub:7443\", heartbeat: 30s, batch_size: 100 }\n"
        "metrics: { listen: 127.0.0.1:9090 }\n";
    static const char block[] = "edge:\n  id: edge-us-west-1\n  namespace: prod\n"
                                "listen:\n  address: 0.0.0.0:6432\n  upstream: 127.0.0.1:5432\n"
                                "  workers: auto\n"
                                "plugins:\n  dir: /usr/lib/spoke/plugins\n"
                                "  compatibility: strict\n  hook_timeout: 50ms\n"
                                "  list:\n    - id: 42\n      name: llm-cache\n"
                                "      file: llm-cache.so\n      config:\n        ttl: 60s\n"
                                "queue:\n  path: /var/lib/spoke/queue\n  max_pending: 100000\n"
                                "  max_bytes: 1GiB\n  retention: 24h\n  sync: 100ms\n"
                                "uplink:\n  url: https://hub:7443\n  heartbeat: 30s\n"
                                "  batch_size: 100\n"
                                "metrics:\n  listen: 127.0.0.1:9090\n";
    spk_config *a = load_ok(flow), *b = load_ok(block);
    assert_string_equal(a->edge_id, "edge-us-west-1");
    assert_string_equal(a->listen[0], "0.0.0.0:6432");
    assert_int_equal(a->n_plugins, 1);
    assert_int_equal(a->plugins[0].id, 42);
    assert_int_equal(a->plugins[0].line, 4);
    assert_string_equal(a->plugins[0].path, "/usr/lib/spoke/plugins/llm-cache.so");
    assert_string_equal(a->plugins[0].config[0].key, "ttl");
    assert_string_equal(a->plugins[0].config[0].value, "60s");
    assert_string_equal(a->uplink_url, "https://hub:7443");
    char *da = dump_text(a), *db = dump_text(b);
    assert_string_equal(da, db);
    free(da);
    free(db);
    spk_config_free(a);
    spk_config_free(b);

    /* errors inside flow collections still carry the right line */
    expect_message("listen: { upstream: 127.0.0.1:1,\n"
                   "          workers: many }\n",
                   "2: listen.workers: expected 'auto' or an integer in 1..256, got 'many'");
}

/* ---- autoload and free -------------------------------------------------------------- */

static void test_autoload_and_free(void **state)
{
    (void)state;
    spk_config_free(NULL);
    spk_config *cfg = load_ok(with_upstream("plugins: { list: [ { file: a.so, name: a } ] }\n"));
    assert_int_equal(spk_config_add_autoload(cfg, "b.so", "/usr/lib/spoke/plugins/b.so"), 0);
    assert_int_equal(spk_config_add_autoload(cfg, "c.so", "/usr/lib/spoke/plugins/c.so"), 0);
    assert_int_equal(cfg->n_plugins, 3);
    assert_string_equal(cfg->plugins[0].name, "a"); /* moved by realloc, intact */
    const spk_plugin_conf *p = &cfg->plugins[2];
    assert_string_equal(p->file, "c.so");
    assert_string_equal(p->path, "/usr/lib/spoke/plugins/c.so");
    assert_true(p->enabled);
    assert_true(p->autoloaded);
    assert_null(p->name);
    assert_int_equal(p->id, 0);
    assert_false(p->has_sha256);
    assert_int_equal(p->n_args + p->n_env + p->n_config, 0);
    assert_int_equal(p->line, 0);
    char *d = dump_text(cfg);
    assert_non_null(strstr(d, "\n      file: c.so\n"));
    free(d);
    spk_config_free(cfg);
}

/* Fail the 1st, 2nd, ... allocation of loading FULL: each load fails cleanly with
 * SPK_ENOMEM (also when it is fopen's or libyaml's allocation that failed), leaves *out
 * NULL and leaks nothing; past the last allocation the load succeeds. */
static void test_alloc_failures(void **state)
{
    (void)state;
#ifdef SPK_TEST_ASAN
    skip();
#else
    char path[64];
    write_tmp(FULL, path);
    long n;
    for (n = 1; n < 100000; n++) {
        spk_config *cfg = (spk_config *)(uintptr_t)1;
        spk_errbuf eb;
        long live = alloc_live;
        alloc_count = 0;
        alloc_fail_at = n;
        int rc = spk_config_load(path, &cfg, &eb);
        alloc_fail_at = 0;
        bool injected = alloc_count >= n;
        if (rc == 0) { /* not injected, or a failure stdio absorbs (it goes unbuffered) */
            check_full(cfg);
            spk_config_free(cfg);
            assert_int_equal(alloc_live, live);
            if (!injected)
                break;
            continue;
        }
        if (rc != SPK_ENOMEM)
            fail_msg("allocation %ld: rc %d: %s", n, rc, eb.msg);
        assert_null(cfg);
        if (alloc_live != live)
            fail_msg("allocation %ld failed: %ld blocks leaked (%s)", n, alloc_live - live, eb.msg);
    }
    print_message("failed each of %ld allocations in turn\n", n - 1);
    assert_true(n > 100); /* FULL needs many allocations; all were exercised */
    assert_true(n < 100000);

    /* spk_config_add_autoload leaves the config as it was when it cannot grow it */
    spk_config *cfg = load_ok(FULL);
    for (n = 1; n <= 3; n++) {
        alloc_count = 0;
        alloc_fail_at = n;
        int rc = spk_config_add_autoload(cfg, "x.so", "/x.so");
        alloc_fail_at = 0;
        assert_int_equal(rc, SPK_ENOMEM);
        assert_int_equal(cfg->n_plugins, 2);
    }
    spk_config_free(cfg);
    unlink(path);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_dump_round_trip),
        cmocka_unit_test(test_dump_escapes_what_yaml_reads_otherwise),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_caps),
        cmocka_unit_test(test_bad_duration_message),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_malformed_yaml),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_addresses),
        cmocka_unit_test(test_queue),
        cmocka_unit_test(test_plugin_entries),
        cmocka_unit_test(test_plugin_errors),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_duplicate_plugins),
        cmocka_unit_test(test_flow_style),
        cmocka_unit_test(test_autoload_and_free),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
