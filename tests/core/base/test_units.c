/*
 * test_units.c -- core/base/units.c, the one parser and printer of durations and sizes
 * that the config file, the plugins' config_get_duration/config_get_size and the tools
 * share: what each accepts and refuses, and that what the printers write reads back.
 * Links spk_base alone, as the queue does.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>

#include "err.h"
#include "units.h"

/* ---- durations and sizes ------------------------------------------------------------ */

static void test_durations(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t ms;
    } good[] = {
        {"0", 0},
        {"0ms", 0},
        {"0s", 0},
        {"1ms", 1},
        {"100ms", 100},
        {"1500ms", 1500},
        {"30s", 30000},
        {"2m", 120000},
        {"1h", 3600000},
        {"007s", 7000},
        {"18446744073709551615ms", UINT64_MAX},
        {"5124095576030h", 5124095576030ull * 3600000ull},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        uint64_t v = 12345;
        if (spk_parse_duration_ms(good[i].text, &v) != 0 || v != good[i].ms)
            fail_msg("'%s' -> %llu", good[i].text, (unsigned long long)v);
    }
    static const char *const bad[] = {
        "",
        "1",
        "10",
        "-1s",
        "+1s",
        "s",
        "ms",
        "1 s",
        " 1s",
        "1s ",
        "1.5s",
        "1d",
        "1S",
        "1sec",
        "0x10s",
        "1msx",
        "18446744073709551616ms",
        "18446744073709551615s",
        "5124095576031h",
        "99999999999999999999999h",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 777;
        if (spk_parse_duration_ms(bad[i], &v) != SPK_EINVAL || v != 777)
            fail_msg("'%s' accepted as %llu", bad[i], (unsigned long long)v);
    }
    uint64_t v;
    assert_int_equal(spk_parse_duration_ms(NULL, &v), SPK_EINVAL);
}

static void test_sizes(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        uint64_t bytes;
    } good[] = {
        {"0", 0},
        {"1024", 1024},
        {"1B", 1},
        {"1KiB", 1024},
        {"64KiB", 65536},
        {"1MiB", 1048576},
        {"1GiB", 1073741824},
        {"1TiB", 1099511627776ull},
        {"1KB", 1000},
        {"1MB", 1000000},
        {"1GB", 1000000000},
        {"2TB", 2000000000000ull},
        {"18446744073709551615", UINT64_MAX},
        {"18446744073709551615B", UINT64_MAX},
        {"16777215TiB", 16777215ull << 40},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        uint64_t v = 12345;
        if (spk_parse_size(good[i].text, &v) != 0 || v != good[i].bytes)
            fail_msg("'%s' -> %llu", good[i].text, (unsigned long long)v);
    }
    static const char *const bad[] = {
        "",
        "-1",
        "KiB",
        "1kib",
        "1kb",
        "1K",
        "1 KiB",
        "1.5GiB",
        "1PiB",
        "1iB",
        "18446744073709551616",
        "16777216TiB",
        "18446744073709551616B",
        "0x10",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 777;
        if (spk_parse_size(bad[i], &v) != SPK_EINVAL || v != 777)
            fail_msg("'%s' accepted as %llu", bad[i], (unsigned long long)v);
    }
}

static void test_digits(void **state)
{
    (void)state;
    uint64_t v = 7;
    const char *end = NULL;
    assert_int_equal(spk_parse_digits("6432x", &v, &end), 0);
    assert_int_equal(v, 6432);
    assert_string_equal(end, "x");
    v = 7;
    end = NULL;
    assert_int_equal(spk_parse_digits("x1", &v, &end), SPK_EINVAL);
    assert_int_equal(spk_parse_digits("", &v, &end), SPK_EINVAL);
    assert_int_equal(spk_parse_digits("18446744073709551616", &v, &end), SPK_EINVAL);
    assert_int_equal(v, 7);
    assert_null(end);
    assert_int_equal(spk_parse_digits("18446744073709551615", &v, &end), 0);
    assert_true(v == UINT64_MAX);
}

/* The printers pick the largest unit that divides the value, and what they print loads
 * back to the same value. */
static void test_format_round_trip(void **state)
{
    (void)state;
    static const struct {
        uint64_t v;
        const char *dur, *size;
    } cases[] = {
        {0, "0", "0"},
        {1, "1ms", "1B"},
        {50, "50ms", "50B"},
        {1000, "1s", "1000B"},
        {1024, "1024ms", "1KiB"},
        {60000, "1m", "60000B"},
        {90000, "90s", "90000B"},
        {3600000, "1h", "3600000B"},
        {86400000, "24h", "84375KiB"},
        {65536, "65536ms", "64KiB"},
        {1ull << 30, "1073741824ms", "1GiB"},
        {3ull << 40, "3298534883328ms", "3TiB"},
        {UINT64_MAX, "18446744073709551615ms", "18446744073709551615B"},
    };
    char buf[32];
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t back = 7;
        assert_string_equal(spk_fmt_duration(cases[i].v, buf, sizeof(buf)), cases[i].dur);
        assert_int_equal(spk_parse_duration_ms(buf, &back), 0);
        assert_true(back == cases[i].v);
        back = 7;
        assert_string_equal(spk_fmt_size(cases[i].v, buf, sizeof(buf)), cases[i].size);
        assert_int_equal(spk_parse_size(buf, &back), 0);
        assert_true(back == cases[i].v);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_digits),
        cmocka_unit_test(test_format_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
