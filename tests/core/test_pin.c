/*
 * test_pin.c -- a generation's plugin files (core/pin.h): the supervisor's copies hold the
 * bytes the file had when they were taken, nobody can change them (sealed), and a worker's
 * config maps them back to its entries, autoloaded files included, so that the loader
 * reads only them.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "pin.h"

static char dir[256], pdir[300], cfgpath[300];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    chmod(path, 0644);
}

static size_t read_all(int fd, char *buf, size_t cap)
{
    char p[64];
    snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
    int f = open(p, O_RDONLY | O_CLOEXEC);
    assert_true(f >= 0);
    ssize_t n = read(f, buf, cap);
    close(f);
    assert_true(n >= 0);
    return (size_t)n;
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/spk-test-pin-XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(pdir, sizeof(pdir), "%s/plugins", dir);
    assert_int_equal(mkdir(pdir, 0755), 0);
    char p[400];
    snprintf(p, sizeof(p), "%s/a.so", pdir);
    write_file(p, "listed, version 1");
    snprintf(p, sizeof(p), "%s/b.so", pdir);
    write_file(p, "autoloaded");
    snprintf(cfgpath, sizeof(cfgpath), "%s/spoke.yaml", dir);
    char text[1200];
    snprintf(text, sizeof(text),
             "listen: { upstream: 127.0.0.1:1 }\n"
             "plugins:\n  dir: %s\n  autoload: true\n  list:\n"
             "    - { name: one, file: a.so }\n"
             "    - { name: two, file: a.so }\n"
             "    - { name: off, file: gone.so, enabled: false }\n",
             pdir);
    write_file(cfgpath, text);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[400];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* The copies are taken once, in config order (autoloaded last); an edit in place or a
 * new file later changes none of them, and none can be written, grown or shrunk. */
static void test_pins_hold_the_bytes_and_are_sealed(void **state)
{
    (void)state;
    spk_config *cfg;
    spk_errbuf eb = {""};
    assert_int_equal(spk_config_load(cfgpath, &cfg, &eb), 0);
    spk_pins pins;
    assert_int_equal(spk_pins_take(cfg, &pins, &eb), 0);
    assert_int_equal(pins.n, 3); /* one, two (the same file twice), b.so; not the disabled */
    assert_true(strstr(pins.v[0].path, "/a.so") != NULL);
    assert_true(strstr(pins.v[1].path, "/a.so") != NULL);
    assert_true(strstr(pins.v[2].path, "/b.so") != NULL);
    assert_int_not_equal(pins.v[0].fd, pins.v[1].fd);

    char p[400];
    snprintf(p, sizeof(p), "%s/a.so", pdir);
    write_file(p, "edited in place, version 2"); /* same inode, new bytes */
    snprintf(p, sizeof(p), "%s/c.so", pdir);
    write_file(p, "added later");

    char buf[128];
    size_t n = read_all(pins.v[0].fd, buf, sizeof(buf));
    assert_int_equal(n, strlen("listed, version 1"));
    assert_memory_equal(buf, "listed, version 1", n);

    int seals = fcntl(pins.v[0].fd, F_GET_SEALS);
    assert_int_equal(seals, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);
    char fdp[64];
    snprintf(fdp, sizeof(fdp), "/proc/self/fd/%d", pins.v[0].fd);
    int w = open(fdp, O_RDWR | O_CLOEXEC);
    assert_true(w >= 0); /* a memfd reopens read-write, but its seals hold: */
    assert_int_equal(write(w, "x", 1), -1);
    assert_int_equal(errno, EPERM);
    assert_int_equal(ftruncate(w, 0), -1);
    assert_int_equal(mmap(NULL, 4096, PROT_WRITE, MAP_SHARED, w, 0), MAP_FAILED);
    assert_int_equal(fcntl(w, F_ADD_SEALS, 0) == 0 ? 0 : -1, -1); /* F_SEAL_SEAL */
    close(w);

    /* A quarantine generation's copy: its own descriptors, the same bytes. */
    spk_pins dup;
    assert_int_equal(spk_pins_dup(&pins, &dup), 0);
    assert_int_equal(dup.n, 3);
    assert_int_not_equal(dup.v[0].fd, pins.v[0].fd);
    n = read_all(dup.v[0].fd, buf, sizeof(buf));
    assert_memory_equal(buf, "listed, version 1", n);
    spk_pins_free(&dup);
    spk_pins_free(&pins);
    spk_config_free(cfg);
    snprintf(p, sizeof(p), "%s/c.so", pdir);
    unlink(p);
}

/* A worker parses the snapshot (no autoloaded entries) and gets the descriptors back on
 * the entries, the autoloaded file appended, the disabled entry untouched. */
static void test_apply_maps_pins_to_entries(void **state)
{
    (void)state;
    spk_config *sup, *wk;
    spk_errbuf eb = {""};
    assert_int_equal(spk_config_load(cfgpath, &sup, &eb), 0);
    spk_pins pins;
    assert_int_equal(spk_pins_take(sup, &pins, &eb), 0);
    assert_int_equal(spk_config_load(cfgpath, &wk, &eb), 0);
    assert_int_equal(wk->n_plugins, 3);
    int fds[3];
    char *paths[3];
    for (size_t i = 0; i < pins.n; i++) {
        fds[i] = pins.v[i].fd;
        paths[i] = pins.v[i].path;
    }
    assert_int_equal(spk_pins_apply(wk, fds, paths, pins.n, &eb), 0);
    assert_true(wk->plugins_pinned);
    assert_int_equal(wk->n_plugins, 4);
    assert_int_equal(wk->plugins[0].pin_fd, fds[0]);
    assert_int_equal(wk->plugins[1].pin_fd, fds[1]);
    assert_int_equal(wk->plugins[2].pin_fd, 0); /* disabled */
    assert_true(wk->plugins[3].autoloaded);
    assert_string_equal(wk->plugins[3].file, "b.so");
    assert_int_equal(wk->plugins[3].pin_fd, fds[2]);
    spk_config_free(wk);
    spk_pins_free(&pins);
    spk_config_free(sup);
}

/* An untrusted file refuses the whole set, naming the config line. */
static void test_untrusted_file_refuses_the_set(void **state)
{
    (void)state;
    char p[400];
    snprintf(p, sizeof(p), "%s/b.so", pdir);
    chmod(p, 0666);
    spk_config *cfg;
    spk_errbuf eb = {""};
    assert_int_equal(spk_config_load(cfgpath, &cfg, &eb), 0);
    spk_pins pins = {0};
    assert_int_equal(spk_pins_take(cfg, &pins, &eb), SPK_EINVAL);
    assert_int_equal(pins.n, 0);
    assert_non_null(strstr(eb.msg, "/b.so: refused: file "));
    assert_non_null(strstr(eb.msg, "is writable by group and others (mode 0666)"));
    chmod(p, 0644);
    spk_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pins_hold_the_bytes_and_are_sealed),
        cmocka_unit_test(test_apply_maps_pins_to_entries),
        cmocka_unit_test(test_untrusted_file_refuses_the_set),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
