/*
 * test_config_scale.c -- a config with many keys costs no n^2 work (issue 12, item 5: the
 * config of a reload is parsed on the supervisor's loop).
 *
 * The parser compares keys with strcmp (duplicate keys in a map, entries of a plugin's
 * `config:` that flatten to the same key, duplicate plugin names and IDs) and config_get
 * looks keys up. This test counts strcmp calls (it defines strcmp, which every strcmp call
 * of the executable then reaches) while loading a plugin's `config:` of N keys and while
 * looking each of them up, for N and 4N: a quadratic check makes 16 times as many
 * compares, an n log n one about 5 times. A count, not a time: no timing assertion.
 * Then 50,000 keys over five plugins load and every one of them is found.
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

static unsigned long long strcmp_calls;

/* Every strcmp of this executable, counted. */
int strcmp(const char *a, const char *b)
{
    strcmp_calls++;
    const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
    while (*x != '\0' && *x == *y) {
        x++;
        y++;
    }
    return (int)*x - (int)*y;
}

/* A config of `plugins` plugin entries, each with `keys` flat config keys, in a temp file
 * whose path is written to path[64]. */
static void write_config(int plugins, int keys, char path[64])
{
    snprintf(path, 64, "/tmp/spk-cfgscale-XXXXXX.yaml");
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fprintf(f, "listen: {address: 127.0.0.1:1, upstream: 127.0.0.1:2}\nrun_dir: /tmp\n"
               "plugins:\n  dir: /tmp\n  list:\n");
    for (int p = 0; p < plugins; p++) {
        fprintf(f, "    - name: p%d\n      id: %d\n      file: p%d.so\n      config:\n", p, p + 1,
                p);
        /* not in key order, so a sort has work to do */
        for (int k = 0; k < keys; k++)
            fprintf(f, "        key.%d: v%d\n", (k * 7919) % keys, (k * 7919) % keys);
    }
    assert_int_equal(fclose(f), 0);
}

static spk_config *load(int plugins, int keys)
{
    char path[64];
    write_config(plugins, keys, path);
    spk_config *cfg = NULL;
    spk_errbuf eb = {{0}};
    int rc = spk_config_load(path, &cfg, &eb);
    unlink(path);
    if (rc != 0)
        print_message("load: %s\n", eb.msg);
    assert_int_equal(rc, 0);
    return cfg;
}

/* Compares made by loading one plugin with `keys` keys, and by looking each key up. */
static void count(int keys, unsigned long long *at_load, unsigned long long *at_get)
{
    strcmp_calls = 0;
    spk_config *cfg = load(1, keys);
    *at_load = strcmp_calls;
    assert_int_equal(cfg->plugins[0].n_config, (size_t)keys);
    strcmp_calls = 0;
    for (int k = 0; k < keys; k++) {
        char key[32];
        snprintf(key, sizeof(key), "key.%d", k);
        assert_non_null(spk_plugin_conf_get(&cfg->plugins[0], key));
    }
    *at_get = strcmp_calls;
    spk_config_free(cfg);
}

static void test_compares_grow_n_log_n(void **state)
{
    (void)state;
    unsigned long long load_n, get_n, load_4n, get_4n;
    count(2500, &load_n, &get_n);
    count(10000, &load_4n, &get_4n);
    print_message("strcmp calls: load %llu -> %llu, lookups %llu -> %llu (2500 -> 10000 keys)\n",
                  load_n, load_4n, get_n, get_4n);
    assert_true(load_4n < 8 * load_n);
    assert_true(get_4n < 8 * get_n);
    /* and far below n^2/2 (50 million at 10,000 keys) */
    assert_true(load_4n < 2000000ull);
}

static void test_fifty_thousand_keys(void **state)
{
    (void)state;
    spk_config *cfg = load(5, 10000);
    assert_int_equal(cfg->n_plugins, 5);
    for (size_t p = 0; p < 5; p++) {
        const spk_plugin_conf *pc = &cfg->plugins[p];
        assert_int_equal(pc->n_config, 10000);
        for (int k = 0; k < 10000; k++) {
            char key[32], want[32];
            snprintf(key, sizeof(key), "key.%d", k);
            snprintf(want, sizeof(want), "v%d", k);
            const char *v = spk_plugin_conf_get(pc, key);
            assert_non_null(v);
            assert_string_equal(v, want);
        }
        assert_null(spk_plugin_conf_get(pc, "key.10000"));
        assert_null(spk_plugin_conf_get(pc, "key"));
        assert_null(spk_plugin_conf_get(pc, ""));
    }
    spk_config_free(cfg);
}

/* With many keys, duplicates are still found, and the first one in the file is named. */
static void test_duplicates_among_many(void **state)
{
    (void)state;
    char path[64];
    snprintf(path, sizeof(path), "/tmp/spk-cfgscale-XXXXXX.yaml");
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fprintf(f, "listen: {address: 127.0.0.1:1, upstream: 127.0.0.1:2}\nplugins:\n  list:\n"
               "    - file: a.so\n      config:\n");
    for (int k = 0; k < 5000; k++) /* lines 6..5005 */
        fprintf(f, "        k%d: x\n", k);
    fprintf(f, "        k4000: y\n"          /* line 5006: repeats line 4006 */
               "        k1: {a: 1}\n"        /* line 5007: a later duplicate */
               "        k3000.z: 1\n"        /* flattens as k3000: {z: 1} would */
               "        k3000: {z: 2}\n");
    assert_int_equal(fclose(f), 0);
    spk_config *cfg = NULL;
    spk_errbuf eb = {{0}};
    assert_int_equal(spk_config_load(path, &cfg, &eb), SPK_ECONFIG);
    unlink(path);
    assert_non_null(strstr(eb.msg, ":5006: plugins.list[0].config.k4000: duplicate key "
                                   "(first at line 4006)"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_compares_grow_n_log_n),
        cmocka_unit_test(test_fifty_thousand_keys),
        cmocka_unit_test(test_duplicates_among_many),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
