/*
 * units.h -- the one parser and printer of durations and sizes, for every part of spoke.
 *
 * The config file, the plugins (through host->config_get_duration / config_get_size) and
 * the tools all read "30s" and "64KiB" with these functions, so one spelling means the same
 * thing everywhere (docs/config.md, "Value types", is the user's side of this header):
 *
 *   duration  <digits><unit>, unit ms, s, m or h; a bare 0 means zero. No sign, space,
 *             fraction or other unit ("1.5s", "1d", "1S" are refused).
 *   size      <digits>[unit], unit B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB,
 *             TB (powers of 1000), case-sensitive; a bare number is bytes.
 *
 * Values over 2^64-1 (ms or bytes) are refused. Ranges are the caller's business.
 */
#ifndef SPK_UNITS_H
#define SPK_UNITS_H

#include <stddef.h>
#include <stdint.h>

#define SPK_KiB 1024ull
#define SPK_MiB (1024ull * SPK_KiB)
#define SPK_GiB (1024ull * SPK_MiB)
#define SPK_TiB (1024ull * SPK_GiB)

#define SPK_SEC_MS  1000ull
#define SPK_MIN_MS  (60ull * SPK_SEC_MS)
#define SPK_HOUR_MS (60ull * SPK_MIN_MS)
#define SPK_DAY_MS  (24ull * SPK_HOUR_MS)

/* A duration into milliseconds. Returns 0, or SPK_EINVAL (NULL or malformed text; *out_ms
 * is then left alone). */
int spk_parse_duration_ms(const char *text, uint64_t *out_ms);

/* A size into bytes. Returns 0, or SPK_EINVAL (NULL or malformed text; *out_bytes is then
 * left alone). */
int spk_parse_size(const char *text, uint64_t *out_bytes);

/* The leading decimal digits of s into *v, with *end just past them. Returns 0, or
 * SPK_EINVAL when s does not start with a digit or the number overflows (*v, *end left
 * alone). For plain integers and ports, which take no unit. */
int spk_parse_digits(const char *s, uint64_t *v, const char **end);

/* Print a duration or a size in the largest unit that divides it exactly ("90s", "1h",
 * "64KiB"; sizes in binary units only, 0 as "0"), into buf[cap]. The text reads back to
 * the same value through the parser above. Returns buf. */
const char *spk_fmt_duration(uint64_t ms, char *buf, size_t cap);
const char *spk_fmt_size(uint64_t bytes, char *buf, size_t cap);

#endif
