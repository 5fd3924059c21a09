/*
 * test_crc32c.c -- CRC-32C (queue/crc32c.c): the published test vectors, and the CPU
 * instruction's interleaved code against the portable tables and against a bit-by-bit
 * reference, for every length up to a few records and every start alignment, and for a
 * register carried across calls split at every point.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "crc32c.h"

static uint32_t reference(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return crc;
}

static uint32_t std_crc(uint32_t (*f)(uint32_t, const void *, size_t), const void *p, size_t n)
{
    return ~f(0xFFFFFFFFu, p, n);
}

/* RFC 3720 (iSCSI), B.4, and the usual "123456789" check value. */
static void test_vectors(void **state)
{
    (void)state;
    uint8_t buf[32];
    uint32_t (*impl[])(uint32_t, const void *, size_t) = {spk_crc32c, spk_crc32c_portable};
    print_message("spk_crc32c runs: %s\n", spk_crc32c_impl());
#if defined(__x86_64__)
    /* Where the instruction exists, the interleaved code is what the rest checks. */
    if (__builtin_cpu_supports("sse4.2"))
        assert_string_equal(spk_crc32c_impl(), "sse4.2");
#endif
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(std_crc(impl[i], "123456789", 9), 0xE3069283u);
        memset(buf, 0, sizeof(buf));
        assert_int_equal(std_crc(impl[i], buf, 32), 0x8A9136AAu);
        memset(buf, 0xFF, sizeof(buf));
        assert_int_equal(std_crc(impl[i], buf, 32), 0x62A8AB43u);
        for (int b = 0; b < 32; b++)
            buf[b] = (uint8_t)b;
        assert_int_equal(std_crc(impl[i], buf, 32), 0x46DD794Eu);
        for (int b = 0; b < 32; b++)
            buf[b] = (uint8_t)(31 - b);
        assert_int_equal(std_crc(impl[i], buf, 32), 0x113FDB5Cu);
        assert_int_equal(impl[i](0x12345678u, buf, 0), 0x12345678u);
    }
}

/* Every length from 0 to just past two 3 x 1024 chunks (so every mix of long chunks,
 * short chunks, 8-byte words and single bytes), at every start alignment, from a few
 * starting registers: all three implementations agree. */
static void test_lengths_and_alignments(void **state)
{
    (void)state;
    enum { MAX = 6 * 1024 + 3 * 128 + 64 };
    uint8_t *buf = malloc(MAX + 8);
    assert_non_null(buf);
    uint32_t x = 2463534242u;
    for (size_t i = 0; i < MAX + 8; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (uint8_t)x;
    }
    static const uint32_t starts[] = {0xFFFFFFFFu, 0, 0xDEADBEEFu};
    for (size_t len = 0; len <= MAX; len += len < 1200 ? 1 : 7) {
        for (size_t a = 0; a < 8; a++) {
            uint32_t s = starts[(len + a) % 3];
            uint32_t want = reference(s, buf + a, len);
            assert_int_equal(spk_crc32c(s, buf + a, len), want);
            assert_int_equal(spk_crc32c_portable(s, buf + a, len), want);
        }
    }
    free(buf);
}

/* The register carries across calls: splitting a 4 KiB record anywhere changes nothing. */
static void test_split_anywhere(void **state)
{
    (void)state;
    enum { LEN = 4224 };
    uint8_t *buf = malloc(LEN);
    assert_non_null(buf);
    for (size_t i = 0; i < LEN; i++)
        buf[i] = (uint8_t)(i * 131 + 7);
    uint32_t whole = spk_crc32c(0xFFFFFFFFu, buf, LEN);
    assert_int_equal(whole, reference(0xFFFFFFFFu, buf, LEN));
    for (size_t cut = 0; cut <= LEN; cut++) {
        uint32_t c = spk_crc32c(0xFFFFFFFFu, buf, cut);
        assert_int_equal(spk_crc32c(c, buf + cut, LEN - cut), whole);
        c = spk_crc32c_portable(0xFFFFFFFFu, buf, cut);
        assert_int_equal(spk_crc32c_portable(c, buf + cut, LEN - cut), whole);
    }
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors),
        cmocka_unit_test(test_lengths_and_alignments),
        cmocka_unit_test(test_split_anywhere),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
