/*
 * test_fs.c -- spk_mkdir_p (core/base/fs.c) on real directories: parents made, existing
 * ones kept, and a path too long for the buffer refused whole instead of cut short (the
 * copies this replaced in the supervisor silently truncated a long run_dir).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "fs.h"

static void test_parents_and_existing(void **state)
{
    (void)state;
    char base[] = "/tmp/spoke-fs-XXXXXX";
    assert_non_null(mkdtemp(base));
    char path[256];
    snprintf(path, sizeof(path), "%s/a/b/c", base);
    assert_int_equal(spk_mkdir_p(path, 0700), 0);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0700);
    assert_int_equal(spk_mkdir_p(path, 0700), 0); /* again: fine */
    snprintf(path, sizeof(path), "%s/a/b/c/", base);
    assert_int_equal(spk_mkdir_p(path, 0700), 0); /* a trailing slash */
    /* A file in the way. */
    snprintf(path, sizeof(path), "%s/file", base);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fclose(f);
    snprintf(path, sizeof(path), "%s/file/sub", base);
    assert_int_equal(spk_mkdir_p(path, 0700), ENOTDIR);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
    assert_int_equal(system(cmd), 0);
}

static void test_too_long_is_refused_whole(void **state)
{
    (void)state;
    static char path[PATH_MAX + 16];
    memset(path, 'x', sizeof(path) - 1);
    memcpy(path, "/tmp/spoke-fs-long/", 19);
    path[PATH_MAX] = '\0'; /* PATH_MAX bytes: one too many with its NUL */
    assert_int_equal(spk_mkdir_p(path, 0700), ENAMETOOLONG);
    struct stat st;
    assert_int_not_equal(stat("/tmp/spoke-fs-long", &st), 0); /* nothing was made */
    assert_int_equal(spk_mkdir_p("", 0700), EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parents_and_existing),
        cmocka_unit_test(test_too_long_is_refused_whole),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
