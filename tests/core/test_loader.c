/*
 * test_loader.c -- the loader's refusals, each with its message, against real .so files
 * built by the test suite (tests/plugins/t_*.c and plugins/passthrough.c).
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

static char tdir[1024], pdir[1024];

static const char *tplugin(const char *name)
{
    static char path[4][1200];
    static int i;
    i = (i + 1) % 4;
    snprintf(path[i], sizeof(path[i]), "%s/%s.so", tdir, name);
    return path[i];
}

static const char *plugin(const char *name)
{
    static char path[1200];
    snprintf(path, sizeof(path), "%s/%s.so", pdir, name);
    return path;
}

static int open_expect(const char *path, int want, const char *msg_part)
{
    spk_plugin *p = NULL;
    spk_errbuf eb = {""};
    int rc = spk_plugin_open(path, NULL, spk_host_table(), &p, &eb);
    if (want != 0) {
        assert_int_equal(rc, want);
        assert_null(p);
        if (strstr(eb.msg, msg_part) == NULL || strstr(eb.msg, path) == NULL)
            fail_msg("message '%s' lacks '%s' or the file name", eb.msg, msg_part);
    } else {
        assert_int_equal(rc, 0);
        spk_plugin_close(p);
    }
    return rc;
}

static void test_accepts_passthrough(void **state)
{
    (void)state;
    spk_plugin *p;
    spk_errbuf eb;
    assert_int_equal(spk_plugin_open(plugin("passthrough"), NULL, spk_host_table(), &p, &eb), 0);
    assert_string_equal(p->name, "passthrough");
    assert_string_equal(p->table.version, "1.0.0");
    assert_non_null(p->table.on_traffic_from_client);
    assert_null(p->table.init);
    spk_plugin_close(p);
}

static void test_refuses_abi_major(void **state)
{
    (void)state;
    char want[64];
    snprintf(want, sizeof(want), "plugin ABI %d.", SPOKE_ABI_MAJOR + 1);
    open_expect(tplugin("t_abi_major"), SPK_EABI, want);
    open_expect(tplugin("t_abi_major"), SPK_EABI, "major versions differ");
}

static void test_refuses_newer_minor(void **state)
{
    (void)state;
    char want[64];
    snprintf(want, sizeof(want), "needs ABI %d.%d", SPOKE_ABI_MAJOR, SPOKE_ABI_MINOR + 1);
    open_expect(tplugin("t_abi_minor"), SPK_EABI, want);
}

static void test_refuses_small_struct(void **state)
{
    (void)state;
    open_expect(tplugin("t_small_struct"), SPK_EABI, "struct_size 8");
}

static void test_honours_short_table(void **state)
{
    (void)state;
    spk_plugin *p;
    spk_errbuf eb;
    assert_int_equal(spk_plugin_open(tplugin("t_short_table"), NULL, spk_host_table(), &p, &eb),
                     0);
    assert_true(p->plugin_struct_size < sizeof(spoke_plugin));
    assert_non_null(p->table.on_traffic_from_client);
    /* Everything past struct_size reads as NULL, whatever the plugin put there. */
    assert_null(p->table.on_traffic_to_server);
    assert_null(p->table.on_tick);
    assert_null(p->table.accept_edge_payload);
    spk_plugin_close(p);
}

static void test_refuses_missing_entry(void **state)
{
    (void)state;
    open_expect(tplugin("t_no_entry"), SPK_EDLOPEN, "no spoke_plugin_v1 symbol");
}

static void test_refuses_missing_name(void **state)
{
    (void)state;
    open_expect(tplugin("t_null_name"), SPK_EABI, "name is missing");
}

static void test_refuses_missing_and_garbage_files(void **state)
{
    (void)state;
    open_expect("/nonexistent/x.so", SPK_ENOENT, "No such file");
    char path[] = "/tmp/spoke-garbage-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "not an ELF file", 15), 15);
    close(fd);
    open_expect(path, SPK_EDLOPEN, "dlopen failed");
    unlink(path);
}

static void test_checksum(void **state)
{
    (void)state;
    uint8_t sum[32], wrong[32];
    spk_errbuf eb;
    assert_int_equal(spk_sha256_file(plugin("passthrough"), sum, &eb), 0);
    spk_plugin *p;
    assert_int_equal(spk_plugin_open(plugin("passthrough"), sum, spk_host_table(), &p, &eb), 0);
    spk_plugin_close(p);

    memcpy(wrong, sum, 32);
    wrong[0] ^= 0xff;
    assert_int_equal(spk_plugin_open(plugin("passthrough"), wrong, spk_host_table(), &p, &eb),
                     SPK_ECHECKSUM);
    char want[65], got[65];
    spk_sha256_hex(wrong, want);
    spk_sha256_hex(sum, got);
    assert_non_null(strstr(eb.msg, want));
    assert_non_null(strstr(eb.msg, got));
    assert_non_null(strstr(eb.msg, "SHA-256 mismatch"));
}

static void test_sha256_known_value(void **state)
{
    (void)state;
    char path[] = "/tmp/spoke-sha-XXXXXX";
    int fd = mkstemp(path);
    assert_int_equal(write(fd, "abc", 3), 3);
    close(fd);
    uint8_t sum[32];
    char hex[65];
    assert_int_equal(spk_sha256_file(path, sum, NULL), 0);
    spk_sha256_hex(sum, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    unlink(path);
}

static void test_versions(void **state)
{
    (void)state;
    assert_int_equal(spk_version_cmp("1.2.3", "1.2.3"), 0);
    assert_true(spk_version_cmp("1.2", "1.2.0") == 0);
    assert_true(spk_version_cmp("1.10.0", "1.9.9") > 0);
    assert_true(spk_version_cmp("2", "10") < 0);
    assert_true(spk_version_cmp("1.2.3-rc1", "1.2.3") == 0);
}

/* ---- sets: duplicates, requires, init ---------------------------------------------- */

typedef struct cfgfix {
    spk_config cfg;
    spk_plugin_conf pc[4];
} cfgfix;

static void cfg_init(cfgfix *f, enum spk_compat compat)
{
    memset(f, 0, sizeof(*f));
    f->cfg.file = "test.yaml";
    f->cfg.compatibility = compat;
    f->cfg.plugins_dir = pdir;
    f->cfg.plugins = f->pc;
}

static void cfg_add(cfgfix *f, const char *path, const char *name, uint32_t id)
{
    spk_plugin_conf *pc = &f->pc[f->cfg.n_plugins++];
    pc->path = (char *)path;
    pc->file = (char *)path;
    pc->name = (char *)name;
    pc->id = id;
    pc->enabled = true;
    pc->line = (int)f->cfg.n_plugins + 10;
}

static int load_set(cfgfix *f, spk_errbuf *eb)
{
    spk_plugin_set set;
    int rc = spk_plugin_set_load(&f->cfg, spk_host_table(), NULL, NULL, NULL, 0, &set, eb);
    if (rc == 0) {
        rc = spk_plugin_set_init(&set, SPOKE_ROLE_EDGE, eb);
        spk_host_unload(&set);
    }
    return rc;
}

static void test_duplicate_names_refused(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, tplugin("t_dup_a"), NULL, 0);
    cfg_add(&f, tplugin("t_dup_b"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), SPK_EDUPLICATE);
    assert_non_null(strstr(eb.msg, "plugin name 't-dup' is already used"));
    assert_non_null(strstr(eb.msg, "t_dup_b.so"));

    /* Renamed in the config, the same two load. */
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, tplugin("t_dup_a"), "acme-dup-a", 0);
    cfg_add(&f, tplugin("t_dup_b"), "acme-dup-b", 0);
    assert_int_equal(load_set(&f, &eb), 0);
}

static void test_duplicate_ids_refused(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, plugin("passthrough"), "one", 42);
    cfg_add(&f, plugin("passthrough"), "two", 42);
    assert_int_equal(load_set(&f, &eb), SPK_EDUPLICATE);
    assert_non_null(strstr(eb.msg, "plugin ID 42 is already used by 'one'"));
}

static void test_requires_strict_and_loose(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, plugin("passthrough"), NULL, 0);
    cfg_add(&f, tplugin("t_requires"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), SPK_EREQUIRES);
    assert_non_null(strstr(eb.msg, "requires passthrough>=2.0 but passthrough 1.0.0 is loaded"));
    assert_non_null(strstr(eb.msg, "t_requires.so"));
    assert_non_null(strstr(eb.msg, "strict"));

    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, tplugin("t_requires"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), SPK_EREQUIRES);
    assert_non_null(strstr(eb.msg, "which is not loaded"));

    cfg_init(&f, SPK_COMPAT_LOOSE);
    cfg_add(&f, plugin("passthrough"), NULL, 0);
    cfg_add(&f, tplugin("t_requires"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), 0);
}

static void test_requirement_syntax(void **state)
{
    (void)state;
    spk_errbuf eb;
    assert_int_equal(spk_requirement_check(">=1.0", NULL, 0, &eb), SPK_EINVAL);
    assert_int_equal(spk_requirement_check("x>=", NULL, 0, &eb), SPK_EINVAL);
    assert_int_equal(spk_requirement_check("x~1.0", NULL, 0, &eb), SPK_EINVAL);
    assert_int_equal(spk_requirement_check("x", NULL, 0, &eb), SPK_EREQUIRES);
}

static void test_init_failure_refused(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, plugin("passthrough"), NULL, 0);
    cfg_add(&f, tplugin("t_init_fail"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), SPK_EPLUGIN_INIT);
    assert_non_null(strstr(eb.msg, "init failed"));
    assert_non_null(strstr(eb.msg, "t_init_fail.so"));
}

/* init, on_config_loaded and fini are each stamped in the set's slot (slot.h): entered
 * with the plugin's index and the hook, left again, one seq per call. */
static void test_lifecycle_hooks_are_stamped(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    spk_slot slot;
    memset(&slot, 0, sizeof(slot));
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, plugin("passthrough"), NULL, 0);
    cfg_add(&f, tplugin("t_hook_fault"), NULL, 0); /* init, on_config_loaded, fini */
    spk_plugin_set set;
    assert_int_equal(spk_plugin_set_load(&f.cfg, spk_host_table(), NULL, &slot, NULL, 0, &set,
                                         &eb), 0);
    assert_ptr_equal(set.v[1]->slot, &slot);
    uint64_t seq0 = atomic_load(&slot.seq);
    assert_int_equal(spk_plugin_set_init(&set, SPOKE_ROLE_EDGE, &eb), 0);
    uint64_t seq1 = atomic_load(&slot.seq);
    assert_true(seq1 - seq0 >= 2); /* at least t_hook_fault's init and on_config_loaded */
    assert_int_equal(atomic_load(&slot.plugin), 0);
    assert_int_equal(atomic_load(&slot.hook), SPK_HOOK_CONFIG_LOADED);
    spk_host_unload(&set);
    assert_true(atomic_load(&slot.seq) > seq1);
    assert_int_equal(atomic_load(&slot.plugin), 0);
    assert_int_equal(atomic_load(&slot.hook), SPK_HOOK_FINI);
    assert_null(set.v);
}

/* Without a slot from the caller, a plugin stamps its own: never a NULL slot. */
static void test_bare_plugin_has_its_own_slot(void **state)
{
    (void)state;
    spk_plugin *p = NULL;
    spk_errbuf eb;
    assert_int_equal(spk_plugin_open(tplugin("t_hook_fault"), NULL, spk_host_table(), &p, &eb),
                     0);
    assert_ptr_equal(p->slot, &p->own_slot);
    spk_plugin_set set = {.v = &p, .n = 1};
    assert_int_equal(spk_plugin_set_init(&set, SPOKE_ROLE_EDGE, &eb), 0);
    assert_int_equal(atomic_load(&p->own_slot.seq), 2);
    spk_host_plugin_unload(p);
}

static void test_disabled_plugin_not_loaded(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, tplugin("t_abi_major"), NULL, 0);
    f.pc[0].enabled = false;
    assert_int_equal(load_set(&f, &eb), 0);
}

static void test_refusal_names_config_line(void **state)
{
    (void)state;
    cfgfix f;
    spk_errbuf eb;
    cfg_init(&f, SPK_COMPAT_STRICT);
    cfg_add(&f, tplugin("t_abi_major"), NULL, 0);
    assert_int_equal(load_set(&f, &eb), SPK_EABI);
    assert_non_null(strstr(eb.msg, "test.yaml:11: "));
}

int main(void)
{
    const char *t = getenv("SPOKE_TEST_PLUGIN_DIR"), *p = getenv("SPOKE_PLUGIN_DIR");
    if (t == NULL || p == NULL) {
        fprintf(stderr, "set SPOKE_TEST_PLUGIN_DIR and SPOKE_PLUGIN_DIR (ctest does)\n");
        return 1;
    }
    snprintf(tdir, sizeof(tdir), "%s", t);
    snprintf(pdir, sizeof(pdir), "%s", p);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts_passthrough),
        cmocka_unit_test(test_refuses_abi_major),
        cmocka_unit_test(test_refuses_newer_minor),
        cmocka_unit_test(test_refuses_small_struct),
        cmocka_unit_test(test_honours_short_table),
        cmocka_unit_test(test_refuses_missing_entry),
        cmocka_unit_test(test_refuses_missing_name),
        cmocka_unit_test(test_refuses_missing_and_garbage_files),
        cmocka_unit_test(test_checksum),
        cmocka_unit_test(test_sha256_known_value),
        cmocka_unit_test(test_versions),
        cmocka_unit_test(test_duplicate_names_refused),
        cmocka_unit_test(test_duplicate_ids_refused),
        cmocka_unit_test(test_requires_strict_and_loose),
        cmocka_unit_test(test_requirement_syntax),
        cmocka_unit_test(test_init_failure_refused),
        cmocka_unit_test(test_lifecycle_hooks_are_stamped),
        cmocka_unit_test(test_bare_plugin_has_its_own_slot),
        cmocka_unit_test(test_disabled_plugin_not_loaded),
        cmocka_unit_test(test_refusal_names_config_line),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
