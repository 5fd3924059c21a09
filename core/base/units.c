/*
 * units.c -- durations and sizes, parsed and printed (see units.h for the syntax).
 *
 * Both parsers are one routine over a table of units: digits, then a unit name that must
 * match a table row exactly, then the end of the string. The printers walk the same
 * tables backwards from a value, so whatever they print reads back to the same number.
 */
#include "units.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "err.h"

typedef struct unit {
    const char *name;
    uint64_t mul;
} unit;

static const unit duration_units[] = {
    {"ms", 1},
    {"s", SPK_SEC_MS},
    {"m", SPK_MIN_MS},
    {"h", SPK_HOUR_MS},
};

/* The binary units come first: the printer only uses those (N_BINARY of them). */
static const unit size_units[] = {
    {"B", 1},           {"KiB", SPK_KiB},      {"MiB", SPK_MiB},
    {"GiB", SPK_GiB},   {"TiB", SPK_TiB},      {"KB", 1000ull},
    {"MB", 1000000ull}, {"GB", 1000000000ull}, {"TB", 1000000000000ull},
};
#define N_BINARY 5

#define N(a) (sizeof(a) / sizeof((a)[0]))

int spk_parse_digits(const char *s, uint64_t *v, const char **end)
{
    uint64_t n = 0;
    const char *p = s;
    if (*p < '0' || *p > '9')
        return SPK_EINVAL;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned d = (unsigned)(*p - '0');
        if (n > (UINT64_MAX - d) / 10)
            return SPK_EINVAL;
        n = n * 10 + d;
    }
    *v = n;
    *end = p;
    return 0;
}

/* "<digits><unit>" with a unit from the table, or bare digits: multiplied by 1, but only
 * when they are 0 if bare_zero_only. */
static int parse_with_unit(const char *text, const unit *units, size_t n_units, bool bare_zero_only,
                           uint64_t *out)
{
    uint64_t v, mul = 0;
    const char *p;
    if (text == NULL || spk_parse_digits(text, &v, &p) != 0)
        return SPK_EINVAL;
    if (*p == '\0') {
        if (bare_zero_only && v != 0)
            return SPK_EINVAL;
        mul = 1;
    }
    for (size_t i = 0; i < n_units && *p != '\0'; i++)
        if (strcmp(p, units[i].name) == 0)
            mul = units[i].mul;
    if (mul == 0 || v > UINT64_MAX / mul)
        return SPK_EINVAL;
    *out = v * mul;
    return 0;
}

int spk_parse_duration_ms(const char *text, uint64_t *out_ms)
{
    return parse_with_unit(text, duration_units, N(duration_units), true, out_ms);
}

int spk_parse_size(const char *text, uint64_t *out_bytes)
{
    return parse_with_unit(text, size_units, N(size_units), false, out_bytes);
}

/* The largest unit that divides v exactly: 90000 -> "90s", 3600000 -> "1h". */
static const char *fmt_unit(uint64_t v, const unit *units, size_t n, char *buf, size_t cap)
{
    const unit *best = NULL;
    for (size_t i = 0; i < n; i++)
        if (v != 0 && v % units[i].mul == 0 && (best == NULL || units[i].mul > best->mul))
            best = &units[i];
    if (best == NULL || best->mul == 1)
        snprintf(buf, cap, "%llu%s", (unsigned long long)v,
                 v == 0 || best == NULL ? "" : best->name);
    else
        snprintf(buf, cap, "%llu%s", (unsigned long long)(v / best->mul), best->name);
    return buf;
}

const char *spk_fmt_duration(uint64_t ms, char *buf, size_t cap)
{
    return fmt_unit(ms, duration_units, N(duration_units), buf, cap);
}

/* Sizes print in binary units only (KB & co. would not be chosen for a power of two). */
const char *spk_fmt_size(uint64_t bytes, char *buf, size_t cap)
{
    return fmt_unit(bytes, size_units, N_BINARY, buf, cap);
}
