/*
 * hex.h -- hexadecimal digits, for the places that read them: SHA-256 sums in the config
 * and in hubd's token file, %XX escapes in grpc-message.
 */
#ifndef SPK_HEX_H
#define SPK_HEX_H

#include <stddef.h>
#include <stdint.h>

/* The value of hex digit c (0-9, a-f, A-F), or -1. */
static inline int spk_hex_digit(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode exactly 2 * n hex digits of `hex` (a string: its length must be 2 * n) into
 * out[0..n). Returns 0, or -1 for a wrong length or a character that is not a hex digit
 * (out is then partly written). */
static inline int spk_hex_decode(const char *hex, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hex[2 * i] != '\0' ? spk_hex_digit(hex[2 * i]) : -1;
        int lo = hi >= 0 ? spk_hex_digit(hex[2 * i + 1]) : -1;
        if (lo < 0)
            return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return hex[2 * n] == '\0' ? 0 : -1;
}

#endif
