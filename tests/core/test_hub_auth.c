/*
 * test_hub_auth.c -- hubd's token files and per-call identity check (core/hub_auth.c), on
 * real files in a temporary directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "grpc.h"
#include "hub_auth.h"

/* SHA-256("s3cret") and SHA-256("other"). */
#define H_S3CRET "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
#define H_OTHER "d9298a10d1b0735837dc4bd85dac641b0f3cef27a47e5d53a54f2f3f5b2fcffa"

static char dir[64];

static const char *write_file(const char *name, const char *text, mode_t mode)
{
    static char path[128];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    chmod(path, mode);
    return path;
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/spoke-auth-XXXXXX");
    assert_non_null(mkdtemp(dir));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd);
}

static void test_sha256_constants_are_right(void **state)
{
    (void)state;
    /* The test's own constants, checked against the library through a table. */
    spk_hub_tokens *t;
    spk_errbuf eb;
    const char *p = write_file("t0", "a " H_S3CRET "\nb " H_OTHER "\n", 0600);
    assert_int_equal(spk_hub_tokens_load(p, &t, &eb), 0);
    assert_string_equal(spk_hub_tokens_find(t, "s3cret", 6), "a");
    assert_string_equal(spk_hub_tokens_find(t, "other", 5), "b");
    assert_null(spk_hub_tokens_find(t, "s3cre", 5));
    assert_null(spk_hub_tokens_find(t, "", 0));
    spk_hub_tokens_free(t);
}

static void test_comments_blank_lines_and_count(void **state)
{
    (void)state;
    spk_hub_tokens *t;
    spk_errbuf eb;
    const char *p = write_file("t1", "# edges\n\n  edge-1\t" H_S3CRET "  # first\n\nedge-2 " H_OTHER
                                     "\n", 0600);
    assert_int_equal(spk_hub_tokens_load(p, &t, &eb), 0);
    assert_int_equal(spk_hub_tokens_count(t), 2);
    assert_string_equal(spk_hub_tokens_find(t, "s3cret", 6), "edge-1");
    spk_hub_tokens_free(t);
}

static void expect_load_error(const char *text, mode_t mode, int code, const char *needle)
{
    spk_hub_tokens *t = NULL;
    spk_errbuf eb;
    const char *p = write_file("bad", text, mode);
    assert_int_equal(spk_hub_tokens_load(p, &t, &eb), code);
    assert_null(t);
    if (strstr(eb.msg, needle) == NULL)
        fail_msg("message '%s' lacks '%s'", eb.msg, needle);
}

static void test_malformed_files_name_the_line(void **state)
{
    (void)state;
    expect_load_error("edge-1\n", 0600, SPK_ECONFIG, "bad:1: expected");
    expect_load_error("# ok\nedge-1 abc\n", 0600, SPK_ECONFIG, "bad:2: edge edge-1: the SHA-256 must be 64");
    expect_load_error("e " H_S3CRET " extra\n", 0600, SPK_ECONFIG, "bad:1: expected");
    expect_load_error("e zz" H_S3CRET "\n", 0600, SPK_ECONFIG, "64 hex digits");
    expect_load_error("e " H_S3CRET "\ne " H_OTHER "\n", 0600, SPK_ECONFIG, "bad:2: edge e is listed twice");
    expect_load_error("e " H_S3CRET "\n", 0622, SPK_ECONFIG, "writable by group or others");
    spk_hub_tokens *t;
    spk_errbuf eb;
    char missing[128];
    snprintf(missing, sizeof(missing), "%s/none", dir);
    assert_int_equal(spk_hub_tokens_load(missing, &t, &eb), SPK_ENOENT);
}

static void test_identity_check(void **state)
{
    (void)state;
    spk_hub_tokens *t;
    spk_errbuf eb;
    spk_hub_identity id;
    const char *p = write_file("t2", "edge-1 " H_S3CRET "\nedge-2 " H_OTHER "\n", 0600);
    assert_int_equal(spk_hub_tokens_load(p, &t, &eb), 0);

    assert_int_equal(spk_hub_auth_check(t, false, "edge-1", "Bearer s3cret", NULL, 0, &id), 0);
    assert_int_equal(spk_hub_auth_check(t, false, "edge-1", "bearer s3cret", NULL, 0, &id), 0);
    assert_int_equal(spk_hub_auth_check(t, false, "edge-2", "Bearer s3cret", NULL, 0, &id),
                     SPK_GRPC_PERMISSION_DENIED);
    assert_non_null(strstr(id.reason, "belongs to edge 'edge-1'"));
    assert_int_equal(spk_hub_auth_check(t, false, "edge-1", "Bearer nope", NULL, 0, &id),
                     SPK_GRPC_UNAUTHENTICATED);
    assert_int_equal(spk_hub_auth_check(t, false, "edge-1", NULL, NULL, 0, &id),
                     SPK_GRPC_UNAUTHENTICATED);
    assert_int_equal(spk_hub_auth_check(t, false, "edge-1", "Basic s3cret", NULL, 0, &id),
                     SPK_GRPC_UNAUTHENTICATED);
    assert_int_equal(spk_hub_auth_check(t, false, "", "Bearer s3cret", NULL, 0, &id),
                     SPK_GRPC_INVALID_ARGUMENT);

    /* Certificates: the edge must be one of the names; with tokens too, both must agree. */
    const char *names[] = {"edge-1", "edge-1.example"};
    assert_int_equal(spk_hub_auth_check(NULL, true, "edge-1", NULL, names, 2, &id), 0);
    assert_int_equal(spk_hub_auth_check(NULL, true, "edge-1.example", NULL, names, 2, &id), 0);
    assert_int_equal(spk_hub_auth_check(NULL, true, "edge-2", NULL, names, 2, &id),
                     SPK_GRPC_PERMISSION_DENIED);
    assert_int_equal(spk_hub_auth_check(NULL, true, "edge-1", NULL, NULL, 0, &id),
                     SPK_GRPC_UNAUTHENTICATED);
    assert_int_equal(spk_hub_auth_check(t, true, "edge-1", "Bearer s3cret", names, 2, &id), 0);
    assert_int_equal(spk_hub_auth_check(t, true, "edge-2", "Bearer other", names, 2, &id),
                     SPK_GRPC_PERMISSION_DENIED);

    /* Nothing configured: anyone, as sent. */
    assert_int_equal(spk_hub_auth_check(NULL, false, "edge-9", NULL, NULL, 0, &id), 0);
    spk_hub_tokens_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_constants_are_right),
        cmocka_unit_test(test_comments_blank_lines_and_count),
        cmocka_unit_test(test_malformed_files_name_the_line),
        cmocka_unit_test(test_identity_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
