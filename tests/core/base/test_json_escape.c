/*
 * test_json_escape.c -- spk_json_escape (core/base/json.c), the one JSON string escaper
 * (log.format: json, spoke-bench's JSON): every output, wrapped in quotes, is valid JSON
 * by spk_json_valid; control characters, quotes and backslashes are escaped; bytes that
 * are not UTF-8 become U+FFFD; a full buffer stops before an escape or a character that
 * would not fit, never inside one.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "json.h"

static void check_valid(const char *body)
{
    char q[512];
    int n = snprintf(q, sizeof(q), "\"%s\"", body);
    assert_true(spk_json_valid(q, (size_t)n));
}

static void test_escapes(void **state)
{
    (void)state;
    char out[256];
    const char in[] = "a\"b\\c\nd\te\rf\x01g\x7fh";
    size_t n = spk_json_escape(out, sizeof(out), in, sizeof(in) - 1);
    assert_string_equal(out, "a\\\"b\\\\c\\nd\\te\\rf\\u0001g\\u007fh");
    assert_int_equal(n, strlen(out));
    check_valid(out);
    /* a NUL inside the input is escaped too */
    n = spk_json_escape(out, sizeof(out), "x\0y", 3);
    assert_string_equal(out, "x\\u0000y");
}

static void test_utf8(void **state)
{
    (void)state;
    char out[256];
    spk_json_escape(out, sizeof(out), "caf\xc3\xa9 \xe2\x82\xac", 9);
    assert_string_equal(out, "caf\xc3\xa9 \xe2\x82\xac"); /* valid UTF-8 kept as is */
    /* a lone continuation byte, a truncated sequence, an overlong form, a surrogate */
    const char bad[] = "a\x80 b\xc3 c\xc0\xaf d\xed\xa0\x80";
    spk_json_escape(out, sizeof(out), bad, sizeof(bad) - 1);
    assert_non_null(strstr(out, "a\\ufffd b\\ufffd c\\ufffd\\ufffd d\\ufffd"));
    check_valid(out);
}

static void test_full_buffer(void **state)
{
    (void)state;
    char out[8];
    /* "ab" + "\\n" = 4 bytes, then "\\u0001" (6) does not fit in the 3 left */
    size_t n = spk_json_escape(out, sizeof(out), "ab\n\x01zz", 6);
    assert_string_equal(out, "ab\\n");
    assert_int_equal(n, 4);
    /* a 3-byte character that does not fit whole is left out whole */
    n = spk_json_escape(out, 6, "abcd\xe2\x82\xac", 7);
    assert_string_equal(out, "abcd");
    n = spk_json_escape(out, 1, "abc", 3);
    assert_int_equal(n, 0);
    assert_string_equal(out, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_full_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
